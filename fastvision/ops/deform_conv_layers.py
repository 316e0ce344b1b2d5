"""Deformable convolution layer: ``DeformConv2d``, drop-in for ``torchvision.ops.DeformConv2d``.

Same arguments, parameter names (``weight`` (out_channels, in_channels //
groups, kh, kw), ``bias`` (out_channels,) or None) and initialisation
(kaiming_uniform_(a=sqrt(5)) for the weight, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
for the bias) as torchvision's, so torchvision state dicts load with
``strict=True``; ``forward(input, offset, mask=None)`` runs
:func:`fastvision.ops.deform_conv2d`. As torchvision's, the layer does not
predict its offsets: they (and the DCNv2 mask) come from the caller.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import init

from .._checks import as_bool, as_int, per_axis
from .deform_conv import deform_conv2d

__all__ = ["DeformConv2d"]


class DeformConv2d(nn.Module):
    """Deformable convolution (DCNv1, or DCNv2 with a mask), torchvision's ``DeformConv2d``.

    Args:
        in_channels, out_channels: channels of the input and the output.
        kernel_size, stride, padding, dilation: an int or a pair (h, w).
        groups: weight groups (in_channels and out_channels divisible by it).
        bias: whether the layer has a learnable bias.

    Example::

        >>> import torch
        >>> from fastvision.ops import DeformConv2d
        >>> layer = DeformConv2d(8, 16, 3, padding=1)
        >>> x, offset = torch.randn(2, 8, 9, 9), torch.zeros(2, 18, 9, 9)
        >>> layer(x, offset).shape
        torch.Size([2, 16, 9, 9])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        in_channels = as_int(in_channels, "DeformConv2d: in_channels", 1)
        out_channels = as_int(out_channels, "DeformConv2d: out_channels", 1)
        groups = as_int(groups, "DeformConv2d: groups", 1)
        if in_channels % groups != 0:
            raise ValueError(f"DeformConv2d: in_channels must be divisible by groups; got {in_channels} and {groups}")
        if out_channels % groups != 0:
            raise ValueError(f"DeformConv2d: out_channels must be divisible by groups; got {out_channels} and "
                             f"{groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = per_axis(kernel_size, 2, "kernel_size", minimum=1, context="for DeformConv2d")
        self.stride = per_axis(stride, 2, "stride", minimum=1, context="for DeformConv2d")
        self.padding = per_axis(padding, 2, "padding", minimum=0, context="for DeformConv2d")
        self.dilation = per_axis(dilation, 2, "dilation", minimum=1, context="for DeformConv2d")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if as_bool(bias, "DeformConv2d: bias"):
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s
