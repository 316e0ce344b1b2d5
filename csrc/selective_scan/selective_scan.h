// Per-element math of the selective scan (S6), shared by the CPU kernel and
// any CUDA kernel so that the CPU tests exercise the same formulas.
//
//   x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t
//   y_t = C_t . x_t;   pre_t = y_t + D * u_t;   out_t = pre_t * silu(z_t)
#pragma once

#include <cmath>

#include "../common/common.h"
#include "../common/fast_math.h"

namespace fastvision::scan {

// softplus with PyTorch's default threshold of 20, as mamba's kernels use.
// Written with exp_fast / log1p_fast so that float loops over time steps
// vectorise; double (gradcheck) goes through std::exp and std::log1p.
template <typename T>
FV_HOST_DEVICE T softplus(T v) {
  return v <= T(20) ? log1p_fast(exp_fast(v)) : v;
}
template <typename T>
FV_HOST_DEVICE T sigmoid(T v) {
  return T(1) / (T(1) + exp_fast(-v));
}
// d softplus / dv: the sigmoid below the threshold, exactly 1 above it.
template <typename T>
FV_HOST_DEVICE T softplus_grad(T v) {
  return v <= T(20) ? sigmoid(v) : T(1);
}
template <typename T>
FV_HOST_DEVICE T silu(T v) {
  return v * sigmoid(v);
}
template <typename T>
FV_HOST_DEVICE T silu_grad(T v) {
  const T s = sigmoid(v);
  return s * (T(1) + v * (T(1) - s));
}

// The discretised step size: delta + bias, then softplus when asked.
template <typename T>
FV_HOST_DEVICE T step_size(T delta_raw, T bias, bool use_softplus) {
  const T v = delta_raw + bias;
  return use_softplus ? softplus(v) : v;
}
// d step / d delta_raw.
template <typename T>
FV_HOST_DEVICE T step_size_grad(T delta_raw, T bias, bool use_softplus) {
  return use_softplus ? softplus_grad(delta_raw + bias) : T(1);
}

}  // namespace fastvision::scan
