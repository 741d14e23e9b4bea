// The shared-memory race detector (race.h has the model). This file is compiled without
// instrumentation; the kernel sources are compiled with -fsanitize=thread and call the
// __tsan_* entry points defined at its end.
#include "simt/race.h"

#include "simt/debuginfo.h"
#include "simt/metrics.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>


namespace simt::race {

using namespace detail;
using debuginfo::module_base;
using debuginfo::kernel_name;
using debuginfo::run_addr2line;
using debuginfo::source_of;

namespace {

constexpr int kReaders = 2;

// The shadow state of one shared-memory byte. Clock 0: no access recorded. pc: the
// instruction's offset in this module (for addr2line).
struct Cell {
  uint32_t w_clk;
  uint32_t w_pc;
  uint16_t w_tid;
  uint8_t nr;
  uint16_t r_tid[kReaders];
  uint32_t r_clk[kReaders];
  uint32_t r_pc[kReaders];
};

// Threads whose accesses to a shared-memory window can be ordered: a block, or a cluster.
//
// A thread's vector clock is stored in two parts. Between two barriers of its block, the only
// synchronization that can order it with other threads is a warp collective of its own warp
// (barriers release every live thread of the block, cluster.sync every live thread of the
// cluster), so its clock is  B[its block] (the join at the block's last barrier, the same for
// every thread of the block)  joined with  W[thread] (32 entries: the lanes of its warp).
// A barrier then costs O(threads x 32) instead of O(threads^2), a warp collective O(32 x 32).
struct Domain {
  int size = 0;       // threads
  int per_block = 0;  // threads per block (a cluster's blocks have the same shape)
  std::vector<uint32_t> b;  // blocks x size
  std::vector<uint32_t> w;  // size x 32; w[t][lane of t] is t's own clock (>= b[block of t][t])
  uint32_t* B(int block) { return b.data() + std::size_t(block) * std::size_t(size); }
  uint32_t* W(int t) { return w.data() + std::size_t(t) * 32u; }
  int block_of(int t) const { return t / per_block; }
  int warp_base(int t) const { return t - (t % per_block) % 32; }  // its warp's lane 0
  int lane(int t) const { return (t % per_block) % 32; }
  uint32_t own(int t) { return W(t)[lane(t)]; }
  // Does t's clock include (u, c), i.e. does that access of u happen before t's next one?
  bool includes(int t, int u, uint32_t c) {
    uint32_t v = B(block_of(t))[u];
    if (warp_base(u) == warp_base(t)) v = std::max(v, W(t)[lane(u)]);
    return c <= v;
  }
};

struct Shadow {  // one per block of the pool, allocated at its first shared-memory access
  Cell* dyn = nullptr;
  std::size_t dyn_cells = 0;
  Cell* stat = nullptr;  // the static __shared__ section
};

struct Pool {
  bool cluster = false;  // one domain for the whole pool (distributed shared memory)
  std::vector<Domain> domains;
  std::vector<Shadow> shadows;
};

Pool g_pool;
const bool g_enabled = [] {
  const char* v = std::getenv("INFEROPS_SIMT_RACECHECK");
  return !(v && std::strcmp(v, "0") == 0);
}();

const debuginfo::Range& static_range() { return debuginfo::writable_segment(); }
std::size_t static_bytes() { return static_range().size(); }

Cell* map_cells(std::size_t n) {
  if (n == 0) return nullptr;
  void* p = mmap(nullptr, n * sizeof(Cell), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw KernelError("simt: race check: cannot map shadow memory");
  return static_cast<Cell*>(p);  // zero: nothing recorded
}

void free_shadows() {
  for (Shadow& sh : g_pool.shadows) {
    if (sh.dyn) munmap(sh.dyn, sh.dyn_cells * sizeof(Cell));
    if (sh.stat) munmap(sh.stat, static_bytes() * sizeof(Cell));
    sh = Shadow{};
  }
}

int domain_of(const Fiber& f) { return g_pool.cluster ? 0 : f.block; }
int index_in_domain(const Scheduler& s, const Fiber& f) {
  return g_pool.cluster ? static_cast<int>(&f - s.fibers.data()) : f.linear;
}

// The domain's clocks start at the first shared-memory access of its threads: ordering
// information from before any access orders nothing.
Domain& live_domain(Scheduler& s, const Fiber& f) {
  Domain& d = g_pool.domains[static_cast<std::size_t>(domain_of(f))];
  if (d.size == 0) {
    d.per_block = s.blocks[f.block]->nthreads;
    d.size = g_pool.cluster ? s.pool_fibers : d.per_block;
    d.b.assign(std::size_t(d.size / d.per_block) * std::size_t(d.size), 0u);
    d.w.assign(std::size_t(d.size) * 32u, 0u);
    for (int t = 0; t < d.size; ++t) d.W(t)[d.lane(t)] = 1;
  }
  return d;
}

// A barrier over block `blk` of the domain: its B becomes the join of its threads' clocks
// (`members`: those it releases and those that exited, whose earlier accesses it also orders).
void join_block(Domain& d, int blk, const std::vector<int>& members) {
  uint32_t* b = d.B(blk);
  for (int t : members) {
    const uint32_t* w = d.W(t);
    const int base = d.warp_base(t);
    for (int k = 0; k < 32 && base + k < (blk + 1) * d.per_block; ++k) b[base + k] = std::max(b[base + k], w[k]);
  }
}

// Restarts the warp part of `members` after a barrier: own clock = what the barrier published + 1.
void restart(Domain& d, const std::vector<int>& members) {
  for (int t : members) {
    uint32_t* w = d.W(t);
    const uint32_t next = d.B(d.block_of(t))[t] + 1;
    std::fill(w, w + 32, 0u);
    w[d.lane(t)] = next;
  }
}

std::string thread_str(Scheduler& s, const Fiber& me, int t) {
  const Block* b;
  int linear;
  if (g_pool.cluster) {
    const Fiber& o = s.fibers[static_cast<std::size_t>(t)];
    b = s.blocks[o.block].get();
    linear = o.linear;
  } else {
    b = s.blocks[me.block].get();
    linear = t;
  }
  const dim3 bd = b->bdim;
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", b->idx.x, b->idx.y, b->idx.z,
                linear % bd.x, (linear / bd.x) % bd.y, linear / (bd.x * bd.y));
  return buf;
}

[[noreturn]] void report(Scheduler& s, Fiber& me, int my_t, const char* kind, bool my_write, std::size_t bytes,
                         const unsigned char* addr, const char* region, std::size_t offset, int other_t,
                         bool other_write, uint32_t my_pc, uint32_t other_pc) {
  const Block& b = *s.blocks[me.block];
  std::string where_in = region;
  if (std::strcmp(region, "static __shared__ variable") != 0) where_in += " offset " + std::to_string(offset);
  fail("shared-memory race (%s) in kernel %s: %s %s %zu byte(s) at %p (%s) at %s, and %s %s it at %s, "
       "with no barrier or warp synchronization between them",
       kind, kernel_name(b.kernel).c_str(), thread_str(s, me, my_t).c_str(), my_write ? "writes" : "reads", bytes,
       static_cast<const void*>(addr), where_in.c_str(), source_of(my_pc).c_str(),
       thread_str(s, me, other_t).c_str(), other_write ? "wrote" : "read", source_of(other_pc).c_str());
}

// The shadow cell of a shared-memory byte touched by fiber f, or nullptr (not shared memory).
Cell* cell_of(Scheduler& s, const Fiber& f, const unsigned char* c, const char** region, std::size_t* offset,
              std::size_t* avail) {
  const debuginfo::Range& st = static_range();
  if (c >= st.lo && c < st.hi) {
    Shadow& sh = g_pool.shadows[static_cast<std::size_t>(f.block)];
    if (!sh.stat) sh.stat = map_cells(static_bytes());
    *region = "static __shared__ variable";
    *offset = std::size_t(c - st.lo);
    *avail = std::size_t(st.hi - c);
    return sh.stat + *offset;
  }
  auto in = [&](int r) -> Cell* {
    const Block& b = *s.blocks[r];
    if (c < b.dyn || c >= b.dyn + b.dyn_bytes) return nullptr;
    Shadow& sh = g_pool.shadows[static_cast<std::size_t>(r)];
    if (!sh.dyn) {
      sh.dyn_cells = b.dyn_bytes;
      sh.dyn = map_cells(b.dyn_bytes);
    }
    *region = r == f.block ? "dynamic shared memory" : "distributed shared memory of another block, dynamic";
    *offset = std::size_t(c - b.dyn);
    *avail = b.dyn_bytes - *offset;
    return sh.dyn + *offset;
  };
  if (Cell* x = in(f.block)) return x;
  if (g_pool.cluster) {
    for (int r = 0; r < s.nblocks; ++r)
      if (r != f.block)
        if (Cell* x = in(r)) return x;
  }
  return nullptr;
}

void check(Scheduler& s, Fiber& f, const void* p, std::size_t n, bool write, const void* pc) {
  const auto* c = static_cast<const unsigned char*>(p);
  const char* region = nullptr;
  std::size_t offset = 0, avail = 0;
  Cell* first = cell_of(s, f, c, &region, &offset, &avail);
  if (!first) return;
  n = std::min(n, avail);  // a range access running past the region: the rest is not shared memory
  Domain& d = live_domain(s, f);
  const int t = index_in_domain(s, f);
  const uint32_t now = d.own(t);
  const uint32_t ipc = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(pc) - module_base());
  auto hb = [&](int other, uint32_t clk) { return d.includes(t, other, clk); };
  for (std::size_t i = 0; i < n; ++i) {
    Cell* x = first + i;
    if (x->w_clk && x->w_tid != t && !hb(x->w_tid, x->w_clk)) {
      report(s, f, t, write ? "write/write" : "write/read", write, n, c, region, offset, x->w_tid, true, ipc, x->w_pc);
    }
    if (write) {
      for (int r = 0; r < x->nr; ++r) {
        if (x->r_tid[r] != t && !hb(x->r_tid[r], x->r_clk[r]))
          report(s, f, t, "read/write", true, n, c, region, offset, x->r_tid[r], false, ipc, x->r_pc[r]);
      }
      x->w_clk = now;
      x->w_tid = static_cast<uint16_t>(t);
      x->w_pc = ipc;
      x->nr = 0;
      continue;
    }
    // A read: keep the reads since the last write that are not ordered before this one.
    int k = 0;
    for (int r = 0; r < x->nr; ++r) {
      if (x->r_tid[r] == t || hb(x->r_tid[r], x->r_clk[r])) continue;
      x->r_tid[k] = x->r_tid[r];
      x->r_clk[k] = x->r_clk[r];
      x->r_pc[k] = x->r_pc[r];
      ++k;
    }
    if (k == kReaders) {  // full: forget the oldest (a later conflicting write is still seen through the other)
      x->r_tid[0] = x->r_tid[1];
      x->r_clk[0] = x->r_clk[1];
      x->r_pc[0] = x->r_pc[1];
      k = kReaders - 1;
    }
    x->r_tid[k] = static_cast<uint16_t>(t);
    x->r_clk[k] = now;
    x->r_pc[k] = ipc;
    x->nr = static_cast<uint8_t>(k + 1);
  }
}

}  // namespace

void pool_start(Scheduler& s) {
  free_shadows();
  g_pool.cluster = !s.shuffle && s.nblocks > 1;
  g_pool.domains.assign(static_cast<std::size_t>(g_pool.cluster ? 1 : s.nblocks), Domain{});
  g_pool.shadows.assign(static_cast<std::size_t>(s.nblocks), Shadow{});
}

void pool_end(Scheduler&) {
  free_shadows();
  g_pool.domains.clear();
}

void block_barrier(Scheduler& s, Block& b) {
  if (g_pool.domains.empty()) return;
  const Fiber& first = s.fibers[static_cast<std::size_t>(b.first)];
  Domain& d = g_pool.domains[static_cast<std::size_t>(domain_of(first))];
  if (d.size == 0) return;
  std::vector<int> members, released;
  for (int i = b.first; i < b.first + b.nthreads; ++i) {
    const Fiber& f = s.fibers[static_cast<std::size_t>(i)];
    if (f.wait == Wait::kBarrier) released.push_back(index_in_domain(s, f));
    if (f.wait == Wait::kBarrier || f.wait == Wait::kExited) members.push_back(index_in_domain(s, f));
  }
  join_block(d, d.block_of(index_in_domain(s, first)), members);
  restart(d, released);
}

void cluster_barrier(Scheduler& s) {
  if (g_pool.domains.empty() || !g_pool.cluster) return;
  Domain& d = g_pool.domains[0];
  if (d.size == 0) return;
  const int nb = d.size / d.per_block;
  std::vector<int> released;
  for (int blk = 0; blk < nb; ++blk) {
    std::vector<int> members;
    for (int t = blk * d.per_block; t < (blk + 1) * d.per_block; ++t) {
      const Wait w = s.fibers[static_cast<std::size_t>(t)].wait;
      if (w == Wait::kCluster) released.push_back(t);
      if (w == Wait::kCluster || w == Wait::kExited) members.push_back(t);
    }
    join_block(d, blk, members);
  }
  std::vector<uint32_t> all(d.B(0), d.B(0) + d.size);
  for (int blk = 1; blk < nb; ++blk)
    for (int u = 0; u < d.size; ++u) all[std::size_t(u)] = std::max(all[std::size_t(u)], d.B(blk)[u]);
  for (int blk = 0; blk < nb; ++blk) std::copy(all.begin(), all.end(), d.B(blk));
  restart(d, released);
}

void warp_sync(Scheduler& s, Block& b, int warp, unsigned mask) {
  if (g_pool.domains.empty()) return;
  const Fiber& any = s.fibers[static_cast<std::size_t>(b.first + warp * 32)];
  Domain& d = g_pool.domains[static_cast<std::size_t>(domain_of(any))];
  if (d.size == 0) return;
  const int base = index_in_domain(s, any);
  uint32_t j[32] = {};
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1)
      for (int k = 0; k < 32; ++k) j[k] = std::max(j[k], d.W(base + l)[k]);
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    uint32_t* w = d.W(base + l);
    std::copy(j, j + 32, w);
    ++w[l];
  }
}

bool skip_barrier(const void* pc) {
  static const std::vector<std::string> skip = [] {
    std::vector<std::string> out;
    const char* v = std::getenv("INFEROPS_SIMT_SKIP_BARRIER");
    std::string all = v ? v : "";
    for (std::size_t a = 0; a < all.size();) {
      std::size_t b = all.find(',', a);
      if (b == std::string::npos) b = all.size();
      if (b > a) out.push_back(all.substr(a, b - a));
      a = b + 1;
    }
    return out;
  }();
  if (skip.empty()) return false;
  static std::map<const void*, bool> seen;  // per call site: addr2line's inline chain, once
  auto it = seen.find(pc);
  if (it != seen.end()) return it->second;
  bool hit = false;  // any location of the inline chain (kernel line, then its callers) listed
  for (std::string l : run_addr2line("-i", reinterpret_cast<uintptr_t>(pc) - module_base() - 1)) {
    l = l.substr(0, l.find(' '));
    for (const std::string& x : skip)
      if (l.size() >= x.size() && l.compare(l.size() - x.size(), x.size(), x) == 0) hit = true;
  }
  seen[pc] = hit;
  return hit;
}

void access(Fiber& f, const void* p, std::size_t n, bool write, const void* pc) {
  if (!g_enabled || g_pool.shadows.empty()) return;
  check(S(), f, p, n, write, pc);
}

}  // namespace simt::race

// ---- ThreadSanitizer's compiler interface -----------------------------------------------------------
// g++ -fsanitize=thread turns each memory access of the kernel sources into one of these calls
// and each atomic into a __tsan_atomic* call that must perform the operation.
namespace {

inline void on_access(const void* p, std::size_t n, bool write, const void* pc) {
  simt::detail::Scheduler& s = simt::detail::S();
  simt::detail::Fiber* f = s.current;
  if (!f) return;  // host code
  if (simt::race::g_enabled && !simt::race::g_pool.shadows.empty()) simt::race::check(s, *f, p, n, write, pc);
  if (simt::metrics::g_on) simt::metrics::access(*f, p, n, write ? simt::metrics::Op::kStore : simt::metrics::Op::kLoad, pc);
}

// Atomics are not race-checked (race.h); the metrics count them.
inline void on_atomic(const volatile void* p, std::size_t n, simt::metrics::Op op, const void* pc) {
  if (!simt::metrics::g_on) return;
  simt::detail::Fiber* f = simt::detail::S().current;
  if (f) simt::metrics::access(*f, const_cast<const void*>(p), n, op, pc);
}

}  // namespace

#define SIMT_RET __builtin_return_address(0)
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void* p, unsigned long n) { on_access(p, n, false, SIMT_RET); }
void __tsan_write_range(void* p, unsigned long n) { on_access(p, n, true, SIMT_RET); }
#define SIMT_TSAN_RW(N)                                                                      \
  void __tsan_read##N(void* p) { on_access(p, N, false, SIMT_RET); }                        \
  void __tsan_write##N(void* p) { on_access(p, N, true, SIMT_RET); }                        \
  void __tsan_unaligned_read##N(void* p) { on_access(p, N, false, SIMT_RET); }              \
  void __tsan_unaligned_write##N(void* p) { on_access(p, N, true, SIMT_RET); }              \
  void __tsan_volatile_read##N(void* p) { on_access(p, N, false, SIMT_RET); }               \
  void __tsan_volatile_write##N(void* p) { on_access(p, N, true, SIMT_RET); }               \
  void __tsan_unaligned_volatile_read##N(void* p) { on_access(p, N, false, SIMT_RET); }     \
  void __tsan_unaligned_volatile_write##N(void* p) { on_access(p, N, true, SIMT_RET); }
SIMT_TSAN_RW(1)
SIMT_TSAN_RW(2)
SIMT_TSAN_RW(4)
SIMT_TSAN_RW(8)
SIMT_TSAN_RW(16)

// Atomics: performed sequentially consistent (the executor runs one fiber at a time), not
// race-checked, counted by the metrics (loads as loads, stores as stores, the rest as atomics).
#define SIMT_LD simt::metrics::Op::kLoad
#define SIMT_ST simt::metrics::Op::kStore
#define SIMT_RMW simt::metrics::Op::kAtomic
#define SIMT_TSAN_ATOMIC(N, T)                                                                                \
  T __tsan_atomic##N##_load(const volatile T* a, int) {                                                      \
    on_atomic(a, sizeof(T), SIMT_LD, SIMT_RET);                                                               \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                              \
  }                                                                                                           \
  void __tsan_atomic##N##_store(volatile T* a, T v, int) {                                                   \
    on_atomic(a, sizeof(T), SIMT_ST, SIMT_RET);                                                               \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                 \
  }                                                                                                           \
  T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                                   \
    on_atomic(a, sizeof(T), SIMT_RMW, SIMT_RET);                                                              \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                           \
  SIMT_TSAN_RMW(N, T, fetch_add)                                                                              \
  SIMT_TSAN_RMW(N, T, fetch_sub)                                                                              \
  SIMT_TSAN_RMW(N, T, fetch_and)                                                                              \
  SIMT_TSAN_RMW(N, T, fetch_or)                                                                               \
  SIMT_TSAN_RMW(N, T, fetch_xor)                                                                              \
  SIMT_TSAN_RMW(N, T, fetch_nand)                                                                             \
  int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                       \
    on_atomic(a, sizeof(T), SIMT_RMW, SIMT_RET);                                                              \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                           \
  int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                         \
    on_atomic(a, sizeof(T), SIMT_RMW, SIMT_RET);                                                              \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                           \
  T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                             \
    on_atomic(a, sizeof(T), SIMT_RMW, SIMT_RET);                                                              \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                         \
    return c;                                                                                                 \
  }
#define SIMT_TSAN_RMW(N, T, OP)                                                                               \
  T __tsan_atomic##N##_##OP(volatile T* a, T v, int) {                                                       \
    on_atomic(a, sizeof(T), SIMT_RMW, SIMT_RET);                                                              \
    return __atomic_##OP(a, v, __ATOMIC_SEQ_CST);                                                             \
  }
SIMT_TSAN_ATOMIC(8, uint8_t)
SIMT_TSAN_ATOMIC(16, uint16_t)
SIMT_TSAN_ATOMIC(32, uint32_t)
SIMT_TSAN_ATOMIC(64, uint64_t)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}  // extern "C"
