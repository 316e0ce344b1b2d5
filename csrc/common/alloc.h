// Allocation that says what ran out of memory.
//
// A failed torch allocation made through the stable ABI surfaces as
// 'torch_call_dispatcher("aten::new_empty"...) API call failed at
// /abs/path/.../ops.h'. Every output, copy and scratch buffer of an entry
// point is allocated through these helpers instead, so a failure reads
// "fastvision.<op>: out of memory allocating <what>: shape (...), <dtype>,
// <N> bytes" (MemoryError in Python). Sizes are validated before any
// allocation, so the only way these calls fail is memory.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "check.h"

namespace fastvision {

[[noreturn]] inline void throw_oom(const char* op, const std::string& what, const std::string& detail) {
  throw OutOfMemory(std::string("fastvision.") + op + ": out of memory allocating " + what + ": " + detail);
}

// Bytes of a tensor of `sizes` and `dtype`, or -1 when they overflow int64.
template <typename Sizes>
int64_t tensor_bytes(const Sizes& sizes, ScalarType dtype) {
  int64_t bytes = checked_numel(sizes);
  if (bytes < 0 || !mul_fits(bytes, dtype_size(dtype), &bytes)) return -1;
  return bytes;
}

template <typename Sizes>
std::string tensor_desc(const Sizes& sizes, ScalarType dtype, const Tensor& like) {
  const int64_t bytes = tensor_bytes(sizes, dtype);
  std::string s = "shape " + shape_str(sizes) + ", " + dtype_name(dtype) + ", " +
                  (bytes < 0 ? std::string("more than 2^63") : std::to_string(bytes)) + " bytes";
  if (!like.is_cpu()) s += " on " + device_str(like);
  return s;
}

// make() returns a new tensor of `sizes` and `dtype` (new_empty, new_zeros,
// to, sum, ...); any failure becomes OutOfMemory naming `what`.
template <typename Make>
Tensor allocate(const char* op, const std::string& what, const std::vector<int64_t>& sizes, ScalarType dtype,
                const Tensor& like, Make&& make) {
  if (tensor_bytes(sizes, dtype) < 0) throw_oom(op, what, tensor_desc(sizes, dtype, like));
  try {
    return make();
  } catch (const std::exception&) {
    throw_oom(op, what, tensor_desc(sizes, dtype, like));
  }
}

// Fresh host memory is first touched one 4 KB page fault at a time, about
// 2 us each: 20 ms for a 38 MB output, more than some kernels take to fill
// it. Large buffers ask for transparent huge pages (one fault per 2 MB, where
// the system's THP mode is "madvise"; numpy asks the same for its large
// arrays). A hint on the buffer's whole 2 MB pages: failure is harmless.
// FASTVISION_HUGE_PAGES=0 (read once) turns it off, for systems where
// compacting memory for huge pages stalls.
inline bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("FASTVISION_HUGE_PAGES");
    return !(v && std::string(v) == "0");
  }();
  return wanted;
}

inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (!p || bytes < int64_t(4) << 20 || !huge_pages_wanted()) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// An uninitialised tensor on `like`'s device (huge pages advised on the host).
inline Tensor alloc_empty(const char* op, const std::string& what, const Tensor& like, const std::vector<int64_t>& sizes,
                    ScalarType dtype) {
  Tensor t = allocate(op, what, sizes, dtype, like, [&] { return torch::stable::new_empty(like, sizes, dtype); });
  if (t.is_cpu()) advise_huge_pages(t.mutable_data_ptr(), tensor_bytes(sizes, dtype));
  return t;
}
// A zero-filled tensor on `like`'s device.
inline Tensor alloc_zeros(const char* op, const std::string& what, const Tensor& like, const std::vector<int64_t>& sizes,
                    ScalarType dtype) {
  return allocate(op, what, sizes, dtype, like, [&] { return torch::stable::new_zeros(like, sizes, dtype); });
}
// t in `dtype`: t itself when it has it already, else a converted copy.
inline Tensor alloc_cast(const char* op, const std::string& what, const Tensor& t, ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  return allocate(op, what, sizes_of(t), dtype, t, [&] { return torch::stable::to(t, dtype); });
}
// The sum of t over dimension `dim`, in `dtype`.
inline Tensor alloc_sum(const char* op, const std::string& what, const Tensor& t, int64_t dim, ScalarType dtype) {
  std::vector<int64_t> sizes = sizes_of(t);
  sizes.erase(sizes.begin() + dim);
  return allocate(op, what, sizes, dtype, t, [&] {
    std::vector<int64_t> dims{dim};
    Tensor s = torch::stable::sum(t, dims);
    return s.scalar_type() == dtype ? s : torch::stable::to(s, dtype);
  });
}

// Host scratch: std::vector<T>(n, value) whose std::bad_alloc (or length
// error) becomes OutOfMemory naming `what`.
template <typename T>
std::vector<T> host_vector(const char* op, const std::string& what, int64_t n, T value = T()) {
  int64_t bytes = 0;
  if (n < 0 || !mul_fits(n, static_cast<int64_t>(sizeof(T)), &bytes))
    throw_oom(op, what, std::to_string(n) + " elements (more than 2^63 bytes)");
  try {
    return std::vector<T>(static_cast<size_t>(n), value);
  } catch (const std::bad_alloc&) {
    throw_oom(op, what, std::to_string(n) + " elements, " + std::to_string(bytes) + " bytes");
  } catch (const std::length_error&) {
    throw_oom(op, what, std::to_string(n) + " elements, " + std::to_string(bytes) + " bytes");
  }
}

// Uninitialised host scratch of n elements (huge pages advised).
template <typename T>
std::unique_ptr<T[]> host_array(const char* op, const std::string& what, int64_t n) {
  int64_t bytes = 0;
  if (n < 0 || !mul_fits(n, static_cast<int64_t>(sizeof(T)), &bytes))
    throw_oom(op, what, std::to_string(n) + " elements (more than 2^63 bytes)");
  T* p = new (std::nothrow) T[static_cast<size_t>(n)];
  if (!p && n > 0) throw_oom(op, what, std::to_string(n) + " elements, " + std::to_string(bytes) + " bytes");
  advise_huge_pages(p, bytes);
  return std::unique_ptr<T[]>(p);
}

}  // namespace fastvision
