// Host entries of w8a8_matmul, quantize_per_token and hadamard_quantize: validation
// and parameter packing. Compiled in every build, so bad arguments raise the same
// way with or without CUDA.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "quant.h"

namespace inferops::quant {

namespace {

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

bool aligned16(const TensorView& t) { return reinterpret_cast<std::uintptr_t>(t.data()) % 16 == 0; }

// Dense Hadamard orders the kernel is compiled for (python/inferops/quant/hadamard.py builds them).
bool is_dense_order(int m) { return m == 1 || m == 12 || m == 20 || m == 28 || m == 108 || m == 344; }

}  // namespace

W8A8Path parse_w8a8_path(const char* path) {
  const std::string s = path ? path : "";
  if (s == "auto") return W8A8Path::kAuto;
  if (s == "mma") return W8A8Path::kMma;
  if (s == "wgmma") return W8A8Path::kWgmma;
  INFEROPS_CHECK_ARG(false, "expected `path` \"auto\", \"mma\" or \"wgmma\", got \"", s, "\"");
  return W8A8Path::kAuto;
}

void w8a8_matmul(const TensorView& x_q, const TensorView& x_scale, const TensorView& w_q,
                 const TensorView& w_scale, const TensorView* bias, const TensorView& out,
                 std::uintptr_t stream, W8A8Path path) {
  x_q.expect_dtype_in("x_q", {DType::kInt8, DType::kFloat8E4M3});
  w_q.expect_dtype("w_q", x_q.dtype());
  x_scale.expect_dtype("x_scale", DType::kFloat32);
  w_scale.expect_dtype("w_scale", DType::kFloat32);
  out.expect_dtype_in("out", {DType::kFloat16, DType::kBFloat16});
  INFEROPS_CHECK_TYPE(path != W8A8Path::kWgmma || x_q.dtype() == DType::kFloat8E4M3,
                      "expected float8_e4m3fn `x_q` for path=\"wgmma\" (FP8 only), got ", dtype_name(x_q.dtype()),
                      " (INT8 runs on path=\"mma\")");
  x_q.expect_ndim("x_q", 2);
  w_q.expect_ndim("w_q", 2);
  const int64_t M = x_q.size(0), K = x_q.size(1), N = w_q.size(0);
  w_q.expect_shape("w_q", {N, K});
  x_scale.expect_shape("x_scale", {M});
  w_scale.expect_shape("w_scale", {N});
  out.expect_shape("out", {M, N});
  out.expect_contiguous("out");
  out.expect_writable("out");
  x_scale.expect_contiguous("x_scale");
  w_scale.expect_contiguous("w_scale");
  INFEROPS_CHECK_ARG(K % kW8A8KAlign == 0, "expected K (last dim of `x_q` and `w_q`) a multiple of ",
                     kW8A8KAlign, ", got K = ", K);
  INFEROPS_CHECK_ARG(K <= kW8A8MaxK, "expected K <= ", kW8A8MaxK, " (int32 accumulation), got K = ", K);
  for (auto [t, name] : {std::pair{&x_q, "x_q"}, {&w_q, "w_q"}}) {
    t->expect_last_dim_contiguous(name);
    // K == 0: torch gives [M, 0] tensors row stride 1; no byte is read (zero k tiles).
    INFEROPS_CHECK_ARG(aligned16(*t) && (t->size(0) <= 1 || K == 0 || t->stride(0) % 16 == 0),
                       "expected `", name, "` with a 16-byte aligned base and row stride, got stride ",
                       t->stride(0));
  }
  INFEROPS_CHECK_ARG(M <= std::numeric_limits<int32_t>::max() && N <= std::numeric_limits<int32_t>::max(),
                     "expected M and N below 2^31, got M = ", M, ", N = ", N);
  if (bias) {
    bias->expect_dtype("bias", DType::kFloat32);
    bias->expect_shape("bias", {N});
    bias->expect_contiguous("bias");
  }
  x_q.expect_cuda("x_q");
  for (auto [t, name] : {std::pair{&w_q, "w_q"}, {&x_scale, "x_scale"}, {&w_scale, "w_scale"}, {&out, "out"}}) {
    t->expect_same_device(name, x_q, "x_q");
  }
  if (bias) bias->expect_same_device("bias", x_q, "x_q");

  W8A8Params p{};
  p.x = x_q.data();
  p.w = w_q.data();
  p.x_scale = x_scale.data_as<const float>();
  p.w_scale = w_scale.data_as<const float>();
  p.bias = bias ? bias->data_as<const float>() : nullptr;
  p.out = out.data();
  p.ldx = M > 1 ? x_q.stride(0) : K;
  p.ldw = N > 1 ? w_q.stride(0) : K;
  p.m = static_cast<int32_t>(M);
  p.n = static_cast<int32_t>(N);
  p.k = static_cast<int32_t>(K);
  if (M == 0 || N == 0) return;
  INFEROPS_LAUNCH_CUDA("w8a8_matmul", stream, {
    if (path == W8A8Path::kWgmma) {
      launch_w8a8_matmul_wgmma(p, x_q.dtype(), out.dtype(), x_q.device_id(), stream);
    } else {
      launch_w8a8_matmul(p, x_q.dtype(), out.dtype(), x_q.device_id(), stream);
    }
  });
}

void quantize_per_token(const TensorView& x, const TensorView& q, const TensorView& scale,
                        std::uintptr_t stream) {
  x.expect_dtype_in("x", {DType::kFloat16, DType::kBFloat16, DType::kFloat32});
  q.expect_dtype_in("x_q", {DType::kInt8, DType::kFloat8E4M3});
  scale.expect_dtype("scale", DType::kFloat32);
  x.expect_ndim("x", 2);
  const int64_t M = x.size(0), K = x.size(1);
  q.expect_shape("x_q", {M, K});
  scale.expect_shape("scale", {M});
  for (auto [t, name] : {std::pair{&x, "x"}, {&q, "x_q"}, {&scale, "scale"}}) t->expect_contiguous(name);
  q.expect_writable("x_q");
  scale.expect_writable("scale");
  INFEROPS_CHECK_ARG(aligned16(x) && aligned16(q), "expected 16-byte aligned `x` and `x_q`");
  INFEROPS_CHECK_ARG(K <= std::numeric_limits<int32_t>::max(), "expected K below 2^31, got ", K);
  x.expect_cuda("x");
  q.expect_same_device("x_q", x, "x");
  scale.expect_same_device("scale", x, "x");
  QuantizeParams p{};
  p.x = x.data();
  p.q = q.data();
  p.scale = scale.data_as<float>();
  p.rows = M;
  p.cols = static_cast<int32_t>(K);
  if (M == 0) return;
  INFEROPS_LAUNCH_CUDA("quantize_per_token", stream, {
    launch_quantize_per_token(p, x.dtype(), q.dtype(), x.device_id(), stream);
  });
}

void hadamard_quantize(const TensorView& x, const TensorView* hm, const TensorView& out,
                       const TensorView& scale, int m, std::uintptr_t stream) {
  x.expect_dtype_in("x", {DType::kFloat16, DType::kBFloat16});
  out.expect_dtype_in("out", {DType::kInt8, DType::kFloat8E4M3, x.dtype()});
  const bool quantized = out.dtype() != x.dtype();
  scale.expect_dtype("scale", DType::kFloat32);
  x.expect_ndim("x", 2);
  const int64_t M = x.size(0), n = x.size(1);
  out.expect_shape("out", {M, n});
  scale.expect_shape("scale", {quantized ? M : 0});
  for (auto [t, name] : {std::pair{&x, "x"}, {&out, "out"}, {&scale, "scale"}}) t->expect_contiguous(name);
  out.expect_writable("out");
  INFEROPS_CHECK_ARG(is_dense_order(m), "expected a dense Hadamard order m in {1, 12, 20, 28, 108, 344}, got ", m);
  INFEROPS_CHECK_ARG(n % m == 0 && is_pow2(n / m) && n / m >= 8 && n <= 32768,
                     "expected n = m * 2^k with 2^k >= 8 and n <= 32768 for `x` (m = ", m, "), got n = ", n);
  HadamardSmallFactor factor{};
  if (m > 1) {
    INFEROPS_CHECK_ARG(hm != nullptr, "expected the dense factor `hm` for m = ", m);
    if (m > kHadamardParamMaxM) {  // tensor-core A-fragment sign words (hadamard.cu)
      hm->expect_dtype("hm", DType::kInt32);
      hm->expect_shape("hm", {hadamard_tc_pad(m) / 16, hadamard_tc_words(m), 32});
    } else {
      hm->expect_dtype("hm", DType::kInt8);
      hm->expect_shape("hm", {m, m});
    }
    hm->expect_contiguous("hm");
    if (m <= kHadamardParamMaxM) {
      INFEROPS_CHECK_ARG(hm->device_kind() == DeviceKind::kCPU, "expected a CPU tensor for `hm` (m = ", m,
                         " <= ", kHadamardParamMaxM, " goes in the kernel parameters), got ", hm->device_str());
      const int8_t* h = hm->data_as<const int8_t>();
      for (int i = 0; i < m * m; ++i) {
        INFEROPS_CHECK_ARG(h[i] == 1 || h[i] == -1, "expected +-1 entries in `hm`, got ", int(h[i]));
        factor.h[i] = float(h[i]);
      }
    }
  }
  INFEROPS_CHECK_ARG(aligned16(x) && aligned16(out) && (m <= kHadamardParamMaxM || aligned16(*hm)),
                     "expected 16-byte aligned `x`, `out` and `hm`");
  x.expect_cuda("x");
  out.expect_same_device("out", x, "x");
  scale.expect_same_device("scale", x, "x");
  if (hm && m > kHadamardParamMaxM) hm->expect_same_device("hm", x, "x");
  int log2_p = 0;
  while ((int64_t(m) << (log2_p + 1)) <= n) ++log2_p;
  HadamardParams p{};
  p.x = x.data();
  p.hm_frag = (m > kHadamardParamMaxM && hm) ? static_cast<const uint32_t*>(hm->data()) : nullptr;
  p.out = out.data();
  p.scale = quantized ? scale.data_as<float>() : nullptr;
  p.rows = M;
  p.n = static_cast<int32_t>(n);
  p.m = m;
  p.log2_p = log2_p;
  p.inv_sqrt_n = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  if (M == 0) return;
  INFEROPS_LAUNCH_CUDA("hadamard_quantize", stream, {
    launch_hadamard_quantize(p, factor, x.dtype(), out.dtype(), x.device_id(), stream);
  });
}

}  // namespace inferops::quant
