// paged_decode: one query token per sequence against its paged KV cache,
// split-KV for long sequences, GQA.
//
// Grid (num_splits, num_kv_heads, batch): a block owns one kv head of one
// sequence over one split of its tokens and serves all G = Hq / Hkv query
// heads of that kv head, so each K/V byte is read from HBM once per block.
// Block (kBdx, G, bdz): kBdx = head_dim / 8 threads hold 8 contiguous dims
// each (16 bytes of fp16/bf16), threadIdx.y is the query head within the
// group, threadIdx.z picks every bdz-th token of a tile.
//
// Pipeline: tiles of kTile tokens of K and V are copied into shared memory
// with cp.async, kStages deep, so HBM reads of later tiles overlap the math
// on the current one. Scores use exp2 with q pre-scaled by scale * log2(e);
// each thread keeps an online softmax (running max, sum, 8 accumulators) and
// rescales only when the max grows. At the end the bdz partial states of a
// query head are merged through shared memory.
//
// Output: without partial buffers (one split), out (q's dtype) and lse
// (natural log of sum_j exp(scale * q.k_j)); with them, fp32 partials per
// split that MergeSplitsKernel combines (the same LSE merge as merge_states).
// kv_start (prefix-shared decode) makes a sequence attend to tokens
// [kv_start, seq_len) only: its suffix after the shared prefix.
// An empty sequence (seq_len 0) gives out = 0, lse = -inf.
//
// Bytes: 2 * seq_len * head_dim * sizeof(T) per (sequence, kv head) plus q/out;
// FLOPs: 4 * G * head_dim per token: memory bound for G <= ~64 on Hopper, so
// CUDA-core FMAs suffice here (the prefix-shared kernel, with many queries
// per KV byte, is the one that needs tensor cores).
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

constexpr int kVec = 8;  // fp16/bf16 elements per 16-byte access
constexpr int kTile = kDecodeTileTokens;
constexpr int kStages = 4;
constexpr int kTargetThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Dynamic shared memory, one definition for the kernel's carve-up and the launch size:
// the K / V stages [kStages][kTile][kHeadDim] each, later reused by the merge of the bdz
// partial states [bdz][G][red_stride] fp32 (acc [kHeadDim] dimension-interleaved, m, l).
template <typename T, int kHeadDim>
constexpr int stage_elems() {
  return kStages * kTile * kHeadDim;  // of K, then as many of V
}
template <typename T, int kHeadDim>
constexpr int stage_smem_bytes() {
  return stage_elems<T, kHeadDim>() * int(sizeof(T)) * 2;  // K and V
}
// kHeadDim + kHeadDim / kVec floats (>= the + 2 of m and l): rows g of one warp then start
// kHeadDim / kVec banks apart, so the interleaved rows of a warp fill disjoint banks.
template <int kHeadDim>
constexpr int red_stride() {
  return kHeadDim + kHeadDim / kVec;
}
template <int kHeadDim>
constexpr int red_smem_bytes(int bdz, int G) {
  return bdz > 1 ? bdz * G * red_stride<kHeadDim>() * 4 : 0;
}

// Page offset (in elements) of token `tok` of a sequence, or -1 when its page
// id is out of range (validated metadata never hits this).
__device__ __forceinline__ int64_t token_offset(const PagedDecodeParams& p, const int32_t* bt,
                                                int tok, int kv_head) {
  const int32_t page = bt[tok / p.page_size];
  if (page < 0 || page >= p.num_pages) return -1;
  return ((int64_t(page) * p.page_size + tok % p.page_size) * p.num_kv_heads + kv_head) *
         p.head_dim;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(1024) PagedDecodeKernel(const __grid_constant__ PagedDecodeParams p) {
  constexpr int kBdx = kHeadDim / kVec;
  const int tx = threadIdx.x, g = threadIdx.y, tz = threadIdx.z;
  const int G = blockDim.y, bdz = blockDim.z;
  const int tid = tx + kBdx * (g + G * tz);
  const int nthreads = kBdx * G * bdz;
  const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
  const int q_head = kv_head * G + g;

  const int max_len = p.max_pages * p.page_size;
  const int seq_len = min(max(p.seq_lens[b], 0), max_len);
  const int start = p.kv_start ? min(max(p.kv_start[b], 0), seq_len) : 0;
  // 64-bit: start + split * tokens_per_split exceeds 2^31 for the last splits
  // of a block table near the 2^31-token limit; begin fits in int whenever the
  // split is non-empty (begin < end <= seq_len).
  const int64_t begin64 = start + int64_t(split) * p.tokens_per_split;
  const int end = int(min(int64_t(seq_len), begin64 + p.tokens_per_split));
  const int num_tiles = end > begin64 ? (end - int(begin64) + kTile - 1) / kTile : 0;
  const int begin = num_tiles > 0 ? int(begin64) : 0;
  const int32_t* bt = p.block_tables + int64_t(b) * p.bt_stride;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);

  INFEROPS_DYNAMIC_SMEM(uint4, smem_raw, 16);
  T* k_smem = reinterpret_cast<T*>(smem_raw);     // [kStages][kTile][kHeadDim]
  T* v_smem = k_smem + stage_elems<T, kHeadDim>();  // [kStages][kTile][kHeadDim]

  // q row, pre-scaled so that exp2(s) = exp(scale * q.k).
  float q[kVec];
  {
    Vec<T, kVec> qv;
    qv.load(static_cast<const T*>(p.q) + int64_t(b) * p.q_stride[0] + int64_t(q_head) * p.q_stride[1] +
            tx * kVec);
#pragma unroll
    for (int i = 0; i < kVec; ++i) q[i] = to_float(qv.v[i]) * (p.scale * kLog2e);
  }

  // Each thread copies K and V chunk `c` of token c / kBdx of every tile it loads.
  auto load_tile = [&](int tile) {
    const int stage = tile % kStages;
    const int t0 = begin + tile * kTile;
    for (int c = tid; c < kTile * kBdx; c += nthreads) {
      const int j = c / kBdx, chunk = c % kBdx;
      const int tok = t0 + j;
      if (tok >= end) continue;
      const int64_t off = token_offset(p, bt, tok, kv_head);
      if (off < 0) continue;
      const int dst = (stage * kTile + j) * kHeadDim + chunk * kVec;
      cp_async_16(k_smem + dst, k_cache + off + chunk * kVec);
      cp_async_16(v_smem + dst, v_cache + off + chunk * kVec);
    }
  };

  // Prologue: kStages - 1 tiles in flight. Every thread commits one group per
  // step (possibly empty) so the wait counts line up.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s);
    cp_async_commit();
  }

  float m = -INFINITY;  // running max of the scores seen (log2 domain)
  float l = 0.f;
  float acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
  // Shuffles run over every existing lane of the warp (the loop below is
  // uniform); the last warp is partial when the block is not a multiple of 32
  // threads (e.g. G = 7), so name only its existing lanes.
  const int warp_lanes = min(32, nthreads - (tid & ~31));
  const unsigned row_lanes = warp_lanes == 32 ? 0xffffffffu : (1u << warp_lanes) - 1u;

  for (int tile = 0; tile < num_tiles; ++tile) {
    if (tile + kStages - 1 < num_tiles) load_tile(tile + kStages - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();

    const int stage = tile % kStages;
    const int n = min(kTile, end - (begin + tile * kTile));
    const T* ks = k_smem + stage * kTile * kHeadDim + tx * kVec;
    const T* vs = v_smem + stage * kTile * kHeadDim + tx * kVec;
    // Uniform trip count across the block: the shuffles below need every
    // lane of the warp, and a warp may hold several tz rows (head_dim 64).
    for (int j0 = 0; j0 < n; j0 += bdz) {
      const int j = j0 + tz;
      const bool valid = j < n;
      float s = 0.f;
      if (valid) {
        Vec<T, kVec> kv;
        kv = *reinterpret_cast<const Vec<T, kVec>*>(ks + j * kHeadDim);
#pragma unroll
        for (int i = 0; i < kVec; ++i) s += q[i] * to_float(kv.v[i]);
      }
#pragma unroll
      for (int off = kBdx / 2; off > 0; off >>= 1) s += __shfl_xor_sync(row_lanes, s, off);
      if (valid) {
        if (s > m) {  // rescale only when the running max grows
          const float corr = exp2f(m - s);
          l *= corr;
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[i] *= corr;
          m = s;
        }
        const float pr = exp2f(s - m);  // NaN scores propagate through pr
        l += pr;
        Vec<T, kVec> vv;
        vv = *reinterpret_cast<const Vec<T, kVec>*>(vs + j * kHeadDim);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += pr * to_float(vv.v[i]);
      }
    }
    __syncthreads();  // stage `stage` is reloaded kStages - 1 tiles later
  }
  cp_async_wait<0>();

  // Merge the bdz partial states of each query head (shared memory reused).
  const bool empty_state = l == 0.f;
  if (bdz > 1) {
    __syncthreads();
    constexpr int kRs = red_stride<kHeadDim>();
    float* red = reinterpret_cast<float*>(smem_raw);  // [bdz][G][kRs]: red_smem_bytes
    float* mine = red + (tz * G + g) * kRs;
    // Dimension tx * kVec + i is stored at i * kBdx + tx: for each i the row's lanes write
    // consecutive words (tx * kVec + i put them 8 words apart: 4-way bank conflicts).
#pragma unroll
    for (int i = 0; i < kVec; ++i) mine[i * kBdx + tx] = acc[i];
    if (tx == 0) {
      mine[kHeadDim] = empty_state ? -INFINITY : m;
      mine[kHeadDim + 1] = l;
    }
    __syncthreads();
    if (tz != 0) return;
    float M = -INFINITY;
    for (int z = 0; z < bdz; ++z) M = fmaxf(M, red[(z * G + g) * kRs + kHeadDim]);
    l = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
    for (int z = 0; z < bdz; ++z) {
      const float* st = red + (z * G + g) * kRs;
      const float mz = st[kHeadDim];
      const float w = mz == -INFINITY ? 0.f : exp2f(mz - M);
      l += w * st[kHeadDim + 1];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] += w * st[i * kBdx + tx];
    }
    m = M;
  } else if (empty_state) {
    m = -INFINITY;
  }

  const bool empty = l == 0.f;  // no tokens in this split
  const float inv = empty ? 0.f : 1.f / l;
  const float lse = empty ? -INFINITY : (m + log2f(l)) * kLn2;
  if (p.partial_out == nullptr) {  // single split: final output directly
    Vec<T, kVec> o;
#pragma unroll
    for (int i = 0; i < kVec; ++i) o.v[i] = from_float<T>(acc[i] * inv);
    o.store(static_cast<T*>(p.out) + int64_t(b) * p.out_stride[0] + int64_t(q_head) * p.out_stride[1] +
            tx * kVec);
    if (tx == 0) p.lse[int64_t(b) * p.num_q_heads + q_head] = lse;
  } else {
    const int64_t row = (int64_t(split) * p.batch + b) * p.num_q_heads + q_head;
    // In halves (partial_layout.cuh): each of the two 16-byte stores of a row's lanes is
    // one contiguous run.
    float* o = p.partial_out + row * kHeadDim;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      Vec<float, 4> w;
#pragma unroll
      for (int i = 0; i < 4; ++i) w.v[i] = acc[4 * h + i] * inv;
      w.store(o + partial_position(tx * kVec + 4 * h, kHeadDim));
    }
    if (tx == 0) p.partial_lse[row] = lse;
  }
}

// Combines num_splits fp32 partial states per (sequence, q head). One row per
// head_dim / 4 threads (float4 reads of the partials).
template <typename T>
__global__ void __launch_bounds__(128) MergeSplitsKernel(const __grid_constant__ PagedDecodeParams p) {
  const int lanes = p.head_dim / 4;
  const int rows_per_block = blockDim.x / lanes;
  const int64_t rows = int64_t(p.batch) * p.num_q_heads;
  const int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;
  if (threadIdx.x >= rows_per_block * lanes || row >= rows) return;
  float M = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) M = fmaxf(M, p.partial_lse[s * rows + row]);
  float W = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = 0; s < p.num_splits; ++s) {
    const float ls = p.partial_lse[s * rows + row];
    if (ls == -INFINITY) continue;  // empty split: its out may be unwritten memory
    const float w = expf(ls - M);
    const float4 v = *reinterpret_cast<const float4*>(p.partial_out + (s * rows + row) * p.head_dim + lane * 4);
    W += w;
    acc.x += w * v.x;
    acc.y += w * v.y;
    acc.z += w * v.z;
    acc.w += w * v.w;
  }
  const float inv = W == 0.f ? 0.f : 1.f / W;
  const int64_t b = row / p.num_q_heads, h = row % p.num_q_heads;
  // Partial position lane * 4 holds dims 8 * (lane % (lanes / 2)) + 4 * (lane / (lanes / 2))
  // + [0, 4) (partial_layout.cuh); one 8-byte store of the 4 outputs.
  const int half = lanes / 2;
  T* o = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + 8 * (lane % half) + 4 * (lane / half);
  Vec<T, 4> out;
  out.v[0] = from_float<T>(acc.x * inv);
  out.v[1] = from_float<T>(acc.y * inv);
  out.v[2] = from_float<T>(acc.z * inv);
  out.v[3] = from_float<T>(acc.w * inv);
  out.store(o);
  if (lane == 0) p.lse[row] = W == 0.f ? -INFINITY : M + logf(W);
}

template <typename T, int kHeadDim>
void launch_typed(const PagedDecodeParams& p, int device, cudaStream_t stream) {
  constexpr int kBdx = kHeadDim / kVec;
  const int G = p.num_q_heads / p.num_kv_heads;
  int bdz = kTargetThreads / (kBdx * G);
  bdz = bdz < 1 ? 1 : bdz > kTile ? kTile : bdz;
  const int smem_stages = stage_smem_bytes<T, kHeadDim>();
  const int smem_red = red_smem_bytes<kHeadDim>(bdz, G);
  const int smem = smem_stages > smem_red ? smem_stages : smem_red;
  auto kernel = PagedDecodeKernel<T, kHeadDim>;
  set_dynamic_smem(kernel, smem, device);
  const dim3 grid(p.num_splits, p.num_kv_heads, p.batch);
  launch_kernel(kernel, grid, dim3(kBdx, G, bdz), smem, stream, p);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

template <typename T>
void launch_merge_typed(const PagedDecodeParams& p, cudaStream_t stream) {
  const int lanes = p.head_dim / 4;
  const int rows_per_block = 128 / lanes;
  const int64_t rows = int64_t(p.batch) * p.num_q_heads;
  const unsigned blocks = static_cast<unsigned>(ceil_div<int64_t>(rows, rows_per_block));
  launch_kernel(MergeSplitsKernel<T>, blocks, 128, 0, stream, p);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_paged_decode(const PagedDecodeParams& p, DType dtype, int device,
                         std::uintptr_t stream, bool merge) {
  if (p.batch == 0 || p.num_q_heads == 0) return;
  DeviceGuard guard(device);
  dispatch_half(dtype, "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(p.head_dim, "q", [&](auto hd) {
      launch_typed<T, decltype(hd)::value>(p, device, as_stream(stream));
    });
    if (merge && p.num_splits > 1) launch_merge_typed<T>(p, as_stream(stream));
  });
}

void launch_merge_splits(const PagedDecodeParams& p, DType dtype, int device,
                         std::uintptr_t stream) {
  if (p.batch == 0 || p.num_q_heads == 0) return;
  DeviceGuard guard(device);
  dispatch_half(dtype, "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_merge_typed<T>(p, as_stream(stream));
  });
}

}  // namespace inferops::attention
