// cp.async (sm_80+): asynchronous 16-byte global -> shared copies, grouped
// and waited on per pipeline stage, so loads of tile i+1.. overlap compute
// on tile i without holding the data in registers.
#pragma once

namespace inferops {

// .cg: cache in L2 only. Streamed KV is read once per kernel; keeping it out
// of L1 leaves L1 to the block tables and q.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
#ifdef INFEROPS_SIMT
  ::simt::ptx::cp_async(s, gmem, 16, 16);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#endif
}

// Zero-filling form: copies `src_bytes` (0 or 16) and zeroes the rest of the 16 bytes,
// so tile edges (rows past M, k past K) need no separate clearing pass.
__device__ __forceinline__ void cp_async_16_zfill(unsigned saddr, const void* gmem, int src_bytes) {
#ifdef INFEROPS_SIMT
  ::simt::ptx::cp_async(saddr, gmem, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gmem), "r"(src_bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, int src_bytes) {
  cp_async_16_zfill(static_cast<unsigned>(__cvta_generic_to_shared(smem)), gmem, src_bytes);
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef INFEROPS_SIMT
  ::simt::ptx::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most kPending of the committed groups are still in flight.
// The "memory" clobbers keep the compiler from moving shared-memory accesses across
// the copy / wait (a __syncthreads after the wait also does, but not every caller
// may have one between the wait and its reads).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef INFEROPS_SIMT
  ::simt::ptx::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Commit the open group and wait for every group (cp.async.wait_all).
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef INFEROPS_SIMT
  ::simt::ptx::cp_async_wait_all();
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace inferops
