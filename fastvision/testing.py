"""Test harness shared by every op's tests (and usable by downstream code).

- :func:`assert_close`: compare against a reference with dtype-aware tolerances.
- :func:`random_cases`: seeded random configurations plus explicit edge cases.
- :func:`check_gradcheck`, :func:`check_opcheck`, :func:`check_compile`:
  the float64 gradient check, ``torch.library.opcheck`` and a
  ``torch.compile(fullgraph=True)`` round trip, with the settings every op uses.
- :class:`OpSpec`: what an op contributes to the conformance suite
  (``tests/test_conformance.py`` runs every generic check on every spec), with
  :class:`Sample`, :class:`BadInput` and :class:`KnownFailure`.
- :func:`record_direct_calls`, :func:`fuzz_direct_calls`: capture the
  ``torch.ops.fastvision.*`` calls some code makes, then replay each with one
  argument mutated in child processes (no crash, no hang, clear errors);
  :func:`recorded_calls` records those of a spec's public op (for opcheck and fuzzing).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
      float32 reference;
    * ``fuzz_cases``: (case, dtype) pairs whose direct calls, with those of
      ``opcheck_cases`` in float32, are replayed with one argument mutated
      (:func:`fuzz_direct_calls`): give every layout and dtype the wrappers
      pass to the registered ops (small shapes: each call is replayed ~100 times).

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
    fuzz_cases: Sequence[tuple[dict, torch.dtype]] = ()
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


def recorded_calls(spec: OpSpec, cases: Sequence[dict] | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", backend: str = "auto", dedupe: bool = False) -> list[OpCall]:
    """The direct calls of ``fastvision::*`` ops that `spec`'s public op makes, forward
    and backward, on `cases` (default: ``spec.opcheck_cases``), in order
    (:func:`record_direct_calls`).

    Inputs for opcheck and for fuzzing the registered ops with realistic arguments.
    (backend="triton" calls the Triton kernels directly: nothing to record.)
    """
    calls = []
    for seed, case in enumerate(spec.opcheck_cases if cases is None else cases):
        sample = spec.sample(case, dtype, seed).to(device)
        calls.extend(record_direct_calls(lambda: spec.forward_backward(sample, backend), dedupe=False))
    return unique_calls(calls) if dedupe else calls


def fuzz_calls(spec: OpSpec) -> list[OpCall]:
    """The calls the direct-call fuzz replays for `spec`: those of its
    ``opcheck_cases`` (float32) and ``fuzz_cases``, one per signature."""
    calls = recorded_calls(spec)
    for case, dtype in spec.fuzz_cases:
        calls += recorded_calls(spec, [case], dtype)
    return unique_calls(calls)


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


# --------------------------------------------------------------------------
# Direct calls of the registered ops: record valid ones, replay them mutated.
#
# torch.compile, torch.export and users call torch.ops.fastvision.* without
# the Python wrappers' checks, so the compiled entry points must reject any
# argument they cannot handle with a Python exception: never a crash, a hang
# or a read out of bounds. record_direct_calls() captures the op calls a
# piece of code makes (e.g. public API calls, forward and backward);
# fuzz_direct_calls() replays each with ONE argument mutated (a wrong dtype,
# a dropped or extra dim, each size +-1, non-contiguous, empty, None,
# out-of-range integers and list entries) in child processes, so that a crash
# or hang is recorded against the mutation that caused it instead of killing
# the test run.

_FUZZ_INTS = (0, -1, 1, 2**31, 2**62, 2**63 - 1, -(2**63))
_FUZZ_LIST_INTS = (0, -1, 2**62, 2**63 - 1)
_FUZZ_FLOATS = (float("nan"), float("inf"), -float("inf"), 0.0, -1.0)
# Exception types a rejected direct call may raise.
_FUZZ_ALLOWED = ("ValueError", "TypeError", "RuntimeError", "MemoryError", "IndexError", "NotImplementedError",
                 "OverflowError")


@dataclass
class OpCall:
    """One call of a registered op: ``torch.ops.<op>.<overload>(*args, **kwargs)``.

    `op` is the qualified name, e.g. ``"fastvision::na_fwd"``.
    """
    op: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    overload: str = "default"

    def resolve(self):
        namespace, name = self.op.split("::")
        return getattr(getattr(getattr(torch.ops, namespace), name), self.overload)

    def signature(self) -> str:
        """Shapes, dtypes, strides and scalar values: calls with equal signatures are duplicates."""
        return f"{self.op}({', '.join(_describe(a) for a in self.args)})"

    def __call__(self):
        return self.resolve()(*self.args, **self.kwargs)


def _describe(a) -> str:
    if isinstance(a, torch.Tensor):
        return f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}" + ("" if a.is_contiguous() else f"@{a.stride()}")
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_describe(x) for x in a) + "]"
    return repr(a)


def _clone_arg(a):
    if isinstance(a, torch.Tensor):
        return a.detach().clone()  # preserve_format: same strides for dense tensors
    if isinstance(a, (list, tuple)):
        return type(a)(_clone_arg(x) for x in a)
    return a


def as_op_call(call) -> OpCall:
    """An OpCall from an OpCall or an ``(op, args[, kwargs])`` tuple, op an OpOverload,
    an OpOverloadPacket or a qualified name such as ``"fastvision::na_fwd"``."""
    if isinstance(call, OpCall):
        return call
    op, args, *rest = call
    kwargs = rest[0] if rest else {}
    overload = "default"
    if isinstance(op, torch._ops.OpOverload):
        overload = op._overloadname
        op = op.name()
    elif isinstance(op, torch._ops.OpOverloadPacket):
        op = op._qualified_op_name
    return OpCall(str(op), tuple(args), dict(kwargs), overload)


def record_direct_calls(fn: Callable[[], Any], namespace: str = "fastvision", dedupe: bool = True) -> list[OpCall]:
    """Runs ``fn()`` and returns the calls of ``torch.ops.<namespace>.*`` it made.

    Calls are captured below autograd (a TorchDispatchMode), so the backward
    ops that ``.backward()`` runs inside `fn` are recorded too. Tensor
    arguments are cloned (same strides). With `dedupe`, calls with equal
    signatures (shapes, dtypes, strides, scalars) are kept once.
    """

    calls: list[OpCall] = []

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "namespace", None) == namespace:
                calls.append(OpCall(func.name(), _clone_arg(tuple(args)), _clone_arg(dict(kwargs)),
                                    func._overloadname))
            return func(*args, **kwargs)

    with _Recorder():
        fn()
    return unique_calls(calls) if dedupe else calls


def unique_calls(calls: Iterable[OpCall]) -> list[OpCall]:
    """`calls` without repeated signatures (the first of each kept, in order)."""
    seen, unique = set(), []
    for c in calls:
        if c.signature() not in seen:
            seen.add(c.signature())
            unique.append(c)
    return unique


@dataclass(frozen=True)
class Mutation:
    """One argument of a call changed: `arg` its index, `kind` and `value` what was done."""
    arg: int
    kind: str
    value: Any = None
    must_raise: bool = False  # e.g. an integer or bool dtype: the op must reject it

    def describe(self, call: OpCall) -> str:
        schema = call.resolve()._schema.arguments
        name = schema[self.arg].name if self.arg < len(schema) else f"arg{self.arg}"
        return f"{name}: {self.kind}" + ("" if self.value is None else f" {self.value!r}")


def _schema_types(call: OpCall) -> list[str]:
    return [str(a.type) for a in call.resolve()._schema.arguments]


def fuzz_mutations(call: OpCall) -> list[Mutation]:
    """Every one-argument mutation of `call` (the first, Mutation(-1, "none"), replays it unchanged)."""
    muts = [Mutation(-1, "none")]
    types = _schema_types(call)
    for i, a in enumerate(call.args):
        t = types[i] if i < len(types) else ""
        if isinstance(a, torch.Tensor):
            for dt in ("int32", "int64", "bool"):  # an int64 table converted to int64 is still valid
                muts.append(Mutation(i, "dtype", dt, must_raise=getattr(torch, dt) != a.dtype))
            other = "float32" if a.dtype == torch.float64 else "float64"
            muts += [Mutation(i, "dtype", other), Mutation(i, "dtype", "float16")]
            if a.dim() >= 1:
                muts += [Mutation(i, "drop dim", 0), Mutation(i, "drop dim", -1)]
            muts += [Mutation(i, "extra dim", 0), Mutation(i, "extra dim", -1)]
            for d in range(a.dim()):
                muts.append(Mutation(i, "size+1", d))
                if a.shape[d] > 0:
                    muts.append(Mutation(i, "size-1", d))
            if a.dim() >= 2:
                muts += [Mutation(i, "transposed"), Mutation(i, "permuted storage")]
            if a.dim() >= 1 and a.shape[-1] > 1:
                muts += [Mutation(i, "strided"), Mutation(i, "expanded")]
            muts += [Mutation(i, "empty"), Mutation(i, "empty batch")]
            if t.startswith("Optional"):
                muts.append(Mutation(i, "None"))
        elif a is None and t.startswith("Optional"):
            muts.append(Mutation(i, "tensor for None"))
        elif isinstance(a, bool):
            muts.append(Mutation(i, "flip"))
        elif isinstance(a, int):
            muts += [Mutation(i, "int", v) for v in _FUZZ_INTS if v != a]
        elif isinstance(a, float):
            muts += [Mutation(i, "float", v) for v in _FUZZ_FLOATS]
        elif isinstance(a, (list, tuple)):
            muts += [Mutation(i, "list drop last"), Mutation(i, "list append"), Mutation(i, "list empty")]
            if a and all(isinstance(x, int) and not isinstance(x, bool) for x in a):
                for j in range(len(a)):
                    muts += [Mutation(i, f"list[{j}]", v) for v in _FUZZ_LIST_INTS]
    return muts


def _resized(t: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of `shape` holding t's values where they overlap, zeros elsewhere."""
    out = t.new_zeros(shape)
    if out.numel() and t.numel() and out.dim() == t.dim():
        region = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, t.shape))
        out[region] = t[region]
    return out


def apply_mutation(call: OpCall, m: Mutation) -> OpCall:
    """`call` with mutation `m` applied (new argument objects; `call` is unchanged)."""
    if m.arg < 0:
        return call
    args = list(call.args)
    a = args[m.arg]
    k = m.kind
    if k == "dtype":
        new = a.to(getattr(torch, m.value))
    elif k == "drop dim":
        new = (a.select(m.value, 0) if a.shape[m.value] > 0 else a.sum(m.value)).contiguous()
    elif k == "extra dim":
        new = a.unsqueeze(m.value).contiguous()
    elif k in ("size+1", "size-1"):
        shape = list(a.shape)
        shape[m.value] += 1 if k == "size+1" else -1
        new = _resized(a, shape)
    elif k == "transposed":
        new = a.transpose(-1, -2)
    elif k == "permuted storage":  # same shape and values, reversed memory order
        dims = list(range(a.dim()))[::-1]
        new = a.new_empty([a.shape[d] for d in dims]).permute(*dims)
        new.copy_(a)
    elif k == "strided":  # same shape and values, every other element of the last dim
        new = a.new_empty(*a.shape[:-1], 2 * a.shape[-1])[..., ::2]
        new.copy_(a)
    elif k == "expanded":  # same shape, stride 0 along the last dim
        new = a[..., :1].expand(a.shape)
    elif k == "empty":
        new = a.new_empty(0)
    elif k == "empty batch":
        new = a.new_empty((0, *a.shape[1:]) if a.dim() else (0,))
    elif k == "None":
        new = None
    elif k == "tensor for None":
        new = next((x.clone() for x in call.args if isinstance(x, torch.Tensor)), torch.zeros(1))
    elif k == "flip":
        new = not a
    elif k in ("int", "float"):
        new = m.value
    elif k == "list drop last":
        new = list(a[:-1])
    elif k == "list append":
        new = list(a) + [a[-1] if a else 1]
    elif k == "list empty":
        new = []
    elif k.startswith("list["):
        new = list(a)
        new[int(k[5:-1])] = m.value
    else:
        raise ValueError(f"unknown mutation {k!r}")
    args[m.arg] = new
    return OpCall(call.op, tuple(args), call.kwargs, call.overload)


@dataclass
class FuzzReport:
    """What fuzz_direct_calls found. `failures`: one line per crash, hang, accepted wrong
    dtype, unexpected exception type or message that leaks a source path."""
    replays: int = 0
    raised: int = 0
    ran: int = 0
    children: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    exceptions: dict[str, int] = field(default_factory=dict)

    def assert_ok(self) -> None:
        assert not self.failures, (f"{len(self.failures)} direct-call fuzz failure(s) in {self.replays} replays:\n"
                                   + "\n".join(self.failures[:50]))


def _fuzz_child() -> None:
    """Child process of fuzz_direct_calls: replays items [start, end) of the job file, one
    line per step on stdout: 'S i' before replay i, 'R i ok' or 'R i err <type> <message>' after."""
    import sys

    path, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    job = torch.load(path, weights_only=False)
    import importlib

    for module in job["imports"]:
        importlib.import_module(module)
    for code in job["preamble"]:
        exec(code, {})
    calls, items = job["calls"], job["items"]
    out = sys.stdout
    for i in range(start, end):
        ci, m = items[i]
        out.write(f"S {i}\n")
        out.flush()
        try:
            call = apply_mutation(calls[ci], m)
            call()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - every exception is a result here
            msg = str(e).replace("\n", " ")[:400]
            status = f"err {type(e).__name__} {msg}"
        out.write(f"R {i} {status}\n")
        out.flush()


def _leaks_source_path(msg: str) -> bool:
    return "API call failed" in msg or "/csrc/" in msg or ".cpp:" in msg or "CHECK FAILED" in msg


def fuzz_direct_calls(calls: Sequence[Any], *, jobs: int = 2, timeout: float = 20.0, batch: int | None = None,
                      mutations: Callable[[OpCall], list[Mutation]] = fuzz_mutations,
                      imports: Sequence[str] = ("fastvision.ops",), preamble: Sequence[str] = (),
                      env: dict | None = None) -> FuzzReport:
    """Replays every call of `calls` (OpCall or ``(op, args[, kwargs])``) with each of its
    one-argument `mutations`, in child processes (`jobs` at a time, `batch` replays each).

    A child that dies (signal, abort, sanitizer report) or spends more than `timeout`
    seconds on one replay is recorded against that mutation, and the batch continues in a
    new child. Checked: no crash, no hang; a mutation marked must_raise (integer or bool
    dtypes) raises; an exception is one of the usual Python types, a ValueError or
    MemoryError from the op says "fastvision.<op>: ..." and no message names a source
    path. A mutation that is still valid may just run. The unmutated call must run.
    Each child imports `imports` (the modules that register the ops), then runs the
    Python sources in `preamble` (e.g. registering test ops); `env` adds environment
    variables.
    """
    import os
    import subprocess
    import sys
    import tempfile
    import threading
    import time

    t0 = time.monotonic()
    calls = [as_op_call(c) for c in calls]
    items = [(ci, m) for ci, c in enumerate(calls) for m in mutations(c)]
    report = FuzzReport()
    if not items:
        return report
    if batch is None:
        batch = -(-len(items) // max(jobs, 1))
    lock = threading.Lock()

    def label(i):
        ci, m = items[i]
        return f"{calls[ci].signature()} with {m.describe(calls[ci]) if m.arg >= 0 else 'no mutation'}"

    def judge(i, status):
        ci, m = items[i]
        with lock:
            report.replays += 1
            if status == "ok":
                report.ran += 1
                if m.must_raise:
                    report.failures.append(f"accepted (must raise): {label(i)}")
                return
            report.raised += 1
            _, etype, *rest = status.split(" ", 2)
            msg = rest[0] if rest else ""
            report.exceptions[etype] = report.exceptions.get(etype, 0) + 1
            if m.arg < 0:
                report.failures.append(f"the unmutated call raised {etype}: {msg} [{label(i)}]")
            elif etype not in _FUZZ_ALLOWED:
                report.failures.append(f"unexpected {etype}: {msg} [{label(i)}]")
            elif _leaks_source_path(msg):
                report.failures.append(f"message names a source path: {etype}: {msg} [{label(i)}]")
            elif etype in ("ValueError", "MemoryError") and calls[ci].op.startswith("fastvision::") \
                    and not msg.startswith("fastvision."):
                report.failures.append(f"{etype} without the 'fastvision.<op>: ' prefix: {msg} [{label(i)}]")

    child_env = dict(os.environ, **(env or {}))
    child_env.setdefault("PYTHONFAULTHANDLER", "1")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fuzz_job.pt")
        torch.save({"calls": calls, "items": items, "imports": list(imports), "preamble": list(preamble)}, path)

        def run_range(start: int, end: int) -> None:
            import selectors

            while start < end:
                with lock:
                    report.children += 1
                proc = subprocess.Popen(
                    [sys.executable, "-c", "from fastvision.testing import _fuzz_child; _fuzz_child()",
                     path, str(start), str(end)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env, text=True, bufsize=1)
                # stderr drained by a thread so a chatty child never blocks on a full pipe.
                err_chunks: list[str] = []
                drain = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
                drain.start()
                sel = selectors.DefaultSelector()
                sel.register(proc.stdout, selectors.EVENT_READ)
                current, hung = None, False
                deadline = time.monotonic() + timeout + 60.0  # the first one includes start-up
                while True:
                    if not sel.select(timeout=max(deadline - time.monotonic(), 0.0)):
                        hung = True
                        proc.kill()
                        break
                    line = proc.stdout.readline()
                    if not line:
                        break
                    kind, idx, *rest = line.rstrip("\n").split(" ", 2)
                    if kind == "S":
                        current = int(idx)
                        deadline = time.monotonic() + timeout
                    elif kind == "R":
                        judge(int(idx), rest[0] if rest else "ok")
                        current = None
                sel.close()
                proc.wait()
                drain.join(timeout=10)
                if current is None and not hung and proc.returncode == 0:
                    return  # finished its range
                failed_at = current if current is not None else start
                tail = "".join(err_chunks)[-1500:].strip()
                what = (f"hung (> {timeout:.0f} s)" if hung else
                        f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else
                        f"died (exit status {proc.returncode})")
                with lock:
                    report.replays += 1
                    report.failures.append(f"{what}: {label(failed_at)}\n    child stderr: {tail}")
                start = failed_at + 1

        threads = [threading.Thread(target=run_range, args=(s, min(s + batch, len(items))))
                   for s in range(0, len(items), batch)]
        running: list[threading.Thread] = []
        for th in threads:  # at most `jobs` children at a time
            while len([r for r in running if r.is_alive()]) >= max(jobs, 1):
                time.sleep(0.05)
            th.start()
            running.append(th)
        for th in running:
            th.join()
    report.seconds = time.monotonic() - t0
    return report
