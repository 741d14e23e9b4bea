// The executor's tensor-core instructions: mma.sync and ldmatrix as warp collectives.
// Fragment layouts from the PTX ISA (lane = 4 g + t):
//   m16n8k16 (f16/bf16, 2 elements per register): A reg r holds row g + 8 (r & 1),
//     columns 2t + 8 (r >> 1) .. +1; B reg r holds k = 2t + 8 r .. +1 of column g;
//   m16n8k32 (s8/e4m3, 4 per register): A reg r holds row g + 8 (r & 1), columns
//     4t + 16 (r >> 1) .. +3; B reg r holds k = 4t + 16 r .. +3 of column g;
//   C/D: reg i holds row g + 8 (i >> 1), column 2t + (i & 1).
// Products are exact in double and summed in k order onto the accumulator, then rounded
// once to fp32 (the hardware's internal rounding differs in the last bits; int8 is exact).
#include "simt/metrics.h"
#include "simt/race.h"
#include "simt/simt.h"

#include <cstdio>

namespace simt::ptx {
namespace {

struct MmaPayload {
  uint32_t a[4], b[2], c[4];
  int type;
};

float elem(MmaType type, uint32_t reg, int e) {
  switch (type) {
    case MmaType::kF16: {
      __half_raw h;
      h.x = static_cast<uint16_t>(reg >> (16 * e));
      return __half2float(__half(h));
    }
    case MmaType::kBF16: {
      __nv_bfloat16_raw h;
      h.x = static_cast<uint16_t>(reg >> (16 * e));
      return __bfloat162float(__nv_bfloat16(h));
    }
    case MmaType::kE4M3: {
      const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(reg >> (8 * e)), __NV_E4M3);
      return __half2float(__half(h));
    }
    case MmaType::kS8: return static_cast<float>(static_cast<int8_t>(reg >> (8 * e)));
  }
  return 0.f;
}

void mma_release(unsigned, const unsigned char (*payload)[kPayloadBytes], unsigned char (*result)[kResultBytes],
                 const void*) {
  MmaPayload p0;
  std::memcpy(&p0, payload[0], sizeof p0);
  const MmaType type = static_cast<MmaType>(p0.type);
  const bool k32 = type == MmaType::kS8 || type == MmaType::kE4M3;
  const int K = k32 ? 32 : 16, per = k32 ? 4 : 2;
  double A[16][32], B[32][8];
  for (int l = 0; l < 32; ++l) {
    MmaPayload p;
    std::memcpy(&p, payload[l], sizeof p);
    if (p.type != p0.type) fail("mma.sync: lanes 0 and %d use different operand types", l);
    const int g = l >> 2, t = l & 3;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r & 1), col0 = per * t + (K / 2) * (r >> 1);
      for (int e = 0; e < per; ++e) A[row][col0 + e] = elem(type, p.a[r], e);
    }
    for (int r = 0; r < 2; ++r) {
      const int k0 = per * t + (K / 2) * r;
      for (int e = 0; e < per; ++e) B[k0 + e][g] = elem(type, p.b[r], e);
    }
  }
  for (int l = 0; l < 32; ++l) {
    MmaPayload p;
    std::memcpy(&p, payload[l], sizeof p);
    const int g = l >> 2, t = l & 3;
    uint32_t d[4];
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      if (type == MmaType::kS8) {
        int64_t acc = static_cast<int32_t>(p.c[i]);
        for (int k = 0; k < K; ++k) acc += static_cast<int64_t>(A[row][k]) * static_cast<int64_t>(B[k][col]);
        d[i] = static_cast<uint32_t>(static_cast<int32_t>(acc));  // wraps like the s32 accumulator
      } else {
        float c;
        std::memcpy(&c, &p.c[i], 4);
        double acc = c;
        for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
        const float f = static_cast<float>(acc);
        std::memcpy(&d[i], &f, 4);
      }
    }
    std::memcpy(result[l], d, sizeof d);
  }
}

template <typename Acc>
void mma(MmaType type, Acc (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaPayload p;
  for (int i = 0; i < 4; ++i) p.a[i] = a[i];
  p.b[0] = b0;
  p.b[1] = b1;
  std::memcpy(p.c, d, sizeof p.c);
  p.type = static_cast<int>(type);
  const unsigned char* r = collective(kOpMma, "mma.sync", 0xffffffffu, &p, sizeof p, mma_release);
  std::memcpy(d, r, sizeof d);
}

const void* g_ldmatrix_pc = nullptr;  // the ldmatrix instruction (race-check reports)

struct LdmPayload {
  uint32_t addr;
  int count;
  int trans;
};

void ldmatrix_release(unsigned, const unsigned char (*payload)[kPayloadBytes], unsigned char (*result)[kResultBytes],
                      const void*) {
  LdmPayload p[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&p[l], payload[l], sizeof p[l]);
  const int count = p[0].count;
  const bool trans = p[0].trans != 0;
  for (int l = 1; l < 32; ++l) {
    if (p[l].count != count || p[l].trans != p[0].trans) fail("ldmatrix: lanes 0 and %d use different shapes", l);
  }
  const unsigned char* lo = dynamic_smem();
  const unsigned char* hi = lo + dynamic_smem_bytes();
  const unsigned char* rows[32];
  for (int l = 0; l < 8 * count; ++l) {
    rows[l] = shared_pointer(p[l].addr);
    if (reinterpret_cast<uintptr_t>(rows[l]) % 16) {
      fail("ldmatrix: row address 0x%x of lane %d is not 16-byte aligned", p[l].addr, l);
    }
    if (rows[l] < lo || rows[l] + 16 > hi) {
      fail("ldmatrix: row [0x%x, +16) of lane %d is outside the block's %zu bytes of dynamic shared memory",
           p[l].addr, l, dynamic_smem_bytes());
    }
  }
  if constexpr (race::kBuilt) {  // lane 8j + r reads row r of matrix j
    detail::Scheduler& s = detail::S();
    detail::Fiber& me = *s.current;
    const detail::Block& b = detail::block_of(me);
    for (int l = 0; l < 8 * count; ++l)
      race::access(s.fibers[static_cast<std::size_t>(b.first + me.warp * 32 + l)], rows[l], 16, false, g_ldmatrix_pc);
    if (metrics::g_on) metrics::matrix_request(me, rows, 8 * count, false, g_ldmatrix_pc);
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    uint32_t out[4] = {};
    for (int j = 0; j < count; ++j) {
      if (!trans) {
        std::memcpy(&out[j], rows[8 * j + g] + 4 * t, 4);
      } else {
        uint16_t a, b;
        std::memcpy(&a, rows[8 * j + 2 * t] + 2 * g, 2);
        std::memcpy(&b, rows[8 * j + 2 * t + 1] + 2 * g, 2);
        out[j] = uint32_t(a) | (uint32_t(b) << 16);
      }
    }
    std::memcpy(result[l], out, sizeof out);
  }
}

}  // namespace

void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma(type, d, a, b0, b1);
}
void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma(MmaType::kS8, d, a, b0, b1);
}
void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma(MmaType::kE4M3, d, a, b0, b1);
}

void ldmatrix(uint32_t* r, int count, uint32_t saddr, bool trans) {
  const LdmPayload p{saddr, count, trans ? 1 : 0};
  g_ldmatrix_pc = __builtin_return_address(0);
  const unsigned char* res = collective(kOpLdmatrix, trans ? "ldmatrix.trans" : "ldmatrix", 0xffffffffu, &p,
                                        sizeof p, ldmatrix_release);
  std::memcpy(r, res, sizeof(uint32_t) * static_cast<std::size_t>(count));
}

}  // namespace simt::ptx
