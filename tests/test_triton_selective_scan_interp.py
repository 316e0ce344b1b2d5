"""Selective-scan Triton kernels' chunking, on CPU under TRITON_INTERPRET=1.

The launchers are called directly with a small chunk_len so that the
sequences cross several chunks (checkpoints, carried state and carried
adjoint), which the public API only does for long sequences. backend="triton"
through the public API (float16, mixed B/C dtypes, empty sequence) runs on the
specs in tests/conformance/selective_scan.py. The interpreter is slow, so
shapes are tiny. Run alone with ``pytest -m triton``.
"""


import pytest
import torch

from fastvision.testing import import_triton_kernels_interpreted

ss = import_triton_kernels_interpreted("fastvision.triton.selective_scan")
import triton  # noqa: E402  (after the interpreter check above)
import triton.language as tl  # noqa: E402

from fastvision.reference.selective_scan import bi_selective_scan_ref, selective_scan_ref

pytestmark = pytest.mark.triton

F32_TOL = dict(rtol=1e-4, atol=1e-5)
LOW_TOL = {torch.float16: dict(rtol=5e-3, atol=5e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _bc(kind, batch, dim, N, L, dtype, groups=2):
    """B or C in the reference's layout: const (dim, N), var (batch, N, L), group (batch, G, N, L)."""
    if kind == "const":
        return torch.randn(dim, N)
    if kind == "var":
        return torch.randn(batch, N, L).to(dtype)
    assert kind == "group"
    return torch.randn(batch, groups, N, L).to(dtype)


def _to_launcher(BC):
    """The launchers take variable B/C only as 4-D (batch, G, N, L)."""
    return BC.unsqueeze(1) if BC.dim() == 3 else BC


def make_inputs(batch=2, dim=4, N=5, L=17, B_kind="group", C_kind="var", dtype=torch.float32,
                has_z=True, softplus=True, zero_DB=False, bc_dtype=None, seed=0):
    """Random inputs in the launchers' calling convention (D, delta_bias always given)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    u = torch.randn(batch, dim, L, generator=g)
    if softplus:
        delta = torch.randn(batch, dim, L, generator=g) * 2
        # Exercise both softplus branches: > 20 (identity) and very negative (log1p of tiny).
        delta.view(-1)[::7] = 25.0
        delta.view(-1)[3::11] = -30.0
    else:
        delta = torch.rand(batch, dim, L, generator=g) + 0.05
    A = -(torch.rand(dim, N, generator=g) + 0.2)
    bc_dtype = bc_dtype or dtype
    B = _bc(B_kind, batch, dim, N, L, bc_dtype)
    C = _bc(C_kind, batch, dim, N, L, bc_dtype)
    if zero_DB:
        D, delta_bias = torch.zeros(dim), torch.zeros(dim)
    else:
        D, delta_bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g) * 0.5
    z = torch.randn(batch, dim, L, generator=g).to(dtype) if has_z else None
    return dict(u=u.to(dtype), delta=delta.to(dtype), A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


_ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def ref_fwd_bwd(inp, softplus, reverse, dout, dlast):
    """Reference out, last_state and autograd gradients (fp32, from the same rounded inputs)."""
    leaves = {k: (None if v is None else v.detach().float().requires_grad_()) for k, v in inp.items()}
    out, last = selective_scan_ref(*(leaves[k] for k in _ORDER), delta_softplus=softplus,
                                   return_last_state=True, reverse=reverse)
    grads = [dout.float()] + ([dlast] if dlast is not None else [torch.zeros_like(last)])
    torch.autograd.backward([out, last], grads)
    return out, last, {k: (None if v is None else v.grad) for k, v in leaves.items()}


def assert_grads(got, ref, inp, dtype):
    """got: the launcher's 8-tuple; ref: reference grads by name."""
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = got
    mine = dict(u=du, delta=ddelta, A=dA, B=dB, C=dC, D=dD, z=dz, delta_bias=ddelta_bias)
    for k in _ORDER:
        if inp[k] is None:
            assert mine[k].numel() == 0, "dz must be empty without z"
            continue
        expected_shape = _to_launcher(inp[k]).shape if k in "BC" else inp[k].shape
        assert mine[k].shape == expected_shape, k
        assert mine[k].dtype == inp[k].dtype, k
        tol = F32_TOL if mine[k].dtype == torch.float32 else LOW_TOL[mine[k].dtype]
        torch.testing.assert_close(mine[k].float(), ref[k].reshape(mine[k].shape), **tol,
                                   msg=lambda m, k=k: f"d{k}: {m}")


def run_case(inp, softplus, reverse, chunk_len, with_dlast=True):
    args = [inp[k] for k in _ORDER]
    args = [_to_launcher(a) if k in "BC" else a for k, a in zip(_ORDER, args)]
    out, last, cs = ss.selective_scan_fwd(*args, softplus, reverse, chunk_len)

    batch, dim, L = inp["u"].shape
    N = inp["A"].shape[1]
    dout = torch.randn(batch, dim, L).to(inp["u"].dtype)
    dlast = torch.randn(batch, dim, N) if with_dlast else None
    ref_out, ref_last, ref_grads = ref_fwd_bwd(inp, softplus, reverse, dout, dlast)

    dtype = inp["u"].dtype
    assert out.dtype == dtype and out.shape == inp["u"].shape
    assert cs.shape == (batch, dim, -(-L // chunk_len), N) and cs.dtype == torch.float32
    tol = F32_TOL if dtype == torch.float32 else LOW_TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    torch.testing.assert_close(last, ref_last, **F32_TOL)

    got = ss.selective_scan_bwd(dout, dlast, *args, cs, softplus, reverse, chunk_len)
    assert_grads(got, ref_grads, inp, dtype)
    return cs


# --------------------------------------------------------------------------
# selective_scan_fwd / selective_scan_bwd
# --------------------------------------------------------------------------


@pytest.mark.parametrize("L,chunk_len", [(1, 8), (5, 8), (17, 8), (16, 16), (40, 16)])
@pytest.mark.parametrize("bc", [("const", "const"), ("var", "var"), ("group", "var")])
@pytest.mark.parametrize("reverse", [False, True])
def test_fwd_bwd_shapes(L, chunk_len, bc, reverse):
    """N = 5 (padded tile), z given, softplus with values past the threshold, dlast seeded."""
    inp = make_inputs(L=L, B_kind=bc[0], C_kind=bc[1], seed=L)
    run_case(inp, softplus=True, reverse=reverse, chunk_len=chunk_len)


@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("zero_DB", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_fwd_bwd_options(has_z, softplus, zero_DB, reverse):
    """Gate, softplus, D/delta_bias absent (zeros) or not; N = 8; B constant, C grouped."""
    inp = make_inputs(batch=1, dim=4, N=8, L=13, B_kind="const", C_kind="group",
                      has_z=has_z, softplus=softplus, zero_DB=zero_DB, seed=3)
    run_case(inp, softplus=softplus, reverse=reverse, chunk_len=8, with_dlast=has_z)


@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_states(reverse):
    """chunk_states[..., c, :] is the state after chunk c in processing order."""
    inp = make_inputs(batch=1, dim=2, N=5, L=21, B_kind="group", C_kind="const", seed=11)
    args = [_to_launcher(inp[k]) if k in "BC" else inp[k] for k in _ORDER]
    chunk_len = 8
    _, last, cs = ss.selective_scan_fwd(*args, True, reverse, chunk_len)
    L = inp["u"].shape[-1]
    for c in range(cs.shape[2]):
        k = min((c + 1) * chunk_len, L)  # steps processed after chunk c
        sl = slice(L - k, L) if reverse else slice(0, k)
        part = {n: (v[..., sl] if v is not None and v.dim() >= 3 else v) for n, v in inp.items()}
        _, state = selective_scan_ref(*(part[n] for n in _ORDER), delta_softplus=True,
                                      return_last_state=True, reverse=reverse)
        torch.testing.assert_close(cs[:, :, c], state, **F32_TOL)
    torch.testing.assert_close(last, cs[:, :, -1])
    assert last.data_ptr() != cs.data_ptr()


# --------------------------------------------------------------------------
# bi_selective_scan_fwd, and its backward as two selective_scan_bwd calls
# --------------------------------------------------------------------------


@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize("L,chunk_len", [(17, 8), (16, 16)])
def test_bi_scan(has_z, L, chunk_len):
    """The fused two-direction launcher across chunks (float16: the conformance specs)."""
    dtype = torch.float32
    f = make_inputs(batch=2, dim=4, N=5, L=L, B_kind="var", C_kind="var", dtype=dtype,
                    has_z=has_z, seed=21)
    # Reverse direction: different parameters, grouped B and constant C.
    r = make_inputs(batch=2, dim=4, N=5, L=L, B_kind="group", C_kind="const", dtype=dtype,
                    has_z=False, seed=22)
    z = f["z"]
    fwd_args = [_to_launcher(f[k]) if k in "BC" else f[k] for k in _ORDER]
    rev_args = [_to_launcher(r[k]) if k in "BC" else r[k] for k in _ORDER]
    u, delta, A, B, C, D, _, delta_bias = fwd_args
    u_b, delta_b, A_b, B_b, C_b, D_b, _, delta_bias_b = rev_args
    out, cs, cs_b = ss.bi_selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                             u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
                                             True, chunk_len)

    # Reference on fp32 leaves (same rounded values), Vim's flip formulation.
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias",
             "u_b", "delta_b", "A_b", "B_b", "C_b", "D_b", "delta_bias_b"]
    values = [f[k] for k in _ORDER] + [r[k] for k in _ORDER if k != "z"]
    leaves = {n: (None if v is None else v.detach().float().requires_grad_())
              for n, v in zip(names, values)}
    ref = bi_selective_scan_ref(*(leaves[n] for n in names), delta_softplus=True)
    tol = F32_TOL if dtype == torch.float32 else LOW_TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **tol)

    # The checkpoints are those of the two single-direction scans.
    _, _, cs1 = ss.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, True, False, chunk_len)
    _, _, cs2 = ss.selective_scan_fwd(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b,
                                      True, True, chunk_len)
    torch.testing.assert_close(cs, cs1, **F32_TOL)
    torch.testing.assert_close(cs_b, cs2, **F32_TOL)

    # Backward as the lead composes it: one bwd per direction, dz summed.
    dout = torch.randn(out.shape).to(dtype)
    ref.backward(dout.float())
    g1 = ss.selective_scan_bwd(dout, None, u, delta, A, B, C, D, z, delta_bias, cs,
                               True, False, chunk_len)
    g2 = ss.selective_scan_bwd(dout, None, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b, cs_b,
                               True, True, chunk_len)
    if z is not None:
        dz = (g1[6].float() + g2[6].float()).to(dtype)
    else:
        dz = torch.empty(0)
    f_ref = {k: (leaves[k].grad if leaves[k] is not None else None) for k in _ORDER}
    r_ref = {k: leaves[k + "_b"].grad for k in _ORDER if k != "z"}
    r_ref["z"] = f_ref["z"]
    assert_grads(g1[:6] + (dz,) + g1[7:], f_ref, f, dtype)
    r_inp = dict(r, z=z)
    assert_grads(g2[:6] + (dz,) + g2[7:], r_ref, r_inp, dtype)


# --------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------


@triton.jit
def _softplus_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, ss._softplus(x), mask=offs < n)


def test_softplus_matches_torch():
    """log1p accuracy for very negative inputs and the threshold at 20, which the
    scans above cannot resolve (their effect there is below the tolerance)."""
    x = torch.cat([torch.linspace(-40, 40, 97), torch.tensor([19.999, 20.0, 20.001, 1e-3, -1e-3])])
    y = torch.empty_like(x)
    _softplus_kernel[(1,)](x, y, x.numel(), BLOCK=128)
    torch.testing.assert_close(y, torch.nn.functional.softplus(x), rtol=2e-6, atol=0)
