// Host entries of the paged-KV ops: argument validation and parameter packing.
// Compiled in every build so bad arguments raise the same Python exceptions
// whether or not CUDA code was built. Index *values* (page ids, positions,
// lengths) live on the device; the Python layer checks them before launching,
// and the kernels never access memory outside the cache whatever they hold.
#include <cstdint>
#include <limits>

#include "paged_kv.h"

namespace inferops::attention {

namespace {

void check_cache(const TensorView& k_cache, const TensorView& v_cache) {
  k_cache.expect_dtype_in("k_cache", {DType::kFloat16, DType::kBFloat16});
  v_cache.expect_dtype("v_cache", k_cache.dtype());
  k_cache.expect_ndim("k_cache", 4);
  v_cache.expect_shape("v_cache", k_cache.sizes());
  k_cache.expect_contiguous("k_cache");
  v_cache.expect_contiguous("v_cache");
  INFEROPS_CHECK_ARG(k_cache.size(0) <= std::numeric_limits<int32_t>::max(),
                     "expected at most 2^31 - 1 pages in `k_cache`, got ", k_cache.size(0));
  v_cache.expect_writable("v_cache");
  k_cache.expect_writable("k_cache");
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
  check_cache(k_cache, v_cache);
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
#ifdef INFEROPS_WITH_CUDA
  launch_append_kv(p, k_cache.dtype(), k_cache.device_id(), stream);
#else
  (void)stream;
  INFEROPS_CHECK(false, "inferops was built without CUDA: append_kv has no CUDA kernel");
#endif
}

void paged_decode(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                  const TensorView& block_tables, const TensorView& seq_lens,
                  const TensorView& out, const TensorView& lse, const TensorView& partial_out,
                  const TensorView& partial_lse, int num_splits, float scale,
                  std::uintptr_t stream) {
  k_cache.expect_dtype_in("k_cache", {DType::kFloat16, DType::kBFloat16});
  v_cache.expect_dtype("v_cache", k_cache.dtype());
  k_cache.expect_ndim("k_cache", 4);
  v_cache.expect_shape("v_cache", k_cache.sizes());
  k_cache.expect_contiguous("k_cache");
  v_cache.expect_contiguous("v_cache");
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
  INFEROPS_CHECK_ARG(num_splits >= 1 && num_splits <= 65535, "expected 1 <= num_splits <= 65535, got ",
                     num_splits);
  if (num_splits > 1) {
    partial_out.expect_dtype("partial_out", DType::kFloat32);
    partial_lse.expect_dtype("partial_lse", DType::kFloat32);
    partial_out.expect_shape("partial_out", {num_splits, batch, hq, d});
    partial_lse.expect_shape("partial_lse", {num_splits, batch, hq});
    partial_out.expect_contiguous("partial_out");
    partial_lse.expect_contiguous("partial_lse");
  }
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
  if (num_splits > 1) {
    partial_out.expect_same_device("partial_out", q, "q");
    partial_lse.expect_same_device("partial_lse", q, "q");
  }

  PagedDecodeParams p{};
  p.q = q.data();
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.block_tables = block_tables.data_as<const int32_t>();
  p.seq_lens = seq_lens.data_as<const int32_t>();
  p.out = out.data();
  p.lse = lse.data_as<float>();
  p.partial_out = num_splits > 1 ? partial_out.data_as<float>() : nullptr;
  p.partial_lse = num_splits > 1 ? partial_lse.data_as<float>() : nullptr;
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
  p.num_splits = num_splits;
  const int64_t tiles = (max_len + kDecodeTileTokens - 1) / kDecodeTileTokens;
  p.tokens_per_split =
      static_cast<int32_t>((tiles + num_splits - 1) / num_splits * kDecodeTileTokens);
  p.scale = scale;
#ifdef INFEROPS_WITH_CUDA
  launch_paged_decode(p, q.dtype(), q.device_id(), stream);
#else
  (void)stream;
  INFEROPS_CHECK(false, "inferops was built without CUDA: paged_decode has no CUDA kernel");
#endif
}

}  // namespace inferops::attention
