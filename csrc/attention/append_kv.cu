// append_kv: write new tokens' K and V into their cache slots, one launch for
// a whole batch (decode: one token per sequence; prefill/chunks: many).
//
// Mapping: blockIdx.x strides over tokens; the block's threads copy that
// token's num_kv_heads * head_dim elements (contiguous in the slot and, with
// k's last two dims contiguous, in the source) as 16-byte vectors when every
// row is 16-byte aligned, element by element otherwise. Pure data movement:
// bytes = 2 * 2 * num_tokens * num_kv_heads * head_dim * sizeof(T).
#include "common/kernel_launch.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "paged_kv.h"

namespace inferops::attention {

namespace {

constexpr int kThreads = 128;

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) AppendKvKernel(const __grid_constant__ AppendKvParams p) {
  const int64_t row = int64_t(p.num_kv_heads) * p.head_dim;  // elements per token
  const int64_t vecs = row / kVec;
  // The token's cache slot is looked up by one thread and shared: every warp reading the
  // three indices itself cost 3 sectors per warp per token (9% of the bytes of a 4 KiB
  // token row at 4 warps, executor metrics).
  __shared__ int64_t slot_s;
  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x == 0) {
      int64_t slot = -1;
      const int32_t seq = p.seq_ids[t];
      const int32_t pos = p.positions[t];
      if (seq >= 0 && seq < p.batch && pos >= 0 && pos < int64_t(p.max_pages) * p.page_size) {
        const int32_t page = p.block_tables[int64_t(seq) * p.bt_stride + pos / p.page_size];
        // never write outside the cache
        if (page >= 0 && page < p.num_pages) slot = (int64_t(page) * p.page_size + pos % p.page_size) * row;
      }
      slot_s = slot;
    }
    __syncthreads();
    const int64_t slot = slot_s;
    __syncthreads();  // read by every thread before thread 0 writes the next token's
    if (slot < 0) continue;
    const T* k = static_cast<const T*>(p.k) + t * p.k_stride;
    const T* v = static_cast<const T*>(p.v) + t * p.v_stride;
    T* kc = static_cast<T*>(p.k_cache) + slot;
    T* vc = static_cast<T*>(p.v_cache) + slot;
    for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
      Vec<T, kVec> a, b;
      a.load(k + i * kVec);
      b.load(v + i * kVec);
      a.store(kc + i * kVec);
      b.store(vc + i * kVec);
    }
  }
}

template <typename T, int kVec>
void launch_typed(const AppendKvParams& p, int device, cudaStream_t stream) {
  const int64_t max_blocks = int64_t(device_info(device).sm_count) * 16;
  const unsigned grid = static_cast<unsigned>(p.num_tokens < max_blocks ? p.num_tokens : max_blocks);
  launch_kernel(AppendKvKernel<T, kVec>, grid, kThreads, 0, stream, p);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_append_kv(const AppendKvParams& p, DType dtype, int device, std::uintptr_t stream) {
  if (p.num_tokens == 0) return;
  DeviceGuard guard(device);
  dispatch_half(dtype, "k", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = kVec16<T>;
    const int64_t row = int64_t(p.num_kv_heads) * p.head_dim;
    const bool aligned = row % kVec == 0 && p.k_stride % kVec == 0 && p.v_stride % kVec == 0 &&
                         is_aligned(p.k, 16) && is_aligned(p.v, 16) &&
                         is_aligned(p.k_cache, 16) && is_aligned(p.v_cache, 16);
    if (aligned) {
      launch_typed<T, kVec>(p, device, as_stream(stream));
    } else {
      launch_typed<T, 1>(p, device, as_stream(stream));
    }
  });
}

}  // namespace inferops::attention
