// The shared harness of the microbenchmark binaries: flags, buffers, random inputs, checks,
// timing with CUDA events, the copy-bandwidth ceiling and the output (harness.h explains).
#include "harness.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>

namespace inferops::bench {

// ---- flags ---------------------------------------------------------------------------------
int64_t Case::i(const std::string& name) const {
  const std::string& v = s(name);
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0) {
    throw ValueError("--" + name + " expects an integer, got '" + v + "'");
  }
  return x;
}

double Case::f(const std::string& name) const {
  const std::string& v = s(name);
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0') throw ValueError("--" + name + " expects a number, got '" + v + "'");
  return x;
}

const std::string& Case::s(const std::string& name) const {
  auto it = values.find(name);
  if (it == values.end()) throw Error("bench: op reads flag --" + name + " that it did not declare");
  return it->second;
}

std::string Case::describe() const {
  std::string out;
  for (const auto& k : order) {
    if (!out.empty()) out += ' ';
    out += k + "=" + values.at(k);
  }
  return out;
}

// ---- buffers -------------------------------------------------------------------------------
Buf::Buf(size_t bytes) : bytes_(bytes) {
  // At least 16 bytes so an empty tensor still has a valid, aligned address.
  INFEROPS_CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(bytes, 16)));
}
Buf::~Buf() {
  if (p_) cudaFree(p_);
}
Buf& Buf::operator=(Buf&& o) noexcept {
  if (this != &o) {
    if (p_) cudaFree(p_);
    p_ = o.p_;
    bytes_ = o.bytes_;
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}
void Buf::upload(const void* host, size_t bytes, size_t offset) {
  INFEROPS_CHECK(offset + bytes <= bytes_, "upload past the end of a buffer");
  INFEROPS_CUDA_CHECK(cudaMemcpy(static_cast<char*>(p_) + offset, host, bytes, cudaMemcpyHostToDevice));
}
void Buf::download(void* host, size_t bytes, size_t offset) const {
  INFEROPS_CHECK(offset + bytes <= bytes_, "download past the end of a buffer");
  INFEROPS_CUDA_CHECK(cudaMemcpy(host, static_cast<const char*>(p_) + offset, bytes, cudaMemcpyDeviceToHost));
}
void Buf::fill_byte(int byte) { INFEROPS_CUDA_CHECK(cudaMemset(p_, byte, std::max<size_t>(bytes_, 16))); }

namespace {
dlpack::DataType dl_dtype(DType dt) {
  switch (dt) {
    case DType::kFloat32: return {dlpack::kFloat, 32, 1};
    case DType::kFloat16: return {dlpack::kFloat, 16, 1};
    case DType::kBFloat16: return {dlpack::kBfloat, 16, 1};
    case DType::kFloat8E4M3: return {dlpack::kFloat8_e4m3fn, 8, 1};
    case DType::kFloat8E5M2: return {dlpack::kFloat8_e5m2, 8, 1};
    case DType::kInt8: return {dlpack::kInt, 8, 1};
    case DType::kUInt8: return {dlpack::kUInt, 8, 1};
    case DType::kInt32: return {dlpack::kInt, 32, 1};
    case DType::kInt64: return {dlpack::kInt, 64, 1};
    case DType::kBool: return {dlpack::kBool, 8, 1};
    default: throw Error("bench: no DLPack dtype for this DType");
  }
}
}  // namespace

TensorView view(const Buf& b, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides,
                size_t byte_offset, bool read_only) {
  dlpack::Tensor t{};
  t.data = b.get();
#ifdef INFEROPS_SIMT
  t.device = {dlpack::kCPU, 0};
#else
  // The current device, read once: views are built inside the timed loop.
  static const int dev = [] {
    int d = 0;
    INFEROPS_CUDA_CHECK(cudaGetDevice(&d));
    return d;
  }();
  t.device = {dlpack::kCUDA, dev};
#endif
  t.ndim = int32_t(shape.size());
  t.dtype = dl_dtype(dtype);
  t.shape = shape.data();
  t.strides = strides.empty() ? nullptr : strides.data();
  t.byte_offset = byte_offset;
  return TensorView(&t, read_only);
}

TensorView host_view(void* p, DType dtype, std::vector<int64_t> shape) {
  dlpack::Tensor t{};
  t.data = p;
  t.device = {dlpack::kCPU, 0};
  t.ndim = int32_t(shape.size());
  t.dtype = dl_dtype(dtype);
  t.shape = shape.data();
  return TensorView(&t, true);
}

// ---- host values ---------------------------------------------------------------------------
float to_float(DType dt, const void* p, int64_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat8E4M3: return float(static_cast<const __nv_fp8_e4m3*>(p)[i]);
    case DType::kInt8: return float(static_cast<const int8_t*>(p)[i]);
    case DType::kInt32: return float(static_cast<const int32_t*>(p)[i]);
    default: throw Error("bench: to_float of an unsupported dtype");
  }
}

void from_float(DType dt, void* p, int64_t i, float v) {
  switch (dt) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case DType::kFloat8E4M3: static_cast<__nv_fp8_e4m3*>(p)[i] = __nv_fp8_e4m3(v); break;
    case DType::kInt8: static_cast<int8_t*>(p)[i] = int8_t(std::lrint(std::clamp(v, -128.f, 127.f))); break;
    default: throw Error("bench: from_float of an unsupported dtype");
  }
}

DType parse_float_dtype(const std::string& s) {
  if (s == "bf16") return DType::kBFloat16;
  if (s == "fp16") return DType::kFloat16;
  if (s == "fp32") return DType::kFloat32;
  if (s == "fp8") return DType::kFloat8E4M3;
  if (s == "int8") return DType::kInt8;
  throw ValueError("--dtype: expected bf16, fp16, fp32, fp8 or int8, got '" + s + "'");
}

const char* short_name(DType dt) {
  switch (dt) {
    case DType::kBFloat16: return "bf16";
    case DType::kFloat16: return "fp16";
    case DType::kFloat32: return "fp32";
    case DType::kFloat8E4M3: return "fp8";
    case DType::kInt8: return "int8";
    default: return dtype_name(dt);
  }
}

HostTensor random_tensor(std::mt19937_64& rng, DType dt, int64_t n, float lo, float hi) {
  HostTensor t;
  t.dtype = dt;
  t.bytes.resize(size_t(n) * dtype_size(dt));
  t.values.resize(static_cast<size_t>(n));
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < n; ++i) {
    from_float(dt, t.bytes.data(), i, u(rng));
    t.values[size_t(i)] = to_float(dt, t.bytes.data(), i);
  }
  return t;
}

Buf upload(const HostTensor& t) { return Buf::from(t.bytes); }

std::vector<float> download_floats(const Buf& b, DType dt, int64_t n) {
  std::vector<uint8_t> raw(size_t(n) * dtype_size(dt));
  if (n > 0) b.download(raw.data(), raw.size());
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[size_t(i)] = to_float(dt, raw.data(), i);
  return out;
}

// ---- checks --------------------------------------------------------------------------------
double out_atol(DType dt) { return dt == DType::kFloat32 ? 1e-4 : dt == DType::kFloat16 ? 2e-3 : 1.6e-2; }
double out_rtol(DType dt) { return dt == DType::kFloat32 ? 1e-4 : dt == DType::kFloat16 ? 2e-3 : 1.6e-2; }

namespace {
void note_check(Ctx& ctx, bool ok) {
  ctx.checked = true;
  if (!ok) {
    ctx.check_failed = true;
    ++ctx.failures;
  }
}
}  // namespace

bool check_close(Ctx& ctx, const std::string& what, const std::vector<float>& got,
                 const std::vector<double>& ref, double atol, double rtol) {
  if (got.size() != ref.size()) {
    std::fprintf(stderr, "  check %s: %zu elements, reference has %zu\n", what.c_str(), got.size(), ref.size());
    note_check(ctx, false);
    return false;
  }
  int64_t bad = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    bool ok;
    if (std::isnan(r)) ok = std::isnan(g);
    else if (std::isinf(r)) ok = g == r;
    else ok = std::isfinite(g) && std::fabs(g - r) <= atol + rtol * std::fabs(r);
    if (!ok) {
      if (bad < 5) {
        std::fprintf(stderr, "  check %s: element %zu = %.6g, reference %.6g (atol %.2g, rtol %.2g)\n",
                     what.c_str(), i, g, r, atol, rtol);
      }
      ++bad;
    }
    if (std::isfinite(g) && std::isfinite(r)) worst = std::max(worst, std::fabs(g - r));
  }
  if (bad) {
    std::fprintf(stderr, "  check %s: FAILED, %lld of %zu elements out of tolerance\n", what.c_str(),
                 (long long)bad, got.size());
  }
  note_check(ctx, bad == 0);
  return bad == 0;
}

template <typename T>
bool check_exact(Ctx& ctx, const std::string& what, const std::vector<T>& got, const std::vector<T>& ref) {
  int64_t bad = got.size() == ref.size() ? 0 : 1;
  for (size_t i = 0; i < std::min(got.size(), ref.size()); ++i) {
    if (got[i] != ref[i]) {
      if (bad < 5) {
        std::fprintf(stderr, "  check %s: element %zu = %lld, reference %lld (exact)\n", what.c_str(), i,
                     (long long)got[i], (long long)ref[i]);
      }
      ++bad;
    }
  }
  if (bad) std::fprintf(stderr, "  check %s: FAILED, %lld mismatches (exact)\n", what.c_str(), (long long)bad);
  note_check(ctx, bad == 0);
  return bad == 0;
}
template bool check_exact<int32_t>(Ctx&, const std::string&, const std::vector<int32_t>&, const std::vector<int32_t>&);
template bool check_exact<int8_t>(Ctx&, const std::string&, const std::vector<int8_t>&, const std::vector<int8_t>&);
template bool check_exact<uint8_t>(Ctx&, const std::string&, const std::vector<uint8_t>&, const std::vector<uint8_t>&);
template bool check_exact<uint16_t>(Ctx&, const std::string&, const std::vector<uint16_t>&, const std::vector<uint16_t>&);

// ---- timing --------------------------------------------------------------------------------
Timing Ctx::time(const std::function<void(int)>& fn) {
  Timing t;
  t.iters = std::max(iters, 1);
  cudaEvent_t a, b;
  INFEROPS_CUDA_CHECK(cudaEventCreate(&a));
  INFEROPS_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < warmup; ++i) fn(i);
  std::vector<float> ms(size_t(t.iters));
  for (int i = 0; i < t.iters; ++i) {
    // The flush is outside the timed region: it evicts the inputs the last run left in
    // L2 (a memset writes through L2), so each run reads its inputs from HBM. It is queued
    // before the start event, so the GPU is busy with it while the host validates and
    // launches the call: the host's few microseconds are not counted.
    if (flush_l2 && flush_buf.bytes()) INFEROPS_CUDA_CHECK(cudaMemsetAsync(flush_buf.get(), i & 0xff, flush_buf.bytes()));
    INFEROPS_CUDA_CHECK(cudaEventRecord(a));
    fn(warmup + i);
    INFEROPS_CUDA_CHECK(cudaEventRecord(b));
    INFEROPS_CUDA_CHECK(cudaEventSynchronize(b));
    INFEROPS_CUDA_CHECK(cudaEventElapsedTime(&ms[size_t(i)], a, b));
  }
  INFEROPS_CUDA_CHECK(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  t.median_ms = ms[ms.size() / 2];
  t.min_ms = ms.front();
  t.p90_ms = ms[std::min(ms.size() - 1, ms.size() * 9 / 10)];
  return t;
}

void Ctx::perturb_bytes(Buf& out, size_t offset, int elem_size) {
  if (!perturb || out.bytes() < offset + size_t(elem_size)) return;
  // Flip bit 6 of the element's most significant byte: a large change for every dtype
  // (exponent bits of floats, a high bit of integers), so the check must fail.
  uint8_t byte = 0;
  out.download(&byte, 1, offset + size_t(elem_size) - 1);
  byte ^= 0x40;
  out.upload(&byte, 1, offset + size_t(elem_size) - 1);
}

namespace {
std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') { o += '\\'; o += ch; }
    else if (static_cast<unsigned char>(ch) < 0x20) o += ' ';
    else o += ch;
  }
  return o;
}
}  // namespace

void Ctx::report(const std::string& op, const Case& c, const Timing& t, double bytes, double flops,
                 double peak_tflops, const std::string& note) {
  const double s = t.median_ms * 1e-3;
  const double gbps = bytes > 0 && s > 0 ? bytes / s / 1e9 : 0;
  const double tflops = flops > 0 && s > 0 ? flops / s / 1e12 : 0;
  const bool ceilings = !simulated;
  const double pct_copy = ceilings && gbps > 0 && copy_gbps > 0 ? 100 * gbps / copy_gbps : -1;
  const double pct_peak = ceilings && tflops > 0 && peak_tflops > 0 ? 100 * tflops / peak_tflops : -1;
  const char* check_str = !checked ? "" : check_failed ? "FAILED" : "ok";

  char buf[512];
  std::string line = op + "  " + c.describe();
  std::snprintf(buf, sizeof buf, " | %s %9.2f us (min %.2f, p90 %.2f)", simulated ? "executor" : "median",
                t.median_ms * 1e3, t.min_ms * 1e3, t.p90_ms * 1e3);
  line += buf;
  if (gbps > 0) {
    std::snprintf(buf, sizeof buf, " | %8.1f GB/s", gbps);
    line += buf;
    if (pct_copy >= 0) {
      std::snprintf(buf, sizeof buf, " %5.1f%% of copy", pct_copy);
      line += buf;
    }
  }
  if (tflops > 0) {
    std::snprintf(buf, sizeof buf, " | %7.2f TFLOP/s", tflops);
    line += buf;
    if (pct_peak >= 0) {
      std::snprintf(buf, sizeof buf, " %5.1f%% of %.0f peak", pct_peak, peak_tflops);
      line += buf;
    }
  }
  if (*check_str) line += std::string(" | check ") + check_str;
  if (!note.empty()) line += " | " + note;
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);

  if (json) {
    std::ostringstream js;
    js.precision(6);
    js << "{\"binary\":\"" << binary << "\",\"op\":\"" << op << "\",\"device\":\"" << json_escape(device_name)
       << "\",\"simulated\":" << (simulated ? "true" : "false") << ",\"shape\":{";
    bool first = true;
    for (const auto& k : c.order) {
      js << (first ? "" : ",") << "\"" << k << "\":\"" << json_escape(c.values.at(k)) << "\"";
      first = false;
    }
    js << "},\"median_us\":" << t.median_ms * 1e3 << ",\"min_us\":" << t.min_ms * 1e3
       << ",\"p90_us\":" << t.p90_ms * 1e3 << ",\"iters\":" << t.iters << ",\"warmup\":" << warmup
       << ",\"l2_flush\":" << (flush_l2 ? "true" : "false") << ",\"bytes\":" << bytes << ",\"flops\":" << flops
       << ",\"gbps\":" << gbps << ",\"tflops\":" << tflops << ",\"copy_gbps\":" << copy_gbps
       << ",\"datasheet_hbm_gbps\":" << datasheet_hbm_gbps << ",\"peak_tflops\":" << peak_tflops;
    if (pct_copy >= 0) js << ",\"pct_of_copy\":" << pct_copy;
    if (pct_peak >= 0) js << ",\"pct_of_peak\":" << pct_peak;
    if (*check_str) js << ",\"check\":\"" << check_str << "\"";
    if (!note.empty()) js << ",\"note\":\"" << json_escape(note) << "\"";
    js << "}\n";
    std::fputs(js.str().c_str(), json);
    std::fflush(json);
  }
}

// ---- main ----------------------------------------------------------------------------------
namespace {

const std::vector<FlagSpec>& common_flags() {
  static const std::vector<FlagSpec> f = {
      {"warmup", "10", "1", "untimed runs before timing"},
      {"iters", "100", "2", "timed runs (median, min and p90 are printed)"},
      {"seed", "0", "0", "random seed of the inputs (0: a fresh seed, printed)"},
      {"json", "", "", "append one JSON object per case to FILE ('-': stdout)"},
      {"copy-mib", "1024", "8", "MiB of the device-to-device copy that measures the bandwidth ceiling"},
  };
  return f;
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s) {
    if (ch == ',') { out.push_back(cur); cur.clear(); }
    else cur += ch;
  }
  out.push_back(cur);
  return out;
}

void print_help(const char* binary, const char* family_help, const std::vector<OpSpec>& ops) {
  std::printf("usage: %s <op>|all [flags]\n\n%s\n\nops:\n", binary, family_help);
  for (const auto& op : ops) {
    std::printf("  %-22s %s\n", op.name.c_str(), op.summary.c_str());
    for (const auto& f : op.flags) {
      std::printf("      --%-18s %s (default %s; --check default %s)\n", f.name.c_str(), f.help.c_str(),
                  f.bench_def.c_str(), f.check_def.c_str());
    }
  }
  std::printf(
      "\nEvery op flag takes a comma list (--T=1,64,2048); the cases are the cartesian product.\n"
      "common flags:\n"
      "  --check               run each case once on random inputs (outputs poisoned first), compare with a\n"
      "                        host C++ reference, exit 1 on any mismatch; op flags not given take their\n"
      "                        small --check defaults above (and --warmup 1 --iters 2 --copy-mib 8)\n"
      "  --perturb-check       with --check: corrupt one output element after the kernel (the check must fail)\n"
      "  --no-flush-l2         do not evict L2 before each timed run (default: a memset of 2x L2 between runs)\n"
      "  --list                print the cases that would run, run nothing\n"
      "  --help                this text\n");
  for (const auto& f : common_flags()) {
    std::printf("  --%-19s %s (default %s)\n", (f.name + (f.name == "json" ? "=FILE" : "=N")).c_str(), f.help.c_str(),
                f.bench_def.empty() ? "none" : f.bench_def.c_str());
  }
  std::printf(
      "\noutput: one line per case: op, shape, median time with min and p90 (us), achieved GB/s (fewest\n"
      "bytes the op must move) and %% of the copy bandwidth measured at start, TFLOP/s and %% of the\n"
      "datasheet tensor-core peak (GEMMs), check result. Exit status: 0 ok, 1 check failed or a\n"
      "kernel error, 2 bad flags. On the CPU SIMT executor build (*_simt) times are executor\n"
      "times, not GPU times, and no ceiling is computed. See docs/bench.md.\n");
}

void datasheet(Ctx& ctx) {
  const std::string& n = ctx.device_name;
  if (n.find("H200") != std::string::npos) {
    ctx.datasheet_hbm_gbps = 4800; ctx.datasheet_bf16_tflops = 989; ctx.datasheet_fp8_tflops = 1979;
  } else if (n.find("H100") != std::string::npos && n.find("PCIe") != std::string::npos) {
    ctx.datasheet_hbm_gbps = 2000; ctx.datasheet_bf16_tflops = 756; ctx.datasheet_fp8_tflops = 1513;
  } else if (n.find("H100") != std::string::npos || n.find("H800") != std::string::npos) {
    ctx.datasheet_hbm_gbps = 3350; ctx.datasheet_bf16_tflops = 989; ctx.datasheet_fp8_tflops = 1979;
  }
}

}  // namespace

int bench_main(int argc, char** argv, const char* binary, const char* family_help, const std::vector<OpSpec>& ops) {
  Ctx ctx;
  ctx.binary = binary;
  std::map<std::string, std::string> given;  // flag -> value
  std::string op_name;
  bool help = false;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--help" || a == "-h") { help = true; continue; }
      if (a.rfind("--", 0) != 0) {
        if (!op_name.empty()) throw ValueError("unexpected argument '" + a + "' (one op per run, or 'all')");
        op_name = a;
        continue;
      }
      std::string key = a.substr(2), value;
      const auto eq = key.find('=');
      static const std::set<std::string> booleans = {"check", "perturb-check", "no-flush-l2", "list"};
      if (eq != std::string::npos) {
        value = key.substr(eq + 1);
        key = key.substr(0, eq);
        if (booleans.count(key)) throw ValueError("flag --" + key + " takes no value");
      } else if (!booleans.count(key)) {
        if (i + 1 >= argc) throw ValueError("flag --" + key + " needs a value");
        value = argv[++i];
      } else {
        value = "1";
      }
      if (given.count(key)) throw ValueError("flag --" + key + " given twice");
      given[key] = value;
    }
    if (help) {
      print_help(binary, family_help, ops);
      return 0;
    }
    if (op_name.empty()) throw ValueError("no op given (see --help)");
    std::vector<const OpSpec*> selected;
    for (const auto& op : ops) {
      if (op_name == "all" || op.name == op_name) selected.push_back(&op);
    }
    if (selected.empty()) {
      std::string names;
      for (const auto& op : ops) names += " " + op.name;
      throw ValueError("unknown op '" + op_name + "'; expected one of:" + names + " all");
    }
    // Every flag must be known to a selected op or be common.
    std::set<std::string> known = {"check", "perturb-check", "no-flush-l2", "list"};
    for (const auto& f : common_flags()) known.insert(f.name);
    for (const OpSpec* op : selected) {
      for (const auto& f : op->flags) known.insert(f.name);
    }
    for (const auto& kv : given) {
      if (!known.count(kv.first)) throw ValueError("unknown flag --" + kv.first + " for '" + op_name + "' (see --help)");
    }
    ctx.check = given.count("check") != 0;
    ctx.perturb = given.count("perturb-check") != 0;
    ctx.flush_l2 = given.count("no-flush-l2") == 0;
    ctx.list_only = given.count("list") != 0;
    if (ctx.perturb && !ctx.check) throw ValueError("--perturb-check needs --check");
    auto common = [&](const std::string& name) {
      for (const auto& f : common_flags()) {
        if (f.name == name) return given.count(name) ? given[name] : ctx.check ? f.check_def : f.bench_def;
      }
      return std::string();
    };
    Case cc;
    for (const char* n : {"warmup", "iters", "seed", "copy-mib"}) cc.values[n] = common(n);
    ctx.warmup = int(cc.i("warmup"));
    ctx.iters = int(cc.i("iters"));
    ctx.seed = uint64_t(cc.i("seed"));
    const int64_t copy_mib = cc.i("copy-mib");
    if (ctx.warmup < 0 || ctx.iters < 1 || copy_mib < 1) throw ValueError("expected --warmup >= 0, --iters >= 1, --copy-mib >= 1");
    ctx.json_path = common("json");

    // The cases of every selected op.
    std::vector<std::pair<const OpSpec*, Case>> cases;
    for (const OpSpec* op : selected) {
      std::vector<Case> acc(1);
      for (const auto& f : op->flags) {
        const std::string list = given.count(f.name) ? given[f.name] : ctx.check ? f.check_def : f.bench_def;
        std::vector<Case> next;
        for (const auto& c : acc) {
          for (const auto& v : split_list(list)) {
            Case d = c;
            d.values[f.name] = v;
            d.order.push_back(f.name);
            next.push_back(d);
          }
        }
        acc.swap(next);
      }
      for (auto& c : acc) cases.emplace_back(op, c);
    }
    if (ctx.list_only) {
      for (const auto& [op, c] : cases) std::printf("%s %s\n", op->name.c_str(), c.describe().c_str());
      return 0;
    }

    // Device, ceilings.
#ifdef INFEROPS_SIMT
    ctx.simulated = true;
    ctx.device_name = "SIMT executor (CPU; models an H100 SXM)";
#else
    int dev = 0;
    INFEROPS_CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    INFEROPS_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    ctx.device_name = prop.name;
#endif
    datasheet(ctx);
    INFEROPS_CUDA_CHECK(cudaDeviceGetAttribute(&ctx.sm_count, cudaDevAttrMultiProcessorCount, 0));
    INFEROPS_CUDA_CHECK(cudaDeviceGetAttribute(&ctx.l2_bytes, cudaDevAttrL2CacheSize, 0));
    if (ctx.seed == 0) ctx.seed = std::random_device{}() | 1;
    ctx.rng.seed(ctx.seed);
    if (!ctx.json_path.empty()) {
      ctx.json = ctx.json_path == "-" ? stdout : std::fopen(ctx.json_path.c_str(), "a");
      if (!ctx.json) throw ValueError("--json: cannot open '" + ctx.json_path + "' for appending");
    }
    {
      const size_t bytes = size_t(copy_mib) << 20;
      Buf src(bytes), dst(bytes);
      src.fill_byte(0x3c);
      const bool flush = ctx.flush_l2;
      ctx.flush_l2 = false;  // a 1 GiB copy does not fit in L2 anyway
      const int w = ctx.warmup, it = ctx.iters;
      ctx.warmup = std::min(w, 3);
      ctx.iters = std::min(it, 20);
      const Timing t = ctx.time([&](int) {
        INFEROPS_CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice));
      });
      ctx.warmup = w;
      ctx.iters = it;
      ctx.flush_l2 = flush;
      ctx.copy_gbps = 2.0 * double(bytes) / (t.median_ms * 1e-3) / 1e9;
    }
    if (ctx.flush_l2 && !ctx.simulated) ctx.flush_buf = Buf(size_t(2) * size_t(std::max(ctx.l2_bytes, 1 << 20)));
    char head[512];
    if (ctx.simulated) {
      std::snprintf(head, sizeof head,
                    "# %s | device: %s | seed %llu | times are executor times, NOT GPU times; no ceilings",
                    binary, ctx.device_name.c_str(), (unsigned long long)ctx.seed);
    } else {
      std::snprintf(head, sizeof head,
                    "# %s | device: %s, %d SMs, L2 %d MiB | copy %.0f GB/s measured (datasheet HBM %.0f GB/s, "
                    "BF16 %.0f / FP8 %.0f TFLOP/s dense) | warmup %d, iters %d, L2 flush %s | seed %llu",
                    binary, ctx.device_name.c_str(), ctx.sm_count, ctx.l2_bytes >> 20, ctx.copy_gbps,
                    ctx.datasheet_hbm_gbps, ctx.datasheet_bf16_tflops, ctx.datasheet_fp8_tflops, ctx.warmup,
                    ctx.iters, ctx.flush_l2 ? "on" : "off", (unsigned long long)ctx.seed);
    }
    std::printf("%s\n", head);

    for (const auto& [op, c] : cases) {
      ctx.checked = ctx.check_failed = false;
      ++ctx.cases;
      try {
        op->run(ctx, c);
        INFEROPS_CUDA_CHECK(cudaDeviceSynchronize());
      } catch (const ValueError& e) {
        std::fprintf(stderr, "%s %s [%s]: %s\n", binary, op->name.c_str(), c.describe().c_str(), e.what());
        return 2;
      } catch (const TypeError& e) {
        std::fprintf(stderr, "%s %s [%s]: %s\n", binary, op->name.c_str(), c.describe().c_str(), e.what());
        return 2;
      } catch (const std::exception& e) {
        std::fprintf(stderr, "%s %s [%s]: error: %s\n", binary, op->name.c_str(), c.describe().c_str(), e.what());
        ++ctx.failures;
      }
      if (ctx.check && !ctx.checked) {
        std::fprintf(stderr, "%s %s [%s]: --check given but the op checked nothing\n", binary,
                     op->name.c_str(), c.describe().c_str());
        ++ctx.failures;
      }
    }
    if (ctx.json && ctx.json != stdout) std::fclose(ctx.json);
    if (ctx.check) {
      std::printf("# %s: %d case(s), %d failure(s)%s\n", binary, ctx.cases, ctx.failures,
                  ctx.perturb ? " (--perturb-check: failures expected)" : "");
    }
    return ctx.failures ? 1 : 0;
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s: %s\n", binary, e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", binary, e.what());
    return 1;
  }
}

}  // namespace inferops::bench
