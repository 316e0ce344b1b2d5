"""Deformable DETR's ``MSDeformAttn`` module on the fused :func:`ms_deform_attn`.

Parameter names, initialisation and forward are the anchor's
(fundamentalvision/Deformable-DETR ``models/ops/modules/ms_deform_attn.py``), so
its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import as_int
from .deform_attn import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR).

    Args:
        d_model: hidden dimension (divisible by n_heads; any head dim works,
            the anchor's CUDA kernel prefers powers of 2 and warns otherwise).
        n_levels: feature levels; n_heads: attention heads; n_points: sampling
            points per head and level.
        backend: the :func:`ms_deform_attn` backend (keyword only).

    Example::

        >>> import torch
        >>> from fastvision.ops import MSDeformAttn
        >>> attn = MSDeformAttn(64, n_levels=2, n_heads=4, n_points=2)
        >>> shapes, starts = torch.tensor([[8, 8], [4, 4]]), torch.tensor([0, 64])
        >>> x = torch.randn(1, 80, 64)
        >>> attn(x, torch.rand(1, 80, 2, 2), x, shapes, starts).shape
        torch.Size([1, 80, 64])
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *,
                 backend: str = "auto"):
        super().__init__()
        d_model, n_levels = as_int(d_model, "d_model", 1), as_int(n_levels, "n_levels", 1)
        n_heads, n_points = as_int(n_heads, "n_heads", 1), as_int(n_points, "n_points", 1)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The anchor's: offsets start on a ring of n_heads directions, point i at distance i + 1
        (in the larger of x, y), attention uniform, projections Xavier with zero bias."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, input_spatial_shapes: Tensor,
                input_level_start_index: Tensor, input_padding_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            query: (N, Lq, d_model).
            reference_points: (N, Lq, n_levels, 2) points (x, y) in [0, 1], or
                (N, Lq, n_levels, 4) boxes (x, y, w, h): offsets are then scaled by
                the box size / n_points / 2 instead of the level size.
            input_flatten: (N, S, d_model), the levels' pixels concatenated.
            input_spatial_shapes: (n_levels, 2) int64 (H, W); input_level_start_index (n_levels,) int64.
            input_padding_mask: (N, S) bool, True at padding (their values read 0), or None.

        Returns:
            (N, Lq, d_model).
        """
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        attn = F.softmax(self.attention_weights(query).view(N, Lq, M, L * P), -1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W, H).
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            loc = (reference_points[:, :, None, :, None, :2]
                   + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} "
                             "instead.")
        # The op takes one dtype (autocast gives a half value, float32 locations).
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, loc.to(value.dtype),
                             attn.to(value.dtype), backend=self.backend)
        return self.output_proj(out)
