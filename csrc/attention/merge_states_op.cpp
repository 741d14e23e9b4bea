// merge_states host entry: argument validation and parameter packing.
// Compiled in every build (host-only too), so bad arguments raise the same
// Python exceptions whether or not CUDA code was built.
#include "merge_states.h"

namespace inferops::attention {

void merge_states(const TensorView& v_a, const TensorView& lse_a, const TensorView& v_b,
                  const TensorView& lse_b, const TensorView& v_out, const TensorView& lse_out,
                  std::uintptr_t stream) {
  // dtype and shape first (they can be checked on any device), then devices.
  v_a.expect_dtype_in("v_a", {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  v_b.expect_dtype("v_b", v_a.dtype());
  v_out.expect_dtype("v_out", v_a.dtype());
  lse_a.expect_dtype("lse_a", DType::kFloat32);
  lse_b.expect_dtype("lse_b", DType::kFloat32);
  lse_out.expect_dtype("lse_out", DType::kFloat32);

  v_a.expect_ndim("v_a", 3);
  const std::vector<int64_t> v_shape = v_a.sizes();
  const std::vector<int64_t> lse_shape = {v_shape[0], v_shape[1]};
  v_b.expect_shape("v_b", v_shape);
  v_out.expect_shape("v_out", v_shape);
  lse_a.expect_shape("lse_a", lse_shape);
  lse_b.expect_shape("lse_b", lse_shape);
  lse_out.expect_shape("lse_out", lse_shape);

  for (auto [t, name] : {std::pair{&v_a, "v_a"}, {&v_b, "v_b"}, {&v_out, "v_out"}}) {
    t->expect_last_dim_contiguous(name);
  }
  v_out.expect_writable("v_out");
  lse_out.expect_writable("lse_out");

  v_a.expect_cuda("v_a");
  v_b.expect_same_device("v_b", v_a, "v_a");
  v_out.expect_same_device("v_out", v_a, "v_a");
  lse_a.expect_same_device("lse_a", v_a, "v_a");
  lse_b.expect_same_device("lse_b", v_a, "v_a");
  lse_out.expect_same_device("lse_out", v_a, "v_a");

  MergeStatesParams p{};
  p.v_a = v_a.data();
  p.v_b = v_b.data();
  p.v_out = v_out.data();
  p.lse_a = lse_a.data_as<const float>();
  p.lse_b = lse_b.data_as<const float>();
  p.lse_out = lse_out.data_as<float>();
  p.num_tokens = v_shape[0];
  p.num_heads = v_shape[1];
  p.head_dim = v_shape[2];
  auto strides2 = [](const TensorView& t, int64_t* out) {
    out[0] = t.stride(0);
    out[1] = t.stride(1);
  };
  strides2(v_a, p.v_a_stride);
  strides2(v_b, p.v_b_stride);
  strides2(v_out, p.v_out_stride);
  strides2(lse_a, p.lse_a_stride);
  strides2(lse_b, p.lse_b_stride);
  strides2(lse_out, p.lse_out_stride);

  INFEROPS_LAUNCH_CUDA("merge_states", stream, {
    launch_merge_states(p, v_a.dtype(), v_a.device_id(), stream);
  });
}

}  // namespace inferops::attention
