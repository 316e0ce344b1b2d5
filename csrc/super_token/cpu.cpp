// CPU kernels of super token sampling and upsampling (STViT's StokenAttention).
//
// Layouts: images (batch, C, H0, W0) and tokens (batch, C, hh, ww) NCHW;
// affinity (batch, hh*ww, h*w, 9); neighbour k = 3 * dy + dx of cell (i, j)
// is token (i + dy - 1, j + dx - 1), a zero vector outside the grid.
//
// Every kernel works cell by cell (tasks of (batch, cell), in parallel), on blocks:
// a cell's pixels X[c][p] (p = r * w + q; the padding reads as zeros and takes part,
// as in STViT; each channel's row padded with zeros to Pp, a multiple of kLanes),
// gathered a band (row of cells) at a time along the image's lines; its 9 neighbour
// tokens nb[k][c] (copies of token rows); its affinity transposed, At[k][p] (zero
// past P). Three small products then run over whole 8-lane vectors (GCC vector
// extensions) whatever the cell's width:
//   associate  L[k][p] = sum_c nb[k][c] X[c][p]    (logits; upsample's daffinity)
//   aggregate  part[k][c] = sum_p At[k][p] X[c][p] (what the cell sends each neighbour;
//                                                   lane sums reduced by a fixed tree)
//   spread     Y[c][p] = sum_k At[k][p] nb[k][c]   (upsampling; sampling's dx)
// and a softmax over k, vectorised over pixels. spread stores straight into the image
// where a full cell's rows are whole vectors (w a multiple of 8), else through a block.
//
// Sampling: one pass over x per iteration runs associate + softmax + aggregate per
// cell and stores each cell's 9 x C partial sums and 9 affinity sums; a second pass,
// per token, folds the partials of the (up to) 9 cells that send to it in the fixed
// order k = 0..8, so results do not depend on threads. The first iteration pools the
// initial tokens (the cells' means) a band ahead of the association, from the blocks
// the association then reads (a ring of two bands): x is read once.
// Upsampling's backward: aggregate dout's blocks (dstokens, folded per token) and,
// only when asked for (affinity_grad; StokenAttention's affinity is detached, as in
// STViT), associate them with the tokens (daffinity).
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
  int64_t N, P, Pp;  // cells (= tokens), pixels per cell, P rounded up to whole vectors

  // Cell `cell`: its valid rows and columns (the rest is padding).
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

// Pixels per vector chunk of the products (one AVX register of floats).
constexpr int64_t kLanes = 8;

// kLanes-wide vectors (GCC vector extensions: AVX registers in the x86-64-v3 clone,
// pairs of SSE registers in the baseline one; a vector times a scalar broadcasts it).
// The helpers are always inlined, so no vector crosses a function boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
template <typename T>
using Vec = typename VecOf<T>::type;
#define FV_ST_INLINE inline __attribute__((always_inline))

template <typename T>
FV_ST_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
FV_ST_INLINE void store(T* p, Vec<T> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
// Pairwise sums within each half: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7].
template <typename T>
FV_ST_INLINE Vec<T> hadd(Vec<T> a, Vec<T> b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// The lane sums of a[0..7], as one vector (a fixed tree: no horizontal sum one by one).
template <typename T>
FV_ST_INLINE Vec<T> reduce8(const Vec<T>* a) {
  const Vec<T> u0 = hadd<T>(hadd<T>(a[0], a[1]), hadd<T>(a[2], a[3]));
  const Vec<T> u1 = hadd<T>(hadd<T>(a[4], a[5]), hadd<T>(a[6], a[7]));
  return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}
// The lane sum of a, in reduce8's order.
template <typename T>
FV_ST_INLINE T reduce1(Vec<T> a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// dst[0, n) = src[0, n), whole vectors first (a library call per short row would cost more).
template <typename T>
FV_ST_INLINE void copy_row(const T* src, int64_t n, T* dst) {
  int64_t q = 0;
  for (; q + kLanes <= n; q += kLanes) store(dst + q, load(src + q));
  for (; q < n; ++q) dst[q] = src[q];
}

// Where a cell's pixels are: pixel p = r * w + q of cell `cell` of batch b is
// image element (b, c, y0 + r, x0 + q) for r < rows, q < cols (else padding).
struct CellView {
  int64_t base, y0, x0, rows, cols;  // base: element (b, 0, 0, 0)
  CellView(const Geometry& g, int64_t b, int64_t cell)
      : base(b * g.n.C * g.n.H0 * g.n.W0), y0((cell / g.n.ww) * g.n.h), x0((cell % g.n.ww) * g.n.w),
        rows(g.rows(cell)), cols(g.cols(cell)) {}
  bool full(const Geometry& g) const { return rows == g.n.h && cols == g.n.w; }
  int64_t at(const Geometry& g, int64_t c, int64_t r) const { return base + (c * g.n.H0 + y0 + r) * g.n.W0 + x0; }
};

// Per-thread scratch of one cell: its transposed affinity At (or logits, 9 x Pp; the
// tails past P stay zero) and neighbour tokens nb (9 x C).
template <typename T>
struct CellScratch {
  std::vector<T> At, nb;
  explicit CellScratch(const Geometry& g) : At(9 * g.Pp, T(0)), nb(9 * g.n.C) {}
};

// The pixel blocks of a row of cells (band = b * hh + i): cell j's X[c * Pp + p] at
// Xb + j * C * Pp, padding zero (the tails past P stay zero), gathered along the image's
// rows (one pass over whole lines: the hardware prefetchers follow it).
template <typename T>
FV_CPU_CLONES void gather_band(const Geometry& g, const T* img, int64_t band, T* Xb) {
  const int64_t C = g.n.C, w = g.n.w, Pp = g.Pp, ww = g.n.ww, i = band % g.n.hh;
  const int64_t rows = g.rows(i * ww), last_cols = g.cols(ww - 1);
  const T* src = img + ((band / g.n.hh) * C * g.n.H0 + i * g.n.h) * g.n.W0;  // (b, 0, i * h, 0)
  for (int64_t c = 0; c < C; ++c) {
    T* dst = Xb + c * Pp;
    if (rows < g.n.h)
      for (int64_t j = 0; j < ww; ++j) std::fill(dst + j * C * Pp, dst + j * C * Pp + g.P, T(0));
    else if (last_cols < w)
      std::fill(dst + (ww - 1) * C * Pp, dst + (ww - 1) * C * Pp + g.P, T(0));
    for (int64_t r = 0; r < rows; ++r) {
      const T* line = src + (c * g.n.H0 + r) * g.n.W0;
      for (int64_t j = 0; j + 1 < ww; ++j) copy_row(line + j * w, w, dst + j * C * Pp + r * w);
      copy_row(line + (ww - 1) * w, last_cols, dst + (ww - 1) * C * Pp + r * w);
    }
  }
}

// The cell's valid pixels of img = Y[c * Pp + p].
template <typename T>
FV_CPU_CLONES void scatter(const Geometry& g, const T* Y, const CellView& v, T* img) {
  for (int64_t c = 0; c < g.n.C; ++c)
    for (int64_t r = 0; r < v.rows; ++r) copy_row(Y + c * g.Pp + r * g.n.w, v.cols, img + v.at(g, c, r));
}

// rows[(b * N + t) * C + c] = tokens[(b * C + c) * N + t] * (inv ? inv[b * N + t] : 1):
// tokens as rows, so that a cell's 9 neighbours are 9 contiguous copies.
template <typename T>
std::vector<T> token_rows(const Geometry& g, const T* tokens, const T* inv) {
  const int64_t C = g.n.C, N = g.N;
  std::vector<T> rows = host_vector<T>(g.op, "super token rows", g.n.B * N * C);
  for (int64_t b = 0; b < g.n.B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < N; ++t)
        rows[(b * N + t) * C + c] = tokens[(b * C + c) * N + t] * (inv ? inv[b * N + t] : T(1));
  return rows;
}

// nb[k * C + c]: the 9 neighbour rows of `cell` from rows (batch, N, C) held from
// row `first` (of batch * N) on; zeros outside.
template <typename T>
void neighbours(const Geometry& g, const T* rows, int64_t first, int64_t b, int64_t cell, T* nb) {
  const int64_t C = g.n.C;
  for (int k = 0; k < 9; ++k) {
    const int64_t t = g.neighbour(cell, k);
    if (t < 0)
      std::fill(nb + k * C, nb + (k + 1) * C, T(0));
    else
      std::copy(rows + (b * g.N + t - first) * C, rows + (b * g.N + t - first + 1) * C, nb + k * C);
  }
}

// At[k * Pp + p] = A[p * 9 + k] (A: the cell's (P, 9) affinity); the tail past P stays zero.
template <typename T>
void transpose_in(const Geometry& g, const T* A, T* At) {
  for (int64_t p = 0; p < g.P; ++p)
    for (int k = 0; k < 9; ++k) At[k * g.Pp + p] = A[p * 9 + k];
}

template <typename T>
void transpose_out(const Geometry& g, const T* At, T* A) {
  for (int64_t p = 0; p < g.P; ++p)
    for (int k = 0; k < 9; ++k) A[p * 9 + k] = At[k * g.Pp + p];
}

// L[k * Pp + p] = sum_c nb[k * C + c] X[c * Pp + p].
template <typename T>
FV_CPU_CLONES void associate(int64_t C, int64_t Pp, const T* __restrict X, const T* __restrict nb, T* __restrict L) {
  for (int64_t p0 = 0; p0 < Pp; p0 += kLanes) {
    Vec<T> acc[9] = {};
    for (int64_t c = 0; c < C; ++c) {
      const Vec<T> x = load(X + c * Pp + p0);
      for (int k = 0; k < 9; ++k) acc[k] += x * nb[k * C + c];
    }
    for (int k = 0; k < 9; ++k) store(L + k * Pp + p0, acc[k]);
  }
}

// part[k * C + c] = sum_p At[k * Pp + p] X[c * Pp + p] (lane sums, then a tree over the lanes).
template <typename T>
FV_CPU_CLONES void aggregate(int64_t C, int64_t Pp, const T* __restrict X, const T* __restrict At, T* __restrict part) {
  for (int64_t c = 0; c < C; ++c) {
    Vec<T> acc[9] = {};
    for (int64_t p0 = 0; p0 < Pp; p0 += kLanes) {
      const Vec<T> x = load(X + c * Pp + p0);
      for (int k = 0; k < 9; ++k) acc[k] += load(At + k * Pp + p0) * x;
    }
    const Vec<T> sums = reduce8<T>(acc);
    for (int k = 0; k < 8; ++k) part[k * C + c] = sums[k];
    part[8 * C + c] = reduce1<T>(acc[8]);
  }
}

// Y[c][p] = sum_k At[k * Pp + p] nb[k * C + c], chunk by chunk of pixels, into
// Y + chunk_at(p0) + c * c_stride: the scratch block (c_stride = Pp), or, for a full cell
// whose rows are whole chunks, the image itself (its stores then interleave with the
// products instead of following them in a burst).
template <typename T, typename ChunkAt>
FV_CPU_CLONES void spread(int64_t C, int64_t Pp, const T* __restrict At, const T* __restrict nb, T* __restrict Y,
                          int64_t c_stride, ChunkAt chunk_at) {
  for (int64_t p0 = 0; p0 < Pp; p0 += kLanes) {
    Vec<T> a[9];
    for (int k = 0; k < 9; ++k) a[k] = load(At + k * Pp + p0);
    T* y = Y + chunk_at(p0);
    for (int64_t c = 0; c < C; ++c) {
      Vec<T> acc = {};
      for (int k = 0; k < 9; ++k) acc += a[k] * nb[k * C + c];
      store(y + c * c_stride, acc);
    }
  }
}

// sums[r] = sum_p M[r * Pp + p] for r < rows (lane sums, then a tree over the lanes).
template <typename T>
FV_CPU_CLONES void row_sums(const T* __restrict M, int64_t rows, int64_t Pp, T* __restrict sums) {
  for (int64_t r = 0; r < rows; ++r) {
    Vec<T> acc = {};
    for (int64_t p0 = 0; p0 < Pp; p0 += kLanes) acc += load(M + r * Pp + p0);
    sums[r] = reduce1<T>(acc);
  }
}

// In place, per pixel p: L[k * Pp + p] becomes the softmax over k of scale * L[k * Pp + p];
// the tail past P is set to zero. Vectorised over pixels.
template <typename T>
FV_CPU_CLONES void softmax9(T* L, int64_t P, int64_t Pp, T scale) {
  for (int64_t p0 = 0; p0 < Pp; p0 += kLanes) {
    T mx[kLanes], sum[kLanes] = {};
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) mx[j] = L[p0 + j] * scale;
    for (int k = 1; k < 9; ++k)
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) mx[j] = std::max(mx[j], L[k * Pp + p0 + j] * scale);
    for (int k = 0; k < 9; ++k)
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const T e = exp_fast(L[k * Pp + p0 + j] * scale - mx[j]);
        L[k * Pp + p0 + j] = e;
        sum[j] += e;
      }
    for (int k = 0; k < 9; ++k)
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) L[k * Pp + p0 + j] *= T(1) / sum[j];
  }
  for (int k = 0; k < 9; ++k) std::fill(L + k * Pp + P, L + (k + 1) * Pp, T(0));
}

// row[c] = scale * sum_k part[sender(tok, k)][k][c] for token `tok` of batch b, in the
// fixed order k = 0..8 (part: (batch, N, 9, C)).
template <typename T>
void fold_token(const Geometry& g, const T* part, int64_t b, int64_t tok, T scale, T* row) {
  const int64_t C = g.n.C;
  std::fill(row, row + C, T(0));
  for (int k = 0; k < 9; ++k) {
    const int64_t s = g.sender(tok, k);
    if (s < 0) continue;
    const T* src = part + ((b * g.N + s) * 9 + k) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) row[c] += src[c];
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) row[c] *= scale;
}

// Every token from the per-cell partial sums, scaled by 1 / (den + eps) where den
// (batch * N) is given: into rows (batch, N, C) and / or out (batch, C, N), where given.
template <typename T>
void fold_all(const Geometry& g, const T* part, const T* den, T* rows, T* out) {
  const int64_t C = g.n.C, N = g.N;
  parallel_for(g.op, 0, g.n.B * N, std::max<int64_t>(1, g.grain() * g.P), [&](int64_t begin, int64_t end) {
    std::vector<T> tmp(rows ? 0 : C);
    for (int64_t id = begin; id < end; ++id) {
      const int64_t b = id / N, t = id % N;
      T* row = rows ? rows + id * C : tmp.data();
      fold_token(g, part, b, t, den ? T(1) / (den[id] + static_cast<T>(kEps)) : T(1), row);
      if (out)
        for (int64_t c = 0; c < C; ++c) out[(b * C + c) * N + t] = row[c];
    }
  });
}

// ---------------------------------------------------------------------------
// Sampling

// row[c] = the mean of a cell's padded pixels of channel c (X: its gathered block).
template <typename T>
void pool(const Geometry& g, const T* X, T* row) {
  row_sums(X, g.n.C, g.Pp, row);
  for (int64_t c = 0; c < g.n.C; ++c) row[c] /= static_cast<T>(g.P);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> sampling_forward(const Geometry& g, const Tensor& xt, int64_t n_iter) {
  const StSizes& n = g.n;
  const char* op = g.op;
  const int64_t C = n.C, P = g.P, Pp = g.Pp, N = g.N, tasks = n.B * N;
  const ScalarType acc = acc_scalar_type<T>();
  const T* x = xt.const_data_ptr<T>();
  Tensor stokens = alloc_empty(op, "stokens", xt, n.tokens(), acc);
  Tensor affinity = alloc_empty(op, "affinity", xt, n.affinity(), acc);
  Tensor asum = alloc_empty(op, "asum", xt, n.asum(), acc);
  std::vector<T> tok = host_vector<T>(op, "super token rows", n_iter > 1 ? tasks * C : 0);
  std::vector<T> part = host_vector<T>(op, "per-cell partial sums", tasks * 9 * C);
  std::vector<T> psum = host_vector<T>(op, "per-cell affinity sums", tasks * 9);
  T* aff = affinity.mutable_data_ptr<T>();
  T* den = asum.mutable_data_ptr<T>();  // every iteration's affinity sums; the last one's stay

  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(C)));
  for (int64_t it = 0; it < n_iter; ++it) {
    const bool last = it == n_iter - 1;
    // Pass 1, per cell: logits, softmax, the 9 partial sums (one read of x).
    parallel_for(op, 0, tasks, g.grain(), [&](int64_t begin, int64_t end) {
      CellScratch<T> s(g);
      // The first iteration's tokens are the cells' means (STViT's adaptive average pool),
      // pooled a band (row of cells) ahead of the cells that read them, from the blocks
      // that pass 1 then reads: a ring of 2 bands, so x is read once. Each chunk pools the
      // bands it reads (bands at a chunk's edges twice: the same values).
      // The pooled rows are held for the chunk's bands and their neighbours only.
      const int64_t band_size = n.ww * C * Pp;
      const int64_t first_band = std::max<int64_t>(begin / n.ww - 1, 0);
      const int64_t n_bands = std::min<int64_t>((end - 1) / n.ww + 1, n.B * n.hh - 1) - first_band + 1;
      std::vector<T> bands = host_vector<T>(op, "gathered bands", (it == 0 ? 2 : 1) * band_size);
      std::vector<T> pooled = host_vector<T>(op, "pooled tokens", it == 0 ? n_bands * n.ww * C : 0);
      int64_t have = -1;  // the last band gathered
      for (int64_t id = begin; id < end; ++id) {
        const int64_t b = id / N, t = id % N, i = t / n.ww, band = id / n.ww;
        const T* X;
        if (it == 0) {
          const int64_t hi = i + 1 < n.hh ? band + 1 : band;
          for (int64_t nb = std::max(have + 1, i > 0 ? band - 1 : band); nb <= hi; have = nb++) {
            T* Xb = bands.data() + (nb % 2) * band_size;
            gather_band(g, x, nb, Xb);
            for (int64_t j = 0; j < n.ww; ++j)
              pool(g, Xb + j * C * Pp, pooled.data() + ((nb - first_band) * n.ww + j) * C);
          }
          X = bands.data() + (band % 2) * band_size + (t % n.ww) * C * Pp;
        } else {
          if (band != have) gather_band(g, x, have = band, bands.data());
          X = bands.data() + (t % n.ww) * C * Pp;
        }
        if (it == 0)
          neighbours(g, pooled.data(), first_band * n.ww, b, t, s.nb.data());
        else
          neighbours(g, tok.data(), 0, b, t, s.nb.data());
        associate(C, Pp, X, s.nb.data(), s.At.data());
        softmax9(s.At.data(), P, Pp, scale);
        if (last) transpose_out(g, s.At.data(), aff + id * P * 9);
        aggregate(C, Pp, X, s.At.data(), part.data() + id * 9 * C);
        row_sums(s.At.data(), 9, Pp, psum.data() + id * 9);  // the tail past P is zero
      }
    });
    // Pass 2, per token: its affinity sum (fixed order k = 0..8), then the normalised fold.
    for (int64_t id = 0; id < tasks; ++id) {
      const int64_t b = id / N, t = id % N;
      T d = 0;
      for (int k = 0; k < 9; ++k) {
        const int64_t s = g.sender(t, k);
        if (s >= 0) d += psum[(b * N + s) * 9 + k];
      }
      den[id] = d;
    }
    fold_all(g, part.data(), static_cast<const T*>(den), last ? static_cast<T*>(nullptr) : tok.data(),
             last ? stokens.mutable_data_ptr<T>() : static_cast<T*>(nullptr));
  }
  return {stokens, affinity, asum};
}

// img = every cell's spread of its neighbour tokens (from rows (batch, N, C)) through
// the affinity `aff`; every valid pixel of img is written.
template <typename T>
void spread_all(const Geometry& g, const T* rows, const T* aff, T* img) {
  const int64_t C = g.n.C, P = g.P, Pp = g.Pp, N = g.N;
  parallel_for(g.op, 0, g.n.B * N, g.grain(), [&](int64_t begin, int64_t end) {
    CellScratch<T> s(g);
    std::vector<T> Y(C * Pp);  // a cell's output block, where it cannot go straight to img
    for (int64_t id = begin; id < end; ++id) {
      const int64_t b = id / N, t = id % N;
      neighbours(g, rows, 0, b, t, s.nb.data());
      transpose_in(g, aff + id * P * 9, s.At.data());
      const CellView v(g, b, t);
      if (v.full(g) && g.n.w % kLanes == 0) {
        const int64_t w = g.n.w;
        spread(C, Pp, s.At.data(), s.nb.data(), img + v.at(g, 0, 0), g.n.H0 * g.n.W0,
               [&](int64_t p0) { return (p0 / w) * g.n.W0 + p0 % w; });
      } else {
        spread(C, Pp, s.At.data(), s.nb.data(), Y.data(), Pp, [](int64_t p0) { return p0; });
        scatter(g, Y.data(), v, img);
      }
    }
  });
}

// dx = spread of dstokens / (asum + eps): the transpose of the final aggregation.
template <typename T>
Tensor sampling_backward(const Geometry& g, const Tensor& dst, const Tensor& affinity, const Tensor& asum) {
  const int64_t tasks = g.n.B * g.N;
  std::vector<T> inv = host_vector<T>(g.op, "token scales", tasks);
  const T* den = asum.const_data_ptr<T>();
  for (int64_t id = 0; id < tasks; ++id) inv[id] = T(1) / (den[id] + static_cast<T>(kEps));
  const std::vector<T> rows = token_rows(g, dst.const_data_ptr<T>(), inv.data());
  Tensor dx = alloc_empty(g.op, "dx", dst, g.n.image(), acc_scalar_type<T>());
  spread_all(g, rows.data(), affinity.const_data_ptr<T>(), dx.mutable_data_ptr<T>());
  return dx;
}

// ---------------------------------------------------------------------------
// Upsampling

template <typename T>
Tensor upsample_forward(const Geometry& g, const Tensor& st, const Tensor& affinity) {
  const std::vector<T> rows = token_rows(g, st.const_data_ptr<T>(), static_cast<const T*>(nullptr));
  Tensor out = alloc_empty(g.op, "out", st, g.n.image(), acc_scalar_type<T>());
  spread_all(g, rows.data(), affinity.const_data_ptr<T>(), out.mutable_data_ptr<T>());
  return out;
}

// dstokens (the adjoint of spread in the tokens: aggregate, then fold) and, when
// `with_daffinity`, daffinity (associate dout's pixels with the neighbour tokens).
template <typename T>
std::tuple<Tensor, Tensor> upsample_backward(const Geometry& g, const Tensor& dout, const Tensor& st,
                                             const Tensor& affinity, bool with_daffinity) {
  const StSizes& n = g.n;
  const int64_t C = n.C, P = g.P, Pp = g.Pp, N = g.N, tasks = n.B * N;
  std::vector<T> part = host_vector<T>(g.op, "per-cell partial sums", tasks * 9 * C);
  const std::vector<T> rows =
      with_daffinity ? token_rows(g, st.const_data_ptr<T>(), static_cast<const T*>(nullptr)) : std::vector<T>();
  const std::vector<int64_t> daff_shape = with_daffinity ? n.affinity() : std::vector<int64_t>{0};
  Tensor daff = alloc_empty(g.op, "daffinity", affinity, daff_shape, acc_scalar_type<T>());
  Tensor dst = alloc_empty(g.op, "dstokens", st, n.tokens(), acc_scalar_type<T>());
  const T* go = dout.const_data_ptr<T>();
  const T* aff = affinity.const_data_ptr<T>();
  T* da = daff.mutable_data_ptr<T>();
  parallel_for(g.op, 0, tasks, g.grain(), [&](int64_t begin, int64_t end) {
    CellScratch<T> s(g);
    std::vector<T> band(n.ww * C * Pp, T(0));  // a row of cells of dout (cropped pixels: zeros)
    int64_t have = -1;
    for (int64_t id = begin; id < end; ++id) {
      const int64_t b = id / N, t = id % N;
      if (id / n.ww != have) gather_band(g, go, have = id / n.ww, band.data());
      const T* X = band.data() + (t % n.ww) * C * Pp;
      if (with_daffinity) {  // At holds the daffinity, transposed, first
        neighbours(g, rows.data(), 0, b, t, s.nb.data());
        associate(C, Pp, X, s.nb.data(), s.At.data());
        transpose_out(g, s.At.data(), da + id * P * 9);
        for (int k = 0; k < 9; ++k)  // the tail is 0 * nb: NaN for infinite tokens
          std::fill(s.At.data() + k * Pp + P, s.At.data() + (k + 1) * Pp, T(0));
      }
      transpose_in(g, aff + id * P * 9, s.At.data());
      aggregate(C, Pp, X, s.At.data(), part.data() + id * 9 * C);
    }
  });
  fold_all(g, part.data(), static_cast<const T*>(nullptr), static_cast<T*>(nullptr), dst.mutable_data_ptr<T>());
  return {dst, daff};
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp).

Geometry geometry(const char* op, const StSizes& n) {
  return Geometry{op, n, n.hh * n.ww, n.h * n.w, ceil_div(n.h * n.w, kLanes) * kLanes};
}

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
                                                        std::vector<int64_t> stoken_size, bool affinity_grad) {
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
  auto [dst, daff] = n.acc == ScalarType::Double ? upsample_backward<double>(g, go, s, affinity, affinity_grad)
                                                 : upsample_backward<float>(g, go, s, affinity, affinity_grad);
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
