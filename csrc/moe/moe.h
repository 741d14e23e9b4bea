// MoE dispatch (ExFlow): routing layout, permute and unpermute.
//
// Routing layout of topk_ids [T, k] (expert ids, int32 or int64) for E experts
// placed on R ranks (placement [E] int32, expert -> rank):
//   tokens_per_expert [E]; expert_offsets [E + 1] (each expert's rows start at
//   a multiple of `align`); dst_index [T, k]: the expert-major row of
//   assignment (t, j), -1 if dropped; src_index [capacity]: the token of each
//   row, -1 for padding; tokens_per_rank [R] (a token is sent once to a rank
//   however many of its experts live there); send_index [T, R]: the token's
//   position in rank r's send block, -1 if not sent; send_offsets [R + 1];
//   errors [2]: {expert ids out of range, assignments over capacity}.
// Order is deterministic: within an expert (and within a rank's block) rows
// follow the token index, then the top-k slot: the layout is a pure function
// of its inputs, and equals the reference exactly.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace inferops::moe {

struct LayoutParams {
  const void* topk_ids;  // [T, k]
  bool ids_int64;
  const int32_t* placement;  // [E] expert -> rank
  int32_t* tokens_per_expert;
  int32_t* expert_offsets;
  int32_t* dst_index;
  int32_t* src_index;
  int32_t* tokens_per_rank;
  int32_t* send_index;
  int32_t* send_offsets;
  int32_t* errors;
  int64_t ids_stride;  // elements between tokens of topk_ids
  int32_t num_tokens;
  int32_t topk;
  int32_t num_experts;
  int32_t world_size;
  int32_t align;
  int32_t capacity;
};

struct PermuteParams {
  const void* x;  // [T, hidden] (permute) or [capacity, hidden] (unpermute input)
  void* out;
  const int32_t* src_index;  // [capacity]
  const int32_t* dst_index;  // [T, k]
  const void* weights;       // [T, k] (unpermute)
  DType weights_dtype;
  int64_t x_stride;
  int32_t rows;    // output rows
  int32_t x_rows;  // rows of x (permute: bound of src_index)
  int32_t hidden;
  int32_t topk;
  int32_t capacity;
};

// E: the Python API documents 1..1024 (148.3 KiB of shared memory at R = 64); the C++ entry
// takes up to kMaxExperts and launch_routing_layout rejects, naming E and R, any E and R whose
// shared memory does not fit the device (about 1,600 experts at R = 64 on sm_90). The bound
// here only keeps the int arithmetic of the shared-memory layout from overflowing.
constexpr int kMaxExperts = 1 << 16;
constexpr int kMaxRanks = 64;

void routing_layout(const TensorView& topk_ids, const TensorView& placement,
                    const TensorView& tokens_per_expert, const TensorView& expert_offsets,
                    const TensorView& dst_index, const TensorView& src_index,
                    const TensorView& tokens_per_rank, const TensorView& send_index,
                    const TensorView& send_offsets, const TensorView& errors, int align,
                    std::uintptr_t stream);
void permute(const TensorView& x, const TensorView& src_index, const TensorView& dst_index, const TensorView& out,
             std::uintptr_t stream);
void unpermute(const TensorView& y, const TensorView& dst_index, const TensorView& weights,
               const TensorView& out, std::uintptr_t stream);

#ifdef INFEROPS_WITH_CUDA
void launch_routing_layout(const LayoutParams& p, int device, std::uintptr_t stream);
void launch_permute(const PermuteParams& p, DType dtype, int device, std::uintptr_t stream);
void launch_unpermute(const PermuteParams& p, DType dtype, int device, std::uintptr_t stream);
#endif

}  // namespace inferops::moe
