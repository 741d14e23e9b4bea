// The SIMT executor's runtime: fibers, blocks, barriers and warp collectives (pool.cpp: pools
// and launches; memory.cpp: shared-memory addressing, cp.async and the other memory instructions;
// warp.cpp: shuffles, votes, __syncwarp; cuda_api.cpp: the CUDA runtime API calls).
// See simt.h for the model; docs/developer.md for what it catches and what it cannot.
//
// Scheduling: a grid runs as a sequence of pools (scheduler.h) on the calling OS thread,
// under one process-wide lock: one block per pool, or the blocks of one thread-block
// cluster. A pool's threads are fibers resumed round-robin (block by block, thread order);
// a fiber runs until it waits (barrier, cluster barrier, warp collective, spin) or exits.
// Before each switch the running fiber's block context is installed: threadIdx, blockIdx,
// its shared-memory window and (clusters) its static __shared__ objects. A pass over the
// pool in which no fiber could run is a deadlock; passes in which fibers only spin (no
// barrier, collective or exit) for INFEROPS_SIMT_SPIN_LIMIT_S seconds are a livelock
// (typically a block waiting on a block outside its pool, which never runs concurrently).
//
// Context switches are a few instructions of assembly on x86-64 (callee-saved registers,
// MXCSR and the x87 control word; no signal mask, so no system call); ucontext elsewhere.
#include "simt/scheduler.h"
#include "simt/metrics.h"
#include "simt/race.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#if SIMT_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__x86_64__)
// simt_switch(&save_sp, next_sp): saves the callee-saved state on the current stack, stores
// the stack pointer in *save_sp, and resumes the context whose stack pointer is next_sp.
extern "C" void simt_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl simt_switch
  .hidden simt_switch
  .type simt_switch, @function
simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch, .-simt_switch
)");
#endif

namespace simt {

int g_cluster_blocks = 1;
uint3 g_threadIdx;
uint3 g_blockIdx;
dim3 g_blockDim;
dim3 g_gridDim;

namespace detail {

Scheduler& S() {
  static Scheduler* s = new Scheduler();  // never destroyed: fibers may outlive static dtors
  return *s;
}

Block& block_of(const Fiber& f) { return *S().blocks[f.block]; }

// ---- launch errors (cudaGetLastError) -------------------------------------------------------------
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;

void set_launch_error(cudaError_t e, const std::string& msg) {
  t_last_error = e;
  t_last_message = msg;
}

cudaError_t launch_error(cudaError_t e, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char buf[1024];
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  set_launch_error(e, buf);
  return e;
}

}  // namespace detail

namespace {

using namespace detail;

std::size_t page_size() {
  static const std::size_t p = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

double env_double(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atof(v) : fallback;
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[1024];
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}

void switch_to_scheduler(bool finished);

// ---- stacks and the overflow guard -----------------------------------------------------------------------
struct GuardRange {
  uintptr_t lo, hi;
};
std::vector<GuardRange> g_guards;  // written before the handler is installed, then read-only
struct sigaction g_prev_segv, g_prev_bus;

void overflow_handler(int sig, siginfo_t* info, void* uctx) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
  for (const GuardRange& g : g_guards) {
    if (a >= g.lo && a < g.hi) {
      char msg[256];
      const Fiber* f = S().current;
      const int n = std::snprintf(
          msg, sizeof msg,
          "simt: stack overflow in thread (%u,%u,%u) of block (%u,%u,%u): each CUDA thread has a "
          "%zu KiB stack (INFEROPS_SIMT_STACK_KB)\n",
          f ? f->tid.x : 0, f ? f->tid.y : 0, f ? f->tid.z : 0, g_blockIdx.x, g_blockIdx.y, g_blockIdx.z,
          S().stack_bytes / 1024);
      if (n > 0) (void)!write(2, msg, static_cast<std::size_t>(n));
      std::abort();
    }
  }
  // The guard page after the shared-memory window: an access at least ~1 KiB past the end
  // of the dynamic shared memory (the canary only sees the bytes before the page).
  const Scheduler& sc = S();
  for (const auto& bp : sc.blocks) {
    const Block& blk = *bp;
    if (!blk.window || a < reinterpret_cast<uintptr_t>(blk.window + kSmemWindow) ||
        a >= reinterpret_cast<uintptr_t>(blk.window + kSmemWindow) + page_size()) {
      continue;
    }
    char msg[256];
    const Fiber* f = sc.current;
    const int n = std::snprintf(
        msg, sizeof msg,
        "simt: thread (%u,%u,%u) of block (%u,%u,%u) accessed dynamic shared memory %zu bytes past the end "
        "of its %zu bytes\n",
        f ? f->tid.x : 0, f ? f->tid.y : 0, f ? f->tid.z : 0, g_blockIdx.x, g_blockIdx.y, g_blockIdx.z,
        static_cast<std::size_t>(a - reinterpret_cast<uintptr_t>(blk.dyn + sc.dyn_bytes)), sc.dyn_bytes);
    if (n > 0) (void)!write(2, msg, static_cast<std::size_t>(n));
    std::abort();
  }
  // Not ours: hand the fault to whoever handled it before.
  struct sigaction& prev = sig == SIGSEGV ? g_prev_segv : g_prev_bus;
  sigaction(sig, &prev, nullptr);
  (void)uctx;
}

void install_overflow_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    stack_t cur{};
    if (sigaltstack(nullptr, &cur) == 0 && (cur.ss_flags & SS_DISABLE)) {
      stack_t ss{};
      ss.ss_size = 64 * 1024;
      ss.ss_sp = std::malloc(ss.ss_size);
      ss.ss_flags = 0;
      sigaltstack(&ss, nullptr);
    }
    struct sigaction sa {};
    sa.sa_sigaction = overflow_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_prev_segv);
    sigaction(SIGBUS, &sa, &g_prev_bus);
  });
}

}  // namespace

void detail::ensure_fibers(Scheduler& s, int n) {
  if (s.stack_bytes == 0) {
    const double kb = env_double("INFEROPS_SIMT_STACK_KB", SIMT_ASAN ? 1024 : 256);
    s.stack_bytes = (static_cast<std::size_t>(std::max(16.0, kb) * 1024) + page_size() - 1) & ~(page_size() - 1);
  }
  while (static_cast<int>(s.fibers.size()) < n) {
    Fiber f;
    const std::size_t total = s.stack_bytes + page_size();
    void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
    mprotect(m, page_size(), PROT_NONE);  // the guard page below the stack
    f.stack = static_cast<unsigned char*>(m) + page_size();
    f.stack_bytes = s.stack_bytes;
    g_guards.push_back({reinterpret_cast<uintptr_t>(m), reinterpret_cast<uintptr_t>(f.stack)});
    s.fibers.push_back(std::move(f));
  }
  install_overflow_handler();
}

namespace {

// ---- fiber entry and switching -------------------------------------------------------------------------------
void on_exit(Scheduler& s, Fiber& f);

[[noreturn]] void fiber_main() {
  Scheduler& s = S();
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.sched_bottom, &s.sched_size);
#endif
  s.body(s.body_ctx);
  on_exit(s, *s.current);
  switch_to_scheduler(/*finished=*/true);
  std::abort();  // never resumed
}

// fiber_main never returns, so AddressSanitizer's redzones of its frame stay on the stack
// after a thread exits: clear the top of the stack before it is reused (abandoned fibers of
// a failed launch get their whole stack cleared).
void unpoison_top(Fiber& f) {
#if SIMT_ASAN
  constexpr std::size_t kTop = 16 * 1024;
  ASAN_UNPOISON_MEMORY_REGION(f.stack + f.stack_bytes - kTop, kTop);
#else
  (void)f;
#endif
}

#if defined(__x86_64__)
void prepare(Fiber& f) {
  unpoison_top(f);
  // Initial frame, as simt_switch leaves one: [fpcw][mxcsr][r15 r14 r13 r12 rbx rbp][ret][0].
  // After the `ret` into fiber_main the stack pointer is 8 mod 16, as after a call.
  auto* top = reinterpret_cast<uint64_t*>(f.stack + f.stack_bytes);
  uint64_t* sp = top - 10;
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = fpcw;
  sp[1] = mxcsr;
  for (int i = 2; i < 8; ++i) sp[i] = 0;
  sp[8] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[9] = 0;
  f.sp = sp;
}
#else
void prepare(Fiber& f) {
  unpoison_top(f);
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = f.stack_bytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main), 0);
}
#endif

void resume(Scheduler& s, Fiber& f) {
  Block& b = *s.blocks[f.block];
  s.current = &f;
  s.cur_block = &b;
  g_threadIdx = f.tid;
  g_blockIdx = b.idx;
  // Its launch (blocks of a concurrent pool belong to different grids).
  s.nthreads = b.nthreads;
  s.dyn_bytes = b.dyn_bytes;
  s.body = b.body;
  s.body_ctx = b.ctx.get();
  g_blockDim = b.bdim;
  g_gridDim = b.grid;
#if SIMT_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_bytes);
#endif
#if defined(__x86_64__)
  simt_switch(&s.sched_sp, f.sp);
#else
  swapcontext(&s.sched_ctx, &f.ctx);
#endif
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  s.current = nullptr;
}

void switch_to_scheduler(bool finished) {
  Scheduler& s = S();
  Fiber* f = s.current;
#if SIMT_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f->fake_stack, s.sched_bottom, s.sched_size);
#else
  (void)finished;
#endif
#if defined(__x86_64__)
  simt_switch(&f->sp, s.sched_sp);
#else
  swapcontext(&f->ctx, &s.sched_ctx);
#endif
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

// Suspends the running fiber until the scheduler resumes it (it is resumed only when
// `blocked` has been cleared, or at once if the fiber just spins).
}  // namespace

void detail::wait_here() {
  switch_to_scheduler(false);
}

Fiber& detail::cur_fiber(const char* what) {
  Fiber* f = S().current;
  if (!f) {
    throw KernelError(std::string("simt: ") + what + " called outside a kernel");
  }
  return *f;
}

namespace {

// ---- barriers ---------------------------------------------------------------------------------------------
void release_barrier(Scheduler& s, Block& b) {
  race::block_barrier(s, b);
  metrics::barrier(s, b);
  b.bar_arrived = 0;
  int count = 0, arrived = 0;
  for (int i = b.first; i < b.first + b.nthreads; ++i) {
    const Fiber& f = s.fibers[i];
    if (f.wait == Wait::kBarrier) {
      ++arrived;
      count += f.bar_pred != 0;
    }
  }
  for (int i = b.first; i < b.first + b.nthreads; ++i) {
    Fiber& f = s.fibers[i];
    if (f.wait == Wait::kBarrier) {
      f.wait = Wait::kNone;
      f.blocked = false;
      f.bar_result = count;
      f.bar_pred = arrived;  // for __syncthreads_and
    }
  }
  ++s.progress;
}

void on_exit(Scheduler& s, Fiber& f) {
  // Copies still in flight land (the hardware completes them; reading them is the bug).
  for (auto& g : f.cp_groups)
    for (auto& c : g) {
      race::access(f, c.dst, static_cast<std::size_t>(c.bytes), true, c.pc);
      std::memcpy(c.dst, c.data, static_cast<std::size_t>(c.bytes));
    }
  for (auto& c : f.cp_open) {
    race::access(f, c.dst, static_cast<std::size_t>(c.bytes), true, c.pc);
    std::memcpy(c.dst, c.data, static_cast<std::size_t>(c.bytes));
  }
  f.cp_groups.clear();
  f.cp_open.clear();
  f.wait = Wait::kExited;
  Block& b = block_of(f);
  --b.alive;
  --s.pool_alive;
  ++s.progress;
  WarpState& w = b.warps[f.warp];
  w.exited |= 1u << f.lane;
  for (int i = 0; i < w.ngroups; ++i) {
    const Group& g = w.groups[i];
    if (g.mask >> f.lane & 1) {
      fail("lane %d exited while lanes 0x%08x of its warp wait for it in %s (mask 0x%08x)", f.lane, g.arrived,
           g.what, g.mask);
    }
  }
  if (b.bar_arrived > 0 && b.bar_arrived == b.alive) release_barrier(s, b);
  if (s.cluster_arrived > 0 && s.cluster_arrived == s.pool_alive) release_cluster_barrier(s);
}

std::string lanes_str(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}

}  // namespace

// ---- public runtime functions ---------------------------------------------------------------------------------
int lane_id() { return cur_fiber("lane_id").lane; }
int warp_id() { return cur_fiber("warp_id").warp; }

std::string where() {
  const Fiber* f = S().current;
  char b[160];
  if (!f) return "host code";
  std::snprintf(b, sizeof b, "block (%u,%u,%u) thread (%u,%u,%u) [warp %d lane %d]", g_blockIdx.x, g_blockIdx.y,
                g_blockIdx.z, f->tid.x, f->tid.y, f->tid.z, f->warp, f->lane);
  return b;
}

void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  const std::string what = vformat(fmt, ap);
  va_end(ap);
  Scheduler& s = S();
  if (!s.current) throw KernelError("simt: " + what);
  s.failed = true;
  s.error = "simt: " + what + " in " + where();
  switch_to_scheduler(/*finished=*/true);  // abandoned: never resumed
  std::abort();
}

void syncthreads() {
  if (race::skip_barrier(__builtin_return_address(0))) return;  // INFEROPS_SIMT_SKIP_BARRIER (race.h)
  syncthreads_reduce(0, BarrierReduce::kCount);
}

int syncthreads_reduce(int pred, BarrierReduce how) {
  Scheduler& s = S();
  Fiber& f = cur_fiber("__syncthreads");
  Block& b = block_of(f);
  f.bar_pred = pred;
  f.wait = Wait::kBarrier;
  f.blocked = true;
  ++b.bar_arrived;
  ++s.progress;
  if (b.bar_arrived == b.alive) release_barrier(s, b);
  if (f.blocked) wait_here();
  switch (how) {
    case BarrierReduce::kAnd: return f.bar_result == f.bar_pred;
    case BarrierReduce::kOr: return f.bar_result != 0;
    default: return f.bar_result;
  }
}

void yield() {
  cur_fiber("yield");
  wait_here();
}

unsigned active_lanes() {
  Scheduler& s = S();
  const Fiber& f = cur_fiber("__activemask");
  const WarpState& w = block_of(f).warps[f.warp];
  (void)s;
  return w.exist & ~w.exited;
}

const unsigned char* collective(int op, const char* what, unsigned mask, const void* payload, std::size_t bytes,
                                ReleaseFn release, const void* ctx) {
  Scheduler& s = S();
  Fiber& f = cur_fiber(what);
  Block& b = block_of(f);
  WarpState& w = b.warps[f.warp];
  if (!(mask >> f.lane & 1)) fail("%s: the calling lane %d is not in its mask 0x%08x", what, f.lane, mask);
  if (mask & ~w.exist) {
    fail("%s: mask 0x%08x names lanes that do not exist (this warp has lanes 0x%08x: the block is not a "
         "multiple of 32 threads)",
         what, mask, w.exist);
  }
  if (mask & w.exited) fail("%s: mask 0x%08x names lanes that have exited (0x%08x)", what, mask, mask & w.exited);
  if (bytes > kPayloadBytes) fail("%s: payload of %zu bytes", what, bytes);
  Group* g = nullptr;
  for (int i = 0; i < w.ngroups; ++i) {
    Group& x = w.groups[i];
    if (!(x.mask & mask)) continue;
    if (x.mask != mask) {
      fail("divergent warp collectives: lane %d calls %s with mask 0x%08x while lanes 0x%08x wait in %s with "
           "mask 0x%08x",
           f.lane, what, mask, x.arrived, x.what, x.mask);
    }
    if (x.op != op) {
      fail("lanes of mask 0x%08x disagree on the warp collective: lane %d calls %s, lanes 0x%08x wait in %s", mask,
           f.lane, what, x.arrived, x.what);
    }
    g = &x;
  }
  if (!g) {
    g = &w.groups[w.ngroups++];
    *g = Group{mask, 0u, op, what};
  }
  if (bytes > 0) std::memcpy(w.payload[f.lane], payload, bytes);
  g->arrived |= 1u << f.lane;
  ++s.progress;
  f.wait = Wait::kCollective;
  f.blocked = true;
  if (g->arrived == g->mask) {
    release(mask, w.payload, w.result, ctx);
    race::warp_sync(s, b, f.warp, mask);
    metrics::collective(s, b, f.warp, mask, what);
    for (int l = 0; l < 32; ++l) {
      if (mask >> l & 1) {
        Fiber& o = s.fibers[b.first + f.warp * 32 + l];
        o.wait = Wait::kNone;
        o.blocked = false;
      }
    }
    *g = w.groups[--w.ngroups];  // remove (order does not matter)
  } else {
    wait_here();
  }
  return w.result[f.lane];
}

// A collective over the whole warps [first_warp, first_warp + nwarps) (wgmma: a
// warpgroup). Every thread of them calls it with the same `what` and `key` bytes; the last
// to arrive runs release(key, ctx) once, then all continue. Disagreement, a missing or
// exited thread is an error (an exit while others wait shows up as a deadlock report).
void warps_collective(int first_warp, int nwarps, const char* what, const void* key, std::size_t key_bytes,
                      void (*release)(const void* key, void* ctx), void* ctx) {
  Scheduler& s = S();
  Fiber& f = cur_fiber(what);
  Block& b = block_of(f);
  if (f.warp < first_warp || f.warp >= first_warp + nwarps)
    fail("%s: warp %d is not in the warp set %d-%d", what, f.warp, first_warp, first_warp + nwarps - 1);
  if ((first_warp + nwarps) * 32 > s.nthreads)
    fail("%s: needs warps %d-%d, the block has %d threads", what, first_warp, first_warp + nwarps - 1, s.nthreads);
  if (key_bytes > kPayloadBytes) fail("%s: key of %zu bytes", what, key_bytes);
  for (int w = first_warp; w < first_warp + nwarps; ++w)
    if (b.warps[w].exited) fail("%s: lanes 0x%08x of warp %d have exited", what, b.warps[w].exited, w);
  WarpSetMeeting* m = nullptr;
  for (WarpSetMeeting& x : b.meetings) {
    if (x.first + x.count <= first_warp || first_warp + nwarps <= x.first) continue;  // disjoint
    if (x.first != first_warp || x.count != nwarps || std::strcmp(x.what, what) != 0)
      fail("%s over warps %d-%d meets %s over warps %d-%d", what, first_warp, first_warp + nwarps - 1, x.what,
           x.first, x.first + x.count - 1);
    if (x.key_bytes != key_bytes || std::memcmp(x.key, key, key_bytes) != 0)
      fail("%s: the threads of warps %d-%d disagree on its operands", what, first_warp, first_warp + nwarps - 1);
    m = &x;
  }
  if (!m) {
    b.meetings.push_back(WarpSetMeeting{first_warp, nwarps, 0, what, {}, key_bytes});
    m = &b.meetings.back();
    std::memcpy(m->key, key, key_bytes);
  }
  ++s.progress;
  if (++m->arrived < nwarps * 32) {
    f.wait = Wait::kWarpSet;
    f.blocked = true;
    wait_here();
    return;
  }
  release(m->key, ctx);
  for (int w = first_warp; w < first_warp + nwarps; ++w) metrics::collective(s, b, w, ~0u, what);
  for (int i = first_warp * 32; i < (first_warp + nwarps) * 32; ++i) {
    s.fibers[b.first + i].wait = Wait::kNone;
    s.fibers[b.first + i].blocked = false;
  }
  b.meetings.erase(b.meetings.begin() + (m - b.meetings.data()));
}

unsigned long block_serial() { return block_of(cur_fiber("block_serial")).serial; }
int thread_linear() { return cur_fiber("thread_linear").linear; }
std::shared_ptr<void>& block_slot() { return block_of(cur_fiber("block_slot")).slot; }


// ---- for pool.cpp -------------------------------------------------------------------------------------------
void detail::resume_fiber(Scheduler& s, Fiber& f) { resume(s, f); }
void detail::prepare_fiber(Fiber& f) { prepare(f); }
double detail::env_seconds(const char* name, double fallback) { return env_double(name, fallback); }
std::size_t detail::os_page_size() { return page_size(); }
std::string detail::mask_str(unsigned m) { return lanes_str(m); }

}  // namespace simt
