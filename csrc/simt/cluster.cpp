// Thread-block clusters in the SIMT executor: the kernel side of cooperative_groups'
// cluster_group (include/cooperative_groups.h calls these).
//
// Model: the blocks of one cluster run together as one pool of fibers (scheduler.h,
// pool.cpp run_pool); each keeps its own __syncthreads barrier, warps and dynamic
// shared-memory window. Static __shared__ objects exist once per declaration (simt.h), so a
// cluster of more than one block that reaches one fails (static_shared_in_cluster). cluster.sync() (barrier.cluster
// arrive + wait) waits for every live thread of the cluster; map_shared_rank(p, r) maps an
// address in the caller's dynamic shared memory to the same offset in block r's (distributed
// shared memory), bounds-checked. A block's shared memory is poisoned (0xFF) when its last
// thread exits, so a remote read after the owner exited (a missing final cluster.sync) reads
// NaN / -1 instead of the values the owner left.
//
// Limits: the fibers of a cluster switch only at barriers, collectives and spins, so the
// order of remote reads and writes between two cluster.sync()s is one fixed interleaving
// (races inside that window are not seen); static __shared__ is refused in clusters and
// map_shared_rank takes dynamic shared memory only; barrier.cluster.arrive/wait split
// phases, cluster-scope fences and mbarriers are not modelled.
#include "simt/scheduler.h"
#include "simt/metrics.h"
#include "simt/race.h"

namespace simt {

using namespace detail;

void detail::release_cluster_barrier(Scheduler& s) {
  race::cluster_barrier(s);
  metrics::cluster_barrier(s);
  s.cluster_arrived = 0;
  const int total = s.pool_fibers;
  for (int i = 0; i < total; ++i) {
    Fiber& f = s.fibers[i];
    if (f.wait == Wait::kCluster) {
      f.wait = Wait::kNone;
      f.blocked = false;
    }
  }
  ++s.progress;
}

void cluster_sync() {
  Scheduler& s = S();
  Fiber& f = cur_fiber("cluster.sync");
  f.wait = Wait::kCluster;
  f.blocked = true;
  ++s.cluster_arrived;
  ++s.progress;
  if (s.cluster_arrived == s.pool_alive) release_cluster_barrier(s);
  if (f.blocked) wait_here();
}

void* cluster_map_shared(const void* p, unsigned rank) {
  Scheduler& s = S();
  cur_fiber("cluster.map_shared_rank");
  const Block& me = *s.cur_block;
  if (s.shuffle) fail("cluster.map_shared_rank(%p, %u) in a concurrent pool (not a cluster launch)", p, rank);
  const auto* c = static_cast<const unsigned char*>(p);
  if (rank >= static_cast<unsigned>(s.nblocks)) {
    fail("cluster.map_shared_rank(%p, %u): rank out of range (the cluster has %d blocks)", p, rank, s.nblocks);
  }
  if (c < me.dyn || c >= me.dyn + s.dyn_bytes) {
    fail("cluster.map_shared_rank(%p, %u): not an address in this block's %zu bytes of dynamic shared memory "
         "(the executor maps dynamic shared memory only)",
         p, rank, s.dyn_bytes);
  }
  return s.blocks[rank]->dyn + (c - me.dyn);
}

unsigned cluster_query_rank(const void* p) {
  Scheduler& s = S();
  cur_fiber("cluster.query_shared_rank");
  const auto* c = static_cast<const unsigned char*>(p);
  for (int r = 0; r < s.nblocks; ++r) {
    const Block& b = *s.blocks[r];
    if (c >= b.dyn && c < b.dyn + s.dyn_bytes) return static_cast<unsigned>(r);
  }
  fail("cluster.query_shared_rank(%p): not in the dynamic shared memory of a block of this cluster", p);
}

void static_shared_in_cluster() {
  fail("static __shared__ variable in a %s of %d blocks: the executor keeps one instance per "
       "declaration, which the blocks of a cluster (running together) would share; take the cluster kernel's "
       "shared memory with INFEROPS_DYNAMIC_SMEM",
       S().shuffle ? "concurrent pool (concurrent_begin/end)" : "cluster launch", S().nblocks);
}

dim3 cluster_dims() {
  cur_fiber("cluster_group");
  return S().cluster;
}

dim3 cluster_block_index() {
  cur_fiber("cluster_group");
  const dim3 c = S().cluster;
  return dim3(g_blockIdx.x % c.x, g_blockIdx.y % c.y, g_blockIdx.z % c.z);
}

}  // namespace simt
