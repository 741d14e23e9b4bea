// Warpgroup MMA (wgmma, sm_90a only) helpers shared by the wgmma kernels:
// the 128B-swizzled K-major operand layout, its matrix descriptor, and the
// fence / commit / wait discipline. Everything here is defined only in device
// passes for the arch-specific sm_90a target (INFEROPS_WGMMA_DEVICE); callers
// guard their wgmma code with the same macro.
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define INFEROPS_WGMMA_DEVICE 1
#endif

#ifdef INFEROPS_WGMMA_DEVICE
namespace inferops {

// Byte offset of (row, 16-byte chunk) in a [rows][128 B] operand tile with the 128B
// swizzle (chunk XOR row mod 8); tiles start 1024-byte aligned.
__device__ __forceinline__ constexpr int wg_swz128(int row, int chunk) {
  return row * 128 + ((chunk ^ (row & 7)) << 4);
}

// wgmma descriptor of a K-major, 128B-swizzled operand starting at shared address `saddr`.
__device__ __forceinline__ constexpr uint64_t wg_desc_kmajor_128b(uint32_t saddr) {
  return uint64_t((saddr >> 4) & 0x3FFF)  // start address
         | (uint64_t(1) << 16)            // leading byte offset (unused: K-major, swizzled)
         | (uint64_t(1024 >> 4) << 32)    // stride byte offset: 8 rows x 128 B
         | (uint64_t(1) << 62);           // swizzle mode 1 = 128B
}

// Generic-proxy writes to shared memory (cp.async, st.shared) visible to wgmma's async proxy.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accumulator reads / writes across the async wgmma window.
template <int N>
__device__ __forceinline__ void acc_fence(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

}  // namespace inferops
#endif  // INFEROPS_WGMMA_DEVICE
