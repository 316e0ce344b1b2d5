"""Pure-PyTorch deformable convolution (DCNv1 / DCNv2), the oracle for the fast paths.

Semantics are torchvision's ``deform_conv2d``, NCHW. Kernel point k = (i, j)
(row-major) of output position (oh, ow) samples input channel c at

    y = oh * stride_h - pad_h + i * dil_h + offset[b, 2 * (g * K + k), oh, ow]
    x = ow * stride_w - pad_w + j * dil_w + offset[b, 2 * (g * K + k) + 1, oh, ow]

(g = c // (Cin / G), G offset groups, K = kh * kw), bilinearly with zeros
outside the image: 0 when y <= -1, y >= H, x <= -1 or x >= W, else the four
pixels around (y, x), a corner outside the image reading 0. The offset gradient
is torchvision's (``get_coordinate_weight``): the corners alone, without that
range test, so at a coordinate exactly -1 (zero offsets with padding 1 put the
first kernel row / column there at the border) it is the one-sided derivative
from row / column 0 while the sample, its input and mask gradients are 0. The
sample is
multiplied by mask[b, g * K + k, oh, ow] (DCNv2; all ones without a mask), and

    out[b, o] = bias[o] + sum_{c in o's weight group, k} weight[o, c, k] * mask * sample.

Written with explicit gathers (autograd gives every gradient); accumulates in
float32 (float64 for float64 inputs); every index tensor is built on the
inputs' device, so it runs on meta tensors.
"""

from __future__ import annotations

import torch
from torch.nn.modules.utils import _pair

from .._checks import acc_dtype


def bilinear_zeros_corners_only(img: torch.Tensor, y: torch.Tensor, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Samples img (..., C, H * W) at points (y, x) (..., S) -> (..., C, S), bilinear with
    zeros outside, with torchvision deform_conv2d's gradients (the rule of
    ``bilinear_corners_only_at`` in csrc/common/bilinear.h): the four corners around (y, x),
    each read when inside the image, without the sample's range test. Its value is the
    zero-padding rule's (``bilinear_at``) for finite inputs (out of the range the corners
    inside have weight exactly 0: at y == -1 row 0 has weight ly = 0; for y in (-2, -1) or
    [H, H + 1) no corner is inside), and so is its input gradient; its (y, x) gradient is
    torchvision's offset gradient, one-sided at a coordinate exactly -1. The guard
    -2 < y < H + 1, -2 < x < W + 1 only keeps inf, NaN and huge values from the
    float-to-int conversion."""
    near = (y > -2) & (y < H + 1) & (x > -2) & (x < W + 1)
    y = torch.where(near, y, torch.zeros_like(y))
    x = torch.where(near, x, torch.zeros_like(x))
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    out = None
    for dy, dx, wgt in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        valid = near & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).long()
        idx = idx.unsqueeze(-2).expand(*img.shape[:-1], idx.shape[-1])
        v = torch.gather(img, -1, idx)
        term = wgt.unsqueeze(-2) * torch.where(valid.unsqueeze(-2), v, torch.zeros_like(v))
        out = term if out is None else out + term
    return out


def deform_conv2d_ref(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision.ops.deform_conv2d in plain PyTorch: out (batch, Cout, Ho, Wo) in input's dtype."""
    acc = acc_dtype(input.dtype)
    x, w = input.to(acc), weight.to(acc)
    B, Cin, H, W = x.shape
    Cout, Cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    K = kh * kw
    G = offset.shape[1] // (2 * K)
    groups = Cin // Cg
    dev = x.device
    ki = (torch.arange(kh, device=dev, dtype=acc) * dh).repeat_interleave(kw)  # kernel row offset of point k
    kj = (torch.arange(kw, device=dev, dtype=acc) * dw).repeat(kh)
    base_y = (torch.arange(Ho, device=dev, dtype=acc) * sh - ph)[None, :, None] + ki[:, None, None]  # (K, Ho, 1)
    base_x = (torch.arange(Wo, device=dev, dtype=acc) * sw - pw)[None, None, :] + kj[:, None, None]  # (K, 1, Wo)
    off = offset.to(acc).reshape(B, G, K, 2, Ho, Wo)
    y = (base_y + off[:, :, :, 0]).reshape(B, G, K * Ho * Wo)
    xs = (base_x + off[:, :, :, 1]).reshape(B, G, K * Ho * Wo)
    # torchvision's offset gradient: the corners-only rule (the samples of the zero-padding rule)
    cols = bilinear_zeros_corners_only(x.reshape(B, G, Cin // G, H * W), y, xs, H, W)  # (B, G, Cin / G, K * Ho * Wo)
    cols = cols.reshape(B, G, Cin // G, K, Ho * Wo)
    if mask is not None:
        cols = mask.to(acc).reshape(B, G, 1, K, Ho * Wo) * cols
    cols = cols.reshape(B, groups, Cg, K, Ho * Wo)  # channel order is kept: offset groups -> weight groups
    out = torch.einsum("bgckp,gock->bgop", cols, w.reshape(groups, Cout // groups, Cg, K))
    out = out.reshape(B, Cout, Ho, Wo)
    if bias is not None:
        out = out + bias.to(acc)[None, :, None, None]
    return out.to(input.dtype)
