"""Thin reference model builders on top of fastvision.ops."""

from fastvision.models.vim import VisionMamba, vim_base, vim_small, vim_tiny

__all__ = ["VisionMamba", "vim_tiny", "vim_small", "vim_base"]

from fastvision.models.nat import (
    NAT, DiNAT, dinat_base, dinat_large, dinat_mini, dinat_small, dinat_tiny,
    nat_base, nat_mini, nat_small, nat_tiny,
)

__all__ += ["NAT", "DiNAT", "nat_mini", "nat_tiny", "nat_small", "nat_base",
            "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base", "dinat_large"]

from fastvision.models.ccnet import ccnet_head

__all__ += ["ccnet_head"]

from fastvision.models.stvit import STViT, stvit_base, stvit_large, stvit_small

__all__ += ["STViT", "stvit_small", "stvit_base", "stvit_large"]

from fastvision.models.deformable_detr import (
    DeformableTransformerEncoder, DeformableTransformerEncoderLayer, deformable_encoder, flatten_levels,
)

__all__ += ["DeformableTransformerEncoder", "DeformableTransformerEncoderLayer", "deformable_encoder",
            "flatten_levels"]
