"""Every registered suite (selective scan, bidirectional scan, na1d, na2d) through pytest-benchmark: ``pytest bench/ --benchmark-only``.

Cases and implementations come from fastvision.benchmark's registry (the same
ones ``fastvision bench`` runs); the reference is skipped where it takes
minutes (the long case on CPU). Runs on CUDA when available, else CPU.
FASTVISION_BENCH_TINY=1 shrinks the shapes (a smoke test of this file).
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fastvision import benchmark as fb  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = tuple(fb.SUITES)


def _params():
    for op in OPS:
        suite = fb.SUITES[op]
        for case in fb.cases(suite, DEVICE):
            for impl in suite.implementations(DEVICE):
                for mode in ("fwd", "fwd+bwd"):
                    marks = []
                    if impl == fb.REFERENCE and DEVICE in case.reference_slow_on:
                        marks = [pytest.mark.skip(reason=f"the reference takes minutes at {case.shape} on {DEVICE}")]
                    yield pytest.param(suite, case, impl, mode, marks=marks, id=f"{op}-{case.name}-{impl}-{mode}")


@pytest.mark.parametrize("suite, case, impl, mode", list(_params()))
def test_bench(benchmark, suite, case, impl, mode):
    torch.manual_seed(0)
    inputs, dout = suite.make_inputs(case.shape, DEVICE, torch.float32)
    forward = suite.implementations(DEVICE)[impl]
    fn = (lambda: forward(inputs)) if mode == "fwd" else fb.fwd_bwd(forward, inputs, dout)

    def run():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{suite.op} {case.name} {mode}"
    benchmark.extra_info.update(shape=case.shape, device=fb.device_name(DEVICE), implementation=impl)
    benchmark(run)
