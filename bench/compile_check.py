#!/usr/bin/env python3
"""Compile every GPU kernel for sm_80/sm_90 without a GPU; report registers, spills, shared memory.

Triton kernels: the launchers (``fastvision/triton/*.py``) are run on meta
tensors through the public wrappers, fast path forced to Triton, with
``JITFunction.run`` replaced by a recorder, so the configurations are the
ones the wrappers really launch (signature dtypes, integer specialisation,
constexprs, num_warps, num_stages), for the shapes of

* ``smoke``: tests/test_gpu_smoke.py, every kernel once per dtype;
* ``tests``: the GPU tests (tests/test_*_gpu.py, their models included);
* ``bench``: the CUDA benchmark suites (``fastvision bench --device cuda``).

Each distinct configuration is compiled with the installed Triton for a fake
target (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``,
assembled by the ptxas that ships with Triton; no driver), in a process pool.

CUDA C++: every ``csrc/*/cuda.cu`` with the build's flags (read from
CMakeLists.txt) plus ``-Xptxas -v``, one architecture at a time; the dynamic
shared memory of launches that take it is evaluated from the launcher's own
expression in the source, for the (N, chunk) the scan wrappers use.

Exit status: 0 when everything compiled within every architecture's limits
(255 registers per thread; shared memory per block, opt-in: sm_80 163 KB,
sm_86/89 99 KB, sm_90 227 KB), 1 on a compile failure or a configuration
over a limit, 2 for bad arguments. Spills are reported, not failures, unless
``--fail-on-spill`` (spills in the target configurations: fp16/bf16 at head
dims 32-128 and scan N <= 64).

On a GPU, ``--warm`` compiles the same configurations for the real device
into Triton's own cache through ``JITFunction.warmup`` (what a launch would
compile), in parallel, so that a test run after it finds every kernel
compiled (bench/gpu_check.sh does this before its smoke, tests and bench
stages).

    python bench/compile_check.py                 # full: every source, sm_80 + sm_90
    python bench/compile_check.py --quick         # representative set (CI)
    python bench/compile_check.py --json bench/results/compile_check.json \\
        --text bench/results/compile_check.txt    # record the full report
    python bench/compile_check.py --list          # the configurations, no compiling
    python bench/compile_check.py --warm --source smoke   # on a GPU machine
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import hashlib
import importlib
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

# Limits per block / thread, by compute capability. Shared memory: the
# opt-in maximum per block (cudaFuncAttributeMaxDynamicSharedMemorySize).
MAX_REGS = 255
MAX_THREADS = 1024
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = ("float32", "float16", "bfloat16")
SOURCES = ("smoke", "tests", "bench")
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# --quick: the benchmark and smoke configurations of these (kernel, dtype)
# classes, sm_90 only; picked so that every kernel, every dtype and the
# target head dims / state sizes appear. See `quick_filter`.
QUICK_ARCHS = (90,)


# --------------------------------------------------------------------------
# Recording launches


@functools.cache
def _source_digest(module: str) -> str:
    """sha256 prefix of a kernel module's source."""
    return hashlib.sha256(Path(importlib.import_module(module).__file__).read_bytes()).hexdigest()[:16]


def _tensor_spec(x):
    import torch
    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype).replace("torch.", ""))
    return x


class Recorder:
    """Replaces JITFunction.run (records instead of launching) and makes the
    fused ops pick their Triton path for meta tensors."""

    def __init__(self):
        self.launches: list[dict] = []
        self.label = ""
        self.dtype = ""

    @contextlib.contextmanager
    def active(self):
        import torch
        from triton.runtime.jit import JITFunction

        from fastvision.ops import _library

        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            recorder.launches.append(dict(
                module=self.fn.__module__, name=self.fn.__name__,
                args=[_tensor_spec(a) for a in args], kwargs=dict(kwargs),
                label=recorder.label, workload_dtype=recorder.dtype))

        original_resolve = _library.FusedOp.resolve

        def resolve(self, backend, device, **facts):
            if torch.device(device).type == "meta" and backend != "reference":
                reason = self.limits("triton", **facts) if self.limits is not None and facts else None
                if reason is not None:
                    raise ValueError(f"backend='triton' {reason}")
                return "triton"
            return original_resolve(self, backend, device, **facts)

        saved_run = JITFunction.run
        JITFunction.run = run
        _library.FusedOp.resolve = resolve
        try:
            yield self
        finally:
            JITFunction.run = saved_run
            _library.FusedOp.resolve = original_resolve


# --------------------------------------------------------------------------
# Workloads: (source, label, dtype, function running the fast path on meta)


def _import_tests():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def _meta(tensors):
    return [t.to("meta").requires_grad_() if t is not None else None for t in tensors]


def _grad(out, leaves):
    import torch
    torch.autograd.grad(out, [t for t in leaves if t is not None and t.requires_grad])


def _loss(*outputs):
    """What the tests' weighted losses reach (every output given), on meta tensors."""
    return sum(t.double().sum() for t in outputs if t is not None)


def _param_grid(fn) -> list[dict]:
    """The product of a test function's @pytest.mark.parametrize values, as dicts."""
    grid = [{}]
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])]
        values = []
        for v in mark.args[1]:
            v = v.values if hasattr(v, "values") and hasattr(v, "marks") else v  # pytest.param
            values.append(v if len(names) > 1 else (v[0] if isinstance(v, tuple) and len(v) == 1 else v,))
        grid = [{**g, **dict(zip(names, v))} for g in grid for v in values]
    return grid


def smoke_workloads():
    _import_tests()
    import test_gpu_smoke as smoke
    for case in smoke.CASES:
        for dtype in smoke.DTYPES:
            yield (f"smoke:{case.name}", dtype,
                   lambda c=case, d=dtype: smoke.run_fast_path(c, "meta", d, "triton"))


def test_workloads():
    """The GPU tests' shapes, called as the tests call them (fast path only):
    every conformance spec's gpu_cases in each dtype and compile_cases, the
    deterministic-mode test and the models' GPU tests."""
    _import_tests()
    import torch
    from conformance import all_specs

    from fastvision.testing import case_id

    for spec in all_specs():
        # test_gpu_backends_vs_float32_reference, and test_gpu_torch_compile_fullgraph (float32)
        runs = [(case, seed, dtype) for seed, case in enumerate(spec.gpu_cases)
                for dtype in (torch.float32, torch.float16, torch.bfloat16)]
        runs += [(case, seed, torch.float32) for seed, case in enumerate(spec.compile_cases)]
        for case, seed, dtype in runs:
            def run(spec=spec, case=case, dtype=dtype, seed=seed):
                spec.forward_backward(spec.sample(case, dtype, seed).to("meta"), backend="triton")
            yield f"tests:{spec.name} {case_id(case)}", dtype, run

    def deterministic():
        import test_deterministic as td
        with td.deterministic():
            td._scan_grads(td._scan_inputs("meta", batch=4, dim=64, N=16, L=300, groups=1), "triton")
            td._na_grads(*td._na_inputs("meta"), "triton")
            import test_deform_attn as tda  # its GPU test's deterministic backward (sorted gather)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                tda.deterministic_gpu_run("meta", backend="triton", dtype=dtype)
    yield "tests:deterministic", torch.float32, deterministic

    def model(builder):
        # The tests run the models under torch.autocast("cuda", bfloat16); on
        # meta tensors the model is cast to bfloat16 instead (the same kernel
        # dtypes: autocast's matmuls hand bfloat16 activations to the ops).
        with torch.device("meta"):
            m = builder()
        m = m.to(torch.bfloat16)
        out = m(torch.randn(2, 3, 224, 224, device="meta", dtype=torch.bfloat16))
        out.float().sum().backward()

    from fastvision.models import dinat_mini, stvit_small, vim_tiny
    yield "tests:dinat_mini", torch.bfloat16, lambda: model(dinat_mini)
    yield "tests:vim_tiny", torch.bfloat16, lambda: model(vim_tiny)
    yield "tests:stvit_small", torch.bfloat16, lambda: model(stvit_small)


def bench_shapes() -> dict[str, list[dict]]:
    """op -> shapes of the benchmark suites' CUDA cases."""
    from fastvision.bench import SUITES
    return {op: [dict(c.shape) for c in s.cases if "cuda" in c.devices] for op, s in SUITES.items()}


def bench_workloads():
    import torch
    from fastvision.ops import (bi_selective_scan, criss_cross_attention, ms_deform_attn, na1d, na2d, na3d,
                                selective_scan)
    shapes = bench_shapes()

    def scan_inputs(s, dtype):
        b, d, L, N = s["batch"], s["dim"], s["L"], s["N"]
        m = dict(device="meta")
        return [torch.empty(b, d, L, dtype=dtype, **m), torch.empty(b, d, L, dtype=dtype, **m),
                torch.empty(d, N, **m), torch.empty(b, N, L, dtype=dtype, **m),
                torch.empty(b, N, L, dtype=dtype, **m), torch.empty(d, **m),
                torch.empty(b, d, L, dtype=dtype, **m), torch.empty(d, **m)]

    def scan(s, dtype):
        t = [x.requires_grad_() for x in scan_inputs(s, dtype)]
        _grad(selective_scan(*t, True, backend="triton").sum(), t)

    def bi(s, dtype):
        f = [x.requires_grad_() for x in scan_inputs(s, dtype)]
        b = [x.requires_grad_() for x in scan_inputs(s, dtype)]
        out = bi_selective_scan(*f, *b[:6], b[7], True, backend="triton")
        _grad(out.sum(), f + b[:6] + [b[7]])

    def na(op, s, dtype):
        size = (s["batch"], *s["spatial"], s["heads"], s["head_dim"])
        q, k, v = (torch.empty(size, device="meta", dtype=dtype).requires_grad_() for _ in range(3))
        _grad(op(q, k, v, s["k"], dilation=s["d"], backend="triton").sum(), (q, k, v))

    def cca(s, dtype):
        B, H, W = s["batch"], s["H"], s["W"]
        q, k = (torch.empty(B, s["Cqk"], H, W, device="meta", dtype=dtype).requires_grad_() for _ in range(2))
        v = torch.empty(B, s["C"], H, W, device="meta", dtype=dtype).requires_grad_()
        _grad(criss_cross_attention(q, k, v, backend="triton").sum(), (q, k, v))

    def rle_encode(s, dtype):
        from fastvision.triton.masks import _encode_launch
        for layout in ("row-major", "column-major"):  # both layouts the kernels read
            m = torch.empty(s["n"], s["h"], s["w"], dtype=torch.bool, device="meta")
            if layout == "column-major":
                m = m.transpose(1, 2).contiguous().transpose(1, 2)
            _encode_launch(m, total=s["n"] * 64)  # the transitions' count: a device read on a GPU

    def rle_decode(s, dtype):
        from fastvision.triton.masks import _decode_launch
        n = s["n"]
        _decode_launch(torch.empty(n * 64, dtype=torch.int64, device="meta"),
                       torch.empty(n + 1, dtype=torch.int64, device="meta"), s["h"], s["w"])

    def stoken(s, dtype, layer: bool):
        from fastvision.ops import StokenAttention, super_token_sampling, super_token_upsample
        x = torch.empty(s["batch"], s["dim"], *s["size"], device="meta", dtype=dtype).requires_grad_()
        if layer:
            with torch.device("meta"):
                m = StokenAttention(s["dim"], s["stoken"], s["n_iter"], num_heads=s["heads"], qkv_bias=True,
                                    backend="triton").to(dtype)
            out = m(x)
        else:
            stokens, affinity = super_token_sampling(x, s["stoken"], s["n_iter"], backend="triton")
            out = super_token_upsample(stokens, affinity, s["stoken"], s["size"], backend="triton")
        _grad(out.sum(), [x])

    def msda(s, dtype):
        from fastvision.bench.suites.deform_attn import make_inputs
        x, _ = make_inputs(s, "meta", dtype)
        out = ms_deform_attn(x["value"], x["value_spatial_shapes"], x["value_level_start_index"],
                             x["sampling_locations"], x["attention_weights"], backend="triton")
        _grad(out.sum(), [x["value"], x["sampling_locations"], x["attention_weights"]])

    def deform_conv(s, dtype):
        from fastvision.ops import deform_conv2d
        B, Cin, Cout, H, W, k, G = (s[n] for n in ("batch", "Cin", "Cout", "H", "W", "k", "G"))
        m = dict(device="meta", dtype=dtype)
        t = [torch.empty(B, Cin, H, W, **m), torch.empty(B, 2 * G * k * k, H, W, **m),
             torch.empty(Cout, Cin, k, k, **m), torch.empty(Cout, **m), torch.empty(B, G * k * k, H, W, **m)]
        t = [x.requires_grad_() for x in t]
        _grad(deform_conv2d(t[0], t[1], t[2], t[3], 1, k // 2, 1, t[4], backend="triton").sum(), t)

    def dcn_agg(s, dtype):
        from fastvision.ops import dcn_aggregate
        N, H, W, G, Cg = s["batch"], s["H"], s["W"], s["G"], s["Cg"]
        for softmax in (False, True):  # DCNv4's weights, DCNv3's softmax: two kernel variants
            t = [torch.empty(N, H, W, c, device="meta", dtype=dtype).requires_grad_()
                 for c in (G * Cg, G * 9 * 2, G * 9)]
            _grad(dcn_aggregate(*t, 3, 1, 1, 1, G, 1.0, False, softmax, backend="triton").sum(), t)

    run = {"selective_scan": scan, "bi_selective_scan": bi, "criss_cross": cca, "ms_deform_attn": msda,
           "dcn_aggregate": dcn_agg, "deform_conv2d": deform_conv,
           "na1d": lambda s, d: na(na1d, s, d), "na2d": lambda s, d: na(na2d, s, d),
           "na3d": lambda s, d: na(na3d, s, d), "rle_encode": rle_encode, "rle_decode": rle_decode,
           "super_token": lambda s, d: stoken(s, d, True), "super_token_ops": lambda s, d: stoken(s, d, False)}
    for op, cases in shapes.items():
        if not cases:  # a CPU-only suite
            continue
        if op not in run:
            print(f"compile_check: no adapter for benchmark suite {op!r}; its shapes are not checked",
                  file=sys.stderr)
            continue
        for s in cases:
            # (The mask codecs read uint8/bool/int64 whatever the run's dtype: one configuration.)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                shape = " ".join(f"{k}={v}" for k, v in s.items())
                yield f"bench:{op} {shape}", dtype, lambda f=run[op], s=s, d=dtype: f(s, d)


WORKLOADS = {"smoke": smoke_workloads, "tests": test_workloads, "bench": bench_workloads}


def record_launches(sources, dtypes) -> tuple[list[dict], list[str]]:
    """Runs the sources' workloads on meta tensors; returns (launches, errors)."""
    recorder = Recorder()
    errors = []
    with recorder.active():
        for source in sources:
            for label, dtype, fn in WORKLOADS[source]():
                name = str(dtype).replace("torch.", "")
                if name not in dtypes:
                    continue
                recorder.label, recorder.dtype = label, name
                try:
                    fn()
                except Exception as err:  # a workload that cannot run on meta: say so, keep going
                    errors.append(f"{label} [{name}]: {type(err).__name__}: {err}")
    return recorder.launches, errors


# --------------------------------------------------------------------------
# Configurations: launches deduplicated by what Triton compiles


def _mock_args(args):
    import torch
    from triton.runtime.jit import MockTensor
    return [MockTensor(getattr(torch, a[1])) if isinstance(a, (tuple, list)) and a and a[0] == "tensor" else a
            for a in args]


def _kernel(module, name):
    return getattr(importlib.import_module(module), name)


_BINDERS: dict = {}


def _bind(fn, args, kwargs, arch):
    """(signature, constexprs, attrs, options) as JITFunction.run computes them for `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    key = (id(fn), arch)
    if key not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[key] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[key]
    bound, specialization, options = binder(*_mock_args(args), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options, specialization


def configurations(launches: list[dict]) -> list[dict]:
    """Distinct compile configurations (kernel, specialisation, options), each
    with the workloads that launch it."""
    configs: dict = {}
    for launch in launches:
        fn = _kernel(launch["module"], launch["name"])
        signature, constexprs, attrs, options, spec = _bind(fn, launch["args"], launch["kwargs"], 90)
        key = (launch["module"], launch["name"], repr(spec),
               repr(sorted((k, v) for k, v in launch["kwargs"].items() if k not in fn.arg_names)),
               _source_digest(launch["module"]))  # a --cache entry is stale once the kernels change
        if key not in configs:
            names = fn.arg_names
            consts = {names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
            # Integer arguments as Triton specialises them: == 1 (a constant), divisible by 16, other.
            int_spec = {}
            for n, a, sp in zip(names, launch["args"], spec):
                if isinstance(a, int) and not isinstance(a, bool):
                    int_spec[n] = "=1" if sp[0] == "constexpr" else ("%16" if sp[1] == "D" else "")
            first_ptr = next((signature[n] for n in names if str(signature.get(n, "")).startswith("*")), "")
            configs[key] = dict(
                key=repr(key), kernel=launch["name"], module=launch["module"], args=launch["args"],
                kwargs=launch["kwargs"],
                dtype={"*fp32": "float32", "*fp16": "float16", "*bf16": "bfloat16"}.get(first_ptr, first_ptr),
                constexprs={k: v for k, v in consts.items() if k in launch["kwargs"]},
                int_spec=int_spec,
                num_warps=options.num_warps, num_stages=options.num_stages, maxnreg=options.maxnreg,
                labels=[], launches=0)
        c = configs[key]
        c["launches"] += 1
        tag = f"{launch['label']} [{SHORT.get(launch['workload_dtype'], launch['workload_dtype'])}]"
        if tag not in c["labels"]:
            c["labels"].append(tag)
    out = list(configs.values())
    for c in out:
        c["config"] = describe(c) + (f" maxnreg={c['maxnreg']}" if c["maxnreg"] else "")
        ints = " ".join(f"{n}{v}" for n, v in c["int_spec"].items() if v)
        c["ints"] = ints
        c["group"] = repr((c["kernel"], c["dtype"], sorted(c["constexprs"].items()), c["num_warps"],
                           c["num_stages"], c["maxnreg"]))
        c["target"] = is_target(c)
    out.sort(key=_order)
    return out


def _order(c: dict):
    """Kernel, dtype, then the constexprs in numeric order."""
    values = tuple((0, v, "") if isinstance(v, (int, bool)) else (1, 0, str(v)) for v in c["constexprs"].values())
    return (c["kernel"], DTYPES.index(c["dtype"]) if c["dtype"] in DTYPES else 9, values, c.get("ints", ""))


def one_per_group(configs: list[dict]) -> list[dict]:
    """One configuration per (kernel, dtype, constexprs, warps, stages): the
    integer specialisations of a configuration (an argument divisible by 16 or
    equal to 1) compile to nearly the same code; `specialisations` counts them."""
    groups: dict = {}
    for c in configs:
        if c["group"] in groups:
            g = groups[c["group"]]
            g["specialisations"] += 1
            g["launches"] += c["launches"]
            g["labels"] += [l for l in c["labels"] if l not in g["labels"]]
        else:
            groups[c["group"]] = dict(c, specialisations=1, labels=list(c["labels"]))
    return list(groups.values())


def describe(c: dict) -> str:
    """A short, readable label of a configuration's constexprs."""
    k = c["constexprs"]
    if "NDIM" in k:
        tq = "x".join(str(k[f"TQ{i}"]) for i in range(3 - k["NDIM"], 3))
        tk = "x".join(str(k[f"TK{i}"]) for i in range(3 - k["NDIM"], 3))
        causal = "".join("c" if k[f"C{i}"] else "-" for i in range(3 - k["NDIM"], 3))
        return (f"{k['NDIM']}d D={k['D']}/{k['DV']} pad={k['D_PAD']}/{k['DV_PAD']} TQ={tq} TK={tk}"
                + (" rpb" if k["HAS_RPB"] else "") + (f" causal={causal}" if "c" in causal else "")
                + (" dlse" if k.get("HAS_DLSE") else "") + (" deterministic" if k.get("DETERMINISTIC") else "")
                + (" safe" if k.get("SAFE") else ""))
    if "N_PAD" in k:
        bc = "/".join(("var" if k.get(f) else "const") for f in ("VAR_B", "VAR_C") if f in k)
        parts = [f"N_PAD={k['N_PAD']} CHUNK={k['CHUNK']} B/C={bc}"]
        if "VAR_BB" in k:
            parts.append("bwd B/C=" + "/".join("var" if k[f] else "const" for f in ("VAR_BB", "VAR_CB")))
        parts += [flag.lower() for flag in ("REVERSE", "HAS_Z", "HAS_DLAST", "SOFTPLUS", "DETERMINISTIC")
                  if k.get(flag)]
        return " ".join(parts)
    return " ".join(f"{n}={v}" for n, v in k.items())


def is_target(c: dict) -> bool:
    """The configurations that should not spill: fp16/bf16 (NA: at head dims 32-128; scan: N <= 64).
    (Not NA's SAFE re-runs: they only work on programs whose operands held inf or NaN.)"""
    k = c["constexprs"]
    if c["dtype"] not in ("float16", "bfloat16") or k.get("SAFE"):
        return False
    if "NDIM" in k:
        return 32 <= max(k["D"], k["DV"]) <= 128 and min(k["D"], k["DV"]) >= 32
    if "N_PAD" in k:
        return k["N_PAD"] <= 64
    if "DV_PAD" in k:
        return 32 <= k["DV_PAD"] <= 128
    return True  # the other families: every fp16/bf16 configuration


def quick_filter(configs: list[dict]) -> list[dict]:
    """A representative set: per kernel and dtype, the benchmark and smoke
    configurations with the largest tiles at the target sizes (NA: the head
    dims 32 and 128; scan: N 16 and 64), and one of every kernel."""
    chosen, seen = [], set()

    def pick(c, why):
        key = id(c)
        if key not in seen:
            seen.add(key)
            chosen.append(c)

    by_class = defaultdict(list)
    for c in configs:
        k = c["constexprs"]
        size = k.get("D_PAD", k.get("N_PAD", k.get("DV_PAD", 0)))
        by_class[(c["kernel"], c["dtype"], size)].append(c)
    for (kernel, dtype, size), group in sorted(by_class.items(), key=lambda kv: str(kv[0])):
        main = "_na_fwd" in kernel or "_na_bwd_d" in kernel or "selective" in kernel
        wanted = size in (32, 128) if "_na_" in kernel else size in (16, 64)
        if main and wanted:
            # the most-launched configuration of the class (the benchmark/smoke one)
            pick(max(group, key=lambda c: (any(l.startswith("bench:") for l in c["labels"]), c["launches"])),
                 "class")
    for kernel in sorted({c["kernel"] for c in configs}):
        if not any(c["kernel"] == kernel for c in chosen):
            pick(next(c for c in configs if c["kernel"] == kernel), "kernel")
    return chosen


# --------------------------------------------------------------------------
# Compiling (process pool workers)

_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """{function: {arch, regs, stack, spill_stores, spill_loads, static_smem}} from `ptxas -v` output."""
    result: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            current = dict(arch=m.group(2), regs=None, stack=0, spill_stores=0, spill_loads=0, static_smem=0)
            result[m.group(1)] = current
            continue
        if current is None:
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _PTXAS_USED.search(line)
        if m:
            current.update(regs=int(m.group(1)), static_smem=int(m.group(3) or 0))
    return result


def _worker_init(env: dict) -> None:
    os.environ.update(env)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _ptxas_fallback(ptx: str, arch: int) -> str:
    """ptxas -v on Triton's PTX, for Triton versions that do not print the log."""
    from triton import knobs
    ptxas = knobs.nvidia.ptxas.path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "k.ptx")
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(d, "k.o"))],
                           capture_output=True, text=True)
    return r.stdout + r.stderr


def compile_triton(job: dict) -> dict:
    """Compile one configuration for job['arch'] (fake target) or the current
    device (job['warm']); returns the resource report."""
    t0 = time.perf_counter()
    out = dict(regs=None, spill_stores=None, spill_loads=None, stack=None, smem=None, error=None)
    try:
        fn = _kernel(job["module"], job["kernel"])
        if job.get("warm"):
            kernel = fn.warmup(*_mock_args(job["args"]), grid=(1,), **job["kwargs"])
            out["smem"] = kernel.metadata.shared
            try:  # loads it on the device: the driver's own resource check
                kernel._init_handles()
                out.update(regs=kernel.n_regs, spill_stores=kernel.n_spills)
            except AttributeError:  # private API moved: the smem figure stands alone then
                pass
        else:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource, compile
            arch = job["arch"]
            signature, constexprs, attrs, options, _ = _bind(fn, job["args"], job["kwargs"], arch)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                kernel = compile(ASTSource(fn, signature, constexprs, attrs),
                                 target=GPUTarget("cuda", arch, 32), options=options.__dict__)
            info = parse_ptxas(log.getvalue()).get(kernel.metadata.name)
            if info is None or info["regs"] is None:
                info = parse_ptxas(_ptxas_fallback(kernel.asm["ptx"], arch)).get(kernel.metadata.name)
            if info is not None:
                out.update({k: info[k] for k in ("regs", "spill_stores", "spill_loads", "stack")})
            out["smem"] = kernel.metadata.shared
    except Exception as err:
        lines = [l for l in f"{type(err).__name__}: {err}".splitlines() if l.strip()]
        out["error"] = "\n".join(lines[:12])
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    return out


# ---- CUDA C++ ----------------------------------------------------------------


def cmake_cuda_flags(cmake: Path = ROOT / "CMakeLists.txt") -> tuple[list[str], list[str], list[str]]:
    """(nvcc flags, the build's default architectures, notes) read from CMakeLists.txt."""
    text = cmake.read_text()
    notes = []
    flags = []
    m = re.search(r"set\(CMAKE_CUDA_STANDARD (\d+)\)", text)
    flags.append(f"-std=c++{m.group(1) if m else 17}")
    if not m:
        notes.append("CMAKE_CUDA_STANDARD not found in CMakeLists.txt: assumed 17")
    m = re.search(r"target_compile_options\(_C_cuda PRIVATE \$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>", text)
    if m:
        flags += m.group(1).split()
    else:
        notes.append("_C_cuda's CUDA compile options not found in CMakeLists.txt: using -O3")
        flags.append("-O3")
    variables = dict(re.findall(r"set\((\w+) ([^)\n]*)\)", text))
    defs = re.search(r"target_compile_definitions\(_C_cuda PRIVATE ([^)]*)\)", text)
    for d in (defs.group(1).split() if defs else []):
        v = re.fullmatch(r"\$\{(\w+)\}", d)
        for item in (variables.get(v.group(1), "").split() if v else [d]):
            item = re.sub(r"\$\{(\w+)\}", lambda mm: variables.get(mm.group(1), ""), item)
            flags.append(f"-D{item}")
    if not defs:
        notes.append("_C_cuda's compile definitions not found in CMakeLists.txt")
    archs = re.search(r'set\(CMAKE_CUDA_ARCHITECTURES "([^"]+)"\)', text)
    return flags, (archs.group(1).split(";") if archs else []), notes


def nvcc_command(cu: Path, arch: int, flags: list[str]) -> list[str]:
    import torch
    torch_include = Path(torch.__file__).parent / "include"
    return ["nvcc", *flags, "-Xcompiler", "-fPIC", f"-I{torch_include}", f"-I{ROOT / 'csrc'}",
            f"-I{sysconfig.get_paths()['include']}",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c", str(cu), "-o", os.devnull]


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short_kernel(demangled: str) -> str:
    """'void fastvision::scan::cuda::(anonymous namespace)::backward_kernel<4>(...)' -> 'backward_kernel<4>'."""
    head = demangled.replace("(anonymous namespace)", "anon").split("(", 1)[0]
    return head.split("::")[-1].replace("void ", "")


def compile_cuda(job: dict) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(job["cmd"], capture_output=True, text=True, cwd=ROOT)
    log = r.stdout + r.stderr
    funcs = parse_ptxas(log)
    names = _demangle(list(funcs))
    kernels = [dict(kernel=_short_kernel(names[f]), mangled=f, **{k: v for k, v in info.items() if k != "arch"})
               for f, info in funcs.items()]
    error = None if r.returncode == 0 else "\n".join(log.strip().splitlines()[-15:])
    return dict(kernels=kernels, error=error, compile_s=round(time.perf_counter() - t0, 2))


def cuda_dynamic_smem(source: str) -> dict:
    """Dynamic shared memory of the launches in a .cu file, from its own code:
    {kernel: (per_warp(N, chunk) -> bytes, nper(N) -> template argument,
    max_warps)}. The launcher gives a block as many warps as the device's
    shared memory holds, up to max_warps.

    Reads `constexpr int NAME = VALUE;` constants, `int state_per_lane(...)
    { return N <= 32 ? 1 : ... : 8; }` and `size_t KERNEL_smem_per_warp(...)
    { return EXPR; }` (KERNEL_kernel is the kernel). Empty when the code no
    longer has that shape.
    """
    consts = {k: int(v) for k, v in re.findall(r"constexpr int (\w+) = (\d+);", source)}
    rule = re.search(r"int state_per_lane\(int64_t N\) \{ return ([^;]+);", source)
    if not rule or "kWarpsPerBlock" not in consts:
        return {}
    steps = re.findall(r"N <= (\d+) \? (\d+) :", rule.group(1))
    last = re.search(r": (\d+)$", rule.group(1).strip())
    if not steps or not last:
        return {}
    dispatch = [(int(n), int(t)) for n, t in steps] + [(1 << 30, int(last.group(1)))]

    def nper(N):
        return next(t for limit, t in dispatch if N <= limit)

    result = {}
    for name, expr in re.findall(r"size_t (\w+)_smem_per_warp\(int64_t chunk, int nper\) \{\s*return ([^;]+);",
                                 source):
        text = expr.replace("sizeof(float)", "4")
        if not re.fullmatch(r"[\w\s*+()/-]+", text):
            continue
        code = compile(text, "<cuda smem>", "eval")

        def per_warp(N, chunk, code=code):
            return int(eval(code, {"__builtins__": {}}, {**consts, "nper": nper(N), "chunk": chunk}))
        result[f"{name}_kernel"] = (per_warp, nper, consts["kWarpsPerBlock"])
    return result


# --------------------------------------------------------------------------
# Driver


def _versions() -> dict:
    import torch
    import triton
    v = dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
             host=platform.node(), cpus=os.cpu_count())
    try:
        from triton import knobs
        out = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True).stdout
        v["ptxas"] = (re.search(r"release ([\d.]+)", out) or re.search(r"(V[\d.]+)", out)).group(1)
    except Exception:
        v["ptxas"] = None
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+)", out)
        v["nvcc"] = m.group(1) if m else out.strip().splitlines()[-1:]
    return v


def check_limits(entry: dict, arch: int, smem_limit: int) -> list[str]:
    problems = []
    if entry.get("regs") is not None and entry["regs"] > MAX_REGS:
        problems.append(f"{entry['regs']} registers > {MAX_REGS}")
    smem = entry.get("total_smem", entry.get("smem"))
    if smem is not None and smem > smem_limit:
        problems.append(f"shared memory {smem} B > {smem_limit} B (sm_{arch})")
    threads = entry.get("num_warps", 0) * 32
    if threads > MAX_THREADS:
        problems.append(f"{threads} threads > {MAX_THREADS}")
    return problems


def _kb(b):
    return "-" if b is None else f"{b / 1024:.1f}"


def _spill(e):
    return "-" if e.get("spill_stores") is None else f"{e['spill_stores']}/{e.get('spill_loads') or 0}"


def render_text(report: dict) -> str:
    m = report["meta"]
    lines = [f"fastvision compile check, {m['date']}: triton {m['versions'].get('triton')} "
             f"(ptxas {m['versions'].get('ptxas')}), nvcc {m['versions'].get('nvcc')}, torch {m['versions'].get('torch')}; "
             f"{m['mode']}; sources {', '.join(m['sources'])}; dtypes {', '.join(m['dtypes'])}"
             + ("; --quick" if m["quick"] else "") + (f"; kernels {m['kernels']}" if m.get("kernels") else "")
             + ("; target configurations only" if m.get("target_only") else ""),
             f"{m['n_configs']} Triton configurations compiled per architecture, from {m['n_launches']} launches; wall time {m['wall_s']} s "
             f"({m['jobs']} processes). Limits: {MAX_REGS} registers/thread; shared memory per block "
             + ", ".join(f"sm_{a} {SMEM_LIMIT.get(a, 0) // 1024} KB" for a in m["archs"])
             + ". spill = bytes of spill stores/loads; T = target configuration (fp16/bf16, head dim 32-128, "
               "scan N <= 64)."]
    lines += ["", "== Summary by kernel (configs: distinct compiled configurations; spilling: how many spill, "
                  "T: of them target configurations) =="]
    body = []
    for arch in m["archs"]:
        by_kernel: dict = {}
        for r in report["triton"]:
            if r["arch"] == arch:
                by_kernel.setdefault((r["kernel"], r["dtype"]), []).append(r)
        for (kernel, dtype), rows in by_kernel.items():
            ok = [r for r in rows if not r.get("error")]
            regs = [r["regs"] for r in ok if r.get("regs") is not None]
            spill = [r for r in ok if r.get("spill_stores")]
            smem = [r["smem"] for r in ok if r.get("smem") is not None]
            body.append([f"sm_{arch}", kernel.strip("_").replace("_kernel", ""), SHORT.get(dtype, dtype),
                         str(len(rows)), ("-" if not regs else str(regs[0]) if min(regs) == max(regs)
                                          else f"{min(regs)}-{max(regs)}"),
                         f"{len(spill)} (T {sum(1 for r in spill if r['target'])})" if spill else "0",
                         str(max((r["spill_stores"] for r in spill), default=0)),
                         f"{max(smem) / 1024:.1f}" if smem else "-",
                         str(len(rows) - len(ok)), str(sum(1 for r in ok if r.get("problems")))])
    lines += _table(["arch", "kernel", "dtype", "configs", "regs", "spilling", "max spill st", "max smem KB",
                     "errors", "over limit"], body)

    for arch in m["archs"]:
        groups: dict = {}
        for r in report["triton"]:
            if r["arch"] == arch:
                groups.setdefault((r["kernel"], r["dtype"], r["config"], r["num_warps"], r["num_stages"]), []).append(r)
        lines += ["", f"== Triton, sm_{arch} (n: integer specialisations the launches have, an argument "
                      "divisible by 16 or equal to 1; one compiled unless --all-specialisations) =="]
        header = ["kernel", "dtype", "config", "w", "st", "n", "regs", "spill st/ld", "stack", "smem KB", "",
                  "status"]
        body = []
        for (kernel, dtype, config, warps, stages), rows in groups.items():
            errs = [r for r in rows if r.get("error")]
            over = [p for r in rows for p in r.get("problems", [])]
            ok = [r for r in rows if not r.get("error")]
            spills = [r for r in ok if r.get("spill_stores")]
            status = ("ERROR" if errs else "OVER: " + "; ".join(sorted(set(over))) if over else
                      "spills" if spills else "ok")

            def span(key, fmt=str):
                vals = [r[key] for r in ok if r.get(key) is not None]
                if not vals:
                    return "-"
                lo, hi = min(vals), max(vals)
                return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"
            worst = max(ok, key=lambda r: (r.get("spill_stores") or 0, r.get("spill_loads") or 0), default={})
            body.append([kernel.strip("_").replace("_kernel", ""), SHORT.get(dtype, dtype), config, str(warps),
                         str(stages), str(sum(r.get("specialisations", 1) for r in rows)), span("regs"), _spill(worst) if worst else "-",
                         span("stack"), span("smem", lambda b: f"{b / 1024:.1f}"),
                         "T" if rows[0]["target"] else "", status])
        lines += _table(header, body)
    if report["cuda"]:
        lines += ["", "== CUDA C++ (nvcc " + " ".join(report["meta"]["nvcc_flags"]) + " -Xptxas -v) =="]
        body = []
        for r in report["cuda"]:
            if r.get("error") and not r.get("kernel"):
                body.append([r["source"], f"sm_{r['arch']}", "ERROR", "", "", "", "", "", r["error"].splitlines()[-1]])
                continue
            body.append([r["source"], f"sm_{r['arch']}", r["kernel"], str(r["regs"]), _spill(r), str(r["stack"]),
                         _kb(r["static_smem"]), r.get("dynamic_smem_note", ""),
                         "OVER: " + "; ".join(r["problems"]) if r["problems"] else "ok"])
        lines += _table(["source", "arch", "kernel", "regs", "spill", "stack", "static KB", "dynamic smem", "status"],
                        body)
    ada = [r for r in report["triton"] if r["arch"] == 80 and (r.get("smem") or 0) > SMEM_LIMIT[89]]
    ada += [r for r in report["cuda"] if r.get("arch") == 80 and r.get("dynamic_smem")
            and max(d["per_warp"] for d in r["dynamic_smem"]) + (r.get("static_smem") or 0) > SMEM_LIMIT[89]]
    if ada:
        lines += ["", f"over {SMEM_LIMIT[89] // 1024} KB of shared memory, the sm_86/sm_89 limit (these sm_80 "
                      "configurations would not launch on those GPUs):"]
        for r in ada:
            if "dynamic_smem" in r:
                lines.append(f"  CUDA {r['kernel']}: {r['dynamic_smem_note']}")
            else:
                lines.append(f"  {r['kernel']} {SHORT.get(r['dtype'], r['dtype'])} {r['config']}: "
                             f"{r['smem'] / 1024:.1f} KB")
    s = report["summary"]
    lines += ["", f"summary: {s['compiled']} compiled, {s['errors']} errors, {s['over_limit']} over a limit, "
                  f"{s['spilling']} spilling ({s['spilling_target']} of them target configurations)"
                  + (f", {s['workload_errors']} workloads failed on meta tensors" if s.get("workload_errors") else "")]
    missing = report["meta"].get("not_compiled") or []
    if missing:
        lines.append(f"NOT COMPILED ({len(missing)}: --cached-only report of an unfinished run): "
                     + "; ".join(missing[:40]) + (" ..." if len(missing) > 40 else ""))
    for w in report["meta"].get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines) + "\n"


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compile_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--arch", type=int, nargs="+", metavar="CC",
                   help="compute capabilities to compile for (default 80 90; --quick: 90)")
    p.add_argument("--quick", action="store_true", help="a representative set of configurations (CI)")
    p.add_argument("--source", nargs="+", choices=SOURCES, help="where the shapes come from (default: all)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--kernels", metavar="REGEX", help="only Triton kernels whose name matches")
    p.add_argument("--target-only", action="store_true",
                   help="only the target configurations (those --fail-on-spill judges)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--text", metavar="FILE", help="write the text report to FILE too")
    p.add_argument("--list", action="store_true", help="list the configurations; compile nothing")
    p.add_argument("--all-specialisations", action="store_true",
                   help="compile every integer specialisation of each configuration (as a launch would; "
                        "always with --warm); default: one per configuration")
    p.add_argument("--cache", metavar="FILE.jsonl",
                   help="reuse results recorded in FILE and append new ones (a long run can be resumed)")
    p.add_argument("--cached-only", action="store_true",
                   help="with --cache: report the Triton results FILE holds, compile no new ones (the rest "
                        "is listed as not compiled, and the check fails)")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ sources")
    p.add_argument("--smem-limit", type=int, metavar="BYTES",
                   help="override every architecture's shared-memory limit (to test the check itself)")
    p.add_argument("--fail-on-spill", action="store_true",
                   help="also exit 1 when a target configuration spills")
    p.add_argument("--render", metavar="JSON", help="print (and --text) the report of a saved JSON; compile nothing")
    p.add_argument("--warm", action="store_true",
                   help="on a GPU: compile for the current device into Triton's cache (no CUDA C++)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        text = render_text(json.loads(Path(args.render).read_text()))
        print(text)
        if args.text:
            Path(args.text).write_text(text)
        return 0
    # Compiling needs real JITFunctions: never the interpreter.
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    t_start = time.perf_counter()
    sources = args.source or list(SOURCES)
    archs = args.arch or (list(QUICK_ARCHS) if args.quick else [80, 90])
    if args.warm:
        import torch
        if not torch.cuda.is_available():
            print("compile_check: --warm needs a CUDA GPU (it compiles for the current device); "
                  "without one, run without --warm to compile for fake targets", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability()
        archs = [major * 10 + minor]
    for a in archs:
        if a not in SMEM_LIMIT:
            print(f"compile_check: unknown shared-memory limit for sm_{a}; known: "
                  f"{', '.join(f'sm_{k}' for k in SMEM_LIMIT)}", file=sys.stderr)
            return 2

    import torch  # noqa: F401  (after TRITON_INTERPRET is cleared)
    import triton  # noqa: F401
    warnings_ = []
    launches, errors = record_launches(sources, set(args.dtypes)) if not args.no_triton else ([], [])
    for e in errors:
        warnings_.append(f"workload could not run on meta tensors: {e}")
    configs = configurations(launches) if launches else []
    if args.kernels:
        configs = [c for c in configs if re.search(args.kernels, c["kernel"])]
    if args.target_only:
        configs = [c for c in configs if c["target"]]
    if not args.all_specialisations and not args.warm:
        configs = one_per_group(configs)
    if args.quick:
        configs = quick_filter(configs)

    if args.list:
        for c in configs:
            print(f"{c['kernel']:<32} {SHORT.get(c['dtype'], c['dtype']):<5} {c['config']:<60} [{c['ints']}] "
                  f"warps={c['num_warps']} stages={c['num_stages']} launches={c['launches']} "
                  f"specialisations={c.get('specialisations', 1)}"
                  + (" T" if c["target"] else ""))
        print(f"{len(configs)} configurations from {len(launches)} launches", file=sys.stderr)
        for w in warnings_:
            print(f"warning: {w}", file=sys.stderr)
        return 1 if errors else 0

    # ---- jobs
    env = {}
    tmp_cache = None
    if not args.warm:
        # A private cache: every configuration is really compiled and ptxas's log printed.
        tmp_cache = tempfile.mkdtemp(prefix="fv-compile-check-")
        env = {"TRITON_CACHE_DIR": tmp_cache, "TRITON_DUMP_PTXAS_LOG": "1"}
    cuda_jobs, nvcc_flags, scan_chunks = [], [], set()
    for launch in launches:
        if launch["name"] == "_selective_scan_bwd_kernel":
            fn_names = _kernel(launch["module"], launch["name"]).arg_names
            a = dict(zip(fn_names, launch["args"]))
            scan_chunks.add((a["N"], launch["kwargs"]["CHUNK"]))
    cu_files = sorted(ROOT.glob("csrc/*/cuda.cu"))
    if not args.no_cuda and not args.warm:
        if shutil.which("nvcc") is None:
            warnings_.append("nvcc not found: CUDA C++ sources not compiled")
        else:
            nvcc_flags, build_archs, notes = cmake_cuda_flags()
            warnings_ += notes
            for cu in cu_files:
                for arch in archs:
                    cmd = nvcc_command(cu, arch, nvcc_flags)
                    digest = hashlib.sha256((cu.read_text() + " ".join(cmd)).encode()).hexdigest()[:16]
                    cuda_jobs.append(dict(source=str(cu.relative_to(ROOT)), arch=arch, cmd=cmd,
                                          key=f"cuda:{cu.relative_to(ROOT)}:{digest}"))
    tri_jobs = [dict(c, arch=arch, warm=args.warm) for arch in archs for c in configs]
    # Longest first: the attention kernels with the widest head dims.
    # Newest architecture first, then the longest: the attention kernels with the widest head dims.
    tri_jobs.sort(key=lambda j: (-j["arch"], -(j["constexprs"].get("D_PAD", 0) + j["constexprs"].get("DV_PAD", 0)
                                               + j["constexprs"].get("N_PAD", 0) // 4)))
    cached: dict = {}
    if args.cache and not args.warm:
        import triton
        try:
            for line in Path(args.cache).read_text().splitlines():
                entry = json.loads(line)
                if entry.get("triton") == triton.__version__:
                    cached[(entry["key"], entry["arch"])] = entry["result"]
        except OSError:
            pass
    cache_file = open(args.cache, "a") if args.cache and not args.warm else None

    ctx = multiprocessing.get_context("spawn")
    results = [(j, cached[(j["key"], j["arch"])]) for j in tri_jobs if (j["key"], j["arch"]) in cached]
    cuda_results = [(j, cached[(j["key"], j["arch"])]) for j in cuda_jobs if (j["key"], j["arch"]) in cached]
    if results or cuda_results:
        print(f"{len(results) + len(cuda_results)} results reused from {args.cache}", file=sys.stderr)
    todo_cuda = [j for j in cuda_jobs if (j["key"], j["arch"]) not in cached]
    todo_tri = [j for j in tri_jobs if (j["key"], j["arch"]) not in cached]
    missing = []
    if args.cached_only:  # the Triton configurations; CUDA sources still compile (a minute or two)
        missing = [f"sm_{j['arch']} {j['kernel']} {SHORT.get(j['dtype'])} {j['config']}" for j in todo_tri]
        todo_tri = []

    def remember(job, res):
        """Appends a successful result to --cache (a stopped run resumes from it)."""
        if cache_file is not None and not res.get("error"):
            import triton
            cache_file.write(json.dumps(dict(key=job["key"], arch=job["arch"], triton=triton.__version__,
                                             result=res)) + "\n")
            cache_file.flush()

    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx, initializer=_worker_init,
                                initargs=(env,)) as pool:
        futs = {pool.submit(compile_cuda, j): ("cuda", j) for j in todo_cuda}
        futs.update({pool.submit(compile_triton, j): ("triton", j) for j in todo_tri})
        done = 0
        for fut in cf.as_completed(futs):
            kind, job = futs[fut]
            done += 1
            try:
                res = fut.result()
            except Exception as err:  # a worker died
                res = dict(error=f"{type(err).__name__}: {err}", kernels=[], compile_s=None)
            if kind == "cuda":
                cuda_results.append((job, res))
                remember(job, res)
                print(f"[{done}/{len(futs)}] nvcc {job['source']} sm_{job['arch']}: "
                      f"{'ERROR' if res['error'] else 'ok'} ({res['compile_s']} s)", file=sys.stderr, flush=True)
            else:
                results.append((job, res))
                remember(job, res)
                print(f"[{done}/{len(futs)}] sm_{job['arch']} {job['kernel']} {SHORT.get(job['dtype'])} "
                      f"{job['config']}: {'ERROR' if res['error'] else 'regs %s' % res['regs']} "
                      f"({res['compile_s']} s)", file=sys.stderr, flush=True)
    if tmp_cache:
        shutil.rmtree(tmp_cache, ignore_errors=True)
    if cache_file is not None:
        cache_file.close()

    # ---- report
    tri_rows = []
    for job, res in results:
        row = {k: job[k] for k in ("kernel", "dtype", "config", "ints", "constexprs", "num_warps", "num_stages",
                                   "maxnreg", "target", "launches", "arch")}
        row["specialisations"] = job.get("specialisations", 1)
        row["labels"] = job["labels"][:6] + ([f"... {len(job['labels']) - 6} more"] if len(job["labels"]) > 6 else [])
        row.update(res)
        limit = args.smem_limit if args.smem_limit is not None else SMEM_LIMIT[job["arch"]]
        row["smem_limit"] = limit
        row["problems"] = [] if res.get("error") else check_limits(row, job["arch"], limit)
        tri_rows.append(row)
    tri_rows.sort(key=lambda r: (r["arch"], *_order(r)))

    cuda_rows = []
    smem_fns = {}
    for cu in cu_files:
        smem_fns[str(cu.relative_to(ROOT))] = cuda_dynamic_smem(cu.read_text())
    for job, res in sorted(cuda_results, key=lambda jr: (jr[0]["source"], jr[0]["arch"])):
        limit = args.smem_limit if args.smem_limit is not None else SMEM_LIMIT[job["arch"]]
        if res["error"] and not res["kernels"]:
            cuda_rows.append(dict(source=job["source"], arch=job["arch"], error=res["error"], problems=[]))
            continue
        dyn = smem_fns.get(job["source"], {})
        for k in sorted(res["kernels"], key=lambda k: k["kernel"]):
            base = k["kernel"].split("<")[0]
            tmpl = re.search(r"<(\d+)>", k["kernel"])
            row = dict(source=job["source"], arch=job["arch"], compile_s=res["compile_s"], error=res["error"],
                       smem_limit=limit, **k)
            row["problems"] = check_limits(dict(regs=k["regs"], smem=k["static_smem"]), job["arch"], limit)
            if base in dyn and tmpl:
                per_warp, nper, max_warps = dyn[base]
                uses = sorted((N, ch) for N, ch in scan_chunks if nper(N) == int(tmpl.group(1)))
                room = limit - (k["static_smem"] or 0)
                row["dynamic_smem"] = []
                for N, ch in uses:
                    warps = min(max_warps, room // per_warp(N, ch))
                    row["dynamic_smem"].append(dict(N=N, chunk=ch, per_warp=per_warp(N, ch), warps=warps,
                                                    bytes=warps * per_warp(N, ch)))
                    if warps == 0:
                        row["problems"].append(f"N={N}/chunk {ch}: one warp needs {per_warp(N, ch)} B of "
                                               f"shared memory > {room} B (sm_{job['arch']})")
                row["dynamic_smem_note"] = ", ".join(
                    f"N={d['N']}/chunk {d['chunk']}: {d['warps']} x {d['per_warp'] / 1024:.1f} KB"
                    for d in row["dynamic_smem"]) or "no launch in the checked shapes"
            elif base in dyn:
                row["dynamic_smem_note"] = "dynamic (template argument not read)"
            cuda_rows.append(row)
    if not args.no_cuda and not args.warm and cu_files and not any(smem_fns.values()):
        warnings_.append("could not read the dynamic shared memory expression of the CUDA launches "
                         "(csrc/*/cuda.cu changed shape): their dynamic shared memory is not checked")

    errors_n = sum(1 for r in tri_rows if r.get("error")) + sum(1 for r in cuda_rows if r.get("error"))
    over = sum(1 for r in tri_rows + cuda_rows if r.get("problems"))
    spilling = [r for r in tri_rows + cuda_rows if r.get("spill_stores")]
    summary = dict(compiled=sum(1 for r in tri_rows if not r.get("error"))
                   + sum(1 for _, res in cuda_results if not res["error"]),
                   errors=errors_n, over_limit=over, spilling=len(spilling),
                   spilling_target=sum(1 for r in spilling if r.get("target")),
                   workload_errors=len(errors))
    report = dict(
        meta=dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=_versions(),
                  mode="warm: real device, Triton's cache" if args.warm else "fake target (no driver)",
                  archs=archs, sources=sources, dtypes=args.dtypes, quick=args.quick, jobs=args.jobs,
                  kernels=args.kernels, target_only=args.target_only,
                  all_specialisations=args.all_specialisations or args.warm,
                  n_launches=len(launches), n_configs=len(configs), wall_s=round(time.perf_counter() - t_start, 1),
                  nvcc_flags=nvcc_flags, smem_limits={a: SMEM_LIMIT[a] for a in archs},
                  not_compiled=missing,
                  smem_limit_override=args.smem_limit, warnings=warnings_),
        triton=tri_rows, cuda=cuda_rows, summary=summary)
    text = render_text(report)
    print(text)
    if args.text:
        Path(args.text).parent.mkdir(parents=True, exist_ok=True)
        Path(args.text).write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    # A workload that no longer runs on meta tensors leaves its configurations unchecked: a failure too.
    failed = errors_n or over or errors or missing or (args.fail_on_spill and summary["spilling_target"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
