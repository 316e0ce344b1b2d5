"""DCNv3 / DCNv4 aggregation specifics (the generic checks run on tests/conformance/dcn.py).

* The sampling rule by hand: on ramp images every sample reads its own
  coordinates, so one-hot masks show each kernel point's location: the x-outer
  order, (dx, dy) offsets, the centre not scaled by offset_scale, remove_center.
* InternImage's dcnv3_core_pytorch agrees when pad_h == pad_w, and its pad
  swap is not reproduced when they differ.
* The layers: InternImage's / DCNv4's parameter names and shapes (state dicts
  built from the published key sets load with strict=True), and their forward
  equal to the anchors' forward written out on the references.
* Determinism: bit-identical gradients across thread counts and runs, under
  torch.use_deterministic_algorithms(True) too; bf16 backward vs float32.
* Direct calls: the C++ entry points' and the Python checks' errors.
* The Triton launchers under the interpreter with small blocks.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastvision.ops import DCNv3, DCNv4, dcn_aggregate, dcnv4
from fastvision.reference.dcn import dcn_aggregate_ref, dcnv3_core_pytorch, dcnv4_ref
from fastvision.testing import assert_close, import_triton_kernels_interpreted
from test_deterministic import deterministic


def _inputs(N=1, H=6, W=7, G=2, Cg=4, K=9, Ho=None, Wo=None, spread=1.5, dtype=torch.float32, seed=0,
            positive_mask=True):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = Ho or H, Wo or W
    x = torch.randn(N, H, W, G * Cg, generator=g)
    off = (torch.rand(N, Ho, Wo, G * K * 2, generator=g) * 2 - 1) * spread * max(H, W)
    m = torch.rand(N, Ho, Wo, G * K, generator=g) if positive_mask else torch.randn(N, Ho, Wo, G * K, generator=g)
    return x.to(dtype), off.to(dtype), m.to(dtype)


# --------------------------------------------------------------------------
# Semantics by hand


@pytest.mark.parametrize("kernel,dilation,scale,remove_center", [
    ((3, 3), (1, 1), 1.0, False), ((3, 5), (2, 1), 0.5, False), ((3, 3), (1, 1), 2.0, True), ((2, 4), (1, 1), 1.0, True)])
def test_each_kernel_point_samples_where_the_cuda_op_does(kernel, dilation, scale, remove_center):
    """Channel 0 holds x, channel 1 holds y: a bilinear sample of these ramps is its own
    location. A one-hot mask at point p gives p's location, which must be
    p0 + (i dil - half + dx) * scale with (i, j) = (p // kh, p % kh), the centre skipped."""
    kh, kw = kernel
    H, W = 40, 41
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    image = torch.stack([xs, ys], -1)[None]  # (1, H, W, 2)
    K = kh * kw - int(remove_center)
    stride, pad = (2, 3), (4, 5)
    Ho = (H + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wo = (W + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    off = torch.randn(1, Ho, Wo, K, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3
    ts = [t for t in range(kh * kw) if not (remove_center and t == (kw // 2) * kh + kh // 2)]
    ho, wo = torch.meshgrid(torch.arange(Ho), torch.arange(Wo), indexing="ij")
    half_h, half_w = dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2
    checked = 0
    for p, t in enumerate(ts):
        i, j = t // kh, t % kh
        mask = torch.zeros(1, Ho, Wo, K, dtype=torch.float64)
        mask[..., p] = 1.0
        out = dcn_aggregate(image, off.flatten(-2), mask, kernel, stride, pad, dilation, 1, scale, remove_center)
        x = wo * stride[1] - pad[1] + half_w + (i * dilation[1] - half_w + off[0, ..., p, 0]) * scale
        y = ho * stride[0] - pad[0] + half_h + (j * dilation[0] - half_h + off[0, ..., p, 1]) * scale
        inside = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)  # all four corners in the image
        torch.testing.assert_close(out[0, ..., 0][inside], x[inside])
        torch.testing.assert_close(out[0, ..., 1][inside], y[inside])
        checked += int(inside.sum())
    assert checked > 50 * len(ts)


def test_samples_outside_read_zero_and_mask_is_not_normalised():
    x = torch.ones(1, 4, 4, 2)
    off = torch.full((1, 4, 4, 9 * 2), 100.0)
    off[..., 8:10] = 0.0  # point 4 (the centre) stays on the pixel
    mask = torch.full((1, 4, 4, 9), 3.0)
    out = dcn_aggregate(x, off, mask, 3, padding=1)
    assert torch.equal(out, torch.full_like(out, 3.0))  # only the centre reads, times its weight 3


# --------------------------------------------------------------------------
# InternImage's dcnv3_core_pytorch


@pytest.mark.parametrize("k,s,p,d,scale,rc", [(3, 1, 1, 1, 1.0, False), (3, 2, 1, 1, 0.5, False),
                                              (5, 1, 2, 2, 1.0, False), (3, 1, 1, 1, 2.0, True),
                                              (3, 1, 0, 1, 1.0, False), (1, 1, 0, 1, 1.0, False)])
def test_matches_dcnv3_core_pytorch_when_pads_agree(k, s, p, d, scale, rc):
    N, H, W, G, Cg = 2, 9, 8, 2, 3
    Ho, Wo = (H + 2 * p - (d * (k - 1) + 1)) // s + 1, (W + 2 * p - (d * (k - 1) + 1)) // s + 1
    x, off, m = _inputs(N, H, W, G, Cg, k * k - rc, Ho, Wo, spread=0.4)
    ours = dcn_aggregate(x, off, m, k, s, p, d, G, scale, rc)
    theirs = dcnv3_core_pytorch(x, off, m, k, k, s, s, p, p, d, d, G, Cg, scale, rc)
    assert_close(ours, theirs, scale=5)  # its grid is float32 normalised coordinates


def test_dcnv3_core_pytorch_pad_swap_is_not_reproduced():
    """dcnv3_core_pytorch pads H by pad_w and W by pad_h. With a 1x1 kernel, zero offsets and
    padding (0, 1), the CUDA op (and ours) reads input[ho, wo - 1]: a shifted copy."""
    H, W, C = 5, 6, 3
    x = torch.randn(1, H, W, C)
    off, mask = torch.zeros(1, H, W + 2, 2), torch.ones(1, H, W + 2, 1)
    ours = dcn_aggregate(x, off, mask, 1, 1, (0, 1), 1)
    expect = F.pad(x, (0, 0, 1, 1))  # zero columns left and right
    assert torch.equal(ours, expect)
    theirs = dcnv3_core_pytorch(x, off, mask, 1, 1, 1, 1, 0, 1, 1, 1, 1, C, 1.0, False)
    assert theirs.shape == ours.shape and not torch.allclose(theirs, expect, atol=1e-3)


# --------------------------------------------------------------------------
# Layers


def _dcnv3_keys(C, G, k, dw_k, rc, norm="LN", cfs=False):
    """InternImage ops_dcnv3/modules/dcnv3.py DCNv3: its parameters and buffers."""
    K = k * k - rc
    keys = {"dw_conv.0.weight": (C, 1, dw_k, dw_k), "dw_conv.0.bias": (C,),
            "offset.weight": (G * K * 2, C), "offset.bias": (G * K * 2,), "mask.weight": (G * K, C),
            "mask.bias": (G * K,), "input_proj.weight": (C, C), "input_proj.bias": (C,),
            "output_proj.weight": (C, C), "output_proj.bias": (C,)}
    if norm == "LN":
        keys.update({"dw_conv.1.1.weight": (C,), "dw_conv.1.1.bias": (C,)})
    else:
        keys.update({f"dw_conv.1.0.{n}": (C,) for n in ("weight", "bias", "running_mean", "running_var")})
        keys["dw_conv.1.0.num_batches_tracked"] = ()
    if cfs:
        keys.update({"center_feature_scale_proj_weight": (G, C), "center_feature_scale_proj_bias": (G,)})
    return keys


def _dcnv4_keys(C, G, k, rc, dw_k=None, output_bias=True, without_pointwise=False, cfs=False):
    """OpenGVLab DCNv4_op/DCNv4/modules/dcnv4.py DCNv4: its parameters."""
    width = math.ceil(G * (k * k - rc) * 3 / 8) * 8
    keys = {"offset_mask.weight": (width, C), "offset_mask.bias": (width,)}
    if dw_k is not None:
        keys.update({"offset_mask_dw.weight": (C, 1, dw_k, dw_k), "offset_mask_dw.bias": (C,)})
    if not without_pointwise:
        keys.update({"value_proj.weight": (C, C), "value_proj.bias": (C,), "output_proj.weight": (C, C)})
        if output_bias:
            keys["output_proj.bias"] = (C,)
    if cfs:
        keys.update({"center_feature_scale_proj_weight": (G, C), "center_feature_scale_proj_bias": (G,)})
    return keys


def _random_state(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for n, shape in keys.items():
        if n.endswith("num_batches_tracked"):
            state[n] = torch.tensor(3)
        elif n.endswith("running_var"):
            state[n] = torch.rand(shape, generator=g) + 0.5
        else:
            state[n] = torch.randn(shape, generator=g) * 0.3
    return state


def _dcnv3_anchor_forward(sd, x, k, pad, G, scale, rc, norm, act, cfs, dw_k):
    """InternImage's DCNv3.forward (DCNv3_pytorch: the same math on dcnv3_core_pytorch), on state dict sd."""
    N, H, W, C = x.shape
    xp = F.linear(x, sd["input_proj.weight"], sd["input_proj.bias"])
    x1 = F.conv2d(x.permute(0, 3, 1, 2), sd["dw_conv.0.weight"], sd["dw_conv.0.bias"], padding=(dw_k - 1) // 2,
                  groups=C)
    if norm == "LN":
        x1 = F.layer_norm(x1.permute(0, 2, 3, 1), (C,), sd["dw_conv.1.1.weight"], sd["dw_conv.1.1.bias"], 1e-6)
    else:
        x1 = F.batch_norm(x1, sd["dw_conv.1.0.running_mean"], sd["dw_conv.1.0.running_var"],
                          sd["dw_conv.1.0.weight"], sd["dw_conv.1.0.bias"], False).permute(0, 2, 3, 1)
    x1 = {"GELU": F.gelu, "ReLU": F.relu, "SiLU": F.silu}[act](x1)
    offset = F.linear(x1, sd["offset.weight"], sd["offset.bias"])
    mask = F.softmax(F.linear(x1, sd["mask.weight"], sd["mask.bias"]).reshape(N, H, W, G, -1), -1).reshape(N, H, W, -1)
    out = dcnv3_core_pytorch(xp, offset, mask, k, k, 1, 1, pad, pad, 1, 1, G, C // G, scale, rc)
    if cfs:
        s = F.linear(x1, sd["center_feature_scale_proj_weight"], sd["center_feature_scale_proj_bias"]).sigmoid()
        s = s[..., None].repeat(1, 1, 1, 1, C // G).flatten(-2)
        out = out * (1 - s) + xp * s
    return F.linear(out, sd["output_proj.weight"], sd["output_proj.bias"])


@pytest.mark.parametrize("cfg", [
    dict(C=32, G=4, k=3, dw_k=3, rc=0, norm="LN", act="GELU", cfs=False, scale=1.0),
    dict(C=24, G=3, k=5, dw_k=3, rc=1, norm="BN", act="ReLU", cfs=True, scale=0.5),
    dict(C=16, G=2, k=3, dw_k=5, rc=1, norm="LN", act="SiLU", cfs=True, scale=2.0)])
def test_dcnv3_loads_published_keys_and_matches_anchor_forward(cfg):
    c = cfg
    pad = (c["k"] - 1) // 2
    layer = DCNv3(c["C"], c["k"], c["dw_k"] if c["dw_k"] != c["k"] else None, 1, pad, 1, c["G"], c["scale"], c["act"],
                  c["norm"], c["cfs"], bool(c["rc"])).eval()
    keys = _dcnv3_keys(c["C"], c["G"], c["k"], c["dw_k"], c["rc"], c["norm"], c["cfs"])
    assert {n: tuple(t.shape) for n, t in layer.state_dict().items()} == keys
    sd = _random_state(keys)
    layer.load_state_dict(sd, strict=True)
    x = torch.randn(2, 7, 6, c["C"], dtype=torch.float64)
    with torch.no_grad():
        ours = layer.double()(x)
        want = _dcnv3_anchor_forward({n: t.double() for n, t in sd.items()}, x, c["k"], pad, c["G"], c["scale"],
                                     c["rc"], c["norm"], c["act"], c["cfs"], c["dw_k"])
    assert_close(ours, want, torch.float32, scale=5)  # the anchor's grid is float32


@pytest.mark.parametrize("cfg", [
    dict(C=32, G=2, k=3, rc=0, dw_k=None, output_bias=True, without_pointwise=False, cfs=False),
    dict(C=48, G=3, k=3, rc=1, dw_k=3, output_bias=False, without_pointwise=False, cfs=True),
    dict(C=16, G=4, k=5, rc=0, dw_k=None, output_bias=True, without_pointwise=True, cfs=False)])
def test_dcnv4_loads_published_keys_and_matches_anchor_forward(cfg):
    c = cfg
    pad = (c["k"] - 1) // 2
    layer = DCNv4(c["C"], c["k"], 1, pad, 1, c["G"], 1.0, c["dw_k"], c["cfs"], bool(c["rc"]), c["output_bias"],
                  c["without_pointwise"])
    keys = _dcnv4_keys(c["C"], c["G"], c["k"], c["rc"], c["dw_k"], c["output_bias"], c["without_pointwise"], c["cfs"])
    assert {n: tuple(t.shape) for n, t in layer.state_dict().items()} == keys
    sd = {n: t.double() for n, t in _random_state(keys).items()}
    layer.double().load_state_dict(sd, strict=True)
    N, H, W, C, G = 2, 5, 6, c["C"], c["G"]
    x = torch.randn(N, H * W, C, dtype=torch.float64)
    with torch.no_grad():
        ours = layer(x, (H, W))
        # DCNv4.forward, written out on the reference op
        v = x if c["without_pointwise"] else F.linear(x, sd["value_proj.weight"], sd["value_proj.bias"])
        v = v.reshape(N, H, W, -1)
        om_in = x
        if c["dw_k"] is not None:
            om_in = F.conv2d(x.view(N, H, W, C).permute(0, 3, 1, 2), sd["offset_mask_dw.weight"],
                             sd["offset_mask_dw.bias"], padding=(c["dw_k"] - 1) // 2, groups=C)
            om_in = om_in.permute(0, 2, 3, 1).reshape(N, H * W, C)
        om = F.linear(om_in, sd["offset_mask.weight"], sd["offset_mask.bias"]).reshape(N, H, W, -1)
        out = dcnv4_ref(v, om, c["k"], 1, pad, 1, G, 1.0, bool(c["rc"]))
        if c["cfs"]:
            s = F.linear(out, sd["center_feature_scale_proj_weight"], sd["center_feature_scale_proj_bias"]).sigmoid()
            out = out * (1 - s[..., None].repeat(1, 1, 1, 1, C // G).flatten(-2)) + \
                v * s[..., None].repeat(1, 1, 1, 1, C // G).flatten(-2)
        out = out.reshape(N, H * W, -1)
        if not c["without_pointwise"]:
            out = F.linear(out, sd["output_proj.weight"], sd.get("output_proj.bias"))
    assert_close(ours, out, torch.float64)


def test_layers_train_and_reject_bad_input():
    torch.manual_seed(0)
    layer = DCNv3(16, group=2)
    with torch.no_grad():  # the anchors zero-initialise offset/mask; move them off zero
        layer.offset.bias.normal_()
    x = torch.randn(2, 5, 6, 16, requires_grad=True)
    layer(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    with pytest.raises(ValueError, match=r"DCNv3: input must be a \(N, H, W, 16\) tensor"):
        layer(torch.randn(2, 16, 5, 6))
    with pytest.raises(ValueError, match="remove_center is only compatible with odd kernel size"):
        DCNv3(16, 4, remove_center=True)
    with pytest.raises(ValueError, match="channels must be divisible by group"):
        DCNv4(30, group=4)
    with pytest.raises(ValueError, match=r"DCNv4: shape \(H, W\) = \(5, 5\) must have H \* W = L = 30"):
        DCNv4(16, group=2)(torch.randn(1, 30, 16), (5, 5))


def test_dcnv4_packed_padding_gets_zero_gradient():
    x, off, m = _inputs(1, 4, 5, 2, 4, 9)
    om = torch.cat([off.unflatten(-1, (2, 18)), m.unflatten(-1, (2, 9))], -1).flatten(-2)
    om = torch.cat([om, torch.randn(1, 4, 5, 2)], -1).requires_grad_()  # 54 -> 56
    out = dcnv4(x, om, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0)
    assert_close(out, dcn_aggregate_ref(x, off, m, 3, 1, 1, 1, 2))
    (grad,) = torch.autograd.grad(out.square().sum(), om)
    assert torch.equal(grad[..., 54:], torch.zeros_like(grad[..., 54:])) and grad[..., :54].abs().sum() > 0


# --------------------------------------------------------------------------
# Determinism, half precision


def _grads(x, off, m, backend="auto", **kw):
    leaves = [t.clone().requires_grad_() for t in (x, off, m)]
    out = dcn_aggregate(*leaves, 3, 1, 1, 1, off.shape[-1] // 18, backend=backend, **kw)  # 3x3: K = 9
    return (out, *torch.autograd.grad((out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), leaves))


def test_cpu_backward_is_bit_identical_across_thread_counts_and_deterministic_mode():
    x, off, m = _inputs(2, 12, 11, 2, 8, 9, spread=0.3)  # many outputs hit each pixel
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grads(x, off, m, mask_softmax=True))
        with deterministic():
            results += [_grads(x, off, m, mask_softmax=True) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_backward_matches_float32(dtype):
    """DCNv4's bf16 backward is broken upstream; here every half dtype runs and matches float32."""
    x, off, m = _inputs(2, 9, 10, 4, 16, 9, spread=0.2)
    got = _grads(*(t.to(dtype) for t in (x, off, m)))
    want = _grads(*(t.to(dtype).float() for t in (x, off, m)))
    for a, b in zip(got, want):
        assert a.dtype == dtype and torch.isfinite(a.float()).all()
        assert_close(a.float(), b, dtype, scale=4)


# --------------------------------------------------------------------------
# Direct calls


def _direct_args():
    x, off, m = _inputs(1, 3, 4, 2, 2, 9)
    return dict(input=x, offset=off, mask=m, kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1],
                group=2, offset_scale=1.0, remove_center=False, mask_softmax=False)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {"input": a["input"][0]}, "input must be a 4-D tensor (N, H, W, group * Cg)"),
    (lambda a: {"offset": a["offset"][..., :35].contiguous()}, "offset must have shape (N, Ho, Wo, group * K * 2)"),
    (lambda a: {"mask": a["mask"].double()}, "mask must be float32 (input's dtype)"),
    (lambda a: {"input": a["input"].int()}, "input must be float32, float16, bfloat16 or float64"),
    (lambda a: {"mask": a["mask"].transpose(1, 2)}, "mask must"),
    (lambda a: {"kernel_size": [3]}, "kernel_size must be a list of 2 ints"),
    (lambda a: {"stride": [0, 1]}, "stride[0] must be in [1, 1048576]; got 0"),
    (lambda a: {"padding": [1, -1]}, "padding[1] must be in [0, 1048576]; got -1"),
    (lambda a: {"group": 3}, "group must be >= 1 and divide input's channels (4); got 3"),
    (lambda a: {"kernel_size": [9, 3]}, "the dilated kernel (9 x 3) must fit the padded input (5 x 6)"),
    (lambda a: {"kernel_size": [1, 1], "padding": [0, 0], "remove_center": True}, "remove_center needs more than"),
])
def test_direct_calls_raise_value_errors(mutate, match):
    a = _direct_args()
    a.update(mutate(a))
    fwd = list(a.values())
    from fastvision.ops.dcn import _DCN
    with pytest.raises(ValueError, match=r"^fastvision\.dcn_fwd: " + __import__("re").escape(match)):
        torch.ops.fastvision.dcn_fwd(*fwd)
    with pytest.raises(ValueError, match=r"^fastvision\.dcn_fwd: "):  # the Python checks (fake, Triton kernels)
        _DCN.forward.check(*fwd)
    dout = torch.randn(1, 3, 4, 4)
    for fn in (torch.ops.fastvision.dcn_bwd, _DCN.backward.check):
        with pytest.raises(ValueError, match=r"^fastvision\.dcn_bwd: "):
            fn(dout, *fwd)
    a = _direct_args()
    with pytest.raises(ValueError, match=r"^fastvision\.dcn_bwd: dout must have shape \(N, Ho, Wo, C\)"):
        torch.ops.fastvision.dcn_bwd(dout[..., :3].contiguous(), *a.values())


# --------------------------------------------------------------------------
# Triton launchers, interpreted, with small blocks


@pytest.mark.triton
@pytest.mark.parametrize("cfg", [dict(k=(3, 3), p=(1, 1), s=(1, 1), sm=False, rc=False),
                                 dict(k=(3, 5), p=(2, 1), s=(2, 1), sm=True, rc=True)], ids=["3x3", "3x5-rc-sm"])
def test_triton_launchers_small_blocks_and_deterministic(cfg):
    tk = import_triton_kernels_interpreted("fastvision.triton.dcn")
    (kh, kw), (ph, pw), (sh, sw) = cfg["k"], cfg["p"], cfg["s"]
    H, W, G, Cg = 4, 5, 2, 3
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    K = kh * kw - int(cfg["rc"])
    x, off, m = _inputs(1, H, W, G, Cg, K, Ho, Wo, spread=0.4, positive_mask=not cfg["sm"])
    args = (list(cfg["k"]), list(cfg["s"]), list(cfg["p"]), [1, 1], G, 0.8, cfg["rc"], cfg["sm"])
    small = dict(BQ=8, BR=16, BC=4)  # several output and input-row blocks (the interpreter is slow)
    out = tk.dcn_fwd(x, off, m, *args, blocks=small)
    assert_close(out, torch.ops.fastvision.dcn_fwd(x, off, m, *args))
    dout = torch.randn_like(out)
    want = torch.ops.fastvision.dcn_bwd(dout, x, off, m, *args)
    got = tk.dcn_bwd(dout, x, off, m, *args, blocks=small)
    for a, b in zip(got, want):
        assert_close(a, b, scale=20)
    with deterministic():
        again = tk.dcn_bwd(dout, x, off, m, *args, blocks=small)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


# --------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_backward_is_bit_identical_in_deterministic_mode(dtype):
    x, off, m = (t.cuda().to(dtype) for t in _inputs(2, 40, 44, 4, 32, 9, spread=0.2))
    with deterministic():
        first = _grads(x, off, m, mask_softmax=True)
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(first, _grads(x, off, m, mask_softmax=True)))
    want = _grads(*(t.float() for t in (x, off, m)), mask_softmax=True)
    for a, b in zip(first, want):
        assert_close(a.float(), b, dtype, scale=4)


def test_triton_limits_say_why():
    from fastvision.ops.dcn import _DCN
    assert _DCN.limits("triton", group_channels=1024, group=65535) is None
    assert "up to 1024 channels per group; got 1025" in _DCN.limits("triton", group_channels=1025, group=1)
    assert "up to 65535 groups" in _DCN.limits("triton", group_channels=1, group=65536)
    assert _DCN.limits("cpu", group_channels=4096, group=70000) is None
