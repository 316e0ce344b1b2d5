"""Criss-cross attention layers (CCNet): ``CrissCrossAttention`` and ``RCCAModule``.

``CrissCrossAttention(in_channels)`` is mmcv's ``mmcv.ops.CrissCrossAttention``
(the module mmseg's ``CCHead`` uses) on the fused
:func:`fastvision.ops.criss_cross_attention`, with mmcv's parameter names so
that mmcv / mmseg checkpoints load with ``strict=True``::

    query_conv.{weight,bias} (in_channels // 8, in_channels, 1, 1)
    key_conv.{weight,bias}   (in_channels // 8, in_channels, 1, 1)
    value_conv.{weight,bias} (in_channels, in_channels, 1, 1)
    gamma.scale (1,)         mmcv's Scale(0.): the learnable output scale, 0 at first

and ``y = gamma * criss_cross_attention(q, k, v) + x``. A state dict of the
official CCNet code (speedinghzl/CCNet), whose gamma is a bare parameter
``gamma``, loads too (renamed to ``gamma.scale`` on load).

``RCCAModule`` is CCNet's recurrent criss-cross head (speedinghzl/CCNet
``networks/ccnet.py``), with its module names: ``conva`` (3x3 conv + BN +
activation), ``cca`` applied ``recurrence`` times (the same weights each
time), ``convb`` (3x3 conv + BN + activation), then ``bottleneck`` on the
concatenation of the input and convb's output (3x3 conv + BN + activation,
Dropout2d(0.1), and the 1x1 classifier when ``num_classes`` is given). The
official code uses InPlaceABNSync (BN fused with leaky ReLU, slope 0.01):
here :class:`BNLeakyReLU`, a BatchNorm2d whose parameter names
(``weight, bias, running_mean, running_var``) are InPlaceABN's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import as_int
from .criss_cross import criss_cross_attention

__all__ = ["CrissCrossAttention", "RCCAModule"]


class Scale(nn.Module):
    """A learnable scalar multiplier, stored as ``scale`` (mmcv.cnn.Scale)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(scale)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class CrissCrossAttention(nn.Module):
    """Criss-cross attention (CCNet), drop-in for ``mmcv.ops.CrissCrossAttention``.

    ``y = gamma * criss_cross_attention(query_conv(x), key_conv(x), value_conv(x)) + x``
    with 1x1 convolutions to ``in_channels // 8`` (query, key) and
    ``in_channels`` (value) channels and ``gamma`` a learnable scale that
    starts at 0 (so a new layer is the identity).

    Args:
        in_channels: channels of the input feature map (batch, in_channels, H, W).

    Example::

        >>> import torch
        >>> from fastvision.ops import CrissCrossAttention
        >>> layer = CrissCrossAttention(32)
        >>> layer(torch.randn(2, 32, 9, 11)).shape
        torch.Size([2, 32, 9, 11])
    """

    def __init__(self, in_channels: int):
        super().__init__()
        in_channels = as_int(in_channels, "CrissCrossAttention: in_channels", 1)
        self.query_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"CrissCrossAttention: x must be a (batch, {self.in_channels}, H, W) tensor; "
                             f"got {shape}")
        out = criss_cross_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x))
        return self.gamma(out) + x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Official CCNet checkpoints store gamma as a bare parameter.
        if prefix + "gamma" in state_dict and prefix + "gamma.scale" not in state_dict:
            state_dict[prefix + "gamma.scale"] = state_dict.pop(prefix + "gamma").reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}"


class BNLeakyReLU(nn.BatchNorm2d):
    """BatchNorm2d then leaky ReLU (slope 0.01): InPlaceABN's default, with its parameter names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(super().forward(x), 0.01)


class RCCAModule(nn.Module):
    """CCNet's recurrent criss-cross attention head (RCCA), with the official module names.

    ``conva`` (3x3 conv to ``in_channels // 4`` + BN + leaky ReLU) -> ``cca``
    ``recurrence`` times (shared weights) -> ``convb`` (3x3 conv + BN + leaky
    ReLU) -> ``bottleneck`` on ``cat([x, convb], 1)``: 3x3 conv to
    ``out_channels`` + BN + leaky ReLU, Dropout2d(0.1), and a 1x1 classifier
    to ``num_classes`` when given.

    Args:
        in_channels: channels of the input (a backbone's last feature map).
        out_channels: channels after the bottleneck conv (512 in CCNet).
        recurrence: how many times the criss-cross attention runs (2 in CCNet:
            every pixel then sees every other).
        num_classes: when given, the bottleneck ends with the 1x1 classifier
            (as CCNet's head); otherwise the module returns features.

    Example::

        >>> import torch
        >>> from fastvision.ops import RCCAModule
        >>> head = RCCAModule(64, 32, recurrence=2, num_classes=5)
        >>> head(torch.randn(2, 64, 10, 12)).shape
        torch.Size([2, 5, 10, 12])
    """

    def __init__(self, in_channels: int, out_channels: int, recurrence: int = 2, num_classes: int | None = None):
        super().__init__()
        in_channels = as_int(in_channels, "RCCAModule: in_channels", 4)
        out_channels = as_int(out_channels, "RCCAModule: out_channels", 1)
        self.recurrence = as_int(recurrence, "RCCAModule: recurrence", 0)
        inter = in_channels // 4
        self.conva = nn.Sequential(nn.Conv2d(in_channels, inter, 3, padding=1, bias=False), BNLeakyReLU(inter))
        self.cca = CrissCrossAttention(inter)
        self.convb = nn.Sequential(nn.Conv2d(inter, inter, 3, padding=1, bias=False), BNLeakyReLU(inter))
        layers = [nn.Conv2d(in_channels + inter, out_channels, 3, padding=1, bias=False),
                  BNLeakyReLU(out_channels), nn.Dropout2d(0.1)]
        if num_classes is not None:
            layers.append(nn.Conv2d(out_channels, as_int(num_classes, "RCCAModule: num_classes", 1), 1))
        self.bottleneck = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conva(x)
        for _ in range(self.recurrence):
            out = self.cca(out)
        out = self.convb(out)
        return self.bottleneck(torch.cat([x, out], 1))
