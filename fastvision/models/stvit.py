"""STViT (Super Token Vision Transformer, Huang et al., CVPR 2023) on fastvision's super token attention.

Module names and structure follow hhb072/STViT ``models/stvit.py``, so that the
official checkpoints (a dict holding the weights under ``'model'``, with every
block's fixed 3x3 unfold/fold kernels) load with ``strict=True``::

    model = stvit_small()
    model.load_state_dict(torch.load(path, map_location="cpu")["model"], strict=True)

(or :func:`load_checkpoint`). Weights are randomly initialised; fastvision
downloads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvision.models._common import init_linear_and_layernorm
from fastvision.models.vim import DropPath
from fastvision.ops.super_token_layers import StokenAttention

__all__ = ["STViT", "stvit_small", "stvit_base", "stvit_large", "load_checkpoint"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (eps 1e-6)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


class ResDWC(nn.Module):
    """x + depthwise conv(x)."""

    def __init__(self, dim, kernel_size=3):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x):
        return x + self.conv(x)


class Mlp(nn.Module):
    """1x1 conv, GELU, residual depthwise 3x3, 1x1 conv."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act1 = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop)
        self.conv = ResDWC(hidden_features, 3)

    def forward(self, x):
        x = self.drop(self.act1(self.fc1(x)))
        return self.drop(self.fc2(self.conv(x)))


class StokenAttentionLayer(nn.Module):
    """One STViT block: positional depthwise conv, super token attention, conv MLP."""

    def __init__(self, dim, n_iter, stoken_size, num_heads=1, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, layerscale=False, init_values=1.0e-5,
                 backend="auto"):
        super().__init__()
        self.layerscale = layerscale
        self.pos_embed = ResDWC(dim, 3)
        self.norm1 = LayerNorm2d(dim)
        self.attn = StokenAttention(dim, stoken_size=stoken_size, n_iter=n_iter, num_heads=num_heads,
                                    qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
                                    backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp2 = Mlp(dim, int(dim * mlp_ratio), dim, act_layer=act_layer, drop=drop)
        if layerscale:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(1, dim, 1, 1))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(1, dim, 1, 1))

    def forward(self, x):
        x = self.pos_embed(x)
        if self.layerscale:
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
            return x + self.drop_path(self.gamma_2 * self.mlp2(self.norm2(x)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp2(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Four 3x3 convs (two of stride 2) with GELU and BatchNorm: /4 resolution."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        half = out_channels // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, 2, 1), nn.GELU(), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 3, 1, 1), nn.GELU(), nn.BatchNorm2d(half),
            nn.Conv2d(half, out_channels, 3, 2, 1), nn.GELU(), nn.BatchNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1), nn.GELU(), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.proj(x)


class PatchMerging(nn.Module):
    """A 3x3 conv of stride 2 and BatchNorm between stages."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 2, 1), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.proj(x)


class BasicLayer(nn.Module):
    """A stage: `num_layers` blocks, then PatchMerging to the next stage's width (all but the last)."""

    def __init__(self, num_layers, dim, n_iter, stoken_size, num_heads=1, mlp_ratio=4.0, qkv_bias=False,
                 qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0, layerscale=False, init_values=1.0e-5,
                 downsample=False, backend="auto"):
        super().__init__()
        self.blocks = nn.ModuleList([
            StokenAttentionLayer(dim[0], n_iter, stoken_size, num_heads, mlp_ratio, qkv_bias, qk_scale, drop,
                                 attn_drop, drop_path[i] if isinstance(drop_path, list) else drop_path,
                                 layerscale=layerscale, init_values=init_values, backend=backend)
            for i in range(num_layers)])
        self.downsample = PatchMerging(dim[0], dim[1]) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class STViT(nn.Module):
    """STViT: PatchEmbed, four stages of super token attention blocks, a 1x1 projection,
    BatchNorm, swish, global average pool and a linear head.

    Example::

        >>> import torch
        >>> from fastvision.models import STViT
        >>> model = STViT(embed_dim=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2],
        ...               stoken_size=[4, 2, 1, 1], projection=64, num_classes=10)
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, embed_dim: Sequence[int] = (96, 192, 384, 768),
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 n_iter: Sequence[int] = (1, 1, 1, 1), stoken_size: Sequence[int] = (8, 4, 2, 1),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 projection: int | None = None, layerscale: Sequence[bool] = (False, False, False, False),
                 init_values: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = list(embed_dim)
        self.num_features = embed_dim[-1]
        self.mlp_ratio = mlp_ratio
        self.patch_embed = PatchEmbed(in_chans, embed_dim[0])
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth decay
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(BasicLayer(
                depths[i], [embed_dim[i], embed_dim[i + 1] if i < self.num_layers - 1 else None], n_iter[i],
                (stoken_size[i], stoken_size[i]), num_heads[i], mlp_ratio, qkv_bias, qk_scale, drop_rate,
                attn_drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])], layerscale[i], init_values,
                downsample=i < self.num_layers - 1, backend=backend))
        self.proj = nn.Conv2d(self.num_features, projection, 1) if projection else None
        self.norm = nn.BatchNorm2d(projection or self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(projection or self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_and_layernorm)

    def forward_features(self, x):
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        if self.proj is not None:
            x = self.proj(x)
        x = F.silu(self.norm(x))  # STViT's MemoryEfficientSwish
        return self.avgpool(x).flatten(1)

    def forward(self, x):
        return self.head(self.forward_features(x))


_CONFIGS = {
    "stvit_small": dict(embed_dim=[64, 128, 320, 512], depths=[3, 5, 9, 3], num_heads=[1, 2, 5, 8],
                        layerscale=[False] * 4, init_values=1e-5),
    "stvit_base": dict(embed_dim=[96, 192, 384, 512], depths=[4, 6, 14, 6], num_heads=[2, 3, 6, 8],
                       layerscale=[False, False, True, True], init_values=1e-6),
    "stvit_large": dict(embed_dim=[96, 192, 448, 640], depths=[4, 7, 19, 8], num_heads=[2, 3, 7, 10],
                        layerscale=[False, False, True, True], init_values=1e-6),
}


def _build(name, kwargs):
    cfg = dict(n_iter=[1, 1, 1, 1], stoken_size=[8, 4, 1, 1], projection=1024, mlp_ratio=4, qkv_bias=True,
               qk_scale=None, **_CONFIGS[name])
    return STViT(**{**cfg, **kwargs})


def stvit_small(**kwargs) -> STViT:
    """STViT-S: dims 64-128-320-512, depths 3-5-9-3, heads 1-2-5-8, stoken sizes 8-4-1-1, n_iter 1."""
    return _build("stvit_small", kwargs)


def stvit_base(**kwargs) -> STViT:
    """STViT-B: dims 96-192-384-512, depths 4-6-14-6, heads 2-3-6-8, layer scale 1e-6 in stages 3-4."""
    return _build("stvit_base", kwargs)


def stvit_large(**kwargs) -> STViT:
    """STViT-L: dims 96-192-448-640, depths 4-7-19-8, heads 2-3-7-10, layer scale 1e-6 in stages 3-4."""
    return _build("stvit_large", kwargs)


def load_checkpoint(model: STViT, checkpoint: str | dict, strict: bool = True):
    """Loads an official STViT checkpoint (a path or the loaded dict; weights under 'model') into `model`."""
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return model.load_state_dict(checkpoint.get("model", checkpoint), strict=strict)
