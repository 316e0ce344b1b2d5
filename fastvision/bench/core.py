"""Cases, suites, timing, peak memory, the environment record and the runner.

A :class:`Suite` is one benchmarked op: named cases (shapes), the fused op it
times (a key of ``fastvision.ops._library.FUSED_OPS``) and the other
implementations to compare (:class:`Impl`: the pure-PyTorch reference,
anchors where they install, other baselines). Which fastvision backends are
timed is asked of the fused op itself, with the case's facts
(:meth:`FusedOp.why_not`), never decided here.

Every implementation of a case runs on the same inputs in one process:

* set-up: ``Impl.setup`` (masks, index tables), once per case, before and
  outside every timed region; its time and the bytes it holds are recorded;
* peak memory: one fwd+bwd call, made first so that it also warms up every
  code path (on CUDA after one more warm-up call);
* fwd, then fwd+bwd: repeated until ``repeats`` samples or the time budget is
  spent (at least one sample); the first sample is a warm-up, dropped
  whenever there is more than one; the median is reported. On the CPU a call
  shorter than ``SHORT_CALL_S`` is timed in loops of about ``LOOP_S`` per
  sample (as timeit does: one call of a few microseconds is near the timer's
  own cost and resolution), for every implementation alike. An implementation
  planned "once" (a slow baseline under ``--quick``) takes one sample and no
  warm-up call beyond the peak-memory call.

Speedup is the reference's time over the implementation's. On CUDA the
achieved bandwidth counts the op's minimal traffic: each input read once and
the output written once (forward); the backward reads the output gradient
and every input once and writes one gradient per input.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import torch

import fastvision

Inputs = dict[str, Any]

# FASTVISION_BENCH_TINY=1 shrinks every case to its suite's tiny shape and
# takes one sample: a smoke test of the whole pipeline in seconds.
TINY_ENV = "FASTVISION_BENCH_TINY"
DEFAULT_REPEATS = 20
DEFAULT_BUDGET_S = 2.0
# --quick: fewer samples and a shorter budget per measurement, so that the
# whole run (start-up included) stays well inside a minute on 2 CPU cores.
QUICK_REPEATS = 5
QUICK_BUDGET_S = 0.25
# --quick times an implementation once (not marked slow, but one fwd+bwd took this long).
QUICK_ONCE_S = 1.0
# --quick's time budget (after start-up): past it, what is left is timed once and
# the slow baselines left are skipped, so a busy machine still ends the run soon.
QUICK_DEADLINE_S = 40.0
REFERENCE = "reference"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Peak DRAM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM5 (reports as "NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB parts
)


# --------------------------------------------------------------------------
# Cases, implementations, suites, registry


@dataclass(frozen=True)
class Case:
    """A named shape. ``quick`` cases make up ``--quick``; ``devices`` limits where the case runs."""
    name: str
    shape: dict
    quick: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")


@dataclass(frozen=True)
class Impl:
    """One implementation of a case: ``run(inputs) -> output``.

    ``setup(inputs) -> dict`` is its one-time preparation (a mask, an index
    table), run once per case before any timing and never inside a timed
    region; its entries are added to the inputs ``run`` receives.
    ``note`` says what a timing of it includes (shown with the tables and
    recorded in the JSON). ``slow`` says why one call takes seconds:
    ``--quick`` then times it once (one sample, no warm-up repeats).
    ``skip_quick`` says why ``--quick`` does not time it at all (a call takes
    too long for a one-minute run); ``skip`` why it is never timed here.
    """
    run: Callable[[Inputs], torch.Tensor]
    setup: Callable[[Inputs], dict] | None = None
    note: str = ""
    slow: str = ""
    skip_quick: str = ""
    skip: str = ""


def _no_baselines(shape: dict, device: str) -> dict[str, Impl]:
    return {}


@dataclass(frozen=True)
class Suite:
    """One op's benchmark.

    ``fused_op`` names the fastvision fused op it times (a key of
    ``FUSED_OPS``); ``facts(shape)`` gives what that op's limits take
    (e.g. ``{"d_state": 16}``), so the op says which backends can run the
    case. ``fastvision(backend)`` is the public op called with that backend.
    ``make_inputs(shape, device, dtype)`` returns the op's differentiable
    inputs (all read by the op; requires_grad set) and the output gradient.
    ``reference(shape, device)`` is the pure-PyTorch reference every speedup
    divides; ``baselines(shape, device)`` the other implementations by name
    (anchors where they install, other ways users compute the same thing).
    """
    op: str
    fused_op: str | None  # None: no fused op; fastvision(backend) itself says which backends run
    cases: tuple[Case, ...]
    make_inputs: Callable[[dict, str, torch.dtype], tuple[Inputs, torch.Tensor]]
    facts: Callable[[dict], dict]
    fastvision: Callable[[str], Impl]
    reference: Callable[[dict, str], Impl]
    baselines: Callable[[dict, str], dict[str, Impl]] = _no_baselines
    tiny: dict = field(default_factory=dict)  # shape overrides under FASTVISION_BENCH_TINY=1
    config: str = ""  # what every case shares (recorded with the results)
    # Useful forward FLOPs of a case: TFLOP/s columns on CUDA (backward counted as 2.5x forward).
    flops: Callable[[dict], float] | None = None
    # Memory-bound op: GB/s and % of peak DRAM bandwidth columns on CUDA.
    bandwidth: bool = False
    # Not differentiable (e.g. the mask codecs): fwd only; make_inputs may return None for dout.
    forward_only: bool = False
    # The op family (``fastvision bench <family>`` runs all its suites); its module's name by default.
    family: str = ""
    # Implementations whose outputs differ in form (pycocotools dicts vs tensors): maps any
    # of them to one comparable form (the tests check every implementation agrees).
    canonical: Callable[[Any], Any] | None = None


SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    if not suite.family:
        suite = replace(suite, family=suite.make_inputs.__module__.rsplit(".", 1)[-1])
    if suite.op in SUITES:
        raise ValueError(f"a benchmark suite for {suite.op!r} is already registered")
    SUITES[suite.op] = suite
    return suite


def tiny_mode() -> bool:
    return os.environ.get(TINY_ENV) == "1"


def cases(suite: Suite, device: str, quick: bool = False) -> list[Case]:
    """The suite's cases for `device` (the quick subset if asked), shrunk in tiny mode."""
    chosen = [c for c in suite.cases if device in c.devices and (c.quick or not quick)]
    if tiny_mode():
        chosen = [replace(c, shape={**c.shape, **suite.tiny}) for c in chosen]
    return chosen


# --------------------------------------------------------------------------
# Which fastvision backends to time: asked of the fused op


def _fused_ops() -> dict:
    import fastvision.ops  # noqa: F401  (defines every fused op)
    from fastvision.ops._library import FUSED_OPS
    return FUSED_OPS


def candidate_backends(device: str) -> tuple[str, ...]:
    """fastvision's compiled backends for `device` (the Triton interpreter on CPU
    is a test tool, never timed)."""
    return ("cpu",) if device == "cpu" else ("cuda", "triton")


def fastvision_backends(fused_op: str, device: str, **facts) -> dict[str, str | None]:
    """backend -> None where fused op `fused_op` can run a case with these facts on
    `device`, else the op's reason why not (candidate backends only)."""
    op = _fused_ops()[fused_op]
    result = {}
    for backend in candidate_backends(device):
        if device == "cuda" and not torch.cuda.is_available():
            result[backend] = "no CUDA device (torch.cuda.is_available() is False)"
        else:
            result[backend] = op.why_not(backend, device, **facts)
    return result


def usable_backends(fused_op: str, device: str, **facts) -> list[str]:
    """The backends of `fused_op` to time on `device` for a case with these facts."""
    return [b for b, why in fastvision_backends(fused_op, device, **facts).items() if why is None]


def implementations(suite: Suite, shape: dict, device: str) -> dict[str, Impl]:
    """Every implementation of a case by name, reference first, then fastvision's
    backends (those the fused op cannot run, with its reason as ``skip``), then
    the suite's baselines."""
    impls = {REFERENCE: suite.reference(shape, device)}
    if suite.fused_op is None:  # the suite's own fastvision(backend) says (with Impl.skip) what runs
        impls.update({backend: suite.fastvision(backend) for backend in candidate_backends(device)})
        impls.update(suite.baselines(shape, device))
        return impls
    for backend, why in fastvision_backends(suite.fused_op, device, **suite.facts(shape)).items():
        impl = suite.fastvision(backend)
        impls[backend] = impl if why is None else replace(impl, skip=f"fastvision: {why}")
    impls.update(suite.baselines(shape, device))
    return impls


# --------------------------------------------------------------------------
# Device facts


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


# --------------------------------------------------------------------------
# Measurement


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


SHORT_CALL_S = 1e-4  # CPU calls shorter than this are timed in loops ...
LOOP_S = 1e-3        # ... of about this long per sample


def _time_once(fn, device: str, calls: int = 1) -> float:
    """Seconds per call over `calls` calls in a row (one call, with CUDA events, on the GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def median_time(fn, device: str, repeats: int, budget_s: float, warmup: bool = True) -> tuple[float, int, int]:
    """(median seconds per call, samples used, calls per sample after the first):
    up to repeats (+ 1 warm-up) samples within budget_s, at least one; with
    `warmup` the first is dropped when there are others."""
    samples: list[float] = []
    limit = repeats + (1 if warmup else 0)
    calls = 1  # per sample: set from the first sample on the CPU (see SHORT_CALL_S)
    t0 = time.perf_counter()
    while len(samples) < limit and (not samples or time.perf_counter() - t0 < budget_s):
        samples.append(_time_once(fn, device, calls))
        if len(samples) == 1 and device != "cuda" and samples[0] < SHORT_CALL_S:
            calls = max(1, round(LOOP_S / max(samples[0], 1e-7)))
    kept = (samples[1:] if warmup else samples) or samples
    return statistics.median(kept), len(kept), calls


def fwd_bwd(forward: Callable[[Inputs], torch.Tensor], inputs: Inputs, dout: torch.Tensor,
            extra: Inputs | None = None):
    """A callable running forward and the gradients of every input (nothing
    accumulates); `extra` (set-up results) is passed to forward, not differentiated."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    view = {**inputs, **(extra or {})}

    def run():
        return torch.autograd.grad(forward(view), leaves, dout)
    return run


def forward_only(forward: Callable[[Inputs], torch.Tensor], inputs: Inputs, extra: Inputs | None = None):
    view = {**inputs, **(extra or {})}
    return lambda: forward(view)


def run_setup(impl: Impl, inputs: Inputs, device: str) -> tuple[Inputs, float | None, int]:
    """(set-up results, seconds, bytes of the tensors they hold): impl.setup run once."""
    if impl.setup is None:
        return {}, None, 0
    _sync(device)
    t0 = time.perf_counter()
    extra = impl.setup(inputs)
    _sync(device)
    seconds = time.perf_counter() - t0
    held = sum(v.nbytes for v in extra.values() if isinstance(v, torch.Tensor))
    return extra, seconds, held


MEMORY_METHOD = {
    "cuda": "peak of torch.cuda.max_memory_allocated() during one fwd+bwd, above what was "
            "allocated before it (inputs and set-up excluded)",
    "cpu": "peak of the running sum of torch.profiler(profile_memory=True) CPU allocator "
           "events during one fwd+bwd (tensors only, inputs and set-up excluded; scratch "
           "a kernel takes from malloc directly is not seen)",
}


def peak_memory(fn, device: str) -> int | None:
    """Peak bytes allocated by one call of fn, above what was live before (see MEMORY_METHOD)."""
    if device == "cuda":
        fn()  # warm-up: one-time allocations (workspaces) stay out of the peak
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    # Record allocations only: op events (hundreds of thousands for the reference's
    # Python loop) make the profiler's own post-processing take many GB, at times
    # more than the machine has. Allocation events do not go through RecordFunction.
    record_ops = getattr(torch._C._autograd, "_enable_record_function", lambda enabled: None)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        record_ops(False)
        try:
            fn()
        finally:
            record_ops(True)
    try:  # kineto's raw events keep every allocation/free with its size and time
        events = prof.profiler.kineto_results.events()
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:  # the private API moved: say n/a rather than guess
        return None
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------
# Planning and running


@dataclass(frozen=True)
class Planned:
    """One implementation of one case as it will be run: ``sampling`` is
    "median" (repeated within the budget), "once" (one sample, no warm-up) or
    "skip"; ``why`` says why it is not "median"."""
    name: str
    impl: Impl
    sampling: str = "median"
    why: str = ""
    memory: bool = True  # measure peak memory (one more fwd+bwd call, also the warm-up)


class Progress:
    """One line per measurement on stderr as it starts."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0

    def __call__(self, *what) -> None:
        self.done += 1
        if self.enabled:
            print(f"[{self.done}/{self.total}] {' '.join(what)} ...", file=sys.stderr, flush=True)


def _load_average() -> float | None:
    """1-minute load average: other processes on a shared machine make CPU timings noisy."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment(device: str) -> dict:
    """What a result depends on, recorded with it."""
    try:  # without importing triton: that would fix TRITON_INTERPRET for this process
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "fastvision": fastvision.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def plan_case(suite: Suite, case: Case, device: str, quick: bool) -> list[Planned]:
    """How each implementation of `case` will be timed (see :class:`Planned`)."""
    planned = []
    for name, impl in implementations(suite, case.shape, device).items():
        if impl.skip:
            planned.append(Planned(name, impl, "skip", impl.skip))
        elif quick and impl.skip_quick:
            planned.append(Planned(name, impl, "skip", f"not timed in --quick: {impl.skip_quick}"))
        elif quick and impl.slow:
            planned.append(Planned(name, impl, "once", f"timed once in --quick: {impl.slow}"))
        else:
            planned.append(Planned(name, impl))
    return planned


def plan(ops: list[str], device: str, quick: bool) -> list[tuple[Suite, Case, list[Planned]]]:
    """(suite, case, planned implementations) for every case to run, reference first."""
    return [(SUITES[op], case, plan_case(SUITES[op], case, device, quick))
            for op in ops for case in cases(SUITES[op], device, quick)]


def validate(ops: list[str] | None, device: str, dtype: str) -> list[str]:
    """The ops to run (all when none given; a family name stands for its ops); ValueError
    with a clear message for a bad request."""
    families = {}
    for name, suite in SUITES.items():
        families.setdefault(suite.family, []).append(name)
    ops = [o for op in ops or () for o in (families[op] if op in families and op not in SUITES else [op])]
    unknown = [op for op in ops or () if op not in SUITES]
    if unknown:
        raise ValueError(f"unknown op(s): {', '.join(unknown)}; known ops: {', '.join(SUITES)}; "
                         f"families: {', '.join(families)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda or 'none: a CPU-only build'})")
    return list(ops) if ops else list(SUITES)


def _past_deadline(item: Planned) -> Planned:
    """What --quick does with an implementation once its time budget is spent."""
    spent = f"--quick's {QUICK_DEADLINE_S:g} s budget was spent (a slow or busy machine)"
    if item.sampling == "once":
        return replace(item, sampling="skip", why=f"not timed: {spent}")
    if item.sampling == "median":
        return replace(item, sampling="once", why=f"timed once, no peak memory: {spent}", memory=False)
    return item


def busy_threads(device: str) -> str:
    """Why --quick should run on one torch thread here ('' if it should not): other
    processes keep every CPU busy, and then each call of a multi-threaded op waits for
    its descheduled threads, which can make a call tens of times slower."""
    load, cpus, threads = _load_average(), os.cpu_count() or 1, torch.get_num_threads()
    if device != "cpu" or load is None or load < cpus or threads == 1:
        return ""
    return (f"load average {load:.1f} on {cpus} CPUs: --quick uses 1 torch thread instead of {threads} "
            "(other processes hold the CPUs; pass --threads to choose)")


def busy_warning(device: str) -> str:
    """A warning when other processes keep the CPUs busy (timings slow and noisy), else ''."""
    load, cpus, threads = _load_average(), os.cpu_count() or 1, torch.get_num_threads()
    if device != "cpu" or load is None or load < cpus:
        return ""
    hint = (f"; with {threads} torch threads each call also waits for descheduled threads: "
            "--threads 1 avoids that" if threads > 1 else "")
    return (f"fastvision bench: warning: load average {load:.1f} on {cpus} CPUs: other processes are "
            f"using them, so this run is slow and its timings noisy{hint}")


def _measure(rec: dict, item: Planned, suite: Suite, case: Case, inputs: Inputs, dout: torch.Tensor,
             device: str, repeats: int, budget_s: float, quick: bool, traffic: dict, peak_bw,
             step: Progress) -> None:
    label = (suite.op, case.name, item.name)
    extra, setup_s, held = run_setup(item.impl, inputs, device)
    if setup_s is not None:
        rec["setup_ms"] = setup_s * 1e3
        rec["setup_bytes"] = held
    fwd_fn = forward_only(item.impl.run, inputs, extra)
    both_fn = fwd_fn if suite.forward_only else fwd_bwd(item.impl.run, inputs, dout, extra)
    sampling = item.sampling
    t0 = time.perf_counter()
    if item.memory:
        step(*label, "peak memory")
        rec["peak_mem_bytes"] = peak_memory(both_fn, device)
        rec["memory_method"] = MEMORY_METHOD[device]
    else:
        rec["peak_mem_bytes"] = None
        step(*label, "(no peak memory)")
    if quick and sampling == "median" and time.perf_counter() - t0 > QUICK_ONCE_S:
        # Not marked slow, but one fwd+bwd took over QUICK_ONCE_S on this machine.
        sampling = "once"
        rec["sampling_why"] = f"timed once in --quick: one fwd+bwd took over {QUICK_ONCE_S:g} s here"
    rec["sampling"] = sampling
    measures = (("fwd", fwd_fn, "fwd"),) if suite.forward_only else \
        (("fwd", fwd_fn, "fwd"), ("fwd_bwd", both_fn, "fwd+bwd"))
    for key, fn, title in measures:
        step(*label, title)
        if sampling == "once":  # the peak-memory call above (if any) was the warm-up
            seconds, n, calls = median_time(fn, device, 1, 0.0, warmup=False)
        else:
            seconds, n, calls = median_time(fn, device, repeats, budget_s)
        rec[f"{key}_ms"] = seconds * 1e3
        rec[f"{key}_samples"] = n
        rec[f"{key}_calls_per_sample"] = calls
        if device == "cuda" and suite.flops is not None:
            useful = suite.flops(case.shape) * (1.0 if key == "fwd" else 3.5)
            rec[f"{key}_useful_tflops"] = useful / seconds / 1e12
        if device == "cuda":
            rec[f"{key}_bytes"] = traffic[key]
            rec[f"{key}_bandwidth_gbps"] = traffic[key] / seconds / 1e9
            if peak_bw:
                rec[f"{key}_bandwidth_fraction"] = traffic[key] / seconds / peak_bw


def run(ops: list[str] | None = None, *, device: str = "cpu", dtype: str = "float32",
        quick: bool = False, repeats: int | None = None, budget_s: float | None = None,
        progress: bool = True, threads_why: str = "") -> list[dict]:
    """Runs the suites of `ops` (all when None) and returns one record per
    implementation and case (skipped ones included, with the reason).
    `threads_why` records why the thread count was chosen (see busy_threads)."""
    ops = validate(ops, device, dtype)
    if tiny_mode():
        repeats, budget_s = 1, 0.0
    repeats = max(1, repeats) if repeats is not None else QUICK_REPEATS if quick else DEFAULT_REPEATS
    budget_s = budget_s if budget_s is not None else QUICK_BUDGET_S if quick else DEFAULT_BUDGET_S

    env = environment(device)
    peak_bw = peak_bandwidth(env["device"]) if device == "cuda" else None
    started = time.perf_counter()
    planned_cases = plan(ops, device, quick)
    if progress:
        busy = busy_warning(device)
        if busy:
            print(busy, file=sys.stderr, flush=True)
    if device == "cpu":  # the profiler's one-time start-up stays out of the first measurement
        peak_memory(lambda: torch.ones(1) + 1, device)
    step = Progress(sum((2 if suite.forward_only else 3) for suite, _, items in planned_cases for p in items
                        if p.sampling != "skip"), progress)
    records = []
    for suite, case, items in planned_cases:
        torch.manual_seed(0)
        inputs, dout = suite.make_inputs(case.shape, device, DTYPES[dtype])
        read = sum(t.nbytes for t in inputs.values() if isinstance(t, torch.Tensor))
        out_bytes = dout.nbytes if dout is not None else 0
        traffic = {"fwd": read + out_bytes, "fwd_bwd": 3 * read + 2 * out_bytes}
        case_records = []
        for item in items:
            if quick and time.perf_counter() - started > QUICK_DEADLINE_S:
                item = _past_deadline(item)
            rec = {"op": suite.op, "fused_op": suite.fused_op, "case": case.name, "shape": dict(case.shape),
                   "config": suite.config, "bandwidth_bound": suite.bandwidth, "dtype": dtype, **env,
                   "forward_only": suite.forward_only,
                   "implementation": item.name, "note": item.impl.note, "sampling": item.sampling,
                   "quick": quick, "tiny": tiny_mode(), "load_avg_1m": _load_average()}
            if threads_why:
                rec["threads_why"] = threads_why
            if item.why:
                rec["sampling_why"] = item.why
            if item.sampling == "skip":
                rec["skipped"] = item.why
            else:
                try:
                    _measure(rec, item, suite, case, inputs, dout, device, repeats, budget_s, quick,
                             traffic, peak_bw, step)
                except Exception as err:  # one failing implementation (OOM, compile error) must not end the run
                    rec["error"] = f"{type(err).__name__}: {err}"
                    print(f"  {item.name} failed: {rec['error']}", file=sys.stderr, flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
            rec["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            case_records.append(rec)
        ref = next((r for r in case_records if r["implementation"] == REFERENCE and r.get("fwd_ms")), None)
        for rec in case_records:
            for key in ("fwd", "fwd_bwd"):
                ok = ref is not None and rec.get(f"{key}_ms")
                rec[f"speedup_{key}"] = ref[f"{key}_ms"] / rec[f"{key}_ms"] if ok else None
        records.extend(case_records)
        del inputs, dout
    return records
