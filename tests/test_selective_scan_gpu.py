"""Selective scan on a CUDA GPU: what is particular to the family (skipped without a GPU).

Every backend against the float32 reference in float32/16/bf16, and
torch.compile on CUDA, run on the specs in tests/conformance/selective_scan.py
(tests/test_conformance.py, marked gpu). Here: the CUDA kernels agree with the
CPU kernel, and a Vim forward/backward under autocast.
"""

import pytest
import torch
from conformance.selective_scan import make_inputs

from fastvision.ops import selective_scan
from fastvision.testing import assert_close

pytestmark = pytest.mark.gpu


def test_cuda_matches_cpu_kernel_float32():
    t = make_inputs(2, 32, 600, 16, "var", seed=3)
    cpu = selective_scan(*t, delta_softplus=True, backend="cpu")
    gpu = selective_scan(*[x.cuda() if x is not None else None for x in t], delta_softplus=True)
    assert_close(gpu.cpu(), cpu)


def test_vim_tiny_forward_backward_cuda():
    from fastvision.models import vim_tiny
    model = vim_tiny().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
