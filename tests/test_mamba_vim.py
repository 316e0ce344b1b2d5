"""Mamba / bimamba-v2 layer and Vision Mamba (Vim) model builders.

The scan implementation is chosen by the ``scan_impl`` fixture (autouse):

* ``reference``: fastvision.reference's ``selective_scan_ref`` /
  ``bi_selective_scan_ref`` (flip-based bidirectional scan);
* ``reverse``: the bidirectional scan composed from ``selective_scan_ref`` and
  ``selective_scan_ref(..., reverse=True)`` on unflipped tensors, the contract
  the fused ``bi_selective_scan`` kernel implements.

* ``fastvision``: ``fastvision.ops.selective_scan`` (the layer's default).
"""

import math

import pytest
import torch
import torch.nn.functional as F


import fastvision.ops.selective_scan_layers as mamba_mod
from fastvision.models import VisionMamba, vim_base, vim_small, vim_tiny
from fastvision.ops.selective_scan_layers import Mamba, RMSNorm, rms_norm_fn
from fastvision.reference.selective_scan import bi_selective_scan_ref, selective_scan_ref


def _bi_scan_reverse(u, delta, A, B, C, D, z, delta_bias,
                     u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, delta_softplus=True):
    fwd = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    bwd = selective_scan_ref(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b, delta_softplus,
                             reverse=True)
    return (fwd.float() + bwd.float()).to(u.dtype)


_SCAN_IMPLS = {
    "reference": (selective_scan_ref, bi_selective_scan_ref),
    "reverse": (selective_scan_ref, _bi_scan_reverse),
    "fastvision": None,  # fastvision.ops.selective_scan (the module's default)
}


@pytest.fixture(autouse=True, params=["reference", "reverse", "fastvision"])
def scan_impl(request, monkeypatch):
    impls = _SCAN_IMPLS[request.param]
    if impls is not None:  # the layers look the scans up in fastvision.ops.selective_scan per call
        monkeypatch.setattr(mamba_mod.scan_ops, "selective_scan", impls[0])
        monkeypatch.setattr(mamba_mod.scan_ops, "bi_selective_scan", impls[1])
    return request.param


def _randomize(module, seed=0):
    """Perturb every parameter so that no test passes by a symmetric init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# --------------------------------------------------------------------------- #
# Oracles: direct transcriptions of the anchor code with flips, plain PyTorch.
# --------------------------------------------------------------------------- #
def _mamba_branch_oracle(xz, conv1d, x_proj, dt_proj, A, D, d_state):
    """One direction of mamba's ``mamba_inner_fn_no_out_proj`` (slow-path ops)."""
    L = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(conv1d(x)[..., :L])  # nn.Conv1d(padding=d_conv-1): causal
    b, d, _ = x.shape
    x_dbl = x_proj(x.transpose(1, 2).reshape(b * L, d))  # "(b l) d"
    dt_rank = dt_proj.weight.shape[1]
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    dt = (dt_proj.weight @ dt.t()).reshape(d, b, L).permute(1, 0, 2)  # "d (b l) -> b d l"
    B = B.reshape(b, L, d_state).transpose(1, 2).contiguous()
    C = C.reshape(b, L, d_state).transpose(1, 2).contiguous()
    return selective_scan_ref(x, dt, A, B, C, D.float(), z=z, delta_bias=dt_proj.bias.float(),
                              delta_softplus=True)


def vim_mamba_oracle(m, hidden_states):
    """Vim's Mamba.forward (mamba-1p1p1/mamba_ssm/modules/mamba_simple.py), flip-based."""
    b, L, _ = hidden_states.shape
    xz = (m.in_proj.weight @ hidden_states.reshape(b * L, -1).t()).reshape(-1, b, L).permute(1, 0, 2)
    if m.in_proj.bias is not None:
        xz = xz + m.in_proj.bias[:, None]
    A = -torch.exp(m.A_log.float())
    out = _mamba_branch_oracle(xz, m.conv1d, m.x_proj, m.dt_proj, A, m.D, m.d_state)
    if m.bimamba_type == "v2":
        A_b = -torch.exp(m.A_b_log.float())
        out_b = _mamba_branch_oracle(xz.flip([-1]), m.conv1d_b, m.x_proj_b, m.dt_proj_b, A_b,
                                     m.D_b, m.d_state)
        y = (out + out_b.flip([-1])).transpose(1, 2)
        if m.if_divide_out:
            y = y / 2
    else:
        y = out.transpose(1, 2)
    out = F.linear(y, m.out_proj.weight, m.out_proj.bias)
    if m.init_layer_scale is not None:
        out = out * m.gamma
    return out


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def vim_features_oracle(model, img):
    """Vim's forward_features for the published config (middle cls token, RMSNorm,
    residual_in_fp32, fused add+norm), unfused and written out; mixers are the model's."""
    x = model.patch_embed.proj(img).flatten(2).transpose(1, 2)
    B, M, _ = x.shape
    pos = M // 2
    x = torch.cat((x[:, :pos], model.cls_token.expand(B, -1, -1), x[:, pos:]), dim=1)
    x = x + model.pos_embed
    residual, hidden = None, x
    for layer in model.layers:
        residual = hidden if residual is None else residual + hidden
        residual = residual.float()
        hidden = layer.mixer(_rms(residual, layer.norm.weight, layer.norm.eps))
    residual = residual + hidden
    return _rms(residual, model.norm_f.weight, model.norm_f.eps)[:, pos]


# --------------------------------------------------------------------------- #
# Layer
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("L", [1, 3, 4, 9])
def test_anticausal_conv_equals_flipped_causal_conv(K, L):
    torch.manual_seed(K * 10 + L)
    x = torch.randn(2, 6, L)
    w = torch.randn(6, 1, K)
    bias = torch.randn(6)
    want = F.conv1d(x.flip(-1), w, bias, padding=K - 1, groups=6)[..., :L].flip(-1)
    got = mamba_mod._anticausal_depthwise_conv1d(x, w, bias)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(mamba_mod._causal_depthwise_conv1d(x, w, bias),
                               F.conv1d(x, w, bias, padding=K - 1, groups=6)[..., :L])


@pytest.mark.parametrize(
    "kwargs, L",
    [
        (dict(bimamba_type="v2", if_divide_out=True), 17),
        (dict(bimamba_type="v2", if_divide_out=False), 9),
        (dict(bimamba_type="v2", if_divide_out=True, d_conv=3, d_state=8, expand=1, bias=True), 5),
        (dict(bimamba_type="v2", if_divide_out=True, init_layer_scale=0.5, conv_bias=False), 2),
        (dict(bimamba_type="v2", if_divide_out=True), 1),
        (dict(bimamba_type="none"), 11),
        (dict(bimamba_type="none", d_conv=2, dt_rank=3), 4),
    ],
)
def test_mamba_matches_flip_based_vim_oracle(kwargs, L):
    torch.manual_seed(0)
    m = _randomize(Mamba(24, **kwargs), seed=1)
    x = torch.randn(3, L, 24)
    with torch.no_grad():
        got = m(x)
        want = vim_mamba_oracle(m, x)
    assert got.shape == (3, L, 24)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mamba_grads_match_oracle():
    torch.manual_seed(0)
    m = _randomize(Mamba(16, d_state=4, bimamba_type="v2", if_divide_out=True), seed=2)
    x = torch.randn(2, 7, 16, requires_grad=True)
    g = torch.randn(2, 7, 16)
    grads = torch.autograd.grad((m(x) * g).sum(), [x, *m.parameters()])
    want = torch.autograd.grad((vim_mamba_oracle(m, x) * g).sum(), [x, *m.parameters()])
    for (name, _), a, b in zip([("x", x), *m.named_parameters()], grads, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_mamba_init_matches_mamba_simple():
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, bimamba_type="v2", dt_min=0.001, dt_max=0.1)
    assert m.d_inner == 128 and m.dt_rank == 4
    A = torch.arange(1, 17, dtype=torch.float32).expand(128, 16)
    torch.testing.assert_close(m.A_log, torch.log(A))
    torch.testing.assert_close(m.A_b_log, torch.log(A))
    assert m.A_log.dtype == m.D.dtype == torch.float32
    assert torch.equal(m.D, torch.ones(128)) and torch.equal(m.D_b, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert m.dt_proj.weight.abs().max() <= 4 ** -0.5
    assert getattr(m.dt_proj.bias, "_no_reinit", False)
    assert not getattr(m.dt_proj_b.bias, "_no_reinit", False)  # as Vim: default init


def test_mamba_rejects_bad_arguments():
    with pytest.raises(NotImplementedError, match="v1"):
        Mamba(8, bimamba_type="v1")
    with pytest.raises(ValueError, match="bimamba_type"):
        Mamba(8, bimamba_type="v3")
    m = Mamba(8)
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(2, 5, 7))


def test_rms_norm_fused_add_semantics():
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    assert norm.bias is None
    assert [k for k, _ in norm.state_dict().items()] == ["weight"]
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    res = torch.randn(2, 5, 32)
    y, r = norm(x, res, prenorm=True, residual_in_fp32=True)
    s = x.float() + res
    assert y.dtype == torch.bfloat16 and r.dtype == torch.float32
    torch.testing.assert_close(r, s)
    torch.testing.assert_close(y, _rms(s, norm.weight, 1e-5).to(torch.bfloat16))
    # first layer (no residual): residual starts as x, in fp32 when residual_in_fp32
    y0, r0 = rms_norm_fn(x, norm.weight, None, None, eps=1e-5, prenorm=True, residual_in_fp32=True)
    assert r0.dtype == torch.float32 and torch.equal(r0, x.float())
    torch.testing.assert_close(norm(x.float()), _rms(x.float(), norm.weight, 1e-5))


# --------------------------------------------------------------------------- #
# State dict key names (from hustvl/Vim: vim/models_mamba.py and
# mamba-1p1p1/mamba_ssm/modules/mamba_simple.py, mamba_ssm/ops/triton/layer_norm.py)
# --------------------------------------------------------------------------- #
VIM_MIXER_KEYS = {  # Mamba(bimamba_type="v2"), bias=False, conv_bias=True
    "A_log": (384, 16), "D": (384,), "in_proj.weight": (768, 192),
    "conv1d.weight": (384, 1, 4), "conv1d.bias": (384,),
    "x_proj.weight": (12 + 2 * 16, 384),
    "dt_proj.weight": (384, 12), "dt_proj.bias": (384,),
    "A_b_log": (384, 16), "D_b": (384,),
    "conv1d_b.weight": (384, 1, 4), "conv1d_b.bias": (384,),
    "x_proj_b.weight": (44, 384),
    "dt_proj_b.weight": (384, 12), "dt_proj_b.bias": (384,),
    "out_proj.weight": (192, 384),
}
VIM_TINY_TOP_KEYS = {
    "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192),
    "patch_embed.proj.weight": (192, 3, 16, 16), "patch_embed.proj.bias": (192,),
    "norm_f.weight": (192,), "head.weight": (1000, 192), "head.bias": (1000,),
}


def test_mamba_v2_state_dict_keys():
    sd = Mamba(192, d_state=16, bimamba_type="v2", if_divide_out=True).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == VIM_MIXER_KEYS
    sd = Mamba(192).state_dict()
    assert set(sd) == {k for k in VIM_MIXER_KEYS if "_b" not in k}
    assert set(Mamba(8, init_layer_scale=1.0).state_dict()) >= {"gamma"}


def test_vim_tiny_state_dict_keys():
    sd = vim_tiny().state_dict()
    want = dict(VIM_TINY_TOP_KEYS)
    for i in range(24):
        want.update({f"layers.{i}.mixer.{k}": v for k, v in VIM_MIXER_KEYS.items()})
        want[f"layers.{i}.norm.weight"] = (192,)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want


@pytest.mark.parametrize("builder, dim", [(vim_small, 384), (vim_base, 768)])
def test_vim_small_base_shapes(builder, dim):
    with torch.device("meta"):
        model = builder()
    sd = model.state_dict()
    assert len(sd) == 7 + 24 * 17
    assert sd["layers.23.mixer.in_proj.weight"].shape == (4 * dim, dim)
    assert sd["layers.0.mixer.x_proj_b.weight"].shape == (math.ceil(dim / 16) + 32, 2 * dim)
    assert sd["pos_embed"].shape == (1, 197, dim)


def test_strict_state_dict_roundtrip():
    kw = dict(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=3, num_classes=10)
    torch.manual_seed(0)
    a = vim_tiny(**kw).eval()
    torch.manual_seed(1)
    b = vim_tiny(**kw).eval()
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ya = a(img)
        assert not torch.allclose(ya, b(img))
        b.load_state_dict(a.state_dict(), strict=True)
        torch.testing.assert_close(b(img), ya, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        b.load_state_dict({**a.state_dict(), "layers.0.mixer.bogus": torch.zeros(1)}, strict=True)


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #
def test_vim_tiny_forward(scan_impl):
    if scan_impl == "reverse":
        pytest.skip("slow; the reverse composition is covered by the layer tests")
    torch.manual_seed(0)
    model = vim_tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_vim_features_match_oracle():
    torch.manual_seed(0)
    model = _randomize(vim_tiny(img_size=48, patch_size=16, embed_dim=32, depth=3,
                                num_classes=5), seed=3).eval()
    img = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats = model(img, return_features=True)
        want = vim_features_oracle(model, img)
        torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(img), model.head(want), rtol=1e-4, atol=1e-5)
    assert model.pos_embed.shape == (1, 10, 32)  # 3x3 patches + cls token at index 4


def test_vim_init_like_vim():
    torch.manual_seed(0)
    depth = 4
    model = vim_tiny(embed_dim=64, depth=depth, img_size=32, num_classes=10)
    m0 = model.layers[0].mixer
    # dt_proj bias kept (_no_reinit), every other Linear bias zeroed (incl. dt_proj_b)
    assert (F.softplus(m0.dt_proj.bias) >= 0.001 * 0.999).all()
    assert torch.equal(m0.dt_proj_b.bias, torch.zeros_like(m0.dt_proj_b.bias))
    assert torch.equal(model.head.bias, torch.zeros(10))
    assert torch.equal(model.patch_embed.proj.bias, torch.zeros(64))
    # out_proj: kaiming-uniform(a=sqrt 5) bound 1/sqrt(fan_in), divided by sqrt(depth)
    bound = 1 / math.sqrt(128) / math.sqrt(depth)
    assert m0.out_proj.weight.abs().max() <= bound
    assert m0.out_proj.weight.abs().max() > 0.9 * bound
    assert model.head.weight.std() < 0.03 and model.pos_embed.std() < 0.03
    assert torch.equal(model.layers[3].norm.weight, torch.ones(64))
    # stochastic depth as Vim: layer i gets linspace(0, rate, depth)[i - 1]
    rates = [getattr(l.drop_path, "drop_prob", 0.0) for l in model.layers]
    expect = [0.0] + torch.linspace(0, 0.1, depth).tolist()[:depth - 1]
    assert rates == pytest.approx(expect)


def test_vim_backward_small():
    torch.manual_seed(0)
    model = VisionMamba(img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32,
                        num_classes=10, drop_path_rate=0.0, rms_norm=True,
                        residual_in_fp32=True, fused_add_norm=True, final_pool_type="mean",
                        bimamba_type="v2", if_divide_out=True, use_middle_cls_token=True)
    model.train()
    img = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(img).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(img.grad).all()


def test_vim_train_mode_drop_path_runs():
    torch.manual_seed(0)
    model = vim_tiny(img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32,
                     num_classes=10, drop_path_rate=0.5).train()
    out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_vim_variants_and_errors():
    kw = dict(img_size=32, patch_size=8, stride=8, depth=2, embed_dim=16, num_classes=3)
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for extra in (dict(use_middle_cls_token=False), dict(use_double_cls_token=True),
                      dict(if_cls_token=False, final_pool_type="mean"),
                      dict(if_cls_token=False, final_pool_type="none"),
                      dict(fused_add_norm=False), dict(rms_norm=False),
                      dict(if_bidirectional=True), dict(if_devide_out=False)):
            out = VisionMamba(**kw, **extra).eval()(img)
            assert out.shape == (1, 3) and torch.isfinite(out).all(), extra
        m = VisionMamba(**{**kw, "stride": 4}).eval()
        assert m.patch_embed.num_patches == 49 and m(img).shape == (1, 3)
    with pytest.raises(ValueError, match="doesn't match"):
        VisionMamba(**kw)(torch.randn(1, 3, 16, 16))
    with pytest.raises(NotImplementedError, match="rope"):
        VisionMamba(**kw, if_rope=True)
    with pytest.raises(TypeError, match="unexpected"):
        VisionMamba(**kw, not_an_arg=1)
    for builder in (vim_tiny, vim_small, vim_base):
        with pytest.raises(RuntimeError, match="does not download weights"):
            builder(pretrained=True)
