"""The ``fastvision`` command: info, bench (on tiny shapes) and its error messages."""

import json
import subprocess
import sys

import pytest
import torch

from fastvision import benchmark
from fastvision.cli import main

TABLE_COLUMNS = ("implementation", "fwd ms", "fwd+bwd ms", "peak MiB", "speedup fwd", "speedup fwd+bwd")
RECORD_KEYS = {"op", "case", "shape", "dtype", "device", "device_type", "torch", "triton", "python",
               "fastvision", "threads", "implementation", "fwd_ms", "fwd_bwd_ms", "peak_mem_bytes",
               "memory_method", "speedup_fwd", "speedup_fwd_bwd", "timestamp"}


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setenv(benchmark.TINY_ENV, "1")


def test_info_reports_cpu_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fastvision  0." in out and f"torch       {torch.__version__}" in out
    assert "_C          loaded" in out
    usable = next(line for line in out.splitlines() if line.startswith("backends on cpu"))
    assert "cpu" in usable.split("usable:")[1].split(", ")


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["C_loaded"] is True
    assert info["backends"]["cpu"]["cpu"] is None and info["backends"]["cpu"]["reference"] is None
    assert info["threads"] >= 1 and info["cpu"]
    assert info["gpus"] == [] or info["gpus"][0]["compute_capability"]


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "fastvision", "info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "backends on cpu" in res.stdout


def test_bench_tiny_table_and_json(tiny, tmp_path, capsys):
    path = tmp_path / "res.json"
    assert main(["bench", "selective_scan", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = next(line for line in lines if line.startswith("implementation"))
    assert all(col in header for col in TABLE_COLUMNS)
    assert any(line.startswith("reference ") for line in lines)
    assert any(line.startswith("cpu ") for line in lines)
    assert "[1/" in captured.err  # progress on stderr

    records = json.loads(path.read_text())
    quick_cases = [c.name for c in benchmark.SUITES["selective_scan"].cases if c.quick and "cpu" in c.devices]
    assert {r["case"] for r in records} == set(quick_cases)
    assert {r["implementation"] for r in records} == {"reference", "cpu", "mamba_ssm CPU path (selective_scan_ref)"}
    for r in records:
        assert RECORD_KEYS <= r.keys(), RECORD_KEYS - r.keys()
        assert r["op"] == "selective_scan" and r["dtype"] == "float32" and r["device_type"] == "cpu"
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["speedup_fwd"] > 0
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] > 0
        assert r["shape"] == {**next(c.shape for c in benchmark.SUITES["selective_scan"].cases),
                              **benchmark.SUITES["selective_scan"].tiny}


def test_bench_json_to_stdout_is_clean(tiny, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "bi_selective_scan", "--quick", "--device", "cpu", "--json", "-",
                     "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert {r["implementation"] for r in records} == {"reference", "cpu", "cpu (2 scans+flips)"}
    assert all(r["threads"] == 1 for r in records)
    assert "speedup fwd+bwd" in captured.err  # the table moved to stderr


def test_bench_unknown_op(capsys):
    assert main(["bench", "no_such_op"]) != 0
    err = capsys.readouterr().err
    assert "no_such_op" in err and "selective_scan" in err  # lists the known ops


def test_bench_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["bench", "selective_scan", "--device", "cpu", "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_cuda_without_cuda(capsys):
    assert main(["bench", "selective_scan", "--device", "cuda"]) != 0
    assert "no CUDA device" in capsys.readouterr().err


def _toy_suite():
    """A suite as a new op family would add it: one case whose reference is 'slow' on CPU."""
    def make_inputs(shape, device, dtype):
        x = torch.randn(shape["n"], device=device, dtype=dtype, requires_grad=True)
        return {"x": x}, torch.ones_like(x)
    return benchmark.Suite(
        "toy_square", (benchmark.Case("small", {"n": 64}, quick=True, reference_slow_on=("cpu",)),),
        make_inputs, lambda device: {"reference": lambda t: t["x"] ** 2, "mul": lambda t: t["x"] * t["x"]})


def test_registered_suite_runs_and_quick_skips_slow_reference(monkeypatch):
    monkeypatch.setitem(benchmark.SUITES, "toy_square", _toy_suite())
    full = benchmark.run(["toy_square"], device="cpu", repeats=2, budget_s=0.01, progress=False)
    assert [r["implementation"] for r in full] == ["reference", "mul"]
    assert full[1]["speedup_fwd"] == pytest.approx(full[0]["fwd_ms"] / full[1]["fwd_ms"])
    assert full[0]["peak_mem_bytes"] >= 64 * 4  # at least the output and the gradient

    quick = benchmark.run(["toy_square"], device="cpu", quick=True, repeats=2, budget_s=0.01, progress=False)
    assert [r["implementation"] for r in quick] == ["mul"] and quick[0]["speedup_fwd"] is None
    assert "reference skipped" in benchmark.format_tables(quick)


def test_cuda_table_has_bandwidth_columns():
    """The CUDA table (not runnable here) from records shaped as run() writes them on a GPU."""
    rec = {"op": "selective_scan", "case": "vim_s", "shape": {"L": 197}, "dtype": "float16",
           "fastvision": "0", "torch": "2", "triton": "3", "python": "3", "device_type": "cuda",
           "device": "NVIDIA H100 80GB HBM3", "threads": 1, "cpu_count": 16, "peak_mem_bytes": 2**20,
           "fwd_ms": 1.0, "fwd_bwd_ms": 3.0, "speedup_fwd": 1.0, "speedup_fwd_bwd": 1.0,
           "fwd_bandwidth_gbps": 100.0, "fwd_bwd_bandwidth_gbps": 300.0, "fwd_bwd_bandwidth_fraction": 0.09}
    table = benchmark.format_tables([{**rec, "implementation": "reference"},
                                     {**rec, "implementation": "cuda", "error": "RuntimeError: boom"}])
    assert "GB/s fwd+bwd" in table and "% peak fwd+bwd" in table and " 9%" in table
    assert "error: RuntimeError: boom" in table
    assert benchmark.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert benchmark.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert benchmark.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert benchmark.peak_bandwidth("Some Future GPU") is None


def test_bench_na2d_quick_table(monkeypatch, capsys):
    monkeypatch.setenv("FASTVISION_BENCH_TINY", "1")
    assert main(["bench", "na2d", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("reference ", "cpu ", "sdpa (masked) "):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "dinat_mini_s1_d8" in out


def test_masked_sdpa_baseline_equals_reference():
    import torch

    from fastvision import benchmark
    from fastvision.reference.neighborhood import neighborhood_attention_ref
    x, _ = benchmark._na_case(dict(batch=1, spatial=(7, 9), heads=2, head_dim=8, k=3, d=2), "cpu", torch.float32)
    ref = neighborhood_attention_ref(x["q"], x["k"], x["v"], 3, 2)
    torch.testing.assert_close(benchmark._masked_sdpa(x), ref, rtol=1e-5, atol=1e-5)


def test_mamba_cpu_path_baseline_equals_reference():
    import torch

    from fastvision import benchmark
    from fastvision.reference.selective_scan import selective_scan_ref
    x, _ = benchmark._scan_case(dict(batch=2, dim=6, L=30, N=4), "cpu", torch.float32)
    args = benchmark._scan_args(x)
    torch.testing.assert_close(benchmark._mamba_cpu_path(*args), selective_scan_ref(*args, delta_softplus=True))
