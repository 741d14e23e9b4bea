// Causal linear attention (chunkwise, tensor cores) and its recurrent step.
//
// CausalChunkKernel: grid (value tiles of 64, heads, sequences), 4 warps. The
// block walks its sequence in chunks of C = 64 tokens, keeping the state tile
// S [K, 64] (fp32, shared memory, plus a bf16/fp16 copy as an MMA operand):
//   A = Q_c K_c^T, causal mask (j <= i)            WMMA, fp32
//   O_c = Q_c S + mask(A) V_c                       WMMA, fp32 accumulators
//   S  += K_c^T V_c                                 WMMA, fp32
// q is scaled (and q, k ReLU'd when asked) as it is staged. With normalize,
// the key sum z [K] runs beside S and each row of O_c is divided by
// q_t . (z_0 + sum_{j<=t} k_j) (= row sum of mask(A) + q_t . z_prev).
// Shared memory (K = 128): Q, K 17 KiB each, V 9 KiB, S 34 KiB + 18 KiB,
// A / O staging 17 KiB, P 9 KiB: ~122 KiB, one block per SM.
// fp16 range (#23): S is kept in fp32 but Q S needs it as an fp16 operand, and a state
// entry above 65504 would round to inf. Each 16-column group of the operand copy is
// therefore stored as S * 2^-e (e >= 0 chosen from the group's max |S|, e = 0 while it is
// below 2^15) and Q S's fp32 accumulator is multiplied back by 2^e before P V is added:
// see refresh_operand. bf16 has fp32's range and is never scaled.
//
// StepKernel: one token, one block per (sequence, head), one thread per state
// column: S[:, c] += k v_c, o_c = scale q . S[:, c]; the normaliser column
// (c = V, v = 1) gives the denominator. Reads and writes the state once:
// memory bound on 2 * K * Vs * 4 bytes per (sequence, head).
#include <mma.h>

#include <type_traits>

#include "common/kernel_launch.cuh"
#include "common/cuda_check.h"
#include "common/dispatch.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "linear_attention.h"

namespace inferops::linear_attention {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kC = 64;   // tokens per chunk
constexpr int kVt = 64;  // value columns per block
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kNormEps = 1e-10f;  // fla's normaliser eps (drop-in parity: same call, same answer)
// The state operand copy is scaled (per 16 columns) once its max |S| reaches this.
constexpr float kScaleFrom = 32768.f;  // 2^15: fp16's max finite is 65504 (< 2^16)
static_assert(kVt / 16 == kWarps, "refresh_operand gives each warp one 16-column group");

template <typename T, int K>
struct ChunkSmem {
  static constexpr int kLdQ = K + 8;      // halves
  static constexpr int kLdV = kVt + 8;    // halves
  static constexpr int kLdS = kVt + 4;    // floats
  static constexpr int kLdA = kC + 4;     // floats (A, then O staging)
  static constexpr int kLdP = kC + 8;     // halves
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kC * kLdQ * int(sizeof(T));
  static constexpr int kV = kK + kC * kLdQ * int(sizeof(T));
  static constexpr int kS = kV + kC * kLdV * int(sizeof(T));
  static constexpr int kST = kS + K * kLdS * 4;
  static constexpr int kA = kST + K * kLdV * int(sizeof(T));
  static constexpr int kP = kA + kC * kLdA * 4;
  static constexpr int kZ = kP + kC * kLdP * int(sizeof(T));
  static constexpr int kDen = kZ + K * 4;
  static constexpr int kUp = kDen + kC * 4;   // [kVt / 16] fp32 2^e of each column group
  static constexpr int kBytes = kUp + kVt / 16 * 4;
  static_assert(kK % 128 == 0 && kV % 128 == 0 && kS % 128 == 0 && kST % 128 == 0 &&
                    kA % 128 == 0 && kP % 128 == 0 && kZ % 16 == 0,
                "shared-memory regions must stay aligned");
};

template <typename T, int K>
__global__ void __launch_bounds__(kThreads, 1) CausalChunkKernel(const __grid_constant__ CausalParams p) {
  using L = ChunkSmem<T, K>;
  INFEROPS_DYNAMIC_SMEM(unsigned char, smem, 128);
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  T* v_s = reinterpret_cast<T*>(smem + L::kV);
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  T* st_s = reinterpret_cast<T*>(smem + L::kST);
  float* a_s = reinterpret_cast<float*>(smem + L::kA);
  T* p_s = reinterpret_cast<T*>(smem + L::kP);
  float* z_s = reinterpret_cast<float*>(smem + L::kZ);
  float* den_s = reinterpret_cast<float*>(smem + L::kDen);
  float* up_s = reinterpret_cast<float*>(smem + L::kUp);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int v0 = blockIdx.x * kVt, h = blockIdx.y, seq = blockIdx.z;
  const int V = p.value_dim;
  const int Vs = p.normalize ? V + 1 : V;  // state columns
  int b, t_begin, t_end;
  if (p.cu_seqlens) {
    b = 0;
    t_begin = p.cu_seqlens[seq];
    t_end = p.cu_seqlens[seq + 1];
  } else {
    b = seq;
    t_begin = 0;
    t_end = p.seq_len;
  }
  const int64_t state_base = (int64_t(seq) * p.heads + h) * K * Vs;

  // S (fp32) -> its operand copy st_s for Q S. Warp w owns columns [16 w, 16 w + 16):
  // with m = max |S| over them, fp16 stores S * 2^-e, e = ilogb(m) - 14 (so the group's max
  // lands in [2^14, 2^15)) when m >= 2^15, else e = 0, and up_s[w] = 2^e. Exact: scaling by
  // a power of two commutes with rounding to fp16 for every entry that stays a normal
  // number (|S| >= 2^(e - 14), i.e. within 2^28 of the group's max; smaller ones round as
  // subnormals, an absolute error < 2^(e - 25), below the max entry's own rounding error),
  // and Q (S 2^-e) times 2^e in fp32 is exact: the product equals what an fp16 without an
  // upper range limit would give, and it is bit-identical to before while m < 2^15. A
  // non-finite m (an fp32 state that already overflowed) keeps e = 0. Cost per chunk: one
  // more pass over the K x 64 fp32 tile (max) and 5 shuffles per warp, against the three
  // 64 x K x 64 products of the chunk; nothing for bf16.
  auto refresh_operand = [&]() {
    const int cg = warp * 16;
    float down = 1.f, up = 1.f;
    if constexpr (std::is_same_v<T, __half>) {
      float m = 0.f;
      for (int e = lane; e < K * 16; e += 32) m = fmaxf(m, fabsf(s_s[(e / 16) * L::kLdS + cg + e % 16]));
      for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (m >= kScaleFrom && m <= 3.4028235e38f) {
        const int ex = ilogbf(m) - 14;
        up = ldexpf(1.f, ex);
        down = ldexpf(1.f, -ex);
      }
    }
    for (int e = lane; e < K * 16; e += 32) {
      const int r = e / 16, c = cg + e % 16;
      st_s[r * L::kLdV + c] = from_float<T>(s_s[r * L::kLdS + c] * down);
    }
    if (lane == 0) up_s[warp] = up;
  };

  // State tile and key sum from the initial state (or zeros).
  for (int e = tid; e < K * kVt; e += kThreads) {
    const int r = e / kVt, c = e % kVt;
    s_s[r * L::kLdS + c] =
        p.initial_state && v0 + c < V ? p.initial_state[state_base + int64_t(r) * Vs + v0 + c] : 0.f;
  }
  for (int r = tid; r < K; r += kThreads) {
    z_s[r] = p.normalize && p.initial_state ? p.initial_state[state_base + int64_t(r) * Vs + V] : 0.f;
  }
  __syncthreads();
  refresh_operand();
  __syncthreads();

  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);
  T* og = static_cast<T*>(p.o);
  const int my_row = warp * 16 + lane / 2;  // this lane pair's row of A / P / O
  const int half = lane % 2;

  for (int c0 = t_begin; c0 < t_end; c0 += kC) {
    const int n = min(kC, t_end - c0);
    // 1. Stage Q (scaled, ReLU), K (ReLU), V tile; zeros past the chunk / value dim.
    for (int e = tid; e < kC * K; e += kThreads) {
      const int t = e / K, c = e % K;
      float qv = 0.f, kv = 0.f;
      if (t < n) {
        const int64_t tok = c0 + t;
        qv = to_float(qg[b * p.q_stride[0] + tok * p.q_stride[1] + int64_t(h) * p.q_stride[2] + c]);
        kv = to_float(kg[b * p.k_stride[0] + tok * p.k_stride[1] + int64_t(h) * p.k_stride[2] + c]);
        if (p.use_relu) {
          qv = fmaxf(qv, 0.f);
          kv = fmaxf(kv, 0.f);
        }
      }
      q_s[t * L::kLdQ + c] = from_float<T>(qv * p.scale);
      k_s[t * L::kLdQ + c] = from_float<T>(kv);
    }
    for (int e = tid; e < kC * kVt; e += kThreads) {
      const int t = e / kVt, c = e % kVt;
      float vv = 0.f;
      if (t < n && v0 + c < V) {
        vv = to_float(vg[b * p.v_stride[0] + int64_t(c0 + t) * p.v_stride[1] + int64_t(h) * p.v_stride[2] + v0 + c]);
      }
      v_s[t * L::kLdV + c] = from_float<T>(vv);
    }
    __syncthreads();

    // 2. A = Q K^T for this warp's 16 rows.
    for (int j = 0; j < kC / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < K / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, q_s + warp * 16 * L::kLdQ + kk * 16, L::kLdQ);
        wmma::load_matrix_sync(bt, k_s + j * 16 * L::kLdQ + kk * 16, L::kLdQ);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(a_s + warp * 16 * L::kLdA + j * 16, acc, L::kLdA, wmma::mem_row_major);
    }
    __syncwarp();

    // 3. Causal mask -> P (operand type); normaliser denominators.
    {
      const float* arow = a_s + my_row * L::kLdA + half * 32;
      T* prow = p_s + my_row * L::kLdP + half * 32;
      float rsum = 0.f;
      for (int c = 0; c < 32; ++c) {
        const int col = half * 32 + c;
        const float a = col <= my_row ? arow[c] : 0.f;
        rsum += a;
        prow[c] = from_float<T>(a);
      }
      if (p.normalize) {
        float qz = 0.f;
        for (int c = half; c < K; c += 2) qz += to_float(q_s[my_row * L::kLdQ + c]) * z_s[c];
        rsum += qz;
        rsum += __shfl_xor_sync(0xffffffffu, rsum, 1);
        if (half == 0) den_s[my_row] = rsum;
      }
    }
    __syncwarp();

    // 4. O = Q S + P V for this warp's rows; staged through A's rows of this warp.
    for (int j = 0; j < kVt / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < K / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bs;
        wmma::load_matrix_sync(a, q_s + warp * 16 * L::kLdQ + kk * 16, L::kLdQ);
        wmma::load_matrix_sync(bs, st_s + kk * 16 * L::kLdV + j * 16, L::kLdV);
        wmma::mma_sync(acc, a, bs, acc);
      }
      const float up = up_s[j];
      if (up != 1.f) {  // warp-uniform, fp16 only: undo the operand's 2^-e (refresh_operand)
        // through this warp's own A rows (fragment elements are opaque), before P V is added
        float* tile = a_s + warp * 16 * L::kLdA + j * 16;
        wmma::store_matrix_sync(tile, acc, L::kLdA, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 16 * 16; e += 32) tile[(e / 16) * L::kLdA + e % 16] *= up;
        __syncwarp();
        wmma::load_matrix_sync(acc, tile, L::kLdA, wmma::mem_row_major);
      }
#pragma unroll
      for (int kk = 0; kk < kC / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, p_s + warp * 16 * L::kLdP + kk * 16, L::kLdP);
        wmma::load_matrix_sync(bv, v_s + kk * 16 * L::kLdV + j * 16, L::kLdV);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(a_s + warp * 16 * L::kLdA + j * 16, acc, L::kLdA, wmma::mem_row_major);
    }
    __syncwarp();
    // The warp's 16 output rows, one row per store instruction: lane l writes columns 2 l and
    // 2 l + 1 of the 64 (128 contiguous bytes per row). (A lane per row half writing 32
    // scalars put 32 rows in every request: 16x the minimum sectors, executor metrics.)
    for (int r = 0; r < 16; ++r) {
      const int row = warp * 16 + r;
      if (row >= n) break;  // n: the chunk's rows, uniform over the warp
      const float inv = p.normalize ? 1.f / (den_s[row] + kNormEps) : 1.f;
      const int c = 2 * lane;
      const float2 o2 = *reinterpret_cast<const float2*>(a_s + row * L::kLdA + c);
      T* dst = og + ((int64_t(b) * p.seq_len + c0 + row) * p.heads + h) * V + v0 + c;
      if (V % 2 == 0 && v0 + c + 1 < V) {  // even V: the pair is 4-byte aligned
        Vec<T, 2> w;
        w.v[0] = from_float<T>(o2.x * inv);
        w.v[1] = from_float<T>(o2.y * inv);
        w.store(dst);
      } else {
        if (v0 + c < V) dst[0] = from_float<T>(o2.x * inv);
        if (v0 + c + 1 < V) dst[1] = from_float<T>(o2.y * inv);
      }
    }
    __syncthreads();  // every warp is done with S^T before it changes

    // 5. S += K^T V (rows of S split across warps), then refresh S^T; z += sum k.
    constexpr int kRowFrags = K / 16;
    for (int rf = warp; rf < kRowFrags; rf += kWarps) {
      for (int j = 0; j < kVt / 16; ++j) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        float* stile = s_s + rf * 16 * L::kLdS + j * 16;
        wmma::load_matrix_sync(acc, stile, L::kLdS, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < kC / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> kt;  // K^T
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
          wmma::load_matrix_sync(kt, k_s + kk * 16 * L::kLdQ + rf * 16, L::kLdQ);
          wmma::load_matrix_sync(bv, v_s + kk * 16 * L::kLdV + j * 16, L::kLdV);
          wmma::mma_sync(acc, kt, bv, acc);
        }
        wmma::store_matrix_sync(stile, acc, L::kLdS, wmma::mem_row_major);
      }
    }
    if (p.normalize) {
      for (int r = tid; r < K; r += kThreads) {
        float zsum = 0.f;
        for (int t = 0; t < n; ++t) zsum += to_float(k_s[t * L::kLdQ + r]);
        z_s[r] += zsum;
      }
    }
    __syncthreads();
    refresh_operand();
    __syncthreads();
  }

  if (p.final_state) {
    for (int e = tid; e < K * kVt; e += kThreads) {
      const int r = e / kVt, c = e % kVt;
      if (v0 + c < V) p.final_state[state_base + int64_t(r) * Vs + v0 + c] = s_s[r * L::kLdS + c];
    }
    if (p.normalize && blockIdx.x == 0) {
      for (int r = tid; r < K; r += kThreads) p.final_state[state_base + int64_t(r) * Vs + V] = z_s[r];
    }
  }
}

// StepKernel's dynamic shared memory in floats: q [K], k [K], den [1] (kernel and launch).
__host__ __device__ constexpr int step_smem_floats(int K) { return 2 * K + 1; }

template <typename T>
__global__ void StepKernel(const __grid_constant__ CausalParams p, float* state) {
  INFEROPS_DYNAMIC_SMEM(float, step_smem, 16);
  const int K = p.key_dim, V = p.value_dim;
  const int Vs = p.normalize ? V + 1 : V;
  float* q_s = step_smem;      // [K]
  float* k_s = q_s + K;        // [K]
  float* den = k_s + K;        // [1]
  const int bh = blockIdx.x;
  const int b = bh / p.heads, h = bh % p.heads;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2];
  for (int i = threadIdx.x; i < K; i += blockDim.x) {
    float qi = to_float(q[i]), ki = to_float(k[i]);
    if (p.use_relu) {
      qi = fmaxf(qi, 0.f);
      ki = fmaxf(ki, 0.f);
    }
    q_s[i] = qi * p.scale;
    k_s[i] = ki;
  }
  __syncthreads();
  float* S = state + int64_t(bh) * K * Vs;
  const int c = threadIdx.x;
  float o = 0.f;
  if (c < Vs) {
    const float vc = c < V ? to_float(v[c]) : 1.f;  // column V: the key sum
#pragma unroll 4
    for (int i = 0; i < K; ++i) {
      const float s = S[int64_t(i) * Vs + c] + k_s[i] * vc;
      S[int64_t(i) * Vs + c] = s;
      o += q_s[i] * s;
    }
    if (c == V) *den = o;
  }
  __syncthreads();
  if (c < V) {
    const float inv = p.normalize ? 1.f / (*den + kNormEps) : 1.f;
    static_cast<T*>(p.o)[int64_t(bh) * V + c] = from_float<T>(o * inv);
  }
}

template <typename T, int K>
void launch_chunk(const CausalParams& p, int device, cudaStream_t stream) {
  using L = ChunkSmem<T, K>;
  auto kernel = CausalChunkKernel<T, K>;
  set_dynamic_smem(kernel, L::kBytes, device);
  const dim3 grid((p.value_dim + kVt - 1) / kVt, p.heads, p.num_seqs);
  launch_kernel(kernel, grid, kThreads, L::kBytes, stream, p);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_causal(const CausalParams& p, DType dtype, int device, std::uintptr_t stream) {
  if (p.num_seqs == 0 || p.heads == 0 || p.value_dim == 0) return;
  DeviceGuard guard(device);
  dispatch_half(dtype, "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (p.key_dim) {
      case 32: launch_chunk<T, 32>(p, device, as_stream(stream)); break;
      case 64: launch_chunk<T, 64>(p, device, as_stream(stream)); break;
      case 128: launch_chunk<T, 128>(p, device, as_stream(stream)); break;
      default: INFEROPS_CHECK_ARG(false, "expected key dim 32, 64 or 128 for `q`, got ", p.key_dim);
    }
  });
}

void launch_step(const CausalParams& p, DType dtype, int device, std::uintptr_t stream) {
  if (p.batch == 0 || p.heads == 0) return;
  DeviceGuard guard(device);
  dispatch_float(dtype, "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int Vs = p.normalize ? p.value_dim + 1 : p.value_dim;
    const int threads = (Vs + 31) / 32 * 32;
    const int smem = step_smem_floats(p.key_dim) * 4;
    launch_kernel(StepKernel<T>, p.batch * p.heads, threads, smem, as_stream(stream), p,
                  p.final_state);
    INFEROPS_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace inferops::linear_attention
