// Shared-prefix attention for prefix_shared_decode (BatchLLM): the queries of
// every request in a group, for all query heads of one kv head, attend to the
// group's shared prefix in one pass, so each shared K/V byte is read once per
// group instead of once per request.
//
// Work: grid (num_work, num_kv_heads, num_splits). A work item is a group and
// a tile of kSharedRows = 64 query rows (row = member * G + head-in-group);
// split s takes an even share of the group's shared keys, in 64-key tiles.
// A block is 4 warps; warp w owns query rows [16w, 16w + 16).
//
// Per key tile (FlashAttention-2 style, tensor cores through WMMA 16x16x16,
// fp32 accumulation):
//   S = Q K^T             (wmma, to shared memory, fp32)
//   online softmax        (each row by 2 lanes of its warp; exp2 domain)
//   O = O * alpha + P V   (O kept in shared memory, fp32: WMMA does not
//                          expose which accumulator element is which row, so
//                          the per-row rescale happens on the shared copy)
// K/V tiles are gathered page by page with cp.async, two stages deep.
// Output: fp32 partial state (O / l, natural-log LSE) per row and split; the
// suffix decode and the merge (paged_decode.cu) complete the result.
//
// Shared memory (head_dim 128): Q 17 KiB, K and V 2 x 17 KiB each, S 17 KiB,
// P 9 KiB, O 33 KiB: 144 KiB, one block per SM. Rows are padded (+8 halves,
// +4 floats) against bank conflicts; every WMMA pointer stays 32-byte aligned.
#include <mma.h>

#include <cmath>

#include "common/kernel_launch.cuh"
#include "common/cp_async.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "paged_kv.h"
#include "partial_layout.cuh"

namespace inferops::attention {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kRows = kSharedRows;  // query rows per block
constexpr int kKeys = 64;           // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 2;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T, int kHeadDim>
struct SharedLayout {
  static constexpr int kLdQK = kHeadDim + 8;  // halves
  static constexpr int kLdS = kKeys + 4;      // floats
  static constexpr int kLdP = kKeys + 8;      // halves
  static constexpr int kLdO = kHeadDim + 4;   // floats
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kRows * kLdQK * int(sizeof(T));
  static constexpr int kV = kK + kStages * kKeys * kLdQK * int(sizeof(T));
  static constexpr int kS = kV + kStages * kKeys * kLdQK * int(sizeof(T));
  static constexpr int kP = kS + kRows * kLdS * 4;
  static constexpr int kO = kP + kRows * kLdP * int(sizeof(T));
  static constexpr int kBytes = kO + kRows * kLdO * 4;
  static_assert(kK % 128 == 0 && kV % 128 == 0 && kS % 128 == 0 && kP % 128 == 0 && kO % 128 == 0,
                "shared-memory regions must stay aligned");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 1) SharedPrefixKernel(const __grid_constant__ SharedPrefixParams p) {
  using L = SharedLayout<T, kHeadDim>;
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  INFEROPS_DYNAMIC_SMEM(unsigned char, smem, 128);
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  T* v_s = reinterpret_cast<T*>(smem + L::kV);
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  T* p_s = reinterpret_cast<T*>(smem + L::kP);
  float* o_s = reinterpret_cast<float*>(smem + L::kO);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = p.work[2 * blockIdx.x], row0 = p.work[2 * blockIdx.x + 1];
  const int kv_head = blockIdx.y, split = blockIdx.z;
  const int G = p.num_q_heads / p.num_kv_heads;
  // Bad metadata (raw binding) must not turn into out-of-bounds accesses:
  // skip unknown groups, clamp requests to the batch and pages to group_pages
  // (the whole block returns together, before any barrier).
  if (group < 0 || group >= p.num_groups || row0 < 0) return;
  const int first = p.group_indptr[group];
  const int page0 = p.group_page_indptr[group];
  if (first < 0 || page0 < 0) return;
  const int rows = max(0, min(p.group_indptr[group + 1], p.batch) - first) * G;  // query rows
  const int shared_len = max(0, min(p.group_page_indptr[group + 1], p.num_group_pages) - page0) *
                         p.page_size;  // <= 2^31 - 1 - kKeys (host check)
  const int tiles_total = (shared_len + kKeys - 1) / kKeys;
  const int tiles_per_split = (tiles_total + p.num_splits - 1) / p.num_splits;
  const int tile_begin = split * tiles_per_split;
  const int tile_end = min(tiles_total, tile_begin + tiles_per_split);
  const int num_tiles = max(0, tile_end - tile_begin);

  // Q tile (zeros past the group's last row), and O = 0.
  for (int c = tid; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, chunk = c % kChunks;
    Vec<T, 8> v;
    const int row = row0 + r;
    if (row < rows) {
      const int64_t b = first + row / G;
      const int h = kv_head * G + row % G;
      v.load(static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + chunk * 8);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v.v[i] = from_float<T>(0.f);
    }
    *reinterpret_cast<Vec<T, 8>*>(q_s + r * L::kLdQK + chunk * 8) = v;
  }
  for (int i = tid; i < kRows * L::kLdO; i += kThreads) o_s[i] = 0.f;

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  auto load_tile = [&](int t) {  // t: tile index within this split
    const int stage = t % kStages;
    const int key0 = (tile_begin + t) * kKeys;
    for (int c = tid; c < kKeys * kChunks; c += kThreads) {
      const int j = c / kChunks, chunk = c % kChunks;
      const int key = key0 + j;
      const int dst = (stage * kKeys + j) * L::kLdQK + chunk * 8;
      const int32_t page = key < shared_len ? p.group_pages[page0 + key / p.page_size] : -1;
      if (page < 0 || page >= p.num_pages) {
        // Past the prefix (or a bad page id): zeros, because P V multiplies
        // these rows by P = 0 and 0 * (stale NaN) would poison O.
        *reinterpret_cast<uint4*>(k_s + dst) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(v_s + dst) = make_uint4(0, 0, 0, 0);
        continue;
      }
      const int64_t off =
          ((int64_t(page) * p.page_size + key % p.page_size) * p.num_kv_heads + kv_head) * kHeadDim +
          chunk * 8;
      cp_async_16(k_s + dst, k_cache + off);
      cp_async_16(v_s + dst, v_cache + off);
    }
  };

  // Row state: lanes 2r and 2r+1 of warp w hold row 16w + r (same values).
  const int my_row = warp * 16 + lane / 2;
  const int half = lane % 2;  // which 32 columns of S / half of O this lane handles
  float m = -INFINITY, l = 0.f;
  const float qk_scale = p.scale * kLog2e;

  if (num_tiles > 0) load_tile(0);
  cp_async_commit();
  for (int t = 0; t < num_tiles; ++t) {
    if (t + 1 < num_tiles) load_tile(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int stage = t % kStages;
    const T* kt = k_s + stage * kKeys * L::kLdQK;
    const T* vt = v_s + stage * kKeys * L::kLdQK;

    // S[16 rows of this warp][64 keys] = Q K^T
    for (int j = 0; j < kKeys / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K^T
        wmma::load_matrix_sync(a, q_s + warp * 16 * L::kLdQK + kk * 16, L::kLdQK);
        wmma::load_matrix_sync(b, kt + j * 16 * L::kLdQK + kk * 16, L::kLdQK);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s_s + warp * 16 * L::kLdS + j * 16, acc, L::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax on this lane's 32 columns of its row.
    // Each lane walks its 32 columns starting at its own offset `skew`: rows are kLdS = 4 mod
    // 32 words apart, so in-order walks put 4 lanes in each bank (4-way conflicts, executor
    // metrics); skewed, lane l reads bank l + c at step c.
    const int skew = (lane - 4 * (lane / 2)) & 31;
    const int valid = min(kKeys, shared_len - (tile_begin + t) * kKeys);
    const float* srow = s_s + my_row * L::kLdS + half * 32;
    float tmax = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int col = (c + skew) & 31;
      if (half * 32 + col < valid) tmax = fmaxf(tmax, srow[col] * qk_scale);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    const float m_new = fmaxf(m, tmax);
    const float alpha = m == -INFINITY ? 0.f : exp2f(m - m_new);
    float psum = 0.f;
    T* prow = p_s + my_row * L::kLdP + half * 32;
    for (int c = 0; c < 32; ++c) {
      const int col = (c + skew) & 31;
      const float pr = half * 32 + col < valid ? exp2f(srow[col] * qk_scale - m_new) : 0.f;
      psum += pr;
      prow[col] = from_float<T>(pr);
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    l = l * alpha + psum;
    m = m_new;
    float* orow = o_s + my_row * L::kLdO + half * (kHeadDim / 2);
    for (int c = 0; c < kHeadDim / 2; ++c) orow[(c + skew) % (kHeadDim / 2)] *= alpha;  // kLdO = 4 mod 32 too
    __syncwarp();

    // O[16 rows][head_dim] += P V
    for (int d = 0; d < kHeadDim / 16; ++d) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* otile = o_s + warp * 16 * L::kLdO + d * 16;
      wmma::load_matrix_sync(acc, otile, L::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, p_s + warp * 16 * L::kLdP + kk * 16, L::kLdP);
        wmma::load_matrix_sync(b, vt + kk * 16 * L::kLdQK + d * 16, L::kLdQK);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(otile, acc, L::kLdO, wmma::mem_row_major);
    }
    __syncthreads();  // this stage's K/V are reloaded two tiles later
  }
  cp_async_wait<0>();
  __syncwarp();

  // Write this split's partial state for the valid rows: the warp's 16 rows one at a time,
  // each as one contiguous run of stores (a lane per row half storing 16 bytes at a time put
  // 32 rows in each request: 2x the minimum sectors, executor metrics). Row r's m and l are
  // those of lanes 2 r and 2 r + 1.
  if (num_tiles == 0) return;  // no keys: partial_lse keeps its -inf
  constexpr int kPer = kHeadDim / 32;  // floats per lane and row
  for (int r = 0; r < 16; ++r) {
    const float m_r = __shfl_sync(0xffffffffu, m, 2 * r), l_r = __shfl_sync(0xffffffffu, l, 2 * r);
    const int row = row0 + warp * 16 + r;
    if (row >= rows) break;  // uniform over the warp
    const int64_t b = first + row / G;
    const int h = kv_head * G + row % G;
    const int64_t out_row = (int64_t(split) * p.batch + b) * p.num_q_heads + h;
    const bool empty = l_r == 0.f;
    const float inv = empty ? 0.f : 1.f / l_r;
    Vec<float, kPer> w;
    w.load(o_s + (warp * 16 + r) * L::kLdO + kPer * lane);
#pragma unroll
    for (int i = 0; i < kPer; ++i) w.v[i] *= inv;
    w.store(p.partial_out + out_row * kHeadDim + partial_position(kPer * lane, kHeadDim));
    if (lane == 0) p.partial_lse[out_row] = empty ? -INFINITY : (m_r + log2f(l_r)) * kLn2;
  }
}

template <typename T, int kHeadDim>
void launch_typed(const SharedPrefixParams& p, int device, cudaStream_t stream) {
  using L = SharedLayout<T, kHeadDim>;
  auto kernel = SharedPrefixKernel<T, kHeadDim>;
  set_dynamic_smem(kernel, L::kBytes, device);
  const dim3 grid(p.num_work, p.num_kv_heads, p.num_splits);
  launch_kernel(kernel, grid, kThreads, L::kBytes, stream, p);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_shared_prefix(const SharedPrefixParams& p, DType dtype, int device,
                          std::uintptr_t stream) {
  if (p.num_work == 0) return;
  DeviceGuard guard(device);
  dispatch_half(dtype, "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(p.head_dim, "q", [&](auto hd) {
      launch_typed<T, decltype(hd)::value>(p, device, as_stream(stream));
    });
  });
}

}  // namespace inferops::attention
