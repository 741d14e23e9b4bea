// Memory-access metrics of kernel launches on the executor (metrics.cpp has the model and its
// limits). Built into the instrumented executor build (CMake INFEROPS_SIMT_RACECHECK: the kernel
// sources compiled with g++'s ThreadSanitizer instrumentation, whose per-access hooks race.cpp
// defines and forwards here); collecting is off until INFEROPS_SIMT_METRICS=<path.jsonl> (one
// JSON record per launch appended there) or begin() (records kept for end()). Not part of the
// kernel-side API; without INFEROPS_SIMT_RACECHECK every function here is an empty inline.
#pragma once

#include "simt/scheduler.h"

#include <cstddef>
#include <string>
#include <vector>

namespace simt::metrics {

enum class Op : int { kLoad = 0, kStore = 1, kAtomic = 2 };

#if defined(INFEROPS_SIMT_RACECHECK)
constexpr bool kBuilt = true;
extern bool g_on;  // collecting

// A launched grid starts (grid_index: its index in a concurrent pool, else 0) / the launch (or
// the concurrent pool) ends: ok, its records are written; failed, they are dropped.
void grid_begin(int grid_index, const void* kernel, const LaunchConfig& cfg);
void grids_end(bool ok);
// An access of fiber f's kernel code (the instrumentation) or of an executor instruction model
// (cp.async, ld/st.global.v4, acquire/release flags); pc: the instruction.
void access(detail::Fiber& f, const void* p, std::size_t n, Op op, const void* pc);
// A warp-wide shared-memory read of 16-byte rows, 8 rows per 128-byte wavefront when free of
// bank conflicts: ldmatrix (lane 8j + r gives row r of matrix j) and wgmma's operand core
// matrices (8 rows x 16 bytes each).
void matrix_request(detail::Fiber& f, const unsigned char* const* rows, int nrows, bool wgmma, const void* pc);
// Synchronization points (requests are matched across a warp's lanes between them) and counts.
void barrier(detail::Scheduler& s, detail::Block& b);
void cluster_barrier(detail::Scheduler& s);
void collective(detail::Scheduler& s, detail::Block& b, int warp, unsigned mask, const char* what);
void block_end(detail::Scheduler& s, detail::Block& b);
// The running thread's kernel parameters (the launch's parameter copy, read by each thread as
// it calls the kernel: CUDA's parameter space, not global memory).
void params(const void* p, std::size_t n);
// Collect into memory from now on / stop and return the records (JSON objects, one per launch).
void begin();
std::vector<std::string> end();
#else
constexpr bool kBuilt = false;
constexpr bool g_on = false;
inline void grid_begin(int, const void*, const LaunchConfig&) {}
inline void grids_end(bool) {}
inline void access(detail::Fiber&, const void*, std::size_t, Op, const void*) {}
inline void matrix_request(detail::Fiber&, const unsigned char* const*, int, bool, const void*) {}
inline void barrier(detail::Scheduler&, detail::Block&) {}
inline void cluster_barrier(detail::Scheduler&) {}
inline void collective(detail::Scheduler&, detail::Block&, int, unsigned, const char*) {}
inline void block_end(detail::Scheduler&, detail::Block&) {}
inline void params(const void*, std::size_t) {}
#endif

}  // namespace simt::metrics
