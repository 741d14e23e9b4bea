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
#include <cstring>

#include "ptx.cuh"

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

namespace detail {
// Unsigned type of exactly `kBytes` bytes: accesses go through it so the
// compiler emits one LDG/STG of that width (a struct copy of a __half array
// is otherwise split into 32-bit stores).
template <int kBytes> struct RawBits;
template <> struct RawBits<2> { using type = unsigned short; };
template <> struct RawBits<4> { using type = unsigned int; };
template <> struct RawBits<8> { using type = uint2; };
template <> struct RawBits<16> { using type = uint4; };
}  // namespace detail

// kN elements of T, aligned to their total size, loaded/stored as one access.
// store() is for global memory only (it emits st.global).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Vec {
  using Raw = typename detail::RawBits<sizeof(T) * kN>::type;
  T v[kN];

  __device__ __forceinline__ void load(const T* p) {
    const Raw r = *reinterpret_cast<const Raw*>(p);
    memcpy(v, &r, sizeof(Raw));
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (sizeof(Raw) == 16) {
      // Explicit st.global.v4: NVVM splits a plain 16-byte store of values
      // built from fp16/bf16/fp32 conversions into 4-byte stores (seen in the
      // PTX of merge_states), which costs 4x the store instructions.
      uint32_t w[4];
      memcpy(w, v, 16);
      st_global_v4(p, w);
    } else {
      Raw r;
      memcpy(&r, v, sizeof(Raw));
      *reinterpret_cast<Raw*>(p) = r;
    }
  }
};

// Elements of T per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

__host__ __device__ inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace inferops
