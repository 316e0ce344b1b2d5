"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch: the oracle.

:func:`ms_deform_attn_ref` is Deformable DETR's ``ms_deform_attn_core_pytorch``
written as gathers: value (N, S, M, D) holds L levels, level l an (H_l, W_l)
map in row-major order from position ``value_level_start_index[l]``; a sampling
location (x, y) in [0, 1] reads level l at pixel (x W_l - 0.5, y H_l - 0.5)
(pixel centres on integers: ``grid_sample(align_corners=False)`` at 2 loc - 1),
bilinearly, a corner outside the map reading 0 (``padding_mode="zeros"``), and
the samples of a (query, head) are summed with their attention weights:

    out[n, q, m * D + d] = sum_{l, p} a[n, q, m, l, p] * bilinear(level l of value[n, :, m, d], loc[n, q, m, l, p])

Every index is built from the level tables on the inputs' device (no host
reads: it runs on meta tensors and under torch.compile); float32 accumulation
(float64 for float64 inputs).

:func:`ms_deform_attn_grid_sample` is the anchor's own formulation, one
``F.grid_sample`` per level (sizes read on the host): the benchmarks' baseline
and a second oracle in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_deform_attn_ref", "ms_deform_attn_grid_sample"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ms_deform_attn_ref(value: Tensor, value_spatial_shapes: Tensor, value_level_start_index: Tensor,
                       sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """(N, Lq, M * D) in value's dtype; see the module docstring."""
    N, S, M, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    acc = _acc(value.dtype)
    v = value.to(acc).permute(0, 2, 1, 3)  # (N, M, S, D): gather along S
    loc, attn = sampling_locations.to(acc), attention_weights.to(acc)
    shapes = value_spatial_shapes.view(1, 1, 1, L, 1, 2)
    H, W = shapes[..., 0], shapes[..., 1]
    start = value_level_start_index.view(1, 1, 1, L, 1)
    x = loc[..., 0] * W - 0.5
    y = loc[..., 1] * H - 0.5
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    # Points that read nothing are moved to 0 before floor(): inf, NaN and
    # huge values never become indices (their gradients are 0 through where).
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    out = v.new_zeros(N, M, Lq, D)
    for dy in (0, 1):
        for dx in (0, 1):
            yi, xi = y0 + dy, x0 + dx
            valid = inside & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
            weight = (ly if dy else 1 - ly) * (lx if dx else 1 - lx) * attn
            weight = torch.where(valid, weight, torch.zeros_like(weight))
            index = torch.where(valid, start + yi * W + xi, torch.zeros_like(yi))
            index = index.permute(0, 2, 1, 3, 4).reshape(N, M, Lq * L * P, 1).expand(N, M, Lq * L * P, D)
            corner = torch.gather(v, 2, index).view(N, M, Lq, L * P, D)
            out = out + (corner * weight.permute(0, 2, 1, 3, 4).reshape(N, M, Lq, L * P, 1)).sum(3)
    return out.permute(0, 2, 1, 3).reshape(N, Lq, M * D).to(value.dtype)


def ms_deform_attn_grid_sample(value: Tensor, value_spatial_shapes: Tensor, sampling_locations: Tensor,
                               attention_weights: Tensor) -> Tensor:
    """Deformable DETR's ``ms_deform_attn_core_pytorch`` formulation (its arguments): each level
    reshaped to (N * M, D, H, W) and sampled with ``F.grid_sample`` at 2 loc - 1
    (bilinear, zeros, align_corners=False), weighted and summed. -> (N, Lq, M * D)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [(int(h), int(w)) for h, w in value_spatial_shapes.tolist()]
    levels = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for l, (h, w) in enumerate(sizes):
        level = levels[l].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        grid = grids[:, :, :, l].transpose(1, 2).flatten(0, 1)  # (N * M, Lq, P, 2)
        sampled.append(F.grid_sample(level, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()
