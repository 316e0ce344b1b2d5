// Argument checks of the op entry points (host code).
//
// torch.compile, torch.export and users call torch.ops.fastvision.* without
// the Python wrappers' checks, so every entry point checks every tensor it
// reads or writes (dtype, rank, sizes, contiguity, device) and every integer
// argument before it touches memory. A failed check throws with a message
// that starts "fastvision.<op>: ", names the argument and the expected form,
// and carries no source paths (unlike STD_TORCH_CHECK, which embeds __FILE__
// and __func__).
//
// What reaches Python (pybind11's translation of the exception that leaves
// the kernel, checked with torch 2.11-2.13):
//   std::invalid_argument  -> ValueError   (FV_CHECK: a wrong argument)
//   fastvision::OutOfMemory -> MemoryError (a failed allocation; alloc.h)
//   other std::exception   -> RuntimeError (CUDA errors, internal errors)
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <initializer_list>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fastvision {

namespace detail {
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  ((s << args), ...);
  return s.str();
}
}  // namespace detail

// Throws the ValueError of a wrong argument of op `op`.
[[noreturn]] inline void throw_arg_error(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string("fastvision.") + op + ": " + msg);
}

// An allocation that failed; MemoryError in Python, with what() as message.
class OutOfMemory : public std::bad_alloc {
 public:
  explicit OutOfMemory(std::string msg) : msg_(std::move(msg)) {}
  const char* what() const noexcept override { return msg_.c_str(); }

 private:
  std::string msg_;
};

}  // namespace fastvision

// FV_CHECK(cond, op, parts...): unless cond, raise ValueError
// "fastvision.<op>: <parts...>" (parts are streamed, so numbers and strings mix).
#define FV_CHECK(cond, op, ...)                                                    \
  do {                                                                             \
    if (__builtin_expect(!(cond), 0))                                              \
      ::fastvision::throw_arg_error((op), ::fastvision::detail::cat(__VA_ARGS__)); \
  } while (0)

// An invariant the entry point's checks already guarantee; RuntimeError if not.
#define FV_INTERNAL_CHECK(cond, what)                                           \
  do {                                                                          \
    if (__builtin_expect(!(cond), 0))                                           \
      throw std::logic_error(std::string("fastvision: internal error: ") + (what)); \
  } while (0)

namespace fastvision {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// torch's Python names of dtypes ("float32", "int32", ...).
inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    case ScalarType::Short: return "int16";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Bool: return "bool";
    case ScalarType::ComplexFloat: return "complex64";
    case ScalarType::ComplexDouble: return "complex128";
    case ScalarType::ComplexHalf: return "complex32";
    default: return torch::headeronly::toString(t);
  }
}

// Bytes per element of the dtypes fastvision allocates (8 for any other).
inline int64_t dtype_size(ScalarType t) {
  switch (t) {
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Short: return 2;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::Bool:
    case ScalarType::Byte:
    case ScalarType::Char: return 1;
    default: return 8;
  }
}

// The float dtypes every CPU kernel reads; the CUDA kernels read all but float64.
inline constexpr const char* kFloatTypesDoc = "float32, float16, bfloat16 or float64";
inline constexpr const char* kCudaFloatTypesDoc = "float32, float16 or bfloat16 (no float64 on CUDA)";

inline bool is_float_type(ScalarType t, bool allow_double = true) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16 ||
         (allow_double && t == ScalarType::Double);
}

// "(2, 3, 4)"; a 1-D shape prints as "(5,)", as Python's tuples.
template <typename Sizes>
std::string shape_str(const Sizes& sizes) {
  std::ostringstream s;
  s << "(";
  int64_t n = 0;
  for (const int64_t v : sizes) s << (n++ ? ", " : "") << v;
  s << (n == 1 ? ",)" : ")");
  return s.str();
}
inline std::string shape_str(std::initializer_list<int64_t> sizes) {
  return shape_str(std::vector<int64_t>(sizes));
}
inline std::string shape_str(const Tensor& t) { return shape_str(t.sizes()); }
inline std::string strides_str(const Tensor& t) { return shape_str(t.strides()); }

inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return "a non-CPU, non-CUDA device";
}

// a * b, or false when it overflows int64 (sizes are never negative here).
inline bool mul_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

// The product of `sizes`, or -1 when it overflows int64.
template <typename Sizes>
int64_t checked_numel(const Sizes& sizes) {
  int64_t n = 1;
  for (const int64_t v : sizes)
    if (v < 0 || !mul_fits(n, v, &n)) return -1;
  return n;
}

// ---------------------------------------------------------------------------
// Tensor checks. `name` is the argument's name in the op schema.

inline void check_dtype(const char* op, const std::string& name, const Tensor& t, bool allow_double = true) {
  FV_CHECK(is_float_type(t.scalar_type(), allow_double), op, name, " must be ",
           allow_double ? kFloatTypesDoc : kCudaFloatTypesDoc, "; got ", dtype_name(t.scalar_type()));
}

// t's dtype must be `want`; `why` says where that requirement comes from.
inline void check_dtype_is(const char* op, const std::string& name, const Tensor& t, ScalarType want,
                           const std::string& why) {
  FV_CHECK(t.scalar_type() == want, op, name, " must be ", dtype_name(want), " (", why, "); got ",
           dtype_name(t.scalar_type()));
}

inline void check_rank(const char* op, const std::string& name, const Tensor& t, int64_t rank,
                       const std::string& doc) {
  FV_CHECK(t.dim() == rank, op, name, " must be a ", rank, "-D tensor ", doc, "; got shape ", shape_str(t));
}

inline std::vector<int64_t> sizes_of(const Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

inline bool same_shape(const Tensor& t, const std::vector<int64_t>& shape) {
  if (t.dim() != static_cast<int64_t>(shape.size())) return false;
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.size(i) != shape[i]) return false;
  return true;
}

// t must have exactly `shape`; `doc` names its axes, e.g. "(batch, dim, L)".
inline void check_shape(const char* op, const std::string& name, const Tensor& t,
                        const std::vector<int64_t>& shape, const std::string& doc) {
  FV_CHECK(same_shape(t, shape), op, name, " must have shape ", doc, " = ", shape_str(shape), "; got ",
           shape_str(t));
}

inline void check_contiguous(const char* op, const std::string& name, const Tensor& t) {
  FV_CHECK(t.is_contiguous(), op, name, " must be contiguous (row-major); got strides ", strides_str(t),
           " for shape ", shape_str(t), " (call .contiguous())");
}

// The CPU kernels: t must be a CPU tensor.
inline void check_cpu(const char* op, const std::string& name, const Tensor& t) {
  FV_CHECK(t.is_cpu(), op, name, " must be a CPU tensor like the other inputs of the CPU kernel; got a tensor on ",
           device_str(t));
}

// The CUDA kernels: t must be on `ref`'s CUDA device.
inline void check_same_cuda_device(const char* op, const std::string& name, const Tensor& t,
                                   const std::string& ref_name, const Tensor& ref) {
  FV_CHECK(t.is_cuda() && t.get_device_index() == ref.get_device_index(), op, name,
           " must be on the CUDA device of ", ref_name, " (", device_str(ref), "); got a tensor on ",
           device_str(t));
}

// t must be on ref's device (CPU, or the same CUDA device).
inline void check_same_device(const char* op, const std::string& name, const Tensor& t,
                              const std::string& ref_name, const Tensor& ref) {
  const bool same = (t.is_cpu() && ref.is_cpu()) ||
                    (t.is_cuda() && ref.is_cuda() && t.get_device_index() == ref.get_device_index());
  FV_CHECK(same, op, name, " must be on the device of ", ref_name, " (", device_str(ref), "); got a tensor on ",
           device_str(t));
}

// An integer argument's range.
inline void check_at_least(const char* op, const std::string& name, int64_t value, int64_t lo) {
  FV_CHECK(value >= lo, op, name, " must be >= ", lo, "; got ", value);
}

}  // namespace fastvision
