"""Neighborhood attention layers: ``NeighborhoodAttention1D / 2D / 3D``.

The modules of NAT / DiNAT (SHI-Labs), on fastvision's fused ``na1d / na2d /
na3d``. Parameter names, shapes and initialisation follow NATTEN's own
``NeighborhoodAttention2D`` (``natten/na2d.py`` of NATTEN <= 0.17, the last
releases with relative positional bias), so that the published NAT / DiNAT
checkpoints load with ``strict=True``::

    qkv.weight (3 * dim, dim)   qkv.bias (3 * dim,)         [when qkv_bias]
    rpb (num_heads, 2k0-1[, 2k1-1[, 2k2-1]])                 [when rel_pos_bias]
    proj.weight (dim, dim)      proj.bias (dim,)

``qkv`` output channels are ordered ``(3, num_heads, head_dim)``; the logits
are ``q . k * scale + rpb`` with ``scale = qk_scale or head_dim ** -0.5``;
``rpb`` is ``trunc_normal_(std=.02)``.

Two behaviours of the original layer are kept:

* **Inputs smaller than the window** (``L < kernel_size * dilation`` on some
  axis, e.g. DiNAT's late stages at a low resolution): NATTEN <= 0.15 padded
  the *input* of the layer with zeros at the end of every such axis up to
  ``kernel_size * dilation``, projected and attended over the padded map (the
  padded tokens are real keys: their key/value are the qkv bias), then cropped
  the output back before ``proj``. This module does the same.
* **Attention dropout**: the fused op never materialises the attention
  weights, so it cannot drop them. In training mode with ``attn_drop > 0``
  the layer computes the attention explicitly (the reference
  implementation, :func:`fastvision.reference.neighborhood.neighborhood_attention_ref`,
  with ``self.attn_drop`` applied to its softmax weights), so the dropout is
  really applied. This path stores a k^d-sized window per query:
  memory-hungry, used only when asked for.

Arguments follow NATTEN's layers in NATTEN's order (``embed_dim`` is called
``dim`` here, as in NAT); ``rel_pos_bias`` and ``attn_drop``, which NATTEN's
current layers lack, are keyword-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_

from .._checks import as_bool, as_float, as_int, per_axis
from ..reference.neighborhood import neighborhood_attention_ref
from . import neighborhood

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


# --------------------------------------------------------------------------- #
# Layers
# --------------------------------------------------------------------------- #
class _NeighborhoodAttentionNd(nn.Module):
    _nd: int = 0

    def __init__(self, dim: int, num_heads: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, dilation: int | Sequence[int] | None = 1,
                 is_causal: bool | Sequence[bool] = False, qkv_bias: bool = True,
                 qk_scale: float | None = None, proj_drop: float = 0.0, *, rel_pos_bias: bool = True,
                 attn_drop: float = 0.0):
        super().__init__()
        nd, cls = self._nd, type(self).__name__
        dim, num_heads = as_int(dim, f"{cls}: dim", 1), as_int(num_heads, f"{cls}: num_heads", 1)
        if dim % num_heads:
            raise ValueError(f"{cls}: dim ({dim}) must be divisible by num_heads ({num_heads})")
        attn_drop, proj_drop = as_float(attn_drop, f"{cls}: attn_drop"), as_float(proj_drop, f"{cls}: proj_drop")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{cls}: {name} must be in [0, 1); got {p!r}")
        qk_scale = None if qk_scale is None else as_float(qk_scale, f"{cls}: qk_scale")
        rel_pos_bias, qkv_bias = as_bool(rel_pos_bias, f"{cls}: rel_pos_bias"), as_bool(qkv_bias, f"{cls}: qkv_bias")
        self.kernel_size = per_axis(kernel_size, nd, "kernel_size", minimum=1, context=f"for {cls}")
        self.stride = per_axis(stride, nd, "stride", minimum=1, context=f"for {cls}")
        # NAT passes dilation=None for its undilated layers.
        self.dilation = per_axis(1 if dilation is None else dilation, nd, "dilation", minimum=1,
                                 context=f"for {cls}")
        self.is_causal = per_axis(is_causal, nd, "is_causal", bool, context=f"for {cls}")
        if any(s > k for s, k in zip(self.stride, self.kernel_size)):
            raise ValueError(f"{cls}: stride {self.stride} must not exceed kernel_size {self.kernel_size}")
        if any(self.is_causal) and rel_pos_bias:
            raise ValueError(f"{cls}: relative positional bias (rel_pos_bias=True) is undefined with "
                             "causal neighborhood attention; pass rel_pos_bias=False")
        if any(s > 1 for s in self.stride) and rel_pos_bias:
            raise ValueError(f"{cls}: relative positional bias (rel_pos_bias=True) needs stride 1; got "
                             f"stride={self.stride}; pass rel_pos_bias=False")

        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5  # as NAT: qk_scale=0/None -> default
        self.window_size = tuple(k * d for k, d in zip(self.kernel_size, self.dilation))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd, cls = self._nd, type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{cls}: x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() != nd + 2 or x.shape[-1] != self.dim:
            axes = {1: "batch, L", 2: "batch, H, W", 3: "batch, D, H, W"}[nd] + f", {self.dim}"
            raise ValueError(f"{cls}: x must be channels-last ({axes}); got shape {tuple(x.shape)}")
        B, *spatial, C = x.shape

        # NAT's rule for maps smaller than the window: zero-pad the input at the
        # end of each such axis up to kernel_size * dilation, crop the output.
        pads = [max(0, w - L) for w, L in zip(self.window_size, spatial)]
        if any(pads):
            x = F.pad(x, [0, 0] + [v for p in reversed(pads) for v in (0, p)])
        padded = x.shape[1:-1]

        q, k, v = self.qkv(x).reshape(B, *padded, 3, self.num_heads, self.head_dim).unbind(-3)
        if self.training and self.attn_drop.p > 0:
            # The fused op never materialises the weights it would have to drop.
            out = neighborhood_attention_ref(q, k, v, self.kernel_size, self.dilation, self.stride,
                                             self.is_causal, self.rpb, self.scale,
                                             attn_dropout=self.attn_drop)
        else:
            na = getattr(neighborhood, f"na{nd}d")  # looked up per call: tests swap it
            out = na(q, k, v, self.kernel_size, self.stride, self.dilation, self.is_causal, self.scale,
                     rpb=self.rpb)
        out = out.reshape(B, *padded, C)
        if any(pads):
            out = out[(slice(None), *(slice(0, L) for L in spatial))]
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, "
                f"is_causal={self.is_causal}, has_bias={self.rpb is not None}")


_LAYER_DOC = """{nd}-D neighborhood attention layer on channels-last input (batch, {axes}, dim).

    NAT / DiNAT's attention module{nat}: ``qkv`` projection, neighborhood attention
    (:func:`fastvision.ops.na{nd}d`) with relative positional bias ``rpb``
    (num_heads, {rpb}), output projection ``proj``.

    Args:
        dim: channels (NATTEN's ``embed_dim``); divisible by num_heads.
        num_heads: attention heads.
        kernel_size, stride, dilation: int or a tuple of {nd}, as :func:`fastvision.ops.na{nd}d`
            (``dilation=None`` means 1, as NAT passes it).
        is_causal: bool or a tuple of {nd}.
        qkv_bias: bias in the qkv projection.
        qk_scale: logit scale; None (or 0) for head_dim ** -0.5.
        proj_drop: dropout after the output projection.
        rel_pos_bias: learn NAT/DiNAT's relative positional bias (keyword-only; needs stride 1
            and no causal axis).
        attn_drop: dropout on the attention weights (keyword-only; in training it takes the
            explicit, memory-hungry path).

    Example::

        >>> import torch
        >>> from fastvision.ops import NeighborhoodAttention{nd}D
        >>> layer = NeighborhoodAttention{nd}D(64, num_heads=4, kernel_size=3, dilation=2)
        >>> layer(torch.randn(2, {example}, 64)).shape
        torch.Size([2, {example}, 64])
    """


class NeighborhoodAttention1D(_NeighborhoodAttentionNd):
    __doc__ = _LAYER_DOC.format(nd=1, axes="L", nat="", rpb="2k-1", example="16")
    _nd = 1


class NeighborhoodAttention2D(_NeighborhoodAttentionNd):
    __doc__ = _LAYER_DOC.format(nd=2, axes="H, W", nat=" (``levels.i.blocks.j.attn``)", rpb="2k0-1, 2k1-1",
                                example="8, 8")
    _nd = 2


class NeighborhoodAttention3D(_NeighborhoodAttentionNd):
    __doc__ = _LAYER_DOC.format(nd=3, axes="D, H, W", nat="", rpb="2k0-1, 2k1-1, 2k2-1", example="6, 6, 6")
    _nd = 3
