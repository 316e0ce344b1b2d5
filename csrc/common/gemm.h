// Small GEMM-shaped loops of the CPU kernels: fma_scalars sums rows of a
// plane weighted by scalars, the form of a matrix product whose output rows
// and second operand are contiguous. Criss-cross attention (its row and column
// products) and deform_conv2d (its implicit GEMMs) use it.
//
// Register blocks of kOuts = 6 outputs x two vectors of lanes (16 floats, 8
// doubles): 12 accumulators, two vector loads and six broadcasts per 12 FMAs,
// the 6 x 16 block of AVX2 SGEMM kernels (16 ymm registers). GCC vector
// extensions keep the sums in registers on any target (the baseline clone
// splits each vector in two). A row's last block is moved back to end at the
// row's end, one vector wide when at most one vector's lanes remain (a row
// of one to two vectors: two one-vector blocks), so tails run at full vector
// width, never outside the row, and recompute (without storing) at most one
// vector of lanes; likewise the last block of outputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace fastvision {

constexpr int64_t kOuts = 6;  // outputs per register block (they share the vector loads)

// Lanes per vector of T (32 bytes: one AVX2 register) and per register block (two vectors).
template <typename T>
constexpr int64_t kLanes = 32 / sizeof(T);
template <typename T>
constexpr int64_t kChunk = 2 * kLanes<T>;

// One register block: outputs o0 .. o0 + kOuts - 1, NV vectors of lanes from
// w0, of which outputs from o0 + keep_o and lanes from w0 + keep_w on are
// stored (a block that ends a row or the outputs may start before the
// previous one ends: it recomputes the overlap, unstored; every output's sum
// runs over r in order, whichever block computes it).
// Always inlined, so that each clone of fma_scalars_chunk compiles it for its ISA.
template <int NV, typename T>
__attribute__((always_inline)) inline void fma_scalars_block(T* __restrict out, int64_t os, const T* __restrict A, int64_t as,
                              const T* __restrict S, int64_t so, int64_t sr, int64_t n_r, int64_t o0, int64_t w0,
                              int64_t keep_o, int64_t keep_w, bool accumulate) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = static_cast<int>(kLanes<T>);
  V acc[kOuts][NV] = {};
  const T* s0 = S + o0 * so;
  for (int64_t r = 0; r < n_r; ++r) {
    V a[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&a[v], A + r * as + w0 + v * L, sizeof(V));
    for (int t = 0; t < kOuts; ++t) {
      const T s = s0[t * so + r * sr];
      for (int v = 0; v < NV; ++v) acc[t][v] += a[v] * s;
    }
  }
  if (keep_o == 0 && keep_w == 0) {  // the common case, stored from registers
    for (int t = 0; t < kOuts; ++t)
      for (int v = 0; v < NV; ++v) {
        T* o = out + (o0 + t) * os + w0 + v * L;
        V x = acc[t][v];
        if (accumulate) {
          V y;
          std::memcpy(&y, o, sizeof(V));
          x += y;
        }
        std::memcpy(o, &x, sizeof(V));
      }
    return;
  }
  for (int t = static_cast<int>(keep_o); t < kOuts; ++t) {
    T lanes[NV * L];
    std::memcpy(lanes, acc[t], sizeof(lanes));
    T* o = out + (o0 + t) * os + w0;
    for (int64_t e = keep_w; e < NV * L; ++e) o[e] = accumulate ? o[e] + lanes[e] : lanes[e];
  }
}

// NO outputs' dot products over r of one lane (its column of A gathered into
// col, nr values) with rows of S contiguous along r: vectorised along r, NO
// sums in flight; out = sum (first) or out + sum.
template <int NO, typename T>
__attribute__((always_inline)) inline void fma_scalars_dot(T* out, int64_t os, const T* col, const T* S, int64_t so,
                                                           int64_t nr, bool first) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = static_cast<int>(kLanes<T>);
  V acc[NO] = {};
  int64_t r = 0;
  for (; r + L <= nr; r += L) {
    V a;
    std::memcpy(&a, col + r, sizeof(V));
    for (int t = 0; t < NO; ++t) {
      V x;
      std::memcpy(&x, S + t * so + r, sizeof(V));
      acc[t] += a * x;
    }
  }
  for (int t = 0; t < NO; ++t) {
    T sum = 0;
    for (int e = 0; e < L; ++e) sum += acc[t][e];
    for (int64_t q = r; q < nr; ++q) sum += col[q] * S[t * so + q];
    out[t * os] = first ? sum : out[t * os] + sum;
  }
}

// Lanes [w0, width) (at most half a vector: the tail of a row) when S is
// contiguous along r: dot products, at 1 / kLanes of a vector block's FMAs
// per lane (the sums run along r in vector lanes: another order than the
// blocks', as deterministic). r in pieces of kCol, each lane's column of A
// gathered once per piece.
template <typename T>
__attribute__((always_inline)) inline void fma_scalars_dots(T* out, int64_t n_out, int64_t os, const T* A, int64_t as,
                                                            const T* S, int64_t so, int64_t n_r, int64_t w0,
                                                            int64_t width, bool accumulate) {
  constexpr int64_t kCol = 128;
  T col[kCol];
  for (int64_t w = w0; w < width; ++w)
    for (int64_t r0 = 0; r0 < n_r; r0 += kCol) {
      const int64_t nr = std::min(kCol, n_r - r0);
      for (int64_t r = 0; r < nr; ++r) col[r] = A[(r0 + r) * as + w];
      const bool first = r0 == 0 && !accumulate;
      int64_t o = 0;
      for (; o + kOuts <= n_out; o += kOuts)
        fma_scalars_dot<kOuts>(out + o * os + w, os, col, S + o * so + r0, so, nr, first);
      for (; o < n_out; ++o) fma_scalars_dot<1>(out + o * os + w, os, col, S + o * so + r0, so, nr, first);
    }
}

// out[o * os + w] (+)= sum_r A[r * as + w] * S[o * so + r * sr]
// (rows of a plane weighted by scalars), for o < n_out and w < width.
template <typename T>
FV_CPU_CLONES void fma_scalars_chunk(T* __restrict out, int64_t n_out, int64_t os, const T* __restrict A, int64_t as,
                                     const T* __restrict S, int64_t so, int64_t sr, int64_t n_r, int64_t width,
                                     bool accumulate) {
  constexpr int64_t L = kLanes<T>, C = kChunk<T>;
  // A tail of at most half a vector of lanes by dot products where S allows.
  const int64_t rem = width % C;
  const bool dots = sr == 1 && rem > 0 && rem <= L / 2 && width >= C && n_out >= kOuts;
  const int64_t bw = dots ? width - rem : width;  // the lanes of the register blocks
  if (dots) fma_scalars_dots(out, n_out, os, A, as, S, so, n_r, bw, width, accumulate);
  int64_t o0 = 0;
  for (; o0 < n_out && n_out >= kOuts && width >= L; o0 += kOuts) {
    int64_t keep_o = 0;
    if (o0 + kOuts > n_out) {  // output tail: the last kOuts outputs, the new ones stored
      keep_o = o0 + kOuts - n_out;
      o0 = n_out - kOuts;
    }
    int64_t w0 = 0;
    for (; w0 + C <= bw; w0 += C)
      fma_scalars_block<2>(out, os, A, as, S, so, sr, n_r, o0, w0, keep_o, 0, accumulate);
    // w tail: the last one or two vectors of lanes, the new ones stored
    if (w0 < bw && bw - w0 > L && bw >= C) {
      fma_scalars_block<2>(out, os, A, as, S, so, sr, n_r, o0, bw - C, keep_o, w0 + C - bw, accumulate);
    } else if (w0 < bw) {
      if (bw - w0 > L) {  // a row of one to two vectors (L < bw < C): its first vector
        fma_scalars_block<1>(out, os, A, as, S, so, sr, n_r, o0, w0, keep_o, 0, accumulate);
        w0 += L;
      }
      fma_scalars_block<1>(out, os, A, as, S, so, sr, n_r, o0, bw - L, keep_o, w0 + L - bw, accumulate);
    }
  }
  for (; o0 < n_out; ++o0) {  // fewer outputs than a block, or rows narrower than a vector
    T* o = out + o0 * os;
    if (!accumulate)
      for (int64_t w = 0; w < width; ++w) o[w] = T(0);
    for (int64_t r = 0; r < n_r; ++r) {
      const T* a = A + r * as;
      const T s = S[o0 * so + r * sr];
#pragma omp simd
      for (int64_t w = 0; w < width; ++w) o[w] += a[w] * s;
    }
  }
}

// The sums over r run in chunks of kRChunk: a chunk's rows of the large
// operand (kRChunk rows x one block's lanes: 2 KB of float) stay in L1 while
// every output block reuses them, and when r runs over channels (stride
// H * W) they stay within a few pages (TLB entries). Callers whose operands
// stay in cache anyway pass chunk = n_r: one pass, every output block stored
// once (chunk >= 1).
constexpr int64_t kRChunk = 32;

template <typename T>
void fma_scalars(T* out, int64_t n_out, int64_t os, const T* A, int64_t as, const T* S, int64_t so, int64_t sr,
                 int64_t n_r, int64_t width, bool accumulate, int64_t chunk = kRChunk) {
  int64_t r0 = 0;
  do {
    const int64_t n = std::min(chunk, n_r - r0);
    fma_scalars_chunk(out, n_out, os, A + r0 * as, as, S + r0 * sr, so, sr, n, width, accumulate || r0 > 0);
    r0 += chunk;
  } while (r0 < n_r);
}

}  // namespace fastvision
