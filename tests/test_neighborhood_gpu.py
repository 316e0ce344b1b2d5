"""Neighborhood attention on a CUDA GPU: the Triton kernels (the CUDA backend)
against the float32 reference in float32, float16 and bfloat16, and a DiNAT
forward/backward (skipped without a GPU)."""

import pytest
import torch

from fastvision.ops import na1d, na2d, na3d
from fastvision.testing import assert_close, check_compile

from test_neighborhood import EDGE, NA, _ref, call, edge, make_inputs, weighted_loss

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_CASES = [c for c in EDGE if c["batch"] > 0] + [
    edge(2, (56, 56), (7, 7), (8, 8), rpb=True, heads=2, kv_heads=2, head_dim=32, head_dim_v=32),
    edge(1, (8192,), (63,), is_causal=(True,), heads=4, kv_heads=2, head_dim=64, head_dim_v=64),
    edge(3, (8, 12, 12), (3, 5, 5), (1, 2, 2), head_dim=128, head_dim_v=128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", GPU_CASES, ids=lambda c: f"{c['nd']}d-{c['spatial']}-k{c['kernel_size']}")
def test_forward_lse_backward_vs_reference(c, dtype):
    q, k, v, rpb = (t.cuda().requires_grad_() if t is not None else None for t in make_inputs(c, dtype))
    out, lse = call(NA[c["nd"]], c, q, k, v, rpb)
    f32 = [t.detach().float().requires_grad_() if t is not None else None for t in (q, k, v, rpb)]
    ref, ref_lse = call(_ref, c, *f32)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref.to(dtype), dtype, scale=2)
    assert_close(lse, ref_lse, dtype)
    leaves = [t for t in (q, k, v, rpb) if t is not None]
    grads = torch.autograd.grad(weighted_loss(out, lse), leaves)
    ref_grads = torch.autograd.grad(weighted_loss(ref, ref_lse), [t for t in f32 if t is not None])
    for x, g, rg in zip(leaves, grads, ref_grads):
        assert g.dtype == x.dtype
        assert_close(g.float(), rg, dtype, scale=20 if dtype == torch.float32 else 4)


def test_torch_compile_fullgraph_cuda():
    c = edge(2, (12, 12), (5, 5), (2, 1), rpb=True)
    q, k, v, rpb = (t.cuda() for t in make_inputs(c))

    def fn(q, k, v, rpb):
        return na2d(q, k, v, 5, dilation=(2, 1), rpb=rpb) + na2d(q, k, v, 3, is_causal=(True, False))

    check_compile(fn, (q, k, v, rpb))


def test_na1d_na3d_run_on_cuda():
    x = torch.randn(2, 64, 4, 32, device="cuda", dtype=torch.bfloat16)
    assert na1d(x, x, x, 7, dilation=2).shape == x.shape
    y = torch.randn(1, 6, 8, 8, 2, 16, device="cuda", dtype=torch.float16)
    assert na3d(y, y, y, 3).shape == y.shape


def test_dinat_mini_forward_backward_cuda():
    from fastvision.models import dinat_mini
    model = dinat_mini().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
