// Host entries of the W4A16 ops: validation and parameter packing. Compiled
// in every build, so bad arguments raise the same way with or without CUDA.
#include <limits>

#include "quant_w4a16.h"

namespace inferops::quant {

namespace {

bool is_aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Checks shared by both ops; returns (N, K, G).
struct PackedShape {
  int64_t n, k, groups;
};

PackedShape check_packed(const TensorView& qweight, const TensorView& scales, const TensorView* zeros,
                         int group_size) {
  qweight.expect_dtype("qweight", DType::kInt32);
  qweight.expect_ndim("qweight", 2);
  qweight.expect_contiguous("qweight");
  INFEROPS_CHECK_ARG(is_aligned16(qweight.data()), "expected a 16-byte aligned `qweight`");
  const int64_t k = qweight.size(0) * kW4TileK, n = qweight.size(1) / 2;
  INFEROPS_CHECK_ARG(qweight.size(1) % (2 * kW4TileN) == 0,
                     "expected `qweight` [K/16, 2N] with N a multiple of 64, got ", qweight.shape_str());
  INFEROPS_CHECK_ARG(k > 0 && n > 0, "expected a non-empty `qweight`, got ", qweight.shape_str());
  INFEROPS_CHECK_ARG(k <= std::numeric_limits<int32_t>::max() && n <= std::numeric_limits<int32_t>::max() / 2,
                     "`qweight` too large: ", qweight.shape_str());
  INFEROPS_CHECK_ARG(group_size > 0 && group_size % kW4TileK == 0 && k % group_size == 0,
                     "expected a group size that is a multiple of 16 and divides K = ", k, ", got ",
                     group_size);
  const int64_t g = k / group_size;
  scales.expect_dtype_in("scales", {DType::kFloat16, DType::kBFloat16});
  scales.expect_shape("scales", {g, n});
  scales.expect_contiguous("scales");
  if (zeros) {
    zeros->expect_dtype("zeros", scales.dtype());
    zeros->expect_shape("zeros", {g, n});
    zeros->expect_contiguous("zeros");
  }
  return {n, k, g};
}

}  // namespace

void w4a16_matmul(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                  const TensorView* zeros, const TensorView* bias, const TensorView& out, int group_size,
                  int splits, std::uintptr_t stream) {
  x.expect_dtype_in("x", {DType::kFloat16, DType::kBFloat16});
  x.expect_ndim("x", 2);
  x.expect_contiguous("x");
  const PackedShape s = check_packed(qweight, scales, zeros, group_size);
  scales.expect_dtype("scales", x.dtype());
  const int64_t m = x.size(0);
  INFEROPS_CHECK_ARG(x.size(1) == s.k, "expected `x` [M, K] with K = ", s.k, " (from `qweight`), got ",
                     x.shape_str());
  INFEROPS_CHECK_ARG(m <= int64_t(65535) * 64, "expected at most ", int64_t(65535) * 64, " rows in `x`, got ", m);
  INFEROPS_CHECK_ARG(is_aligned16(x.data()), "expected a 16-byte aligned `x`");
  if (bias) {
    bias->expect_dtype("bias", x.dtype());
    bias->expect_shape("bias", {s.n});
    bias->expect_contiguous("bias");
  }
  out.expect_dtype("out", x.dtype());
  out.expect_shape("out", {m, s.n});
  out.expect_contiguous("out");
  out.expect_writable("out");
  INFEROPS_CHECK_ARG(splits >= 1 && splits <= kW4MaxSplits && splits <= s.k / kW4TileK,
                     "expected 1 <= splits <= min(", kW4MaxSplits, ", K/16 = ", s.k / kW4TileK, "), got ",
                     splits);
  x.expect_cuda("x");
  for (auto [t, name] : {std::pair{&qweight, "qweight"}, {&scales, "scales"}, {&out, "out"}}) {
    t->expect_same_device(name, x, "x");
  }
  if (zeros) zeros->expect_same_device("zeros", x, "x");
  if (bias) bias->expect_same_device("bias", x, "x");

  W4A16Params p{};
  p.x = x.data();
  p.qweight = qweight.data_as<const uint32_t>();
  p.scales = scales.data();
  p.zeros = zeros ? zeros->data() : nullptr;
  p.bias = bias ? bias->data() : nullptr;
  p.out = out.data();
  p.m = m;
  p.n = static_cast<int32_t>(s.n);
  p.k = static_cast<int32_t>(s.k);
  p.group_size = group_size;
  p.splits = splits;
  INFEROPS_LAUNCH_CUDA("w4a16_matmul", stream, {
    launch_w4a16_matmul(p, x.dtype(), x.device_id(), stream);
  });
}

void int4_dequantize(const TensorView& qweight, const TensorView& scales, const TensorView* zeros,
                     const TensorView& out, int group_size, std::uintptr_t stream) {
  const PackedShape s = check_packed(qweight, scales, zeros, group_size);
  out.expect_dtype("out", scales.dtype());
  out.expect_shape("out", {s.n, s.k});
  out.expect_contiguous("out");
  out.expect_writable("out");
  // The kernel stores (k, k + 1) pairs as one 32-bit word: a 2-byte-offset view would fault.
  INFEROPS_CHECK_ARG(reinterpret_cast<std::uintptr_t>(out.data()) % 4 == 0, "expected a 4-byte aligned `out`");
  qweight.expect_cuda("qweight");
  scales.expect_same_device("scales", qweight, "qweight");
  out.expect_same_device("out", qweight, "qweight");
  if (zeros) zeros->expect_same_device("zeros", qweight, "qweight");

  Int4DequantParams p{};
  p.qweight = qweight.data_as<const uint32_t>();
  p.scales = scales.data();
  p.zeros = zeros ? zeros->data() : nullptr;
  p.out = out.data();
  p.n = static_cast<int32_t>(s.n);
  p.k = static_cast<int32_t>(s.k);
  p.group_size = group_size;
  INFEROPS_LAUNCH_CUDA("int4_dequantize", stream, {
    launch_int4_dequantize(p, scales.dtype(), qweight.device_id(), stream);
  });
}

}  // namespace inferops::quant
