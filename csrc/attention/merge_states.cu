// merge_states CUDA kernel; the math and layouts are in merge_states.h.
//
// Mapping: a block is a 2-D tile of threads, threadIdx.y picks a (token, head)
// row and threadIdx.x walks that row's head_dim in 16-byte vectors (8 fp16/bf16
// or 4 fp32 elements). Every thread of a row reads that row's two LSEs (two
// broadcast 4-byte loads, served from L1) and computes the weights itself, so
// no shared memory or inter-thread communication is needed for v.
//
// In place (lse_out == lse_a): the row's new LSE is written by threadIdx.x == 0
// only after a __syncthreads(), i.e. after every thread of the row (all in this
// block) has read lse_a. That is why a row never spans two blocks.
//
// Bytes: reads 2 * N * sizeof(T) + 8 * rows, writes N * sizeof(T) + 4 * rows;
// memory bound (about 1 FLOP/byte), so the target is copy bandwidth.
#include "common/kernel_launch.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "merge_states.h"

namespace inferops::attention {

namespace {

constexpr int kThreads = 256;

// Returns the merge weights (already divided by their sum) and the merged LSE.
__device__ __forceinline__ void merge_weights(float lse_a, float lse_b, float& w_a, float& w_b,
                                              float& lse) {
  const float kNegInf = -__int_as_float(0x7f800000);
  if (lse_a == kNegInf && lse_b == kNegInf) {  // both partials empty
    w_a = 0.f;
    w_b = 0.f;
    lse = kNegInf;
    return;
  }
  // A NaN LSE makes fmaxf pick the other value but then exp(NaN - m) = NaN,
  // so NaN propagates to the output as it does in the reference.
  const float m = fmaxf(lse_a, lse_b);
  const float e_a = expf(lse_a - m);
  const float e_b = expf(lse_b - m);
  const float s = e_a + e_b;  // in [1, 2] for finite inputs
  const float inv = 1.f / s;
  w_a = e_a * inv;
  w_b = e_b * inv;
  lse = m + logf(s);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) MergeStatesKernel(const __grid_constant__ MergeStatesParams p) {
  const int64_t rows = p.num_tokens * p.num_heads;
  const int64_t vecs_per_row = p.head_dim / kVec;
  const int64_t rows_per_block = blockDim.y;
  // Grid-stride over row tiles; the loop bound is uniform across the block,
  // so the __syncthreads() inside is reached by every thread.
  for (int64_t row0 = blockIdx.x * rows_per_block; row0 < rows; row0 += gridDim.x * rows_per_block) {
    const int64_t row = row0 + threadIdx.y;
    const bool active = row < rows;
    float w_a = 0.f, w_b = 0.f, lse = 0.f;
    int64_t tok = 0, head = 0;
    if (active) {
      tok = row / p.num_heads;
      head = row - tok * p.num_heads;
      const float la = p.lse_a[tok * p.lse_a_stride[0] + head * p.lse_a_stride[1]];
      const float lb = p.lse_b[tok * p.lse_b_stride[0] + head * p.lse_b_stride[1]];
      const T* a = static_cast<const T*>(p.v_a) + tok * p.v_a_stride[0] + head * p.v_a_stride[1];
      const T* b = static_cast<const T*>(p.v_b) + tok * p.v_b_stride[0] + head * p.v_b_stride[1];
      T* o = static_cast<T*>(p.v_out) + tok * p.v_out_stride[0] + head * p.v_out_stride[1];
      // Issue the first v loads before the weights need the LSE loads to land,
      // so both round trips to memory overlap instead of running back to back.
      int64_t c = threadIdx.x;
      Vec<T, kVec> va, vb, vo;
      if (c < vecs_per_row) {
        va.load(a + c * kVec);
        vb.load(b + c * kVec);
      }
      merge_weights(la, lb, w_a, w_b, lse);
      while (c < vecs_per_row) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          vo.v[i] = from_float<T>(w_a * to_float(va.v[i]) + w_b * to_float(vb.v[i]));
        }
        vo.store(o + c * kVec);
        c += blockDim.x;
        if (c < vecs_per_row) {
          va.load(a + c * kVec);
          vb.load(b + c * kVec);
        }
      }
    }
    __syncthreads();  // every thread of these rows has read lse_a before it is overwritten
    if (active && threadIdx.x == 0) {
      p.lse_out[tok * p.lse_out_stride[0] + head * p.lse_out_stride[1]] = lse;
    }
  }
}

template <typename T, int kVec>
void launch_typed(const MergeStatesParams& p, int device, cudaStream_t stream) {
  const int64_t rows = p.num_tokens * p.num_heads;
  if (rows == 0) return;
  const int64_t vecs_per_row = p.head_dim / kVec;
  // A row's vectors across x (at most a warp), rows across y.
  const int tx = static_cast<int>(vecs_per_row < 1 ? 1 : vecs_per_row > 32 ? 32 : vecs_per_row);
  const int ty = kThreads / tx;
  const int64_t tiles = ceil_div<int64_t>(rows, ty);
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  const int64_t max_blocks = int64_t(device_info(device).sm_count) * 32;
  const unsigned grid = static_cast<unsigned>(tiles < max_blocks ? tiles : max_blocks);
  launch_kernel(MergeStatesKernel<T, kVec>, grid, dim3(tx, ty), 0, stream, p);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

// 16-byte vectors need every row start 16-byte aligned: aligned base pointers,
// and token/head strides and head_dim multiples of the vector width.
template <int kVec, typename T>
bool can_vectorize(const MergeStatesParams& p) {
  auto ok = [](const void* ptr, const int64_t* stride) {
    return is_aligned(ptr, 16) && stride[0] % kVec == 0 && stride[1] % kVec == 0;
  };
  return p.head_dim % kVec == 0 && ok(p.v_a, p.v_a_stride) && ok(p.v_b, p.v_b_stride) &&
         ok(p.v_out, p.v_out_stride);
}

}  // namespace

void launch_merge_states(const MergeStatesParams& p, DType dtype, int device,
                         std::uintptr_t stream) {
  DeviceGuard guard(device);
  dispatch_float(dtype, "v_a", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = kVec16<T>;
    if (can_vectorize<kVec, T>(p)) {
      launch_typed<T, kVec>(p, device, as_stream(stream));
    } else {
      launch_typed<T, 1>(p, device, as_stream(stream));
    }
  });
}

}  // namespace inferops::attention
