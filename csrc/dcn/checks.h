// Argument checks of the DCNv3 / DCNv4 aggregation entry points (host code).
// Channels-last, as InternImage's DCNv3 op:
//   input (N, H, W, C), C = group * Cg; offset (N, Ho, Wo, group * K * 2);
//   mask (N, Ho, Wo, group * K); backward: dout (N, Ho, Wo, C); one float
//   dtype, contiguous, on input's device (the C++ kernels are CPU ones).
// kernel_size, stride, padding, dilation: [h, w]; K = kh * kw (- 1 with
// remove_center); Ho = (H + 2 pad_h - (dil_h (kh - 1) + 1)) / stride_h + 1.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../common/check.h"
#include "../common/dtype.h"

namespace fastvision::dcn {

constexpr int64_t kMaxSide = int64_t{1} << 20;  // H, W, stride, padding, dilation
constexpr int64_t kMaxKernel = 1024;             // kh, kw (K scratch per thread)

struct DcnSizes {
  int64_t N = 0, H = 0, W = 0, C = 0, G = 1, Cg = 0, Ho = 0, Wo = 0, K = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  double scale = 1.0;
  bool remove_center = false, softmax = false;
  ScalarType dtype = ScalarType::Float, acc = ScalarType::Float;
};

inline void check_pair(const char* op, const char* name, const std::vector<int64_t>& v, int64_t lo, int64_t hi,
                       int64_t* h, int64_t* w) {
  FV_CHECK(v.size() == 2, op, name, " must be a list of 2 ints [h, w]; got ", v.size(), " entries");
  for (int a = 0; a < 2; ++a)
    FV_CHECK(v[a] >= lo && v[a] <= hi, op, name, "[", a, "] must be in [", lo, ", ", hi, "]; got ", v[a]);
  *h = v[0];
  *w = v[1];
}

inline void check_like(const char* op, const char* name, const Tensor& t, const Tensor& input, ScalarType dtype,
                       const std::vector<int64_t>& shape, const char* doc) {
  check_dtype_is(op, name, t, dtype, "input's dtype");
  check_shape(op, name, t, shape, doc);
  check_contiguous(op, name, t);
  check_same_device(op, name, t, "input", input);
}

inline DcnSizes check_dcn_inputs(const char* op, const Tensor& input, const Tensor& offset, const Tensor& mask,
                                 const std::vector<int64_t>& kernel_size, const std::vector<int64_t>& stride,
                                 const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                                 int64_t group, double offset_scale, bool remove_center, bool mask_softmax) {
  DcnSizes n;
  check_dtype(op, "input", input);
  check_rank(op, "input", input, 4, "(N, H, W, group * Cg)");
  check_contiguous(op, "input", input);
  check_cpu(op, "input", input);  // Triton serves CUDA
  n.dtype = input.scalar_type();
  n.acc = acc_dtype(n.dtype);
  n.N = input.size(0);
  n.H = input.size(1);
  n.W = input.size(2);
  n.C = input.size(3);
  FV_CHECK(n.H <= kMaxSide && n.W <= kMaxSide, op, "H and W must be at most 2^20; got input of shape ",
           shape_str(input));
  check_pair(op, "kernel_size", kernel_size, 1, kMaxKernel, &n.kh, &n.kw);
  check_pair(op, "stride", stride, 1, kMaxSide, &n.sh, &n.sw);
  check_pair(op, "padding", padding, 0, kMaxSide, &n.ph, &n.pw);
  check_pair(op, "dilation", dilation, 1, kMaxSide, &n.dh, &n.dw);
  FV_CHECK(group >= 1 && group <= (n.C > 0 ? n.C : 1 << 20) && n.C % group == 0, op, "group must be >= 1 and divide ",
           "input's channels (", n.C, "); got ", group);
  n.G = group;
  n.Cg = n.C / group;
  FV_CHECK(!remove_center || n.kh * n.kw > 1, op, "remove_center needs more than one kernel point; got kernel_size [",
           n.kh, ", ", n.kw, "]");
  n.remove_center = remove_center;
  n.softmax = mask_softmax;
  n.scale = offset_scale;
  n.K = n.kh * n.kw - (remove_center ? 1 : 0);
  // All terms are below 2^41: no overflow.
  const int64_t span_h = n.dh * (n.kh - 1) + 1, span_w = n.dw * (n.kw - 1) + 1;
  FV_CHECK(n.H + 2 * n.ph >= span_h && n.W + 2 * n.pw >= span_w, op, "the dilated kernel (", span_h, " x ", span_w,
           ") must fit the padded input (", n.H + 2 * n.ph, " x ", n.W + 2 * n.pw, ")");
  n.Ho = (n.H + 2 * n.ph - span_h) / n.sh + 1;
  n.Wo = (n.W + 2 * n.pw - span_w) / n.sw + 1;
  check_like(op, "offset", offset, input, n.dtype, {n.N, n.Ho, n.Wo, n.G * n.K * 2}, "(N, Ho, Wo, group * K * 2)");
  check_like(op, "mask", mask, input, n.dtype, {n.N, n.Ho, n.Wo, n.G * n.K}, "(N, Ho, Wo, group * K)");
  return n;
}

inline void check_dcn_dout(const char* op, const DcnSizes& n, const Tensor& dout, const Tensor& input) {
  check_like(op, "dout", dout, input, n.dtype, {n.N, n.Ho, n.Wo, n.C}, "(N, Ho, Wo, C)");
}

}  // namespace fastvision::dcn
