"""CCNet's segmentation head (Huang et al., ICCV 2019) on fastvision's criss-cross attention.

:func:`ccnet_head` builds the official RCCA head (speedinghzl/CCNet
``RCCAModule(in_channels, 512, num_classes)``, module names ``conva``, ``cca``,
``convb``, ``bottleneck``) for any backbone's last feature map (batch,
in_channels, H, W): it returns per-class logits at the feature map's
resolution (upsample them to the image as CCNet does).
"""

from __future__ import annotations

from fastvision.ops.criss_cross_layers import RCCAModule

__all__ = ["ccnet_head"]


def ccnet_head(in_channels: int, num_classes: int, recurrence: int = 2, channels: int = 512) -> RCCAModule:
    """The CCNet head: RCCA with `recurrence` passes of criss-cross attention, a
    `channels`-channel bottleneck and a 1x1 classifier to `num_classes`.

    Example::

        >>> import torch
        >>> from fastvision.models import ccnet_head
        >>> head = ccnet_head(64, num_classes=3)
        >>> head(torch.randn(1, 64, 8, 8)).shape
        torch.Size([1, 3, 8, 8])
    """
    return RCCAModule(in_channels, channels, recurrence, num_classes=num_classes)
