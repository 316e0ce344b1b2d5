"""DCNv3 and DCNv4 layers on the fused :func:`fastvision.ops.dcn_aggregate`.

``DCNv3`` is InternImage's ``ops_dcnv3/modules/dcnv3.py`` ``DCNv3`` (the CUDA
module; its ``DCNv3_pytorch`` twin has the same parameters and forward), with
its constructor arguments and parameter names, so InternImage checkpoints
load with ``strict=True``::

    dw_conv.0.{weight,bias}          depthwise conv (channels, 1, k, k)
    dw_conv.1.1.{weight,bias}        LayerNorm (norm_layer='LN'; after a permute)
    dw_conv.1.0.{weight,bias,running_*}  BatchNorm2d (norm_layer='BN')
    offset.{weight,bias}             Linear(channels, group * K * 2)
    mask.{weight,bias}               Linear(channels, group * K)
    input_proj, output_proj          Linear(channels, channels)
    center_feature_scale_proj_{weight,bias}  (group, channels), (group,)  if center_feature_scale

``DCNv4`` is OpenGVLab/DCNv4's ``DCNv4_op/DCNv4/modules/dcnv4.py`` ``DCNv4``::

    offset_mask_dw.{weight,bias}     depthwise conv, if dw_kernel_size is given
    offset_mask.{weight,bias}        Linear(channels, ceil(group * K * 3 / 8) * 8): the packed layout
    value_proj, output_proj          Linear(channels, channels) unless without_pointwise
                                     (output_proj without bias when output_bias=False)
    center_feature_scale_proj_{weight,bias}  if center_feature_scale

Both take channels-last input: DCNv3 (N, H, W, C), DCNv4 (N, L, C) with
``shape=(H, W)`` (default: a square L). The softmax over each group's K
points of DCNv3's mask runs inside the fused op (``mask_softmax=True``);
DCNv4 uses its weights as they are. Any kernel size and any channels per
group (DCNv4's own op: 3x3 only, group_channels a multiple of 16).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import as_int
from .dcn import dcn_aggregate, split_offset_mask

__all__ = ["DCNv3", "DCNv4"]


class _Permute(nn.Module):
    """InternImage's to_channels_first / to_channels_last (no parameters)."""

    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


def _norm(channels: int, norm_layer: str) -> nn.Sequential:
    """InternImage's build_norm_layer(channels, norm_layer, 'channels_first', 'channels_last', eps=1e-6)."""
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels), _Permute(0, 2, 3, 1))
    if norm_layer == "LN":
        return nn.Sequential(_Permute(0, 2, 3, 1), nn.LayerNorm(channels, eps=1e-6))
    raise NotImplementedError(f"build_norm_layer does not support {norm_layer}")


def _act(act_layer: str) -> nn.Module:
    acts = {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True), "GELU": nn.GELU}
    if act_layer not in acts:
        raise NotImplementedError(f"build_act_layer does not support {act_layer}")
    return acts[act_layer]()


def _check_channels(channels, group) -> tuple[int, int]:
    channels, group = as_int(channels, "channels", minimum=1), as_int(group, "group", minimum=1)
    if channels % group != 0:
        raise ValueError(f"channels must be divisible by group, but got {channels} and {group}")
    return channels, group


def _add_center_feature_scale(owner: nn.Module, channels: int, group: int) -> None:
    """The parameters of the learnable blend of the aggregate with the projected input."""
    owner.center_feature_scale_proj_weight = nn.Parameter(torch.zeros((group, channels)))
    owner.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))


def _center_feature_blend(owner: nn.Module, query, x, x_proj):
    """x * (1 - s) + x_proj * s, s = sigmoid(linear(query)) per group (center_feature_scale=True)."""
    scale = F.linear(query, owner.center_feature_scale_proj_weight, owner.center_feature_scale_proj_bias).sigmoid()
    scale = scale[..., None].repeat(1, 1, 1, 1, owner.channels // owner.group).flatten(-2)
    return x * (1 - scale) + x_proj * scale


class DCNv3(nn.Module):
    """InternImage's DCNv3 module; input and output (N, H, W, channels).

    Example::

        >>> import torch
        >>> from fastvision.ops import DCNv3
        >>> DCNv3(32, group=4)(torch.randn(2, 7, 9, 32)).shape
        torch.Size([2, 7, 9, 32])
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, dw_kernel_size: int | None = None, stride: int = 1,
                 pad: int = 1, dilation: int = 1, group: int = 4, offset_scale: float = 1.0, act_layer: str = "GELU",
                 norm_layer: str = "LN", center_feature_scale: bool = False, remove_center: bool | int = False, *,
                 backend: str = "auto"):
        super().__init__()
        channels, group = _check_channels(channels, group)
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.offset_scale = offset_scale
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.dilation = dilation
        self.pad = pad
        self.group = group
        self.group_channels = channels // group
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.backend = backend
        if self.remove_center and kernel_size % 2 == 0:
            raise ValueError("remove_center is only compatible with odd kernel size.")
        K = kernel_size * kernel_size - self.remove_center
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=dw_kernel_size, stride=1, padding=(dw_kernel_size - 1) // 2,
                      groups=channels),
            _norm(channels, norm_layer), _act(act_layer))
        self.offset = nn.Linear(channels, group * K * 2)
        self.mask = nn.Linear(channels, group * K)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self._reset_parameters()
        if center_feature_scale:
            _add_center_feature_scale(self, channels, group)

    def _reset_parameters(self):
        for m in (self.offset, self.mask):
            nn.init.constant_(m.weight, 0.0)
            nn.init.constant_(m.bias, 0.0)
        for m in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(m.weight)
            nn.init.constant_(m.bias, 0.0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or input.shape[-1] != self.channels:
            raise ValueError(f"DCNv3: input must be a (N, H, W, {self.channels}) tensor; got {tuple(input.shape)}")
        x = self.input_proj(input)
        x_proj = x
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(x1).to(x.dtype)
        mask = self.mask(x1).to(x.dtype)  # logits: the op takes the softmax over each group's K points
        x = dcn_aggregate(x, offset, mask, self.kernel_size, self.stride, self.pad, self.dilation, self.group,
                          self.offset_scale, bool(self.remove_center), True, backend=self.backend)
        if self.center_feature_scale:
            x = _center_feature_blend(self, x1, x, x_proj)
        return self.output_proj(x)


class DCNv4(nn.Module):
    """OpenGVLab's DCNv4 module; input and output (N, L, channels), L = H * W.

    Example::

        >>> import torch
        >>> from fastvision.ops import DCNv4
        >>> DCNv4(32, group=2)(torch.randn(2, 6 * 7, 32), shape=(6, 7)).shape
        torch.Size([2, 42, 32])
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, stride: int = 1, pad: int = 1, dilation: int = 1,
                 group: int = 4, offset_scale: float = 1.0, dw_kernel_size: int | None = None,
                 center_feature_scale: bool = False, remove_center: bool | int = False, output_bias: bool = True,
                 without_pointwise: bool = False, *, backend: str = "auto", **kwargs: object):
        super().__init__()
        channels, group = _check_channels(channels, group)
        self.offset_scale = offset_scale
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.pad = pad
        self.group = group
        self.group_channels = channels // group
        self.dw_kernel_size = dw_kernel_size
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.without_pointwise = without_pointwise
        self.backend = backend
        self.K = group * (kernel_size * kernel_size - self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(channels, channels, dw_kernel_size, stride=1,
                                            padding=(dw_kernel_size - 1) // 2, groups=channels)
        self.offset_mask = nn.Linear(channels, int(math.ceil((self.K * 3) / 8) * 8))
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        self._reset_parameters()
        if center_feature_scale:
            _add_center_feature_scale(self, channels, group)

    def _reset_parameters(self):
        nn.init.constant_(self.offset_mask.weight, 0.0)
        nn.init.constant_(self.offset_mask.bias, 0.0)
        if not self.without_pointwise:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.constant_(self.value_proj.bias, 0.0)
            nn.init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, input: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        if input.dim() != 3 or input.shape[-1] != self.channels:
            raise ValueError(f"DCNv4: input must be a (N, L, {self.channels}) tensor; got {tuple(input.shape)}")
        N, L, C = input.shape
        H, W = shape if shape is not None else (int(L ** 0.5), int(L ** 0.5))
        if H * W != L:
            raise ValueError(f"DCNv4: shape (H, W) = ({H}, {W}) must have H * W = L = {L}")
        x = input
        if not self.without_pointwise:
            x = self.value_proj(x)
        x = x.reshape(N, H, W, -1)
        if self.dw_kernel_size is not None:
            om_input = self.offset_mask_dw(input.view(N, H, W, C).permute(0, 3, 1, 2))
            om_input = om_input.permute(0, 2, 3, 1).reshape(N, L, C)
        else:
            om_input = input
        offset_mask = self.offset_mask(om_input).reshape(N, H, W, -1).to(x.dtype)
        x_proj = x
        offset, mask = split_offset_mask(offset_mask, self.kernel_size, self.group, self.remove_center)
        x = dcn_aggregate(x, offset, mask, self.kernel_size, self.stride, self.pad, self.dilation, self.group,
                          self.offset_scale, bool(self.remove_center), False, backend=self.backend)
        if self.center_feature_scale:  # DCNv4 computes the scale from the aggregate itself
            x = _center_feature_blend(self, x, x, x_proj)
        x = x.reshape(N, L, -1)
        if not self.without_pointwise:
            x = self.output_proj(x)
        return x
