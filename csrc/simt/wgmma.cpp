// The executor's Hopper warpgroup MMA: wgmma.mma_async with shared-memory matrix
// descriptors, wgmma.fence / commit_group / wait_group, fence.proxy.async. The typed wrappers
// of csrc/common/wgmma.cuh call these in their INFEROPS_SIMT branch.
//
// Model (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//  - A warpgroup is 4 consecutive warps (threads 128 g .. 128 g + 127). wgmma.mma_async is
//    a collective of the warpgroup (simt::warps_collective): every thread issues it with the
//    same type, shape, descriptors and scale-d (a mismatch, a missing or exited thread is an
//    error). The last thread in reads both operands from shared memory and computes the
//    64 x N product once for the warpgroup.
//  - D (64 x N, fp32) = A (64 x K) B^T, A = 64 rows and B = N rows of one 32-byte k slice
//    (k16 for f16/bf16, k32 for e4m3), both K-major, read through their descriptors:
//      bits 0-13 start address >> 4, 16-29 leading byte offset (LBO) >> 4, 32-45 stride
//      byte offset (SBO) >> 4, 49-51 base offset, 62-63 swizzle (0 none, 1 128B, 2 64B,
//      3 32B); the other bits are reserved (set: error); base offset != 0: not modelled.
//    Byte kb (0..31) of row r, in the canonical K-major layouts (T = 16 bytes):
//      none: start + 16 (r % 8) + SBO (r / 8) + LBO (kb / 16) + kb % 16  (8 x 16 B core matrices)
//      128B: a = start + 128 (r % 8) + SBO (r / 8) + kb, then address bits [4:6] ^= bits [7:9]
//      64B : a = start +  64 (r % 8) + SBO (r / 8) + kb, then bits [4:5] ^= bits [7:8]
//      32B : a = start +  32 (r % 8) + SBO (r / 8) + kb, then bit 4 ^= bit 7
//    The XOR acts on the absolute shared address (the executor's window offset; the dynamic
//    shared memory starts 1024-aligned there, as on the GPU). Every byte read must lie in
//    the block's dynamic shared memory.
//  - Accumulators (m64nN, fp32, N / 2 per thread): warp w of the warpgroup, lane l,
//    register i holds row 16 w + l / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (l % 4) + i % 2.
//  - Asynchrony: at issue the accumulators are overwritten with NaN; the result is written
//    when a wgmma.wait_group retires the op's group, so a read before the wait sees NaN.
//    A wgmma whose accumulator array is the destination of a still-pending wgmma of this
//    thread chains onto it (the ISA orders same-shape accumulations): it starts from the
//    earlier op's result. commit_group closes the thread's open ops into a group;
//    wait_group N retires the oldest groups until at most N are pending.
//  - Shared memory is read when the warpgroup's op is issued; when the op's group first
//    retires, the bytes are compared with what was read: an operand overwritten while its
//    wgmma was in flight is an error (the stage-reuse bug of a pipelined loop).
//  - wgmma.fence: required (else error) before a wgmma whose accumulators are not chained to
//    a pending wgmma, since the thread's last wait_group or the block start. The ISA asks
//    for it only when the thread touched those registers; this is the cheap, stricter check.
//  - Numerics: the exact products are summed in double over the k slice and added to the
//    accumulator in double, then rounded once to fp32 (the tensor core's internal
//    accumulation differs in the last bits).
// Limits: only m64nNk16 f16/bf16 and m64nNk32 e4m3 with both operands in shared memory and
// K-major (no A from registers, no transpose, no imm-scale -1); accumulator arrays that
// overlap without being the same array are not tracked; fence.proxy.async is a no-op (the
// async-proxy ordering of cp.async writes is not checked: copies land at the thread's own
// cp.async.wait_group here); a thread that exits with wgmmas pending is not reported.
#include "simt/metrics.h"
#include "simt/race.h"
#include "simt/simt.h"

#include <deque>
#include <limits>
#include <memory>
#include <vector>

namespace simt::ptx {
namespace {

constexpr int kMaxThreads = 1024;

struct WgOp {  // one wgmma.mma_async of a warpgroup
  int n = 0;
  std::vector<double> prod;     // [64][n]
  std::vector<uint32_t> addrs;  // shared addresses read at issue...
  std::vector<uint8_t> bytes;   // ...and their contents then
  bool checked = false;
};

struct Pending {  // one thread's part of a WgOp
  std::shared_ptr<WgOp> op;
  float* d = nullptr;
  bool scale_d = true, chained = false;
  std::vector<float> din;  // accumulators at issue (unchained ops)
};

struct InFlight {  // an accumulator array written by pending wgmmas of the thread
  float* d = nullptr;
  int n = 0, pending = 0;
  std::vector<float> value;  // its value after the last retired op
};

struct ThreadState {
  std::vector<Pending> open;                // issued, not committed
  std::deque<std::vector<Pending>> groups;  // committed, oldest first
  std::vector<InFlight> acc;
  bool fenced = false;
};

struct Key {  // what the threads of a warpgroup must agree on
  uint64_t da, db;
  int32_t type, n, scale_d, pad;
};

struct State {  // one per block (block_slot): blocks of a cluster or concurrent pool interleave
  ThreadState t[kMaxThreads];
  std::shared_ptr<WgOp> issued[kMaxThreads / 128];  // the op the warpgroup's last meeting made
};

State& state() {
  std::shared_ptr<void>& slot = block_slot();  // empty when the block starts: nothing carries over
  if (!slot) slot = std::make_shared<State>();
  return *static_cast<State*>(slot.get());
}

ThreadState& me() { return state().t[thread_linear()]; }

struct Desc {
  uint32_t start, lbo, sbo;
  int swizzle;
};

Desc decode(uint64_t d, const char* which) {
  const uint64_t reserved = (3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3FFull << 52);
  if (d & reserved) fail("wgmma.mma_async: descriptor %s 0x%016llx sets reserved bits", which, (unsigned long long)d);
  if ((d >> 49) & 7) fail("wgmma.mma_async: descriptor %s: base offset %d is not modelled", which, int((d >> 49) & 7));
  return Desc{uint32_t(d & 0x3FFF) << 4, uint32_t((d >> 16) & 0x3FFF) << 4, uint32_t((d >> 32) & 0x3FFF) << 4,
              int(d >> 62)};
}

// Shared address of byte kb (0..31) of row r of a K-major operand (see the header).
uint32_t kmajor_address(const Desc& d, int r, int kb) {
  uint32_t a;
  switch (d.swizzle) {
    case 0: return d.start + 16 * (r % 8) + d.sbo * (r / 8) + d.lbo * (kb / 16) + kb % 16;
    case 1: a = d.start + 128 * (r % 8) + d.sbo * (r / 8) + kb; return a ^ (((a >> 7) & 7) << 4);
    case 2: a = d.start + 64 * (r % 8) + d.sbo * (r / 8) + kb; return a ^ (((a >> 7) & 3) << 4);
    default: a = d.start + 32 * (r % 8) + d.sbo * (r / 8) + kb; return a ^ (((a >> 7) & 1) << 4);
  }
}

double element(MmaType type, const uint8_t* p) {
  switch (type) {
    case MmaType::kF16: {
      __half_raw h;
      std::memcpy(&h.x, p, 2);
      return __half2float(__half(h));
    }
    case MmaType::kBF16: {
      __nv_bfloat16_raw h;
      std::memcpy(&h.x, p, 2);
      return __bfloat162float(__nv_bfloat16(h));
    }
    default: return __half2float(__half(__nv_cvt_fp8_to_halfraw(*p, __NV_E4M3)));
  }
}

const void* g_wgmma_pc = nullptr;  // the wgmma.mma_async instruction (race-check reports)

// The last thread of the warpgroup in: read A and B, compute the product once. (The race
// check sees the operand reads as this thread's, at issue; wgmma_wait checks that the
// operands did not change while in flight.)
void issue_release(const void* key, void* ctx) {
  Key k;
  std::memcpy(&k, key, sizeof k);
  const MmaType type = static_cast<MmaType>(k.type);
  const int es = type == MmaType::kE4M3 ? 1 : 2, kel = 32 / es;
  auto op = std::make_shared<WgOp>();
  op->n = k.n;
  const uint32_t base = shared_address(dynamic_smem());
  const std::size_t bytes = dynamic_smem_bytes();
  auto read = [&](uint64_t desc, int rows, const char* which) {
    const Desc d = decode(desc, which);
    std::vector<double> v(std::size_t(rows) * kel);
    for (int r = 0; r < rows; ++r) {
      for (int e = 0; e < kel; ++e) {
        uint8_t raw[2];
        for (int x = 0; x < es; ++x) {
          const uint32_t a = kmajor_address(d, r, e * es + x);
          if (a < base || a - base >= bytes) {
            fail("wgmma.mma_async: operand %s row %d byte %d at shared address 0x%x is outside the dynamic shared "
                 "memory [0x%x, 0x%zx)", which, r, e * es + x, a, base, base + bytes);
          }
          raw[x] = *shared_pointer(a);
          if constexpr (race::kBuilt) race::access(*detail::S().current, shared_pointer(a), 1, false, g_wgmma_pc);
          op->addrs.push_back(a);
          op->bytes.push_back(raw[x]);
        }
        v[std::size_t(r) * kel + e] = element(type, raw);
      }
    }
    if (metrics::g_on) {  // the operand as core matrices: 8 rows x 16 bytes, rows of 8 then K halves
      std::vector<const unsigned char*> core;
      for (int r8 = 0; r8 < rows; r8 += 8)
        for (int h = 0; h < 2; ++h)
          for (int r = r8; r < r8 + 8; ++r) core.push_back(shared_pointer(kmajor_address(d, r, 16 * h)));
      metrics::matrix_request(*detail::S().current, core.data(), static_cast<int>(core.size()), true, g_wgmma_pc);
    }
    return v;
  };
  const std::vector<double> a = read(k.da, 64, "A"), b = read(k.db, k.n, "B");
  op->prod.assign(std::size_t(64) * k.n, 0.0);
  for (int m = 0; m < 64; ++m) {
    for (int n = 0; n < k.n; ++n) {
      double s = 0;
      for (int e = 0; e < kel; ++e) s += a[std::size_t(m) * kel + e] * b[std::size_t(n) * kel + e];
      op->prod[std::size_t(m) * k.n + n] = s;
    }
  }
  *static_cast<std::shared_ptr<WgOp>*>(ctx) = std::move(op);
}

InFlight* find_acc(ThreadState& t, const float* d) {
  for (InFlight& a : t.acc)
    if (a.d == d) return &a;
  return nullptr;
}

}  // namespace

void wgmma_mma(MmaType type, int n, float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  State& s = state();
  const int lin = thread_linear();
  ThreadState& t = s.t[lin];
  if (type != MmaType::kF16 && type != MmaType::kBF16 && type != MmaType::kE4M3)
    fail("wgmma.mma_async: operand type not modelled");
  if (n < 8 || n > 256 || n % 8) fail("wgmma.mma_async: N = %d (8..256, a multiple of 8)", n);
  InFlight* acc = find_acc(t, d);
  if (acc && acc->n != n) fail("wgmma.mma_async: accumulators chained to a pending wgmma of another shape");
  if (!acc && !t.fenced) {
    fail("wgmma.mma_async on accumulators no pending wgmma writes, without a wgmma.fence since the last "
         "wgmma.wait_group (or the kernel start)");
  }
  const Key key{desc_a, desc_b, static_cast<int32_t>(type), n, scale_d != 0, 0};
  const int wg = lin / 128;
  g_wgmma_pc = __builtin_return_address(0);
  warps_collective(4 * wg, 4, "wgmma.mma_async", &key, sizeof key, issue_release, &s.issued[wg]);
  Pending p;
  p.op = s.issued[wg];
  p.d = d;
  p.scale_d = scale_d != 0;
  p.chained = acc != nullptr;
  if (!acc) {
    p.din.assign(d, d + n / 2);
    t.acc.push_back(InFlight{d, n, 0, {}});
    acc = &t.acc.back();
  }
  ++acc->pending;
  for (int i = 0; i < n / 2; ++i) d[i] = std::numeric_limits<float>::quiet_NaN();  // not there before the wait
  t.open.push_back(std::move(p));
}

void wgmma_fence() { me().fenced = true; }

void wgmma_commit() {
  ThreadState& t = me();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

void wgmma_wait(int pending) {
  const int lin = thread_linear();
  ThreadState& t = state().t[lin];
  const int w = (lin % 128) / 32, l = lin % 32;
  while (t.groups.size() > static_cast<std::size_t>(std::max(pending, 0))) {
    for (Pending& p : t.groups.front()) {
      WgOp& op = *p.op;
      if (!op.checked) {
        for (std::size_t j = 0; j < op.addrs.size(); ++j) {
          const uint8_t now = *shared_pointer(op.addrs[j]);
          if (now != op.bytes[j]) {
            fail("wgmma.wait_group: shared address 0x%x, an operand of an in-flight wgmma.mma_async, changed "
                 "(0x%02x -> 0x%02x) before the wait retired it", op.addrs[j], op.bytes[j], now);
          }
        }
        op.checked = true;
      }
      InFlight* a = find_acc(t, p.d);
      if (a->value.empty()) a->value.assign(op.n / 2, 0.f);
      for (int i = 0; i < op.n / 2; ++i) {
        const int row = 16 * w + l / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (l % 4) + i % 2;
        const double prod = op.prod[std::size_t(row) * op.n + col];
        const double c = p.chained ? a->value[i] : p.din[i];
        a->value[i] = static_cast<float>(p.scale_d ? c + prod : prod);
      }
      if (--a->pending == 0) {  // no wgmma writes it any more: the registers get the value
        std::memcpy(p.d, a->value.data(), a->value.size() * sizeof(float));
        t.acc.erase(t.acc.begin() + (a - t.acc.data()));
      }
    }
    t.groups.pop_front();
  }
  t.fenced = false;
}

void fence_proxy_async_shared() {}

}  // namespace simt::ptx
