// W4A16: int4 weights (packed offline into the mma fragment order), fp16/bf16
// activations, fp32 accumulation on FP16/BF16 tensor cores.
//
// Packed layout (version kInt4LayoutVersion; drawn out in docs/quant.md):
// weight W [N, K] (nn.Linear layout) is stored as int32 [K/16, 2N]. Row kt
// holds the k16 x n64 tiles (kt, nb) for nb = 0..N/64-1, 128 int32 (512 B)
// each; inside a tile, lane l of a warp owns 4 consecutive int32 (one 16-byte
// load) = 32 nibbles. With gid = l / 4, t = l % 4, word w (0..3) and nibble
// p (0..7, bits 4p..4p+3), write p = 4 hi + 2 b1 + b0; the nibble holds
//   k = 16 kt + 8 b0 + 2 t + hi,    n = 64 nb + 16 w + 8 b1 + gid,
// i.e. (w >> 4 (2 b1 + b0)) & 0x000f000f puts the B-fragment register
// b0 of mma.m16n8k16 (k = 2t + 8 b0 + {0, 1}, n = gid) of n-tile 2w + b1 in
// its two 16-bit halves: dequantization needs one shift, one lop3 and two
// half2 ops per fragment register, no shuffles and no shared memory.
//
// Stored nibbles are unsigned u in [0, 15]; w = (u - z) * s with z = 8 for
// symmetric weights (q = u - 8 in [-8, 7]) or the zero point z[g, n] (an
// integer 0..15 stored in the scales' dtype). Scales / zeros: [G, N] in x's
// dtype, G = K / group_size (1 for per-channel).
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace inferops::quant {

constexpr int kInt4LayoutVersion = 1;
constexpr int kW4TileK = 16;  // k rows per packed tile (one mma k-step)
constexpr int kW4TileN = 64;  // n columns per packed tile (8 mma n-tiles, one warp)
constexpr int kW4Warps = 4;   // warps per GEMM CTA, each on its own k-range of the same n-block
constexpr int kW4MaxSplits = 8;  // split-K CTAs form one cluster: 8 is the portable maximum

struct W4A16Params {
  const void* x;           // [M, K] row-major contiguous, fp16 / bf16
  const uint32_t* qweight; // [K/16, 2N] packed (see above), 16-byte aligned
  const void* scales;      // [G, N] x dtype
  const void* zeros;       // [G, N] x dtype (integer values) or nullptr: symmetric, z = 8
  const void* bias;        // [N] x dtype or nullptr
  void* out;               // [M, N] x dtype contiguous
  int64_t m;
  int32_t n;
  int32_t k;
  int32_t group_size;  // k rows per scale group, multiple of 16 dividing K (K for per-channel)
  int32_t splits;      // CTAs along K per n-block (split-K), one cluster; 1..kW4MaxSplits
};

struct Int4DequantParams {
  const uint32_t* qweight;  // [K/16, 2N]
  const void* scales;       // [G, N]
  const void* zeros;        // [G, N] or nullptr
  void* out;                // [N, K] x dtype contiguous
  int32_t n;
  int32_t k;
  int32_t group_size;
};

// y = x W^T (+ bias), split-K over `splits` CTAs (a thread-block cluster) per n-block.
void w4a16_matmul(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                  const TensorView* zeros, const TensorView* bias, const TensorView& out, int group_size,
                  int splits, std::uintptr_t stream);

// out [N, K] = (u - z) * s in the scales' dtype (exactly the GEMM's dequantized operand).
void int4_dequantize(const TensorView& qweight, const TensorView& scales, const TensorView* zeros,
                     const TensorView& out, int group_size, std::uintptr_t stream);

#ifdef INFEROPS_WITH_CUDA
void launch_w4a16_matmul(const W4A16Params& p, DType dtype, int device, std::uintptr_t stream);
void launch_int4_dequantize(const Int4DequantParams& p, DType dtype, int device,
                            std::uintptr_t stream);
#endif

}  // namespace inferops::quant
