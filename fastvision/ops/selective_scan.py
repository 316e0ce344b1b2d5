"""Selective scan (Mamba S6) and Vim's bidirectional scan.

Public API: :func:`selective_scan` (drop-in for mamba_ssm's ``selective_scan_fn``)
and :func:`bi_selective_scan` (Vim's bimamba v2 scan, fused). This module
checks arguments and describes the ``fastvision::*selective_scan*`` ops
(schemas in csrc/registration.cpp) to the shared machinery in
``_library.py``: fake kernels, direct-call checks, the gradient formula,
Triton kernels, backend limits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, OpArgs, acc_dtype, as_bool, check_same_device, check_tensor
from ..reference.selective_scan import bi_selective_scan_ref, selective_scan_ref
from ._library import FusedOp, Kernel

__all__ = ["selective_scan", "bi_selective_scan", "scan_chunk_len"]

MAX_TRITON_STATE = 256  # d_state limit of the Triton kernels (the anchor's too)


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
    check_tensor(name, X, dtypes=FLOAT_DTYPES)
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
    check_tensor("u" + s, u, ndim=3, dtypes=FLOAT_DTYPES, shape_doc="(batch, dim, L)")
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
            check_tensor(name + s, t, shape=(dim,), dtypes=FLOAT_DTYPES)
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)

    acc = acc_dtype(u.dtype)

    def per_channel(t):
        return u.new_zeros(dim, dtype=acc) if t is None else t.to(acc).contiguous()

    def bc(X):
        return (X.unsqueeze(1) if X.dim() == 3 else X).contiguous()

    return _Scan(u.contiguous(), delta.contiguous(), A.to(acc).contiguous(), bc(B), bc(C),
                 per_channel(D), None if z is None else z.contiguous(), per_channel(delta_bias))


# --------------------------------------------------------------------------
# Direct calls: argument checks and fake kernels of the registered ops


def _check_direction(a: OpArgs, u, delta, A, B, C, D, z, delta_bias, s: str = "") -> None:
    """One direction's tensors of a direct call (C++ kernels check the same in C++)."""
    a.tensor("u" + s, u, ("batch", "dim", "L"), FLOAT_DTYPES)
    a.tensor("delta" + s, delta, ("batch", "dim", "L"), (u.dtype,))
    acc = (acc_dtype(u.dtype),)
    a.tensor("A" + s, A, ("dim", "N"), acc)
    a.require(a.sizes["N"] >= 1, f"A{s} must have d_state N >= 1; got shape {tuple(A.shape)}")
    for name, X in (("B" + s, B), ("C" + s, C)):
        if isinstance(X, torch.Tensor) and X.dim() == 4:
            a.tensor(name, X, ("batch", "G_" + name, "N", "L"), FLOAT_DTYPES)
            a.require(X.shape[1] >= 1 and a.sizes["dim"] % X.shape[1] == 0,
                      f"{name}: the number of groups {X.shape[1]} must divide dim={a.sizes['dim']}")
        else:
            a.tensor(name, X, ("dim", "N"), FLOAT_DTYPES)
    a.tensor("D" + s, D, ("dim",), acc)
    a.tensor("z", z, ("batch", "dim", "L"), (u.dtype,), optional=True)
    a.tensor("delta_bias" + s, delta_bias, ("dim",), acc)


def _check_chunk_len(a: OpArgs, chunk_len) -> None:
    a.integer("chunk_len", chunk_len, 1, 1 << 20)
    a.require(chunk_len & (chunk_len - 1) == 0, f"chunk_len must be a power of 2; got {chunk_len}")


def _check_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_len):
    a = OpArgs("selective_scan_fwd")
    _check_direction(a, u, delta, A, B, C, D, z, delta_bias)
    _check_chunk_len(a, chunk_len)


def _check_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus,
               reverse, chunk_len):
    a = OpArgs("selective_scan_bwd")
    _check_direction(a, u, delta, A, B, C, D, z, delta_bias)
    _check_chunk_len(a, chunk_len)
    acc = (acc_dtype(u.dtype),)
    a.tensor("dout", dout, ("batch", "dim", "L"), (u.dtype,))
    a.tensor("dlast_state", dlast_state, ("batch", "dim", "N"), acc, optional=True)
    a.tensor("chunk_states", chunk_states, ("batch", "dim", -(-a.sizes["L"] // chunk_len), "N"), acc)


def _check_bi_fwd(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
                  delta_softplus, chunk_len):
    a = OpArgs("bi_selective_scan_fwd")
    _check_direction(a, u, delta, A, B, C, D, z, delta_bias)
    _check_direction(a, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b, "_b")
    for name, X, X_b in (("B", B, B_b), ("C", C, C_b)):  # one task geometry serves both directions
        a.require(X.shape[:2] == X_b.shape[:2] if X.dim() == 4 else X_b.dim() == 2,
                  f"{name}_b must have {name}'s layout {tuple(X.shape)}; got {tuple(X_b.shape)}")
    _check_chunk_len(a, chunk_len)


def _states(u, A, chunk_len):
    batch, dim, L = u.shape
    return u.new_empty(batch, dim, -(-L // chunk_len), A.shape[1], dtype=acc_dtype(u.dtype))


def _fake_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_len):
    batch, dim, _ = u.shape
    return (torch.empty_like(u), u.new_empty(batch, dim, A.shape[1], dtype=acc_dtype(u.dtype)),
            _states(u, A, chunk_len))


def _fake_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus,
              reverse, chunk_len):
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), torch.empty_like(D), dz, torch.empty_like(delta_bias))


def _fake_bi_fwd(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
                 delta_softplus, chunk_len):
    return torch.empty_like(u), _states(u, A, chunk_len), _states(u, A, chunk_len)


# --------------------------------------------------------------------------
# Gradients (one formula for every backend)

_DIRECTION = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _direction_grads(backward, dout, dlast_state, s, suffix, chunk_states, softplus, reverse, chunk_len):
    """Gradients of one scan direction, by input name (suffixed), from its backward kernel."""
    t = [getattr(s, n + suffix) if n != "z" else s.z for n in _DIRECTION]
    grads = backward(dout, dlast_state, *t, chunk_states, softplus, reverse, chunk_len)
    out = {n + suffix: g for n, g in zip(_DIRECTION, grads) if n != "z"}
    out["z"] = grads[6] if s.z is not None else None
    return out


def _scan_gradients(backward, s, g):
    dout = (g.out if g.out is not None else torch.zeros_like(s.u)).contiguous()
    dlast = None if g.last_state is None else g.last_state.to(s.chunk_states.dtype).contiguous()
    return _direction_grads(backward, dout, dlast, s, "", s.chunk_states, s.delta_softplus, s.reverse,
                            s.chunk_len)


def _bi_scan_gradients(backward, s, g):
    """Each direction's backward on the shared output gradient; z's gradients summed."""
    dout = g.out.contiguous()
    forward = _direction_grads(backward, dout, None, s, "", s.chunk_states, s.delta_softplus, False,
                               s.chunk_len)
    reverse = _direction_grads(backward, dout, None, s, "_b", s.chunk_states_b, s.delta_softplus, True,
                               s.chunk_len)
    dz = None if s.z is None else forward["z"] + reverse.pop("z")
    return {**forward, **reverse, "z": dz}


def _scan_limits(backend: str, d_state: int, variable_bc: bool = False) -> str | None:
    if backend == "triton" and d_state > MAX_TRITON_STATE:
        return f"supports d_state N <= {MAX_TRITON_STATE}; got N={d_state}"
    if backend == "cuda" and variable_bc and torch.are_deterministic_algorithms_enabled():
        # The C++ op cannot see the flag (not in the stable ABI): decided here.
        return ("adds variable dB/dC with float atomics in its backward, which "
                "torch.use_deterministic_algorithms(True) rules out; backend='triton' (or 'auto') sums "
                "per-channel partials in a fixed order")
    return None


_BWD = Kernel("selective_scan_bwd", _fake_bwd, _check_bwd)
_TRITON = "fastvision.triton.selective_scan"
_SCAN = FusedOp(
    "selective_scan", Kernel("selective_scan_fwd", _fake_fwd, _check_fwd), _BWD,
    save=(*_DIRECTION, "chunk_states"), gradients=_scan_gradients, triton_module=_TRITON,
    limits=_scan_limits)
_BI_SCAN = FusedOp(
    "bi_selective_scan", Kernel("bi_selective_scan_fwd", _fake_bi_fwd, _check_bi_fwd), _BWD,
    save=(*_DIRECTION, *(n + "_b" for n in _DIRECTION if n != "z"), "chunk_states", "chunk_states_b"),
    gradients=_bi_scan_gradients, triton_module=_TRITON, limits=_scan_limits)


# --------------------------------------------------------------------------
# Public API


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, reverse: bool = False,
                   backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
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

    Example::

        >>> import torch
        >>> from fastvision.ops import selective_scan
        >>> u, delta = torch.randn(2, 64, 100), torch.rand(2, 64, 100)
        >>> A = -torch.rand(64, 16)
        >>> B, C = torch.randn(2, 16, 100), torch.randn(2, 16, 100)
        >>> selective_scan(u, delta, A, B, C, D=torch.ones(64), delta_softplus=True).shape
        torch.Size([2, 64, 100])
    """
    s = _prepare(u, delta, A, B, C, D, z, delta_bias)
    softplus, reverse = as_bool(delta_softplus, "delta_softplus"), as_bool(reverse, "reverse")
    path = _SCAN.resolve(backend, u.device, d_state=A.shape[1], variable_bc=B.dim() > 2 or C.dim() > 2)
    if path == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, softplus, return_last_state,
                                  reverse=reverse)
    out, last, _ = _SCAN(path, *s, softplus, reverse, scan_chunk_len(A.shape[1]))
    return (out, last) if as_bool(return_last_state, "return_last_state") else out


def bi_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                      z: Tensor | None, delta_bias: Tensor | None, u_b: Tensor, delta_b: Tensor, A_b: Tensor,
                      B_b: Tensor, C_b: Tensor, D_b: Tensor | None, delta_bias_b: Tensor | None,
                      delta_softplus: bool = True, *, backend: str = "auto") -> Tensor:
    """Vim's bidirectional ("v2") selective scan in one fused kernel launch.

    Equals ``scan(u, delta, A, B, C, D, z) + flip(scan(flip(u_b), flip(delta_b), A_b,
    flip(B_b), flip(C_b), D_b, flip(z)))``: the *_b scan runs from t = L-1 down
    to 0 over the tensors as given, so no flipped copies are made. Both
    directions are gated by silu(z) and summed in float32. Shapes as in
    :func:`selective_scan`; the *_b tensors mirror the forward ones.

    Example::

        >>> import torch
        >>> from fastvision.ops import bi_selective_scan
        >>> def direction():
        ...     return (torch.randn(2, 64, 100), torch.rand(2, 64, 100), -torch.rand(64, 16),
        ...             torch.randn(2, 16, 100), torch.randn(2, 16, 100), torch.ones(64))
        >>> u, delta, A, B, C, D = direction()
        >>> u_b, delta_b, A_b, B_b, C_b, D_b = direction()
        >>> z, bias = torch.randn(2, 64, 100), torch.zeros(64)
        >>> bi_selective_scan(u, delta, A, B, C, D, z, bias, u_b, delta_b, A_b, B_b, C_b, D_b, bias).shape
        torch.Size([2, 64, 100])
    """
    forward = _prepare(u, delta, A, B, C, D, z, delta_bias)
    pairs = (("u", u, u_b), ("delta", delta, delta_b), ("A", A, A_b), ("B", B, B_b), ("C", C, C_b))
    for name, f, b in pairs:
        if f.shape != b.shape or f.dtype != b.dtype:
            raise ValueError(f"bi_selective_scan: {name}_b must have the shape and dtype of {name}, "
                             f"{tuple(f.shape)} {f.dtype}; got {tuple(b.shape)} {b.dtype}")
    reverse = _prepare(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b, suffix="_b")
    check_same_device(u=u, u_b=u_b)
    softplus = as_bool(delta_softplus, "delta_softplus")
    path = _BI_SCAN.resolve(backend, u.device, d_state=A.shape[1], variable_bc=B.dim() > 2 or C.dim() > 2)
    if path == "reference":
        return bi_selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b,
                                     C_b, D_b, delta_bias_b, softplus)
    out, _, _ = _BI_SCAN(path, *forward, *reverse[:6], reverse.delta_bias, softplus,
                         scan_chunk_len(A.shape[1]))
    return out
