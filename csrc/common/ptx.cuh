// Typed wrappers for the remaining inline PTX of the kernels (mma.cuh has mma.m16n8k16 and
// ldmatrix, cp_async.cuh the cp.async family, wgmma.cuh the Hopper warpgroup MMA). Each
// wrapper has the `asm` nvcc compiles and, under INFEROPS_SIMT, the CPU SIMT executor's
// implementation (csrc/simt/ptx.h) beside it, so a kernel source compiles unchanged for both.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace inferops {

// d += a * b for one m16n8k32 tile of int8 (s32 accumulators).
__device__ __forceinline__ void mma_16832(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef INFEROPS_SIMT
  ::simt::ptx::mma_m16n8k32_s8(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// d += a * b for one m16n8k32 tile of fp8 e4m3 (fp32 accumulators). e4m3 mma.sync exists
// from sm_89; builds for older archs (e.g. INFEROPS_CUDA_ARCHS="80;90a") compile it out
// there and the launcher refuses FP8 on such devices.
__device__ __forceinline__ void mma_16832(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(INFEROPS_SIMT)
  ::simt::ptx::mma_m16n8k32_e4m3(c, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// 16-byte global store as one st.global.v4.b32 (p 16-byte aligned).
__device__ __forceinline__ void st_global_v4(void* p, const uint32_t (&w)[4]) {
#ifdef INFEROPS_SIMT
  ::simt::ptx::st_global_v4(p, w);
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)), "r"(w[0]), "r"(w[1]),
               "r"(w[2]), "r"(w[3])
               : "memory");
#endif
}

// 16-byte read-only global load that does not allocate in L1 (streamed data read once).
__device__ __forceinline__ uint4 ld_global_nc_na_v4(const uint4* p) {
  uint4 r;
#ifdef INFEROPS_SIMT
  uint32_t w[4];
  ::simt::ptx::ld_global_v4(w, p);
  r = make_uint4(w[0], w[1], w[2], w[3]);
#else
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
#endif
  return r;
}

// System-scope acquire load / release store of a 32-bit flag (peer GPUs' writes ordered).
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
#ifdef INFEROPS_SIMT
  return ::simt::ptx::ld_acquire_u32(p);
#else
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(__cvta_generic_to_global(p)) : "memory");
  return v;
#endif
}
__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
#ifdef INFEROPS_SIMT
  ::simt::ptx::st_release_u32(p, v);
#else
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(__cvta_generic_to_global(p)), "r"(v) : "memory");
#endif
}

// %globaltimer: nanoseconds (the GPU's global timer; the host's steady clock in the executor).
__device__ __forceinline__ uint64_t global_timer_ns() {
#ifdef INFEROPS_SIMT
  return ::simt::ptx::globaltimer_ns();
#else
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#endif
}

// %lanemask_lt: the lanes below the caller's.
__device__ __forceinline__ unsigned lanemask_lt() {
#ifdef INFEROPS_SIMT
  return ::simt::ptx::lanemask_lt();
#else
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
#endif
}

// lop3.b32 with an immediate lookup table: any 3-input bitwise function in one instruction.
template <uint32_t kLut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
#ifdef INFEROPS_SIMT
  return ::simt::ptx::lop3(a, b, c, kLut);
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return d;
#endif
}

}  // namespace inferops
