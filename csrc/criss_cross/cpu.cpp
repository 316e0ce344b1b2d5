// CPU kernels of criss-cross attention (CCNet; mmcv's einsum CrissCrossAttention),
// NCHW: query, key (B, Cqk, H, W), value (B, C, H, W). Query (h, w) attends to
// its column, keys (i, w) for i != h, and its row, keys (h, j) for all j (the
// pixel itself once, in its row), in one softmax over the H + W logits
// E = q . k (no scaling).
//
// Every product is a small matrix product run by fma_scalars (common/gemm.h:
// register blocks of 6 outputs x 16 lanes (8 in float64), 12 FMAs per two
// vector loads and six broadcasts; a row's last lanes by a one-vector block or, where the
// scalar operand is contiguous, by dot products), whose vector operand and
// output need a contiguous axis:
//  - row parts, tasks of (batch, block of query rows): for a fixed row h the
//    operands are NCHW planes with w (or j) contiguous, used in place (the
//    backward copies dout's row h, [c][w], once per row: as dP's vector
//    operand, strided by H * W, its 16-lane rows would take a page each);
//  - column parts, per group of columns of a batch element (at most 2^21
//    column-weight elements): query and key are packed to columns
//    [w][c][h] (scratch of one group), and value / dout in steps of
//    kChannels = 36 channels (a multiple of the register block's 6
//    outputs), so that for a fixed column w every product is a GEMM over
//    contiguous [c][h] and [h][i] planes (all columns of a step in
//    parallel); results go to [w][c][h] scratch and are added to the NCHW
//    output per step (the forward's row rescaling read in out's [h][w]
//    layout). Packs, adds and the backward's plane transposes move 8 x 8
//    register tiles: O(C H W) moves against O(C H W H) products.
// No (B, H, W, H + W) tensor; the column weights of one group of columns
// ([w][H][H], at most 2^21 elements) are scratch.
//
// Forward, two passes, the softmax split as in flash attention:
//  1. rows: row logits Er[j][w], their max m_r and sum s_r = sum_j exp(Er - m_r)
//     per query (stored), out[c, h, w] = sum_j exp(Er - m_r) V[c, h, j]
//     (unnormalised, written);
//  2. columns: column logits Ec[h][i], lse from both parts' statistics, the
//     weights P = exp(Ec - lse) of every column, then per channel step
//     out = out * exp(m_r - lse) + sum_i P[h][i] V[c, i, w]. Stores out and
//     the logsumexp lse (B, H, W).
//
// Backward (P = exp(E - lse) recomputed; Delta = sum_c dout * out;
// dS = P (dP - Delta)); every (query, key) pair's logit and dP computed once;
// deterministic, no atomics, every output element written by one task of
// each loop, the tasks and the order of every sum independent of the
// thread count:
//  1. row pass, tasks of (batch, query rows): the row pairs of row h, whose
//     queries and keys are all in row h: dquery (written), dkey / dvalue of
//     the keys (h, j) (written), and Delta of row h (stored for pass 2);
//  2. column pass, per batch element, after pass 1: the column pairs
//     (h, w) - (i, w), i != h: P of every column; per channel step and
//     column, dP += dout^T V (summed over the steps in order) and the step's
//     dvalue = P^T dout (added); then per column dS, dquery and dkey (added).
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
#include <memory>
#include <tuple>
#include <vector>
#include <cstring>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../common/common.h"
#include "../common/dtype.h"
#include "../common/fast_math.h"
#include "../common/gemm.h"
#include "../common/parallel.h"
#include "../common/transpose.h"
#include "checks.h"

namespace fastvision::cc {
namespace {

struct Dims {
  int64_t B, Cqk, C, H, W, HW;
};

constexpr int64_t kChannels = 36;  // value / dout channels per step of the column passes

// Columns per group of the column passes: the group's weights ([w][H][H])
// stay within kGroupWeights elements (one column at least).
constexpr int64_t kGroupWeights = int64_t(1) << 21;
int64_t columns_per_group(int64_t H, int64_t W) {
  return std::clamp<int64_t>(kGroupWeights / std::max<int64_t>(H * H, 1), 1, std::max<int64_t>(W, 1));
}

// Channels [0, n_c) in parallel, fn(c); n_c is small, one channel a task.
template <typename F>
void over_channels(const char* op, int64_t n_c, F&& fn) {
  parallel_for(op, 0, n_c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c);
  });
}

// dst[w][c][h] = X[c][h][w] for the n_c planes X and their columns w < n_w
// (X at the group's first column), a plane at a time.
template <typename T>
void pack_columns(const char* op, const Dims& d, const T* X, int64_t n_c, int64_t n_w, T* dst) {
  over_channels(op, n_c, [&](int64_t c) { transpose(X + c * d.HW, d.H, n_w, d.W, dst + c * d.H, n_c * d.H); });
}

// X[c][h][w] = X[c][h][w] * scale[h][w] (scale null: 1; rows W apart, like
// X's) + src[w][c][h]:
// pack_columns' inverse, adding.
template <typename T>
FV_CPU_CLONES void add_plane(const Dims& d, T* x, int64_t n_c, int64_t n_w, const T* src, const T* scale) {
  const int64_t H = d.H, W = d.W, ss = n_c * H;  // src(w, h) = src[w * ss + h]
  auto one = [&](int64_t h, int64_t w) {
    x[h * W + w] = (scale ? x[h * W + w] * scale[h * W + w] : x[h * W + w]) + src[w * ss + h];
  };
  int64_t h0 = 0;
  for (; h0 + 8 <= H; h0 += 8) {
    int64_t w0 = 0;
    for (; w0 + 8 <= n_w; w0 += 8) {
      Tile8<T> a, f, o;
      a.load(src + w0 * ss + h0, ss);
      a.transpose();
      o.load(x + h0 * W + w0, W);
      if (scale) {
        f.load(scale + h0 * W + w0, W);
        for (int k = 0; k < 8; ++k) o.r[k] = o.r[k] * f.r[k] + a.r[k];
      } else {
        for (int k = 0; k < 8; ++k) o.r[k] += a.r[k];
      }
      o.store(x + h0 * W + w0, W);
    }
    for (; w0 < n_w; ++w0)
      for (int64_t h = h0; h < h0 + 8; ++h) one(h, w0);
  }
  for (; h0 < H; ++h0)
    for (int64_t w = 0; w < n_w; ++w) one(h0, w);
}

template <typename T>
void add_columns(const char* op, const Dims& d, T* X, int64_t n_c, int64_t n_w, const T* src, const T* scale) {
  over_channels(op, n_c, [&](int64_t c) { add_plane(d, X + c * d.HW, n_c, n_w, src + c * d.H, scale); });
}

// Columns [0, n_w) of a group in parallel, fn(scratch, w), scratch = make()
// once per worker.
template <typename Make, typename F>
void over_columns(const char* op, int64_t n_w, Make&& make, F&& fn) {
  parallel_for(op, 0, n_w, 1, [&](int64_t begin, int64_t end) {
    auto scratch = make();
    for (int64_t w = begin; w < end; ++w) fn(scratch, w);
  });
}

// The column logits of one column, from its packed [c][h] query and key
// planes: e[h][i] = Q[:, h] . K[:, i], -inf at i == h (the pixel itself is
// counted in its row only).
template <typename T>
FV_CPU_CLONES void column_logits(const Dims& d, const T* q, const T* k, T* e) {
  const int64_t H = d.H;
  fma_scalars(e, H, H, k, H, q, 1, H, d.Cqk, H, false);
  for (int64_t h = 0; h < H; ++h) e[h * H + h] = -std::numeric_limits<T>::infinity();
}

// The column passes of a group of n_w columns of one batch element: the
// packed query / key columns ([w][c][h]), the column weights ([w][H][H]) and,
// per step of kChannels value (dout) channels, their packed columns.
template <typename T>
struct Columns {
  std::unique_ptr<T[]> q, k, p, v, g;  // (uninitialised: every use writes before it reads)
  Columns(const char* op, const Dims& d, int64_t n_w)
      : q(host_array<T>(op, "packed query columns", n_w * d.Cqk * d.H)),
        k(host_array<T>(op, "packed key columns", n_w * d.Cqk * d.H)),
        p(host_array<T>(op, "column weights", n_w * d.H * d.H)),
        v(host_array<T>(op, "packed value columns", n_w * std::min(d.C, kChannels) * d.H)),
        g(host_array<T>(op, "packed dout / out columns", n_w * std::min(d.C, kChannels) * d.H)) {}
};

// Runs step(c0, n) over the value channels in steps of kChannels, the
// channels [c0, c0 + n) of value (dout) of the group's n_w columns (V, G at
// the group's first column) packed into cols.v (cols.g) first.
template <typename T, typename Step>
void over_channel_steps(const char* op, const Dims& d, const T* V, const T* G, int64_t n_w, Columns<T>& cols,
                        Step&& step) {
  for (int64_t c0 = 0; c0 < d.C; c0 += kChannels) {
    const int64_t n = std::min(kChannels, d.C - c0);
    pack_columns(op, d, V + c0 * d.HW, n, n_w, cols.v.get());
    if (G) pack_columns(op, d, G + c0 * d.HW, n, n_w, cols.g.get());
    step(c0, n);
  }
}

// Rows per task: enough tasks remain to keep threads busy.
int64_t rows_per_task(const Dims& d) {
  const int64_t threads = std::max<int64_t>(torch::stable::get_num_threads(), 1);
  return std::clamp<int64_t>(d.B * d.H / (4 * threads), 1, 16);
}

// Runs body(scratch, b, first, count) over the blocks of R rows of every
// batch element, scratch = make() once per worker.
template <typename Make, typename Body>
void over_row_blocks(const char* op, const Dims& d, int64_t R, Make&& make, Body&& body) {
  const int64_t blocks = ceil_div(d.H, R);
  parallel_for(op, 0, d.B * blocks, 1, [&](int64_t begin, int64_t end) {
    auto scratch = make();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, h0 = (task % blocks) * R;
      body(scratch, b, h0, std::min(R, d.H - h0));
    }
  });
}

// ---------------------------------------------------------------------------
// Forward.

// The softmax numerators of a plane e[r][l] (n_rows rows, n lanes: one query
// a lane), vectorised over the lanes: m[l] = max(m[l], max_r e[r][l]), then
// e = exp(e - m) and s[l] += sum_r e[r][l] (m and s set by the caller).
template <typename T>
FV_CPU_CLONES void exp_rows(T* e, int64_t n_rows, int64_t n, T* m, T* s) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* x = e + r * n;
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) m[l] = x[l] > m[l] ? x[l] : m[l];
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    T* x = e + r * n;
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) {
      x[l] = exp_fast(x[l] - m[l]);
      s[l] += x[l];
    }
  }
}

template <typename T>
struct RowScratch {
  std::vector<T> e, m, s;  // [W][W] logits / weights, per-query statistics
  RowScratch(const char* op, const Dims& d)
      : e(host_vector<T>(op, "row logits", d.W * d.W)), m(host_vector<T>(op, "row statistics", d.W)),
        s(host_vector<T>(op, "row statistics", d.W)) {}
};

// Forward pass 1 over query rows [h0, h0 + R) of one batch element (pointers
// at that element): per query, the row logits' max (rmax) and sum of
// exp(E - max) (rsum), and out = sum_j exp(E - max) V[c, h, j] (written).
template <typename T>
FV_CPU_CLONES void forward_rows(const Dims& d, const T* Q, const T* K, const T* V, T* out, T* rmax, T* rsum,
                                int64_t h0, int64_t R, RowScratch<T>& w_) {
  const int64_t W = d.W, HW = d.HW;
  T *e = w_.e.data(), *m = w_.m.data(), *s = w_.s.data();
  for (int64_t h = h0; h < h0 + R; ++h) {
    // e[j][w] = Q[:,h,w] . K[:,h,j], then exp(e - max) per query (vectorised over w).
    fma_scalars(e, W, W, Q + h * W, HW, K + h * W, 1, HW, d.Cqk, W, false);
    for (int64_t w = 0; w < W; ++w) {
      m[w] = -std::numeric_limits<T>::infinity();
      s[w] = 0;
    }
    exp_rows(e, W, W, m, s);
    for (int64_t w = 0; w < W; ++w) {
      rmax[h * W + w] = m[w];
      rsum[h * W + w] = s[w];
    }
    // out[c,h,w] = sum_j e[j][w] V[c,h,j] (sums over W keys: planes in cache, one pass)
    fma_scalars(out + h * W, d.C, HW, e, W, V + h * W, HW, 1, W, W, false, W);
  }
}

// Forward pass 2, column w of a group of one batch element (lse and rsum at
// the group's first column), after pass 1: the column logits transposed,
// pt[i][h] = Q[:, h] . K[:, i] (vectorised over the queries h), lse from both
// parts' max and sums (rmax is lse's storage), the column weights P
// transposed in place, and the row part's rescaling exp(m_r - lse), scale[h * W]
// (scale at the column: the layout of out's planes, read by add_plane as they are).
// Scratch: three H vectors.
template <typename T>
FV_CPU_CLONES void column_weights(const Dims& d, Columns<T>& cols, int64_t w, T* lse, const T* rsum, T* st,
                                  T* scale) {
  const int64_t H = d.H, W = d.W, Cqk = d.Cqk;
  T *pt = cols.p.get() + w * H * H, *m = st, *mr = st + H, *sum = st + 2 * H;
  // (key and query swapped: the logits transposed, pt[i][h])
  column_logits(d, cols.k.get() + w * Cqk * H, cols.q.get() + w * Cqk * H, pt);
  for (int64_t h = 0; h < H; ++h) {
    mr[h] = m[h] = lse[h * W + w];  // the row max
    sum[h] = 0;
  }
  exp_rows(pt, H, H, m, sum);
  for (int64_t h = 0; h < H; ++h) {
    const T to_m = std::exp(mr[h] - m[h]), total = sum[h] + rsum[h * W + w] * to_m;
    lse[h * W + w] = m[h] + std::log(total);
    sum[h] = T(1) / total;
    scale[h * W] = to_m * sum[h];  // exp(m_r - lse)
  }
  for (int64_t i = 0; i < H; ++i) {
    T* r = pt + i * H;
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) r[h] *= sum[h];
  }
}

template <typename T>
std::tuple<Tensor, Tensor> forward_impl(const char* op, const Dims& d, const Tensor& q, const Tensor& k,
                                        const Tensor& v) {
  const ScalarType t = acc_scalar_type<T>();
  Tensor out = alloc_empty(op, "out", v, {d.B, d.C, d.H, d.W}, t);
  Tensor lse = alloc_empty(op, "lse", q, {d.B, d.H, d.W}, t);
  std::unique_ptr<T[]> rsum = host_array<T>(op, "row sums (batch, H, W)", d.B * d.HW);
  std::vector<T> scale = host_vector<T>(op, "row scales", d.HW);
  const T *Q = q.const_data_ptr<T>(), *K = k.const_data_ptr<T>(), *V = v.const_data_ptr<T>();
  T *O = out.mutable_data_ptr<T>(), *L = lse.mutable_data_ptr<T>(), *S = rsum.get();
  const int64_t H = d.H, qk = d.Cqk * d.HW, cv = d.C * d.HW;
  over_row_blocks(op, d, rows_per_task(d), [&] { return RowScratch<T>(op, d); },
                  [&](RowScratch<T>& w, int64_t b, int64_t h0, int64_t R) {
    forward_rows(d, Q + b * qk, K + b * qk, V + b * cv, O + b * cv, L + b * d.HW, S + b * d.HW, h0, R, w);
  });
  if (d.B == 0 || d.W == 0) return {out, lse};
  const int64_t group = columns_per_group(H, d.W);
  Columns<T> cols(op, d, group);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t w0 = 0; w0 < d.W; w0 += group) {
      const int64_t n_w = std::min(group, d.W - w0), at = b * d.HW + w0;
      pack_columns(op, d, Q + b * qk + w0, d.Cqk, n_w, cols.q.get());
      pack_columns(op, d, K + b * qk + w0, d.Cqk, n_w, cols.k.get());
      over_columns(op, n_w, [&] { return host_vector<T>(op, "column statistics", 3 * H); },
                   [&](std::vector<T>& e, int64_t w) {
        column_weights(d, cols, w, L + at, S + at, e.data(), scale.data() + w);
      });
      // out[c,h,w] = out[c,h,w] * scale[h][w] + sum_i P[h][i] V[c,i,w], per column a
      // GEMM (sums over H keys: one pass), its output [w][c][h] in place of the
      // packed dout / out columns.
      T* O_b = O + b * cv + w0;
      over_channel_steps(op, d, V + b * cv + w0, static_cast<const T*>(nullptr), n_w, cols,
                         [&](int64_t c0, int64_t n) {
        over_columns(op, n_w, [] { return 0; }, [&](int, int64_t w) {
          fma_scalars(cols.g.get() + w * n * H, n, H, cols.p.get() + w * H * H, H, cols.v.get() + w * n * H,
                      H, 1, H, H, false, H);
        });
        add_columns(op, d, O_b + c0 * d.HW, n, n_w, cols.g.get(), scale.data());
      });
    }
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Backward.

template <typename T>
struct BwdPtrs {
  const T *q, *k, *v, *out, *dout, *lse;
  T *delta, *dq, *dk, *dv;
  BwdPtrs at_column(int64_t w) const {
    return {q + w, k + w, v + w, out + w, dout + w, lse + w, delta + w, dq + w, dk + w, dv + w};
  }
};

// Row pass over query rows [h0, h0 + R) of one batch element (pointers at
// that element): the row pairs (query (h, w), key (h, j)) of these rows, all
// of them: P, dS, dquery (written), and dkey / dvalue of the keys (h, j)
// (written: their row queries are exactly these). Delta of the rows (stored
// for the column pass). Scratch: four W x W planes and dout's row ([C][W]).
template <typename T>
FV_CPU_CLONES void backward_row_pass(const Dims& d, const BwdPtrs<T>& a, int64_t h0, int64_t R,
                                     std::vector<T>& w_) {
  const int64_t W = d.W, HW = d.HW;
  T *pr = w_.data(), *dsr = pr + W * W, *prt = dsr + W * W, *dsrt = prt + W * W;
  T* gr = dsrt + W * W;
  for (int64_t h = h0; h < h0 + R; ++h) {
    // The row's dout, [c][w] contiguous: dP's vector operand, read as 16-lane
    // rows (strided by H * W, they would take a page each).
    for (int64_t c = 0; c < d.C; ++c) std::memcpy(gr + c * W, a.dout + c * HW + h * W, W * sizeof(T));
    T* delta = a.delta + h * W;
    const T* lse = a.lse + h * W;
    // er[j][w] = Q[:,h,w] . K[:,h,j], dP[j][w] = dout[:,h,w] . V[:,h,j]
    fma_scalars(pr, W, W, a.q + h * W, HW, a.k + h * W, 1, HW, d.Cqk, W, false);
    fma_scalars(dsr, W, W, gr, W, a.v + h * W, 1, HW, d.C, W, false);
    for (int64_t w = 0; w < W; ++w) delta[w] = 0;
    for (int64_t c = 0; c < d.C; ++c) {
      const T *o = a.out + c * HW + h * W, *g = gr + c * W;
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
    // dvalue[c,h,j] = sum_w P[j][w] dout[c,h,w] (the planes transposed to [w][j];
    // sums over W: one pass).
    fma_scalars(a.dq + h * W, d.Cqk, HW, dsr, W, a.k + h * W, HW, 1, W, W, false, W);
    transpose(pr, W, W, W, prt, W);
    transpose(dsr, W, W, W, dsrt, W);
    fma_scalars(a.dk + h * W, d.Cqk, HW, dsrt, W, a.q + h * W, HW, 1, W, W, false, W);
    fma_scalars(a.dv + h * W, d.C, HW, prt, W, gr, W, 1, W, W, false, W);
  }
}

// Backward column pass, column w of a group of one batch element (a at the
// group's first column), after dP is summed
// into ds (cols.p holds P): dS = P (dP - Delta) in place, and the column
// parts of dkey (into dk [c][i]) and dquery (into dq [c][h]).
template <typename T>
FV_CPU_CLONES void column_dqk(const Dims& d, const BwdPtrs<T>& a, const Columns<T>& cols, int64_t w, T* ds,
                              T* dst, T* dq, T* dk) {
  const int64_t H = d.H, W = d.W, Cqk = d.Cqk;
  const T* p = cols.p.get() + w * H * H;
  for (int64_t h = 0; h < H; ++h) {
    const T dl = a.delta[h * W + w];
    const T* e = p + h * H;
    T* f = ds + h * H;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) f[i] = e[i] * (f[i] - dl);
    f[h] = 0;  // the pixel itself: counted in its row only
  }
  // dkey[c][i] = sum_h dS[h][i] Q[c][h]; dquery[c][h] = sum_i dS[h][i] K[c][i] (dS transposed)
  fma_scalars(dk, Cqk, H, ds, H, cols.q.get() + w * Cqk * H, H, 1, H, H, false, H);
  transpose(ds, H, H, H, dst, H);
  fma_scalars(dq, Cqk, H, dst, H, cols.k.get() + w * Cqk * H, H, 1, H, H, false, H);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward_impl(const char* op, const Dims& d, const Tensor& dout,
                                                 const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& out, const Tensor& lse) {
  const ScalarType t = acc_scalar_type<T>();
  Tensor dq = alloc_empty(op, "dquery", q, sizes_of(q), t);
  Tensor dk = alloc_empty(op, "dkey", k, sizes_of(k), t);
  Tensor dv = alloc_empty(op, "dvalue", v, sizes_of(v), t);
  std::unique_ptr<T[]> delta = host_array<T>(op, "Delta (batch, H, W)", d.B * d.HW);
  const T *Q = q.const_data_ptr<T>(), *K = k.const_data_ptr<T>(), *V = v.const_data_ptr<T>();
  const T *O = out.const_data_ptr<T>(), *G = dout.const_data_ptr<T>(), *L = lse.const_data_ptr<T>();
  T *DQ = dq.mutable_data_ptr<T>(), *DK = dk.mutable_data_ptr<T>(), *DV = dv.mutable_data_ptr<T>();
  const int64_t H = d.H, qk = d.Cqk * d.HW, cv = d.C * d.HW;
  auto at_batch = [&](int64_t b) {
    return BwdPtrs<T>{Q + b * qk, K + b * qk, V + b * cv, O + b * cv, G + b * cv, L + b * d.HW,
                      delta.get() + b * d.HW, DQ + b * qk, DK + b * qk, DV + b * cv};
  };
  over_row_blocks(op, d, rows_per_task(d), [&] { return host_vector<T>(op, "row planes", (4 * d.W + d.C) * d.W); },
                  [&](std::vector<T>& w, int64_t b, int64_t h0, int64_t R) {
    backward_row_pass(d, at_batch(b), h0, R, w);
  });
  if (d.B == 0 || d.W == 0) return {dq, dk, dv};
  // Column pass, per group of columns of a batch element: the column pairs
  // (query (h, w), key (i, w), i != h), every pair once; adds their parts of
  // dquery, dkey and dvalue.
  const int64_t group = columns_per_group(H, d.W);
  Columns<T> cols(op, d, group);
  std::unique_ptr<T[]> dp = host_array<T>(op, "column dP", group * H * H);
  std::unique_ptr<T[]> dqk = host_array<T>(op, "column dquery / dkey", 2 * group * d.Cqk * H);
  T *dqc = dqk.get(), *dkc = dqc + group * d.Cqk * H;
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t w0 = 0; w0 < d.W; w0 += group) {
      const int64_t n_w = std::min(group, d.W - w0);
      const BwdPtrs<T> a = at_batch(b).at_column(w0);
      pack_columns(op, d, a.q, d.Cqk, n_w, cols.q.get());
      pack_columns(op, d, a.k, d.Cqk, n_w, cols.k.get());
      over_columns(op, n_w, [] { return 0; }, [&](int, int64_t w) {
        T* p = cols.p.get() + w * H * H;  // P[h][i] = exp(Q[:,h] . K[:,i] - lse[h]), 0 at i == h
        column_logits(d, cols.q.get() + w * d.Cqk * H, cols.k.get() + w * d.Cqk * H, p);
        for (int64_t h = 0; h < H; ++h) {
          const T l = a.lse[h * d.W + w];
          T* e = p + h * H;
#pragma omp simd
          for (int64_t i = 0; i < H; ++i) e[i] = exp_fast(e[i] - l);
          e[h] = 0;
        }
      });
      // Per step of value / dout channels and column: dP[h][i] += sum_c dout[c][h] V[c][i];
      // dvalue[c][i] += sum_h P[h][i] dout[c][h] (into the value columns, dead after dP).
      over_channel_steps(op, d, a.v, a.dout, n_w, cols, [&](int64_t c0, int64_t n) {
        over_columns(op, n_w, [] { return 0; }, [&](int, int64_t w) {
          T *v = cols.v.get() + w * n * H, *g = cols.g.get() + w * n * H;
          fma_scalars(dp.get() + w * H * H, H, H, v, H, g, 1, H, n, H, c0 > 0, n);
          fma_scalars(v, n, H, cols.p.get() + w * H * H, H, g, H, 1, H, H, false, H);
        });
        add_columns(op, d, a.dv + c0 * d.HW, n, n_w, cols.v.get(), static_cast<const T*>(nullptr));
      });
      if (d.C == 0) std::fill_n(dp.get(), group * H * H, T(0));  // (no channel step reset it: dS is made in place)
      over_columns(op, n_w, [&] { return host_vector<T>(op, "transposed column dS", H * H); },
                   [&](std::vector<T>& dst, int64_t w) {
        column_dqk(d, a, cols, w, dp.get() + w * H * H, dst.data(), dqc + w * d.Cqk * H, dkc + w * d.Cqk * H);
      });
      add_columns(op, d, a.dq, d.Cqk, n_w, dqc, static_cast<const T*>(nullptr));
      add_columns(op, d, a.dk, d.Cqk, n_w, dkc, static_cast<const T*>(nullptr));
    }
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
