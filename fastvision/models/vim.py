"""Vision Mamba (Vim), Zhu et al. 2024, on fastvision's selective scan.

Module and parameter names follow hustvl/Vim ``vim/models_mamba.py`` so that
the official checkpoints (``checkpoint["model"]``) load with ``strict=True``::

    patch_embed.proj.{weight,bias}   cls_token (1, 1, D)   pos_embed (1, N + 1, D)
    layers.{i}.mixer.*  (fastvision.ops.Mamba, bimamba v2)   layers.{i}.norm.weight
    norm_f.weight   head.{weight,bias}

Vim's fused Triton add+norm is reproduced in plain PyTorch: the residual sum
is formed in fp32 and kept in fp32 (``residual_in_fp32``), the normalised
output is cast back to the input's dtype.
"""

from __future__ import annotations

import math
import random
from functools import partial

import torch
import torch.nn as nn

from fastvision.ops.selective_scan_layers import Mamba, RMSNorm, layer_norm_fn, rms_norm_fn

__all__ = ["VisionMamba", "vim_tiny", "vim_small", "vim_base"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Stochastic depth per sample (timm semantics)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Stochastic depth per sample, as ``timm.layers.DropPath`` (no parameters)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self):
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class PatchEmbed(nn.Module):
    """Image to patch embedding: (B, C, H, W) -> (B, num_patches, embed_dim)."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=768,
                 norm_layer=None, flatten=True, device=None, dtype=None):
        super().__init__()
        img_size = _to_2tuple(img_size)
        patch_size = _to_2tuple(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = ((img_size[0] - patch_size[0]) // stride + 1,
                          (img_size[1] - patch_size[1]) // stride + 1)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              device=device, dtype=dtype)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"PatchEmbed: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if (H, W) != self.img_size:
            raise ValueError(f"PatchEmbed: input image size ({H}*{W}) doesn't match model "
                             f"({self.img_size[0]}*{self.img_size[1]})")
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # BCHW -> BNC
        return self.norm(x)


def _add_norm(norm, hidden_states, residual, prenorm, residual_in_fp32):
    """Vim's ``fused_add_norm_fn(...)`` for an RMSNorm or LayerNorm module."""
    fn = rms_norm_fn if isinstance(norm, RMSNorm) else layer_norm_fn
    return fn(hidden_states, norm.weight, norm.bias, residual=residual, eps=norm.eps,
              prenorm=prenorm, residual_in_fp32=residual_in_fp32)


class Block(nn.Module):
    """Add -> Norm -> Mixer; returns ``(mixer output, residual)`` as Vim's Block."""

    def __init__(self, dim, mixer_cls, norm_cls=nn.LayerNorm, fused_add_norm=False,
                 residual_in_fp32=False, drop_path=0.0):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.mixer = mixer_cls(dim)
        self.norm = norm_cls(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if fused_add_norm and not isinstance(self.norm, (nn.LayerNorm, RMSNorm)):
            raise TypeError("Block: fused_add_norm supports only LayerNorm and RMSNorm")

    def forward(self, hidden_states, residual=None, inference_params=None):
        if not self.fused_add_norm:
            residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
            hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
            if self.residual_in_fp32:
                residual = residual.to(torch.float32)
        else:
            x = hidden_states if residual is None else self.drop_path(hidden_states)
            hidden_states, residual = _add_norm(self.norm, x, residual, True, self.residual_in_fp32)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params)
        return hidden_states, residual


def create_block(d_model, d_state=16, ssm_cfg=None, norm_epsilon=1e-5, drop_path=0.0,
                 rms_norm=False, residual_in_fp32=False, fused_add_norm=False, layer_idx=None,
                 device=None, dtype=None, if_bimamba=False, bimamba_type="none",
                 if_divide_out=False, init_layer_scale=None):
    if if_bimamba:
        bimamba_type = "v1"
    factory_kwargs = {"device": device, "dtype": dtype}
    mixer_cls = partial(Mamba, d_state=d_state, layer_idx=layer_idx, bimamba_type=bimamba_type,
                        if_divide_out=if_divide_out, init_layer_scale=init_layer_scale,
                        **(ssm_cfg or {}), **factory_kwargs)
    norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **factory_kwargs)
    block = Block(d_model, mixer_cls, norm_cls=norm_cls, drop_path=drop_path,
                  fused_add_norm=fused_add_norm, residual_in_fp32=residual_in_fp32)
    block.layer_idx = layer_idx
    return block


def _init_weights(module, n_layer, initializer_range=0.02, rescale_prenorm_residual=True,
                  n_residuals_per_layer=1):
    """Mamba's model init (applied to every submodule), as Vim uses it."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        # GPT-2 scheme: residual-branch output projections scaled by 1/sqrt(N layers).
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


def _lecun_normal_(tensor):
    # timm's lecun_normal_: truncated normal on [-2 std, 2 std], variance 1 / fan_in.
    fan_in = nn.init._calculate_fan_in_and_fan_out(tensor)[0]
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def _segm_init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        _lecun_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


class VisionMamba(nn.Module):
    """Vision Mamba with the arguments (and defaults) of Vim's ``VisionMamba``.

    Not supported (raise ``NotImplementedError``): ``if_rope=True`` and
    ``bimamba_type="v1"`` / ``if_bimamba=True``; step-wise decoding.
    ``ft_seq_len`` / ``pt_hw_seq_len`` only configure RoPE and are ignored.
    """

    def __init__(self, img_size=224, patch_size=16, stride=16, depth=24, embed_dim=192,
                 d_state=16, channels=3, num_classes=1000, ssm_cfg=None, drop_rate=0.0,
                 drop_path_rate=0.1, norm_epsilon: float = 1e-5, rms_norm: bool = True,
                 initializer_cfg=None, fused_add_norm=True, residual_in_fp32=True, device=None,
                 dtype=None, ft_seq_len=None, pt_hw_seq_len=14, if_bidirectional=False,
                 final_pool_type="none", if_abs_pos_embed=True, if_rope=False,
                 if_rope_residual=False, flip_img_sequences_ratio=-1.0, if_bimamba=False,
                 bimamba_type="v2", if_cls_token=True, if_divide_out=True, init_layer_scale=None,
                 use_double_cls_token=False, use_middle_cls_token=True, **kwargs):
        if "if_devide_out" in kwargs:  # spelling used by Vim's vim_base builder
            if_divide_out = kwargs.pop("if_devide_out")
        if kwargs:
            raise TypeError(f"VisionMamba: unexpected arguments {sorted(kwargs)}")
        if if_rope:
            raise NotImplementedError("VisionMamba: if_rope=True (rotary embedding) is not implemented")
        if final_pool_type not in ("none", "mean", "max", "all"):
            raise ValueError(f"VisionMamba: unknown final_pool_type {final_pool_type!r}")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.if_bidirectional = if_bidirectional
        self.final_pool_type = final_pool_type
        self.if_abs_pos_embed = if_abs_pos_embed
        self.if_rope = if_rope
        self.if_rope_residual = if_rope_residual
        self.flip_img_sequences_ratio = flip_img_sequences_ratio
        self.if_cls_token = if_cls_token
        self.use_double_cls_token = use_double_cls_token
        self.use_middle_cls_token = use_middle_cls_token
        self.num_tokens = 1 if if_cls_token else 0
        self.num_classes = num_classes
        self.d_model = self.num_features = self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, stride=stride,
                                      in_chans=channels, embed_dim=embed_dim, **factory_kwargs)
        num_patches = self.patch_embed.num_patches

        if if_cls_token:
            if use_double_cls_token:
                self.cls_token_head = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory_kwargs))
                self.cls_token_tail = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory_kwargs))
                self.num_tokens = 2
            else:
                self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory_kwargs))
        if if_abs_pos_embed:
            self.pos_embed = nn.Parameter(
                torch.zeros(1, num_patches + self.num_tokens, embed_dim, **factory_kwargs))
            self.pos_drop = nn.Dropout(p=drop_rate)

        self.head = (nn.Linear(self.num_features, num_classes, **factory_kwargs)
                     if num_classes > 0 else nn.Identity())

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        inter_dpr = [0.0] + dpr  # as Vim: layer i gets dpr[i-1]
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.layers = nn.ModuleList([
            create_block(embed_dim, d_state=d_state, ssm_cfg=ssm_cfg, norm_epsilon=norm_epsilon,
                         rms_norm=rms_norm, residual_in_fp32=residual_in_fp32,
                         fused_add_norm=fused_add_norm, layer_idx=i, if_bimamba=if_bimamba,
                         bimamba_type=bimamba_type, drop_path=inter_dpr[i],
                         if_divide_out=if_divide_out, init_layer_scale=init_layer_scale,
                         **factory_kwargs)
            for i in range(depth)
        ])
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(embed_dim, eps=norm_epsilon,
                                                              **factory_kwargs)

        # Vim's init: patch_embed/head, tokens, then mamba's init over everything.
        self.patch_embed.apply(_segm_init_weights)
        self.head.apply(_segm_init_weights)
        if if_abs_pos_embed:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if if_cls_token:
            if use_double_cls_token:
                nn.init.trunc_normal_(self.cls_token_head, std=0.02)
                nn.init.trunc_normal_(self.cls_token_tail, std=0.02)
            else:
                nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(_init_weights, n_layer=depth, **(initializer_cfg or {})))

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token", "cls_token_head", "cls_token_tail"}

    def _run_layers(self, hidden_states, inference_params):
        residual = None
        if not self.if_bidirectional:
            for layer in self.layers:
                hidden_states, residual = layer(hidden_states, residual,
                                                inference_params=inference_params)
        else:  # two layers per step: one over the sequence, one over its flip
            for i in range(len(self.layers) // 2):
                h_f, r_f = self.layers[2 * i](hidden_states, residual,
                                              inference_params=inference_params)
                h_b, r_b = self.layers[2 * i + 1](
                    hidden_states.flip([1]), None if residual is None else residual.flip([1]),
                    inference_params=inference_params)
                hidden_states = (h_f + h_b.flip([1])) / 2
                residual = (r_f + r_b.flip([1])) / 2
        return hidden_states, residual

    def forward_features(self, x, inference_params=None):
        x = self.patch_embed(x)
        B, M, _ = x.shape
        token_position = None
        if self.if_cls_token:
            if self.use_double_cls_token:
                head = self.cls_token_head.expand(B, -1, -1)
                tail = self.cls_token_tail.expand(B, -1, -1)
                token_position = [0, M + 1]
                x = torch.cat((head, x, tail), dim=1)
            elif self.use_middle_cls_token:
                token_position = M // 2
                cls_token = self.cls_token.expand(B, -1, -1)
                x = torch.cat((x[:, :token_position], cls_token, x[:, token_position:]), dim=1)
            else:
                token_position = 0
                x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)

        if self.if_abs_pos_embed:
            x = self.pos_drop(x + self.pos_embed)

        # Vim's sequence-flip augmentation (off by default); like Vim, it is
        # applied whenever the ratio is positive, in train and eval alike.
        if self.flip_img_sequences_ratio > 0 and (self.flip_img_sequences_ratio - random.random()) > 1e-5:
            x = x.flip([1])

        hidden_states, residual = self._run_layers(x, inference_params)

        if not self.fused_add_norm:
            residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
            hidden_states = self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))
        else:
            hidden_states = _add_norm(self.norm_f, self.drop_path(hidden_states), residual,
                                      False, self.residual_in_fp32)

        if self.if_cls_token:
            if self.use_double_cls_token:
                return (hidden_states[:, token_position[0]] + hidden_states[:, token_position[1]]) / 2
            return hidden_states[:, token_position]
        if self.final_pool_type == "none":
            return hidden_states[:, -1]
        if self.final_pool_type == "mean":
            return hidden_states.mean(dim=1)
        return hidden_states  # "max" / "all"

    def forward(self, x, return_features=False, inference_params=None):
        x = self.forward_features(x, inference_params)
        if return_features:
            return x
        x = self.head(x)
        if self.final_pool_type == "max":
            x = x.max(dim=1)[0]
        return x


# Configuration of Vim's published ImageNet-1k models
# ("..._bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2").
_VIM_CFG = dict(patch_size=16, depth=24, d_state=16, rms_norm=True, residual_in_fp32=True,
                fused_add_norm=True, final_pool_type="mean", if_abs_pos_embed=True, if_rope=False,
                if_rope_residual=False, bimamba_type="v2", if_cls_token=True, if_divide_out=True,
                use_middle_cls_token=True)

_HF_NAMES = {"vim_tiny": "hustvl/Vim-tiny-midclstok", "vim_small": "hustvl/Vim-small-midclstok",
             "vim_base": "hustvl/Vim-base-midclstok"}


def _default_cfg():
    return {"num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj", "classifier": "head"}


def _build(name, embed_dim, pretrained, kwargs):
    if pretrained:
        raise RuntimeError(
            f"{name}(pretrained=True): fastvision does not download weights. Get the official "
            f"checkpoint (e.g. {_HF_NAMES[name]} on the Hugging Face Hub) and load it yourself: "
            f"model = {name}(); model.load_state_dict(torch.load(path, map_location='cpu')['model'])")
    cfg = dict(_VIM_CFG, embed_dim=embed_dim)
    cfg.update(kwargs)
    model = VisionMamba(**cfg)
    model.default_cfg = _default_cfg()
    return model


def vim_tiny(pretrained=False, **kwargs):
    """Vim-Ti: vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2."""
    return _build("vim_tiny", 192, pretrained, kwargs)


def vim_small(pretrained=False, **kwargs):
    """Vim-S: vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2."""
    return _build("vim_small", 384, pretrained, kwargs)


def vim_base(pretrained=False, **kwargs):
    """Vim-B: vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2."""
    return _build("vim_base", 768, pretrained, kwargs)
