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
// (fma_planes below, fma_scalars of common/gemm.h) over such planes. No layout copies, no
// (B, H, W, H + W) tensor.
//
// Forward: tasks of (batch, block of up to 16 query rows; a block shares the
// reads of the value planes from cache): logits, softmax (max / exp / sum per
// query), out[c, h, :] = sum_i P[i][:] V[c, i, :] + sum_j P[j][:] V[c, h, j].
// Stores out and the logsumexp lse (B, H, W).
//
// Backward (P = exp(E - lse) recomputed; Delta = sum_c dout * out;
// dS = P (dP - Delta)); every (query, key) pair's logit and dP computed once;
// deterministic, no atomics, every output element written by one task of
// each pass:
//  1. row pass, tasks of (batch, query rows): the row pairs of row h, whose
//     queries and keys are all in row h: dquery (written), dkey / dvalue of
//     the keys (h, j) (written), and Delta of row h (stored for pass 2);
//  2. column pass, tasks of (batch, 16 columns), after pass 1: the column
//     pairs (h, w) - (i, w), i != h, of these columns, query rows in steps
//     of 64: adds to dquery of the queries and dkey / dvalue of the keys of
//     these columns, which no other task touches.
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
#include "../common/gemm.h"
#include "../common/parallel.h"
#include "checks.h"

namespace fastvision::cc {
namespace {


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
    if (w0 < width) {  // w tail: the same blocks, fewer lanes (independent sums per output)
      const int64_t nw = width - w0;
      for (int64_t row = 0; row < n_rows; ++row) {
        const T* Ar = A + row * a_rs;
        T acc[kOuts][kChunk] = {};
        for (int64_t r = 0; r < n_r; ++r) {
          const T* a = Ar + r * as + w0;
          for (int t = 0; t < kOuts; ++t) {
            const T* b = B + (o0 + t) * bo + r * br + w0;
            for (int64_t e = 0; e < nw; ++e) acc[t][e] += a[e] * b[e];
          }
        }
        for (int t = 0; t < kOuts; ++t) {
          T* o = out + row * out_rs + (o0 + t) * os + w0;
          for (int64_t e = 0; e < nw; ++e) o[e] = accumulate ? o[e] + acc[t][e] : acc[t][e];
        }
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

template <typename T>
void fma_planes(T* out, int64_t n_out, int64_t os, int64_t out_rs, const T* A, int64_t as, int64_t a_rs,
                const T* B, int64_t bo, int64_t br, int64_t n_r, int64_t width, int64_t n_rows, bool accumulate) {
  const int64_t chunk = kRChunk;
  int64_t r0 = 0;
  do {
    const int64_t n = std::min(chunk, n_r - r0);
    fma_planes_chunk(out, n_out, os, out_rs, A + r0 * as, as, a_rs, B + r0 * br, bo, br, n, width, n_rows,
                     accumulate || r0 > 0);
    r0 += chunk;
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

// Per-thread planes (each kernel sizes the ones it uses): column planes
// [rows][H][width], row planes [rows][W][W], per-position statistics.
template <typename T>
struct Scratch {
  std::vector<T> ec, er, dpc, dpr, t1, t2, m, s;
  // Forward over blocks of R query rows.
  static Scratch forward(const char* op, const Dims& d, int64_t R) {
    return {host_vector<T>(op, "column logits", R * d.H * d.W), host_vector<T>(op, "row logits", R * d.W * d.W),
            {}, {}, {}, {}, host_vector<T>(op, "row statistics", d.W), host_vector<T>(op, "row statistics", d.W)};
  }
  // Backward row pass, one query row at a time.
  static Scratch rows(const char* op, const Dims& d) {
    return {{}, host_vector<T>(op, "row weights", d.W * d.W), {}, host_vector<T>(op, "row dS", d.W * d.W),
            host_vector<T>(op, "transposed row weights", d.W * d.W),
            host_vector<T>(op, "transposed row dS", d.W * d.W), {}, {}};
  }
  // Backward column pass, R query rows x H key rows x `width` columns.
  static Scratch columns(const char* op, const Dims& d, int64_t R, int64_t width) {
    return {host_vector<T>(op, "column weights", R * d.H * width), {},
            host_vector<T>(op, "column dS", R * d.H * width), {}, {}, {}, {}, {}};
  }
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
  return std::clamp<int64_t>(d.B * d.H / (4 * threads), 1, 16);
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

// Runs body(scratch, b, first row, rows) over the blocks of R rows of every
// batch element, scratch = make() once per worker.
template <typename T, typename Make, typename Body>
void over_row_blocks(const char* op, const Dims& d, int64_t R, Make&& make, Body&& body) {
  const int64_t blocks = ceil_div(d.H, R);
  parallel_for(op, 0, d.B * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> w = make();
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
  const int64_t rows = rows_per_task(d);
  over_row_blocks<T>(op, d, rows, [&] { return Scratch<T>::forward(op, d, rows); },
                     [&](Scratch<T>& w, int64_t b, int64_t h0, int64_t R) {
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

// Row pass over query rows [h0, h0 + R) of one batch element (pointers at
// that element): the row pairs (query (h, w), key (h, j)) of these rows, all
// of them: P, dS, dquery (written), and dkey / dvalue of the keys (h, j)
// (written: their row queries are exactly these). Delta of the rows (stored
// for the column pass).
template <typename T>
FV_CPU_CLONES void backward_row_pass(const Dims& d, const BwdPtrs<T>& a, int64_t h0, int64_t R, Scratch<T>& w_) {
  const int64_t W = d.W, HW = d.HW;
  for (int64_t t = 0; t < R; ++t) {
    const int64_t h = h0 + t;
    T *pr = w_.er.data(), *dsr = w_.dpr.data(), *prt = w_.t1.data(), *dsrt = w_.t2.data();
    T* delta = a.delta + h * W;
    const T* lse = a.lse + h * W;
    // er[j][w] = Q[:,h,w] . K[:,h,j], dP[j][w] = dout[:,h,w] . V[:,h,j]
    fma_scalars(pr, W, W, a.q + h * W, HW, a.k + h * W, 1, HW, d.Cqk, W, false);
    fma_scalars(dsr, W, W, a.dout + h * W, HW, a.v + h * W, 1, HW, d.C, W, false);
    for (int64_t w = 0; w < W; ++w) delta[w] = 0;
    for (int64_t c = 0; c < d.C; ++c) {
      const T *o = a.out + c * HW + h * W, *g = a.dout + c * HW + h * W;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) delta[w] += o[w] * g[w];
    }
    // P = exp(E - lse), dS = P (dP - Delta), in place.
    for (int64_t j = 0; j < W; ++j) {
      T *e = pr + j * W, *g = dsr + j * W;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) {
        e[w] = exp_fast(e[w] - lse[w]);
        g[w] = e[w] * (g[w] - delta[w]);
      }
    }
    // dquery[c,h,w] = sum_j dS[j][w] K[c,h,j]; dkey[c,h,j] = sum_w dS[j][w] Q[c,h,w],
    // dvalue[c,h,j] = sum_w P[j][w] dout[c,h,w] (the planes transposed to [w][j]).
    fma_scalars(a.dq + h * W, d.Cqk, HW, dsr, W, a.k + h * W, HW, 1, W, W, false);
    transpose(pr, prt, W);
    transpose(dsr, dsrt, W);
    fma_scalars(a.dk + h * W, d.Cqk, HW, dsrt, W, a.q + h * W, HW, 1, W, W, false);
    fma_scalars(a.dv + h * W, d.C, HW, prt, W, a.dout + h * W, HW, 1, W, W, false);
  }
}

// Column pass over the columns [w0, w0 + Wb) of one batch element, after the
// row pass: the column pairs (query (h, w), key (i, w), i != h), every pair
// once, query rows in blocks of R. Adds the column parts of dquery (rows of
// the block) and of dkey / dvalue (every key row of these columns: only this
// task touches them).
template <typename T>
FV_CPU_CLONES void backward_column_pass(const Dims& d, const BwdPtrs<T>& a, int64_t w0, int64_t Wb, int64_t R,
                                        Scratch<T>& w_) {
  const int64_t H = d.H, W = d.W, HW = d.HW;
  T *p = w_.ec.data(), *ds = w_.dpc.data();  // [t][i][w - w0]
  for (int64_t h0 = 0; h0 < H; h0 += R) {
    const int64_t n = std::min(R, H - h0);
    // p[t][i][w] = Q[:,h,w] . K[:,i,w], ds[t][i][w] = dout[:,h,w] . V[:,i,w]
    fma_planes(p, H, Wb, H * Wb, a.q + h0 * W + w0, HW, W, a.k + w0, W, HW, d.Cqk, Wb, n, false);
    fma_planes(ds, H, Wb, H * Wb, a.dout + h0 * W + w0, HW, W, a.v + w0, W, HW, d.C, Wb, n, false);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t h = h0 + t;
      const T *l = a.lse + h * W + w0, *dl = a.delta + h * W + w0;
      for (int64_t i = 0; i < H; ++i) {
        T *e = p + (t * H + i) * Wb, *g = ds + (t * H + i) * Wb;
        if (i == h) {  // the pixel itself: counted in its row only
          for (int64_t w = 0; w < Wb; ++w) e[w] = g[w] = 0;
          continue;
        }
#pragma omp simd
        for (int64_t w = 0; w < Wb; ++w) {
          e[w] = exp_fast(e[w] - l[w]);
          g[w] = e[w] * (g[w] - dl[w]);
        }
      }
    }
    // dquery[c,h,w] += sum_i dS[t][i][w] K[c,i,w]
    fma_planes(a.dq + h0 * W + w0, d.Cqk, HW, W, ds, Wb, H * Wb, a.k + w0, HW, W, H, Wb, n, true);
    // dkey[c,i,w] += sum_t dS[t][i][w] Q[c,h0+t,w]; dvalue[c,i,w] += sum_t P[t][i][w] dout[c,h0+t,w]
    fma_planes(a.dk + w0, d.Cqk, HW, W, ds, H * Wb, Wb, a.q + h0 * W + w0, HW, W, n, Wb, H, true);
    fma_planes(a.dv + w0, d.C, HW, W, p, H * Wb, Wb, a.dout + h0 * W + w0, HW, W, n, Wb, H, true);
  }
}

constexpr int64_t kColumns = 16;  // columns per task of the column pass
constexpr int64_t kColumnRows = 64;  // query rows per step of the column pass

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
  over_row_blocks<T>(op, d, rows_per_task(d), [&] { return Scratch<T>::rows(op, d); },
                     [&](Scratch<T>& w, int64_t b, int64_t h0, int64_t R) {
    backward_row_pass(d, at_batch(b), h0, R, w);
  });
  const int64_t blocks = ceil_div(d.W, kColumns);
  parallel_for(op, 0, d.B * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> w = Scratch<T>::columns(op, d, kColumnRows, kColumns);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, w0 = (task % blocks) * kColumns;
      backward_column_pass(d, at_batch(b), w0, std::min(kColumns, d.W - w0), kColumnRows, w);
    }
  });
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp).

Dims dims_of(const CcSizes& n) { return {n.B, n.Cqk, n.C, n.H, n.W, n.H * n.W}; }

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
