// CPU kernels of the selective scan: forward, backward and the fused
// bidirectional forward. Work is split into tasks of (batch, run of channels
// that share one B group and one C group). A task walks the sequence chunk by
// chunk and, within a chunk, its channels in blocks of W, one channel per
// SIMD lane: the state update and the sums over the state dimension N
// (y_t = C_t . x_t and the backward's) are then lane-wise vector arithmetic,
// with no horizontal reductions. Loading a block transposes its rows to
// [step][lane] and its per-channel constants to [state][lane].
//
// The forward stores the state at the end of every chunk (chunk_states); the
// backward recomputes a chunk's states from the previous checkpoint, so its
// memory is O(batch * dim * L / chunk * N), never O(batch * dim * L * N).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../common/dtype.h"
#include "../common/parallel.h"
#include "checks.h"
#include "selective_scan.h"

namespace fastvision::scan {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Channels per block: one AVX-512 vector of floats, two AVX2 ones (measured
// within a few % of 8 lanes there). Doubles and the baseline clone use the
// same width as more vectors.
constexpr int64_t W = 16;

// ---------------------------------------------------------------------------
// Problem geometry shared by forward and backward.

struct Geometry {
  int64_t batch, dim, L, N, chunk, nchunks;
  bool var_B, var_C;
  int64_t groups_B, groups_C;  // 1 for constant B / C
  int64_t seg;                 // channels that share one B group and one C group
  int64_t per_task;            // channels per task (the last of a segment may have fewer)
  int64_t parts;               // tasks per segment
  int64_t tasks() const { return batch * (dim / seg) * parts; }

  // chunk_len: as check_chunk_len returns it (>= 1, at most max(L, 1)).
  Geometry(const Tensor& u, const Tensor& A, const Tensor& B, const Tensor& C, int64_t chunk_len)
      : batch(u.size(0)), dim(u.size(1)), L(u.size(2)), N(A.size(1)), chunk(chunk_len) {
    FV_INTERNAL_CHECK(chunk > 0, "selective_scan: chunk_len must be positive");
    nchunks = ceil_div(L, chunk);
    var_B = B.dim() == 4;
    var_C = C.dim() == 4;
    groups_B = var_B ? B.size(1) : 1;
    groups_C = var_C ? C.size(1) : 1;
    // dim == 0: no tasks (and no lcm of unchecked group counts, which could overflow).
    seg = dim > 0 ? std::max<int64_t>(dim / std::lcm(groups_B, groups_C), 1) : 1;
    // Enough tasks to keep every thread busy, few enough that the per-task
    // partial sums of a shared B/C stay small; whole blocks of W channels
    // where the segment has them.
    const int64_t want = 4 * static_cast<int64_t>(torch::stable::get_num_threads());
    const int64_t outer = batch * (dim / seg);
    parts = std::clamp<int64_t>(ceil_div(want, std::max<int64_t>(outer, 1)), 1, seg);
    per_task = std::min(ceil_div(ceil_div(seg, parts), W) * W, seg);
    parts = ceil_div(seg, per_task);
  }
  // Position p of the processing order is time step t of the tensors.
  int64_t time_of(int64_t p, bool reverse) const { return reverse ? L - 1 - p : p; }
};

struct Task {
  int64_t b, s, part, d0, d1;  // batch, segment, part, channels [d0, d1)
  Task(const Geometry& g, int64_t id) {
    part = id % g.parts;
    s = (id / g.parts) % (g.dim / g.seg);
    b = id / (g.parts * (g.dim / g.seg));
    d0 = s * g.seg + part * g.per_task;
    d1 = std::min(d0 + g.per_task, (s + 1) * g.seg);
  }
  int64_t blocks() const { return ceil_div(d1 - d0, W); }
};

// Inputs of one direction of the scan, with A, D, delta_bias already in acc.
template <typename acc>
struct Direction {
  const Tensor *u, *delta, *B, *C, *z;  // z may be null
  const acc *A, *D, *bias;
  bool softplus, reverse;
};

// An operand with one [N][W] row per step: a variable B or C (or its
// gradient) advances by `stride` = N * W per step; a constant one has
// stride 0, the same row every step.
template <typename T>
struct StepRows {
  T* base;
  int64_t stride;
  T* at(int64_t s) const { return base + s * stride; }
};

// Loads the chunk of a variable B or C (time steps from position p0, in
// processing order) into dst as [count][N][W], each value broadcast across
// the lanes: all channels of a task share it.
template <typename acc>
void load_chunk_BC(const Tensor& X, const Geometry& g, int64_t b, int64_t d, int64_t groups,
                   int64_t p0, int64_t count, bool reverse, acc* dst) {
  const int64_t N = g.N;
  const int64_t grp = d / (g.dim / groups);
  const int64_t base = ((b * groups + grp) * N) * g.L + g.time_of(p0, reverse);
  for (int64_t n = 0; n < N; ++n)
    gather(at(X, base + n * g.L), X.scalar_type(), reverse ? -1 : 1, count, dst + n * W, N * W);
  for (int64_t i = 0; i < count * N; ++i) std::fill(dst + i * W + 1, dst + (i + 1) * W, dst[i * W]);
}

// [N][W] lanes to / from `lanes` channel rows of N values, `stride` apart.
template <typename acc>
void lanes_to_rows(const acc* src, int64_t N, int64_t lanes, acc* dst, int64_t stride, bool add) {
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t n = 0; n < N; ++n) {
      acc& o = dst[l * stride + n];
      o = (add ? o : acc(0)) + src[n * W + l];
    }
}
template <typename acc>
void rows_to_lanes(const acc* src, int64_t stride, int64_t N, int64_t lanes, acc* dst) {
  if (lanes < W) std::fill(dst, dst + N * W, acc(0));
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t n = 0; n < N; ++n) dst[n * W + l] = src[l * stride + n];
}

// One block of up to W channels over one chunk. Lanes past the block's
// channels hold zeros (u = 0, A = 0), which keep their states and gradients
// at exactly zero; they are never stored.
template <typename acc>
struct Block {
  std::vector<acc> A, B, C;        // [N][W]; B, C only when constant
  std::vector<acc> u, dt, z, y;    // [T][W]; dt: step size (bias and softplus applied)
  std::vector<acc> dout, dt_grad;  // [T][W], backward only; dt_grad: d dt / d delta
  acc D[W], bias[W];
  Block(const Geometry& g, bool backward)
      : A(g.N * W), B(g.var_B ? 0 : g.N * W), C(g.var_C ? 0 : g.N * W), u(g.chunk * W),
        dt(g.chunk * W), z(g.chunk * W), y(g.chunk * W), dout(backward ? g.chunk * W : 0),
        dt_grad(backward ? g.chunk * W : 0) {}
};

// Loads channels [d, d + lanes) for the chunk at position p0 into `k`; also
// d out (`dout` non-null) and d dt / d delta for the backward.
template <typename acc>
FV_CPU_CLONES_512 void load_block(const Direction<acc>& dir, const Geometry& g, int64_t b, int64_t d,
                                  int64_t lanes, int64_t p0, int64_t count, const Tensor* dout,
                                  Block<acc>& k) {
  const int64_t N = g.N, step = dir.reverse ? -1 : 1;
  if (lanes < W)
    for (auto* v : {&k.A, &k.B, &k.C, &k.u, &k.dt, &k.z, &k.dout}) std::fill(v->begin(), v->end(), acc(0));
  for (int64_t l = 0; l < W; ++l) {
    const int64_t c = d + l;
    k.D[l] = l < lanes ? dir.D[c] : acc(0);
    k.bias[l] = l < lanes ? dir.bias[c] : acc(0);
    if (l >= lanes) continue;
    const int64_t row = (b * g.dim + c) * g.L + g.time_of(p0, dir.reverse);
    gather(at(*dir.u, row), dir.u->scalar_type(), step, count, k.u.data() + l, W);
    gather(at(*dir.delta, row), dir.delta->scalar_type(), step, count, k.dt.data() + l, W);
    if (dir.z) gather(at(*dir.z, row), dir.z->scalar_type(), step, count, k.z.data() + l, W);
    if (dout) gather(at(*dout, row), dout->scalar_type(), step, count, k.dout.data() + l, W);
    for (int64_t n = 0; n < N; ++n) k.A[n * W + l] = dir.A[c * N + n];
    if (!g.var_B) gather(at(*dir.B, c * N), dir.B->scalar_type(), 1, N, k.B.data() + l, W);
    if (!g.var_C) gather(at(*dir.C, c * N), dir.C->scalar_type(), 1, N, k.C.data() + l, W);
  }
  for (int64_t s = 0; s < count; ++s) {
    acc* dt = k.dt.data() + s * W;
    if (dout) {
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) k.dt_grad[s * W + l] = step_size_grad(dt[l], k.bias[l], dir.softplus);
    }
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) dt[l] = step_size(dt[l], k.bias[l], dir.softplus);
  }
}

// The forward recurrence of one block over `count` steps, from and into the
// state x ([N][W]); writes y_t = C_t . x_t into k.y. With keep (the
// backward's recompute), also every state and decay exp(dt A) ([count][N][W]).
template <typename acc, bool keep>
FV_CPU_CLONES_512 void scan_block(int64_t N, int64_t count, Block<acc>& k, StepRows<const acc> B,
                                  StepRows<const acc> C, acc* __restrict x, acc* __restrict xs,
                                  acc* __restrict as) {
  // __restrict on what the loop stores: the per-lane step values then stay in
  // registers across the loop over n instead of being reloaded.
  const acc* A = k.A.data();
  for (int64_t s = 0; s < count; ++s) {
    const acc *Bs = B.at(s), *Cs = C.at(s), *dt = k.dt.data() + s * W;
    acc su[W], y[W] = {};
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) su[l] = dt[l] * k.u[s * W + l];
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = n * W;
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) {
        const acc a = exp_fast(dt[l] * A[i + l]);
        x[i + l] = a * x[i + l] + su[l] * Bs[i + l];
        y[l] += Cs[i + l] * x[i + l];
        if constexpr (keep) {
          xs[s * N * W + i + l] = x[i + l];
          as[s * N * W + i + l] = a;
        }
      }
    }
    std::copy(y, y + W, k.y.data() + s * W);
  }
}

// out = (y + D u) * silu(z) (or without the gate), in place of k.y.
template <typename acc>
FV_CPU_CLONES_512 void gate_block(int64_t count, bool has_z, Block<acc>& k) {
  acc *y = k.y.data(), *u = k.u.data(), *z = k.z.data();
  for (int64_t s = 0; s < count * W; s += W) {
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) y[s + l] += k.D[l] * u[s + l];
  }
  // has_z tested outside the loop: a select between the gated and ungated
  // value would become a branch, which stops vectorisation.
  if (has_z) {
#pragma omp simd
    for (int64_t i = 0; i < count * W; ++i) y[i] *= silu(z[i]);
  }
}

// Writes (or adds) lane l < lanes of a [count][W] block to row dst + l * L,
// one value per step at spacing `step`.
template <typename acc>
void store_rows(const acc* src, int64_t count, int64_t lanes, acc* dst, int64_t L, int64_t step, bool add) {
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t s = 0; s < count; ++s) {
      acc& o = dst[l * L + s * step];
      o = (add ? o : acc(0)) + src[s * W + l];
    }
}

// The forward pass of one task. `add` adds the gated output to what is in
// `out` (the second direction of the bidirectional scan). last_state may be null.
template <typename acc>
void forward_task(const Direction<acc>& dir, const Geometry& g, const Task& t, acc* out, bool add,
                  acc* states, acc* last_state) {
  const int64_t N = g.N, T = g.chunk, nb = t.blocks();
  std::vector<acc> x(nb * N * W, acc(0)), Bw(g.var_B ? T * N * W : 0), Cw(g.var_C ? T * N * W : 0);
  Block<acc> k(g, false);
  const StepRows<const acc> B{g.var_B ? Bw.data() : k.B.data(), g.var_B ? N * W : 0};
  const StepRows<const acc> C{g.var_C ? Cw.data() : k.C.data(), g.var_C ? N * W : 0};
  for (int64_t c = 0; c < g.nchunks; ++c) {
    const int64_t p0 = c * T, count = std::min(T, g.L - p0);
    if (g.var_B) load_chunk_BC(*dir.B, g, t.b, t.d0, g.groups_B, p0, count, dir.reverse, Bw.data());
    if (g.var_C) load_chunk_BC(*dir.C, g, t.b, t.d0, g.groups_C, p0, count, dir.reverse, Cw.data());
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t d = t.d0 + blk * W, lanes = std::min(W, t.d1 - d), bd = t.b * g.dim + d;
      load_block(dir, g, t.b, d, lanes, p0, count, nullptr, k);
      acc* xb = x.data() + blk * N * W;
      scan_block<acc, false>(N, count, k, B, C, xb, nullptr, nullptr);
      gate_block(count, dir.z != nullptr, k);
      store_rows(k.y.data(), count, lanes, out + bd * g.L + g.time_of(p0, dir.reverse), g.L,
                 dir.reverse ? -1 : 1, add);
      lanes_to_rows(xb, N, lanes, states + (bd * g.nchunks + c) * N, g.nchunks * N, false);
    }
  }
  if (last_state)
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t d = t.d0 + blk * W;
      lanes_to_rows(x.data() + blk * N * W, N, std::min(W, t.d1 - d), last_state + (t.b * g.dim + d) * N,
                    N, false);
    }
}

ScalarType acc_dtype(const Tensor& u) { return fastvision::acc_dtype(u.scalar_type()); }

template <typename acc>
Direction<acc> make_direction(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                              const Tensor& C, const Tensor& D, const std::optional<Tensor>& z,
                              const Tensor& delta_bias, bool softplus, bool reverse) {
  return Direction<acc>{&u, &delta, &B, &C, z.has_value() ? &z.value() : nullptr,
                        A.const_data_ptr<acc>(), D.const_data_ptr<acc>(), delta_bias.const_data_ptr<acc>(),
                        softplus, reverse};
}

template <typename acc>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Direction<acc>& dir, const Tensor& u,
                                                const Tensor& A, const Tensor& B, const Tensor& C,
                                                int64_t chunk_len) {
  constexpr const char* op = "selective_scan_fwd";
  const Geometry g(u, A, B, C, chunk_len);
  AccOut<acc> out(op, "out", u, u.scalar_type());
  Tensor states = alloc_empty(op, "chunk_states", u, {g.batch, g.dim, g.nchunks, g.N}, acc_dtype(u));
  Tensor last = alloc_empty(op, "last_state", u, {g.batch, g.dim, g.N}, acc_dtype(u));
  acc* st = states.mutable_data_ptr<acc>();
  acc* ls = last.mutable_data_ptr<acc>();
  parallel_for(op, 0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t id = begin; id < end; ++id) forward_task(dir, g, Task(g, id), out.data, false, st, ls);
  });
  return {out.finish(), last, states};
}

// ---------------------------------------------------------------------------
// Backward.

template <typename acc>
struct Grads {
  acc *du, *ddelta, *dz;  // (batch, dim, L); dz null without z
  // Per task partial sums of variable B / C, [task][N][L], reduced over the
  // tasks of a group at the end.
  acc *dB_var, *dC_var;
  // Per (batch, channel) partial sums, reduced over batch at the end.
  std::vector<acc> dA, dD, dbias, dB_const, dC_const;
};

// Per-task scratch of the backward for one block over one chunk.
template <typename acc>
struct BlockGrads {
  std::vector<acc> xs, as;           // [T][N][W] recomputed states and decays
  std::vector<acc> dy, dz, du, ddt;  // [T][W]; dy: d y_t, ddt: d delta
  std::vector<acc> dA;               // [N][W]
  acc dD[W], dbias[W];
  explicit BlockGrads(const Geometry& g)
      : xs(g.chunk * g.N * W), as(g.chunk * g.N * W), dy(g.chunk * W), dz(g.chunk * W),
        du(g.chunk * W), ddt(g.chunk * W), dA(g.N * W) {}
};

// d y_t and d z_t of a block from d out_t, through the gate.
template <typename acc>
FV_CPU_CLONES_512 void gate_block_grad(int64_t count, bool has_z, const Block<acc>& k,
                                       BlockGrads<acc>& r) {
  const acc *go = k.dout.data(), *y = k.y.data(), *u = k.u.data(), *z = k.z.data();
  acc *dy = r.dy.data(), *dz = r.dz.data();
  if (!has_z) {
    std::copy(go, go + count * W, dy);
    return;
  }
  for (int64_t s = 0; s < count * W; s += W) {
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) {
      const int64_t i = s + l;
      const acc pre = y[i] + k.D[l] * u[i];
      dz[i] = go[i] * pre * silu_grad(z[i]);
      dy[i] = go[i] * silu(z[i]);
    }
  }
}

// The adjoint recurrence of one block over a chunk, steps in reverse. `carry`
// ([N][W]) is the adjoint flowing into x_t from step t+1; the dB / dC rows
// are accumulated (per step for a variable B/C, one row for a constant one).
template <typename acc>
FV_CPU_CLONES_512 void backward_block(int64_t N, int64_t count, const Block<acc>& k,
                                      StepRows<const acc> B, StepRows<const acc> C, acc* carry,
                                      StepRows<acc> dB, StepRows<acc> dC, BlockGrads<acc>& r) {
  const acc* A = k.A.data();
  acc* dA = r.dA.data();
  std::fill(r.dA.begin(), r.dA.end(), acc(0));
  std::fill(r.dD, r.dD + W, acc(0));
  std::fill(r.dbias, r.dbias + W, acc(0));
  for (int64_t s = count - 1; s >= 0; --s) {
    const acc *Bs = B.at(s), *Cs = C.at(s), *xt = r.xs.data() + s * N * W, *at_ = r.as.data() + s * N * W;
    const acc *dt = k.dt.data() + s * W, *u = k.u.data() + s * W, *dy = r.dy.data() + s * W;
    acc *dBs = dB.at(s), *dCs = dC.at(s);
    acc su[W], hB[W] = {}, hAx[W] = {};  // sum_n h B, sum_n h A x_decayed
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) su[l] = dt[l] * u[l];
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = n * W;
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) {
        const acc h = dy[l] * Cs[i + l] + carry[i + l];        // adjoint of x_t
        const acc hx = h * (xt[i + l] - su[l] * Bs[i + l]);    // h * exp(dt A) x_{t-1}
        dCs[i + l] += dy[l] * xt[i + l];
        dBs[i + l] += h * su[l];
        dA[i + l] += dt[l] * hx;
        hAx[l] += A[i + l] * hx;
        hB[l] += h * Bs[i + l];
        carry[i + l] = h * at_[i + l];                          // flows into x_{t-1}
      }
    }
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) {
      r.du[s * W + l] = dt[l] * hB[l] + dy[l] * k.D[l];
      // d delta through bias + softplus.
      const acc ddt = (hAx[l] + u[l] * hB[l]) * k.dt_grad[s * W + l];
      r.ddt[s * W + l] = ddt;
      r.dbias[l] += ddt;
      r.dD[l] += dy[l] * u[l];
    }
  }
}

// dst[n * L + s * step] = sum over lanes of src[s][n][:], for s < count.
template <typename acc>
FV_CPU_CLONES_512 void sum_lanes(const acc* src, int64_t count, int64_t N, acc* dst, int64_t L,
                                 int64_t step) {
  for (int64_t s = 0; s < count; ++s)
    for (int64_t n = 0; n < N; ++n) {
      acc sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t l = 0; l < W; ++l) sum += src[(s * N + n) * W + l];
      dst[n * L + s * step] = sum;
    }
}

// The backward pass of one task: chunks in reverse processing order, each
// block recomputed from its checkpoint, the adjoint of the state carried across.
template <typename acc>
void backward_task(const Direction<acc>& dir, const Geometry& g, const Task& t, int64_t task_id,
                   const Tensor& dout, const acc* dlast, const acc* states, Grads<acc>& gr) {
  const int64_t N = g.N, T = g.chunk, nb = t.blocks(), NW = N * W;
  std::vector<acc> carry(nb * NW, acc(0));  // per block, across chunks: [block][N][W]
  if (dlast)
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t d = t.d0 + blk * W;
      rows_to_lanes(dlast + (t.b * g.dim + d) * N, N, N, std::min(W, t.d1 - d), carry.data() + blk * NW);
    }
  std::vector<acc> Bw(g.var_B ? T * NW : 0), Cw(g.var_C ? T * NW : 0), x(NW);
  // Gradients of B / C: per-lane partials, for the chunk when variable (summed
  // over lanes once per chunk), for the block when constant.
  std::vector<acc> dBw(g.var_B ? T * NW : NW), dCw(g.var_C ? T * NW : NW);
  const StepRows<acc> dB{dBw.data(), g.var_B ? NW : 0}, dC{dCw.data(), g.var_C ? NW : 0};
  Block<acc> k(g, true);
  BlockGrads<acc> r(g);
  const StepRows<const acc> B{g.var_B ? Bw.data() : k.B.data(), g.var_B ? NW : 0};
  const StepRows<const acc> C{g.var_C ? Cw.data() : k.C.data(), g.var_C ? NW : 0};
  const int64_t step = dir.reverse ? -1 : 1;
  for (int64_t c = g.nchunks - 1; c >= 0; --c) {
    const int64_t p0 = c * T, count = std::min(T, g.L - p0);
    if (g.var_B) load_chunk_BC(*dir.B, g, t.b, t.d0, g.groups_B, p0, count, dir.reverse, Bw.data());
    if (g.var_C) load_chunk_BC(*dir.C, g, t.b, t.d0, g.groups_C, p0, count, dir.reverse, Cw.data());
    if (g.var_B) std::fill(dBw.begin(), dBw.end(), acc(0));
    if (g.var_C) std::fill(dCw.begin(), dCw.end(), acc(0));
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t d = t.d0 + blk * W, lanes = std::min(W, t.d1 - d), bd = t.b * g.dim + d;
      load_block(dir, g, t.b, d, lanes, p0, count, &dout, k);
      if (c > 0)
        rows_to_lanes(states + (bd * g.nchunks + c - 1) * N, g.nchunks * N, N, lanes, x.data());
      else
        std::fill(x.begin(), x.end(), acc(0));
      scan_block<acc, true>(N, count, k, B, C, x.data(), r.xs.data(), r.as.data());
      gate_block_grad(count, dir.z != nullptr, k, r);
      if (!g.var_B) std::fill(dBw.begin(), dBw.end(), acc(0));
      if (!g.var_C) std::fill(dCw.begin(), dCw.end(), acc(0));
      backward_block(N, count, k, B, C, carry.data() + blk * NW, dB, dC, r);

      const int64_t row = bd * g.L + g.time_of(p0, dir.reverse);
      store_rows(r.du.data(), count, lanes, gr.du + row, g.L, step, false);
      store_rows(r.ddt.data(), count, lanes, gr.ddelta + row, g.L, step, false);
      if (gr.dz) store_rows(r.dz.data(), count, lanes, gr.dz + row, g.L, step, false);
      lanes_to_rows(r.dA.data(), N, lanes, gr.dA.data() + bd * N, N, true);
      if (!g.var_B) lanes_to_rows(dBw.data(), N, lanes, gr.dB_const.data() + bd * N, N, true);
      if (!g.var_C) lanes_to_rows(dCw.data(), N, lanes, gr.dC_const.data() + bd * N, N, true);
      for (int64_t l = 0; l < lanes; ++l) {
        gr.dD[bd + l] += r.dD[l];
        gr.dbias[bd + l] += r.dbias[l];
      }
    }
    // This task's share of a variable B / C for the chunk, stored [N][L].
    const int64_t t0 = g.time_of(p0, dir.reverse);
    if (g.var_B) sum_lanes(dBw.data(), count, N, gr.dB_var + task_id * N * g.L + t0, g.L, step);
    if (g.var_C) sum_lanes(dCw.data(), count, N, gr.dC_var + task_id * N * g.L + t0, g.L, step);
  }
}

// Per-task partials [batch][segments][parts][N][L] of a variable B or C,
// written by the tasks; reduce_var sums them into the (batch, G, N, L)
// gradient (each group is a run of consecutive segments).
constexpr const char* kBwd = "selective_scan_bwd";

Tensor var_partials(const Tensor& like, const Geometry& g, int64_t groups, ScalarType acc, const char* what) {
  const int64_t per_group = g.tasks() / std::max<int64_t>(g.batch * groups, 1);  // 0 for batch 0
  return alloc_empty(kBwd, what, like, {g.batch, groups, per_group, g.N, g.L}, acc);
}
Tensor reduce_var(const Tensor& like, const Tensor& partials, const char* what) {
  return alloc_sum(kBwd, what, partials, 2, like.scalar_type());
}

// Sums per-(batch, channel) partials over batch into a tensor of shape `shape`.
template <typename acc>
Tensor reduce_batch(const Tensor& like, const std::vector<acc>& part, int64_t batch,
                    std::vector<int64_t> shape, ScalarType dtype, const char* what) {
  std::vector<int64_t> full_shape{batch};
  full_shape.insert(full_shape.end(), shape.begin(), shape.end());
  Tensor full = alloc_empty(kBwd, what, like, full_shape, acc_scalar_type<acc>());
  std::copy(part.begin(), part.end(), full.mutable_data_ptr<acc>());
  return alloc_sum(kBwd, what, full, 0, dtype);
}

template <typename acc>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Direction<acc>& dir, const Tensor& dout, const std::optional<Tensor>& dlast_state,
    const Tensor& u, const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& chunk_states,
    int64_t chunk_len) {
  const char* op = kBwd;
  const Geometry g(u, A, B, C, chunk_len);
  const ScalarType a = acc_dtype(u);
  const int64_t BD = g.batch * g.dim;
  AccOut<acc> du(op, "du", u, u.scalar_type()), ddelta(op, "ddelta", u, dir.delta->scalar_type());
  std::optional<AccOut<acc>> dz;
  if (dir.z) dz.emplace(op, "dz", *dir.z, dir.z->scalar_type());
  Tensor dB_part = g.var_B ? var_partials(B, g, g.groups_B, a, "dB partial sums") : Tensor();
  Tensor dC_part = g.var_C ? var_partials(C, g, g.groups_C, a, "dC partial sums") : Tensor();
  Grads<acc> gr{du.data, ddelta.data, dz ? dz->data : nullptr,
                g.var_B ? dB_part.mutable_data_ptr<acc>() : nullptr,
                g.var_C ? dC_part.mutable_data_ptr<acc>() : nullptr};
  gr.dA = host_vector<acc>(op, "dA partial sums", BD * g.N, 0);
  gr.dD = host_vector<acc>(op, "dD partial sums", BD, 0);
  gr.dbias = host_vector<acc>(op, "ddelta_bias partial sums", BD, 0);
  if (!g.var_B) gr.dB_const = host_vector<acc>(op, "dB partial sums", BD * g.N, 0);
  if (!g.var_C) gr.dC_const = host_vector<acc>(op, "dC partial sums", BD * g.N, 0);
  const acc* dlast = dlast_state.has_value() ? dlast_state->const_data_ptr<acc>() : nullptr;
  const acc* st = chunk_states.const_data_ptr<acc>();
  parallel_for(op, 0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t id = begin; id < end; ++id) backward_task(dir, g, Task(g, id), id, dout, dlast, st, gr);
  });
  Tensor dA = reduce_batch(u, gr.dA, g.batch, {g.dim, g.N}, a, "dA");
  Tensor dD = reduce_batch(u, gr.dD, g.batch, {g.dim}, a, "dD");
  Tensor dbias = reduce_batch(u, gr.dbias, g.batch, {g.dim}, a, "ddelta_bias");
  Tensor dB = g.var_B ? reduce_var(B, dB_part, "dB")
                      : reduce_batch(u, gr.dB_const, g.batch, {g.dim, g.N}, B.scalar_type(), "dB");
  Tensor dC = g.var_C ? reduce_var(C, dC_part, "dC")
                      : reduce_batch(u, gr.dC_const, g.batch, {g.dim, g.N}, C.scalar_type(), "dC");
  Tensor dz_out = dz ? dz->finish() : alloc_empty(op, "dz", u, {0}, u.scalar_type());
  return {du.finish(), ddelta.finish(), dA, dB, dC, dD, dz_out, dbias};
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp). Each checks every
// tensor and integer it reads (checks.h) before touching memory.

// Per-task scratch grows with chunk * N (the backward keeps [chunk][N][W]
// states and decays): sizes whose byte counts overflow are refused before
// any worker tries to allocate them.
void check_scratch(const char* op, const ScanSizes& s, int64_t chunk) {
  if (s.batch == 0 || s.dim == 0) return;  // no tasks, no scratch
  int64_t bytes = 0;
  if (!mul_fits(chunk, s.N, &bytes) || !mul_fits(bytes, 8 * W * static_cast<int64_t>(sizeof(double)), &bytes))
    throw_oom(op, "per-thread scratch",
              "chunk " + std::to_string(chunk) + " x N " + std::to_string(s.N) + " (more than 2^63 bytes)");
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cpu(
    Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, std::optional<Tensor> z,
    Tensor delta_bias, bool delta_softplus, bool reverse, int64_t chunk_len) {
  constexpr const char* op = "selective_scan_fwd";
  const ScanSizes s = check_direction(op, Backend::CPU, "", u, delta, A, B, C, D, z, delta_bias);
  const int64_t chunk = check_chunk_len(op, chunk_len, s.L);
  check_scratch(op, s, chunk);
  return dispatch_acc(s.dtype, [&](auto tag) {
    using acc = decltype(tag);
    auto dir = make_direction<acc>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse);
    return forward_impl<acc>(dir, u, A, B, C, chunk);
  });
}

std::tuple<Tensor, Tensor, Tensor> bi_selective_scan_fwd_cpu(
    Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, std::optional<Tensor> z,
    Tensor delta_bias, Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor D_b,
    Tensor delta_bias_b, bool delta_softplus, int64_t chunk_len) {
  constexpr const char* op = "bi_selective_scan_fwd";
  const ScanSizes s = check_direction(op, Backend::CPU, "", u, delta, A, B, C, D, z, delta_bias);
  // z is shared: checked against u above; u_b must have u's shape and dtype.
  const ScanSizes sb =
      check_direction(op, Backend::CPU, "_b", u_b, delta_b, A_b, B_b, C_b, D_b, std::nullopt, delta_bias_b);
  check_mirror(op, s, sb, A, A_b, B, B_b, C, C_b);
  const int64_t chunk = check_chunk_len(op, chunk_len, s.L);
  check_scratch(op, s, chunk);
  return dispatch_acc(s.dtype, [&](auto tag) {
    using acc = decltype(tag);
    auto f = make_direction<acc>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, false);
    auto r = make_direction<acc>(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b, delta_softplus, true);
    const Geometry g(u, A, B, C, chunk);
    AccOut<acc> out(op, "out", u, u.scalar_type());
    Tensor st_f = alloc_empty(op, "chunk_states", u, {g.batch, g.dim, g.nchunks, g.N}, acc_dtype(u));
    Tensor st_r = alloc_empty(op, "chunk_states_b", u, {g.batch, g.dim, g.nchunks, g.N}, acc_dtype(u));
    // One pass over the tasks runs both directions, so each task's output
    // rows stay in cache between them.
    parallel_for(op, 0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t id = begin; id < end; ++id) {
        const Task t(g, id);
        forward_task(f, g, t, out.data, false, st_f.mutable_data_ptr<acc>(), static_cast<acc*>(nullptr));
        forward_task(r, g, t, out.data, true, st_r.mutable_data_ptr<acc>(), static_cast<acc*>(nullptr));
      }
    });
    return std::make_tuple(out.finish(), st_f, st_r);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd_cpu(
    Tensor dout, std::optional<Tensor> dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B,
    Tensor C, Tensor D, std::optional<Tensor> z, Tensor delta_bias, Tensor chunk_states,
    bool delta_softplus, bool reverse, int64_t chunk_len) {
  constexpr const char* op = "selective_scan_bwd";
  const ScanSizes s = check_direction(op, Backend::CPU, "", u, delta, A, B, C, D, z, delta_bias);
  const int64_t chunk = check_chunk_len(op, chunk_len, s.L);
  check_backward(op, Backend::CPU, s, chunk, dout, dlast_state, chunk_states, u);
  check_scratch(op, s, chunk);
  return dispatch_acc(s.dtype, [&](auto tag) {
    using acc = decltype(tag);
    auto dir = make_direction<acc>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse);
    return backward_impl<acc>(dir, dout, dlast_state, u, A, B, C, chunk_states, chunk);
  });
}

}  // namespace
}  // namespace fastvision::scan

STABLE_TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("selective_scan_fwd", TORCH_BOX(&fastvision::scan::selective_scan_fwd_cpu));
  m.impl("selective_scan_bwd", TORCH_BOX(&fastvision::scan::selective_scan_bwd_cpu));
  m.impl("bi_selective_scan_fwd", TORCH_BOX(&fastvision::scan::bi_selective_scan_fwd_cpu));
}
