// Argument checks of the deform_conv2d entry points (host code), following
// torchvision's deform_conv2d (its checks, with the argument named):
//   input (batch, Cin, H, W); weight (Cout, Cin / groups, kh, kw) with
//   groups = Cin / weight.shape[1] dividing Cout; offset (batch, 2 * G * kh * kw,
//   Ho, Wo) with G = offset.shape[1] / (2 * kh * kw) offset groups dividing Cin;
//   mask (batch, G * kh * kw, Ho, Wo) or None; bias (Cout,) or None; stride,
//   dilation >= 1, padding >= 0 ([h, w]); Ho, Wo >= 1. One float dtype, all
//   contiguous, on input's device. Backward: dout (batch, Cout, Ho, Wo).
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../common/check.h"
#include "../common/dtype.h"

namespace fastvision::dc {

struct DcSizes {
  int64_t B = 0, Cin = 0, H = 0, W = 0, Cout = 0;
  int64_t groups = 1, Cg = 0, Og = 0;  // weight groups, input / output channels per weight group
  int64_t G = 1, Cog = 0;              // offset groups, channels per offset group
  int64_t kh = 0, kw = 0, K = 0, Ho = 0, Wo = 0;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  bool use_mask = false;
  ScalarType dtype = ScalarType::Float, acc = ScalarType::Float;
};

// Spatial sizes, strides, paddings and dilations beyond this are refused: the
// kernels index planes with int32 and form coordinates in float.
inline constexpr int64_t kMaxSide = int64_t{1} << 30;

template <typename Ints>
void read_pair(const char* op, const char* name, const Ints& v, int64_t lo, int64_t* a, int64_t* b) {
  FV_CHECK(v.size() == 2, op, name, " must be a list of 2 ints [h, w]; got ", v.size(), " values");
  for (size_t i = 0; i < 2; ++i)
    FV_CHECK(v[i] >= lo && v[i] <= kMaxSide, op, name, "[", i, "] must be in [", lo, ", 2^30]; got ", v[i]);
  *a = v[0];
  *b = v[1];
}

inline void check_like_input(const char* op, const std::string& name, const Tensor& t, const DcSizes& n,
                             const Tensor& input) {
  check_dtype_is(op, name, t, n.dtype, "input's dtype");
  check_contiguous(op, name, t);
  check_same_device(op, name, t, "input", input);
}

template <typename Ints>
DcSizes check_dc_inputs(const char* op, const Tensor& input, const Tensor& offset, const Tensor& weight,
                        const std::optional<Tensor>& mask, const Ints& stride, const Ints& padding,
                        const Ints& dilation) {
  DcSizes n;
  check_dtype(op, "input", input);
  check_rank(op, "input", input, 4, "(batch, in_channels, H, W)");
  check_contiguous(op, "input", input);
  check_cpu(op, "input", input);  // Triton serves CUDA
  n.dtype = input.scalar_type();
  n.acc = acc_dtype(n.dtype);
  n.B = input.size(0);
  n.Cin = input.size(1);
  n.H = input.size(2);
  n.W = input.size(3);
  FV_CHECK(n.H <= kMaxSide && n.W <= kMaxSide && n.H * n.W < (int64_t{1} << 31), op,
           "input's H * W must be below 2^31 (H, W <= 2^30); got shape ", shape_str(input));

  check_rank(op, "weight", weight, 4, "(out_channels, in_channels / groups, kh, kw)");
  check_like_input(op, "weight", weight, n, input);
  n.Cout = weight.size(0);
  n.Cg = weight.size(1);
  n.kh = weight.size(2);
  n.kw = weight.size(3);
  FV_CHECK(n.Cin >= 1, op, "input must have at least one channel; got shape ", shape_str(input));
  FV_CHECK(n.Cg >= 1 && n.kh >= 1 && n.kw >= 1 && n.Cin % n.Cg == 0, op,
           "weight (out_channels, in_channels / groups, kh, kw) must have kh, kw >= 1 and a shape[1] >= 1 that "
           "divides input's channels ", n.Cin, "; got shape ", shape_str(weight));
  n.groups = n.Cin / n.Cg;
  FV_CHECK(n.Cout % n.groups == 0, op, "weight's out_channels ", n.Cout, " must be divisible by groups = ", n.groups,
           " (input channels / weight.shape[1]); got weight of shape ", shape_str(weight));
  n.Og = n.Cout / n.groups;
  FV_CHECK(n.kh <= 1024 && n.kw <= 1024, op, "weight's kernel size must be at most 1024; got shape ",
           shape_str(weight));
  n.K = n.kh * n.kw;

  read_pair(op, "stride", stride, 1, &n.sh, &n.sw);
  read_pair(op, "padding", padding, 0, &n.ph, &n.pw);
  read_pair(op, "dilation", dilation, 1, &n.dh, &n.dw);
  n.Ho = (n.H + 2 * n.ph - (n.dh * (n.kh - 1) + 1)) / n.sh + 1;
  n.Wo = (n.W + 2 * n.pw - (n.dw * (n.kw - 1) + 1)) / n.sw + 1;
  FV_CHECK(n.H + 2 * n.ph >= n.dh * (n.kh - 1) + 1 && n.W + 2 * n.pw >= n.dw * (n.kw - 1) + 1, op,
           "the output would be empty: input's H, W ", n.H, ", ", n.W, " with padding [", n.ph, ", ", n.pw,
           "] are smaller than the dilated kernel ", n.dh * (n.kh - 1) + 1, " x ", n.dw * (n.kw - 1) + 1);
  FV_CHECK(n.Ho * n.Wo < (int64_t{1} << 31), op, "the output's Ho * Wo must be below 2^31; got ", n.Ho, " x ", n.Wo);

  check_rank(op, "offset", offset, 4, "(batch, 2 * offset_groups * kh * kw, Ho, Wo)");
  check_like_input(op, "offset", offset, n, input);
  FV_CHECK(offset.size(1) >= 2 * n.K && offset.size(1) % (2 * n.K) == 0, op,
           "offset.shape[1] must be a positive multiple of 2 * kh * kw = ", 2 * n.K, "; got offset of shape ",
           shape_str(offset));
  n.G = offset.size(1) / (2 * n.K);
  FV_CHECK(n.Cin % n.G == 0, op, "input's channels ", n.Cin, " must be divisible by offset_groups = ", n.G,
           " (offset.shape[1] / (2 * kh * kw))");
  n.Cog = n.Cin / n.G;
  check_shape(op, "offset", offset, {n.B, 2 * n.G * n.K, n.Ho, n.Wo}, "(batch, 2 * offset_groups * kh * kw, Ho, Wo)");
  if (mask) {
    n.use_mask = true;
    check_like_input(op, "mask", *mask, n, input);
    check_shape(op, "mask", *mask, {n.B, n.G * n.K, n.Ho, n.Wo}, "(batch, offset_groups * kh * kw, Ho, Wo)");
  }
  return n;
}

}  // namespace fastvision::dc
