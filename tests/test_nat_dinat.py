"""Neighborhood attention layers and the NAT / DiNAT model builders.

The attention op the layers call is chosen by the ``na_impl`` fixture (autouse):

* ``reference``: fastvision.reference's ``neighborhood_attention_ref``;
* ``fastvision``: ``fastvision.ops.na1d / na2d / na3d`` (the layers' default).

Oracles are written here from NATTEN's NeighborhoodAttention2D (qkv ->
reshape (3, heads, head_dim) -> NA with rpb and scale -> proj) and its
small-input rule (NATTEN <= 0.15 natten2d.py / natten3d.py: zero-pad the input
at the end of each axis shorter than kernel_size * dilation, crop before proj).
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fastvision.ops.neighborhood as na_ops
from fastvision.models import DiNAT, NAT, dinat_base, dinat_large, dinat_mini, dinat_small, dinat_tiny
from fastvision.models import nat_base, nat_mini, nat_small, nat_tiny
from fastvision.models.nat import NATLayer
from fastvision.ops import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from fastvision.reference.neighborhood import axis_windows, neighborhood_attention_ref

_LAYERS = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}


@pytest.fixture(autouse=True, params=["reference", "fastvision"])
def na_impl(request, monkeypatch):
    if request.param == "reference":  # the layers look na1d/na2d/na3d up per call
        for nd in (1, 2, 3):
            fused = getattr(na_ops, f"na{nd}d")
            monkeypatch.setattr(na_ops, f"na{nd}d", functools.partial(fused, backend="reference"))
    return request.param


def _randomize(module, seed=0):
    """Perturb every parameter so that no test passes by a symmetric or zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


# --------------------------------------------------------------------------- #
# Oracle: NATTEN's NeighborhoodAttention{1,2,3}D, written out
# --------------------------------------------------------------------------- #
def _qkv(layer, x):
    B, *S, C = x.shape
    qkv = F.linear(x, layer.qkv.weight, layer.qkv.bias).reshape(B, *S, 3, layer.num_heads, -1)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


def na_layer_oracle(layer, x, kernel_size, dilation=1, is_causal=False, scale=None):
    B, *S, C = x.shape
    nd = len(S)
    ks, ds = _tuple(kernel_size, nd), _tuple(dilation, nd)
    pads = [max(0, k * d - L) for k, d, L in zip(ks, ds, S)]
    xp = F.pad(x, [0, 0] + sum(([0, p] for p in reversed(pads)), []))
    q, k, v = _qkv(layer, xp)
    scale = (C // layer.num_heads) ** -0.5 if scale is None else scale
    out = neighborhood_attention_ref(q, k, v, ks, ds, 1, is_causal, rpb=layer.rpb, scale=scale)
    out = out.reshape(B, *xp.shape[1:-1], C)[(slice(None), *(slice(0, L) for L in S))]
    return F.linear(out, layer.proj.weight, layer.proj.bias)


LAYER_CASES = [
    # (spatial, kwargs)
    ((11,), dict(kernel_size=5, dilation=2)),
    ((12,), dict(kernel_size=4, dilation=1, is_causal=True, rel_pos_bias=False)),
    ((9, 10), dict(kernel_size=3, dilation=(2, 3))),
    ((7, 9), dict(kernel_size=(4, 3), qk_scale=0.2, qkv_bias=False)),
    ((8, 7), dict(kernel_size=3, is_causal=(True, False), rel_pos_bias=False)),
    ((4, 5, 6), dict(kernel_size=3, dilation=(1, 1, 2))),
]


@pytest.mark.parametrize("spatial, kw", LAYER_CASES)
def test_layer_matches_natten_oracle(spatial, kw):
    nd = len(spatial)
    torch.manual_seed(0)
    layer = _randomize(_LAYERS[nd](16, 2, **kw)).eval()
    x = torch.randn(2, *spatial, 16)
    want = na_layer_oracle(layer, x, kw["kernel_size"], kw.get("dilation", 1),
                           kw.get("is_causal", False), kw.get("qk_scale"))
    got = layer(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (layer.rpb is None) == (not kw.get("rel_pos_bias", True))
    assert (layer.qkv.bias is None) == (not kw.get("qkv_bias", True))


def test_layer_grads_match_oracle():
    torch.manual_seed(0)
    layer = _randomize(NeighborhoodAttention2D(16, 2, kernel_size=3, dilation=2), seed=1)
    x = torch.randn(2, 7, 8, 16, requires_grad=True)
    g = torch.randn(2, 7, 8, 16)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad((layer(x) * g).sum(), params)
    want = torch.autograd.grad((na_layer_oracle(layer, x, 3, 2) * g).sum(), params)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- #
# Inputs smaller than kernel_size * dilation (NAT's padding rule)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("spatial, k, d", [
    ((3,), 5, 1),            # 1-D, L < k
    ((5, 11), 3, 3),         # H < 9 only
    ((2, 2), 7, 1),          # DiNAT stage 4 at 64 x 64
    ((16, 16), 7, 8),        # DiNAT stage 1 at 64 x 64
    ((3, 6, 5), 3, (1, 2, 1)),  # 3-D: depth and height padded (NATTEN 0.15's 3-D forgot depth)
])
def test_small_inputs_are_padded_like_nat(spatial, k, d):
    nd = len(spatial)
    torch.manual_seed(0)
    layer = _randomize(_LAYERS[nd](8, 2, kernel_size=k, dilation=d)).eval()
    x = torch.randn(2, *spatial, 8)
    got = layer(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, na_layer_oracle(layer, x, k, d), rtol=1e-4, atol=1e-5)
    # The padded tokens are real keys (their key/value are the qkv bias), as in NAT.
    with torch.no_grad():
        layer.qkv.bias[16:].add_(1.0)  # shift the keys' and values' bias
    assert not torch.allclose(layer(x), got, atol=1e-4)


def test_causal_padding_changes_nothing():
    """Causal windows never reach the padded tail: same as attention on the short input."""
    torch.manual_seed(0)
    layer = _randomize(NeighborhoodAttention1D(8, 2, kernel_size=5, is_causal=True, rel_pos_bias=False))
    x = torch.randn(2, 3, 8)
    q, k, v = _qkv(layer, x)
    direct = neighborhood_attention_ref(q, k, v, 5, is_causal=True)  # ref has no size check
    want = F.linear(direct.reshape(2, 3, 8), layer.proj.weight, layer.proj.bias)
    torch.testing.assert_close(layer.eval()(x), want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- #
# Attention dropout is really applied (explicit path in training mode)
# --------------------------------------------------------------------------- #
def _window_index(spatial, ks, ds):
    """Flat key index (N, W) per query and window slot, from the reference's axis_windows."""
    nd = len(spatial)
    flat = torch.zeros([1] * (2 * nd), dtype=torch.long)
    for a in range(nd):
        idx, ok = axis_windows(spatial[a], ks[a], ds[a])
        assert ok.all()
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = spatial[a], ks[a]
        flat = flat + (idx * math.prod(spatial[a + 1:])).view(shape)
    return flat.expand(*spatial, *ks).reshape(math.prod(spatial), math.prod(ks))


def attn_dropout_oracle(layer, x, ks, ds, p):
    """Softmax weights per window slot (from the reference: dense rows via one-hot values),
    F.dropout on them in layout (B, *spatial, heads, window), weighted sum, proj."""
    B, *S, C = x.shape
    H, N = layer.num_heads, math.prod(S)
    q, k, v = _qkv(layer, x)
    onehot = torch.eye(N).reshape(1, *S, 1, N).expand(B, *S, H, N)
    dense = neighborhood_attention_ref(q, k, onehot, ks, ds, rpb=layer.rpb, scale=layer.scale)
    idx = _window_index(S, ks, ds)  # (N, W)
    probs = dense.reshape(B, N, H, N).gather(-1, idx[None, :, None, :].expand(B, N, H, -1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, N, H))  # the window holds all the mass
    dropped = F.dropout(probs.reshape(B, *S, H, -1).contiguous(), p, training=True)
    v_win = v.reshape(B, N, H, -1)[:, idx]  # (B, N, W, H, hd)
    out = torch.einsum("bnhw,bnwhe->bnhe", dropped.reshape(B, N, H, -1), v_win).reshape(B, *S, C)
    return F.linear(out, layer.proj.weight, layer.proj.bias)


def test_attn_drop_really_drops(monkeypatch):
    torch.manual_seed(0)
    p = 0.4
    layer = _randomize(NeighborhoodAttention2D(16, 2, kernel_size=3, dilation=(2, 1), attn_drop=p))
    x = torch.randn(2, 7, 8, 16)
    with torch.no_grad():
        y_eval = layer.eval()(x)
        torch.testing.assert_close(y_eval, na_layer_oracle(layer, x, 3, (2, 1)), rtol=1e-4, atol=1e-5)

        def fused_must_not_run(*args, **kwargs):
            raise AssertionError("the fused op cannot drop attention weights")

        monkeypatch.setattr(na_ops, "na2d", fused_must_not_run)
        layer.train()
        torch.manual_seed(123)
        y1 = layer(x)
        torch.manual_seed(123)
        want = attn_dropout_oracle(layer, x, (3, 3), (2, 1), p)
        torch.manual_seed(7)
        y2 = layer(x)
    torch.testing.assert_close(y1, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y1, y_eval, atol=1e-3)
    assert not torch.allclose(y1, y2, atol=1e-3)


def test_attn_drop_explicit_path_backward_and_padding(monkeypatch):
    torch.manual_seed(0)
    layer = _randomize(NeighborhoodAttention2D(8, 2, kernel_size=3, dilation=2, attn_drop=0.3)).train()
    x = torch.randn(1, 4, 9, 8, requires_grad=True)  # H = 4 < 6: padded
    y = layer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and layer.rpb.grad.abs().sum() > 0


# --------------------------------------------------------------------------- #
# State dict names and shapes, from SHI-Labs:
#   Neighborhood-Attention-Transformer/classification/nat.py (ConvTokenizer, ConvDownsampler,
#   Mlp, NATLayer, NATBlock, NAT) and classification/dinat.py (DiNAT(NAT), dilations);
#   NATTEN <= 0.17 src/natten/na2d.py (NeighborhoodAttention2D: qkv, rpb, proj).
# --------------------------------------------------------------------------- #
def nat_layer_keys(dim, heads, mlp_ratio, k=7, layer_scale=False):
    hidden = int(dim * mlp_ratio)
    keys = {
        "norm1.weight": (dim,), "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
        "attn.rpb": (heads, 2 * k - 1, 2 * k - 1),
        "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
        "norm2.weight": (dim,), "norm2.bias": (dim,),
        "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,),
    }
    if layer_scale:
        keys.update({"gamma1": (dim,), "gamma2": (dim,)})
    return keys


def nat_model_keys(depths, heads, dim, mlp_ratio, layer_scale=False, num_classes=1000):
    keys = {
        "patch_embed.proj.0.weight": (dim // 2, 3, 3, 3), "patch_embed.proj.0.bias": (dim // 2,),
        "patch_embed.proj.1.weight": (dim, dim // 2, 3, 3), "patch_embed.proj.1.bias": (dim,),
        "patch_embed.norm.weight": (dim,), "patch_embed.norm.bias": (dim,),
    }
    for i, (depth, h) in enumerate(zip(depths, heads)):
        d = dim * 2 ** i
        for j in range(depth):
            for name, shape in nat_layer_keys(d, h, mlp_ratio, layer_scale=layer_scale).items():
                keys[f"levels.{i}.blocks.{j}.{name}"] = shape
        if i < len(depths) - 1:
            keys[f"levels.{i}.downsample.reduction.weight"] = (2 * d, d, 3, 3)
            keys[f"levels.{i}.downsample.norm.weight"] = (2 * d,)
            keys[f"levels.{i}.downsample.norm.bias"] = (2 * d,)
    last = dim * 2 ** (len(depths) - 1)
    keys.update({"norm.weight": (last,), "norm.bias": (last,),
                 "head.weight": (num_classes, last), "head.bias": (num_classes,)})
    return keys


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_layer_state_dict_keys():
    assert _shapes(NeighborhoodAttention2D(64, 2, kernel_size=7)) == {
        "qkv.weight": (192, 64), "qkv.bias": (192,), "rpb": (2, 13, 13),
        "proj.weight": (64, 64), "proj.bias": (64,)}
    assert _shapes(NeighborhoodAttention1D(32, 4, kernel_size=5))["rpb"] == (4, 9)
    assert _shapes(NeighborhoodAttention3D(32, 4, kernel_size=(3, 5, 7)))["rpb"] == (4, 5, 9, 13)
    assert set(_shapes(NeighborhoodAttention2D(32, 4, 3, rel_pos_bias=False, qkv_bias=False))) == {
        "qkv.weight", "proj.weight", "proj.bias"}
    assert _shapes(NATLayer(64, 2, kernel_size=7, mlp_ratio=3)) == nat_layer_keys(64, 2, 3)
    assert _shapes(NATLayer(96, 3, kernel_size=7, mlp_ratio=2, layer_scale=1e-5)) == nat_layer_keys(
        96, 3, 2, layer_scale=True)


@pytest.mark.parametrize("builder", [nat_mini, dinat_mini])
def test_mini_state_dict_keys(builder):
    assert _shapes(builder()) == nat_model_keys([3, 4, 6, 5], [2, 4, 8, 16], 64, 3)


# name: (class, depths, heads, embed_dim, mlp_ratio, drop_path_rate, layer_scale)  from nat.py / dinat.py
CONFIGS = {
    nat_mini: (NAT, [3, 4, 6, 5], [2, 4, 8, 16], 64, 3, 0.2, None),
    nat_tiny: (NAT, [3, 4, 18, 5], [2, 4, 8, 16], 64, 3, 0.2, None),
    nat_small: (NAT, [3, 4, 18, 5], [3, 6, 12, 24], 96, 2, 0.3, 1e-5),
    nat_base: (NAT, [3, 4, 18, 5], [4, 8, 16, 32], 128, 2, 0.5, 1e-5),
    dinat_mini: (DiNAT, [3, 4, 6, 5], [2, 4, 8, 16], 64, 3, 0.2, None),
    dinat_tiny: (DiNAT, [3, 4, 18, 5], [2, 4, 8, 16], 64, 3, 0.2, None),
    dinat_small: (DiNAT, [3, 4, 18, 5], [3, 6, 12, 24], 96, 2, 0.3, None),
    dinat_base: (DiNAT, [3, 4, 18, 5], [4, 8, 16, 32], 128, 2, 0.5, 1e-5),
    dinat_large: (DiNAT, [3, 4, 18, 5], [6, 12, 24, 48], 192, 2, 0.35, None),
}
DINAT_224_DILATIONS = {
    6: [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]],
    18: [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize("builder", list(CONFIGS), ids=lambda b: b.__name__)
def test_published_configs(builder):
    cls, depths, heads, dim, mlp_ratio, dpr, ls = CONFIGS[builder]
    with torch.device("meta"):
        model = builder()
    assert type(model) is cls
    assert _shapes(model) == nat_model_keys(depths, heads, dim, mlp_ratio, layer_scale=ls is not None)
    dilations = DINAT_224_DILATIONS[depths[2]] if cls is DiNAT else [[1] * d for d in depths]
    for level, dil in zip(model.levels, dilations):
        got = [blk.attn.dilation for blk in level.blocks]
        assert got == [(d, d) for d in dil]
        assert all(blk.attn.kernel_size == (7, 7) for blk in level.blocks)
    last = model.levels[-1].blocks[-1]
    assert last.drop_path.drop_prob == pytest.approx(dpr)
    assert isinstance(model.levels[0].blocks[0].drop_path, torch.nn.Identity)  # rate 0 -> Identity


def test_init_like_nat():
    torch.manual_seed(0)
    model = nat_mini()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):  # qkv, proj, fc1, fc2, head
            assert torch.all(m.bias == 0), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    for w in (model.levels[2].blocks[0].attn.qkv.weight, model.levels[0].blocks[0].attn.rpb):
        assert 0.015 < w.std().item() < 0.025 and w.abs().max() <= 2.0
    conv = model.patch_embed.proj[0]
    assert conv.bias.abs().sum() > 0  # convs keep PyTorch's default init, as the original


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #
def test_strict_state_dict_roundtrip():
    torch.manual_seed(0)
    a = dinat_mini(num_classes=10).eval()
    torch.manual_seed(1)
    b = dinat_mini(num_classes=10).eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ya = a(img)
        assert not torch.allclose(ya, b(img))
        b.load_state_dict(a.state_dict(), strict=True)
        torch.testing.assert_close(b(img), ya, rtol=0, atol=0)
        # the same weights in NAT (no dilation) give another function
        n = nat_mini(num_classes=10).eval()
        n.load_state_dict(a.state_dict(), strict=True)
        assert not torch.allclose(n(img), ya, atol=1e-4)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        b.load_state_dict({**a.state_dict(), "levels.0.blocks.0.attn.bogus": torch.zeros(1)}, strict=True)


def test_dinat_mini_forward_backward_cpu():
    torch.manual_seed(0)
    model = dinat_mini(drop_path_rate=0.0).train()
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    assert out.shape == (1, 1000)
    out.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.levels[0].blocks[1].attn.rpb.grad.abs().sum() > 0  # dilation-8 layer, padded map


def test_nat_mini_forward_224(na_impl):
    torch.manual_seed(0)
    model = nat_mini().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512)


# --------------------------------------------------------------------------- #
# Bad arguments
# --------------------------------------------------------------------------- #
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        NeighborhoodAttention2D(30, 4, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodAttention2D(32, 4, 0)
    with pytest.raises(TypeError, match="kernel_size"):
        NeighborhoodAttention2D(32, 4, (3, 3, 3))
    with pytest.raises(ValueError, match="dilation"):
        NeighborhoodAttention1D(32, 4, 3, dilation=0)
    with pytest.raises(TypeError, match="is_causal"):
        NeighborhoodAttention1D(32, 4, 3, is_causal=1)
    with pytest.raises(ValueError, match="stride"):
        NeighborhoodAttention1D(32, 4, 3, stride=4, rel_pos_bias=False)
    with pytest.raises(ValueError, match="needs stride 1"):
        NeighborhoodAttention1D(32, 4, 3, stride=2)
    with pytest.raises(ValueError, match="rel_pos_bias"):
        NeighborhoodAttention2D(32, 4, 3, is_causal=(True, False))
    with pytest.raises(ValueError, match="attn_drop"):
        NeighborhoodAttention2D(32, 4, 3, attn_drop=1.5)
    with pytest.raises(ValueError, match="num_heads"):
        NeighborhoodAttention3D(32, 0, 3)
    layer = NeighborhoodAttention2D(32, 4, 3)
    with pytest.raises(ValueError, match=r"channels-last \(batch, H, W, 32\)"):
        layer(torch.randn(2, 32, 8, 8))
    with pytest.raises(ValueError, match="channels-last"):
        layer(torch.randn(2, 8, 32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([1.0])
    for builder in (nat_mini, dinat_large):
        with pytest.raises(ValueError, match="does not download"):
            builder(pretrained=True)
    with pytest.raises(ValueError, match="dilations"):
        DiNAT(embed_dim=16, mlp_ratio=2, depths=[1, 1], num_heads=[1, 2], dilations=[[1, 2], [1]])
