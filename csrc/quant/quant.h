// Quantized matmul family (OstQuant): kernel parameters and host entries.
// Shared header: each part keeps its declarations in its own block.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace inferops::quant {

// ---- W8A8 (INT8 / FP8 e4m3), per-token quantization, online Hadamard ------------------
//
// w8a8_matmul: x_q [M, K] and w_q [N, K] 8-bit (both int8 or both fp8 e4m3), rows
// K-contiguous with a 16-byte aligned base and row stride (elements) a multiple of 16;
// x_scale [M], w_scale [N] fp32; bias [N] fp32 or null; out [M, N] fp16/bf16 contiguous:
//   out[m, n] = (sum_k x_q[m, k] w_q[n, k]) * x_scale[m] * w_scale[n] + bias[n].
// K % 16 == 0 and K <= kW8A8MaxK (int8 accumulates exactly in int32).
struct W8A8Params {
  const void* x;        // [M, K] int8 / fp8
  const void* w;        // [N, K] int8 / fp8
  const float* x_scale;  // [M]
  const float* w_scale;  // [N]
  const float* bias;     // [N] or nullptr
  void* out;             // [M, N] fp16 / bf16
  int64_t ldx;           // row stride of x in elements (bytes)
  int64_t ldw;           // row stride of w
  int32_t m;
  int32_t n;
  int32_t k;
};

constexpr int kW8A8KAlign = 16;
constexpr int64_t kW8A8MaxK = 131072;  // 131072 * 127 * 127 < 2^31

// quantize_per_token: x [M, K] fp16/bf16/fp32 contiguous -> q [M, K] int8/fp8, scale [M]
// fp32 with scale = max(amax / qmax, kQuantScaleMin) and q = rne(x / scale).
struct QuantizeParams {
  const void* x;
  void* q;
  float* scale;
  int64_t rows;
  int32_t cols;
};

constexpr float kQuantScaleMin = 1e-10f;

// hadamard_quantize: x [M, n] fp16/bf16 contiguous, n = m * p (p = 2^k >= 8, m = 1 or a
// dense order); hm [m, m] int8 +-1 (H_m, row a = input chunk a): a host tensor for
// m <= kHadamardParamMaxM (copied into the kernel parameters, see HadamardSmallFactor),
// a device tensor for larger m, null when m == 1; out [M, n] int8 / fp8 / x's dtype;
// scale [M] fp32 (quantized outputs only). out_row = quant(x_row @ kron(H_m, H_p) / sqrt(n)).
struct HadamardParams {
  const void* x;
  const int8_t* hm;
  void* out;
  float* scale;
  int64_t rows;
  int32_t n;
  int32_t m;
  int32_t log2_p;
  float inv_sqrt_n;
};

// H_m for m <= 28 travels in the kernel parameters (constant bank): with the loops fully
// unrolled every FMA takes its +-1 operand straight from the constant cache, no load.
constexpr int kHadamardParamMaxM = 28;
struct HadamardSmallFactor {
  float h[kHadamardParamMaxM * kHadamardParamMaxM];  // [m][m] row-major, 3136 bytes
};

void w8a8_matmul(const TensorView& x_q, const TensorView& x_scale, const TensorView& w_q,
                 const TensorView& w_scale, const TensorView* bias, const TensorView& out,
                 std::uintptr_t stream);
void quantize_per_token(const TensorView& x, const TensorView& q, const TensorView& scale,
                        std::uintptr_t stream);
void hadamard_quantize(const TensorView& x, const TensorView* hm, const TensorView& out,
                       const TensorView& scale, int m, std::uintptr_t stream);

#ifdef INFEROPS_WITH_CUDA
void launch_w8a8_matmul(const W8A8Params& p, DType in_dtype, DType out_dtype, int device,
                        std::uintptr_t stream);
void launch_quantize_per_token(const QuantizeParams& p, DType in_dtype, DType q_dtype, int device,
                               std::uintptr_t stream);
void launch_hadamard_quantize(const HadamardParams& p, const HadamardSmallFactor& f, DType in_dtype,
                              DType out_dtype, int device, std::uintptr_t stream);
#endif

// ---- end W8A8 --------------------------------------------------------------------------

}  // namespace inferops::quant
