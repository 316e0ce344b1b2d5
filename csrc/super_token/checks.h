// Argument checks of the super token entry points (host code).
// They follow what the kernels read:
//   x / dx / out / dout (batch, C, H0, W0), stokens / dstokens (batch, C, hh, ww):
//   one float dtype, C, H0, W0 >= 1
//   stoken_size [h, w] >= 1, hh = ceil(H0 / h), ww = ceil(W0 / w)
//   affinity (batch, hh*ww, h*w, 9), asum (batch, hh, ww): the accumulate dtype
//   n_iter in [1, kMaxIter]
// all contiguous and on the first tensor's device (CPU for the CPU kernels).
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../common/check.h"
#include "../common/common.h"
#include "../common/dtype.h"

namespace fastvision::stoken {

inline constexpr int64_t kMaxIter = 1000;  // a bound, so that a mistyped n_iter cannot hang a call

struct StSizes {
  int64_t B = 0, C = 1, H0 = 1, W0 = 1, h = 1, w = 1, hh = 1, ww = 1;
  ScalarType dtype = ScalarType::Float, acc = ScalarType::Float;
  int64_t cells() const { return hh * ww; }
  int64_t pixels() const { return h * w; }  // per cell
  std::vector<int64_t> image() const { return {B, C, H0, W0}; }
  std::vector<int64_t> tokens() const { return {B, C, hh, ww}; }
  std::vector<int64_t> affinity() const { return {B, hh * ww, h * w, 9}; }
  std::vector<int64_t> asum() const { return {B, hh, ww}; }
};

template <typename Ints>
void check_stoken_size(const char* op, StSizes& n, const Ints& stoken_size) {
  FV_CHECK(stoken_size.size() == 2, op, "stoken_size must be a list of 2 ints [h, w]; got ", stoken_size.size(),
           " entries");
  n.h = stoken_size[0];
  n.w = stoken_size[1];
  check_at_least(op, "stoken_size[0]", n.h, 1);
  check_at_least(op, "stoken_size[1]", n.w, 1);
}

// The token grid of an image of H0 x W0; every size the kernels form must fit int64.
inline void set_grid(const char* op, StSizes& n, const char* what) {
  FV_CHECK(n.H0 >= 1 && n.W0 >= 1, op, what, " must have height and width >= 1; got ", n.H0, " x ", n.W0);
  n.hh = ceil_div(n.H0, n.h);
  n.ww = ceil_div(n.W0, n.w);
  // Each product is formed only once the ones it is made of are known to fit.
  int64_t Hp = 0, Wp = 0, cells = 0, pixels = 0;
  FV_CHECK(mul_fits(n.hh, n.h, &Hp) && mul_fits(n.ww, n.w, &Wp) && mul_fits(n.hh, n.ww, &cells) &&
               mul_fits(n.h, n.w, &pixels) && checked_numel(std::vector<int64_t>{n.B, cells, pixels, 9}) >= 0 &&
               checked_numel(std::vector<int64_t>{n.B, n.C, Hp, Wp}) >= 0,
           op, "stoken_size [", n.h, ", ", n.w, "] is too large for an image of ", n.H0, " x ", n.W0,
           ": the padded sizes overflow int64");
}

inline void check_tensor(const char* op, const std::string& name, const Tensor& t, const Tensor& first) {
  check_contiguous(op, name, t);
  check_cpu(op, name, t);  // the C++ kernels are CPU ones (Triton serves CUDA)
  check_same_device(op, name, t, "the first tensor", first);
}

inline void check_affinity(const char* op, const StSizes& n, const Tensor& affinity, const Tensor& first) {
  check_dtype_is(op, "affinity", affinity, n.acc, "the accumulate dtype: float64 for float64 tokens, else float32");
  check_shape(op, "affinity", affinity, n.affinity(), "(batch, hh*ww, h*w, 9)");
  check_tensor(op, "affinity", affinity, first);
}

// A float (batch, C, H, W) tensor: its sizes; `rows` names them in messages.
inline void check_image(const char* op, const std::string& name, const Tensor& t, const std::string& doc) {
  check_dtype(op, name, t);
  check_rank(op, name, t, 4, doc);
  FV_CHECK(t.size(1) >= 1, op, name, " ", doc, " must have at least one channel; got shape ", shape_str(t));
}

// super_token_sampling_fwd: x.
template <typename Ints>
StSizes check_sampling(const char* op, const Tensor& x, const Ints& stoken_size, int64_t n_iter) {
  StSizes n;
  check_image(op, "x", x, "(batch, C, H0, W0)");
  check_tensor(op, "x", x, x);
  n.dtype = x.scalar_type();
  n.acc = acc_dtype(n.dtype);
  n.B = x.size(0);
  n.C = x.size(1);
  n.H0 = x.size(2);
  n.W0 = x.size(3);
  check_stoken_size(op, n, stoken_size);
  set_grid(op, n, "x");
  FV_CHECK(n_iter >= 1 && n_iter <= kMaxIter, op, "n_iter must be in [1, ", kMaxIter, "]; got ", n_iter);
  return n;
}

// Token-side tensors (batch, C, hh, ww) of an image of `size` [H0, W0].
template <typename Ints>
StSizes check_tokens(const char* op, const std::string& name, const Tensor& t, const Ints& stoken_size,
                     const Ints& size, const char* size_name) {
  StSizes n;
  check_image(op, name, t, "(batch, C, hh, ww)");
  check_tensor(op, name, t, t);
  n.dtype = t.scalar_type();
  n.acc = acc_dtype(n.dtype);
  n.B = t.size(0);
  n.C = t.size(1);
  check_stoken_size(op, n, stoken_size);
  FV_CHECK(size.size() == 2, op, size_name, " must be a list of 2 ints [H0, W0]; got ", size.size(), " entries");
  n.H0 = size[0];
  n.W0 = size[1];
  set_grid(op, n, size_name);
  FV_CHECK(t.size(2) == n.hh && t.size(3) == n.ww, op, name, " must have shape (batch, C, hh, ww) with hh = ceil(",
           n.H0, " / ", n.h, ") = ", n.hh, " and ww = ceil(", n.W0, " / ", n.w, ") = ", n.ww, " (", size_name,
           " and stoken_size); got shape ", shape_str(t));
  return n;
}

}  // namespace fastvision::stoken
