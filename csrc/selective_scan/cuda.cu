// CUDA C++ kernels of the selective scan (backend="cuda"; the Triton kernels
// are the alternative). One warp per (batch, channel): lanes hold the state's
// N entries (N <= 256, up to 8 per lane), the warp walks time sequentially
// and reduces C . x with shuffles. Per-element math comes from
// selective_scan.h, shared with the CPU kernel that the CPU tests exercise.
//
// The forward stores the state after every chunk; the backward recomputes a
// chunk from its checkpoint into shared memory and walks it backwards.

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <optional>
#include <tuple>
#include <vector>

#include "selective_scan.h"

namespace fastvision::scan::cuda {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxState = 256;

#define FV_CUDA_CHECK(expr)                                                          \
  do {                                                                               \
    cudaError_t err_ = (expr);                                                       \
    FV_CHECK(err_ == cudaSuccess, "fastvision CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)

// A read-only view of a tensor whose dtype is known only at run time; the
// switch is uniform across the warp, so it costs no divergence.
struct In {
  const void* p = nullptr;
  int dtype = 0;  // 0 float, 1 half, 2 bfloat16
  __device__ float operator[](int64_t i) const {
    switch (dtype) {
      case 1: return __half2float(static_cast<const __half*>(p)[i]);
      case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
      default: return static_cast<const float*>(p)[i];
    }
  }
};
struct Out {
  void* p = nullptr;
  int dtype = 0;
  __device__ void set(int64_t i, float v) const {
    switch (dtype) {
      case 1: static_cast<__half*>(p)[i] = __float2half(v); break;
      case 2: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v); break;
      default: static_cast<float*>(p)[i] = v;
    }
  }
};

int dtype_code(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return 0;
    case ScalarType::Half: return 1;
    case ScalarType::BFloat16: return 2;
    default: FV_CHECK(false, "selective_scan (cuda): inputs must be float32, float16 or bfloat16");
  }
  return 0;
}
In in(const Tensor& t) { return In{t.const_data_ptr(), dtype_code(t.scalar_type())}; }
Out out(const Tensor& t) { return Out{t.mutable_data_ptr(), dtype_code(t.scalar_type())}; }

struct Params {
  int64_t batch, dim, L, N, chunk, nchunks, groups_B, groups_C;
  bool var_B, var_C, has_z, softplus, reverse;
  In u, delta, B, C, z;
  const float *A, *D, *bias;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Index of B or C entry (n, t) for channel d of batch b.
__device__ __forceinline__ int64_t bc_index(bool variable, int64_t groups, const Params& P, int64_t b,
                                            int64_t d, int64_t n, int64_t t) {
  if (!variable) return d * P.N + n;
  const int64_t g = d / (P.dim / groups);
  return ((b * groups + g) * P.N + n) * P.L + t;
}

// Forward of one direction for the warp's (b, d); adds the gated output into
// out32 (float accumulator) when `accumulate`, else writes `out` directly.
template <int NPER>
__device__ void forward_warp(const Params& P, int64_t b, int64_t d, float* states, float* last,
                             float* out32, Out out_final, bool accumulate) {
  const int lane = threadIdx.x % kWarp;
  const int64_t bd = b * P.dim + d;
  float x[NPER], A[NPER];
#pragma unroll
  for (int j = 0; j < NPER; ++j) {
    const int64_t n = lane + j * kWarp;
    x[j] = 0.f;
    A[j] = n < P.N ? P.A[d * P.N + n] : 0.f;
  }
  for (int64_t p = 0; p < P.L; ++p) {
    const int64_t t = P.reverse ? P.L - 1 - p : p;
    const float uu = P.u[bd * P.L + t];
    const float step = step_size(P.delta[bd * P.L + t], P.bias[d], P.softplus);
    float ys = 0.f;
#pragma unroll
    for (int j = 0; j < NPER; ++j) {
      const int64_t n = lane + j * kWarp;
      if (n < P.N) {
        x[j] = __expf(step * A[j]) * x[j] + step * uu * P.B[bc_index(P.var_B, P.groups_B, P, b, d, n, t)];
        ys += P.C[bc_index(P.var_C, P.groups_C, P, b, d, n, t)] * x[j];
      }
    }
    const float y = warp_sum(ys);
    if (lane == 0) {
      const float pre = y + P.D[d] * uu;
      const float o = P.has_z ? pre * silu(P.z[bd * P.L + t]) : pre;
      if (accumulate) out32[bd * P.L + t] += o;
      else if (out32) out32[bd * P.L + t] = o;
      else out_final.set(bd * P.L + t, o);
    }
    if ((p + 1) % P.chunk == 0 || p + 1 == P.L) {
      const int64_t c = p / P.chunk;
#pragma unroll
      for (int j = 0; j < NPER; ++j) {
        const int64_t n = lane + j * kWarp;
        if (n < P.N) states[(bd * P.nchunks + c) * P.N + n] = x[j];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NPER; ++j) {
    const int64_t n = lane + j * kWarp;
    if (n < P.N && last) last[bd * P.N + n] = x[j];
  }
}

template <int NPER>
__global__ void forward_kernel(Params P, float* states, float* last, float* out32, Out out_final) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (w >= P.batch * P.dim) return;
  forward_warp<NPER>(P, w / P.dim, w % P.dim, states, last, out32, out_final, false);
}

// Both directions of Vim's scan for one (b, d): the reverse pass adds to the
// float accumulator written by the forward pass (same warp: lane 0 wrote it).
template <int NPER>
__global__ void bi_forward_kernel(Params F, Params R, float* states_f, float* states_r, float* out32,
                                  Out out_final) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (w >= F.batch * F.dim) return;
  const int64_t b = w / F.dim, d = w % F.dim, bd = b * F.dim + d;
  forward_warp<NPER>(F, b, d, states_f, nullptr, out32, out_final, false);
  __syncwarp();
  forward_warp<NPER>(R, b, d, states_r, nullptr, out32, out_final, true);
  __syncwarp();
  if (out_final.p != out32 && threadIdx.x % kWarp == 0)
    for (int64_t t = 0; t < F.L; ++t) out_final.set(bd * F.L + t, out32[bd * F.L + t]);
}

struct Grad {
  Out du, ddelta, dz;
  float *dA, *dD, *dbias;        // per (b, d) partials, summed over batch on the host
  float *dB, *dC;                // variable: (batch, G, N, L) float; constant: per (b, d, N)
};

template <int NPER>
__global__ void backward_kernel(Params P, Grad G, In dout, const float* dlast, const float* states) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (w >= P.batch * P.dim) return;
  const int64_t b = w / P.dim, d = w % P.dim, bd = b * P.dim + d;
  const int64_t T = P.chunk, NP = NPER * kWarp;
  float* xs = smem + warp * (2 * T * NP + T);  // [T][NP] states of the chunk
  float* as = xs + T * NP;                     // [T][NP] exp(delta A)
  float* ys = as + T * NP;                     // [T] C . x

  float A[NPER], k[NPER], dA[NPER], dBc[NPER], dCc[NPER];
#pragma unroll
  for (int j = 0; j < NPER; ++j) {
    const int64_t n = lane + j * kWarp;
    A[j] = n < P.N ? P.A[d * P.N + n] : 0.f;
    k[j] = (n < P.N && dlast) ? dlast[bd * P.N + n] : 0.f;
    dA[j] = dBc[j] = dCc[j] = 0.f;
  }
  float dD = 0.f, dbias = 0.f;
  for (int64_t c = P.nchunks - 1; c >= 0; --c) {
    const int64_t p0 = c * T, count = min(T, P.L - p0);
    float x[NPER], x0[NPER];  // x0: the state before the chunk
#pragma unroll
    for (int j = 0; j < NPER; ++j) {
      const int64_t n = lane + j * kWarp;
      x[j] = x0[j] = (c > 0 && n < P.N) ? states[(bd * P.nchunks + c - 1) * P.N + n] : 0.f;
    }
    for (int64_t s = 0; s < count; ++s) {  // recompute the chunk
      const int64_t t = P.reverse ? P.L - 1 - (p0 + s) : p0 + s;
      const float uu = P.u[bd * P.L + t];
      const float step = step_size(P.delta[bd * P.L + t], P.bias[d], P.softplus);
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < NPER; ++j) {
        const int64_t n = lane + j * kWarp;
        if (n < P.N) {
          const float a = __expf(step * A[j]);
          x[j] = a * x[j] + step * uu * P.B[bc_index(P.var_B, P.groups_B, P, b, d, n, t)];
          part += P.C[bc_index(P.var_C, P.groups_C, P, b, d, n, t)] * x[j];
          xs[s * NP + n] = x[j];
          as[s * NP + n] = a;
        }
      }
      const float y = warp_sum(part);
      if (lane == 0) ys[s] = y;
    }
    __syncwarp();
    for (int64_t s = count - 1; s >= 0; --s) {  // walk it backwards
      const int64_t t = P.reverse ? P.L - 1 - (p0 + s) : p0 + s;
      const int64_t i = bd * P.L + t;
      const float uu = P.u[i], raw = P.delta[i];
      const float step = step_size(raw, P.bias[d], P.softplus), step_u = step * uu;
      float dy = dout[i];
      if (P.has_z) {
        const float zz = P.z[i];
        const float pre = ys[s] + P.D[d] * uu;
        if (lane == 0) G.dz.set(i, dy * pre * silu_grad(zz));
        dy *= silu(zz);
      }
      float dstep = 0.f, du = 0.f;
#pragma unroll
      for (int j = 0; j < NPER; ++j) {
        const int64_t n = lane + j * kWarp;
        if (n < P.N) {
          const int64_t ib = bc_index(P.var_B, P.groups_B, P, b, d, n, t);
          const int64_t ic = bc_index(P.var_C, P.groups_C, P, b, d, n, t);
          const float Bv = P.B[ib], Cv = P.C[ic], xt = xs[s * NP + n];
          // x_{t-1} itself (not x_t - step u B, which cancels at large
          // steps and is NaN after a NaN u): the previous step's state, or
          // the chunk's start state for its first step.
          const float xp = s > 0 ? xs[(s - 1) * NP + n] : x0[j];
          const float a = as[s * NP + n];
          const float h = dy * Cv + k[j];
          const float hx = (h * xp) * a;  // adjoint of step * A
          dstep += A[j] * hx + (h * uu) * Bv;
          dA[j] += step * hx;
          du += h * step * Bv;
          if (P.var_B) atomicAdd(G.dB + ib, h * step_u); else dBc[j] += h * step_u;
          if (P.var_C) atomicAdd(G.dC + ic, dy * xt); else dCc[j] += dy * xt;
          k[j] = h * a;
        }
      }
      dstep = warp_sum(dstep);
      du = warp_sum(du);
      if (lane == 0) {
        const float dr = dstep * step_size_grad(raw, P.bias[d], P.softplus);
        G.ddelta.set(i, dr);
        G.du.set(i, du + dy * P.D[d]);
        dbias += dr;
        dD += dy * uu;
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int j = 0; j < NPER; ++j) {
    const int64_t n = lane + j * kWarp;
    if (n < P.N) {
      G.dA[bd * P.N + n] = dA[j];
      if (!P.var_B) G.dB[bd * P.N + n] = dBc[j];
      if (!P.var_C) G.dC[bd * P.N + n] = dCc[j];
    }
  }
  if (lane == 0) {
    G.dD[bd] = dD;
    G.dbias[bd] = dbias;
  }
}

// ---------------------------------------------------------------------------
// Host side.

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  FV_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
           "fastvision: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

Params make_params(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                   const Tensor& D, const std::optional<Tensor>& z, const Tensor& bias, bool softplus,
                   bool reverse, int64_t chunk_len) {
  FV_CHECK(u.is_cuda() && u.is_contiguous() && u.dim() == 3, "selective_scan (cuda): u must be a contiguous CUDA (batch, dim, L) tensor");
  FV_CHECK(A.scalar_type() == ScalarType::Float && D.scalar_type() == ScalarType::Float &&
               bias.scalar_type() == ScalarType::Float,
           "selective_scan (cuda): A, D and delta_bias must be float32");
  FV_CHECK(A.size(1) <= kMaxState, "selective_scan (cuda): d_state N must be <= 256");
  FV_CHECK(chunk_len > 0, "selective_scan (cuda): chunk_len must be positive");
  Params P{};
  P.batch = u.size(0); P.dim = u.size(1); P.L = u.size(2); P.N = A.size(1);
  P.chunk = chunk_len; P.nchunks = ceil_div(P.L, chunk_len);
  P.var_B = B.dim() == 4; P.var_C = C.dim() == 4;
  P.groups_B = P.var_B ? B.size(1) : 1; P.groups_C = P.var_C ? C.size(1) : 1;
  P.has_z = z.has_value(); P.softplus = softplus; P.reverse = reverse;
  P.u = in(u); P.delta = in(delta); P.B = in(B); P.C = in(C);
  if (P.has_z) P.z = in(*z);
  P.A = A.const_data_ptr<float>(); P.D = D.const_data_ptr<float>(); P.bias = bias.const_data_ptr<float>();
  return P;
}

template <template <int> class Launch, typename... Args>
void by_state_size(int64_t N, Args&&... args) {
  if (N <= 32) Launch<1>::run(args...);
  else if (N <= 64) Launch<2>::run(args...);
  else if (N <= 128) Launch<4>::run(args...);
  else Launch<8>::run(args...);
}

unsigned blocks_for(int64_t warps) { return static_cast<unsigned>(ceil_div(warps, kWarpsPerBlock)); }

template <int NPER>
struct LaunchForward {
  static void run(const Params& P, float* st, float* last, float* out32, Out o, cudaStream_t s) {
    forward_kernel<NPER><<<blocks_for(P.batch * P.dim), kWarpsPerBlock * kWarp, 0, s>>>(P, st, last, out32, o);
  }
};
template <int NPER>
struct LaunchBi {
  static void run(const Params& F, const Params& R, float* sf, float* sr, float* out32, Out o, cudaStream_t s) {
    bi_forward_kernel<NPER><<<blocks_for(F.batch * F.dim), kWarpsPerBlock * kWarp, 0, s>>>(F, R, sf, sr, out32, o);
  }
};
template <int NPER>
struct LaunchBackward {
  static void run(const Params& P, const Grad& G, In dout, const float* dlast, const float* st, cudaStream_t s) {
    const size_t smem = sizeof(float) * kWarpsPerBlock * (2 * P.chunk * NPER * kWarp + P.chunk);
    if (smem > 48 * 1024)
      FV_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel<NPER>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
    backward_kernel<NPER><<<blocks_for(P.batch * P.dim), kWarpsPerBlock * kWarp, smem, s>>>(P, G, dout, dlast, st);
  }
};

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cuda(
    Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, std::optional<Tensor> z,
    Tensor delta_bias, bool delta_softplus, bool reverse, int64_t chunk_len) {
  const Params P = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_len);
  torch::stable::accelerator::DeviceGuard guard(u.get_device_index());
  Tensor o = torch::stable::new_empty(u, u.sizes());
  Tensor last = torch::stable::new_zeros(u, {P.batch, P.dim, P.N}, ScalarType::Float);
  Tensor st = torch::stable::new_empty(u, {P.batch, P.dim, P.nchunks, P.N}, ScalarType::Float);
  if (P.batch * P.dim > 0 && P.L > 0) {
    by_state_size<LaunchForward>(P.N, P, st.mutable_data_ptr<float>(), last.mutable_data_ptr<float>(),
                                 static_cast<float*>(nullptr), out(o), current_stream(u));
    FV_CUDA_CHECK(cudaGetLastError());
  }
  return {o, last, st};
}

std::tuple<Tensor, Tensor, Tensor> bi_selective_scan_fwd_cuda(
    Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, std::optional<Tensor> z,
    Tensor delta_bias, Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor D_b,
    Tensor delta_bias_b, bool delta_softplus, int64_t chunk_len) {
  const Params F = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, false, chunk_len);
  const Params R = make_params(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b, delta_softplus, true, chunk_len);
  torch::stable::accelerator::DeviceGuard guard(u.get_device_index());
  Tensor o = torch::stable::new_empty(u, u.sizes());
  // Sum the two directions in float: in the output itself when it is float.
  Tensor acc = u.scalar_type() == ScalarType::Float ? o : torch::stable::new_empty(u, u.sizes(), ScalarType::Float);
  Tensor sf = torch::stable::new_empty(u, {F.batch, F.dim, F.nchunks, F.N}, ScalarType::Float);
  Tensor sr = torch::stable::new_empty(u, {F.batch, F.dim, F.nchunks, F.N}, ScalarType::Float);
  if (F.batch * F.dim > 0 && F.L > 0) {
    by_state_size<LaunchBi>(F.N, F, R, sf.mutable_data_ptr<float>(), sr.mutable_data_ptr<float>(),
                            acc.mutable_data_ptr<float>(), out(o), current_stream(u));
    FV_CUDA_CHECK(cudaGetLastError());
  }
  return {o, sf, sr};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd_cuda(
    Tensor dout, std::optional<Tensor> dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B,
    Tensor C, Tensor D, std::optional<Tensor> z, Tensor delta_bias, Tensor chunk_states,
    bool delta_softplus, bool reverse, int64_t chunk_len) {
  const Params P = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_len);
  FV_CHECK(dout.is_contiguous() && chunk_states.is_contiguous() && chunk_states.size(2) == P.nchunks,
           "selective_scan_bwd (cuda): dout and chunk_states must be contiguous, from the same chunking");
  torch::stable::accelerator::DeviceGuard guard(u.get_device_index());
  const ScalarType f32 = ScalarType::Float;
  Tensor du = torch::stable::new_zeros(u, u.sizes());
  Tensor ddelta = torch::stable::new_zeros(delta, delta.sizes());
  Tensor dz = P.has_z ? torch::stable::new_zeros(*z, z->sizes()) : torch::stable::new_empty(u, {0});
  Tensor dA = torch::stable::new_zeros(u, {P.batch, P.dim, P.N}, f32);
  Tensor dD = torch::stable::new_zeros(u, {P.batch, P.dim}, f32);
  Tensor dbias = torch::stable::new_zeros(u, {P.batch, P.dim}, f32);
  Tensor dB = P.var_B ? torch::stable::new_zeros(u, B.sizes(), f32) : torch::stable::new_zeros(u, {P.batch, P.dim, P.N}, f32);
  Tensor dC = P.var_C ? torch::stable::new_zeros(u, C.sizes(), f32) : torch::stable::new_zeros(u, {P.batch, P.dim, P.N}, f32);
  if (P.batch * P.dim > 0 && P.L > 0) {
    Grad G{out(du), out(ddelta), P.has_z ? out(dz) : Out{},
           dA.mutable_data_ptr<float>(), dD.mutable_data_ptr<float>(), dbias.mutable_data_ptr<float>(),
           dB.mutable_data_ptr<float>(), dC.mutable_data_ptr<float>()};
    const float* dlast = dlast_state.has_value() ? dlast_state->const_data_ptr<float>() : nullptr;
    by_state_size<LaunchBackward>(P.N, P, G, in(dout), dlast, chunk_states.const_data_ptr<float>(),
                                  current_stream(u));
    FV_CUDA_CHECK(cudaGetLastError());
  }
  const std::vector<int64_t> batch_dim{0};
  auto finish = [&](const Tensor& t, bool variable, ScalarType dt) {
    return torch::stable::to(variable ? t : torch::stable::sum(t, batch_dim), dt);
  };
  return {du, ddelta, finish(dA, false, f32), finish(dB, P.var_B, B.scalar_type()),
          finish(dC, P.var_C, C.scalar_type()), finish(dD, false, f32), dz, finish(dbias, false, f32)};
}

}  // namespace
}  // namespace fastvision::scan::cuda

STABLE_TORCH_LIBRARY_IMPL(fastvision, CUDA, m) {
  m.impl("selective_scan_fwd", TORCH_BOX(&fastvision::scan::cuda::selective_scan_fwd_cuda));
  m.impl("selective_scan_bwd", TORCH_BOX(&fastvision::scan::cuda::selective_scan_bwd_cuda));
  m.impl("bi_selective_scan_fwd", TORCH_BOX(&fastvision::scan::cuda::bi_selective_scan_fwd_cuda));
}
