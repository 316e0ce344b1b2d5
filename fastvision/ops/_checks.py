"""Argument checks shared by every op wrapper: clear errors naming the argument."""

from __future__ import annotations

import torch


def check_tensor(name: str, t, *, ndim: int | None = None, shape: tuple | None = None,
                 dtypes: tuple | None = None, shape_doc: str | None = None) -> None:
    """Raises TypeError/ValueError naming `name` unless `t` is a tensor of the expected form."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        doc = f" {shape_doc}" if shape_doc else ""
        raise ValueError(f"{name} must be a {ndim}-D tensor{doc}; got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}); got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors) -> None:
    """Raises ValueError if the given tensors (None skipped) are on different devices."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
