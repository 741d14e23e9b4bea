// Concurrent launches in the SIMT executor: several grids run as ONE pool of fibers
// (scheduler.h), so grids that wait on each other's flags -- gemm_reduce_scatter's virtual
// ranks, whose owners spin (ld.acquire) on tiles the other ranks' grids push -- make
// progress together, as they do resident side by side on a GPU.
//
// concurrent_begin() starts queueing the calling thread's launches (each checked as the CUDA
// runtime checks it, its parameters kept alive by the queue); concurrent_end(true) starts every
// block of every queued grid, each with its own launch (kernel and parameters, gridDim,
// blockDim, dynamic shared memory, its own window), and runs them round-robin in an order
// reshuffled every pass from INFEROPS_SIMT_SCHEDULE_SEED (default 0; errors name the seed).
// A fiber spinning on a flag (ld.acquire, st.release) yields, so every other fiber of the
// pool runs before it spins again; a pool in which fibers only spin for
// INFEROPS_SIMT_SPIN_LIMIT_S is reported as a livelock naming the blocks still running.
//
// Limits: cluster launches cannot be queued (a cluster already is a pool); static __shared__
// is refused in a pool of more than one block (one instance per declaration); the pool is
// capped at INFEROPS_SIMT_MAX_POOL_THREADS threads (default 65536: each is a fiber with its
// own stack) and refused above that with an error naming the grids.
#include "simt/metrics.h"
#include "simt/scheduler.h"

#include <cstdlib>
#include <string>
#include <vector>

namespace simt {

using namespace detail;

namespace {

struct Queued {
  LaunchConfig cfg;
  const void* kernel;
  BlockBody body;
  std::shared_ptr<const void> ctx;
};

// Per OS thread: other threads' launches are not captured by this thread's scope.
thread_local bool t_deferring = false;
thread_local std::vector<Queued> t_queue;

long env_long(const char* name, long fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 0);
  if (*end) throw KernelError(std::string("simt: expected an integer in ") + name + ", got \"" + v + "\"");
  return x;
}

}  // namespace

bool detail::defer_launch(const LaunchConfig& cfg, const void* kernel, BlockBody body, const std::shared_ptr<const void>& ctx) {
  if (!t_deferring) return false;
  const dim3 c = cfg.cluster;
  if (c.x * c.y * c.z != 1) {
    throw KernelError("simt: a cluster launch inside concurrent_begin/concurrent_end (concurrent pools of "
                      "clusters are not modelled)");
  }
  t_queue.push_back({cfg, kernel, body, ctx});
  return true;
}

void concurrent_begin() {
  if (t_deferring) throw KernelError("simt: concurrent_begin inside concurrent_begin (scopes do not nest)");
  t_queue.clear();
  t_deferring = true;
}

void concurrent_end(bool run) {
  if (!t_deferring) throw KernelError("simt: concurrent_end without concurrent_begin");
  t_deferring = false;
  std::vector<Queued> queue;
  queue.swap(t_queue);
  if (!run || queue.empty()) return;
  long long nblocks = 0, nthreads = 0;
  std::string grids;
  for (const Queued& q : queue) {
    const long long blocks = 1ll * q.cfg.grid.x * q.cfg.grid.y * q.cfg.grid.z;
    const long long thr = 1ll * q.cfg.block.x * q.cfg.block.y * q.cfg.block.z;
    nblocks += blocks;
    nthreads += blocks * thr;
    grids += (grids.empty() ? "" : ", ") + std::to_string(blocks) + "x" + std::to_string(thr);
  }
  const long cap = env_long("INFEROPS_SIMT_MAX_POOL_THREADS", 65536);
  if (nthreads > cap) {
    throw KernelError("simt: a concurrent pool of " + std::to_string(queue.size()) + " grids (blocks x threads: " +
                      grids + ") has " + std::to_string(nthreads) + " threads, more than " + std::to_string(cap) +
                      " (INFEROPS_SIMT_MAX_POOL_THREADS; each thread is a fiber with its own stack): launch "
                      "fewer blocks per grid");
  }
  Scheduler& s = S();
  std::lock_guard<std::mutex> lock(s.lock);
  if (s.current) throw KernelError("simt: concurrent_end inside a kernel");
  const int nb = static_cast<int>(nblocks);
  ensure_blocks(s, nb);
  ensure_fibers(s, static_cast<int>(nthreads));
  int index = 0, first = 0;
  for (std::size_t gi = 0; gi < queue.size(); ++gi) {
    const Queued& q = queue[gi];
    const dim3 g = q.cfg.grid, bd = q.cfg.block;
    const int thr = static_cast<int>(bd.x * bd.y * bd.z);
    metrics::grid_begin(static_cast<int>(gi), q.kernel, q.cfg);
    for (unsigned z = 0; z < g.z; ++z) {
      for (unsigned y = 0; y < g.y; ++y) {
        for (unsigned x = 0; x < g.x; ++x) {
          Block& b = *s.blocks[index];
          b.nthreads = thr;
          b.dyn_bytes = q.cfg.smem_bytes;
          b.grid = g;
          b.bdim = bd;
          b.grid_index = static_cast<int>(gi);
          b.kernel = q.kernel;
          b.body = q.body;
          b.ctx = q.ctx;
          start_block(s, b, make_uint3(x, y, z), index, first);
          ++index;
          first += thr;
        }
      }
    }
  }
  s.nblocks = nb;
  s.pool_fibers = static_cast<int>(nthreads);
  s.cluster = dim3(1, 1, 1);
  g_cluster_blocks = nb;  // static __shared__ would be shared by the pool's blocks: refused
  s.shuffle = true;
  s.seed = static_cast<unsigned long long>(env_long("INFEROPS_SIMT_SCHEDULE_SEED", 0));
  s.rng = s.seed;
  run_pool(s);
  if (s.failed) throw_pool_failure(s);
  metrics::grids_end(true);
  s.cur_block = nullptr;
  s.shuffle = false;
  g_cluster_blocks = 1;
  for (int r = 0; r < nb; ++r) s.blocks[r]->ctx.reset();
}

}  // namespace simt
