// Fast float math shared by every op family: bit casts and exp / log1p in
// branch-free forms that GCC vectorises (no libm calls in hot loops). Double
// overloads go through libm so float64 (gradcheck) keeps full precision.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace fastvision {

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
  // SSE4.1); k is then also in t's low mantissa bits, read as an integer
  // difference, so no float-to-int conversion or clamp is needed (a select
  // on k or x makes GCC split the code into branches, which stops
  // vectorisation). Out-of-range x gives a garbage k, masked out below.
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float kf = t - 12582912.0f;
  const uint32_t k = static_cast<uint32_t>(float_as_int(t)) - 0x4b400000u;  // bits of 1.5 * 2^23
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
  int32_t bits = static_cast<int32_t>(static_cast<uint32_t>(float_as_int(p)) + (k << 23));
  // Out-of-range inputs by bit masks rather than selects on x, which the
  // compiler would also turn into branches: underflow gives 0; overflow and
  // NaN give x * inf, which is inf or NaN.
  const int32_t under = -static_cast<int32_t>(x < -87.33654f);     // the result would be subnormal
  const int32_t high = -static_cast<int32_t>(!(x < 88.7228394f));  // above log(FLT_MAX), or NaN
  bits = (bits & ~(under | high)) | (high & float_as_int(x * __builtin_inff()));
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

}  // namespace fastvision
