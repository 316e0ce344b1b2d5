"""Selective scan: the compiled CPU kernels against the pure-PyTorch reference.

Covers forward and backward over random shapes and edge cases, float64
gradcheck, opcheck, torch.compile, half precision, reverse and bidirectional
scans against their flip-based definitions, bounded backward memory, and
clear errors for bad input. (Triton kernels: test_triton_selective_scan_interp.py.)
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from fastvision.ops import bi_selective_scan, scan_chunk_len, selective_scan
from fastvision.reference.selective_scan import bi_selective_scan_ref, selective_scan_ref
from fastvision.testing import (assert_close, case_id, check_compile, check_gradcheck, check_opcheck,
                                import_triton_kernels_interpreted, random_cases)

ops = torch.ops.fastvision


def make_inputs(batch=2, dim=4, L=19, N=5, bc="var", groups=2, z=True, D=True, bias=True,
                dtype=torch.float32, seed=0, requires_grad=False, delta_scale=1.0):
    """Random scan inputs; bc is 'const' (dim, N), 'var' (batch, N, L) or 'group' (batch, G, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    u = rnd(batch, dim, L)
    delta = (rnd(batch, dim, L, dt=torch.float64) * 0.5 * delta_scale).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    A = -torch.rand(dim, N, generator=g, dtype=torch.float64).add(0.1).to(acc)
    shapes = {"const": (dim, N), "var": (batch, N, L), "group": (batch, groups, N, L)}
    bc_dt = acc if bc == "const" else dtype
    B = rnd(*shapes[bc], dt=bc_dt)
    C = rnd(*shapes[bc], dt=bc_dt)
    Dv = rnd(dim, dt=acc) if D else None
    zv = rnd(batch, dim, L) if z else None
    bv = rnd(dim, dt=acc, scale=0.5) if bias else None
    tensors = [u, delta, A, B, C, Dv, zv, bv]
    if requires_grad:
        tensors = [t.requires_grad_() if t is not None else None for t in tensors]
    return tensors


def weighted_loss(out, last=None):
    """A loss whose gradient differs at every output element."""
    w = torch.linspace(-1.5, 2.0, out.numel(), dtype=torch.float64).view_as(out)
    loss = (out.double() * w).sum()
    if last is not None:
        loss = loss + (last.double() * torch.linspace(0.5, -1, last.numel(), dtype=torch.float64).view_as(last)).sum()
    return loss


SPACE = {
    "batch": [2, 1, 3],
    "dim": [4, 1, 3, 6, 8],
    "L": [19, 1, 2, 16, 17, 63, 130],
    "N": [5, 1, 3, 16, 17],
    "bc": ["var", "const", "group"],
    "groups": [2, 1, 3],
    "z": [True, False],
    "D": [True, False],
    "bias": [True, False],
    "softplus": [True, False],
    "reverse": [False, True],
}
EDGE = [
    {"L": 1}, {"dim": 1, "bc": "const"}, {"batch": 1, "N": 1}, {"L": 128, "N": 16},  # exactly one chunk
    {"L": 129, "N": 16}, {"L": 257, "N": 16, "reverse": True},  # a chunk boundary crossed
    {"N": 256, "L": 33, "dim": 2, "bc": "const"},  # the anchor's largest d_state
    {"bc": "group", "groups": 4, "dim": 8}, {"bc": "group", "groups": 8, "dim": 8},  # a group per channel
    {"z": False, "D": False, "bias": False, "softplus": False},
]


def _valid(c):
    return c["bc"] != "group" or c["dim"] % c["groups"] == 0


CASES = random_cases(SPACE, 36, seed=1, edge_cases=EDGE, valid=_valid)


def _run(case, fn, dtype=torch.float32, requires_grad=False, seed=0, **kw):
    t = make_inputs(case["batch"], case["dim"], case["L"], case["N"], case["bc"], case["groups"],
                    case["z"], case["D"], case["bias"], dtype=dtype, seed=seed, requires_grad=requires_grad)
    out = fn(*t, delta_softplus=case["softplus"], return_last_state=True, reverse=case["reverse"], **kw)
    return t, out


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_reference(case):
    t, (out, last) = _run(case, selective_scan, requires_grad=True)
    _, (ref, ref_last) = _run(case, selective_scan_ref, requires_grad=True)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert_close(out, ref)
    assert_close(last, ref_last)
    leaves = [x for x in t if x is not None]
    grads = torch.autograd.grad(weighted_loss(out, last), leaves)
    t_ref, (ref, ref_last) = _run(case, selective_scan_ref, requires_grad=True)
    ref_grads = torch.autograd.grad(weighted_loss(ref, ref_last), [x for x in t_ref if x is not None])
    for g, rg in zip(grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == rg.dtype
        assert_close(g, rg, torch.float32, scale=20)


@pytest.mark.parametrize("bc,groups", [("var", 1), ("const", 1), ("group", 2)])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_float64(bc, groups, reverse):
    t = make_inputs(2, 4, 11, 3, bc, groups, dtype=torch.float64, requires_grad=True)

    def fn(*a):
        return selective_scan(*a, delta_softplus=True, return_last_state=True, reverse=reverse)

    check_gradcheck(fn, t)


def test_gradcheck_float64_softplus_above_threshold():
    # delta + bias crosses the softplus threshold of 20 for some steps.
    t = make_inputs(1, 2, 9, 3, "var", dtype=torch.float64, delta_scale=60.0, seed=3)
    t[2] = -torch.rand(2, 3, dtype=torch.float64) * 0.01  # keep exp(delta A) away from 0
    t = [x.requires_grad_() for x in t]
    assert (t[1].detach() + t[7].detach()[:, None] > 20).any()
    check_gradcheck(lambda *a: selective_scan(*a, delta_softplus=True), t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_float32_reference(dtype):
    case = {**CASES[0], "L": 70, "softplus": True}
    t, (out, last) = _run(case, selective_scan, dtype=dtype, requires_grad=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    # The reference sees the same (rounded) inputs in float32.
    t32 = [x.detach().float().requires_grad_() if x is not None else None for x in t]
    ref, ref_last = selective_scan_ref(*t32, delta_softplus=True, return_last_state=True)
    assert_close(out, ref.to(dtype), dtype, scale=2)
    assert_close(last, ref_last, torch.float32, scale=50)
    leaves = [x for x in t if x is not None]
    grads = torch.autograd.grad(weighted_loss(out), leaves)
    ref_grads = torch.autograd.grad(weighted_loss(ref), [x for x in t32 if x is not None])
    for x, g, rg in zip(leaves, grads, ref_grads):
        assert g.dtype == x.dtype
        assert_close(g.float(), rg, dtype, scale=4)


def test_reverse_equals_flipped_scan():
    u, delta, A, B, C, D, z, bias = make_inputs(2, 4, 40, 6, "group", 2)
    out, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, reverse=True)
    f = lambda x: x.flip(-1)  # noqa: E731
    ref, ref_last = selective_scan_ref(f(u), f(delta), A, f(B), f(C), D, f(z), bias, True, True)
    assert_close(out, ref.flip(-1))
    assert_close(last, ref_last)


@pytest.mark.parametrize("bc", ["var", "const", "group"])
@pytest.mark.parametrize("z", [True, False])
def test_bi_selective_scan_equals_two_flipped_scans(bc, z):
    fwd = make_inputs(2, 4, 37, 5, bc, 2, z=z, requires_grad=True, seed=1)
    bwd = make_inputs(2, 4, 37, 5, bc, 2, z=False, requires_grad=True, seed=2)
    del bwd[6]
    out = bi_selective_scan(*fwd, *bwd, delta_softplus=True)
    ref = bi_selective_scan_ref(*fwd, *bwd, delta_softplus=True)
    assert_close(out, ref)
    leaves = [x for x in fwd + bwd if x is not None]
    grads = torch.autograd.grad(weighted_loss(out), leaves)
    ref_grads = torch.autograd.grad(weighted_loss(ref), leaves)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float32, scale=20)


def test_bi_selective_scan_gradcheck_float64():
    fwd = make_inputs(1, 2, 7, 3, "var", dtype=torch.float64, requires_grad=True, seed=4)
    bwd = make_inputs(1, 2, 7, 3, "var", dtype=torch.float64, requires_grad=True, seed=5)
    del bwd[6]
    check_gradcheck(lambda *a: bi_selective_scan(*a, delta_softplus=True), fwd + bwd)


def test_noncontiguous_inputs_work():
    u, delta, A, B, C, D, z, bias = make_inputs(2, 4, 21, 5, "var")
    nc = lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    assert not nc(u).is_contiguous()
    out = selective_scan(nc(u), nc(delta), A.t().contiguous().t(), nc(B), nc(C), D, nc(z), bias, True)
    assert_close(out, selective_scan_ref(u, delta, A, B, C, D, z, bias, True))


def test_empty_batch_and_empty_sequence():
    for batch, L in [(0, 9), (2, 0)]:
        t = make_inputs(batch, 3, L, 4, "var", requires_grad=True)
        out, last = selective_scan(*t, delta_softplus=True, return_last_state=True)
        assert out.shape == (batch, 3, L) and last.shape == (batch, 3, 4)
        assert torch.count_nonzero(last) == 0
        out.sum().backward()


def test_opcheck_all_ops():
    for bc in ("var", "const"):
        u, delta, A, B, C, D, z, bias = make_inputs(2, 4, 20, 3, bc, requires_grad=True)
        B4 = B.detach().unsqueeze(1).requires_grad_() if bc == "var" else B
        C4 = C.detach().unsqueeze(1).requires_grad_() if bc == "var" else C
        chunk = 8
        for zz in (z, None):
            check_opcheck(ops.selective_scan_fwd.default, (u, delta, A, B4, C4, D, zz, bias, True, False, chunk))
        out, last, states = ops.selective_scan_fwd(u, delta, A, B4, C4, D, z, bias, True, True, chunk)
        bwd_args = [t.detach() if isinstance(t, torch.Tensor) else t
                    for t in (torch.randn_like(out), torch.randn_like(last), u, delta, A, B4, C4, D, z, bias,
                              states, True, True, chunk)]
        check_opcheck(ops.selective_scan_bwd.default, bwd_args)
        check_opcheck(ops.bi_selective_scan_fwd.default,
                      (u, delta, A, B4, C4, D, z, bias, u, delta, A, B4, C4, D, bias, True, chunk))


def test_torch_compile_fullgraph():
    t = make_inputs(2, 4, 20, 3, "var")

    def fn(u, delta, A, B, C, D, z, bias):
        out, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, reverse=True)
        bi = bi_selective_scan(u, delta, A, B, C, D, z, bias, u, delta, A, B, C, D, bias)
        return out * 2 + bi, last

    check_compile(fn, t)


def test_chunk_len_rule():
    assert scan_chunk_len(16) == 128 and scan_chunk_len(1) == 128
    assert scan_chunk_len(64) == 32 and scan_chunk_len(256) == 16
    assert all(scan_chunk_len(n) & (scan_chunk_len(n) - 1) == 0 for n in range(1, 300))


def test_backward_memory_does_not_grow_with_L_times_N():
    """Peak RSS of a backward whose full state history would need 1 GiB stays far below it."""
    batch, dim, L, N = 1, 256, 16384, 64  # all states: 256 * 16384 * 64 * 4 B = 1 GiB
    code = textwrap.dedent(f"""
        import resource, torch
        from fastvision.ops import selective_scan
        torch.manual_seed(0)
        u = torch.randn({batch}, {dim}, {L}, requires_grad=True)
        delta = torch.rand({batch}, {dim}, {L})
        A = -torch.rand({dim}, {N})
        B = torch.randn({batch}, {N}, {L}); C = torch.randn({batch}, {N}, {L})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        selective_scan(u, delta, A, B, C, delta_softplus=True).sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grew = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True).stdout.strip())
    full_states = batch * dim * L * N * 4
    assert grew < full_states / 4, f"backward grew RSS by {grew / 2**20:.0f} MiB"


# --------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, never a crash.


def _bad(**overrides):
    u, delta, A, B, C, D, z, bias = make_inputs(2, 4, 10, 3, "var")
    args = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)
    args.update(overrides)
    return args


BAD_CASES = [
    (dict(u=torch.randn(2, 4)), ValueError, "u must be a 3-D tensor"),
    (dict(delta=torch.randn(2, 4, 11)), ValueError, "delta must have shape"),
    (dict(A=torch.randn(5, 3)), ValueError, "A must have shape"),
    (dict(A=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "A must have dtype"),
    (dict(B=torch.randn(3, 3, 10)), ValueError, "B must have shape"),
    (dict(C=torch.randn(2, 3, 3, 10)), ValueError, "groups G=3"),
    (dict(B=torch.randn(2, 4, 3, 10, 1)), ValueError, "B must have shape (dim, N)"),
    (dict(D=torch.randn(5)), ValueError, "D must have shape"),
    (dict(delta_bias=torch.randn(4, 1)), ValueError, "delta_bias must have shape"),
    (dict(z=torch.randn(2, 4, 9)), ValueError, "z must have shape"),
    (dict(u=torch.randn(2, 4, 10, dtype=torch.float64)), TypeError, "delta must have dtype"),
    (dict(u=torch.randint(0, 3, (2, 4, 10))), TypeError, "u must have dtype"),
    (dict(u=[1.0]), TypeError, "u must be a torch.Tensor"),
    (dict(z=torch.randn(2, 4, 10, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("overrides,exc,match", BAD_CASES, ids=[m for _, _, m in BAD_CASES])
def test_bad_inputs_raise_clear_errors(overrides, exc, match):
    with pytest.raises(exc, match=match.replace("(", r"\(").replace(")", r"\)")):
        selective_scan(**_bad(**overrides))


def test_bad_backend_and_bi_mismatch():
    args = _bad()
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(**args, backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        selective_scan(**args, backend="cuda")
    fwd = make_inputs(2, 4, 10, 3, "var")
    bwd = make_inputs(2, 4, 10, 3, "const")
    del bwd[6]
    with pytest.raises(ValueError, match="B_b must have the shape and dtype of B"):
        bi_selective_scan(*fwd, *bwd)
    bwd = make_inputs(2, 4, 11, 3, "var")
    del bwd[6]
    with pytest.raises(ValueError, match="u_b must have the shape and dtype of u"):
        bi_selective_scan(*fwd, *bwd)


def test_double_backward_raises():
    t = make_inputs(1, 2, 5, 3, "var", requires_grad=True)
    (gu,) = torch.autograd.grad(selective_scan(*t).sum(), t[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gu.sum().backward()


@pytest.mark.triton
@pytest.mark.parametrize("bc", ["var", "const", "group"])
def test_triton_backend_wiring_under_interpreter(bc):
    """backend='triton' through the public API (its autograd glue), on CPU tensors."""
    import_triton_kernels_interpreted("fastvision.triton.selective_scan")
    t = make_inputs(2, 4, 21, 5, bc, 2, requires_grad=True)
    out, last = selective_scan(*t, delta_softplus=True, return_last_state=True, reverse=True, backend="triton")
    ref, ref_last = selective_scan_ref(*t, delta_softplus=True, return_last_state=True, reverse=True)
    assert_close(out, ref)
    assert_close(last, ref_last)
    leaves = [x for x in t if x is not None]
    grads = torch.autograd.grad(weighted_loss(out, last), leaves)
    ref_grads = torch.autograd.grad(weighted_loss(ref, ref_last), leaves)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float32, scale=20)
    fwd = make_inputs(2, 4, 21, 5, bc, 2, requires_grad=True, seed=3)
    bwd = make_inputs(2, 4, 21, 5, bc, 2, requires_grad=True, seed=4)
    del bwd[6]
    bi = bi_selective_scan(*fwd, *bwd, backend="triton")
    bi_ref = bi_selective_scan_ref(*fwd, *bwd)
    assert_close(bi, bi_ref)
    leaves = [x for x in fwd + bwd if x is not None]
    for g, rg in zip(torch.autograd.grad(weighted_loss(bi), leaves), torch.autograd.grad(weighted_loss(bi_ref), leaves)):
        assert_close(g, rg, torch.float32, scale=20)


def test_reference_backend_is_the_oracle():
    t = make_inputs(2, 3, 12, 4, "var")
    assert torch.equal(selective_scan(*t, delta_softplus=True, backend="reference"),
                       selective_scan_ref(*t, delta_softplus=True))
    assert math.isfinite(selective_scan(*t, backend="cpu").sum().item())
