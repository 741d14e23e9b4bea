// Warpgroup MMA (wgmma, sm_90a only) helpers shared by the wgmma kernels:
// the 128B-swizzled K-major operand layout, its matrix descriptor, and the
// fence / commit / wait discipline, and the wgmma.mma_async instructions of the kernels.
// Everything here is defined only in device passes for the arch-specific sm_90a target
// and in the CPU SIMT executor build, which models an sm_90a device (INFEROPS_WGMMA_DEVICE;
// the INFEROPS_SIMT branches call csrc/simt/wgmma.cpp); callers guard their wgmma code
// with the same macro.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || defined(INFEROPS_SIMT)
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
#ifdef INFEROPS_SIMT
  simt::ptx::fence_proxy_async_shared();
#else
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#ifdef INFEROPS_SIMT
  simt::ptx::wgmma_fence();
#else
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef INFEROPS_SIMT
  simt::ptx::wgmma_commit();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef INFEROPS_SIMT
  simt::ptx::wgmma_wait(kPending);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Keeps the compiler from moving accumulator reads / writes across the async wgmma window.
// (The executor writes the accumulators through the pointer its wgmma_mma received, inside
// wgmma_wait, an opaque call: the compiler already keeps them in memory around it.)
template <int N>
__device__ __forceinline__ void acc_fence(float (&d)[N]) {
#ifndef INFEROPS_SIMT
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

#define INFEROPS_WG_ACC_OUT                                                                              \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),        \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),           \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),         \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),         \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),         \
      "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),         \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),         \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),         \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define INFEROPS_WG_ACC_REGS                                                                             \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "   \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "   \
  "%62, %63}"

// wgmma.mma_async m64n128k16, fp16/bf16 operands from shared-memory descriptors, fp32
// accumulators in d (the m64nN register layout): D (+)= A B^T over one k16 slice;
// scale_d == 0 starts from zero.
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#ifdef INFEROPS_SIMT
  simt::ptx::wgmma_mma(std::is_same_v<T, __half> ? simt::ptx::MmaType::kF16 : simt::ptx::MmaType::kBF16, 128, d,
                       desc_a, desc_b, scale_d);
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " INFEROPS_WG_ACC_REGS
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : INFEROPS_WG_ACC_OUT
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " INFEROPS_WG_ACC_REGS
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : INFEROPS_WG_ACC_OUT
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
#endif
}
#undef INFEROPS_WG_ACC_OUT
#undef INFEROPS_WG_ACC_REGS

// wgmma.mma_async m64n128k32 with fp8 e4m3 operands: D (+)= A B^T over one k32 slice.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                       int scale_d) {
#ifdef INFEROPS_SIMT
  simt::ptx::wgmma_mma(simt::ptx::MmaType::kE4M3, 128, d, desc_a, desc_b, scale_d);
#else
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, "
      "%8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, "
      "%40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

}  // namespace inferops
#endif  // INFEROPS_WGMMA_DEVICE
