// Linear attention (SLAB): kernel parameters and host entries.
//
// SLA (non-causal, vision): q, k, v [B, heads, N, d] (last dim contiguous,
// other strides free); out [B, heads, N, d] contiguous;
//   out = relu(q) (relu(k)^T v) / (relu(q) . sum_j relu(k_j) + 1e-6) + dwc(v),
// dwc a 5x5 depthwise convolution (padding 2, weights [d, 5, 5] shared by all
// heads, bias [d]) of v on the h x w token grid (row-major, h * w == N).
//
// Causal (LLM): q, k [B, T, H, K], v [B, T, H, V] (fla's layout), state
// [num_seqs, H, K, Vs] fp32 with Vs = V, or V + 1 when normalising (the extra
// column carries the key sum). o_t = scale q_t S_t with S_t = S_0 + sum_{j<=t}
// k_j^T v_j, computed chunkwise; optional ReLU feature map on q and k.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace inferops::linear_attention {

struct SlaParams {
  const void* q;
  const void* k;
  const void* v;
  const float* dwc_weight;  // [d, 5, 5] fp32
  const float* dwc_bias;    // [d] fp32 or nullptr
  void* out;                // [B, H, N, d] contiguous
  float* kv;                // workspace [B * H, d, d] fp32
  float* ksum;              // workspace [B * H, d] fp32
  int64_t q_stride[3];      // {batch, head, token} in elements
  int64_t k_stride[3];
  int64_t v_stride[3];
  int32_t batch;
  int32_t heads;
  int32_t n;
  int32_t d;
  int32_t h;
  int32_t w;
};

struct CausalParams {
  const void* q;  // [B, T, H, K]
  const void* k;
  const void* v;  // [B, T, H, V]
  void* o;        // [B, T, H, V] contiguous
  const float* initial_state;  // [num_seqs, H, K, Vs] or nullptr
  float* final_state;          // [num_seqs, H, K, Vs] or nullptr
  const int32_t* cu_seqlens;   // [num_seqs + 1] or nullptr (then num_seqs = B, each of length T)
  int64_t q_stride[3];         // {batch, token, head}
  int64_t k_stride[3];
  int64_t v_stride[3];
  int32_t batch;
  int32_t seq_len;  // T
  int32_t num_seqs;
  int32_t heads;
  int32_t key_dim;    // K
  int32_t value_dim;  // V
  float scale;
  bool normalize;
  bool use_relu;
};

// Head dims with compiled linear-attention kernels.
constexpr int kMaxSlaDim = 128;
constexpr int kMaxKeyDim = 128;

void simplified_linear_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const TensorView& dwc_weight, const TensorView* dwc_bias,
                                 const TensorView& out, const TensorView& kv_ws,
                                 const TensorView& ksum_ws, int h, int w, std::uintptr_t stream);

void causal_linear_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& o, const TensorView* initial_state,
                             const TensorView* final_state, const TensorView* cu_seqlens,
                             float scale, bool normalize, bool use_relu, std::uintptr_t stream);

// One token per sequence: q, k [B, H, K], v [B, H, V], state [B, H, K, Vs] updated in place.
void linear_attention_step(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& state, const TensorView& o, float scale,
                           bool normalize, bool use_relu, std::uintptr_t stream);

#ifdef INFEROPS_WITH_CUDA
void launch_sla(const SlaParams& p, DType dtype, int device, std::uintptr_t stream);
void launch_causal(const CausalParams& p, DType dtype, int device, std::uintptr_t stream);
void launch_step(const CausalParams& p, DType dtype, int device, std::uintptr_t stream);
#endif

}  // namespace inferops::linear_attention
