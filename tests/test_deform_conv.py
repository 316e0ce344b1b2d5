"""deform_conv2d specifics (the generic checks run on tests/conformance/deform_conv.py;
torchvision itself is compared in tests/test_deform_conv_torchvision.py where it installs).

* The reference equals an independent formulation: F.grid_sample (zeros padding,
  align_corners=False: the same bilinear rule) and a unfold-free sum over kernel points.
* Sampling at the borders: y <= -1, y >= H, x <= -1, x >= W read 0, exactly at
  -1 and H too; a corner outside the image reads 0.
* torchvision's offset gradient at a coordinate exactly -1: one-sided from row /
  column 0 (the sample, its input and mask gradients 0), pinned by hand on a tiny
  input for the CPU kernel, the reference and the Triton kernels; and every
  gradient of the CPU and Triton kernels against the reference with zero offsets
  and padding 1 and with samples exactly on -1, 0, H - 1 / W - 1 and H / W.
* Determinism: the CPU backward is bit-identical twice, across thread counts and
  in deterministic mode; on a GPU (``-m gpu``) the Triton backward twice.
* bfloat16 backward runs and matches float32.
* The layer: torchvision's parameter names, shapes and initialisation.
* Direct calls' errors (C++ entry points) and the Triton launchers with small
  blocks under the interpreter (several position, channel and output blocks).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastvision.ops import DeformConv2d, deform_conv2d
from fastvision.reference.deform_conv import deform_conv2d_ref
from fastvision.testing import assert_close, import_triton_kernels_interpreted


def grid_sample_formula(x, offset, weight, bias, stride, padding, dilation, mask):
    """deform_conv2d written with F.grid_sample, one kernel point at a time."""
    B, Cin, H, W = x.shape
    Cout, Cg, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho, Wo = offset.shape[2:]
    K, G = kh * kw, offset.shape[1] // (2 * kh * kw)
    groups = Cin // Cg
    oy = (torch.arange(Ho, dtype=x.dtype) * sh - ph)[:, None]
    ox = (torch.arange(Wo, dtype=x.dtype) * sw - pw)[None, :]
    out = torch.zeros(B, Cout, Ho, Wo, dtype=x.dtype)
    xg = x.reshape(B * G, Cin // G, H, W)
    for k in range(K):
        i, j = divmod(k, kw)
        off = offset.reshape(B, G, K, 2, Ho, Wo)[:, :, k]
        y = oy + i * dh + off[:, :, 0]
        xx = ox + j * dw + off[:, :, 1]
        grid = torch.stack([(xx + 0.5) / W * 2 - 1, (y + 0.5) / H * 2 - 1], -1).reshape(B * G, Ho, Wo, 2)
        s = F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        s = s.reshape(B, G, Cin // G, Ho, Wo)
        if mask is not None:
            s = s * mask.reshape(B, G, K, Ho, Wo)[:, :, k, None]
        s = s.reshape(B, groups, Cg, Ho, Wo)
        w = weight.reshape(groups, Cout // groups, Cg, K)[..., k]
        out += torch.einsum("bgchw,goc->bgohw", s, w).reshape(B, Cout, Ho, Wo)
    return out + bias[None, :, None, None] if bias is not None else out


@pytest.mark.parametrize("cfg", [
    dict(k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, G=1),
    dict(k=(3, 5), stride=(2, 1), padding=(0, 2), dilation=(2, 1), groups=2, G=2),
    dict(k=(1, 1), stride=(1, 2), padding=(0, 0), dilation=(1, 1), groups=1, G=4),
])
@pytest.mark.parametrize("use_mask", [True, False])
def test_reference_and_kernel_equal_grid_sample_formula(cfg, use_mask):
    g = torch.Generator().manual_seed(0)
    kh, kw = cfg["k"]
    B, Cin, Cout, H, W = 2, 4, 6, 7, 8
    Ho = (H + 2 * cfg["padding"][0] - (cfg["dilation"][0] * (kh - 1) + 1)) // cfg["stride"][0] + 1
    Wo = (W + 2 * cfg["padding"][1] - (cfg["dilation"][1] * (kw - 1) + 1)) // cfg["stride"][1] + 1
    d = torch.float64
    x = torch.randn(B, Cin, H, W, generator=g, dtype=d)
    offset = torch.randn(B, 2 * cfg["G"] * kh * kw, Ho, Wo, generator=g, dtype=d) * 3
    weight = torch.randn(Cout, Cin // cfg["groups"], kh, kw, generator=g, dtype=d)
    bias = torch.randn(Cout, generator=g, dtype=d)
    mask = torch.rand(B, cfg["G"] * kh * kw, Ho, Wo, generator=g, dtype=d) if use_mask else None
    args = (x, offset, weight, bias, cfg["stride"], cfg["padding"], cfg["dilation"], mask)
    expect = grid_sample_formula(*args)
    torch.testing.assert_close(deform_conv2d_ref(*args), expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(deform_conv2d(*args), expect, rtol=1e-10, atol=1e-12)


def _one_point(y, x, H=3, W=4):
    """deform_conv2d of a 1x1 kernel with one output position sampling (y, x) of a
    ramp image, float64; -> (value, d value / d offset)."""
    img = (torch.arange(H * W, dtype=torch.float64) + 1).reshape(1, 1, H, W)
    # output (0, 0) with a 1x1 kernel and padding 0 samples (dy, dx) itself
    offset = torch.tensor([y, x], dtype=torch.float64).reshape(1, 2, 1, 1).expand(1, 2, H, W).contiguous()
    offset.requires_grad_()
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = deform_conv2d(img, offset, w)
    out[0, 0, 0, 0].backward()
    return out[0, 0, 0, 0].item(), offset.grad[0, :, 0, 0].tolist()


@pytest.mark.parametrize("y,x", [(-1.0, -1.0), (3.0, 1.0), (1.0, 4.0), (-1.5, 2.0), (1.0, -1.5), (7.0, -9.0),
                                 (-1.0, 4.0), (3.0, -1.0), (float("nan"), 1.0), (1.0, float("inf")),
                                 (-float("inf"), 0.0), (-1.0, float("nan"))])
def test_samples_outside_read_zero(y, x):
    value, grad = _one_point(y, x)
    assert value == 0.0 and grad == [0.0, 0.0]


def _point_grads(y, x, backend, H=3, W=4):
    """(value, [d/dy, d/dx], dmask, sum |dinput|) of the sample at (y, x) of the ramp image
    (pixel (r, c) = r * W + c + 1) through a 1x1 kernel with a mask, on `backend`."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    img = (torch.arange(H * W, dtype=dtype) + 1).reshape(1, 1, H, W)
    offset = torch.tensor([y, x], dtype=dtype).reshape(1, 2, 1, 1).expand(1, 2, H, W).contiguous()
    mask = torch.ones(1, 1, H, W, dtype=dtype)
    w = torch.ones(1, 1, 1, 1, dtype=dtype)
    dout = torch.zeros(1, 1, H, W, dtype=dtype)
    dout[0, 0, 0, 0] = 1  # output (0, 0) samples (y, x) itself
    if backend == "triton":
        dc = import_triton_kernels_interpreted("fastvision.triton.deform_conv")
        args = ([1, 1], [0, 0], [1, 1])
        out = dc.deform_conv2d_fwd(img, offset, w, None, mask, *args)
        dimg, doff, _, dmask = dc.deform_conv2d_bwd(dout, img, offset, w, mask, *args)
    else:
        leaves = [t.clone().requires_grad_() for t in (img, offset, mask)]
        if backend == "reference":
            out = deform_conv2d_ref(leaves[0], leaves[1], w, mask=leaves[2])
        else:
            out = deform_conv2d(leaves[0], leaves[1], w, mask=leaves[2], backend=backend)
        dimg, doff, dmask = torch.autograd.grad(out, leaves, dout)
    return out[0, 0, 0, 0].item(), doff[0, :, 0, 0].tolist(), dmask[0, 0, 0, 0].item(), dimg.abs().sum().item()


# torchvision 0.29.1's numbers (get_coordinate_weight: the corners alone, no range test).
# H = 3, W = 4; at y == -1 row 0 is a corner of weight 0: d/dy = row 0 interpolated
# along x, d/dx = 0 (the row -1 is outside); likewise at x == -1.
ONE_SIDED = [
    ((-1.0, 1.0), [2.0, 0.0]),     # d/dy = pixel (0, 1)
    ((-1.0, 0.5), [1.5, 0.0]),     # d/dy = (pixel (0, 0) + pixel (0, 1)) / 2
    ((-1.0, 3.0), [4.0, 0.0]),     # x = W - 1: d/dy = pixel (0, 3)
    ((1.0, -1.0), [0.0, 5.0]),     # d/dx = pixel (1, 0)
    ((2.0, -1.0), [0.0, 9.0]),     # y = H - 1: d/dx = pixel (2, 0)
    ((-0.5, -1.0), [0.0, 0.5]),    # d/dx = half of pixel (0, 0) (row -1 outside)
    ((-1.0, -1.0), [0.0, 0.0]),    # the only corner inside, (0, 0), has weight 0 and no derivative
]


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("point,grad", ONE_SIDED, ids=[str(p) for p, _ in ONE_SIDED])
def test_offset_gradient_is_one_sided_at_minus_one(point, grad, backend):
    """At a coordinate exactly -1 the sample reads 0 (and so do its input and mask
    gradients) but the offset gradient is torchvision's one-sided derivative from inside."""
    value, doff, dmask, dinput = _point_grads(*point, backend)
    assert value == 0.0 and dmask == 0.0 and dinput == 0.0
    assert doff == grad


def test_corners_outside_read_zero():
    # (-0.5, 0.5): the top corners are outside; half of the bottom-row interpolation remains
    value, (gy, gx) = _one_point(-0.5, 0.5)
    assert value == pytest.approx(0.5 * 1.5)  # 0.5 * (pixels 1 and 2 averaged)
    assert gy == pytest.approx(1.5) and gx == pytest.approx(0.5)
    value, _ = _one_point(2.5, 3.5)  # bottom-right: only pixel (2, 3) = 12, weight 1/4
    assert value == pytest.approx(12 / 4)


def _grads(sample, backend="cpu"):
    x, off, w, b, m = (t.detach().clone().requires_grad_() for t in sample)
    out = deform_conv2d(x, off, w, b, padding=1, mask=m, backend=backend)
    gout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad(out, (x, off, w, b, m), gout)


def _sample(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 12, 11, generator=g)
    off = torch.randn(2, 2 * 2 * 9, 12, 11, generator=g) * 2
    w = torch.randn(6, 4, 3, 3, generator=g) * 0.2
    b = torch.randn(6, generator=g)
    m = torch.rand(2, 2 * 9, 12, 11, generator=g)
    return [t.to(dtype) for t in (x, off, w, b, m)]


def test_cpu_backward_is_bit_identical_twice_and_across_thread_counts():
    s = _sample()
    first = _grads(s)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _grads(s)
    finally:
        torch.set_num_threads(threads)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = _grads(s)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b, c, d in zip(first, _grads(s), single, det):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_bfloat16_backward_runs_and_matches_float32():
    for dtype in (torch.bfloat16, torch.float16):
        # float32 on the rounded inputs: offset gradients jump where rounding moves a sample across a pixel
        s = _sample(dtype)
        ref = _grads([t.float() for t in s])
        grads = _grads(s)
        for g, r in zip(grads, ref):
            assert g.dtype == dtype
            assert_close(g.float(), r, dtype, scale=4)


def test_layer_matches_torchvision_parameters_and_init():
    torch.manual_seed(0)
    layer = DeformConv2d(8, 12, 3, stride=2, padding=1, dilation=1, groups=2)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight.shape == (12, 4, 3, 3) and layer.bias.shape == (12,)
    torch.manual_seed(0)
    w = torch.empty(12, 4, 3, 3)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = 1 / math.sqrt(4 * 9)
    b = torch.empty(12).uniform_(-bound, bound)
    assert torch.equal(layer.weight.detach(), w) and torch.equal(layer.bias.detach(), b)
    assert DeformConv2d(4, 4, 3, bias=False).bias is None
    x = torch.randn(2, 8, 9, 9)
    offset = torch.randn(2, 18, 5, 5)
    out = layer(x, offset)
    expect = deform_conv2d_ref(x, offset, layer.weight, layer.bias, 2, 1, 1)
    assert_close(out, expect)
    clone = DeformConv2d(8, 12, 3, stride=2, padding=1, groups=2)
    clone.load_state_dict(layer.state_dict(), strict=True)
    with pytest.raises(ValueError, match="in_channels must be divisible by groups"):
        DeformConv2d(7, 12, 3, groups=2)
    with pytest.raises(ValueError, match="out_channels must be divisible by groups"):
        DeformConv2d(8, 11, 3, groups=2)


def test_direct_calls_raise_clear_errors():
    x, w, off = torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), torch.randn(1, 18, 3, 3)
    fwd = torch.ops.fastvision.deform_conv2d_fwd
    fwd(x, off, w, None, None, [1, 1], [0, 0], [1, 1])  # valid
    cases = [
        ((x, torch.randn(1, 17, 3, 3), w, None, None, [1, 1], [0, 0], [1, 1]), "offset.shape[1] must be"),
        ((x, off, w, None, None, [0, 1], [0, 0], [1, 1]), "stride[0] must be in [1, 2^30]"),
        ((x, off, w, None, None, [1, 1], [0, 0]), None),
        ((x, off, w, None, None, [1, 1], [-1, 0], [1, 1]), "padding[0] must be in [0, 2^30]"),
        ((x, off, w, torch.randn(3), None, [1, 1], [0, 0], [1, 1]), "bias must have shape"),
        ((x, off, w, None, torch.randn(1, 9, 3, 4), [1, 1], [0, 0], [1, 1]), "mask must have shape"),
        ((x, off, torch.randn(2, 3, 3, 3), None, None, [1, 1], [0, 0], [1, 1]), "divides input's channels 4"),
        ((x, off.double(), w, None, None, [1, 1], [0, 0], [1, 1]), "offset must be float32 (input's dtype)"),
        ((x, off.transpose(2, 3), w, None, None, [1, 1], [0, 0], [1, 1]), "offset must be contiguous"),
    ]
    for args, match in cases:
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            fwd(*args)
        if match is not None:
            assert match in str(info.value) and "fastvision.deform_conv2d_fwd" in str(info.value)
    bwd = torch.ops.fastvision.deform_conv2d_bwd
    with pytest.raises(ValueError, match="dout must have shape"):
        bwd(torch.randn(1, 2, 3, 4), x, off, w, None, [1, 1], [0, 0], [1, 1])


@pytest.mark.triton
@pytest.mark.parametrize("use_mask", [True, False])
def test_triton_launchers_with_small_blocks(use_mask):
    """Several position, input-channel and output-channel blocks per call; offset groups
    spanning channel blocks and weight groups inside them."""
    dc = import_triton_kernels_interpreted("fastvision.triton.deform_conv")
    blocks = dict(BP=16, BC=16, BO=16)
    g = torch.Generator().manual_seed(3)
    B, Cin, Cout, H, W, groups, G = 1, 36, 34, 4, 5, 2, 3  # Cg 18, Og 17 > 16; 20 positions > 16
    x = torch.randn(B, Cin, H, W, generator=g)
    off = torch.randn(B, 2 * G * 3, H, W, generator=g) * 2  # a 3 x 1 kernel: 3 points (the interpreter is slow)
    w = torch.randn(Cout, Cin // groups, 3, 1, generator=g) * 0.1
    b = torch.randn(Cout, generator=g)
    m = torch.rand(B, G * 3, H, W, generator=g) if use_mask else None
    args = ([1, 1], [1, 0], [1, 1])
    out = dc.deform_conv2d_fwd(x, off, w, b, m, *args, blocks=blocks)
    assert_close(out, deform_conv2d(x, off, w, b, 1, (1, 0), 1, m, backend="cpu"))
    dout = torch.randn(out.shape, generator=g)
    got = dc.deform_conv2d_bwd(dout, x, off, w, m, *args, blocks=blocks)
    expect = torch.ops.fastvision.deform_conv2d_bwd(dout, x, off, w, m, *args)
    for name, a, e in zip(("dinput", "doffset", "dweight", "dmask"), got, expect):
        assert_close(a, e, scale=20, msg=name)


def _edge_case(kind, dtype=torch.float64, use_mask=True, seed=7):
    """(x, offset, weight, bias, mask) of a 3x3 kernel with padding 1 (B 1, Cin 4, Cout 3,
    H 4, W 5, offset groups 2): zero offsets ("zero": the first / last kernel row and
    column sit exactly on -1 / H / W at the border) or offsets putting each sample's y on
    one of -1, 0, H - 1, H (and a few others) and x on one of -1, 0, W - 1, W (...)."""
    g = torch.Generator().manual_seed(seed)
    B, Cin, Cout, H, W, G, K = 1, 4, 3, 4, 5, 2, 9
    x = torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(Cout, Cin, 3, 3, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(Cout, generator=g, dtype=torch.float64)
    m = torch.rand(B, G * K, H, W, generator=g, dtype=torch.float64) if use_mask else None
    if kind == "zero":
        off = torch.zeros(B, G, K, 2, H, W, dtype=torch.float64)
    else:
        k = torch.arange(K)
        base_y = (torch.arange(H) - 1)[None, :, None] + (k // 3)[:, None, None]  # (K, H, 1): stride 1, padding 1
        base_x = (torch.arange(W) - 1)[None, None, :] + (k % 3)[:, None, None]  # (K, 1, W)
        ty = torch.tensor([-1.0, -1.0, 0.0, H - 1.0, H, -0.5, 1.25, H - 0.75, -1.5], dtype=torch.float64)
        tx = torch.tensor([-1.0, -1.0, 0.0, W - 1.0, W, -0.25, 2.5, W - 0.5, W + 0.5], dtype=torch.float64)
        yy = ty[torch.randint(len(ty), (B, G, K, H, W), generator=g)]
        xx = tx[torch.randint(len(tx), (B, G, K, H, W), generator=g)]
        off = torch.stack([yy - base_y, xx - base_x], 3)  # exact: integers and quarters
    off = off.reshape(B, G * K * 2, H, W)
    return [t.to(dtype) if t is not None else None for t in (x, off, w, b, m)]


def _ref_grads(sample, dout):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in sample]
    x, off, w, b, m = leaves
    out = deform_conv2d_ref(x, off, w, b, 1, 1, 1, m)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout)
    return out, dict(zip(["dinput", "doffset", "dweight", "dbias", "dmask"], grads))


EDGE_KINDS = [("zero", True), ("zero", False), ("targets", True), ("targets", False)]


@pytest.mark.parametrize("kind,use_mask", EDGE_KINDS)
def test_reference_offset_gradient_is_one_sided_at_the_border(kind, use_mask):
    """The cases below do exercise the rule: the reference's offset gradient is nonzero at
    samples exactly on -1, where a range-tested rule would give 0."""
    s = _edge_case(kind, use_mask=use_mask)
    x, off, w, b, m = s
    k = torch.arange(9)
    H, W = 4, 5
    base_y = ((torch.arange(H) - 1)[None, :, None] + (k // 3)[:, None, None]).expand(9, H, W)
    o = off.reshape(1, 2, 9, 2, H, W)
    on_minus_one = (base_y + o[:, :, :, 0]) == -1  # (1, 2, 9, H, W)
    dout = torch.linspace(-1, 1, 3 * H * W, dtype=torch.float64).reshape(1, 3, H, W)
    _, grads = _ref_grads(s, dout)
    dy = grads["doffset"].reshape(1, 2, 9, 2, H, W)[:, :, :, 0]
    assert on_minus_one.any() and (dy[on_minus_one] != 0).any()


@pytest.mark.parametrize("kind,use_mask", EDGE_KINDS)
def test_cpu_gradients_at_the_border_equal_the_reference(kind, use_mask):
    s = _edge_case(kind, use_mask=use_mask)
    dout = torch.linspace(-1, 1, 3 * 4 * 5, dtype=torch.float64).reshape(1, 3, 4, 5)
    out, expect = _ref_grads(s, dout)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in s]
    x, off, w, b, m = leaves
    got_out = deform_conv2d(x, off, w, b, 1, 1, 1, m, backend="cpu")
    got = torch.autograd.grad(got_out, [t for t in leaves if t is not None], dout)
    assert_close(got_out, out)
    for (name, e), a in zip(expect.items(), got):
        assert_close(a, e, msg=name)
    # float32 too (widened to float32 accumulation, the same rule)
    s32 = [t.float() if t is not None else None for t in s]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in s32]
    x, off, w, b, m = leaves
    got32 = torch.autograd.grad(deform_conv2d(x, off, w, b, 1, 1, 1, m, backend="cpu"),
                                [t for t in leaves if t is not None], dout.float())
    for (name, e), a in zip(expect.items(), got32):
        assert_close(a, e, dtype=torch.float32, msg=name)


@pytest.mark.triton
@pytest.mark.parametrize("kind,use_mask", [("zero", True), ("targets", True), ("targets", False)])
def test_triton_gradients_at_the_border_equal_the_reference(kind, use_mask):
    dc = import_triton_kernels_interpreted("fastvision.triton.deform_conv")
    s = _edge_case(kind, use_mask=use_mask)
    dout = torch.linspace(-1, 1, 3 * 4 * 5, dtype=torch.float64).reshape(1, 3, 4, 5)
    out, expect = _ref_grads(s, dout)
    x, off, w, b, m = (t.float() if t is not None else None for t in s)
    args = ([1, 1], [1, 1], [1, 1])
    blocks = dict(BP=16, BC=16, BO=16)  # two position blocks
    assert_close(dc.deform_conv2d_fwd(x, off, w, b, m, *args, blocks=blocks), out, dtype=torch.float32)
    got = dc.deform_conv2d_bwd(dout.float(), x, off, w, m, *args, blocks=blocks)
    for name, a in zip(("dinput", "doffset", "dweight", "dmask"), got):
        if name == "dmask" and m is None:
            continue
        assert_close(a, expect[name], dtype=torch.float32, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_backward_is_bit_identical_twice(dtype):
    s = [t.cuda() for t in _sample(dtype)]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _grads(s, "triton"), _grads(s, "triton")
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    default = _grads(s, "auto")  # the default path is the same deterministic kernels
    for a, b in zip(first, default):
        assert torch.equal(a, b)
