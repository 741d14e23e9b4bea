// The SIMT executor's memory instructions: shared-memory addressing (each block's 256 KiB
// window, scheduler.h), cp.async groups (source read at issue, destination poisoned until the
// wait that retires its group), 16-byte global accesses, acquire/release flags, and the special
// registers the kernels read. Alignment and bounds are checked; a violation is a kernel error.
#include "simt/scheduler.h"
#include "simt/metrics.h"
#include "simt/race.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace simt {

using namespace detail;

unsigned char* dynamic_smem() {
  const Block* b = S().cur_block;
  return b ? b->dyn : nullptr;
}
std::size_t dynamic_smem_bytes() { return S().dyn_bytes; }

uint32_t shared_address(const void* p) {
  const Scheduler& s = S();
  const auto* c = static_cast<const unsigned char*>(p);
  const Block* b = s.cur_block;
  if (!b || c < b->window || c >= b->window + kSmemWindow) {
    for (int r = 0; b && r < s.nblocks; ++r) {
      const Block& o = *s.blocks[r];
      if (c >= o.window && c < o.window + kSmemWindow) {
        fail("__cvta_generic_to_shared(%p): a distributed shared-memory address (block rank %d of the "
             "cluster), not one of this block's shared memory",
             p, r);
      }
    }
    fail("__cvta_generic_to_shared(%p): not in the dynamic shared-memory window (static __shared__ "
         "variables have no shared address in the executor)",
         p);
  }
  return static_cast<uint32_t>(c - b->window);
}

unsigned char* shared_pointer(uint32_t addr) {
  const Scheduler& s = S();
  if (addr >= kSmemWindow || !s.cur_block) fail("shared address 0x%x outside the shared-memory window", addr);
  return s.cur_block->window + addr;
}

void check_aligned(const void* p, int bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) {
    fail("misaligned address %p for %s (needs %d-byte alignment)", p, what, bytes);
  }
}

// ---- cp.async ---------------------------------------------------------------------------------------------------
namespace ptx {

void cp_async(uint32_t saddr, const void* gmem, int bytes, int src_bytes) {
  Fiber& f = cur_fiber("cp.async");
  unsigned char* dst = shared_pointer(saddr);
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async: copy size %d (4, 8 or 16)", bytes);
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async: src-size %d outside [0, %d]", src_bytes, bytes);
  check_aligned(dst, bytes, "cp.async shared destination");
  if (src_bytes > 0) check_aligned(gmem, bytes, "cp.async global source");
  if (dst + bytes > dynamic_smem() + S().dyn_bytes || dst < dynamic_smem()) {
    fail("cp.async: destination [0x%x, +%d) outside the block's %zu bytes of dynamic shared memory", saddr, bytes,
         S().dyn_bytes);
  }
  PendingCopy c{};
  c.dst = dst;
  c.bytes = bytes;
  c.pc = __builtin_return_address(0);
  // For the race check the copy writes its destination at issue (the hardware may write it
  // any time from now: reads and writes not ordered before this are races) and again when a
  // wait retires it (reads not ordered after that wait are races).
  race::access(f, dst, static_cast<std::size_t>(bytes), true, c.pc);
  // For the metrics it reads its source and writes its destination at issue.
  if (metrics::g_on) {
    if (src_bytes > 0) metrics::access(f, gmem, static_cast<std::size_t>(src_bytes), metrics::Op::kLoad, c.pc);
    metrics::access(f, dst, static_cast<std::size_t>(bytes), metrics::Op::kStore, c.pc);
  }
  if (src_bytes > 0) std::memcpy(c.data, gmem, static_cast<std::size_t>(src_bytes));  // rest: zero-filled
  std::memset(dst, 0xff, static_cast<std::size_t>(bytes));
  f.cp_open.push_back(c);
}

void cp_async_commit() {
  Fiber& f = cur_fiber("cp.async.commit_group");
  f.cp_groups.push_back(std::move(f.cp_open));
  f.cp_open.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = cur_fiber("cp.async.wait_group");
  while (f.cp_groups.size() > static_cast<std::size_t>(std::max(pending, 0))) {
    for (auto& c : f.cp_groups.front()) {
      race::access(f, c.dst, static_cast<std::size_t>(c.bytes), true, c.pc);  // the copy lands now
      std::memcpy(c.dst, c.data, static_cast<std::size_t>(c.bytes));
    }
    f.cp_groups.erase(f.cp_groups.begin());
  }
}

void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait(0);
}

void st_global_v4(void* p, const uint32_t (&w)[4]) {
  check_aligned(p, 16, "st.global.v4");
  if (metrics::g_on) metrics::access(cur_fiber("st.global.v4"), p, 16, metrics::Op::kStore, __builtin_return_address(0));
  std::memcpy(p, w, 16);
}

void ld_global_v4(uint32_t (&w)[4], const void* p) {
  check_aligned(p, 16, "ld.global.v4");
  if (metrics::g_on) metrics::access(cur_fiber("ld.global.v4"), p, 16, metrics::Op::kLoad, __builtin_return_address(0));
  std::memcpy(w, p, 16);
}

uint32_t ld_acquire_u32(const uint32_t* p) {
  check_aligned(p, 4, "ld.acquire");
  if (metrics::g_on) metrics::access(cur_fiber("ld.acquire"), p, 4, metrics::Op::kLoad, __builtin_return_address(0));
  const uint32_t v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
  yield();  // a flag is being spun on: let the other threads run
  return v;
}

void st_release_u32(uint32_t* p, uint32_t v) {
  check_aligned(p, 4, "st.release");
  if (metrics::g_on) metrics::access(cur_fiber("st.release"), p, 4, metrics::Op::kStore, __builtin_return_address(0));
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
  // A flag was published: let the other threads (of a concurrent pool, other grids) run
  // before this one goes on, so a consumer may see the flag before anything this thread
  // writes next (data written after its flag is then read stale, as on the GPU).
  yield();
}

uint32_t lanemask_lt() { return (1u << cur_fiber("%lanemask_lt").lane) - 1u; }

uint64_t globaltimer_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace ptx

}  // namespace simt
