// W4A16 GEMM and int4 dequantization kernels.
//
// W4A16GemmKernel<T, kMT>: y[M, N] = x[M, K] W[N, K]^T for M <= 16 kMT rows per
// CTA (grid.z covers larger M). Decode is memory bound on the weight bytes
// (0.5 B/weight + scales), so the kernel is built around streaming them once:
//   * a CTA owns one n-block of 64 columns and one of `splits` k-ranges; its 4
//     warps split that k-range again, each warp streaming its own k16 x n64
//     tiles (one 16-byte ld.global.nc.L1::no_allocate per lane per tile: the
//     weights are read exactly once, so they must not evict x or the scales
//     from L1), kUnroll tiles in flight per warp;
//   * each 32-bit word is dequantized in registers straight into mma.m16n8k16
//     B-fragment registers (layout in quant_w4a16.h): lop3 ORs the nibbles into
//     the mantissa of 1024.0 (fp16) / 128.0 (bf16), then (v - (magic + z)) * s
//     in half2 arithmetic, exact up to the one rounding of the product;
//   * x fragments come straight from global memory (32-bit loads, L1/L2
//     resident: x is at most 64 x K), rows >= M are zero;
//   * the 4 warps' fp32 accumulators are summed through shared memory in a
//     fixed order; with splits == 1 the CTA adds the bias and writes y. With
//     splits > 1 the `splits` CTAs of one n-block form a thread-block cluster
//     (Hopper): after cluster.sync() each CTA sums a slice of the tile over all
//     CTAs' shared memory (DSMEM), in rank order, adds the bias and writes y.
//     Deterministic, no fp32 workspace and no second kernel (a launch costs
//     ~2 us, as much as the whole 4096x4096 GEMV should take).
// Split-K is what fills the GPU at M = 1: 4096x4096 has only 64 n-blocks for
// 132 SMs; the Python wrapper picks `splits` <= 8 (the portable cluster size;
// inferops.quant.w4a16.choose_splits).
//
// Int4DequantKernel<T>: W [N, K] in x's dtype from the packed tiles, with the
// same arithmetic as the GEMM (so dequantize + cuBLAS is the GEMM's operand
// bit for bit); the large-M path of w4a16_matmul.
//
// Known limits: mma.sync (not wgmma) and no shared-memory pipeline for x:
// fine for the memory-bound decode range this kernel is for (M <= 64); larger
// M goes through dequantize + cuBLAS by default.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

#include "common/kernel_launch.cuh"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/mma.cuh"
#include "common/ptx.cuh"
#include "common/vec.cuh"
#include "quant_w4a16.h"

namespace inferops::quant {

namespace {

template <typename T>
struct W4Traits;
template <>
struct W4Traits<__half> {
  using T2 = __half2;
  // fp16 1024.0 in both halves: 1024 + u (u < 16) is exact, the ulp there is 1.
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr float kMagicValue = 1024.f;
  static __device__ __forceinline__ T2 dup(__half v) { return __half2half2(v); }
};
template <>
struct W4Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  // bf16 128.0: its 7 mantissa bits give ulp 1 on [128, 256), so 128 + u is exact
  // (fp16's 1024 trick would need 10 bits).
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr float kMagicValue = 128.f;
  static __device__ __forceinline__ T2 dup(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
};

constexpr int kThreads = kW4Warps * 32;

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  return lop3<(0xf0 & 0xcc) | 0xaa>(a, b, c);
}

// Weights are read once: keep them out of L1 (x and the scales live there).
__device__ __forceinline__ uint4 load_stream(const uint4* p) { return ld_global_nc_na_v4(p); }

template <typename T2>
__device__ __forceinline__ uint32_t bits_of(T2 v) {
  uint32_t r;
  memcpy(&r, &v, 4);
  return r;
}

// The two nibbles at bits 0..3 and 16..19 of `w` as (u - z) * s in both halves.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t w, typename W4Traits<T>::T2 zm,
                                                 typename W4Traits<T>::T2 s) {
  using Tr = W4Traits<T>;
  const uint32_t v = lop3_and_or(w, 0x000f000fu, Tr::kMagic);
  typename Tr::T2 h;
  memcpy(&h, &v, 4);
  return bits_of(__hmul2(__hsub2(h, zm), s));
}


// Scale and (magic + zero point) of the 8 n-tiles a lane touches in group g:
// columns n0 + 8 j + gid.
template <typename T>
__device__ __forceinline__ void load_group(const T* scales, const T* zeros, int64_t g, int32_t n,
                                           int col, typename W4Traits<T>::T2 (&s2)[8],
                                           typename W4Traits<T>::T2 (&z2)[8]) {
  using Tr = W4Traits<T>;
  const T* srow = scales + g * n + col;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    s2[j] = Tr::dup(srow[8 * j]);
    const float z = zeros ? to_float(zeros[g * n + col + 8 * j]) : 8.f;
    z2[j] = Tr::dup(from_float<T>(Tr::kMagicValue + z));  // exact: integers <= 1039
  }
}

// Shared memory of the cross-warp reduction: [warps][16 kMT rows][64 + 8] fp32.
// The 8-float pad puts rows gid and gid + 4 in different banks for the float2
// stores of the accumulators (2 wavefronts per warp store, the minimum for 256 B).
constexpr int kRedLd = kW4TileN + 8;
template <int kMT>
constexpr int kRedBytes = kW4Warps * 16 * kMT * kRedLd * 4;  // kMT = 4: 73,728 B

template <typename T, int kMT>
__global__ void __launch_bounds__(kThreads) W4A16GemmKernel(const __grid_constant__ W4A16Params p) {
  using Tr = W4Traits<T>;
  using T2 = typename Tr::T2;
  constexpr int kRows = 16 * kMT;
  // Tiles in flight per warp: 8 x 512 B at M <= 16 (Little's law needs ~20 KB in
  // flight per SM at HBM3 rates), fewer when the accumulators take the registers.
  constexpr int kUnroll = kMT == 1 ? 8 : 4;
  INFEROPS_DYNAMIC_SMEM(float, red, 16);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int n0 = blockIdx.x * kW4TileN;
  const int64_t m0 = int64_t(blockIdx.z) * kRows;
  const int kt_total = p.k / kW4TileK;
  const int slices = p.splits * kW4Warps;
  const int slice = blockIdx.y * kW4Warps + warp;
  const int kt_begin = static_cast<int>(int64_t(kt_total) * slice / slices);
  const int kt_end = static_cast<int>(int64_t(kt_total) * (slice + 1) / slices);

  const int64_t w_row = p.n / 2;  // uint4 per packed row [2N] int32
  const uint4* wq = reinterpret_cast<const uint4*>(p.qweight) + n0 / 2 + lane;
  const T* x = static_cast<const T*>(p.x);
  const T* scales = static_cast<const T*>(p.scales);
  const T* zeros = static_cast<const T*>(p.zeros);

  // A-fragment rows of this lane: gid and gid + 8 of each m-tile.
  const T* xrow[kMT][2];
  bool xok[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = m0 + mt * 16 + gid + 8 * h;
      xok[mt][h] = r < p.m;
      xrow[mt][h] = x + (xok[mt][h] ? r : 0) * p.k + 2 * tig;
    }
  }

  float acc[kMT][8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

  T2 s2[8], z2[8];
  int64_t cur_group = -1;
  for (int kt = kt_begin; kt < kt_end; kt += kUnroll) {
    uint4 q[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (kt + u < kt_end) q[u] = load_stream(wq + int64_t(kt + u) * w_row);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int ktu = kt + u;
      if (ktu >= kt_end) break;
      const int64_t g = int64_t(ktu) * kW4TileK / p.group_size;
      if (g != cur_group) {
        cur_group = g;
        load_group<T>(scales, zeros, g, p.n, n0 + gid, s2, z2);
      }
      const int64_t kk = int64_t(ktu) * kW4TileK;
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        a[mt][0] = xok[mt][0] ? __ldg(reinterpret_cast<const unsigned*>(xrow[mt][0] + kk)) : 0u;
        a[mt][1] = xok[mt][1] ? __ldg(reinterpret_cast<const unsigned*>(xrow[mt][1] + kk)) : 0u;
        a[mt][2] = xok[mt][0] ? __ldg(reinterpret_cast<const unsigned*>(xrow[mt][0] + kk + 8)) : 0u;
        a[mt][3] = xok[mt][1] ? __ldg(reinterpret_cast<const unsigned*>(xrow[mt][1] + kk + 8)) : 0u;
      }
      const uint32_t words[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int b1 = 0; b1 < 2; ++b1) {
          const int j = 2 * w + b1;
          // B registers of n-tile j: k = 2t + {0,1} (nibble pair 2 b1) and
          // k = 2t + 8 + {0,1} (pair 2 b1 + 1); see quant_w4a16.h.
          const uint32_t b_lo = dequant_pair<T>(words[w] >> (8 * b1), z2[j], s2[j]);
          const uint32_t b_hi = dequant_pair<T>(words[w] >> (8 * b1 + 4), z2[j], s2[j]);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) mma_16816<T>(acc[mt][j], a[mt], b_lo, b_hi);
        }
      }
    }
  }

  // Cross-warp reduction in a fixed order (deterministic).
  float* mine = red + warp * kRows * kRedLd;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = mt * 16 + gid, c = j * 8 + 2 * tig;
      *reinterpret_cast<float2*>(mine + r * kRedLd + c) = make_float2(acc[mt][j][0], acc[mt][j][1]);
      *reinterpret_cast<float2*>(mine + (r + 8) * kRedLd + c) = make_float2(acc[mt][j][2], acc[mt][j][3]);
    }
  }
  __syncthreads();
  const int rows = static_cast<int>(p.m - m0 < kRows ? p.m - m0 : kRows);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  // CTA sum, in place into warp 0's slot (each element is read and written by one thread).
  for (int i = threadIdx.x; i < rows * kW4TileN; i += kThreads) {
    const int r = i / kW4TileN, c = i % kW4TileN;
    float v = red[r * kRedLd + c];
#pragma unroll
    for (int w = 1; w < kW4Warps; ++w) v += red[(w * kRows + r) * kRedLd + c];
    if (p.splits == 1) {
      if (bias) v += to_float(bias[n0 + c]);
      out[(m0 + r) * p.n + n0 + c] = from_float<T>(v);
    } else {
      red[r * kRedLd + c] = v;
    }
  }
  if (p.splits == 1) return;  // uniform: launched without a cluster
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the launcher refuses splits > 1 on older devices
#else

  // Split-K across the cluster: CTA `rank` finishes elements [rank * per, (rank + 1) * per)
  // of the tile, summing the splits in rank order.
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every CTA's sums are written and visible cluster-wide
  const float* remote[kW4MaxSplits];
#pragma unroll
  for (int s = 0; s < kW4MaxSplits; ++s) {
    remote[s] = s < p.splits ? cluster.map_shared_rank(red, s) : red;
  }
  const int total = rows * kW4TileN;
  const int per = (total + p.splits - 1) / p.splits;
  const int rank = static_cast<int>(cluster.block_rank());
  const int end = (rank + 1) * per < total ? (rank + 1) * per : total;
  for (int i = rank * per + threadIdx.x; i < end; i += kThreads) {
    const int r = i / kW4TileN, c = i % kW4TileN;
    float v = 0.f;
#pragma unroll
    for (int s = 0; s < kW4MaxSplits; ++s) {
      if (s < p.splits) v += remote[s][r * kRedLd + c];
    }
    if (bias) v += to_float(bias[n0 + c]);
    out[(m0 + r) * p.n + n0 + c] = from_float<T>(v);
  }
  cluster.sync();  // keep this CTA's shared memory alive until every remote read is done
#endif
}

// One warp per (quantization group, 64-column n-block): the group's scales and zero points
// are read once, as two coalesced 128-byte rows, and handed to the lanes by shuffles; then
// the group's group_size / 16 packed tiles (one 16-byte vector per lane each) are dequantized.
// A lane's two pairs of each row (k + 2 tig and k + 8 + 2 tig) are exchanged within its
// quad so that each lane stores 8 contiguous bytes: a row's 32 bytes in one store
// instruction. (One thread per vector re-read the scales for every tile and stored 4-byte
// pairs 16 bytes apart: 1.88x the ideal bytes read and 2x the store sectors, executor
// metrics at N=K=4096 g128.)
template <typename T>
__global__ void __launch_bounds__(256) Int4DequantKernel(const __grid_constant__ Int4DequantParams p) {
  using Tr = W4Traits<T>;
  using T2 = typename Tr::T2;
  const int64_t nblocks = p.n / kW4TileN;
  const int tiles = p.group_size / kW4TileK;  // packed tiles per group
  const int64_t units = int64_t(p.k / p.group_size) * nblocks;
  const T* scales = static_cast<const T*>(p.scales);
  const T* zeros = static_cast<const T*>(p.zeros);
  T* out = static_cast<T*>(p.out);
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t u = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; u < units; u += warps) {
    const int64_t g = u / nblocks, nb = u % nblocks;
    const int64_t n0 = nb * kW4TileN;
    // Lane l holds the scales (zero points) of columns n0 + 2 l and n0 + 2 l + 1.
    // (One 4-byte load each: a T2 copy can be two 2-byte loads.)
    const uint32_t s_bits = *reinterpret_cast<const uint32_t*>(scales + g * p.n + n0 + 2 * lane);
    const uint32_t z_bits = zeros ? *reinterpret_cast<const uint32_t*>(zeros + g * p.n + n0 + 2 * lane)
                                  : bits_of(Tr::dup(from_float<T>(8.f)));
    T2 s2[8], z2[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // column n0 + gid + 8 j: lane gid / 2 + 4 j, half gid & 1
      const int src = gid / 2 + 4 * j, sh = 16 * (gid & 1);
      const uint32_t sv = __shfl_sync(0xffffffffu, s_bits, src) >> sh & 0xffffu;
      const uint32_t zv = __shfl_sync(0xffffffffu, z_bits, src) >> sh & 0xffffu;
      T sx, zx;
      const uint16_t sv16 = static_cast<uint16_t>(sv), zv16 = static_cast<uint16_t>(zv);
      memcpy(&sx, &sv16, 2);
      memcpy(&zx, &zv16, 2);
      s2[j] = Tr::dup(sx);
      z2[j] = Tr::dup(from_float<T>(Tr::kMagicValue + to_float(zx)));  // exact: integers <= 1039
    }
    for (int t = 0; t < tiles; ++t) {
      const int64_t kt = g * tiles + t;
      const uint4 q = load_stream(reinterpret_cast<const uint4*>(p.qweight) + (kt * nblocks + nb) * 32 + lane);
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};
      const int64_t k0 = kt * kW4TileK;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int b1 = 0; b1 < 2; ++b1) {
          const int j = 2 * w + b1;
          // This lane: elements 2 tig, 2 tig + 1 (lo) and 8 + 2 tig, 9 + 2 tig (hi) of row
          // n0 + gid + 8 j; it stores elements 4 tig .. 4 tig + 3, held by quad lanes
          // a = (2 tig) % 4 and a + 1, their lo for tig < 2, their hi for tig >= 2.
          const uint32_t lo = dequant_pair<T>(words[w] >> (8 * b1), z2[j], s2[j]);
          const uint32_t hi = dequant_pair<T>(words[w] >> (8 * b1 + 4), z2[j], s2[j]);
          const int a = (lane & ~3) | ((2 * tig) & 3);
          const uint32_t lo0 = __shfl_sync(0xffffffffu, lo, a), hi0 = __shfl_sync(0xffffffffu, hi, a);
          const uint32_t lo1 = __shfl_sync(0xffffffffu, lo, a + 1), hi1 = __shfl_sync(0xffffffffu, hi, a + 1);
          uint2 v;
          v.x = tig < 2 ? lo0 : hi0;
          v.y = tig < 2 ? lo1 : hi1;
          *reinterpret_cast<uint2*>(out + (n0 + gid + 8 * j) * p.k + k0 + 4 * tig) = v;
        }
      }
    }
  }
}

template <typename T, int kMT>
void launch_gemm(const W4A16Params& p, int device, cudaStream_t stream) {
  auto kernel = W4A16GemmKernel<T, kMT>;
  set_dynamic_smem(kernel, kRedBytes<kMT>, device);
  const int64_t mblocks = (p.m + 16 * kMT - 1) / (16 * kMT);
  INFEROPS_CHECK(mblocks <= 65535, "grid too large: ", mblocks, " m-blocks");
  INFEROPS_CHECK(device_info(device).cc_major >= 9 || p.splits == 1,
                 "split-K (splits > 1) uses thread-block clusters: needs compute capability 9.0+");
  const dim3 grid(static_cast<unsigned>(p.n / kW4TileN), static_cast<unsigned>(p.splits),
                 static_cast<unsigned>(mblocks));
  const dim3 cluster(1, static_cast<unsigned>(p.splits), 1);  // the split CTAs of one n-block
  INFEROPS_CUDA_CHECK(launch_kernel_cluster(kernel, grid, dim3(kThreads), kRedBytes<kMT>, stream, cluster, p));
}

int grid_stride_blocks(int64_t work, int threads, int device) {
  const int64_t want = (work + threads - 1) / threads;
  const int64_t cap = int64_t(device_info(device).sm_count) * 16;
  return static_cast<int>(want < cap ? want : cap);
}

}  // namespace

void launch_w4a16_matmul(const W4A16Params& p, DType dtype, int device, std::uintptr_t stream_handle) {
  if (p.m == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t stream = as_stream(stream_handle);
  dispatch_half(dtype, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Compiled m-block sizes: 16 rows (decode), 32, 64 (and grid.z for more).
    if (p.m <= 16) {
      launch_gemm<T, 1>(p, device, stream);
    } else if (p.m <= 32) {
      launch_gemm<T, 2>(p, device, stream);
    } else {
      launch_gemm<T, 4>(p, device, stream);
    }
  });
}

void launch_int4_dequantize(const Int4DequantParams& p, DType dtype, int device,
                            std::uintptr_t stream_handle) {
  DeviceGuard guard(device);
  const cudaStream_t stream = as_stream(stream_handle);
  dispatch_half(dtype, "scales", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t work = int64_t(p.k / p.group_size) * (p.n / kW4TileN) * 32;  // a warp per (group, n-block)
    launch_kernel(Int4DequantKernel<T>, grid_stride_blocks(work, 256, device), 256, 0, stream, p);
    INFEROPS_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace inferops::quant
