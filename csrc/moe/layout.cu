// Routing layout kernel: one block of 1024 threads computes the whole layout
// on the device (no host synchronization), deterministically.
//
// Pass 1 counts assignments per expert (shared-memory atomics: order-free).
// One thread turns the counts into padded offsets. Pass 2 walks the T * k
// assignments in chunks of 1024, in order: __match_any_sync groups the lanes
// of a warp that share an expert (rank within the warp = earlier lanes with
// the same expert), per-warp counts in shared memory give the warps before,
// and a running count per expert the chunks before -- so rows of an expert
// follow (token, slot) order exactly. Pass 3 does the same per destination
// rank over tokens (a token's rank mask deduplicates experts on one rank).
// Dynamic shared memory: counts, running [E], offs [E + 1], warp_cnt [32][E],
// rank_run [R], warp_rcnt [32][R]: (3 + 32) * E + 1 + 33 * R ints (E = 256, R = 8:
// 36,900 bytes; E = 1024, R = 64: 151,812 bytes = 148.3 KiB). The kernel's pointers and
// the launch size both come from smem_layout(E, R), and the launcher checks the total
// against the device's opt-in limit (E and R that do not fit are an error naming them).
// For T = 4096, k = 8, E = 256: 32 chunks of a few barriers each.
#include "common/kernel_launch.cuh"
#include "common/cuda_check.h"
#include "common/launch.h"
#include "common/ptx.cuh"
#include "moe.h"

namespace inferops::moe {

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ int load_id(const LayoutParams& p, int t, int j) {
  const int64_t off = int64_t(t) * p.ids_stride + j;
  return p.ids_int64 ? static_cast<int>(max(min(static_cast<const int64_t*>(p.topk_ids)[off],
                                                 int64_t(INT32_MAX)), int64_t(INT32_MIN)))
                     : static_cast<const int32_t*>(p.topk_ids)[off];
}


// The dynamic shared memory in ints, in carve-up order: the kernel forms its pointers from
// these offsets and the launcher allocates `total`, so the two cannot diverge again (#22: the
// launch size was once counted separately, one [E] array short, and pass 3 ran past the end).
struct SmemLayout {
  int counts, running, offs, warp_cnt, rank_run, warp_rcnt, total;
};
__host__ __device__ constexpr SmemLayout smem_layout(int E, int R) {
  SmemLayout l{};
  int o = 0;
  l.counts = o;    o += E;           // [E]
  l.running = o;   o += E;           // [E]
  l.offs = o;      o += E + 1;       // [E + 1]
  l.warp_cnt = o;  o += kWarps * E;  // [kWarps][E]
  l.rank_run = o;  o += R;           // [R]
  l.warp_rcnt = o; o += kWarps * R;  // [kWarps][R]
  l.total = o;
  return l;
}
static_assert(smem_layout(256, 8).total * 4 == 36900, "the issue's main-job shape (#22)");
constexpr int kStaticSmemBytes = 2 * sizeof(int);  // err[2] below

__global__ void __launch_bounds__(kThreads, 1) RoutingLayoutKernel(const __grid_constant__ LayoutParams p) {
  INFEROPS_DYNAMIC_SMEM(int, smem, 16);
  const int E = p.num_experts, R = p.world_size;
  const SmemLayout l = smem_layout(E, R);
  int* const counts = smem + l.counts;
  int* const running = smem + l.running;
  int* const offs = smem + l.offs;
  int* const warp_cnt = smem + l.warp_cnt;
  int* const rank_run = smem + l.rank_run;
  int* const warp_rcnt = smem + l.warp_rcnt;
  __shared__ int err[2];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n = p.num_tokens * p.topk;

  for (int e = tid; e < E; e += kThreads) counts[e] = running[e] = 0;
  for (int i = tid; i < kWarps * E; i += kThreads) warp_cnt[i] = 0;
  for (int r = tid; r < R; r += kThreads) rank_run[r] = 0;
  // 64-bit: capacity may be up to INT32_MAX, where row + kThreads would overflow int
  for (int64_t row = tid; row < p.capacity; row += kThreads) p.src_index[row] = -1;
  if (tid < 2) err[tid] = 0;
  __syncthreads();

  auto valid_expert = [&](int e) { return e >= 0 && e < E && p.placement[e] >= 0 && p.placement[e] < R; };

  // Pass 1: counts.
  for (int i = tid; i < n; i += kThreads) {
    const int e = load_id(p, i / p.topk, i % p.topk);
    if (valid_expert(e)) {
      atomicAdd(&counts[e], 1);
    } else {
      atomicAdd(&err[0], 1);
    }
  }
  __syncthreads();
  if (tid == 0) {
    int o = 0;
    for (int e = 0; e < E; ++e) {
      offs[e] = o;
      o += (counts[e] + p.align - 1) / p.align * p.align;
    }
    offs[E] = o;
  }
  __syncthreads();
  for (int e = tid; e <= E; e += kThreads) {
    p.expert_offsets[e] = offs[e];
    if (e < E) p.tokens_per_expert[e] = counts[e];
  }

  // Pass 2: rows in (token, slot) order within each expert.
  for (int base = 0; base < n; base += kThreads) {
    const int i = base + tid;
    const int e = i < n ? load_id(p, i / p.topk, i % p.topk) : -1;
    const bool ok = i < n && valid_expert(e);
    const unsigned peers = __match_any_sync(0xffffffffu, ok ? e : -1);
    const int in_warp = __popc(peers & lanemask_lt());
    const bool leader = in_warp == 0;
    if (ok && leader) warp_cnt[warp * E + e] = __popc(peers);
    __syncthreads();
    if (ok) {
      int before = running[e];
      for (int w = 0; w < warp; ++w) before += warp_cnt[w * E + e];
      const int pos = offs[e] + before + in_warp;
      if (pos < p.capacity) {
        p.dst_index[i] = pos;
        p.src_index[pos] = i / p.topk;
      } else {
        p.dst_index[i] = -1;
        atomicAdd(&err[1], 1);
      }
    } else if (i < n) {
      p.dst_index[i] = -1;
    }
    __syncthreads();
    if (ok && leader) {
      atomicAdd(&running[e], __popc(peers));
      warp_cnt[warp * E + e] = 0;
    }
    __syncthreads();
  }

  // Pass 3: each token once per destination rank, in token order.
  for (int r = tid; r < kWarps * R; r += kThreads) warp_rcnt[r] = 0;
  __syncthreads();
  for (int base = 0; base < p.num_tokens; base += kThreads) {
    const int t = base + tid;
    unsigned long long mask = 0;
    if (t < p.num_tokens) {
      for (int j = 0; j < p.topk; ++j) {
        const int e = load_id(p, t, j);
        if (valid_expert(e)) mask |= 1ull << p.placement[e];
      }
    }
    for (int r = 0; r < R; ++r) {
      const unsigned ballot = __ballot_sync(0xffffffffu, (mask >> r) & 1);
      if (lane == 0) warp_rcnt[warp * R + r] = __popc(ballot);
    }
    __syncthreads();
    for (int r = 0; r < R; ++r) {
      const bool bit = (mask >> r) & 1;
      const unsigned ballot = __ballot_sync(0xffffffffu, bit);
      if (t < p.num_tokens) {
        int pos = -1;
        if (bit) {
          pos = rank_run[r] + __popc(ballot & lanemask_lt());
          for (int w = 0; w < warp; ++w) pos += warp_rcnt[w * R + r];
        }
        p.send_index[int64_t(t) * R + r] = pos;
      }
    }
    __syncthreads();
    for (int r = tid; r < R; r += kThreads) {
      int total = 0;
      for (int w = 0; w < kWarps; ++w) total += warp_rcnt[w * R + r];
      rank_run[r] += total;
    }
    __syncthreads();
  }
  if (tid == 0) {
    int o = 0;
    for (int r = 0; r < R; ++r) {
      p.send_offsets[r] = o;
      p.tokens_per_rank[r] = rank_run[r];
      o += rank_run[r];
    }
    p.send_offsets[R] = o;
    p.errors[0] = err[0];
    p.errors[1] = err[1];
  }
}

}  // namespace

void launch_routing_layout(const LayoutParams& p, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  const int E = p.num_experts, R = p.world_size;
  const int64_t bytes = int64_t(smem_layout(E, R).total) * int64_t(sizeof(int));
  const int limit = device_info(device).max_smem_per_block_optin;
  INFEROPS_CHECK_ARG(bytes + kStaticSmemBytes <= limit, "routing_layout: E = ", E, " experts and R = ", R,
                     " ranks need ", bytes, " bytes of shared memory ((3 + ", kWarps, ") E + 1 + ",
                     1 + kWarps, " R ints), more than device ", device, " allows (", limit, ")");
  const int smem = static_cast<int>(bytes);
  set_dynamic_smem(RoutingLayoutKernel, smem, device);
  launch_kernel(RoutingLayoutKernel, 1, kThreads, smem, as_stream(stream), p);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

}  // namespace inferops::moe
