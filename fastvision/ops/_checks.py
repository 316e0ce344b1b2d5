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


BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


def check_backend(backend: str, device: torch.device, cuda_cpp: bool, cuda_cpp_missing: str) -> str:
    """Resolves `backend` for tensors on `device` to 'dispatch' (the registered
    op: CPU C++, or on CUDA the CUDA C++ kernel if loaded, else Triton),
    'triton' (the Triton kernels directly) or 'reference', or raises a clear
    error when it cannot run there. `cuda_cpp` says whether the op has a
    CUDA C++ kernel; `cuda_cpp_missing` is the error's reason when not.
    """
    import os

    from .. import _extension

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "reference" if device.type not in ("cpu", "cuda") else "dispatch"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors; got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors; got tensors on {device}")
        if not cuda_cpp:
            raise RuntimeError(f"backend='cuda': {cuda_cpp_missing}; use backend='triton' or 'auto'")
    if backend == "triton":
        if not _extension.triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors runs only under the Triton interpreter: "
                             "set TRITON_INTERPRET=1 before importing triton")
    return "dispatch" if backend in ("cpu", "cuda") else backend


def forbid_double_backward(backward_op: str, what: str) -> None:
    """Registers an autograd formula for `backward_op` that raises a clear error.

    Without one, autograd would silently treat the backward op as constant
    and a gradient of a gradient would come out wrong instead of failing.
    """
    def no_double_backward(ctx, *grads):
        raise NotImplementedError(f"fastvision: double backward (gradient of a gradient) through "
                                  f"{what} is not supported")

    torch.library.register_autograd(backward_op, no_double_backward)
