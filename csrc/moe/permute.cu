// permute: gather tokens into the expert-major buffer (one read per output
// row; padding rows written as zeros so a grouped GEMM can run over them).
// unpermute: out[t] = sum_j w[t, j] * y[dst[t, j]] in fp32 (dropped slots,
// dst = -1, contribute nothing). Both are pure data movement: 16-byte vectors
// when rows are aligned, one block per row, deterministic (no atomics).
#include "common/kernel_launch.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "moe.h"

namespace inferops::moe {

namespace {

constexpr int kThreads = 128;

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) PermuteKernel(const __grid_constant__ PermuteParams p) {
  const int vecs = p.hidden / kVec;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {  // 64-bit: rows may be near INT32_MAX
    const int src = p.src_index[row];
    T* dst = static_cast<T*>(p.out) + int64_t(row) * p.hidden;
    // src >= x_rows: a corrupt index; zeros rather than an out-of-bounds read (as unpermute)
    const T* s = src >= 0 && src < p.x_rows ? static_cast<const T*>(p.x) + int64_t(src) * p.x_stride : nullptr;
    for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
      Vec<T, kVec> a;
      if (s) {
        a.load(s + v * kVec);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) a.v[i] = from_float<T>(0.f);
      }
      a.store(dst + v * kVec);
    }
  }
}

__device__ __forceinline__ float load_weight(const PermuteParams& p, int64_t i) {
  switch (p.weights_dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p.weights)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p.weights)[i]);
    default: return static_cast<const float*>(p.weights)[i];
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) UnpermuteKernel(const __grid_constant__ PermuteParams p) {
  const int vecs = p.hidden / kVec;
  for (int64_t t = blockIdx.x; t < p.rows; t += gridDim.x) {
    T* dst = static_cast<T*>(p.out) + int64_t(t) * p.hidden;
    for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
      float acc[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
      for (int j = 0; j < p.topk; ++j) {
        const int d = p.dst_index[int64_t(t) * p.topk + j];
        if (d < 0 || d >= p.capacity) continue;  // dropped (or corrupt) slot: never read out of bounds
        const float w = load_weight(p, int64_t(t) * p.topk + j);
        Vec<T, kVec> y;
        y.load(static_cast<const T*>(p.x) + int64_t(d) * p.x_stride + v * kVec);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += w * to_float(y.v[i]);
      }
      Vec<T, kVec> o;
#pragma unroll
      for (int i = 0; i < kVec; ++i) o.v[i] = from_float<T>(acc[i]);
      o.store(dst + v * kVec);
    }
  }
}

template <typename T, bool kUnpermute>
void launch_rows(const PermuteParams& p, int device, cudaStream_t stream) {
  if (p.rows == 0) return;
  const int64_t max_blocks = int64_t(device_info(device).sm_count) * 16;
  const unsigned grid = static_cast<unsigned>(p.rows < max_blocks ? p.rows : max_blocks);
  constexpr int kVec = kVec16<T>;
  const bool aligned = p.hidden % kVec == 0 && p.x_stride % kVec == 0 && is_aligned(p.x, 16) &&
                       is_aligned(p.out, 16);
  if (kUnpermute) {
    if (aligned) launch_kernel(UnpermuteKernel<T, kVec>, grid, kThreads, 0, stream, p);
    else launch_kernel(UnpermuteKernel<T, 1>, grid, kThreads, 0, stream, p);
  } else {
    if (aligned) launch_kernel(PermuteKernel<T, kVec>, grid, kThreads, 0, stream, p);
    else launch_kernel(PermuteKernel<T, 1>, grid, kThreads, 0, stream, p);
  }
  INFEROPS_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_permute(const PermuteParams& p, DType dtype, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  dispatch_half(dtype, "x", [&](auto tag) {
    launch_rows<typename decltype(tag)::type, false>(p, device, as_stream(stream));
  });
}

void launch_unpermute(const PermuteParams& p, DType dtype, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  dispatch_half(dtype, "y", [&](auto tag) {
    launch_rows<typename decltype(tag)::type, true>(p, device, as_stream(stream));
  });
}

}  // namespace inferops::moe
