// bench_quant: microbenchmarks of the quantized-matmul family (OstQuant): w4a16 (int4
// weights packed in the mma fragment order, split-K choices), w8a8 (INT8 / FP8 mma.sync and
// the experimental FP8 wgmma path), hadamard_quantize (online Hadamard + per-token
// quantization) and quantize_per_token. Harness and flags: bench/cpp/harness.h, docs/bench.md.
//
// Bytes counted: every operand read once and the output written once (w4a16: N K / 2 weight
// bytes + scales (+ zeros)); FLOPs 2 M N K for the GEMMs, compared with the datasheet BF16
// (w4a16: the math runs on BF16/FP16 tensor cores) or FP8/INT8 dense peak.
// References (host, double): w4a16 dequantizes the packed nibbles exactly as the header
// documents ((u - z) * s rounded to x's dtype) and multiplies; w8a8 sums the 8-bit products;
// quantize_per_token applies the rule of csrc/quant/quant_rules.cuh (bit exact);
// hadamard_quantize rotates with kron(H_m, H_p) (Sylvester H_p; Paley H_m for m = 12, 20, 28)
// and allows one code of rounding difference (the rotation's fp32 summation order differs).
#include <algorithm>
#include <cmath>

#include "harness.h"
#include "quant/quant.h"
#include "quant/quant_w4a16.h"

using namespace inferops;
using namespace inferops::bench;

namespace {

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// ---- w4a16 ---------------------------------------------------------------------------------
// Packs u [N, K] (nibbles 0..15) into int32 [K/16, 2N] (csrc/quant/quant_w4a16.h, version 1).
std::vector<uint32_t> pack_int4(const std::vector<uint8_t>& u, int64_t N, int64_t K) {
  std::vector<uint32_t> out(static_cast<size_t>(K / 16 * 2 * N), 0u);
  for (int64_t kt = 0; kt < K / 16; ++kt) {
    for (int64_t nb = 0; nb < N / 64; ++nb) {
      for (int l = 0; l < 32; ++l) {
        const int gid = l / 4, t = l % 4;
        for (int w = 0; w < 4; ++w) {
          uint32_t word = 0;
          for (int p = 0; p < 8; ++p) {
            const int hi = p >> 2, b1 = (p >> 1) & 1, b0 = p & 1;
            const int64_t k = 16 * kt + 8 * b0 + 2 * t + hi, n = 64 * nb + 16 * w + 8 * b1 + gid;
            word |= uint32_t(u[n * K + k] & 0xf) << (4 * p);
          }
          out[kt * 2 * N + nb * 128 + l * 4 + w] = word;
        }
      }
    }
  }
  return out;
}

void run_w4a16(Ctx& ctx, const Case& c) {
  const int64_t M = c.i("M"), K = c.i("K"), N = c.i("N");
  const int64_t gs = c.i("group") == 0 ? K : c.i("group");
  const int splits = int(c.i("splits"));
  const bool zp = c.i("zeros") != 0;
  const DType dt = parse_float_dtype(c.s("dtype"));
  if (M < 1 || K < 16 || K % 16 || N < 64 || N % 64 || gs <= 0 || K % gs) {
    throw ValueError("expected M >= 1, K a multiple of 16, N a multiple of 64, --group dividing K (0: per-channel)");
  }
  const int64_t G = K / gs;
  std::vector<uint8_t> u(static_cast<size_t>(N * K));
  for (auto& x : u) x = uint8_t(ctx.rng() & 0xf);
  const std::vector<uint32_t> packed = pack_int4(u, N, K);
  HostTensor x = random_tensor(ctx.rng, dt, M * K);
  HostTensor s = random_tensor(ctx.rng, dt, G * N, 0.002f, 0.02f);
  HostTensor z = random_tensor(ctx.rng, dt, zp ? G * N : 0);
  for (int64_t i = 0; i < z.numel(); ++i) {  // integer zero points 0..15 in x's dtype
    from_float(dt, z.bytes.data(), i, float(ctx.rng() % 16));
    z.values[i] = to_float(dt, z.bytes.data(), i);
  }
  HostTensor bias = random_tensor(ctx.rng, dt, N);
  Buf dx = upload(x), dq = Buf::from(packed), ds = upload(s), dz = upload(z), db = upload(bias), dout(M * N * dtype_size(dt));
  auto run = [&] {
    const TensorView zv = view(dz, dt, {G, N}), bv = view(db, dt, {N});
    quant::w4a16_matmul(view(dx, dt, {M, K}), view(dq, DType::kInt32, {K / 16, 2 * N}), view(ds, dt, {G, N}),
                        zp ? &zv : nullptr, &bv, view(dout, dt, {M, N}), int(gs), splits, 0);
  };
  if (ctx.check) {
    dout.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dout, 0, dtype_size(dt));
    std::vector<float> wdq(static_cast<size_t>(N * K));
    std::vector<uint8_t> tmp(4);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / gs;
        const float zz = zp ? z.values[g * N + n] : 8.f;
        from_float(dt, tmp.data(), 0, (float(u[n * K + k]) - zz) * s.values[g * N + n]);  // rounded like the kernel
        wdq[n * K + k] = to_float(dt, tmp.data(), 0);
      }
    }
    std::vector<double> ref(static_cast<size_t>(M * N));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += double(x.values[m * K + k]) * wdq[n * K + k];
        ref[m * N + n] = acc + bias.values[n];
      }
    }
    check_close(ctx, "w4a16 out", download_floats(dout, dt, M * N), ref, out_atol(dt) * std::max(1.0, max_abs(ref)),
                out_rtol(dt));
  }
  const Timing t = ctx.time([&](int) { run(); });
  const int es = dtype_size(dt);
  const double bytes = N * K / 2.0 + double(G * N) * es * (zp ? 2 : 1) + double(M * K + M * N + N) * es;
  ctx.report("w4a16", c, t, bytes, 2.0 * M * N * K, ctx.datasheet_bf16_tflops);
}

// ---- w8a8 ----------------------------------------------------------------------------------
void run_w8a8(Ctx& ctx, const Case& c) {
  const int64_t M = c.i("M"), K = c.i("K"), N = c.i("N");
  const std::string kind = c.s("kind");
  const DType out_dt = parse_float_dtype(c.s("dtype"));
  DType in_dt;
  quant::W8A8Path path;
  if (kind == "int8_mma") { in_dt = DType::kInt8; path = quant::W8A8Path::kMma; }
  else if (kind == "fp8_mma") { in_dt = DType::kFloat8E4M3; path = quant::W8A8Path::kMma; }
  else if (kind == "fp8_wgmma") { in_dt = DType::kFloat8E4M3; path = quant::W8A8Path::kWgmma; }
  else throw ValueError("--kind: expected int8_mma, fp8_mma or fp8_wgmma, got '" + kind + "'");
  const float lim = in_dt == DType::kInt8 ? 127.f : 448.f;
  HostTensor xq = random_tensor(ctx.rng, in_dt, M * K, -lim, lim), wq = random_tensor(ctx.rng, in_dt, N * K, -lim, lim);
  HostTensor xs = random_tensor(ctx.rng, DType::kFloat32, M, 1e-4f, 2e-3f);
  HostTensor ws = random_tensor(ctx.rng, DType::kFloat32, N, 1e-4f, 2e-3f);
  HostTensor bias = random_tensor(ctx.rng, DType::kFloat32, N);
  Buf dx = upload(xq), dw = upload(wq), dxs = upload(xs), dws = upload(ws), db = upload(bias);
  Buf dout(M * N * dtype_size(out_dt));
  auto run = [&] {
    const TensorView bv = view(db, DType::kFloat32, {N});
    quant::w8a8_matmul(view(dx, in_dt, {M, K}), view(dxs, DType::kFloat32, {M}), view(dw, in_dt, {N, K}),
                       view(dws, DType::kFloat32, {N}), &bv, view(dout, out_dt, {M, N}), 0, path);
  };
  if (ctx.check) {
    dout.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dout, 0, dtype_size(out_dt));
    std::vector<double> ref(static_cast<size_t>(M * N));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += double(xq.values[m * K + k]) * wq.values[n * K + k];
        ref[m * N + n] = acc * xs.values[m] * ws.values[n] + bias.values[n];
      }
    }
    check_close(ctx, "w8a8 out", download_floats(dout, out_dt, M * N), ref,
                out_atol(out_dt) * std::max(1.0, max_abs(ref)), out_rtol(out_dt));
  }
  const Timing t = ctx.time([&](int) { run(); });
  const double bytes = double(M * K + N * K) + double(M * N) * dtype_size(out_dt) + 4.0 * (M + 2 * N);
  ctx.report("w8a8", c, t, bytes, 2.0 * M * N * K, ctx.datasheet_fp8_tflops);
}

// ---- per-token quantization (quantize_per_token, hadamard_quantize) ------------------------
float quant_code(DType q, float v) {
  if (q == DType::kInt8) return float(std::max(-127, std::min(127, int(std::nearbyint(v)))));  // half-even
  const __nv_fp8_storage_t b = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
  return to_float(DType::kFloat8E4M3, &b, 0);
}
DType parse_qdtype(const std::string& s, DType same) {
  if (s == "int8") return DType::kInt8;
  if (s == "fp8") return DType::kFloat8E4M3;
  if (s == "same") return same;
  throw ValueError("--out: expected int8, fp8 or same, got '" + s + "'");
}

// Per-row rule of quant_rules.cuh on fp32 values: scale, then codes.
void ref_quantize(const std::vector<double>& row_in, DType q, float* scale, std::vector<double>& codes) {
  float amax = 0;
  for (double v : row_in) amax = std::max(amax, std::fabs(float(v)));
  const float s = std::max(amax / (q == DType::kInt8 ? 127.f : 448.f), quant::kQuantScaleMin);
  *scale = s;
  codes.resize(row_in.size());
  for (size_t i = 0; i < row_in.size(); ++i) codes[i] = quant_code(q, float(row_in[i]) / s);
}

void run_quantize(Ctx& ctx, const Case& c) {
  const int64_t M = c.i("M"), K = c.i("K");
  const DType dt = parse_float_dtype(c.s("dtype"));
  const DType qd = parse_qdtype(c.s("out"), DType::kUnsupported);
  if (qd == DType::kUnsupported) throw ValueError("--out: quantize_per_token writes int8 or fp8");
  HostTensor x = random_tensor(ctx.rng, dt, M * K, -3.f, 3.f);
  Buf dx = upload(x), dq(M * K), ds(M * 4);
  auto run = [&] {
    quant::quantize_per_token(view(dx, dt, {M, K}), view(dq, qd, {M, K}), view(ds, DType::kFloat32, {M}), 0);
  };
  if (ctx.check) {
    dq.fill_byte(0x7f);  // int8 127 / fp8 NaN: wrong for random inputs
    ds.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dq, 0, 1);
    std::vector<double> rc(static_cast<size_t>(M * K)), rs(static_cast<size_t>(M)), codes;
    for (int64_t m = 0; m < M; ++m) {
      std::vector<double> row(x.values.begin() + m * K, x.values.begin() + (m + 1) * K);
      float s;
      ref_quantize(row, qd, &s, codes);
      rs[m] = s;
      std::copy(codes.begin(), codes.end(), rc.begin() + m * K);
    }
    // Bit exact: the same IEEE division and rounding as the reference rule.
    check_close(ctx, "quantize_per_token q", download_floats(dq, qd, M * K), rc, 0, 0);
    check_close(ctx, "quantize_per_token scale", download_floats(ds, DType::kFloat32, M), rs, 0, 0);
  }
  const Timing t = ctx.time([&](int) { run(); });
  ctx.report("quantize_per_token", c, t, double(M * K) * (dtype_size(dt) + 1) + 4.0 * M, 0, 0);
}

// A Hadamard matrix of order m = 12, 20 (Paley I: q = 11, 19 prime, q = 3 mod 4) or 28
// (Paley II: q = 13, q = 1 mod 4), row-major +-1; verified H H^T = m I. Any Hadamard matrix of
// the order costs the kernel the same; the check uses this one on both sides.
std::vector<int8_t> paley_hadamard(int m) {
  const int q = m == 28 ? 13 : m - 1;
  auto chi = [q](int a) {  // quadratic character of GF(q)
    a = ((a % q) + q) % q;
    if (a == 0) return 0;
    for (int y = 1; y < q; ++y) {
      if (y * y % q == a) return 1;
    }
    return -1;
  };
  // C [q+1, q+1]: 0 at [0][0], border +-1, Q[i][j] = chi(j - i) inside.
  const int c = q + 1;
  std::vector<int> C(static_cast<size_t>(c * c));
  for (int i = 0; i < c; ++i) {
    for (int j = 0; j < c; ++j) {
      int v;
      if (i == 0 && j == 0) v = 0;
      else if (i == 0) v = 1;
      else if (j == 0) v = m == 28 ? 1 : -1;  // symmetric (II) or skew (I)
      else v = chi(j - i);
      C[i * c + j] = v;
    }
  }
  std::vector<int8_t> H(static_cast<size_t>(m * m));
  if (m == 28) {  // each entry -> 2x2: 0 -> [[1,-1],[-1,-1]], +-1 -> +-[[1,1],[1,-1]]
    for (int i = 0; i < c; ++i) {
      for (int j = 0; j < c; ++j) {
        const int v = C[i * c + j];
        const int b[4] = {v == 0 ? 1 : v, v == 0 ? -1 : v, v == 0 ? -1 : v, v == 0 ? -1 : -v};
        for (int r = 0; r < 2; ++r) {
          for (int s = 0; s < 2; ++s) H[(2 * i + r) * m + 2 * j + s] = int8_t(b[r * 2 + s]);
        }
      }
    }
  } else {  // H = I + C (C skew-symmetric)
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < m; ++j) H[i * m + j] = int8_t(C[i * c + j] + (i == j ? 1 : 0));
    }
  }
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < m; ++j) {
      int dot = 0;
      for (int k = 0; k < m; ++k) dot += H[i * m + k] * H[j * m + k];
      if (dot != (i == j ? m : 0) || H[i * m + j] * H[i * m + j] != 1) {
        throw Error("bench_quant: the Paley construction of H_" + std::to_string(m) + " is not Hadamard");
      }
    }
  }
  return H;
}

// n = m * 2^k with 2^k >= 8: the largest dense order m in {28, 20, 12} that fits, else 1.
int dense_order(int64_t n) {
  for (int m : {28, 20, 12, 1}) {
    const int64_t p = n % m == 0 ? n / m : 0;
    if (p >= 8 && (p & (p - 1)) == 0) return m;
  }
  return 0;
}

void run_hadamard(Ctx& ctx, const Case& c) {
  const int64_t M = c.i("M"), n = c.i("n");
  const DType dt = parse_float_dtype(c.s("dtype"));
  const DType od = parse_qdtype(c.s("out"), dt);
  const int m = dense_order(n);
  if (m == 0) {
    throw ValueError("--n: this benchmark runs n = m * 2^k with m in {1, 12, 20, 28} and 2^k >= 8, got " + c.s("n"));
  }
  const int64_t p = n / m;
  std::vector<int8_t> hm = m > 1 ? paley_hadamard(m) : std::vector<int8_t>{};
  HostTensor x = random_tensor(ctx.rng, dt, M * n, -3.f, 3.f);
  const int oes = dtype_size(od);
  Buf dx = upload(x), dout(M * n * oes), ds(M * 4);
  const bool quantized = od == DType::kInt8 || od == DType::kFloat8E4M3;
  auto run = [&] {
    const TensorView hv = host_view(hm.data(), DType::kInt8, {m, m});
    quant::hadamard_quantize(view(dx, dt, {M, n}), m > 1 ? &hv : nullptr, view(dout, od, {M, n}),
                             view(ds, DType::kFloat32, {quantized ? M : 0}), m, 0);
  };
  if (ctx.check) {
    dout.fill_byte(0x7f);
    ds.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dout, 0, oes);
    std::vector<double> ro(static_cast<size_t>(M * n)), rs(static_cast<size_t>(M)), rot(static_cast<size_t>(n)), codes;
    const double inv = 1.0 / std::sqrt(double(n));
    for (int64_t r = 0; r < M; ++r) {
      // (x kron(H_m, H_p))[c p + j] = sum_{a, i} x[a p + i] H_m[a][c] H_p[i][j], with the
      // Sylvester H_p[i][j] = (-1)^popcount(i & j).
      for (int64_t col = 0; col < n; ++col) {
        const int64_t cc = col / p, j = col % p;
        double acc = 0;
        for (int64_t row = 0; row < n; ++row) {
          const int64_t a = row / p, i = row % p;
          const double hmv = m > 1 ? double(hm[a * m + cc]) : 1.0;
          acc += hmv * (__builtin_popcountll(uint64_t(i & j)) & 1 ? -1.0 : 1.0) * x.values[r * n + row];
        }
        rot[col] = acc * inv;
      }
      if (quantized) {
        float s;
        ref_quantize(rot, od, &s, codes);
        rs[r] = s;
        std::copy(codes.begin(), codes.end(), ro.begin() + r * n);
      } else {
        std::copy(rot.begin(), rot.end(), ro.begin() + r * n);
      }
    }
    const std::vector<float> got = download_floats(dout, od, M * n);
    if (od == DType::kInt8) {
      check_close(ctx, "hadamard_quantize q", got, ro, 1.0, 0);  // one code: fp32 summation order
    } else if (od == DType::kFloat8E4M3) {
      check_close(ctx, "hadamard_quantize q", got, ro, 1.0 / 512, 0.13);  // one e4m3 step
    } else {
      check_close(ctx, "hadamard_quantize out", got, ro, out_atol(dt), out_rtol(dt));
    }
    if (quantized) check_close(ctx, "hadamard_quantize scale", download_floats(ds, DType::kFloat32, M), rs, 0, 1e-5);
  }
  const Timing t = ctx.time([&](int) { run(); });
  ctx.report("hadamard_quantize", c, t, double(M * n) * (dtype_size(dt) + oes) + (quantized ? 4.0 * M : 0), 0, 0);
}

const char* kHelp =
    "Quantized matmul (OstQuant) kernels. w4a16: x [M, K] bf16/fp16 times int4 weights [N, K]\n"
    "(packed, group-wise or per-channel scales, optional zero points), split-K over --splits CTAs\n"
    "(one cluster). w8a8: int8 or fp8 e4m3 x_q [M, K], w_q [N, K], per-row scales, fp32 bias,\n"
    "bf16/fp16 out; --kind picks int8_mma, fp8_mma or the experimental fp8_wgmma path.\n"
    "hadamard_quantize: x [M, n] -> quant(x kron(H_m, H_p) / sqrt(n)), n = m p with m in {1, 12, 20,\n"
    "28} (H_m built here by Paley's construction) and p = 2^k >= 8; the tensor-core orders m = 108,\n"
    "344 (e.g. n = 11008) need H_m's fragment words, built only by the Python layer.\n"
    "quantize_per_token: x [M, K] -> int8/fp8 codes + fp32 scale per row.";

}  // namespace

int main(int argc, char** argv) {
  std::vector<OpSpec> ops = {
      {"w4a16", "int4-weight GEMM (fp16/bf16 activations), split-K",
       {{"M", "1,16,128", "5", "rows of x (tokens)"},
        {"K", "4096", "256", "in features (multiple of 16)"},
        {"N", "14336", "128", "out features (multiple of 64)"},
        {"group", "128", "64,0", "k rows per scale group (0: per-channel)"},
        {"splits", "1,4", "1,3", "split-K CTAs per n-block (1..8)"},
        {"zeros", "0", "0,1", "1: asymmetric weights with zero points"},
        {"dtype", "bf16", "bf16,fp16", "bf16 | fp16"}},
       run_w4a16},
      {"w8a8", "8-bit GEMM with per-token and per-channel scales",
       {{"M", "1,16,4096", "1,67", "rows of x"},
        {"K", "4096", "80", "in features (multiple of 16)"},
        {"N", "14336", "72", "out features"},
        {"kind", "int8_mma,fp8_mma,fp8_wgmma", "int8_mma,fp8_mma,fp8_wgmma", "int8_mma | fp8_mma | fp8_wgmma"},
        {"dtype", "bf16", "bf16", "output dtype: bf16 | fp16"}},
       run_w8a8},
      {"hadamard_quantize", "online Hadamard rotation + per-token quantization",
       {{"M", "16,4096", "3", "rows (tokens)"},
        {"n", "4096,14336,16384,28672", "8,256,2048,96,160,224,3584", "row length m * 2^k, m in {1, 12, 20, 28}, 2^k >= 8"},
        {"out", "int8", "int8,fp8,same", "int8 | fp8 | same (x's dtype, no quantization)"},
        {"dtype", "bf16", "bf16,fp16", "bf16 | fp16"}},
       run_hadamard},
      {"quantize_per_token", "dynamic symmetric per-token quantization",
       {{"M", "16,4096", "3", "rows (tokens)"},
        {"K", "4096,14336", "100,4096", "columns"},
        {"out", "int8", "int8,fp8", "int8 | fp8"},
        {"dtype", "bf16", "bf16,fp16,fp32", "bf16 | fp16 | fp32"}},
       run_quantize},
  };
  return bench_main(argc, argv, "bench_quant", kHelp, ops);
}
