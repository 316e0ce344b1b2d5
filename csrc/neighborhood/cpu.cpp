// CPU kernels of neighborhood attention (NA / dilated NA): fused forward and
// backward for 1-3 spatial axes, layout heads-last as NATTEN's,
// query (B, *spatial, H, D), key (B, *spatial, Hkv, D), value (B, *spatial, Hkv, Dv).
//
// Every problem is run as a 3-D one (missing leading axes have length 1 and
// kernel 1). The window rule lives in neighborhood.h; per axis it is tabulated
// once per call (the window of every query; for the backward also the inverse
// window of every key: the queries whose window holds it).
//
// Forward: tasks of (batch, head, run of consecutive queries) in parallel.
// For each query: list the key rows of its window, their logits (dot
// products, eight rows reduced together), max / exp / sum over the window in
// a per-task scratch of window size (reused for every query: no k^d tensor is
// kept), then the weighted sum of value rows in registers. Only out and the
// logsumexp (lse) are stored.
//
// Backward (recomputes from out and lse; Delta_i = rowsum(dout_i * out_i) - dlse_i,
// P = exp(S - lse), dS = P * (dP - Delta)):
//  1. query pass, tasks of (batch, head, run of queries): Delta, dquery =
//     scale * sum_j dS_ij k_j, and the rpb gradient (sum of dS by bias index)
//     into per-slot partial buffers (a slot is a fixed group of tasks; memory
//     slots * heads * prod(2k - 1), independent of the input size), summed
//     at the end;
//  2. key pass, tasks of (batch, kv head, run of keys): each key walks its
//     inverse window for every query head sharing the kv head, recomputes
//     P and dS there and accumulates dkey = scale * sum_i dS_ij q_i and
//     dvalue = sum_i P_ij dout_i. Each key row is written by exactly one
//     task: no races, no atomics, no O(queries * window) buffers. (The price:
//     the logits and dP are computed twice, once per pass.)
//
// float and double kernels; half and bfloat16 are widened to float on entry
// (fp32 accumulation; a float copy of the inputs) and outputs narrowed on exit.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../common/dtype.h"
#include "../common/parallel.h"
#include "checks.h"
#include "neighborhood.h"

#define FV_INLINE inline __attribute__((always_inline))
#define FV_LAMBDA_INLINE __attribute__((always_inline))

namespace fastvision::na {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

struct Axis {
  int64_t L = 1, k = 1, d = 1, s = 1;
  bool causal = false;
};

// Sizes, rule parameters and per-axis tables of one call.
struct Problem {
  const char* op = "na_fwd";  // the entry point, for error messages
  int64_t B = 0, N = 1, H = 1, Hkv = 1, D = 1, Dv = 1;
  Axis ax[3];
  int64_t R[3] = {1, 1, 1};  // rpb extents per (padded) axis
  bool has_rpb = false;
  double scale = 1.0;
  std::vector<AxisRun> win[3], inv[3];  // per position: keys of a query, queries of a key
  std::vector<int64_t> order[3];         // per axis: positions group by group (visit order)
  int64_t max_win = 1, max_inv = 1;      // largest window / inverse window (all axes)

  int64_t group() const { return H / Hkv; }
};

// Tabulates every query's window per axis and, for the backward, every
// key's inverse window.
void tabulate(Problem& p, bool inverse) {
  for (int a = 0; a < 3; ++a) {
    const Axis& x = p.ax[a];
    p.order[a].clear();
    for (int64_t g = 0; g < x.d; ++g)
      for (int64_t i = g; i < x.L; i += x.d) p.order[a].push_back(i);
    p.win[a].resize(x.L);
    int64_t mw = 0, mi = 0;
    for (int64_t i = 0; i < x.L; ++i) {
      p.win[a][i] = axis_window(i, x.L, x.k, x.d, x.s, x.causal);
      mw = std::max(mw, p.win[a][i].count);
    }
    if (inverse) {
      p.inv[a].resize(x.L);
      for (int64_t j = 0; j < x.L; ++j) {
        p.inv[a][j] = axis_inverse(j, x.L, x.k, x.d, x.s, x.causal);
        mi = std::max(mi, p.inv[a][j].count);
      }
    }
    p.max_win *= std::max<int64_t>(mw, 1);
    p.max_inv *= std::max<int64_t>(mi, 1);
  }
}

// Fills the problem description from arguments checked by check_na_inputs.
Problem make_problem(const char* op, const NaSizes& n, double scale, bool backward) {
  Problem p;
  p.op = op;
  p.B = n.B;
  p.H = n.H;
  p.D = n.D;
  p.Hkv = n.Hkv;
  p.Dv = n.Dv;
  p.scale = scale;
  for (int64_t a = 0; a < n.nd; ++a) {
    Axis& x = p.ax[3 - n.nd + a];
    x.L = n.L[a];
    x.k = n.k[a];
    x.d = n.d[a];
    x.s = n.s[a];
    x.causal = n.causal[a];
    p.N *= x.L;
    if (n.has_rpb) p.R[3 - n.nd + a] = 2 * x.k - 1;
  }
  p.has_rpb = n.has_rpb;
  try {
    // An empty batch has no tasks: no tables (its axes may be huge).
    if (p.B > 0) tabulate(p, backward);
  } catch (const std::bad_alloc&) {
    throw_oom(op, "window tables", "one entry per position of each spatial axis");
  }
  return p;
}

// The tensor in the kernel's dtype `acc` (the accumulate dtype of query's;
// a no-op when it has it already).
Tensor widen(const char* op, const char* what, const Tensor& t, ScalarType acc) {
  return alloc_cast(op, std::string(what) + " in " + dtype_name(acc), t, acc);
}

// Runs body(scratch, id) for id in [0, count): one worker per thread, each
// with its own scratch (make_scratch()), taking the next id from a shared
// counter. Dynamic rather than static shares: on a busy machine a thread that
// is descheduled holds back the others by one task at most, not by half the
// work. Problems too small to pay for waking the thread pool (gradcheck-sized)
// run on the calling thread.
template <typename MakeScratch, typename Body>
void run_tasks(const Problem& p, int64_t count, MakeScratch&& make_scratch, Body&& body) {
  if (count <= 0) return;
  const double work = static_cast<double>(p.B) * p.H * p.N * p.max_win * (p.D + p.Dv);
  const int64_t threads = work < 2.0e5 ? 1 : static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t workers = std::clamp<int64_t>(threads, 1, count);
  std::atomic<int64_t> next{0};
  parallel_for(p.op, 0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      auto scratch = make_scratch();
      for (int64_t id = next.fetch_add(1, std::memory_order_relaxed); id < count;
           id = next.fetch_add(1, std::memory_order_relaxed))
        body(scratch, id);
    }
  });
}

// Splits `count` items of `outer` independent rows into runs so that there
// are several tasks per thread.
int64_t run_length(int64_t outer, int64_t count) {
  if (count <= 0) return 1;
  const int64_t want = 8 * static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t runs = std::clamp<int64_t>(ceil_div(want, std::max<int64_t>(outer, 1)), 1,
                                           std::max<int64_t>(ceil_div(count, 16), 1));
  return ceil_div(count, runs);
}

// ---------------------------------------------------------------------------
// Inner loops (inlined into the cloned task functions, so they are compiled
// for each clone's ISA). A task first lists the rows a query (or key) meets
// (offsets into key/value or query/dout), then runs dot products over that
// list, a vectorised softmax step, and weighted sums of rows.
//
// Head dims known at compile time (KD; float; a multiple of 8) go through GCC
// vector extensions: 8-lane vectors (AVX2 registers in the x86-64-v3 clone,
// pairs of SSE registers in the baseline one), eight dot products reduced
// together, accumulators held in registers. Other head dims (and float64)
// take plain loops the compiler vectorises.

// The helpers are always inlined, so passing 32-byte vectors by value never
// crosses a function boundary in the baseline (non-AVX) clone.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
#if defined(__clang__) || __GNUC__ >= 12
#define FV_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int v8i __attribute__((vector_size(32)));
#define FV_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

FV_INLINE v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
FV_INLINE void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Pairwise sums within each 128-bit half: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, ...].
FV_INLINE v8f hadd8(v8f a, v8f b) {
  return FV_SHUFFLE8(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         FV_SHUFFLE8(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// The lane sums of eight vectors, as one vector.
FV_INLINE v8f reduce8(const v8f a[8]) {
  const v8f u0 = hadd8(hadd8(a[0], a[1]), hadd8(a[2], a[3]));
  const v8f u1 = hadd8(hadd8(a[4], a[5]), hadd8(a[6], a[7]));
  return FV_SHUFFLE8(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
         FV_SHUFFLE8(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

template <typename T, int KD>
inline constexpr bool kVector = KD > 0 && KD % 8 == 0 && std::is_same_v<T, float>;

template <typename T>
FV_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < n; ++e) s += a[e] * b[e];
  return s;
}

// out[m] = x . base[off[m] : off[m] + len] for m < n.
template <typename T, int KD>
FV_INLINE void dots(const T* __restrict x, const T* __restrict base, const int64_t* __restrict off,
                    int64_t n, int64_t len, T* __restrict out) {
  if constexpr (kVector<T, KD>) {
    constexpr int V = KD / 8;
    v8f xv[V];
#pragma GCC unroll 16
    for (int t = 0; t < V; ++t) xv[t] = load8(x + 8 * t);
    int64_t m = 0;
    for (; m + 8 <= n; m += 8) {
      v8f acc[8];
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        const float* __restrict row = base + off[m + r];
        acc[r] = xv[0] * load8(row);
#pragma GCC unroll 16
        for (int t = 1; t < V; ++t) acc[r] += xv[t] * load8(row + 8 * t);
      }
      store8(out + m, reduce8(acc));
    }
    if (m < n) {  // the last rows, reduced together like a full block
      const int64_t rem = n - m;
      v8f acc[8];
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        acc[r] = v8f{};
        if (r < rem) {
          const float* __restrict row = base + off[m + r];
#pragma GCC unroll 16
          for (int t = 0; t < V; ++t) acc[r] += xv[t] * load8(row + 8 * t);
        }
      }
      const v8f sums = reduce8(acc);
      for (int r = 0; r < rem; ++r) out[m + r] = sums[r];
    }
  } else {
    for (int64_t m = 0; m < n; ++m) out[m] = dot(x, base + off[m], len);
  }
}

// acc[0:len] (+)= sum_m w[m] * base[off[m] : off[m] + len]; acc is
// overwritten unless `accumulate`. With KD the accumulator stays in registers
// across the rows (through memory, each row would wait on the previous
// row's store), in column blocks of at most 64.
template <typename T, int KD>
FV_INLINE void weighted_rows(const T* __restrict w, const int64_t* __restrict off, int64_t n,
                             const T* __restrict base, int64_t len, T* __restrict acc, bool accumulate) {
  if constexpr (kVector<T, KD>) {
    constexpr int V = KD / 8, CB = V < 8 ? V : 8;
    static_assert(V % CB == 0, "head dim must be a multiple of 64 above 64");
#pragma GCC unroll 1
    for (int c0 = 0; c0 < V; c0 += CB) {
      v8f r[CB];
#pragma GCC unroll 8
      for (int t = 0; t < CB; ++t) r[t] = accumulate ? load8(acc + 8 * (c0 + t)) : v8f{};
      for (int64_t m = 0; m < n; ++m) {
        const float* __restrict row = base + off[m] + 8 * c0;
        const v8f wm = w[m] + v8f{};
#pragma GCC unroll 8
        for (int t = 0; t < CB; ++t) r[t] += wm * load8(row + 8 * t);
      }
#pragma GCC unroll 8
      for (int t = 0; t < CB; ++t) store8(acc + 8 * (c0 + t), r[t]);
    }
  } else {
    if (!accumulate)
      for (int64_t e = 0; e < len; ++e) acc[e] = T(0);
    for (int64_t m = 0; m < n; ++m) {
      const T* __restrict row = base + off[m];
      const T wm = w[m];
#pragma omp simd
      for (int64_t e = 0; e < len; ++e) acc[e] += wm * row[e];
    }
  }
}

// Per-thread scratch of the task functions: window- (or inverse-window-)
// sized rows and head_dim-sized accumulators.
template <typename T>
struct Scratch {
  std::vector<T> s, dp, pr, bias, sub, qs, acc, acc2;
  std::vector<int64_t> off, off2, ridx;
  Scratch(int64_t window, int64_t D, int64_t Dv)
      : s(window), dp(window), pr(window), bias(window), sub(window), qs(D),
        acc(std::max(D, Dv)), acc2(std::max(D, Dv)), off(window), off2(window), ridx(window) {}
};

// Walks the positions of the padded 3-D grid in visit order: row-major over
// the axes, and along each axis dilation group by group, so that consecutive
// queries (keys) share most of their windows and cache lines. Visit index t
// -> coordinates c and flat position pos, one division per task.
struct Cursor {
  int64_t t[3], c[3], pos;
  const Problem& p;
  Cursor(const Problem& pr, int64_t t0) : p(pr) {
    const int64_t L1 = p.ax[1].L, L2 = p.ax[2].L;
    t[2] = t0 % L2;
    t[1] = (t0 / L2) % L1;
    t[0] = t0 / (L2 * L1);
    for (int a = 0; a < 3; ++a) c[a] = t[a] < p.ax[a].L ? p.order[a][t[a]] : 0;
    pos = (c[0] * L1 + c[1]) * L2 + c[2];
  }
  FV_INLINE void next() {
    int a = 2;
    while (a > 0 && t[a] + 1 == p.ax[a].L) {
      t[a] = 0;
      c[a] = p.order[a][0];
      --a;
    }
    ++t[a];
    c[a] = t[a] < p.ax[a].L ? p.order[a][t[a]] : 0;  // past the end: never used
    pos = (c[0] * p.ax[1].L + c[1]) * p.ax[2].L + c[2];
  }
};

// Calls f(n, flat position, rpb index within a head) for the n-th position of
// the product of three axis runs. `sign` is +1 for windows (rpb index grows
// with the run) and -1 for inverse windows.
template <typename F>
FV_INLINE int64_t for_each(const Problem& p, const AxisRun r[3], int64_t sign, F&& f) {
  const int64_t L1 = p.ax[1].L, L2 = p.ax[2].L;
  const int64_t d0 = p.ax[0].d, d1 = p.ax[1].d, d2 = p.ax[2].d;
  const int64_t R1 = p.R[1], R2 = p.R[2];
  int64_t n = 0;
  for (int64_t m0 = 0; m0 < r[0].count; ++m0) {
    const int64_t x0 = r[0].first + m0 * d0;
    const int64_t b0 = r[0].rpb_first + sign * m0;
    for (int64_t m1 = 0; m1 < r[1].count; ++m1) {
      const int64_t row = (x0 * L1 + r[1].first + m1 * d1) * L2 + r[2].first;
      const int64_t b01 = ((b0 * R1) + r[1].rpb_first + sign * m1) * R2 + r[2].rpb_first;
      for (int64_t m2 = 0; m2 < r[2].count; ++m2) f(n++, row + m2 * d2, b01 + sign * m2);
    }
  }
  return n;
}

// Calls f(std::integral_constant<int, KD>) with KD the head dim when query and
// value share one of the common ones (float only), else 0 (runtime head dims).
template <typename T, typename F>
void with_head_dim(const Problem& p, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.D == p.Dv) {
      switch (p.D) {
        case 16: return f(std::integral_constant<int, 16>{});
        case 32: return f(std::integral_constant<int, 32>{});
        case 64: return f(std::integral_constant<int, 64>{});
        case 128: return f(std::integral_constant<int, 128>{});
        default: break;
      }
    }
  }
  f(std::integral_constant<int, 0>{});
}

// ---------------------------------------------------------------------------
// Forward.

template <typename T>
struct FwdArgs {
  const T *q, *k, *v, *rpb;
  T *out, *lse;
};

template <typename T, int KD>
FV_CPU_CLONES void forward_task(const Problem& p, const FwdArgs<T>& a, int64_t b, int64_t h,
                                int64_t i0, int64_t i1, Scratch<T>& w_) {
  const int64_t D = KD ? KD : p.D, Dv = KD ? KD : p.Dv, hk = h / p.group();
  const int64_t ks = p.Hkv * D, vs = p.Hkv * Dv;
  const T* kb = a.k + b * p.N * ks + hk * D;
  const T* vb = a.v + b * p.N * vs + hk * Dv;
  const T* rb = a.rpb ? a.rpb + h * p.R[0] * p.R[1] * p.R[2] : nullptr;
  const T scale = static_cast<T>(p.scale);
  T *sc = w_.s.data(), *bias = w_.bias.data(), *qs = w_.qs.data(), *acc = w_.acc.data();
  int64_t *off = w_.off.data(), *off2 = w_.off2.data();
  Cursor cur(p, i0);
  for (int64_t t = i0; t < i1; ++t, cur.next()) {
    const int64_t i = cur.pos, *c = cur.c;
    const AxisRun w[3] = {p.win[0][c[0]], p.win[1][c[1]], p.win[2][c[2]]};
    const int64_t row = (b * p.N + i) * p.H + h;
    const T* qi = a.q + row * D;
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) qs[e] = qi[e] * scale;
    const int64_t n = for_each(p, w, 1, [&](int64_t m, int64_t j, int64_t r) FV_LAMBDA_INLINE {
      off[m] = j * ks;
      off2[m] = j * vs;
      if (rb) bias[m] = rb[r];
    });
    dots<T, KD>(qs, kb, off, n, D, sc);
    if (rb) {
#pragma omp simd
      for (int64_t m = 0; m < n; ++m) sc[m] += bias[m];
    }
    T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t m = 0; m < n; ++m) mx = sc[m] > mx ? sc[m] : mx;
    // An all -inf window (only from -inf inputs) gives NaN, like the reference.
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t m = 0; m < n; ++m) {
      sc[m] = exp_fast(sc[m] - mx);
      sum += sc[m];
    }
    weighted_rows<T, KD>(sc, off2, n, vb, Dv, acc, false);
    const T inv = T(1) / sum;
    T* o = a.out + row * Dv;
#pragma omp simd
    for (int64_t e = 0; e < Dv; ++e) o[e] = acc[e] * inv;
    a.lse[row] = mx + std::log(sum);
  }
}

template <typename T>
std::tuple<Tensor, Tensor> forward_impl(const Problem& p, const Tensor& q, const Tensor& k,
                                        const Tensor& v, const std::optional<Tensor>& rpb) {
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.Dv;
  std::vector<int64_t> lse_shape(q.sizes().begin(), q.sizes().end() - 1);
  const ScalarType t = acc_dtype(q.scalar_type());
  Tensor out = alloc_empty(p.op, "out", q, out_shape, t);
  Tensor lse = alloc_empty(p.op, "lse", q, lse_shape, t);
  FwdArgs<T> a{q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
               rpb ? rpb->const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>(),
               lse.mutable_data_ptr<T>()};
  const int64_t run = run_length(p.B * p.H, p.N), runs = ceil_div(p.N, run);
  with_head_dim<T>(p, [&](auto kd) {
    constexpr int KD = decltype(kd)::value;
    run_tasks(
        p, p.B * p.H * runs, [&] { return Scratch<T>(p.max_win, p.D, p.Dv); },
        [&](Scratch<T>& w, int64_t id) {
          const int64_t part = id % runs, bh = id / runs;
          const int64_t i0 = part * run, i1 = std::min(i0 + run, p.N);
          forward_task<T, KD>(p, a, bh / p.H, bh % p.H, i0, i1, w);
        });
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Backward.

template <typename T>
struct BwdArgs {
  const T *q, *k, *v, *rpb, *out, *dout, *lse, *dlse;
  T *delta, *dq, *dk, *dv;
};

// Query pass over queries [i0, i1) of (b, h): Delta, dquery, rpb gradient
// (added into drpb, this slot's partial for head h).
template <typename T, int KD>
FV_CPU_CLONES void backward_query_task(const Problem& p, const BwdArgs<T>& a, int64_t b, int64_t h,
                                       int64_t i0, int64_t i1, T* drpb, Scratch<T>& w_) {
  const int64_t D = KD ? KD : p.D, Dv = KD ? KD : p.Dv, hk = h / p.group();
  const int64_t ks = p.Hkv * D, vs = p.Hkv * Dv;
  const T* kb = a.k + b * p.N * ks + hk * D;
  const T* vb = a.v + b * p.N * vs + hk * Dv;
  const T* rb = a.rpb ? a.rpb + h * p.R[0] * p.R[1] * p.R[2] : nullptr;
  const T scale = static_cast<T>(p.scale);
  T *sc = w_.s.data(), *dp = w_.dp.data(), *bias = w_.bias.data(), *qs = w_.qs.data();
  T* acc = w_.acc.data();
  int64_t *off = w_.off.data(), *off2 = w_.off2.data(), *ridx = w_.ridx.data();
  Cursor cur(p, i0);
  for (int64_t t = i0; t < i1; ++t, cur.next()) {
    const int64_t i = cur.pos, *c = cur.c;
    const AxisRun w[3] = {p.win[0][c[0]], p.win[1][c[1]], p.win[2][c[2]]};
    const int64_t row = (b * p.N + i) * p.H + h;
    const T* go = a.dout + row * Dv;
    const T delta = dot(go, a.out + row * Dv, Dv) - (a.dlse ? a.dlse[row] : T(0));
    a.delta[row] = delta;
    const T lse = a.lse[row];
    const T* qi = a.q + row * D;
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) qs[e] = qi[e] * scale;
    const int64_t n = for_each(p, w, 1, [&](int64_t m, int64_t j, int64_t r) FV_LAMBDA_INLINE {
      off[m] = j * ks;
      off2[m] = j * vs;
      ridx[m] = r;
    });
    dots<T, KD>(qs, kb, off, n, D, sc);
    dots<T, KD>(go, vb, off2, n, Dv, dp);
    if (rb)
      for (int64_t m = 0; m < n; ++m) bias[m] = rb[ridx[m]] - lse;
    else
      std::fill(bias, bias + n, -lse);
#pragma omp simd
    for (int64_t m = 0; m < n; ++m) sc[m] = exp_fast(sc[m] + bias[m]) * (dp[m] - delta);  // dS
    weighted_rows<T, KD>(sc, off, n, kb, D, acc, false);
    if (rb)
      for (int64_t m = 0; m < n; ++m) drpb[ridx[m]] += sc[m];
    T* o = a.dq + row * D;
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) o[e] = acc[e] * scale;
  }
}

// Key pass over keys [j0, j1) of (b, kv head hk): dkey, dvalue from the
// queries of every head sharing hk whose window holds the key. Per head: the
// logits and dP of all those queries (dot products), then P and dS in one
// vectorised loop, then the weighted sums of their query and dout rows.
template <typename T, int KD>
FV_CPU_CLONES void backward_key_task(const Problem& p, const BwdArgs<T>& a, int64_t b, int64_t hk,
                                     int64_t j0, int64_t j1, Scratch<T>& w_) {
  const int64_t D = KD ? KD : p.D, Dv = KD ? KD : p.Dv, H = p.H;
  const int64_t ks = p.Hkv * D, vs = p.Hkv * Dv;
  const T scale = static_cast<T>(p.scale);
  T *sc = w_.s.data(), *dp = w_.dp.data(), *pr = w_.pr.data(), *bias = w_.bias.data();
  T *sub = w_.sub.data(), *dkacc = w_.acc.data(), *dvacc = w_.acc2.data();
  int64_t *off = w_.off.data(), *off2 = w_.off2.data();
  Cursor cur(p, j0);
  for (int64_t t = j0; t < j1; ++t, cur.next()) {
    const int64_t j = cur.pos, *c = cur.c;
    const AxisRun w[3] = {p.inv[0][c[0]], p.inv[1][c[1]], p.inv[2][c[2]]};
    const T* kj = a.k + (b * p.N + j) * ks + hk * D;
    const T* vj = a.v + (b * p.N + j) * vs + hk * Dv;
    bool accumulate = false;
    for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
      const T* rb = a.rpb ? a.rpb + h * p.R[0] * p.R[1] * p.R[2] : nullptr;
      const int64_t n = for_each(p, w, -1, [&](int64_t m, int64_t i, int64_t r) FV_LAMBDA_INLINE {
        const int64_t row = (b * p.N + i) * H + h;
        off[m] = row * D;
        off2[m] = row * Dv;
        bias[m] = (rb ? rb[r] : T(0)) - a.lse[row];
        sub[m] = a.delta[row];
      });
      dots<T, KD>(kj, a.q, off, n, D, sc);
      dots<T, KD>(vj, a.dout, off2, n, Dv, dp);
#pragma omp simd
      for (int64_t m = 0; m < n; ++m) {
        pr[m] = exp_fast(sc[m] * scale + bias[m]);
        sc[m] = pr[m] * (dp[m] - sub[m]);  // dS
      }
      weighted_rows<T, KD>(sc, off, n, a.q, D, dkacc, accumulate);
      weighted_rows<T, KD>(pr, off2, n, a.dout, Dv, dvacc, accumulate);
      accumulate = true;
    }
    T* dko = a.dk + (b * p.N + j) * ks + hk * D;
    T* dvo = a.dv + (b * p.N + j) * vs + hk * Dv;
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) dko[e] = dkacc[e] * scale;
#pragma omp simd
    for (int64_t e = 0; e < Dv; ++e) dvo[e] = dvacc[e];
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> backward_impl(const Problem& p, const Tensor& dout,
                                                         const std::optional<Tensor>& dlse,
                                                         const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const std::optional<Tensor>& rpb,
                                                         const Tensor& out, const Tensor& lse) {
  const ScalarType t = acc_dtype(q.scalar_type());
  Tensor dq = alloc_empty(p.op, "dquery", q, sizes_of(q), t);
  Tensor dk = alloc_empty(p.op, "dkey", k, sizes_of(k), t);
  Tensor dv = alloc_empty(p.op, "dvalue", v, sizes_of(v), t);
  Tensor delta = alloc_empty(p.op, "rowsum(dout * out) scratch", lse, sizes_of(lse), t);
  BwdArgs<T> a{q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
               rpb ? rpb->const_data_ptr<T>() : nullptr, out.const_data_ptr<T>(),
               dout.const_data_ptr<T>(), lse.const_data_ptr<T>(),
               dlse ? dlse->const_data_ptr<T>() : nullptr, delta.mutable_data_ptr<T>(),
               dq.mutable_data_ptr<T>(), dk.mutable_data_ptr<T>(), dv.mutable_data_ptr<T>()};

  // 1. Query pass. With rpb, tasks are grouped into a fixed number of slots,
  //    each owning a partial rpb gradient of all heads, summed in slot order
  //    at the end (so the result does not depend on thread scheduling).
  const int64_t run = run_length(p.B * p.H, p.N), runs = ceil_div(p.N, run);
  const int64_t tasks = p.B * p.H * runs;
  const int64_t R = p.R[0] * p.R[1] * p.R[2];
  const int64_t slots = p.has_rpb ? std::clamp<int64_t>(4 * torch::stable::get_num_threads(), 1,
                                                        std::max<int64_t>(tasks, 1))
                                  : std::max<int64_t>(tasks, 1);
  std::vector<T> drpb_part = host_vector<T>(p.op, "drpb partial sums", p.has_rpb ? slots * p.H * R : 0, T(0));
  const int64_t active_slots = tasks > 0 ? slots : 0;
  // 2. Key pass, after the query pass (it reads Delta).
  const int64_t krun = run_length(p.B * p.Hkv, p.N), kruns = ceil_div(p.N, krun);
  with_head_dim<T>(p, [&](auto kd) {
    constexpr int KD = decltype(kd)::value;
    run_tasks(
        p, active_slots, [&] { return Scratch<T>(p.max_win, p.D, p.Dv); },
        [&](Scratch<T>& w, int64_t slot) {
          const int64_t t0 = slot * tasks / slots, t1 = (slot + 1) * tasks / slots;
          for (int64_t id = t0; id < t1; ++id) {
            const int64_t part = id % runs, bh = id / runs, h = bh % p.H;
            const int64_t i0 = part * run, i1 = std::min(i0 + run, p.N);
            T* dr = p.has_rpb ? drpb_part.data() + (slot * p.H + h) * R : nullptr;
            backward_query_task<T, KD>(p, a, bh / p.H, h, i0, i1, dr, w);
          }
        });
    run_tasks(
        p, p.B * p.Hkv * kruns, [&] { return Scratch<T>(p.max_inv, p.D, p.Dv); },
        [&](Scratch<T>& w, int64_t id) {
          const int64_t part = id % kruns, bh = id / kruns;
          const int64_t j0 = part * krun, j1 = std::min(j0 + krun, p.N);
          backward_key_task<T, KD>(p, a, bh / p.Hkv, bh % p.Hkv, j0, j1, w);
        });
  });

  Tensor drpb = alloc_empty(p.op, "drpb", q, {0}, t);
  if (p.has_rpb) {
    drpb = alloc_zeros(p.op, "drpb", *rpb, sizes_of(*rpb), t);
    T* d = drpb.mutable_data_ptr<T>();
    for (int64_t s = 0; s < active_slots; ++s) {
      const T* src = drpb_part.data() + s * p.H * R;
      for (int64_t e = 0; e < p.H * R; ++e) d[e] += src[e];
    }
  }
  return {dq, dk, dv, drpb};
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp).

std::tuple<Tensor, Tensor> na_fwd_cpu(Tensor query, Tensor key, Tensor value, std::optional<Tensor> rpb,
                                      std::vector<int64_t> kernel_size, std::vector<int64_t> dilation,
                                      std::vector<int64_t> stride, std::vector<bool> is_causal,
                                      double scale) {
  constexpr const char* op = "na_fwd";
  const NaSizes n = check_na_inputs(op, query, key, value, rpb, kernel_size, dilation, stride, is_causal);
  const Problem p = make_problem(op, n, scale, false);
  const ScalarType dtype = query.scalar_type(), acc = n.acc;
  const Tensor q = widen(op, "query", query, acc), k = widen(op, "key", key, acc), v = widen(op, "value", value, acc);
  std::optional<Tensor> r;
  if (rpb) r = widen(op, "rpb", *rpb, acc);
  auto [out, lse] = dtype == ScalarType::Double ? forward_impl<double>(p, q, k, v, r)
                                                : forward_impl<float>(p, q, k, v, r);
  return {alloc_cast(op, "out", out, dtype), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> na_bwd_cpu(
    Tensor dout, std::optional<Tensor> dlse, Tensor query, Tensor key, Tensor value,
    std::optional<Tensor> rpb, Tensor out, Tensor lse, std::vector<int64_t> kernel_size,
    std::vector<int64_t> dilation, std::vector<int64_t> stride, std::vector<bool> is_causal,
    double scale) {
  constexpr const char* op = "na_bwd";
  const NaSizes n = check_na_inputs(op, query, key, value, rpb, kernel_size, dilation, stride, is_causal);
  check_na_backward(op, n, dout, dlse, out, lse, query);
  const Problem p = make_problem(op, n, scale, true);
  const ScalarType dtype = query.scalar_type(), acc = n.acc;
  std::optional<Tensor> r;
  if (rpb) r = widen(op, "rpb", *rpb, acc);
  const Tensor q = widen(op, "query", query, acc), k = widen(op, "key", key, acc), v = widen(op, "value", value, acc);
  const Tensor o = widen(op, "out", out, acc), go = widen(op, "dout", dout, acc);
  auto [dq, dk, dv, drpb] = dtype == ScalarType::Double
                                ? backward_impl<double>(p, go, dlse, q, k, v, r, o, lse)
                                : backward_impl<float>(p, go, dlse, q, k, v, r, o, lse);
  drpb = alloc_cast(op, "drpb", drpb, rpb ? rpb->scalar_type() : dtype);
  return {alloc_cast(op, "dquery", dq, dtype), alloc_cast(op, "dkey", dk, dtype), alloc_cast(op, "dvalue", dv, dtype),
          drpb};
}

}  // namespace
}  // namespace fastvision::na

STABLE_TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("na_fwd", TORCH_BOX(&fastvision::na::na_fwd_cpu));
  m.impl("na_bwd", TORCH_BOX(&fastvision::na::na_bwd_cpu));
}
