// Host and device helpers of the CUDA C++ kernels (include from .cu files
// only): CUDA error checks, the inputs' device and its current stream, and
// dtype-erased device views of tensors.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "check.h"

namespace fastvision::cuda {

[[noreturn]] inline void throw_cuda_error(const char* op, cudaError_t err, const char* call) {
  throw std::runtime_error(std::string("fastvision.") + op + ": CUDA error " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ") from " + call);
}

}  // namespace fastvision::cuda

// FV_CUDA_CHECK(op, call): RuntimeError "fastvision.<op>: CUDA error ..." unless call succeeds.
#define FV_CUDA_CHECK(op, ...)                                                      \
  do {                                                                              \
    const cudaError_t fv_err_ = (__VA_ARGS__);                                      \
    if (fv_err_ != cudaSuccess) ::fastvision::cuda::throw_cuda_error((op), fv_err_, #__VA_ARGS__); \
  } while (0)

namespace fastvision::cuda {

// Makes `device` the current CUDA device for the guard's lifetime (kernels
// launch on the current device; the inputs may live on another one).
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device) {
    FV_CUDA_CHECK(op, cudaGetDevice(&previous_));
    if (previous_ != device) {
      FV_CUDA_CHECK(op, cudaSetDevice(device));
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

// torch's current stream on `device` (what the caller's other work is queued on).
inline cudaStream_t current_stream(const char* op, int32_t device) {
  void* stream = nullptr;
  if (aoti_torch_get_current_cuda_stream(device, &stream) != AOTI_TORCH_SUCCESS)
    throw std::runtime_error(std::string("fastvision.") + op + ": could not get the current CUDA stream of cuda:" +
                             std::to_string(device));
  return static_cast<cudaStream_t>(stream);
}

// An integer attribute of `device` (cudaDevAttr...).
inline int device_attribute(const char* op, cudaDeviceAttr attr, int device) {
  int value = 0;
  FV_CUDA_CHECK(op, cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// A read-only view of a float32 / float16 / bfloat16 tensor whose dtype is
// known only at run time; the switch is uniform across a warp, so it costs no
// divergence.
struct In {
  const void* p = nullptr;
  int dtype = 0;  // 0 float, 1 half, 2 bfloat16
  __device__ float operator[](int64_t i) const {
    switch (dtype) {
      case 1: return __half2float(static_cast<const __half*>(p)[i]);
      case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
      default: return static_cast<const float*>(p)[i];
    }
  }
};
struct Out {
  void* p = nullptr;
  int dtype = 0;
  __device__ void set(int64_t i, float v) const {
    switch (dtype) {
      case 1: static_cast<__half*>(p)[i] = __float2half(v); break;
      case 2: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v); break;
      default: static_cast<float*>(p)[i] = v;
    }
  }
};

// The In/Out dtype code of t (the entry points check the dtype first).
inline int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return 0;
    case ScalarType::Half: return 1;
    case ScalarType::BFloat16: return 2;
    default: FV_INTERNAL_CHECK(false, std::string("CUDA view of an unchecked dtype ") + dtype_name(t.scalar_type()));
  }
  return 0;
}
inline In in(const Tensor& t) { return In{t.const_data_ptr(), dtype_code(t)}; }
inline Out out(const Tensor& t) { return Out{t.mutable_data_ptr(), dtype_code(t)}; }

}  // namespace fastvision::cuda
