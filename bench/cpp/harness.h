// Shared harness of the C++ microbenchmark binaries (bench/cpp/bench_<family>.cu).
//
// One binary per kernel family, one subcommand per op:
//     bench_<family> <op>|all [--<shape flag>=a,b,...] [--dtype=...] [--check] [--json=FILE] ...
// Every shape flag takes a comma list; the cases are the cartesian product of the lists.
// Each case prints one line: shape, time (median, min and p90 over --iters timed runs, each
// after an L2 flush unless --no-flush-l2), achieved GB/s (the op's fewest bytes) or TFLOP/s,
// and the percent of the ceiling: the device-to-device copy bandwidth measured at start for
// memory-bound ops, the datasheet tensor-core peak for GEMMs (printed beside the copy rate).
//
// The same source builds for the GPU (nvcc) and against the CPU SIMT executor (g++,
// INFEROPS_SIMT): there every "device" buffer is host memory (bench/cpp/simt_host_api.cpp),
// the kernels run as fibers, and times are executor times, labelled so and never compared
// with a ceiling.
//
// --check: the op runs once on fresh random inputs (outputs poisoned first: NaN for floats,
// 0x7f7f7f7f for integers, so an unwritten element fails), its output is compared with a
// straightforward host C++ reference, and the binary exits 1 on any mismatch. Without shape
// flags, --check uses each op's small check shapes (odd sizes, tails). --perturb-check
// corrupts one output element after the kernel (the check must then fail: tested in CI).
//
// Ops call the same host entries as the Python bindings (TensorView in, validation, launch),
// so a benchmark exercises exactly the launch path users get.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/cuda_check.h"
#include "common/tensor_view.h"

namespace inferops::bench {

// ---- flags ---------------------------------------------------------------------------------
struct FlagSpec {
  std::string name;       // without the leading dashes
  std::string bench_def;  // default list for timing runs (the issues' target shapes)
  std::string check_def;  // default list under --check (small, awkward sizes)
  std::string help;
};

// One case: a value for every flag of the op.
class Case {
 public:
  std::map<std::string, std::string> values;
  int64_t i(const std::string& name) const;
  double f(const std::string& name) const;
  const std::string& s(const std::string& name) const;
  bool has(const std::string& name) const { return values.count(name) != 0; }
  std::string describe() const;  // "T=2048 H=32 ..." in flag order
  std::vector<std::string> order;
};

struct Ctx;
struct OpSpec {
  std::string name;
  std::string summary;
  std::vector<FlagSpec> flags;
  std::function<void(Ctx&, const Case&)> run;
};

// ---- device buffers ------------------------------------------------------------------------
class Buf {
 public:
  Buf() = default;
  explicit Buf(size_t bytes);
  ~Buf();
  Buf(Buf&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; o.bytes_ = 0; }
  Buf& operator=(Buf&& o) noexcept;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  void* get() const { return p_; }
  template <typename T>
  T* as() const { return static_cast<T*>(p_); }
  size_t bytes() const { return bytes_; }
  void upload(const void* host, size_t bytes, size_t offset = 0);
  void download(void* host, size_t bytes, size_t offset = 0) const;
  void fill_byte(int byte);  // cudaMemset
  template <typename T>
  static Buf from(const std::vector<T>& h) {
    Buf b(h.size() * sizeof(T));
    if (!h.empty()) b.upload(h.data(), h.size() * sizeof(T));
    return b;
  }
  template <typename T>
  std::vector<T> to_host() const {
    std::vector<T> h(bytes_ / sizeof(T));
    if (!h.empty()) download(h.data(), h.size() * sizeof(T));
    return h;
  }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// A TensorView of a device buffer (contiguous unless strides are given), as the bindings
// build them from DLPack: on the executor build the buffer is host memory (kCPU).
TensorView view(const Buf& b, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides = {},
                size_t byte_offset = 0, bool read_only = false);

// A TensorView of host memory (kCPU), for arguments the host entries read on the host.
TensorView host_view(void* p, DType dtype, std::vector<int64_t> shape);

// ---- host values ---------------------------------------------------------------------------
// Host storage of fp32/fp16/bf16/fp8 elements as raw bits, with float conversions.
float to_float(DType dt, const void* p, int64_t i);
void from_float(DType dt, void* p, int64_t i, float v);
DType parse_float_dtype(const std::string& s);  // bf16 | fp16 | fp32 | fp8 | int8; throws
const char* short_name(DType dt);

// Random values in [lo, hi) in `dt`, as raw bytes, plus their float values (already
// rounded to dt, so the reference sees exactly what the kernel sees).
struct HostTensor {
  DType dtype = DType::kFloat32;
  std::vector<uint8_t> bytes;
  std::vector<float> values;
  int64_t numel() const { return int64_t(values.size()); }
};
HostTensor random_tensor(std::mt19937_64& rng, DType dt, int64_t n, float lo = -1.f, float hi = 1.f);
Buf upload(const HostTensor& t);
std::vector<float> download_floats(const Buf& b, DType dt, int64_t n);

// ---- checks --------------------------------------------------------------------------------
// |got - ref| <= atol + rtol |ref| elementwise (NaN/inf must match the reference's);
// prints the first mismatches and records a failure in ctx. Returns true when it passes.
bool check_close(Ctx& ctx, const std::string& what, const std::vector<float>& got,
                 const std::vector<double>& ref, double atol, double rtol);
template <typename T>
bool check_exact(Ctx& ctx, const std::string& what, const std::vector<T>& got, const std::vector<T>& ref);
// Tolerances of a half-precision output computed in fp32 (one rounding of the output plus
// accumulation-order differences).
double out_atol(DType dt);
double out_rtol(DType dt);

// ---- timing and reporting ------------------------------------------------------------------
struct Timing {
  double median_ms = 0, min_ms = 0, p90_ms = 0;
  int iters = 0;
};

struct Ctx {
  // Common options.
  int warmup = 10;
  int iters = 100;
  bool flush_l2 = true;
  bool check = false;
  bool perturb = false;
  bool list_only = false;
  uint64_t seed = 0;
  std::string json_path;
  std::FILE* json = nullptr;
  std::string binary;  // "bench_attention"
  // Device and ceilings.
  std::string device_name;
  bool simulated = false;
  int sm_count = 0;
  int l2_bytes = 0;
  double copy_gbps = 0;         // measured device-to-device copy (read + write bytes)
  double datasheet_hbm_gbps = 0;  // 0 when the device is not recognised
  double datasheet_bf16_tflops = 0;
  double datasheet_fp8_tflops = 0;
  std::mt19937_64 rng;
  Buf flush_buf;
  int failures = 0;
  int cases = 0;
  bool checked = false;       // the current case compared something
  bool check_failed = false;  // ... and found a mismatch

  // Runs `fn(iter)` warmup + iters times, timing each of the last `iters` with CUDA events
  // (after an L2 flush outside the timed region unless --no-flush-l2).
  Timing time(const std::function<void(int)>& fn);
  // One output line (and a JSON object with --json). `bytes` and `flops` may be 0.
  // `peak_tflops`: the datasheet peak the FLOP rate is compared with (0: bandwidth only).
  void report(const std::string& op, const Case& c, const Timing& t, double bytes, double flops,
              double peak_tflops, const std::string& note = "");
  // Called by ops under --check: after the kernel, before the comparison.
  void perturb_bytes(Buf& out, size_t offset, int elem_size);
};

// The binary's main: parses argv, measures the ceiling, runs the selected ops' cases.
int bench_main(int argc, char** argv, const char* binary, const char* family_help,
               const std::vector<OpSpec>& ops);

}  // namespace inferops::bench
