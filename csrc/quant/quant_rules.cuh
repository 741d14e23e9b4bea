// The per-token symmetric quantization rule on the device, shared by
// quantize_per_token (w8a8.cu) and hadamard_quantize (hadamard.cu), so both give
// the reference's bits: scale = max(amax / qmax, kQuantScaleMin) with a NaN-propagating
// max, q = round-half-even(x / scale) clamped to +-127 (int8) or one saturating
// convert to e4m3 (fp8, NaN stays NaN).
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

namespace inferops::quant {

template <typename Q>
struct QuantTraits;
template <>
struct QuantTraits<int8_t> {
  static constexpr float kMax = 127.f;
  __device__ static int8_t quantize(float v) {
    const int r = __float2int_rn(v);  // round half to even, as torch.round
    return static_cast<int8_t>(max(-127, min(127, r)));
  }
};
template <>
struct QuantTraits<__nv_fp8_storage_t> {
  static constexpr float kMax = 448.f;
  // satfinite saturates to +-448 and keeps NaN a NaN (0x7f), as the reference's clamp +
  // cast does; a clamp with fminf/fmaxf first would turn NaN into -448.
  __device__ static __nv_fp8_storage_t quantize(float v) { return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); }
};

// max that propagates NaN, as torch.amax and torch.clamp do (fmaxf returns the non-NaN
// operand, which would give a row holding a NaN a finite scale and finite codes).
__device__ __forceinline__ float fmax_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// NaN-propagating max over the block (blockDim.x a multiple of 32, at most 1024);
// `red` holds >= 32 floats of shared memory. Ends with a barrier; every thread gets it.
__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x >> 5) ? red[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

}  // namespace inferops::quant
