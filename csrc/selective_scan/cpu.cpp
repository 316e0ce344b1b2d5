// CPU kernels of the selective scan: forward, backward and the fused
// bidirectional forward. Work is split into tasks of (batch, run of channels
// that share one B group and one C group); a task walks the sequence chunk by
// chunk, widening each chunk of B/C to the accumulate type and transposing it
// to [step][state] once for all its channels, so the per-step state update is
// a contiguous loop over N that the compiler vectorises.
//
// The forward stores the state at the end of every chunk (chunk_states); the
// backward recomputes a chunk's states from the previous checkpoint, so its
// memory is O(batch * dim * L / chunk * N), never O(batch * dim * L * N).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "selective_scan.h"

namespace fastvision::scan {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ---------------------------------------------------------------------------
// Strided loads and stores that widen to / narrow from the accumulate type.
// The dtype switch runs once per row, not per element.

template <typename acc, typename src_t>
void gather_typed(const src_t* src, int64_t step, int64_t count, acc* dst, int64_t dst_stride) {
  for (int64_t j = 0; j < count; ++j) dst[j * dst_stride] = static_cast<acc>(src[j * step]);
}

// dst[j * dst_stride] = src[j * step] for j < count, src of dtype `dtype`.
template <typename acc>
void gather(const void* src, ScalarType dtype, int64_t step, int64_t count, acc* dst,
            int64_t dst_stride = 1) {
  switch (dtype) {
    case ScalarType::Float:
      return gather_typed(static_cast<const float*>(src), step, count, dst, dst_stride);
    case ScalarType::Double:
      return gather_typed(static_cast<const double*>(src), step, count, dst, dst_stride);
    case ScalarType::Half:
      return gather_typed(static_cast<const torch::headeronly::Half*>(src), step, count, dst,
                          dst_stride);
    case ScalarType::BFloat16:
      return gather_typed(static_cast<const torch::headeronly::BFloat16*>(src), step, count, dst,
                          dst_stride);
    default:
      FV_CHECK(false, "fastvision: unsupported dtype in selective_scan");
  }
}

template <typename acc, typename dst_t>
void scatter_typed(const acc* src, int64_t count, dst_t* dst, int64_t step) {
  for (int64_t j = 0; j < count; ++j) dst[j * step] = static_cast<dst_t>(src[j]);
}

// dst[j * step] = src[j] for j < count, dst of dtype `dtype`.
template <typename acc>
void scatter(const acc* src, int64_t count, void* dst, ScalarType dtype, int64_t step) {
  switch (dtype) {
    case ScalarType::Float:
      return scatter_typed(src, count, static_cast<float*>(dst), step);
    case ScalarType::Double:
      return scatter_typed(src, count, static_cast<double*>(dst), step);
    case ScalarType::Half:
      return scatter_typed(src, count, static_cast<torch::headeronly::Half*>(dst), step);
    case ScalarType::BFloat16:
      return scatter_typed(src, count, static_cast<torch::headeronly::BFloat16*>(dst), step);
    default:
      FV_CHECK(false, "fastvision: unsupported dtype in selective_scan");
  }
}

// Byte address of element `index` of a tensor's storage.
inline const void* at(const Tensor& t, int64_t index) {
  return static_cast<const char*>(t.const_data_ptr()) + index * static_cast<int64_t>(t.element_size());
}
inline void* at_mut(const Tensor& t, int64_t index) {
  return static_cast<char*>(t.mutable_data_ptr()) + index * static_cast<int64_t>(t.element_size());
}

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

  Geometry(const Tensor& u, const Tensor& A, const Tensor& B, const Tensor& C, int64_t chunk_len)
      : batch(u.size(0)), dim(u.size(1)), L(u.size(2)), N(A.size(1)), chunk(chunk_len) {
    FV_CHECK(chunk > 0, "selective_scan: chunk_len must be positive");
    nchunks = ceil_div(L, chunk);
    var_B = B.dim() == 4;
    var_C = C.dim() == 4;
    groups_B = var_B ? B.size(1) : 1;
    groups_C = var_C ? C.size(1) : 1;
    seg = std::max<int64_t>(dim / std::lcm(groups_B, groups_C), 1);  // dim == 0: no tasks
    // Enough tasks to keep every thread busy, few enough that the per-task
    // partial sums of a shared B/C stay small.
    const int64_t want = 4 * static_cast<int64_t>(torch::stable::get_num_threads());
    const int64_t outer = batch * (dim / seg);
    parts = std::clamp<int64_t>(ceil_div(want, std::max<int64_t>(outer, 1)), 1, seg);
    per_task = ceil_div(seg, parts);
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
};

// Loads the [count][N] slice of a variable B or C (time steps of chunk starting
// at position p0, in processing order) into dst, or nothing for constant ones.
template <typename acc>
void load_chunk_BC(const Tensor& X, bool variable, const Geometry& g, int64_t b, int64_t d,
                   int64_t groups, int64_t p0, int64_t count, bool reverse, acc* dst) {
  if (!variable) return;
  const int64_t grp = d / (g.dim / groups);
  const int64_t base = ((b * groups + grp) * g.N) * g.L + g.time_of(p0, reverse);
  for (int64_t n = 0; n < g.N; ++n)
    gather(at(X, base + n * g.L), X.scalar_type(), reverse ? -1 : 1, count, dst + n, g.N);
}

// Inputs of one direction of the scan, with A, D, delta_bias already in acc.
template <typename acc>
struct Direction {
  const Tensor *u, *delta, *B, *C, *z;  // z may be null
  const acc *A, *D, *bias;
  bool softplus, reverse;
};

// Per-task scratch for one row of a chunk.
template <typename acc>
struct Rows {
  std::vector<acc> u, dt, z, raw;  // raw: delta before bias and softplus
  explicit Rows(int64_t chunk) : u(chunk), dt(chunk), z(chunk), raw(chunk) {}
};

// Runs the forward recurrence of channel d over one chunk, starting from and
// updating `x` (N). Writes y_t into `y`, and when `xs`/`as` are given, every
// state and every exp(delta A) of the chunk ([count][N]).
template <typename acc>
FV_CPU_CLONES void scan_chunk(const Direction<acc>& dir, const Geometry& g, int64_t d, int64_t count,
                const acc* u, const acc* dt, const acc* Bc, const acc* Cc, acc* x, acc* y,
                acc* xs, acc* as) {
  const int64_t N = g.N;
  const acc* A = dir.A + d * N;
  const acc* Bconst = g.var_B ? nullptr : Bc;
  const acc* Cconst = g.var_C ? nullptr : Cc;
  for (int64_t s = 0; s < count; ++s) {
    const acc* Bs = Bconst ? Bconst : Bc + s * N;
    const acc* Cs = Cconst ? Cconst : Cc + s * N;
    const acc step = dt[s];
    const acc step_u = step * u[s];
    acc ys = 0;
    if (as) {
      acc* xo = xs + s * N;
      acc* ao = as + s * N;
#pragma omp simd reduction(+ : ys)
      for (int64_t n = 0; n < N; ++n) {
        const acc a = exp_fast(step * A[n]);
        x[n] = a * x[n] + step_u * Bs[n];
        ys += Cs[n] * x[n];
        xo[n] = x[n];
        ao[n] = a;
      }
    } else {
#pragma omp simd reduction(+ : ys)
      for (int64_t n = 0; n < N; ++n) {
        x[n] = exp_fast(step * A[n]) * x[n] + step_u * Bs[n];
        ys += Cs[n] * x[n];
      }
    }
    y[s] = ys;
  }
}

// Loads u, step sizes (bias + softplus applied) and z of channel d for the
// chunk starting at position p0.
template <typename acc>
void load_rows(const Direction<acc>& dir, const Geometry& g, int64_t b, int64_t d, int64_t p0,
               int64_t count, Rows<acc>& r) {
  const int64_t row = (b * g.dim + d) * g.L + g.time_of(p0, dir.reverse);
  const int64_t step = dir.reverse ? -1 : 1;
  gather(at(*dir.u, row), dir.u->scalar_type(), step, count, r.u.data());
  gather(at(*dir.delta, row), dir.delta->scalar_type(), step, count, r.dt.data());
  for (int64_t s = 0; s < count; ++s) r.dt[s] = step_size(r.dt[s], dir.bias[d], dir.softplus);
  if (dir.z) gather(at(*dir.z, row), dir.z->scalar_type(), step, count, r.z.data());
}

// The forward pass of one task. `accumulate` adds the gated output to what is
// in out_acc (the second direction of the bidirectional scan).
template <typename acc>
void forward_task(const Direction<acc>& dir, const Geometry& g, const Task& t, acc* out_acc,
                  acc* states, acc* last_state) {
  const int64_t N = g.N, T = g.chunk, nd = t.d1 - t.d0;
  std::vector<acc> x(nd * N, acc(0)), Bc(T * N), Cc(T * N), y(T);
  Rows<acc> r(T);
  for (int64_t c = 0; c < g.nchunks; ++c) {
    const int64_t p0 = c * T, count = std::min(T, g.L - p0);
    load_chunk_BC(*dir.B, g.var_B, g, t.b, t.d0, g.groups_B, p0, count, dir.reverse, Bc.data());
    load_chunk_BC(*dir.C, g.var_C, g, t.b, t.d0, g.groups_C, p0, count, dir.reverse, Cc.data());
    for (int64_t d = t.d0; d < t.d1; ++d) {
      if (!g.var_B) gather(at(*dir.B, d * N), dir.B->scalar_type(), 1, N, Bc.data());
      if (!g.var_C) gather(at(*dir.C, d * N), dir.C->scalar_type(), 1, N, Cc.data());
      load_rows(dir, g, t.b, d, p0, count, r);
      acc* xd = x.data() + (d - t.d0) * N;
      scan_chunk(dir, g, d, count, r.u.data(), r.dt.data(), Bc.data(), Cc.data(), xd, y.data(),
                 static_cast<acc*>(nullptr), static_cast<acc*>(nullptr));
      acc* o = out_acc + (t.b * g.dim + d) * g.L;
      for (int64_t s = 0; s < count; ++s) {
        const acc pre = y[s] + dir.D[d] * r.u[s];
        o[g.time_of(p0 + s, dir.reverse)] += dir.z ? pre * silu(r.z[s]) : pre;
      }
      std::copy(xd, xd + N, states + ((t.b * g.dim + d) * g.nchunks + c) * N);
    }
  }
  for (int64_t d = t.d0; d < t.d1; ++d)
    std::copy(x.data() + (d - t.d0) * N, x.data() + (d - t.d0 + 1) * N,
              last_state + (t.b * g.dim + d) * N);
}

ScalarType acc_dtype(const Tensor& u) {
  return u.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

template <typename acc>
Direction<acc> make_direction(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                              const Tensor& C, const Tensor& D, const std::optional<Tensor>& z,
                              const Tensor& delta_bias, bool softplus, bool reverse) {
  return Direction<acc>{&u, &delta, &B, &C, z.has_value() ? &z.value() : nullptr,
                        A.const_data_ptr<acc>(), D.const_data_ptr<acc>(), delta_bias.const_data_ptr<acc>(),
                        softplus, reverse};
}

void check_inputs(const Tensor& u, const Tensor& A, const Tensor& D, const Tensor& delta_bias) {
  // The Python wrapper validates shapes and makes inputs contiguous; these
  // checks only guard direct torch.ops calls against memory errors.
  FV_CHECK(u.dim() == 3 && u.is_contiguous(), "selective_scan: u must be a contiguous (batch, dim, L) tensor");
  const ScalarType a = acc_dtype(u);
  FV_CHECK(A.scalar_type() == a && D.scalar_type() == a && delta_bias.scalar_type() == a,
           "selective_scan: A, D and delta_bias must be float32 (float64 for float64 inputs)");
  FV_CHECK(A.is_contiguous() && A.dim() == 2 && A.size(0) == u.size(1),
           "selective_scan: A must be a contiguous (dim, N) tensor");
}

// Writes the acc-typed buffer into a new tensor of u's dtype.
template <typename acc>
Tensor narrow_to(const Tensor& like, const std::vector<acc>& src, ScalarType dtype) {
  Tensor out = torch::stable::new_empty(like, like.sizes(), dtype);
  scatter(src.data(), static_cast<int64_t>(src.size()), out.mutable_data_ptr(), dtype, 1);
  return out;
}

template <typename acc>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Direction<acc>& dir, const Tensor& u,
                                                const Tensor& A, const Tensor& B, const Tensor& C,
                                                int64_t chunk_len) {
  const Geometry g(u, A, B, C, chunk_len);
  std::vector<acc> out(g.batch * g.dim * g.L, acc(0));
  Tensor states = torch::stable::new_empty(u, {g.batch, g.dim, g.nchunks, g.N}, acc_dtype(u));
  Tensor last = torch::stable::new_empty(u, {g.batch, g.dim, g.N}, acc_dtype(u));
  acc* st = states.mutable_data_ptr<acc>();
  acc* ls = last.mutable_data_ptr<acc>();
  torch::stable::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t id = begin; id < end; ++id) forward_task(dir, g, Task(g, id), out.data(), st, ls);
  });
  return {narrow_to(u, out, u.scalar_type()), last, states};
}

// ---------------------------------------------------------------------------
// Backward.

template <typename acc>
struct Grads {
  // Per (batch, channel) partial sums, reduced over batch at the end.
  std::vector<acc> dA, dD, dbias, dB_const, dC_const;
  // Per task partial sums of variable B / C, [task][N][L], reduced over the
  // tasks of a group at the end.
  std::vector<acc> dB_var, dC_var;
  std::vector<acc> du, ddelta, dz;
};

// The backward pass of one task: chunks in reverse processing order, each
// recomputed from its checkpoint, the adjoint of the state carried across.
template <typename acc>
FV_CPU_CLONES void backward_task(const Direction<acc>& dir, const Geometry& g, const Task& t, int64_t task_id,
                   const Tensor& dout, const acc* dlast, const acc* states, Grads<acc>& gr) {
  const int64_t N = g.N, T = g.chunk, nd = t.d1 - t.d0;
  std::vector<acc> carry(nd * N, acc(0));  // adjoint flowing into x_t from step t+1
  if (dlast)
    for (int64_t d = t.d0; d < t.d1; ++d)
      std::copy(dlast + (t.b * g.dim + d) * N, dlast + (t.b * g.dim + d + 1) * N,
                carry.data() + (d - t.d0) * N);
  std::vector<acc> Bc(T * N), Cc(T * N), dBc(T * N), dCc(T * N), xs(T * N), as(T * N), x(N), y(T),
      go(T), ddt(T), du(T), dz(T);
  Rows<acc> r(T);
  for (int64_t c = g.nchunks - 1; c >= 0; --c) {
    const int64_t p0 = c * T, count = std::min(T, g.L - p0);
    load_chunk_BC(*dir.B, g.var_B, g, t.b, t.d0, g.groups_B, p0, count, dir.reverse, Bc.data());
    load_chunk_BC(*dir.C, g.var_C, g, t.b, t.d0, g.groups_C, p0, count, dir.reverse, Cc.data());
    std::fill(dBc.begin(), dBc.end(), acc(0));
    std::fill(dCc.begin(), dCc.end(), acc(0));
    for (int64_t d = t.d0; d < t.d1; ++d) {
      const int64_t bd = t.b * g.dim + d;
      if (!g.var_B) gather(at(*dir.B, d * N), dir.B->scalar_type(), 1, N, Bc.data());
      if (!g.var_C) gather(at(*dir.C, d * N), dir.C->scalar_type(), 1, N, Cc.data());
      load_rows(dir, g, t.b, d, p0, count, r);
      gather(at(dout, bd * g.L + g.time_of(p0, dir.reverse)), dout.scalar_type(),
             dir.reverse ? -1 : 1, count, go.data());
      if (c > 0)
        std::copy(states + (bd * g.nchunks + c - 1) * N, states + (bd * g.nchunks + c) * N, x.begin());
      else
        std::fill(x.begin(), x.end(), acc(0));
      scan_chunk(dir, g, d, count, r.u.data(), r.dt.data(), Bc.data(), Cc.data(), x.data(), y.data(),
                 xs.data(), as.data());

      const acc* A = dir.A + d * N;
      const acc Dd = dir.D[d];
      acc* k = carry.data() + (d - t.d0) * N;
      acc* dA = gr.dA.data() + bd * N;
      acc* dBd = g.var_B ? nullptr : gr.dB_const.data() + bd * N;
      acc* dCd = g.var_C ? nullptr : gr.dC_const.data() + bd * N;
      acc dD = 0;
      for (int64_t s = count - 1; s >= 0; --s) {
        const acc uu = r.u[s], step = r.dt[s], step_u = step * uu;
        acc dy = go[s];
        if (dir.z) {
          const acc pre = y[s] + Dd * uu;
          dz[s] = go[s] * pre * silu_grad(r.z[s]);
          dy = go[s] * silu(r.z[s]);
        }
        dD += dy * uu;
        const acc* Bs = g.var_B ? Bc.data() + s * N : Bc.data();
        const acc* Cs = g.var_C ? Cc.data() + s * N : Cc.data();
        acc* dBs = g.var_B ? dBc.data() + s * N : dBd;
        acc* dCs = g.var_C ? dCc.data() + s * N : dCd;
        const acc* xt = xs.data() + s * N;
        const acc* at_ = as.data() + s * N;
        acc dstep = 0, du_s = dy * Dd;
#pragma omp simd reduction(+ : dstep, du_s)
        for (int64_t n = 0; n < N; ++n) {
          const acc h = dy * Cs[n] + k[n];           // adjoint of x_t
          const acc x_decayed = xt[n] - step_u * Bs[n];  // exp(delta_t A) x_{t-1}
          dCs[n] += dy * xt[n];
          dstep += h * (A[n] * x_decayed + Bs[n] * uu);
          dA[n] += h * step * x_decayed;
          dBs[n] += h * step_u;
          du_s += h * step * Bs[n];
          k[n] = h * at_[n];                          // flows into x_{t-1}
        }
        du[s] = du_s;
        ddt[s] = dstep;  // w.r.t. the step after softplus; chained below
      }
      // Step-size gradient through bias + softplus, needing the raw delta.
      const int64_t row = bd * g.L + g.time_of(p0, dir.reverse);
      const int64_t dirstep = dir.reverse ? -1 : 1;
      gather(at(*dir.delta, row), dir.delta->scalar_type(), dirstep, count, r.raw.data());
      acc dbias = 0;
      for (int64_t s = 0; s < count; ++s) {
        ddt[s] *= step_size_grad(r.raw[s], dir.bias[d], dir.softplus);
        dbias += ddt[s];
      }
      gr.dD[bd] += dD;
      gr.dbias[bd] += dbias;
      for (int64_t s = 0; s < count; ++s) {
        const int64_t ti = bd * g.L + g.time_of(p0 + s, dir.reverse);
        gr.du[ti] = du[s];
        gr.ddelta[ti] = ddt[s];
        if (dir.z) gr.dz[ti] += dz[s];
      }
    }
    // This task's share of a variable B / C for the chunk, stored [N][L].
    for (int64_t s = 0; s < count; ++s) {
      const int64_t ti = g.time_of(p0 + s, dir.reverse);
      for (int64_t n = 0; n < N; ++n) {
        if (g.var_B) gr.dB_var[(task_id * N + n) * g.L + ti] = dBc[s * N + n];
        if (g.var_C) gr.dC_var[(task_id * N + n) * g.L + ti] = dCc[s * N + n];
      }
    }
  }
}

// Sums per-task partials [batch][segments][parts][N][L] into the (batch, G, N, L)
// gradient of a variable B or C: each group is a run of consecutive segments.
template <typename acc>
Tensor reduce_var(const Tensor& like, const std::vector<acc>& part, const Geometry& g, int64_t groups) {
  const int64_t per_group = g.tasks() / std::max<int64_t>(g.batch * groups, 1);  // 0 for batch 0
  Tensor full = torch::stable::new_empty(like, {g.batch, groups, per_group, g.N, g.L},
                                         sizeof(acc) == 8 ? ScalarType::Double : ScalarType::Float);
  std::copy(part.begin(), part.end(), full.mutable_data_ptr<acc>());
  std::vector<int64_t> dims{2};
  return torch::stable::to(torch::stable::sum(full, dims), like.scalar_type());
}

// Sums per-(batch, channel) partials over batch into a tensor of shape `shape`.
template <typename acc>
Tensor reduce_batch(const Tensor& like, const std::vector<acc>& part, int64_t batch,
                    std::vector<int64_t> shape, ScalarType dtype) {
  std::vector<int64_t> full_shape{batch};
  full_shape.insert(full_shape.end(), shape.begin(), shape.end());
  Tensor full = torch::stable::new_empty(like, full_shape, sizeof(acc) == 8 ? ScalarType::Double : ScalarType::Float);
  std::copy(part.begin(), part.end(), full.mutable_data_ptr<acc>());
  std::vector<int64_t> dims{0};
  return torch::stable::to(torch::stable::sum(full, dims), dtype);
}

template <typename acc>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Direction<acc>& dir, const Tensor& dout, const std::optional<Tensor>& dlast_state,
    const Tensor& u, const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& chunk_states,
    int64_t chunk_len) {
  const Geometry g(u, A, B, C, chunk_len);
  FV_CHECK(chunk_states.is_contiguous() && chunk_states.dim() == 4 && chunk_states.size(2) == g.nchunks &&
               chunk_states.scalar_type() == acc_dtype(u),
           "selective_scan_bwd: chunk_states does not match the forward's chunking");
  FV_CHECK(dout.is_contiguous(), "selective_scan_bwd: dout must be contiguous");
  const int64_t BD = g.batch * g.dim, BDL = BD * g.L;
  Grads<acc> gr;
  gr.dA.assign(BD * g.N, 0);
  gr.dD.assign(BD, 0);
  gr.dbias.assign(BD, 0);
  if (!g.var_B) gr.dB_const.assign(BD * g.N, 0);
  if (!g.var_C) gr.dC_const.assign(BD * g.N, 0);
  if (g.var_B) gr.dB_var.assign(g.tasks() * g.N * g.L, 0);
  if (g.var_C) gr.dC_var.assign(g.tasks() * g.N * g.L, 0);
  gr.du.assign(BDL, 0);
  gr.ddelta.assign(BDL, 0);
  if (dir.z) gr.dz.assign(BDL, 0);
  const acc* dlast = nullptr;
  if (dlast_state.has_value()) {
    FV_CHECK(dlast_state->is_contiguous() && dlast_state->scalar_type() == acc_dtype(u),
             "selective_scan_bwd: dlast_state must be contiguous in the accumulate dtype");
    dlast = dlast_state->const_data_ptr<acc>();
  }
  const acc* st = chunk_states.const_data_ptr<acc>();
  torch::stable::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t id = begin; id < end; ++id) backward_task(dir, g, Task(g, id), id, dout, dlast, st, gr);
  });
  const ScalarType a = acc_dtype(u);
  Tensor du = narrow_to(u, gr.du, u.scalar_type());
  Tensor ddelta = narrow_to(u, gr.ddelta, dir.delta->scalar_type());
  Tensor dz = dir.z ? narrow_to(*dir.z, gr.dz, dir.z->scalar_type())
                    : torch::stable::new_empty(u, {0}, u.scalar_type());
  Tensor dA = reduce_batch(u, gr.dA, g.batch, {g.dim, g.N}, a);
  Tensor dD = reduce_batch(u, gr.dD, g.batch, {g.dim}, a);
  Tensor dbias = reduce_batch(u, gr.dbias, g.batch, {g.dim}, a);
  Tensor dB = g.var_B ? reduce_var(B, gr.dB_var, g, g.groups_B)
                      : reduce_batch(u, gr.dB_const, g.batch, {g.dim, g.N}, B.scalar_type());
  Tensor dC = g.var_C ? reduce_var(C, gr.dC_var, g, g.groups_C)
                      : reduce_batch(u, gr.dC_const, g.batch, {g.dim, g.N}, C.scalar_type());
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp).

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cpu(
    Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, std::optional<Tensor> z,
    Tensor delta_bias, bool delta_softplus, bool reverse, int64_t chunk_len) {
  check_inputs(u, A, D, delta_bias);
  if (u.scalar_type() == ScalarType::Double) {
    auto dir = make_direction<double>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse);
    return forward_impl<double>(dir, u, A, B, C, chunk_len);
  }
  auto dir = make_direction<float>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse);
  return forward_impl<float>(dir, u, A, B, C, chunk_len);
}

std::tuple<Tensor, Tensor, Tensor> bi_selective_scan_fwd_cpu(
    Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, std::optional<Tensor> z,
    Tensor delta_bias, Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor D_b,
    Tensor delta_bias_b, bool delta_softplus, int64_t chunk_len) {
  check_inputs(u, A, D, delta_bias);
  check_inputs(u_b, A_b, D_b, delta_bias_b);
  FV_CHECK(B.dim() == B_b.dim() && C.dim() == C_b.dim() && (B.dim() != 4 || B.size(1) == B_b.size(1)) &&
               (C.dim() != 4 || C.size(1) == C_b.size(1)),
           "bi_selective_scan: B/C and B_b/C_b must have the same layout");
  auto run = [&](auto tag) {
    using acc = decltype(tag);
    auto f = make_direction<acc>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, false);
    auto r = make_direction<acc>(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b, delta_softplus, true);
    const Geometry g(u, A, B, C, chunk_len);
    std::vector<acc> out(g.batch * g.dim * g.L, acc(0));
    Tensor st_f = torch::stable::new_empty(u, {g.batch, g.dim, g.nchunks, g.N}, acc_dtype(u));
    Tensor st_r = torch::stable::new_empty(u, {g.batch, g.dim, g.nchunks, g.N}, acc_dtype(u));
    std::vector<acc> last(g.batch * g.dim * g.N);
    // One pass over the tasks runs both directions, so each task's output
    // rows stay in cache between them.
    torch::stable::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t id = begin; id < end; ++id) {
        const Task t(g, id);
        forward_task(f, g, t, out.data(), st_f.mutable_data_ptr<acc>(), last.data());
        forward_task(r, g, t, out.data(), st_r.mutable_data_ptr<acc>(), last.data());
      }
    });
    return std::make_tuple(narrow_to(u, out, u.scalar_type()), st_f, st_r);
  };
  if (u.scalar_type() == ScalarType::Double) return run(double{});
  return run(float{});
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd_cpu(
    Tensor dout, std::optional<Tensor> dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B,
    Tensor C, Tensor D, std::optional<Tensor> z, Tensor delta_bias, Tensor chunk_states,
    bool delta_softplus, bool reverse, int64_t chunk_len) {
  check_inputs(u, A, D, delta_bias);
  if (u.scalar_type() == ScalarType::Double) {
    auto dir = make_direction<double>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse);
    return backward_impl<double>(dir, dout, dlast_state, u, A, B, C, chunk_states, chunk_len);
  }
  auto dir = make_direction<float>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse);
  return backward_impl<float>(dir, dout, dlast_state, u, A, B, C, chunk_states, chunk_len);
}

}  // namespace
}  // namespace fastvision::scan

STABLE_TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("selective_scan_fwd", TORCH_BOX(&fastvision::scan::selective_scan_fwd_cpu));
  m.impl("selective_scan_bwd", TORCH_BOX(&fastvision::scan::selective_scan_bwd_cpu));
  m.impl("bi_selective_scan_fwd", TORCH_BOX(&fastvision::scan::bi_selective_scan_fwd_cpu));
}
