"""bench/compile_check.py without a GPU: the launch interception finds every
Triton kernel, a configuration over a limit fails the check, the report
parses, and the pieces that read ptxas output and the CUDA sources work.

The script runs in child processes: it needs the real Triton JIT, and this
test session runs Triton under the interpreter.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "compile_check.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _load():
    spec = importlib.util.spec_from_file_location("compile_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cc = _load()


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def _jit_kernels():
    """Every @triton.jit function named *_kernel in fastvision/triton/."""
    names = set()
    for path in (ROOT / "fastvision" / "triton").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    return names


def test_interception_finds_every_kernel_in_every_dtype():
    r = _run("--list")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "warning: workload could not run" not in r.stderr, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()]
    found = {(row[0], row[1]) for row in rows}
    kernels = _jit_kernels()
    assert {"_na_fwd_kernel", "_selective_scan_bwd_kernel"} <= kernels, kernels  # the pattern still finds them
    # The mask codecs' kernels read uint8/bool masks and int64 counts in every run.
    codecs = {"_transitions_kernel", "_decode_kernel"}
    for kernel in kernels - codecs:
        for dtype in ("fp32", "fp16", "bf16"):
            assert (kernel, dtype) in found, f"{kernel} {dtype} not launched by any workload"
    for kernel in codecs:
        assert any(k == kernel for k, _ in found), f"{kernel} not launched by any workload"
    text = r.stdout
    # Features the wrappers must have reached: 3-D NA, rpb, causal, reverse/const scans, wide head dims.
    for feature in ("3d D=", " rpb", "causal=", "reverse", "B/C=const/const", "pad=128/128", "N_PAD=256",
                    "dlse", "has_dlast", "deterministic", "maxnreg=255", "maxnreg=128"):
        assert feature in text, f"no launched configuration has {feature!r}"
    assert re.search(r"(\d+) configurations from (\d+) launches", r.stderr)


def test_target_only_keeps_the_target_configurations():
    """--target-only lists (and compiles) only the configurations --fail-on-spill judges."""
    def listed(*extra):
        r = _run("--list", "--source", "smoke", "--kernels", "_na_fwd_kernel", *extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return [line for line in r.stdout.splitlines() if line.strip()]

    every, targets = listed(), listed("--target-only")
    assert targets and all(line.endswith(" T") for line in targets)
    assert sorted(targets) == sorted(line for line in every if line.endswith(" T"))
    assert len(targets) < len(every)


def test_over_limit_fails_and_report_parses(tmp_path):
    out = tmp_path / "report.json"
    text = tmp_path / "report.txt"
    r = _run("--source", "smoke", "--kernels", "_na_bwd_dq_kernel", "--dtypes", "float16", "--arch", "90",
             "--no-cuda", "--smem-limit", "64", "--json", str(out), "--text", str(text))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) >= {"meta", "triton", "cuda", "summary"}
    rows = report["triton"]
    assert rows and all(row["kernel"] == "_na_bwd_dq_kernel" and row["arch"] == 90 for row in rows)
    for row in rows:
        assert row["error"] is None, row["error"]
        assert isinstance(row["regs"], int) and 0 < row["regs"] <= 255
        assert isinstance(row["spill_stores"], int) and isinstance(row["smem"], int)
        assert row["smem"] > 64 and any("shared memory" in p for p in row["problems"])
    assert report["summary"]["over_limit"] == len(rows)
    assert report["meta"]["smem_limit_override"] == 64
    table = text.read_text()
    assert "== Triton, sm_90" in table and "OVER: shared memory" in table


def test_parse_ptxas():
    log = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    16 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_j' for 'sm_80'
ptxas info    : Function properties for _j
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, 472 bytes cmem[0]
"""
    info = cc.parse_ptxas(log)
    assert info["_k"] == dict(arch="sm_90a", regs=255, stack=16, spill_stores=24, spill_loads=20,
                              static_smem=2048)
    assert info["_j"]["regs"] == 40 and info["_j"]["static_smem"] == 0 and info["_j"]["spill_stores"] == 0


def test_cuda_flags_and_dynamic_smem_are_read_from_the_sources():
    flags, archs, notes = cc.cmake_cuda_flags()
    assert not notes, notes
    assert "-O3" in flags and "--use_fast_math" in flags and "-std=c++17" in flags
    assert "-DUSE_CUDA" in flags and any(f.startswith("-DTORCH_TARGET_VERSION=0x") for f in flags)
    assert "80" in archs
    smem = cc.cuda_dynamic_smem((ROOT / "csrc" / "selective_scan" / "cuda.cu").read_text())
    assert "backward_kernel" in smem, "the CUDA backward's dynamic shared memory is no longer read"
    per_warp, nper, max_warps = smem["backward_kernel"]
    assert nper(16) == 1 and nper(64) == 2 and nper(128) == 4 and nper(256) == 8
    assert max_warps == 4
    # 2 x chunk x NPER x 32 lanes + chunk floats per warp
    assert per_warp(16, 128) == 4 * (2 * 128 * 1 * 32 + 128)
    # Vim's N = 256 (chunk 16) fits 3 warps in sm_86/sm_89's 99 KB, 4 on sm_80/sm_90.
    assert 3 * per_warp(256, 16) <= cc.SMEM_LIMIT[89] < 4 * per_warp(256, 16) <= cc.SMEM_LIMIT[80]


def test_quick_set_covers_every_kernel():
    def config(kernel, dtype, **k):
        return dict(kernel=kernel, dtype=dtype, constexprs=k, labels=["bench:x"], launches=1)
    configs = [config("_na_fwd_kernel", "bfloat16", D_PAD=32), config("_na_fwd_kernel", "bfloat16", D_PAD=16),
               config("_na_other_kernel", "float32", D_PAD=8),  # a kernel outside the main classes
               config("_selective_scan_fwd_kernel", "float16", N_PAD=16),
               config("_selective_scan_fwd_kernel", "float16", N_PAD=256)]
    chosen = cc.quick_filter(configs)
    assert configs[0] in chosen and configs[3] in chosen and configs[2] in chosen
    assert configs[1] not in chosen and configs[4] not in chosen
