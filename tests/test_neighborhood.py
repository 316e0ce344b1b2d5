"""Neighborhood attention (na1d / na2d / na3d): the compiled CPU kernels against
the pure-PyTorch reference (and NATTEN where it is installed).

Covers every case of the window rule (borders, odd/even kernels, dilation
with L % d != 0, causal per axis, stride, rpb, GQA, head_dim_v != head_dim,
1-D/2-D/3-D, size-1 axes, empty batch), forward, lse and backward over random
shapes, float64 gradcheck (also through lse), opcheck, torch.compile, half
precision, non-contiguous inputs and clear errors for bad input. (Triton
kernels: their own interpreter tests; here only the backend='triton' wiring.)
"""

import random
import re

import pytest
import torch

from fastvision.ops import na1d, na2d, na3d
from fastvision.reference.neighborhood import axis_windows, neighborhood_attention_ref
from fastvision.testing import (assert_close, case_id, check_compile, check_gradcheck, check_opcheck,
                                import_triton_kernels_interpreted)

ops = torch.ops.fastvision
NA = {1: na1d, 2: na2d, 3: na3d}


def make_case(rng: random.Random, nd: int) -> dict:
    """A random legal configuration with nd spatial axes."""
    spatial, ks, ds, ss, cs = [], [], [], [], []
    causal_ok = rng.random() < 0.35
    for _ in range(nd):
        k = rng.choice([1, 2, 3, 4, 5] if nd == 3 else [2, 3, 4, 5, 6, 7])
        d = rng.choice([1, 1, 2, 3])
        L = k * d + rng.choice([0, 1, 2, 3, 5, 8] if nd < 3 else [0, 1, 2, 3])
        spatial.append(L)
        ks.append(k)
        ds.append(d)
        ss.append(rng.choice([1, 1, rng.randint(1, k)]))
        cs.append(causal_ok and rng.random() < 0.6)
    Hkv = rng.choice([1, 2])
    H = Hkv * rng.choice([1, 2])
    D = rng.choice([4, 8, 16, 32])
    rpb = not any(cs) and all(s == 1 for s in ss) and rng.random() < 0.5
    return dict(nd=nd, batch=rng.choice([1, 2]), spatial=tuple(spatial), kernel_size=tuple(ks),
                dilation=tuple(ds), stride=tuple(ss), is_causal=tuple(cs), heads=H, kv_heads=Hkv,
                head_dim=D, head_dim_v=rng.choice([D, D, 8]), rpb=rpb)


def edge(nd, spatial, kernel_size, dilation=None, stride=None, is_causal=None, **kw):
    c = dict(nd=nd, batch=2, spatial=spatial, kernel_size=kernel_size, dilation=dilation or (1,) * nd,
             stride=stride or (1,) * nd, is_causal=is_causal or (False,) * nd, heads=2, kv_heads=2,
             head_dim=8, head_dim_v=8, rpb=False)
    c.update(kw)
    return c


EDGE = [
    edge(1, (13,), (5,)),                                          # odd kernel, both borders
    edge(1, (13,), (4,), rpb=True),                                # even kernel + rpb
    edge(1, (9,), (9,)),                                           # window = whole axis
    edge(1, (13,), (4,), (3,)),                                    # dilation, 13 % 3 != 0
    edge(1, (14,), (3,), (4,), rpb=True),                          # dilation + rpb, uneven groups
    edge(1, (12,), (4,), (3,), rpb=True, heads=4, kv_heads=1),     # rpb + MQA
    edge(1, (11,), (4,), is_causal=(True,)),                       # causal, even kernel
    edge(1, (17,), (5,), (2,), (3,), (True,)),                     # causal + dilation + stride
    edge(1, (15,), (4,), stride=(4,)),                             # stride == kernel
    edge(1, (16,), (6,), (2,), (4,)),                              # even kernel, stride, dilation
    edge(1, (1,), (1,)),                                           # size-1 axis (kernel 1)
    edge(1, (13,), (5,), batch=0),                                 # empty batch
    edge(1, (10,), (3,), heads=6, kv_heads=2, head_dim=16, head_dim_v=4),  # GQA, Dv < D
    edge(2, (9, 11), (3, 4), (2, 1), (1, 2), (False, True)),       # causal on one axis only
    edge(2, (9, 11), (3, 4), (2, 2), rpb=True),                    # 2-D rpb with dilation
    edge(2, (7, 7), (7, 7), rpb=True),                             # kernel == size: all borders
    edge(2, (1, 8), (1, 3), rpb=True),                             # size-1 axis with rpb
    edge(2, (8, 10), (2, 5), (4, 2), (2, 3), (True, True)),        # causal both, kernel * dil == L
    edge(2, (6, 9), (3, 3), batch=0, rpb=True),                    # empty batch with rpb
    edge(3, (5, 6, 7), (2, 3, 3), (2, 1, 2), (2, 1, 3), (True, False, False)),
    edge(3, (5, 6, 7), (3, 2, 3), (1, 3, 2), rpb=True, heads=4, kv_heads=2, head_dim_v=16),
    edge(3, (4, 1, 6), (3, 1, 4), (1, 1, 1), (3, 1, 2), (False, False, True)),  # size-1 middle axis
    # Head dims with compile-time kernels (16, 32, 64, 128) and others, with
    # windows longer and shorter than the 8-row blocks of the dot products.
    edge(2, (9, 10), (3, 5), (2, 1), rpb=True, head_dim=32, head_dim_v=32, heads=4, kv_heads=2),
    edge(1, (40,), (13,), (2,), head_dim=64, head_dim_v=64, heads=3, kv_heads=1),
    edge(2, (7, 8), (2, 3), (1, 2), (2, 1), (True, False), head_dim=128, head_dim_v=128, heads=1, kv_heads=1),
    edge(1, (21,), (7,), (3,), rpb=True, head_dim=16, head_dim_v=16),
    edge(2, (8, 9), (3, 3), head_dim=48, head_dim_v=48),
    edge(1, (30,), (11,), head_dim=256, head_dim_v=256, heads=1, kv_heads=1, batch=1),
    edge(2, (6, 6), (3, 3), head_dim=32, head_dim_v=64),  # mixed: runtime head dims
]

_rng = random.Random(1)
RANDOM = [make_case(_rng, nd) for nd in (1, 2, 3) for _ in range(8 if nd < 3 else 6)]
CASES = EDGE + RANDOM


def make_inputs(c, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
        return t.requires_grad_() if requires_grad else t

    B, sp = c["batch"], c["spatial"]
    q = rnd(B, *sp, c["heads"], c["head_dim"])
    k = rnd(B, *sp, c["kv_heads"], c["head_dim"])
    v = rnd(B, *sp, c["kv_heads"], c["head_dim_v"])
    rpb = rnd(c["heads"], *(2 * x - 1 for x in c["kernel_size"])) if c["rpb"] else None
    return q, k, v, rpb


def call(fn, c, q, k, v, rpb, **kw):
    return fn(q, k, v, c["kernel_size"], stride=c["stride"], dilation=c["dilation"], is_causal=c["is_causal"],
              rpb=rpb, return_lse=True, **kw)


def weighted_loss(out, lse):
    """A loss whose gradient differs at every output element and reaches lse too."""
    w = torch.linspace(-1.5, 2.0, out.numel(), dtype=torch.float64).view_as(out)
    wl = torch.linspace(0.7, -1.2, lse.numel(), dtype=torch.float64).view_as(lse)
    return (out.double() * w).sum() + (lse.double() * wl).sum()


def grads_of(fn, c, dtype=torch.float32, **kw):
    q, k, v, rpb = make_inputs(c, dtype, requires_grad=True)
    out, lse = call(fn, c, q, k, v, rpb, **kw)
    leaves = [t for t in (q, k, v, rpb) if t is not None]
    return out, lse, torch.autograd.grad(weighted_loss(out, lse), leaves)


def _ref(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, *, rpb=None,
         return_lse=False):
    """The reference with the public functions' (NATTEN's) argument order."""
    return neighborhood_attention_ref(q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, return_lse)


@pytest.mark.parametrize("c", CASES, ids=[f"{i}-" + case_id({k: v for k, v in c.items() if k != "nd"})
                                          for i, c in enumerate(CASES)])
def test_forward_lse_backward_match_reference(c):
    fn = NA[c["nd"]]
    out, lse, grads = grads_of(fn, c)
    if c["batch"] == 0:  # the reference cannot reshape empty tensors: shapes only
        q, k, v, rpb = make_inputs(c)
        assert out.shape == (*q.shape[:-1], v.shape[-1]) and lse.shape == q.shape[:-1]
        assert [g.shape for g in grads] == [t.shape for t in (q, k, v, rpb) if t is not None]
        return
    ref, ref_lse, ref_grads = grads_of(_ref, c)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_close(out, ref, msg="out")
    assert_close(lse, ref_lse, msg="lse")
    for name, g, rg in zip("qkvr", grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == rg.dtype
        assert_close(g, rg, torch.float32, scale=20, msg=f"d{name}")


def test_window_tables_cover_every_rule_case():
    """The reference's rule tables: full-size windows unless causal, every query in its own
    window (stride 1), and the inverse relation is what the kernel's key pass walks."""
    for L, k, d, s, causal in [(13, 4, 3, 1, False), (17, 5, 2, 3, True), (9, 9, 1, 1, False),
                               (16, 6, 2, 4, False), (11, 4, 1, 1, True)]:
        idx, ok = axis_windows(L, k, d, s, causal)
        if not causal:
            assert ok.all()
        assert ok.any(1).all()  # no empty window
        assert ((idx % d) == (torch.arange(L) % d)[:, None])[ok].all()  # same dilation group
        if s == 1:
            assert (idx == torch.arange(L)[:, None]).logical_and(ok).any(1).all()


def test_gqa_equals_repeated_heads():
    c = edge(2, (7, 8), (3, 3), heads=6, kv_heads=2)
    q, k, v, _ = make_inputs(c)
    out = na2d(q, k, v, 3)
    rep = na2d(q, k.repeat_interleave(3, dim=-2), v.repeat_interleave(3, dim=-2), 3)
    assert_close(out, rep)


def test_scale_and_defaults():
    c = edge(1, (12,), (5,), head_dim=16)
    q, k, v, _ = make_inputs(c)
    assert_close(na1d(q, k, v, 5), _ref(q, k, v, 5))
    assert_close(na1d(q, k, v, 5, scale=0.3), _ref(q, k, v, 5, scale=0.3))
    out = na1d(q, k, v, 5, scale=0.3)
    assert isinstance(out, torch.Tensor)
    # A window as large as the axis is plain attention.
    full = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2)).transpose(1, 2)
    assert_close(na1d(q, k, v, 12), full)


@pytest.mark.parametrize("c", [
    edge(1, (7,), (3,), (2,), rpb=True, head_dim=3, head_dim_v=2, batch=1),
    edge(2, (5, 6), (3, 2), (1, 2), (1, 2), (False, True), heads=2, kv_heads=1, head_dim=3,
         head_dim_v=4, batch=1),
    edge(3, (2, 3, 4), (2, 2, 3), (1, 1, 1), rpb=True, heads=1, kv_heads=1, head_dim=2, head_dim_v=3,
         batch=1),
], ids=["1d-rpb-dil", "2d-causal-stride-gqa", "3d-rpb"])
def test_gradcheck_float64(c):
    """Gradients for query, key, value, rpb, through out and through lse."""
    q, k, v, rpb = make_inputs(c, torch.float64, requires_grad=True)
    fn = NA[c["nd"]]
    leaves = [t for t in (q, k, v, rpb) if t is not None]

    def f(*t):
        r = t[3] if len(t) == 4 else None
        return call(fn, c, t[0], t[1], t[2], r)

    check_gradcheck(f, leaves)
    check_gradcheck(lambda *t: f(*t)[1], leaves)  # lse alone: out gets no gradient


def test_float64_kernel_accumulates_in_float64():
    c = edge(2, (6, 7), (3, 3), rpb=True)
    q, k, v, rpb = make_inputs(c, torch.float64)
    out, lse = call(na2d, c, q, k, v, rpb)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    # Same math in float64 through dense attention with the window as a mask.
    ref, ref_lse = call(_ref, c, q, k, v, rpb)
    assert_close(out, ref.double(), torch.float32)
    assert_close(lse, ref_lse.double(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_float32_reference(dtype):
    c = edge(2, (10, 9), (5, 3), (2, 1), rpb=True, heads=4, kv_heads=2, head_dim=32, head_dim_v=16)
    q, k, v, rpb = make_inputs(c, dtype, requires_grad=True)
    out, lse = call(na2d, c, q, k, v, rpb)
    assert out.dtype == dtype and lse.dtype == torch.float32
    t32 = [t.detach().float().requires_grad_() for t in (q, k, v, rpb)]
    ref, ref_lse = call(_ref, c, *t32)
    assert_close(out, ref.to(dtype), dtype, scale=2)
    assert_close(lse, ref_lse, dtype)
    grads = torch.autograd.grad(weighted_loss(out, lse), (q, k, v, rpb))
    ref_grads = torch.autograd.grad(weighted_loss(ref, ref_lse), t32)
    for x, g, rg in zip((q, k, v, rpb), grads, ref_grads):
        assert g.dtype == x.dtype
        assert_close(g.float(), rg, dtype, scale=4)


def test_rpb_float32_with_half_inputs():
    c = edge(1, (12,), (5,), rpb=True)
    q, k, v, rpb = make_inputs(c, torch.bfloat16)
    rpb32 = rpb.float().requires_grad_()
    out = na1d(q, k, v, 5, rpb=rpb32)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert rpb32.grad.dtype == torch.float32


def test_noncontiguous_inputs_work():
    c = edge(2, (8, 9), (3, 5), (2, 1), rpb=True, heads=4, kv_heads=4)
    q, k, v, rpb = make_inputs(c)

    def nc(t):  # same values, other strides
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    qs = torch.randn(2, 4, 8, 9, 8).permute(0, 2, 3, 1, 4)  # heads-first storage
    qs.copy_(q)
    assert not qs.is_contiguous() and not nc(k).is_contiguous()
    out = na2d(qs, nc(k), nc(v), (3, 5), dilation=(2, 1), rpb=nc(rpb))
    assert_close(out, _ref(q, k, v, (3, 5), dilation=(2, 1), rpb=rpb))
    q2 = qs.detach().requires_grad_()
    na2d(q2, k, v, (3, 5), dilation=(2, 1)).sum().backward()
    assert q2.grad.shape == q.shape


def test_lse_merges_two_attentions():
    """Two attentions over disjoint key sets merge exactly through their lse (the use of return_lse)."""
    c = edge(1, (16,), (4,))
    q, k, v, _ = make_inputs(c)
    k2, v2 = torch.randn_like(k), torch.randn_like(v)
    o1, l1 = na1d(q, k, v, 4, return_lse=True)
    o2, l2 = na1d(q, k2, v2, 4, return_lse=True)
    w = torch.sigmoid(l1 - l2)[..., None]
    merged = w * o1 + (1 - w) * o2
    # Reference: one softmax over the union of both windows.
    idx, _ = axis_windows(16, 4)
    kk = torch.cat([k[:, idx], k2[:, idx]], 2)  # (B, L, 8, H, D)
    vv = torch.cat([v[:, idx], v2[:, idx]], 2)
    s = torch.einsum("blhd,blwhd->blhw", q, kk) * 8 ** -0.5
    ref = torch.einsum("blhw,blwhd->blhd", s.softmax(-1), vv)
    assert_close(merged, ref)
    assert_close(torch.logaddexp(l1, l2), s.logsumexp(-1))


def test_backward_is_deterministic():
    """Run twice (big enough for several threads): bitwise equal, rpb gradient included."""
    c = edge(2, (24, 26), (5, 7), (2, 1), rpb=True, heads=4, kv_heads=2, head_dim=16, head_dim_v=16, batch=1)
    runs = [grads_of(na2d, c) for _ in range(2)]
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)


def test_empty_batch_backward():
    c = edge(2, (6, 5), (3, 3), batch=0, rpb=True)
    q, k, v, rpb = make_inputs(c, requires_grad=True)
    out, lse = call(na2d, c, q, k, v, rpb)
    assert out.shape == (0, 6, 5, 2, 8) and lse.shape == (0, 6, 5, 2)
    (out.sum() + lse.sum()).backward()
    assert torch.count_nonzero(rpb.grad) == 0


def test_opcheck_both_ops():
    for c in (edge(2, (6, 7), (3, 2), (2, 1), rpb=True, heads=4, kv_heads=2, head_dim_v=4),
              edge(1, (9,), (4,), (2,), (2,), (True,))):
        q, k, v, rpb = make_inputs(c, requires_grad=True)
        flags = (list(c["kernel_size"]), list(c["dilation"]), list(c["stride"]), list(c["is_causal"]), 0.4)
        check_opcheck(ops.na_fwd.default, (q, k, v, rpb, *flags))
        out, lse = ops.na_fwd(q.detach(), k.detach(), v.detach(), rpb.detach() if rpb is not None else None,
                              *flags)
        d = [t.detach() if isinstance(t, torch.Tensor) else t for t in (q, k, v, rpb)]
        for dlse in (torch.randn_like(lse), None):
            check_opcheck(ops.na_bwd.default, (torch.randn_like(out), dlse, *d, out, lse, *flags))


def test_torch_compile_fullgraph():
    c = edge(2, (7, 8), (3, 3), (2, 1), rpb=True)
    q, k, v, rpb = make_inputs(c)

    def fn(q, k, v, rpb):
        out, lse = na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, return_lse=True)
        return out * 2 + 1, lse

    check_compile(fn, (q, k, v, rpb))


def test_double_backward_raises():
    c = edge(1, (8,), (3,))
    q, k, v, _ = make_inputs(c, requires_grad=True)
    (gq,) = torch.autograd.grad(na1d(q, k, v, 3).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gq.sum().backward()


def test_reference_backend_and_backend_errors():
    c = edge(2, (6, 7), (3, 3), rpb=True)
    q, k, v, rpb = make_inputs(c)
    assert torch.equal(na2d(q, k, v, 3, rpb=rpb, backend="reference"),
                       _ref(q, k, v, 3, rpb=rpb))
    assert_close(na2d(q, k, v, 3, rpb=rpb, backend="cpu"), na2d(q, k, v, 3, rpb=rpb, backend="reference"))
    with pytest.raises(ValueError, match="backend must be one of"):
        na2d(q, k, v, 3, backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        na2d(q, k, v, 3, backend="cuda")


@pytest.mark.triton
def test_triton_backend_wiring_under_interpreter():
    """backend='triton' on CPU tensors (Triton interpreter): forward, lse and gradients."""
    import_triton_kernels_interpreted("fastvision.triton.neighborhood")
    c = edge(2, (5, 6), (3, 2), (1, 2), rpb=True, heads=2, kv_heads=1, head_dim=16, head_dim_v=16)
    out, lse, grads = grads_of(na2d, c, backend="triton")
    ref, ref_lse, ref_grads = grads_of(_ref, c)
    assert_close(out, ref, scale=5)
    assert_close(lse, ref_lse, scale=5)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float32, scale=50)


# --------------------------------------------------------------------------
# NATTEN as a second oracle (skipped where it is not installed; forward only:
# its CPU backend, Flex Attention, has no backward on CPU).


NATTEN_CASES = [
    edge(1, (17,), (5,), (3,), (2,), (True,), head_dim=16, head_dim_v=16),
    edge(1, (15,), (4,), (2,), head_dim=16, head_dim_v=16),
    edge(2, (9, 11), (3, 4), (2, 1), (1, 2), (False, True), head_dim=16, head_dim_v=16),
    edge(2, (8, 10), (2, 5), (4, 2), (2, 3), (True, False), head_dim=16, head_dim_v=16),
    edge(3, (5, 6, 7), (2, 3, 3), (2, 1, 2), (2, 1, 3), (True, False, False), head_dim=16, head_dim_v=16),
]


@pytest.mark.parametrize("c", NATTEN_CASES, ids=lambda c: f"{c['nd']}d-k{c['kernel_size']}-d{c['dilation']}"
                                                            f"-s{c['stride']}-c{c['is_causal']}")
def test_matches_natten(c):
    """Forward and lse (NATTEN's CPU Flex backend has no backward)."""
    natten = pytest.importorskip("natten")
    nat_fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[c["nd"]]
    q, k, v, _ = make_inputs(c)
    kw = dict(kernel_size=c["kernel_size"], dilation=c["dilation"], stride=c["stride"],
              is_causal=c["is_causal"])
    out, lse = NA[c["nd"]](q, k, v, **kw, return_lse=True)
    nat, nat_lse = nat_fn(q, k, v, **kw, return_lse=True)
    assert_close(out, nat, scale=5)
    assert_close(lse, nat_lse.float(), scale=5)


# --------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, never a crash.


def _bad(nd=2, **overrides):
    c = edge(2, (6, 7), (3, 3), rpb=True, heads=4, kv_heads=2)
    q, k, v, rpb = make_inputs(c)
    args = dict(query=q, key=k, value=v, kernel_size=3, rpb=rpb)
    args.update(overrides)
    return args


BAD_CASES = [
    (dict(kernel_size=4, dilation=2), ValueError, "on spatial axis 0 (dim 1 of query, length 6)"),
    (dict(kernel_size=(3, 8), rpb=None), ValueError, "on spatial axis 1 (dim 2 of query, length 7)"),
    (dict(query=torch.randn(2, 6, 7, 32)), ValueError, "query must be a 5-D tensor (batch, H, W, heads, head_dim)"),
    (dict(key=torch.randn(2, 6, 7, 2)), ValueError, "key must be a 5-D tensor"),
    (dict(key=torch.randn(2, 6, 7, 3, 8), value=torch.randn(2, 6, 7, 3, 8)), ValueError, "must divide"),
    (dict(value=torch.randn(2, 6, 7, 1, 8)), ValueError, "key and value must have the same number of heads"),
    (dict(key=torch.randn(2, 6, 7, 2, 4)), ValueError, "key's head_dim must equal query's"),
    (dict(key=torch.randn(2, 7, 6, 2, 8)), ValueError, "key and value must have query's batch and spatial"),
    (dict(rpb=torch.randn(4, 5, 4)), ValueError, "rpb must have shape"),
    (dict(rpb=torch.randn(2, 5, 5)), ValueError, "rpb must have shape"),
    (dict(is_causal=(True, False)), ValueError, "rpb (relative positional bias) cannot be combined with is_causal"),
    (dict(stride=2), ValueError, "rpb (relative positional bias) needs stride 1"),
    (dict(stride=4, rpb=None), ValueError, "stride must not exceed kernel_size"),
    (dict(kernel_size=0, rpb=None), ValueError, "must be >= 1"),
    (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size must be an int or a tuple of 2"),
    (dict(dilation=1.5), TypeError, "dilation must be an int"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
    (dict(query=torch.randint(0, 3, (2, 6, 7, 4, 8))), TypeError, "query must have dtype"),
    (dict(key=torch.randn(2, 6, 7, 2, 8, dtype=torch.float64)), TypeError, "key must have dtype"),
    (dict(rpb=torch.randn(4, 5, 5, dtype=torch.float64)), TypeError, "rpb must have dtype"),
    (dict(value=torch.randn(2, 6, 7, 2, 8, device="meta")), ValueError, "one device"),
    (dict(query=[1.0]), TypeError, "query must be a torch.Tensor"),
    (dict(scale="big"), TypeError, "scale must be a float"),
]


@pytest.mark.parametrize("overrides,exc,match", BAD_CASES, ids=[m for _, _, m in BAD_CASES])
def test_bad_inputs_raise_clear_errors(overrides, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        na2d(**_bad(**overrides))


def test_wrong_function_for_rank():
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match=r"na2d: query must be a 5-D tensor"):
        na2d(q, q, q, 3)
    with pytest.raises(ValueError, match=r"na3d: query must be a 6-D tensor"):
        na3d(q, q, q, 3)


def test_direct_op_call_checks_do_not_crash():
    """The compiled ops check their own arguments (ValueError "fastvision.<op>: ...", never a crash)."""
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"fastvision.na_fwd: kernel_size\[0\] \* dilation\[0\]"):
        ops.na_fwd(q, q, q, None, [5], [2], [1], [False], 1.0)
    with pytest.raises(ValueError, match="needs stride 1"):
        ops.na_fwd(q, q, q, torch.randn(2, 5), [3], [1], [2], [False], 1.0)
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        ops.na_fwd(q, q, q, None, [3, 3], [1], [1], [False], 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        ops.na_fwd(q.transpose(1, 2), q, q, None, [1], [1], [1], [False], 1.0)
    out, lse = ops.na_fwd(q, q, q, None, [3], [1], [1], [False], 1.0)
    with pytest.raises(ValueError, match="lse must be"):
        ops.na_bwd(out, None, q, q, q, None, out, lse.double(), [3], [1], [1], [False], 1.0)
