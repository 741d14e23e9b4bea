// Online Hadamard rotation fused with per-token quantization (OstQuant / QuaRot down_proj input).
//
// HadamardQuantizeKernel<T, kM, OutT>: one block (256 threads) per token row of n = kM * P
// elements (P = 2^k >= 8). The row x, viewed as X [kM, P], becomes
// Y = H_m^T X H_P / sqrt(n)  ( = x @ kron(H_m, H_P) / sqrt(n) ), then is quantized per token.
// The two factors commute; the order depends on the path.
//
// kM = 1, 12, 20, 28 (CUDA cores, FWHT first):
//   1. Load: each thread takes 8 consecutive elements (one 16-byte load; kBatch = 4 such
//      loads issued before use) and runs the first three FWHT stages in registers; stages
//      h = 8 .. min(P, 256) / 2 run between lanes of a warp with __shfl_xor (a warp owns
//      256 consecutive elements, and butterflies never leave a P-aligned chunk). The fp32
//      row then goes to shared memory.
//   2. Stages h >= 256 in shared memory, one __syncthreads each (log2(P) - 8 of them).
//   3. Dense factor Y[c, d] = sum_a H_m[a, c] X[a, d]: a thread owns whole columns d (kM
//      values in registers); H_m comes in the kernel parameters (HadamardSmallFactor), so
//      each fully unrolled FMA reads its +-1 from the constant cache (kM FMAs per element:
//      28 at 14336 / 28672). Result written in place.
//   4. amax of the scaled result (block reduction), scale = max(amax / qmax, 1e-10), and
//      the quantized (or rounded fp16/bf16) row written with 8-element vector stores.
//   Shared memory: 4 n bytes (28672: 112 KiB).
//
// kM = 108, 344 (tensor cores, dense factor FIRST on the raw fp16/bf16 input):
//   0. Stage the A-fragment sign words of H_m^T (see below) and the raw row X as T in
//      shared memory, [m16][S] (m16 = kM rounded up to 16, rows kM..m16-1 zero, row stride
//      S = P + 8 (P = 8: 24) so ldmatrix phases are bank-conflict free).
//   1. Z = H_m^T X with mma.sync m16n8k16 (A = H_m^T [m16, m16], B = X [m16, P], fp32
//      accumulation): H's entries are +-1 and X's are fp16/bf16, so every product is exact
//      and only the fp32 accumulation rounds. A warp block is one 16-row tile of Z times
//      4 n8-tiles (32 columns; P = 8 / 16: 1 n-tile pair; at P = 8 its second n-tile reads
//      columns 8..15 of the stride padding, never written, and is dropped: a B column only
//      feeds the same C column, so garbage or NaN there cannot reach a stored value);
//      B fragments come from ldmatrix.x4.trans (X is k-major in shared memory). Z (fp32)
//      goes to a [kM][P] buffer. 2 * m16 FLOP per element (344: 704).
//   2. FWHT of Z along P as in steps 1-2 above, reading Z from shared memory.
//   3. 1/sqrt(n), amax, scale and write as in step 4 above.
//   A fragments: the m16n8k16 A tile holds 8 values per lane in 4 registers,
//   reg i = (A[r_i][k_i], A[r_i][k_i + 1]) with r = g, g + 8, g, g + 8 and k = 2q, 2q, 2q + 8,
//   2q + 8 (i = 0..3; g = lane / 4, q = lane % 4). Each value is +-1, so one sign bit is
//   enough: word [ct][kw][lane] covers the 4 k-tiles kt = 4 kw + t; the sign of the low
//   (high) half of reg i of k-tile t is bit 15 - (4 t + i) (31 - (4 t + i)), and
//   reg = ONE | ((word << (4 t + i)) & 0x80008000) with ONE = two fp16/bf16 1.0s.
//   Padded entries (row or column >= kM) are +1: padded rows of Z are not stored, padded
//   columns multiply the zero rows of X. H_m^T as fp16 would need 242 KiB at m = 344; the
//   sign words take 16.5 KiB.
//   Shared memory: 4 n + 2 m16 S + 128 (m16 / 16) ceil(m16 / 64) bytes (11008: 87 KiB,
//   13824: 86 KiB, 27648 = 108 * 256: 168 KiB, 22016 = 344 * 64: 152 KiB).
//
// Rotation values stay fp32 until the final rounding; results differ from the PyTorch
// reference only by fp32 summation order and the 1/sqrt(n) multiply (tests allow one
// quantization step at rounding boundaries).
#include <cuda_fp8.h>

#include <cstring>
#include <type_traits>

#include "common/kernel_launch.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/mma.cuh"
#include "common/vec.cuh"
#include "quant.h"
#include "quant_rules.cuh"

namespace inferops::quant {

namespace {

constexpr int kThreads = 256;
constexpr int kBatch = 4;  // 16-byte loads in flight per thread in the load phase
constexpr int kRegMaxM = kHadamardParamMaxM;  // largest order with H_m in the parameters

template <typename O, typename = void>
struct OutTraits {  // fp16 / bf16 output: no quantization
  static constexpr bool kQuant = false;
  __device__ static O convert(float v) { return from_float<O>(v); }
};
template <typename Q>
struct OutTraits<Q, std::enable_if_t<std::is_same_v<Q, int8_t> || std::is_same_v<Q, __nv_fp8_storage_t>>> {
  static constexpr bool kQuant = true;  // the rule of quantize_per_token (quant_rules.cuh)
  static constexpr float kMax = QuantTraits<Q>::kMax;
  __device__ static Q convert(float v) { return QuantTraits<Q>::quantize(v); }
};

// Tensor-core dense step (kM > kRegMaxM): zs[c * P + d] = sum_a H_m[a, c] X[a, d] for c < kM,
// from xb = X as T [m16][S] (rows >= kM zero) and hw = A-fragment sign words (see the top).
template <typename T, int kM>
__device__ __forceinline__ void dense_factor_tc(const T* xb, const uint32_t* hw, float* zs, int P, int S) {
  constexpr int kM16 = hadamard_tc_pad(kM), kCT = kM16 / 16, kKW = hadamard_tc_words(kM);
  constexpr uint32_t kOne = std::is_same_v<T, __half> ? 0x3C003C00u : 0x3F803F80u;  // 1.0, 1.0
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int nt_total = P / 8;
  const int npairs = nt_total >= 4 ? 2 : 1;          // n-tile pairs per warp block
  const int nblocks = nt_total >= 4 ? nt_total / 4 : 1;  // warp blocks along n
  // ldmatrix.x4.trans: lanes 8j .. 8j + 7 address the rows of 8x8 matrix j = (k half, n half)
  // = (j & 1, j >> 1): row k0 + (lane & 15), columns n0 + (lane >> 4) * 8 .. + 7. Register j
  // then holds B[k0 + 8 (j & 1) + 2q, +1][n0 + 8 (j >> 1) + g]: (b0 b1, b2 b3) of n-tile 0
  // are registers 0, 1 and of n-tile 1 registers 2, 3.
  const uint32_t lane_addr =
      static_cast<uint32_t>(__cvta_generic_to_shared(xb)) + ((lane & 15) * S + (lane >> 4) * 8) * int(sizeof(T));
  for (int blk = warp; blk < kCT * nblocks; blk += kThreads / 32) {
    const int ct = blk / nblocks, nt0 = (blk % nblocks) * 4;
    float acc[4][4] = {};
    const uint32_t* wp = hw + ct * kKW * 32 + lane;
#pragma unroll
    for (int kw = 0; kw < kKW; ++kw) {
      const uint32_t w = wp[kw * 32];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int kt = kw * 4 + t;
        if (kt < kCT) {
          uint32_t a[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = kOne | ((w << (4 * t + i)) & 0x80008000u);
#pragma unroll
          for (int pp = 0; pp < 2; ++pp) {
            if (pp < npairs) {
              uint32_t b[4];
              ldmatrix_x4_trans(b, lane_addr + (kt * 16 * S + (nt0 + 2 * pp) * 8) * int(sizeof(T)));
              mma_16816<T>(acc[2 * pp], a, b[0], b[1]);
              mma_16816<T>(acc[2 * pp + 1], a, b[2], b[3]);
            }
          }
        }
      }
    }
    // C fragment: (c0, c1) at row g, columns 2q, 2q + 1; (c2, c3) at row g + 8.
    const int c0 = ct * 16 + g;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nt = nt0 + j;
      if (j < 2 * npairs && nt < nt_total) {
        const int d = nt * 8 + 2 * q;
        if (c0 < kM) *reinterpret_cast<float2*>(zs + c0 * P + d) = make_float2(acc[j][0], acc[j][1]);
        if (c0 + 8 < kM) *reinterpret_cast<float2*>(zs + (c0 + 8) * P + d) = make_float2(acc[j][2], acc[j][3]);
      }
    }
  }
}

// Group g's 8 floats at xs + 8 g, as two 16-byte accesses. Lanes with bit 2 set take the
// upper half first: a quarter-warp's 16-byte accesses to 32-byte groups otherwise hit every
// bank twice (2 wavefronts per phase instead of 1, executor metrics).
__device__ __forceinline__ void store_group8(float* xs, int64_t g, const float (&v)[8]) {
  float4* dst = reinterpret_cast<float4*>(xs + g * 8);
  const float4 lo = make_float4(v[0], v[1], v[2], v[3]), hi = make_float4(v[4], v[5], v[6], v[7]);
  const int sw = static_cast<int>(g >> 2) & 1;
  dst[sw] = sw ? hi : lo;
  dst[sw ^ 1] = sw ? lo : hi;
}
__device__ __forceinline__ void load_group8(const float* xs, int64_t g, float (&v)[8]) {
  const float4* src = reinterpret_cast<const float4*>(xs + g * 8);
  const int sw = static_cast<int>(g >> 2) & 1;
  const float4 a = src[sw], b = src[sw ^ 1];
  const float4 lo = sw ? b : a, hi = sw ? a : b;
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}

template <typename T, int kM, typename OutT>
__global__ void __launch_bounds__(kThreads)
    HadamardQuantizeKernel(const __grid_constant__ HadamardParams p, const __grid_constant__ HadamardSmallFactor f) {
  constexpr bool kTc = kM > kRegMaxM;  // dense factor on tensor cores
  INFEROPS_DYNAMIC_SMEM(float, smem, 16);
  __shared__ float red[32];
  const int n = p.n;
  const int P = 1 << p.log2_p;
  float* xs = smem;  // [n] fp32 row
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * n;
  const int lane = threadIdx.x & 31;
  const int groups = n / 8;

  if constexpr (kTc) {
    // 0. Stage the sign words and the raw row (T) with its zero pad rows.
    constexpr int kM16 = hadamard_tc_pad(kM);
    constexpr int kWords = 32 * (kM16 / 16) * hadamard_tc_words(kM);
    const int S = hadamard_tc_stride(P);
    T* xb = reinterpret_cast<T*>(xs + n);                          // [m16][S]
    uint32_t* hw = reinterpret_cast<uint32_t*>(xb + kM16 * S);     // [m16 / 16][words][32]
    for (int i = threadIdx.x; i < kWords / 4; i += kThreads) {
      reinterpret_cast<uint4*>(hw)[i] = reinterpret_cast<const uint4*>(p.hm_frag)[i];
    }
    const int gpr = P / 8;  // 8-element groups per row of X
    for (int i = threadIdx.x; i < (kM16 - kM) * gpr; i += kThreads) {
      *reinterpret_cast<uint4*>(xb + (kM + i / gpr) * S + (i % gpr) * 8) = make_uint4(0u, 0u, 0u, 0u);
    }
    for (int g0 = threadIdx.x; g0 < groups; g0 += kBatch * kThreads) {
      Vec<T, 8> in[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (g0 + u * kThreads < groups) in[u].load(x + int64_t(g0 + u * kThreads) * 8);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int g = g0 + u * kThreads;
        if (g < groups) {
          // Group g = elements 8 g .. 8 g + 7 = X[a, d .. d + 7] (P >= 8: never split).
          uint4 raw;
          memcpy(&raw, in[u].v, 16);
          *reinterpret_cast<uint4*>(xb + (g >> (p.log2_p - 3)) * S + (g & (gpr - 1)) * 8) = raw;
        }
      }
    }
    __syncthreads();
    // 1. Z = H_m^T X into xs.
    dense_factor_tc<T, kM>(xb, hw, xs, P, S);
    __syncthreads();
  }

  // FWHT (kTc: of Z, from shared memory; otherwise of x, from global memory).
  // Registers + shuffles: stages h = 1 .. min(P, 256) / 2. Global loads are issued kBatch at
  // a time before any of them is used, so each thread keeps kBatch 16-byte loads in flight
  // (a long row leaves room for only 2-4 blocks per SM: without batching that is too
  // little memory-level parallelism to approach HBM bandwidth).
  const int h_warp = P < 256 ? P : 256;
  for (int g0 = threadIdx.x & ~31; g0 < groups; g0 += kBatch * kThreads) {  // warp-uniform loop
    Vec<T, 8> in[kBatch];
    if constexpr (!kTc) {
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int g = g0 + u * kThreads + lane;
        if (g < groups) in[u].load(x + int64_t(g) * 8);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (g0 + u * kThreads >= groups) break;  // warp-uniform: the shuffles need every lane
      const int g = g0 + u * kThreads + lane;
      float v[8];
      if constexpr (kTc) {
        if (g < groups) {
          load_group8(xs, g, v);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = 0.f;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = g < groups ? to_float(in[u].v[j]) : 0.f;
      }
#pragma unroll
      for (int h = 1; h < 8; h <<= 1) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if ((i & h) == 0) {
            const float a = v[i], b = v[i + h];
            v[i] = a + b;
            v[i + h] = a - b;
          }
        }
      }
      for (int h = 8; h < h_warp; h <<= 1) {
        const int mask = h >> 3;
        const bool upper = lane & mask;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float o = __shfl_xor_sync(0xffffffffu, v[j], mask);
          v[j] = upper ? o - v[j] : v[j] + o;
        }
      }
      if (g < groups) {  // in place for kTc: only this thread reads group g
        store_group8(xs, g, v);
      }
    }
  }
  __syncthreads();

  // Shared-memory stages h = 256 .. P / 2 (pairs never cross a P-aligned chunk).
  for (int h = 256; h < P; h <<= 1) {
    for (int t = threadIdx.x; t < n / 2; t += kThreads) {
      const int i = (t / h) * 2 * h + (t % h);
      const float a = xs[i], b = xs[i + h];
      xs[i] = a + b;
      xs[i + h] = a - b;
    }
    __syncthreads();
  }

  // Dense factor (kM <= 28) and 1/sqrt(n); amax of the result.
  const float inv = p.inv_sqrt_n;
  float amax = 0.f;
  if constexpr (kM == 1 || kTc) {
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const float y = xs[i] * inv;
      xs[i] = y;
      amax = fmax_nan(amax, fabsf(y));
    }
  } else {
    for (int d = threadIdx.x; d < P; d += kThreads) {
      float col[kM];
#pragma unroll
      for (int a = 0; a < kM; ++a) col[a] = xs[a * P + d];
#pragma unroll
      for (int c = 0; c < kM; ++c) {
        float acc = 0.f;
#pragma unroll
        for (int a = 0; a < kM; ++a) acc = fmaf(f.h[a * kM + c], col[a], acc);
        const float y = acc * inv;
        xs[c * P + d] = y;  // this thread is the only reader of column d
        amax = fmax_nan(amax, fabsf(y));
      }
    }
  }

  // Scale and write.
  float scale = 1.f;
  if constexpr (OutTraits<OutT>::kQuant) {
    amax = block_max(amax, red);  // includes the barrier that publishes xs
    scale = fmax_nan(amax / OutTraits<OutT>::kMax, kQuantScaleMin);  // NaN row -> NaN scale
    if (threadIdx.x == 0) p.scale[row] = scale;
  } else {
    __syncthreads();
  }
  OutT* out = static_cast<OutT*>(p.out) + row * n;
  for (int g = threadIdx.x; g < groups; g += kThreads) {
    float r[8];
    load_group8(xs, g, r);
    Vec<OutT, 8> o;
#pragma unroll
    for (int j = 0; j < 8; ++j) o.v[j] = OutTraits<OutT>::convert(OutTraits<OutT>::kQuant ? r[j] / scale : r[j]);
    o.store(out + int64_t(g) * 8);
  }
}

int smem_bytes(int m, int n) { return static_cast<int>(hadamard_smem_bytes(m, n / m)); }

template <typename T, typename OutT>
void launch_typed(const HadamardParams& p, const HadamardSmallFactor& f, int device, cudaStream_t stream) {
  auto run = [&](auto kernel) {
    const int bytes = smem_bytes(p.m, p.n);
    const DeviceInfo& info = device_info(device);
    INFEROPS_CHECK_ARG(bytes + 256 <= info.max_smem_per_block_optin, "hadamard_quantize: n = ", p.n,
                       " (m = ", p.m, ") needs ", bytes, " bytes of shared memory, device ", device,
                       " allows ", info.max_smem_per_block_optin);
    set_dynamic_smem(kernel, bytes, device);
    launch_kernel(kernel, static_cast<unsigned>(p.rows), kThreads, bytes, stream, p, f);
    INFEROPS_CUDA_CHECK(cudaGetLastError());
  };
  switch (p.m) {
    case 1: run(HadamardQuantizeKernel<T, 1, OutT>); break;
    case 12: run(HadamardQuantizeKernel<T, 12, OutT>); break;
    case 20: run(HadamardQuantizeKernel<T, 20, OutT>); break;
    case 28: run(HadamardQuantizeKernel<T, 28, OutT>); break;
    case 108: run(HadamardQuantizeKernel<T, 108, OutT>); break;
    case 344: run(HadamardQuantizeKernel<T, 344, OutT>); break;
    default: INFEROPS_CHECK_ARG(false, "expected a dense Hadamard order in {1, 12, 20, 28, 108, 344}, got ", p.m);
  }
}

}  // namespace

void launch_hadamard_quantize(const HadamardParams& p, const HadamardSmallFactor& f, DType in_dtype,
                              DType out_dtype, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  INFEROPS_CHECK_ARG(p.rows <= 0x7fffffff, "too many rows for `x`: ", p.rows);
  dispatch_half(in_dtype, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (out_dtype == DType::kInt8) {
      launch_typed<T, int8_t>(p, f, device, as_stream(stream));
    } else if (out_dtype == DType::kFloat8E4M3) {
      launch_typed<T, __nv_fp8_storage_t>(p, f, device, as_stream(stream));
    } else {
      INFEROPS_CHECK_TYPE(out_dtype == in_dtype, "expected `out` int8, float8_e4m3fn or x's dtype, got ",
                          dtype_name(out_dtype));
      launch_typed<T, T>(p, f, device, as_stream(stream));
    }
  });
}

}  // namespace inferops::quant
