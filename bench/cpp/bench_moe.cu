// bench_moe: microbenchmarks of the MoE dispatch family (ExFlow) on one GPU: routing_layout
// (expert-major layout of top-k routing, per-rank send blocks), permute (tokens into the
// expert-major layout) and unpermute (weighted combine back to token order). The
// single-all-to-all itself needs several ranks (torch.distributed): bench/moe/*.py.
// Harness and flags: bench/cpp/harness.h, docs/bench.md.
//
// Bytes counted: routing_layout reads topk_ids and writes its int32 outputs; permute reads
// each routed row once and writes every row of the layout (padding rows are zeroed);
// unpermute reads every kept row and the weights and writes [T, hidden].
// References (host): the layout as python/inferops/reference/moe.py defines it (stable order:
// token, then top-k slot), checked exactly; permute exactly; unpermute in double.
#include <algorithm>
#include <cmath>

#include "harness.h"
#include "moe/moe.h"

using namespace inferops;
using namespace inferops::bench;

namespace {

struct Layout {
  std::vector<int32_t> tpe, offs, dst, src, tpr, send, send_offs, errors;
  int64_t capacity = 0;
};

// Reference layout (python/inferops/reference/moe.py: routing_layout).
Layout ref_layout(const std::vector<int32_t>& ids, const std::vector<int32_t>& placement, int64_t T, int64_t k,
                  int64_t E, int64_t R, int64_t align, int64_t capacity) {
  Layout L;
  L.tpe.assign(static_cast<size_t>(E), 0);
  L.offs.assign(static_cast<size_t>(E + 1), 0);
  std::vector<char> valid(static_cast<size_t>(T * k));
  int32_t invalid = 0, over = 0;
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t e = ids[i];
    valid[i] = e >= 0 && e < E && placement[e] >= 0 && placement[e] < R;
    if (valid[i]) ++L.tpe[e];
    else ++invalid;
  }
  for (int64_t e = 0; e < E; ++e) L.offs[e + 1] = L.offs[e] + (L.tpe[e] + int32_t(align) - 1) / int32_t(align) * int32_t(align);
  if (capacity <= 0) capacity = L.offs[E];
  L.capacity = capacity;
  L.dst.assign(static_cast<size_t>(T * k), -1);
  L.src.assign(static_cast<size_t>(capacity), -1);
  std::vector<int32_t> fill(static_cast<size_t>(E), 0);
  for (int64_t i = 0; i < T * k; ++i) {
    if (!valid[i]) continue;
    const int64_t e = ids[i], pos = L.offs[e] + fill[e]++;
    if (pos < capacity) {
      L.dst[i] = int32_t(pos);
      L.src[pos] = int32_t(i / k);
    } else {
      ++over;
    }
  }
  L.tpr.assign(static_cast<size_t>(R), 0);
  L.send.assign(static_cast<size_t>(T * R), -1);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t r = 0; r < R; ++r) {
      bool in = false;
      for (int64_t j = 0; j < k; ++j) in |= valid[t * k + j] && placement[ids[t * k + j]] == r;
      if (in) L.send[t * R + r] = L.tpr[r]++;
    }
  }
  L.send_offs.assign(static_cast<size_t>(R + 1), 0);
  for (int64_t r = 0; r < R; ++r) L.send_offs[r + 1] = L.send_offs[r] + L.tpr[r];
  L.errors = {invalid, over};
  return L;
}

struct Routing {
  int64_t T, k, E, R, align, capacity_flag;
  std::vector<int32_t> ids, placement;
};

Routing make_routing(Ctx& ctx, const Case& c) {
  Routing r{c.i("T"), c.i("topk"), c.i("E"), c.i("R"), c.i("align"), c.i("capacity"), {}, {}};
  if (r.T < 0 || r.k < 1 || r.E < 1 || r.R < 1 || r.E % r.R) throw ValueError("expected T >= 0, topk >= 1, E a multiple of R");
  if (r.k > r.E) throw ValueError("expected topk <= E");
  r.placement.resize(static_cast<size_t>(r.E));
  for (int64_t e = 0; e < r.E; ++e) r.placement[e] = int32_t(e / (r.E / r.R));  // contiguous experts per rank
  r.ids.resize(static_cast<size_t>(r.T * r.k));
  std::vector<int32_t> experts(static_cast<size_t>(r.E));
  for (int64_t e = 0; e < r.E; ++e) experts[e] = int32_t(e);
  for (int64_t t = 0; t < r.T; ++t) {  // k distinct experts per token
    for (int64_t j = 0; j < r.k; ++j) std::swap(experts[j], experts[j + ctx.rng() % uint64_t(r.E - j)]);
    std::copy_n(experts.begin(), r.k, r.ids.begin() + t * r.k);
  }
  // Under --check, one out-of-range id (counted in errors[0], never routed).
  if (ctx.check && r.T > 0) r.ids[0] = int32_t(r.E + 3);
  return r;
}

void run_layout(Ctx& ctx, const Case& c) {
  const Routing r = make_routing(ctx, c);
  const Layout ref = ref_layout(r.ids, r.placement, r.T, r.k, r.E, r.R, r.align, r.capacity_flag);
  const int64_t T = r.T, k = r.k, E = r.E, R = r.R, cap = ref.capacity;
  Buf dids = Buf::from(r.ids), dpl = Buf::from(r.placement);
  Buf tpe(E * 4), offs((E + 1) * 4), dst(T * k * 4), src(cap * 4), tpr(R * 4), send(T * R * 4), soffs((R + 1) * 4), err(8);
  const DType i32 = DType::kInt32;
  auto run = [&] {
    moe::routing_layout(view(dids, i32, {T, k}), view(dpl, i32, {E}), view(tpe, i32, {E}), view(offs, i32, {E + 1}),
                        view(dst, i32, {T, k}), view(src, i32, {cap}), view(tpr, i32, {R}), view(send, i32, {T, R}),
                        view(soffs, i32, {R + 1}), view(err, i32, {2}), int(r.align), 0);
  };
  if (ctx.check) {
    for (Buf* b : {&tpe, &offs, &dst, &src, &tpr, &send, &soffs, &err}) b->fill_byte(0x7f);
    run();
    ctx.perturb_bytes(dst, 0, 4);
    check_exact(ctx, "tokens_per_expert", tpe.to_host<int32_t>(), ref.tpe);
    check_exact(ctx, "expert_offsets", offs.to_host<int32_t>(), ref.offs);
    check_exact(ctx, "dst_index", dst.to_host<int32_t>(), ref.dst);
    check_exact(ctx, "src_index", src.to_host<int32_t>(), ref.src);
    check_exact(ctx, "tokens_per_rank", tpr.to_host<int32_t>(), ref.tpr);
    check_exact(ctx, "send_index", send.to_host<int32_t>(), ref.send);
    check_exact(ctx, "send_offsets", soffs.to_host<int32_t>(), ref.send_offs);
    check_exact(ctx, "errors", err.to_host<int32_t>(), ref.errors);
  }
  const Timing t = ctx.time([&](int) { run(); });
  const double bytes = 4.0 * (2 * T * k + cap + T * R + 2 * E + 2 * R + E);
  ctx.report("routing_layout", c, t, bytes, 0, 0, "capacity=" + std::to_string(cap));
}

void run_permute(Ctx& ctx, const Case& c, bool un) {
  const Routing r = make_routing(ctx, c);
  const int64_t hidden = c.i("hidden");
  const DType dt = parse_float_dtype(c.s("dtype"));
  const Layout L = ref_layout(r.ids, r.placement, r.T, r.k, r.E, r.R, r.align, r.capacity_flag);
  const int64_t T = r.T, k = r.k, cap = L.capacity;
  const int es = dtype_size(dt);
  int64_t kept = 0;
  for (int32_t s : L.src) kept += s >= 0;
  if (!un) {
    HostTensor x = random_tensor(ctx.rng, dt, T * hidden);
    Buf dx = upload(x), dsrc = Buf::from(L.src), ddst = Buf::from(L.dst), dout(cap * hidden * es);
    auto run = [&] {
      moe::permute(view(dx, dt, {T, hidden}), view(dsrc, DType::kInt32, {cap}), view(ddst, DType::kInt32, {T, k}),
                   view(dout, dt, {cap, hidden}), 0);
    };
    if (ctx.check) {
      dout.fill_byte(0xff);
      run();
      ctx.perturb_bytes(dout, 0, es);
      std::vector<uint8_t> ref(static_cast<size_t>(cap * hidden * es), 0);  // padding rows are zero
      for (int64_t row = 0; row < cap; ++row) {
        if (L.src[row] >= 0) std::copy_n(x.bytes.begin() + L.src[row] * hidden * es, hidden * es, ref.begin() + row * hidden * es);
      }
      check_exact(ctx, "permute out", dout.to_host<uint8_t>(), ref);
    }
    const Timing t = ctx.time([&](int) { run(); });
    // Each token read once, every row written, the indices read once.
    ctx.report("permute", c, t, double(T + cap) * hidden * es + 4.0 * (cap + T * k), 0, 0,
               "capacity=" + std::to_string(cap));
  } else {
    HostTensor y = random_tensor(ctx.rng, dt, cap * hidden);
    HostTensor w = random_tensor(ctx.rng, DType::kFloat32, T * k, 0.f, 1.f);
    Buf dy = upload(y), dw = upload(w), ddst = Buf::from(L.dst), dout(T * hidden * es);
    auto run = [&] {
      moe::unpermute(view(dy, dt, {cap, hidden}), view(ddst, DType::kInt32, {T, k}), view(dw, DType::kFloat32, {T, k}),
                     view(dout, dt, {T, hidden}), 0);
    };
    if (ctx.check) {
      dout.fill_byte(0xff);
      run();
      ctx.perturb_bytes(dout, 0, es);
      std::vector<double> ref(static_cast<size_t>(T * hidden), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < k; ++j) {
          const int32_t row = L.dst[t * k + j];
          if (row < 0) continue;
          for (int64_t h = 0; h < hidden; ++h) ref[t * hidden + h] += double(w.values[t * k + j]) * y.values[row * hidden + h];
        }
      }
      check_close(ctx, "unpermute out", download_floats(dout, dt, T * hidden), ref, out_atol(dt) * 2, out_rtol(dt));
    }
    const Timing t = ctx.time([&](int) { run(); });
    int64_t routed = 0;
    for (int32_t d : L.dst) routed += d >= 0;
    ctx.report("unpermute", c, t, double(routed + T) * hidden * es + 8.0 * T * k, 0, 0, "capacity=" + std::to_string(cap));
  }
}

const char* kHelp =
    "MoE dispatch (ExFlow) kernels on one GPU: routing_layout (topk_ids [T, topk] -> expert-major\n"
    "layout with rows padded to --align per expert, per-rank send blocks for R ranks, E/R experts\n"
    "per rank), permute ([T, hidden] -> [capacity, hidden]) and unpermute (weighted top-k combine).\n"
    "--capacity 0 sizes the layout so nothing is dropped; a smaller one drops (counted in errors).\n"
    "Under --check, token 0's first expert id is out of range on purpose (errors[0] = 1).";

}  // namespace

int main(int argc, char** argv) {
  const std::vector<FlagSpec> routing = {
      {"T", "4096", "37", "tokens"},
      {"topk", "8", "2,3", "experts per token"},
      {"E", "256", "8", "experts"},
      {"R", "8", "4", "ranks (experts placed contiguously, E/R each)"},
      {"align", "16", "1,16", "rows per expert padded to a multiple of this"},
      {"capacity", "0", "0,40", "rows of the layout (0: everything fits)"},
  };
  auto with = [&](std::vector<FlagSpec> extra) {
    std::vector<FlagSpec> f = routing;
    f.insert(f.end(), extra.begin(), extra.end());
    return f;
  };
  const std::vector<FlagSpec> data = {{"hidden", "2048,7168", "72", "hidden size"}, {"dtype", "bf16", "bf16,fp16", "bf16 | fp16"}};
  std::vector<OpSpec> ops = {
      {"routing_layout", "expert-major routing layout and per-rank send blocks", routing, run_layout},
      {"permute", "gather tokens into the expert-major layout", with(data),
       [](Ctx& ctx, const Case& c) { run_permute(ctx, c, false); }},
      {"unpermute", "weighted combine back to token order", with(data),
       [](Ctx& ctx, const Case& c) { run_permute(ctx, c, true); }},
  };
  return bench_main(argc, argv, "bench_moe", kHelp, ops);
}
