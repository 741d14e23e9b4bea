// Host entries of the linear-attention ops: validation and parameter packing.
// Compiled in every build, so bad arguments raise the same way with or
// without CUDA.
#include <limits>

#include "linear_attention.h"

namespace inferops::linear_attention {

namespace {

void copy_strides3(const TensorView& t, int64_t* out) {
  out[0] = t.stride(0);
  out[1] = t.stride(1);
  out[2] = t.stride(2);
}

void check_state(const TensorView& s, const char* name, int64_t n, int64_t h, int64_t k, int64_t vs) {
  s.expect_dtype(name, DType::kFloat32);
  s.expect_shape(name, {n, h, k, vs});
  s.expect_contiguous(name);
}

}  // namespace

void simplified_linear_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const TensorView& dwc_weight, const TensorView* dwc_bias,
                                 const TensorView& out, const TensorView& kv_ws,
                                 const TensorView& ksum_ws, int h, int w, std::uintptr_t stream) {
  q.expect_dtype_in("q", {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  k.expect_dtype("k", q.dtype());
  v.expect_dtype("v", q.dtype());
  out.expect_dtype("out", q.dtype());
  q.expect_ndim("q", 4);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  k.expect_shape("k", q.sizes());
  v.expect_shape("v", q.sizes());
  out.expect_shape("out", q.sizes());
  out.expect_contiguous("out");
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) t->expect_last_dim_contiguous(name);
  INFEROPS_CHECK_ARG(d == 32 || d == 64 || d == 128, "expected head dim 32, 64 or 128 for `q`, got ", d);
  INFEROPS_CHECK_ARG(int64_t(h) * w == N && h > 0 && w > 0, "expected hw = (h, w) with h * w == N = ", N,
                     ", got (", h, ", ", w, ")");
  INFEROPS_CHECK_ARG(N <= std::numeric_limits<int32_t>::max() && B * H <= std::numeric_limits<int32_t>::max(),
                     "too many tokens or heads for `q`");
  // The output kernel's grid.y is one block per 32 tokens (limit 65535).
  INFEROPS_CHECK_ARG((N + 31) / 32 <= 65535, "expected at most ", int64_t(65535) * 32, " tokens for `q`, got ", N);
  dwc_weight.expect_dtype("dwc_weight", DType::kFloat32);
  dwc_weight.expect_shape("dwc_weight", {d, 1, 5, 5});
  dwc_weight.expect_contiguous("dwc_weight");
  if (dwc_bias) {
    dwc_bias->expect_dtype("dwc_bias", DType::kFloat32);
    dwc_bias->expect_shape("dwc_bias", {d});
    dwc_bias->expect_contiguous("dwc_bias");
  }
  kv_ws.expect_dtype("kv_workspace", DType::kFloat32);
  kv_ws.expect_shape("kv_workspace", {B * H, d, d});
  kv_ws.expect_contiguous("kv_workspace");
  ksum_ws.expect_dtype("ksum_workspace", DType::kFloat32);
  ksum_ws.expect_shape("ksum_workspace", {B * H, d});
  ksum_ws.expect_contiguous("ksum_workspace");
  q.expect_cuda("q");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&out, "out"}, {&dwc_weight, "dwc_weight"},
                         {&kv_ws, "kv_workspace"}, {&ksum_ws, "ksum_workspace"}}) {
    t->expect_same_device(name, q, "q");
  }
  if (dwc_bias) dwc_bias->expect_same_device("dwc_bias", q, "q");

  SlaParams p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.dwc_weight = dwc_weight.data_as<const float>();
  p.dwc_bias = dwc_bias ? dwc_bias->data_as<const float>() : nullptr;
  p.out = out.data();
  p.kv = kv_ws.data_as<float>();
  p.ksum = ksum_ws.data_as<float>();
  copy_strides3(q, p.q_stride);
  copy_strides3(k, p.k_stride);
  copy_strides3(v, p.v_stride);
  p.batch = static_cast<int32_t>(B);
  p.heads = static_cast<int32_t>(H);
  p.n = static_cast<int32_t>(N);
  p.d = static_cast<int32_t>(d);
  p.h = h;
  p.w = w;
  INFEROPS_LAUNCH_CUDA("simplified_linear_attention", stream, {
    launch_sla(p, q.dtype(), q.device_id(), stream);
  });
}

void causal_linear_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& o, const TensorView* initial_state,
                             const TensorView* final_state, const TensorView* cu_seqlens,
                             float scale, bool normalize, bool use_relu, std::uintptr_t stream) {
  q.expect_dtype_in("q", {DType::kFloat16, DType::kBFloat16});
  k.expect_dtype("k", q.dtype());
  v.expect_dtype("v", q.dtype());
  o.expect_dtype("o", q.dtype());
  q.expect_ndim("q", 4);
  v.expect_ndim("v", 4);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  k.expect_shape("k", q.sizes());
  v.expect_shape("v", {B, T, H, V});
  o.expect_shape("o", {B, T, H, V});
  o.expect_contiguous("o");
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) t->expect_last_dim_contiguous(name);
  INFEROPS_CHECK_ARG(K == 32 || K == 64 || K == 128, "expected key dim 32, 64 or 128 for `q`, got ", K);
  INFEROPS_CHECK_ARG(V >= 1, "expected a value dim >= 1 for `v`, got ", V);
  INFEROPS_CHECK_ARG(T <= std::numeric_limits<int32_t>::max() / 2, "sequence too long");
  int64_t num_seqs = B;
  if (cu_seqlens) {
    cu_seqlens->expect_dtype("cu_seqlens", DType::kInt32);
    cu_seqlens->expect_ndim("cu_seqlens", 1);
    cu_seqlens->expect_contiguous("cu_seqlens");
    INFEROPS_CHECK_ARG(B == 1, "expected batch 1 for `q` with cu_seqlens (sequences packed along T), got ", B);
    num_seqs = cu_seqlens->size(0) - 1;
    INFEROPS_CHECK_ARG(num_seqs >= 0, "expected 1..65536 entries in `cu_seqlens`");
  }
  // One block row per sequence in grid.z (limit 65535), with or without cu_seqlens.
  INFEROPS_CHECK_ARG(num_seqs <= 65535, "expected at most 65535 sequences (batch, or entries of `cu_seqlens` - 1), got ",
                     num_seqs);
  INFEROPS_CHECK_ARG(H <= 65535, "expected at most 65535 heads");
  const int64_t Vs = normalize ? V + 1 : V;
  if (initial_state) check_state(*initial_state, "initial_state", num_seqs, H, K, Vs);
  if (final_state) check_state(*final_state, "final_state", num_seqs, H, K, Vs);
  // In place is not supported: with normalize every value-tile block reads the key-sum
  // column of initial_state at its start, while block 0 writes it to final_state at its end.
  INFEROPS_CHECK_ARG(!initial_state || !final_state || initial_state->data() != final_state->data(),
                     "expected `final_state` not to alias `initial_state`");
  q.expect_cuda("q");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&o, "o"}}) t->expect_same_device(name, q, "q");
  if (initial_state) initial_state->expect_same_device("initial_state", q, "q");
  if (final_state) final_state->expect_same_device("final_state", q, "q");
  if (cu_seqlens) cu_seqlens->expect_same_device("cu_seqlens", q, "q");

  CausalParams p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.data();
  p.initial_state = initial_state ? initial_state->data_as<const float>() : nullptr;
  p.final_state = final_state ? final_state->data_as<float>() : nullptr;
  p.cu_seqlens = cu_seqlens ? cu_seqlens->data_as<const int32_t>() : nullptr;
  copy_strides3(q, p.q_stride);
  copy_strides3(k, p.k_stride);
  copy_strides3(v, p.v_stride);
  p.batch = static_cast<int32_t>(B);
  p.seq_len = static_cast<int32_t>(T);
  p.num_seqs = static_cast<int32_t>(num_seqs);
  p.heads = static_cast<int32_t>(H);
  p.key_dim = static_cast<int32_t>(K);
  p.value_dim = static_cast<int32_t>(V);
  p.scale = scale;
  p.normalize = normalize;
  p.use_relu = use_relu;
  INFEROPS_LAUNCH_CUDA("causal_linear_attention", stream, {
    launch_causal(p, q.dtype(), q.device_id(), stream);
  });
}

void linear_attention_step(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& state, const TensorView& o, float scale,
                           bool normalize, bool use_relu, std::uintptr_t stream) {
  q.expect_dtype_in("q", {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  k.expect_dtype("k", q.dtype());
  v.expect_dtype("v", q.dtype());
  o.expect_dtype("o", q.dtype());
  q.expect_ndim("q", 3);
  v.expect_ndim("v", 3);
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  k.expect_shape("k", q.sizes());
  v.expect_shape("v", {B, H, V});
  o.expect_shape("o", {B, H, V});
  o.expect_contiguous("o");
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) t->expect_last_dim_contiguous(name);
  INFEROPS_CHECK_ARG(K >= 1 && K <= 1024, "expected key dim 1..1024 for `q`, got ", K);
  INFEROPS_CHECK_ARG(V >= 1 && V + 1 <= 1024, "expected value dim 1..1023 for `v`, got ", V);
  check_state(state, "state", B, H, K, normalize ? V + 1 : V);
  state.expect_writable("state");
  q.expect_cuda("q");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&o, "o"}, {&state, "state"}}) {
    t->expect_same_device(name, q, "q");
  }
  CausalParams p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.data();
  p.final_state = state.data_as<float>();
  p.q_stride[0] = q.stride(0);
  p.q_stride[2] = q.stride(1);
  p.k_stride[0] = k.stride(0);
  p.k_stride[2] = k.stride(1);
  p.v_stride[0] = v.stride(0);
  p.v_stride[2] = v.stride(1);
  p.batch = static_cast<int32_t>(B);
  p.num_seqs = static_cast<int32_t>(B);
  p.heads = static_cast<int32_t>(H);
  p.key_dim = static_cast<int32_t>(K);
  p.value_dim = static_cast<int32_t>(V);
  p.scale = scale;
  p.normalize = normalize;
  p.use_relu = use_relu;
  INFEROPS_LAUNCH_CUDA("linear_attention_step", stream, {
    launch_step(p, q.dtype(), q.device_id(), stream);
  });
}

}  // namespace inferops::linear_attention
