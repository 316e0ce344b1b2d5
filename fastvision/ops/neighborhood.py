"""Neighborhood attention (NA) and dilated NA (DiNA), as in NATTEN / NAT / DiNAT.

Public API: :func:`na1d`, :func:`na2d`, :func:`na3d`. Layout is NATTEN's,
heads last: query (batch, *spatial, heads, head_dim), key and value
(batch, *spatial, kv_heads, head_dim[_v]). Each query attends to the
``kernel_size`` nearest keys per axis (within its dilation group), by
NATTEN's window rule (csrc/neighborhood/neighborhood.h,
fastvision/reference/neighborhood.py).

This module checks arguments, registers fake kernels and autograd for the
``fastvision::na_fwd`` / ``fastvision::na_bwd`` ops (schemas in
csrc/registration.cpp), wires the Triton kernels to the CUDA device, and picks
the backend.
"""

from __future__ import annotations


import torch

from .. import _extension
from ..reference.neighborhood import neighborhood_attention_ref
from ._checks import check_backend, check_same_device, check_tensor, forbid_double_backward

__all__ = ["na1d", "na2d", "na3d"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_ops = torch.ops.fastvision
_AXES = {1: "L", 2: "H, W", 3: "D, H, W"}


# --------------------------------------------------------------------------
# Argument checks and normalisation


def _per_axis(value, nd: int, name: str, kind: type) -> tuple:
    """An int (bool) or a tuple/list of nd of them, as a tuple of nd."""
    def ok(x):
        if kind is bool:
            return isinstance(x, bool)
        return isinstance(x, int) and not isinstance(x, bool)

    if ok(value):
        return (value,) * nd
    if isinstance(value, (tuple, list)) and len(value) == nd and all(ok(x) for x in value):
        return tuple(value)
    what = "a bool" if kind is bool else "an int"
    raise TypeError(f"{name} must be {what} or a tuple of {nd} (one per spatial axis) for na{nd}d; "
                    f"got {value!r}")


def _check_args(nd, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale):
    """Validates everything; returns (kernel_size, dilation, stride, is_causal, scale) as tuples/float."""
    layout = f"(batch, {_AXES[nd]}, heads, head_dim)"
    check_tensor("query", query, dtypes=_FLOAT_DTYPES)
    if query.dim() != nd + 3:
        raise ValueError(f"na{nd}d: query must be a {nd + 3}-D tensor {layout} (heads last, as NATTEN); "
                         f"got shape {tuple(query.shape)}")
    check_tensor("key", key, ndim=nd + 3, dtypes=(query.dtype,), shape_doc=layout.replace("heads", "kv_heads"))
    check_tensor("value", value, ndim=nd + 3, dtypes=(query.dtype,),
                 shape_doc=layout.replace("heads", "kv_heads").replace("head_dim", "head_dim_v"))
    check_same_device(query=query, key=key, value=value, rpb=rpb)
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

    ks = _per_axis(kernel_size, nd, "kernel_size", int)
    ds = _per_axis(dilation, nd, "dilation", int)
    ss = _per_axis(stride, nd, "stride", int)
    cs = _per_axis(is_causal, nd, "is_causal", bool)
    for a in range(nd):
        L, k, d, s = spatial[a], ks[a], ds[a], ss[a]
        if k < 1 or d < 1 or s < 1:
            raise ValueError(f"kernel_size, dilation and stride must be >= 1; got kernel_size={ks}, "
                             f"dilation={ds}, stride={ss}")
        if k * d > L:
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
    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {scale!r}")
    return ks, ds, ss, cs, float(scale)


def _cuda_cpp_kernel() -> bool:
    """Whether a CUDA C++ kernel (from _C_cuda) is registered for na_fwd."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fastvision::na_fwd", "CUDA")
    except Exception:  # private API; absent means no
        return False


_CUDA_CPP = _cuda_cpp_kernel()


def _check_backend(backend: str, device: torch.device) -> str:
    return check_backend(backend, device, _CUDA_CPP,
                         "fastvision has no CUDA C++ neighborhood attention kernel (yet)")


# --------------------------------------------------------------------------
# Fake kernels (shapes only: torch.compile, meta tensors)


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastvision::na_fwd")
def _(query, key, value, rpb, kernel_size, dilation, stride, is_causal, scale):
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    return out, query.new_empty(query.shape[:-1], dtype=_acc(query))


@torch.library.register_fake("fastvision::na_bwd")
def _(dout, dlse, query, key, value, rpb, out, lse, kernel_size, dilation, stride, is_causal, scale):
    drpb = torch.empty_like(rpb) if rpb is not None else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), drpb


# --------------------------------------------------------------------------
# Autograd. The same backward glue serves the registered ops (any device) and
# the direct Triton path (Triton interpreter on CPU, or backend='triton').


def _grads(bwd, dout, dlse, q, k, v, rpb, out, lse, flags):
    """Gradients for (query, key, value, rpb); rpb's None without rpb."""
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is not None:
        dlse = dlse.to(lse.dtype).contiguous()
    dq, dk, dv, drpb = bwd(dout.contiguous(), dlse, q, k, v, rpb, out, lse, *flags)
    return dq, dk, dv, (drpb if rpb is not None else None)


def _fwd_setup(ctx, inputs, output):
    q, k, v, rpb, *flags = inputs
    out, lse = output
    ctx.set_materialize_grads(False)  # an unused lse (or out) gets no zero-filled gradient
    ctx.has_rpb = rpb is not None
    ctx.save_for_backward(q, k, v, out, lse, *([rpb] if rpb is not None else []))
    ctx.flags = tuple(flags)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, *rpb = ctx.saved_tensors
    rpb = rpb[0] if ctx.has_rpb else None
    if dout is None and dlse is None:
        return None, None, None, None, None, None, None, None, None
    dq, dk, dv, drpb = _grads(_ops.na_bwd, dout, dlse, q, k, v, rpb, out, lse, ctx.flags)
    return dq, dk, dv, drpb, None, None, None, None, None


torch.library.register_autograd("fastvision::na_fwd", _fwd_backward, setup_context=_fwd_setup)


forbid_double_backward("fastvision::na_bwd", "neighborhood attention")


# --------------------------------------------------------------------------
# Triton: registered as the CUDA kernels unless a CUDA C++ kernel is loaded;
# always reachable directly with backend='triton'. fastvision.triton.neighborhood
# is imported only when first used, so without it only the Triton path fails.


def _triton():
    from ..triton import neighborhood as tk
    return tk


def _tuples(kernel_size, dilation, stride, is_causal):
    return (tuple(int(x) for x in kernel_size), tuple(int(x) for x in dilation),
            tuple(int(x) for x in stride), tuple(bool(x) for x in is_causal))


def _triton_fwd(query, key, value, rpb, kernel_size, dilation, stride, is_causal, scale):
    return _triton().na_fwd(query, key, value, rpb, *_tuples(kernel_size, dilation, stride, is_causal), scale)


def _triton_bwd(dout, dlse, query, key, value, rpb, out, lse, kernel_size, dilation, stride, is_causal, scale):
    return _triton().na_bwd(dout, dlse, query, key, value, rpb, out, lse,
                            *_tuples(kernel_size, dilation, stride, is_causal), scale)


if _extension.triton_available() and not _CUDA_CPP:
    torch.library.register_kernel("fastvision::na_fwd", "cuda", _triton_fwd)
    torch.library.register_kernel("fastvision::na_bwd", "cuda", _triton_bwd)


class _TritonNA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flags, q, k, v, rpb):
        out, lse = _triton_fwd(q, k, v, rpb, *flags)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.flags = flags
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None
        return (None, *_grads(_triton_bwd, dout, dlse, q, k, v, rpb, out, lse, ctx.flags))


# --------------------------------------------------------------------------
# Public API


def _na(nd, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale, return_lse, backend):
    ks, ds, ss, cs, scale = _check_args(nd, query, key, value, kernel_size, dilation, stride,
                                        is_causal, rpb, scale)
    path = _check_backend(backend, query.device)
    if path == "reference":
        return neighborhood_attention_ref(query, key, value, ks, ds, ss, cs, rpb, scale, return_lse)
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    r = rpb.contiguous() if rpb is not None else None
    flags = (list(ks), list(ds), list(ss), list(cs), scale)
    if path == "triton":
        out, lse = _TritonNA.apply(flags, q, k, v, r)
    else:
        out, lse = _ops.na_fwd(q, k, v, r, *flags)
    return (out, lse) if return_lse else out


_DOC = """{nd}-D neighborhood attention (dilated, causal, strided; optional NAT/DiNAT rpb).

    Args:
        query: (batch, {axes}, heads, head_dim), float32 / float16 / bfloat16 (float64 on CPU).
        key: (batch, {axes}, kv_heads, head_dim); kv_heads divides heads (GQA / MQA).
        value: (batch, {axes}, kv_heads, head_dim_v); head_dim_v may differ from head_dim.
        kernel_size, dilation, stride: int or a tuple of {nd} (one per spatial axis);
            kernel_size * dilation must not exceed the axis length; stride <= kernel_size.
        is_causal: bool or a tuple of {nd}.
        rpb: relative positional bias (heads, {rpb_shape}) or None, added to the logits
            at index (j - i) / dilation + k - 1 per axis; needs stride 1 and no causal axis.
        scale: logit scale, default head_dim ** -0.5.
        return_lse: also return the logsumexp of the logits (batch, {axes}, heads), float32
            (float64 for float64 inputs), differentiable, to merge attentions.
        backend: 'auto' (compiled kernel for the device), 'cpu', 'cuda' (CUDA C++), 'triton',
            or 'reference' (pure PyTorch).

    Returns:
        out (batch, {axes}, heads, head_dim_v) in query's dtype, and lse when return_lse.
        Accumulation is float32 (float64 for float64 inputs).
    """


def na1d(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, scale=None,
         return_lse=False, *, backend="auto"):
    return _na(1, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale, return_lse, backend)


def na2d(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, scale=None,
         return_lse=False, *, backend="auto"):
    return _na(2, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale, return_lse, backend)


def na3d(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, scale=None,
         return_lse=False, *, backend="auto"):
    return _na(3, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale, return_lse, backend)


na1d.__doc__ = _DOC.format(nd=1, axes="L", rpb_shape="2k-1")
na2d.__doc__ = _DOC.format(nd=2, axes="H, W", rpb_shape="2k0-1, 2k1-1")
na3d.__doc__ = _DOC.format(nd=3, axes="D, H, W", rpb_shape="2k0-1, 2k1-1, 2k2-1")
