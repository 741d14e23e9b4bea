// bench_linear_attention: microbenchmarks of the linear-attention family (SLAB):
// simplified (SLAB's non-causal SLA with its 5x5 depthwise conv), causal (chunked causal
// linear attention, fla's layout) and step (one recurrent decode step on the state).
// Harness and flags: bench/cpp/harness.h, docs/bench.md.
//
// Bytes counted: q, k, v read and the output written once (plus the fp32 state read and
// written for causal's final state and the step). FLOPs: simplified 4 B H N d^2 (k^T v and
// q (k^T v)) + 50 B H N d (conv); causal 4 B T H K Vs (state products) + 2 B T H 64 (K + Vs)
// (the masked intra-chunk products at chunk 64); step 4 B H K Vs.
// References (host, double): the formulas of csrc/linear_attention/linear_attention.h and
// python/inferops/reference/linear_attention.py, the causal one as the plain recurrence.
#include <algorithm>
#include <cmath>

#include "harness.h"
#include "linear_attention/linear_attention.h"

using namespace inferops;
using namespace inferops::bench;

namespace {

constexpr double kEps = 1e-6;  // SLA_EPS and NORM_EPS of the reference

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// ---- simplified (SLA) ----------------------------------------------------------------------
void run_simplified(Ctx& ctx, const Case& c) {
  const int64_t B = c.i("B"), H = c.i("H"), h = c.i("h"), w = c.i("w"), d = c.i("d");
  const DType dt = parse_float_dtype(c.s("dtype"));
  const int64_t N = h * w, n = B * H * N * d;
  HostTensor q = random_tensor(ctx.rng, dt, n), k = random_tensor(ctx.rng, dt, n), v = random_tensor(ctx.rng, dt, n);
  HostTensor wt = random_tensor(ctx.rng, DType::kFloat32, d * 25, -0.2f, 0.2f);
  HostTensor bias = random_tensor(ctx.rng, DType::kFloat32, d);
  Buf dq = upload(q), dk = upload(k), dv = upload(v), dw = upload(wt), db = upload(bias);
  Buf dout(n * dtype_size(dt)), dkv(B * H * d * d * 4), dks(B * H * d * 4);
  auto run = [&] {
    const TensorView bv = view(db, DType::kFloat32, {d});
    linear_attention::simplified_linear_attention(
        view(dq, dt, {B, H, N, d}), view(dk, dt, {B, H, N, d}), view(dv, dt, {B, H, N, d}),
        view(dw, DType::kFloat32, {d, 1, 5, 5}), &bv, view(dout, dt, {B, H, N, d}),
        view(dkv, DType::kFloat32, {B * H, d, d}), view(dks, DType::kFloat32, {B * H, d}), int(h), int(w), 0);
  };
  if (ctx.check) {
    dout.fill_byte(0xff);
    dkv.fill_byte(0xff);
    dks.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dout, 0, dtype_size(dt));
    std::vector<double> ref(n), kv(d * d), ks(d);
    auto relu = [](double x) { return x > 0 ? x : 0.0; };
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const float* Q = &q.values[bh * N * d];
      const float* K = &k.values[bh * N * d];
      const float* V = &v.values[bh * N * d];
      std::fill(kv.begin(), kv.end(), 0.0);
      std::fill(ks.begin(), ks.end(), 0.0);
      for (int64_t t = 0; t < N; ++t) {
        for (int64_t a = 0; a < d; ++a) {
          const double ka = relu(K[t * d + a]);
          ks[a] += ka;
          for (int64_t b = 0; b < d; ++b) kv[a * d + b] += ka * V[t * d + b];
        }
      }
      for (int64_t t = 0; t < N; ++t) {
        double z = 0;
        for (int64_t a = 0; a < d; ++a) z += relu(Q[t * d + a]) * ks[a];
        z = 1.0 / (z + kEps);
        const int64_t y = t / w, x = t % w;
        for (int64_t b = 0; b < d; ++b) {
          double o = 0;
          for (int64_t a = 0; a < d; ++a) o += relu(Q[t * d + a]) * kv[a * d + b];
          double conv = bias.values[b];
          for (int64_t dy = -2; dy <= 2; ++dy) {
            for (int64_t dx = -2; dx <= 2; ++dx) {
              const int64_t yy = y + dy, xx = x + dx;
              if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
              conv += double(wt.values[b * 25 + (dy + 2) * 5 + (dx + 2)]) * V[(yy * w + xx) * d + b];
            }
          }
          ref[bh * N * d + t * d + b] = o * z + conv;
        }
      }
    }
    const double scale = std::max(1.0, max_abs(ref));
    check_close(ctx, "simplified out", download_floats(dout, dt, n), ref,
                (dt == DType::kFloat32 ? 5e-4 : out_atol(dt)) * scale, out_rtol(dt));
  }
  const Timing t = ctx.time([&](int) { run(); });
  const double bytes = 4.0 * n * dtype_size(dt);
  ctx.report("simplified", c, t, bytes, 4.0 * B * H * N * d * d + 50.0 * n, 0);
}

// ---- causal / step shared --------------------------------------------------------------------
struct Mode {
  bool relu = false, normalize = false;
};
Mode parse_mode(const std::string& s) {
  if (s == "plain") return {false, false};
  if (s == "relu") return {true, false};
  if (s == "relu_norm") return {true, true};
  throw ValueError("--mode: expected plain, relu or relu_norm, got '" + s + "'");
}

void run_causal(Ctx& ctx, const Case& c) {
  const int64_t B = c.i("B"), T = c.i("T"), H = c.i("H"), K = c.i("K"), V = c.i("V");
  const DType dt = parse_float_dtype(c.s("dtype"));
  const Mode m = parse_mode(c.s("mode"));
  const int64_t Vs = V + (m.normalize ? 1 : 0);
  HostTensor q = random_tensor(ctx.rng, dt, B * T * H * K), k = random_tensor(ctx.rng, dt, B * T * H * K);
  HostTensor v = random_tensor(ctx.rng, dt, B * T * H * V);
  Buf dq = upload(q), dk = upload(k), dv = upload(v), dout(B * T * H * V * dtype_size(dt)), dfin(B * H * K * Vs * 4);
  const float scale = float(1.0 / std::sqrt(double(K)));
  auto run = [&] {
    const TensorView fin = view(dfin, DType::kFloat32, {B, H, K, Vs});
    linear_attention::causal_linear_attention(view(dq, dt, {B, T, H, K}), view(dk, dt, {B, T, H, K}),
                                              view(dv, dt, {B, T, H, V}), view(dout, dt, {B, T, H, V}), nullptr,
                                              &fin, nullptr, scale, m.normalize, m.relu, 0);
  };
  if (ctx.check) {
    dout.fill_byte(0xff);
    dfin.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dout, 0, dtype_size(dt));
    std::vector<double> ro(B * T * H * V), rs(B * H * K * Vs), S(K * Vs), o(Vs);
    auto f = [&](double x) { return m.relu && x < 0 ? 0.0 : x; };
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hh = 0; hh < H; ++hh) {
        std::fill(S.begin(), S.end(), 0.0);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t qk = ((b * T + t) * H + hh) * K, vo = ((b * T + t) * H + hh) * V;
          for (int64_t a = 0; a < K; ++a) {
            const double ka = f(k.values[qk + a]);
            for (int64_t j = 0; j < Vs; ++j) S[a * Vs + j] += ka * (j < V ? double(v.values[vo + j]) : 1.0);
          }
          std::fill(o.begin(), o.end(), 0.0);
          for (int64_t a = 0; a < K; ++a) {
            const double qa = f(q.values[qk + a]) * scale;
            for (int64_t j = 0; j < Vs; ++j) o[j] += qa * S[a * Vs + j];
          }
          for (int64_t j = 0; j < V; ++j) ro[vo + j] = m.normalize ? o[j] / (o[V] + kEps) : o[j];
        }
        std::copy(S.begin(), S.end(), rs.begin() + (b * H + hh) * K * Vs);
      }
    }
    const double so = std::max(1.0, max_abs(ro)), ss = std::max(1.0, max_abs(rs));
    check_close(ctx, "causal o", download_floats(dout, dt, B * T * H * V), ro, out_atol(dt) * so, out_rtol(dt));
    check_close(ctx, "causal final_state", download_floats(dfin, DType::kFloat32, B * H * K * Vs), rs, 1e-4 * ss, 1e-4);
  }
  const Timing t = ctx.time([&](int) { run(); });
  const double bytes = double(B * T * H) * (2 * K + 2 * V) * dtype_size(dt) + 4.0 * B * H * K * Vs;
  const double flops = 4.0 * B * T * H * K * Vs + 2.0 * B * T * H * 64 * (K + Vs);
  ctx.report("causal", c, t, bytes, flops, ctx.datasheet_bf16_tflops);
}

void run_step(Ctx& ctx, const Case& c) {
  const int64_t B = c.i("B"), H = c.i("H"), K = c.i("K"), V = c.i("V");
  const DType dt = parse_float_dtype(c.s("dtype"));
  const Mode m = parse_mode(c.s("mode"));
  const int64_t Vs = V + (m.normalize ? 1 : 0);
  HostTensor q = random_tensor(ctx.rng, dt, B * H * K), k = random_tensor(ctx.rng, dt, B * H * K);
  HostTensor v = random_tensor(ctx.rng, dt, B * H * V);
  // A state as after a prompt: positive (ReLU features) so the normaliser stays away from 0.
  HostTensor s0 = random_tensor(ctx.rng, DType::kFloat32, B * H * K * Vs, m.relu ? 0.f : -1.f, 1.f);
  Buf dq = upload(q), dk = upload(k), dv = upload(v), ds = upload(s0), dout(B * H * V * dtype_size(dt));
  const float scale = float(1.0 / std::sqrt(double(K)));
  auto run = [&] {
    linear_attention::linear_attention_step(view(dq, dt, {B, H, K}), view(dk, dt, {B, H, K}), view(dv, dt, {B, H, V}),
                                            view(ds, DType::kFloat32, {B, H, K, Vs}), view(dout, dt, {B, H, V}), scale,
                                            m.normalize, m.relu, 0);
  };
  if (ctx.check) {
    dout.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dout, 0, dtype_size(dt));
    std::vector<double> ro(B * H * V), rs(B * H * K * Vs), o(Vs);
    auto f = [&](double x) { return m.relu && x < 0 ? 0.0 : x; };
    for (int64_t bh = 0; bh < B * H; ++bh) {
      std::fill(o.begin(), o.end(), 0.0);
      for (int64_t a = 0; a < K; ++a) {
        const double ka = f(k.values[bh * K + a]), qa = f(q.values[bh * K + a]) * scale;
        for (int64_t j = 0; j < Vs; ++j) {
          const double s = double(s0.values[(bh * K + a) * Vs + j]) + ka * (j < V ? double(v.values[bh * V + j]) : 1.0);
          rs[(bh * K + a) * Vs + j] = s;
          o[j] += qa * s;
        }
      }
      for (int64_t j = 0; j < V; ++j) ro[bh * V + j] = m.normalize ? o[j] / (o[V] + kEps) : o[j];
    }
    const double so = std::max(1.0, max_abs(ro));
    check_close(ctx, "step o", download_floats(dout, dt, B * H * V), ro, out_atol(dt) * so, out_rtol(dt));
    check_close(ctx, "step state", download_floats(ds, DType::kFloat32, B * H * K * Vs), rs, 1e-5, 1e-5);
  }
  // Timed runs keep updating the state in place (as decode does).
  const Timing t = ctx.time([&](int) { run(); });
  const double bytes = 8.0 * B * H * K * Vs + double(B * H) * (2 * K + 2 * V) * dtype_size(dt);
  ctx.report("step", c, t, bytes, 4.0 * B * H * K * Vs, 0);
}

const char* kHelp =
    "Linear attention (SLAB) kernels: simplified (non-causal SLA + 5x5 depthwise conv, [B, H, N, d]),\n"
    "causal (chunked causal linear attention, fla's [B, T, H, K] layout, final state written) and\n"
    "step (one decode token per sequence, state [B, H, K, V(+1)] fp32 updated in place).\n"
    "--mode: plain (identity features), relu (ReLU features), relu_norm (ReLU + normaliser).";

}  // namespace

int main(int argc, char** argv) {
  std::vector<OpSpec> ops = {
      {"simplified", "SLAB simplified linear attention (non-causal) with the depthwise conv",
       {{"B", "64", "2", "batch"},
        {"H", "3", "2", "heads"},
        {"h", "56", "7", "token grid height"},
        {"w", "56", "5", "token grid width"},
        {"d", "32", "32,64", "head dim (32 | 64 | 128)"},
        {"dtype", "bf16", "bf16,fp32", "bf16 | fp16 | fp32"}},
       run_simplified},
      {"causal", "chunked causal linear attention (prefill)",
       {{"B", "8", "2", "batch"},
        {"T", "4096,16384", "70", "tokens per sequence"},
        {"H", "32", "2", "heads"},
        {"K", "128", "32,64", "key dim (32 | 64 | 128)"},
        {"V", "128", "32", "value dim"},
        {"mode", "plain", "plain,relu_norm", "plain | relu | relu_norm"},
        {"dtype", "bf16", "bf16,fp16", "bf16 | fp16"}},
       run_causal},
      {"step", "recurrent decode step on the state",
       {{"B", "64", "3", "sequences"},
        {"H", "32", "2", "heads"},
        {"K", "128", "32,128", "key dim (32 | 64 | 128)"},
        {"V", "128", "48", "value dim"},
        {"mode", "plain", "plain,relu_norm", "plain | relu | relu_norm"},
        {"dtype", "bf16", "bf16,fp16", "bf16 | fp16"}},
       run_step},
  };
  return bench_main(argc, argv, "bench_linear_attention", kHelp, ops);
}
