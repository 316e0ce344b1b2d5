"""Every model builder of :mod:`fastvision.models`, described once.

:data:`MODELS` maps a builder's name to a :class:`ModelEntry`: the builder, its
published evaluation config (timm's ``pretrained_cfg``: input size,
mean/std, crop, interpolation, classes), a small configuration of the same
modules and an example input for it (what the export, AOTInductor and timm
tests build), and the layouts of its published checkpoints whose key names
differ from fastvision's (:mod:`fastvision.models.official`). The timm
registration (:mod:`fastvision.models.timm_models`), ``load_official`` and the
tests read this table; a new builder adds its entry here, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_cfg(**overrides) -> dict:
    """timm's pretrained_cfg of an ImageNet-1k classifier evaluated at 224 (resize to
    224 / crop_pct, center crop 224), with `overrides`."""
    return {"num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "patch_embed.proj", "classifier": "head",
            **overrides}


@dataclass(frozen=True)
class ModelEntry:
    """A model builder and what the library needs to know about it.

    ``pretrained_cfg``: the published model's evaluation config (timm's keys).
    ``small``: keyword arguments that build a small model of the same module
    types (fewer layers, fewer classes) for tests; ``example_input(batch)``: an
    input for it. ``layouts``: names of the :data:`fastvision.models.official.LAYOUTS`
    whose keys must be mapped (empty where the published names are fastvision's).
    """
    builder: Callable[..., torch.nn.Module]
    pretrained_cfg: dict
    small: dict
    example_input: Callable[[int], tuple]
    layouts: tuple[str, ...] = ()
    notes: str = ""

    @property
    def name(self) -> str:
        return self.builder.__name__

    def build_small(self, **kwargs) -> torch.nn.Module:
        return self.builder(**{**self.small, **kwargs})


def _image(size: int = 224) -> Callable[[int], tuple]:
    return lambda batch=1: (torch.randn(batch, 3, size, size),)


def _entries() -> dict[str, ModelEntry]:
    from . import ccnet, deformable_detr, nat, stvit, vim

    entries = []
    # NAT / DiNAT (SHI-Labs classification; timm's defaults at evaluation). Small: one
    # layer per level (DiNAT: a dilated layer at every level but the last), 3x3
    # neighbourhoods, 96 x 96 images (levels of 24, 12, 6 and 3 pixels).
    for name in ("nat_mini", "nat_tiny", "nat_small", "nat_base"):
        entries.append(ModelEntry(getattr(nat, name), imagenet_cfg(),
                                  dict(depths=[1, 1, 1, 1], kernel_size=3, num_classes=10), _image(96)))
    for name in ("dinat_mini", "dinat_tiny", "dinat_small", "dinat_base", "dinat_large"):
        entries.append(ModelEntry(getattr(nat, name), imagenet_cfg(),
                                  dict(depths=[1, 2, 2, 1], kernel_size=3, dilations=[[8], [1, 4], [1, 2], [1]],
                                       num_classes=10), _image(96)))
    # Vim (hustvl/Vim's _cfg: crop 0.9). Small: 2 blocks, 64 x 64 images (16 patches).
    for name in ("vim_tiny", "vim_small", "vim_base"):
        entries.append(ModelEntry(getattr(vim, name), imagenet_cfg(crop_pct=0.9),
                                  dict(depth=2, img_size=64, num_classes=10), _image(64)))
    # STViT (DeiT's evaluation transform: resize 256, crop 224, bicubic). Small: one block
    # per stage, 64 x 64 images (stages of 16, 8, 4, 2 pixels).
    for name in ("stvit_small", "stvit_base", "stvit_large"):
        entries.append(ModelEntry(getattr(stvit, name), imagenet_cfg(first_conv="patch_embed.proj.0"),
                                  dict(depths=[1, 1, 1, 1], num_classes=10), _image(64)))
    # CCNet's head on a ResNet-101's last feature map (2048 channels, output stride 8);
    # the config is CCNet's Cityscapes model (19 classes, 769 x 769 crops, ImageNet mean/std).
    entries.append(ModelEntry(
        ccnet.ccnet_head, dict(num_classes=19, input_size=(3, 769, 769), crop_pct=1.0, interpolation="bilinear",
                               mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="conva.0",
                               classifier="bottleneck.3"),
        dict(in_channels=64, num_classes=5, channels=32), lambda batch=1: (torch.randn(batch, 64, 12, 10),),
        layouts=("ccnet_official", "mmseg_cchead"),
        notes="a head: its input is a backbone's feature map (batch, in_channels, H, W)"))
    # Deformable DETR's encoder (r50 models: d_model 256, 6 layers, 4 levels), on COCO images
    # (DETR's evaluation: shorter side 800, at most 1333; ImageNet mean/std). Small: 2 levels,
    # d_model 32, 4 heads, one layer. Its inputs are flattened levels (flatten_levels), the
    # spatial shapes as Python (H, W) pairs so that torch.export takes them as constants.
    entries.append(ModelEntry(
        deformable_detr.deformable_encoder,
        dict(num_classes=0, input_size=(3, 800, 1333), crop_pct=1.0, interpolation="bilinear",
             mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="layers.0.self_attn.value_proj",
             classifier=""),
        dict(d_model=32, nhead=4, num_encoder_layers=1, dim_feedforward=64, num_feature_levels=2),
        _encoder_input(32, ((8, 10), (4, 5))),
        notes="an encoder: its inputs are a backbone's flattened feature levels (flatten_levels)"))
    return {e.name: e for e in entries}


def _encoder_input(channels: int, levels) -> Callable[[int], tuple]:
    """Deformable DETR encoder inputs: (src, spatial shapes as (H, W) pairs, start index,
    valid ratios, pos, padding mask) for `levels`, from random maps without padding."""
    def make(batch=1):
        from .deformable_detr import flatten_levels
        srcs = [torch.randn(batch, channels, h, w) for h, w in levels]
        masks = [torch.zeros(batch, h, w, dtype=torch.bool) for h, w in levels]
        src, _, starts, ratios, pos, mask = flatten_levels(srcs, masks, [torch.randn_like(s) for s in srcs])
        return src, tuple(levels), starts, ratios, pos, mask
    return make


MODELS: dict[str, ModelEntry] = _entries()


#: Public functions of fastvision.models that build no model.
NOT_BUILDERS = frozenset({"load_official", "flatten_levels"})


def builders() -> list[str]:
    """The public model builders of :mod:`fastvision.models` (the functions named in
    its ``__all__``, but :data:`NOT_BUILDERS`): each must have an entry in :data:`MODELS`."""
    import inspect

    import fastvision.models as models
    return [n for n in models.__all__ if inspect.isfunction(getattr(models, n)) and n not in NOT_BUILDERS]
