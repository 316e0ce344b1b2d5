// Argument checks of the multi-scale deformable attention entry points (host
// code). They follow what the kernels read (Deformable DETR's layout):
//   value (N, S, M, D); value_spatial_shapes (L, 2) int64 = (H_l, W_l), every
//   H_l, W_l >= 1; value_level_start_index (L,) int64, the exclusive cumsum of
//   H_l * W_l, which must sum to S; sampling_locations (N, Lq, M, L, P, 2) and
//   attention_weights (N, Lq, M, L, P) in value's dtype; backward: dout
//   (N, Lq, M * D) in value's dtype
// all contiguous and on the CPU. The level tables are read on the host: a
// table that does not tile value exactly is refused before any value is read.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <vector>

#include "../common/check.h"
#include "../common/dtype.h"

namespace fastvision::msda {

struct MsdaSizes {
  int64_t N = 0, S = 0, M = 0, D = 0, Lq = 0, L = 0, P = 0;
  std::vector<int64_t> H, W, start;  // per level, from the host tables
  ScalarType dtype = ScalarType::Float, acc = ScalarType::Float;
};

inline void check_table(const char* op, const char* name, const Tensor& t, const Tensor& value,
                        const std::vector<int64_t>& shape, const char* doc) {
  check_dtype_is(op, name, t, ScalarType::Long, "sizes and offsets are int64, as Deformable DETR builds them");
  check_shape(op, name, t, shape, doc);
  check_contiguous(op, name, t);
  check_same_device(op, name, t, "value", value);
}

inline MsdaSizes check_msda_inputs(const char* op, const Tensor& value, const Tensor& shapes, const Tensor& starts,
                                   const Tensor& loc, const Tensor& attn) {
  MsdaSizes n;
  check_dtype(op, "value", value);
  check_rank(op, "value", value, 4, "(N, S, M, D)");
  check_contiguous(op, "value", value);
  check_cpu(op, "value", value);  // Triton serves CUDA
  n.dtype = value.scalar_type();
  n.acc = acc_dtype(n.dtype);
  n.N = value.size(0);
  n.S = value.size(1);
  n.M = value.size(2);
  n.D = value.size(3);
  check_rank(op, "sampling_locations", loc, 6, "(N, Lq, M, L, P, 2)");
  n.Lq = loc.size(1);
  n.L = loc.size(3);
  n.P = loc.size(4);
  FV_CHECK(n.L >= 1, op, "sampling_locations must have at least one level (axis 3); got shape ", shape_str(loc));
  check_dtype_is(op, "sampling_locations", loc, n.dtype, "value's dtype");
  check_shape(op, "sampling_locations", loc, {n.N, n.Lq, n.M, n.L, n.P, 2}, "(N, Lq, M, L, P, 2)");
  check_contiguous(op, "sampling_locations", loc);
  check_same_device(op, "sampling_locations", loc, "value", value);
  check_dtype_is(op, "attention_weights", attn, n.dtype, "value's dtype");
  check_shape(op, "attention_weights", attn, {n.N, n.Lq, n.M, n.L, n.P}, "(N, Lq, M, L, P)");
  check_contiguous(op, "attention_weights", attn);
  check_same_device(op, "attention_weights", attn, "value", value);
  check_table(op, "value_spatial_shapes", shapes, value, {n.L, 2}, "(L, 2) = (H_l, W_l) per level");
  check_table(op, "value_level_start_index", starts, value, {n.L}, "(L,)");
  // The level tables: every level inside value, the levels tiling it in order.
  const int64_t* hw = shapes.const_data_ptr<int64_t>();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < n.L; ++l) {
    const int64_t h = hw[2 * l], w = hw[2 * l + 1];
    int64_t area = 0;
    FV_CHECK(h >= 1 && w >= 1 && mul_fits(h, w, &area) && area <= n.S - total, op,
             "value_spatial_shapes[", l, "] = (", h, ", ", w,
             ") must be a level (H, W) with H, W >= 1 whose pixels fit in value (S = ", n.S,
             " positions, ", total, " taken by the levels before it)");
    FV_CHECK(st[l] == total, op, "value_level_start_index[", l, "] must be ", total,
             " (the sum of H * W of the levels before it); got ", st[l]);
    n.H.push_back(h);
    n.W.push_back(w);
    n.start.push_back(total);
    total += area;
  }
  FV_CHECK(total == n.S, op, "value_spatial_shapes must cover value: sum of H * W = ", total,
           " but value has S = ", n.S, " positions (axis 1 of shape ", shape_str(value), ")");
  return n;
}

inline void check_msda_dout(const char* op, const MsdaSizes& n, const Tensor& dout, const Tensor& value) {
  int64_t MD = 0;
  FV_CHECK(mul_fits(n.M, n.D, &MD), op, "value's M * D overflows int64");
  check_dtype_is(op, "dout", dout, n.dtype, "value's dtype");
  check_shape(op, "dout", dout, {n.N, n.Lq, MD}, "(N, Lq, M * D)");
  check_contiguous(op, "dout", dout);
  check_same_device(op, "dout", dout, "value", value);
}

}  // namespace fastvision::msda
