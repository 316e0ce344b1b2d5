"""Bilinear sampling with zeros outside the image, for the deformable families' Triton kernels.

The rule of ``csrc/common/bilinear.h`` (torchvision's deform_conv2d, DCNv3/v4,
Deformable DETR's attention, grid_sample(align_corners=False, zeros)): a point
(y, x) in pixel coordinates (pixel centres on integers) reads 0 when y <= -1,
y >= H, x <= -1 or x >= W (or NaN); otherwise the four pixels around it with
their bilinear weights, a corner outside the image reading 0. Corner k:
0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1, x0 + 1).

``bilinear_corners_only`` is torchvision deform_conv2d's offset-gradient variant
(``get_coordinate_weight``): the corners without the range test, so that at y == -1
(x == -1) the coordinate derivative is the one-sided one from row 0 (column 0) while
the sample reads 0. DCNv3/v4 and Deformable DETR keep ``bilinear_corners`` in their
backward too.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bilinear_corners(y, x, H, W):
    """(y0, x0, ly, lx, m0, m1, m2, m3): the top-left corner (int32, 0 where the point reads
    nothing, so addresses stay in range), the fractional parts, and which corners are valid.
    Load corner k with mask m_k and other=0."""
    inside = (y > -1.0) & (y < H) & (x > -1.0) & (x < W)
    yc = tl.where(inside, y, 0.0)  # no float-to-int conversion of inf, NaN or huge values
    xc = tl.where(inside, x, 0.0)
    fy = tl.floor(yc)
    fx = tl.floor(xc)
    y0 = fy.to(tl.int32)
    x0 = fx.to(tl.int32)
    top = inside & (y0 >= 0)
    bottom = inside & (y0 + 1 < H)
    left = x0 >= 0
    right = x0 + 1 < W
    return y0, x0, yc - fy, xc - fx, top & left, top & right, bottom & left, bottom & right


@triton.jit
def bilinear_in_range(y, x, H, W):
    """Whether the sample at (y, x) is in the sampling range -1 < y < H, -1 < x < W (False
    for NaN): outside it the sample reads 0."""
    return (y > -1.0) & (y < H) & (x > -1.0) & (x < W)


@triton.jit
def bilinear_corners_only(y, x, H, W):
    """torchvision deform_conv2d's coordinate-gradient corners (``get_coordinate_weight``):
    as ``bilinear_corners`` but without the range test, each corner valid when inside the
    image. Differs only at y == -1 (x == -1): row 0 (column 0) is then a valid corner of
    weight 0 (ly = 0), so the sample is still 0 (weights: mask with ``bilinear_in_range``)
    but ``bilinear_coordinate_grads`` gives the one-sided derivative from inside. For
    y in (-2, -1) or [H, H + 1) no corner is valid, as in ``bilinear_corners``; the guard
    -2 < y < H + 1, -2 < x < W + 1 only keeps inf, NaN and huge values from the
    float-to-int conversion (they get no corner and y0 = x0 = 0). For deform_conv2d's
    offset gradient only."""
    near = (y > -2.0) & (y < H + 1) & (x > -2.0) & (x < W + 1)
    yc = tl.where(near, y, 0.0)
    xc = tl.where(near, x, 0.0)
    fy = tl.floor(yc)
    fx = tl.floor(xc)
    y0 = fy.to(tl.int32)
    x0 = fx.to(tl.int32)
    top = near & (y0 >= 0) & (y0 < H)
    bottom = near & (y0 + 1 >= 0) & (y0 + 1 < H)
    left = (x0 >= 0) & (x0 < W)
    right = (x0 + 1 >= 0) & (x0 + 1 < W)
    return y0, x0, yc - fy, xc - fx, top & left, top & right, bottom & left, bottom & right


@triton.jit
def bilinear_weights(ly, lx, m0, m1, m2, m3):
    """The four corner weights (0 for invalid corners)."""
    hy = 1.0 - ly
    hx = 1.0 - lx
    return (tl.where(m0, hy * hx, 0.0), tl.where(m1, hy * lx, 0.0),
            tl.where(m2, ly * hx, 0.0), tl.where(m3, ly * lx, 0.0))


@triton.jit
def bilinear_coordinate_grads(v0, v1, v2, v3, ly, lx):
    """(d sample / dy, d sample / dx) from the corner values v_k (0 at invalid corners, as
    loaded with other=0)."""
    hy = 1.0 - ly
    hx = 1.0 - lx
    return hx * (v2 - v0) + lx * (v3 - v1), hy * (v1 - v0) + ly * (v3 - v2)
