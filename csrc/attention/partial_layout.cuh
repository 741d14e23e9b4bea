// The fp32 partial states of split-K decode (partial_out [splits, batch, q heads, head_dim]),
// written by PagedDecodeKernel and SharedPrefixKernel and merged by MergeSplitsKernel: a row's
// dims are stored in two halves, dims 8 t + [0, 4) at position 4 t and dims 8 t + [4, 8) at
// head_dim / 2 + 4 t. The decode kernel's threads hold 8 contiguous dims each, so each of its
// two 16-byte stores of a row is then one contiguous run (natural order left half of every
// sector to the other store: 2x the sectors per request, executor metrics).
#pragma once

namespace inferops::attention {

// Position in a partial row of dim d (each aligned group of 4 dims stays contiguous).
__host__ __device__ constexpr int partial_position(int d, int head_dim) {
  return (d % 8 >= 4 ? head_dim / 2 : 0) + (d / 8) * 4 + d % 4;
}

}  // namespace inferops::attention
