// Online Hadamard rotation fused with per-token quantization (OstQuant / QuaRot down_proj input).
//
// HadamardQuantizeKernel<T, kM, OutT>: one block (256 threads) per token row of n = kM * P
// elements (P = 2^k >= 8). The row x, viewed as X [kM, P], becomes
// Y = H_m^T X H_P / sqrt(n)  ( = x @ kron(H_m, H_P) / sqrt(n) ), then is quantized per token.
//   1. Load: each thread takes 8 consecutive elements (one 16-byte load; kBatch = 4 such
//      loads issued before use) and runs the first three FWHT stages in registers; stages
//      h = 8 .. min(P, 256) / 2 run between lanes of a warp with __shfl_xor (a warp owns
//      256 consecutive elements, and butterflies never leave a P-aligned chunk). The fp32
//      row then goes to shared memory.
//   2. Stages h >= 256 in shared memory, one __syncthreads each (log2(P) - 8 of them).
//   3. Dense factor over the kM chunks, Y[c, d] = sum_a H_m[a, c] X[a, d], on CUDA cores:
//      kM * n operations per row (kM = 28 at n = 14336: 0.4 M; kM = 344 at n = 11008:
//      3.8 M, which makes 11008 compute bound, ~30x a copy of x by napkin math (see
//      docs/quant.md); tensor cores would be the next step). kM <= 28: a thread owns whole columns d (kM values in
//      registers) and H_m comes in the kernel parameters (HadamardSmallFactor): fully
//      unrolled, each FMA reads its +-1 from the constant cache, no shared-memory load
//      competes with the FMAs; the result is written in place. kM = 108 / 344: work items
//      are (4 outputs, column) pairs so all 256 threads are busy even when P = 32; H_m is
//      kept as int8 in shared memory (344^2 = 116 KiB; fp32 would not fit) and applied by
//      flipping the sign bit of x (shift + LOP3 + FADD: int8 -> float conversions run at
//      a quarter of the FMA rate); the result goes to a second fp32 buffer.
//   4. amax of the scaled result (block reduction), scale = max(amax / qmax, 1e-10), and
//      the quantized (or rounded fp16/bf16) row written with 8-element vector stores.
// Shared memory (dynamic): kM <= 28: 4 n bytes (28672: 112 KiB);
//                         kM > 28:  8 n + kM^2 bytes (11008 = 344 * 32: 202 KiB).
// Rotation values stay fp32 until the final rounding; results differ from the PyTorch
// reference only by fp32 summation order and the 1/sqrt(n) multiply (tests allow one
// quantization step at rounding boundaries).
#include <cuda_fp8.h>

#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "quant.h"

namespace inferops::quant {

namespace {

constexpr int kThreads = 256;
constexpr int kBatch = 4;  // 16-byte loads in flight per thread in the load phase
constexpr int kRegMaxM = kHadamardParamMaxM;  // largest order with H_m in the parameters

template <typename O>
struct OutTraits {  // fp16 / bf16 output: no quantization
  static constexpr bool kQuant = false;
  __device__ static O convert(float v) { return from_float<O>(v); }
};
template <>
struct OutTraits<int8_t> {
  static constexpr bool kQuant = true;
  static constexpr float kMax = 127.f;
  __device__ static int8_t convert(float v) { return static_cast<int8_t>(max(-127, min(127, __float2int_rn(v)))); }
};
template <>
struct OutTraits<__nv_fp8_storage_t> {
  static constexpr bool kQuant = true;
  static constexpr float kMax = 448.f;
  __device__ static __nv_fp8_storage_t convert(float v) {
    return __nv_cvt_float_to_fp8(fminf(fmaxf(v, -448.f), 448.f), __NV_SATFINITE, __NV_E4M3);
  }
};

__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? red[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

template <typename T, int kM, typename OutT>
__global__ void __launch_bounds__(kThreads)
    HadamardQuantizeKernel(const __grid_constant__ HadamardParams p, const __grid_constant__ HadamardSmallFactor f) {
  extern __shared__ __align__(16) float smem[];
  __shared__ float red[32];
  const int n = p.n;
  const int P = n / kM;
  float* xs = smem;  // [n] fp32 row
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * n;
  const int lane = threadIdx.x & 31;

  // Stage H_m for the large orders (before the first barrier below).
  float* ys = xs + n;                                    // kM > 28: [n] fp32 result
  int8_t* hs_i = reinterpret_cast<int8_t*>(xs + 2 * n);  // kM > 28: [kM][kM] int8
  if constexpr (kM > kRegMaxM) {
    for (int i = threadIdx.x * 16; i < kM * kM; i += kThreads * 16) {  // kM^2 % 16 == 0 for 108, 344
      *reinterpret_cast<uint4*>(hs_i + i) = *reinterpret_cast<const uint4*>(p.hm + i);
    }
  }

  // 1. Registers + shuffles: stages h = 1 .. min(P, 256) / 2. Loads are issued kBatch at a
  //    time before any of them is used, so each thread keeps kBatch 16-byte loads in flight
  //    (a long row leaves room for only 2-4 blocks per SM: without batching that is too
  //    little memory-level parallelism to approach HBM bandwidth).
  const int groups = n / 8;
  const int h_warp = P < 256 ? P : 256;
  for (int g0 = threadIdx.x & ~31; g0 < groups; g0 += kBatch * kThreads) {  // warp-uniform loop
    Vec<T, 8> in[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int g = g0 + u * kThreads + lane;
      if (g < groups) in[u].load(x + int64_t(g) * 8);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (g0 + u * kThreads >= groups) break;  // warp-uniform: the shuffles need every lane
      const int g = g0 + u * kThreads + lane;
      float v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = g < groups ? to_float(in[u].v[j]) : 0.f;
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
      if (g < groups) {
        float4* dst = reinterpret_cast<float4*>(xs + int64_t(g) * 8);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
    }
  }
  __syncthreads();

  // 2. Shared-memory stages h = 256 .. P / 2 (pairs never cross a P-aligned chunk).
  for (int h = 256; h < P; h <<= 1) {
    for (int t = threadIdx.x; t < n / 2; t += kThreads) {
      const int i = (t / h) * 2 * h + (t % h);
      const float a = xs[i], b = xs[i + h];
      xs[i] = a + b;
      xs[i + h] = a - b;
    }
    __syncthreads();
  }

  // 3. Dense factor and 1/sqrt(n); amax of the result.
  const float inv = p.inv_sqrt_n;
  float amax = 0.f;
  const float* res = xs;
  if constexpr (kM == 1) {
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const float y = xs[i] * inv;
      xs[i] = y;
      amax = fmaxf(amax, fabsf(y));
    }
  } else if constexpr (kM <= kRegMaxM) {
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
        amax = fmaxf(amax, fabsf(y));
      }
    }
  } else {
    constexpr int kCB = 4;  // outputs per work item
    const int items = (kM / kCB) * P;
    for (int it = threadIdx.x; it < items; it += kThreads) {
      const int cb = it / P, d = it % P;
      float acc[kCB] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
      for (int a = 0; a < kM; ++a) {
        // Byte j of w is H_m[a][4 cb + j] (0x01 or 0xff); its bit 7 becomes x's sign flip.
        const uint32_t xb = __float_as_uint(xs[a * P + d]);
        const uint32_t w = *reinterpret_cast<const uint32_t*>(hs_i + a * kM + cb * kCB);
        acc[0] += __uint_as_float(xb ^ ((w << 24) & 0x80000000u));
        acc[1] += __uint_as_float(xb ^ ((w << 16) & 0x80000000u));
        acc[2] += __uint_as_float(xb ^ ((w << 8) & 0x80000000u));
        acc[3] += __uint_as_float(xb ^ (w & 0x80000000u));
      }
#pragma unroll
      for (int j = 0; j < kCB; ++j) {
        const float y = acc[j] * inv;
        ys[(cb * kCB + j) * P + d] = y;
        amax = fmaxf(amax, fabsf(y));
      }
    }
    res = ys;
  }

  // 4. Scale and write.
  float scale = 1.f;
  if constexpr (OutTraits<OutT>::kQuant) {
    amax = block_max(amax, red);  // includes the barrier that publishes `res`
    scale = fmaxf(amax / OutTraits<OutT>::kMax, kQuantScaleMin);
    if (threadIdx.x == 0) p.scale[row] = scale;
  } else {
    __syncthreads();
  }
  OutT* out = static_cast<OutT*>(p.out) + row * n;
  for (int g = threadIdx.x; g < groups; g += kThreads) {
    const float4 r0 = reinterpret_cast<const float4*>(res + int64_t(g) * 8)[0];
    const float4 r1 = reinterpret_cast<const float4*>(res + int64_t(g) * 8)[1];
    const float r[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
    Vec<OutT, 8> o;
#pragma unroll
    for (int j = 0; j < 8; ++j) o.v[j] = OutTraits<OutT>::convert(OutTraits<OutT>::kQuant ? r[j] / scale : r[j]);
    o.store(out + int64_t(g) * 8);
  }
}

int smem_bytes(int m, int n) { return m <= kRegMaxM ? 4 * n : 8 * n + m * m; }

template <typename T, typename OutT>
void launch_typed(const HadamardParams& p, const HadamardSmallFactor& f, int device, cudaStream_t stream) {
  auto run = [&](auto kernel) {
    const int bytes = smem_bytes(p.m, p.n);
    const DeviceInfo& info = device_info(device);
    INFEROPS_CHECK_ARG(bytes + 256 <= info.max_smem_per_block_optin, "hadamard_quantize: n = ", p.n,
                       " (m = ", p.m, ") needs ", bytes, " bytes of shared memory, device ", device,
                       " allows ", info.max_smem_per_block_optin);
    set_dynamic_smem(kernel, bytes, device);
    kernel<<<static_cast<unsigned>(p.rows), kThreads, bytes, stream>>>(p, f);
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
