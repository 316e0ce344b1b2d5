"""Neighborhood attention (NA) and dilated NA (DiNA), as in NATTEN / NAT / DiNAT.

Public API: :func:`na1d`, :func:`na2d`, :func:`na3d`, with NATTEN's arguments
in NATTEN's order. Layout is NATTEN's, heads last: query (batch, *spatial,
heads, head_dim), key and value (batch, *spatial, kv_heads, head_dim[_v]).
Each query attends to the ``kernel_size`` nearest keys per axis (within its
dilation group), by NATTEN's window rule (csrc/neighborhood/neighborhood.h,
:func:`fastvision.reference.neighborhood.axis_windows`), and to any
``additional_keys``.

This module checks arguments and describes the ``fastvision::na_fwd`` /
``fastvision::na_bwd`` ops (schemas in csrc/registration.cpp) to the shared
machinery in ``_library.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import (FLOAT_DTYPES, OpArgs, acc_dtype, as_bool, as_float, check_same_device, check_tensor,
                       per_axis)
from ..reference.neighborhood import neighborhood_attention_ref
from ._library import FusedOp, Kernel

__all__ = ["na1d", "na2d", "na3d"]

MAX_TRITON_HEAD_DIM = 256  # head_dim and head_dim_v limit of the Triton kernels
_AXES = {1: "L", 2: "H, W", 3: "D, H, W"}


# --------------------------------------------------------------------------
# Argument checks and normalisation


def _check_args(nd, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                additional_values, rpb):
    """Validates everything; returns (kernel_size, stride, dilation, is_causal, scale) as tuples/float."""
    fn = f"na{nd}d"
    layout = f"(batch, {_AXES[nd]}, heads, head_dim)"
    check_tensor("query", query, dtypes=FLOAT_DTYPES)
    if query.dim() != nd + 3:
        raise ValueError(f"{fn}: query must be a {nd + 3}-D tensor {layout} (heads last, as NATTEN); "
                         f"got shape {tuple(query.shape)}")
    check_tensor("key", key, ndim=nd + 3, dtypes=(query.dtype,), shape_doc=layout.replace("heads", "kv_heads"))
    check_tensor("value", value, ndim=nd + 3, dtypes=(query.dtype,),
                 shape_doc=layout.replace("heads", "kv_heads").replace("head_dim", "head_dim_v"))
    check_same_device(query=query, key=key, value=value, rpb=rpb, additional_keys=additional_keys,
                      additional_values=additional_values)
    batch, *spatial, heads, head_dim = query.shape
    kv_heads = key.shape[-2]
    if tuple(key.shape[:-2]) != tuple(query.shape[:-2]) or tuple(value.shape[:-2]) != tuple(query.shape[:-2]):
        raise ValueError("key and value must have query's batch and spatial sizes "
                         f"{tuple(query.shape[:-2])}; got key {tuple(key.shape)}, value {tuple(value.shape)}")
    if value.shape[-2] != kv_heads:
        raise ValueError(f"key and value must have the same number of heads; got key {kv_heads} "
                         f"(shape {tuple(key.shape)}) and value {value.shape[-2]} (shape {tuple(value.shape)})")
    if heads < 1 or kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"the number of key/value heads ({kv_heads}) must divide the number of query "
                         f"heads ({heads}); query {tuple(query.shape)}, key {tuple(key.shape)}")
    if key.shape[-1] != head_dim:
        raise ValueError(f"key's head_dim must equal query's ({head_dim}); got key {tuple(key.shape)}")
    if head_dim < 1 or value.shape[-1] < 1:
        raise ValueError(f"head dims must be >= 1; got query {tuple(query.shape)}, value {tuple(value.shape)}")

    context = f"for {fn}"
    ks = per_axis(kernel_size, nd, "kernel_size", context=context)
    ss = per_axis(stride, nd, "stride", context=context)
    ds = per_axis(dilation, nd, "dilation", context=context)
    cs = per_axis(is_causal, nd, "is_causal", bool, context=context)
    for a in range(nd):
        L, k, d, s = spatial[a], ks[a], ds[a], ss[a]
        if k < 1 or d < 1 or s < 1:
            raise ValueError(f"kernel_size, dilation and stride must be >= 1; got kernel_size={ks}, "
                             f"stride={ss}, dilation={ds}")
        if k > L or d > L or k * d > L:
            raise ValueError(f"kernel_size * dilation must not exceed the input size on every axis; on "
                             f"spatial axis {a} (dim {a + 1} of query, length {L}) kernel_size {k} * "
                             f"dilation {d} = {k * d} > {L}")
        if s > k:
            raise ValueError(f"stride must not exceed kernel_size on any axis; on spatial axis {a} stride "
                             f"{s} > kernel_size {k}")
    if rpb is not None:
        check_tensor("rpb", rpb, dtypes=tuple({query.dtype, torch.float32}))
        if any(cs):
            raise ValueError(f"rpb (relative positional bias) cannot be combined with is_causal={cs}: "
                             "the bias index is defined for non-causal windows only (as in NAT/DiNAT)")
        if any(s > 1 for s in ss):
            raise ValueError(f"rpb (relative positional bias) needs stride 1 on every axis; got stride={ss} "
                             "(the bias index (j - i) / dilation + k - 1 is only defined for stride 1)")
        want = (heads, *(2 * k - 1 for k in ks))
        if tuple(rpb.shape) != want:
            raise ValueError(f"rpb must have shape (heads, {', '.join(f'2*k{a}-1' for a in range(nd))}) = "
                             f"{want} for heads={heads}, kernel_size={ks}; got {tuple(rpb.shape)}")
    _check_additional(query, value, additional_keys, additional_values)
    scale = head_dim ** -0.5 if scale is None else as_float(scale, "scale")
    return ks, ss, ds, cs, scale


def _check_additional(query, value, additional_keys, additional_values) -> None:
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together (or neither); got "
                         f"additional_keys={'a tensor' if additional_keys is not None else None}, "
                         f"additional_values={'a tensor' if additional_values is not None else None}")
    if additional_keys is None:
        return
    batch, heads, head_dim = query.shape[0], query.shape[-2], query.shape[-1]
    doc = "(batch, n_extra, kv_heads, {})"
    check_tensor("additional_keys", additional_keys, ndim=4, dtypes=(query.dtype,), shape_doc=doc.format("head_dim"))
    check_tensor("additional_values", additional_values, ndim=4, dtypes=(query.dtype,),
                 shape_doc=doc.format("head_dim_v"))
    b, n, h, d = additional_keys.shape
    want_k = (batch, n, h, head_dim)
    want_v = (batch, n, h, value.shape[-1])
    if n < 1 or h < 1 or heads % h != 0 or tuple(additional_keys.shape) != want_k:
        raise ValueError(f"additional_keys must have shape (batch, n_extra, kv_heads, head_dim) with batch="
                         f"{batch}, n_extra >= 1, kv_heads dividing heads={heads}, head_dim={head_dim}; "
                         f"got {tuple(additional_keys.shape)}")
    if tuple(additional_values.shape) != want_v:
        raise ValueError(f"additional_values must have shape {want_v} (additional_keys' batch, n_extra and "
                         f"kv_heads, value's head_dim_v); got {tuple(additional_values.shape)}")


def _check_na(op: str, query, key, value, rpb, kernel_size, dilation, stride, is_causal, scale) -> OpArgs:
    """The tensors and integers of a direct na_fwd / na_bwd call (C++ kernels check the same in C++)."""
    a = OpArgs(op)
    if not isinstance(query, torch.Tensor) or not 4 <= query.dim() <= 6:
        a.fail("query must be a (batch, *spatial, heads, head_dim) tensor with 1-3 spatial axes")
    nd = query.dim() - 3
    spatial = tuple(f"L{i}" for i in range(nd))
    a.tensor("query", query, ("batch", *spatial, "heads", "head_dim"), FLOAT_DTYPES)
    a.tensor("key", key, ("batch", *spatial, "kv_heads", "head_dim"), (query.dtype,))
    a.tensor("value", value, ("batch", *spatial, "kv_heads", "head_dim_v"), (query.dtype,))
    a.require(a.sizes["kv_heads"] >= 1 and a.sizes["heads"] % a.sizes["kv_heads"] == 0,
              f"key/value heads ({a.sizes['kv_heads']}) must divide query heads ({a.sizes['heads']})")
    a.require(a.sizes["head_dim"] >= 1 and a.sizes["head_dim_v"] >= 1, "head dims must be >= 1")
    lengths = [a.sizes[s] for s in spatial]
    ks = a.ints("kernel_size", kernel_size, nd, 1, max(lengths + [1]))
    ds = a.ints("dilation", dilation, nd, 1, max(lengths + [1]))
    ss = a.ints("stride", stride, nd, 1, max(ks))
    if not isinstance(is_causal, (list, tuple)) or len(is_causal) != nd or \
            not all(isinstance(c, bool) for c in is_causal):
        a.fail(f"is_causal must be a list of {nd} bools; got {is_causal!r}")
    for i in range(nd):
        a.require(ks[i] * ds[i] <= lengths[i], f"kernel_size * dilation must not exceed the length of "
                  f"spatial axis {i}: {ks[i]} * {ds[i]} > {lengths[i]}")
        a.require(ss[i] <= ks[i], f"stride[{i}] = {ss[i]} must not exceed kernel_size[{i}] = {ks[i]}")
    if rpb is not None:
        a.require(not any(is_causal) and all(s == 1 for s in ss), "rpb needs stride 1 and no causal axis")
        a.tensor("rpb", rpb, ("heads", *(2 * k - 1 for k in ks)), FLOAT_DTYPES)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        a.fail(f"scale must be a float; got {scale!r}")
    return a


def _check_fwd(query, key, value, rpb, kernel_size, dilation, stride, is_causal, scale):
    _check_na("na_fwd", query, key, value, rpb, kernel_size, dilation, stride, is_causal, scale)


def _check_bwd(dout, dlse, query, key, value, rpb, out, lse, kernel_size, dilation, stride, is_causal, scale):
    a = _check_na("na_bwd", query, key, value, rpb, kernel_size, dilation, stride, is_causal, scale)
    rows = ("batch", *(f"L{i}" for i in range(query.dim() - 3)), "heads")
    acc = (acc_dtype(query.dtype),)
    a.tensor("out", out, (*rows, "head_dim_v"), (query.dtype,))
    a.tensor("dout", dout, (*rows, "head_dim_v"), (query.dtype,))
    a.tensor("lse", lse, rows, acc)
    a.tensor("dlse", dlse, rows, acc, optional=True)


def _fake_fwd(query, key, value, rpb, kernel_size, dilation, stride, is_causal, scale):
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    return out, query.new_empty(query.shape[:-1], dtype=acc_dtype(query.dtype))


def _fake_bwd(dout, dlse, query, key, value, rpb, out, lse, kernel_size, dilation, stride, is_causal, scale):
    drpb = torch.empty_like(rpb) if rpb is not None else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), drpb


def _na_gradients(backward, s, g):
    """Gradients of query, key, value and rpb through out and lse (either may be unused)."""
    dout = (g.out if g.out is not None else torch.zeros_like(s.out)).contiguous()
    dlse = None if g.lse is None else g.lse.to(s.lse.dtype).contiguous()
    dq, dk, dv, drpb = backward(dout, dlse, s.query, s.key, s.value, s.rpb, s.out, s.lse, s.kernel_size,
                                s.dilation, s.stride, s.is_causal, s.scale)
    return {"query": dq, "key": dk, "value": dv, "rpb": drpb if s.rpb is not None else None}


def _na_limits(backend: str, head_dim: int, head_dim_v: int) -> str | None:
    if backend == "triton" and max(head_dim, head_dim_v) > MAX_TRITON_HEAD_DIM:
        return (f"supports head dims up to {MAX_TRITON_HEAD_DIM}; got head_dim={head_dim}, "
                f"head_dim_v={head_dim_v}")
    return None


_NA = FusedOp(
    "neighborhood_attention", Kernel("na_fwd", _fake_fwd, _check_fwd), Kernel("na_bwd", _fake_bwd, _check_bwd),
    save=("query", "key", "value", "rpb", "out", "lse"), gradients=_na_gradients,
    triton_module="fastvision.triton.neighborhood", limits=_na_limits)


# --------------------------------------------------------------------------
# Public API


def _attend_additional(query, keys, values, scale):
    """Plain attention of every query over the additional keys: (out, lse), accumulate dtype."""
    acc = acc_dtype(query.dtype)
    heads = query.shape[-2]
    k = keys.to(acc).repeat_interleave(heads // keys.shape[-2], dim=-2)
    v = values.to(acc).repeat_interleave(heads // values.shape[-2], dim=-2)
    logits = torch.einsum("b...hd,bnhd->b...hn", query.to(acc), k) * scale
    lse = torch.logsumexp(logits, dim=-1)
    return torch.einsum("b...hn,bnhe->b...he", torch.softmax(logits, dim=-1), v), lse


def _na(nd, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, rpb, return_lse, backend):
    ks, ss, ds, cs, scale = _check_args(nd, query, key, value, kernel_size, stride, dilation, is_causal,
                                        scale, additional_keys, additional_values, rpb)
    return_lse = as_bool(return_lse, "return_lse")
    path = _NA.resolve(backend, query.device, head_dim=query.shape[-1], head_dim_v=value.shape[-1])
    if path == "reference":
        return neighborhood_attention_ref(query, key, value, ks, ds, ss, cs, rpb, scale, return_lse,
                                          additional_keys=additional_keys, additional_values=additional_values)
    r = rpb.contiguous() if rpb is not None else None
    out, lse = _NA(path, query.contiguous(), key.contiguous(), value.contiguous(), r, list(ks), list(ds),
                   list(ss), list(cs), scale)
    if additional_keys is not None:
        # Merged through the logsumexps: one softmax over the window and the extra keys.
        extra, extra_lse = _attend_additional(query, additional_keys, additional_values, scale)
        merged = torch.logaddexp(lse, extra_lse)
        out = (out * torch.exp(lse - merged)[..., None] + extra * torch.exp(extra_lse - merged)[..., None])
        out, lse = out.to(query.dtype), merged
    return (out, lse) if return_lse else out


_DOC = """{nd}-D neighborhood attention (dilated, strided, causal; optional NAT/DiNAT rpb).

    Drop-in for ``natten.functional.na{nd}d``: NATTEN's arguments in NATTEN's order.

    Args:
        query: (batch, {axes}, heads, head_dim), float32 / float16 / bfloat16 (float64 on CPU).
        key: (batch, {axes}, kv_heads, head_dim); kv_heads divides heads (GQA / MQA).
        value: (batch, {axes}, kv_heads, head_dim_v); head_dim_v may differ from head_dim.
        kernel_size, stride, dilation: int or a tuple of {nd} (one per spatial axis);
            kernel_size * dilation must not exceed the axis length; stride <= kernel_size.
        is_causal: bool or a tuple of {nd}.
        scale: logit scale, default head_dim ** -0.5.
        additional_keys, additional_values: (batch, n_extra, kv_heads', head_dim / head_dim_v)
            or None: keys every query attends to besides its neighbourhood, in the same
            softmax (merged through the logsumexp, as NATTEN).
        rpb: relative positional bias (heads, {rpb_shape}) or None, added to the logits
            at index (j - i) / dilation + k - 1 per axis; needs stride 1 and no causal axis.
        return_lse: also return the logsumexp of the logits (batch, {axes}, heads), float32
            (float64 for float64 inputs), differentiable, to merge attentions.
        backend: 'auto' (compiled kernel for the device), 'cpu', 'cuda' (CUDA C++), 'triton',
            or 'reference' (pure PyTorch).

    Python ints / bools / floats may be numpy scalars or 0-d tensors.

    Returns:
        out (batch, {axes}, heads, head_dim_v) in query's dtype, and lse when return_lse.
        Accumulation is float32 (float64 for float64 inputs).

    Example::

        >>> import torch
        >>> from fastvision.ops import na{nd}d
        >>> q = k = v = torch.randn(2, {example}, 4, 32)
        >>> na{nd}d(q, k, v, kernel_size=3, dilation=2).shape
        torch.Size([2, {example}, 4, 32])
    """

def na1d(query: Tensor, key: Tensor, value: Tensor, kernel_size: int | Sequence[int],
         stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
         is_causal: bool | Sequence[bool] = False, scale: float | None = None,
         additional_keys: Tensor | None = None, additional_values: Tensor | None = None, *,
         rpb: Tensor | None = None, return_lse: bool = False,
         backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, rpb, return_lse, backend)


def na2d(query: Tensor, key: Tensor, value: Tensor, kernel_size: int | Sequence[int],
         stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
         is_causal: bool | Sequence[bool] = False, scale: float | None = None,
         additional_keys: Tensor | None = None, additional_values: Tensor | None = None, *,
         rpb: Tensor | None = None, return_lse: bool = False,
         backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, rpb, return_lse, backend)


def na3d(query: Tensor, key: Tensor, value: Tensor, kernel_size: int | Sequence[int],
         stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
         is_causal: bool | Sequence[bool] = False, scale: float | None = None,
         additional_keys: Tensor | None = None, additional_values: Tensor | None = None, *,
         rpb: Tensor | None = None, return_lse: bool = False,
         backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, rpb, return_lse, backend)


na1d.__doc__ = _DOC.format(nd=1, axes="L", rpb_shape="2k-1", example="16")
na2d.__doc__ = _DOC.format(nd=2, axes="H, W", rpb_shape="2k0-1, 2k1-1", example="8, 8")
na3d.__doc__ = _DOC.format(nd=3, axes="D, H, W", rpb_shape="2k0-1, 2k1-1, 2k2-1", example="6, 6, 6")
