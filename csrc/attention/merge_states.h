// merge_states: log-sum-exp merge of two partial attention results.
//
// Given two attention outputs over disjoint key sets A and B, with their
// natural-log softmax denominators lse_a = log(sum_{j in A} exp(s_j)) and
// lse_b, the output over A u B is
//     m     = max(lse_a, lse_b)
//     w_a   = exp(lse_a - m),  w_b = exp(lse_b - m)
//     v     = (w_a * v_a + w_b * v_b) / (w_a + w_b)
//     lse   = m + log(w_a + w_b)
// An empty partial has lse = -inf and weight 0; when both are empty the
// output is v = 0, lse = -inf (no NaN). Used by prefix-shared attention
// (shared prefix + per-request suffix), split-KV decode and attention split
// across devices.
//
// Layout: v_* [num_tokens, num_heads, head_dim], last dim contiguous, token and
// head strides arbitrary; lse_* [num_tokens, num_heads] fp32, any strides.
// In place: v_out/lse_out may alias v_a/lse_a (see the kernel for why this is safe).
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace inferops::attention {

struct MergeStatesParams {
  const void* v_a;
  const void* v_b;
  void* v_out;
  const float* lse_a;
  const float* lse_b;
  float* lse_out;
  int64_t num_tokens;
  int64_t num_heads;
  int64_t head_dim;
  // Element strides {token, head}; the last dim of every v has stride 1.
  int64_t v_a_stride[2];
  int64_t v_b_stride[2];
  int64_t v_out_stride[2];
  int64_t lse_a_stride[2];
  int64_t lse_b_stride[2];
  int64_t lse_out_stride[2];
};

// Validates the views (dtype, shape, device, strides, writability) and
// launches on `stream`. Throws inferops::ValueError/TypeError on bad input.
void merge_states(const TensorView& v_a, const TensorView& lse_a, const TensorView& v_b,
                  const TensorView& lse_b, const TensorView& v_out, const TensorView& lse_out,
                  std::uintptr_t stream);

#ifdef INFEROPS_WITH_CUDA
// Raw launcher (merge_states.cu): `dtype` is the dtype of every v tensor.
void launch_merge_states(const MergeStatesParams& p, DType dtype, int device,
                         std::uintptr_t stream);
#endif

}  // namespace inferops::attention
