// Plane transposes of the CPU kernels in 8 x 8 register tiles (GCC vector
// extensions: shuffles on any target): criss-cross attention's moves between
// NCHW planes and packed columns, deform_conv2d's between NCHW and
// channel-last.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace fastvision {

// An 8 x 8 tile of T transposed in registers.
template <typename T>
struct Tile8 {
  typedef T V __attribute__((vector_size(8 * sizeof(T))));
  V r[8];
  void load(const T* p, int64_t stride) {
    for (int k = 0; k < 8; ++k) std::memcpy(&r[k], p + k * stride, sizeof(V));
  }
  void store(T* p, int64_t stride) const {
    for (int k = 0; k < 8; ++k) std::memcpy(p + k * stride, &r[k], sizeof(V));
  }
  void transpose() {
    V t[8], u[8];
    for (int k = 0; k < 8; k += 2) {
      t[k] = __builtin_shufflevector(r[k], r[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
      t[k + 1] = __builtin_shufflevector(r[k], r[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int k = 0; k < 8; k += 4)
      for (int j = 0; j < 2; ++j) {
        u[k + j * 2] = __builtin_shufflevector(t[k + j], t[k + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[k + j * 2 + 1] = __builtin_shufflevector(t[k + j], t[k + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
      }
    for (int k = 0; k < 4; ++k) {
      r[k] = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
      r[k + 4] = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
  }
};

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols, in 8 x 8
// tiles (rows of src read whole: sequential memory).
template <typename T>
FV_CPU_CLONES void transpose(const T* src, int64_t rows, int64_t cols, int64_t src_ld, T* dst, int64_t dst_ld) {
  int64_t r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {
      Tile8<T> t;
      t.load(src + r0 * src_ld + c0, src_ld);
      t.transpose();
      t.store(dst + c0 * dst_ld + r0, dst_ld);
    }
    for (; c0 < cols; ++c0)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[c0 * dst_ld + r] = src[r * src_ld + c0];
  }
  for (; r0 < rows; ++r0)
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_ld + r0] = src[r0 * src_ld + c];
}

}  // namespace fastvision
