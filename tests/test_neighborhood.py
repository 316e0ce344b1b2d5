"""Neighborhood attention (na1d / na2d / na3d): what is particular to the family.

The generic checks (forward, lse and backward vs the reference over every case
of the window rule, half precision, float64 gradcheck, opcheck, torch.compile,
meta tensors, backends, non-contiguous inputs, bad input, Triton and GPU runs)
run on the specs in tests/conformance/neighborhood.py (tests/test_conformance.py).
Here: the window rule's tables, GQA as repeated heads, defaults, merging
attentions through lse, deterministic backward, NATTEN as a second oracle, and
direct calls of the compiled ops.
"""

import pytest
import torch
from conformance.neighborhood import NA, edge, make_inputs, na_reference

from fastvision.ops import na1d, na2d
from fastvision.reference.neighborhood import axis_windows
from fastvision.testing import assert_close

ops = torch.ops.fastvision


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
    q, k, v, *_ = make_inputs(c)
    out = na2d(q, k, v, 3)
    rep = na2d(q, k.repeat_interleave(3, dim=-2), v.repeat_interleave(3, dim=-2), 3)
    assert_close(out, rep)


def test_scale_and_defaults():
    c = edge(1, (12,), (5,), head_dim=16)
    q, k, v, *_ = make_inputs(c)
    out = na1d(q, k, v, 5)
    assert isinstance(out, torch.Tensor)  # return_lse=False by default
    assert_close(out, na_reference(q, k, v, 5, scale=16 ** -0.5))  # scale defaults to head_dim ** -0.5
    # A window as large as the axis is plain attention.
    full = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2)).transpose(1, 2)
    assert_close(na1d(q, k, v, 12), full)


def test_lse_merges_two_attentions():
    """Two attentions over disjoint key sets merge exactly through their lse (the use of return_lse)."""
    c = edge(1, (16,), (4,))
    q, k, v, *_ = make_inputs(c)
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
    runs = []
    for _ in range(2):
        q, k, v, rpb, *_ = make_inputs(c, requires_grad=True)
        out, lse = na2d(q, k, v, (5, 7), dilation=(2, 1), rpb=rpb, return_lse=True)
        w = torch.linspace(-1, 1, out.numel()).view_as(out)
        runs.append(torch.autograd.grad((out * w).sum() + lse.sum(), (q, k, v, rpb)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


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
    q, k, v, *_ = make_inputs(c)
    kw = dict(kernel_size=c["kernel_size"], dilation=c["dilation"], stride=c["stride"],
              is_causal=c["is_causal"])
    out, lse = NA[c["nd"]](q, k, v, **kw, return_lse=True)
    nat, nat_lse = nat_fn(q, k, v, **kw, return_lse=True)
    assert_close(out, nat, scale=5)
    assert_close(lse, nat_lse.float(), scale=5)


# --------------------------------------------------------------------------
# Direct calls of the compiled ops


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
