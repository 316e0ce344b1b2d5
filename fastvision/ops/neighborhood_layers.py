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
  the layer computes the attention explicitly (window gather, softmax,
  ``self.attn_drop`` on the weights, weighted sum), so the dropout is really
  applied. This path stores a k^d-sized window per query: memory-hungry, used
  only when asked for.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


# Private test hook: a callable with the signature of
# fastvision.reference.neighborhood.neighborhood_attention_ref, used instead of
# fastvision.ops.na1d / na2d / na3d for every axis count.
_na_override = None


def _na_fn(nd: int):
    if _na_override is not None:
        return _na_override
    from fastvision.ops import neighborhood  # lazy: the op module may be loaded after this one

    return getattr(neighborhood, f"na{nd}d")


def _per_axis(value, nd: int, name: str, *, kind=int, minimum: Optional[int] = None) -> tuple:
    """`value` as a tuple of `nd` entries of type `kind` (bools are not ints here)."""
    def ok(v):
        if kind is bool:
            return isinstance(v, bool)
        return isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)

    t = tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd
    if len(t) != nd or not all(ok(v) for v in t):
        what = "a bool" if kind is bool else ("an int" + (f" >= {minimum}" if minimum is not None else ""))
        raise ValueError(f"{name} must be {what} or a tuple of {nd} of them; got {value!r}")
    return t


# --------------------------------------------------------------------------- #
# Explicit (unfused) neighborhood attention, used for attention dropout.
# --------------------------------------------------------------------------- #
def _axis_windows(L: int, k: int, d: int, causal: bool, device):
    """Per query on one axis (stride 1): key index (L, k), validity (L, k), rpb index (L, k).

    NATTEN's rule, run in dilation-group coordinates (position i is in group
    i % d at group index i // d; the group has L // d (+1 if i % d < L % d)
    positions). Non-causal windows keep their size k and shift inward at the
    borders; causal windows end at the query. Requires L >= k * d when not causal.
    """
    i = torch.arange(L, device=device)
    g, ig = i % d, i // d
    Lg = L // d + (g < L % d).long()
    left, right = k // 2, k // 2 + k % 2 - 1
    if causal:
        start = (ig - left - right).clamp(min=0)
        end = ig + 1
    else:
        start = (ig - left).clamp(min=0) + torch.where(ig + right >= Lg, Lg - right - ig - 1, 0)
        end = start + k
    pos = start[:, None] + torch.arange(k, device=device)  # (L, k), group coordinates
    valid = pos < end[:, None]
    key = torch.where(valid, pos * d + g[:, None], i[:, None])
    rel = (pos - ig[:, None] + k - 1).clamp(0, 2 * k - 2)
    return key, valid, rel


def neighborhood_attention_explicit(query, key, value, kernel_size, dilation, is_causal, rpb=None,
                                    scale=None, attn_dropout=None):
    """Neighborhood attention with the attention weights materialised (stride 1).

    query/key/value: (batch, *spatial, heads, head_dim) with equal head counts;
    kernel_size, dilation, is_causal: per-axis tuples. ``attn_dropout`` (a
    callable, e.g. an ``nn.Dropout``) is applied to the softmax weights, a
    contiguous tensor (batch, *spatial, heads, prod(kernel_size)) whose last
    axis runs over the window slots in row-major order of the per-axis slots.
    """
    B, *S, H, D = query.shape
    nd = len(S)
    N, W = math.prod(S), math.prod(kernel_size)
    scale = D ** -0.5 if scale is None else scale
    flat, valid, rel = 0, True, []
    for a in range(nd):
        idx, ok, r = _axis_windows(S[a], kernel_size[a], dilation[a], is_causal[a], query.device)
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = S[a], kernel_size[a]
        flat = flat + (idx * math.prod(S[a + 1:])).view(shape)
        valid = valid & ok.view(shape)
        rel.append(r.view(shape))
    flat = flat.expand(*S, *kernel_size).reshape(N * W)
    valid = valid.expand(*S, *kernel_size).reshape(N, 1, W)

    k_win = key.reshape(B, N, H, D)[:, flat].view(B, N, W, H, D)
    v_win = value.reshape(B, N, H, value.shape[-1])[:, flat].view(B, N, W, H, value.shape[-1])
    logits = torch.einsum("bnhd,bnwhd->bnhw", query.reshape(B, N, H, D), k_win) * scale
    if rpb is not None:
        bias = rpb[(slice(None),) + tuple(r.expand(*S, *kernel_size) for r in rel)]  # (H, *S, *k)
        logits = logits + bias.reshape(H, N, W).transpose(0, 1).to(logits.dtype)
    logits = logits.masked_fill(~valid, float("-inf"))
    attn = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    attn = attn.reshape(B, *S, H, W).contiguous()
    if attn_dropout is not None:
        attn = attn_dropout(attn)
    out = torch.einsum("bnhw,bnwhe->bnhe", attn.reshape(B, N, H, W), v_win)
    return out.reshape(B, *S, H, value.shape[-1])


# --------------------------------------------------------------------------- #
# Layers
# --------------------------------------------------------------------------- #
class _NeighborhoodAttentionNd(nn.Module):
    _nd: int = 0

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, is_causal=False,
                 rel_pos_bias: bool = True, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        nd, cls = self._nd, type(self).__name__
        for name, v in (("dim", dim), ("num_heads", num_heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{cls}: {name} must be a positive int; got {v!r}")
        if dim % num_heads:
            raise ValueError(f"{cls}: dim ({dim}) must be divisible by num_heads ({num_heads})")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{cls}: {name} must be in [0, 1); got {p!r}")
        self.kernel_size = _per_axis(kernel_size, nd, "kernel_size", minimum=1)
        # NAT passes dilation=None for its undilated layers.
        self.dilation = _per_axis(1 if dilation is None else dilation, nd, "dilation", minimum=1)
        self.is_causal = _per_axis(is_causal, nd, "is_causal", kind=bool)
        if any(self.is_causal) and rel_pos_bias:
            raise ValueError(f"{cls}: relative positional bias (rel_pos_bias=True) is undefined with "
                             "causal neighborhood attention; pass rel_pos_bias=False")

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
            out = neighborhood_attention_explicit(
                q, k, v, self.kernel_size, self.dilation, self.is_causal, rpb=self.rpb,
                scale=self.scale, attn_dropout=self.attn_drop)
        else:
            out = _na_fn(nd)(q, k, v, kernel_size=self.kernel_size, dilation=self.dilation,
                             is_causal=self.is_causal, rpb=self.rpb, scale=self.scale)
        out = out.reshape(B, *padded, C)
        if any(pads):
            out = out[(slice(None), *(slice(0, L) for L in spatial))]
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
                f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"is_causal={self.is_causal}, has_bias={self.rpb is not None}")


class NeighborhoodAttention1D(_NeighborhoodAttentionNd):
    """1-D neighborhood attention on (batch, L, dim); rpb (num_heads, 2k-1)."""

    _nd = 1


class NeighborhoodAttention2D(_NeighborhoodAttentionNd):
    """2-D neighborhood attention on (batch, H, W, dim); rpb (num_heads, 2k0-1, 2k1-1).

    The attention module of NAT / DiNAT (``levels.i.blocks.j.attn``).
    """

    _nd = 2


class NeighborhoodAttention3D(_NeighborhoodAttentionNd):
    """3-D neighborhood attention on (batch, D, H, W, dim); rpb (num_heads, 2k0-1, 2k1-1, 2k2-1)."""

    _nd = 3
