"""Multi-scale deformable attention (Deformable DETR's ``MSDeformAttnFunction``).

Public API: :func:`ms_deform_attn` (value, value_spatial_shapes,
value_level_start_index, sampling_locations, attention_weights) -> (N, Lq, M * D);
the semantics of ``ms_deform_attn_core_pytorch`` (see
:mod:`fastvision.reference.deform_attn`).

This module checks arguments and describes the ``fastvision::ms_deform_attn_fwd``
/ ``fastvision::ms_deform_attn_bwd`` ops (schemas in csrc/registration.cpp) to
the shared machinery in ``_library.py``. The layer is in ``deform_attn_layers.py``.

The level tables (int64 tensors) are read on the host only to check them: on
CPU on every call (cheap); on CUDA once per tables tensor (one device sync,
remembered while the tensors and their version counters stay the same, as
Deformable DETR reuses one table for all its layers), and never under
torch.compile or on meta tensors. No kernel takes a size from them on the
host, and the Triton kernels mask every value read to [0, S), so a direct
call of the op with inconsistent tables on CUDA reads garbage, never out of
bounds; the C++ (CPU) kernels refuse such tables.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, OpArgs, check_same_device, check_tensor
from ..reference.deform_attn import ms_deform_attn_ref
from ._library import FusedOp, Kernel

__all__ = ["ms_deform_attn"]

# Head-dim limit of the Triton kernels: one program holds a [BLOCK_Q, D] tile.
MAX_TRITON_HEAD_DIM = 1024


# --------------------------------------------------------------------------
# The level tables


def _table_problem(hw: list, starts: list, S: int) -> str | None:
    """Why (H_l, W_l) and start indexes do not tile S positions, or None."""
    total = 0
    for l, ((h, w), s) in enumerate(zip(hw, starts)):
        if h < 1 or w < 1 or h * w > S - total:
            return (f"value_spatial_shapes[{l}] = ({h}, {w}) must be a level (H, W) with H, W >= 1 whose "
                    f"pixels fit in value (S = {S} positions, {total} taken by the levels before it)")
        if s != total:
            return (f"value_level_start_index[{l}] must be {total} (the sum of H * W of the levels before "
                    f"it); got {s}")
        total += h * w
    if total != S:
        return f"value_spatial_shapes must cover value: sum of H * W = {total} but value has S = {S} positions"
    return None


def _readable(t: Tensor) -> bool:
    """Whether t's values can be read on the host now (not meta, fake or traced)."""
    return (t.device.type != "meta" and not torch.compiler.is_compiling()
            and not torch._subclasses.fake_tensor.is_fake(t))


_CHECKED: dict[int, tuple] = {}  # id(shapes) -> (weakref(shapes), its version, weakref(starts), version, S)


def _check_tables(shapes: Tensor, starts: Tensor, S: int, fail) -> None:
    """Checks the tables' values (see the module docstring for when); fail(message) raises."""
    if not _readable(shapes):
        return
    cuda = shapes.device.type == "cuda"
    if cuda:
        hit = _CHECKED.get(id(shapes))
        if hit and hit[0]() is shapes and hit[1] == shapes._version and hit[2]() is starts \
                and hit[3] == starts._version and hit[4] == S:
            return
    problem = _table_problem(shapes.tolist(), starts.tolist(), S)  # one sync on CUDA
    if problem:
        fail(problem)
    if cuda:
        if len(_CHECKED) > 64:
            _CHECKED.clear()
        _CHECKED[id(shapes)] = (weakref.ref(shapes), shapes._version, weakref.ref(starts), starts._version, S)


# --------------------------------------------------------------------------
# Argument checks


def _check_args(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights) -> None:
    check_tensor("value", value, dtypes=FLOAT_DTYPES)
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be a 4-D tensor (N, S, M, D) (Deformable DETR's layout: "
                         f"the levels' pixels concatenated, heads, head dim); got shape {tuple(value.shape)}")
    N, S, M, D = value.shape
    check_tensor("sampling_locations", sampling_locations, ndim=6, dtypes=(value.dtype,),
                 shape_doc="(N, Lq, M, L, P, 2)")
    _, Lq, _, L, P, _ = sampling_locations.shape
    check_tensor("attention_weights", attention_weights, ndim=5, dtypes=(value.dtype,), shape_doc="(N, Lq, M, L, P)")
    check_tensor("value_spatial_shapes", value_spatial_shapes, dtypes=(torch.int64,))
    check_tensor("value_level_start_index", value_level_start_index, dtypes=(torch.int64,))
    check_same_device(value=value, value_spatial_shapes=value_spatial_shapes,
                      value_level_start_index=value_level_start_index, sampling_locations=sampling_locations,
                      attention_weights=attention_weights)
    if L < 1 or sampling_locations.shape != (N, Lq, M, L, P, 2):
        raise ValueError(f"sampling_locations must have shape (N, Lq, M, L, P, 2) with value's N = {N} and M = {M}, "
                         f"L >= 1 levels and (x, y) last; got {tuple(sampling_locations.shape)}")
    if attention_weights.shape != (N, Lq, M, L, P):
        raise ValueError(f"attention_weights must have shape (N, Lq, M, L, P) = {(N, Lq, M, L, P)} like "
                         f"sampling_locations; got {tuple(attention_weights.shape)}")
    if value_spatial_shapes.shape != (L, 2):
        raise ValueError(f"value_spatial_shapes must have shape (L, 2) = ({L}, 2): (H, W) of each of the L levels "
                         f"of sampling_locations; got {tuple(value_spatial_shapes.shape)}")
    if value_level_start_index.shape != (L,):
        raise ValueError(f"value_level_start_index must have shape (L,) = ({L},); got "
                         f"{tuple(value_level_start_index.shape)}")

    def fail(message):
        raise ValueError(message)

    _check_tables(value_spatial_shapes, value_level_start_index, S, fail)


def _check_msda(op: str, value, value_spatial_shapes, value_level_start_index, sampling_locations,
                attention_weights) -> OpArgs:
    """The tensors of a direct ms_deform_attn_fwd / _bwd call (the C++ kernels check the same)."""
    a = OpArgs(op)
    a.tensor("value", value, ("N", "S", "M", "D"), FLOAT_DTYPES)
    a.require(isinstance(sampling_locations, torch.Tensor) and sampling_locations.dim() == 6
              and sampling_locations.shape[3] >= 1,
              "sampling_locations must be a 6-D tensor (N, Lq, M, L, P, 2) with L >= 1 levels")
    a.tensor("sampling_locations", sampling_locations, ("N", "Lq", "M", "L", "P", 2), (value.dtype,))
    a.tensor("attention_weights", attention_weights, ("N", "Lq", "M", "L", "P"), (value.dtype,))
    a.tensor("value_spatial_shapes", value_spatial_shapes, ("L", 2), (torch.int64,))
    a.tensor("value_level_start_index", value_level_start_index, ("L",), (torch.int64,))
    # CUDA: no sync here (the Triton kernels mask their reads); CPU tensors (the
    # interpreter) are checked as the C++ kernels check them.
    if value_spatial_shapes.device.type == "cpu":
        _check_tables(value_spatial_shapes, value_level_start_index, a.sizes["S"], a.fail)
    return a


def _check_fwd(value, shapes, starts, loc, attn):
    _check_msda("ms_deform_attn_fwd", value, shapes, starts, loc, attn)


def _check_bwd(dout, value, shapes, starts, loc, attn):
    a = _check_msda("ms_deform_attn_bwd", value, shapes, starts, loc, attn)
    a.tensor("dout", dout, ("N", "Lq", a.sizes["M"] * a.sizes["D"]), (value.dtype,))


def _fake_fwd(value, shapes, starts, loc, attn):
    N, _, M, D = value.shape
    return value.new_empty((N, loc.shape[1], M * D))


def _fake_bwd(dout, value, shapes, starts, loc, attn):
    return torch.empty_like(value), torch.empty_like(loc), torch.empty_like(attn)


def _msda_gradients(backward, s, g):
    if g.out is None:
        return {}
    dv, dl, dw = backward(g.out.contiguous(), s.value, s.value_spatial_shapes, s.value_level_start_index,
                          s.sampling_locations, s.attention_weights)
    return {"value": dv, "sampling_locations": dl, "attention_weights": dw}


def _msda_limits(backend: str, head_dim: int) -> str | None:
    if backend == "triton" and head_dim > MAX_TRITON_HEAD_DIM:
        return f"supports head dims up to {MAX_TRITON_HEAD_DIM}; got {head_dim}"
    return None


_MSDA = FusedOp(
    "ms_deform_attn", Kernel("ms_deform_attn_fwd", _fake_fwd, _check_fwd),
    Kernel("ms_deform_attn_bwd", _fake_bwd, _check_bwd),
    save=("value", "value_spatial_shapes", "value_level_start_index", "sampling_locations", "attention_weights"),
    gradients=_msda_gradients, triton_module="fastvision.triton.deform_attn", limits=_msda_limits)


# --------------------------------------------------------------------------
# Public API


def ms_deform_attn(value: Tensor, value_spatial_shapes: Tensor, value_level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor, *, backend: str = "auto") -> Tensor:
    """Multi-scale deformable attention (Deformable DETR), fused.

    Each query and head sums P bilinear samples of each of L feature levels,
    weighted by its attention weights: ``ms_deform_attn_core_pytorch``'s result
    (``grid_sample`` of level l at ``2 * loc - 1``, align_corners=False, zeros
    outside), without its per-level (N * M, D, Lq, P) samples.

    Args:
        value: (N, S, M, D): the L levels' (H_l, W_l) maps, row-major, concatenated
            (S = sum H_l W_l); M heads of D channels. float32 / float16 / bfloat16
            (float64 on CPU).
        value_spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        value_level_start_index: (L,) int64, where each level starts in S (the
            exclusive cumsum of H_l W_l; checked).
        sampling_locations: (N, Lq, M, L, P, 2) in value's dtype: (x, y) in [0, 1]
            per level (points outside read zeros).
        attention_weights: (N, Lq, M, L, P) in value's dtype (not normalised here).
        backend: 'auto' (compiled kernel for the device), 'cpu', 'triton', or
            'reference' (pure PyTorch).

    Returns:
        (N, Lq, M * D) in value's dtype; float32 accumulation (float64 for
        float64 inputs). Differentiable in value, sampling_locations and
        attention_weights.

    Example::

        >>> import torch
        >>> from fastvision.ops import ms_deform_attn
        >>> shapes = torch.tensor([[8, 8], [4, 4]])
        >>> starts = torch.tensor([0, 64])
        >>> value = torch.randn(2, 80, 8, 32)
        >>> loc, attn = torch.rand(2, 10, 8, 2, 4, 2), torch.rand(2, 10, 8, 2, 4)
        >>> ms_deform_attn(value, shapes, starts, loc, attn).shape
        torch.Size([2, 10, 256])
    """
    _check_args(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights)
    path = _MSDA.resolve(backend, value.device, head_dim=value.shape[3])
    if path == "reference":
        return ms_deform_attn_ref(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                                  attention_weights)
    return _MSDA(path, value.contiguous(), value_spatial_shapes.contiguous(), value_level_start_index.contiguous(),
                 sampling_locations.contiguous(), attention_weights.contiguous())
