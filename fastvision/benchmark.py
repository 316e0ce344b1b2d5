"""Benchmark suites and the machinery behind ``fastvision bench`` and ``bench/``.

A :class:`Suite` is one op: named cases (shapes) and the implementations to
compare (fastvision backends usable on the device, the pure-PyTorch
reference, the anchor library where it installs, other baselines). An op
family adds its suite in one place: a ``register(Suite(...))`` block in the
"Suites" section at the bottom of this file.

Every implementation of a case runs on the same inputs in one process:

* peak memory: one fwd+bwd call, made first so that it also warms up every
  code path (on CUDA after one more warm-up call);
* fwd, then fwd+bwd: repeated until ``repeats`` samples or the time budget is
  spent (at least one sample); the first sample is a warm-up, dropped
  whenever there is more than one; the median is reported.

Speedup is the reference's time over the implementation's. On CUDA the
achieved bandwidth counts the op's minimal traffic: each input read once and
the output written once (forward); the backward reads the output gradient
and every input once and writes one gradient per input.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial

import torch

import fastvision

from .ops.neighborhood import na1d, na2d
from .ops._library import FUSED_OPS
from .ops.selective_scan import bi_selective_scan, selective_scan
from .reference.neighborhood import neighborhood_attention_ref
from .reference.selective_scan import bi_selective_scan_ref, selective_scan_ref

Inputs = dict[str, torch.Tensor]

# FASTVISION_BENCH_TINY=1 shrinks every case to its suite's tiny shape and
# takes one sample: a smoke test of the whole pipeline in seconds.
TINY_ENV = "FASTVISION_BENCH_TINY"
DEFAULT_REPEATS = 20
DEFAULT_BUDGET_S = 2.0
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
# Suite registry


@dataclass(frozen=True)
class Case:
    """A named shape. ``quick`` cases make up ``--quick``; ``devices`` limits
    where the case runs; on the devices in ``reference_slow_on`` the reference
    takes more than ~30 s, so ``--quick`` and pytest-benchmark skip it there."""
    name: str
    shape: dict
    quick: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    reference_slow_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    """One op's benchmark.

    ``make_inputs(shape, device, dtype)`` returns the op's differentiable
    inputs (all read by the op; requires_grad set) and the output gradient.
    ``implementations(device)`` maps a name to a forward function of those
    inputs; it must include "reference".
    """
    op: str
    cases: tuple[Case, ...]
    make_inputs: Callable[[dict, str, torch.dtype], tuple[Inputs, torch.Tensor]]
    implementations: Callable[[str], dict[str, Callable[[Inputs], torch.Tensor]]]
    tiny: dict = field(default_factory=dict)  # shape overrides under FASTVISION_BENCH_TINY=1
    config: str = ""  # what every case shares (recorded with the results)
    # Useful forward FLOPs of a case, for TFLOP/s on CUDA (backward counted as 2.5x forward).
    flops: Callable[[dict], float] | None = None
    # Baselines skipped on the devices of a case's reference_slow_on.
    slow_baselines: tuple[str, ...] = ()


SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
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


def fwd_bwd(forward: Callable[[Inputs], torch.Tensor], inputs: Inputs, dout: torch.Tensor):
    """A callable running forward and the gradients of every input (nothing accumulates)."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        return torch.autograd.grad(forward(inputs), leaves, dout)
    return run


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


def usable_backends(device: str) -> dict[str, str | None]:
    """backend -> None where it can run on `device` now, else why not.

    Asks selective_scan's own backend check (the rules are the same for every
    op), so they live in one place.
    """
    result: dict[str, str | None] = {}
    for backend in ("reference", "cpu", "cuda", "triton"):
        if device == "cuda" and not torch.cuda.is_available():
            result[backend] = "no CUDA device (torch.cuda.is_available() is False)"
            continue
        result[backend] = FUSED_OPS["selective_scan"].why_not(backend, device)
    return result


def fast_backends(device: str) -> list[str]:
    """fastvision's compiled backends worth timing on `device` (never the Triton interpreter)."""
    usable = usable_backends(device)
    wanted = ("cpu",) if device == "cpu" else ("triton", "cuda")
    return [b for b in wanted if usable[b] is None]


def _anchor_module(device: str):
    """mamba_ssm's selective_scan_interface on CUDA when it imports, else None."""
    if device != "cuda":
        return None
    try:
        from mamba_ssm.ops import selective_scan_interface
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return selective_scan_interface


# --------------------------------------------------------------------------
# Measurement


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device: str) -> float:
    """Seconds for one call (CUDA events on the GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, device: str, repeats: int, budget_s: float) -> tuple[float, int]:
    """(median seconds, samples used): up to repeats + 1 calls within budget_s, at
    least one; the first is a warm-up, dropped when there are others."""
    samples: list[float] = []
    t0 = time.perf_counter()
    while len(samples) < repeats + 1 and (not samples or time.perf_counter() - t0 < budget_s):
        samples.append(_time_once(fn, device))
    kept = samples[1:] or samples
    return statistics.median(kept), len(kept)


MEMORY_METHOD = {
    "cuda": "peak of torch.cuda.max_memory_allocated() during one fwd+bwd, above what was "
            "allocated before it (inputs excluded)",
    "cpu": "peak of the running sum of torch.profiler(profile_memory=True) CPU allocator "
           "events during one fwd+bwd (tensors only, inputs excluded; scratch "
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
# Running suites


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


def _plan(ops: list[str], device: str, quick: bool) -> list[tuple[Suite, Case, list[str]]]:
    """(suite, case, implementation names) for every case to run, reference first."""
    plan = []
    for op in ops:
        suite = SUITES[op]
        impls = list(suite.implementations(device))
        for case in cases(suite, device, quick):
            slow = device in case.reference_slow_on
            # Pure-PyTorch baselines other than the reference (mamba's CPU path)
            # are slower still where the reference is slow: always skipped there.
            names = [n for n in impls if n != REFERENCE and not (slow and n in suite.slow_baselines)]
            if not (quick and slow):
                names.insert(0, REFERENCE)
            plan.append((suite, case, names))
    return plan


def validate(ops: list[str] | None, device: str, dtype: str) -> list[str]:
    """The ops to run (all when none given); ValueError with a clear message for a bad request."""
    unknown = [op for op in ops or () if op not in SUITES]
    if unknown:
        raise ValueError(f"unknown op(s): {', '.join(unknown)}; known ops: {', '.join(SUITES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda or 'none: a CPU-only build'})")
    return list(ops) if ops else list(SUITES)


def run(ops: list[str] | None = None, *, device: str = "cpu", dtype: str = "float32",
        quick: bool = False, repeats: int | None = None, budget_s: float | None = None,
        progress: bool = True) -> list[dict]:
    """Runs the suites of `ops` (all when None) and returns one record per implementation and case."""
    ops = validate(ops, device, dtype)
    if tiny_mode():
        repeats, budget_s = 1, 0.0
    repeats = DEFAULT_REPEATS if repeats is None else max(1, repeats)
    budget_s = DEFAULT_BUDGET_S if budget_s is None else budget_s

    env = environment(device)
    peak_bw = peak_bandwidth(env["device"]) if device == "cuda" else None
    plan = _plan(ops, device, quick)
    step = Progress(3 * sum(len(names) for *_, names in plan), progress)
    records = []
    for suite, case, names in plan:
        torch.manual_seed(0)
        inputs, dout = suite.make_inputs(case.shape, device, DTYPES[dtype])
        forwards = suite.implementations(device)
        read = sum(t.nbytes for t in inputs.values() if isinstance(t, torch.Tensor))
        traffic = {"fwd": read + dout.nbytes, "fwd_bwd": 3 * read + 2 * dout.nbytes}
        case_records = []
        for name in names:
            label = (suite.op, case.name, name)
            rec = {"op": suite.op, "case": case.name, "shape": dict(case.shape), "config": suite.config,
                   "dtype": dtype,
                   **env, "implementation": name, "quick": quick, "tiny": tiny_mode(),
                   "load_avg_1m": _load_average()}
            fwd_fn, both_fn = partial(forwards[name], inputs), fwd_bwd(forwards[name], inputs, dout)
            try:
                step(*label, "peak memory")
                rec["peak_mem_bytes"] = peak_memory(both_fn, device)
                rec["memory_method"] = MEMORY_METHOD[device]
                for key, fn, title in (("fwd", fwd_fn, "fwd"), ("fwd_bwd", both_fn, "fwd+bwd")):
                    step(*label, title)
                    seconds, n = median_time(fn, device, repeats, budget_s)
                    rec[f"{key}_ms"] = seconds * 1e3
                    rec[f"{key}_samples"] = n
                    if device == "cuda" and suite.flops is not None:
                        useful = suite.flops(case.shape) * (1.0 if key == "fwd" else 3.5)
                        rec[f"{key}_useful_tflops"] = useful / seconds / 1e12
                    if device == "cuda":
                        rec[f"{key}_bytes"] = traffic[key]
                        rec[f"{key}_bandwidth_gbps"] = traffic[key] / seconds / 1e9
                        if peak_bw:
                            rec[f"{key}_bandwidth_fraction"] = traffic[key] / seconds / peak_bw
            except Exception as err:  # one failing implementation (OOM, compile error) must not end the run
                rec["error"] = f"{type(err).__name__}: {err}"
                print(f"  {name} failed: {rec['error']}", file=sys.stderr, flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
            rec["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            case_records.append(rec)
        ref = next((r for r in case_records if r["implementation"] == REFERENCE and "error" not in r), None)
        for rec in case_records:
            for key in ("fwd", "fwd_bwd"):
                ok = ref is not None and rec.get(f"{key}_ms")
                rec[f"speedup_{key}"] = ref[f"{key}_ms"] / rec[f"{key}_ms"] if ok else None
        records.extend(case_records)
        del inputs, dout, forwards
    return records


# --------------------------------------------------------------------------
# Output: table, JSON, plot


def _3digits(x: float) -> str:
    """At least three significant digits, no exponent: 0.123, 1.23, 12.3, 123, 12345."""
    r = float(f"{x:.3g}")  # pick the precision after rounding: 9.996 prints as 10.0, not 10.00
    return f"{x:.0f}" if r >= 100 else f"{x:.1f}" if r >= 10 else f"{x:.2f}" if r >= 0.1 else f"{x:.3f}"


def _fmt_ms(ms) -> str:
    return "n/a" if ms is None else _3digits(ms)


def _fmt_x(x) -> str:
    return "n/a" if x is None else _3digits(x) + "x"


def _fmt_mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _render(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):  # implementation name left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def format_tables(records: list[dict]) -> str:
    """One table per op and case, from the records (so the table and JSON agree)."""
    if not records:
        return "no benchmark ran"
    first = records[0]
    out = [f"fastvision {first['fastvision']} | torch {first['torch']} | triton {first['triton'] or '-'} | "
           f"python {first['python']} | {first['device_type']}: {first['device']}"
           + (f", torch threads: {first['threads']}" if first["device_type"] == "cpu" else ""),
           f"fwd: forward with autograd recording; fwd+bwd: forward + gradients of every input; "
           f"median ms. peak MiB: {MEMORY_METHOD[first['device_type']]}."]
    if first["dtype"] != "float32" and first["device_type"] == "cpu":
        out.append(f"note: the CPU kernels take {first['dtype']} inputs and outputs but compute in float32.")
    loads = [r["load_avg_1m"] for r in records if r.get("load_avg_1m") is not None]
    if first["device_type"] == "cpu" and loads and max(loads) > 1.5 * (first["cpu_count"] or 1):
        out.append(f"warning: load average up to {max(loads):.1f} on {first['cpu_count']} CPUs during this run: "
                   "other processes competed for the CPUs, so these timings are noisy.")
    cuda = first["device_type"] == "cuda"
    if cuda:
        out.append("GB/s: the op's minimal traffic (inputs read once, output written once; backward "
                   "reads dout + inputs, writes input grads) / time; % of the device's peak DRAM bandwidth.")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["op"], r["case"]), []).append(r)
    for (op, case), recs in groups.items():
        shape = " ".join(f"{k}={v}" for k, v in recs[0]["shape"].items())
        out += ["", f"{op} / {case} ({shape}) {recs[0]['dtype']}"]
        header = ["implementation", "fwd ms", "fwd+bwd ms", "peak MiB", "speedup fwd", "speedup fwd+bwd"]
        if cuda:
            header += ["GB/s fwd", "GB/s fwd+bwd", "% peak fwd+bwd"]
        rows = []
        for r in recs:
            if "error" in r:
                rows.append([r["implementation"], "error: " + r["error"][:60], *[""] * (len(header) - 2)])
                continue
            row = [r["implementation"], _fmt_ms(r["fwd_ms"]), _fmt_ms(r["fwd_bwd_ms"]),
                   _fmt_mib(r["peak_mem_bytes"]), _fmt_x(r["speedup_fwd"]), _fmt_x(r["speedup_fwd_bwd"])]
            if cuda:
                frac = r.get("fwd_bwd_bandwidth_fraction")
                row += [f"{r['fwd_bandwidth_gbps']:.0f}", f"{r['fwd_bwd_bandwidth_gbps']:.0f}",
                        f"{100 * frac:.0f}%" if frac is not None else "-"]
            rows.append(row)
        out += _render(header, rows)
        if not any(r["implementation"] == REFERENCE for r in recs):
            out.append("(reference skipped: it takes minutes at this size; run without --quick for speedups)")
    return "\n".join(out)


def write_json(records: list[dict], path: str) -> None:
    text = json.dumps(records, indent=1)
    if path == "-":
        print(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def pyplot():
    """matplotlib.pyplot (file output only), or RuntimeError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib "
                           "(or pip install 'fastvision[bench]')") from err
    return plt


def plot(records: list[dict], path: str) -> None:
    """Bar chart of the speedup over the reference (log scale): a row per op,
    fwd and fwd+bwd side by side, a group of bars per case."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ops = list(dict.fromkeys(r["op"] for r in records))
    impls = list(dict.fromkeys(r["implementation"] for r in records if r["implementation"] != REFERENCE))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(impls)}
    fig, axes = plt.subplots(len(ops), 2, figsize=(12, 3.6 * len(ops)), squeeze=False)
    for row, op in zip(axes, ops):
        recs = [r for r in records if r["op"] == op]
        case_names = list(dict.fromkeys(r["case"] for r in recs))
        names = [n for n in impls if any(r["implementation"] == n for r in recs)]
        width = 0.8 / max(len(names), 1)
        for ax, key, title in ((row[0], "speedup_fwd", "fwd"), (row[1], "speedup_fwd_bwd", "fwd+bwd")):
            for i, name in enumerate(names):
                xs, ys = [], []
                for j, case in enumerate(case_names):
                    value = next((r.get(key) for r in recs if r["case"] == case and r["implementation"] == name), None)
                    if value:
                        xs.append(j + (i - (len(names) - 1) / 2) * width)
                        ys.append(value)
                bars = ax.bar(xs, ys, width, label=name, color=colors[name])
                ax.bar_label(bars, labels=[_fmt_x(y) for y in ys], fontsize=7, padding=1)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_yscale("log")  # ticks at 1-2-5 steps, labelled "5x" rather than 5x10^0
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(range(len(case_names)), case_names)
            ax.set_ylabel("speedup vs reference")
            ax.set_title(f"{op}: {title}")
            ax.margins(y=0.15)
        row[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    first = records[0]
    threads = f", torch threads: {first['threads']}" if first["device_type"] == "cpu" else ""
    fig.suptitle(f"fastvision {first['fastvision']}, {first['dtype']}, {first['device_type']}: "
                 f"{first['device']}{threads} (dashed line: reference = 1x; higher is faster)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------
# Suites: one register(...) block per op.

# Selective scan as in Vim: B/C variable (batch, N, L), z gate, D skip,
# delta_bias and softplus. dim is d_inner (Vim-S: 768, Vim-B: 1536).
_SCAN_CASES = (
    Case("vim_s", dict(batch=2, dim=768, L=197, N=16), quick=True),
    Case("long_1k", dict(batch=2, dim=768, L=1024, N=16), quick=True),
    Case("long_4k", dict(batch=2, dim=768, L=4096, N=16), reference_slow_on=("cpu",)),
    Case("vim_b_batch64", dict(batch=64, dim=1536, L=197, N=16), devices=("cuda",)),
)
_SCAN_TINY = dict(batch=1, dim=8, L=24, N=4)
_SCAN_CONFIG = "B, C variable (batch, N, L); z gate; D; delta_bias; delta_softplus=True"


def _scan_inputs(shape: dict, device: str, dtype: torch.dtype, suffix: str = "") -> Inputs:
    """One direction's tensors, initialised as Mamba does (S4D-real A, dt in [1e-3, 1e-1])."""
    batch, dim, L, N = shape["batch"], shape["dim"], shape["L"], shape["N"]
    dt = torch.empty(dim, device=device).uniform_(math.log(1e-3), math.log(1e-1)).exp()
    t = {
        "u": torch.randn(batch, dim, L, device=device, dtype=dtype),
        "delta": 0.1 * torch.randn(batch, dim, L, device=device, dtype=dtype),
        "A": -torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, N, L, device=device, dtype=dtype),
        "C": torch.randn(batch, N, L, device=device, dtype=dtype),
        "D": torch.ones(dim, device=device),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus(delta_bias) = dt
    }
    return {k + suffix: v.requires_grad_() for k, v in t.items()}


def _scan_case(shape, device, dtype):
    x = _scan_inputs(shape, device, dtype)
    x["z"] = torch.randn_like(x["u"]).requires_grad_()
    return x, torch.randn_like(x["u"])


def _scan_args(x: Inputs, s: str = ""):
    return (x["u" + s], x["delta" + s], x["A" + s], x["B" + s], x["C" + s], x["D" + s],
            x["z"], x["delta_bias" + s])


_MAMBA_CPU = "mamba_ssm CPU path (selective_scan_ref)"


def _mamba_cpu_path(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """What mamba_ssm runs without its CUDA kernels: its pure-PyTorch
    selective_scan_ref, which first materialises exp(delta A) and delta B u for
    every step ((batch, dim, L, N) each), then loops over time. mamba_ssm only
    installs with CUDA, so the benchmark carries this equivalent (same
    semantics as fastvision.reference, which steps without materialising)."""
    delta = delta.float() + delta_bias[:, None]
    delta = torch.nn.functional.softplus(delta) if delta_softplus else delta
    decay = torch.exp(delta[..., None] * A[:, None, :])                      # (b, d, L, N)
    drive = (delta * u.float())[..., None] * B.float().transpose(1, 2)[:, None]  # (b, d, L, N)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(u.shape[-1]):
        x = decay[:, :, t] * x + drive[:, :, t]
        ys.append((x * C[:, None, :, t].float()).sum(-1))
    y = torch.stack(ys, dim=-1) + u * D[:, None]
    return (y * torch.nn.functional.silu(z.float())).to(u.dtype)


def _scan_implementations(device: str):
    impls = {REFERENCE: lambda x: selective_scan_ref(*_scan_args(x), delta_softplus=True)}
    for backend in fast_backends(device):
        impls[backend] = lambda x, b=backend: selective_scan(*_scan_args(x), True, backend=b)
    anchor = _anchor_module(device)
    if anchor is not None:
        impls["mamba_ssm"] = lambda x: anchor.selective_scan_fn(*_scan_args(x), True)
    elif device == "cpu":
        impls[_MAMBA_CPU] = lambda x: _mamba_cpu_path(*_scan_args(x))
    return impls


register(Suite("selective_scan", _SCAN_CASES, _scan_case, _scan_implementations,
               tiny=_SCAN_TINY, config=_SCAN_CONFIG, slow_baselines=(_MAMBA_CPU,)))


def _bi_case(shape, device, dtype):
    x, dout = _scan_case(shape, device, dtype)
    return {**x, **_scan_inputs(shape, device, dtype, "_b")}, dout


def _two_scans_flips(scan, x: Inputs) -> torch.Tensor:
    """Vim's bimamba v2 without fusion: scan + scan of the flipped *_b tensors, flipped back."""
    flip = {k: x[k].flip(-1) for k in ("u_b", "delta_b", "B_b", "C_b")}
    out = scan(*_scan_args(x), True)
    out_b = scan(flip["u_b"], flip["delta_b"], x["A_b"], flip["B_b"], flip["C_b"], x["D_b"],
                 x["z"].flip(-1), x["delta_bias_b"], True)
    return out + out_b.flip(-1)


def _bi_implementations(device: str):
    impls = {REFERENCE: lambda x: bi_selective_scan_ref(*_scan_args(x), *_scan_args(x, "_b")[:6],
                                                        x["delta_bias_b"], True)}
    backends = fast_backends(device)
    for backend in backends:
        impls[backend] = lambda x, b=backend: bi_selective_scan(
            *_scan_args(x), *_scan_args(x, "_b")[:6], x["delta_bias_b"], True, backend=b)
    if backends:  # the unfused baseline on the backend "auto" picks (CUDA C++ over Triton)
        best = "cuda" if "cuda" in backends else backends[0]
        impls[f"{best} (2 scans+flips)"] = partial(_two_scans_flips, partial(selective_scan, backend=best))
    anchor = _anchor_module(device)
    if anchor is not None:
        impls["mamba_ssm (2 scans+flips)"] = partial(_two_scans_flips, anchor.selective_scan_fn)
    return impls


register(Suite("bi_selective_scan", _SCAN_CASES, _bi_case, _bi_implementations, tiny=_SCAN_TINY,
               config="backward direction: its own u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b "
                      "shaped as the forward ones, z shared; " + _SCAN_CONFIG))


# Neighborhood attention (heads-last layout). DiNAT-mini's first stage: 56 x 56
# tokens, 2 heads of 32, kernel 7, dilation 1 and 8; and a long 1-D sequence.
_NA2D_CASES = (
    Case("dinat_mini_s1_d1", dict(batch=1, spatial=(56, 56), heads=2, head_dim=32, k=7, d=1), quick=True),
    Case("dinat_mini_s1_d8", dict(batch=1, spatial=(56, 56), heads=2, head_dim=32, k=7, d=8), quick=True),
    Case("dinat_mini_s1_batch32", dict(batch=32, spatial=(56, 56), heads=2, head_dim=32, k=7, d=1),
         devices=("cuda",)),
)
_NA1D_CASES = (
    Case("long_8k", dict(batch=1, spatial=(8192,), heads=2, head_dim=32, k=63, d=1), quick=True),
)


def _na_case(shape, device, dtype):
    """q, k, v (heads last) and the window (kernel size, dilation) the op is called with."""
    size = (shape["batch"], *shape["spatial"], shape["heads"], shape["head_dim"])
    x = {n: torch.randn(size, device=device, dtype=dtype).requires_grad_() for n in ("q", "k", "v")}
    x["window"] = (shape["k"], shape["d"])
    return x, torch.randn(size, device=device, dtype=dtype)


def _window_mask(spatial, k, d, device):
    """Dense (tokens, tokens) mask of the NA windows, for the masked-SDPA baseline."""
    from .reference.neighborhood import axis_windows

    mask = None
    for L in spatial:
        index, valid = axis_windows(L, k, d)
        axis = torch.zeros(L, L, dtype=torch.bool)
        axis[torch.arange(L)[:, None].expand_as(index)[valid], index[valid]] = True
        mask = axis if mask is None else (mask[:, None, :, None] & axis[None, :, None, :]).flatten(2).flatten(0, 1)
    return mask.to(device)


def _masked_sdpa(x):
    """Dense attention over all tokens with the NA windows as an explicit mask."""
    mask = _window_mask(x["q"].shape[1:-2], *x["window"], x["q"].device)
    q, k, v = (x[n].flatten(1, -3).transpose(1, 2) for n in ("q", "k", "v"))  # (B, H, tokens, D)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(x["q"].shape)


def _dense_sdpa(x):
    q, k, v = (x[n].flatten(1, -3).transpose(1, 2) for n in ("q", "k", "v"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x["q"].shape)


def _na_implementations(op):
    fn = {"na1d": na1d, "na2d": na2d}[op]

    def implementations(device: str):
        impls = {REFERENCE: lambda x: neighborhood_attention_ref(x["q"], x["k"], x["v"], *x["window"])}
        for backend in fast_backends(device):
            if backend != "cuda":  # no CUDA C++ NA kernel: Triton is the CUDA path
                impls[backend] = lambda x, b=backend: fn(x["q"], x["k"], x["v"], *x["window"], backend=b)
        impls["sdpa (masked)"] = _masked_sdpa
        if device == "cuda":  # SDPA's own throughput at this head_dim/dtype, for TFLOP/s comparisons
            impls["sdpa (dense, no mask)"] = _dense_sdpa
        try:
            import natten
        except ImportError:
            return impls
        impls["natten"] = lambda x: getattr(natten, op)(x["q"], x["k"], x["v"], kernel_size=x["window"][0],
                                                         dilation=x["window"][1])
        return impls
    return implementations


def _na_flops(shape) -> float:
    """QK^T and PV over the k^d neighbours of every query only."""
    tokens = math.prod(shape["spatial"])
    window = shape["k"] ** len(shape["spatial"])
    return 4.0 * shape["batch"] * shape["heads"] * tokens * window * shape["head_dim"]


_NA_CONFIG = "heads-last layout (batch, *spatial, heads, head_dim); no rpb; not causal; stride 1"
_NA_TINY = dict(batch=1, heads=1, head_dim=8)
register(Suite("na2d", _NA2D_CASES, _na_case, _na_implementations("na2d"),
               tiny={**_NA_TINY, "spatial": (6, 6), "k": 3, "d": 2}, config=_NA_CONFIG, flops=_na_flops))
register(Suite("na1d", _NA1D_CASES, _na_case, _na_implementations("na1d"),
               tiny={**_NA_TINY, "spatial": (20,), "k": 5, "d": 1}, config=_NA_CONFIG, flops=_na_flops))
