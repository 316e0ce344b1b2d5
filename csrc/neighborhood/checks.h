// Argument checks of the neighborhood attention entry points (host code).
// They follow what the kernels read:
//   query (batch, *spatial, heads, D), key (batch, *spatial, kv_heads, D),
//   value (batch, *spatial, kv_heads, Dv): 1-3 spatial axes, one float dtype,
//   kv_heads dividing heads, D and Dv >= 1
//   rpb (heads, 2k-1 per axis), any float dtype; only with stride 1 and no
//   causal axis
//   kernel_size, dilation, stride, is_causal: one entry per spatial axis,
//   kernel_size >= 1, dilation >= 1, 1 <= stride <= kernel_size,
//   kernel_size * dilation <= the axis length (compared without overflow)
//   backward: out and dout (batch, *spatial, heads, Dv) in query's dtype,
//   lse and dlse (batch, *spatial, heads) in the accumulate dtype
// all contiguous and on query's device.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/check.h"

namespace fastvision::na {

struct NaSizes {
  int64_t nd = 1, B = 0, H = 1, Hkv = 1, D = 1, Dv = 1;
  int64_t L[3] = {1, 1, 1}, k[3] = {1, 1, 1}, d[3] = {1, 1, 1}, s[3] = {1, 1, 1};  // per spatial axis
  bool causal[3] = {false, false, false};
  bool has_rpb = false;
  ScalarType dtype = ScalarType::Float, acc = ScalarType::Float;
  std::vector<int64_t> out_shape, lse_shape;  // (batch, *spatial, heads, Dv), (batch, *spatial, heads)
};

inline std::string spatial_doc(int64_t nd) {
  return nd == 1 ? "L" : nd == 2 ? "H, W" : "D, H, W";
}

// t: dtype and contiguity first, then its device (query's).
inline void check_na_tensor(const char* op, const std::string& name, const Tensor& t, const Tensor& q) {
  check_contiguous(op, name, t);
  check_same_device(op, name, t, "query", q);
}

template <typename Ints, typename Bools>
NaSizes check_na_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                        const std::optional<Tensor>& rpb, const Ints& kernel_size, const Ints& dilation,
                        const Ints& stride, const Bools& is_causal) {
  NaSizes n;
  check_dtype(op, "query", q);
  const int64_t nd = q.dim() - 3;
  FV_CHECK(nd >= 1 && nd <= 3, op,
           "query must be a (batch, *spatial, heads, head_dim) tensor with 1-3 spatial axes (4-D to 6-D); got shape ",
           shape_str(q));
  n.nd = nd;
  const std::string sp = spatial_doc(nd);
  const std::string layout = "(batch, " + sp + ", heads, head_dim)";
  check_contiguous(op, "query", q);
  check_cpu(op, "query", q);  // the C++ kernels are CPU ones (Triton serves CUDA)
  n.dtype = q.scalar_type();
  n.acc = n.dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  n.B = q.size(0);
  n.H = q.size(nd + 1);
  n.D = q.size(nd + 2);
  FV_CHECK(n.H >= 1 && n.D >= 1, op, "query ", layout, " must have heads >= 1 and head_dim >= 1; got shape ",
           shape_str(q));
  for (int64_t a = 0; a < nd; ++a) n.L[a] = q.size(1 + a);

  for (const auto& [name, t, last] : {std::make_tuple("key", &k, "head_dim"), std::make_tuple("value", &v, "head_dim_v")}) {
    check_dtype_is(op, name, *t, n.dtype, "query's dtype");
    FV_CHECK(t->dim() == q.dim(), op, name, " must be a ", q.dim(), "-D tensor (batch, ", sp, ", kv_heads, ", last,
             ") like query; got shape ", shape_str(*t));
    for (int64_t a = 0; a <= nd; ++a)
      FV_CHECK(t->size(a) == q.size(a), op, name, " must have query's batch and spatial sizes ",
               shape_str(std::vector<int64_t>(q.sizes().begin(), q.sizes().begin() + nd + 1)), "; got shape ",
               shape_str(*t));
    check_na_tensor(op, name, *t, q);
  }
  n.Hkv = k.size(nd + 1);
  FV_CHECK(n.Hkv >= 1 && n.H % n.Hkv == 0, op, "the number of key/value heads (key.size(-2) = ", n.Hkv,
           ") must be >= 1 and divide the number of query heads (query.size(-2) = ", n.H, ")");
  FV_CHECK(v.size(nd + 1) == n.Hkv, op, "value must have key's number of heads ", n.Hkv, " (value.size(-2)); got shape ",
           shape_str(v));
  FV_CHECK(k.size(nd + 2) == n.D, op, "key must have query's head_dim ", n.D, " (key.size(-1)); got shape ",
           shape_str(k));
  n.Dv = v.size(nd + 2);
  FV_CHECK(n.Dv >= 1, op, "value's head_dim_v (value.size(-1)) must be >= 1; got shape ", shape_str(v));

  const auto count = [](const auto& list) { return static_cast<int64_t>(list.size()); };
  FV_CHECK(count(kernel_size) == nd, op, "kernel_size must have one entry per spatial axis (", nd, " for a ", q.dim(),
           "-D query); got ", count(kernel_size));
  FV_CHECK(count(dilation) == nd, op, "dilation must have one entry per spatial axis (", nd, " for a ", q.dim(),
           "-D query); got ", count(dilation));
  FV_CHECK(count(stride) == nd, op, "stride must have one entry per spatial axis (", nd, " for a ", q.dim(),
           "-D query); got ", count(stride));
  FV_CHECK(count(is_causal) == nd, op, "is_causal must have one entry per spatial axis (", nd, " for a ", q.dim(),
           "-D query); got ", count(is_causal));
  bool causal_any = false, strided = false;
  for (int64_t a = 0; a < nd; ++a) {
    const std::string ax = "[" + std::to_string(a) + "]";
    n.k[a] = kernel_size[a];
    n.d[a] = dilation[a];
    n.s[a] = stride[a];
    n.causal[a] = is_causal[a];
    check_at_least(op, "kernel_size" + ax, n.k[a], 1);
    check_at_least(op, "dilation" + ax, n.d[a], 1);
    check_at_least(op, "stride" + ax, n.s[a], 1);
    FV_CHECK(n.s[a] <= n.k[a], op, "stride", ax, " = ", n.s[a], " must not exceed kernel_size", ax, " = ", n.k[a]);
    // k * d <= L, compared without forming k * d (which can overflow).
    FV_CHECK(n.d[a] <= n.L[a] / n.k[a], op, "kernel_size", ax, " * dilation", ax,
             " must not exceed the length of spatial axis ", a, " (query.size(", a + 1, ") = ", n.L[a],
             "); got kernel_size ", n.k[a], " and dilation ", n.d[a]);
    causal_any |= n.causal[a];
    strided |= n.s[a] > 1;
  }

  if (rpb.has_value()) {
    const Tensor& r = *rpb;
    FV_CHECK(!causal_any && !strided, op,
             "rpb (relative positional bias) needs stride 1 and no causal axis; pass None for rpb");
    check_dtype(op, "rpb", r);
    std::vector<int64_t> want{n.H};
    std::string doc = "(heads";
    for (int64_t a = 0; a < nd; ++a) {
      // k <= L; an empty batch allows any L, so 2k - 1 is formed only where it fits.
      FV_CHECK(n.k[a] <= (std::numeric_limits<int64_t>::max() - 1) / 2, op, "kernel_size[", a, "] = ", n.k[a], " is too large for an rpb");
      want.push_back(2 * n.k[a] - 1);
      doc += ", 2*kernel_size[" + std::to_string(a) + "]-1";
    }
    check_shape(op, "rpb", r, want, doc + ")");
    check_na_tensor(op, "rpb", r, q);
    n.has_rpb = true;
  }
  n.lse_shape.assign(q.sizes().begin(), q.sizes().end() - 1);
  n.out_shape = n.lse_shape;
  n.out_shape.push_back(n.Dv);
  return n;
}

// The backward's extra tensors.
inline void check_na_backward(const char* op, const NaSizes& n, const Tensor& dout, const std::optional<Tensor>& dlse,
                              const Tensor& out, const Tensor& lse, const Tensor& q) {
  const std::string sp = spatial_doc(n.nd);
  const std::string acc_why = "the accumulate dtype: float64 for float64 query, else float32";
  for (const auto& [name, t] : {std::make_pair("out", &out), std::make_pair("dout", &dout)}) {
    check_dtype_is(op, name, *t, n.dtype, "query's dtype");
    check_shape(op, name, *t, n.out_shape, "(batch, " + sp + ", heads, head_dim_v)");
    check_na_tensor(op, name, *t, q);
  }
  check_dtype_is(op, "lse", lse, n.acc, acc_why);
  check_shape(op, "lse", lse, n.lse_shape, "(batch, " + sp + ", heads)");
  check_na_tensor(op, "lse", lse, q);
  if (dlse.has_value()) {
    check_dtype_is(op, "dlse", *dlse, n.acc, acc_why);
    check_shape(op, "dlse", *dlse, n.lse_shape, "(batch, " + sp + ", heads) like lse");
    check_na_tensor(op, "dlse", *dlse, q);
  }
}

}  // namespace fastvision::na
