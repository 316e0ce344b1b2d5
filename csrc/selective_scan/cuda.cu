// CUDA C++ kernels of the selective scan (backend="cuda"; the Triton kernels
// are the alternative). One warp per (batch, channel): lanes hold the state's
// N entries (N <= 256, up to 8 per lane), the warp walks time sequentially
// and reduces C . x with shuffles. Per-element math comes from
// selective_scan.h, shared with the CPU kernel that the CPU tests exercise.
//
// The forward stores the state after every chunk; the backward recomputes a
// chunk from its checkpoint into shared memory and walks it backwards.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../common/cuda.h"
#include "checks.h"
#include "selective_scan.h"

namespace fastvision::scan::cuda {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxState = 256;

using fastvision::cuda::current_stream;
using fastvision::cuda::DeviceGuard;
using fastvision::cuda::In;
using fastvision::cuda::in;
using fastvision::cuda::Out;
using fastvision::cuda::out;

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
  // Warps per block vary with the device's shared memory (backward_warps).
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
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
    float x[NPER];
#pragma unroll
    for (int j = 0; j < NPER; ++j) {
      const int64_t n = lane + j * kWarp;
      x[j] = (c > 0 && n < P.N) ? states[(bd * P.nchunks + c - 1) * P.N + n] : 0.f;
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
          const float h = dy * Cv + k[j];
          const float x_decayed = xt - step_u * Bv;
          dstep += h * (A[j] * x_decayed + Bv * uu);
          dA[j] += h * step * x_decayed;
          du += h * step * Bv;
          if (P.var_B) atomicAdd(G.dB + ib, h * step_u); else dBc[j] += h * step_u;
          if (P.var_C) atomicAdd(G.dC + ic, dy * xt); else dCc[j] += dy * xt;
          k[j] = h * as[s * NP + n];
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

// Checks every tensor and integer argument of one direction (checks.h; the
// CUDA kernels read float32 / float16 / bfloat16 and keep up to kMaxState
// state entries per channel) and fills the kernel parameters. `chunk` is
// check_chunk_len's.
Params make_params(const char* op, const std::string& sfx, const Tensor& u, const Tensor& delta, const Tensor& A,
                   const Tensor& B, const Tensor& C, const Tensor& D, const std::optional<Tensor>& z,
                   const Tensor& bias, bool softplus, bool reverse, int64_t chunk, ScanSizes* sizes = nullptr) {
  const ScanSizes s = check_direction(op, Backend::CUDA, sfx, u, delta, A, B, C, D, z, bias);
  FV_CHECK(s.N <= kMaxState, op, "the CUDA kernel supports a state size N = A", sfx, ".size(1) <= ", kMaxState,
           "; got ", s.N);
  if (sizes) *sizes = s;
  Params P{};
  P.batch = s.batch; P.dim = s.dim; P.L = s.L; P.N = s.N;
  P.chunk = chunk; P.nchunks = ceil_div(P.L, chunk);
  P.var_B = s.var_B; P.var_C = s.var_C;
  P.groups_B = s.groups_B; P.groups_C = s.groups_C;
  P.has_z = z.has_value(); P.softplus = softplus; P.reverse = reverse;
  P.u = in(u); P.delta = in(delta); P.B = in(B); P.C = in(C);
  if (P.has_z) P.z = in(*z);
  P.A = A.const_data_ptr<float>(); P.D = D.const_data_ptr<float>(); P.bias = bias.const_data_ptr<float>();
  return P;
}

// One warp per (batch, channel): the grid must fit in gridDim.x.
void check_grid(const char* op, const Params& P) {
  FV_CHECK(ceil_div(P.batch * P.dim, kWarpsPerBlock) <= 0x7fffffff, op,
           "batch * dim = ", P.batch * P.dim, " is too large for the CUDA kernel's grid (at most ",
           int64_t{0x7fffffff} * kWarpsPerBlock, ")");
}

// Dynamic shared memory one warp of the backward kernel needs: a chunk's
// states and decay factors ([chunk][nper * 32] each) and its C . x ([chunk]).
size_t backward_smem_per_warp(int64_t chunk, int nper) {
  return sizeof(float) * (2 * chunk * nper * kWarp + chunk);
}
int state_per_lane(int64_t N) { return N <= 32 ? 1 : N <= 64 ? 2 : N <= 128 ? 4 : 8; }

// Warps per block of the backward: as many as the device's shared memory per
// block holds, up to kWarpsPerBlock (large N needs 3 on sm_86/sm_89's 99 KB).
int backward_warps(const char* op, const Params& P, int device, int64_t chunk_len) {
  const size_t per_warp = backward_smem_per_warp(P.chunk, state_per_lane(P.N));
  const int max_smem = fastvision::cuda::device_attribute(op, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  FV_CHECK(per_warp <= static_cast<size_t>(max_smem), op, "chunk_len = ", chunk_len, " with state size N = ",
           P.N, " needs ", per_warp, " bytes of shared memory per warp in the CUDA backward; cuda:", device,
           " has ", max_smem, " per block (use a smaller chunk_len, as fastvision.ops.scan_chunk_len(N) picks)");
  const int warps = static_cast<int>(std::min<size_t>(kWarpsPerBlock, max_smem / per_warp));
  FV_CHECK(ceil_div(P.batch * P.dim, warps) <= 0x7fffffff, op, "batch * dim = ", P.batch * P.dim,
           " is too large for the CUDA backward's grid (at most ", int64_t{0x7fffffff} * warps, ")");
  return warps;
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
  static void run(const Params& P, int warps, const Grad& G, In dout, const float* dlast, const float* st,
                  cudaStream_t s) {
    const size_t smem = warps * backward_smem_per_warp(P.chunk, NPER);
    if (smem > 48 * 1024)
      FV_CUDA_CHECK("selective_scan_bwd", cudaFuncSetAttribute(backward_kernel<NPER>,
                                                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                              static_cast<int>(smem)));
    const unsigned blocks = static_cast<unsigned>(ceil_div(P.batch * P.dim, warps));
    backward_kernel<NPER><<<blocks, warps * kWarp, smem, s>>>(P, G, dout, dlast, st);
  }
};

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cuda(
    Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, std::optional<Tensor> z,
    Tensor delta_bias, bool delta_softplus, bool reverse, int64_t chunk_len) {
  constexpr const char* op = "selective_scan_fwd";
  const int64_t chunk = check_chunk_len(op, chunk_len, u.dim() == 3 ? u.size(2) : 1);
  const Params P = make_params(op, "", u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk);
  check_grid(op, P);
  const int device = u.get_device_index();
  DeviceGuard guard(op, device);
  Tensor o = alloc_empty(op, "out", u, sizes_of(u), u.scalar_type());
  Tensor last = alloc_zeros(op, "last_state", u, {P.batch, P.dim, P.N}, ScalarType::Float);
  Tensor st = alloc_empty(op, "chunk_states", u, {P.batch, P.dim, P.nchunks, P.N}, ScalarType::Float);
  if (P.batch * P.dim > 0 && P.L > 0) {
    by_state_size<LaunchForward>(P.N, P, st.mutable_data_ptr<float>(), last.mutable_data_ptr<float>(),
                                 static_cast<float*>(nullptr), out(o), current_stream(op, device));
    FV_CUDA_CHECK(op, cudaGetLastError());
  }
  return {o, last, st};
}

std::tuple<Tensor, Tensor, Tensor> bi_selective_scan_fwd_cuda(
    Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, std::optional<Tensor> z,
    Tensor delta_bias, Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor D_b,
    Tensor delta_bias_b, bool delta_softplus, int64_t chunk_len) {
  constexpr const char* op = "bi_selective_scan_fwd";
  const int64_t chunk = check_chunk_len(op, chunk_len, u.dim() == 3 ? u.size(2) : 1);
  ScanSizes sf, sr;
  const Params F = make_params(op, "", u, delta, A, B, C, D, z, delta_bias, delta_softplus, false, chunk, &sf);
  // z is shared: checked against u above.
  const Params R =
      make_params(op, "_b", u_b, delta_b, A_b, B_b, C_b, D_b, std::nullopt, delta_bias_b, delta_softplus, true, chunk, &sr);
  check_mirror(op, sf, sr, A, A_b, B, B_b, C, C_b);
  check_same_cuda_device(op, "u_b", u_b, "u", u);
  Params Rz = R;
  Rz.has_z = F.has_z;
  Rz.z = F.z;
  check_grid(op, F);
  const int device = u.get_device_index();
  DeviceGuard guard(op, device);
  Tensor o = alloc_empty(op, "out", u, sizes_of(u), u.scalar_type());
  // Sum the two directions in float: in the output itself when it is float.
  Tensor acc = u.scalar_type() == ScalarType::Float ? o
                                                    : alloc_empty(op, "out (float32 sum)", u, sizes_of(u), ScalarType::Float);
  Tensor sfw = alloc_empty(op, "chunk_states", u, {F.batch, F.dim, F.nchunks, F.N}, ScalarType::Float);
  Tensor srv = alloc_empty(op, "chunk_states_b", u, {F.batch, F.dim, F.nchunks, F.N}, ScalarType::Float);
  if (F.batch * F.dim > 0 && F.L > 0) {
    by_state_size<LaunchBi>(F.N, F, Rz, sfw.mutable_data_ptr<float>(), srv.mutable_data_ptr<float>(),
                            acc.mutable_data_ptr<float>(), out(o), current_stream(op, device));
    FV_CUDA_CHECK(op, cudaGetLastError());
  }
  return {o, sfw, srv};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd_cuda(
    Tensor dout, std::optional<Tensor> dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B,
    Tensor C, Tensor D, std::optional<Tensor> z, Tensor delta_bias, Tensor chunk_states,
    bool delta_softplus, bool reverse, int64_t chunk_len) {
  constexpr const char* op = "selective_scan_bwd";
  const int64_t chunk = check_chunk_len(op, chunk_len, u.dim() == 3 ? u.size(2) : 1);
  ScanSizes s;
  const Params P = make_params(op, "", u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk, &s);
  check_backward(op, Backend::CUDA, s, chunk, dout, dlast_state, chunk_states, u);
  const int device = u.get_device_index();
  DeviceGuard guard(op, device);
  // The backward keeps a chunk's states in shared memory: chunk_len bounds it.
  const int warps = backward_warps(op, P, device, chunk_len);
  const ScalarType f32 = ScalarType::Float;
  Tensor du = alloc_zeros(op, "du", u, sizes_of(u), u.scalar_type());
  Tensor ddelta = alloc_zeros(op, "ddelta", delta, sizes_of(delta), delta.scalar_type());
  Tensor dz = P.has_z ? alloc_zeros(op, "dz", *z, sizes_of(*z), z->scalar_type())
                      : alloc_empty(op, "dz", u, {0}, u.scalar_type());
  Tensor dA = alloc_zeros(op, "dA partial sums", u, {P.batch, P.dim, P.N}, f32);
  Tensor dD = alloc_zeros(op, "dD partial sums", u, {P.batch, P.dim}, f32);
  Tensor dbias = alloc_zeros(op, "ddelta_bias partial sums", u, {P.batch, P.dim}, f32);
  Tensor dB = P.var_B ? alloc_zeros(op, "dB", u, sizes_of(B), f32) : alloc_zeros(op, "dB partial sums", u, {P.batch, P.dim, P.N}, f32);
  Tensor dC = P.var_C ? alloc_zeros(op, "dC", u, sizes_of(C), f32) : alloc_zeros(op, "dC partial sums", u, {P.batch, P.dim, P.N}, f32);
  if (P.batch * P.dim > 0 && P.L > 0) {
    Grad G{out(du), out(ddelta), P.has_z ? out(dz) : Out{},
           dA.mutable_data_ptr<float>(), dD.mutable_data_ptr<float>(), dbias.mutable_data_ptr<float>(),
           dB.mutable_data_ptr<float>(), dC.mutable_data_ptr<float>()};
    const float* dlast = dlast_state.has_value() ? dlast_state->const_data_ptr<float>() : nullptr;
    by_state_size<LaunchBackward>(P.N, P, warps, G, in(dout), dlast, chunk_states.const_data_ptr<float>(),
                                  current_stream(op, device));
    FV_CUDA_CHECK(op, cudaGetLastError());
  }
  auto finish = [&](const Tensor& t, bool variable, ScalarType dt, const char* what) {
    return variable ? alloc_cast(op, what, t, dt) : alloc_sum(op, what, t, 0, dt);
  };
  return {du, ddelta, finish(dA, false, f32, "dA"), finish(dB, P.var_B, B.scalar_type(), "dB"),
          finish(dC, P.var_C, C.scalar_type(), "dC"), finish(dD, false, f32, "dD"), dz,
          finish(dbias, false, f32, "ddelta_bias")};
}

}  // namespace
}  // namespace fastvision::scan::cuda

STABLE_TORCH_LIBRARY_IMPL(fastvision, CUDA, m) {
  m.impl("selective_scan_fwd", TORCH_BOX(&fastvision::scan::cuda::selective_scan_fwd_cuda));
  m.impl("selective_scan_bwd", TORCH_BOX(&fastvision::scan::cuda::selective_scan_bwd_cuda));
  m.impl("bi_selective_scan_fwd", TORCH_BOX(&fastvision::scan::cuda::bi_selective_scan_fwd_cuda));
}
