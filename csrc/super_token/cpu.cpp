// CPU kernels of super token sampling and upsampling (STViT's StokenAttention).
//
// Layouts: images (batch, C, H0, W0) and tokens (batch, C, hh, ww) NCHW;
// affinity (batch, hh*ww, h*w, 9); neighbour k = 3 * dy + dx of cell (i, j)
// is token (i + dy - 1, j + dx - 1), a zero vector outside the grid.
//
// Every kernel works cell by cell (tasks of (batch, cell), in parallel), reading
// the cell's pixels straight from the NCHW image (the padding reads as zeros and
// takes part, as in STViT) and its 9 neighbour tokens nb[k][c].
// Then one of three small products:
//   associate  L[p][k] = sum_c nb[k][c] x_p[c]    (logits; upsample's daffinity)
//   aggregate  part[k][c] = sum_p A[p][k] x_p[c]  (what the cell sends each neighbour)
//   spread     y_p[c] = sum_k A[p][k] nb[k][c]     (upsampling; sampling's dx)
// Sampling runs associate + softmax + aggregate in one pass over x per
// iteration and stores each cell's 9 x C partial sums; a second pass, per
// token, folds the partials of the (up to) 9 cells that send to it in the fixed
// order k = 0..8, so results do not depend on threads. Tokens are kept as
// (batch, hh*ww, C) rows internally.
//
// float and double kernels; half and bfloat16 are widened to float on entry
// (fp32 accumulation: STViT's 1e-12 would vanish in fp16) and the outputs
// narrowed on exit; affinity and asum stay in the accumulate dtype.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../common/dtype.h"
#include "../common/fast_math.h"
#include "../common/parallel.h"
#include "checks.h"

namespace fastvision::stoken {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr double kEps = 1e-12;  // STViT's, added to the affinity sums before dividing

// One call's sizes and the cell geometry.
struct Geometry {
  const char* op;
  StSizes n;
  int64_t N, P;  // cells (= tokens), pixels per cell

  // Cell `cell` of batch b: its valid rows and columns (the rest is padding).
  int64_t rows(int64_t cell) const { return std::min(n.h, n.H0 - (cell / n.ww) * n.h); }
  int64_t cols(int64_t cell) const { return std::min(n.w, n.W0 - (cell % n.ww) * n.w); }
  // The token neighbour k of `cell` is, or -1 outside the grid.
  int64_t neighbour(int64_t cell, int k) const {
    const int64_t i = cell / n.ww + k / 3 - 1, j = cell % n.ww + k % 3 - 1;
    return (i < 0 || i >= n.hh || j < 0 || j >= n.ww) ? -1 : i * n.ww + j;
  }
  // The cell that sends to token `tok` as its neighbour k, or -1.
  int64_t sender(int64_t tok, int k) const {
    const int64_t i = tok / n.ww - k / 3 + 1, j = tok % n.ww - k % 3 + 1;
    return (i < 0 || i >= n.hh || j < 0 || j >= n.ww) ? -1 : i * n.ww + j;
  }
  // Tasks per chunk of the parallel loops: enough work to pay for a thread.
  int64_t grain() const { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, 9 * n.C * P)); }
};

// The products below read and write the NCHW images directly, a cell row at a
// time in chunks of L pixels (L = 8, one AVX register of floats, or 4 for cells
// at most 4 wide; a partial chunk goes through a zero-padded copy), with the 9
// neighbours' accumulators in registers. Pixels of the padding are zero
// vectors: they are skipped where they add nothing, and their logits are 0.
constexpr int64_t kMaxLanes = 8;

// Calls f(std::integral_constant<int64_t, L>) with the chunk length for cells `w` wide.
template <typename F>
void with_lanes(int64_t w, F&& f) {
  if (w <= 4)
    f(std::integral_constant<int64_t, 4>{});
  else
    f(std::integral_constant<int64_t, kMaxLanes>{});
}

// Row stride of a transposed affinity: P and a zero tail, so that a chunk
// starting at any pixel reads inside its row.
inline int64_t at_stride(int64_t P) { return (ceil_div(P, kMaxLanes) + 1) * kMaxLanes; }

// Where a cell's pixels are: pixel p = r * w + q of cell `cell` of batch b is
// image element (b, c, y0 + r, x0 + q) for r < rows, q < cols (else padding).
struct CellView {
  int64_t base, y0, x0, rows, cols;  // base: element (b, 0, 0, 0)
  CellView(const Geometry& g, int64_t b, int64_t cell)
      : base(b * g.n.C * g.n.H0 * g.n.W0), y0((cell / g.n.ww) * g.n.h), x0((cell % g.n.ww) * g.n.w),
        rows(g.rows(cell)), cols(g.cols(cell)) {}
  int64_t at(const Geometry& g, int64_t c, int64_t r, int64_t q) const {
    return base + (c * g.n.H0 + y0 + r) * g.n.W0 + x0 + q;
  }
  int64_t valid(int64_t r, int64_t q0, int64_t L) const {  // valid pixels of the chunk at (r, q0)
    return r < rows ? std::clamp<int64_t>(cols - q0, 0, L) : 0;
  }
};

// The chunk's L values: `src` itself when all are valid, else a zero-padded copy in tmp.
template <int64_t L, typename T>
inline const T* chunk(const T* src, int64_t n, T* tmp) {
  if (n == L) return src;
  for (int64_t j = 0; j < L; ++j) tmp[j] = j < n ? src[j] : T(0);
  return tmp;
}

// AT[k * at_stride(P) + p] = A[p * 9 + k], zero past P.
template <typename T>
void transpose_affinity(const Geometry& g, const T* A, T* AT) {
  const int64_t P = g.P, Pr = at_stride(P);
  for (int k = 0; k < 9; ++k) {
    for (int64_t p = 0; p < P; ++p) AT[k * Pr + p] = A[p * 9 + k];
    for (int64_t p = P; p < Pr; ++p) AT[k * Pr + p] = 0;
  }
}

// nb[k * C + c]: the 9 neighbour rows of `cell` from tok (batch, N, C); zeros outside.
template <typename T>
void neighbours(const Geometry& g, const T* tok, int64_t b, int64_t cell, T* nb) {
  const int64_t C = g.n.C;
  for (int k = 0; k < 9; ++k) {
    const int64_t t = g.neighbour(cell, k);
    if (t < 0)
      std::fill(nb + k * C, nb + (k + 1) * C, T(0));
    else
      std::copy(tok + (b * g.N + t) * C, tok + (b * g.N + t + 1) * C, nb + k * C);
  }
}

// L[p * 9 + k] = sum_c nb[k * C + c] x_p[c] for every pixel p of the cell (0 for padding).
template <int64_t L, typename T>
FV_CPU_CLONES void associate(const Geometry& g, const T* img, const CellView& v, const T* nb, T* logits) {
  const int64_t C = g.n.C, w = g.n.w;
  T tmp[L];
  for (int64_t r = 0; r < g.n.h; ++r)
    for (int64_t q0 = 0; q0 < w; q0 += L) {
      const int64_t n = v.valid(r, q0, L), m = std::min(L, w - q0);
      T acc[9][L] = {};
      if (n > 0)
        for (int64_t c = 0; c < C; ++c) {
          const T* x = chunk<L>(img + v.at(g, c, r, q0), n, tmp);
          for (int k = 0; k < 9; ++k) {
            const T s = nb[k * C + c];
#pragma omp simd
            for (int64_t j = 0; j < L; ++j) acc[k][j] += s * x[j];
          }
        }
      for (int64_t j = 0; j < m; ++j)
        for (int k = 0; k < 9; ++k) logits[(r * w + q0 + j) * 9 + k] = acc[k][j];
    }
}

// part[k * C + c] = sum_p A[p * 9 + k] x_p[c] (AT: A transposed); psum[k] = sum_p A[p * 9 + k],
// padding included (its pixels count in the affinity sums, as in STViT).
template <int64_t L, typename T>
FV_CPU_CLONES void aggregate(const Geometry& g, const T* img, const CellView& v, const T* AT, T* part, T* psum) {
  const int64_t C = g.n.C, w = g.n.w, Pr = at_stride(g.P);
  T tmp[L];
  for (int64_t c = 0; c < C; ++c) {
    T acc[9][L] = {};
    for (int64_t r = 0; r < v.rows; ++r)
      for (int64_t q0 = 0; q0 < w; q0 += L) {
        const int64_t n = v.valid(r, q0, L);
        if (n == 0) continue;
        const T* x = chunk<L>(img + v.at(g, c, r, q0), n, tmp);
        const int64_t p0 = r * w + q0;
        for (int k = 0; k < 9; ++k)
#pragma omp simd
          for (int64_t j = 0; j < L; ++j) acc[k][j] += AT[k * Pr + p0 + j] * x[j];
      }
    for (int k = 0; k < 9; ++k) {
      T s = 0;
      for (int64_t j = 0; j < L; ++j) s += acc[k][j];
      part[k * C + c] = s;
    }
  }
  if (psum)
    for (int k = 0; k < 9; ++k) {
      T s = 0;
      for (int64_t p = 0; p < g.P; ++p) s += AT[k * Pr + p];
      psum[k] = s;
    }
}

// y_p[c] = sum_k A[p * 9 + k] nb[k * C + c], written into the cell's valid pixels of img.
template <int64_t L, typename T>
FV_CPU_CLONES void spread(const Geometry& g, const T* AT, const T* nb, const CellView& v, T* img) {
  const int64_t C = g.n.C, w = g.n.w, Pr = at_stride(g.P);
  for (int64_t r = 0; r < v.rows; ++r)
    for (int64_t q0 = 0; q0 < w; q0 += L) {
      const int64_t n = v.valid(r, q0, L), p0 = r * w + q0;
      if (n == 0) continue;
      T a[9][L];
      for (int k = 0; k < 9; ++k)
        for (int64_t j = 0; j < L; ++j) a[k][j] = AT[k * Pr + p0 + j];
      for (int64_t c = 0; c < C; ++c) {
        T acc[L] = {};
        for (int k = 0; k < 9; ++k) {
          const T s = nb[k * C + c];
#pragma omp simd
          for (int64_t j = 0; j < L; ++j) acc[j] += a[k][j] * s;
        }
        T* y = img + v.at(g, c, r, q0);
        for (int64_t j = 0; j < n; ++j) y[j] = acc[j];
      }
    }
}

// In place: L[p * 9 + k] becomes the softmax over k of scale * L[p * 9 + k]. The
// exponentials run over all 9P entries at once (exp_fast vectorises; `shift`, 9P
// scratch, holds each entry's row maximum).
template <typename T>
FV_CPU_CLONES void softmax9(T* L, int64_t P, T scale, T* shift) {
  for (int64_t p = 0; p < P; ++p) {
    T mx = L[p * 9] * scale;
    for (int k = 1; k < 9; ++k) mx = std::max(mx, L[p * 9 + k] * scale);
    for (int k = 0; k < 9; ++k) shift[p * 9 + k] = mx;
  }
#pragma omp simd
  for (int64_t i = 0; i < 9 * P; ++i) L[i] = exp_fast(L[i] * scale - shift[i]);
  for (int64_t p = 0; p < P; ++p) {
    T sum = 0;
    for (int k = 0; k < 9; ++k) sum += L[p * 9 + k];
    const T inv = T(1) / sum;
    for (int k = 0; k < 9; ++k) L[p * 9 + k] *= inv;
  }
}

// Per token j (batch, N): out_row[c] = sum_k part[sender(j, k)][k][c], den = sum_k psum[...][k];
// in the fixed order k = 0..8.
template <typename T>
void fold_token(const Geometry& g, const T* part, const T* psum, int64_t b, int64_t tok, T* row, T* den) {
  const int64_t C = g.n.C;
  std::fill(row, row + C, T(0));
  T d = 0;
  for (int k = 0; k < 9; ++k) {
    const int64_t s = g.sender(tok, k);
    if (s < 0) continue;
    const T* src = part + ((b * g.N + s) * 9 + k) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) row[c] += src[c];
    if (psum) d += psum[(b * g.N + s) * 9 + k];
  }
  if (den) *den = d;
}

// tok (batch, N, C) <-> tokens (batch, C, hh, ww)
template <typename T>
void tokens_to_rows(const Geometry& g, const T* tokens, T* rows) {
  for (int64_t b = 0; b < g.n.B; ++b)
    for (int64_t c = 0; c < g.n.C; ++c)
      for (int64_t t = 0; t < g.N; ++t) rows[(b * g.N + t) * g.n.C + c] = tokens[(b * g.n.C + c) * g.N + t];
}

// ---------------------------------------------------------------------------
// Sampling

template <typename T>
std::tuple<Tensor, Tensor, Tensor> sampling_forward(const Geometry& g, const Tensor& xt, int64_t n_iter) {
  const StSizes& n = g.n;
  const char* op = g.op;
  const int64_t C = n.C, P = g.P, N = g.N, tasks = n.B * N;
  const ScalarType acc = acc_scalar_type<T>();
  const T* x = xt.const_data_ptr<T>();
  Tensor stokens = alloc_empty(op, "stokens", xt, n.tokens(), acc);
  Tensor affinity = alloc_empty(op, "affinity", xt, n.affinity(), acc);
  Tensor asum = alloc_empty(op, "asum", xt, n.asum(), acc);
  std::vector<T> tok = host_vector<T>(op, "super token rows", tasks * C);
  std::vector<T> part = host_vector<T>(op, "per-cell partial sums", tasks * 9 * C);
  std::vector<T> psum = host_vector<T>(op, "per-cell affinity sums", tasks * 9);
  T* aff = affinity.mutable_data_ptr<T>();
  T* out = stokens.mutable_data_ptr<T>();
  T* den_out = asum.mutable_data_ptr<T>();

  // Initial tokens: the means of the padded cells (STViT's adaptive average pool).
  parallel_for(op, 0, tasks, g.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t id = begin; id < end; ++id) {
      const CellView v(g, id / N, id % N);
      T* row = tok.data() + id * C;
      for (int64_t c = 0; c < C; ++c) {
        T s = 0;
        for (int64_t r = 0; r < v.rows; ++r) {
          const T* src = x + v.at(g, c, r, 0);
          for (int64_t q = 0; q < v.cols; ++q) s += src[q];
        }
        row[c] = s / static_cast<T>(P);
      }
    }
  });

  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(C)));
  for (int64_t it = 0; it < n_iter; ++it) {
    const bool last = it == n_iter - 1;
    // Pass 1, per cell: logits, softmax, the 9 partial sums (one read of x).
    parallel_for(op, 0, tasks, g.grain(), [&](int64_t begin, int64_t end) {
      std::vector<T> nb(9 * C), L(9 * P), shift(9 * P), AT(9 * at_stride(P));
      for (int64_t id = begin; id < end; ++id) {
        const CellView v(g, id / N, id % N);
        neighbours(g, tok.data(), id / N, id % N, nb.data());
        with_lanes(g.n.w, [&](auto lanes) { associate<lanes()>(g, x, v, nb.data(), L.data()); });
        softmax9(L.data(), P, scale, shift.data());
        if (last) std::copy(L.begin(), L.end(), aff + id * P * 9);
        transpose_affinity(g, L.data(), AT.data());
        with_lanes(g.n.w, [&](auto lanes) {
          aggregate<lanes()>(g, x, v, AT.data(), part.data() + id * 9 * C, psum.data() + id * 9);
        });
      }
    });
    // Pass 2, per token: fold, normalise.
    parallel_for(op, 0, tasks, std::max<int64_t>(1, g.grain() * P), [&](int64_t begin, int64_t end) {
      for (int64_t id = begin; id < end; ++id) {
        const int64_t b = id / N, t = id % N;
        T* row = tok.data() + id * C;
        T den = 0;
        fold_token(g, part.data(), psum.data(), b, t, row, &den);
        const T inv = T(1) / (den + static_cast<T>(kEps));
        for (int64_t c = 0; c < C; ++c) row[c] *= inv;
        if (last) {
          den_out[id] = den;
          for (int64_t c = 0; c < C; ++c) out[(b * C + c) * N + t] = row[c];
        }
      }
    });
  }
  return {stokens, affinity, asum};
}

// Every cell of img = spread(A, the neighbour rows of `rows`).
template <typename T>
void spread_all(const Geometry& g, const T* rows, const T* aff, T* img) {
  const int64_t C = g.n.C, P = g.P, N = g.N;
  parallel_for(g.op, 0, g.n.B * N, g.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> nb(9 * C), AT(9 * at_stride(P));
    for (int64_t id = begin; id < end; ++id) {
      neighbours(g, rows, id / N, id % N, nb.data());
      transpose_affinity(g, aff + id * P * 9, AT.data());
      with_lanes(g.n.w, [&](auto lanes) { spread<lanes()>(g, AT.data(), nb.data(), CellView(g, id / N, id % N), img); });
    }
  });
}

// dx = spread of dstokens / (asum + eps): the transpose of the final aggregation.
template <typename T>
Tensor sampling_backward(const Geometry& g, const Tensor& dst, const Tensor& affinity, const Tensor& asum) {
  const int64_t C = g.n.C, N = g.N;
  std::vector<T> rows = host_vector<T>(g.op, "scaled token gradients", g.n.B * N * C);
  tokens_to_rows(g, dst.const_data_ptr<T>(), rows.data());
  const T* den = asum.const_data_ptr<T>();
  for (int64_t id = 0; id < g.n.B * N; ++id) {
    const T inv = T(1) / (den[id] + static_cast<T>(kEps));
    for (int64_t c = 0; c < C; ++c) rows[id * C + c] *= inv;
  }
  Tensor dx = alloc_empty(g.op, "dx", dst, g.n.image(), acc_scalar_type<T>());
  spread_all(g, rows.data(), affinity.const_data_ptr<T>(), dx.mutable_data_ptr<T>());
  return dx;
}

// ---------------------------------------------------------------------------
// Upsampling

template <typename T>
Tensor upsample_forward(const Geometry& g, const Tensor& st, const Tensor& affinity) {
  std::vector<T> rows = host_vector<T>(g.op, "super token rows", g.n.B * g.N * g.n.C);
  tokens_to_rows(g, st.const_data_ptr<T>(), rows.data());
  Tensor out = alloc_empty(g.op, "out", st, g.n.image(), acc_scalar_type<T>());
  spread_all(g, rows.data(), affinity.const_data_ptr<T>(), out.mutable_data_ptr<T>());
  return out;
}

template <typename T>
std::tuple<Tensor, Tensor> upsample_backward(const Geometry& g, const Tensor& dout, const Tensor& st,
                                             const Tensor& affinity) {
  const StSizes& n = g.n;
  const int64_t C = n.C, P = g.P, N = g.N, tasks = n.B * N;
  std::vector<T> rows = host_vector<T>(g.op, "super token rows", tasks * C);
  tokens_to_rows(g, st.const_data_ptr<T>(), rows.data());
  std::vector<T> part = host_vector<T>(g.op, "per-cell partial sums", tasks * 9 * C);
  Tensor daff = alloc_empty(g.op, "daffinity", affinity, n.affinity(), acc_scalar_type<T>());
  Tensor dst = alloc_empty(g.op, "dstokens", st, n.tokens(), acc_scalar_type<T>());
  const T* go = dout.const_data_ptr<T>();
  const T* aff = affinity.const_data_ptr<T>();
  T* da = daff.mutable_data_ptr<T>();
  parallel_for(g.op, 0, tasks, g.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> nb(9 * C), AT(9 * at_stride(P));
    for (int64_t id = begin; id < end; ++id) {
      const CellView v(g, id / N, id % N);  // cropped pixels have no gradient: zeros
      neighbours(g, rows.data(), id / N, id % N, nb.data());
      transpose_affinity(g, aff + id * P * 9, AT.data());
      with_lanes(g.n.w, [&](auto lanes) {
        associate<lanes()>(g, go, v, nb.data(), da + id * P * 9);
        aggregate<lanes()>(g, go, v, AT.data(), part.data() + id * 9 * C, static_cast<T*>(nullptr));
      });
    }
  });
  T* ds = dst.mutable_data_ptr<T>();
  parallel_for(g.op, 0, tasks, std::max<int64_t>(1, g.grain() * P), [&](int64_t begin, int64_t end) {
    std::vector<T> row(C);
    for (int64_t id = begin; id < end; ++id) {
      const int64_t b = id / N, t = id % N;
      fold_token(g, part.data(), static_cast<const T*>(nullptr), b, t, row.data(), static_cast<T*>(nullptr));
      for (int64_t c = 0; c < C; ++c) ds[(b * C + c) * N + t] = row[c];
    }
  });
  return {dst, daff};
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp).

Geometry geometry(const char* op, const StSizes& n) { return Geometry{op, n, n.hh * n.ww, n.h * n.w}; }

Tensor widen(const char* op, const char* what, const Tensor& t, ScalarType acc) {
  return alloc_cast(op, std::string(what) + " in " + dtype_name(acc), t, acc);
}

std::tuple<Tensor, Tensor, Tensor> super_token_sampling_fwd_cpu(Tensor x, std::vector<int64_t> stoken_size,
                                                                 int64_t n_iter) {
  constexpr const char* op = "super_token_sampling_fwd";
  const StSizes n = check_sampling(op, x, stoken_size, n_iter);
  const Geometry g = geometry(op, n);
  const Tensor xa = widen(op, "x", x, n.acc);
  auto [stokens, affinity, asum] = n.acc == ScalarType::Double ? sampling_forward<double>(g, xa, n_iter)
                                                               : sampling_forward<float>(g, xa, n_iter);
  return {alloc_cast(op, "stokens", stokens, n.dtype), affinity, asum};
}

Tensor super_token_sampling_bwd_cpu(Tensor dstokens, Tensor affinity, Tensor asum, std::vector<int64_t> stoken_size,
                                    std::vector<int64_t> size) {
  constexpr const char* op = "super_token_sampling_bwd";
  const StSizes n = check_tokens(op, "dstokens", dstokens, stoken_size, size, "size");
  check_affinity(op, n, affinity, dstokens);
  check_dtype_is(op, "asum", asum, n.acc, "the accumulate dtype: float64 for float64 dstokens, else float32");
  check_shape(op, "asum", asum, n.asum(), "(batch, hh, ww)");
  check_tensor(op, "asum", asum, dstokens);
  const Geometry g = geometry(op, n);
  const Tensor d = widen(op, "dstokens", dstokens, n.acc);
  Tensor dx = n.acc == ScalarType::Double ? sampling_backward<double>(g, d, affinity, asum)
                                          : sampling_backward<float>(g, d, affinity, asum);
  return alloc_cast(op, "dx", dx, n.dtype);
}

Tensor super_token_upsample_fwd_cpu(Tensor stokens, Tensor affinity, std::vector<int64_t> stoken_size,
                                    std::vector<int64_t> out_size) {
  constexpr const char* op = "super_token_upsample_fwd";
  const StSizes n = check_tokens(op, "stokens", stokens, stoken_size, out_size, "out_size");
  check_affinity(op, n, affinity, stokens);
  const Geometry g = geometry(op, n);
  const Tensor s = widen(op, "stokens", stokens, n.acc);
  Tensor out = n.acc == ScalarType::Double ? upsample_forward<double>(g, s, affinity)
                                           : upsample_forward<float>(g, s, affinity);
  return alloc_cast(op, "out", out, n.dtype);
}

std::tuple<Tensor, Tensor> super_token_upsample_bwd_cpu(Tensor dout, Tensor stokens, Tensor affinity,
                                                        std::vector<int64_t> stoken_size) {
  constexpr const char* op = "super_token_upsample_bwd";
  check_image(op, "dout", dout, "(batch, C, H0, W0)");
  const std::vector<int64_t> size{dout.size(2), dout.size(3)};
  const StSizes n = check_tokens(op, "stokens", stokens, stoken_size, size, "dout's spatial size");
  check_dtype_is(op, "dout", dout, n.dtype, "stokens' dtype");
  check_shape(op, "dout", dout, n.image(), "(batch, C, H0, W0) with stokens' batch and C");
  check_tensor(op, "dout", dout, stokens);
  check_affinity(op, n, affinity, stokens);
  const Geometry g = geometry(op, n);
  const Tensor go = widen(op, "dout", dout, n.acc), s = widen(op, "stokens", stokens, n.acc);
  auto [dst, daff] = n.acc == ScalarType::Double ? upsample_backward<double>(g, go, s, affinity)
                                                 : upsample_backward<float>(g, go, s, affinity);
  return {alloc_cast(op, "dstokens", dst, n.dtype), daff};
}

}  // namespace
}  // namespace fastvision::stoken

STABLE_TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("super_token_sampling_fwd", TORCH_BOX(&fastvision::stoken::super_token_sampling_fwd_cpu));
  m.impl("super_token_sampling_bwd", TORCH_BOX(&fastvision::stoken::super_token_sampling_bwd_cpu));
  m.impl("super_token_upsample_fwd", TORCH_BOX(&fastvision::stoken::super_token_upsample_fwd_cpu));
  m.impl("super_token_upsample_bwd", TORCH_BOX(&fastvision::stoken::super_token_upsample_bwd_cpu));
}
