"""Super token attention layer: ``StokenAttention`` (STViT, hhb072/STViT ``models/stvit.py``).

The module of STViT on fastvision's fused :func:`~fastvision.ops.super_token_sampling`
and :func:`~fastvision.ops.super_token_upsample`, with STViT's constructor
(arguments in STViT's order) and STViT's module names, so that the official
checkpoints load with ``strict=True``::

    unfold.weights (9, 1, 3, 3)  fold.weights (9, 1, 3, 3)     STViT's fixed 3x3 identity kernels
    stoken_refine.qkv.weight (3 * dim, dim, 1, 1)  [.bias]     refine_attention=True
    stoken_refine.proj.weight (dim, dim, 1, 1)  .bias
    stoken_refine.0 / .1 / .2 (1x1, depthwise 5x5, 1x1 convs)  refine_attention=False

The fused ops do not need the unfold/fold kernels: they are kept as buffers
(STViT stores them as frozen parameters) only so that checkpoints load.
Stoken size (1, 1) is plain global attention over the pixels, as in STViT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import as_bool, as_float, as_int, per_axis
from .super_token import MAX_ITER, super_token_sampling, super_token_upsample

__all__ = ["StokenAttention"]


class PointwiseConv(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` (the same parameters and state_dict)
    computed as a linear map of the positions' rows: one matrix product (PyTorch runs
    a 1x1 conv of a small map through its im2col path, several times slower), its
    output channels-last, that is the rows (B, H, W, out_channels) as they are."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """STViT's multi-head self attention over the positions of a (B, C, H, W) map.

    ``qkv`` (a 1x1 conv: STViT's parameters) lays its output channels out per
    head, interleaved: head i owns channels [i * 3 * hd, (i + 1) * 3 * hd), split
    into its q, k, v (STViT's ``reshape(B, heads, 3 * hd, N).chunk(3, dim=2)``).
    """

    def __init__(self, dim: int, window_size=None, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5  # STViT's `or`: 0 or None means the default
        self.qkv = PointwiseConv(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = PointwiseConv(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        heads, N = self.num_heads, H * W
        # The 1x1 convs give channels-last maps (PointwiseConv): their memory is the
        # positions' rows, so q, k, v have contiguous rows, which SDPA's fused CPU kernel
        # takes (channel-major q, k, v went through SDPA's math path). The modules are
        # called: their hooks fire and replacements (any 1x1 conv) work.
        qkv = self.qkv(x).permute(0, 2, 3, 1).reshape(B, N, 3 * C)
        q, k, v = qkv.view(B, N, heads, 3, C // heads).permute(3, 0, 2, 1, 4).unbind(0)  # (B, heads, N, hd)
        # softmax over the keys of q . k * scale, as STViT's (k^T q).softmax(dim=-2), through SDPA.
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)  # channels-last (B, C, H, W)
        return self.proj_drop(self.proj(out).contiguous())


class _FixedKernels(nn.Module):
    """STViT's Unfold / Fold: only their fixed 3x3 identity kernels, kept for checkpoints."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        self.register_buffer("weights", torch.eye(kernel_size ** 2).reshape(kernel_size ** 2, 1, kernel_size,
                                                                             kernel_size))


class StokenAttention(nn.Module):
    """Super token attention (STViT): sample super tokens, refine them, map them back.

    Args:
        dim: channels C of the input (B, C, H, W).
        stoken_size: (h, w) or one int; (1, 1) is plain global attention over the pixels.
        n_iter: association rounds of the sampling (>= 1).
        refine: refine the super tokens (False: sample and upsample only).
        refine_attention: refine with multi-head self attention (True) or with STViT's
            conv stack (1x1, depthwise 5x5, 1x1).
        num_heads, qkv_bias, qk_scale, attn_drop, proj_drop: the refining attention's.
        backend: the ops' backend ('auto', 'cpu', 'triton', 'reference').

    Example::

        >>> import torch
        >>> from fastvision.ops import StokenAttention
        >>> layer = StokenAttention(32, stoken_size=(4, 4), num_heads=2)
        >>> layer(torch.randn(2, 32, 14, 14)).shape
        torch.Size([2, 32, 14, 14])
    """

    def __init__(self, dim: int, stoken_size: int | Sequence[int], n_iter: int = 1, refine: bool = True,
                 refine_attention: bool = True, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, *,
                 backend: str = "auto"):
        super().__init__()
        cls = type(self).__name__
        dim = as_int(dim, f"{cls}: dim", 1)
        self.stoken_size = per_axis(stoken_size, 2, "stoken_size", minimum=1, context=f"for {cls}")
        self.n_iter = as_int(n_iter, f"{cls}: n_iter", 1)
        if self.n_iter > MAX_ITER:
            raise ValueError(f"{cls}: n_iter must be <= {MAX_ITER}; got {self.n_iter}")
        self.refine = as_bool(refine, f"{cls}: refine")
        self.refine_attention = as_bool(refine_attention, f"{cls}: refine_attention")
        num_heads = as_int(num_heads, f"{cls}: num_heads", 1)
        if self.refine and self.refine_attention and dim % num_heads:
            raise ValueError(f"{cls}: dim ({dim}) must be divisible by num_heads ({num_heads})")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= as_float(p, f"{cls}: {name}") < 1.0:
                raise ValueError(f"{cls}: {name} must be in [0, 1); got {p!r}")
        self.backend = backend
        self.scale = dim ** -0.5  # the association's logit scale (the ops take it from C)
        self.unfold = _FixedKernels(3)
        self.fold = _FixedKernels(3)
        if self.refine:
            if self.refine_attention:
                self.stoken_refine = Attention(dim, num_heads=num_heads, qkv_bias=as_bool(qkv_bias, "qkv_bias"),
                                               qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop)
            else:
                self.stoken_refine = nn.Sequential(nn.Conv2d(dim, dim, 1, 1, 0),
                                                   nn.Conv2d(dim, dim, 5, 1, 2, groups=dim),
                                                   nn.Conv2d(dim, dim, 1, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stoken_size == (1, 1):  # STViT's direct_forward: every pixel is a token
            return self.stoken_refine(x) if self.refine else x
        stokens, affinity = super_token_sampling(x, self.stoken_size, self.n_iter, backend=self.backend)
        if self.refine:
            stokens = self.stoken_refine(stokens)
        return super_token_upsample(stokens, affinity, self.stoken_size, x.shape[2:], backend=self.backend)
