// The executor's shared-memory race detector (race.cpp), built when INFEROPS_SIMT_RACECHECK is
// defined (CMake option INFEROPS_SIMT_RACECHECK; the build CI runs the executed-kernel tests
// under). Not part of the kernel-side API.
//
// Model: happens-before with vector clocks. The threads that can touch a block's shared memory
// form a *domain*: the block, or every block of a thread-block cluster (distributed shared
// memory). Each thread has a vector clock over its domain; a barrier joins the clocks of the
// threads it releases (__syncthreads and its _count/_and/_or forms: the block's threads;
// cluster.sync: the cluster's; a warp collective (__syncwarp, shuffles, votes, ldmatrix, mma,
// wmma): the lanes of its mask) and then advances each one's own entry. Every shared-memory
// byte has shadow state: its last write (thread, clock, instruction) and up to two reads since
// then that are not ordered with each other. An access conflicts with a recorded one when they
// come from different threads, at least one writes, and the recorded one does not happen before
// it; the first conflict fails the launch with both threads, the address and both source lines.
//
// Accesses reach it from two places: the kernel sources, compiled with g++'s ThreadSanitizer
// instrumentation (-fsanitize=thread), whose __tsan_read*/__tsan_write* calls race.cpp defines
// itself (the TSan runtime is never linked); and the executor's own instruction models, which
// report the accesses they perform for a thread: cp.async writes its destination at issue and
// again when a wait retires its group, ldmatrix reads for each lane, wgmma reads its operands at issue. Atomics
// are performed and not checked (two atomics never race; a plain access racing an atomic is not
// reported). Without INFEROPS_SIMT_RACECHECK every function here is an empty inline.
#pragma once

#include "simt/scheduler.h"

#include <cstddef>
#include <cstdint>

namespace simt::race {

#if defined(INFEROPS_SIMT_RACECHECK)
constexpr bool kBuilt = true;
// A pool starts (its blocks prepared by start_block) / ends or fails (frees its shadow state).
void pool_start(detail::Scheduler& s);
void pool_end(detail::Scheduler& s);
// Barrier releases, called before the waiting threads are marked runnable.
void block_barrier(detail::Scheduler& s, detail::Block& b);  // threads of b waiting at __syncthreads
void cluster_barrier(detail::Scheduler& s);                   // threads waiting at cluster.sync
void warp_sync(detail::Scheduler& s, detail::Block& b, int warp, unsigned mask);
// An access performed by the executor for fiber `f` (pc: the instruction, for the report).
void access(detail::Fiber& f, const void* p, std::size_t n, bool write, const void* pc);
// Mutation testing: true when the __syncthreads called at `pc` is one that
// INFEROPS_SIMT_SKIP_BARRIER ("csrc/FILE:LINE[,...]") removes (it then does nothing), so a test
// can show that removing a real kernel's barrier is reported.
bool skip_barrier(const void* pc);
#else
constexpr bool kBuilt = false;
inline void pool_start(detail::Scheduler&) {}
inline void pool_end(detail::Scheduler&) {}
inline void block_barrier(detail::Scheduler&, detail::Block&) {}
inline void cluster_barrier(detail::Scheduler&) {}
inline void warp_sync(detail::Scheduler&, detail::Block&, int, unsigned) {}
inline void access(detail::Fiber&, const void*, std::size_t, bool, const void*) {}
inline bool skip_barrier(const void*) { return false; }
#endif

}  // namespace simt::race
