"""Pure-PyTorch DCNv3 / DCNv4 aggregation, the oracle for the fast paths.

Semantics are those of InternImage's DCNv3 CUDA op (``dcnv3_im2col_cuda.cuh``;
DCNv4's kernels share them), channels-last:

* input (N, H, W, G * Cg); offset (N, Ho, Wo, G * K * 2), (dx, dy) pairs in
  pixels; mask (N, Ho, Wo, G * K); out (N, Ho, Wo, G * Cg), with
  Ho = (H + 2 pad_h - (dil_h (kh - 1) + 1)) // stride_h + 1 (likewise Wo);
* kernel point p walks x outer, y inner: (i, j) = (p // kh, p % kh), i < kw,
  j < kh; remove_center drops (kw // 2, kh // 2), so K = kh kw - 1;
* the sample of point (i, j) of output (ho, wo), with half_w = (dil_w (kw - 1)) // 2,
      x = (wo stride_w - pad_w + half_w) + (i dil_w - half_w + dx) * offset_scale
  (likewise y): offset_scale scales the dilated grid and the offset, not the
  centre; bilinear, zeros outside, pixel centres on integers
  (grid_sample(align_corners=False) after its coordinate map);
* out = sum_p m_p * sample_p per group, m = softmax over the K points of a
  group with mask_softmax (DCNv3's module does that before the op), else the
  mask as given (DCNv4: any real weights, no normalisation).

:func:`dcnv3_core_pytorch` is InternImage's own PyTorch formulation, written
out here (the benchmark baseline; the tests use it to show where it differs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import acc_dtype


def out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def kernel_points(kh: int, kw: int, remove_center: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) of the K kernel points, x (i) outer, y (j) inner, the centre dropped with remove_center."""
    t = torch.arange(kh * kw - int(remove_center), device=device)
    if remove_center:  # skip the centre's index (no boolean indexing: meta tensors)
        t = t + (t >= (kw // 2) * kh + kh // 2).long()
    return t // kh, t % kh


def sampling_locations(N, Ho, Wo, offset, kernel_size, stride, padding, dilation, group, offset_scale,
                       remove_center, dtype):
    """(x, y), each (N, Ho, Wo, G, K) in `dtype`: the DCNv3 CUDA op's sampling points."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    dev = offset.device
    i, j = kernel_points(kh, kw, remove_center, dev)
    half_h, half_w = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
    # The CUDA op's arithmetic: p0 - half * scale + (i * dil + offset) * scale.
    base_x = (torch.arange(Wo, device=dev, dtype=dtype) * sw - pw + half_w) - half_w * offset_scale
    base_y = (torch.arange(Ho, device=dev, dtype=dtype) * sh - ph + half_h) - half_h * offset_scale
    off = offset.to(dtype).reshape(N, Ho, Wo, group, i.numel(), 2)
    x = base_x[None, None, :, None, None] + ((i * dw).to(dtype) + off[..., 0]) * offset_scale
    y = base_y[None, :, None, None, None] + ((j * dh).to(dtype) + off[..., 1]) * offset_scale
    return x, y


def bilinear_gather(value: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """value (N, H, W, G, C); x, y (N, Q, G, K) -> samples (N, Q, G, K, C), zeros outside."""
    N, H, W, G, C = value.shape
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    x = torch.where(inside, x, torch.zeros_like(x))  # no float-to-int of inf / NaN / huge values
    y = torch.where(inside, y, torch.zeros_like(y))
    x0, y0 = torch.floor(x), torch.floor(y)
    lx, ly = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    flat = value.reshape(N, H * W, G, C)
    out = 0
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yy, xx = y0 + dy, x0 + dx
            ok = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            idx = torch.where(ok, yy * W + xx, torch.zeros_like(yy))  # (N, Q, G, K)
            Q, K = idx.shape[1], idx.shape[3]
            g_idx = torch.arange(G, device=value.device)[None, None, :, None].expand_as(idx)
            v = flat[torch.arange(N, device=value.device)[:, None, None, None], idx, g_idx]  # (N, Q, G, K, C)
            out = out + (wy * wx * ok)[..., None] * v
    return out


def dcn_aggregate_ref(input, offset, mask, kernel_size, stride=1, padding=0, dilation=1, group=1,
                      offset_scale=1.0, remove_center=False, mask_softmax=False):
    """out (N, Ho, Wo, G * Cg) in input's dtype; arguments as :func:`fastvision.ops.dcn_aggregate`
    (pairs are (h, w)). Accumulates in float32 (float64 for float64 inputs); any device, meta included."""
    from ..ops.dcn import _pair  # one parser for the public argument forms
    kernel_size, stride, padding, dilation = (_pair(v, n) for v, n in (
        (kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    acc = acc_dtype(input.dtype)
    N, H, W, C = input.shape
    G = group
    Ho, Wo = (out_size(s, k, st, p, d) for s, k, st, p, d in zip((H, W), kernel_size, stride, padding, dilation))
    x, y = sampling_locations(N, Ho, Wo, offset, kernel_size, stride, padding, dilation, G, float(offset_scale),
                              bool(remove_center), acc)
    K = x.shape[-1]
    m = mask.to(acc).reshape(N, Ho, Wo, G, K)
    if mask_softmax:
        m = torch.softmax(m, dim=-1)
    value = input.to(acc).reshape(N, H, W, G, C // G)
    samples = bilinear_gather(value, x.reshape(N, Ho * Wo, G, K), y.reshape(N, Ho * Wo, G, K))
    out = (samples * m.reshape(N, Ho * Wo, G, K, 1)).sum(3)
    return out.reshape(N, Ho, Wo, C).to(input.dtype)


def dcnv4_ref(input, offset_mask, kernel_size, stride=1, padding=0, dilation=1, group=1, offset_scale=1.0,
              remove_center=False, mask_softmax=False):
    """DCNv4's packed layout: offset_mask (N, Ho, Wo, >= G * K * 3), per group 2K offsets then K
    weights, the rest (DCNv4 pads to a multiple of 8) unused."""
    from ..ops.dcn import split_offset_mask
    offset, mask = split_offset_mask(offset_mask, kernel_size, group, remove_center)
    return dcn_aggregate_ref(input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale,
                             remove_center, mask_softmax)


def dcnv3_core_pytorch(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                       dilation_w, group, group_channels, offset_scale, remove_center):
    """InternImage's ``dcnv3_core_pytorch`` (ops_dcnv3/functions/dcnv3_func.py), in our words, with its
    quirks: it pads H by pad_w and W by pad_h (the same when pad_h == pad_w), builds its grid in
    float32, normalises by the padded size and samples with F.grid_sample(align_corners=False)."""
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0 or kernel_w != kernel_h):
        raise ValueError("remove_center is only compatible with square odd kernel size.")
    # F.pad pads the last dimensions first: (C: 0, 0), (W: pad_h, pad_h), (H: pad_w, pad_w).
    input = F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    N, H_in, W_in, _ = input.shape
    _, H_out, W_out, _ = offset.shape
    dev, f32 = input.device, torch.float32
    # Reference points: the kernel window's centre in the padded input, normalised to [0, 1].
    ry = (dilation_h * (kernel_h - 1)) // 2 + 0.5 + torch.arange(H_out, device=dev, dtype=f32) * stride_h
    rx = (dilation_w * (kernel_w - 1)) // 2 + 0.5 + torch.arange(W_out, device=dev, dtype=f32) * stride_w
    ref_y, ref_x = torch.meshgrid(ry / H_in, rx / W_in, indexing="ij")
    ref = torch.stack((ref_x, ref_y), -1).reshape(1, H_out, W_out, 1, 2)
    # The dilated grid, x outer, y inner, repeated per group.
    gx = -((dilation_w * (kernel_w - 1)) // 2) + torch.arange(kernel_w, device=dev, dtype=f32) * dilation_w
    gy = -((dilation_h * (kernel_h - 1)) // 2) + torch.arange(kernel_h, device=dev, dtype=f32) * dilation_h
    px, py = torch.meshgrid(gx / W_in, gy / H_in, indexing="ij")
    grid = torch.stack((px, py), -1).reshape(-1, 1, 2).repeat(1, group, 1).permute(1, 0, 2)
    grid = grid.reshape(1, 1, 1, group * kernel_h * kernel_w, 2)
    loc = (ref + grid * offset_scale).repeat(N, 1, 1, 1, 1)
    if remove_center:
        c = (kernel_w * kernel_h - 1) // 2
        keep = [t for t in range(loc.shape[-2]) if t != c and (t - c) % (c * 2 + 1) != 0]
        loc = loc[:, :, :, keep, :]
    P = kernel_h * kernel_w - remove_center
    norm = torch.tensor([W_in, H_in], device=dev).reshape(1, 1, 1, 2).repeat(1, 1, 1, group * P)
    loc = loc.flatten(3, 4) + offset * offset_scale / norm
    grids = (2 * loc - 1).view(N, H_out * W_out, group, P, 2).transpose(1, 2).flatten(0, 1)
    value = input.view(N, H_in * W_in, group * group_channels).transpose(1, 2)
    value = value.reshape(N * group, group_channels, H_in, W_in)
    sampled = F.grid_sample(value, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = mask.view(N, H_out * W_out, group, P).transpose(1, 2).reshape(N * group, 1, H_out * W_out, P)
    out = (sampled * mask).sum(-1).view(N, group * group_channels, H_out * W_out)
    return out.transpose(1, 2).reshape(N, H_out, W_out, -1).contiguous()
