"""fastvision.ops.deform_conv2d against torchvision.ops.deform_conv2d itself.

Self-contained (fastvision, torchvision, pytest); skipped where torchvision does
not import beside this torch (PyPI's torchvision needs its matching torch: run
these in an environment that has both, e.g. torch 2.14 + torchvision 0.29).
Forward and every gradient (input, offset, weight, mask, bias), float32 and
float64, over offsets pushing samples across every border, weight and offset
groups, stride / dilation / padding combinations and kernel sizes 1 / 3 / 5 / 7,
with and without a mask; samples exactly on the sampling range's ends (zero offsets
with padding 1, and offsets putting samples on -1, 0, H - 1 / W - 1 and H / W, where
torchvision's offset gradient is one-sided at -1 while the sample reads 0); and the
layer's state dict both ways.
"""

import pytest
import torch

# Run by tests/test_wheel_install.py in its venv (torch 2.14 + torchvision), where
# `pytest -m torchvision` picks every file marked so.
pytestmark = pytest.mark.torchvision

tv_ops = pytest.importorskip("torchvision.ops", reason="torchvision does not import beside this torch")

from fastvision.ops import DeformConv2d, deform_conv2d  # noqa: E402

CASES = [
    dict(k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, G=1, scale=1.0),
    dict(k=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, G=1, scale=2.0),
    dict(k=(5, 5), stride=(1, 1), padding=(2, 2), dilation=(1, 1), groups=2, G=1, scale=3.0),
    dict(k=(7, 7), stride=(2, 2), padding=(3, 3), dilation=(1, 1), groups=1, G=2, scale=2.0),
    dict(k=(3, 3), stride=(2, 1), padding=(0, 2), dilation=(2, 1), groups=2, G=2, scale=1.0),
    dict(k=(3, 5), stride=(1, 2), padding=(2, 0), dilation=(1, 2), groups=1, G=4, scale=4.0),
    dict(k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(2, 2), groups=4, G=2, scale=8.0),   # most samples outside
    dict(k=(3, 3), stride=(3, 3), padding=(4, 4), dilation=(1, 1), groups=1, G=1, scale=0.5),  # padding > kernel
]


def _inputs(c, dtype, use_mask, seed):
    g = torch.Generator().manual_seed(seed)
    B, Cin, Cout, H, W = 2, 8, 12, 9, 10
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c["k"], c["stride"], c["padding"], c["dilation"]
    Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    K = kh * kw
    t = dict(input=torch.randn(B, Cin, H, W, generator=g, dtype=dtype),
             offset=torch.randn(B, 2 * c["G"] * K, Ho, Wo, generator=g, dtype=dtype) * c["scale"],
             weight=torch.randn(Cout, Cin // c["groups"], kh, kw, generator=g, dtype=dtype),
             bias=torch.randn(Cout, generator=g, dtype=dtype))
    if use_mask:
        t["mask"] = torch.rand(B, c["G"] * K, Ho, Wo, generator=g, dtype=dtype)
    return t


def _run(fn, t, c):
    leaves = {n: v.clone().requires_grad_() for n, v in t.items()}
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], stride=c["stride"],
             padding=c["padding"], dilation=c["dilation"], mask=leaves.get("mask"))
    gout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(out, list(leaves.values()), gout)
    return out, dict(zip(leaves, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("use_mask", [True, False], ids=["dcnv2", "dcnv1"])
@pytest.mark.parametrize("seed,c", list(enumerate(CASES)))
def test_matches_torchvision(seed, c, use_mask, dtype):
    t = _inputs(c, dtype, use_mask, seed)
    out, grads = _run(deform_conv2d, t, c)
    ref_out, ref_grads = _run(tv_ops.deform_conv2d, t, c)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref_out, **tol)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m, n=name: f"d{n}: {m}")


def _edge_inputs(kind, dtype, use_mask, c, seed):
    """Inputs of case c (3x3 kernel) with zero offsets ("zero": with padding 1 the border
    positions' first / last kernel row and column sit exactly on -1 / H / W) or offsets
    putting each sample's y on one of -1, 0, H - 1, H (and a few others), x likewise."""
    t = _inputs(c, torch.float64, use_mask, seed)
    g = torch.Generator().manual_seed(100 + seed)
    B, _, H, W = t["input"].shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c["k"], c["stride"], c["padding"], c["dilation"]
    Ho, Wo = t["offset"].shape[2:]
    K, G = kh * kw, c["G"]
    if kind == "zero":
        t["offset"] = torch.zeros_like(t["offset"])
    else:
        k = torch.arange(K)
        base_y = (torch.arange(Ho) * sh - ph)[None, :, None] + ((k // kw) * dh)[:, None, None]  # (K, Ho, 1)
        base_x = (torch.arange(Wo) * sw - pw)[None, None, :] + ((k % kw) * dw)[:, None, None]  # (K, 1, Wo)
        ty = torch.tensor([-1.0, -1.0, 0.0, H - 1.0, H, -0.5, 1.25, H - 0.75, -1.5], dtype=torch.float64)
        tx = torch.tensor([-1.0, -1.0, 0.0, W - 1.0, W, -0.25, 2.5, W - 0.5, W + 0.5], dtype=torch.float64)
        yy = ty[torch.randint(len(ty), (B, G, K, Ho, Wo), generator=g)]
        xx = tx[torch.randint(len(tx), (B, G, K, Ho, Wo), generator=g)]
        t["offset"] = torch.stack([yy - base_y, xx - base_x], 3).reshape(B, 2 * G * K, Ho, Wo)  # exact
    return {n: v.to(dtype) for n, v in t.items()}


EDGE_CASES = [
    dict(k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, G=1, scale=1.0),
    dict(k=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2, G=2, scale=1.0),
    dict(k=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(2, 2), groups=1, G=4, scale=1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("use_mask", [True, False], ids=["dcnv2", "dcnv1"])
@pytest.mark.parametrize("kind", ["zero", "targets"])
@pytest.mark.parametrize("seed,c", list(enumerate(EDGE_CASES)))
def test_matches_torchvision_on_the_range_ends(seed, c, kind, use_mask, dtype):
    t = _edge_inputs(kind, dtype, use_mask, c, seed)
    out, grads = _run(deform_conv2d, t, c)
    ref_out, ref_grads = _run(tv_ops.deform_conv2d, t, c)
    # the case does hit the rule: torchvision's offset gradient is nonzero at samples on -1
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c["k"], c["stride"], c["padding"], c["dilation"]
    B, _, Ho, Wo = t["offset"].shape
    K = kh * kw
    base_y = (torch.arange(Ho) * sh - ph)[None, :, None] + ((torch.arange(K) // kw) * dh)[:, None, None]
    off = t["offset"].reshape(B, c["G"], K, 2, Ho, Wo)
    on_minus_one = (base_y.to(dtype) + off[:, :, :, 0]) == -1
    assert (ref_grads["offset"].reshape(B, c["G"], K, 2, Ho, Wo)[:, :, :, 0][on_minus_one] != 0).any()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref_out, **tol)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_layer_state_dict_both_ways():
    ours = DeformConv2d(8, 16, 3, stride=2, padding=1, groups=2)
    theirs = tv_ops.DeformConv2d(8, 16, 3, stride=2, padding=1, groups=2)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, offset = torch.randn(2, 8, 11, 11), torch.randn(2, 18, 6, 6)
    torch.testing.assert_close(ours(x, offset), theirs(x, offset), rtol=1e-4, atol=1e-4)
