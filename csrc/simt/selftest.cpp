// Small kernels that check the SIMT executor itself (tests/simt/test_executor.py): that the
// intrinsics behave as CUDA's do, and that each class of kernel bug the executor promises to
// catch is caught -- from a deliberately broken kernel, not from a description of one.
// Compiled into inferops._simt only (inferops._C has no use for them).
//
// simt_selftest(name, n) runs kernel `name` on n-element host buffers it owns and returns the
// output as a list of floats; a kernel error raises (RuntimeError "simt: ...").
#include <cooperative_groups.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/cp_async.cuh"
#include "common/cuda_check.h"
#include "common/kernel_launch.cuh"
#include "common/mma.cuh"
#include "common/ptx.cuh"
#include "common/wgmma.cuh"

namespace inferops::simt_selftest {
namespace {

struct Buffers {
  float* in;
  float* out;
  int n;
};

// --- correct kernels: the intrinsics' semantics -------------------------------------------------

// out[i] = sum over the block of in (warp shuffles + shared memory + __syncthreads).
__global__ void BlockSumKernel(Buffers b) {
  __shared__ float warp_sums[32];
  const int t = threadIdx.x;  // launched with n rounded up to whole warps
  float v = t < b.n ? b.in[t] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (t % 32 == 0) warp_sums[t / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) total += warp_sums[w];
  if (t < b.n) b.out[t] = total;
}

// out[i] = [__syncthreads_count(in > 0), __syncthreads_and(in > 0), __syncthreads_or(in > 0),
//           popc(__ballot_sync(in > 0)) of the warp, __match_any_sync(in) mask popcount]
__global__ void VotesKernel(Buffers b) {
  const int t = threadIdx.x;
  const int p = t < b.n && b.in[t] > 0.f;
  const int count = __syncthreads_count(p);
  const int all = __syncthreads_and(p);
  const int any = __syncthreads_or(p);
  const unsigned ballot = __ballot_sync(0xffffffffu, p);
  const unsigned match = __match_any_sync(0xffffffffu, __float_as_int(t < b.n ? b.in[t] : 0.f));
  if (t < b.n) {
    b.out[5 * t + 0] = float(count);
    b.out[5 * t + 1] = float(all);
    b.out[5 * t + 2] = float(any);
    b.out[5 * t + 3] = float(__popc(ballot));
    b.out[5 * t + 4] = float(__popc(match));
  }
}

// Shuffles in 16-lane halves with width 16: out[i] = in[(i & ~15) + ((i + 1) & 15)] (shfl with
// width), and lanes 0-15 / 16-31 use disjoint masks at the same time (legal divergence).
__global__ void HalfWarpShuffleKernel(Buffers b) {
  const int t = threadIdx.x;
  const float v = b.in[t];
  const unsigned mask = (t & 16) ? 0xffff0000u : 0x0000ffffu;
  const float r = __shfl_sync(mask, v, (t + 1) & 15, 16);
  b.out[t] = r;
}

// cp.async round trip: each thread copies 4 floats in, waits, and writes them back out.
__global__ void CpAsyncKernel(Buffers b, int pending_after_second) {
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  const int t = threadIdx.x;
  cp_async_16(s + 4 * t, b.in + 4 * t);
  cp_async_commit();
  cp_async_16(s + 4 * blockDim.x + 4 * t, b.in + 4 * blockDim.x + 4 * t);
  cp_async_commit();
  if (pending_after_second == 0) {
    cp_async_wait<0>();
  } else {
    cp_async_wait<1>();  // the bug: the second group may still be in flight
  }
  __syncthreads();
  for (int i = 0; i < 4; ++i) {
    b.out[4 * t + i] = s[4 * t + i];
    b.out[4 * blockDim.x + 4 * t + i] = s[4 * blockDim.x + 4 * t + i];
  }
}

// One m16n8k16 tile through the canonical ldmatrix -> mma.sync path (as CUTLASS loads it):
// in = A [16][16] then B; B is [8 n][16 k] (trans_b == 0, ldmatrix.x2) or [16 k][8 n]
// (trans_b == 1, ldmatrix.x2.trans); out = D [16][8] = A B (fp16 operands, fp32 out).
__global__ void Mma16816Kernel(Buffers b, int trans_b) {
  INFEROPS_DYNAMIC_SMEM(__half, s, 16);
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16 + 16 * 8; i += 32) s[i] = __float2half(b.in[i]);
  __syncwarp();
  const __half* sa = s;
  const __half* sb = s + 16 * 16;
  uint32_t a[4], bf[2];
  ldmatrix_x4(a, sa + (lane % 16) * 16 + (lane / 16) * 8);
  if (trans_b) {
    ldmatrix_xn<2, true>(bf, static_cast<unsigned>(__cvta_generic_to_shared(sb + (lane % 16) * 8)));
  } else {
    ldmatrix_xn<2, false>(bf, static_cast<unsigned>(__cvta_generic_to_shared(sb + (lane % 8) * 16 + ((lane / 8) % 2) * 8)));
  }
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  mma_16816<__half>(d, a, bf[0], bf[1]);
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) b.out[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

// One wgmma.m64n128k16 bf16 tile (a single warpgroup, 128 threads): in = A [64][16] then B
// [128 n][16 k]; both stored K-major in the 128B-swizzled layout (wg_swz128) in the second
// 32-byte k slice of their 128-byte rows (16-byte chunks 2 and 3), read through descriptors
// whose start is advanced by 32 bytes, as the GEMM kernels address their k slices.
// out = D [64][128] = A B^T. `mode` breaks it on purpose:
//   1 swizzle mode "none" in A's descriptor, 2 stride byte offset 512 in B's (wrong results);
//   3 reads the accumulators before wgmma.wait_group (NaN); 4 two chained wgmmas, the
//   first with scale-d 0 over accumulators preset to 1 (D = 2 A B^T); 5 no wgmma.fence;
//   6 overwrites A while the wgmma is in flight (before any thread's wait); 7 warp 3 passes
//   another descriptor; 8 half of the warpgroup has exited; 9 warp 3 waits at __syncthreads
//   instead (a deadlock).
__global__ void WgmmaTileKernel(Buffers b, int mode) {
  INFEROPS_DYNAMIC_SMEM(unsigned char, raw, 1024);
  const int t = threadIdx.x;
  const uint32_t sa = (static_cast<uint32_t>(__cvta_generic_to_shared(raw)) + 1023u) & ~1023u;
  const uint32_t sb = sa + 64 * 128;
  unsigned char* base = raw + (sa - static_cast<uint32_t>(__cvta_generic_to_shared(raw)));
  for (int i = t; i < 192 * 128; i += 128) base[i] = 0;
  __syncthreads();
  for (int i = t; i < 192 * 16; i += 128) {
    const int row = i / 16, k = i % 16;  // rows 0-63: A, 64-191: B
    const int r = row < 64 ? row : row - 64;
    const uint32_t off = (row < 64 ? 0u : 64u * 128u) + wg_swz128(r, 2 + k / 8) + 2 * (k % 8);
    *reinterpret_cast<__nv_bfloat16*>(base + off) = __float2bfloat16(b.in[i]);
  }
  fence_proxy_async_shared();
  __syncthreads();
  if (mode == 8 && t >= 64) return;
  if (mode == 9 && t >= 96) __syncthreads();
  uint64_t da = wg_desc_kmajor_128b(sa + 32), db = wg_desc_kmajor_128b(sb + 32);
  if (mode == 1) da &= ~(uint64_t(3) << 62);
  if (mode == 2) db = (db & ~(uint64_t(0x3FFF) << 32)) | (uint64_t(512 >> 4) << 32);
  if (mode == 7 && t >= 96) db = wg_desc_kmajor_128b(sb);
  float acc[64];
  for (int i = 0; i < 64; ++i) acc[i] = mode == 4 ? 1.f : 0.f;
  if (mode != 5) wgmma_fence();
  wgmma_m64n128k16<__nv_bfloat16>(acc, da, db, mode == 4 ? 0 : 1);
  if (mode == 4) wgmma_m64n128k16<__nv_bfloat16>(acc, da, db, 1);
  wgmma_commit();
  if (mode == 6) {  // refills A's first row (chunks 2-3) before anyone waited, then a barrier
    if (t < 32) base[32 + t] = 1;
    __syncthreads();
  }
  float early[64];
  for (int i = 0; i < 64; ++i) early[i] = acc[i];
  wgmma_wait<0>();
  const int w = t / 32, l = t % 32;
  for (int i = 0; i < 64; ++i) {
    const int row = 16 * w + l / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (l % 4) + i % 2;
    b.out[row * 128 + col] = mode == 3 ? early[i] : acc[i];
  }
}

// Thread-block clusters: a distributed-shared-memory reduction, the w4a16 split-K pattern.
// Launched on grid (4, 2) as clusters of (2, 2) blocks of 64 threads, 256 B of dynamic smem:
// block g = y * 4 + x holds in[64 g .. 64 g + 64) in its shared memory; after cluster.sync
// the block of rank r sums elements [16 r, 16 r + 16) over the cluster's 4 blocks (reading the
// others' shared memory through map_shared_rank) into out[64 c + i] (cluster c = x / 2), and
// writes out[256 + 4 g ...] = block_rank, num_blocks, block_index().x, block_index().y.
// final_sync == 0 is the bug: a block may exit (and its shared memory die) while the others
// still read it.
__global__ void ClusterReduceKernel(Buffers b, int final_sync) {
  namespace cg = cooperative_groups;
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  cg::cluster_group cluster = cg::this_cluster();
  const int t = threadIdx.x;
  const int g = blockIdx.y * gridDim.x + blockIdx.x;
  s[t] = b.in[64 * g + t];
  cluster.sync();
  const unsigned rank = cluster.block_rank();
  if (t < 16) {
    float v = 0.f;
    for (unsigned r = 0; r < cluster.num_blocks(); ++r) v += cluster.map_shared_rank(s, r)[16 * rank + t];
    b.out[64 * (blockIdx.x / 2) + 16 * rank + t] = v;
  }
  if (t == 0) {
    b.out[256 + 4 * g + 0] = float(rank);
    b.out[256 + 4 * g + 1] = float(cluster.num_blocks());
    b.out[256 + 4 * g + 2] = float(cluster.block_index().x);
    b.out[256 + 4 * g + 3] = float(cluster.block_index().y);
  }
  if (final_sync) cluster.sync();  // keep this block's shared memory alive for the others' reads
}

// Grid of 32 blocks as 2 clusters of 16 (non-portable): out[block] = its rank, out[32 + block] = 16.
__global__ void ClusterRankKernel(Buffers b) {
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  cluster.sync();
  if (threadIdx.x == 0) {
    b.out[blockIdx.x] = float(cluster.block_rank());
    b.out[32 + blockIdx.x] = float(cluster.num_blocks());
  }
}

// --- broken kernels: each must be reported ---------------------------------------------------------

__global__ void ClusterRankOutOfRangeKernel(Buffers b) {  // map_shared_rank(p, num_blocks())
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  s[threadIdx.x] = 1.f;
  cluster.sync();
  b.out[threadIdx.x] = *cluster.map_shared_rank(s, cluster.num_blocks());
  cluster.sync();
}

// Half of block rank 1 waits at __syncthreads, the rest of the cluster at cluster.sync. (A
// block that skips cluster.sync and exits does not hang it: exited threads are not waited for.)
__global__ void ClusterSplitSyncKernel(Buffers b) {
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  if (cluster.block_rank() == 1 && threadIdx.x >= 16) {
    __syncthreads();
  } else {
    cluster.sync();
  }
  b.out[threadIdx.x] = 0.f;
}

__global__ void ClusterStaticSharedKernel(Buffers b) {  // static __shared__: one object per declaration
  __shared__ float tile[32];
  tile[threadIdx.x] = b.in[threadIdx.x];
  cooperative_groups::this_cluster().sync();
  b.out[threadIdx.x] = tile[threadIdx.x];
}

__global__ void OobGlobalReadKernel(Buffers b) {  // reads in[n]: one past the end
  const int t = threadIdx.x;
  if (t == 0) b.out[0] = b.in[b.n];
}

__global__ void DynSmemOverreadKernel(Buffers b, int elems) {  // reads one float past the launch size
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  const int t = threadIdx.x;
  if (t < elems) s[t] = 1.f;
  __syncthreads();
  if (t == 0) b.out[0] = s[elems];
}

__global__ void DynSmemOverwriteKernel(Buffers b, int elems) {  // writes one float past it
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  const int t = threadIdx.x;
  s[t] = 1.f;  // launched with elems + 1 threads
  __syncthreads();
  if (t == 0) b.out[0] = s[0] + float(elems);
}

// Thread t writes s[t] and reads its neighbour's element without a barrier in between.
__global__ void MissingSyncKernel(Buffers b) {
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  const int t = threadIdx.x;
  s[t] = b.in[t];
  // __syncthreads() missing here
  b.out[t] = s[(t + 1) % blockDim.x];
}

__global__ void PartialWarpFullMaskKernel(Buffers b) {  // 48 threads: lanes 16-31 of warp 1 do not exist
  const int t = threadIdx.x;
  float v = b.in[t];
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  b.out[t] = v;
}

__global__ void ShuffleOutsideMaskKernel(Buffers b) {  // lanes 0-15 read lane 16..31
  const int t = threadIdx.x;
  if (t < 16) b.out[t] = __shfl_sync(0x0000ffffu, b.in[t], t + 16);
}

__global__ void DeadlockKernel(Buffers b) {  // warp 1 splits between __syncwarp and __syncthreads
  const int t = threadIdx.x;
  if (t >= 32 && t < 48) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  b.out[t] = 0.f;
}

__global__ void TrapKernel(Buffers b) {
  if (threadIdx.x == 3 && blockIdx.x == 1) __trap();
  b.out[threadIdx.x] = 1.f;
}

__device__ __attribute__((noinline)) float deep(volatile float* p, int depth) {
  volatile float pad[256];
  pad[depth & 255] = p[0];
  return depth == 0 ? pad[0] : deep(p, depth - 1) + pad[depth & 255];
}
__global__ void StackOverflowKernel(Buffers b) {
  if (threadIdx.x == 0) b.out[0] = deep(b.in, 1 << 20);
}

__global__ void MisalignedCpAsyncKernel(Buffers b) {
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  cp_async_16(s + 1, b.in);  // 4-byte aligned destination: cp.async of 16 bytes needs 16
  cp_async_commit();
  cp_async_wait<0>();
  b.out[0] = s[1];
}

__global__ void EmptyKernel(Buffers) {}

// --- shared-memory races (race.h): each of these is caught by the race-check build; the
// ordinary build sees the consequence where the executor's schedule exposes it ---------------

// Lanes exchange values through shared memory; without __syncwarp the read of a neighbour's
// slot races with its write (sync = 1: correct).
__global__ void WarpExchangeKernel(Buffers b, int sync) {
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  const int t = threadIdx.x;  // one warp
  s[t] = b.in[t];
  if (sync) __syncwarp();
  b.out[t] = s[(t + 1) % 32];
}

// Two tiles through one buffer: out[t] = sum over tiles of tile[(t + 1) % n]. The second
// __syncthreads (before the buffer is overwritten) is the one tiled loops forget
// (second_sync = 0): the next tile's write races with this tile's reads.
__global__ void TwoTilesKernel(Buffers b, int second_sync) {
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  const int t = threadIdx.x, n = blockDim.x;
  float acc = 0.f;
  for (int tile = 0; tile < 2; ++tile) {
    s[t] = b.in[tile * n + t];
    __syncthreads();
    acc += s[(t + 1) % n];
    if (second_sync) __syncthreads();
  }
  b.out[t] = acc;
}

// Thread 0 copies in[0..3] with cp.async; the others read it after a barrier, but thread 0
// waits for its copy only after that barrier (wait_first = 1: correct).
__global__ void CpAsyncPublishKernel(Buffers b, int wait_first) {
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  const int t = threadIdx.x;
  if (t == 0) {
    cp_async_16(s, b.in);
    cp_async_commit();
    if (wait_first) cp_async_wait<0>();
  }
  __syncthreads();
  b.out[t] = s[t % 4];
  if (t == 0 && !wait_first) cp_async_wait<0>();
}

// A static __shared__ array with its barrier missing (sync = 1: correct).
__global__ void StaticSharedExchangeKernel(Buffers b, int sync) {
  __shared__ float tile[64];
  const int t = threadIdx.x;
  tile[t] = b.in[t];
  if (sync) __syncthreads();
  b.out[t] = tile[(t + 1) % blockDim.x];
}

// A cluster of 2: each block reads its peer's shared memory; without the cluster.sync between
// the peer's write and this read they race (sync = 1: correct).
__global__ void ClusterExchangeKernel(Buffers b, int sync) {
  namespace cg = cooperative_groups;
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  cg::cluster_group cluster = cg::this_cluster();
  const int t = threadIdx.x;
  const unsigned rank = cluster.block_rank();
  s[t] = b.in[32 * rank + t];
  if (sync) cluster.sync();
  b.out[32 * rank + t] = cluster.map_shared_rank(s, rank ^ 1u)[t];
  cluster.sync();  // the peer's shared memory stays alive until both have read
}

// Atomics on shared memory from every thread are not races; the reads after the barrier are
// ordered after them.
__global__ void SharedAtomicsKernel(Buffers b) {
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  const int t = threadIdx.x;
  if (t == 0) s[0] = 0.f;
  __syncthreads();
  atomicAdd(&s[0], b.in[t]);
  atomicMax(reinterpret_cast<int*>(&s[1]) , t);  // s[1] poisoned to -1: max is blockDim.x - 1
  __syncthreads();
  b.out[t] = s[0];
  b.out[blockDim.x + t] = float(reinterpret_cast<int*>(s)[1]);
}


// --- concurrent grids (concurrent.cpp): two grids that talk through flags ---------------------

struct Channel {
  uint32_t* flag;  // [2]
  float* data;     // [n], poisoned (NaN) before the launch
};

// Broken producer: publishes its flag BEFORE writing the data (st.release orders nothing that
// comes after it), so a consumer scheduled in between reads the poison.
__global__ void FlagBeforeDataKernel(Buffers b, Channel c) {
  const int t = threadIdx.x;
  if (t == 0) st_release_sys(c.flag, 1u);
  c.data[t] = b.in[t];
}

// Correct producer: every thread's data, then the barrier, then the fence and the flag.
__global__ void FlagAfterDataKernel(Buffers b, Channel c) {
  const int t = threadIdx.x;
  c.data[t] = b.in[t];
  __syncthreads();
  if (t == 0) {
    __threadfence();
    st_release_sys(c.flag, 1u);
  }
}

__global__ void ConsumerKernel(Buffers b, Channel c) {
  const int t = threadIdx.x;
  while (ld_acquire_sys(c.flag) == 0u) {
  }
  b.out[t] = c.data[t];
}

// Two grids that only make progress together: block 0 of each passes a counter back and forth
// through two flags (rounds times); every block records gridDim.x * 1000 + blockDim.x, so each
// block is seen to run with its own grid's launch configuration.
__global__ void PingPongKernel(Buffers b, Channel c, int side, int rounds, int out_base) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    uint32_t* mine = c.flag + side;
    const uint32_t* theirs = c.flag + (1 - side);
    for (int i = 0; i < rounds; ++i) {
      const uint32_t want = static_cast<uint32_t>(side == 0 ? i : i + 1);
      while (ld_acquire_sys(theirs) != want) {
      }
      st_release_sys(mine, static_cast<uint32_t>(i + 1));
    }
    b.out[side] = static_cast<float>(*mine);
  }
  __syncthreads();
  if (threadIdx.x == 0) b.out[out_base + blockIdx.x] = static_cast<float>(gridDim.x * 1000 + blockDim.x);
}

// --- driver ----------------------------------------------------------------------------------------------

using Runner = std::function<void(Buffers&)>;

void check_launch() { INFEROPS_CUDA_CHECK_LAUNCH(); }

template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, dim3 cluster, Args... args) {
  INFEROPS_CUDA_CHECK(launch_kernel_cluster(kernel, grid, block, smem, nullptr, cluster, args...));
}

// The same launch through the raw runtime API (cudaLaunchKernelEx -> cudaLaunchKernelExC).
void launch_reduce_ex(Buffers& b) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(4, 2);
  cfg.blockDim = dim3(64);
  cfg.dynamicSmemBytes = 256;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 2;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  INFEROPS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, ClusterReduceKernel, b, 1));
}

// --- access patterns with known memory metrics (tests/simt/test_metrics.py) ----------------------

// out[i] = in[i * stride] for i < n / stride: a coalesced copy (stride 1) or a read that uses
// one float of every `stride` (its sectors per request are `stride` times the minimum).
__global__ void MetricsCopyKernel(Buffers b, int stride) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < b.n / stride) b.out[i] = b.in[i * stride];
}

// Every thread reads in[0] (a broadcast: one sector per request, the minimum) and writes out[i].
__global__ void MetricsBroadcastKernel(Buffers b) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < b.n) b.out[i] = b.in[0];
}

// One warp: thread t stores in[t] at float index t * stride of shared memory and loads it back
// (stride 1 or 33: one wavefront per request; 2: two; 32: thirty-two, every lane in bank 0).
__global__ void MetricsSharedStrideKernel(Buffers b, int stride) {
  INFEROPS_DYNAMIC_SMEM(float, s, 16);
  const int t = static_cast<int>(threadIdx.x);
  s[t * stride] = b.in[t];
  __syncwarp();
  b.out[t] = s[t * stride];
}

// One warp, ldmatrix.x4 from a 32 x 8-half tile whose rows are `pitch` bytes apart: 128 puts the
// 8 rows of each matrix in the same 4 banks (8 wavefronts per matrix), 144 spreads them (1).
__global__ void MetricsLdmatrixKernel(Buffers b, int pitch) {
  INFEROPS_DYNAMIC_SMEM(unsigned char, s, 16);
  const int t = static_cast<int>(threadIdx.x);
  for (int e = t; e < 32 * 8; e += 32) reinterpret_cast<__half*>(s + (e / 8) * pitch)[e % 8] = __float2half(b.in[e]);
  __syncwarp();
  uint32_t r[4];
  ldmatrix_x4(r, s + t * pitch);  // lane 8j + r: row r of matrix j = tile row t
  for (int j = 0; j < 4; ++j) b.out[4 * t + j] = static_cast<float>(r[j] & 0xffffu);
}

// Runs `launches` (two grids) as one concurrent pool; n floats of channel data, poisoned.
void run_concurrent(Buffers& b, const std::function<void(Channel)>& launches) {
  std::vector<uint32_t> flags(2, 0u);
  std::vector<float> data(static_cast<std::size_t>(b.n), NAN);
  const Channel c{flags.data(), data.data()};
  ::simt::concurrent_begin();
  try {
    launches(c);
  } catch (...) {
    ::simt::concurrent_end(false);
    throw;
  }
  ::simt::concurrent_end(true);
  check_launch();
}

const std::map<std::string, std::pair<int, Runner>>& registry() {
  // name -> (output elements per input element, runner)
  static const std::map<std::string, std::pair<int, Runner>> r = {
      {"block_sum",
       {1, [](Buffers& b) { launch_kernel(BlockSumKernel, 1, (b.n + 31) / 32 * 32, 0, nullptr, b); check_launch(); }}},
      {"votes", {5, [](Buffers& b) { launch_kernel(VotesKernel, 1, b.n, 0, nullptr, b); check_launch(); }}},
      {"half_warp_shuffle",
       {1, [](Buffers& b) { launch_kernel(HalfWarpShuffleKernel, 1, 32, 0, nullptr, b); check_launch(); }}},
      {"cp_async",
       {1, [](Buffers& b) {
          launch_kernel(CpAsyncKernel, 1, b.n / 8, b.n * 4, nullptr, b, 0);
          check_launch();
        }}},
      {"cp_async_wait_short",
       {1, [](Buffers& b) {
          launch_kernel(CpAsyncKernel, 1, b.n / 8, b.n * 4, nullptr, b, 1);
          check_launch();
        }}},
      {"mma_16816",
       {1, [](Buffers& b) { launch_kernel(Mma16816Kernel, 1, 32, 384 * 2, nullptr, b, 0); check_launch(); }}},
      {"wgmma_tile",
       {3, [](Buffers& b) {
          const int mode = b.n > 3072 ? int(b.in[3072]) : 0;  // in[3072]: the mode (tests only)
          launch_kernel(WgmmaTileKernel, 1, 128, 192 * 128 + 1024, nullptr, b, mode);
          check_launch();
        }}},
      {"mma_16816_trans_b",
       {1, [](Buffers& b) { launch_kernel(Mma16816Kernel, 1, 32, 384 * 2, nullptr, b, 1); check_launch(); }}},
      {"oob_global_read",
       {1, [](Buffers& b) { launch_kernel(OobGlobalReadKernel, 1, 32, 0, nullptr, b); check_launch(); }}},
      {"dyn_smem_overread",
       {1, [](Buffers& b) {
          launch_kernel(DynSmemOverreadKernel, 1, 64, 64 * 4, nullptr, b, 64);
          check_launch();
        }}},
      {"dyn_smem_overwrite",
       {1, [](Buffers& b) {
          launch_kernel(DynSmemOverwriteKernel, 1, 65, 64 * 4, nullptr, b, 64);
          check_launch();
        }}},
      {"missing_sync", {1, [](Buffers& b) { launch_kernel(MissingSyncKernel, 1, b.n, b.n * 4, nullptr, b); check_launch(); }}},
      {"partial_warp_full_mask",
       {1, [](Buffers& b) { launch_kernel(PartialWarpFullMaskKernel, 1, 48, 0, nullptr, b); check_launch(); }}},
      {"shuffle_outside_mask",
       {1, [](Buffers& b) { launch_kernel(ShuffleOutsideMaskKernel, 1, 32, 0, nullptr, b); check_launch(); }}},
      {"concurrent_flag_before_data", {1, [](Buffers& b) {
         run_concurrent(b, [&](Channel c) {
           launch_kernel(ConsumerKernel, 1, b.n, 0, nullptr, b, c);
           launch_kernel(FlagBeforeDataKernel, 1, b.n, 0, nullptr, b, c);
         });
       }}},
      {"concurrent_flag_after_data", {1, [](Buffers& b) {
         run_concurrent(b, [&](Channel c) {
           launch_kernel(ConsumerKernel, 1, b.n, 0, nullptr, b, c);
           launch_kernel(FlagAfterDataKernel, 1, b.n, 0, nullptr, b, c);
         });
       }}},
      {"concurrent_missing_producer", {1, [](Buffers& b) {  // the consumer's flag is never set
         run_concurrent(b, [&](Channel c) {
           launch_kernel(ConsumerKernel, 1, b.n, 0, nullptr, b, c);
           launch_kernel(PingPongKernel, 2, 32, 0, nullptr, b, c, 1, 0, 2);  // sets nothing, exits
         });
       }}},
      {"concurrent_ping_pong", {1, [](Buffers& b) {  // n >= 7: out[0..1] rounds, out[2..6] configs
         run_concurrent(b, [&](Channel c) {
           launch_kernel(PingPongKernel, 2, 64, 0, nullptr, b, c, 0, 100, 2);
           launch_kernel(PingPongKernel, 3, 32, 0, nullptr, b, c, 1, 100, 4);
         });
       }}},
      {"concurrent_static_shared", {1, [](Buffers& b) {
         run_concurrent(b, [&](Channel) { launch_kernel(BlockSumKernel, 2, 32, 0, nullptr, b); });
       }}},
      {"concurrent_pool_too_large", {1, [](Buffers& b) {
         run_concurrent(b, [&](Channel c) { launch_kernel(BlockSumKernel, 1000, 1024, 0, nullptr, b); });
       }}},
      {"race_warp_exchange",
       {1, [](Buffers& b) { launch_kernel(WarpExchangeKernel, 1, 32, 128, nullptr, b, 0); check_launch(); }}},
      {"warp_exchange_syncwarp",
       {1, [](Buffers& b) { launch_kernel(WarpExchangeKernel, 1, 32, 128, nullptr, b, 1); check_launch(); }}},
      {"race_two_tiles",  // n = 2 * threads
       {1, [](Buffers& b) { launch_kernel(TwoTilesKernel, 1, b.n / 2, b.n * 2, nullptr, b, 0); check_launch(); }}},
      {"two_tiles",
       {1, [](Buffers& b) { launch_kernel(TwoTilesKernel, 1, b.n / 2, b.n * 2, nullptr, b, 1); check_launch(); }}},
      {"race_cp_async_publish",
       {1, [](Buffers& b) { launch_kernel(CpAsyncPublishKernel, 1, b.n, 64, nullptr, b, 0); check_launch(); }}},
      {"cp_async_publish",
       {1, [](Buffers& b) { launch_kernel(CpAsyncPublishKernel, 1, b.n, 64, nullptr, b, 1); check_launch(); }}},
      {"race_static_shared",
       {1, [](Buffers& b) { launch_kernel(StaticSharedExchangeKernel, 1, b.n, 0, nullptr, b, 0); check_launch(); }}},
      {"static_shared_exchange",
       {1, [](Buffers& b) { launch_kernel(StaticSharedExchangeKernel, 1, b.n, 0, nullptr, b, 1); check_launch(); }}},
      {"race_cluster_exchange",
       {1, [](Buffers& b) { launch_cluster(ClusterExchangeKernel, 2, 32, 128, dim3(2), b, 0); }}},
      {"cluster_exchange", {1, [](Buffers& b) { launch_cluster(ClusterExchangeKernel, 2, 32, 128, dim3(2), b, 1); }}},
      {"shared_atomics",
       {2, [](Buffers& b) { launch_kernel(SharedAtomicsKernel, 1, b.n, 64, nullptr, b); check_launch(); }}},
      {"deadlock", {1, [](Buffers& b) { launch_kernel(DeadlockKernel, 1, 64, 0, nullptr, b); check_launch(); }}},
      {"trap", {1, [](Buffers& b) { launch_kernel(TrapKernel, 2, 32, 0, nullptr, b); check_launch(); }}},
      {"stack_overflow",
       {1, [](Buffers& b) { launch_kernel(StackOverflowKernel, 1, 32, 0, nullptr, b); check_launch(); }}},
      {"misaligned_cp_async",
       {1, [](Buffers& b) { launch_kernel(MisalignedCpAsyncKernel, 1, 32, 64, nullptr, b); check_launch(); }}},
      {"too_many_threads",
       {1, [](Buffers& b) { launch_kernel(EmptyKernel, 1, 2048, 0, nullptr, b); check_launch(); }}},
      {"smem_without_attribute",
       {1, [](Buffers& b) { launch_kernel(EmptyKernel, 1, 32, 64 * 1024, nullptr, b); check_launch(); }}},
      {"cluster_reduce",
       {1, [](Buffers& b) { launch_cluster(ClusterReduceKernel, dim3(4, 2), 64, 256, dim3(2, 2), b, 1); }}},
      {"cluster_reduce_ex", {1, [](Buffers& b) { launch_reduce_ex(b); }}},
      {"cluster_missing_final_sync",
       {1, [](Buffers& b) { launch_cluster(ClusterReduceKernel, dim3(4, 2), 64, 256, dim3(2, 2), b, 0); }}},
      {"cluster_rank_out_of_range",
       {1, [](Buffers& b) { launch_cluster(ClusterRankOutOfRangeKernel, 4, 32, 128, dim3(4), b); }}},
      {"cluster_deadlock", {1, [](Buffers& b) { launch_cluster(ClusterSplitSyncKernel, 2, 32, 0, dim3(2), b); }}},
      {"cluster_static_shared",
       {1, [](Buffers& b) { launch_cluster(ClusterStaticSharedKernel, 2, 32, 0, dim3(2), b); }}},
      {"cluster_grid_not_divisible",
       {1, [](Buffers& b) { launch_cluster(ClusterReduceKernel, dim3(3, 2), 64, 256, dim3(2, 2), b, 1); }}},
      {"cluster_16_nonportable",
       {1, [](Buffers& b) {
          INFEROPS_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(ClusterRankKernel),
                                                   cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
          launch_cluster(ClusterRankKernel, 32, 64, 0, dim3(16), b);
        }}},
      {"metrics_copy", {1, [](Buffers& b) { launch_kernel(MetricsCopyKernel, b.n / 64, 64, 0, nullptr, b, 1); check_launch(); }}},
      {"metrics_copy_stride2",
       {1, [](Buffers& b) { launch_kernel(MetricsCopyKernel, b.n / 128, 64, 0, nullptr, b, 2); check_launch(); }}},
      {"metrics_broadcast",
       {1, [](Buffers& b) { launch_kernel(MetricsBroadcastKernel, b.n / 64, 64, 0, nullptr, b); check_launch(); }}},
      {"metrics_shared_stride1",
       {1, [](Buffers& b) { launch_kernel(MetricsSharedStrideKernel, 1, 32, 32 * 33 * 4, nullptr, b, 1); check_launch(); }}},
      {"metrics_shared_stride2",
       {1, [](Buffers& b) { launch_kernel(MetricsSharedStrideKernel, 1, 32, 32 * 33 * 4, nullptr, b, 2); check_launch(); }}},
      {"metrics_shared_stride32",
       {1, [](Buffers& b) { launch_kernel(MetricsSharedStrideKernel, 1, 32, 32 * 33 * 4, nullptr, b, 32); check_launch(); }}},
      {"metrics_shared_stride33",
       {1, [](Buffers& b) { launch_kernel(MetricsSharedStrideKernel, 1, 32, 32 * 33 * 4, nullptr, b, 33); check_launch(); }}},
      {"metrics_ldmatrix_conflicts",  // n = 256; out: 4 per thread (n/2 floats used)
       {1, [](Buffers& b) { launch_kernel(MetricsLdmatrixKernel, 1, 32, 32 * 128, nullptr, b, 128); check_launch(); }}},
      {"metrics_ldmatrix_padded",
       {1, [](Buffers& b) { launch_kernel(MetricsLdmatrixKernel, 1, 32, 32 * 144, nullptr, b, 144); check_launch(); }}},
      {"cluster_too_large",
       {1, [](Buffers& b) { launch_cluster(EmptyKernel, 16, 32, 0, dim3(16), b); }}},
      {"grid_y_too_large",
       {1, [](Buffers& b) { launch_kernel(EmptyKernel, dim3(1, 70000), 32, 0, nullptr, b); check_launch(); }}},
  };
  return r;
}

}  // namespace

std::vector<std::string> names() {
  std::vector<std::string> out;
  for (const auto& [k, v] : registry()) out.push_back(k);
  return out;
}

std::vector<float> run(const std::string& name, const std::vector<float>& input) {
  const auto& r = registry();
  auto it = r.find(name);
  INFEROPS_CHECK_ARG(it != r.end(), "unknown executor self-test `", name, "`");
  const int n = static_cast<int>(input.size());
  // Exactly n floats (a heap block of its own: an access past it is an AddressSanitizer report).
  std::unique_ptr<float[]> in(new float[static_cast<std::size_t>(n)]);
  std::copy(input.begin(), input.end(), in.get());
  const int per = it->second.first;
  std::vector<float> out(static_cast<std::size_t>(n) * per, NAN);
  Buffers b{in.get(), out.data(), n};
  it->second.second(b);
  return out;
}

}  // namespace inferops::simt_selftest
