"""Thin reference model builders on top of fastvision.ops."""

from fastvision.models.vim import VisionMamba, vim_base, vim_small, vim_tiny

__all__ = ["VisionMamba", "vim_tiny", "vim_small", "vim_base"]
