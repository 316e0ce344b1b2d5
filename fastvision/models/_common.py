"""Pieces the model builders share."""

from __future__ import annotations

import torch.nn as nn
from torch.nn.init import trunc_normal_


def init_linear_and_layernorm(m: nn.Module) -> None:
    """The timm-style init NAT/DiNAT and STViT use (``model.apply`` it): every
    Linear trunc_normal(std=.02) with zero bias, LayerNorms to (1, 0); other
    modules keep their own initialisation."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)
