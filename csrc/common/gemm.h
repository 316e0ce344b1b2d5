// Small GEMM-shaped loops of the CPU kernels, vectorised over a contiguous
// axis (GCC's autovectoriser, `#pragma omp simd`): fma_scalars sums rows of
// a plane weighted by scalars, the form of a matrix product whose output rows
// and second operand are contiguous. Criss-cross attention (its row and column
// products) and deform_conv2d (its implicit GEMMs) use it. Register blocks of
// kOuts outputs x kChunk lanes; the last block of a row (of the outputs) is
// moved back to end at the row's end, so tails run at full width.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace fastvision {

constexpr int64_t kChunk = 16;  // w per register block (two AVX2 vectors of float)
constexpr int64_t kOuts = 4;    // outputs per register block (they share the A loads)

// One register block: outputs o0 .. o0 + kOuts - 1, lanes w0 .. w0 + kChunk - 1,
// of which outputs from o0 + keep_o and lanes from w0 + keep_w on are stored
// (the block that ends a row or the outputs may start before the previous one
// ends: it recomputes the overlap, unstored, and so needs no partial-width
// code; every output's sum runs over r in order, whichever block computes it).
template <typename T>
inline void fma_scalars_block(T* __restrict out, int64_t os, const T* __restrict A, int64_t as,
                              const T* __restrict S, int64_t so, int64_t sr, int64_t n_r, int64_t o0, int64_t w0,
                              int64_t keep_o, int64_t keep_w, bool accumulate) {
  T acc[kOuts][kChunk] = {};
  for (int64_t r = 0; r < n_r; ++r) {
    const T* a = A + r * as + w0;
#pragma GCC unroll 4
    for (int t = 0; t < kOuts; ++t) {
      const T s = S[(o0 + t) * so + r * sr];
#pragma omp simd
      for (int e = 0; e < kChunk; ++e) acc[t][e] += a[e] * s;
    }
  }
  for (int t = 0; t < kOuts; ++t) {
    if (t < keep_o) continue;
    T* o = out + (o0 + t) * os + w0;
    if (keep_w == 0) {
#pragma omp simd
      for (int e = 0; e < kChunk; ++e) o[e] = accumulate ? o[e] + acc[t][e] : acc[t][e];
    } else {
      for (int64_t e = keep_w; e < kChunk; ++e) o[e] = accumulate ? o[e] + acc[t][e] : acc[t][e];
    }
  }
}

// out[o * os + w] (+)= sum_r A[r * as + w] * S[o * so + r * sr]
// (rows of a plane weighted by scalars). Blocks of kOuts outputs x kChunk
// lanes keep the sums in registers and load each A row once per block.
template <typename T>
FV_CPU_CLONES void fma_scalars_chunk(T* __restrict out, int64_t n_out, int64_t os, const T* __restrict A, int64_t as,
                               const T* __restrict S, int64_t so, int64_t sr, int64_t n_r, int64_t width,
                               bool accumulate) {
  int64_t o0 = 0;
  for (; o0 < n_out && n_out >= kOuts; o0 += kOuts) {
    int64_t keep_o = 0;
    if (o0 + kOuts > n_out) {  // output tail: the last kOuts outputs, the new ones stored
      keep_o = o0 + kOuts - n_out;
      o0 = n_out - kOuts;
    }
    int64_t w0 = 0;
    for (; w0 + kChunk <= width; w0 += kChunk)
      fma_scalars_block(out, os, A, as, S, so, sr, n_r, o0, w0, keep_o, 0, accumulate);
    if (w0 < width && width >= kChunk) {  // w tail: the last kChunk lanes, the new ones stored
      fma_scalars_block(out, os, A, as, S, so, sr, n_r, o0, width - kChunk, keep_o, w0 + kChunk - width,
                        accumulate);
    } else if (w0 < width) {  // a row narrower than a block
      const int64_t nw = width - w0;
      T acc[kOuts][kChunk] = {};
      for (int64_t r = 0; r < n_r; ++r) {
        const T* a = A + r * as + w0;
        for (int t = 0; t < kOuts; ++t) {
          const T s = S[(o0 + t) * so + r * sr];
          for (int64_t e = 0; e < nw; ++e) acc[t][e] += a[e] * s;
        }
      }
      for (int t = keep_o; t < kOuts; ++t) {
        T* o = out + (o0 + t) * os + w0;
        for (int64_t e = 0; e < nw; ++e) o[e] = accumulate ? o[e] + acc[t][e] : acc[t][e];
      }
    }
  }
  for (; o0 < n_out; ++o0) {  // fewer outputs than a block
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
// operand (kOuts planes x kRChunk rows x kChunk lanes: 8 KB of float) stay in
// L1 while every row of the block reuses them, and when r runs over channels
// (stride H * W) they stay within a few pages (TLB entries). Callers whose
// operands stay in cache anyway pass chunk = n_r: one pass, every output block
// stored once (chunk >= 1).
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
