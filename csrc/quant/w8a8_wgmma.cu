// Experimental FP8 e4m3 GEMM on Hopper's native FP8 tensor cores (wgmma), opt-in through
// w8a8_matmul(..., path="wgmma"). Same math and contract as W8A8GemmKernel (w8a8.cu):
//   y[M, N] = (x_q[M, K] . w_q[N, K]^T) * x_scale[m] * w_scale[n] (+ bias[n]).
// Why: ptxas lowers `mma.sync ... e4m3` on sm_90a to e4m3 -> fp16 unpacks + fp16 HMMA
// (see w8a8.cu), so only `wgmma.mma_async ... e4m3` reaches the FP8 rate.
//
// Design (status: compiled for sm_90a, NEVER RUN on a GPU yet; runs on the CPU SIMT
// executor, which models wgmma (csrc/simt/wgmma.cpp); docs/quant.md):
//   - CTA tile 128 (M) x 128 (N) x 128 (K bytes = elements) per stage, 256 threads = two
//     consumer warpgroups; warpgroup g owns rows 64 g .. 64 g + 63 of the tile and issues
//     4 x wgmma.m64n128k32.f32.e4m3.e4m3 per k tile (64 fp32 accumulators per thread).
//     No producer warp / TMA: every thread also loads (simpler, and the mode the issue
//     allows); a warp-specialised TMA version is the next step if this one is correct.
//   - Global -> shared with cp.async.cg 16-byte copies (zero-filled beyond M, N and K),
//     kStages = 5 deep ring, prefetch distance kStages - 2 tiles (see the main loop for
//     why not kStages - 1). 5 x 32 KiB = 160 KiB of dynamic shared memory, 1 CTA / SM.
//   - Shared layout per stage and operand: [128 rows][128 B] (K-major), the 16-byte chunk c
//     of row r stored at chunk c ^ (r & 7): exactly the PTX "128B swizzle" pattern (address
//     bits [4:6] ^= bits [7:9]) when the tile starts 1024-byte aligned, which we enforce.
//   - wgmma matrix descriptors (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start
//     address >> 4, 16-29 leading byte offset >> 4 (unused for swizzled K-major layouts
//     whose k extent, 32 B here, stays inside the 128 B swizzle atom; set to 1), 32-45
//     stride byte offset >> 4 (1024 B between 8-row groups), 49-51 base offset (0: atoms
//     1024-aligned), 62-63 swizzle mode (1 = 128B). The k-th k32 slice of a tile is
//     addressed by advancing the start address by 32 k bytes; the hardware applies the XOR
//     to the full address, which lands on where the loader put the chunk.
//   - cp.async writes are generic-proxy writes and wgmma reads shared memory through the
//     async proxy: each thread waits for its copies, then fence.proxy.async.shared::cta,
//     then __syncthreads, before any wgmma reads the stage (PTX ISA memory consistency,
//     "async proxy").
//   - wgmma discipline: wgmma.fence before the first wgmma of each k tile (the accumulator
//     registers were last written by earlier wgmmas / zero init), commit_group after the
//     4, wait_group 1 at the end of the iteration (the previous tile's group has retired,
//     so its stage may be refilled after the next __syncthreads), wait_group 0 before the
//     epilogue reads the accumulators.
//   - Accumulator fragment (m64nNk32, fp32): warp w of the warpgroup, lane l (g = l / 4,
//     t = l % 4), register i: row 16 w + g + 8 ((i / 2) % 2), col 8 (i / 4) + 2 t + (i % 2).
//   - Epilogue in fp32 from registers: acc * x_scale[m] * w_scale[n] + bias[n], fp16/bf16
//     pairs, every store predicated on m < M, n < N.
// One instantiation per output dtype (fp16, bf16).
#include <cuda_fp8.h>

#include <cstdint>

#include "common/kernel_launch.cuh"
#include "common/cp_async.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "common/wgmma.cuh"
#include "quant.h"


namespace inferops::quant {

namespace {

constexpr int kWgBM = 128, kWgBN = 128, kWgBK = 128;  // kWgBK in bytes == fp8 elements
constexpr int kWgStages = 5;
constexpr int kWgThreads = 256;                       // two consumer warpgroups
constexpr int kWgTileA = kWgBM * kWgBK;               // 16 KiB
constexpr int kWgTileB = kWgBN * kWgBK;               // 16 KiB
constexpr int kWgStageBytes = kWgTileA + kWgTileB;
constexpr int kWgSmem = kWgStages * kWgStageBytes + 1024;  // + slack to align the ring to 1024 B
static_assert(kWgTileA % 1024 == 0 && kWgTileB % 1024 == 0, "swizzle atoms must stay 1024-byte aligned");

#ifdef INFEROPS_WGMMA_DEVICE

static_assert(kWgBK == 128, "operand rows are one 128-byte swizzle row (wg_swz128)");

// One k tile (kWgBK bytes of kWgBM rows of x and kWgBN rows of w) into the stage at `sa`.
__device__ __forceinline__ void wg_load_tile(const W8A8Params& p, uint32_t sa, int m0, int n0, int k0) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < (kWgBM * kWgBK / 16) / kWgThreads; ++i) {  // 4 chunks per thread per operand
    const int id = tid + i * kWgThreads;
    const int row = id >> 3, chunk = id & 7;  // 8 threads fill one 128-byte row: coalesced
    const int k = k0 + chunk * 16;
    const bool kin = k < p.k;  // K % 16 == 0: a chunk is all in or all out
    {
      const int gm = m0 + row;
      const bool ok = kin && gm < p.m;
      const uint8_t* src = static_cast<const uint8_t*>(p.x) + (ok ? int64_t(gm) * p.ldx + k : 0);
      cp_async_16_zfill(sa + wg_swz128(row, chunk), src, ok ? 16 : 0);
    }
    {
      const int gn = n0 + row;
      const bool ok = kin && gn < p.n;
      const uint8_t* src = static_cast<const uint8_t*>(p.w) + (ok ? int64_t(gn) * p.ldw + k : 0);
      cp_async_16_zfill(sa + kWgTileA + wg_swz128(row, chunk), src, ok ? 16 : 0);
    }
  }
}

template <typename OutT>
__device__ __forceinline__ void wg_store_pair(OutT* out, int64_t idx, float v0, float v1, bool two, bool vec) {
  if (two && vec) {
    Vec<OutT, 2> o;
    o.v[0] = from_float<OutT>(v0);
    o.v[1] = from_float<OutT>(v1);
    o.store(out + idx);
  } else {
    out[idx] = from_float<OutT>(v0);
    if (two) out[idx + 1] = from_float<OutT>(v1);
  }
}

#endif  // INFEROPS_WGMMA_DEVICE

template <typename OutT>
__global__ void __launch_bounds__(kWgThreads, 1) W8A8WgmmaFp8Kernel(const __grid_constant__ W8A8Params p) {
#ifdef INFEROPS_WGMMA_DEVICE
  INFEROPS_DYNAMIC_SMEM(uint8_t, wg_smem, 1024);
  // The 128B swizzle is a function of the absolute shared address: align the ring to 1024.
  const uint32_t smem0 = (static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem)) + 1023u) & ~1023u;
  const int m0 = blockIdx.x * kWgBM, n0 = blockIdx.y * kWgBN;
  const int wg = threadIdx.x >> 7;  // warpgroup: rows 64 wg .. 64 wg + 63 of the tile
  const int ktiles = (p.k + kWgBK - 1) / kWgBK;
  constexpr int kAhead = kWgStages - 2;  // prefetch distance (tiles)

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;

  auto stage = [&](int s) { return smem0 + uint32_t(s) * kWgStageBytes; };

#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < ktiles) wg_load_tile(p, stage(s), m0, n0, s * kWgBK);
    cp_async_commit();  // empty groups keep the count uniform
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    // kAhead + kt groups committed; tile kt is group kt: at most kAhead - 1 may stay pending.
    cp_async_wait<kAhead - 1>();
    // This thread's cp.async (generic proxy) writes -> visible to the async proxy (wgmma).
    fence_proxy_async_shared();
    // Everyone's tile kt has landed. Also: each warpgroup ended iteration kt - 1 with
    // wgmma.wait_group 1, so all wgmmas of tile kt - 2 have retired in both warpgroups,
    // and tile kt - 2's stage, (kt + kAhead) % kWgStages, may be refilled now. (With a
    // prefetch distance of kWgStages - 1 the refilled stage would be tile kt - 1's, whose
    // wgmmas may still be in flight.)
    __syncthreads();
    const int next = kt + kAhead;
    if (next < ktiles) wg_load_tile(p, stage(next % kWgStages), m0, n0, next * kWgBK);
    cp_async_commit();

    const uint32_t sa = stage(kt % kWgStages) + uint32_t(wg) * (64 * kWgBK);  // this warpgroup's 64 rows
    const uint32_t sb = stage(kt % kWgStages) + kWgTileA;
    acc_fence(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kWgBK / 32; ++ks) {
      wgmma_m64n128k32_e4m3(acc, wg_desc_kmajor_128b(sa + ks * 32), wg_desc_kmajor_128b(sb + ks * 32), 1);
    }
    wgmma_commit();
    acc_fence(acc);
    wgmma_wait<1>();
    acc_fence(acc);
  }
  wgmma_wait<0>();
  acc_fence(acc);
  cp_async_wait<0>();

  OutT* out = static_cast<OutT*>(p.out);
  const bool vec = (p.n & 1) == 0 && is_aligned(p.out, 4);
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row_base = m0 + wg * 64 + warp * 16 + g;
  float xs[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) xs[h] = row_base + 8 * h < p.m ? p.x_scale[row_base + 8 * h] : 0.f;
#pragma unroll
  for (int j = 0; j < kWgBN / 8; ++j) {
    const int col = n0 + 8 * j + 2 * t;
    if (col >= p.n) continue;
    const bool two = col + 1 < p.n;
    const float ws0 = p.w_scale[col], ws1 = two ? p.w_scale[col + 1] : 0.f;
    const float b0 = p.bias ? p.bias[col] : 0.f, b1 = (p.bias && two) ? p.bias[col + 1] : 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row_base + 8 * h;
      if (row >= p.m) continue;
      const float v0 = acc[4 * j + 2 * h] * xs[h] * ws0 + b0;
      const float v1 = acc[4 * j + 2 * h + 1] * xs[h] * ws1 + b1;
      wg_store_pair(out, int64_t(row) * p.n + col, v0, v1, two, vec);
    }
  }
#else
  // Built without sm_90a features (wgmma needs the arch-specific target): the launcher
  // refuses non-sm_90 devices, so reaching this means an sm_90 build without the `a`.
  __trap();
#endif
}

}  // namespace

void launch_w8a8_matmul_wgmma(const W8A8Params& p, DType in_dtype, DType out_dtype, int device,
                              std::uintptr_t stream) {
  DeviceGuard guard(device);
  INFEROPS_CHECK_TYPE(in_dtype == DType::kFloat8E4M3, "expected float8_e4m3fn `x_q` for path=\"wgmma\", got ",
                      dtype_name(in_dtype), " (INT8 runs on path=\"mma\")");
  const DeviceInfo& info = device_info(device);
  INFEROPS_CHECK_ARG(info.cc_major == 9 && info.cc_minor == 0,
                     "expected an sm_90 (Hopper) device for path=\"wgmma\" (wgmma is sm_90a only), got sm_",
                     info.cc_major, info.cc_minor, " on device ", device);
  const int64_t mt = (int64_t(p.m) + kWgBM - 1) / kWgBM, nt = (int64_t(p.n) + kWgBN - 1) / kWgBN;
  INFEROPS_CHECK_ARG(nt <= 65535, "expected N <= ", 65535LL * kWgBN, " for `w_q`, got ", p.n);
  const dim3 grid(static_cast<unsigned>(mt), static_cast<unsigned>(nt));
  dispatch_half(out_dtype, "out", [&](auto tag) {
    using OutT = typename decltype(tag)::type;
    auto kernel = W8A8WgmmaFp8Kernel<OutT>;
    set_dynamic_smem(kernel, kWgSmem, device);
    launch_kernel(kernel, grid, kWgThreads, kWgSmem, as_stream(stream), p);
    INFEROPS_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace inferops::quant
