// permute: scatter tokens into the expert-major buffer. Token-major: one block per token
// reads its row once and writes it to each of its k slots (a row-major gather read every token
// k times: 8x the ideal bytes read at k = 8, executor metrics); rows no token writes (padding,
// or a src_index entry whose token's dst_index does not point back) are then written by a warp
// each, as x[src_index[row]] or zeros, so any index values give ref.permute's answer and every
// row is written exactly once.
// unpermute: out[t] = sum_j w[t, j] * y[dst[t, j]] in fp32 (dropped slots, dst = -1,
// contribute nothing); the row's slots and weights are staged in shared memory once per row.
// Both are pure data movement: 16-byte vectors when rows are aligned, deterministic (no
// atomics).
#include <algorithm>

#include "common/kernel_launch.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "moe.h"

namespace inferops::moe {

namespace {

constexpr int kThreads = 128;
constexpr int kStage = 32;  // slots of one token staged in shared memory per pass

template <typename T, int kVec>
__device__ __forceinline__ void load_or_zero(Vec<T, kVec>& a, const T* s) {
  if (s) {
    a.load(s);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) a.v[i] = from_float<T>(0.f);
  }
}

// Blocks [0, token_blocks): tokens; the rest: the rows no token writes, one warp per row.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) PermuteKernel(const __grid_constant__ PermuteParams p, int token_blocks) {
  const int vecs = p.hidden / kVec;
  T* const out = static_cast<T*>(p.out);
  const T* const x = static_cast<const T*>(p.x);
  if (static_cast<int>(blockIdx.x) < token_blocks) {
    __shared__ int32_t dst[kStage];
    for (int64_t t = blockIdx.x; t < p.x_rows; t += token_blocks) {  // 64-bit: rows may be near INT32_MAX
      const T* src = x + t * p.x_stride;
      for (int j0 = 0; j0 < p.topk; j0 += kStage) {
        const int n = min(kStage, p.topk - j0);
        __syncthreads();  // the previous pass is done reading dst
        if (static_cast<int>(threadIdx.x) < n) {
          const int32_t d = p.dst_index[t * p.topk + j0 + threadIdx.x];
          // Only slots whose row points back at this token (dropped slots are -1).
          dst[threadIdx.x] = d >= 0 && d < p.rows && p.src_index[d] == t ? d : -1;
        }
        __syncthreads();
        for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
          Vec<T, kVec> a;
          a.load(src + v * kVec);
          for (int j = 0; j < n; ++j)
            if (dst[j] >= 0) a.store(out + int64_t(dst[j]) * p.hidden + v * kVec);
        }
      }
    }
    return;
  }
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int64_t stride = int64_t(gridDim.x - token_blocks) * warps;
  for (int64_t row = int64_t(blockIdx.x - token_blocks) * warps + threadIdx.x / 32; row < p.rows; row += stride) {
    const int32_t s = p.src_index[row];
    const bool valid = s >= 0 && s < p.x_rows;  // else a padding row (or a corrupt index): zeros
    bool by_token = false;
    for (int j0 = 0; valid && j0 < p.topk && !by_token; j0 += 32) {
      const int j = j0 + lane;
      by_token = __any_sync(0xffffffffu, j < p.topk && p.dst_index[int64_t(s) * p.topk + j] == row);
    }
    if (by_token) continue;  // its token's block writes it
    const T* src = valid ? x + int64_t(s) * p.x_stride : nullptr;
    for (int v = lane; v < vecs; v += 32) {
      Vec<T, kVec> a;
      load_or_zero(a, src ? src + v * kVec : nullptr);
      a.store(out + row * p.hidden + v * kVec);
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
  __shared__ int32_t slot[kStage];
  __shared__ float weight[kStage];
  const int vecs = p.hidden / kVec;
  const int staged = min(p.topk, kStage);  // slots past kStage (no real model) are read directly
  for (int64_t t = blockIdx.x; t < p.rows; t += gridDim.x) {
    __syncthreads();  // the previous row is done reading slot / weight
    if (static_cast<int>(threadIdx.x) < staged) {
      const int64_t i = t * p.topk + threadIdx.x;
      const int32_t d = p.dst_index[i];
      const bool kept = d >= 0 && d < p.capacity;  // dropped (or corrupt): contributes nothing
      slot[threadIdx.x] = kept ? d : -1;
      weight[threadIdx.x] = kept ? load_weight(p, i) : 0.f;
    }
    __syncthreads();
    T* dst = static_cast<T*>(p.out) + t * p.hidden;
    for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
      float acc[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
      for (int j = 0; j < p.topk; ++j) {
        int32_t d;
        float w;
        if (j < kStage) {
          d = slot[j];
          w = weight[j];
        } else {
          d = p.dst_index[t * p.topk + j];
          if (d < 0 || d >= p.capacity) continue;
          w = load_weight(p, t * p.topk + j);
        }
        if (d < 0) continue;
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
  constexpr int kVec = kVec16<T>;
  const bool aligned = p.hidden % kVec == 0 && p.x_stride % kVec == 0 && is_aligned(p.x, 16) &&
                       is_aligned(p.out, 16);
  if (kUnpermute) {
    const unsigned grid = static_cast<unsigned>(p.rows < max_blocks ? p.rows : max_blocks);
    if (aligned) launch_kernel(UnpermuteKernel<T, kVec>, grid, kThreads, 0, stream, p);
    else launch_kernel(UnpermuteKernel<T, 1>, grid, kThreads, 0, stream, p);
  } else {
    // Token blocks, then blocks of kThreads / 32 warps for the rows no token writes (every
    // row is checked; only padding rows of a consistent layout are written there).
    const int token_blocks = static_cast<int>(p.x_rows < max_blocks ? p.x_rows : max_blocks);
    const int64_t row_warps = kThreads / 32;
    const int64_t row_blocks = std::min<int64_t>((p.rows + row_warps - 1) / row_warps, max_blocks);
    const unsigned grid = static_cast<unsigned>(token_blocks + row_blocks);
    if (aligned) launch_kernel(PermuteKernel<T, kVec>, grid, kThreads, 0, stream, p, token_blocks);
    else launch_kernel(PermuteKernel<T, 1>, grid, kThreads, 0, stream, p, token_blocks);
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
