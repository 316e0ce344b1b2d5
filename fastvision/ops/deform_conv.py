"""Deformable convolution (DCNv1 / DCNv2), as torchvision's ``deform_conv2d``.

Public API: :func:`deform_conv2d` (input, offset, weight, bias, stride,
padding, dilation, mask) -> out, NCHW, torchvision's signature and numbers;
see :mod:`fastvision.reference.deform_conv` for the formulas. The layer
``DeformConv2d`` is in ``deform_conv_layers.py``.

This module checks arguments and describes the ``fastvision::deform_conv2d_fwd``
/ ``fastvision::deform_conv2d_bwd`` ops (schemas in csrc/registration.cpp) to
the shared machinery in ``_library.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, OpArgs, acc_dtype, check_same_device, check_tensor, per_axis
from ..reference.deform_conv import deform_conv2d_ref
from ._library import FusedOp, Kernel

__all__ = ["deform_conv2d"]

MAX_SIDE = 2 ** 30  # H, W, stride, padding, dilation limit of every kernel (as csrc/deform_conv/checks.h)
MAX_KERNEL = 1024   # kh, kw limit


def _out_size(H, W, kh, kw, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    return (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1


def _groups(Cin, weight_shape, offset_channels):
    """(weight groups, offset groups, or None where the shapes leave them undefined."""
    Cout, Cg, kh, kw = weight_shape
    K2 = 2 * kh * kw
    groups = Cin // Cg if Cg >= 1 and Cin % Cg == 0 else None
    G = offset_channels // K2 if K2 >= 2 and offset_channels >= K2 and offset_channels % K2 == 0 else None
    return groups, G


# --------------------------------------------------------------------------
# Argument checks


def _check_args(input, offset, weight, bias, stride, padding, dilation, mask):
    check_tensor("input", input, dtypes=FLOAT_DTYPES)
    if input.dim() != 4:
        raise ValueError(f"deform_conv2d: input must be a 4-D tensor (batch, in_channels, H, W) (NCHW, as "
                         f"torchvision); got shape {tuple(input.shape)}")
    check_tensor("offset", offset, ndim=4, dtypes=(input.dtype,),
                 shape_doc="(batch, 2 * offset_groups * kh * kw, Ho, Wo)")
    check_tensor("weight", weight, ndim=4, dtypes=(input.dtype,), shape_doc="(out_channels, in_channels / groups, kh, kw)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(input.dtype,), shape_doc="(out_channels,)")
    if mask is not None:
        check_tensor("mask", mask, ndim=4, dtypes=(input.dtype,), shape_doc="(batch, offset_groups * kh * kw, Ho, Wo)")
    check_same_device(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    stride = per_axis(stride, 2, "stride", minimum=1, context="for deform_conv2d")
    padding = per_axis(padding, 2, "padding", minimum=0, context="for deform_conv2d")
    dilation = per_axis(dilation, 2, "dilation", minimum=1, context="for deform_conv2d")
    B, Cin, H, W = input.shape
    Cout, Cg, kh, kw = weight.shape
    if max(H, W, *stride, *padding, *dilation) > MAX_SIDE or max(kh, kw) > MAX_KERNEL:
        raise ValueError(f"deform_conv2d: H, W, stride, padding and dilation must be at most 2^30 and the "
                         f"kernel at most {MAX_KERNEL}; got input {tuple(input.shape)}, weight {tuple(weight.shape)}")
    groups, G = _groups(Cin, weight.shape, offset.shape[1])
    if Cin < 1 or groups is None or kh < 1 or kw < 1:
        raise ValueError(f"weight (out_channels, in_channels / groups, kh, kw) must have kh, kw >= 1 and a "
                         f"shape[1] >= 1 dividing input's {Cin} channels; got weight {tuple(weight.shape)}")
    if Cout % groups:
        raise ValueError(f"weight's out_channels {Cout} must be divisible by groups = {groups} "
                         f"(in_channels / weight.shape[1]); got weight {tuple(weight.shape)}")
    if G is None:
        raise ValueError(f"offset.shape[1] must be a positive multiple of 2 * kh * kw = {2 * kh * kw}; got offset "
                         f"{tuple(offset.shape)}")
    if Cin % G:
        raise ValueError(f"input's {Cin} channels must be divisible by offset_groups = {G} "
                         f"(offset.shape[1] / (2 * kh * kw))")
    if H + 2 * padding[0] < dilation[0] * (kh - 1) + 1 or W + 2 * padding[1] < dilation[1] * (kw - 1) + 1:
        raise ValueError(f"deform_conv2d: the output would be empty: input {tuple(input.shape)} with padding "
                         f"{padding} is smaller than the dilated {kh} x {kw} kernel (dilation {dilation})")
    Ho, Wo = _out_size(H, W, kh, kw, stride, padding, dilation)
    if tuple(offset.shape) != (B, 2 * G * kh * kw, Ho, Wo):
        raise ValueError(f"offset must have shape (batch, 2 * offset_groups * kh * kw, Ho, Wo) = "
                         f"{(B, 2 * G * kh * kw, Ho, Wo)}; got {tuple(offset.shape)}")
    if mask is not None and tuple(mask.shape) != (B, G * kh * kw, Ho, Wo):
        raise ValueError(f"mask must have shape (batch, offset_groups * kh * kw, Ho, Wo) = "
                         f"{(B, G * kh * kw, Ho, Wo)}; got {tuple(mask.shape)}")
    if bias is not None and bias.shape[0] != Cout:
        raise ValueError(f"bias must have shape (out_channels,) = ({Cout},); got {tuple(bias.shape)}")
    return stride, padding, dilation


def _check_dc(op: str, input, offset, weight, mask, stride, padding, dilation) -> OpArgs:
    """The arguments of a direct deform_conv2d_fwd / _bwd call (the C++ kernels check the same)."""
    a = OpArgs(op)
    a.tensor("input", input, ("batch", "Cin", "H", "W"), FLOAT_DTYPES)
    a.tensor("weight", weight, ("Cout", "Cg", "kh", "kw"), (input.dtype,))
    s = a.sizes
    st = a.ints("stride", stride, 2, 1, MAX_SIDE)
    pa = a.ints("padding", padding, 2, 0, MAX_SIDE)
    di = a.ints("dilation", dilation, 2, 1, MAX_SIDE)
    a.require(s["H"] <= MAX_SIDE and s["W"] <= MAX_SIDE and s["H"] * s["W"] < 2 ** 31,
              f"input's H * W must be below 2^31 (H, W <= 2^30); got shape {tuple(input.shape)}")
    a.require(s["Cin"] >= 1, f"input must have at least one channel; got shape {tuple(input.shape)}")
    groups, G = _groups(s["Cin"], weight.shape, offset.shape[1] if isinstance(offset, torch.Tensor) and
                        offset.dim() == 4 else 0)
    a.require(groups is not None and 1 <= s["kh"] <= MAX_KERNEL and 1 <= s["kw"] <= MAX_KERNEL,
              f"weight (out_channels, in_channels / groups, kh, kw) must have kh, kw in [1, {MAX_KERNEL}] and a "
              f"shape[1] >= 1 dividing input's channels {s['Cin']}; got shape {tuple(weight.shape)}")
    a.require(s["Cout"] % groups == 0, f"weight's out_channels {s['Cout']} must be divisible by groups = {groups}")
    kh, kw = s["kh"], s["kw"]
    a.require(s["H"] + 2 * pa[0] >= di[0] * (kh - 1) + 1 and s["W"] + 2 * pa[1] >= di[1] * (kw - 1) + 1,
              "the output would be empty: input smaller than the dilated kernel")
    Ho, Wo = _out_size(s["H"], s["W"], kh, kw, st, pa, di)
    a.require(Ho * Wo < 2 ** 31, f"the output's Ho * Wo must be below 2^31; got {Ho} x {Wo}")
    a.require(G is not None, f"offset.shape[1] must be a positive multiple of 2 * kh * kw = {2 * kh * kw}")
    a.require(s["Cin"] % G == 0, f"input's channels {s['Cin']} must be divisible by offset_groups = {G}")
    a.tensor("offset", offset, ("batch", 2 * G * kh * kw, Ho, Wo), (input.dtype,))
    a.tensor("mask", mask, ("batch", G * kh * kw, Ho, Wo), (input.dtype,), optional=True)
    s["Ho"], s["Wo"] = Ho, Wo
    return a


def _check_fwd(input, offset, weight, bias, mask, stride, padding, dilation):
    a = _check_dc("deform_conv2d_fwd", input, offset, weight, mask, stride, padding, dilation)
    a.tensor("bias", bias, ("Cout",), (input.dtype,), optional=True)


def _check_bwd(dout, input, offset, weight, mask, stride, padding, dilation):
    a = _check_dc("deform_conv2d_bwd", input, offset, weight, mask, stride, padding, dilation)
    a.tensor("dout", dout, ("batch", "Cout", "Ho", "Wo"), (input.dtype,))


def _fake_fwd(input, offset, weight, bias, mask, stride, padding, dilation):
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


def _fake_bwd(dout, input, offset, weight, mask, stride, padding, dilation):
    dmask = torch.empty_like(mask) if mask is not None else input.new_empty(0)
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(weight), dmask


def _dc_gradients(backward, s, g):
    """Gradients of input, offset, weight, mask (when given) and bias (when given) through out."""
    if g.out is None:
        return {}
    dout = g.out.contiguous()
    dinput, doffset, dweight, dmask = backward(dout, s.input, s.offset, s.weight, s.mask, s.stride, s.padding,
                                               s.dilation)
    grads = {"input": dinput, "offset": doffset, "weight": dweight}
    if s.mask is not None:
        grads["mask"] = dmask
    if s.bias is not None:  # a fixed-order reduction (deterministic on every device)
        grads["bias"] = dout.sum((0, 2, 3), dtype=acc_dtype(dout.dtype)).to(dout.dtype)
    return grads


# The Triton weight-gradient kernel's grid has one block per kernel point on its third
# axis (at most 65535 blocks), the forward one per weight group.
MAX_TRITON_GRID = 65535


def _dc_limits(backend: str, dtype: torch.dtype, kernel_points: int = 1, groups: int = 1) -> str | None:
    if backend != "triton":
        return None
    if dtype == torch.float64:
        return "has no float64 kernels (tl.dot); use backend='reference' or CPU tensors"
    if max(kernel_points, groups) > MAX_TRITON_GRID:
        return (f"supports up to {MAX_TRITON_GRID} kernel points (kh * kw) and weight groups; got "
                f"{kernel_points} and {groups}")
    return None


_DC = FusedOp(
    "deform_conv2d", Kernel("deform_conv2d_fwd", _fake_fwd, _check_fwd),
    Kernel("deform_conv2d_bwd", _fake_bwd, _check_bwd), save=("input", "offset", "weight", "bias", "mask"),
    gradients=_dc_gradients, triton_module="fastvision.triton.deform_conv", limits=_dc_limits)


# --------------------------------------------------------------------------
# Public API


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                  stride: int | tuple[int, int] = (1, 1), padding: int | tuple[int, int] = (0, 0),
                  dilation: int | tuple[int, int] = (1, 1), mask: Tensor | None = None, *,
                  backend: str = "auto") -> Tensor:
    """Deformable convolution: DCNv2 with ``mask``, DCNv1 without; torchvision's
    ``torchvision.ops.deform_conv2d`` (same arguments, same numbers), fused.

    Kernel point k = (i, j) of output position (oh, ow) reads input channel c at
    ``(oh * stride_h - pad_h + i * dil_h + dy, ow * stride_w - pad_w + j * dil_w + dx)``,
    (dy, dx) = ``offset[b, 2k : 2k + 2, oh, ow]`` of c's offset group, bilinearly
    with zeros outside the image, times ``mask[b, k, oh, ow]`` of that group.
    Offset groups: ``offset.shape[1] // (2 * kh * kw)``; weight groups:
    ``in_channels // weight.shape[1]``. No column buffer: the CPU kernel
    samples tiles of columns into cache, the Triton kernel into the matrix
    product's operand. Gradients for input, offset, weight, mask and bias;
    deterministic backward (no scatter, no atomics).

    Args:
        input: (batch, in_channels, H, W), float32 / float16 / bfloat16 (float64 on CPU).
        offset: (batch, 2 * offset_groups * kh * kw, Ho, Wo), (dy, dx) pairs per kernel point.
        weight: (out_channels, in_channels // groups, kh, kw).
        bias: (out_channels,) or None.
        stride, padding, dilation: an int or a pair (h, w).
        mask: (batch, offset_groups * kh * kw, Ho, Wo) or None (DCNv1).
        backend: 'auto' (compiled kernel for the device), 'cpu', 'triton', or
            'reference' (pure PyTorch).

    Returns:
        out (batch, out_channels, Ho, Wo) in input's dtype; accumulation in float32
        (float64 for float64 inputs).

    Example::

        >>> import torch
        >>> from fastvision.ops import deform_conv2d
        >>> x, w = torch.randn(2, 8, 10, 10), torch.randn(16, 8, 3, 3)
        >>> offset, mask = torch.randn(2, 18, 8, 8), torch.rand(2, 9, 8, 8)
        >>> deform_conv2d(x, offset, w, mask=mask).shape
        torch.Size([2, 16, 8, 8])
    """
    stride, padding, dilation = _check_args(input, offset, weight, bias, stride, padding, dilation, mask)
    path = _DC.resolve(backend, input.device, dtype=input.dtype, kernel_points=weight.shape[2] * weight.shape[3],
                       groups=input.shape[1] // weight.shape[1])
    if path == "reference":
        return deform_conv2d_ref(input, offset, weight, bias, stride, padding, dilation, mask)
    contiguous = [t.contiguous() if t is not None else None for t in (input, offset, weight, bias, mask)]
    return _DC(path, *contiguous, list(stride), list(padding), list(dilation))
