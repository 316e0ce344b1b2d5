"""Test harness shared by every op's tests (and usable by downstream code).

- :func:`assert_close`: compare against a reference with dtype-aware tolerances.
- :func:`random_cases`: seeded random configurations plus explicit edge cases.
- :func:`check_gradcheck`, :func:`check_opcheck`, :func:`check_compile`:
  the float64 gradient check, ``torch.library.opcheck`` and a
  ``torch.compile(fullgraph=True)`` round trip, with the settings every op uses.
- :class:`OpSpec`: what an op contributes to the conformance suite
  (``tests/test_conformance.py`` runs every generic check on every spec), with
  :class:`Sample`, :class:`BadInput` and :class:`KnownFailure`.
- :class:`CallRecorder` and :func:`recorded_calls`: the direct calls of the
  registered ``fastvision::*`` ops that a public op makes (for opcheck and fuzzing).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

# (rtol, atol) of a fast kernel against the float32 (or float64) reference,
# by the dtype of the kernel's inputs. Half precision rounds inputs and
# outputs, so its tolerance is set by the output rounding, not the math.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def tolerances(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """(rtol, atol) for `dtype`, both multiplied by `scale` (long reductions, gradients)."""
    rtol, atol = TOLERANCES[dtype]
    return rtol * scale, atol * scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """Compare `actual` with `expected` using the tolerance of `dtype` (default: actual's).

    The absolute tolerance is relative to the reference's magnitude, so that
    outputs of very different scales are judged alike.
    """
    dtype = dtype or actual.dtype
    rtol, atol = tolerances(dtype, scale)
    mag = expected.detach().abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected.detach(), rtol=rtol,
                               atol=atol * max(mag, 1.0), msg=(lambda m: f"{msg}\n{m}") if msg else None)


def random_cases(space: dict[str, Sequence[Any]], n: int, seed: int = 0,
                 edge_cases: Iterable[dict[str, Any]] = (), valid: Callable[[dict], bool] | None = None
                 ) -> list[dict[str, Any]]:
    """`n` seeded random picks from `space` (name -> candidate values), after `edge_cases`.

    Edge cases are completed with the first value of every missing key.
    `valid` filters out illegal combinations.
    """
    rng = random.Random(seed)
    base = {k: v[0] for k, v in space.items()}
    cases = [{**base, **e} for e in edge_cases]
    wanted = len(cases) + n
    tries = 0
    while len(cases) < wanted and tries < 100 * n:
        tries += 1
        c = {k: rng.choice(list(v)) for k, v in space.items()}
        if valid is None or valid(c):
            cases.append(c)
    return cases


def case_id(case: dict[str, Any]) -> str:
    """A short pytest id for a case dict."""
    return "-".join(f"{k}={v}" for k, v in case.items())


def check_gradcheck(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], **kwargs) -> None:
    """float64 gradcheck of `fn` over the floating inputs that require grad."""
    assert all(t.dtype == torch.float64 for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad), \
        "gradcheck inputs must be float64"
    kwargs.setdefault("eps", 1e-6)
    kwargs.setdefault("atol", 1e-5)
    kwargs.setdefault("rtol", 1e-4)
    assert torch.autograd.gradcheck(fn, tuple(inputs), **kwargs)


def check_opcheck(op, args: Sequence[Any], kwargs: dict | None = None) -> None:
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    result = torch.library.opcheck(op, tuple(args), kwargs or {})
    failed = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failed, f"opcheck failed: {failed}"


def check_compile(fn: Callable[..., Any], args: Sequence[Any], grad: bool = True,
                  dtype: torch.dtype = torch.float32) -> None:
    """`fn` under torch.compile(fullgraph=True) equals eager, forward and backward."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)

    def run(f):
        leaves = [a.detach().clone().requires_grad_(grad and a.is_floating_point())
                  if isinstance(a, torch.Tensor) else a for a in args]
        out = f(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        if not grad:
            return outs, ()
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum()
                   for o in outs if o.is_floating_point())
        params = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        return outs, torch.autograd.grad(loss, params, allow_unused=True)

    eager_out, eager_grad = run(fn)
    comp_out, comp_grad = run(compiled)
    for a, b in zip(comp_out, eager_out):
        assert_close(a, b, dtype)
    for a, b in zip(comp_grad, eager_grad):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert_close(a, b, dtype, scale=10)


# --------------------------------------------------------------------------
# Conformance specs


@dataclass
class Sample:
    """One call of a public op, ``op(*args, **kwargs)``, as a spec builds it (CPU tensors)."""
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def map_tensors(self, fn: Callable[[torch.Tensor], Any]) -> Sample:
        """A copy with `fn` applied to every tensor (nested in tuples and lists too)."""
        args, kwargs = tree_map_only(torch.Tensor, fn, (tuple(self.args), dict(self.kwargs)))
        return Sample(tuple(args), kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in tree_flatten((self.args, self.kwargs))[0] if isinstance(t, torch.Tensor)]

    def to(self, device: torch.device | str) -> Sample:
        """A copy with detached copies of the tensors on `device` (e.g. "meta", "cuda")."""
        return self.map_tensors(lambda t: t.detach().to(device).clone())


@dataclass(frozen=True)
class BadInput:
    """A call the public op must refuse with `error` whose message contains `match` (literally)."""
    id: str
    sample: Sample
    error: type[BaseException]
    match: str


@dataclass(frozen=True)
class KnownFailure:
    """A bug the conformance suite found and that is not fixed yet: `check` (a test
    of tests/test_conformance.py, e.g. ``"test_torch_compile_fullgraph"``) fails on
    `case` (one of the spec's cases for that check) because of `reason`. The suite
    runs it as ``xfail(strict=True)``: fixing the bug makes the suite say so."""
    check: str
    case: dict
    reason: str


#: (forward, backward) multipliers of TOLERANCES[input dtype] for outputs and gradients
#: against the float32 reference; a spec may state its own.
DEFAULT_TOLERANCE_SCALE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1.0, 1.0),
    torch.float32: (1.0, 20.0),
    torch.float16: (2.0, 4.0),
    torch.bfloat16: (2.0, 4.0),
}


@dataclass
class OpSpec:
    """What one public op contributes to the conformance suite (tests/test_conformance.py).

    Cases are dicts of settings (they name the pytest ids); ``make(case, dtype,
    seed)`` turns one into a :class:`Sample` of CPU tensors: the floating
    inputs in `dtype` where the op takes that dtype (parameters the op keeps
    in float32, e.g. a scan's ``A``, stay float32 except for float64). Each
    list feeds the checks named beside it:

    * ``cases``: forward and backward vs the reference in float32; many random
      shapes plus explicit edge cases (size 1, odd sizes, borders, empty batch,
      every option);
    * ``basic_cases``: a few samples for the checks that need not see every
      shape: meta tensors, non-contiguous inputs, backend selection and
      errors (include inputs some backend's limits refuse), double backward;
    * ``half_cases``: float16 and bfloat16 vs the float32 reference;
    * ``gradcheck_cases``: float64 gradcheck (small);
    * ``opcheck_cases``: torch.library.opcheck of the registered forward and
      backward ops, on the calls the public op makes (:func:`recorded_calls`);
    * ``compile_cases``: torch.compile(fullgraph=True) forward and backward
      vs eager (few and small: compiling is slow);
    * ``triton_cases``: backend="triton" under the Triton interpreter on CPU
      tensors (tiny: the interpreter is slow);
    * ``gpu_cases``: every backend usable on CUDA, float32/16/bf16, vs the
      float32 reference.

    ``reference`` takes the public op's arguments (without ``backend``).
    ``outputs`` names the op's outputs in order (an op returning one tensor
    returns ``outputs[0]``); ``differentiable_inputs`` and
    ``differentiable_outputs`` are argument and output names. ``fused_op``
    is the :data:`fastvision.ops._library.FUSED_OPS` name of the fused op the
    public op runs; ``facts(sample)`` are the keyword facts its
    ``FusedOp.why_not`` / ``limits`` take (e.g. ``d_state``).
    ``known_failures`` lists the bugs found and not yet fixed (:class:`KnownFailure`).
    """
    name: str
    op: Callable
    reference: Callable
    fused_op: str
    make: Callable[[dict, torch.dtype, int], Sample]
    outputs: tuple[str, ...]
    differentiable_inputs: tuple[str, ...]
    cases: Sequence[dict]
    basic_cases: Sequence[dict]
    half_cases: Sequence[dict]
    gradcheck_cases: Sequence[dict]
    opcheck_cases: Sequence[dict]
    compile_cases: Sequence[dict]
    triton_cases: Sequence[dict]
    gpu_cases: Sequence[dict]
    bad_inputs: Callable[[], Iterable[BadInput]]
    facts: Callable[[Sample], dict] = lambda sample: {}
    known_failures: Sequence[KnownFailure] = ()
    differentiable_outputs: tuple[str, ...] | None = None
    tolerance_scale: dict[torch.dtype, tuple[float, float]] = field(
        default_factory=lambda: dict(DEFAULT_TOLERANCE_SCALE))

    def __post_init__(self):
        if self.differentiable_outputs is None:
            self.differentiable_outputs = tuple(self.outputs)
        params = inspect.signature(self.op).parameters
        unknown = set(self.differentiable_inputs) - set(params)
        if unknown:
            raise ValueError(f"{self.name}: differentiable_inputs {sorted(unknown)} are not arguments of "
                             f"{self.op.__name__}")
        if not set(self.differentiable_outputs) <= set(self.outputs):
            raise ValueError(f"{self.name}: differentiable_outputs must be among outputs {self.outputs}")

    @property
    def fused(self):
        """The :class:`fastvision.ops._library.FusedOp` this op runs."""
        from .ops._library import FUSED_OPS
        return FUSED_OPS[self.fused_op]

    def sample(self, case: dict, dtype: torch.dtype = torch.float32, seed: int = 0) -> Sample:
        return self.make(case, dtype, seed)

    def tolerance(self, dtype: torch.dtype, backward: bool = False) -> float:
        """The multiplier of TOLERANCES[dtype] for outputs (or gradients)."""
        return self.tolerance_scale[dtype][1 if backward else 0]

    # ---- running ---------------------------------------------------------

    def bind(self, sample: Sample) -> inspect.BoundArguments:
        """`sample`'s arguments by name (the public op's signature)."""
        return inspect.signature(self.op).bind(*sample.args, **sample.kwargs)

    def grad_inputs(self, sample: Sample) -> list[str]:
        """Names of the differentiable inputs that are tensors in `sample` (not None)."""
        args = self.bind(sample).arguments
        return [n for n in self.differentiable_inputs if isinstance(args.get(n), torch.Tensor)]

    def call(self, sample: Sample, backend: str | None = "auto", reference: bool = False) -> tuple:
        """The op's (or the reference's) outputs as a tuple, whatever it returns."""
        if reference:
            out = self.reference(*sample.args, **sample.kwargs)
        else:
            kwargs = dict(sample.kwargs) if backend is None else {**sample.kwargs, "backend": backend}
            out = self.op(*sample.args, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    def output_names(self, outs: tuple) -> tuple[str, ...]:
        return self.outputs[:len(outs)]

    def with_leaves(self, sample: Sample) -> tuple[Sample, dict[str, torch.Tensor]]:
        """A copy of `sample` whose differentiable inputs are fresh leaves requiring grad
        (sharing the tensors' memory: strides are kept, e.g. non-contiguous ones)."""
        bound = self.bind(sample.map_tensors(lambda t: t.detach()))
        leaves = {}
        for name in self.grad_inputs(sample):
            leaves[name] = bound.arguments[name] = bound.arguments[name].requires_grad_()
        return Sample(tuple(bound.args), dict(bound.kwargs)), leaves

    def substitute(self, sample: Sample, tensors: dict[str, torch.Tensor]) -> Sample:
        """`sample` with the named arguments replaced."""
        bound = self.bind(sample)
        bound.arguments.update(tensors)
        return Sample(tuple(bound.args), dict(bound.kwargs))

    def loss(self, outs: tuple) -> torch.Tensor:
        """A float64 scalar whose gradient differs at every element of every differentiable output."""
        total = torch.zeros((), dtype=torch.float64, device=outs[0].device)
        for i, (name, o) in enumerate(zip(self.output_names(outs), outs)):
            if name in self.differentiable_outputs:
                w = torch.linspace(-1.5 + 0.3 * i, 2.0 - 0.7 * i, o.numel(), dtype=torch.float64,
                                   device=o.device).view_as(o)
                total = total + (o.double() * w).sum()
        return total

    def forward_backward(self, sample: Sample, backend: str | None = "auto", reference: bool = False
                         ) -> tuple[tuple, dict[str, torch.Tensor | None]]:
        """Outputs and the gradients of :meth:`loss` by input name (on fresh leaves)."""
        sample, leaves = self.with_leaves(sample)
        outs = self.call(sample, backend, reference)
        loss = self.loss(outs)
        grads = (torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                 if leaves and loss.requires_grad else [None] * len(leaves))
        return outs, dict(zip(leaves, grads))


class RecordedCall(NamedTuple):
    """One direct call of a registered op: ``op(*args, **kwargs)``."""
    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict


class CallRecorder(TorchDispatchMode):
    """Records the calls of registered ops in `namespace` (default ``fastvision``) made
    while active, forward and backward, with detached copies of their tensors::

        with CallRecorder() as rec:
            na2d(q, k, v, 3).sum().backward()
        rec.calls  # [RecordedCall(torch.ops.fastvision.na_fwd.default, ...), ...na_bwd...]
    """

    def __init__(self, namespace: str = "fastvision"):
        super().__init__()
        self.namespace = namespace
        self.calls: list[RecordedCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == self.namespace:
            copy = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
            self.calls.append(RecordedCall(func, tuple(copy[0]), dict(copy[1])))
        return func(*args, **kwargs)


def recorded_calls(spec: OpSpec, cases: Sequence[dict] | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", backend: str = "auto") -> list[RecordedCall]:
    """The direct calls of ``fastvision::*`` ops that `spec`'s public op makes, forward
    and backward, on `cases` (default: ``spec.opcheck_cases``), in order.

    Inputs for opcheck and for fuzzing the registered ops with realistic arguments.
    (backend="triton" calls the Triton kernels directly: nothing to record.)
    """
    calls = []
    for seed, case in enumerate(spec.opcheck_cases if cases is None else cases):
        sample = spec.sample(case, dtype, seed).to(device)
        with CallRecorder() as recorder:
            spec.forward_backward(sample, backend)
        calls.extend(recorder.calls)
    return calls


# --------------------------------------------------------------------------
# Distributed: a model built on fastvision ops trains identically under DDP.


def _train(model, batches, steps: int, lr: float):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = batches(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ddp_worker(rank: int, world: int, init_file: str, build, make_batch, steps: int, lr: float,
                out_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(build())

        def shard(step):  # this rank's equal share of the global batch
            x, y = make_batch(step)
            return x.chunk(world)[rank], y.chunk(world)[rank]

        _train(model, shard, steps, lr)
        if rank == 0:
            torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, out_file)
        # Leave together: a rank tearing gloo down while another still uses
        # it can abort the process.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_ddp_matches_single_process(build: Callable[[], torch.nn.Module],
                                     make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                                     steps: int = 3, world: int = 2, lr: float = 0.05,
                                     dtype: torch.dtype = torch.float32) -> None:
    """Trains `build()` for `steps` SGD steps under DistributedDataParallel (gloo,
    `world` CPU processes, each on an equal shard of `make_batch(step)`) and in one
    process on the whole batch; the final parameters must agree.

    `build` and `make_batch` must be module-level functions (they are pickled
    into the worker processes). With a mean loss, DDP's gradient average over
    equal shards equals the single-process gradient.
    """
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = f"{tmp}/ddp_state.pt"
        mp.spawn(_ddp_worker, args=(world, f"{tmp}/init", build, make_batch, steps, lr, out_file),
                 nprocs=world, join=True)
        ddp_state = torch.load(out_file)
    torch.manual_seed(0)
    model = build()
    _train(model, make_batch, steps, lr)
    single = model.state_dict()
    assert ddp_state.keys() == single.keys()
    for name, value in single.items():
        assert_close(ddp_state[name], value.detach(), dtype, scale=10, msg=f"parameter {name}")


# --------------------------------------------------------------------------
# Triton kernels on CPU tensors


def import_triton_kernels_interpreted(module_name: str):
    """Imports a Triton kernel module for tests on CPU tensors, or skips the calling test module.

    Triton picks the interpreter when a kernel is decorated, so TRITON_INTERPRET=1
    must be in the environment before triton is first imported (tests/conftest.py
    sets it when no GPU is present). Never set here: on a GPU machine that would
    turn every later Triton kernel of the process into an interpreted one.
    """
    import importlib
    import os

    import pytest

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter tests need TRITON_INTERPRET=1 at start-up "
                    "(tests/conftest.py sets it when no GPU is present)", allow_module_level=True)
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module(module_name)
    if not any(isinstance(v, InterpretedFunction) for v in vars(module).values()):
        pytest.skip(f"{module_name} was imported before TRITON_INTERPRET=1 was set",
                    allow_module_level=True)
    return module
