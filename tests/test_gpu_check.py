"""bench/gpu_check.sh without a GPU: arguments, the loud failure without a
GPU, the dry-run plan and its resumption logic (what is recorded is
skipped), and the records a stage writes."""

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = _load()


def _sh(*args):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def _run(capsys, *args):
    """gpu_check's main in this process (the shell wrapper only adds PYTHONPATH)."""
    code = gc.main(list(args))
    out = capsys.readouterr()
    return Namespace(returncode=code, stdout=out.out, stderr=out.err)


def test_shell_wrapper_arguments():
    r = _sh("--stage", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _sh()
    assert r.returncode == 2 and "--stage" in r.stderr
    r = _sh("--help")
    assert r.returncode == 0 and "smoke" in r.stdout and "--dry-run" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("stage", ["build", "smoke", "tests", "bench", "all"])
def test_without_gpu_fails_loudly_and_records_nothing(stage, tmp_path, capsys):
    r = _run(capsys, "--stage", stage, "--results", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "NO GPU" in r.stderr and "needs a machine with a CUDA GPU" in r.stderr
    assert not (tmp_path / "r").exists()


def _write(results, name, obj):
    results.mkdir(parents=True, exist_ok=True)
    (results / name).write_text(json.dumps(obj))


def test_dry_run_plans_every_stage_and_skips_recorded_work(tmp_path, capsys):
    results = tmp_path / "gpu"
    src = gc.source_hash()
    _write(results, "bench-float16.json", [{"op": "na2d"}])
    _write(results, "smoke.json", {"status": "pass", "src": src})
    _write(results, "tests.json", {"src": src, "files": {"tests/test_neighborhood_gpu.py": {"status": "pass"}}})
    before = sorted(p.name for p in results.iterdir())
    r = _run(capsys, "--stage", "all", "--dry-run", "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "[build] would run:" in out and "pip install" in out
    assert "[smoke] recorded as passed" in out and "test_gpu_smoke.py -q" not in out
    assert "tests/test_neighborhood_gpu.py: recorded as passed" in out
    assert "-m gpu tests/test_selective_scan_gpu.py" in out and "-m gpu tests/test_neighborhood_gpu.py" not in out
    assert "float16: bench-float16.json present" in out
    assert "--dtype float32" in out and "--dtype bfloat16" in out and "--dtype float16" not in out
    assert sorted(p.name for p in results.iterdir()) == before, "a dry run wrote results"


def test_dry_run_reruns_work_recorded_for_other_sources(tmp_path, capsys):
    results = tmp_path / "gpu"
    _write(results, "smoke.json", {"status": "pass", "src": "0123456789ab"})
    r = _run(capsys, "--stage", "smoke", "--dry-run", "--results", str(results))
    assert r.returncode == 0
    assert "recorded as passed" not in r.stdout
    assert "compile_check.py --warm --source smoke" in r.stdout and "tests/test_gpu_smoke.py" in r.stdout
    r = _run(capsys, "--stage", "smoke", "--dry-run", "--force", "--results", str(results))
    assert "tests/test_gpu_smoke.py" in r.stdout


def test_dry_run_build_uses_carried_libraries(tmp_path, capsys):
    carried = tmp_path / "prebuilt"
    carried.mkdir()
    (carried / "_C.abi3.so").write_bytes(b"")
    (carried / "_C_cuda.abi3.so").write_bytes(b"")
    r = _run(capsys, "--stage", "build", "--dry-run", "--prebuilt", str(carried), "--results", str(tmp_path / "r"))
    assert r.returncode == 0
    assert "carried libraries" in r.stdout and "pip install" not in r.stdout


def test_stage_records_and_summary_line(tmp_path):
    info = dict(device="Fake GPU", cc="90", gpus=1, torch="2.11.0", cuda="13.0", triton="3.6.0", nvcc="13.0",
                python="3.12.3")
    args = Namespace(results=tmp_path, dry_run=False, budget=450.0)
    st = gc.Stage("bench", args, info)
    st.say("float32: recorded")
    assert st.finish(gc.PASS, {"dtypes": "3/3"}) == gc.PASS
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["status"] == "pass" and record["device"] == "Fake GPU" and record["src"] == gc.source_hash()
    line = (tmp_path / "summary.txt").read_text().strip()
    assert line.count("\n") == 0
    for part in ("stage=bench", "status=pass", "dtypes=3/3", "wall=", 'device="Fake GPU"', "torch=2.11.0",
                 "triton=3.6.0", "cuda=13.0"):
        assert part in line
    assert "float32: recorded" in (tmp_path / "bench.txt").read_text()


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" '
                   'skipped="3" tests="10"></testsuite></testsuites>')
    assert gc.junit_counts(xml) == dict(passed=4, failed=2, errors=1, skipped=3)
    assert gc.junit_counts(tmp_path / "missing.xml") == {}
