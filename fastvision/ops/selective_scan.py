"""Selective scan (Mamba S6) and Vim's bidirectional scan.

Public API: :func:`selective_scan` (drop-in for mamba_ssm's ``selective_scan_fn``)
and :func:`bi_selective_scan` (Vim's bimamba v2 scan, fused). This module
checks arguments, registers fake kernels and autograd for the
``fastvision::*selective_scan*`` ops (schemas in csrc/registration.cpp), wires
the Triton kernels to the CUDA device, and picks the backend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _extension
from ..reference.selective_scan import bi_selective_scan_ref, selective_scan_ref
from ._checks import check_backend, check_same_device, check_tensor, forbid_double_backward

__all__ = ["selective_scan", "bi_selective_scan", "scan_chunk_len"]

MAX_TRITON_STATE = 256  # d_state limit of the Triton kernels (the anchor's too)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_ops = torch.ops.fastvision


def scan_chunk_len(d_state: int) -> int:
    """Checkpoint interval (time steps) for a given d_state.

    The forward keeps the state after every chunk; the backward recomputes
    within a chunk. A chunk is also the Triton tile's time extent, so it
    shrinks as N grows to keep [N, chunk] tiles near 2-4K elements.
    """
    n = 1 << max(d_state - 1, 0).bit_length()
    return max(16, min(128, 2048 // n))


# --------------------------------------------------------------------------
# Argument checks and normalisation


class _Scan(NamedTuple):
    """Kernel-ready arguments of one scan direction."""
    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    z: torch.Tensor | None
    delta_bias: torch.Tensor


def _check_BC(name: str, X: torch.Tensor, batch: int, dim: int, N: int, L: int) -> None:
    check_tensor(name, X, dtypes=_FLOAT_DTYPES)
    if X.dim() == 2:
        expected = (dim, N)
    elif X.dim() == 3:
        expected = (batch, N, L)
    elif X.dim() == 4:
        G = X.shape[1]
        if G < 1 or dim % G != 0:
            raise ValueError(f"{name}: the number of groups G={G} (dim 1 of {name} with shape "
                             f"{tuple(X.shape)}) must divide dim={dim}")
        expected = (batch, G, N, L)
    else:
        raise ValueError(f"{name} must have shape (dim, N), (batch, N, L) or (batch, G, N, L); "
                         f"got a {X.dim()}-D tensor of shape {tuple(X.shape)}")
    if tuple(X.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (batch={batch}, dim={dim}, N={N}, L={L}); "
                         f"got {tuple(X.shape)}")


def _prepare(u, delta, A, B, C, D, z, delta_bias, suffix: str = "") -> _Scan:
    """Validates one direction's arguments and returns them kernel-ready.

    Normalisation uses differentiable torch ops (casts, unsqueeze,
    contiguous), so autograd carries gradients back to the caller's tensors.
    """
    s = suffix
    check_tensor("u" + s, u, ndim=3, dtypes=_FLOAT_DTYPES, shape_doc="(batch, dim, L)")
    batch, dim, L = u.shape
    check_tensor("delta" + s, delta, shape=tuple(u.shape), dtypes=(u.dtype,))
    check_tensor("A" + s, A, ndim=2, dtypes=(torch.float32, torch.float64), shape_doc="(dim, N) real")
    if A.shape[0] != dim:
        raise ValueError(f"A{s} must have shape (dim, N) with dim={dim} (u{s}.shape[1]); got {tuple(A.shape)}")
    N = A.shape[1]
    if N < 1:
        raise ValueError(f"A{s}: d_state N must be >= 1; got shape {tuple(A.shape)}")
    _check_BC("B" + s, B, batch, dim, N, L)
    _check_BC("C" + s, C, batch, dim, N, L)
    if z is not None:
        check_tensor("z" + s, z, shape=tuple(u.shape), dtypes=(u.dtype,))
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_tensor(name + s, t, shape=(dim,), dtypes=_FLOAT_DTYPES)
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)

    acc = torch.float64 if u.dtype == torch.float64 else torch.float32

    def per_channel(t):
        return u.new_zeros(dim, dtype=acc) if t is None else t.to(acc).contiguous()

    def bc(X):
        return (X.unsqueeze(1) if X.dim() == 3 else X).contiguous()

    return _Scan(u.contiguous(), delta.contiguous(), A.to(acc).contiguous(), bc(B), bc(C),
                 per_channel(D), None if z is None else z.contiguous(), per_channel(delta_bias))


def _check_backend(backend: str, device: torch.device, d_state: int) -> str:
    missing = ("fastvision was built without its CUDA C++ kernels "
               f"({_extension.CUDA_ERROR or 'no nvcc at build time'})")
    path = check_backend(backend, device, _extension.CUDA_LOADED, missing)
    if path == "triton" and d_state > MAX_TRITON_STATE:
        raise ValueError(f"backend='triton' supports d_state N <= {MAX_TRITON_STATE}; got N={d_state}")
    return path


# --------------------------------------------------------------------------
# Fake kernels (shapes only: torch.compile, meta tensors)


def _acc(u):
    return torch.float64 if u.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastvision::selective_scan_fwd")
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_len):
    batch, dim, L = u.shape
    N = A.shape[1]
    nchunks = -(-L // chunk_len)
    return (torch.empty_like(u), u.new_empty(batch, dim, N, dtype=_acc(u)),
            u.new_empty(batch, dim, nchunks, N, dtype=_acc(u)))


@torch.library.register_fake("fastvision::selective_scan_bwd")
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus,
      reverse, chunk_len):
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), torch.empty_like(D), dz, torch.empty_like(delta_bias))


@torch.library.register_fake("fastvision::bi_selective_scan_fwd")
def _(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
      delta_softplus, chunk_len):
    batch, dim, L = u.shape
    shape = (batch, dim, -(-L // chunk_len), A.shape[1])
    return torch.empty_like(u), u.new_empty(shape, dtype=_acc(u)), u.new_empty(shape, dtype=_acc(u))


# --------------------------------------------------------------------------
# Autograd. The same backward glue serves the registered ops (any device) and
# the direct Triton path (Triton interpreter on CPU, or backend='triton').


def _scan_grads(bwd, dout, dlast, s: _Scan, states, softplus, reverse, chunk_len):
    """Gradients for the 8 tensor inputs of one direction; dz None without z."""
    if dlast is not None:
        dlast = dlast.to(states.dtype).contiguous()
    g = bwd(dout.contiguous(), dlast, *s, states, softplus, reverse, chunk_len)
    du, ddelta, dA, dB, dC, dD, dz, dbias = g
    return du, ddelta, dA, dB, dC, dD, (dz if s.z is not None else None), dbias


def _bi_grads(bwd, dout, fwd: _Scan, bwd_dir: _Scan, states, states_b, softplus, chunk_len):
    """Gradients of the bidirectional scan: one backward per direction, dz summed."""
    gf = _scan_grads(bwd, dout, None, fwd, states, softplus, False, chunk_len)
    gb = _scan_grads(bwd, dout, None, bwd_dir, states_b, softplus, True, chunk_len)
    dz = None if fwd.z is None else gf[6] + gb[6]
    return (*gf[:6], dz, gf[7], *gb[:6], gb[7])


def _fwd_setup(ctx, inputs, output):
    *tensors, softplus, reverse, chunk_len = inputs
    z = tensors[6]
    ctx.save_for_backward(*tensors[:6], tensors[7], output[2], *([z] if z is not None else []))
    ctx.has_z = z is not None
    ctx.flags = (softplus, reverse, chunk_len)


def _fwd_backward(ctx, dout, dlast, dstates):
    u, delta, A, B, C, D, delta_bias, states, *z = ctx.saved_tensors
    s = _Scan(u, delta, A, B, C, D, z[0] if ctx.has_z else None, delta_bias)
    grads = _scan_grads(_ops.selective_scan_bwd, dout, dlast, s, states, *ctx.flags)
    return (*grads, None, None, None)


torch.library.register_autograd("fastvision::selective_scan_fwd", _fwd_backward, setup_context=_fwd_setup)


def _bi_setup(ctx, inputs, output):
    *tensors, softplus, chunk_len = inputs
    z = tensors[6]
    ctx.has_z = z is not None
    kept = [t for i, t in enumerate(tensors) if i != 6]
    ctx.save_for_backward(*kept, output[1], output[2], *([z] if z is not None else []))
    ctx.flags = (softplus, chunk_len)


def _bi_backward(ctx, dout, dstates, dstates_b):
    saved = ctx.saved_tensors
    z = saved[16] if ctx.has_z else None
    fwd = _Scan(*saved[0:6], z, saved[6])
    bwd_dir = _Scan(*saved[7:13], z, saved[13])
    grads = _bi_grads(_ops.selective_scan_bwd, dout, fwd, bwd_dir, saved[14], saved[15], *ctx.flags)
    return (*grads, None, None)


torch.library.register_autograd("fastvision::bi_selective_scan_fwd", _bi_backward, setup_context=_bi_setup)


forbid_double_backward("fastvision::selective_scan_bwd", "selective_scan")


# --------------------------------------------------------------------------
# Triton: registered as the CUDA kernels unless the CUDA C++ library is
# loaded; always reachable directly with backend='triton'.


def _triton():
    from ..triton import selective_scan as tk
    return tk


if _extension.triton_available() and not _extension.CUDA_LOADED:
    torch.library.register_kernel("fastvision::selective_scan_fwd", "cuda",
                                  lambda *a: _triton().selective_scan_fwd(*a))
    torch.library.register_kernel("fastvision::selective_scan_bwd", "cuda",
                                  lambda *a: _triton().selective_scan_bwd(*a))
    torch.library.register_kernel("fastvision::bi_selective_scan_fwd", "cuda",
                                  lambda *a: _triton().bi_selective_scan_fwd(*a))


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flags, *tensors):
        softplus, reverse, chunk_len, has_z = flags
        s = _Scan(*tensors[:6], tensors[6] if has_z else None, tensors[7])
        out, last, states = _triton().selective_scan_fwd(*s, softplus, reverse, chunk_len)
        ctx.scan, ctx.states, ctx.flags = s, states, flags
        ctx.mark_non_differentiable(states)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        softplus, reverse, chunk_len, _ = ctx.flags
        grads = _scan_grads(_triton().selective_scan_bwd, dout, dlast, ctx.scan, ctx.states,
                            softplus, reverse, chunk_len)
        return (None, *grads)


class _TritonBiScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flags, *tensors):
        softplus, chunk_len, has_z = flags
        z = tensors[6] if has_z else None
        fwd = _Scan(*tensors[0:6], z, tensors[7])
        bwd_dir = _Scan(*tensors[8:14], z, tensors[14])
        out, st, st_b = _triton().bi_selective_scan_fwd(*fwd, *bwd_dir[:6], bwd_dir.delta_bias,
                                                        softplus, chunk_len)
        ctx.dirs, ctx.states, ctx.flags = (fwd, bwd_dir), (st, st_b), flags
        return out

    @staticmethod
    def backward(ctx, dout):
        softplus, chunk_len, _ = ctx.flags
        grads = _bi_grads(_triton().selective_scan_bwd, dout, *ctx.dirs, *ctx.states, softplus, chunk_len)
        return (None, *grads)


# --------------------------------------------------------------------------
# Public API


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, reverse=False, backend="auto"):
    """Selective scan (S6), drop-in for mamba_ssm's ``selective_scan_fn``.

    Args:
        u, delta, z: (batch, dim, L), one dtype (float32, float16, bfloat16; float64 on CPU).
        A: (dim, N) real (float32).
        B, C: (dim, N) constant, (batch, N, L) variable, or (batch, G, N, L) grouped
            (channel d uses group d // (dim // G)).
        D, delta_bias: (dim,) or None.
        delta_softplus: apply softplus (threshold 20) to delta + delta_bias.
        return_last_state: also return the final state (batch, dim, N), float32.
        reverse: run the recurrence from t = L-1 down to 0 (no flipped copies).
        backend: 'auto' (compiled kernel for the device), 'cpu', 'cuda' (CUDA C++),
            'triton', or 'reference' (pure PyTorch).

    Returns:
        out (batch, dim, L) in u's dtype, and last_state when return_last_state.
        State and accumulation are float32 (float64 for float64 inputs).
    """
    s = _prepare(u, delta, A, B, C, D, z, delta_bias)
    path = _check_backend(backend, u.device, A.shape[1])
    if path == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state, reverse=reverse)
    chunk_len = scan_chunk_len(A.shape[1])
    if path == "triton":
        zz = s.z if s.z is not None else s.u.new_empty(0)
        out, last = _TritonScan.apply((delta_softplus, reverse, chunk_len, s.z is not None),
                                      *s[:6], zz, s.delta_bias)
    else:
        out, last, _ = _ops.selective_scan_fwd(*s, delta_softplus, reverse, chunk_len)
    return (out, last) if return_last_state else out


def bi_selective_scan(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b,
                      delta_bias_b, delta_softplus=True, *, backend="auto"):
    """Vim's bidirectional ("v2") selective scan in one fused kernel launch.

    Equals ``scan(u, delta, A, B, C, D, z) + flip(scan(flip(u_b), flip(delta_b), A_b,
    flip(B_b), flip(C_b), D_b, flip(z)))``: the *_b scan runs from t = L-1 down
    to 0 over the tensors as given, so no flipped copies are made. Both
    directions are gated by silu(z) and summed in float32. Shapes as in
    :func:`selective_scan`; the *_b tensors mirror the forward ones.
    """
    fwd = _prepare(u, delta, A, B, C, D, z, delta_bias)
    pairs = (("u", u, u_b), ("delta", delta, delta_b), ("A", A, A_b), ("B", B, B_b), ("C", C, C_b))
    for name, f, b in pairs:
        if f.shape != b.shape or f.dtype != b.dtype:
            raise ValueError(f"bi_selective_scan: {name}_b must have the shape and dtype of {name}, "
                             f"{tuple(f.shape)} {f.dtype}; got {tuple(b.shape)} {b.dtype}")
    bwd_dir = _prepare(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b, suffix="_b")
    check_same_device(u=u, u_b=u_b)
    path = _check_backend(backend, u.device, A.shape[1])
    if path == "reference":
        return bi_selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b,
                                     C_b, D_b, delta_bias_b, delta_softplus)
    chunk_len = scan_chunk_len(A.shape[1])
    if path == "triton":
        zz = fwd.z if fwd.z is not None else fwd.u.new_empty(0)
        return _TritonBiScan.apply((delta_softplus, chunk_len, fwd.z is not None), *fwd[:6], zz,
                                   fwd.delta_bias, *bwd_dir[:6], bwd_dir.delta_bias)
    out, _, _ = _ops.bi_selective_scan_fwd(*fwd, *bwd_dir[:6], bwd_dir.delta_bias, delta_softplus, chunk_len)
    return out
