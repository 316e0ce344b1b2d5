"""Neighborhood attention on a CUDA GPU: what is particular to the family (skipped without a GPU).

Every backend against the float32 reference in float32/16/bf16 (including
large windows and long sequences), and torch.compile on CUDA, run on the specs
in tests/conformance/neighborhood.py (tests/test_conformance.py, marked gpu).
Here: a DiNAT forward/backward under autocast.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_dinat_mini_forward_backward_cuda():
    from fastvision.models import dinat_mini
    model = dinat_mini().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
