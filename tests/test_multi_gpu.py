"""Two GPUs: inputs on cuda:1 while the current device is cuda:0 give the same
results, on cuda:1, as the same inputs on cuda:0 — every op and backend of the
smoke test, forward and backward (skipped below two GPUs).

A kernel launched on the current device instead of the inputs' one faults or
reads the wrong memory; the Triton path runs under the inputs' device
(ops/_library.py), the CUDA C++ kernels take a device guard.
"""

import pytest
import torch

from fastvision import _extension
from fastvision.testing import assert_close

import test_gpu_smoke as smoke

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

PARAMS = [pytest.param(c, b, id=f"{c.name}-{b}") for c in smoke.CASES
          for b in dict.fromkeys((*c.backends, "auto"))]


def _run(case, backend, x):
    outs = smoke.run(case, x, backend)
    grads = torch.autograd.grad(smoke.loss(outs), list(x.values()))
    return outs, dict(zip(x, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case, backend", PARAMS)
def test_inputs_on_second_device(case, backend, dtype):
    if backend == "cuda" and not _extension.CUDA_LOADED:
        pytest.skip(f"CUDA C++ kernels not loaded: {_extension.CUDA_ERROR or 'not built'}")
    torch.cuda.set_device(0)
    x0 = smoke.make_inputs(case, "cuda:0", dtype)
    x1 = {n: t.detach().to("cuda:1").requires_grad_() for n, t in x0.items()}
    outs0, grads0 = _run(case, backend, x0)
    outs1, grads1 = _run(case, backend, x1)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0, "the op changed the current device"
    where = f"{case.name} {backend} {dtype}"
    for kind, a, b in (("output", outs0, outs1), ("gradient", grads0, grads1)):
        for name in a:
            assert b[name].device == torch.device("cuda:1"), f"{where}: {kind} {name} on {b[name].device}"
            # Same kernels on the same inputs: equal up to the order of atomic adds.
            assert_close(b[name].cpu().float(), a[name].cpu().float(), dtype, msg=f"{where}: {kind} {name}")
