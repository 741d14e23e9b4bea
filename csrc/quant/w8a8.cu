// W8A8 GEMM (INT8 and FP8 e4m3) and per-token quantization.
//
// W8A8GemmKernel<kFp8, OutT>: y[M, N] = (x_q[M, K] . w_q[N, K]^T) * x_scale[m] * w_scale[n]
//   (+ bias[n]). Both operands are K-major (x row-major, w in nn.Linear layout), which is
//   what mma.sync .row.col wants for 8-bit types, so no transpose anywhere.
//   - Block tile 128 x 128 x 64 (bytes = elements), 8 warps as 2 (M) x 4 (N), warp tile
//     64 x 32 = 4 x 4 mma.sync.m16n8k32 per 32-wide k step: s8.s8 -> s32 (exact) or
//     e4m3.e4m3 -> f32. On sm_90a only the INT8 one is native (IMMA.16832.S8.S8): ptxas
//     lowers the e4m3 mma.sync to F2FP.F16.E4M3.UNPACK_B conversions (1.5 per HMMA) +
//     2 x HMMA.16816.F32 (from zero) + 4 FADD into C (SASS of this file), i.e. FP8 runs
//     on the fp16 tensor-core rate, never faster than a BF16 mma.sync kernel; Hopper's
//     FP8 tensor-core rate is reachable only through wgmma. (The per-mma FADD also makes
//     the fp32 accumulation exact-ish; a native e4m3 mma, sm_89 / sm_120, keeps only
//     ~13 mantissa bits of C and would need explicit promotion if ever built there.)
//   - Global -> shared with cp.async.cg (16 B, L2 only) in a kStages = 4 deep ring, so
//     three k tiles are in flight while one is multiplied. Out-of-range rows and the K tail
//     are zero-filled by cp.async's src-size operand (0x00 is zero in int8 and e4m3).
//   - Shared layout per stage: A [128 rows][64 B], B [128 rows][64 B], the four 16-byte
//     chunks of a row XOR-swizzled by (row >> 1) & 3, so ldmatrix (8 rows x 16 B per
//     matrix) and the cp.async writes are bank-conflict free.
//     Budget: 4 stages x (128 x 64 + 128 x 64) B = 64 KiB dynamic shared memory.
//   - ldmatrix works unchanged for 8-bit operands: a 16 x 32-byte fragment of
//     m16n8k32 has the same byte layout as the 16 x 16 fp16 fragment of m16n8k16.
//   - Epilogue in fp32 straight from registers: acc * x_scale[m] * w_scale[n] + bias[n],
//     stored as fp16/bf16 pairs.
//   Limits: mma.sync (not wgmma + TMA) reaches at most ~75% of Hopper's tensor peak
//   (docs/quant.md), this untuned tile less; cuBLAS-class FP8 rates need wgmma.
//   Registers: 125 (INT8, 2 blocks/SM) and 136 (FP8, 1 block/SM: capping it at 128
//   spills). M <= 64 wastes most of the 128-row tile (decode-sized W8A8 is not this
//   kernel's target). One tile configuration is compiled.
//
// QuantizePerTokenKernel<T, Q>: one block per row: amax (16-byte loads), block max,
//   scale = max(amax / qmax, 1e-10), q = rne(x / scale) with IEEE division, so results
//   equal the PyTorch reference bit for bit. The second read of the row hits L1/L2.
#include <cuda_fp8.h>

#include <type_traits>

#include "common/kernel_launch.cuh"
#include "common/cp_async.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/mma.cuh"
#include "common/ptx.cuh"
#include "common/vec.cuh"
#include "quant.h"
#include "quant_rules.cuh"

namespace inferops::quant {

namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64;  // kBK in bytes == elements
constexpr int kStages = 4;
constexpr int kGemmThreads = 256;
constexpr int kTileBytes = kBM * kBK;                      // 8 KiB per operand per stage
constexpr int kGemmSmem = kStages * 2 * kTileBytes;        // 64 KiB

// Byte offset of (row, 16-byte chunk) inside one [rows][64 B] swizzled tile.
__device__ __forceinline__ int swz(int row, int chunk) { return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 4); }

// One k tile (kBK bytes of kBM rows of x and kBN rows of w) into stage `st`.
__device__ __forceinline__ void load_tile(const W8A8Params& p, uint8_t* sa, uint8_t* sb, int m0, int n0,
                                          int k0) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < (kBM * kBK / 16) / kGemmThreads; ++i) {  // 2 chunks per thread per operand
    const int id = tid + i * kGemmThreads;
    const int row = id >> 2, chunk = id & 3;
    const int k = k0 + chunk * 16;
    const bool kin = k < p.k;  // K % 16 == 0: a chunk is all in or all out
    {
      const int gm = m0 + row;
      const bool ok = kin && gm < p.m;
      const uint8_t* src = static_cast<const uint8_t*>(p.x) + (ok ? int64_t(gm) * p.ldx + k : 0);
      cp_async_16_zfill(sa + swz(row, chunk), src, ok ? 16 : 0);
    }
    {
      const int gn = n0 + row;
      const bool ok = kin && gn < p.n;
      const uint8_t* src = static_cast<const uint8_t*>(p.w) + (ok ? int64_t(gn) * p.ldw + k : 0);
      cp_async_16_zfill(sb + swz(row, chunk), src, ok ? 16 : 0);
    }
  }
}

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* out, int64_t idx, float v0, float v1, bool two, bool vec) {
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

template <bool kFp8, typename OutT>
__global__ void __launch_bounds__(kGemmThreads) W8A8GemmKernel(const __grid_constant__ W8A8Params p) {
  using Acc = std::conditional_t<kFp8, float, int32_t>;
  INFEROPS_DYNAMIC_SMEM(uint8_t, smem, 128);
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
  const int ktiles = (p.k + kBK - 1) / kBK;

  Acc acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = Acc(0);

  auto stage_a = [&](int s) { return smem + s * 2 * kTileBytes; };
  auto stage_b = [&](int s) { return smem + s * 2 * kTileBytes + kTileBytes; };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_tile(p, stage_a(s), stage_b(s), m0, n0, s * kBK);
    cp_async_commit();  // empty groups keep the wait count uniform
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt visible to all; everyone is done with tile kt - 1's stage
    const int next = kt + kStages - 1;
    if (next < ktiles) load_tile(p, stage_a(next % kStages), stage_b(next % kStages), m0, n0, next * kBK);
    cp_async_commit();

    const uint8_t* sa = stage_a(kt % kStages);
    const uint8_t* sb = stage_b(kt % kStages);
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // matrices: rows 0-7 / 8-15 of the 16-row tile x k bytes 0-15 / 16-31
        const int row = wm + mi * 16 + (lane & 15);
        ldmatrix_x4(a[mi], sa + swz(row, ks * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        // matrices: n 0-7 k 0-15, n 0-7 k 16-31, n 8-15 k 0-15, n 8-15 k 16-31
        const int row = wn + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t r[4];
        ldmatrix_x4(r, sb + swz(row, ks * 2 + ((lane >> 3) & 1)));
        b[nj * 2][0] = r[0];
        b[nj * 2][1] = r[1];
        b[nj * 2 + 1][0] = r[2];
        b[nj * 2 + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16832(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: c0, c1 at (row g, cols 2t, 2t+1); c2, c3 at row g + 8.
  OutT* out = static_cast<OutT*>(p.out);
  // Paired 4-byte stores need an even row length and a 4-byte aligned base (the C++ entry
  // only requires `out` contiguous: a view at an odd element offset is legal).
  const bool vec = (p.n & 1) == 0 && is_aligned(p.out, 4);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) {
    const int col = n0 + wn + ni * 8 + t * 2;
    if (col >= p.n) continue;
    const bool two = col + 1 < p.n;
    const float ws0 = p.w_scale[col], ws1 = two ? p.w_scale[col + 1] : 0.f;
    const float b0 = p.bias ? p.bias[col] : 0.f, b1 = (p.bias && two) ? p.bias[col + 1] : 0.f;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm + mi * 16 + g + h * 8;
        if (row >= p.m) continue;
        const float xs = p.x_scale[row];
        const float v0 = float(acc[mi][ni][2 * h]) * xs * ws0 + b0;
        const float v1 = float(acc[mi][ni][2 * h + 1]) * xs * ws1 + b1;
        store_pair(out, int64_t(row) * p.n + col, v0, v1, two, vec);
      }
    }
  }
}

// ---- per-token quantization ---------------------------------------------------------------

constexpr int kQuantThreads = 256;
constexpr int kCached = 4;  // 16-byte vectors per thread kept in registers between the passes

template <typename T, typename Q>
__global__ void __launch_bounds__(kQuantThreads) QuantizePerTokenKernel(const __grid_constant__ QuantizeParams p) {
  constexpr int kV = kVec16<T>;  // elements per 16-byte load
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int cols = p.cols;
  const T* x = static_cast<const T*>(p.x) + row * cols;
  Q* q = static_cast<Q*>(p.q) + row * cols;
  const bool vec = cols % kV == 0;  // then every row start is 16-byte aligned too
  float amax = 0.f;
  if (vec) {
    // The first kCached vectors of each thread stay in registers for the quantizing pass, so
    // a row of up to kQuantThreads * kCached * kV elements (8192 of bf16) is read from global
    // memory once; longer rows re-read the rest. (Reading the row twice moved 2x the ideal
    // bytes: executor metrics, M=4096 K=4096.)
    Vec<T, kV> cached[kCached];
#pragma unroll
    for (int c = 0; c < kCached; ++c) {
      const int i = (threadIdx.x + c * kQuantThreads) * kV;
      if (i < cols) {
        cached[c].load(x + i);
#pragma unroll
        for (int j = 0; j < kV; ++j) amax = fmax_nan(amax, fabsf(to_float(cached[c].v[j])));
      }
    }
#pragma unroll 4  // independent 16-byte loads: keep several in flight
    for (int i = (threadIdx.x + kCached * kQuantThreads) * kV; i < cols; i += kQuantThreads * kV) {
      Vec<T, kV> v;
      v.load(x + i);
#pragma unroll
      for (int j = 0; j < kV; ++j) amax = fmax_nan(amax, fabsf(to_float(v.v[j])));
    }
    amax = block_max(amax, red);
    const float scale = fmax_nan(amax / QuantTraits<Q>::kMax, kQuantScaleMin);  // NaN row -> NaN scale
    auto quantize = [&](const Vec<T, kV>& v, int i) {
      Vec<Q, kV> o;
#pragma unroll
      for (int j = 0; j < kV; ++j) o.v[j] = QuantTraits<Q>::quantize(to_float(v.v[j]) / scale);
      o.store(q + i);
    };
#pragma unroll
    for (int c = 0; c < kCached; ++c) {
      const int i = (threadIdx.x + c * kQuantThreads) * kV;
      if (i < cols) quantize(cached[c], i);
    }
#pragma unroll 4
    for (int i = (threadIdx.x + kCached * kQuantThreads) * kV; i < cols; i += kQuantThreads * kV) {
      Vec<T, kV> v;
      v.load(x + i);
      quantize(v, i);
    }
    if (threadIdx.x == 0) p.scale[row] = scale;
    return;
  }
  for (int i = threadIdx.x; i < cols; i += kQuantThreads) amax = fmax_nan(amax, fabsf(to_float(x[i])));
  amax = block_max(amax, red);
  const float scale = fmax_nan(amax / QuantTraits<Q>::kMax, kQuantScaleMin);  // NaN row -> NaN scale
  for (int i = threadIdx.x; i < cols; i += kQuantThreads) q[i] = QuantTraits<Q>::quantize(to_float(x[i]) / scale);
  if (threadIdx.x == 0) p.scale[row] = scale;
}

}  // namespace

void launch_w8a8_matmul(const W8A8Params& p, DType in_dtype, DType out_dtype, int device,
                        std::uintptr_t stream) {
  DeviceGuard guard(device);
  const int64_t mt = (int64_t(p.m) + kBM - 1) / kBM, nt = (int64_t(p.n) + kBN - 1) / kBN;
  INFEROPS_CHECK_ARG(nt <= 65535, "expected N <= ", 65535LL * kBN, " for `w_q`, got ", p.n);
  const dim3 grid(static_cast<unsigned>(mt), static_cast<unsigned>(nt));
  dispatch_half(out_dtype, "out", [&](auto tag) {
    using OutT = typename decltype(tag)::type;
    auto run = [&](auto kernel) {
      set_dynamic_smem(kernel, kGemmSmem, device);
      launch_kernel(kernel, grid, kGemmThreads, kGemmSmem, as_stream(stream), p);
      INFEROPS_CUDA_CHECK(cudaGetLastError());
    };
    if (in_dtype == DType::kInt8) {
      run(W8A8GemmKernel<false, OutT>);
    } else {
      INFEROPS_CHECK_TYPE(in_dtype == DType::kFloat8E4M3, "expected dtype int8 or float8_e4m3fn for `x_q`, got ",
                          dtype_name(in_dtype));
      const DeviceInfo& info = device_info(device);
      INFEROPS_CHECK_ARG(info.cc_major * 10 + info.cc_minor >= 89, "expected a device of compute capability >= 8.9 "
                         "for float8_e4m3fn `x_q` (FP8 tensor-core mma), got ", info.cc_major, ".", info.cc_minor);
      run(W8A8GemmKernel<true, OutT>);
    }
  });
}

void launch_quantize_per_token(const QuantizeParams& p, DType in_dtype, DType q_dtype, int device,
                               std::uintptr_t stream) {
  DeviceGuard guard(device);
  INFEROPS_CHECK_ARG(p.rows <= 0x7fffffff, "too many rows for `x`: ", p.rows);
  dispatch_float(in_dtype, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (q_dtype == DType::kInt8) {
      launch_kernel(QuantizePerTokenKernel<T, int8_t>, static_cast<unsigned>(p.rows), kQuantThreads, 0,
                    as_stream(stream), p);
    } else {
      launch_kernel(QuantizePerTokenKernel<T, __nv_fp8_storage_t>, static_cast<unsigned>(p.rows), kQuantThreads, 0,
                    as_stream(stream), p);
    }
    INFEROPS_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace inferops::quant
