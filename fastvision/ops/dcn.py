"""DCNv3 / DCNv4 aggregation (InternImage's DCNv3 op, OpenGVLab's DCNv4), channels-last.

Public API: :func:`dcn_aggregate` (input, offset, mask, kernel_size, ...) and
:func:`dcnv4` (DCNv4's packed ``offset_mask`` layout, DCNv4Function's
argument order). Semantics are the DCNv3 CUDA op's: see
:mod:`fastvision.reference.dcn` for the formulas.

This module checks arguments and describes the ``fastvision::dcn_fwd`` /
``fastvision::dcn_bwd`` ops (schemas in csrc/registration.cpp) to the shared
machinery in ``_library.py``. The layers are in ``dcn_layers.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, OpArgs, as_bool, as_float, as_int, check_same_device, check_tensor, per_axis
from ..reference.dcn import dcn_aggregate_ref, out_size
from ._library import FusedOp, Kernel

__all__ = ["dcn_aggregate", "dcnv4", "split_offset_mask"]

MAX_SIDE = 2 ** 20    # H, W, stride, padding, dilation (as csrc/dcn/checks.h)
MAX_KERNEL = 1024     # kh, kw
MAX_TRITON_CG = 1024  # channels per group of the Triton kernels (one [block, Cg] tile)
MAX_TRITON_GROUPS = 65535  # groups: the second axis of the Triton launch grid
_MINIMUM = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1}


def _pair(value, name: str) -> tuple[int, int]:
    """An int or an (h, w) pair, as (h, w)."""
    return per_axis(value, 2, name, minimum=_MINIMUM[name])


def _flag(value, name: str) -> bool:
    """A bool, or 0 / 1 (DCNv3's and DCNv4's modules pass remove_center as an int)."""
    try:
        return as_bool(value, name)
    except TypeError:
        if as_int(value, name) not in (0, 1):
            raise ValueError(f"{name} must be a bool (or 0 / 1); got {value!r}") from None
        return bool(value)


# --------------------------------------------------------------------------
# Argument checks


def _conv_args(input, kernel_size, stride, padding, dilation, group, remove_center, what="dcn_aggregate"):
    """(k, s, p, d, G, K, Ho, Wo) of a public call, checked in the caller's words."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES)
    if input.dim() != 4:
        raise ValueError(f"{what}: input must be a 4-D tensor (N, H, W, group * Cg) (channels-last, as DCNv3); "
                         f"got shape {tuple(input.shape)}")
    k, s, p, d = (_pair(v, n) for v, n in ((kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"),
                                            (dilation, "dilation")))
    G = as_int(group, "group", minimum=1)
    remove_center = _flag(remove_center, "remove_center")
    N, H, W, C = input.shape
    if C % G:
        raise ValueError(f"group must divide input's channels: got {C} channels and group={G}")
    if max(k) > MAX_KERNEL or max(H, W, *s, *p, *d) > MAX_SIDE:
        raise ValueError(f"kernel_size must be at most {MAX_KERNEL}, and H, W, stride, padding and dilation at most "
                         f"2^20; got input {tuple(input.shape)}, kernel_size={k}, stride={s}, padding={p}, "
                         f"dilation={d}")
    if remove_center and k[0] * k[1] == 1:
        raise ValueError("remove_center needs more than one kernel point; got kernel_size (1, 1)")
    span = [di * (ki - 1) + 1 for ki, di in zip(k, d)]
    if H + 2 * p[0] < span[0] or W + 2 * p[1] < span[1]:
        raise ValueError(f"the dilated kernel ({span[0]} x {span[1]}) must fit the padded input "
                         f"({H + 2 * p[0]} x {W + 2 * p[1]})")
    K = k[0] * k[1] - int(remove_center)
    Ho, Wo = out_size(H, k[0], s[0], p[0], d[0]), out_size(W, k[1], s[1], p[1], d[1])
    return k, s, p, d, G, K, Ho, Wo, remove_center


def _check_dcn(op: str, input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale,
               remove_center, mask_softmax) -> OpArgs:
    """The arguments of a direct dcn_fwd / dcn_bwd call (the C++ kernels check the same)."""
    a = OpArgs(op)
    a.tensor("input", input, ("N", "H", "W", "C"), FLOAT_DTYPES)
    kh, kw = a.ints("kernel_size", kernel_size, 2, 1, MAX_KERNEL)
    sh, sw = a.ints("stride", stride, 2, 1, MAX_SIDE)
    ph, pw = a.ints("padding", padding, 2, 0, MAX_SIDE)
    dh, dw = a.ints("dilation", dilation, 2, 1, MAX_SIDE)
    N, H, W, C = a.sizes["N"], a.sizes["H"], a.sizes["W"], a.sizes["C"]
    a.require(H <= MAX_SIDE and W <= MAX_SIDE, f"H and W must be at most 2^20; got input of shape {tuple(input.shape)}")
    G = a.integer("group", group, 1, max(C, 1 << 20) if C == 0 else C)
    a.require(C % G == 0, f"group must be >= 1 and divide input's channels ({C}); got {G}")
    a.require(isinstance(remove_center, bool) and isinstance(mask_softmax, bool),
              "remove_center and mask_softmax must be bools")
    a.require(isinstance(offset_scale, float), f"offset_scale must be a float; got {offset_scale!r}")
    a.require(not remove_center or kh * kw > 1, f"remove_center needs more than one kernel point; got kernel_size "
                                                f"[{kh}, {kw}]")
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    a.require(H + 2 * ph >= span_h and W + 2 * pw >= span_w,
              f"the dilated kernel ({span_h} x {span_w}) must fit the padded input ({H + 2 * ph} x {W + 2 * pw})")
    K = kh * kw - int(remove_center)
    a.sizes.update(Ho=(H + 2 * ph - span_h) // sh + 1, Wo=(W + 2 * pw - span_w) // sw + 1, GK2=G * K * 2, GK=G * K)
    a.tensor("offset", offset, ("N", "Ho", "Wo", "GK2"), (input.dtype,))
    a.tensor("mask", mask, ("N", "Ho", "Wo", "GK"), (input.dtype,))
    return a


def _check_fwd(*args):
    _check_dcn("dcn_fwd", *args)


def _check_bwd(dout, *args):
    a = _check_dcn("dcn_bwd", *args)
    a.tensor("dout", dout, ("N", "Ho", "Wo", "C"), (args[0].dtype,))


def _fake_fwd(input, offset, mask, *args):
    N, Ho, Wo, _ = offset.shape
    return input.new_empty((N, Ho, Wo, input.shape[3]))


def _fake_bwd(dout, input, offset, mask, *args):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _dcn_gradients(backward, s, g):
    if g.out is None:
        return {}
    di, do, dm = backward(g.out.contiguous(), s.input, s.offset, s.mask, s.kernel_size, s.stride, s.padding,
                          s.dilation, s.group, s.offset_scale, s.remove_center, s.mask_softmax)
    return {"input": di, "offset": do, "mask": dm}


def _dcn_limits(backend: str, group_channels: int, group: int = 1) -> str | None:
    if backend == "triton" and group_channels > MAX_TRITON_CG:
        return f"supports up to {MAX_TRITON_CG} channels per group; got {group_channels}"
    if backend == "triton" and group > MAX_TRITON_GROUPS:
        return f"supports up to {MAX_TRITON_GROUPS} groups (its launch grid's second axis); got {group}"
    return None


_DCN = FusedOp(
    "dcn_aggregate", Kernel("dcn_fwd", _fake_fwd, _check_fwd), Kernel("dcn_bwd", _fake_bwd, _check_bwd),
    save=("input", "offset", "mask"), gradients=_dcn_gradients, triton_module="fastvision.triton.dcn",
    limits=_dcn_limits)


# --------------------------------------------------------------------------
# Public API


IntPair = int | tuple[int, int]


def dcn_aggregate(input: Tensor, offset: Tensor, mask: Tensor, kernel_size: IntPair, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, group: int = 1, offset_scale: float = 1.0, remove_center: bool = False,
                  mask_softmax: bool = False, *, backend: str = "auto") -> Tensor:
    """DCNv3 / DCNv4 aggregation, fused: InternImage's ``DCNv3Function`` (the CUDA op) on any device.

    Every output (n, ho, wo) and group g sums the K kernel points' bilinear
    samples of its group's channels, weighted by the mask:
    ``out[n, ho, wo, g] = sum_p m_p * input[n, y_p, x_p, g]`` with
    ``x_p = wo * stride_w - pad_w + half_w + (i_p * dil_w - half_w + dx_p) * offset_scale``
    (``half_w = dil_w * (kw - 1) // 2``; y likewise), points ordered x outer,
    y inner (``p = i * kh + j``), zeros outside, pixel centres on integers.

    Args:
        input: (N, H, W, group * Cg), float32 / float16 / bfloat16 (float64 on CPU).
        offset: (N, Ho, Wo, group * K * 2): (dx, dy) per point, in pixels.
        mask: (N, Ho, Wo, group * K): the points' weights (logits with ``mask_softmax``).
        kernel_size, stride, padding, dilation: an int or an (h, w) pair.
        group: the number of groups; offset_scale: scales the dilated grid and the
            offsets (not the centre).
        remove_center: drop the centre point (kw // 2, kh // 2): K = kh * kw - 1.
        mask_softmax: softmax the mask over each group's K points (DCNv3's module
            does this before the op); False: the mask as given (DCNv4).
        backend: 'auto', 'cpu', 'triton' or 'reference'.

    Returns:
        (N, Ho, Wo, group * Cg) in input's dtype, Ho = (H + 2 pad_h -
        (dil_h (kh - 1) + 1)) // stride_h + 1. Accumulation is float32 (float64
        for float64 inputs); the backward is deterministic.

    Example::

        >>> import torch
        >>> from fastvision.ops import dcn_aggregate
        >>> x = torch.randn(2, 8, 8, 32)
        >>> offset, mask = torch.randn(2, 8, 8, 4 * 9 * 2), torch.rand(2, 8, 8, 4 * 9)
        >>> dcn_aggregate(x, offset, mask, 3, padding=1, group=4).shape
        torch.Size([2, 8, 8, 32])
    """
    k, s, p, d, G, K, Ho, Wo, remove_center = _conv_args(input, kernel_size, stride, padding, dilation, group,
                                                         remove_center)
    N = input.shape[0]
    check_tensor("offset", offset, shape=(N, Ho, Wo, G * K * 2), dtypes=(input.dtype,))
    check_tensor("mask", mask, shape=(N, Ho, Wo, G * K), dtypes=(input.dtype,))
    check_same_device(input=input, offset=offset, mask=mask)
    offset_scale = as_float(offset_scale, "offset_scale")
    mask_softmax = as_bool(mask_softmax, "mask_softmax")
    path = _DCN.resolve(backend, input.device, group_channels=input.shape[3] // G, group=G)
    if path == "reference":
        return dcn_aggregate_ref(input, offset, mask, k, s, p, d, G, offset_scale, remove_center, mask_softmax)
    return _DCN(path, input.contiguous(), offset.contiguous(), mask.contiguous(), list(k), list(s), list(p), list(d),
                G, offset_scale, remove_center, mask_softmax)


def split_offset_mask(offset_mask: Tensor, kernel_size: IntPair, group: int, remove_center: bool | int = False) -> tuple[Tensor, Tensor]:
    """DCNv4's packed (N, Ho, Wo, >= G * K * 3) -> (offset (N, Ho, Wo, G * K * 2), mask (N, Ho, Wo, G * K)).

    Per group: 2K offsets ((dx, dy) pairs), then K weights; the channels past
    G * K * 3 (DCNv4 pads to a multiple of 8) are unused and get zero gradient."""
    kh, kw = _pair(kernel_size, "kernel_size")
    G = as_int(group, "group", minimum=1)
    K = kh * kw - int(_flag(remove_center, "remove_center"))
    check_tensor("offset_mask", offset_mask, ndim=4, shape_doc="(N, Ho, Wo, ceil(group * K * 3 / 8) * 8)")
    if offset_mask.shape[3] < G * K * 3:
        raise ValueError(f"offset_mask must have at least group * K * 3 = {G * K * 3} channels "
                         f"(DCNv4 pads them to {-(-G * K * 3 // 8) * 8}); got shape {tuple(offset_mask.shape)}")
    packed = offset_mask[..., :G * K * 3].unflatten(-1, (G, 3 * K))
    return packed[..., :2 * K].flatten(-2), packed[..., 2 * K:].flatten(-2)


def dcnv4(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
          pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
          offset_scale: float, im2col_step: int = 256, remove_center: bool | int = 0, *, softmax: bool = False,
          backend: str = "auto") -> Tensor:
    """DCNv4's op in its packed layout, with ``DCNv4Function.apply``'s arguments.

    ``offset_mask`` (N, Ho, Wo, ceil(group * K * 3 / 8) * 8): per group 2K
    offsets then K weights (any width >= group * K * 3 is read the same way).
    ``im2col_step`` is accepted and unused (no batch chunking here); any kernel
    size and any group_channels (DCNv4 supports 3x3 only). ``softmax`` is
    DCNv4's kernel flag (its modules pass False). See :func:`dcn_aggregate`.

    Example::

        >>> import torch
        >>> from fastvision.ops import dcnv4
        >>> x, offset_mask = torch.randn(1, 8, 8, 32), torch.randn(1, 8, 8, 56)  # 2 groups: 54 -> 56
        >>> dcnv4(x, offset_mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 16, 1.0).shape
        torch.Size([1, 8, 8, 32])
    """
    C = input.shape[-1] if isinstance(input, torch.Tensor) else None
    G, Cg = as_int(group, "group", minimum=1), as_int(group_channels, "group_channels", minimum=0)
    if C is not None and C != G * Cg:
        raise ValueError(f"input's channels must be group * group_channels = {G * Cg}; got {C}")
    as_int(im2col_step, "im2col_step", minimum=1)
    offset, mask = split_offset_mask(offset_mask, (kernel_h, kernel_w), G, remove_center)
    return dcn_aggregate(input, offset, mask, (kernel_h, kernel_w), (stride_h, stride_w), (pad_h, pad_w),
                         (dilation_h, dilation_w), G, offset_scale, remove_center, softmax, backend=backend)
