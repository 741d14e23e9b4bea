// __host__ __device__ helpers shared by kernels: conversions between storage
// types and float, and 16-byte vectors for memory-bound kernels.
//
// Why 16 bytes: one LDG.128/STG.128 per thread is what saturates HBM on
// Hopper and Ampere; narrower accesses need more instructions in flight for
// the same bandwidth.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace inferops {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// kN elements of T, aligned to their total size, loaded/stored as one access.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Vec {
  T v[kN];

  __device__ __forceinline__ void load(const T* p) { *this = *reinterpret_cast<const Vec*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Vec*>(p) = *this; }
};

// Elements of T per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

__host__ __device__ inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace inferops
