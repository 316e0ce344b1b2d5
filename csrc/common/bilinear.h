// Bilinear sampling with zeros outside the image: the one sampling rule of the
// deformable families (torchvision's deform_conv2d, InternImage's DCNv3 /
// DCNv4, Deformable DETR's multi-scale deformable attention; also
// grid_sample(align_corners=False, padding_mode="zeros") after its coordinate
// map). A point (y, x) is in pixel coordinates, pixel centres on integers. It
// reads 0 when y <= -1, y >= H, x <= -1 or x >= W (or is NaN); otherwise the
// four pixels around it, each weighted by its bilinear weight, a corner outside
// the image reading 0. Host and device (FV_HOST_DEVICE); the caller reads
// memory, in its own layout, only at the corners marked valid.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace fastvision {

// Corner k of a sample: 0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0),
// 3 = (y0 + 1, x0 + 1).
template <typename A> struct Bilinear {
  int64_t y0 = 0, x0 = 0;   // top-left corner (meaningful when any corner is valid)
  A ly = 0, lx = 0;         // fractional parts: weights of the bottom / right corners
  bool valid[4] = {false, false, false, false};

  FV_HOST_DEVICE int64_t y(int k) const { return y0 + (k >> 1); }
  FV_HOST_DEVICE int64_t x(int k) const { return x0 + (k & 1); }
  // Row-major pixel index of corner k in an H x W plane (valid corners only).
  FV_HOST_DEVICE int64_t index(int k, int64_t W) const { return y(k) * W + x(k); }
  // The bilinear weight of corner k (0 for corners outside the image).
  FV_HOST_DEVICE A weight(int k) const {
    if (!valid[k]) return A(0);
    const A wy = (k >> 1) ? ly : A(1) - ly;
    const A wx = (k & 1) ? lx : A(1) - lx;
    return wy * wx;
  }
  // d weight(k) / dy and / dx (0 for corners outside the image): with the
  // corner values v, d sample / dy = sum_k v_k dwy(k), likewise for x.
  FV_HOST_DEVICE A dwy(int k) const {
    if (!valid[k]) return A(0);
    const A wx = (k & 1) ? lx : A(1) - lx;
    return (k >> 1) ? wx : -wx;
  }
  FV_HOST_DEVICE A dwx(int k) const {
    if (!valid[k]) return A(0);
    const A wy = (k >> 1) ? ly : A(1) - ly;
    return (k & 1) ? wy : -wy;
  }
};

// The corners of the sample at (y, x) in an H x W image. The range test comes
// before any float-to-integer conversion, so inf, NaN and huge offsets are
// safe (they read 0).
template <typename A>
FV_HOST_DEVICE Bilinear<A> bilinear_at(A y, A x, int64_t H, int64_t W) {
  Bilinear<A> s;
  if (!(y > A(-1) && y < A(H) && x > A(-1) && x < A(W))) return s;
  const A fy = std::floor(y), fx = std::floor(x);
  s.y0 = static_cast<int64_t>(fy);
  s.x0 = static_cast<int64_t>(fx);
  s.ly = y - fy;
  s.lx = x - fx;
  const bool top = s.y0 >= 0, bottom = s.y0 + 1 < H, left = s.x0 >= 0, right = s.x0 + 1 < W;
  s.valid[0] = top && left;
  s.valid[1] = top && right;
  s.valid[2] = bottom && left;
  s.valid[3] = bottom && right;
  return s;
}

}  // namespace fastvision
