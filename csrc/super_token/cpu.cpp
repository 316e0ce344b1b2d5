// CPU kernels of super token sampling and upsampling (STViT's StokenAttention).
//
// Layouts: images (batch, C, H0, W0) and tokens (batch, C, hh, ww) NCHW;
// affinity (batch, hh*ww, h*w, 9); neighbour k = 3 * dy + dx of cell (i, j)
// is token (i + dy - 1, j + dx - 1), a zero vector outside the grid.
//
// Every kernel works cell by cell (tasks of (batch, cell), in parallel): the
// cell's pixels are copied into a channel-major tile X[c][p] (zeros for the
// padding, which takes part as in STViT), its 9 neighbour tokens into nb[k][c].
// Then one of three small products:
//   associate  L[k][p] = sum_c nb[k][c] X[c][p]   (logits; upsample's daffinity)
//   aggregate  part[k][c] = sum_p A[k][p] X[c][p]  (what the cell sends each neighbour)
//   spread     Y[c][p] = sum_k A[k][p] nb[k][c]    (upsampling; sampling's dx)
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
#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../common/dtype.h"
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

// X[c * P + p] = pixel p of the cell, channel c (zeros for padding).
template <typename T>
void gather_cell(const Geometry& g, const T* img, int64_t b, int64_t cell, T* X) {
  const int64_t rows = g.rows(cell), cols = g.cols(cell), w = g.n.w, P = g.P;
  const int64_t y0 = (cell / g.n.ww) * g.n.h, x0 = (cell % g.n.ww) * g.n.w;
  if (rows < g.n.h || cols < w) std::fill(X, X + g.n.C * P, T(0));
  for (int64_t c = 0; c < g.n.C; ++c) {
    const T* plane = img + ((b * g.n.C + c) * g.n.H0 + y0) * g.n.W0 + x0;
    for (int64_t r = 0; r < rows; ++r) std::copy(plane + r * g.n.W0, plane + r * g.n.W0 + cols, X + c * P + r * w);
  }
}

// The valid pixels of Y[c * P + p] into the cell of img.
template <typename T>
void scatter_cell(const Geometry& g, const T* Y, int64_t b, int64_t cell, T* img) {
  const int64_t rows = g.rows(cell), cols = g.cols(cell), w = g.n.w, P = g.P;
  const int64_t y0 = (cell / g.n.ww) * g.n.h, x0 = (cell % g.n.ww) * g.n.w;
  for (int64_t c = 0; c < g.n.C; ++c) {
    T* plane = img + ((b * g.n.C + c) * g.n.H0 + y0) * g.n.W0 + x0;
    for (int64_t r = 0; r < rows; ++r) std::copy(Y + c * P + r * w, Y + c * P + r * w + cols, plane + r * g.n.W0);
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

// L[k * P + p] = sum_c nb[k * C + c] X[c * P + p]
template <typename T>
FV_CPU_CLONES void associate(const T* nb, const T* X, int64_t C, int64_t P, T* L) {
  std::fill(L, L + 9 * P, T(0));
  for (int64_t c = 0; c < C; ++c) {
    const T* x = X + c * P;
    for (int k = 0; k < 9; ++k) {
      const T a = nb[k * C + c];
      T* l = L + k * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) l[p] += a * x[p];
    }
  }
}

// In place: A[k * P + p] = softmax over k of scale * L[k * P + p].
template <typename T>
FV_CPU_CLONES void softmax9(T* L, int64_t P, T scale, T* mx, T* sum) {
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) mx[p] = L[p] * scale;
  for (int k = 1; k < 9; ++k)
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) mx[p] = std::max(mx[p], L[k * P + p] * scale);
  std::fill(sum, sum + P, T(0));
  for (int k = 0; k < 9; ++k)
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) {
      const T e = std::exp(L[k * P + p] * scale - mx[p]);
      L[k * P + p] = e;
      sum[p] += e;
    }
  for (int64_t p = 0; p < P; ++p) sum[p] = T(1) / sum[p];
  for (int k = 0; k < 9; ++k)
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) L[k * P + p] *= sum[p];
}

// part[k * C + c] = sum_p A[k * P + p] X[c * P + p]; psum[k] = sum_p A[k * P + p].
template <typename T>
FV_CPU_CLONES void aggregate(const T* A, const T* X, int64_t C, int64_t P, T* part, T* psum) {
  for (int k = 0; k < 9; ++k) {
    const T* a = A + k * P;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t p = 0; p < P; ++p) s += a[p];
    if (psum) psum[k] = s;
    for (int64_t c = 0; c < C; ++c) {
      const T* x = X + c * P;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t p = 0; p < P; ++p) acc += a[p] * x[p];
      part[k * C + c] = acc;
    }
  }
}

// Y[c * P + p] = sum_k A[k * P + p] nb[k * C + c]
template <typename T>
FV_CPU_CLONES void spread(const T* A, const T* nb, int64_t C, int64_t P, T* Y) {
  for (int64_t c = 0; c < C; ++c) {
    T* y = Y + c * P;
    std::fill(y, y + P, T(0));
    for (int k = 0; k < 9; ++k) {
      const T v = nb[k * C + c];
      const T* a = A + k * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) y[p] += v * a[p];
    }
  }
}

// A[k * P + p] from the stored affinity (cell's (P, 9) block).
template <typename T>
void load_affinity(const T* aff, int64_t P, T* A) {
  for (int64_t p = 0; p < P; ++p)
    for (int k = 0; k < 9; ++k) A[k * P + p] = aff[p * 9 + k];
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
    std::vector<T> X(C * P);
    for (int64_t id = begin; id < end; ++id) {
      gather_cell(g, x, id / N, id % N, X.data());
      for (int64_t c = 0; c < C; ++c) {
        T s = 0;
        for (int64_t p = 0; p < P; ++p) s += X[c * P + p];
        tok[id * C + c] = s / static_cast<T>(P);
      }
    }
  });

  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(C)));
  for (int64_t it = 0; it < n_iter; ++it) {
    const bool last = it == n_iter - 1;
    // Pass 1, per cell: logits, softmax, the 9 partial sums (one read of x).
    parallel_for(op, 0, tasks, g.grain(), [&](int64_t begin, int64_t end) {
      std::vector<T> X(C * P), nb(9 * C), L(9 * P), mx(P), sm(P);
      for (int64_t id = begin; id < end; ++id) {
        const int64_t b = id / N, cell = id % N;
        gather_cell(g, x, b, cell, X.data());
        neighbours(g, tok.data(), b, cell, nb.data());
        associate(nb.data(), X.data(), C, P, L.data());
        softmax9(L.data(), P, scale, mx.data(), sm.data());
        if (last) {
          T* a = aff + id * P * 9;
          for (int64_t p = 0; p < P; ++p)
            for (int k = 0; k < 9; ++k) a[p * 9 + k] = L[k * P + p];
        }
        aggregate(L.data(), X.data(), C, P, part.data() + id * 9 * C, psum.data() + id * 9);
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

// out cell = spread(A, neighbour rows of `rows`), for every cell.
template <typename T>
void spread_all(const Geometry& g, const T* rows, const T* aff, T* img) {
  const int64_t C = g.n.C, P = g.P, N = g.N;
  parallel_for(g.op, 0, g.n.B * N, g.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> A(9 * P), nb(9 * C), Y(C * P);
    for (int64_t id = begin; id < end; ++id) {
      load_affinity(aff + id * P * 9, P, A.data());
      neighbours(g, rows, id / N, id % N, nb.data());
      spread(A.data(), nb.data(), C, P, Y.data());
      scatter_cell(g, Y.data(), id / N, id % N, img);
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
    std::vector<T> X(C * P), nb(9 * C), L(9 * P), A(9 * P);
    for (int64_t id = begin; id < end; ++id) {
      const int64_t b = id / N, cell = id % N;
      gather_cell(g, go, b, cell, X.data());  // cropped pixels have no gradient: zeros
      neighbours(g, rows.data(), b, cell, nb.data());
      associate(nb.data(), X.data(), C, P, L.data());
      for (int64_t p = 0; p < P; ++p)
        for (int k = 0; k < 9; ++k) da[(id * P + p) * 9 + k] = L[k * P + p];
      load_affinity(aff + id * P * 9, P, A.data());
      aggregate(A.data(), X.data(), C, P, part.data() + id * 9 * C, static_cast<T*>(nullptr));
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
