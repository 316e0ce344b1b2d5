"""Every registered suite (selective scan, bidirectional scan, na1d, na2d) through pytest-benchmark: ``pytest bench/ --benchmark-only``.

Cases and implementations come from the fastvision.bench registry (the same
ones ``fastvision bench`` runs, with the same fastvision backends, asked of
each fused op). An implementation's set-up (e.g. the masked-SDPA mask) runs
once per test, before and outside the benchmarked function. Implementations
the suite does not time here are skipped with its reason; slow ones (seconds
per call) are timed in one round instead of pytest-benchmark's many. Runs on
CUDA when available, else CPU. FASTVISION_BENCH_TINY=1 shrinks the shapes
(a smoke test of this file).
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fastvision import bench as fb  # noqa: E402
from fastvision.bench.core import forward_only, run_setup  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params():
    for op, suite in fb.SUITES.items():
        for case in fb.cases(suite, DEVICE):
            for name, impl in fb.implementations(suite, case.shape, DEVICE).items():
                reason = impl.skip or impl.skip_quick  # a call takes minutes: not for pytest-benchmark
                for mode in ("fwd",) if suite.forward_only else ("fwd", "fwd+bwd"):
                    marks = [pytest.mark.skip(reason=reason)] if reason else []
                    yield pytest.param(suite, case, name, mode, marks=marks, id=f"{op}-{case.name}-{name}-{mode}")


@pytest.mark.parametrize("suite, case, name, mode", list(_params()))
def test_bench(benchmark, suite, case, name, mode):
    torch.manual_seed(0)
    inputs, dout = suite.make_inputs(case.shape, DEVICE, torch.float32)
    impl = fb.implementations(suite, case.shape, DEVICE)[name]
    extra, _, _ = run_setup(impl, inputs, DEVICE)  # once, outside the benchmarked function
    fn = forward_only(impl.run, inputs, extra) if mode == "fwd" else fb.fwd_bwd(impl.run, inputs, dout, extra)

    def run():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{suite.op} {case.name} {mode}"
    benchmark.extra_info.update(shape=case.shape, device=fb.device_name(DEVICE), implementation=name,
                                note=impl.note)
    if impl.slow:  # seconds per call: one round
        benchmark.extra_info["timed_once"] = impl.slow
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    else:
        benchmark(run)
