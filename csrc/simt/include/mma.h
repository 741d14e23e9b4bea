// Executor model of <mma.h> (nvcuda::wmma) for 16x16x16 tiles. Fragment contents are
// opaque on the GPU and the kernels never index them, so here every lane holds the whole
// tile (fp16/bf16 values are exact in float). Each wmma call is a warp collective over all
// 32 lanes, as the .sync.aligned PTX is; load/store also check that every lane passes the
// same pointer, leading dimension and layout. mma_sync sums exact products in double in k
// order and rounds once (the hardware's accumulation rounding differs in the last bits).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  float t[kRows][kCols];
};

namespace detail {

struct Access {
  const void* ptr;
  unsigned ldm;
  int layout;
  int kind;
};

inline void meet(const void* ptr, unsigned ldm, int layout, int kind, const char* what) {
  const Access a{ptr, ldm, layout, kind};
  ::simt::collective(::simt::kOpWmma, what, 0xffffffffu, &a, sizeof a,
                     [](unsigned, const unsigned char (*payload)[::simt::kPayloadBytes],
                        unsigned char (*)[::simt::kResultBytes], const void*) {
                       Access a0;
                       std::memcpy(&a0, payload[0], sizeof a0);
                       for (int l = 1; l < 32; ++l) {
                         Access b;
                         std::memcpy(&b, payload[l], sizeof b);
                         if (b.ptr != a0.ptr || b.ldm != a0.ldm || b.layout != a0.layout || b.kind != a0.kind) {
                           ::simt::fail("wmma: lanes 0 and %d disagree on the operation, pointer, ldm or layout", l);
                         }
                       }
                     });
}

template <typename E>
float to_float(const E& x) {
  if constexpr (std::is_same_v<E, float>) {
    return x;
  } else {
    return static_cast<float>(x);
  }
}

}  // namespace detail

template <typename U, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<U, M, N, K, T, L>& f, float v) {
  for (auto& r : f.t)
    for (auto& x : r) x = v;
}

template <typename U, int M, int N, int K, typename T, typename L, typename E>
void load_matrix_sync(fragment<U, M, N, K, T, L>& f, const E* p, unsigned ldm) {
  static_assert(!std::is_same_v<U, accumulator>, "an accumulator load needs a layout_t");
  using F = fragment<U, M, N, K, T, L>;
  constexpr bool row = std::is_same_v<L, row_major>;
  detail::meet(p, ldm, row ? 0 : 1, 1, "wmma::load_matrix_sync");
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.t[r][c] = detail::to_float(row ? p[std::size_t(r) * ldm + c] : p[std::size_t(c) * ldm + r]);
}

template <int M, int N, int K, typename T, typename E>
void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const E* p, unsigned ldm, layout_t lay) {
  detail::meet(p, ldm, lay, 2, "wmma::load_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.t[r][c] = detail::to_float(lay == mem_row_major ? p[std::size_t(r) * ldm + c] : p[std::size_t(c) * ldm + r]);
}

template <int M, int N, int K, typename T, typename E>
void store_matrix_sync(E* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t lay) {
  detail::meet(p, ldm, lay, 3, "wmma::store_matrix_sync");
  if (::simt::lane_id() != 0) return;  // every lane holds the same tile
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      E& dst = lay == mem_row_major ? p[std::size_t(r) * ldm + c] : p[std::size_t(c) * ldm + r];
      if constexpr (std::is_same_v<E, float>) {
        dst = f.t[r][c];
      } else {
        dst = E(f.t[r][c]);
      }
    }
}

template <int M, int N, int K, typename T, typename LA, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c) {
  detail::meet(nullptr, 0, 0, 4, "wmma::mma_sync");
  float out[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double acc = c.t[i][j];
      for (int k = 0; k < K; ++k) acc += double(a.t[i][k]) * double(b.t[k][j]);
      out[i][j] = static_cast<float>(acc);
    }
  std::memcpy(d.t, out, sizeof out);
}

}  // namespace wmma
}  // namespace nvcuda
