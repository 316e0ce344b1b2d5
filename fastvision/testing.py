"""Test harness shared by every op's tests (and usable by downstream code).

- :func:`assert_close`: compare against a reference with dtype-aware tolerances.
- :func:`random_cases`: seeded random configurations plus explicit edge cases.
- :func:`check_gradcheck`, :func:`check_opcheck`, :func:`check_compile`:
  the float64 gradient check, ``torch.library.opcheck`` and a
  ``torch.compile(fullgraph=True)`` round trip, with the settings every op uses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

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
