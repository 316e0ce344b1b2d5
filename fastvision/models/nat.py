"""NAT (Hassani et al., CVPR 2023) and DiNAT (Hassani & Shi, 2022) on fastvision's neighborhood attention.

Module names, configs and initialisation follow SHI-Labs/Neighborhood-Attention-Transformer
``classification/nat.py`` and ``classification/dinat.py`` (DiNAT is NAT with
per-layer dilations), so that the published ImageNet checkpoints (plain state
dicts) load with ``strict=True``::

    patch_embed.proj.{0,1}.{weight,bias}   patch_embed.norm.{weight,bias}
    levels.{i}.blocks.{j}.norm1 / attn.{qkv,rpb,proj} / norm2 / mlp.{fc1,fc2} [/ gamma1, gamma2]
    levels.{i}.downsample.reduction.weight  levels.{i}.downsample.norm.{weight,bias}  (i < 3)
    norm.{weight,bias}   head.{weight,bias}

Tokens are channels-last (batch, H, W, C) throughout, as in the original.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastvision.models._common import init_linear_and_layernorm
from fastvision.models.vim import DropPath
from fastvision.ops.neighborhood_layers import NeighborhoodAttention2D

__all__ = [
    "NAT", "DiNAT",
    "nat_mini", "nat_tiny", "nat_small", "nat_base",
    "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base", "dinat_large",
]

# Where the original weights live (SHI-Labs' model_urls); fastvision never downloads.
_CHECKPOINT_URLS = {
    "nat_mini": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_mini.pth",
    "nat_tiny": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth",
    "nat_small": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth",
    "nat_base": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_base.pth",
    "dinat_mini": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_mini_in1k_224.pth",
    "dinat_tiny": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_tiny_in1k_224.pth",
    "dinat_small": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_small_in1k_224.pth",
    "dinat_base": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_base_in1k_224.pth",
    "dinat_large": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/"
                   "dinat_large_in22k_in1k_224.pth",
}


class ConvTokenizer(nn.Module):
    """Two stride-2 3x3 convs (in -> dim/2 -> dim), then norm: (B, C, H, W) -> (B, H/4, W/4, dim)."""

    def __init__(self, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        x = self.proj(x).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


class ConvDownsampler(nn.Module):
    """Stride-2 3x3 conv (dim -> 2 dim, no bias), then norm; channels-last in and out."""

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x):
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
                 drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class NATLayer(nn.Module):
    """Pre-norm transformer layer: x + NA(norm1(x)), then x + MLP(norm2(x)) (optional layer scale)."""

    def __init__(self, dim, num_heads, kernel_size=7, dilation=None, mlp_ratio=4.0, qkv_bias=True,
                 qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, layer_scale=None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2D(
            dim, num_heads=num_heads, kernel_size=kernel_size, dilation=dilation,
            rel_pos_bias=True, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
            proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                       drop=drop)
        # As the original: layer scale only for an int/float value (gamma1, gamma2).
        self.layer_scale = layer_scale is not None and type(layer_scale) in (int, float)
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        if not self.layer_scale:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class NATBlock(nn.Module):
    """One level: `depth` NATLayers (dilations[j] for layer j), then an optional ConvDownsampler."""

    def __init__(self, dim, depth, num_heads, kernel_size, dilations=None, downsample=True,
                 mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_layer=nn.LayerNorm, layer_scale=None):
        super().__init__()
        if dilations is not None and len(dilations) != depth:
            raise ValueError(f"dilations must give one value per layer ({depth}); got {dilations!r}")
        self.dim = dim
        self.depth = depth
        self.blocks = nn.ModuleList([
            NATLayer(dim=dim, num_heads=num_heads, kernel_size=kernel_size,
                     dilation=None if dilations is None else dilations[i], mlp_ratio=mlp_ratio,
                     qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                     drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
                     norm_layer=norm_layer, layer_scale=layer_scale)
            for i in range(depth)
        ])
        self.downsample = ConvDownsampler(dim=dim, norm_layer=norm_layer) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class NAT(nn.Module):
    """Neighborhood Attention Transformer: ConvTokenizer, 4 levels of NATBlocks, norm, pool, head.

    ``dilations`` (one list per level, one value per layer) turns it into DiNAT.
    Input (batch, in_chans, H, W); output (batch, num_classes).
    """

    def __init__(self, embed_dim, mlp_ratio, depths, num_heads, drop_path_rate=0.2, in_chans=3,
                 kernel_size=7, dilations=None, num_classes=1000, qkv_bias=True, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, norm_layer=nn.LayerNorm, layer_scale=None):
        super().__init__()
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads ({num_heads}) and depths ({depths}) must have one entry per level")
        if dilations is not None and len(dilations) != len(depths):
            raise ValueError(f"dilations must have one list per level ({len(depths)}); got {dilations!r}")
        self.num_classes = num_classes
        self.num_levels = len(depths)
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (self.num_levels - 1))
        self.mlp_ratio = mlp_ratio

        self.patch_embed = ConvTokenizer(in_chans=in_chans, embed_dim=embed_dim, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # (on CPU explicitly, so that building under torch.device("meta") works)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.levels = nn.ModuleList([
            NATBlock(dim=int(embed_dim * 2 ** i), depth=depths[i], num_heads=num_heads[i],
                     kernel_size=kernel_size, dilations=None if dilations is None else dilations[i],
                     mlp_ratio=self.mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                     attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                     norm_layer=norm_layer, downsample=i < self.num_levels - 1,
                     layer_scale=layer_scale)
            for i in range(self.num_levels)
        ])
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_and_layernorm)

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"rpb"}

    def forward_features(self, x):
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        x = self.norm(x).flatten(1, 2)
        return torch.flatten(self.avgpool(x.transpose(1, 2)), 1)

    def forward(self, x):
        return self.head(self.forward_features(x))


class DiNAT(NAT):
    """Dilated Neighborhood Attention Transformer: NAT with per-layer dilations."""


def _no_pretrained(name):
    raise ValueError(
        f"{name}(pretrained=True): fastvision does not download weights. Fetch SHI-Labs' "
        f"checkpoint ({_CHECKPOINT_URLS[name]}) yourself, then "
        f"model.load_state_dict(torch.load(path, map_location='cpu'), strict=True)")


# DiNAT at 224: dilations per level, one per layer (SHI-Labs classification/dinat.py).
def _dinat_dilations(depth3):
    return [[1, 8, 1], [1, 4, 1, 4], [1, 2] * (depth3 // 2), [1] * 5]


_CONFIGS = {
    "nat_mini": dict(depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3,
                     drop_path_rate=0.2),
    "nat_tiny": dict(depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3,
                     drop_path_rate=0.2),
    "nat_small": dict(depths=[3, 4, 18, 5], num_heads=[3, 6, 12, 24], embed_dim=96, mlp_ratio=2,
                      drop_path_rate=0.3, layer_scale=1e-5),
    "nat_base": dict(depths=[3, 4, 18, 5], num_heads=[4, 8, 16, 32], embed_dim=128, mlp_ratio=2,
                     drop_path_rate=0.5, layer_scale=1e-5),
    "dinat_mini": dict(depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3,
                       drop_path_rate=0.2, dilations=_dinat_dilations(6)),
    "dinat_tiny": dict(depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3,
                       drop_path_rate=0.2, dilations=_dinat_dilations(18)),
    "dinat_small": dict(depths=[3, 4, 18, 5], num_heads=[3, 6, 12, 24], embed_dim=96, mlp_ratio=2,
                        drop_path_rate=0.3, dilations=_dinat_dilations(18)),
    "dinat_base": dict(depths=[3, 4, 18, 5], num_heads=[4, 8, 16, 32], embed_dim=128, mlp_ratio=2,
                       drop_path_rate=0.5, layer_scale=1e-5, dilations=_dinat_dilations(18)),
    "dinat_large": dict(depths=[3, 4, 18, 5], num_heads=[6, 12, 24, 48], embed_dim=192, mlp_ratio=2,
                        drop_path_rate=0.35, dilations=_dinat_dilations(18)),
}


def _build(name, pretrained, kwargs):
    if pretrained:
        _no_pretrained(name)
    cls = DiNAT if name.startswith("dinat") else NAT
    return cls(**{"kernel_size": 7, **_CONFIGS[name], **kwargs})


def nat_mini(pretrained=False, **kwargs):
    """NAT-Mini: depths 3-4-6-5, dim 64, heads 2-4-8-16, mlp_ratio 3, drop_path 0.2."""
    return _build("nat_mini", pretrained, kwargs)


def nat_tiny(pretrained=False, **kwargs):
    """NAT-Tiny: depths 3-4-18-5, dim 64, heads 2-4-8-16, mlp_ratio 3, drop_path 0.2."""
    return _build("nat_tiny", pretrained, kwargs)


def nat_small(pretrained=False, **kwargs):
    """NAT-Small: depths 3-4-18-5, dim 96, heads 3-6-12-24, mlp_ratio 2, drop_path 0.3, layer scale 1e-5."""
    return _build("nat_small", pretrained, kwargs)


def nat_base(pretrained=False, **kwargs):
    """NAT-Base: depths 3-4-18-5, dim 128, heads 4-8-16-32, mlp_ratio 2, drop_path 0.5, layer scale 1e-5."""
    return _build("nat_base", pretrained, kwargs)


def dinat_mini(pretrained=False, **kwargs):
    """DiNAT-Mini: NAT-Mini with dilations [1,8,1], [1,4,1,4], [1,2]*3, [1]*5."""
    return _build("dinat_mini", pretrained, kwargs)


def dinat_tiny(pretrained=False, **kwargs):
    """DiNAT-Tiny: NAT-Tiny with dilations [1,8,1], [1,4,1,4], [1,2]*9, [1]*5."""
    return _build("dinat_tiny", pretrained, kwargs)


def dinat_small(pretrained=False, **kwargs):
    """DiNAT-Small: dim 96, heads 3-6-12-24, mlp_ratio 2, drop_path 0.3 (no layer scale, unlike NAT-Small)."""
    return _build("dinat_small", pretrained, kwargs)


def dinat_base(pretrained=False, **kwargs):
    """DiNAT-Base: dim 128, heads 4-8-16-32, mlp_ratio 2, drop_path 0.5, layer scale 1e-5."""
    return _build("dinat_base", pretrained, kwargs)


def dinat_large(pretrained=False, **kwargs):
    """DiNAT-Large (224): dim 192, heads 6-12-24-48, mlp_ratio 2, drop_path 0.35."""
    return _build("dinat_large", pretrained, kwargs)
