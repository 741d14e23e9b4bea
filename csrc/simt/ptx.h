// Executor implementations of the PTX instructions the kernels use, one typed function per
// instruction (no PTX text is parsed at run time). The wrappers in csrc/common/ (mma.cuh,
// cp_async.cuh, ptx.cuh) call these in their INFEROPS_SIMT branch, beside the `asm` that
// nvcc compiles. Fragment layouts follow the PTX ISA ("Matrix fragments for mma.m16n8k16 /
// m16n8k32", "ldmatrix"); tensor-core products are summed in fp32 (int32 for s8) in k order,
// which is not bit-exact to the hardware's internal rounding.
#pragma once

#include <cstdint>

namespace simt::ptx {

enum class MmaType : int { kF16, kBF16, kS8, kE4M3 };

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += a b (warp-wide; all 32 lanes).
void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32
void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32
void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lane 8j + r gives the shared
// address of row r of matrix j (rows 16-byte aligned); r[j] receives matrix j's fragment.
void ldmatrix(uint32_t* r, int count, uint32_t saddr, bool trans);

// cp.async.{ca,cg}.shared.global [saddr], [gmem], bytes[, src_bytes]: the source is read at
// issue (an out-of-bounds source is reported at the issuing line), the destination is filled
// with 0xFF at issue and written when a wait retires its group, so reading it too early
// sees NaN / -1 rather than the right data.
void cp_async(uint32_t saddr, const void* gmem, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);  // cp.async.wait_group pending
void cp_async_wait_all();         // cp.async.wait_all (commits the open group first)

// st.global.v4.b32 / ld.global[.nc...].v4.u32: 16-byte accesses, alignment checked.
void st_global_v4(void* p, const uint32_t (&w)[4]);
void ld_global_v4(uint32_t (&w)[4], const void* p);

// ld.acquire.{gpu,sys}.global.u32 (lets the other threads run: flags are spun on) and
// st.release.{gpu,sys}.global.u32.
uint32_t ld_acquire_u32(const uint32_t* p);
void st_release_u32(uint32_t* p, uint32_t v);

// Hopper warpgroup MMA (wgmma.cpp has the model and its limits).
// wgmma.mma_async.sync.aligned.m64nNkK.f32.{f16,bf16,e4m3}: warpgroup-collective; A and B from
// shared-memory matrix descriptors (K-major), d = the thread's N/2 fp32 accumulators, which read
// NaN until a wgmma_wait retires the op's group; scale_d == 0 starts from zero.
void wgmma_mma(MmaType type, int n, float* d, uint64_t desc_a, uint64_t desc_b, int scale_d);
void wgmma_fence();               // wgmma.fence.sync.aligned
void wgmma_commit();              // wgmma.commit_group.sync.aligned
void wgmma_wait(int pending);     // wgmma.wait_group.sync.aligned pending
void fence_proxy_async_shared();  // fence.proxy.async.shared::cta (no-op: see wgmma.cpp)

uint32_t lanemask_lt();     // mov.u32 %r, %lanemask_lt
uint64_t globaltimer_ns();  // mov.u64 %r, %globaltimer

// lop3.b32 d, a, b, c, lut: bit i of d is bit (a_i b_i c_i) of lut.
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t lut) {
  uint32_t d = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t sel = ((a >> i & 1u) << 2) | ((b >> i & 1u) << 1) | (c >> i & 1u);
    d |= ((lut >> sel) & 1u) << i;
  }
  return d;
}

}  // namespace simt::ptx
