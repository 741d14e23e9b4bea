// SLAB's simplified linear attention, two kernels:
//   SlaReduceKernel  (grid B * heads): kv = relu(K)^T V [d, d] and ksum =
//                    sum_j relu(k_j) [d] in fp32, one block per (batch, head)
//                    so the reduction is deterministic (no atomics);
//   SlaOutputKernel  (grid B * heads x token tiles): out = relu(q) kv /
//                    (relu(q) . ksum + 1e-6) + the 5x5 depthwise conv of v,
//                    kv / ksum / the tile's relu(q) / the conv weights staged in
//                    shared memory. No [N, N] matrix and no relu(Q) tensor is
//                    ever written to memory.
// Bytes: K, V read by the reduction, Q read and out written by the output
// kernel, V read again for the conv (25 taps, served mostly from L1/L2).
// FLOPs: 4 N d^2 per (batch, head) on CUDA cores: d <= 128 keeps this memory
// bound for SLAB's shapes (d = 32 or 64).
#include "common/kernel_launch.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "linear_attention.h"

namespace inferops::linear_attention {

namespace {

constexpr int kThreads = 256;
constexpr int kTokTile = 32;
constexpr float kEps = 1e-6f;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) SlaReduceKernel(const __grid_constant__ SlaParams p) {
  constexpr int kPer = (D * D + kThreads - 1) / kThreads;  // kv entries per thread
  __shared__ float k_s[kTokTile][D];
  __shared__ float v_s[kTokTile][D];
  const int bh = blockIdx.x;
  const int b = bh / p.heads, h = bh % p.heads;
  const T* kp = static_cast<const T*>(p.k) + int64_t(b) * p.k_stride[0] + int64_t(h) * p.k_stride[1];
  const T* vp = static_cast<const T*>(p.v) + int64_t(b) * p.v_stride[0] + int64_t(h) * p.v_stride[1];
  float acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  float ks = 0.f;
  for (int t0 = 0; t0 < p.n; t0 += kTokTile) {
    for (int e = threadIdx.x; e < kTokTile * D; e += kThreads) {
      const int t = e / D, c = e % D;
      const bool ok = t0 + t < p.n;
      k_s[t][c] = ok ? fmaxf(to_float(kp[int64_t(t0 + t) * p.k_stride[2] + c]), 0.f) : 0.f;
      v_s[t][c] = ok ? to_float(vp[int64_t(t0 + t) * p.v_stride[2] + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + i * kThreads;
      if (e < D * D) {
        const int r = e / D, c = e % D;
        float a = acc[i];
#pragma unroll 8
        for (int t = 0; t < kTokTile; ++t) a += k_s[t][r] * v_s[t][c];
        acc[i] = a;
      }
    }
    if (threadIdx.x < D) {
      for (int t = 0; t < kTokTile; ++t) ks += k_s[t][threadIdx.x];
    }
    __syncthreads();
  }
  float* kv = p.kv + int64_t(bh) * D * D;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = threadIdx.x + i * kThreads;
    if (e < D * D) kv[e] = acc[i];
  }
  if (threadIdx.x < D) p.ksum[int64_t(bh) * D + threadIdx.x] = ks;
}

template <int D>
struct OutSmem {
  static constexpr int kKv = 0;                          // [D][D] fp32
  static constexpr int kKsum = kKv + D * D * 4;          // [D]
  static constexpr int kQ = kKsum + D * 4;               // [kTokTile][D + 1] (padded)
  static constexpr int kZ = kQ + kTokTile * (D + 1) * 4; // [kTokTile]
  static constexpr int kW = kZ + kTokTile * 4;           // [D][25]
  static constexpr int kBias = kW + D * 25 * 4;          // [D]
  static constexpr int kBytes = kBias + D * 4;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) SlaOutputKernel(const __grid_constant__ SlaParams p) {
  using L = OutSmem<D>;
  INFEROPS_DYNAMIC_SMEM(unsigned char, smem, 16);
  float* kv = reinterpret_cast<float*>(smem + L::kKv);
  float* ksum = reinterpret_cast<float*>(smem + L::kKsum);
  float* q_s = reinterpret_cast<float*>(smem + L::kQ);
  float* z_s = reinterpret_cast<float*>(smem + L::kZ);
  float* w_s = reinterpret_cast<float*>(smem + L::kW);
  float* bias = reinterpret_cast<float*>(smem + L::kBias);
  const int bh = blockIdx.x;
  const int b = bh / p.heads, h = bh % p.heads;
  const int t0 = blockIdx.y * kTokTile;
  const T* qp = static_cast<const T*>(p.q) + int64_t(b) * p.q_stride[0] + int64_t(h) * p.q_stride[1];
  const T* vp = static_cast<const T*>(p.v) + int64_t(b) * p.v_stride[0] + int64_t(h) * p.v_stride[1];

  for (int e = threadIdx.x; e < D * D; e += kThreads) kv[e] = p.kv[int64_t(bh) * D * D + e];
  for (int e = threadIdx.x; e < D * 25; e += kThreads) w_s[e] = p.dwc_weight[e];
  for (int e = threadIdx.x; e < D; e += kThreads) {
    ksum[e] = p.ksum[int64_t(bh) * D + e];
    bias[e] = p.dwc_bias ? p.dwc_bias[e] : 0.f;
  }
  for (int e = threadIdx.x; e < kTokTile * D; e += kThreads) {
    const int t = e / D, c = e % D;
    q_s[t * (D + 1) + c] =
        t0 + t < p.n ? fmaxf(to_float(qp[int64_t(t0 + t) * p.q_stride[2] + c]), 0.f) : 0.f;
  }
  __syncthreads();
  if (threadIdx.x < kTokTile) {  // normaliser per token
    float z = 0.f;
    for (int c = 0; c < D; ++c) z += q_s[threadIdx.x * (D + 1) + c] * ksum[c];
    z_s[threadIdx.x] = 1.f / (z + kEps);
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out) + int64_t(bh) * p.n * D;
  for (int e = threadIdx.x; e < kTokTile * D; e += kThreads) {
    const int t = e / D, c = e % D;  // c fastest: coalesced v reads and out writes
    const int tok = t0 + t;
    if (tok >= p.n) continue;
    float o = 0.f;
    const float* qr = q_s + t * (D + 1);
#pragma unroll 8
    for (int j = 0; j < D; ++j) o += qr[j] * kv[j * D + c];
    o *= z_s[t];
    // 5x5 depthwise conv of v at (y, x), zero padding 2.
    const int y = tok / p.w, x = tok % p.w;
    float conv = bias[c];
#pragma unroll
    for (int dy = 0; dy < 5; ++dy) {
      const int yy = y + dy - 2;
      if (yy < 0 || yy >= p.h) continue;
#pragma unroll
      for (int dx = 0; dx < 5; ++dx) {
        const int xx = x + dx - 2;
        if (xx < 0 || xx >= p.w) continue;
        conv += w_s[c * 25 + dy * 5 + dx] * to_float(vp[int64_t(yy * p.w + xx) * p.v_stride[2] + c]);
      }
    }
    out[int64_t(tok) * D + c] = from_float<T>(o + conv);
  }
}

template <typename T, int D>
void launch_typed(const SlaParams& p, int device, cudaStream_t stream) {
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  launch_kernel(SlaReduceKernel<T, D>, bh, kThreads, 0, stream, p);
  INFEROPS_CUDA_CHECK_LAUNCH();
  auto kernel = SlaOutputKernel<T, D>;
  set_dynamic_smem(kernel, OutSmem<D>::kBytes, device);
  const dim3 grid(bh, static_cast<unsigned>((p.n + kTokTile - 1) / kTokTile));
  launch_kernel(kernel, grid, kThreads, OutSmem<D>::kBytes, stream, p);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_sla(const SlaParams& p, DType dtype, int device, std::uintptr_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.n == 0) return;
  DeviceGuard guard(device);
  dispatch_float(dtype, "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (p.d) {
      case 32: launch_typed<T, 32>(p, device, as_stream(stream)); break;
      case 64: launch_typed<T, 64>(p, device, as_stream(stream)); break;
      case 128: launch_typed<T, 128>(p, device, as_stream(stream)); break;
      default: INFEROPS_CHECK_ARG(false, "expected head dim 32, 64 or 128 for `q`, got ", p.d);
    }
  });
}

}  // namespace inferops::linear_attention
