// Host entries of the paged-KV ops: argument validation and parameter packing.
// Compiled in every build so bad arguments raise the same Python exceptions
// whether or not CUDA code was built. Index *values* (page ids, positions,
// lengths) live on the device; the Python layer checks them before launching,
// and the kernels never access memory outside the cache whatever they hold.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "paged_kv.h"

namespace inferops::attention {

namespace {

// Layout and dtype of the K/V page pools; writable only where the op writes them.
void check_cache(const TensorView& k_cache, const TensorView& v_cache, bool writable) {
  k_cache.expect_dtype_in("k_cache", {DType::kFloat16, DType::kBFloat16});
  v_cache.expect_dtype("v_cache", k_cache.dtype());
  k_cache.expect_ndim("k_cache", 4);
  v_cache.expect_shape("v_cache", k_cache.sizes());
  k_cache.expect_contiguous("k_cache");
  v_cache.expect_contiguous("v_cache");
  INFEROPS_CHECK_ARG(k_cache.size(0) <= std::numeric_limits<int32_t>::max(),
                     "expected at most 2^31 - 1 pages in `k_cache`, got ", k_cache.size(0));
  if (writable) {
    k_cache.expect_writable("k_cache");
    v_cache.expect_writable("v_cache");
  }
}

void check_index(const TensorView& t, const char* name, int ndim) {
  t.expect_dtype(name, DType::kInt32);
  t.expect_ndim(name, ndim);
  t.expect_last_dim_contiguous(name);
}

bool aligned16(const TensorView& t) { return reinterpret_cast<std::uintptr_t>(t.data()) % 16 == 0; }

}  // namespace

void append_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
               const TensorView& v, const TensorView& block_tables, const TensorView& seq_ids,
               const TensorView& positions, std::uintptr_t stream) {
  check_cache(k_cache, v_cache, /*writable=*/true);
  k.expect_dtype("k", k_cache.dtype());
  v.expect_dtype("v", k_cache.dtype());
  k.expect_ndim("k", 3);
  const int64_t n = k.size(0), hkv = k_cache.size(2), d = k_cache.size(3);
  k.expect_shape("k", {n, hkv, d});
  v.expect_shape("v", {n, hkv, d});
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}}) {
    INFEROPS_CHECK_ARG(t->stride(2) == 1 && t->stride(1) == d, "expected `", name,
                       "` contiguous in its last two dims (a token's heads back to back)");
  }
  check_index(block_tables, "block_tables", 2);
  check_index(seq_ids, "seq_ids", 1);
  check_index(positions, "positions", 1);
  seq_ids.expect_shape("seq_ids", {n});
  positions.expect_shape("positions", {n});
  INFEROPS_CHECK_ARG(block_tables.size(1) * k_cache.size(1) <= std::numeric_limits<int32_t>::max(),
                     "block_tables width x page_size exceeds 2^31 - 1 tokens");

  k_cache.expect_cuda("k_cache");
  for (auto [t, name] : {std::pair{&v_cache, "v_cache"}, {&k, "k"}, {&v, "v"},
                         {&block_tables, "block_tables"}, {&seq_ids, "seq_ids"},
                         {&positions, "positions"}}) {
    t->expect_same_device(name, k_cache, "k_cache");
  }

  AppendKvParams p{};
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.k = k.data();
  p.v = v.data();
  p.block_tables = block_tables.data_as<const int32_t>();
  p.seq_ids = seq_ids.data_as<const int32_t>();
  p.positions = positions.data_as<const int32_t>();
  p.k_stride = k.stride(0);
  p.v_stride = v.stride(0);
  p.bt_stride = block_tables.stride(0);
  p.num_tokens = n;
  p.batch = static_cast<int32_t>(block_tables.size(0));
  p.max_pages = static_cast<int32_t>(block_tables.size(1));
  p.num_pages = static_cast<int32_t>(k_cache.size(0));
  p.page_size = static_cast<int32_t>(k_cache.size(1));
  p.num_kv_heads = static_cast<int32_t>(hkv);
  p.head_dim = static_cast<int32_t>(d);
  INFEROPS_LAUNCH_CUDA("append_kv", stream, {
    launch_append_kv(p, k_cache.dtype(), k_cache.device_id(), stream);
  });
}

namespace {

// Validates what every decode over the paged cache needs (dtypes, shapes,
// alignment, devices) and fills the parameters shared by paged_decode and
// prefix_shared_decode; the split fields are left to the caller.
PagedDecodeParams decode_params(const TensorView& q, const TensorView& k_cache,
                                const TensorView& v_cache, const TensorView& block_tables,
                                const TensorView& seq_lens, const TensorView& out,
                                const TensorView& lse, float scale) {
  check_cache(k_cache, v_cache, /*writable=*/false);
  q.expect_dtype("q", k_cache.dtype());
  out.expect_dtype("out", q.dtype());
  lse.expect_dtype("lse", DType::kFloat32);
  q.expect_ndim("q", 3);
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = k_cache.size(2);
  INFEROPS_CHECK_ARG(d == k_cache.size(3), "expected head_dim ", k_cache.size(3),
                     " (the cache's) for `q`, got ", d);
  INFEROPS_CHECK_ARG(d == 64 || d == 128, "expected head_dim 64 or 128 for `q`, got ", d);
  INFEROPS_CHECK_ARG(hkv > 0 && hq % hkv == 0, "expected num_q_heads (", hq,
                     ") to be a multiple of num_kv_heads (", hkv, ")");
  INFEROPS_CHECK_ARG(hq / hkv * (d / 8) <= 1024, "GQA group of ", hq / hkv,
                     " query heads per kv head is too large for head_dim ", d);
  INFEROPS_CHECK_ARG(batch <= 65535, "expected batch <= 65535, got ", batch);
  INFEROPS_CHECK_ARG(hkv <= 65535, "expected num_kv_heads <= 65535, got ", hkv);  // grid.y
  out.expect_shape("out", {batch, hq, d});
  lse.expect_shape("lse", {batch, hq});
  lse.expect_contiguous("lse");
  for (auto [t, name] : {std::pair{&q, "q"}, {&out, "out"}}) {
    INFEROPS_CHECK_ARG(t->stride(2) == 1 && t->stride(0) % 8 == 0 && t->stride(1) % 8 == 0 &&
                           aligned16(*t),
                       "expected `", name, "` 16-byte aligned rows (last dim contiguous, strides "
                       "multiples of 8, aligned base)");
  }
  check_index(block_tables, "block_tables", 2);
  check_index(seq_lens, "seq_lens", 1);
  block_tables.expect_shape("block_tables", {batch, block_tables.size(1)});
  seq_lens.expect_shape("seq_lens", {batch});
  const int64_t max_len = block_tables.size(1) * k_cache.size(1);
  INFEROPS_CHECK_ARG(max_len <= std::numeric_limits<int32_t>::max(),
                     "block_tables width x page_size exceeds 2^31 - 1 tokens");
  INFEROPS_CHECK_ARG(aligned16(k_cache) && aligned16(v_cache),
                     "expected 16-byte aligned `k_cache` and `v_cache`");
  out.expect_writable("out");
  lse.expect_writable("lse");

  q.expect_cuda("q");
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                         {&block_tables, "block_tables"}, {&seq_lens, "seq_lens"},
                         {&out, "out"}, {&lse, "lse"}}) {
    t->expect_same_device(name, q, "q");
  }

  PagedDecodeParams p{};
  p.q = q.data();
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.block_tables = block_tables.data_as<const int32_t>();
  p.seq_lens = seq_lens.data_as<const int32_t>();
  p.out = out.data();
  p.lse = lse.data_as<float>();
  p.q_stride[0] = q.stride(0);
  p.q_stride[1] = q.stride(1);
  p.out_stride[0] = out.stride(0);
  p.out_stride[1] = out.stride(1);
  p.bt_stride = block_tables.stride(0);
  p.batch = static_cast<int32_t>(batch);
  p.num_q_heads = static_cast<int32_t>(hq);
  p.num_kv_heads = static_cast<int32_t>(hkv);
  p.head_dim = static_cast<int32_t>(d);
  p.page_size = static_cast<int32_t>(k_cache.size(1));
  p.num_pages = static_cast<int32_t>(k_cache.size(0));
  p.max_pages = static_cast<int32_t>(block_tables.size(1));
  p.scale = scale;
  return p;
}

void check_partials(const TensorView& partial_out, const TensorView& partial_lse, int64_t splits,
                    const TensorView& q) {
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  partial_out.expect_dtype("partial_out", DType::kFloat32);
  partial_lse.expect_dtype("partial_lse", DType::kFloat32);
  partial_out.expect_shape("partial_out", {splits, batch, hq, d});
  partial_lse.expect_shape("partial_lse", {splits, batch, hq});
  partial_out.expect_contiguous("partial_out");
  partial_lse.expect_contiguous("partial_lse");
  partial_out.expect_writable("partial_out");
  partial_lse.expect_writable("partial_lse");
  // The decode kernel stores and MergeSplitsKernel loads partial_out as float4.
  INFEROPS_CHECK_ARG(aligned16(partial_out), "expected a 16-byte aligned `partial_out`");
  partial_out.expect_same_device("partial_out", q, "q");
  partial_lse.expect_same_device("partial_lse", q, "q");
}

}  // namespace

void paged_decode(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                  const TensorView& block_tables, const TensorView& seq_lens,
                  const TensorView& out, const TensorView& lse, const TensorView& partial_out,
                  const TensorView& partial_lse, int num_splits, float scale,
                  std::uintptr_t stream) {
  INFEROPS_CHECK_ARG(num_splits >= 1 && num_splits <= 65535, "expected 1 <= num_splits <= 65535, got ",
                     num_splits);
  PagedDecodeParams p =
      decode_params(q, k_cache, v_cache, block_tables, seq_lens, out, lse, scale);
  if (num_splits > 1) {
    check_partials(partial_out, partial_lse, num_splits, q);
    p.partial_out = partial_out.data_as<float>();
    p.partial_lse = partial_lse.data_as<float>();
  }
  p.num_splits = num_splits;
  const int64_t max_len = int64_t(p.max_pages) * p.page_size;
  const int64_t tiles = (max_len + kDecodeTileTokens - 1) / kDecodeTileTokens;
  // Clamped to int32: only a single split over a table of >= 2^31 - 15 tokens
  // reaches the clamp, and INT32_MAX still covers every token there.
  const int64_t tokens_per_split = (tiles + num_splits - 1) / num_splits * kDecodeTileTokens;
  p.tokens_per_split = static_cast<int32_t>(
      std::min<int64_t>(tokens_per_split, std::numeric_limits<int32_t>::max()));
  INFEROPS_LAUNCH_CUDA("paged_decode", stream, {
    launch_paged_decode(p, q.dtype(), q.device_id(), stream);
  });
}

void prefix_shared_decode(const TensorView& q, const TensorView& k_cache,
                          const TensorView& v_cache, const TensorView& block_tables,
                          const TensorView& seq_lens, const TensorView& shared_lens,
                          const TensorView& group_indptr, const TensorView& group_page_indptr,
                          const TensorView& group_pages, const TensorView& work,
                          const TensorView& out, const TensorView& lse,
                          const TensorView& partial_out, const TensorView& partial_lse,
                          int shared_splits, int suffix_splits, int suffix_tokens_per_split,
                          float scale, std::uintptr_t stream) {
  INFEROPS_CHECK_ARG(shared_splits >= 1 && suffix_splits >= 1 &&
                         shared_splits + suffix_splits <= 65535,
                     "expected shared_splits, suffix_splits >= 1 (sum <= 65535), got ",
                     shared_splits, ", ", suffix_splits);
  INFEROPS_CHECK_ARG(
      suffix_tokens_per_split >= 1 && suffix_tokens_per_split % kDecodeTileTokens == 0,
      "expected suffix_tokens_per_split a positive multiple of ", kDecodeTileTokens, ", got ",
      suffix_tokens_per_split);
  PagedDecodeParams dp =
      decode_params(q, k_cache, v_cache, block_tables, seq_lens, out, lse, scale);
  const int total = shared_splits + suffix_splits;
  check_partials(partial_out, partial_lse, total, q);
  for (auto [t, name] : {std::pair{&shared_lens, "shared_lens"}, {&group_indptr, "group_indptr"},
                         {&group_page_indptr, "group_page_indptr"}, {&group_pages, "group_pages"}}) {
    check_index(*t, name, 1);
    t->expect_contiguous(name);
    t->expect_same_device(name, q, "q");
  }
  shared_lens.expect_shape("shared_lens", {q.size(0)});
  group_page_indptr.expect_shape("group_page_indptr", {group_indptr.size(0)});
  check_index(work, "work", 2);
  work.expect_shape("work", {work.size(0), 2});
  work.expect_contiguous("work");
  work.expect_same_device("work", q, "q");
  INFEROPS_CHECK_ARG(work.size(0) <= std::numeric_limits<int32_t>::max(), "too many work items");
  INFEROPS_CHECK_ARG(group_indptr.size(0) >= 1 &&
                         group_indptr.size(0) <= std::numeric_limits<int32_t>::max(),
                     "expected `group_indptr` of length num_groups + 1 >= 1");
  // The kernel counts shared keys in int32 (plus one 64-key tile of slack).
  INFEROPS_CHECK_ARG(group_pages.size(0) * k_cache.size(1) <= std::numeric_limits<int32_t>::max() - 64,
                     "group_pages x page_size exceeds 2^31 - 65 tokens");
  // The shared kernel writes partial_out with 16-byte float4 stores.
  INFEROPS_CHECK_ARG(aligned16(partial_out), "expected 16-byte aligned `partial_out`");
  partial_out.expect_writable("partial_out");
  partial_lse.expect_writable("partial_lse");

  SharedPrefixParams sp{};
  sp.q = dp.q;
  sp.k_cache = dp.k_cache;
  sp.v_cache = dp.v_cache;
  sp.group_indptr = group_indptr.data_as<const int32_t>();
  sp.group_page_indptr = group_page_indptr.data_as<const int32_t>();
  sp.group_pages = group_pages.data_as<const int32_t>();
  sp.work = work.data_as<const int32_t>();
  sp.partial_out = partial_out.data_as<float>();
  sp.partial_lse = partial_lse.data_as<float>();
  sp.q_stride[0] = dp.q_stride[0];
  sp.q_stride[1] = dp.q_stride[1];
  sp.num_work = static_cast<int32_t>(work.size(0));
  sp.num_groups = static_cast<int32_t>(group_indptr.size(0) - 1);
  sp.num_group_pages = static_cast<int32_t>(group_pages.size(0));
  sp.batch = dp.batch;
  sp.num_q_heads = dp.num_q_heads;
  sp.num_kv_heads = dp.num_kv_heads;
  sp.head_dim = dp.head_dim;
  sp.page_size = dp.page_size;
  sp.num_pages = dp.num_pages;
  sp.num_splits = shared_splits;
  sp.scale = scale;

  // Suffix: tokens [shared_len, seq_len) of each request, into the partial
  // slots after the shared ones.
  const int64_t slot = int64_t(dp.batch) * dp.num_q_heads;
  dp.kv_start = shared_lens.data_as<const int32_t>();
  dp.partial_out = sp.partial_out + int64_t(shared_splits) * slot * dp.head_dim;
  dp.partial_lse = sp.partial_lse + int64_t(shared_splits) * slot;
  dp.num_splits = suffix_splits;
  dp.tokens_per_split = suffix_tokens_per_split;

  PagedDecodeParams merge = dp;  // all partials -> out / lse
  merge.partial_out = sp.partial_out;
  merge.partial_lse = sp.partial_lse;
  merge.num_splits = total;
  INFEROPS_LAUNCH_CUDA("prefix_shared_decode", stream, {
    launch_shared_prefix(sp, q.dtype(), q.device_id(), stream);
    launch_paged_decode(dp, q.dtype(), q.device_id(), stream, /*merge=*/false);
    launch_merge_splits(merge, q.dtype(), q.device_id(), stream);
  });
}

}  // namespace inferops::attention
