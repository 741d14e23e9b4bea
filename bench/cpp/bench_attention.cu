// bench_attention: microbenchmarks of the paged prefix-shared attention family (BatchLLM):
// merge_states, append_kv, paged_decode, prefix_shared_decode. Harness and flags:
// bench/cpp/harness.h, docs/bench.md.
//
// Bytes counted (the fewest each op must move; all four are memory bound):
//   merge_states   read v_a, v_b, lse_a, lse_b, write v_out, lse_out
//   append_kv      read k, v, write them into the cache (block tables / ids are noise)
//   paged_decode   read q and every sequence's K and V once, write out and lse
//   prefix_shared  read q, each shared prefix's K/V ONCE, each suffix's K/V, write out, lse
// References (host, double): the formulas of csrc/attention/*.h; decode compares with a
// softmax over the whole sequence (prefix_shared_decode must equal plain decode).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "attention/merge_states.h"
#include "attention/paged_kv.h"
#include "harness.h"

using namespace inferops;
using namespace inferops::bench;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- merge_states ----------------------------------------------------------------------------
void run_merge_states(Ctx& ctx, const Case& c) {
  const int64_t T = c.i("T"), H = c.i("H"), D = c.i("D");
  const DType dt = parse_float_dtype(c.s("dtype"));
  const int64_t n = T * H * D, rows = T * H;
  HostTensor va = random_tensor(ctx.rng, dt, n), vb = random_tensor(ctx.rng, dt, n);
  HostTensor la = random_tensor(ctx.rng, DType::kFloat32, rows, -4, 4);
  HostTensor lb = random_tensor(ctx.rng, DType::kFloat32, rows, -4, 4);
  // Empty partials: one row with lse_a = -inf, one with both -inf (output 0, -inf).
  auto set_inf = [](HostTensor& t, int64_t i) {
    if (i < t.numel()) { t.values[i] = kNegInf; from_float(DType::kFloat32, t.bytes.data(), i, kNegInf); }
  };
  set_inf(la, 0);
  set_inf(la, 1);
  set_inf(lb, 1);
  Buf dva = upload(va), dvb = upload(vb), dla = upload(la), dlb = upload(lb);
  Buf dvo(n * dtype_size(dt)), dlo(rows * 4);
  auto run = [&] {
    attention::merge_states(view(dva, dt, {T, H, D}), view(dla, DType::kFloat32, {T, H}), view(dvb, dt, {T, H, D}),
                            view(dlb, DType::kFloat32, {T, H}), view(dvo, dt, {T, H, D}),
                            view(dlo, DType::kFloat32, {T, H}), 0);
  };
  if (ctx.check) {
    dvo.fill_byte(0xff);
    dlo.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dvo, 0, dtype_size(dt));
    std::vector<double> ref_v(n), ref_l(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const double a = la.values[r], b = lb.values[r], m = std::max(a, b);
      if (m == -INFINITY) {
        ref_l[r] = -INFINITY;
        for (int64_t d = 0; d < D; ++d) ref_v[r * D + d] = 0;
        continue;
      }
      const double wa = std::exp(a - m), wb = std::exp(b - m);
      ref_l[r] = m + std::log(wa + wb);
      for (int64_t d = 0; d < D; ++d) ref_v[r * D + d] = (wa * va.values[r * D + d] + wb * vb.values[r * D + d]) / (wa + wb);
    }
    check_close(ctx, "merge_states v_out", download_floats(dvo, dt, n), ref_v, out_atol(dt), out_rtol(dt));
    check_close(ctx, "merge_states lse_out", download_floats(dlo, DType::kFloat32, rows), ref_l, 1e-5, 1e-5);
  }
  const Timing t = ctx.time([&](int) { run(); });
  ctx.report("merge_states", c, t, 3.0 * n * dtype_size(dt) + 3.0 * rows * 4, 0, 0);
}

// ---- paged cache setup shared by the decode ops ------------------------------------------------
struct PagedCache {
  int64_t num_pages = 0, page_size = 0, Hkv = 0, D = 0;
  DType dt = DType::kBFloat16;
  HostTensor k, v;  // [num_pages, page_size, Hkv, D]
  Buf dk, dv;
};

PagedCache make_cache(Ctx& ctx, DType dt, int64_t num_pages, int64_t ps, int64_t Hkv, int64_t D) {
  PagedCache pc;
  pc.num_pages = num_pages;
  pc.page_size = ps;
  pc.Hkv = Hkv;
  pc.D = D;
  pc.dt = dt;
  pc.k = random_tensor(ctx.rng, dt, num_pages * ps * Hkv * D);
  pc.v = random_tensor(ctx.rng, dt, num_pages * ps * Hkv * D);
  pc.dk = upload(pc.k);
  pc.dv = upload(pc.v);
  return pc;
}

// Softmax attention of query row (b, h) over tokens [0, len) of block-table row `bt`:
// out [D] and the natural-log LSE (0 and -inf for an empty sequence).
void ref_decode_row(const PagedCache& pc, const float* q, const int32_t* bt, int64_t len, int64_t kvh,
                    double scale, double* out, double* lse) {
  const int64_t D = pc.D;
  std::vector<double> s(size_t(std::max<int64_t>(len, 1)));
  double m = -INFINITY;
  auto at = [&](int64_t pos) {
    return ((int64_t(bt[pos / pc.page_size]) * pc.page_size + pos % pc.page_size) * pc.Hkv + kvh) * D;
  };
  for (int64_t j = 0; j < len; ++j) {
    double dot = 0;
    const int64_t o = at(j);
    for (int64_t d = 0; d < D; ++d) dot += double(q[d]) * pc.k.values[o + d];
    s[j] = dot * scale;
    m = std::max(m, s[j]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0;
  if (len == 0) {
    *lse = -INFINITY;
    return;
  }
  double sum = 0;
  for (int64_t j = 0; j < len; ++j) {
    const double p = std::exp(s[j] - m);
    sum += p;
    const int64_t o = at(j);
    for (int64_t d = 0; d < D; ++d) out[d] += p * pc.v.values[o + d];
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= sum;
  *lse = m + std::log(sum);
}

// Split-KV factor from shapes only (mirror of python/inferops/attention/paged.py).
int choose_num_splits(int64_t batch, int64_t hkv, int64_t max_len, int sms) {
  const int64_t blocks = std::max<int64_t>(1, batch * hkv);
  if (blocks >= 2 * sms || max_len <= 512) return 1;
  const int64_t want = (2 * sms + blocks - 1) / blocks;
  return int(std::max<int64_t>(1, std::min<int64_t>({want, max_len / 256, 64})));
}

// ---- append_kv -----------------------------------------------------------------------------------
void run_append_kv(Ctx& ctx, const Case& c) {
  const int64_t N = c.i("tokens"), Hkv = c.i("Hkv"), D = c.i("D"), ps = c.i("page_size"), L = c.i("L");
  const DType dt = parse_float_dtype(c.s("dtype"));
  if (N < 1 || L < 1) throw ValueError("expected --tokens >= 1 and --L >= 1");
  // One new token per sequence (a decode step): sequence t at a random position < L.
  const int64_t max_pages = (L + ps - 1) / ps, num_pages = N * max_pages;
  PagedCache pc = make_cache(ctx, dt, num_pages, ps, Hkv, D);
  std::vector<int32_t> bt(size_t(N * max_pages)), ids(static_cast<size_t>(N)), pos(static_cast<size_t>(N));
  std::iota(bt.begin(), bt.end(), 0);
  std::shuffle(bt.begin(), bt.end(), ctx.rng);
  for (int64_t t = 0; t < N; ++t) {
    ids[t] = int32_t(t);
    pos[t] = int32_t(ctx.rng() % uint64_t(L));
  }
  HostTensor k = random_tensor(ctx.rng, dt, N * Hkv * D), v = random_tensor(ctx.rng, dt, N * Hkv * D);
  Buf dk = upload(k), dv = upload(v), dbt = Buf::from(bt), dids = Buf::from(ids), dpos = Buf::from(pos);
  auto run = [&] {
    attention::append_kv(view(pc.dk, dt, {num_pages, ps, Hkv, D}), view(pc.dv, dt, {num_pages, ps, Hkv, D}),
                         view(dk, dt, {N, Hkv, D}), view(dv, dt, {N, Hkv, D}),
                         view(dbt, DType::kInt32, {N, max_pages}), view(dids, DType::kInt32, {N}),
                         view(dpos, DType::kInt32, {N}), 0);
  };
  if (ctx.check) {
    // The cache holds random data; the kernel must write exactly the new slots.
    run();
    ctx.perturb_bytes(pc.dk, size_t(bt[pos[0] / ps] * ps + pos[0] % ps) * Hkv * D * dtype_size(dt), dtype_size(dt));
    const int es = dtype_size(dt);
    std::vector<uint8_t> rk = pc.k.bytes, rv = pc.v.bytes;
    for (int64_t t = 0; t < N; ++t) {
      const int64_t slot = (int64_t(bt[t * max_pages + pos[t] / ps]) * ps + pos[t] % ps) * Hkv * D * es;
      std::copy_n(k.bytes.begin() + t * Hkv * D * es, Hkv * D * es, rk.begin() + slot);
      std::copy_n(v.bytes.begin() + t * Hkv * D * es, Hkv * D * es, rv.begin() + slot);
    }
    check_exact(ctx, "append_kv k_cache", pc.dk.to_host<uint8_t>(), rk);
    check_exact(ctx, "append_kv v_cache", pc.dv.to_host<uint8_t>(), rv);
  }
  const Timing t = ctx.time([&](int) { run(); });
  ctx.report("append_kv", c, t, 4.0 * N * Hkv * D * dtype_size(dt), 0, 0);
}

// ---- paged_decode ----------------------------------------------------------------------------------
void run_paged_decode(Ctx& ctx, const Case& c) {
  const int64_t B = c.i("B"), Hq = c.i("Hq"), Hkv = c.i("Hkv"), D = c.i("D"), L = c.i("L"), ps = c.i("page_size");
  int splits = int(c.i("splits"));
  const DType dt = parse_float_dtype(c.s("dtype"));
  if (B < 1 || L < 0 || Hkv < 1 || Hq % Hkv) throw ValueError("expected B >= 1, L >= 0, Hq a multiple of Hkv");
  const int64_t max_pages = std::max<int64_t>(1, (L + ps - 1) / ps), num_pages = B * max_pages;
  PagedCache pc = make_cache(ctx, dt, num_pages, ps, Hkv, D);
  std::vector<int32_t> bt(static_cast<size_t>(num_pages)), lens(static_cast<size_t>(B));
  std::iota(bt.begin(), bt.end(), 0);
  std::shuffle(bt.begin(), bt.end(), ctx.rng);
  // Under --check the lengths vary (L, L-1, L-5, ...: partial pages and tiles); else all L.
  for (int64_t b = 0; b < B; ++b) lens[b] = int32_t(ctx.check ? std::max<int64_t>(0, L - (b * 5) % (L + 1)) : L);
  if (splits <= 0) splits = choose_num_splits(B, Hkv, max_pages * ps, ctx.sm_count);
  HostTensor q = random_tensor(ctx.rng, dt, B * Hq * D);
  Buf dq = upload(q), dbt = Buf::from(bt), dlens = Buf::from(lens);
  Buf dout(B * Hq * D * dtype_size(dt)), dlse(B * Hq * 4);
  Buf dpo(splits > 1 ? splits * B * Hq * D * 4 : 0), dpl(splits > 1 ? splits * B * Hq * 4 : 0);
  const float scale = float(1.0 / std::sqrt(double(D)));
  auto run = [&] {
    const int64_t s = splits > 1 ? splits : 0;
    attention::paged_decode(view(dq, dt, {B, Hq, D}), view(pc.dk, dt, {num_pages, ps, Hkv, D}),
                            view(pc.dv, dt, {num_pages, ps, Hkv, D}), view(dbt, DType::kInt32, {B, max_pages}),
                            view(dlens, DType::kInt32, {B}), view(dout, dt, {B, Hq, D}),
                            view(dlse, DType::kFloat32, {B, Hq}), view(dpo, DType::kFloat32, {s, B, Hq, D}),
                            view(dpl, DType::kFloat32, {s, B, Hq}), splits, scale, 0);
  };
  if (ctx.check) {
    dout.fill_byte(0xff);
    dlse.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dout, 0, dtype_size(dt));
    std::vector<double> ro(B * Hq * D), rl(B * Hq);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hq; ++h) {
        ref_decode_row(pc, &q.values[(b * Hq + h) * D], &bt[b * max_pages], lens[b], h / (Hq / Hkv), scale,
                       &ro[(b * Hq + h) * D], &rl[b * Hq + h]);
      }
    }
    check_close(ctx, "paged_decode out", download_floats(dout, dt, B * Hq * D), ro, out_atol(dt), out_rtol(dt));
    check_close(ctx, "paged_decode lse", download_floats(dlse, DType::kFloat32, B * Hq), rl, 1e-3, 1e-4);
  }
  const Timing t = ctx.time([&](int) { run(); });
  const int es = dtype_size(dt);
  double kv_tokens = 0;
  for (int64_t b = 0; b < B; ++b) kv_tokens += lens[b];
  const double bytes = 2.0 * kv_tokens * Hkv * D * es + 2.0 * B * Hq * D * es + B * Hq * 4;
  ctx.report("paged_decode", c, t, bytes, 4.0 * kv_tokens * Hq * D, 0, "splits=" + std::to_string(splits));
}

// ---- prefix_shared_decode ----------------------------------------------------------------------------
void run_prefix_shared(Ctx& ctx, const Case& c) {
  const int64_t groups = c.i("groups"), members = c.i("members"), prefix = c.i("prefix"), suffix = c.i("suffix");
  const int64_t Hq = c.i("Hq"), Hkv = c.i("Hkv"), D = c.i("D"), ps = c.i("page_size");
  const DType dt = parse_float_dtype(c.s("dtype"));
  if (groups < 1 || members < 1 || prefix < ps || prefix % ps || suffix < 0 || Hkv < 1 || Hq % Hkv) {
    throw ValueError("expected groups, members >= 1, --prefix a positive multiple of --page_size, --suffix >= 0, "
                     "Hq a multiple of Hkv");
  }
  const int64_t B = groups * members, G = Hq / Hkv;
  const int64_t prefix_pages = prefix / ps, own_pages = (suffix + ps - 1) / ps;
  const int64_t max_pages = prefix_pages + std::max<int64_t>(own_pages, 1);
  const int64_t num_pages = groups * prefix_pages + B * own_pages;
  PagedCache pc = make_cache(ctx, dt, std::max<int64_t>(num_pages, 1), ps, Hkv, D);
  std::vector<int32_t> perm(static_cast<size_t>(num_pages));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), ctx.rng);
  std::vector<int32_t> bt(size_t(B * max_pages), 0), lens(static_cast<size_t>(B)), shared(static_cast<size_t>(B));
  std::vector<int32_t> gind(size_t(groups + 1)), gpind(size_t(groups + 1)), gpages;
  int64_t next = 0;
  for (int64_t g = 0; g < groups; ++g) {
    gind[g] = int32_t(g * members);
    gpind[g] = int32_t(g * prefix_pages);
    for (int64_t p = 0; p < prefix_pages; ++p) gpages.push_back(perm[next++]);
  }
  gind[groups] = int32_t(B);
  gpind[groups] = int32_t(groups * prefix_pages);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t g = b / members;
    for (int64_t p = 0; p < prefix_pages; ++p) bt[b * max_pages + p] = gpages[g * prefix_pages + p];
    for (int64_t p = 0; p < own_pages; ++p) bt[b * max_pages + prefix_pages + p] = perm[next++];
    // Under --check the suffixes vary in length (partial pages and split tails).
    lens[b] = int32_t(prefix + (ctx.check ? std::max<int64_t>(0, suffix - (b * 3) % (suffix + 1)) : suffix));
    shared[b] = int32_t(prefix);
  }
  std::vector<int32_t> work;  // (group, first kernel row), rows = members * G, tiles of kSharedRows
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r0 = 0; r0 < members * G; r0 += attention::kSharedRows) {
      work.push_back(int32_t(g));
      work.push_back(int32_t(r0));
    }
  }
  const int64_t W = int64_t(work.size() / 2);
  // Split choices of python/inferops/attention/prefix_shared.py.
  const int64_t shared_tiles = prefix / 64;
  const int shared_splits = int(std::max<int64_t>(
      1, std::min<int64_t>({(ctx.sm_count + std::max<int64_t>(1, W * Hkv) - 1) / std::max<int64_t>(1, W * Hkv),
                            std::max<int64_t>(1, shared_tiles / 2), 64})));
  const int suffix_splits = choose_num_splits(B, Hkv, suffix, ctx.sm_count);
  const int64_t tiles = std::max<int64_t>(1, (suffix + attention::kDecodeTileTokens - 1) / attention::kDecodeTileTokens);
  const int tokens_per_split = int((tiles + suffix_splits - 1) / suffix_splits * attention::kDecodeTileTokens);
  const int total = shared_splits + suffix_splits;

  HostTensor q = random_tensor(ctx.rng, dt, B * Hq * D);
  Buf dq = upload(q), dbt = Buf::from(bt), dlens = Buf::from(lens), dshared = Buf::from(shared);
  Buf dgind = Buf::from(gind), dgpind = Buf::from(gpind), dgpages = Buf::from(gpages), dwork = Buf::from(work);
  Buf dout(B * Hq * D * dtype_size(dt)), dlse(B * Hq * 4), dpo(total * B * Hq * D * 4), dpl(total * B * Hq * 4);
  // partial_lse[:shared_splits] must be -inf on entry (rows without a shared prefix are not
  // written); here every request has a group, so once is enough.
  std::vector<float> neg(size_t(total * B * Hq), kNegInf);
  dpl.upload(neg.data(), neg.size() * 4);
  const float scale = float(1.0 / std::sqrt(double(D)));
  const int64_t ngp = int64_t(gpages.size());
  auto run = [&] {
    attention::prefix_shared_decode(
        view(dq, dt, {B, Hq, D}), view(pc.dk, dt, {pc.num_pages, ps, Hkv, D}),
        view(pc.dv, dt, {pc.num_pages, ps, Hkv, D}), view(dbt, DType::kInt32, {B, max_pages}),
        view(dlens, DType::kInt32, {B}), view(dshared, DType::kInt32, {B}), view(dgind, DType::kInt32, {groups + 1}),
        view(dgpind, DType::kInt32, {groups + 1}), view(dgpages, DType::kInt32, {ngp}),
        view(dwork, DType::kInt32, {W, 2}), view(dout, dt, {B, Hq, D}), view(dlse, DType::kFloat32, {B, Hq}),
        view(dpo, DType::kFloat32, {total, B, Hq, D}), view(dpl, DType::kFloat32, {total, B, Hq}), shared_splits,
        suffix_splits, tokens_per_split, scale, 0);
  };
  if (ctx.check) {
    dout.fill_byte(0xff);
    dlse.fill_byte(0xff);
    run();
    ctx.perturb_bytes(dout, 0, dtype_size(dt));
    std::vector<double> ro(B * Hq * D), rl(B * Hq);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hq; ++h) {
        ref_decode_row(pc, &q.values[(b * Hq + h) * D], &bt[b * max_pages], lens[b], h / G, scale,
                       &ro[(b * Hq + h) * D], &rl[b * Hq + h]);
      }
    }
    check_close(ctx, "prefix_shared out", download_floats(dout, dt, B * Hq * D), ro, out_atol(dt), out_rtol(dt));
    check_close(ctx, "prefix_shared lse", download_floats(dlse, DType::kFloat32, B * Hq), rl, 1e-3, 1e-4);
  }
  const Timing t = ctx.time([&](int) { run(); });
  const int es = dtype_size(dt);
  double own = 0, all = 0;
  for (int64_t b = 0; b < B; ++b) {
    own += lens[b] - prefix;
    all += lens[b];
  }
  const double unique_tokens = double(groups * prefix) + own;
  const double bytes = 2.0 * unique_tokens * Hkv * D * es + 2.0 * B * Hq * D * es + B * Hq * 4;
  char note[160];
  std::snprintf(note, sizeof note, "splits shared=%d suffix=%d; unique KV %.1f MB (unshared %.1f MB)", shared_splits,
                suffix_splits, 2.0 * unique_tokens * Hkv * D * es / 1e6, 2.0 * all * Hkv * D * es / 1e6);
  ctx.report("prefix_shared_decode", c, t, bytes, 4.0 * all * Hq * D, 0, note);
}

const char* kHelp =
    "Paged prefix-shared attention (BatchLLM) kernels: merge_states, append_kv, paged_decode,\n"
    "prefix_shared_decode. All are memory bound: GB/s counts the fewest bytes (each KV byte once;\n"
    "for prefix_shared_decode each shared prefix once), compared with the measured copy bandwidth.\n"
    "Caches are [num_pages, page_size, Hkv, D] with randomly permuted page tables.";

}  // namespace

int main(int argc, char** argv) {
  const FlagSpec dtype{"dtype", "bf16", "bf16,fp16", "bf16 | fp16"};
  std::vector<OpSpec> ops = {
      {"merge_states", "LSE merge of two partial attention states",
       {{"T", "2048,16384", "1,19", "tokens"},
        {"H", "32", "3", "heads"},
        {"D", "128", "64,128", "head dim"},
        {"dtype", "bf16", "bf16,fp16,fp32", "bf16 | fp16 | fp32"}},
       run_merge_states},
      {"append_kv", "write one decode step's K/V into a paged cache",
       {{"tokens", "64", "5", "new tokens (one per sequence)"},
        {"Hkv", "8", "2", "kv heads"},
        {"D", "128", "64", "head dim"},
        {"page_size", "16", "1,16", "tokens per page"},
        {"L", "4096", "37", "positions are random in [0, L)"},
        dtype},
       run_append_kv},
      {"paged_decode", "decode attention over a paged KV cache (split-KV + merge)",
       {{"B", "32,64", "3", "sequences"},
        {"Hq", "32", "8", "query heads"},
        {"Hkv", "8", "2", "kv heads (GQA group Hq/Hkv)"},
        {"D", "128", "64,128", "head dim (64 | 128)"},
        {"L", "4096", "37,600", "tokens per sequence (under --check: L, L-5, L-10, ...)"},
        {"page_size", "16", "16", "tokens per page"},
        {"splits", "0", "0,3", "split-KV factor (0: the library's choice)"},
        dtype},
       run_paged_decode},
      {"prefix_shared_decode", "decode where groups of requests share a prefix read once",
       {{"groups", "8", "2", "groups of requests sharing a prefix"},
        {"members", "8", "3", "requests per group"},
        {"prefix", "4096", "80", "shared prefix tokens (multiple of page_size)"},
        {"suffix", "256", "21", "own tokens per request (under --check: varied)"},
        {"Hq", "32", "8", "query heads"},
        {"Hkv", "8", "2", "kv heads"},
        {"D", "128", "64", "head dim (64 | 128)"},
        {"page_size", "16", "16", "tokens per page"},
        dtype},
       run_prefix_shared},
  };
  return bench_main(argc, argv, "bench_attention", kHelp, ops);
}
