// bench_tp: microbenchmark of the fused GEMM + reduce-scatter (T3) kernel on one GPU: world 1
// (the GEMM with its epilogue, no peers) and W "virtual ranks" (W symmetric buffers on one
// device, one stream per rank, each rank's grid limited to SMs / W blocks so all W are
// resident together, as python/inferops/tp/gemm_rs.py's virtual mode does). On the CPU SIMT
// executor the W grids run as one concurrent pool (simt::concurrent_begin/end), 2 blocks each.
// Harness and flags: bench/cpp/harness.h, docs/bench.md.
//
// The row-parallel linear layer Y = A B with A [M, K], B [K, N] split along K: rank r holds
// A_r [M, K/W] and B_r [K/W, N]; its result is rows [r M/W, (r+1) M/W) of sum_s A_s B_s.
// FLOPs 2 M N K (all ranks, one device), compared with the datasheet BF16 peak. Bytes:
// every A_r and B_r read once and
// the W outputs written (the peer pushes stay on the device here, so they are not counted).
// Reference (host, double): the sum of the W products, sliced by rows. The kernel pushes
// partial tiles in the input dtype, so the tolerance allows W roundings of the output dtype.
#include <algorithm>
#include <cmath>

#include "harness.h"
#include "tp/tp.h"

using namespace inferops;
using namespace inferops::bench;

namespace {

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

void run_gemm_rs(Ctx& ctx, const Case& c) {
  const int64_t W = c.i("world"), M = c.i("M"), N = c.i("N"), Ktot = c.i("K");
  const DType dt = parse_float_dtype(c.s("dtype"));
  if (W < 1 || W > tp::kMaxWorld || M < W || M % W || Ktot < W || Ktot % W) {
    throw ValueError("expected 1 <= world <= 32 and M, K multiples of world");
  }
  const int64_t K = Ktot / W;  // each rank's slice of the inner dim
  const int es = dtype_size(dt);
  const int64_t Ml = M / W;
  std::vector<HostTensor> a, b;
  std::vector<Buf> da, db, dout, dws, dstate;
  const tp::BufferLayout lay = tp::buffer_layout(M, N, W, es);
  const int64_t ws_bytes = W > 1 ? lay.total_bytes : 0;
  std::vector<int64_t> peers(static_cast<size_t>(W));
  for (int64_t r = 0; r < W; ++r) {
    a.push_back(random_tensor(ctx.rng, dt, M * K));
    b.push_back(random_tensor(ctx.rng, dt, K * N));
    da.push_back(upload(a.back()));
    db.push_back(upload(b.back()));
    dout.emplace_back(Ml * N * es);
    dws.emplace_back(ws_bytes);
    dws.back().fill_byte(0);  // flags start at epoch 0
    dstate.emplace_back(tp::kStateWords * 4);
    dstate.back().fill_byte(0);
    peers[r] = int64_t(reinterpret_cast<std::uintptr_t>(dws.back().get()));
  }
  Buf dpeers = Buf::from(peers);
  // Blocks per rank: all W grids must be resident at once (they spin-wait on each other).
  const int blocks = W == 1 ? 0 : ctx.simulated ? 2 : std::max(1, ctx.sm_count / int(W));
  const double timeout_s = 10.0;
  std::vector<cudaStream_t> streams(static_cast<size_t>(W));
  std::vector<cudaEvent_t> joins(static_cast<size_t>(W));
  cudaEvent_t fork;
  INFEROPS_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  for (int64_t r = 0; r < W; ++r) {
    INFEROPS_CUDA_CHECK(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking));
    INFEROPS_CUDA_CHECK(cudaEventCreateWithFlags(&joins[r], cudaEventDisableTiming));
  }
  auto launch = [&](int64_t r, cudaStream_t s) {
    tp::gemm_reduce_scatter(view(da[r], dt, {M, K}), view(db[r], dt, {K, N}), view(dout[r], dt, {Ml, N}),
                            view(dpeers, DType::kInt64, {W}), view(dstate[r], DType::kInt32, {tp::kStateWords}),
                            int(r), int(W), M, N, ws_bytes, timeout_s, blocks, reinterpret_cast<std::uintptr_t>(s));
  };
  auto run = [&] {
    if (W == 1) {
      launch(0, nullptr);
      return;
    }
#ifdef INFEROPS_SIMT
    simt::concurrent_begin();
    try {
      for (int64_t r = 0; r < W; ++r) launch(r, nullptr);
    } catch (...) {
      simt::concurrent_end(false);
      throw;
    }
    simt::concurrent_end(true);
#else
    // Fork from the legacy stream (where the harness records its events), one stream per
    // rank, join back: the W kernels overlap, the events time the whole reduce-scatter.
    INFEROPS_CUDA_CHECK(cudaEventRecord(fork, nullptr));
    for (int64_t r = 0; r < W; ++r) {
      INFEROPS_CUDA_CHECK(cudaStreamWaitEvent(streams[r], fork, 0));
      launch(r, streams[r]);
      INFEROPS_CUDA_CHECK(cudaEventRecord(joins[r], streams[r]));
    }
    for (int64_t r = 0; r < W; ++r) INFEROPS_CUDA_CHECK(cudaStreamWaitEvent(nullptr, joins[r], 0));
#endif
  };
  auto check_state = [&] {
    for (int64_t r = 0; r < W; ++r) {
      const std::vector<int32_t> st = dstate[r].to_host<int32_t>();
      if (st[tp::kError] != tp::kOk) {
        throw Error("gemm_rs: rank " + std::to_string(r) + " timed out waiting for rank " +
                    std::to_string(st[tp::kErrorSource]) + " (tile " + std::to_string(st[tp::kErrorTile]) + ")");
      }
    }
  };
  if (ctx.check) {
    for (auto& o : dout) o.fill_byte(0xff);
    run();
    INFEROPS_CUDA_CHECK(cudaDeviceSynchronize());
    check_state();
    ctx.perturb_bytes(dout[W - 1], 0, es);
    for (int64_t r = 0; r < W; ++r) {
      std::vector<double> ref(static_cast<size_t>(Ml * N), 0.0);
      for (int64_t s = 0; s < W; ++s) {
        for (int64_t i = 0; i < Ml; ++i) {
          const float* arow = &a[s].values[(r * Ml + i) * K];
          for (int64_t kk = 0; kk < K; ++kk) {
            const double av = arow[kk];
            const float* brow = &b[s].values[kk * N];
            for (int64_t n = 0; n < N; ++n) ref[i * N + n] += av * brow[n];
          }
        }
      }
      check_close(ctx, "gemm_rs out[rank " + std::to_string(r) + "]", download_floats(dout[r], dt, Ml * N), ref,
                  out_atol(dt) * double(W + 1) * std::max(1.0, max_abs(ref)), out_rtol(dt) * double(W + 1));
    }
  }
  const Timing t = ctx.time([&](int) { run(); });
  INFEROPS_CUDA_CHECK(cudaDeviceSynchronize());
  check_state();
  for (int64_t r = 0; r < W; ++r) {
    cudaStreamDestroy(streams[r]);
    cudaEventDestroy(joins[r]);
  }
  cudaEventDestroy(fork);
  const double bytes = double(W) * (M * K + K * N + Ml * N) * es;
  ctx.report("gemm_rs", c, t, bytes, 2.0 * M * N * Ktot, ctx.datasheet_bf16_tflops,
             W == 1 ? "world 1" : std::to_string(W) + " virtual ranks, " + std::to_string(blocks) + " blocks each");
}

const char* kHelp =
    "Fused GEMM + reduce-scatter (T3), the row-parallel linear layer: A [M, K] B [K, N] split\n"
    "along K over --world ranks (A_s [M, K/W], B_s [K/W, N]); rank r gets rows\n"
    "[r M/W, (r+1) M/W) of sum_s A_s B_s. --world 1 runs the plain GEMM path; --world W > 1 runs\n"
    "W virtual ranks on one GPU (W symmetric buffers, one stream per rank, SMs / W blocks each),\n"
    "so the time includes every rank's GEMM and the reduction.";

}  // namespace

int main(int argc, char** argv) {
  std::vector<OpSpec> ops = {
      {"gemm_rs", "fused GEMM + reduce-scatter (world 1 and virtual ranks)",
       {{"world", "1,2,4", "1,2,3", "ranks (virtual ranks on one device when > 1)"},
        {"M", "4096", "264", "rows of A (multiple of world)"},
        {"N", "8192", "136", "columns of B (multiple of 8)"},
        {"K", "8192", "48", "inner dim, split over the ranks (K / world a multiple of 8)"},
        {"dtype", "bf16", "bf16,fp16", "bf16 | fp16"}},
       run_gemm_rs},
  };
  return bench_main(argc, argv, "bench_tp", kHelp, ops);
}
