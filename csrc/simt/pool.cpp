// The SIMT executor's pools and launches (runtime.cpp has the scheduling model): a grid runs
// as a sequence of pools (one block, or the blocks of one cluster; concurrent.cpp queues
// several grids into one pool), each prepared by start_block, run by run_pool until every
// thread exits (a pass in which no thread can run is a deadlock, passes of only spinning a
// livelock), then checked (the canary past each block's dynamic shared memory) and poisoned by
// finish_block; the launch checks are the CUDA runtime's.
#include "simt/scheduler.h"
#include "simt/metrics.h"
#include "simt/race.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if SIMT_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace simt {

using namespace detail;

// ---- launches -----------------------------------------------------------------------------------------------------
namespace detail {

std::string block_str(const uint3& i) {
  return "(" + std::to_string(i.x) + "," + std::to_string(i.y) + "," + std::to_string(i.z) + ")";
}

// " (grid g)" for a block of a concurrent pool, where blockIdx alone does not say which grid.
std::string grid_str(const Scheduler& s, const Block& b) {
  return s.shuffle ? " of grid " + std::to_string(b.grid_index) : "";
}

std::string seed_str(const Scheduler& s) {
  return s.shuffle ? " [schedule seed " + std::to_string(s.seed) + ": INFEROPS_SIMT_SCHEDULE_SEED]" : "";
}

void deadlock(Scheduler& s) {
  std::string r = s.shuffle ? "deadlock in a concurrent pool of " + std::to_string(s.nblocks) +
                                  " blocks: no thread can proceed;"
                  : s.nblocks == 1 ? "deadlock in block " + block_str(s.blocks[0]->idx) + ": no thread can proceed;"
                                 : "deadlock in the cluster of blocks " + block_str(s.blocks[0]->idx) + " .. " +
                                       block_str(s.blocks[s.nblocks - 1]->idx) + ": no thread can proceed;";
  // Ranges of threads in the same state.
  auto state = [&](const Fiber& f) -> std::string {
    switch (f.wait) {
      case Wait::kBarrier: return "waiting at __syncthreads";
      case Wait::kCluster: return "waiting at cluster.sync";
      case Wait::kCollective: {
        const WarpState& w = block_of(f).warps[f.warp];
        for (int i = 0; i < w.ngroups; ++i) {
          if (w.groups[i].mask >> f.lane & 1) {
            return std::string("waiting in ") + w.groups[i].what + " (mask " + mask_str(w.groups[i].mask) +
                   ", arrived " + mask_str(w.groups[i].arrived) + ")";
          }
        }
        return "waiting in a warp collective";
      }
      case Wait::kWarpSet:
        for (const WarpSetMeeting& m : block_of(f).meetings)
          if (f.warp >= m.first && f.warp < m.first + m.count)
            return std::string("waiting in ") + m.what + " (warps " + std::to_string(m.first) + "-" +
                   std::to_string(m.first + m.count - 1) + ", " + std::to_string(m.arrived) + " threads arrived)";
        return "waiting in a warp-set collective";
      case Wait::kExited: return "exited";
      default: return "runnable";
    }
  };
  for (int bi = 0; bi < s.nblocks; ++bi) {
    const Block& b = *s.blocks[bi];
    if (s.nblocks > 1) r += " block " + block_str(b.idx) + grid_str(s, b) + ":";
    int i = 0;
    while (i < b.nthreads) {
      const std::string st = state(s.fibers[b.first + i]);
      int j = i + 1;
      while (j < b.nthreads && state(s.fibers[b.first + j]) == st) ++j;
      r += " threads " + std::to_string(i) + (j - 1 > i ? "-" + std::to_string(j - 1) : "") + " " + st + ";";
      i = j;
    }
    r += " (" + std::to_string(b.bar_arrived) + " of " + std::to_string(b.alive) + " live threads at __syncthreads)";
  }
  if (s.nblocks > 1 && !s.shuffle) {
    r += " (" + std::to_string(s.cluster_arrived) + " of " + std::to_string(s.pool_alive) +
         " live threads of the cluster at cluster.sync)";
  }
  s.failed = true;
  s.error = "simt: " + r + seed_str(s);
}

void ensure_blocks(Scheduler& s, int n) {
  while (static_cast<int>(s.blocks.size()) < n) {
    auto b = std::make_unique<Block>();
    void* m = mmap(nullptr, kSmemWindow + os_page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("simt: cannot map a shared-memory window");
    b->window = static_cast<unsigned char*>(m);
    mprotect(b->window + kSmemWindow, os_page_size(), PROT_NONE);
    s.blocks.push_back(std::move(b));
  }
}

// Bytes of the window between the launch's dynamic size and the guard page: filled with a
// canary before each block and checked after it (writes past the end). The canary reads as
// NaN in fp32, fp16 and bf16 (16-bit pattern 0xFFA5), so a read past the end poisons the
// result; AddressSanitizer builds report the read itself.
constexpr unsigned char kCanary[2] = {0xA5, 0xFF};

// b's launch fields (nthreads, dyn_bytes, bdim, ...) are set by the caller.
void start_block(Scheduler& s, Block& b, const uint3& idx, int index, int first) {
  const int n = b.nthreads;
  const dim3 bd = b.bdim;
  b.idx = idx;
  b.first = first;
  b.alive = n;
  b.bar_arrived = 0;
  b.finished = false;
  b.meetings.clear();
  b.slot.reset();
  b.serial = ++s.block_serial_counter;
  for (int w = 0; w < (n + 31) / 32; ++w) {
    WarpState& ws = b.warps[w];
    const int lanes = std::min(32, n - w * 32);
    ws.exist = lanes == 32 ? ~0u : (1u << lanes) - 1u;
    ws.exited = 0;
    ws.ngroups = 0;
  }
  b.dyn = b.window + kSmemWindow - ((b.dyn_bytes + 1023) & ~std::size_t(1023));
  unsigned char* const end = b.window + kSmemWindow;
#if SIMT_ASAN
  ASAN_UNPOISON_MEMORY_REGION(b.window, kSmemWindow);
#endif
  std::memset(b.dyn, 0xff, b.dyn_bytes);  // poison: NaN for floats, -1 for integers
  for (unsigned char* p = b.dyn + b.dyn_bytes; p < end; ++p) *p = kCanary[(p - b.window) & 1];
#if SIMT_ASAN
  ASAN_POISON_MEMORY_REGION(b.window, static_cast<std::size_t>(b.dyn - b.window));
  ASAN_POISON_MEMORY_REGION(b.dyn + b.dyn_bytes, static_cast<std::size_t>(end - (b.dyn + b.dyn_bytes)));
#endif
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[b.first + i];
    f.block = index;
    f.linear = i;
    f.tid = make_uint3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
    f.warp = i / 32;
    f.lane = i % 32;
    f.wait = Wait::kNone;
    f.blocked = false;
    f.cp_groups.clear();
    f.cp_open.clear();
    prepare_fiber(f);
  }
}

// A block whose threads have all exited: check the canary past its dynamic shared memory,
// then poison that memory, so that another block of its cluster reading it later (a missing
// final cluster.sync) reads NaN / -1, as it reads garbage on the GPU.
void finish_block(Scheduler& s, Block& b) {
  metrics::block_end(s, b);
  b.finished = true;
  b.slot.reset();
  unsigned char* const end = b.window + kSmemWindow;
#if SIMT_ASAN
  ASAN_UNPOISON_MEMORY_REGION(b.window, kSmemWindow);
#endif
  for (unsigned char* p = b.dyn + b.dyn_bytes; p < end; ++p) {
    if (*p != kCanary[(p - b.window) & 1]) {
      s.failed = true;
      s.error = "simt: block " + block_str(b.idx) + " wrote past the end of its " + std::to_string(b.dyn_bytes) +
                " bytes of dynamic shared memory (first changed byte: offset " + std::to_string(p - b.dyn) + ")";
      return;
    }
  }
  std::memset(b.dyn, 0xff, b.dyn_bytes);
#if SIMT_ASAN
  ASAN_POISON_MEMORY_REGION(b.window, static_cast<std::size_t>(b.dyn - b.window));
  ASAN_POISON_MEMORY_REGION(b.dyn + b.dyn_bytes, static_cast<std::size_t>(end - (b.dyn + b.dyn_bytes)));
#endif
}

// Runs the pool s.blocks[0 .. s.nblocks) (prepared by start_block) to completion.
void run_pool(Scheduler& s) {
  race::pool_start(s);
  const int total = s.pool_fibers;
  s.pool_alive = total;
  s.cluster_arrived = 0;
  s.failed = false;
  // A concurrent pool resumes its fibers in an order reshuffled every pass, so that a
  // protocol that only works in one interleaving (a flag set before its data) fails under
  // some seed instead of passing by luck of one fixed order.
  std::vector<int> order(static_cast<std::size_t>(total));
  for (int i = 0; i < total; ++i) order[static_cast<std::size_t>(i)] = i;
  using Clock = std::chrono::steady_clock;
  static const double spin_limit = env_seconds("INFEROPS_SIMT_SPIN_LIMIT_S", 60.0);
  auto last_progress = Clock::now();
  unsigned long spins = 0;
  while (s.pool_alive > 0) {
    const unsigned long before = s.progress;
    bool ran = false;
    if (s.shuffle) {
      for (int i = total - 1; i > 0; --i) {  // Fisher-Yates on splitmix64
        uint64_t z = (s.rng += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(z % (i + 1u))]);
      }
    }
    for (int k = 0; k < total; ++k) {
      Fiber& f = s.fibers[order[static_cast<std::size_t>(k)]];
      if (f.wait == Wait::kExited || f.blocked) continue;
      ran = true;
      resume_fiber(s, f);
      if (s.failed) return;
      Block& b = *s.blocks[f.block];
      if (b.alive == 0 && !b.finished) {
        finish_block(s, b);
        if (s.failed) return;
      }
    }
    if (!ran) {
      deadlock(s);
      return;
    }
    if (s.progress != before) {
      spins = 0;
      continue;
    }
    if ((++spins & 1023) == 0) {  // only spinning fibers ran
      const auto now = Clock::now();
      if (spins == 1024) last_progress = now;
      if (std::chrono::duration<double>(now - last_progress).count() > spin_limit) {
        s.failed = true;
        if (s.shuffle) {
          std::string blocks;
          int listed = 0;
          for (int i = 0; i < s.nblocks; ++i) {
            const Block& b = *s.blocks[i];
            if (b.alive == 0) continue;
            if (listed++ < 16) blocks += (listed > 1 ? ", " : "") + block_str(b.idx) + grid_str(s, b);
          }
          if (listed > 16) blocks += ", ... (" + std::to_string(listed) + " blocks)";
          s.error = "simt: livelock in a concurrent pool of " + std::to_string(s.nblocks) +
                    " blocks: threads have only spun for " + std::to_string(spin_limit) +
                    " s (INFEROPS_SIMT_SPIN_LIMIT_S); still running: blocks " + blocks +
                    " (waiting on a flag no running block sets?)" + seed_str(s);
          return;
        }
        s.error = "simt: livelock in block " + block_str(s.blocks[0]->idx) + (s.nblocks > 1 ? " (and its cluster)" : "") +
                  ": threads have only spun for " + std::to_string(spin_limit) +
                  " s (INFEROPS_SIMT_SPIN_LIMIT_S); a block waiting on a block outside its cluster never "
                  "finishes here, because the executor runs clusters (and blocks outside clusters) one at a time";
        return;
      }
    }
  }
  for (int i = 0; i < s.nblocks; ++i) {
    if (!s.blocks[i]->finished) finish_block(s, *s.blocks[i]);
    if (s.failed) return;
  }
  race::pool_end(s);
}

[[noreturn]] void throw_pool_failure(Scheduler& s) {
#if SIMT_ASAN
  // Abandoned fibers leave poisoned frames behind on their stacks.
  for (int i = 0; i < s.pool_fibers; ++i) ASAN_UNPOISON_MEMORY_REGION(s.fibers[i].stack, s.fibers[i].stack_bytes);
  for (int r = 0; r < s.nblocks; ++r) ASAN_UNPOISON_MEMORY_REGION(s.blocks[r]->window, kSmemWindow);
#endif
  race::pool_end(s);
  metrics::grids_end(false);
  s.failed = false;
  s.current = nullptr;
  s.cur_block = nullptr;
  s.shuffle = false;
  for (int r = 0; r < s.nblocks; ++r) s.blocks[r]->ctx.reset();
  g_cluster_blocks = 1;
  throw KernelError(s.error);
}

}  // namespace detail

// The launch checks of the CUDA runtime; s.lock held.
cudaError_t detail::check_launch(Scheduler& s, const LaunchConfig& cfg, const void* kernel) {
  const dim3 g = cfg.grid, b = cfg.block, c = cfg.cluster;
  const unsigned long long nthr = 1ull * b.x * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535 || nthr == 0 ||
      nthr > kMaxThreads || b.x > 1024 || b.y > 1024 || b.z > 64) {
    return launch_error(cudaErrorInvalidConfiguration, "invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u)",
                        g.x, g.y, g.z, b.x, b.y, b.z);
  }
  if (s.current) throw KernelError("simt: a kernel launched another kernel (dynamic parallelism is not modelled)");
  int limit = static_cast<int>(kDefaultDynSmem);
  if (auto it = s.smem_attr.find(kernel); it != s.smem_attr.end()) limit = std::max(limit, it->second);
  if (cfg.smem_bytes > kMaxDynSmem || static_cast<long long>(cfg.smem_bytes) > limit) {
    return launch_error(cudaErrorInvalidValue,
                        "%zu bytes of dynamic shared memory exceed the kernel's limit of %d bytes (more than 48 KiB "
                        "needs cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize); at most %zu)",
                        cfg.smem_bytes, limit, kMaxDynSmem);
  }
  // Clusters, as the CUDA runtime checks them (cudaErrorInvalidClusterSize).
  const unsigned long long csize = 1ull * c.x * c.y * c.z;
  const auto np = s.nonportable.find(kernel);
  const int max_cluster = np != s.nonportable.end() && np->second ? kMaxClusterBlocks : kPortableClusterBlocks;
  if (csize == 0 || g.x % c.x || g.y % c.y || g.z % c.z) {
    return launch_error(cudaErrorInvalidClusterSize,
                        "invalid cluster: grid (%u,%u,%u) is not a whole number of clusters (%u,%u,%u)", g.x, g.y,
                        g.z, c.x, c.y, c.z);
  }
  if (csize > static_cast<unsigned long long>(max_cluster)) {
    return launch_error(cudaErrorInvalidClusterSize,
                        "invalid cluster: (%u,%u,%u) is %llu blocks, more than %d (8 is the portable maximum; up to "
                        "16 needs cudaFuncSetAttribute(cudaFuncAttributeNonPortableClusterSizeAllowed, 1))",
                        c.x, c.y, c.z, csize, max_cluster);
  }
  return cudaSuccess;
}

cudaError_t run_grid(const LaunchConfig& cfg, const void* kernel, BlockBody body, std::shared_ptr<const void> ctx) {
  Scheduler& s = S();
  std::lock_guard<std::mutex> lock(s.lock);
  if (const cudaError_t e = check_launch(s, cfg, kernel); e != cudaSuccess) return e;
  if (defer_launch(cfg, kernel, body, ctx)) return cudaSuccess;  // inside concurrent_begin/end
  const dim3 g = cfg.grid, b = cfg.block, c = cfg.cluster;
  const int nthr = static_cast<int>(b.x * b.y * b.z);
  const int nblocks = static_cast<int>(c.x * c.y * c.z);
  ensure_blocks(s, nblocks);
  ensure_fibers(s, nthr * nblocks);
  metrics::grid_begin(0, kernel, cfg);
  for (int r = 0; r < nblocks; ++r) {
    Block& blk = *s.blocks[r];
    blk.nthreads = nthr;
    blk.dyn_bytes = cfg.smem_bytes;
    blk.grid = g;
    blk.bdim = b;
    blk.grid_index = 0;
    blk.kernel = kernel;
    blk.body = body;
    blk.ctx = ctx;
  }
  s.pool_fibers = nthr * nblocks;
  s.shuffle = false;
  s.nblocks = nblocks;
  s.cluster = c;
  g_cluster_blocks = nblocks;
  for (unsigned z = 0; z < g.z; z += c.z) {
    for (unsigned y = 0; y < g.y; y += c.y) {
      for (unsigned x = 0; x < g.x; x += c.x) {
        for (int r = 0; r < nblocks; ++r) {  // rank order: x fastest
          const uint3 idx = make_uint3(x + r % c.x, y + (r / c.x) % c.y, z + r / (c.x * c.y));
          start_block(s, *s.blocks[r], idx, r, r * nthr);
        }
        run_pool(s);
        if (s.failed) throw_pool_failure(s);
      }
    }
  }
  s.cur_block = nullptr;
  g_cluster_blocks = 1;
  for (int r = 0; r < nblocks; ++r) s.blocks[r]->ctx.reset();
  metrics::grids_end(true);
  return cudaSuccess;
}


}  // namespace simt
