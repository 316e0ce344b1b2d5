"""Selective scan on a CUDA GPU: the CUDA C++ and Triton kernels against the
reference, in float32, float16 and bfloat16 (skipped without a GPU)."""

import pytest
import torch

from fastvision import _extension
from fastvision.ops import bi_selective_scan, selective_scan
from fastvision.reference.selective_scan import bi_selective_scan_ref, selective_scan_ref
from fastvision.testing import assert_close, check_compile

from test_selective_scan import make_inputs, weighted_loss

pytestmark = pytest.mark.gpu

BACKENDS = ["auto", "triton", pytest.param("cuda", marks=pytest.mark.skipif(
    not _extension.CUDA_LOADED, reason="CUDA C++ kernels not loaded: "
    + (_extension.CUDA_ERROR or "not built, or torch has no CUDA")))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda(tensors):
    return [t.detach().cuda().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bc,N,L", [("var", 16, 197), ("const", 16, 300), ("group", 64, 129),
                                    ("var", 256, 40), ("var", 5, 1)])
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_backward_vs_reference(backend, dtype, bc, N, L, reverse):
    t = _cuda(make_inputs(2, 8, L, N, bc, 2, dtype=dtype, seed=7))
    out, last = selective_scan(*t, delta_softplus=True, return_last_state=True, reverse=reverse, backend=backend)
    t32 = [x.detach().float().requires_grad_() if x is not None else None for x in t]
    ref, ref_last = selective_scan_ref(*t32, delta_softplus=True, return_last_state=True, reverse=reverse)
    assert out.dtype == dtype and out.is_cuda
    assert_close(out, ref.to(dtype), dtype, scale=2)
    assert_close(last, ref_last, torch.float32, scale=50 if dtype != torch.float32 else 1)
    leaves = [x for x in t if x is not None]
    grads = torch.autograd.grad(weighted_loss(out, last), leaves)
    ref_grads = torch.autograd.grad(weighted_loss(ref, ref_last), [x for x in t32 if x is not None])
    for x, g, rg in zip(leaves, grads, ref_grads):
        assert g.dtype == x.dtype
        assert_close(g.float(), rg, dtype, scale=20 if dtype == torch.float32 else 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bi_selective_scan_vs_reference(backend, dtype):
    fwd = _cuda(make_inputs(2, 16, 197, 16, "var", dtype=dtype, seed=1))
    bwd = _cuda(make_inputs(2, 16, 197, 16, "var", dtype=dtype, seed=2))
    del bwd[6]
    out = bi_selective_scan(*fwd, *bwd, delta_softplus=True, backend=backend)
    f32 = [x.detach().float().requires_grad_() if x is not None else None for x in fwd + bwd]
    ref = bi_selective_scan_ref(*f32, delta_softplus=True)
    assert_close(out, ref.to(dtype), dtype, scale=2)
    grads = torch.autograd.grad(weighted_loss(out), [x for x in fwd + bwd if x is not None])
    ref_grads = torch.autograd.grad(weighted_loss(ref), [x for x in f32 if x is not None])
    for g, rg in zip(grads, ref_grads):
        assert_close(g.float(), rg, dtype, scale=20 if dtype == torch.float32 else 4)


def test_cuda_matches_cpu_kernel_float32():
    t = make_inputs(2, 32, 600, 16, "var", seed=3)
    cpu = selective_scan(*t, delta_softplus=True, backend="cpu")
    gpu = selective_scan(*[x.cuda() if x is not None else None for x in t], delta_softplus=True)
    assert_close(gpu.cpu(), cpu)


def test_torch_compile_fullgraph_cuda():
    t = [x.cuda() if x is not None else None for x in make_inputs(2, 8, 64, 16, "var")]

    def fn(u, delta, A, B, C, D, z, bias):
        return selective_scan(u, delta, A, B, C, D, z, bias, True, reverse=True) + \
            bi_selective_scan(u, delta, A, B, C, D, z, bias, u, delta, A, B, C, D, bias)

    check_compile(fn, t)


def test_vim_tiny_forward_backward_cuda():
    from fastvision.models import vim_tiny
    model = vim_tiny().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
