"""Criss-cross attention (CCNet), as mmcv's einsum ``CrissCrossAttention``.

Public API: :func:`criss_cross_attention` (query, key, value) -> out, NCHW.
Query (h, w) attends to its column (keys (i, w), i != h) and its row (keys
(h, j), every j) in one softmax over the H + W logits q . k (no scaling);
see :mod:`fastvision.reference.criss_cross` for the formulas.

This module checks arguments and describes the ``fastvision::criss_cross_fwd``
/ ``fastvision::criss_cross_bwd`` ops (schemas in csrc/registration.cpp) to the
shared machinery in ``_library.py``. The layers are in ``criss_cross_layers.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, OpArgs, acc_dtype, check_same_device, check_tensor
from ..reference.criss_cross import criss_cross_attention_ref
from ._library import FusedOp, Kernel

__all__ = ["criss_cross_attention"]

# Cqk and C limit of the Triton kernels: their launch grid's second axis holds at
# most 65535 blocks of 64 channels.
MAX_TRITON_CHANNELS = 65535 * 64
MAX_SIDE = 2 ** 20  # H and W limit of every kernel (as csrc/criss_cross/checks.h)


# --------------------------------------------------------------------------
# Argument checks


def _check_args(query, key, value) -> None:
    check_tensor("query", query, dtypes=FLOAT_DTYPES)
    if query.dim() != 4:
        raise ValueError(f"criss_cross_attention: query must be a 4-D tensor (batch, Cqk, H, W) (NCHW, as "
                         f"mmcv); got shape {tuple(query.shape)}")
    check_tensor("key", key, ndim=4, dtypes=(query.dtype,), shape_doc="(batch, Cqk, H, W)")
    check_tensor("value", value, ndim=4, dtypes=(query.dtype,), shape_doc="(batch, C, H, W)")
    check_same_device(query=query, key=key, value=value)
    if key.shape != query.shape:
        raise ValueError(f"key must have query's shape (batch, Cqk, H, W) = {tuple(query.shape)}; got "
                         f"{tuple(key.shape)} (query and key need the same number of channels Cqk)")
    B, _, H, W = query.shape
    if (value.shape[0], value.shape[2], value.shape[3]) != (B, H, W):
        raise ValueError(f"value must have query's batch, H and W (batch={B}, H={H}, W={W}); got value "
                         f"{tuple(value.shape)}, query {tuple(query.shape)}")


def _check_cc(op: str, query, key, value) -> OpArgs:
    """The tensors of a direct criss_cross_fwd / criss_cross_bwd call (the C++ kernels check the same)."""
    a = OpArgs(op)
    a.tensor("query", query, ("batch", "Cqk", "H", "W"), FLOAT_DTYPES)
    a.tensor("key", key, ("batch", "Cqk", "H", "W"), (query.dtype,))
    a.tensor("value", value, ("batch", "C", "H", "W"), (query.dtype,))
    a.require(a.sizes["H"] <= MAX_SIDE and a.sizes["W"] <= MAX_SIDE,
              f"H and W must be at most 2^20; got query of shape {tuple(query.shape)}")
    return a


def _check_fwd(query, key, value):
    _check_cc("criss_cross_fwd", query, key, value)


def _check_bwd(dout, query, key, value, out, lse):
    a = _check_cc("criss_cross_bwd", query, key, value)
    a.tensor("out", out, ("batch", "C", "H", "W"), (query.dtype,))
    a.tensor("dout", dout, ("batch", "C", "H", "W"), (query.dtype,))
    a.tensor("lse", lse, ("batch", "H", "W"), (acc_dtype(query.dtype),))


def _fake_fwd(query, key, value):
    B, _, H, W = query.shape
    return torch.empty_like(value), query.new_empty((B, H, W), dtype=acc_dtype(query.dtype))


def _fake_bwd(dout, query, key, value, out, lse):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _cc_gradients(backward, s, g):
    """Gradients of query, key and value through out (lse is not a public output)."""
    if g.out is None:
        return {}
    dq, dk, dv = backward(g.out.contiguous(), s.query, s.key, s.value, s.out, s.lse)
    return {"query": dq, "key": dk, "value": dv}


def _cc_limits(backend: str, channels: int) -> str | None:
    if backend == "triton" and channels > MAX_TRITON_CHANNELS:
        return f"supports up to {MAX_TRITON_CHANNELS} channels; got {channels}"
    return None


_CC = FusedOp(
    "criss_cross_attention", Kernel("criss_cross_fwd", _fake_fwd, _check_fwd),
    Kernel("criss_cross_bwd", _fake_bwd, _check_bwd), save=("query", "key", "value", "out", "lse"),
    gradients=_cc_gradients, triton_module="fastvision.triton.criss_cross", limits=_cc_limits)


# --------------------------------------------------------------------------
# Public API


def criss_cross_attention(query: Tensor, key: Tensor, value: Tensor, *, backend: str = "auto") -> Tensor:
    """Criss-cross attention (CCNet), fused: mmcv's ``CrissCrossAttention`` without
    its convolutions, gamma and residual.

    Query (h, w) attends to the keys of its column (i, w), i != h, and of its
    row (h, j), every j (the pixel itself once), in one softmax over the H + W
    logits ``q . k`` (no 1/sqrt(d) scaling), and sums the values there.
    The (batch, H, W, H + W) attention map is never stored: the forward keeps
    only the logsumexp of every query for the backward.

    Args:
        query: (batch, Cqk, H, W), float32 / float16 / bfloat16 (float64 on CPU).
        key: (batch, Cqk, H, W), query's shape and dtype.
        value: (batch, C, H, W), query's batch, H, W and dtype.
        backend: 'auto' (compiled kernel for the device), 'cpu', 'triton', or
            'reference' (pure PyTorch).

    Returns:
        out (batch, C, H, W) in query's dtype. Accumulation is float32
        (float64 for float64 inputs).

    Example::

        >>> import torch
        >>> from fastvision.ops import criss_cross_attention
        >>> q, k = torch.randn(2, 8, 5, 7), torch.randn(2, 8, 5, 7)
        >>> v = torch.randn(2, 16, 5, 7)
        >>> criss_cross_attention(q, k, v).shape
        torch.Size([2, 16, 5, 7])
    """
    _check_args(query, key, value)
    path = _CC.resolve(backend, query.device, channels=max(query.shape[1], value.shape[1]))
    if path == "reference":
        return criss_cross_attention_ref(query, key, value)
    out, _ = _CC(path, query.contiguous(), key.contiguous(), value.contiguous())
    return out
