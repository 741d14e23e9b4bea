// Fused GEMM + reduce-scatter (T3), one persistent kernel per rank:
//
//   phase 1 (GEMM): 128 x 128 output tiles of C = A B on tensor cores
//     (mma.sync m16n8k16, fp32 accumulation; 8 warps of 64 x 32; k step 32
//     through a 4-stage cp.async pipeline). Each finished tile is rounded to
//     the input dtype, staged in shared memory and pushed with 16-byte stores
//     into the symmetric buffer of the rank that owns its rows (a tile can
//     straddle owners when M / W is not a multiple of 128: each row goes to its
//     own owner); then the tile's flag on each of those owners is set to this
//     call's epoch (system-scope release after a system fence). Tile order is
//     rotated by rank: rank r starts with the rows of rank r + 1 and ends with
//     its own, so at any moment the ranks push to different peers.
//   reduce in the epilogue: a tile holding rows of this rank first looks (no
//     waiting) at the W - 1 peers' flags of the tile; when all are up -- the
//     usual case, since a rank's own rows come last in its order, after the
//     peers pushed theirs -- it sums the W partials of its rows right there and
//     writes out, marking the tile done instead of pushing its own partial; so
//     the reduction overlaps the GEMM tiles still running on other blocks.
//   phase 2 (reduce, the rest): the owner's blocks take the tiles covering its
//     rows and wait (acquire) until either all W flags of a tile reach the epoch
//     (then they reduce it) or its done mark does (an epilogue reduced it).
//   Both reductions sum in fp32 in source order 0..W-1 over the same rounded
//     partials, so the result is bitwise the same whichever ran (deterministic).
//     W == 1 skips the buffers: the GEMM epilogue writes out.
//
// Waits never hang: a wait longer than timeout_ns (from %globaltimer) records
// kTimeout, the source rank and the tile in the rank's state and gives up;
// every other wait of the call then gives up at once and the rows it could not
// reduce are written as NaN (never stale data). Python reads the state
// (GemmReduceScatter.check()).
//
// Deadlock freedom needs every block of a rank resident at once (a block in
// phase 2 may wait for a tile of the same rank): the grid is at most the
// occupancy-derived number of resident blocks; virtual ranks (W kernels on one
// GPU) are further bounded to SMs / W blocks each by the caller.
//
// Epochs: every thread reads state[kEpoch] + 1 at the start; the last block to
// finish stores it, so consecutive calls on a stream (and CUDA-graph replays)
// see increasing epochs with no host involvement.
//
// Speed: mma.sync reaches roughly 2/3 of Hopper's wgmma peak, so the GEMM part
// is expected below cuBLAS on H100 (see docs/tp.md). INFEROPS_TP_GEMM=wgmma selects
// an experimental wgmma main loop (sm_90a, b = weight.t() only; wg_tile_to_staging
// below; never run yet) feeding the same staging tile, epilogue and protocol. The owner's reduction reads
// about M x N x 2 bytes; fused into the last tiles' epilogues it overlaps the
// GEMM when peers are on time, else it trails it (phase 2).
#include <algorithm>
#include <cstdlib>
#include <string>

#include "common/kernel_launch.cuh"
#include "common/cp_async.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/mma.cuh"
#include "common/ptx.cuh"
#include "common/vec.cuh"
#include "common/wgmma.cuh"
#include "tp.h"

namespace inferops::tp {

namespace {

constexpr int kThreads = 256;
constexpr int kBK = 32;
constexpr int kStages = 4;
constexpr int kWarpsN = 4;                                // 2 x 4 warps
constexpr int kMI = 4;                                    // m16 blocks per warp (64 rows)
constexpr int kNJ = 4;                                    // n8 blocks per warp (32 cols)
constexpr int kStageElems = kTileM * kBK + kBK * kTileN;  // A 128x32 + B 32x128 = 8192 x 2 B = 16 KiB
constexpr int kPipeBytes = kStages * kStageElems * 2;     // 64 KiB
constexpr int kCStride = kTileN + 8;                      // staging row, padded: 272 B, conflict-free
constexpr int kCBytes = kTileM * kCStride * 2;            // 34 KiB, reuses the drained pipeline
constexpr int kSmemBytes = kPipeBytes > kCBytes ? kPipeBytes : kCBytes;

// --- PTX wrappers (cp.async, ldmatrix, mma: csrc/common) --------------------------------

__device__ __forceinline__ int ld_volatile(const int32_t* p) { return *reinterpret_cast<const volatile int32_t*>(p); }

// --- shared-memory layouts ---------------------------------------------------------------
// Rows of 32 elements (64 B, 4 chunks of 16 B) for A and for B stored [n][k]: chunk
// c of row r lives at c ^ ((r >> 1) & 3), so the 8 rows an ldmatrix reads fall in 8
// distinct 16-byte bank groups. B stored [k][n] (rows of 128 elements, 16 chunks):
// chunk c of row r at c ^ (r & 7).
__device__ __forceinline__ int swz32(int r, int c) { return r * kBK + ((c ^ ((r >> 1) & 3)) << 3); }
__device__ __forceinline__ int swz128(int r, int c) { return r * kTileN + ((c ^ (r & 7)) << 3); }

template <typename T, bool kKN>
__device__ __forceinline__ void load_stage(const GemmRsParams& p, T* stage, int m0, int n0, int kt) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* as = stage;
  T* bs = stage + kTileM * kBK;
  const int k0 = kt * kBK;
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // A: 128 rows x 4 chunks = 512 chunks, 2 per thread
    const int id = threadIdx.x + i * kThreads;
    const int r = id >> 2, c = id & 3;
    const int gr = m0 + r, gk = k0 + c * 8;
    const bool ok = gr < p.m && gk < p.k;
    cp_async_16_zfill(as + swz32(r, c), ok ? a + int64_t(gr) * p.lda + gk : a, ok ? 16 : 0);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int id = threadIdx.x + i * kThreads;
    if constexpr (kKN) {  // B [k][n]: 32 rows x 16 chunks
      const int r = id >> 4, c = id & 15;
      const int gk = k0 + r, gn = n0 + c * 8;
      const bool ok = gk < p.k && gn < p.n;
      cp_async_16_zfill(bs + swz128(r, c), ok ? b + int64_t(gk) * p.ldb + gn : b, ok ? 16 : 0);
    } else {  // B [n][k] (an nn.Linear weight): 128 rows x 4 chunks
      const int r = id >> 2, c = id & 3;
      const int gn = n0 + r, gk = k0 + c * 8;
      const bool ok = gn < p.n && gk < p.k;
      cp_async_16_zfill(bs + swz32(r, c), ok ? b + int64_t(gn) * p.ldb + gk : b, ok ? 16 : 0);
    }
  }
}

template <typename T, bool kKN>
__device__ __forceinline__ void compute_stage(const T* stage, float (&acc)[kMI][kNJ][4], int wm, int wn,
                                              int lane) {
  const T* as = stage;
  const T* bs = stage + kTileM * kBK;
#pragma unroll
  for (int ks = 0; ks < kBK / 16; ++ks) {
    uint32_t af[kMI][4];
    uint32_t bf[kNJ][2];
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
      const int r = wm * 64 + mi * 16 + (lane & 15);
      ldmatrix_x4(af[mi], as + swz32(r, ks * 2 + (lane >> 4)));
    }
#pragma unroll
    for (int nj2 = 0; nj2 < kNJ / 2; ++nj2) {
      uint32_t r4[4];
      if constexpr (kKN) {
        const int kr = ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        ldmatrix_x4_trans(r4, bs + swz128(kr, (wn * 32 + nj2 * 16) / 8 + (lane >> 4)));
      } else {
        const int n = wn * 32 + nj2 * 16 + ((lane >> 4) << 3) + (lane & 7);
        ldmatrix_x4(r4, bs + swz32(n, ks * 2 + ((lane >> 3) & 1)));
      }
      bf[2 * nj2][0] = r4[0];
      bf[2 * nj2][1] = r4[1];
      bf[2 * nj2 + 1][0] = r4[2];
      bf[2 * nj2 + 1][1] = r4[3];
    }
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
      for (int nj = 0; nj < kNJ; ++nj) mma_16816<T>(acc[mi][nj], af[mi], bf[nj][0], bf[nj][1]);
    }
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  T h[2] = {from_float<T>(x), from_float<T>(y)};
  uint32_t u;
  memcpy(&u, h, 4);
  return u;
}

template <typename T>
__device__ __forceinline__ T* slot_ptr(const GemmRsParams& p, int owner, uint32_t parity, int src) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p.peers[owner])) +
         (int64_t(parity) * p.world + src) * p.slot_elems;
}
__device__ __forceinline__ uint32_t* flag_ptr(const GemmRsParams& p, int owner, uint32_t parity, int src,
                                              int64_t tile) {
  char* base = reinterpret_cast<char*>(static_cast<uintptr_t>(p.peers[owner])) + p.flags_offset;
  return reinterpret_cast<uint32_t*>(base) + (int64_t(parity) * p.world + src) * p.max_tiles + tile;
}

__device__ __forceinline__ uint32_t* done_ptr(const GemmRsParams& p, uint32_t parity, int64_t tile) {
  char* base = reinterpret_cast<char*>(static_cast<uintptr_t>(p.peers[p.rank])) + p.done_offset;
  return reinterpret_cast<uint32_t*>(base) + int64_t(parity) * p.max_tiles + tile;
}
// Epochs are compared modulo 2^32, so a counter that wraps keeps working.
__device__ __forceinline__ bool reached(uint32_t flag, uint32_t epoch) {
  return static_cast<int32_t>(flag - epoch) >= 0;
}

// out[off .. off + 8) = sum over sources 0..W-1, in that order, of their partials
// (fp32). `own`: this rank's partial staged in shared memory, or nullptr to read it
// from its slot like the others. Both give bitwise the same sum: the staged value
// is the one that would have been pushed.
template <typename T>
__device__ __forceinline__ void reduce_chunk(const GemmRsParams& p, uint32_t parity, int64_t off, const T* own) {
  float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < p.world; ++s) {
    Vec<T, 8> v;
    if (s == p.rank && own != nullptr) {
      v.load(own);
    } else {
      // .cg: peers wrote this memory during the call; never serve it from L1.
      const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(slot_ptr<T>(p, p.rank, parity, s) + off));
      memcpy(v.v, &raw, 16);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] += to_float(v.v[e]);
  }
  Vec<T, 8> o;
#pragma unroll
  for (int e = 0; e < 8; ++e) o.v[e] = from_float<T>(sum[e]);
  o.store(static_cast<T*>(p.out) + off);
}

// The mma.sync main loop of one 128 x 128 tile, then the accumulators rounded to T into
// the staging tile (row stride kCStride) that the epilogue pushes.
template <typename T, bool kKN>
__device__ __forceinline__ void mma_tile_to_staging(const GemmRsParams& p, T* smem, int m0, int n0, int k_tiles,
                                                    int wm, int wn, int lane) {
  float acc[kMI][kNJ][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage<T, kKN>(p, smem + s * kStageElems, m0, n0, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt - 1 is free again
    const int nxt = kt + kStages - 1;
    if (nxt < k_tiles) load_stage<T, kKN>(p, smem + (nxt % kStages) * kStageElems, m0, n0, nxt);
    cp_async_commit();
    compute_stage<T, kKN>(smem + (kt % kStages) * kStageElems, acc, wm, wn, lane);
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline drained: its shared memory becomes the staging tile

#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
    for (int nj = 0; nj < kNJ; ++nj) {
      const int r = wm * 64 + mi * 16 + (lane >> 2), c = wn * 32 + nj * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(smem + r * kCStride + c) = pack2<T>(acc[mi][nj][0], acc[mi][nj][1]);
      *reinterpret_cast<uint32_t*>(smem + (r + 8) * kCStride + c) = pack2<T>(acc[mi][nj][2], acc[mi][nj][3]);
    }
  }
}

// --- wgmma main loop (opt-in, sm_90a; INFEROPS_TP_GEMM=wgmma) ------------------------------
// Only for b = weight.t() (both operands K-major). Per k tile (kWgBK = 64 elements =
// 128 B) and operand the stage holds [128 rows][128 B]; the 16-byte chunk c of row r
// sits at chunk c ^ (r & 7): the PTX 128B swizzle (address bits [4:6] ^= bits [7:9])
// because every operand tile starts 1024-byte aligned (ring aligned by hand, tiles
// 16 KiB). Two consumer warpgroups; warpgroup g issues 4 x wgmma.m64n128k16 per k
// tile on rows 64 g .. 64 g + 63 of A and all 128 rows (n) of B. The k16 slice s of
// a tile is addressed by advancing the descriptor's start by 32 s bytes (the XOR is
// applied by hardware on the full address, matching where the loader put the chunk).
// Descriptor (PTX ISA "Matrix Descriptor Format"): bits 0-13 start >> 4, 16-29
// leading byte offset >> 4 (unused for swizzled K-major operands whose k extent, 32 B,
// stays inside the swizzle atom: 1), 32-45 stride byte offset >> 4 (1024 B per 8-row
// group), 49-51 base offset 0 (atoms 1024-aligned), 62-63 swizzle mode 1 (128B).
// Accumulator fragment of m64n128 (fp32, 64 registers per thread): warp w of the
// warpgroup, lane l (g = l / 4, t = l % 4), register i holds row 16 w + g + 8 ((i / 2) % 2)
// and column 8 (i / 4) + 2 t + (i % 2) of the warpgroup's 64 x 128 block, so the pair
// (i, i + 1), i even, is two adjacent columns: staged as one 4-byte store at tile row
// 64 g_wg + 16 w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2 t (tests/tp/test_gemm_rs_wgmma.py
// checks this covers the 128 x 128 tile exactly once).
constexpr int kWgBK = 64;                                 // elements per k tile (128 B)
constexpr int kWgStages = 5;
constexpr int kWgTileBytes = kTileM * kWgBK * 2;          // 16 KiB per operand
constexpr int kWgStageBytes = 2 * kWgTileBytes;           // A + B: 32 KiB
constexpr int kWgSmemBytes = kWgStages * kWgStageBytes + 1024;  // 161 KiB (+ alignment slack)
static_assert(kTileN * kWgBK * 2 == kWgTileBytes, "A and B tiles have the same size");
static_assert(kCBytes <= kWgSmemBytes - 1024, "the staging tile reuses the drained ring");

#ifdef INFEROPS_WGMMA_DEVICE

constexpr int kWgAhead = kWgStages - 2;  // prefetch distance in k tiles (see the loop)

// k tile kt of A rows m0.. and B (weight) rows n0.. into the stage at shared address sa.
// 8 threads fill one 128-byte row (coalesced); a chunk is 8 elements and K % 8 == 0, so
// it is all in or all out; rows past M / N and k past K are zero-filled.
template <typename T>
__device__ __forceinline__ void wg_load_stage(const GemmRsParams& p, uint32_t sa, int m0, int n0, int kt) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int k0 = kt * kWgBK;
#pragma unroll
  for (int i = 0; i < kTileM * 8 / kThreads; ++i) {  // 1024 chunks per operand, 4 per thread
    const int id = threadIdx.x + i * kThreads;
    const int r = id >> 3, c = id & 7;
    const int gk = k0 + c * 8;
    const bool kin = gk < p.k;
    const bool oka = kin && m0 + r < p.m, okb = kin && n0 + r < p.n;
    cp_async_16_zfill(sa + wg_swz128(r, c), oka ? a + int64_t(m0 + r) * p.lda + gk : a, oka ? 16 : 0);
    cp_async_16_zfill(sa + kWgTileBytes + wg_swz128(r, c), okb ? b + int64_t(n0 + r) * p.ldb + gk : b, okb ? 16 : 0);
  }
}

// The whole k loop of one 128 x 128 tile, then the fp32 accumulators rounded to T
// into the staging tile `stage` ([128][kCStride], the same layout the mma.sync path
// writes), ready for the unchanged epilogue. Ends with the ring drained (no cp.async
// or wgmma in flight); the caller syncs before reading the staging tile.
template <typename T>
__device__ __forceinline__ void wg_tile_to_staging(const GemmRsParams& p, unsigned char* smem_raw, T* stage,
                                                   int m0, int n0) {
  const uint32_t ring = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  auto stage_at = [&](int s) { return ring + uint32_t(s) * kWgStageBytes; };
  const int wg = threadIdx.x >> 7;
  const int k_tiles = (p.k + kWgBK - 1) / kWgBK;
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;

#pragma unroll
  for (int s = 0; s < kWgAhead; ++s) {
    if (s < k_tiles) wg_load_stage<T>(p, stage_at(s), m0, n0, s);
    cp_async_commit();  // empty groups keep the count uniform
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    // kWgAhead + kt groups committed, tile kt is group kt: kWgAhead - 1 may stay pending.
    cp_async_wait<kWgAhead - 1>();
    // This thread's cp.async writes (generic proxy) -> visible to wgmma (async proxy).
    fence_proxy_async_shared();
    // Every thread's tile kt landed. Each warpgroup ended iteration kt - 1 with
    // wgmma.wait_group 1, so tile kt - 2's wgmmas retired in both warpgroups and its
    // stage, (kt + kWgAhead) % kWgStages, may be refilled now (a prefetch distance of
    // kWgStages - 1 would refill tile kt - 1's stage, possibly still being read).
    __syncthreads();
    const int nxt = kt + kWgAhead;
    if (nxt < k_tiles) wg_load_stage<T>(p, stage_at(nxt % kWgStages), m0, n0, nxt);
    cp_async_commit();
    const uint32_t sa = stage_at(kt % kWgStages) + uint32_t(wg) * (64 * 128);  // this warpgroup's 64 rows
    const uint32_t sb = stage_at(kt % kWgStages) + kWgTileBytes;
    acc_fence(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kWgBK / 16; ++ks) wgmma_m64n128k16<T>(acc, wg_desc_kmajor_128b(sa + ks * 32), wg_desc_kmajor_128b(sb + ks * 32), 1);
    wgmma_commit();
    acc_fence(acc);
    wgmma_wait<1>();
    acc_fence(acc);
  }
  wgmma_wait<0>();
  acc_fence(acc);
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup's wgmmas retired: the ring may be overwritten by the staging tile

  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < kTileN / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wg * 64 + warp * 16 + g + 8 * h, c = 8 * j + 2 * t;
      *reinterpret_cast<uint32_t*>(stage + r * kCStride + c) = pack2<T>(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    }
  }
}

#endif  // INFEROPS_WGMMA_DEVICE

template <typename T, bool kKN, bool kWg>
__global__ void __launch_bounds__(kThreads, kWg ? 1 : 2) GemmRsKernel(const __grid_constant__ GemmRsParams p) {
  INFEROPS_DYNAMIC_SMEM(unsigned char, smem_raw, 128);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const uint32_t epoch = static_cast<uint32_t>(ld_volatile(p.state + kEpoch)) + 1u;
  const uint32_t parity = epoch & 1u;
  const int tiles_m = (p.m + kTileM - 1) / kTileM, tiles_n = (p.n + kTileN - 1) / kTileN;
  const int num_tiles = tiles_m * tiles_n;
  const int k_tiles = (p.k + kBK - 1) / kBK;
  const int tm_shift = p.world > 1 ? ((p.rank + 1) % p.world) * p.m_local / kTileM : 0;
  const int row_lo = p.rank * p.m_local, row_hi = row_lo + p.m_local;  // this rank's rows [row_lo, row_hi)

  // ---- phase 1: GEMM tiles, pushed to their owners ----
  for (int j = blockIdx.x; j < num_tiles; j += gridDim.x) {
    const int tm = (j / tiles_n + tm_shift) % tiles_m, tn = j % tiles_n;
    const int m0 = tm * kTileM, n0 = tn * kTileN;
    if constexpr (kWg) {
#ifdef INFEROPS_WGMMA_DEVICE
      wg_tile_to_staging<T>(p, smem_raw, smem, m0, n0);
#else
      __trap();  // built without sm_90a: the launcher refuses such devices, Python such builds
#endif
    } else {
      mma_tile_to_staging<T, kKN>(p, smem, m0, n0, k_tiles, wm, wn, lane);
    }
    __syncthreads();
    const int64_t tile = int64_t(tm) * tiles_n + tn;
    // Rows of this rank in the tile: reduce them right here when every peer's partial
    // of the tile has already arrived -- the usual case, since a rank's own rows come
    // last in its order, after the peers pushed theirs -- so the reduction overlaps
    // the remaining GEMM tiles instead of trailing them. One look, no waiting: if a
    // peer is late, the own partial is pushed and phase 2 reduces the tile.
    bool fuse = false;
    if (p.world > 1 && m0 < row_hi && min(m0 + kTileM, p.m) > row_lo) {  // uniform over the block
      bool ready = true;
      if (tid < p.world && tid != p.rank) ready = reached(ld_acquire_sys(flag_ptr(p, p.rank, parity, tid, tile)), epoch);
      fuse = __syncthreads_and(ready);
    }
#pragma unroll 1  // unrolling buys nothing here (memory bound) and costs registers
    for (int i = 0; i < kTileM * kTileN / 8 / kThreads; ++i) {  // 16-byte chunks, 8 per thread
      const int id = tid + i * kThreads;
      const int r = id >> 4, c = id & 15;
      const int gr = m0 + r, gc = n0 + c * 8;
      if (gr >= p.m || gc >= p.n) continue;
      const T* staged = smem + r * kCStride + c * 8;
      if (p.world == 1) {
        Vec<T, 8> v;
        v.load(staged);
        v.store(static_cast<T*>(p.out) + int64_t(gr) * p.n + gc);
        continue;
      }
      const int owner = gr / p.m_local;
      const int64_t off = int64_t(gr - owner * p.m_local) * p.n + gc;
      if (fuse && owner == p.rank) {
        reduce_chunk<T>(p, parity, off, staged);
      } else {
        Vec<T, 8> v;
        v.load(staged);
        v.store(slot_ptr<T>(p, owner, parity, p.rank) + off);
      }
    }
    if (p.world > 1) {
      __threadfence_system();  // this thread's pushes are visible system-wide before the flag
      __syncthreads();
      const int last_row = min(m0 + kTileM, p.m) - 1;
      const int owner_lo = m0 / p.m_local, owner_hi = last_row / p.m_local;
      if (tid <= owner_hi - owner_lo) {
        const int owner = owner_lo + tid;
        // Reduced here: mark it done for phase 2 (and never raise the own flag, so
        // phase 2 cannot reduce it a second time). Else: flag the push.
        st_release_sys(owner == p.rank && fuse ? done_ptr(p, parity, tile) : flag_ptr(p, owner, parity, p.rank, tile),
                       epoch);
      }
    } else {
      __syncthreads();  // staging reads done before the next tile's loads
    }
  }

  // ---- phase 2: reduce the tiles covering this rank's rows not reduced in an epilogue ----
  if (p.world > 1) {
    const int tm_lo = row_lo / kTileM, tm_hi = (row_hi - 1) / kTileM;
    const int items = (tm_hi - tm_lo + 1) * tiles_n;
    for (int it = blockIdx.x; it < items; it += gridDim.x) {
      const int tm = tm_lo + it / tiles_n, tn = it % tiles_n;
      const int64_t tile = int64_t(tm) * tiles_n + tn;
      bool bad = false, skip = false;
      if (tid < p.world) {  // thread s waits for source s, or for an epilogue that reduced the tile
        const uint32_t* f = flag_ptr(p, p.rank, parity, tid, tile);
        const uint32_t* d = done_ptr(p, parity, tile);
        const uint64_t t0 = global_timer_ns();
        while (!reached(ld_acquire_sys(f), epoch)) {
          if (reached(ld_acquire_sys(d), epoch)) {
            skip = true;
            break;
          }
          if (ld_volatile(p.state + kError) != kOk) {
            bad = true;
            break;
          }
          if (global_timer_ns() - t0 > p.timeout_ns) {
            if (atomicCAS(p.state + kError, kOk, kTimeout) == kOk) {
              atomicExch(p.state + kErrorSource, tid);
              atomicExch(p.state + kErrorTile, static_cast<int>(tile));
            }
            bad = true;
            break;
          }
          __nanosleep(128);
        }
      }
      if (__syncthreads_or(skip)) continue;  // an epilogue reduced it
      // A failed call (timeout, or another wait's failure) writes NaN over the rows it
      // could not reduce, so a caller that does not check() sees NaN, not stale data.
      const bool failed = __syncthreads_or(bad);
      const int r0 = max(tm * kTileM, row_lo), r1 = min(min(tm * kTileM + kTileM, p.m), row_hi);
      const int n0 = tn * kTileN;
      for (int id = tid; id < (r1 - r0) * (kTileN / 8); id += kThreads) {
        const int lr = r0 + (id >> 4) - row_lo, gc = n0 + (id & 15) * 8;
        if (gc >= p.n) continue;
        if (failed) {
          Vec<T, 8> o;
#pragma unroll
          for (int e = 0; e < 8; ++e) o.v[e] = from_float<T>(__int_as_float(0x7fc00000));
          o.store(static_cast<T*>(p.out) + int64_t(lr) * p.n + gc);
        } else {
          reduce_chunk<T>(p, parity, int64_t(lr) * p.n + gc, nullptr);
        }
      }
    }
  }

  // ---- end of call: the last block publishes the epoch ----
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(p.state + kDone, 1) == static_cast<int>(gridDim.x) - 1) {
      atomicExch(p.state + kDone, 0);
      atomicExch(p.state + kEpoch, static_cast<int>(epoch));
    }
  }
}

template <typename T, bool kKN, bool kWg>
void launch_typed(const GemmRsParams& p, int device, int num_blocks, cudaStream_t stream) {
  auto kernel = GemmRsKernel<T, kKN, kWg>;
  constexpr int smem_bytes = kWg ? kWgSmemBytes : kSmemBytes;
  set_dynamic_smem(kernel, smem_bytes, device);
  const int per_sm = max_active_blocks(kernel, kThreads, smem_bytes, device);
  INFEROPS_CHECK(per_sm >= 1, "gemm_reduce_scatter kernel cannot be resident on device ", device);
  const int tiles = ceil_div(p.m, kTileM) * ceil_div(p.n, kTileN);
  int grid = std::min(tiles, per_sm * device_info(device).sm_count);
  if (num_blocks > 0) grid = std::min(grid, num_blocks);
  launch_kernel(kernel, std::max(grid, 1), kThreads, smem_bytes, stream, p);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

// INFEROPS_TP_GEMM selects the main loop: "mma" (default, unset or empty) or "wgmma"
// (sm_90a, b = weight.t() only; the row-major [K, N] layout always runs mma.sync).
bool use_wgmma(const GemmRsParams& p, int device) {
  const char* env = std::getenv("INFEROPS_TP_GEMM");
  const std::string v = env ? env : "";
  INFEROPS_CHECK_ARG(v.empty() || v == "mma" || v == "wgmma",
                     "expected INFEROPS_TP_GEMM to be \"mma\" or \"wgmma\", got \"", v, "\"");
  if (v != "wgmma") return false;
  const DeviceInfo& info = device_info(device);
  INFEROPS_CHECK_ARG(info.cc_major == 9 && info.cc_minor == 0,
                     "expected an sm_90 (Hopper) device for INFEROPS_TP_GEMM=wgmma (wgmma is sm_90a only), got sm_",
                     info.cc_major, info.cc_minor, " on device ", device);
  return !p.b_kn;  // the row-major [K, N] layout keeps mma.sync
}

}  // namespace

void launch_gemm_rs(const GemmRsParams& p, DType dtype, int device, int num_blocks, std::uintptr_t stream) {
  if (p.m == 0 || p.n == 0) return;  // every rank sees the same M, N: all skip together
  DeviceGuard guard(device);
  const bool wg = use_wgmma(p, device);
  dispatch_half(dtype, "a", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.b_kn) {
      launch_typed<T, true, false>(p, device, num_blocks, as_stream(stream));
    } else if (wg) {
      launch_typed<T, false, true>(p, device, num_blocks, as_stream(stream));
    } else {
      launch_typed<T, false, false>(p, device, num_blocks, as_stream(stream));
    }
  });
}

}  // namespace inferops::tp
