// Argument checks of the criss-cross attention entry points (host code).
// They follow what the kernels read, NCHW as mmcv's CrissCrossAttention:
//   query, key (batch, Cqk, H, W); value (batch, C, H, W); one float dtype;
//   backward: out and dout (batch, C, H, W) in query's dtype, lse (batch, H, W)
//   in the accumulate dtype (float64 for float64 query, else float32)
// all contiguous and on query's device (the C++ kernels are CPU ones).
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../common/check.h"
#include "../common/dtype.h"

namespace fastvision::cc {

struct CcSizes {
  int64_t B = 0, Cqk = 0, C = 0, H = 0, W = 0;
  ScalarType dtype = ScalarType::Float, acc = ScalarType::Float;
};

inline CcSizes check_cc_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  CcSizes n;
  check_dtype(op, "query", q);
  check_rank(op, "query", q, 4, "(batch, Cqk, H, W)");
  check_contiguous(op, "query", q);
  check_cpu(op, "query", q);  // Triton serves CUDA
  n.dtype = q.scalar_type();
  n.acc = acc_dtype(n.dtype);
  n.B = q.size(0);
  n.Cqk = q.size(1);
  n.H = q.size(2);
  n.W = q.size(3);
  check_dtype_is(op, "key", k, n.dtype, "query's dtype");
  check_shape(op, "key", k, {n.B, n.Cqk, n.H, n.W}, "(batch, Cqk, H, W) like query");
  check_contiguous(op, "key", k);
  check_same_device(op, "key", k, "query", q);
  check_dtype_is(op, "value", v, n.dtype, "query's dtype");
  check_rank(op, "value", v, 4, "(batch, C, H, W)");
  n.C = v.size(1);
  check_shape(op, "value", v, {n.B, n.C, n.H, n.W}, "(batch, C, H, W) with query's batch, H and W");
  check_contiguous(op, "value", v);
  check_same_device(op, "value", v, "query", q);
  // Rows of H + W logits and H * W planes are indexed with int64 but held in
  // per-thread scratch of (H + W) * max(H, W) elements: keep them sane.
  FV_CHECK(n.H <= (int64_t{1} << 20) && n.W <= (int64_t{1} << 20), op,
           "H and W must be at most 2^20; got query of shape ", shape_str(q));
  return n;
}

inline void check_cc_backward(const char* op, const CcSizes& n, const Tensor& dout, const Tensor& out,
                              const Tensor& lse, const Tensor& q) {
  for (const auto& [name, t] : {std::make_pair("out", &out), std::make_pair("dout", &dout)}) {
    check_dtype_is(op, name, *t, n.dtype, "query's dtype");
    check_shape(op, name, *t, {n.B, n.C, n.H, n.W}, "(batch, C, H, W) like value");
    check_contiguous(op, name, *t);
    check_same_device(op, name, *t, "query", q);
  }
  check_dtype_is(op, "lse", lse, n.acc, "the accumulate dtype: float64 for float64 query, else float32");
  check_shape(op, "lse", lse, {n.B, n.H, n.W}, "(batch, H, W)");
  check_contiguous(op, "lse", lse);
  check_same_device(op, "lse", lse, "query", q);
}

}  // namespace fastvision::cc
