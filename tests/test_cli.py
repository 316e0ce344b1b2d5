"""The ``fastvision`` command and the benchmark package behind it: info, bench (on
tiny shapes), error messages, the run plan, set-up steps, suite discovery.
No timing is asserted anywhere: only what was measured, how and with which notes."""

import json
import pkgutil
import subprocess
import sys
import time

import pytest
import torch

from fastvision import bench
from fastvision.bench import core, report, suites
from fastvision.cli import _backend_lines, main
from fastvision.ops._library import FUSED_OPS

TABLE_COLUMNS = ("implementation", "fwd ms", "fwd+bwd ms", "peak MiB", "speedup fwd", "speedup fwd+bwd")
RECORD_KEYS = {"op", "fused_op", "case", "shape", "dtype", "device", "device_type", "torch", "triton", "python",
               "fastvision", "threads", "implementation", "note", "sampling", "fwd_ms", "fwd_bwd_ms",
               "fwd_samples", "fwd_bwd_samples", "peak_mem_bytes", "memory_method", "speedup_fwd",
               "speedup_fwd_bwd", "timestamp"}
MAMBA_CPU = "mamba_ssm CPU path (selective_scan_ref)"


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setenv(bench.TINY_ENV, "1")


@pytest.fixture(autouse=True)
def _restore_threads():
    """`fastvision bench` sets torch's thread count (--threads, or --quick on a busy machine)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------
# fastvision info


def test_info_lists_backends_per_op(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fastvision  0." in out and f"torch       {torch.__version__}" in out
    assert "_C          loaded" in out
    lines = out.splitlines()
    for op in FUSED_OPS:  # one row per fused op: usable on cpu, on cuda
        row = next(line for line in lines if line.split()[:1] == [op])
        assert "cpu" in row.split(op, 1)[1].split()[0] and "reference" in row
    assert {"selective_scan", "bi_selective_scan", "neighborhood_attention"} <= FUSED_OPS.keys()


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["C_loaded"] is True
    assert set(info["backends"]) == set(FUSED_OPS)
    for op, per_device in info["backends"].items():
        assert per_device["cpu"]["cpu"] is None and per_device["cpu"]["reference"] is None
        assert set(per_device["cuda"]) == {"cuda", "triton", "reference"}
        # the op's own answer, not a copy of another op's
        assert per_device["cuda"]["cuda"] == FUSED_OPS[op].why_not("cuda", "cuda")
    assert info["threads"] >= 1 and info["cpu"]
    assert info["gpus"] == [] or info["gpus"][0]["compute_capability"]


def test_info_says_which_op_lacks_a_backend():
    """A reason only some ops have (NA has no CUDA C++ kernel) is given per op; one all share, once."""
    shared = "fastvision was built without its CUDA C++ kernels"
    backends = {op: {"cpu": {"cpu": None, "triton": "interpreter only", "reference": None},
                     "cuda": {"cuda": None, "triton": None, "reference": None}}
                for op in ("selective_scan", "neighborhood_attention")}
    backends["neighborhood_attention"]["cuda"]["cuda"] = "no CUDA C++ kernel for neighborhood_attention"
    text = "\n".join(_backend_lines(backends, cuda_available=True))
    assert "cuda on cuda (neighborhood_attention): no CUDA C++ kernel for neighborhood_attention" in text
    assert "triton on cpu (all ops): interpreter only" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("neighborhood_attention"))
    assert row.split()[-2:] == ["triton,", "reference"]
    assert shared not in text


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "fastvision", "info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "neighborhood_attention" in res.stdout


# --------------------------------------------------------------------------
# fastvision bench


def test_bench_tiny_table_and_json(tiny, tmp_path, capsys):
    path = tmp_path / "res.json"
    assert main(["bench", "selective_scan", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = next(line for line in lines if line.startswith("implementation"))
    assert all(col in header for col in TABLE_COLUMNS)
    assert any(line.startswith("reference ") for line in lines)
    assert any(line.startswith("cpu ") for line in lines)
    assert "what each timing includes:" in captured.out
    assert "[1/" in captured.err  # progress on stderr

    records = json.loads(path.read_text())
    suite = bench.SUITES["selective_scan"]
    quick_cases = [c.name for c in suite.cases if c.quick and "cpu" in c.devices]
    assert {r["case"] for r in records} == set(quick_cases)
    assert {r["implementation"] for r in records} == {"reference", "cpu", MAMBA_CPU}
    for r in records:
        assert RECORD_KEYS <= r.keys(), RECORD_KEYS - r.keys()
        assert r["op"] == "selective_scan" and r["fused_op"] == "selective_scan"
        assert r["dtype"] == "float32" and r["device_type"] == "cpu"
        assert r["note"] and r["note"] in captured.out  # every timing says what it includes
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["speedup_fwd"] > 0
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] > 0
        assert r["shape"] == {**suite.cases[0].shape, **suite.tiny}
    mamba = next(r for r in records if r["implementation"] == MAMBA_CPU)
    assert mamba["sampling"] == "once" and mamba["fwd_samples"] == mamba["fwd_bwd_samples"] == 1
    assert "timed once in --quick" in mamba["sampling_why"]


def test_bench_json_to_stdout_is_clean(tiny, capsys):
    assert main(["bench", "bi_selective_scan", "--quick", "--device", "cpu", "--json", "-", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert {r["implementation"] for r in records} == {"reference", "cpu", "cpu (2 scans+flips)"}
    assert all(r["threads"] == 1 for r in records)
    assert "speedup fwd+bwd" in captured.err  # the table moved to stderr


def test_bench_na_json_has_setup_and_notes(tiny, tmp_path, capsys):
    path = tmp_path / "na.json"
    assert main(["bench", "na2d", "na1d", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for name in ("reference ", "cpu ", "sdpa (masked) "):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "dinat_mini_s1_d8" in out
    assert "set-up (once per case, not timed): sdpa (masked)" in out
    records = json.loads(path.read_text())
    assert {r["fused_op"] for r in records} == {"neighborhood_attention"}
    sdpa = [r for r in records if r["implementation"] == "sdpa (masked)"]
    assert sdpa and all(r["setup_ms"] > 0 and r["setup_bytes"] > 0 and "set-up" in r["note"] for r in sdpa)
    assert all("setup_ms" not in r for r in records if r["implementation"] != "sdpa (masked)")
    assert all(r["note"] for r in records)


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


# --------------------------------------------------------------------------
# The package: discovery, backends asked of the op, the plan, set-up


def test_suites_are_discovered_from_the_package():
    """Every module in fastvision/bench/suites is a listed family, and importing the
    package registers each one's suites."""
    modules = {m.name for m in pkgutil.iter_modules(suites.__path__)}
    assert modules == set(suites.FAMILIES)
    family_of = {op: s.make_inputs.__module__ for op, s in bench.SUITES.items()}
    assert set(family_of.values()) == {f"fastvision.bench.suites.{f}" for f in suites.FAMILIES}
    assert set(bench.SUITES) == {"selective_scan", "bi_selective_scan", "na2d", "na1d", "criss_cross", "super_token",
                                 "super_token_ops", "rle_encode", "rle_decode", "rle_iou", "rrle_encode",
                                 "rrle_decode", "deform_conv2d", "dcn_aggregate",
                                 "ms_deform_attn"}
    assert {op for op, s in bench.SUITES.items() if s.family == "masks"} == {
        "rle_encode", "rle_decode", "rle_iou", "rrle_encode", "rrle_decode"}
    for suite in bench.SUITES.values():
        if suite.fused_op is None:  # forward-only codecs: no fused op; the suite says what runs
            assert suite.forward_only and suite.fastvision("cpu").skip == ""
            continue
        assert suite.fused_op in FUSED_OPS
        assert FUSED_OPS[suite.fused_op].why_not("cpu", "cpu", **suite.facts(suite.cases[0].shape)) is None


def test_bench_family_runs_forward_only_tables(capsys, monkeypatch):
    """`fastvision bench masks` runs the family's suites: fwd columns only."""
    monkeypatch.setenv("FASTVISION_BENCH_TINY", "1")
    assert main(["bench", "masks", "--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for op in ("rle_encode", "rle_decode", "rle_iou", "rrle_encode", "rrle_decode"):
        assert f"{op} / " in out
    assert "speedup fwd" in out and "fwd+bwd ms" not in out.split("rle_encode:")[1]


def test_backends_are_asked_of_the_fused_op(monkeypatch):
    """A backend the op refuses for a case's facts is not timed, with the op's reason."""
    op = FUSED_OPS["selective_scan"]
    asked = []

    def why_not(backend, device, **facts):
        asked.append((backend, device, facts))
        return "too many states for this test" if facts.get("d_state", 0) > 8 else None

    monkeypatch.setattr(op, "why_not", why_not)
    suite = bench.SUITES["selective_scan"]
    small = bench.implementations(suite, {**suite.cases[0].shape, "N": 4}, "cpu")
    large = bench.implementations(suite, {**suite.cases[0].shape, "N": 16}, "cpu")
    assert small["cpu"].skip == "" and large["cpu"].skip == "fastvision: too many states for this test"
    assert ("cpu", "cpu", {"d_state": 16}) in asked
    case = bench.Case("x", {**suite.cases[0].shape, "N": 16})
    planned = {p.name: p for p in bench.plan_case(suite, case, "cpu", quick=False)}
    assert planned["cpu"].sampling == "skip"
    assert bench.SUITES["na2d"].facts(bench.SUITES["na2d"].cases[0].shape) == {"head_dim": 32, "head_dim_v": 32}


def _toy_suite(counter: dict) -> core.Suite:
    """A suite as a new op family would add it, with a slow baseline, one too slow
    for --quick, and one with a set-up step that counts its calls."""
    def make_inputs(shape, device, dtype):
        x = torch.randn(shape["n"], device=device, dtype=dtype, requires_grad=True)
        return {"x": x}, torch.ones_like(x)

    def setup(inputs):
        assert not counter["timing"], "set-up ran inside a timed region"
        counter["setup"] += 1
        return {"table": torch.arange(inputs["x"].shape[0])}

    def with_table(t):
        assert "table" in t, "run() did not get the set-up's results"
        counter["run"] += 1
        return t["x"][t["table"]] ** 2

    def baselines(shape, device):
        return {"indexed": core.Impl(with_table, setup=setup, note="indexes with a prepared table"),
                "slow_loop": core.Impl(lambda t: t["x"] * t["x"], note="loops", slow="a Python loop"),
                "minutes": core.Impl(lambda t: t["x"] * 2, note="takes minutes", skip_quick="minutes per call"),
                "never": core.Impl(lambda t: t["x"] * 3, note="not here", skip="needs hardware X")}

    return core.Suite(
        "toy_square", "selective_scan", (core.Case("small", {"n": 64}, quick=True),), make_inputs,
        facts=lambda shape: {}, fastvision=lambda backend: core.Impl(lambda t: t["x"] * t["x"], note="toy fused"),
        reference=lambda shape, device: core.Impl(lambda t: t["x"] ** 2, note="toy reference"),
        baselines=baselines)


@pytest.fixture
def toy(monkeypatch):
    counter = {"setup": 0, "run": 0, "timing": False}
    monkeypatch.setitem(bench.SUITES, "toy_square", _toy_suite(counter))
    real_time_once, real_peak = core._time_once, core.peak_memory

    def flagged(real):
        def wrapper(fn, device, *rest):
            counter["timing"] = True
            try:
                return real(fn, device, *rest)
            finally:
                counter["timing"] = False
        return wrapper

    monkeypatch.setattr(core, "_time_once", flagged(real_time_once))
    monkeypatch.setattr(core, "peak_memory", flagged(real_peak))
    return counter


def test_quick_plan_single_samples_or_skips_slow_baselines(toy):
    (_, _, items), = bench.plan(["toy_square"], "cpu", quick=True)
    sampling = {p.name: (p.sampling, p.why) for p in items}
    assert list(sampling) == ["reference", "cpu", "indexed", "slow_loop", "minutes", "never"]
    assert sampling["reference"] == ("median", "") and sampling["cpu"] == ("median", "")
    assert sampling["slow_loop"] == ("once", "timed once in --quick: a Python loop")
    assert sampling["minutes"] == ("skip", "not timed in --quick: minutes per call")
    assert sampling["never"] == ("skip", "needs hardware X")

    (_, _, full), = bench.plan(["toy_square"], "cpu", quick=False)
    assert {p.name: p.sampling for p in full} == {"reference": "median", "cpu": "median", "indexed": "median",
                                                  "slow_loop": "median", "minutes": "median", "never": "skip"}


def test_quick_run_times_slow_baseline_once_and_reports_skips(toy):
    records = bench.run(["toy_square"], device="cpu", quick=True, repeats=3, budget_s=10.0, progress=False)
    by_name = {r["implementation"]: r for r in records}
    assert by_name["cpu"]["fwd_samples"] == 3 and by_name["cpu"]["sampling"] == "median"
    slow = by_name["slow_loop"]
    assert slow["sampling"] == "once" and slow["fwd_samples"] == slow["fwd_bwd_samples"] == 1
    assert slow["speedup_fwd"] > 0
    assert by_name["minutes"]["skipped"] == "not timed in --quick: minutes per call"
    assert "fwd_ms" not in by_name["minutes"] and by_name["minutes"]["speedup_fwd"] is None
    table = bench.format_tables(records)
    assert "* slow_loop: timed once in --quick: a Python loop" in table
    assert "not timed: minutes: not timed in --quick: minutes per call" in table
    assert "not timed: never: needs hardware X" in table
    slow_row = next(line for line in table.splitlines() if line.startswith("slow_loop"))
    assert slow_row.split()[1].endswith("*")


def test_quick_past_its_time_budget_times_once_and_skips_slow(toy, monkeypatch):
    monkeypatch.setattr(core, "QUICK_DEADLINE_S", 0.0)
    records = bench.run(["toy_square"], device="cpu", quick=True, repeats=3, budget_s=10.0, progress=False)
    by_name = {r["implementation"]: r for r in records}
    assert by_name["cpu"]["sampling"] == "once" and by_name["cpu"]["fwd_samples"] == 1
    assert "budget was spent" in by_name["cpu"]["sampling_why"] and by_name["cpu"]["peak_mem_bytes"] is None
    assert "budget was spent" in by_name["slow_loop"]["skipped"]
    full = bench.run(["toy_square"], device="cpu", repeats=3, budget_s=10.0, progress=False)
    assert {r["implementation"]: r["sampling"] for r in full}["cpu"] == "median"  # no budget without --quick


def test_quick_on_a_busy_machine_uses_one_thread(tiny, monkeypatch, capsys):
    monkeypatch.setattr(core, "_load_average", lambda: 9.0)
    monkeypatch.setattr(core.os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    assert main(["bench", "na1d", "--quick", "--device", "cpu", "--json", "-"]) == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert all(r["threads"] == 1 and "1 torch thread instead of 2" in r["threads_why"] for r in records)
    assert "--quick uses 1 torch thread" in captured.err
    torch.set_num_threads(2)  # an explicit --threads wins; without --quick nothing changes
    assert main(["bench", "na1d", "--quick", "--device", "cpu", "--json", "-", "--threads", "2"]) == 0
    assert all(r["threads"] == 2 and "threads_why" not in r for r in json.loads(capsys.readouterr().out))
    assert main(["bench", "na1d", "--device", "cpu", "--json", "-"]) == 0
    assert all(r["threads"] == 2 for r in json.loads(capsys.readouterr().out))


def test_busy_machine_warning(monkeypatch):
    monkeypatch.setattr(core, "_load_average", lambda: 7.5)
    monkeypatch.setattr(core.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    warning = core.busy_warning("cpu")
    assert "load average 7.5 on 2 CPUs" in warning and "--threads 1" in warning
    assert core.busy_warning("cuda") == ""
    monkeypatch.setattr(core, "_load_average", lambda: 0.5)
    assert core.busy_warning("cpu") == ""


def test_short_cpu_calls_are_timed_in_loops():
    calls = []
    seconds, samples, per_sample = core.median_time(lambda: calls.append(1), "cpu", 3, 10.0)
    assert per_sample > 1 and samples == 3 and len(calls) == 1 + 3 * per_sample  # (a warm-up call, then loops)
    assert 0 < seconds < core.SHORT_CALL_S
    seconds, samples, per_sample = core.median_time(lambda: time.sleep(2 * core.SHORT_CALL_S), "cpu", 2, 10.0)
    assert per_sample == 1 and seconds >= 2 * core.SHORT_CALL_S


def test_setup_runs_once_per_case_outside_timing(toy):
    records = bench.run(["toy_square"], device="cpu", repeats=4, budget_s=10.0, progress=False)
    indexed = next(r for r in records if r["implementation"] == "indexed")
    assert toy["setup"] == 1  # once for the case, however many calls were timed
    calls = 1 + sum(1 + indexed[f"{key}_samples"] * indexed[f"{key}_calls_per_sample"]  # memory, warm-ups, loops
                    for key in ("fwd", "fwd_bwd"))
    assert toy["run"] == calls and indexed["fwd_samples"] == 4
    assert indexed["setup_ms"] > 0 and indexed["setup_bytes"] == 64 * 8
    assert indexed["note"] == "indexes with a prepared table"
    assert "set-up (once per case, not timed): indexed:" in bench.format_tables(records)


def test_json_has_notes_and_skips(toy, tmp_path):
    records = bench.run(["toy_square"], device="cpu", quick=True, repeats=1, budget_s=0.0, progress=False)
    path = tmp_path / "r.json"
    bench.write_json(records, str(path))
    saved = {r["implementation"]: r for r in json.loads(path.read_text())}
    assert saved["reference"]["note"] == "toy reference" and saved["cpu"]["note"] == "toy fused"
    assert saved["never"]["skipped"] == "needs hardware X" and saved["never"]["note"] == "not here"
    assert saved["slow_loop"]["sampling_why"] == "timed once in --quick: a Python loop"


def test_registered_suite_runs_full_with_speedups(toy):
    full = bench.run(["toy_square"], device="cpu", repeats=2, budget_s=0.01, progress=False)
    timed = [r for r in full if "skipped" not in r]
    assert [r["implementation"] for r in timed] == ["reference", "cpu", "indexed", "slow_loop", "minutes"]
    assert timed[1]["speedup_fwd"] == pytest.approx(timed[0]["fwd_ms"] / timed[1]["fwd_ms"])
    assert timed[0]["peak_mem_bytes"] >= 64 * 4  # at least the output and the gradient


def test_every_implementation_agrees_with_the_reference(tiny):
    """The baselines compute what the op computes (dense SDPA without a mask aside),
    with the arguments in the right places, on every suite's tiny shapes."""
    for op, suite in bench.SUITES.items():
        for case in bench.cases(suite, "cpu"):
            torch.manual_seed(0)
            inputs, _ = suite.make_inputs(case.shape, "cpu", torch.float32)
            outputs = {}
            for name, impl in bench.implementations(suite, case.shape, "cpu").items():
                if impl.skip:
                    continue
                extra = impl.setup(inputs) if impl.setup else {}
                outputs[name] = impl.run({**inputs, **extra})
                if suite.canonical is not None:  # outputs of different forms (the mask codecs)
                    outputs[name] = suite.canonical(outputs[name])
            for name, out in outputs.items():
                torch.testing.assert_close(out, outputs["reference"], rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"{op}/{case.name}/{name}: {m}")


def test_cuda_table_has_bandwidth_and_tflops_columns():
    """The CUDA tables (not runnable here) from records shaped as run() writes them on a GPU."""
    rec = {"op": "selective_scan", "case": "vim_s", "shape": {"L": 197}, "dtype": "float16",
           "fastvision": "0", "torch": "2", "triton": "3", "python": "3", "device_type": "cuda",
           "device": "NVIDIA H100 80GB HBM3", "threads": 1, "cpu_count": 16, "peak_mem_bytes": 2**20,
           "fwd_ms": 1.0, "fwd_bwd_ms": 3.0, "speedup_fwd": 1.0, "speedup_fwd_bwd": 1.0, "sampling": "median",
           "note": "n", "bandwidth_bound": True,
           "fwd_bandwidth_gbps": 100.0, "fwd_bwd_bandwidth_gbps": 300.0, "fwd_bwd_bandwidth_fraction": 0.09}
    table = bench.format_tables([{**rec, "implementation": "reference"},
                                 {**rec, "implementation": "cuda", "error": "RuntimeError: boom"}])
    assert "GB/s fwd+bwd" in table and "% peak fwd+bwd" in table and " 9%" in table
    assert "TFLOP/s" not in table
    assert "error: RuntimeError: boom" in table
    na = {**rec, "op": "na2d", "bandwidth_bound": False, "fwd_useful_tflops": 12.5, "fwd_bwd_useful_tflops": 9.25}
    table = bench.format_tables([{**na, "implementation": "reference"},
                                 {**na, "implementation": "cuda", "skipped": "fastvision: no CUDA C++ kernel"}])
    assert "TFLOP/s fwd+bwd" in table and "12.5" in table and "GB/s" not in table
    assert "not timed: cuda: fastvision: no CUDA C++ kernel" in table
    assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert bench.peak_bandwidth("Some Future GPU") is None


def test_cuda_plan_asks_the_op_for_cuda_and_triton(monkeypatch):
    """Without a GPU, what the CUDA plan would time: every suite offers the op's CUDA
    backends, each with the op's own reason when it cannot run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for suite in bench.SUITES.values():
        shape = suite.cases[0].shape
        if suite.fused_op is None:  # the suite itself says what runs (the codecs: Triton on CUDA)
            impls = bench.implementations(suite, shape, "cuda")
            assert {"cuda", "triton"} <= set(impls)
            continue
        reasons = bench.fastvision_backends(suite.fused_op, "cuda", **suite.facts(shape))
        assert set(reasons) == {"cuda", "triton"}
        op = FUSED_OPS[suite.fused_op]
        assert reasons == {b: op.why_not(b, "cuda", **suite.facts(shape)) for b in ("cuda", "triton")}
    assert [c.name for c in bench.cases(bench.SUITES["na2d"], "cuda")][-1] == "dinat_mini_s1_batch32"


def test_masked_sdpa_baseline_equals_reference():
    from fastvision.bench.suites import neighborhood as na
    from fastvision.reference.neighborhood import neighborhood_attention_ref
    x, _ = na.make_inputs(dict(batch=1, spatial=(7, 9), heads=2, head_dim=8, k=3, d=2), "cpu", torch.float32)
    ref = neighborhood_attention_ref(x["q"], x["k"], x["v"], kernel_size=3, dilation=2)
    torch.testing.assert_close(na.masked_sdpa({**x, **na._mask_setup(x)}), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(na.masked_sdpa(x), ref, rtol=1e-5, atol=1e-5)  # without set-up: builds it


def test_mamba_cpu_path_baseline_equals_reference():
    from fastvision.bench.suites import selective_scan as ss
    from fastvision.reference.selective_scan import selective_scan_ref
    x, _ = ss.make_scan_inputs(dict(batch=2, dim=6, L=30, N=4), "cpu", torch.float32)
    args = ss.scan_args(x)
    torch.testing.assert_close(ss.mamba_cpu_path(*args), selective_scan_ref(*args, delta_softplus=True))


def test_report_formats_numbers():
    assert [report._3digits(x) for x in (0.01234, 0.1234, 1.234, 9.996, 12.34, 123.4)] == \
        ["0.012", "0.12", "1.23", "10.0", "12.3", "123"]
