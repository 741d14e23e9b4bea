// Paged KV cache: parameters of the kernels that read and write it.
//
// Cache layout (one tensor for K, one for V, same shape):
//     [num_pages, page_size, num_kv_heads, head_dim]   fp16 or bf16, contiguous
// Token `pos` of a sequence lives in page block_table[pos / page_size], slot
// pos % page_size; one slot holds num_kv_heads * head_dim contiguous elements.
// Page ids and block tables are int32; every element offset is computed in
// 64 bits (a cache easily exceeds 2^31 elements).
//
// Index safety: the Python layer validates page ids, positions and lengths
// before launching (unless the caller opts out for CUDA-graph capture). The
// kernels re-check every page id against num_pages and skip what is out of
// range, so bad metadata can give wrong numbers but never an out-of-bounds
// access.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace inferops::attention {

struct AppendKvParams {
  void* k_cache;  // [num_pages, page_size, num_kv_heads, head_dim]
  void* v_cache;
  const void* k;  // [num_tokens, num_kv_heads, head_dim], last two dims contiguous
  const void* v;
  const int32_t* block_tables;  // [batch, max_pages]
  const int32_t* seq_ids;       // [num_tokens]: row of block_tables
  const int32_t* positions;     // [num_tokens]: position within that sequence
  int64_t k_stride;             // elements between tokens of k
  int64_t v_stride;
  int64_t bt_stride;            // elements between rows of block_tables
  int64_t num_tokens;
  int32_t batch;
  int32_t max_pages;
  int32_t num_pages;
  int32_t page_size;
  int32_t num_kv_heads;
  int32_t head_dim;
};

struct PagedDecodeParams {
  const void* q;        // [batch, num_q_heads, head_dim]
  const void* k_cache;  // [num_pages, page_size, num_kv_heads, head_dim]
  const void* v_cache;
  const int32_t* block_tables;  // [batch, max_pages]
  const int32_t* seq_lens;      // [batch]
  const int32_t* kv_start;      // [batch] first token to attend to, or nullptr (0)
  void* out;                    // [batch, num_q_heads, head_dim], q's dtype
  float* lse;                   // [batch, num_q_heads], natural log of sum exp(scale * q.k)
  float* partial_out;           // [num_splits, batch, num_q_heads, head_dim] (num_splits > 1)
  float* partial_lse;           // [num_splits, batch, num_q_heads]
  int64_t q_stride[2];          // {batch, head} in elements; last dim contiguous
  int64_t out_stride[2];
  int64_t bt_stride;
  int32_t batch;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t page_size;
  int32_t num_pages;
  int32_t max_pages;
  int32_t num_splits;
  int32_t tokens_per_split;  // multiple of the kernel's tile (or INT32_MAX); split s covers
                             // [kv_start + s*t, kv_start + (s+1)*t)
  float scale;               // softmax scale applied to q.k
};

// Shared-prefix attention (prefix_shared.cu): for each work item (a group and
// a tile of kSharedRows query rows; row = member * G + head-in-group), the
// attention of all those queries to the group's shared prefix, computed once
// with tensor cores. Writes fp32 partial states for kv split s into
// partial_out[s] / partial_lse[s] (layout of PagedDecodeParams' partials);
// rows of requests without a shared prefix are not touched.
struct SharedPrefixParams {
  const void* q;                   // [batch, num_q_heads, head_dim], plan order
  const void* k_cache;
  const void* v_cache;
  const int32_t* group_indptr;     // [num_groups + 1] over requests
  const int32_t* group_page_indptr;// [num_groups + 1] over group_pages
  const int32_t* group_pages;      // physical page ids, root first
  const int32_t* work;             // [num_work, 2]: (group, first row)
  float* partial_out;              // [num_splits, batch, num_q_heads, head_dim]
  float* partial_lse;              // [num_splits, batch, num_q_heads]
  int64_t q_stride[2];
  int32_t num_work;
  int32_t num_groups;              // group_indptr.size(0) - 1: work items naming others are skipped
  int32_t num_group_pages;         // group_pages.size(0): indptr entries are clamped to it
  int32_t batch;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t page_size;
  int32_t num_pages;
  int32_t num_splits;
  float scale;
};

// Query rows per shared-prefix block (4 warps x 16 rows of tensor-core tiles).
constexpr int kSharedRows = 64;

// Host entries (paged_op.cpp): validate views, pack params, launch.
void append_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
               const TensorView& v, const TensorView& block_tables, const TensorView& seq_ids,
               const TensorView& positions, std::uintptr_t stream);

// partial_out/partial_lse may be empty views (0 elements) when num_splits == 1.
void paged_decode(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                  const TensorView& block_tables, const TensorView& seq_lens,
                  const TensorView& out, const TensorView& lse, const TensorView& partial_out,
                  const TensorView& partial_lse, int num_splits, float scale,
                  std::uintptr_t stream);

// prefix_shared_decode: shared-prefix attention (shared_splits partials), the
// per-request suffix decode from kv_start = shared_lens (suffix_splits
// partials, suffix_tokens_per_split each) and one merge of all partials.
// partial_lse[:shared_splits] must hold -inf on entry (rows without a shared
// prefix are never written by the shared kernel).
void prefix_shared_decode(const TensorView& q, const TensorView& k_cache,
                          const TensorView& v_cache, const TensorView& block_tables,
                          const TensorView& seq_lens, const TensorView& shared_lens,
                          const TensorView& group_indptr, const TensorView& group_page_indptr,
                          const TensorView& group_pages, const TensorView& work,
                          const TensorView& out, const TensorView& lse,
                          const TensorView& partial_out, const TensorView& partial_lse,
                          int shared_splits, int suffix_splits, int suffix_tokens_per_split,
                          float scale, std::uintptr_t stream);

// Tokens per tile of the decode kernel: split sizes are multiples of it.
constexpr int kDecodeTileTokens = 16;

#ifdef INFEROPS_WITH_CUDA
void launch_append_kv(const AppendKvParams& p, DType dtype, int device, std::uintptr_t stream);
// Runs the decode kernel and, when p.num_splits > 1 and merge is true, the
// split merge (with merge false the fp32 partials are left for the caller).
void launch_paged_decode(const PagedDecodeParams& p, DType dtype, int device,
                         std::uintptr_t stream, bool merge = true);
// Merges p.num_splits fp32 partials into p.out / p.lse.
void launch_merge_splits(const PagedDecodeParams& p, DType dtype, int device,
                         std::uintptr_t stream);
void launch_shared_prefix(const SharedPrefixParams& p, DType dtype, int device,
                          std::uintptr_t stream);
#endif

}  // namespace inferops::attention
