// Executor stand-in for <cooperative_groups.h>: this_cluster() and the cluster_group calls
// the kernels use, as CUDA defines them (simt/cluster.cpp has the model and its limits).
// A launch without a cluster attribute is a cluster of one block, as on sm_90.
#pragma once

namespace cooperative_groups {

struct cluster_group {
  // barrier.cluster.arrive + wait: every live thread of the cluster.
  void sync() { ::simt::cluster_sync(); }
  // The address at p's offset in the dynamic shared memory of block `rank` of the cluster.
  template <typename T>
  T* map_shared_rank(T* p, unsigned int rank) const {
    return static_cast<T*>(::simt::cluster_map_shared(p, rank));
  }
  template <typename T>
  T& map_shared_rank(T& v, unsigned int rank) const {
    return *static_cast<T*>(::simt::cluster_map_shared(&v, rank));
  }
  unsigned int query_shared_rank(const void* p) const { return ::simt::cluster_query_rank(p); }
  dim3 dim_blocks() const { return ::simt::cluster_dims(); }
  dim3 block_index() const { return ::simt::cluster_block_index(); }
  unsigned int num_blocks() const {
    const dim3 d = dim_blocks();
    return d.x * d.y * d.z;
  }
  unsigned int block_rank() const {
    const dim3 d = dim_blocks(), i = block_index();
    return (i.z * d.y + i.y) * d.x + i.x;
  }
  unsigned int num_threads() const { return num_blocks() * ::blockDim.x * ::blockDim.y * ::blockDim.z; }
  unsigned int thread_rank() const {
    const unsigned per = ::blockDim.x * ::blockDim.y * ::blockDim.z;
    return block_rank() * per + (threadIdx.z * ::blockDim.y + threadIdx.y) * ::blockDim.x + threadIdx.x;
  }
  static bool is_valid() { return true; }
};
inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
