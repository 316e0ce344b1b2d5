// Bilinear sampling with zeros outside the image: the one sampling rule of the
// deformable families (torchvision's deform_conv2d, InternImage's DCNv3 /
// DCNv4, Deformable DETR's multi-scale deformable attention; also
// grid_sample(align_corners=False, padding_mode="zeros") after its coordinate
// map). A point (y, x) is in pixel coordinates, pixel centres on integers. It
// reads 0 when y <= -1, y >= H, x <= -1 or x >= W (or is NaN); otherwise the
// four pixels around it, each weighted by its bilinear weight, a corner outside
// the image reading 0. Host and device (FV_HOST_DEVICE); the caller reads
// memory, in its own layout, only at the corners marked valid.
// bilinear_corners_only_at is torchvision deform_conv2d's offset-gradient
// variant (no range test: one-sided derivatives at y == -1 / x == -1).
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

namespace detail {
// The corners around (y, x), each valid when inside the H x W image; (y, x)
// must be finite and near enough for the integer conversion (the callers'
// range tests).
template <typename A>
FV_HOST_DEVICE Bilinear<A> bilinear_corners_of(A y, A x, int64_t H, int64_t W) {
  Bilinear<A> s;
  const A fy = std::floor(y), fx = std::floor(x);
  s.y0 = static_cast<int64_t>(fy);
  s.x0 = static_cast<int64_t>(fx);
  s.ly = y - fy;
  s.lx = x - fx;
  const bool top = s.y0 >= 0 && s.y0 < H, bottom = s.y0 + 1 >= 0 && s.y0 + 1 < H;
  const bool left = s.x0 >= 0 && s.x0 < W, right = s.x0 + 1 >= 0 && s.x0 + 1 < W;
  s.valid[0] = top && left;
  s.valid[1] = top && right;
  s.valid[2] = bottom && left;
  s.valid[3] = bottom && right;
  return s;
}
}  // namespace detail

// Whether the sample at (y, x) is in the sampling range: -1 < y < H and
// -1 < x < W (false for NaN). Outside it the sample reads 0.
template <typename A>
FV_HOST_DEVICE bool bilinear_in_range(A y, A x, int64_t H, int64_t W) {
  return y > A(-1) && y < A(H) && x > A(-1) && x < A(W);
}

// The corners of the sample at (y, x) in an H x W image. The range test comes
// before any float-to-integer conversion, so inf, NaN and huge offsets are
// safe (they read 0).
template <typename A>
FV_HOST_DEVICE Bilinear<A> bilinear_at(A y, A x, int64_t H, int64_t W) {
  if (!bilinear_in_range(y, x, H, W)) return Bilinear<A>();
  return detail::bilinear_corners_of(y, x, H, W);
}

// torchvision deform_conv2d's coordinate (offset) gradient,
// get_coordinate_weight in deformable_col2im_coord: the corners around (y, x)
// alone, each valid when inside the image, WITHOUT the sampling range test.
// The two differ only on the range's open ends: at y == -1 (or x == -1) the
// sample reads 0 (bilinear_at: no corner) while here row 0 (column 0) is a
// valid corner of weight ly = 0 (lx = 0): its value is still 0, its weight is
// still 0, but d/dy (d/dx) is the one-sided derivative from inside, nonzero.
// Everywhere else the corners, weights and derivatives are bilinear_at's
// (for y in (-2, -1) or [H, H + 1) no corner is inside either). The guard
// -2 < y < H + 1, -2 < x < W + 1 only keeps inf, NaN and huge values from the
// integer conversion (they get no corner, as in bilinear_at); it selects no
// other corner. For deform_conv2d's offset gradient only: DCNv3 / DCNv4 and
// Deformable DETR apply the range test in their backward too (bilinear_at).
template <typename A>
FV_HOST_DEVICE Bilinear<A> bilinear_corners_only_at(A y, A x, int64_t H, int64_t W) {
  if (!(y > A(-2) && y < A(H + 1) && x > A(-2) && x < A(W + 1))) return Bilinear<A>();
  return detail::bilinear_corners_of(y, x, H, W);
}

}  // namespace fastvision
