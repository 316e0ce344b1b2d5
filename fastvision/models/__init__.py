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
from fastvision.models.official import load_official

__all__ += ["load_official"]

# With timm installed, every builder is also timm.create_model("fastvision_<name>").
import importlib.util as _util  # noqa: E402

if _util.find_spec("timm") is not None:
    try:
        from fastvision.models import timm_models as _timm_models

        _timm_models.register()
    except Exception as _err:  # e.g. a torchvision that does not match torch: timm does not import
        import warnings

        warnings.warn(f"fastvision: timm is installed but failed to import ({_err}); "
                      f"the model builders are not registered with timm", stacklevel=2)
