"""Super token sampling and upsampling, as in STViT's ``StokenAttention`` (hhb072/STViT).

Public API: :func:`super_token_sampling` (pixels -> super tokens and the
pixel-token affinity) and :func:`super_token_upsample` (super tokens -> pixels
through that affinity). Layout NCHW, as STViT. Semantics in
:mod:`fastvision.reference.super_token`: zero padding to multiples of the
stoken size (the padded pixels take part), each pixel associated with the 9
tokens around its cell (out-of-grid neighbours are zero vectors that still take
softmax mass), logits scaled by C ** -0.5, ``n_iter`` rounds without gradient,
tokens ``sum_p A_pj x_p / (sum_p A_pj + 1e-12)`` with the gradient through x only.

This module checks arguments and describes the ``fastvision::super_token_*``
ops (schemas in csrc/registration.cpp) to the shared machinery in ``_library.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import (FLOAT_DTYPES, OpArgs, acc_dtype, as_int, check_same_device, check_tensor, dtype_name,
                       per_axis)
from ..reference.super_token import super_token_sampling_ref, super_token_upsample_ref
from ._library import FusedOp, Kernel

__all__ = ["super_token_sampling", "super_token_upsample"]

MAX_ITER = 1000  # the C++ kernels' bound (csrc/super_token/checks.h): a mistyped n_iter cannot hang a call
MAX_TRITON_CHANNELS = 512  # the Triton kernels keep a cell's 9 x C partial sums in registers


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------
# Direct calls of the registered ops (the C++ kernels check the same in C++)


def _grid(a: OpArgs, stoken_size, size, size_name: str) -> tuple[int, int, int, int]:
    """(h, w, hh, ww) of a direct call; `size` is the image's [H0, W0] (symbolic under
    torch.compile with dynamic shapes, where it comes from a tensor's shape)."""
    h, w = a.ints("stoken_size", stoken_size, 2, 1, 2 ** 62)
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        a.fail(f"{size_name} must be a list of 2 ints [H0, W0]; got {size!r}")
    for i, v in enumerate(size):
        if isinstance(v, torch.SymInt):
            continue
        a.integer(f"{size_name}[{i}]", v, 1, 2 ** 62)
    return h, w, _ceil_div(size[0], h), _ceil_div(size[1], w)


def _check_fits(a: OpArgs, t: torch.Tensor, h, w, hh, ww, size) -> None:
    """Every size the kernels form fits int64, as csrc/super_token/checks.h requires."""
    if any(isinstance(v, torch.SymInt) for v in (*t.shape, *size)):
        return
    B, C = t.shape[:2]
    limit = 2 ** 63 - 1
    a.require(max(hh * h, ww * w, hh * ww, h * w, B * hh * ww * h * w * 9, B * C * hh * h * ww * w) <= limit,
              f"stoken_size [{h}, {w}] is too large for an image of {size[0]} x {size[1]}: the padded sizes "
              "overflow int64")


def _check_sampling_fwd(x, stoken_size, n_iter):
    a = OpArgs("super_token_sampling_fwd")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        a.fail(f"x must be a 4-D tensor (batch, C, H0, W0); got {getattr(x, 'shape', type(x).__name__)}")
    a.tensor("x", x, ("batch", "C", "H0", "W0"), FLOAT_DTYPES)
    a.require(a.sizes["C"] >= 1, f"x must have at least one channel; got shape {tuple(x.shape)}")
    h, w, hh, ww = _grid(a, stoken_size, list(x.shape[2:]), "x's spatial size")
    _check_fits(a, x, h, w, hh, ww, list(x.shape[2:]))
    a.integer("n_iter", n_iter, 1, MAX_ITER)


def _check_tokens(a: OpArgs, name, t, stoken_size, size, size_name):
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        a.fail(f"{name} must be a 4-D tensor (batch, C, hh, ww); got {getattr(t, 'shape', type(t).__name__)}")
    h, w, hh, ww = _grid(a, stoken_size, size, size_name)
    _check_fits(a, t, h, w, hh, ww, size)
    a.tensor(name, t, ("batch", "C", hh, ww), FLOAT_DTYPES)
    a.require(a.sizes["C"] >= 1, f"{name} must have at least one channel; got shape {tuple(t.shape)}")
    return h, w, hh, ww


def _check_affinity(a: OpArgs, affinity, dtype, h, w, hh, ww):
    a.tensor("affinity", affinity, ("batch", hh * ww, h * w, 9), (acc_dtype(dtype),))


def _check_sampling_bwd(dstokens, affinity, asum, stoken_size, size):
    a = OpArgs("super_token_sampling_bwd")
    h, w, hh, ww = _check_tokens(a, "dstokens", dstokens, stoken_size, size, "size")
    _check_affinity(a, affinity, dstokens.dtype, h, w, hh, ww)
    a.tensor("asum", asum, ("batch", hh, ww), (acc_dtype(dstokens.dtype),))


def _check_upsample_fwd(stokens, affinity, stoken_size, out_size):
    a = OpArgs("super_token_upsample_fwd")
    h, w, hh, ww = _check_tokens(a, "stokens", stokens, stoken_size, out_size, "out_size")
    _check_affinity(a, affinity, stokens.dtype, h, w, hh, ww)


def _check_upsample_bwd(dout, stokens, affinity, stoken_size, affinity_grad=True):
    a = OpArgs("super_token_upsample_bwd")
    if not isinstance(dout, torch.Tensor) or dout.dim() != 4:
        a.fail(f"dout must be a 4-D tensor (batch, C, H0, W0); got {getattr(dout, 'shape', type(dout).__name__)}")
    a.tensor("dout", dout, ("batch", "C", "H0", "W0"), FLOAT_DTYPES)
    h, w, hh, ww = _check_tokens(a, "stokens", stokens, stoken_size, list(dout.shape[2:]), "dout's spatial size")
    a.require(stokens.dtype == dout.dtype, f"stokens must have dout's dtype {dtype_name(dout.dtype)}; got "
              f"{dtype_name(stokens.dtype)}")
    _check_affinity(a, affinity, stokens.dtype, h, w, hh, ww)


# --------------------------------------------------------------------------
# Fake kernels and gradients


def _fake_sampling_fwd(x, stoken_size, n_iter):
    (h, w), (B, C, H0, W0) = stoken_size, x.shape
    hh, ww = _ceil_div(H0, h), _ceil_div(W0, w)
    acc = acc_dtype(x.dtype)
    return (x.new_empty((B, C, hh, ww)), x.new_empty((B, hh * ww, h * w, 9), dtype=acc),
            x.new_empty((B, hh, ww), dtype=acc))


def _fake_sampling_bwd(dstokens, affinity, asum, stoken_size, size):
    return dstokens.new_empty((*dstokens.shape[:2], *size))


def _fake_upsample_fwd(stokens, affinity, stoken_size, out_size):
    return stokens.new_empty((*stokens.shape[:2], *out_size))


def _fake_upsample_bwd(dout, stokens, affinity, stoken_size, affinity_grad=True):
    return torch.empty_like(stokens), torch.empty_like(affinity) if affinity_grad else affinity.new_empty((0,))


def _sampling_gradients(backward, s, g):
    """dx through stokens only: the affinity (and asum) are computed without gradient, as in STViT."""
    if g.stokens is None:
        return {}
    dx = backward(g.stokens.contiguous(), s.affinity, s.asum, s.stoken_size, list(s.x.shape[2:]))
    return {"x": dx}


def _upsample_gradients(backward, s, g):
    """daffinity only when asked for: StokenAttention's affinity is detached (as in STViT),
    and the kernels then skip that product (it returns empty)."""
    affinity_grad = "affinity" in s.needs_grad
    dstokens, daffinity = backward(g.out.contiguous(), s.stokens, s.affinity, s.stoken_size, affinity_grad)
    return {"stokens": dstokens, "affinity": daffinity if affinity_grad else None}


def _limits(backend: str, channels: int) -> str | None:
    if backend == "triton" and channels > MAX_TRITON_CHANNELS:
        return f"supports up to {MAX_TRITON_CHANNELS} channels; got C={channels}"
    return None


_SAMPLING = FusedOp(
    "super_token_sampling",
    Kernel("super_token_sampling_fwd", _fake_sampling_fwd, _check_sampling_fwd),
    Kernel("super_token_sampling_bwd", _fake_sampling_bwd, _check_sampling_bwd),
    save=("x", "affinity", "asum"), gradients=_sampling_gradients,
    triton_module="fastvision.triton.super_token", limits=_limits)

_UPSAMPLE = FusedOp(
    "super_token_upsample",
    Kernel("super_token_upsample_fwd", _fake_upsample_fwd, _check_upsample_fwd),
    Kernel("super_token_upsample_bwd", _fake_upsample_bwd, _check_upsample_bwd),
    save=("stokens", "affinity"), gradients=_upsample_gradients,
    triton_module="fastvision.triton.super_token", limits=_limits)


# --------------------------------------------------------------------------
# Public API


def _stoken_size(stoken_size, fn: str) -> tuple[int, int]:
    return per_axis(stoken_size, 2, "stoken_size", minimum=1, context=f"for {fn}")


def super_token_sampling(x: Tensor, stoken_size: int | Sequence[int], n_iter: int = 1, *,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Super tokens of an image and each pixel's affinity to the 9 tokens around it (STViT).

    Args:
        x: (batch, C, H, W), float32 / float16 / bfloat16 (float64 on CPU).
        stoken_size: (h, w) or one int: the cell of pixels each token starts from.
            x is zero-padded at the right and bottom to multiples of it (the padded
            pixels take part, as in STViT); hh = ceil(H / h), ww = ceil(W / w).
        n_iter: association rounds (>= 1); all but the last only refine the tokens.
        backend: 'auto', 'cpu', 'triton' (CUDA; CPU tensors under TRITON_INTERPRET=1),
            'cuda' (no CUDA C++ kernel: says so) or 'reference'.

    Returns:
        stokens (batch, C, hh, ww) in x's dtype: ``sum_p A_pj x_p / (sum_p A_pj + 1e-12)``,
        differentiable in x; affinity (batch, hh*ww, h*w, 9), the softmax over each pixel's
        9 neighbour tokens (k = 3 * dy + dx, token (i + dy - 1, j + dx - 1) of cell (i, j)),
        float32 (float64 for float64 x), without gradient (STViT computes it under no_grad).

    Example::

        >>> import torch
        >>> from fastvision.ops import super_token_sampling
        >>> stokens, affinity = super_token_sampling(torch.randn(2, 16, 14, 13), 4)
        >>> stokens.shape, affinity.shape
        (torch.Size([2, 16, 4, 4]), torch.Size([2, 16, 16, 9]))
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="(batch, C, H, W)")
    h, w = _stoken_size(stoken_size, "super_token_sampling")
    n_iter = as_int(n_iter, "n_iter", 1)
    if n_iter > MAX_ITER:
        raise ValueError(f"n_iter must be <= {MAX_ITER}; got {n_iter}")
    B, C, H, W = x.shape
    if C < 1 or H < 1 or W < 1:
        raise ValueError(f"x must have C, H and W >= 1; got shape {tuple(x.shape)}")
    path = _SAMPLING.resolve(backend, x.device, channels=C)
    if path == "reference":
        return super_token_sampling_ref(x, (h, w), n_iter)
    stokens, affinity, _ = _SAMPLING(path, x.contiguous(), [h, w], n_iter)
    return stokens, affinity.detach()


def super_token_upsample(stokens: Tensor, affinity: Tensor, stoken_size: int | Sequence[int],
                         out_size: int | Sequence[int], *, backend: str = "auto") -> Tensor:
    """Maps super tokens back to pixels: ``out_p = sum_k A_pk S_k`` over the 9 tokens around p's cell.

    Args:
        stokens: (batch, C, hh, ww), float32 / float16 / bfloat16 (float64 on CPU).
        affinity: (batch, hh*ww, h*w, 9), as :func:`super_token_sampling` returns it; any
            float dtype (the kernels read it in float32, float64 for float64 stokens).
        stoken_size: (h, w) or one int.
        out_size: (H, W) or one int, the image size: hh = ceil(H / h), ww = ceil(W / w);
            the padded pixels are cropped.
        backend: as for :func:`super_token_sampling`.

    Returns:
        out (batch, C, H, W) in stokens' dtype, differentiable in stokens and affinity.

    Example::

        >>> import torch
        >>> from fastvision.ops import super_token_sampling, super_token_upsample
        >>> x = torch.randn(2, 16, 14, 13)
        >>> stokens, affinity = super_token_sampling(x, 4)
        >>> super_token_upsample(stokens, affinity, 4, (14, 13)).shape
        torch.Size([2, 16, 14, 13])
    """
    check_tensor("stokens", stokens, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="(batch, C, hh, ww)")
    check_tensor("affinity", affinity, ndim=4, dtypes=FLOAT_DTYPES, shape_doc="(batch, hh*ww, h*w, 9)")
    check_same_device(stokens=stokens, affinity=affinity)
    h, w = _stoken_size(stoken_size, "super_token_upsample")
    H, W = per_axis(out_size, 2, "out_size", minimum=1, context="for super_token_upsample")
    B, C, hh, ww = stokens.shape
    if C < 1 or (hh, ww) != (_ceil_div(H, h), _ceil_div(W, w)):
        raise ValueError(f"stokens must have shape (batch, C >= 1, ceil(H / h), ceil(W / w)) = (batch, C, "
                         f"{_ceil_div(H, h)}, {_ceil_div(W, w)}) for out_size ({H}, {W}) and stoken_size "
                         f"({h}, {w}); got {tuple(stokens.shape)}")
    if tuple(affinity.shape) != (B, hh * ww, h * w, 9):
        raise ValueError(f"affinity must have shape (batch, hh*ww, h*w, 9) = {(B, hh * ww, h * w, 9)}; "
                         f"got {tuple(affinity.shape)}")
    path = _UPSAMPLE.resolve(backend, stokens.device, channels=C)
    if path == "reference":
        return super_token_upsample_ref(stokens, affinity, (h, w), (H, W))
    aff = affinity.to(acc_dtype(stokens.dtype)).contiguous()
    return _UPSAMPLE(path, stokens.contiguous(), aff, [h, w], [H, W])
