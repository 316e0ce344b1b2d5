"""Drop-in parity with NATTEN: positional order, additional keys/values, strided
layers, and scalars of any flavour (Python, numpy, 0-d tensors).

Code moved over from NATTEN must mean the same thing here: ``na2d(q, k, v, 5, 2, 1)``
is kernel 5, stride 2, dilation 1 in both libraries.
"""

import inspect

import numpy as np
import pytest
import torch

from fastvision.ops import (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D, na1d,
                            na2d, na3d)
from fastvision.reference.neighborhood import neighborhood_attention_ref
from fastvision.testing import assert_close, check_gradcheck

NA = {1: na1d, 2: na2d, 3: na3d}
LAYERS = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}

# natten.functional.na{1,2,3}d (NATTEN 0.21.7) up to its performance knobs, and
# natten.NeighborhoodAttention{1,2,3}D (embed_dim is called dim here, as in NAT).
NATTEN_FUNCTIONAL = ["query", "key", "value", "kernel_size", "stride", "dilation", "is_causal", "scale",
                     "additional_keys", "additional_values"]
NATTEN_LAYER = ["dim", "num_heads", "kernel_size", "stride", "dilation", "is_causal", "qkv_bias", "qk_scale",
                "proj_drop"]


def _positional(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"]


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_positional_order_is_nattens(nd):
    assert _positional(NA[nd]) == NATTEN_FUNCTIONAL
    sig = inspect.signature(NA[nd]).parameters
    assert (sig["stride"].default, sig["dilation"].default, sig["is_causal"].default) == (1, 1, False)
    assert all(sig[n].kind == inspect.Parameter.KEYWORD_ONLY for n in ("rpb", "return_lse", "backend"))
    assert _positional(LAYERS[nd].__init__)[:len(NATTEN_LAYER)] == NATTEN_LAYER


def test_positional_call_means_what_it_means_in_natten():
    q, k, v = (torch.randn(1, 12, 13, 2, 8) for _ in range(3))
    positional = na2d(q, k, v, 5, 2, 1)  # NATTEN: kernel 5, stride 2, dilation 1
    assert_close(positional, neighborhood_attention_ref(q, k, v, 5, dilation=1, stride=2))
    assert not torch.allclose(positional, neighborhood_attention_ref(q, k, v, 5, dilation=2, stride=1))
    scaled = na2d(q, k, v, 3, 1, 2, False, 0.25)
    assert_close(scaled, neighborhood_attention_ref(q, k, v, 3, dilation=2, scale=0.25))


def _extra(batch, n, heads, d, dv, dtype=torch.float32, requires_grad=False):
    ak = torch.randn(batch, n, heads, d, dtype=dtype, requires_grad=requires_grad)
    av = torch.randn(batch, n, heads, dv, dtype=dtype, requires_grad=requires_grad)
    return ak, av


ADDITIONAL_CASES = [
    # nd, spatial, kernel, stride, dilation, causal, heads, kv_heads, extra kv heads, n_extra, rpb
    (1, (13,), 5, 1, 2, False, 2, 2, 2, 3, True),
    (1, (11,), 4, 2, 1, True, 4, 2, 1, 1, False),
    (2, (7, 9), (3, 5), 1, (2, 1), False, 4, 1, 2, 6, True),
    (2, (8, 8), 3, (2, 1), 1, (True, False), 2, 2, 2, 4, False),
    (3, (4, 5, 6), (2, 3, 3), 1, 1, False, 2, 1, 1, 2, False),
]


def _additional_case(case, dtype=torch.float32, requires_grad=False, batch=2, d=8, dv=6):
    nd, spatial, ks, ss, ds, cs, heads, kv_heads, extra_heads, n, with_rpb = case
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    q = rnd(batch, *spatial, heads, d)
    k = rnd(batch, *spatial, kv_heads, d)
    v = rnd(batch, *spatial, kv_heads, dv)
    ak, av = rnd(batch, n, extra_heads, d), rnd(batch, n, extra_heads, dv)
    kt = ks if isinstance(ks, tuple) else (ks,) * nd
    rpb = rnd(heads, *(2 * x - 1 for x in kt)) if with_rpb else None
    return dict(nd=nd, q=q, k=k, v=v, ak=ak, av=av, rpb=rpb, ks=ks, ss=ss, ds=ds, cs=cs)


def _run_additional(c, backend="auto"):
    return NA[c["nd"]](c["q"], c["k"], c["v"], c["ks"], c["ss"], c["ds"], c["cs"], None, c["ak"], c["av"],
                       rpb=c["rpb"], return_lse=True, backend=backend)


def _ref_additional(c):
    return neighborhood_attention_ref(c["q"], c["k"], c["v"], c["ks"], c["ds"], c["ss"], c["cs"], c["rpb"],
                                      return_lse=True, additional_keys=c["ak"], additional_values=c["av"])


@pytest.mark.parametrize("case", ADDITIONAL_CASES, ids=lambda c: f"{c[0]}d-k{c[2]}-s{c[3]}-d{c[4]}-c{c[5]}")
def test_additional_keys_one_softmax_with_the_window(case):
    """Forward, lse and every gradient against the reference, which puts the extra
    keys into the window's softmax directly (no merging)."""
    c = _additional_case(case, requires_grad=True)
    out, lse = _run_additional(c)
    ref, ref_lse = _ref_additional(c)
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    leaves = [c[n] for n in ("q", "k", "v", "ak", "av", "rpb") if c[n] is not None]
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    grads = torch.autograd.grad((out * w).sum() + lse.sum(), leaves)
    ref_grads = torch.autograd.grad((ref * w).sum() + ref_lse.sum(), leaves)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, scale=20)


def test_additional_keys_gradcheck_float64():
    small = (2, (4, 5), (3, 2), 1, (1, 2), False, 2, 1, 2, 2, True)
    c = _additional_case(small, torch.float64, requires_grad=True, batch=1, d=3, dv=2)
    names = ("q", "k", "v", "ak", "av", "rpb")

    def fn(*t):
        return _run_additional({**c, **dict(zip(names, t))})

    check_gradcheck(fn, [c[n] for n in names])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_additional_keys_half_precision(dtype):
    c = _additional_case(ADDITIONAL_CASES[0], dtype)
    out, lse = _run_additional(c)
    ref, ref_lse = _ref_additional(_additional_case(ADDITIONAL_CASES[0], torch.float32))
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref, dtype, scale=2)


def test_additional_keys_reference_backend_and_meta():
    c = _additional_case(ADDITIONAL_CASES[2])
    out, lse = _run_additional(c, backend="reference")
    fused, fused_lse = _run_additional(c)
    assert_close(fused, out)
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    mout, mlse = _run_additional(meta)
    assert mout.device.type == "meta" and mout.shape == out.shape and mlse.shape == lse.shape


@pytest.mark.parametrize("overrides,match", [
    (dict(av=None), "given together"),
    (dict(ak=torch.randn(2, 3, 2, 7)), "additional_keys must have shape"),
    (dict(ak=torch.randn(3, 3, 2, 8)), "additional_keys must have shape"),
    (dict(ak=torch.randn(2, 3, 3, 8), av=torch.randn(2, 3, 3, 6)), "kv_heads dividing heads"),
    (dict(av=torch.randn(2, 4, 2, 6)), "additional_values must have shape"),
    (dict(ak=torch.randn(2, 3, 2, 8, dtype=torch.float64)), "additional_keys must have dtype"),
])
def test_additional_keys_bad_input(overrides, match):
    c = {**_additional_case(ADDITIONAL_CASES[0]), **overrides}
    with pytest.raises((ValueError, TypeError), match=match):
        _run_additional(c)


def test_numpy_scalars_and_0d_tensors_wherever_python_scalars_are():
    q, k, v = (torch.randn(1, 9, 10, 2, 8) for _ in range(3))
    want = na2d(q, k, v, 3, 2, 2, True, 0.5, return_lse=True)
    for ks, ss, ds, causal, scale in [
        (np.int64(3), np.int32(2), np.int64(2), np.bool_(True), np.float32(0.5)),
        (torch.tensor(3), torch.tensor(2), torch.tensor(2), torch.tensor(True), torch.tensor(0.5)),
        ((np.int64(3), 3), np.array([2, 2]), torch.tensor([2, 2]), (np.bool_(True), True), 0.5),
    ]:
        got = na2d(q, k, v, ks, ss, ds, causal, scale, return_lse=np.bool_(True))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    layer = NeighborhoodAttention2D(np.int64(16), np.int64(2), np.int64(3), dilation=np.int64(2),
                                    qk_scale=np.float64(0.3), proj_drop=np.float32(0.0))
    assert layer.kernel_size == (3, 3) and layer.dilation == (2, 2) and isinstance(layer.scale, float)
    for bad in (np.float64(3.0), torch.tensor(3.0), True, "3"):
        with pytest.raises(TypeError, match="kernel_size"):
            na2d(q, k, v, bad)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_layers_take_stride(nd):
    spatial = {1: (12,), 2: (8, 9), 3: (6, 6, 7)}[nd]
    layer = LAYERS[nd](16, 2, 3, 2, 1, rel_pos_bias=False).eval()
    assert layer.stride == (2,) * nd
    x = torch.randn(2, *spatial, 16)
    q, k, v = layer.qkv(x).reshape(2, *spatial, 3, 2, 8).unbind(-3)
    attn = neighborhood_attention_ref(q, k, v, 3, stride=2).reshape(2, *spatial, 16)
    with torch.no_grad():
        assert_close(layer(x), layer.proj(attn))
    with pytest.raises(ValueError, match="needs stride 1"):
        LAYERS[nd](16, 2, 3, 2)  # rpb is only defined for stride 1
