// Host entry of the fused GEMM + reduce-scatter: validation and parameter
// packing. Compiled in every build, so bad arguments raise the same way with or
// without CUDA, and always before anything is launched.
#include <limits>

#include "tp.h"

namespace inferops::tp {

namespace {

bool is_aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

void gemm_reduce_scatter(const TensorView& a, const TensorView& b, const TensorView& out,
                         const TensorView& peers, const TensorView& state, int rank, int world,
                         int64_t max_m, int64_t n_max, int64_t buffer_bytes, double timeout_s,
                         int num_blocks, std::uintptr_t stream) {
  INFEROPS_CHECK_ARG(world >= 1 && world <= kMaxWorld, "expected world size 1..", kMaxWorld, ", got ",
                     world);
  INFEROPS_CHECK_ARG(rank >= 0 && rank < world, "expected rank in [0, ", world, "), got ", rank);
  a.expect_dtype_in("a", {DType::kFloat16, DType::kBFloat16});
  b.expect_dtype("b", a.dtype());
  out.expect_dtype("out", a.dtype());
  a.expect_ndim("a", 2);
  b.expect_ndim("b", 2);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  INFEROPS_CHECK_ARG(b.size(0) == K, "expected `b` of shape [K, N] with K = ", K,
                     " (a.shape[1]), got ", b.shape_str());
  INFEROPS_CHECK_ARG(M % world == 0, "expected a.shape[0] (M = ", M, ") divisible by the world size ",
                     world);
  INFEROPS_CHECK_ARG(K % 8 == 0 && N % 8 == 0, "expected K and N multiples of 8 (16-byte rows), got K = ",
                     K, ", N = ", N);
  INFEROPS_CHECK_ARG(M <= max_m && N <= n_max, "shape M = ", M, ", N = ", N,
                     " exceeds the buffers (max_m = ", max_m, ", n = ", n_max, ")");
  INFEROPS_CHECK_ARG(M <= std::numeric_limits<int32_t>::max() && K <= std::numeric_limits<int32_t>::max() &&
                         N <= std::numeric_limits<int32_t>::max(),
                     "dimensions must fit in int32");
  out.expect_shape("out", {M / world, N});
  out.expect_contiguous("out");
  out.expect_writable("out");
  INFEROPS_CHECK_ARG(a.stride(1) == 1 || K == 1, "expected `a` contiguous in its last dim, got strides [",
                     a.stride(0), ", ", a.stride(1), "]");
  const bool b_kn = b.stride(1) == 1;
  INFEROPS_CHECK_ARG(b_kn || b.stride(0) == 1,
                     "expected `b` [K, N] with one unit stride (row-major, or the transpose of a "
                     "row-major [N, K] weight), got strides [", b.stride(0), ", ", b.stride(1), "]");
  const int64_t lda = a.stride(0), ldb = b_kn ? b.stride(0) : b.stride(1);
  const int elem = a.element_size();
  INFEROPS_CHECK_ARG(lda % 8 == 0 && ldb % 8 == 0 && is_aligned16(a.data()) && is_aligned16(b.data()) &&
                         is_aligned16(out.data()),
                     "expected 16-byte aligned `a`, `b`, `out` with row strides multiple of 8 elements");
  const BufferLayout lay = buffer_layout(max_m, n_max, world, elem);
  // One rank writes `out` directly and touches no buffer.
  INFEROPS_CHECK_ARG(world == 1 || buffer_bytes >= lay.total_bytes, "symmetric buffer of ", buffer_bytes,
                     " bytes is smaller than the ", lay.total_bytes, " bytes needed for max_m = ", max_m,
                     ", n = ", n_max, ", world ", world);
  peers.expect_dtype("peers", DType::kInt64);
  peers.expect_shape("peers", {world});
  peers.expect_contiguous("peers");
  state.expect_dtype("state", DType::kInt32);
  state.expect_shape("state", {kStateWords});
  state.expect_contiguous("state");
  state.expect_writable("state");
  INFEROPS_CHECK_ARG(timeout_s > 0, "expected timeout_s > 0, got ", timeout_s);
  INFEROPS_CHECK_ARG(num_blocks >= 0, "expected num_blocks >= 0, got ", num_blocks);
  a.expect_cuda("a");
  for (auto [t, name] : {std::pair{&b, "b"}, {&out, "out"}, {&peers, "peers"}, {&state, "state"}}) {
    t->expect_same_device(name, a, "a");
  }

  GemmRsParams p{};
  p.a = a.data();
  p.b = b.data();
  p.out = out.data();
  p.peers = peers.data_as<const int64_t>();
  p.state = state.data_as<int32_t>();
  p.lda = lda;
  p.ldb = ldb;
  p.slot_elems = lay.slot_elems;
  p.flags_offset = lay.flags_offset;
  p.done_offset = lay.done_offset;
  p.max_tiles = lay.max_tiles;
  // inf (or anything past 2^64 ns, ~584 years) means no timeout: a plain cast of such a
  // double is undefined and gives 0 on x86-64, i.e. every wait would give up at once.
  const double timeout_ns = timeout_s * 1e9;
  p.timeout_ns = timeout_ns >= 0x1p64 ? std::numeric_limits<uint64_t>::max()
                                    : static_cast<uint64_t>(timeout_ns);
  p.m = static_cast<int32_t>(M);
  p.n = static_cast<int32_t>(N);
  p.k = static_cast<int32_t>(K);
  p.m_local = static_cast<int32_t>(M / world);
  p.rank = rank;
  p.world = world;
  p.b_kn = b_kn;
  INFEROPS_LAUNCH_CUDA("gemm_reduce_scatter", stream, {
    launch_gemm_rs(p, a.dtype(), a.device_id(), num_blocks, stream);
  });
}

}  // namespace inferops::tp
