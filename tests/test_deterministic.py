"""Deterministic mode: under torch.use_deterministic_algorithms(True) the GPU
backwards reduce per-channel / per-row partials in a fixed order instead of
adding with float atomics.

On CPU the Triton kernels run under the interpreter: the deterministic path
(selected by the flag, checked here at the launch) must give the reference's
gradients; on a GPU (``-m gpu``) two runs must agree bit for bit. The CUDA C++
scan backward adds variable dB/dC with atomics and cannot see the flag, so the
op's backend rule refuses it in deterministic mode ("auto" takes Triton).
"""

import contextlib

import pytest
import torch

from fastvision.ops import na2d, selective_scan
from fastvision.ops._library import FUSED_OPS
from fastvision.reference.neighborhood import neighborhood_attention_ref
from fastvision.reference.selective_scan import selective_scan_ref
from fastvision.testing import assert_close


@contextlib.contextmanager
def deterministic(on=True):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _scan_inputs(device="cpu", groups=2, batch=2, dim=4, N=5, L=19):
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()
    return dict(u=r(batch, dim, L), delta=r(batch, dim, L, scale=0.5),
                A=(-torch.rand(dim, N, generator=g) - 0.1).to(device).requires_grad_(),
                B=r(batch, groups, N, L), C=r(batch, N, L), D=r(dim), z=r(batch, dim, L), delta_bias=r(dim))


def _scan_grads(inputs, backend):
    out = selective_scan(**inputs, delta_softplus=True, backend=backend)
    return torch.autograd.grad(out.float().square().sum(), list(inputs.values()))


def _na_inputs(device="cpu"):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 7, 8, 2, 16, generator=g).to(device).requires_grad_() for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g).to(device).requires_grad_()
    return q, k, v, rpb


def _na_grads(q, k, v, rpb, backend):
    out = na2d(q, k, v, 3, dilation=(1, 2), rpb=rpb, backend=backend)
    return torch.autograd.grad(out.float().square().sum(), (q, k, v, rpb))


def test_cuda_cpp_scan_backward_is_refused_in_deterministic_mode():
    limits = FUSED_OPS["selective_scan"].limits
    assert limits("cuda", d_state=16, variable_bc=True) is None
    with deterministic():
        reason = limits("cuda", d_state=16, variable_bc=True)
        assert reason and "use_deterministic_algorithms" in reason and "backend='triton'" in reason
        assert limits("cuda", d_state=16, variable_bc=False) is None  # no atomics with constant B/C
        assert limits("triton", d_state=16, variable_bc=True) is None
    assert FUSED_OPS["bi_selective_scan"].limits is limits


class _LaunchSpy:
    """Stands in for a Triton kernel object: records each launch's keyword
    arguments and launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _reference_grads(fn, inputs):
    """Gradients of the reference in float64, as float32."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    return [g.float() for g in torch.autograd.grad(fn(*leaves).square().sum(), leaves)]


def _check_partials_path(module, kernel_name, monkeypatch, inputs, grads, reference):
    """Default (atomics) once, deterministic twice: the flag reaches the kernel,
    the deterministic gradients match the reference, the atomics path and each other."""
    spy = _LaunchSpy(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, spy)
    atomics = grads(inputs, "triton")
    with deterministic():
        first = grads(inputs, "triton")
        second = grads(inputs, "triton")
    main = [launch for launch in spy.launches if not launch.get("SAFE")]  # (NA: not the inf/NaN re-runs)
    assert [launch["DETERMINISTIC"] for launch in main] == [False, True, True]
    for i, (a, f, s, r) in enumerate(zip(atomics, first, second, reference)):
        assert torch.equal(f, s), f"input {i}"
        assert_close(f, r, msg=f"input {i} vs reference")
        assert_close(f, a, msg=f"input {i} vs the atomics path")


@pytest.mark.triton
def test_triton_scan_backward_partials_interpreted(monkeypatch):
    from fastvision.testing import import_triton_kernels_interpreted
    module = import_triton_kernels_interpreted("fastvision.triton.selective_scan")
    inputs = _scan_inputs()
    names = list(inputs)
    reference = _reference_grads(
        lambda *x: selective_scan_ref(**dict(zip(names, x)), delta_softplus=True), inputs.values())
    _check_partials_path(module, "_selective_scan_bwd_kernel", monkeypatch, inputs, _scan_grads, reference)


@pytest.mark.triton
def test_triton_na_backward_partials_interpreted(monkeypatch):
    from fastvision.testing import import_triton_kernels_interpreted
    module = import_triton_kernels_interpreted("fastvision.triton.neighborhood")
    inputs = _na_inputs()
    reference = _reference_grads(
        lambda q, k, v, rpb: neighborhood_attention_ref(q, k, v, 3, (1, 2), rpb=rpb), inputs)
    _check_partials_path(module, "_na_bwd_dq_kernel", monkeypatch, inputs, lambda x, b: _na_grads(*x, b),
                         reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", ["selective_scan", "na2d"])
def test_gpu_backward_bit_identical_in_deterministic_mode(op):
    """backend="auto" on CUDA: two backwards agree bit for bit (Triton partials;
    the CUDA C++ scan backward is refused in this mode)."""
    if op == "selective_scan":
        inputs, grads = _scan_inputs("cuda", batch=4, dim=64, N=16, L=300, groups=1), _scan_grads
    else:
        inputs, grads = _na_inputs("cuda"), lambda x, b: _na_grads(*x, b)
    with deterministic():
        first = grads(inputs, "auto")
        runs = [grads(inputs, "auto") for _ in range(3)]
    for run in runs:
        for i, (a, b) in enumerate(zip(first, run)):
            assert torch.equal(a, b), f"{op}: gradient {i} differs between runs"
