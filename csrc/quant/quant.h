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

// Which GEMM kernel w8a8_matmul runs. kAuto = kMma (the default until a GPU run proves
// kWgmma correct and faster); kWgmma: experimental FP8-only sm_90a wgmma kernel
// (w8a8_wgmma.cu), opt-in.
enum class W8A8Path : int { kAuto = 0, kMma = 1, kWgmma = 2 };
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
// dense order); out [M, n] int8 / fp8 / x's dtype; scale [M] fp32 (quantized outputs
// only). out_row = quant(x_row @ kron(H_m, H_p) / sqrt(n)). The dense factor `hm`:
//  * m <= kHadamardParamMaxM: int8 +-1 [m, m] host tensor (H_m, row a = input chunk a),
//    copied into the kernel parameters (HadamardSmallFactor);
//  * m > kHadamardParamMaxM (108, 344): int32 device tensor [m16 / 16, hadamard_tc_words(m), 32]
//    of tensor-core A-fragment sign words for H_m^T (m16 = m rounded up to 16; layout in
//    hadamard.cu, built by python/inferops/quant/hadamard.py: dense_factor_fragments);
//  * null when m == 1.
struct HadamardParams {
  const void* x;
  const uint32_t* hm_frag;  // m > kHadamardParamMaxM only
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

// Tensor-core path (m > kHadamardParamMaxM): m padded to a multiple of 16 (the mma tile),
// one 32-bit sign word per (16-row tile of H_m^T, 4 k-tiles, lane).
constexpr int hadamard_tc_pad(int m) { return (m + 15) / 16 * 16; }
constexpr int hadamard_tc_words(int m) { return (hadamard_tc_pad(m) / 16 + 3) / 4; }
// Row stride (elements) of the staged fp16/bf16 row [m16][stride]: 16 * stride / 8 bytes
// odd, so the 8 rows an ldmatrix phase reads fall in distinct bank groups.
constexpr int hadamard_tc_stride(int p) { return p + (p == 8 ? 16 : 8); }
// Dynamic shared memory of the kernel for a row of n = m * p (the Python wrapper mirrors it).
constexpr int64_t hadamard_smem_bytes(int m, int64_t p) {
  return m <= kHadamardParamMaxM
             ? 4 * m * p
             : 4 * m * p + 2 * int64_t(hadamard_tc_pad(m)) * hadamard_tc_stride(int(p)) +
                   4 * 32 * int64_t(hadamard_tc_pad(m) / 16) * hadamard_tc_words(m);
}

void w8a8_matmul(const TensorView& x_q, const TensorView& x_scale, const TensorView& w_q,
                 const TensorView& w_scale, const TensorView* bias, const TensorView& out,
                 std::uintptr_t stream, W8A8Path path = W8A8Path::kAuto);
// "auto" / "mma" / "wgmma" -> W8A8Path; ValueError naming `path` otherwise.
W8A8Path parse_w8a8_path(const char* path);
void quantize_per_token(const TensorView& x, const TensorView& q, const TensorView& scale,
                        std::uintptr_t stream);
void hadamard_quantize(const TensorView& x, const TensorView* hm, const TensorView& out,
                       const TensorView& scale, int m, std::uintptr_t stream);

#ifdef INFEROPS_WITH_CUDA
void launch_w8a8_matmul(const W8A8Params& p, DType in_dtype, DType out_dtype, int device,
                        std::uintptr_t stream);
void launch_w8a8_matmul_wgmma(const W8A8Params& p, DType in_dtype, DType out_dtype, int device,
                              std::uintptr_t stream);
void launch_quantize_per_token(const QuantizeParams& p, DType in_dtype, DType q_dtype, int device,
                               std::uintptr_t stream);
void launch_hadamard_quantize(const HadamardParams& p, const HadamardSmallFactor& f, DType in_dtype,
                              DType out_dtype, int device, std::uintptr_t stream);
#endif

// ---- end W8A8 --------------------------------------------------------------------------

}  // namespace inferops::quant
