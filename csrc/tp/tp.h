// Tensor parallel (T3): fused GEMM + reduce-scatter, parameters and host entry.
//
// Every rank r computes its partial C_r = A_r B_r ([M, K_local] x [K_local, N]);
// the result on rank r is out_r = sum_s C_s[r * M/W : (r + 1) * M/W, :], i.e.
// reduce_scatter_tensor(A B) along rows. Each finished 128 x 128 tile of C_s is
// pushed (in the input dtype) into the symmetric buffer of the rank that owns
// its rows, followed by a per-tile flag; the owner sums the W contributions in
// fp32 in a fixed source order (deterministic) once every flag of a tile is up.
//
// Symmetric buffer of one rank (the same layout on every rank; bytes):
//   data  [2 parities][W sources][slot_elems]  input dtype; a slot holds up to
//         m_local_max x n_max elements ([m_local][N] rows of the call), its size
//         rounded up to 8 elements so every slot starts 16-byte aligned (n_max
//         need not be a multiple of 8; the kernel's 16-byte stores need it).
//         parity = epoch & 1: a peer may already push call e + 1 while this
//         rank still reduces call e, never call e + 2 (that needs this rank's
//         own contributions to e + 1, pushed only after call e finished here).
//   flags [2 parities][W sources][max_tiles] uint32 at flags_offset (128-aligned)
//         flag = epoch of the call that wrote the tile (monotone: never reset).
//   done  [2 parities][max_tiles] uint32 at done_offset, read by this rank only:
//         epoch of the call whose epilogue already reduced this rank's rows of
//         the tile (then its own partial is never pushed, and phase 2 skips it).
// Local state (not shared), int32 [kStateWords]:
//   [0] epoch of the last finished call, [1] blocks done in the current call,
//   [2] error code (0 ok, 1 timeout waiting for a peer), [3] source rank and
//   [4] tile the wait timed out on. The last block of a call stores the epoch.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace inferops::tp {

constexpr int kTileM = 128;
constexpr int kTileN = 128;
constexpr int kStateWords = 8;
constexpr int kMaxWorld = 32;  // one waiting thread per source rank, one warp

enum StateWord : int { kEpoch = 0, kDone = 1, kError = 2, kErrorSource = 3, kErrorTile = 4 };
enum ErrorCode : int { kOk = 0, kTimeout = 1 };

struct BufferLayout {
  int64_t m_local_max;   // rows each rank owns at most: ceil(max_m / world)
  int64_t slot_elems;    // m_local_max * n_max rounded up to a multiple of 8 (16-byte slots)
  int64_t max_tiles;     // ceil(max_m / 128) * ceil(n_max / 128)
  int64_t flags_offset;  // bytes
  int64_t done_offset;   // bytes
  int64_t total_bytes;
};

inline BufferLayout buffer_layout(int64_t max_m, int64_t n_max, int64_t world, int64_t elem_bytes) {
  BufferLayout l{};
  l.m_local_max = (max_m + world - 1) / world;
  l.slot_elems = (l.m_local_max * n_max + 7) / 8 * 8;
  l.max_tiles = ((max_m + kTileM - 1) / kTileM) * ((n_max + kTileN - 1) / kTileN);
  const int64_t data = 2 * world * l.slot_elems * elem_bytes;
  l.flags_offset = (data + 127) / 128 * 128;
  l.done_offset = l.flags_offset + 2 * world * l.max_tiles * 4;
  l.total_bytes = l.done_offset + 2 * l.max_tiles * 4;
  return l;
}

struct GemmRsParams {
  const void* a;            // [M, K] row stride lda, K contiguous
  const void* b;            // [K, N]: b_kn ? row stride ldb, N contiguous : column stride ldb, K contiguous
  void* out;                // [M / W, N] contiguous (W == 1: [M, N])
  const int64_t* peers;     // [W] device: base address of every rank's symmetric buffer
  int32_t* state;           // [kStateWords] device, this rank's
  int64_t lda;
  int64_t ldb;
  int64_t slot_elems;       // BufferLayout
  int64_t flags_offset;
  int64_t done_offset;
  int64_t max_tiles;
  uint64_t timeout_ns;      // a wait on a peer longer than this sets kTimeout
  int32_t m, n, k;
  int32_t m_local;          // M / W
  int32_t rank, world;
  bool b_kn;
};

// Validates everything (shapes, dtypes, devices, buffer capacity) and launches.
// `buffer_bytes`: size of each rank's symmetric buffer; `num_blocks` 0: as many
// as are co-resident on the device (persistent grid), else at most that many
// (virtual ranks: SMs / W so every rank's kernel is resident at once).
void gemm_reduce_scatter(const TensorView& a, const TensorView& b, const TensorView& out,
                         const TensorView& peers, const TensorView& state, int rank, int world,
                         int64_t max_m, int64_t n_max, int64_t buffer_bytes, double timeout_s,
                         int num_blocks, std::uintptr_t stream);

#ifdef INFEROPS_WITH_CUDA
void launch_gemm_rs(const GemmRsParams& p, DType dtype, int device, int num_blocks,
                    std::uintptr_t stream);
#endif

}  // namespace inferops::tp
