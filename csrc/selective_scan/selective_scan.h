// Per-element math of the selective scan (S6), shared by the CPU kernel and
// any CUDA kernel so that the CPU tests exercise the same formulas.
//
//   x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t
//   y_t = C_t . x_t;   pre_t = y_t + D * u_t;   out_t = pre_t * silu(z_t)
#pragma once

#include <cmath>

#include "../common/common.h"

namespace fastvision::scan {

// Bit casts that keep loops vectorisable (a memcpy through a local does not).
FV_HOST_DEVICE int32_t float_as_int(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  return __builtin_bit_cast(int32_t, f);
#endif
}
FV_HOST_DEVICE float int_as_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  return __builtin_bit_cast(float, i);
#endif
}

// exp(x) for float in a branch-free form the compiler vectorises (the state
// update calls it N times per step). Cody-Waite reduction x = k ln2 + r and a
// degree-6 polynomial: within 2 ulp of expf over the range, exact 0 below
// the underflow point (A is negative, so large negative arguments are common).
FV_HOST_DEVICE float exp_fast(float x) {
  // Round x / ln2 to nearest through the 1.5 * 2^23 trick (vectorises without
  // SSE4.1), then clamp k, not x: a clamped x would be a constant the
  // compiler splits into a branch, which stops vectorisation.
  float kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  kf = kf > -126.0f ? kf : -126.0f;
  kf = kf < 128.0f ? kf : 128.0f;
  float r = x - kf * 0.693359375f;
  r = r + kf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // Scale by 2^k through the exponent bits.
  int32_t bits = float_as_int(p) + static_cast<int32_t>(kf) * (1 << 23);
  // Out-of-range inputs by bit masks rather than selects on x, which the
  // compiler would also turn into branches: underflow gives 0, overflow inf,
  // NaN stays NaN.
  const int32_t under = -static_cast<int32_t>(x <= -87.33654f);
  const int32_t over = -static_cast<int32_t>(x > 88.7228394f);
  const int32_t nan = -static_cast<int32_t>(x != x);
  bits = (bits & ~(under | over | nan)) | (over & 0x7f800000) | (nan & 0x7fc00000);
  return int_as_float(bits);
}
FV_HOST_DEVICE double exp_fast(double x) { return std::exp(x); }


// log1p(y) for y >= 0 (float), vectorisable: log(w) for w = 1 + y in [1, inf)
// by exponent/mantissa split and the Cephes polynomial, then the classic
// correction log(w) * y / (w - 1), exact where 1 + y rounds to 1.
FV_HOST_DEVICE float log1p_fast(float y) {
  const float w = 1.0f + y;
  const int32_t bits = float_as_int(w);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = int_as_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float lw = p * m * z;
  lw = lw + e * -2.12194440e-4f;
  lw = lw - 0.5f * z;
  lw = m + lw;
  lw = lw + e * 0.693359375f;
  const float wm1 = w - 1.0f;
  const float out = wm1 == 0.0f ? y : lw * (y / wm1);
  return w == w ? out : w;  // NaN in, NaN out
}
FV_HOST_DEVICE double log1p_fast(double y) { return std::log1p(y); }

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
