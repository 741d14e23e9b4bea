// Executor stand-in for <cooperative_groups.h>. Thread-block clusters are not modelled yet:
// launches with a cluster dimension are refused (cudaLaunchKernelEx returns
// cudaErrorNotSupported), so cluster code compiles but never runs; calling it traps.
#pragma once

namespace cooperative_groups {

struct cluster_group {
  void sync() { ::simt::fail("cooperative_groups: clusters are not modelled by the executor"); }
  template <typename T>
  T* map_shared_rank(T*, unsigned) {
    ::simt::fail("cooperative_groups: clusters are not modelled by the executor");
  }
  unsigned block_rank() const { ::simt::fail("cooperative_groups: clusters are not modelled by the executor"); }
  unsigned num_blocks() const { ::simt::fail("cooperative_groups: clusters are not modelled by the executor"); }
};
inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
