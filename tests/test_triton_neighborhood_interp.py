"""Neighborhood-attention Triton kernels' tiling, on CPU under TRITON_INTERPRET=1.

The launchers ``na_fwd`` / ``na_bwd`` are called directly with small tiles (16
elements) so that every case crosses several query tiles and key blocks: every
window-rule case, rpb, GQA and padded head dims across tile borders. Reference
gradients come from torch.autograd through ``neighborhood_attention_ref`` (fp32)
with a loss that has both an out and an lse term. Also the host-side tile
heuristics. backend="triton" through the public API (default tiles, float16,
no lse, empty batch) runs on the specs in tests/conformance/neighborhood.py.
Run alone with ``pytest -m triton``.
"""

import math

import pytest
import torch

from fastvision.testing import import_triton_kernels_interpreted

na = import_triton_kernels_interpreted("fastvision.triton.neighborhood")
from fastvision.reference.neighborhood import axis_windows, neighborhood_attention_ref

pytestmark = pytest.mark.triton

F32_TOL = dict(rtol=1e-4, atol=1e-4)
F16_TOL = dict(rtol=1e-2, atol=1e-2)

# Smallest tiles tl.dot accepts: 16 elements, shaped per axis count.
SMALL_TILE = {1: (16,), 2: (4, 4), 3: (2, 2, 4)}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _tuple(v, nd):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def run_case(spatial, kernel_size, dilation=1, stride=1, is_causal=False, *, heads=1, kv_heads=None,
             head_dim=16, head_dim_v=None, rpb=False, dtype=torch.float32, batch=1, with_dlse=True,
             tiles="small", seed=0):
    """Forward and backward through the launchers vs the reference; asserts everything."""
    nd = len(spatial)
    ks, ds, ss, cs = (_tuple(kernel_size, nd), _tuple(dilation, nd), _tuple(stride, nd),
                      _tuple(is_causal, nd))
    kv_heads = kv_heads or heads
    head_dim_v = head_dim_v or head_dim
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, *spatial, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, *spatial, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, *spatial, kv_heads, head_dim_v, generator=g).to(dtype)
    bias = torch.randn(heads, *[2 * x - 1 for x in ks], generator=g) if rpb else None
    scale = head_dim ** -0.5
    tile_kw = dict(q_tile=SMALL_TILE[nd], k_tile=SMALL_TILE[nd]) if tiles == "small" else {}

    out, lse = na.na_fwd(q, k, v, bias, ks, ds, ss, cs, scale, **tile_kw)

    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    bias_leaf = bias.clone().requires_grad_() if rpb else None
    ref_out, ref_lse = neighborhood_attention_ref(*leaves, ks, ds, ss, cs, rpb=bias_leaf, scale=scale,
                                                  return_lse=True)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dlse = torch.randn(lse.shape, generator=g) if with_dlse else None
    torch.autograd.backward([ref_out.float(), ref_lse],
                            [dout.float(), dlse if with_dlse else torch.zeros_like(ref_lse)])

    tol = F32_TOL if dtype == torch.float32 else F16_TOL
    assert out.shape == (batch, *spatial, heads, head_dim_v) and out.dtype == dtype
    assert lse.shape == (batch, *spatial, heads) and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)

    dq, dk, dv, drpb = na.na_bwd(dout, dlse, q, k, v, bias, out, lse, ks, ds, ss, cs, scale, **tile_kw)
    for name, got, x, ref in (("dq", dq, q, leaves[0].grad), ("dk", dk, k, leaves[1].grad),
                              ("dv", dv, v, leaves[2].grad)):
        assert got.shape == x.shape and got.dtype == dtype, name
        torch.testing.assert_close(got.float(), ref, **tol, msg=lambda m, n=name: f"{n}: {m}")
    if rpb:
        assert drpb.shape == bias.shape and drpb.dtype == torch.float32
        torch.testing.assert_close(drpb, bias_leaf.grad, **tol, msg=lambda m: f"drpb: {m}")
    else:
        assert drpb.numel() == 0


# --------------------------------------------------------------------------
# 1-D: every rule case (odd/even k, borders, dilation with L % d != 0, stride, causal)
# --------------------------------------------------------------------------

CASES_1D = [
    # L, k, d, s, causal
    (13, 5, 1, 1, False),
    (13, 4, 1, 1, False),   # even kernel
    (13, 13, 1, 1, False),  # window = whole axis
    (16, 3, 1, 1, False),
    (13, 3, 4, 1, False),   # dilation, 13 % 4 != 0
    (14, 4, 3, 1, False),   # even kernel, dilation, 14 % 3 != 0
    (9, 3, 3, 1, False),    # k * d == L: every window touches a border
    (13, 5, 1, 2, False),   # stride
    (17, 4, 2, 3, False),   # even kernel, stride 3 (> k // 2), dilation
    (20, 5, 1, 5, False),   # stride == kernel
    (13, 5, 1, 1, True),    # causal
    (13, 4, 2, 1, True),    # causal, even kernel, dilation
    (19, 5, 2, 3, True),    # causal, stride, dilation, L % d != 0
    (18, 6, 1, 6, True),    # causal, stride == kernel
]


@pytest.mark.parametrize("L,k,d,s,causal", CASES_1D)
def test_1d(L, k, d, s, causal):
    run_case((L,), k, d, s, causal, seed=L * 31 + k)


# --------------------------------------------------------------------------
# 2-D and 3-D: per-axis mixes
# --------------------------------------------------------------------------

CASES_2D = [
    # spatial, k, d, s, causal
    ((9, 11), (3, 4), (1, 1), (1, 1), (False, False)),
    ((9, 11), (3, 4), (2, 1), (1, 2), (False, True)),
    ((10, 7), (4, 3), (2, 2), (1, 1), (False, False)),   # 7 % 2 != 0
    ((8, 9), (3, 3), (1, 3), (2, 1), (True, False)),
    ((7, 12), (5, 2), (1, 5), (2, 2), (True, True)),
    ((6, 6), (6, 3), (1, 2), (1, 3), (False, False)),    # window = whole axis 0
]


@pytest.mark.parametrize("spatial,k,d,s,causal", CASES_2D)
def test_2d(spatial, k, d, s, causal):
    run_case(spatial, k, d, s, causal, seed=sum(spatial))


CASES_3D = [
    ((4, 6, 7), (3, 2, 3), (1, 2, 2), (1, 1, 1), (False, False, False)),
    ((5, 4, 7), (2, 3, 3), (2, 1, 2), (2, 1, 3), (True, False, False)),
    ((4, 5, 6), (2, 3, 4), (1, 1, 1), (1, 2, 1), (False, True, True)),
]


@pytest.mark.parametrize("spatial,k,d,s,causal", CASES_3D)
def test_3d(spatial, k, d, s, causal):
    run_case(spatial, k, d, s, causal, seed=sum(k))


# --------------------------------------------------------------------------
# rpb, GQA, Dv != D, head dims
# --------------------------------------------------------------------------

CASES_RPB = [
    ((13,), 5, 1),
    ((14,), 4, 3),
    ((9, 11), (3, 4), (2, 1)),
    ((8, 7), (4, 4), (1, 1)),
    ((4, 5, 6), (3, 2, 3), (1, 2, 2)),
]


@pytest.mark.parametrize("spatial,k,d", CASES_RPB)
def test_rpb(spatial, k, d):
    """rpb (stride 1, non-causal) and its gradient, summed over batch and positions."""
    run_case(spatial, k, d, rpb=True, heads=2, batch=2 if len(spatial) < 3 else 1, seed=len(spatial))


@pytest.mark.parametrize("heads,kv_heads,D,Dv", [(4, 2, 16, 32), (4, 1, 8, 16), (3, 3, 48, 8), (2, 1, 48, 48)])
def test_gqa_head_dims(heads, kv_heads, D, Dv):
    """GQA (kv heads shared by several query heads: dk/dv sum over them),
    head dims 8 and 48 (padded to 16 and 64), Dv != D."""
    run_case((9, 10), (3, 4), (2, 1), (1, 2), (False, True), heads=heads, kv_heads=kv_heads,
             head_dim=D, head_dim_v=Dv, seed=D + Dv)


def test_gqa_rpb_3d():
    run_case((3, 4, 6), (3, 3, 2), (1, 1, 2), heads=2, kv_heads=1, head_dim=8, head_dim_v=48, rpb=True)


# --------------------------------------------------------------------------
# host-side pieces: tile heuristics and the query-region search's premise
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ext,nd,block", [((1, 1, 8192), 1, 64), ((1, 56, 56), 2, 64), ((56, 56, 56), 3, 32),
                                          ((1, 1, 3), 1, 64), ((1, 7, 2), 2, 64), ((2, 2, 2), 3, 64)])
def test_tile_heuristics(ext, nd, block):
    tq = na._query_tile(ext, nd, block)
    assert all(t & (t - 1) == 0 for t in tq) and 16 <= math.prod(tq) <= max(block, 16)
    assert tq[:3 - nd] == [1] * (3 - nd)
    tk = na._key_tile([min(t + 6, e) for t, e in zip(tq, ext)], block)
    assert all(t & (t - 1) == 0 for t in tk) and 16 <= math.prod(tk) <= max(block, 16)


@pytest.mark.parametrize("causal", [False, True])
def test_window_monotone(causal):
    """The kernels' key regions and the dk/dv query search rely on start and end
    being non-decreasing in the query index (checked on the reference rule)."""
    for L in range(1, 24):
        for k in range(1, L + 1):
            for s in range(1, k + 1):
                index, valid = axis_windows(L, k, 1, s, causal)
                start, end = index[:, 0], index[:, 0] + valid.sum(1)
                assert (start.diff() >= 0).all() and (end.diff() >= 0).all(), (L, k, s)
