"""The op machinery every family shares: describe a fused op once, get the rest.

A family (``fastvision/ops/<family>.py``) describes each fused op with a
:class:`FusedOp`: its forward and backward kernels (registered ops whose
schemas live in ``csrc/registration.cpp``), their fake kernels and Python-side
argument checks, which forward inputs and outputs the backward needs, the
gradient formula, its Triton module and its limits. :class:`FusedOp` then

* registers the fake kernels (shapes for torch.compile and meta tensors),
* registers autograd for the forward op, with the saved tensors and
  arguments *named* after the schema (``saved.query``, ``grads.lse``),
* makes the backward op refuse a second backward (a clear error instead of
  autograd silently treating it as a constant),
* registers the Triton kernels as the CUDA kernels of each op that has no
  CUDA C++ kernel (asked per op of the dispatcher), run on the inputs'
  device and checked like the C++ kernels check themselves,
* builds the ``backend="triton"`` path from the same gradient formula, and
* answers, per backend, whether it can run given inputs and why not
  (:meth:`FusedOp.why_not`; NATTEN's ``can_run_*``), so that ``backend="auto"``,
  explicit backends, ``fastvision info`` and the benchmarks ask one question.

Backends: ``"cpu"`` (C++), ``"cuda"`` (CUDA C++), ``"triton"`` (CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1``) and ``"reference"`` (pure PyTorch,
handled by the family's wrapper). ``"auto"`` takes the first of
:data:`AUTO_ORDER` that can run.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from .. import _extension

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
AUTO_ORDER = ("cpu", "cuda", "triton", "reference")

#: Every fused op by name (``FusedOp.name``), for ``fastvision info`` and the benchmarks.
FUSED_OPS: dict[str, FusedOp] = {}


@dataclass(frozen=True)
class Kernel:
    """One registered op, ``fastvision::<name>``.

    ``fake(*args)`` returns empty outputs of the right shapes and dtypes;
    ``check(*args)`` raises for arguments the kernels could not run on (the
    C++ kernels check themselves; this guards the fake and Triton kernels).
    """
    name: str
    fake: Callable
    check: Callable | None = None

    @property
    def qualname(self) -> str:
        return f"fastvision::{self.name}"

    def schema(self):
        return getattr(torch.ops.fastvision, self.name).default._schema


@dataclass
class FusedOp:
    """A fused forward kernel, the backward kernel its gradient runs, and their glue.

    ``save`` names the forward inputs and outputs (schema names) the
    gradient needs. ``gradients(backward, saved, grads)`` returns a dict of
    input name -> gradient: ``backward`` runs the backward kernel on the
    forward's device and backend, ``saved`` holds every forward input by name
    (tensors listed in ``save``, all non-tensor arguments), the saved
    outputs and ``needs_grad`` (the names of the inputs whose gradient is
    asked for), ``grads`` the outputs' gradients by name (None where unused).
    ``limits(backend, **facts)`` gives the reason a backend cannot run inputs
    with these facts (e.g. ``d_state=300``), or None.
    """
    name: str
    forward: Kernel
    backward: Kernel
    save: Sequence[str]
    gradients: Callable[[Callable, SimpleNamespace, SimpleNamespace], dict]
    triton_module: str | None = None
    limits: Callable[..., str | None] | None = None
    _arg_names: tuple = field(init=False, default=())
    _tensor_args: frozenset = field(init=False, default=frozenset())
    _out_names: tuple = field(init=False, default=())
    _cuda_cpp: bool = field(init=False, default=False)

    def __post_init__(self):
        if self.name in FUSED_OPS:
            raise ValueError(f"fused op {self.name!r} is already defined")
        schema = self.forward.schema()
        self._arg_names = tuple(a.name for a in schema.arguments)
        self._tensor_args = frozenset(a.name for a in schema.arguments if "Tensor" in str(a.type))
        self._out_names = tuple(r.name for r in schema.returns)
        unknown = set(self.save) - set(self._arg_names) - set(self._out_names)
        if unknown:
            raise ValueError(f"{self.name}: save names {sorted(unknown)} are not in the schema of "
                             f"{self.forward.qualname}")
        # Asked before the Triton kernels are registered for CUDA below.
        self._cuda_cpp = _has_cuda_cpp_kernel(self.forward.qualname)
        for kernel in (self.forward, self.backward):
            _register_kernel(kernel, self.triton_module)
        torch.library.register_autograd(self.forward.qualname, self._backward_dispatch,
                                        setup_context=self._setup_context)
        _forbid_double_backward(self.backward, self.name)
        FUSED_OPS[self.name] = self

    # ---- running ---------------------------------------------------------

    def __call__(self, backend: str, *args):
        """Runs the forward with autograd on a resolved backend ('cpu', 'cuda', 'triton')."""
        if backend == "triton":
            return _TritonAutograd.apply(self, *args)
        return getattr(torch.ops.fastvision, self.forward.name)(*args)

    def triton_kernel(self, kernel: Kernel) -> Callable:
        """The Triton implementation of `kernel`, checked and run on its inputs' device."""
        return _triton_entry(kernel, self.triton_module)

    # ---- autograd --------------------------------------------------------

    def _setup_context(self, ctx, inputs, output):
        named = dict(zip(self._arg_names, inputs))
        outputs = dict(zip(self._out_names, output if isinstance(output, tuple) else (output,)))
        saved = [n for n in self.save]
        ctx.save_for_backward(*[named[n] if n in named else outputs[n] for n in saved])
        ctx.saved_names = saved
        ctx.attrs = {n: v for n, v in named.items() if n not in self._tensor_args}
        ctx.set_materialize_grads(False)  # unused outputs get None, not zero-filled gradients

    def _gradients(self, ctx, grads, backward: Callable):
        if all(g is None for g in grads):
            return (None,) * len(self._arg_names)
        needs = ctx.needs_input_grad[-len(self._arg_names):]  # backend='triton' has the op first
        saved = SimpleNamespace(**ctx.attrs, **dict(zip(ctx.saved_names, ctx.saved_tensors)),
                                needs_grad=frozenset(n for n, need in zip(self._arg_names, needs) if need))
        result = self.gradients(backward, saved, SimpleNamespace(**dict(zip(self._out_names, grads))))
        unknown = set(result) - self._tensor_args
        assert not unknown, f"{self.name}: gradients for non-tensor inputs {unknown}"
        return tuple(result.get(n) for n in self._arg_names)

    def _backward_dispatch(self, ctx, *grads):
        return self._gradients(ctx, grads, getattr(torch.ops.fastvision, self.backward.name))

    # ---- backends --------------------------------------------------------

    def why_not(self, backend: str, device: torch.device | str, **facts) -> str | None:
        """None if `backend` can run this op for tensors on `device` (with `facts`
        about the inputs, as the family's limits take them), else the reason."""
        device = torch.device(device)
        if backend == "cpu":
            if device.type != "cpu":
                return f"needs CPU tensors; got tensors on {device}"
        elif backend == "cuda":
            if device.type != "cuda":
                return f"needs CUDA tensors; got tensors on {device}"
            if not self._cuda_cpp:
                if not _extension.CUDA_LOADED:
                    return ("fastvision was built without its CUDA C++ kernels "
                            f"({_extension.CUDA_ERROR or 'no nvcc at build time'}); use backend='triton' or 'auto'")
                return f"fastvision has no CUDA C++ kernel for {self.name}; use backend='triton' or 'auto'"
        elif backend == "triton":
            if self.triton_module is None:
                return f"fastvision has no Triton kernel for {self.name}"
            if not _extension.triton_available():
                return "needs the triton package (pip install triton)"
            if device.type == "cpu":
                if os.environ.get("TRITON_INTERPRET") != "1":
                    return ("runs on CPU tensors only under the Triton interpreter: set TRITON_INTERPRET=1 "
                            "before importing triton")
            elif device.type != "cuda":
                return f"needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got tensors on {device}"
        elif backend != "reference":
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        return self.limits(backend, **facts) if self.limits is not None and facts else None

    def resolve(self, backend: str, device: torch.device, **facts) -> str:
        """The backend to run: `backend` itself if it can run, the first of
        AUTO_ORDER that can for "auto" (the Triton interpreter only when asked
        for); a ValueError with the reason otherwise."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        if backend == "auto":
            for candidate in AUTO_ORDER:
                if candidate == "triton" and torch.device(device).type != "cuda":
                    continue
                if self.why_not(candidate, device, **facts) is None:
                    return candidate
        reason = self.why_not(backend, device, **facts)
        if reason is not None:
            raise ValueError(f"backend={backend!r} {reason}")
        return backend

    def usable_backends(self, device: torch.device | str) -> dict[str, str | None]:
        """backend -> None where it can run on `device` (inputs aside), else why not."""
        return {b: self.why_not(b, device) for b in BACKENDS if b != "auto"}


# --------------------------------------------------------------------------
# Registration helpers


_REGISTERED: set[str] = set()


def _has_cuda_cpp_kernel(qualname: str) -> bool:
    """Whether a CUDA C++ kernel (from _C_cuda) is registered for `qualname`."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    except Exception:  # private API: absent means no
        return False


def _register_kernel(kernel: Kernel, triton_module: str | None) -> None:
    """Fake kernel and, without a CUDA C++ kernel, Triton for CUDA; once per op."""
    if kernel.name in _REGISTERED:
        return
    _REGISTERED.add(kernel.name)

    def fake(*args):
        if kernel.check is not None:
            kernel.check(*args)
        return kernel.fake(*args)

    torch.library.register_fake(kernel.qualname)(fake)
    if triton_module is not None and _extension.triton_available() \
            and not _has_cuda_cpp_kernel(kernel.qualname):
        torch.library.register_kernel(kernel.qualname, "cuda", _triton_entry(kernel, triton_module))


def _triton_entry(kernel: Kernel, module: str) -> Callable:
    """`kernel`'s Triton function (same name and arguments as the op), imported on
    first use, after the op's argument checks, on the inputs' CUDA device."""
    def run(*args):
        if kernel.check is not None:
            kernel.check(*args)
        fn = getattr(importlib.import_module(module), kernel.name)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device):
                return fn(*args)
        return fn(*args)
    run.__name__ = f"{kernel.name}_triton"
    return run


def _forbid_double_backward(backward: Kernel, what: str) -> None:
    if f"grad:{backward.name}" in _REGISTERED:
        return
    _REGISTERED.add(f"grad:{backward.name}")

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(f"fastvision: double backward (gradient of a gradient) through "
                                  f"{what} is not supported")

    torch.library.register_autograd(backward.qualname, no_double_backward)


class _TritonAutograd(torch.autograd.Function):
    """backend='triton': the Triton kernels, called directly, with the op's own
    autograd (the same setup and gradient formula as the registered op)."""

    @staticmethod
    def forward(op: FusedOp, *args):
        return op.triton_kernel(op.forward)(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op = inputs[0]
        op._setup_context(ctx, inputs[1:], output)
        ctx.op = op

    @staticmethod
    def backward(ctx, *grads):
        op = ctx.op
        return (None, *op._gradients(ctx, grads, op.triton_kernel(op.backward)))
