// The SIMT executor's warp intrinsics built on collective() (runtime.cpp): shuffles (a lane
// reading a lane outside the mask is an error), __syncwarp, __ballot_sync, __match_any_sync.
#include "simt/scheduler.h"

#include <cstring>

namespace simt {

void shfl_release(unsigned mask, const unsigned char (*payload)[kPayloadBytes], unsigned char (*result)[kResultBytes],
                  const void*) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    ShflPayload p;
    std::memcpy(&p, payload[l], sizeof p);
    const int src = p.src < 0 ? l : p.src;
    if (src > 31 || !(mask >> src & 1)) {
      fail("shuffle: lane %d reads lane %d, which is outside the mask 0x%08x (undefined on the GPU)", l, src, mask);
    }
    ShflPayload q;
    std::memcpy(&q, payload[src], sizeof q);
    std::memcpy(result[l], q.value, sizeof q.value);
  }
}

}  // namespace simt

void __syncwarp(unsigned mask) {
  simt::collective(simt::kOpSyncwarp, "__syncwarp", mask, nullptr, 0,
                   [](unsigned, const unsigned char (*)[simt::kPayloadBytes], unsigned char (*)[simt::kResultBytes],
                      const void*) {});
}

unsigned __ballot_sync(unsigned mask, int pred) {
  const int mine = pred != 0;
  const unsigned char* r = simt::collective(
      simt::kOpBallot, "__ballot_sync", mask, &mine, sizeof mine,
      [](unsigned m, const unsigned char (*payload)[simt::kPayloadBytes], unsigned char (*result)[simt::kResultBytes],
         const void*) {
        unsigned bits = 0;
        for (int l = 0; l < 32; ++l) {
          int v;
          std::memcpy(&v, payload[l], sizeof v);
          if ((m >> l & 1) && v) bits |= 1u << l;
        }
        for (int l = 0; l < 32; ++l) std::memcpy(result[l], &bits, sizeof bits);
      });
  unsigned out;
  std::memcpy(&out, r, sizeof out);
  return out;
}

unsigned __match_any_sync(unsigned mask, unsigned long long value) {
  const unsigned char* r = simt::collective(
      simt::kOpMatchAny, "__match_any_sync", mask, &value, sizeof value,
      [](unsigned m, const unsigned char (*payload)[simt::kPayloadBytes], unsigned char (*result)[simt::kResultBytes],
         const void*) {
        for (int l = 0; l < 32; ++l) {
          if (!(m >> l & 1)) continue;
          unsigned bits = 0;
          for (int o = 0; o < 32; ++o)
            if ((m >> o & 1) && std::memcmp(payload[l], payload[o], 8) == 0) bits |= 1u << o;
          std::memcpy(result[l], &bits, sizeof bits);
        }
      });
  unsigned out;
  std::memcpy(&out, r, sizeof out);
  return out;
}
