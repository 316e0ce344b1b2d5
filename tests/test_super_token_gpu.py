"""Super token attention on a CUDA GPU: what is particular to the family (skipped without a GPU).

Every backend against the float32 reference in float32/16/bf16, and torch.compile
on CUDA, run on the specs in tests/conformance/super_token.py (tests/test_conformance.py,
marked gpu). Here: STViT-S forward/backward under autocast against the reference backend.
"""

import pytest
import torch

from fastvision.testing import assert_close

pytestmark = pytest.mark.gpu


def test_stvit_small_forward_backward_cuda_vs_reference():
    from fastvision.models import stvit_small
    torch.manual_seed(0)
    model = stvit_small(drop_path_rate=0.0).cuda()
    reference = stvit_small(drop_path_rate=0.0, backend="reference").cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 224, 224, device="cuda")
    outs = []
    for m in (model, reference):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        out.float().square().sum().backward()
        outs.append(out.float())
        assert out.shape == (2, 1000) and torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # bfloat16 activations through 20 blocks: the paths differ by the ops' float32 rounding, amplified.
    assert_close(outs[0], outs[1], torch.bfloat16, scale=10)
