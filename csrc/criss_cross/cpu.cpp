// CPU kernels of criss-cross attention (CCNet; mmcv's einsum CrissCrossAttention),
// NCHW: query, key (B, Cqk, H, W), value (B, C, H, W). Query (h, w) attends to
// its column, keys (i, w) for i != h, and its row, keys (h, j) for all j (the
// pixel itself once, in its row), in one softmax over the H + W logits
// E = q . k (no scaling).
//
// Everything works in NCHW directly, vectorised over w (contiguous): for a
// fixed query row h, the column logits Ec[i][w] = sum_c Q[c,h,w] K[c,i,w] and
// the row logits Er[j][w] = sum_c Q[c,h,w] K[c,h,j] are (H + W) x W planes
// in per-thread scratch, and every product the op needs is one of two forms
// (fma_planes, fma_scalars below) over such planes. No layout copies, no
// (B, H, W, H + W) tensor.
//
// Forward: tasks of (batch, query row h): logits, softmax (max / exp / sum per
// query), out[c, h, :] = sum_i P[i][:] V[c, i, :] + sum_j P[j][:] V[c, h, j].
// Stores out and the logsumexp lse (B, H, W).
//
// Backward (P = exp(E - lse) recomputed; Delta = sum_c dout * out;
// dS = P (dP - Delta)); deterministic, no atomics, every output element
// written by exactly one task of each pass:
//  1. query pass, tasks of (batch, query row h): dquery of row h (complete),
//     and the row part of dkey / dvalue of the keys in row h, whose row
//     queries are exactly the queries of row h (written, not added);
//     Delta of row h (stored for pass 2);
//  2. key pass, tasks of (batch, key row i), after pass 1: the column part
//     of dkey / dvalue of the keys (i, w): the queries (h, w), h != i,
//     gathered from the same planes with roles swapped (added).
//
// float and double kernels; half and bfloat16 are widened to float on entry
// (fp32 accumulation) and the outputs narrowed on exit.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../common/common.h"
#include "../common/dtype.h"
#include "../common/fast_math.h"
#include "../common/parallel.h"
#include "checks.h"

namespace fastvision::cc {
namespace {

constexpr int64_t kChunk = 16;  // w per register block (two AVX2 vectors of float)
constexpr int64_t kOuts = 4;    // outputs per register block (they share the A loads)

// For each of n_rows rows t (out and A shifted by t * out_rs and t * a_rs;
// B shared): out[o * os + w] (+)= sum_r A[r * as + w] * B[o * bo + r * br + w]
// for o < n_out, r < n_r, w < width: each output row a sum of elementwise
// products of rows of two planes. Blocks of kOuts outputs x kChunk w keep
// the sums in registers and load each A row once per block; the rows loop
// innermost but one, so the block of B (the large operand: value, key or
// dout planes) comes from cache for every row after the first.
template <typename T>
FV_CPU_CLONES void fma_planes_chunk(T* __restrict out, int64_t n_out, int64_t os, int64_t out_rs, const T* __restrict A,
                              int64_t as, int64_t a_rs, const T* __restrict B, int64_t bo, int64_t br, int64_t n_r,
                              int64_t width, int64_t n_rows, bool accumulate) {
  int64_t o0 = 0;
  for (; o0 + kOuts <= n_out; o0 += kOuts) {
    int64_t w0 = 0;
    for (; w0 + kChunk <= width; w0 += kChunk)
      for (int64_t row = 0; row < n_rows; ++row) {
        const T* Ar = A + row * a_rs;
        T acc[kOuts][kChunk] = {};
        for (int64_t r = 0; r < n_r; ++r) {
          const T* a = Ar + r * as + w0;
#pragma GCC unroll 4
          for (int t = 0; t < kOuts; ++t) {
            const T* b = B + (o0 + t) * bo + r * br + w0;
#pragma omp simd
            for (int e = 0; e < kChunk; ++e) acc[t][e] += a[e] * b[e];
          }
        }
        for (int t = 0; t < kOuts; ++t) {
          T* o = out + row * out_rs + (o0 + t) * os + w0;
#pragma omp simd
          for (int e = 0; e < kChunk; ++e) o[e] = accumulate ? o[e] + acc[t][e] : acc[t][e];
        }
      }
    for (int64_t row = 0; row < n_rows; ++row)  // w tail
      for (int64_t t = 0; t < kOuts; ++t) {
        T* o = out + row * out_rs + (o0 + t) * os;
        for (int64_t w = w0; w < width; ++w) {
          T s = 0;
          for (int64_t r = 0; r < n_r; ++r) s += A[row * a_rs + r * as + w] * B[(o0 + t) * bo + r * br + w];
          o[w] = accumulate ? o[w] + s : s;
        }
      }
  }
  for (; o0 < n_out; ++o0)  // output tail, one row at a time
    for (int64_t row = 0; row < n_rows; ++row) {
      T* o = out + row * out_rs + o0 * os;
      if (!accumulate)
        for (int64_t w = 0; w < width; ++w) o[w] = T(0);
      for (int64_t r = 0; r < n_r; ++r) {
        const T* a = A + row * a_rs + r * as;
        const T* b = B + o0 * bo + r * br;
#pragma omp simd
        for (int64_t w = 0; w < width; ++w) o[w] += a[w] * b[w];
      }
    }
}

// out[o * os + w] (+)= sum_r A[r * as + w] * S[o * so + r * sr]
// (rows of a plane weighted by scalars), blocked as fma_planes.
template <typename T>
FV_CPU_CLONES void fma_scalars_chunk(T* __restrict out, int64_t n_out, int64_t os, const T* __restrict A, int64_t as,
                               const T* __restrict S, int64_t so, int64_t sr, int64_t n_r, int64_t width,
                               bool accumulate) {
  int64_t o0 = 0;
  for (; o0 + kOuts <= n_out; o0 += kOuts) {
    int64_t w0 = 0;
    for (; w0 + kChunk <= width; w0 += kChunk) {
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
        T* o = out + (o0 + t) * os + w0;
#pragma omp simd
        for (int e = 0; e < kChunk; ++e) o[e] = accumulate ? o[e] + acc[t][e] : acc[t][e];
      }
    }
    for (int64_t t = 0; t < kOuts; ++t) {
      T* o = out + (o0 + t) * os;
      for (int64_t w = w0; w < width; ++w) {
        T s = 0;
        for (int64_t r = 0; r < n_r; ++r) s += A[r * as + w] * S[(o0 + t) * so + r * sr];
        o[w] = accumulate ? o[w] + s : s;
      }
    }
  }
  for (; o0 < n_out; ++o0) {
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

// The sums over r in chunks of kRChunk: when r runs over channels (stride
// H * W), a chunk's rows of every plane stay within a few pages (TLB entries)
// and cache lines while the chunk's outputs are computed.
constexpr int64_t kRChunk = 32;

template <typename T>
void fma_planes(T* out, int64_t n_out, int64_t os, int64_t out_rs, const T* A, int64_t as, int64_t a_rs,
                const T* B, int64_t bo, int64_t br, int64_t n_r, int64_t width, int64_t n_rows, bool accumulate) {
  int64_t r0 = 0;
  do {
    const int64_t n = std::min(kRChunk, n_r - r0);
    fma_planes_chunk(out, n_out, os, out_rs, A + r0 * as, as, a_rs, B + r0 * br, bo, br, n, width, n_rows,
                     accumulate || r0 > 0);
    r0 += kRChunk;
  } while (r0 < n_r);
}

template <typename T>
void fma_scalars(T* out, int64_t n_out, int64_t os, const T* A, int64_t as, const T* S, int64_t so, int64_t sr,
                 int64_t n_r, int64_t width, bool accumulate) {
  int64_t r0 = 0;
  do {
    const int64_t n = std::min(kRChunk, n_r - r0);
    fma_scalars_chunk(out, n_out, os, A + r0 * as, as, S + r0 * sr, so, sr, n, width, accumulate || r0 > 0);
    r0 += kRChunk;
  } while (r0 < n_r);
}

// dst[w][j] = src[j][w] (n x n).
template <typename T>
void transpose(const T* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t w = 0; w < n; ++w) dst[w * n + j] = src[j * n + w];
}

struct Dims {
  int64_t B, Cqk, C, H, W, HW;
};

// Per-thread planes of a block of R query (or key) rows: column part
// [R][H][W], row part [R][W][W].
template <typename T>
struct Scratch {
  std::vector<T> ec, er, dpc, dpr, t1, t2, m, s;
  Scratch(const char* op, const Dims& d, int64_t R, bool backward)
      : ec(host_vector<T>(op, "column logits", R * d.H * d.W)),
        er(host_vector<T>(op, "row logits", R * d.W * d.W)),
        dpc(host_vector<T>(op, "column dP", backward ? R * d.H * d.W : 0)),
        dpr(host_vector<T>(op, "row dP", backward ? R * d.W * d.W : 0)),
        t1(host_vector<T>(op, "transposed row weights", backward ? d.W * d.W : 0)),
        t2(host_vector<T>(op, "transposed row dS", backward ? d.W * d.W : 0)),
        m(host_vector<T>(op, "row statistics", d.W)),
        s(host_vector<T>(op, "row statistics", d.W)) {}
};

// The logits of query rows [h0, h0 + R): per row t, ec[t][i][w] =
// Q[:,h,w] . K[:,i,w] (-inf at i == h), er[t][j][w] = Q[:,h,w] . K[:,h,j].
template <typename T>
void row_logits(const Dims& d, const T* Q, const T* K, int64_t h0, int64_t R, T* ec, T* er) {
  const int64_t H = d.H, W = d.W, HW = d.HW;
  fma_planes(ec, H, W, H * W, Q + h0 * W, HW, W, K, W, HW, d.Cqk, W, R, false);
  for (int64_t t = 0; t < R; ++t) {
    const int64_t h = h0 + t;
    fma_scalars(er + t * W * W, W, W, Q + h * W, HW, K + h * W, 1, HW, d.Cqk, W, false);
    for (int64_t w = 0; w < W; ++w) ec[(t * H + h) * W + w] = -std::numeric_limits<T>::infinity();
  }
}

// The rows of the column plane [n][W] then of the row plane [W][W] of one query row.
template <typename T, typename F>
void for_rows(T* ec, int64_t n, T* er, int64_t W, F&& f) {
  for (int64_t r = 0; r < n; ++r) f(ec + r * W);
  for (int64_t r = 0; r < W; ++r) f(er + r * W);
}

// Rows per task: a block of query (key) rows shares the reads of the large
// planes (value, dout) from cache; enough tasks remain to keep threads busy.
int64_t rows_per_task(const Dims& d) {
  const int64_t threads = std::max<int64_t>(torch::stable::get_num_threads(), 1);
  return std::clamp<int64_t>(d.B * d.H / (4 * threads), 1, 8);
}

// ---------------------------------------------------------------------------
// Forward.

template <typename T>
FV_CPU_CLONES void forward_rows(const Dims& d, const T* Q, const T* K, const T* V, T* out, T* lse, int64_t h0,
                                int64_t R, Scratch<T>& w_) {
  const int64_t H = d.H, W = d.W, HW = d.HW;
  T *m = w_.m.data(), *s = w_.s.data();
  row_logits(d, Q, K, h0, R, w_.ec.data(), w_.er.data());
  for (int64_t t = 0; t < R; ++t) {
    T *ec = w_.ec.data() + t * H * W, *er = w_.er.data() + t * W * W;
    // Softmax over the H + W logits of every query, vectorised over w.
    for (int64_t w = 0; w < W; ++w) {
      m[w] = -std::numeric_limits<T>::infinity();
      s[w] = 0;
    }
    for_rows(ec, H, er, W, [&](const T* e) {
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) m[w] = e[w] > m[w] ? e[w] : m[w];
    });
    for_rows(ec, H, er, W, [&](T* e) {
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) {
        e[w] = exp_fast(e[w] - m[w]);
        s[w] += e[w];
      }
    });
    for (int64_t w = 0; w < W; ++w) {
      lse[(h0 + t) * W + w] = m[w] + std::log(s[w]);
      s[w] = T(1) / s[w];
    }
    for_rows(ec, H, er, W, [&](T* e) {
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) e[w] *= s[w];
    });
  }
  // out[c,h,w] = sum_i P[i][w] V[c,i,w] + sum_j P[j][w] V[c,h,j]
  fma_planes(out + h0 * W, d.C, HW, W, w_.ec.data(), W, H * W, V, HW, W, H, W, R, false);
  for (int64_t t = 0; t < R; ++t)
    fma_scalars(out + (h0 + t) * W, d.C, HW, w_.er.data() + t * W * W, W, V + (h0 + t) * W, HW, 1, W, W, true);
}

// Runs body(scratch, b, first row, rows) over the row blocks of every batch element.
template <typename T, typename Body>
void over_row_blocks(const char* op, const Dims& d, bool backward, Body&& body) {
  const int64_t R = rows_per_task(d), blocks = ceil_div(d.H, R);
  parallel_for(op, 0, d.B * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> w(op, d, R, backward);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, h0 = (task % blocks) * R;
      body(w, b, h0, std::min(R, d.H - h0));
    }
  });
}

template <typename T>
std::tuple<Tensor, Tensor> forward_impl(const char* op, const Dims& d, const Tensor& q, const Tensor& k,
                                        const Tensor& v) {
  const ScalarType t = acc_scalar_type<T>();
  Tensor out = alloc_empty(op, "out", v, {d.B, d.C, d.H, d.W}, t);
  Tensor lse = alloc_empty(op, "lse", q, {d.B, d.H, d.W}, t);
  const T *Q = q.const_data_ptr<T>(), *K = k.const_data_ptr<T>(), *V = v.const_data_ptr<T>();
  T *O = out.mutable_data_ptr<T>(), *L = lse.mutable_data_ptr<T>();
  over_row_blocks<T>(op, d, false, [&](Scratch<T>& w, int64_t b, int64_t h0, int64_t R) {
    forward_rows(d, Q + b * d.Cqk * d.HW, K + b * d.Cqk * d.HW, V + b * d.C * d.HW, O + b * d.C * d.HW,
                 L + b * d.HW, h0, R, w);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Backward.

template <typename T>
struct BwdPtrs {
  const T *q, *k, *v, *out, *dout, *lse;
  T *delta, *dq, *dk, *dv;
};

// Query pass over query rows [h0, h0 + R) of one batch element (pointers at that element).
template <typename T>
FV_CPU_CLONES void backward_query_rows(const Dims& d, const BwdPtrs<T>& a, int64_t h0, int64_t R,
                                       Scratch<T>& w_) {
  const int64_t H = d.H, W = d.W, HW = d.HW;
  row_logits(d, a.q, a.k, h0, R, w_.ec.data(), w_.er.data());
  // dP: the same products with dout for query and value for key.
  fma_planes(w_.dpc.data(), H, W, H * W, a.dout + h0 * W, HW, W, a.v, W, HW, d.C, W, R, false);
  for (int64_t t = 0; t < R; ++t) {
    const int64_t h = h0 + t;
    T *pc = w_.ec.data() + t * H * W, *pr = w_.er.data() + t * W * W;
    T *dsc = w_.dpc.data() + t * H * W, *dsr = w_.dpr.data() + t * W * W;
    T *prt = w_.t1.data(), *dsrt = w_.t2.data(), *delta = a.delta + h * W;
    const T* lse = a.lse + h * W;
    fma_scalars(dsr, W, W, a.dout + h * W, HW, a.v + h * W, 1, HW, d.C, W, false);
    for (int64_t w = 0; w < W; ++w) delta[w] = 0;
    for (int64_t c = 0; c < d.C; ++c) {
      const T *o = a.out + c * HW + h * W, *g = a.dout + c * HW + h * W;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) delta[w] += o[w] * g[w];
    }
    // P = exp(E - lse) (0 at i == h, from the -inf), dS = P (dP - Delta), in place.
    for (const auto& [p, ds, rows] : {std::make_tuple(pc, dsc, H), std::make_tuple(pr, dsr, W)})
      for (int64_t r = 0; r < rows; ++r) {
        T *e = p + r * W, *g = ds + r * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) {
          e[w] = exp_fast(e[w] - lse[w]);
          g[w] = e[w] * (g[w] - delta[w]);
        }
      }
    // Keys (h, j) seen by row h's queries: dkey[c,h,j] = sum_w dS[j][w] Q[c,h,w],
    // dvalue[c,h,j] = sum_w P[j][w] dout[c,h,w] (the planes transposed to [w][j]).
    transpose(pr, prt, W);
    transpose(dsr, dsrt, W);
    fma_scalars(a.dk + h * W, d.Cqk, HW, dsrt, W, a.q + h * W, HW, 1, W, W, false);
    fma_scalars(a.dv + h * W, d.C, HW, prt, W, a.dout + h * W, HW, 1, W, W, false);
  }
  // dquery[c,h,w] = sum_i dS[i][w] K[c,i,w] + sum_j dS[j][w] K[c,h,j]
  fma_planes(a.dq + h0 * W, d.Cqk, HW, W, w_.dpc.data(), W, H * W, a.k, HW, W, H, W, R, false);
  for (int64_t t = 0; t < R; ++t)
    fma_scalars(a.dq + (h0 + t) * W, d.Cqk, HW, w_.dpr.data() + t * W * W, W, a.k + (h0 + t) * W, HW, 1, W, W,
                true);
}

// Key pass over key rows [i0, i0 + R): the column queries (h, w), h != i, of the keys (i, w).
template <typename T>
FV_CPU_CLONES void backward_key_rows(const Dims& d, const BwdPtrs<T>& a, int64_t i0, int64_t R, Scratch<T>& w_) {
  const int64_t H = d.H, W = d.W, HW = d.HW;
  T *p = w_.ec.data(), *ds = w_.dpc.data();
  // p[t][h][w] = K[:,i,w] . Q[:,h,w], ds[t][h][w] = V[:,i,w] . dout[:,h,w]
  fma_planes(p, H, W, H * W, a.k + i0 * W, HW, W, a.q, W, HW, d.Cqk, W, R, false);
  fma_planes(ds, H, W, H * W, a.v + i0 * W, HW, W, a.dout, W, HW, d.C, W, R, false);
  for (int64_t t = 0; t < R; ++t)
    for (int64_t h = 0; h < H; ++h) {
      T *e = p + (t * H + h) * W, *g = ds + (t * H + h) * W;
      const T *l = a.lse + h * W, *dl = a.delta + h * W;
      if (h == i0 + t) {  // the pixel itself: counted in its row only
        for (int64_t w = 0; w < W; ++w) e[w] = g[w] = 0;
        continue;
      }
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) {
        e[w] = exp_fast(e[w] - l[w]);
        g[w] = e[w] * (g[w] - dl[w]);
      }
    }
  // dkey[c,i,w] += sum_h dS[h][w] Q[c,h,w]; dvalue[c,i,w] += sum_h P[h][w] dout[c,h,w]
  fma_planes(a.dk + i0 * W, d.Cqk, HW, W, ds, W, H * W, a.q, HW, W, H, W, R, true);
  fma_planes(a.dv + i0 * W, d.C, HW, W, p, W, H * W, a.dout, HW, W, H, W, R, true);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward_impl(const char* op, const Dims& d, const Tensor& dout,
                                                 const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& out, const Tensor& lse) {
  const ScalarType t = acc_scalar_type<T>();
  Tensor dq = alloc_empty(op, "dquery", q, sizes_of(q), t);
  Tensor dk = alloc_empty(op, "dkey", k, sizes_of(k), t);
  Tensor dv = alloc_empty(op, "dvalue", v, sizes_of(v), t);
  std::vector<T> delta = host_vector<T>(op, "Delta (batch, H, W)", d.B * d.HW);
  const T *Q = q.const_data_ptr<T>(), *K = k.const_data_ptr<T>(), *V = v.const_data_ptr<T>();
  const T *O = out.const_data_ptr<T>(), *G = dout.const_data_ptr<T>(), *L = lse.const_data_ptr<T>();
  T *DQ = dq.mutable_data_ptr<T>(), *DK = dk.mutable_data_ptr<T>(), *DV = dv.mutable_data_ptr<T>();
  auto at_batch = [&](int64_t b) {
    const int64_t qk = b * d.Cqk * d.HW, cv = b * d.C * d.HW;
    return BwdPtrs<T>{Q + qk, K + qk, V + cv, O + cv, G + cv, L + b * d.HW, delta.data() + b * d.HW,
                      DQ + qk, DK + qk, DV + cv};
  };
  over_row_blocks<T>(op, d, true, [&](Scratch<T>& w, int64_t b, int64_t h0, int64_t R) {
    backward_query_rows(d, at_batch(b), h0, R, w);
  });
  over_row_blocks<T>(op, d, true, [&](Scratch<T>& w, int64_t b, int64_t i0, int64_t R) {
    backward_key_rows(d, at_batch(b), i0, R, w);
  });
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp).

Dims dims_of(const CcSizes& n) { return {n.B, n.Cqk, n.C, n.H, n.W, n.H * n.W}; }

Tensor widen(const char* op, const char* what, const Tensor& t, ScalarType acc) {
  return alloc_cast(op, std::string(what) + " in " + dtype_name(acc), t, acc);
}

std::tuple<Tensor, Tensor> criss_cross_fwd_cpu(Tensor query, Tensor key, Tensor value) {
  constexpr const char* op = "criss_cross_fwd";
  const CcSizes n = check_cc_inputs(op, query, key, value);
  const Dims d = dims_of(n);
  const Tensor q = widen(op, "query", query, n.acc), k = widen(op, "key", key, n.acc),
               v = widen(op, "value", value, n.acc);
  auto [out, lse] = n.acc == ScalarType::Double ? forward_impl<double>(op, d, q, k, v)
                                                : forward_impl<float>(op, d, q, k, v);
  return {alloc_cast(op, "out", out, n.dtype), lse};
}

std::tuple<Tensor, Tensor, Tensor> criss_cross_bwd_cpu(Tensor dout, Tensor query, Tensor key, Tensor value,
                                                       Tensor out, Tensor lse) {
  constexpr const char* op = "criss_cross_bwd";
  const CcSizes n = check_cc_inputs(op, query, key, value);
  check_cc_backward(op, n, dout, out, lse, query);
  const Dims d = dims_of(n);
  const Tensor q = widen(op, "query", query, n.acc), k = widen(op, "key", key, n.acc),
               v = widen(op, "value", value, n.acc);
  const Tensor o = widen(op, "out", out, n.acc), g = widen(op, "dout", dout, n.acc);
  auto [dq, dk, dv] = n.acc == ScalarType::Double ? backward_impl<double>(op, d, g, q, k, v, o, lse)
                                                  : backward_impl<float>(op, d, g, q, k, v, o, lse);
  return {alloc_cast(op, "dquery", dq, n.dtype), alloc_cast(op, "dkey", dk, n.dtype),
          alloc_cast(op, "dvalue", dv, n.dtype)};
}

}  // namespace
}  // namespace fastvision::cc

STABLE_TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("criss_cross_fwd", TORCH_BOX(&fastvision::cc::criss_cross_fwd_cpu));
  m.impl("criss_cross_bwd", TORCH_BOX(&fastvision::cc::criss_cross_bwd_cpu));
}
