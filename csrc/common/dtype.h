// Dtype helpers of the CPU kernels, shared by every family: the accumulate
// dtype, strided loads that widen to it and stores that narrow from it (the
// dtype switch runs once per row, not per element), and kernel outputs
// written in the accumulate type.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <memory>
#include <string>

#include "alloc.h"
#include "check.h"

namespace fastvision {

// The dtype kernels accumulate in: float64 for float64 inputs, else float32.
inline ScalarType acc_dtype(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// t as a new tensor in the accumulate dtype: the float kernels' copy of a half
// or bfloat16 input (the out-of-memory message names it).
inline Tensor widen(const char* op, const char* what, const Tensor& t, ScalarType acc) {
  return alloc_cast(op, std::string(what) + " in " + dtype_name(acc), t, acc);
}

template <typename acc>
constexpr ScalarType acc_scalar_type() {
  return sizeof(acc) == 8 ? ScalarType::Double : ScalarType::Float;
}

// f(float{}) or f(double{}): the kernel instantiation for inputs of dtype t.
template <typename F>
decltype(auto) dispatch_acc(ScalarType t, F&& f) {
  if (t == ScalarType::Double) return f(double{});
  return f(float{});
}

template <typename acc, typename src_t>
void gather_typed(const src_t* src, int64_t step, int64_t count, acc* dst, int64_t dst_stride) {
  for (int64_t j = 0; j < count; ++j) dst[j * dst_stride] = static_cast<acc>(src[j * step]);
}

// dst[j * dst_stride] = src[j * step] for j < count, src of dtype `dtype`
// (one of the float dtypes; the entry points check that).
template <typename acc>
void gather(const void* src, ScalarType dtype, int64_t step, int64_t count, acc* dst, int64_t dst_stride = 1) {
  switch (dtype) {
    case ScalarType::Float:
      return gather_typed(static_cast<const float*>(src), step, count, dst, dst_stride);
    case ScalarType::Double:
      return gather_typed(static_cast<const double*>(src), step, count, dst, dst_stride);
    case ScalarType::Half:
      return gather_typed(static_cast<const torch::headeronly::Half*>(src), step, count, dst, dst_stride);
    case ScalarType::BFloat16:
      return gather_typed(static_cast<const torch::headeronly::BFloat16*>(src), step, count, dst, dst_stride);
    default:
      FV_INTERNAL_CHECK(false, std::string("gather from an unchecked dtype ") + dtype_name(dtype));
  }
}

template <typename acc, typename dst_t>
void scatter_typed(const acc* src, int64_t count, dst_t* dst) {
  for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<dst_t>(src[j]);
}

// dst[j] = src[j] for j < count, dst of dtype `dtype` (a float dtype).
template <typename acc>
void scatter(const acc* src, int64_t count, void* dst, ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float:
      return scatter_typed(src, count, static_cast<float*>(dst));
    case ScalarType::Double:
      return scatter_typed(src, count, static_cast<double*>(dst));
    case ScalarType::Half:
      return scatter_typed(src, count, static_cast<torch::headeronly::Half*>(dst));
    case ScalarType::BFloat16:
      return scatter_typed(src, count, static_cast<torch::headeronly::BFloat16*>(dst));
    default:
      FV_INTERNAL_CHECK(false, std::string("scatter to an unchecked dtype ") + dtype_name(dtype));
  }
}

// Byte address of element `index` of a contiguous tensor's storage.
inline const void* at(const Tensor& t, int64_t index) {
  return static_cast<const char*>(t.const_data_ptr()) + index * static_cast<int64_t>(t.element_size());
}

// A kernel output of `like`'s shape and dtype `dtype` that the kernel writes
// in acc: straight into the tensor when the dtypes agree, else into an
// uninitialised buffer that finish() narrows. Either way nothing is
// zero-filled. `op` and `what` name it in an out-of-memory error.
template <typename acc>
struct AccOut {
  Tensor tensor;
  std::unique_ptr<acc[]> buffer;
  acc* data;
  AccOut(const char* op, const std::string& what, const Tensor& like, ScalarType dtype)
      : tensor(alloc_empty(op, what, like, sizes_of(like), dtype)) {
    if (dtype == acc_scalar_type<acc>()) {
      data = tensor.mutable_data_ptr<acc>();
    } else {
      buffer = host_array<acc>(op, what + " (" + dtype_name(acc_scalar_type<acc>()) + " buffer)", tensor.numel());
      data = buffer.get();
    }
  }
  Tensor finish() {
    if (buffer) scatter(data, tensor.numel(), tensor.mutable_data_ptr(), tensor.scalar_type());
    return tensor;
  }
};

}  // namespace fastvision
