// The SIMT executor's internal state, shared by runtime.cpp (fibers, barriers, warp
// collectives), pool.cpp (pools, launches) and cluster.cpp (thread-block clusters). Not part of the kernel-side
// API (simt.h).
//
// A launch runs as a sequence of *pools*: the blocks of one pool run together, round-robin
// over all their fibers (block 0's threads, then block 1's, ...). A grid without clusters has
// one-block pools; a cluster launch has one pool per cluster, its blocks in rank order. Each
// block of a pool owns its warps, its barrier, its shared-memory window (256 KiB, the
// launch's dynamic shared memory at its end, a guard page after it). Static __shared__
// objects are one per declaration, so they are refused in clusters (simt.h).
//
// Concurrent launches (concurrent.cpp) make one pool of every block of several grids: each
// block then carries its own launch (body and parameters, gridDim/blockDim, thread count,
// dynamic shared-memory size), installed with its block context before each switch, and the
// fibers of such a pool run in an order reshuffled every pass (Scheduler::rng).
#pragma once

#include "simt/simt.h"

#include <memory>
#include <mutex>
#include <map>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#else
#define SIMT_ASAN 0
#endif

namespace simt::detail {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxClusterBlocks = 16;               // with cudaFuncAttributeNonPortableClusterSizeAllowed
constexpr int kPortableClusterBlocks = 8;
constexpr std::size_t kSmemWindow = 256 * 1024;    // shared addresses are offsets in here
constexpr std::size_t kMaxDynSmem = 232448;        // 227 KiB: the sm_90 opt-in maximum
constexpr std::size_t kDefaultDynSmem = 48 * 1024;  // without cudaFuncSetAttribute

enum class Wait : int { kNone, kBarrier, kCluster, kCollective, kWarpSet, kExited };

struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
  int bytes;
  const void* pc;  // the issuing instruction (race-check reports)
};

struct Fiber {
  void* sp = nullptr;              // saved stack pointer while suspended
  unsigned char* stack = nullptr;  // usable stack (above the guard page)
  std::size_t stack_bytes = 0;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
#if SIMT_ASAN
  void* fake_stack = nullptr;
#endif
  uint3 tid{};
  int block = 0;  // index of its block in the pool
  int linear = 0, warp = 0, lane = 0;
  Wait wait = Wait::kNone;
  bool blocked = false;
  int bar_pred = 0;    // this thread's __syncthreads_* predicate
  int bar_result = 0;  // the reduction, written when the barrier releases
  std::vector<std::vector<PendingCopy>> cp_groups;  // committed cp.async groups, oldest first
  std::vector<PendingCopy> cp_open;                 // issued, not yet committed
};

struct Group {  // a pending warp collective
  unsigned mask = 0, arrived = 0;
  int op = 0;
  const char* what = nullptr;
};

struct WarpState {
  unsigned exist = 0;   // lanes that exist (a block's last warp may be partial)
  unsigned exited = 0;  // lanes that returned from the kernel
  Group groups[32];
  int ngroups = 0;
  alignas(16) unsigned char payload[32][kPayloadBytes];
  alignas(16) unsigned char result[32][kResultBytes];
};

// A pending meeting of a set of whole warps (warps_collective: wgmma's warpgroups).
struct WarpSetMeeting {
  int first = 0, count = 0, arrived = 0;
  const char* what = nullptr;
  unsigned char key[kPayloadBytes];
  std::size_t key_bytes = 0;
};

struct Block {
  uint3 idx{};
  int first = 0;  // its first fiber in Scheduler::fibers
  int alive = 0, bar_arrived = 0;
  bool finished = false;  // every thread exited; its shared memory checked and poisoned
  unsigned char* window = nullptr;  // [window, window + kSmemWindow), then a PROT_NONE page
  unsigned char* dyn = nullptr;     // the launch's dynamic shared memory, at the window's end
  WarpState warps[kMaxWarps];
  std::vector<WarpSetMeeting> meetings;  // pending warps_collective meetings
  unsigned long serial = 0;              // unique per started block (per-block state resets on it)
  // Its launch (one grid for every block of an ordinary pool; one per grid in a concurrent pool).
  int nthreads = 0;
  std::size_t dyn_bytes = 0;
  dim3 grid, bdim;
  int grid_index = 0;  // which queued grid (concurrent pools), for error messages
  const void* kernel = nullptr;  // its __global__ function (reports)
  BlockBody body = nullptr;
  std::shared_ptr<const void> ctx;
  std::shared_ptr<void> slot;  // block_slot(): an instruction model's per-block state
};

struct Scheduler {
  std::mutex lock;  // one grid at a time in the process
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<Block>> blocks;  // pool slots (grown on demand)
  int nblocks = 0;   // blocks in the running pool
  int nthreads = 0;  // threads per block (of the running fiber's block)
  int pool_fibers = 0;  // fibers of the running pool (blocks' threads, block by block)
  bool shuffle = false;  // concurrent pool: resume fibers in a shuffled order
  unsigned long long seed = 0;  // its INFEROPS_SIMT_SCHEDULE_SEED
  unsigned long long rng = 0;   // splitmix64 state
  int pool_alive = 0, cluster_arrived = 0;  // live threads of the pool; at cluster.sync
  dim3 cluster = dim3(1, 1, 1);
  unsigned long progress = 0;  // barrier/collective arrivals and exits (not spins)
  Fiber* current = nullptr;
  Block* cur_block = nullptr;    // the running fiber's block
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
#if SIMT_ASAN
  const void* sched_bottom = nullptr;
  std::size_t sched_size = 0;
#endif
  BlockBody body = nullptr;
  const void* body_ctx = nullptr;
  bool failed = false;
  std::string error;
  std::size_t dyn_bytes = 0;
  std::size_t stack_bytes = 0;
  std::map<const void*, int> smem_attr;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  std::map<const void*, int> nonportable;  // cudaFuncSetAttribute(NonPortableClusterSizeAllowed)
  std::map<const void*, Invoker> invokers;  // for cudaLaunchKernelExC
  unsigned long block_serial_counter = 0;   // blocks started so far (Block::serial)
};

Scheduler& S();
// The error cudaGetLastError() returns next (runtime.cpp) and how a launch check sets it.
extern thread_local cudaError_t t_last_error;
extern thread_local std::string t_last_message;
void set_launch_error(cudaError_t e, const std::string& msg);
cudaError_t launch_error(cudaError_t e, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
Fiber& cur_fiber(const char* what);
void wait_here();  // suspends the running fiber until the scheduler resumes it
Block& block_of(const Fiber& f);
void release_cluster_barrier(Scheduler& s);
// runtime.cpp, for pool.cpp: resuming and preparing fibers, and small helpers.
void resume_fiber(Scheduler& s, Fiber& f);
void prepare_fiber(Fiber& f);
double env_seconds(const char* name, double fallback);
std::size_t os_page_size();
std::string mask_str(unsigned m);  // "0x%08x"
// pool.cpp, for concurrent.cpp and runtime.cpp: the pool machinery.
void ensure_blocks(Scheduler& s, int n);
void ensure_fibers(Scheduler& s, int n);
void start_block(Scheduler& s, Block& b, const uint3& idx, int index, int first);
void run_pool(Scheduler& s);
[[noreturn]] void throw_pool_failure(Scheduler& s);  // resets a failed pool, throws its error
std::string block_str(const uint3& b);
cudaError_t check_launch(Scheduler& s, const LaunchConfig& cfg, const void* kernel);  // s.lock held
// concurrent.cpp: queues the launch when the calling thread is inside concurrent_begin/end.
bool defer_launch(const LaunchConfig& cfg, const void* kernel, BlockBody body, const std::shared_ptr<const void>& ctx);

}  // namespace simt::detail
