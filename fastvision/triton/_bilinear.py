"""Bilinear sampling with zeros outside the image, for the deformable families' Triton kernels.

The rule of ``csrc/common/bilinear.h`` (torchvision's deform_conv2d, DCNv3/v4,
Deformable DETR's attention, grid_sample(align_corners=False, zeros)): a point
(y, x) in pixel coordinates (pixel centres on integers) reads 0 when y <= -1,
y >= H, x <= -1 or x >= W (or NaN); otherwise the four pixels around it with
their bilinear weights, a corner outside the image reading 0. Corner k:
0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1, x0 + 1).
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
