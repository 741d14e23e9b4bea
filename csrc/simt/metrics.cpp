// Memory-access metrics per kernel launch (metrics.h), the counters a profiler such as Nsight
// Compute reports for a memory-bound kernel, computed exactly from every access the executor
// sees instead of sampled from hardware counters.
//
// What is observed: every load, store and atomic of kernel code (the kernel sources are compiled
// with g++'s ThreadSanitizer instrumentation; race.cpp's __tsan_* hooks forward each access
// here), and the accesses of the executor's instruction models: cp.async (its global source read
// and its shared destination write, at issue), ld/st.global.v4, acquire/release flags, ldmatrix
// (8 x 16-byte rows per matrix) and wgmma (its A and B core matrices, 8 rows x 16 bytes each).
// An address is shared memory when it is in the block's shared-memory window (dynamic shared
// memory; another block's window in a cluster: distributed shared memory, counted as shared) or
// a static __shared__ variable (the module's writable segment, less the executor's built-in
// variables threadIdx & co.); it is no memory access at all on the thread's own stack (local
// arrays: registers or local memory on the GPU), in the block's executor state (a warp
// collective's payload and result: registers), in the launch's parameter copy (CUDA's parameter
// space) or in the module's read-only segments (constant tables); anything else is global memory.
//
// Requests: a warp-level instruction is matched across lanes as the k-th execution of the same
// instruction (pc) by each lane of the warp since the warp's last synchronization point (a
// barrier, a warp collective over all its live lanes, the block's end). The executor runs the
// lanes one at a time between such points, so a request is complete when the next one is
// reached; divergent lanes whose k-th executions differ on the GPU are merged here (a bound on
// the request count, not a model of divergence).
//  - Global: the 32-byte sectors a request touches, against the minimum for its bytes
//    (ceil(distinct bytes / 32): a broadcast read is one sector, 32 lanes x 16 bytes sixteen).
//    Per launch also the distinct sectors read and written: with the per-request sectors these
//    bound the DRAM traffic between "every byte once" (a perfect cache) and "every request from
//    DRAM" (no cache).
//  - Shared: wavefronts per request in the 32 banks x 4 bytes model: lanes are served in phases
//    (all 32 for accesses of up to 4 bytes, half-warps for 8 bytes, quarter-warps for 16), a
//    phase takes as many wavefronts as the largest number of distinct 4-byte words it touches
//    in one bank (the same word is a broadcast); the minimum is one wavefront per 128 distinct
//    bytes of each phase. ldmatrix and wgmma rows: 8 rows per phase.
// Not modelled: L1/L2 caches and DRAM pages, timing, TMA, the hardware's actual wgmma operand
// fetch (its core-matrix reads are the model), register spills (g++ and nvcc allocate registers
// differently; locals are not memory here), and instruction differences between g++ and nvcc
// (an access nvcc splits or merges differently counts as g++ compiled it).
#include "simt/metrics.h"

#include "simt/debuginfo.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <unordered_map>
#include <unordered_set>

namespace simt {
// runtime.cpp: the built-in variables kernel code reads (not shared memory).
extern int g_cluster_blocks;
extern uint3 g_threadIdx;
extern uint3 g_blockIdx;
extern dim3 g_blockDim;
extern dim3 g_gridDim;
}  // namespace simt

namespace simt::metrics {

using namespace detail;

namespace {

// What a launch's counters are kept for.
enum Kind : int {
  kGlobalLoad,
  kGlobalStore,
  kGlobalAtomic,
  kSharedLoad,
  kSharedStore,
  kSharedAtomic,
  kLdmatrix,
  kWgmma,
  kKinds
};
const char* const kKindName[kKinds] = {"global_load",   "global_store",  "global_atomic", "shared_load",
                                       "shared_store",  "shared_atomic", "ldmatrix",      "wgmma"};
bool is_global(int k) { return k <= kGlobalAtomic; }

struct Counter {
  uint64_t requests = 0, bytes = 0;
  uint64_t units = 0, units_min = 0;  // sectors (global) or wavefronts (shared) and their minimum
  void add(const Counter& o) {
    requests += o.requests;
    bytes += o.bytes;
    units += o.units;
    units_min += o.units_min;
  }
};

struct Grid {
  bool live = false;
  const void* kernel = nullptr;
  LaunchConfig cfg;
  const unsigned char* params_lo = nullptr;
  const unsigned char* params_hi = nullptr;
  Counter c[kKinds];
  std::unordered_set<uint64_t> sectors[2];  // distinct global sectors loaded, stored (atomics: both)
  uint64_t barriers = 0, cluster_barriers = 0;
  std::map<std::string, uint64_t> collectives;
  std::unordered_map<uint64_t, Counter> sites;  // (pc << 4 | kind) -> its requests
};

// One lane's part of a request.
struct Lane {
  uintptr_t addr;
  uint32_t n;
};
struct Request {
  uint32_t mask = 0;
  Lane lane[32];
};
// An instruction of one warp since the warp's last synchronization point.
struct Site {
  uint32_t k[32] = {};  // executions per lane
  std::vector<Request> reqs;
};
struct WarpSites {
  int grid = -1;
  std::unordered_map<uint64_t, Site> sites;  // (pc << 4 | kind)
};

std::vector<Grid> g_grids;
std::vector<WarpSites> g_warps;  // pool block * kMaxWarps + warp
std::vector<std::string> g_records;
bool g_memory = false;  // begin(): keep records for end()
const char* const g_path = [] {
  const char* v = std::getenv("INFEROPS_SIMT_METRICS");
  return v && *v ? v : nullptr;
}();

// Distinct bytes covered by the accesses, and the sorted distinct units of `shift` bits.
thread_local std::vector<std::pair<uintptr_t, uintptr_t>> t_iv;
thread_local std::vector<uint64_t> t_units;

uint64_t distinct_bytes(const Request& r, uint32_t lanes) {
  t_iv.clear();
  for (int l = 0; l < 32; ++l)
    if (lanes >> l & 1) t_iv.emplace_back(r.lane[l].addr, r.lane[l].addr + r.lane[l].n);
  std::sort(t_iv.begin(), t_iv.end());
  uint64_t total = 0;
  uintptr_t end = 0;
  for (const auto& [a, b] : t_iv) {
    const uintptr_t lo = std::max(a, end);
    if (b > lo) total += b - lo;
    end = std::max(end, b);
  }
  return total;
}

void collect_units(const Request& r, uint32_t lanes, int shift) {
  t_units.clear();
  for (int l = 0; l < 32; ++l) {
    if (!(lanes >> l & 1) || r.lane[l].n == 0) continue;
    const uint64_t a = r.lane[l].addr, e = a + r.lane[l].n - 1;
    for (uint64_t u = a >> shift; u <= e >> shift; ++u) t_units.push_back(u);
  }
  std::sort(t_units.begin(), t_units.end());
  t_units.erase(std::unique(t_units.begin(), t_units.end()), t_units.end());
}

// Wavefronts of one phase: the most distinct 4-byte words in one bank (t_units: sorted words).
uint64_t phase_wavefronts() {
  int per_bank[32] = {};
  int most = 0;
  for (uint64_t w : t_units) most = std::max(most, ++per_bank[w & 31]);
  return static_cast<uint64_t>(most);
}

Counter shared_request(const Request& r) {
  uint32_t width = 0;
  for (int l = 0; l < 32; ++l)
    if (r.mask >> l & 1) width = std::max(width, r.lane[l].n);
  const int per_phase = width <= 4 ? 32 : width <= 8 ? 16 : 8;
  Counter c;
  c.requests = 1;
  for (int p = 0; p < 32; p += per_phase) {
    const uint32_t lanes = r.mask & (per_phase == 32 ? ~0u : ((1u << per_phase) - 1u) << p);
    if (!lanes) continue;
    collect_units(r, lanes, 2);
    c.units += phase_wavefronts();
    const uint64_t bytes = distinct_bytes(r, lanes);
    c.units_min += std::max<uint64_t>(1, (bytes + 127) / 128);
  }
  for (int l = 0; l < 32; ++l)
    if (r.mask >> l & 1) c.bytes += r.lane[l].n;
  return c;
}

Counter global_request(const Request& r, Grid& g, int kind) {
  Counter c;
  c.requests = 1;
  collect_units(r, r.mask, 5);
  c.units = t_units.size();
  c.units_min = (distinct_bytes(r, r.mask) + 31) / 32;
  for (int l = 0; l < 32; ++l)
    if (r.mask >> l & 1) c.bytes += r.lane[l].n;
  if (kind != kGlobalStore) g.sectors[0].insert(t_units.begin(), t_units.end());
  if (kind != kGlobalLoad) g.sectors[1].insert(t_units.begin(), t_units.end());
  return c;
}

void add_site(Grid& g, uint64_t key, int kind, const Counter& c) {
  g.c[kind].add(c);
  g.sites[key].add(c);
}

// Completes the warp's pending requests (all its lanes are at a synchronization point).
void flush(WarpSites& w) {
  if (w.grid >= 0 && w.grid < static_cast<int>(g_grids.size()) && g_grids[static_cast<std::size_t>(w.grid)].live) {
    Grid& g = g_grids[static_cast<std::size_t>(w.grid)];
    for (auto& [key, site] : w.sites) {
      const int kind = static_cast<int>(key & 15);
      for (const Request& r : site.reqs) {
        if (!r.mask) continue;
        add_site(g, key, kind, is_global(kind) ? global_request(r, g, kind) : shared_request(r));
      }
    }
  }
  w.sites.clear();
}

WarpSites& warp_of(const Fiber& f) {
  const std::size_t i = std::size_t(f.block) * kMaxWarps + std::size_t(f.warp);
  if (g_warps.size() <= i) g_warps.resize(i + 1);
  return g_warps[i];
}

Grid* grid_of(Scheduler& s, const Fiber& f) {
  const int gi = s.blocks[static_cast<std::size_t>(f.block)]->grid_index;
  if (gi < 0 || gi >= static_cast<int>(g_grids.size()) || !g_grids[static_cast<std::size_t>(gi)].live) return nullptr;
  return &g_grids[static_cast<std::size_t>(gi)];
}

bool builtin(const unsigned char* c) {
  auto in = [c](const auto& v) {
    const auto* p = reinterpret_cast<const unsigned char*>(&v);
    return c >= p && c < p + sizeof v;
  };
  return in(g_threadIdx) || in(g_blockIdx) || in(g_blockDim) || in(g_gridDim) || in(g_cluster_blocks);
}

// 0: not a memory access counted here; 1: global; 2: shared.
int space_of(Scheduler& s, const Fiber& f, const Grid& g, const unsigned char* c) {
  if (c >= f.stack && c < f.stack + f.stack_bytes) return 0;
  const Block& b = *s.blocks[static_cast<std::size_t>(f.block)];
  if (c >= b.window && c < b.window + kSmemWindow) return 2;
  // The block's executor state: warp collectives' payloads and results (registers on the GPU).
  if (c >= reinterpret_cast<const unsigned char*>(&b) && c < reinterpret_cast<const unsigned char*>(&b + 1)) return 0;
  if (debuginfo::image().contains(c)) return debuginfo::writable_segment().contains(c) && !builtin(c) ? 2 : 0;
  if (c >= g.params_lo && c < g.params_hi) return 0;
  if (s.nblocks > 1)
    for (int r = 0; r < s.nblocks; ++r) {
      const Block& o = *s.blocks[static_cast<std::size_t>(r)];
      if (c >= o.window && c < o.window + kSmemWindow) return 2;
    }
  return 1;
}

std::string json_escape(const std::string& x) {
  std::string o;
  for (char ch : x) {
    if (ch == '"' || ch == '\\') o += '\\';
    if (static_cast<unsigned char>(ch) >= 0x20) o += ch;
  }
  return o;
}

std::string record(const Grid& g) {
  std::string o = "{\"kernel\": \"" + json_escape(debuginfo::short_kernel_name(g.kernel)) + "\"";
  char buf[512];
  const LaunchConfig& c = g.cfg;
  std::snprintf(buf, sizeof buf,
                ", \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], \"cluster\": [%u, %u, %u], \"dynamic_smem\": %zu",
                c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z, c.cluster.x, c.cluster.y, c.cluster.z,
                c.smem_bytes);
  o += buf;
  for (int k = 0; k < kKinds; ++k) {
    const Counter& x = g.c[k];
    const char* unit = is_global(k) ? "sectors" : "wavefronts";
    std::snprintf(buf, sizeof buf,
                  ", \"%s\": {\"requests\": %" PRIu64 ", \"bytes\": %" PRIu64 ", \"%s\": %" PRIu64
                  ", \"%s_min\": %" PRIu64 "}",
                  kKindName[k], x.requests, x.bytes, unit, x.units, unit, x.units_min);
    o += buf;
  }
  std::snprintf(buf, sizeof buf,
                ", \"global_load_unique_bytes\": %" PRIu64 ", \"global_store_unique_bytes\": %" PRIu64
                ", \"barriers\": %" PRIu64 ", \"cluster_barriers\": %" PRIu64,
                uint64_t(g.sectors[0].size()) * 32u, uint64_t(g.sectors[1].size()) * 32u, g.barriers,
                g.cluster_barriers);
  o += buf;
  o += ", \"collectives\": {";
  bool first = true;
  for (const auto& [what, n] : g.collectives) {
    o += (first ? "\"" : ", \"") + json_escape(what) + "\": " + std::to_string(n);
    first = false;
  }
  o += "}, \"sites\": [";
  // Every instruction, worst excess first: what a reader fixing a kernel looks for.
  std::vector<std::pair<uint64_t, Counter>> sites(g.sites.begin(), g.sites.end());
  std::sort(sites.begin(), sites.end(), [](const auto& a, const auto& b) {
    const uint64_t ea = a.second.units - a.second.units_min, eb = b.second.units - b.second.units_min;
    return ea != eb ? ea > eb : a.second.bytes > b.second.bytes;
  });
  first = true;
  for (const auto& [key, x] : sites) {
    const void* pc = reinterpret_cast<const void*>(key >> 4);
    const int k = static_cast<int>(key & 15);
    const char* unit = is_global(k) ? "sectors" : "wavefronts";
    std::snprintf(buf, sizeof buf,
                  "%s{\"where\": \"%s\", \"kind\": \"%s\", \"requests\": %" PRIu64 ", \"bytes\": %" PRIu64
                  ", \"%s\": %" PRIu64 ", \"%s_min\": %" PRIu64 "}",
                  first ? "" : ", ", json_escape(debuginfo::kernel_line(pc)).c_str(), kKindName[k], x.requests, x.bytes,
                  unit, x.units, unit, x.units_min);
    o += buf;
    first = false;
  }
  return o + "]}";
}

}  // namespace

bool g_on = g_path != nullptr;

void grid_begin(int grid_index, const void* kernel, const LaunchConfig& cfg) {
  if (!g_on) return;
  if (g_grids.size() <= static_cast<std::size_t>(grid_index)) g_grids.resize(static_cast<std::size_t>(grid_index) + 1);
  Grid& g = g_grids[static_cast<std::size_t>(grid_index)];
  g = Grid{};
  g.live = true;
  g.kernel = kernel;
  g.cfg = cfg;
}

void grids_end(bool ok) {
  for (WarpSites& w : g_warps) flush(w);
  for (Grid& g : g_grids) {
    if (!g.live) continue;
    if (ok) {
      std::string r = record(g);
      if (g_memory) {
        g_records.push_back(std::move(r));
      } else if (g_path) {
        if (FILE* f = std::fopen(g_path, "a")) {
          std::fprintf(f, "%s\n", r.c_str());
          std::fclose(f);
        }
      }
    }
    g = Grid{};
  }
  for (WarpSites& w : g_warps) w.grid = -1;
}

void params(const void* p, std::size_t n) {
  if (!g_on) return;
  Scheduler& s = S();
  if (!s.current) return;
  if (Grid* g = grid_of(s, *s.current)) {
    g->params_lo = static_cast<const unsigned char*>(p);
    g->params_hi = g->params_lo + n;
  }
}

void access(Fiber& f, const void* p, std::size_t n, Op op, const void* pc) {
  Scheduler& s = S();
  Grid* g = grid_of(s, f);
  if (!g || n == 0) return;
  const int space = space_of(s, f, *g, static_cast<const unsigned char*>(p));
  if (space == 0) return;
  const int kind = (space == 1 ? kGlobalLoad : kSharedLoad) + static_cast<int>(op);
  const uint64_t key = uint64_t(reinterpret_cast<uintptr_t>(pc)) << 4 | uint64_t(kind);
  WarpSites& w = warp_of(f);
  w.grid = s.blocks[static_cast<std::size_t>(f.block)]->grid_index;
  Site& site = w.sites[key];
  const uint32_t k = site.k[f.lane]++;
  if (site.reqs.size() <= k) site.reqs.resize(k + 1);
  Request& r = site.reqs[k];  // k counts this lane's executions: its slot is still free
  r.mask |= 1u << f.lane;
  r.lane[f.lane] = Lane{reinterpret_cast<uintptr_t>(p), static_cast<uint32_t>(n)};
}

void matrix_request(Fiber& f, const unsigned char* const* rows, int nrows, bool wgmma, const void* pc) {
  Scheduler& s = S();
  Grid* g = grid_of(s, f);
  if (!g) return;
  Counter c;
  c.requests = 1;
  c.bytes = 16u * static_cast<uint64_t>(nrows);
  for (int p = 0; p < nrows; p += 8) {
    t_units.clear();
    for (int r = p; r < std::min(nrows, p + 8); ++r)
      for (int w = 0; w < 4; ++w) t_units.push_back((reinterpret_cast<uintptr_t>(rows[r]) >> 2) + uint64_t(w));
    std::sort(t_units.begin(), t_units.end());
    t_units.erase(std::unique(t_units.begin(), t_units.end()), t_units.end());
    c.units += phase_wavefronts();
    c.units_min += 1;
  }
  const int kind = wgmma ? kWgmma : kLdmatrix;
  add_site(*g, uint64_t(reinterpret_cast<uintptr_t>(pc)) << 4 | uint64_t(kind), kind, c);
}

void barrier(Scheduler& s, Block& b) {
  if (!g_on) return;
  const int first = b.first;
  if (Grid* g = grid_of(s, s.fibers[static_cast<std::size_t>(first)])) ++g->barriers;
  const std::size_t base = std::size_t(s.fibers[static_cast<std::size_t>(first)].block) * kMaxWarps;
  for (std::size_t w = base; w < std::min(g_warps.size(), base + kMaxWarps); ++w) flush(g_warps[w]);
}

void cluster_barrier(Scheduler& s) {
  if (!g_on) return;
  if (s.nblocks > 0)
    if (Grid* g = grid_of(s, s.fibers[static_cast<std::size_t>(s.blocks[0]->first)])) ++g->cluster_barriers;
  for (WarpSites& w : g_warps) flush(w);
}

void collective(Scheduler& s, Block& b, int warp, unsigned mask, const char* what) {
  if (!g_on) return;
  const Fiber& any = s.fibers[static_cast<std::size_t>(b.first + warp * 32)];
  if (Grid* g = grid_of(s, any)) ++g->collectives[what ? what : "?"];
  const WarpState& ws = b.warps[warp];
  const unsigned live = ws.exist & ~ws.exited;
  if ((mask & live) == live) flush(warp_of(any));
}

void block_end(Scheduler& s, Block& b) {
  if (!g_on) return;
  const std::size_t base = std::size_t(s.fibers[static_cast<std::size_t>(b.first)].block) * kMaxWarps;
  for (std::size_t w = base; w < std::min(g_warps.size(), base + kMaxWarps); ++w) flush(g_warps[w]);
}

void begin() {
  g_records.clear();
  g_memory = true;
  g_on = true;
}

std::vector<std::string> end() {
  std::vector<std::string> out;
  out.swap(g_records);
  g_memory = false;
  g_on = g_path != nullptr;
  return out;
}

}  // namespace simt::metrics

void simt::note_params(const void* p, std::size_t n) { metrics::params(p, n); }
