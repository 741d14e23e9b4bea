// Warp-level tensor-core wrappers shared by the mma.sync kernels (sm_80+):
// mma.m16n8k16 with fp16 / bf16 operands and fp32 accumulation, and ldmatrix. Under
// INFEROPS_SIMT each runs as a warp collective of the CPU SIMT executor (csrc/simt/).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace inferops {

// d += a * b for one m16n8k16 tile; T = __half or __nv_bfloat16 (the operands' type).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16 operands");
#ifdef INFEROPS_SIMT
  ::simt::ptx::mma_m16n8k16(std::is_same_v<T, __half> ? ::simt::ptx::MmaType::kF16 : ::simt::ptx::MmaType::kBF16, d,
                            a, b0, b1);
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Four 8x8 b16 matrices from shared memory; lane 8j + r addresses row r of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], unsigned saddr) {
#ifdef INFEROPS_SIMT
  ::simt::ptx::ldmatrix(r, 4, saddr, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr)
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  ldmatrix_x4(r, static_cast<unsigned>(__cvta_generic_to_shared(smem)));
}
// Same, each 8x8 matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], unsigned saddr) {
#ifdef INFEROPS_SIMT
  ::simt::ptx::ldmatrix(r, 4, saddr, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr)
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ldmatrix_x4_trans(r, static_cast<unsigned>(__cvta_generic_to_shared(smem)));
}

// x1 / x2 forms (lanes 0-7 / 0-15 give the row addresses), plain and transposed.
template <int kCount, bool kTrans>
__device__ __forceinline__ void ldmatrix_xn(uint32_t (&r)[kCount], unsigned saddr) {
  static_assert(kCount == 1 || kCount == 2 || kCount == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef INFEROPS_SIMT
  ::simt::ptx::ldmatrix(r, kCount, saddr, kTrans);
#else
  if constexpr (kCount == 1 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(saddr) : "memory");
  } else if constexpr (kCount == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(saddr) : "memory");
  } else if constexpr (kCount == 2 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(saddr)
                 : "memory");
  } else if constexpr (kCount == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(saddr)
                 : "memory");
  } else if constexpr (!kTrans) {
    ldmatrix_x4(r, saddr);
  } else {
    ldmatrix_x4_trans(r, saddr);
  }
#endif
}

}  // namespace inferops
