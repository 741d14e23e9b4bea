// Host entries of the MoE kernels: validation and parameter packing (every build).
#include <limits>
#include <vector>

#include "moe.h"

namespace inferops::moe {

void routing_layout(const TensorView& topk_ids, const TensorView& placement,
                    const TensorView& tokens_per_expert, const TensorView& expert_offsets,
                    const TensorView& dst_index, const TensorView& src_index,
                    const TensorView& tokens_per_rank, const TensorView& send_index,
                    const TensorView& send_offsets, const TensorView& errors, int align,
                    std::uintptr_t stream) {
  topk_ids.expect_dtype_in("topk_ids", {DType::kInt32, DType::kInt64});
  topk_ids.expect_ndim("topk_ids", 2);
  topk_ids.expect_last_dim_contiguous("topk_ids");
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1);
  placement.expect_dtype("placement", DType::kInt32);
  placement.expect_ndim("placement", 1);
  placement.expect_contiguous("placement");
  const int64_t E = placement.size(0), R = tokens_per_rank.size(0);
  INFEROPS_CHECK_ARG(E >= 1 && E <= kMaxExperts, "expected 1..", kMaxExperts, " experts, got ", E);
  INFEROPS_CHECK_ARG(R >= 1 && R <= kMaxRanks, "expected 1..", kMaxRanks, " ranks, got ", R);
  INFEROPS_CHECK_ARG(k >= 1 && T * k <= std::numeric_limits<int32_t>::max() / 2,
                     "expected top-k >= 1 and T * k < 2^30, got T = ", T, ", k = ", k);
  INFEROPS_CHECK_ARG(align >= 1 && align <= 1024, "expected 1 <= align <= 1024, got ", align);
  const int64_t capacity = src_index.size(0);
  INFEROPS_CHECK_ARG(capacity <= std::numeric_limits<int32_t>::max(), "capacity too large");
  auto out_index = [](const TensorView& t, const char* name, std::vector<int64_t> shape) {
    t.expect_dtype(name, DType::kInt32);
    t.expect_shape(name, shape);
    t.expect_contiguous(name);
    t.expect_writable(name);
  };
  out_index(tokens_per_expert, "tokens_per_expert", {E});
  out_index(expert_offsets, "expert_offsets", {E + 1});
  out_index(dst_index, "dst_index", {T, k});
  out_index(src_index, "src_index", {capacity});
  out_index(tokens_per_rank, "tokens_per_rank", {R});
  out_index(send_index, "send_index", {T, R});
  out_index(send_offsets, "send_offsets", {R + 1});
  out_index(errors, "errors", {2});
  topk_ids.expect_cuda("topk_ids");
  for (auto [t, name] : {std::pair{&placement, "placement"}, {&tokens_per_expert, "tokens_per_expert"},
                         {&expert_offsets, "expert_offsets"}, {&dst_index, "dst_index"},
                         {&src_index, "src_index"}, {&tokens_per_rank, "tokens_per_rank"},
                         {&send_index, "send_index"}, {&send_offsets, "send_offsets"},
                         {&errors, "errors"}}) {
    t->expect_same_device(name, topk_ids, "topk_ids");
  }
  LayoutParams p{};
  p.topk_ids = topk_ids.data();
  p.ids_int64 = topk_ids.dtype() == DType::kInt64;
  p.placement = placement.data_as<const int32_t>();
  p.tokens_per_expert = tokens_per_expert.data_as<int32_t>();
  p.expert_offsets = expert_offsets.data_as<int32_t>();
  p.dst_index = dst_index.data_as<int32_t>();
  p.src_index = src_index.data_as<int32_t>();
  p.tokens_per_rank = tokens_per_rank.data_as<int32_t>();
  p.send_index = send_index.data_as<int32_t>();
  p.send_offsets = send_offsets.data_as<int32_t>();
  p.errors = errors.data_as<int32_t>();
  p.ids_stride = topk_ids.stride(0);
  p.num_tokens = static_cast<int32_t>(T);
  p.topk = static_cast<int32_t>(k);
  p.num_experts = static_cast<int32_t>(E);
  p.world_size = static_cast<int32_t>(R);
  p.align = align;
  p.capacity = static_cast<int32_t>(capacity);
  INFEROPS_LAUNCH_CUDA("routing_layout", stream, {
    launch_routing_layout(p, topk_ids.device_id(), stream);
  });
}

namespace {

PermuteParams rows_params(const TensorView& x, const TensorView& out, const char* xname) {
  x.expect_dtype_in(xname, {DType::kFloat16, DType::kBFloat16});
  out.expect_dtype("out", x.dtype());
  x.expect_ndim(xname, 2);
  out.expect_ndim("out", 2);
  x.expect_last_dim_contiguous(xname);
  out.expect_contiguous("out");
  out.expect_writable("out");
  INFEROPS_CHECK_ARG(out.size(1) == x.size(1), "expected hidden size ", x.size(1), " for `out`, got ",
                     out.size(1));
  INFEROPS_CHECK_ARG(x.size(0) <= std::numeric_limits<int32_t>::max() &&
                         out.size(0) <= std::numeric_limits<int32_t>::max(),
                     "too many rows");
  // the kernels keep the hidden index in int (v += blockDim.x must not overflow)
  INFEROPS_CHECK_ARG(x.size(1) <= std::numeric_limits<int32_t>::max() / 2, "hidden size too large: ",
                     x.size(1));
  PermuteParams p{};
  p.x = x.data();
  p.out = out.data();
  p.x_stride = x.stride(0);
  p.rows = static_cast<int32_t>(out.size(0));
  p.x_rows = static_cast<int32_t>(x.size(0));
  p.hidden = static_cast<int32_t>(x.size(1));
  return p;
}

}  // namespace

void permute(const TensorView& x, const TensorView& src_index, const TensorView& dst_index, const TensorView& out,
             std::uintptr_t stream) {
  PermuteParams p = rows_params(x, out, "x");
  src_index.expect_dtype("src_index", DType::kInt32);
  src_index.expect_shape("src_index", {out.size(0)});
  src_index.expect_contiguous("src_index");
  dst_index.expect_dtype("dst_index", DType::kInt32);
  dst_index.expect_ndim("dst_index", 2);
  INFEROPS_CHECK_ARG(dst_index.size(0) == x.size(0), "expected `dst_index` with ", x.size(0),
                     " rows (one per row of `x`), got ", dst_index.size(0));
  dst_index.expect_contiguous("dst_index");
  x.expect_cuda("x");
  out.expect_same_device("out", x, "x");
  src_index.expect_same_device("src_index", x, "x");
  dst_index.expect_same_device("dst_index", x, "x");
  p.src_index = src_index.data_as<const int32_t>();
  p.dst_index = dst_index.data_as<const int32_t>();
  p.topk = static_cast<int32_t>(dst_index.size(1));
  p.capacity = static_cast<int32_t>(out.size(0));
  INFEROPS_LAUNCH_CUDA("permute", stream, {
    launch_permute(p, x.dtype(), x.device_id(), stream);
  });
}

void unpermute(const TensorView& y, const TensorView& dst_index, const TensorView& weights,
               const TensorView& out, std::uintptr_t stream) {
  PermuteParams p = rows_params(y, out, "y");
  dst_index.expect_dtype("dst_index", DType::kInt32);
  dst_index.expect_ndim("dst_index", 2);
  dst_index.expect_contiguous("dst_index");
  dst_index.expect_shape("dst_index", {out.size(0), dst_index.size(1)});
  weights.expect_dtype_in("topk_weights", {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  weights.expect_shape("topk_weights", dst_index.sizes());
  weights.expect_contiguous("topk_weights");
  y.expect_cuda("y");
  for (auto [t, name] : {std::pair{&dst_index, "dst_index"}, {&weights, "topk_weights"}, {&out, "out"}}) {
    t->expect_same_device(name, y, "y");
  }
  p.dst_index = dst_index.data_as<const int32_t>();
  p.weights = weights.data();
  p.weights_dtype = weights.dtype();
  p.topk = static_cast<int32_t>(dst_index.size(1));
  p.capacity = static_cast<int32_t>(y.size(0));
  INFEROPS_LAUNCH_CUDA("unpermute", stream, {
    launch_unpermute(p, y.dtype(), y.device_id(), stream);
  });
}

}  // namespace inferops::moe
