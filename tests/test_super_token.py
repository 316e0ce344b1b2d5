"""Super token attention (STViT): what the conformance specs do not cover.

The anchor here is a reimplementation of STViT's ``StokenAttention.stoken_forward``
written from its formulas (``models/stvit.py``): identity-kernel conv2d /
conv_transpose2d as its Unfold / Fold, the association loop under no_grad, the
final aggregation divided by the detached affinity sums, STViT's Attention with
its per-head interleaved qkv layout. The ops, the reference and the layer are
compared with it; the models' parameter names with the anchor's (recorded from
STViT's own module tree in tests/data/stvit_state_dict_shapes.json).
"""

import json
import pathlib
import random

import pytest
import torch
import torch.nn.functional as F

from fastvision.models import STViT, stvit_base, stvit_large, stvit_small
from fastvision.models.stvit import load_checkpoint
from fastvision.ops import StokenAttention, super_token_sampling, super_token_upsample
from fastvision.reference.super_token import super_token_sampling_ref
from fastvision.testing import assert_close, check_gradcheck

DATA = pathlib.Path(__file__).parent / "data"


# --------------------------------------------------------------------------
# The anchor's math


def _eye(dtype):
    return torch.eye(9, dtype=dtype).reshape(9, 1, 3, 3)


def anchor_unfold(x):
    b, c, h, w = x.shape
    return F.conv2d(x.reshape(b * c, 1, h, w), _eye(x.dtype), padding=1).reshape(b, c * 9, h * w)


def anchor_fold(x):
    return F.conv_transpose2d(x, _eye(x.dtype), padding=1)


def anchor_attention(attn, x):
    """STViT's Attention.forward with `attn`'s weights: softmax over keys of (k^T q) * scale."""
    B, C, H, W = x.shape
    q, k, v = attn.qkv(x).reshape(B, attn.num_heads, C // attn.num_heads * 3, H * W).chunk(3, dim=2)
    weights = ((k.transpose(-1, -2) @ q) * attn.scale).softmax(dim=-2)
    return attn.proj((v @ weights).reshape(B, C, H, W))


def anchor_stoken_forward(x, stoken_size, n_iter, refine=lambda s: s, parts=False):
    B, C, H0, W0 = x.shape
    h, w = stoken_size
    pad_r, pad_b = (w - W0 % w) % w, (h - H0 % h) % h
    if pad_r > 0 or pad_b > 0:
        x = F.pad(x, (0, pad_r, 0, pad_b))
    _, _, H, W = x.shape
    hh, ww = H // h, W // w
    scale = C ** -0.5
    stoken_features = F.adaptive_avg_pool2d(x, (hh, ww))
    pixel_features = x.reshape(B, C, hh, h, ww, w).permute(0, 2, 4, 3, 5, 1).reshape(B, hh * ww, h * w, C)
    with torch.no_grad():
        for idx in range(n_iter):
            stoken_features = anchor_unfold(stoken_features).transpose(1, 2).reshape(B, hh * ww, C, 9)
            affinity_matrix = (pixel_features @ stoken_features * scale).softmax(-1)
            affinity_matrix_sum = anchor_fold(affinity_matrix.sum(2).transpose(1, 2).reshape(B, 9, hh, ww))
            if idx < n_iter - 1:
                stoken_features = pixel_features.transpose(-1, -2) @ affinity_matrix
                stoken_features = anchor_fold(stoken_features.permute(0, 2, 3, 1).reshape(B * C, 9, hh, ww))
                stoken_features = stoken_features.reshape(B, C, hh, ww) / (affinity_matrix_sum + 1e-12)
    stoken_features = pixel_features.transpose(-1, -2) @ affinity_matrix
    stoken_features = anchor_fold(stoken_features.permute(0, 2, 3, 1).reshape(B * C, 9, hh, ww)).reshape(B, C, hh, ww)
    stoken_features = stoken_features / (affinity_matrix_sum.detach() + 1e-12)
    if parts:
        return stoken_features, affinity_matrix
    stoken_features = refine(stoken_features)
    stoken_features = anchor_unfold(stoken_features).transpose(1, 2).reshape(B, hh * ww, C, 9)
    pixel_features = stoken_features @ affinity_matrix.transpose(-1, -2)
    pixel_features = pixel_features.reshape(B, hh, ww, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    return pixel_features[:, :, :H0, :W0]


def anchor_layer(layer, x):
    """STViT's StokenAttention.forward with `layer`'s weights."""
    refine = (lambda s: s) if not layer.refine else \
        (lambda s: anchor_attention(layer.stoken_refine, s)) if layer.refine_attention else layer.stoken_refine
    if layer.stoken_size[0] > 1 or layer.stoken_size[1] > 1:
        return anchor_stoken_forward(x, layer.stoken_size, layer.n_iter, refine)
    return refine(x)


# Random shapes: H != W, H or W = 1, sizes not divisible by the stoken size, n_iter 1 and 2.
_rng = random.Random(7)
SHAPES = [(2, 6, 9, 7, (3, 2), 1), (1, 5, 1, 11, (2, 4), 2), (2, 3, 10, 1, (4, 3), 1), (1, 8, 8, 8, (4, 4), 2),
          (2, 4, 7, 19, (3, 8), 1)] + [
    (_rng.choice([1, 2]), _rng.choice([2, 5, 16]), _rng.randint(1, 14), _rng.randint(1, 14),
     (_rng.randint(1, 6), _rng.randint(1, 6)), _rng.choice([1, 2])) for _ in range(8)]


def _id(shape):
    return "x".join(map(str, shape[:4])) + f"-s{shape[4][0]}x{shape[4][1]}-it{shape[5]}"


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_ops_match_anchor_forward_backward(shape, backend):
    """sampling + upsampling (no refinement) and their gradient in x, float64, vs the anchor's math."""
    B, C, H, W, ss, n_iter = shape
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(len(SHAPES)))
    xa, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    s_anchor, a_anchor = anchor_stoken_forward(xa, ss, n_iter, parts=True)
    s, a = super_token_sampling(xo, ss, n_iter, backend=backend)
    assert_close(s, s_anchor, torch.float64)
    assert_close(a, a_anchor, torch.float64)
    assert not a.requires_grad
    # Through a refinement (so the upsample's stokens gradient is not trivial) and back.
    w = torch.linspace(-1, 2, C, dtype=torch.float64)[None, :, None, None]
    out = super_token_upsample(s * w + s.square(), a, ss, (H, W), backend=backend)
    out_anchor = anchor_stoken_forward(xa, ss, n_iter, refine=lambda t: t * w + t.square())
    assert_close(out, out_anchor, torch.float64)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    out_anchor.backward(g)
    assert_close(xo.grad, xa.grad, torch.float64)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=_id)
def test_float32_ops_match_anchor(shape):
    B, C, H, W, ss, n_iter = shape
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0))
    xa, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_anchor = anchor_stoken_forward(xa, ss, n_iter, refine=torch.tanh)
    s, a = super_token_sampling(xo, ss, n_iter)
    out = super_token_upsample(torch.tanh(s), a, ss, (H, W))
    assert_close(out, out_anchor, torch.float32, scale=5)
    out.sum().backward()
    out_anchor.sum().backward()
    assert_close(xo.grad, xa.grad, torch.float32, scale=20)


def test_padding_and_out_of_grid_neighbours_take_softmax_mass():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    _, a = super_token_sampling(x, (2, 2), 1)  # 3 x 3 cells; the last row and column of cells are half padding
    assert torch.allclose(a.sum(-1), torch.ones((), dtype=torch.float64))
    # Cell (2, 2) (index 8) pixel (1, 1) is padding: all logits 0, uniform weights.
    assert torch.equal(a[0, 8, 3], torch.full((9,), 1 / 9, dtype=torch.float64))
    # Cell (0, 0): neighbours 0, 1, 2, 3, 6 are outside the grid, zero vectors with logit 0:
    # each takes exp(0) / sum, the same for all five, and not zero.
    out = a[0, 0][:, [0, 1, 2, 3, 6]]
    assert (out > 0).all() and torch.equal(out, out[:, :1].expand_as(out))
    # The padded pixels count in the tokens' denominators: cropping x to a multiple of
    # the stoken size changes the tokens of the cells that had padding.
    s_full, _ = super_token_sampling(x, (2, 2), 1)
    assert_close(s_full[..., :2, :2], anchor_stoken_forward(x, (2, 2), 1, parts=True)[0][..., :2, :2], torch.float64)


class _FixedAffinity(torch.autograd.Function):
    """stokens = fold(x^T A) / (asum + 1e-12) for a fixed affinity: a linear map of x,
    whose gradient is the registered backward op."""

    @staticmethod
    def forward(ctx, x, affinity, asum, stoken_size):
        ctx.save_for_backward(affinity, asum)
        ctx.stoken_size, ctx.size = stoken_size, list(x.shape[2:])
        with torch.no_grad():
            pixels = F.pad(x, (0, (-x.shape[3]) % stoken_size[1], 0, (-x.shape[2]) % stoken_size[0]))
            B, C, H, W = pixels.shape
            h, w = stoken_size
            pixels = pixels.reshape(B, C, H // h, h, W // w, w).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, h * w, C)
            from fastvision.reference.super_token import fold
            return fold(pixels.transpose(-1, -2) @ affinity, H // h, W // w) / (asum[:, None] + 1e-12)

    @staticmethod
    def backward(ctx, grad):
        affinity, asum = ctx.saved_tensors
        dx = torch.ops.fastvision.super_token_sampling_bwd(grad.contiguous(), affinity, asum, ctx.stoken_size,
                                                          ctx.size)
        return dx, None, None, None


@pytest.mark.parametrize("stoken_size,size", [((2, 3), (5, 7)), ((3, 1), (4, 2))])
def test_sampling_backward_is_the_adjoint_for_a_fractional_affinity(stoken_size, size):
    """gradcheck of the backward kernel at an ordinary (unsaturated) affinity, held fixed as STViT's is."""
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    _, affinity, asum = torch.ops.fastvision.super_token_sampling_fwd(x, list(stoken_size), 2)
    assert ((affinity > 0.05) & (affinity < 0.95)).any()
    check_gradcheck(lambda t: _FixedAffinity.apply(t, affinity, asum, list(stoken_size)), [x.requires_grad_()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upsample_backward_without_affinity_gradient(dtype):
    """affinity_grad=False (a detached affinity, as StokenAttention's) skips daffinity: the same
    dstokens, an empty daffinity, in the C++ kernel, its fake kernel and through autograd."""
    s = torch.randn(2, 5, 3, 3, dtype=dtype)
    _, a, _ = torch.ops.fastvision.super_token_sampling_fwd(torch.randn(2, 5, 9, 17, dtype=dtype), [3, 6], 1)
    dout = torch.randn(2, 5, 9, 17, dtype=dtype)
    ds, da = torch.ops.fastvision.super_token_upsample_bwd(dout, s, a, [3, 6])
    ds0, da0 = torch.ops.fastvision.super_token_upsample_bwd(dout, s, a, [3, 6], False)
    assert torch.equal(ds0, ds) and da.shape == a.shape and da0.shape == (0,)
    fake = torch.ops.fastvision.super_token_upsample_bwd(dout.to("meta"), s.to("meta"), a.to("meta"), [3, 6], False)
    assert fake[0].shape == s.shape and fake[1].shape == (0,)
    st = s.clone().requires_grad_()
    out = super_token_upsample(st, a, (3, 6), (9, 17))
    (dst,) = torch.autograd.grad(out, st, dout)
    assert torch.equal(dst, ds)
    at = a.clone().requires_grad_()
    dst, dat = torch.autograd.grad(super_token_upsample(st, at, (3, 6), (9, 17)), (st, at), dout)
    assert torch.equal(dst, ds) and torch.equal(dat, da)


def test_autograd_asks_the_kernel_for_no_affinity_gradient_when_affinity_is_fixed():
    """The backward calls upsample_bwd with affinity_grad=False unless affinity needs a gradient
    (equal results alone would not show that daffinity was skipped rather than computed and dropped)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flags = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.name() == "fastvision::super_token_upsample_bwd":
                self.flags.append(kwargs.get("affinity_grad", args[4] if len(args) > 4 else True))
            return func(*args, **kwargs)

    s = torch.randn(1, 4, 2, 3, requires_grad=True)
    a = torch.randn(1, 6, 16, 9).softmax(-1)
    for affinity, expected in ((a, False), (a.clone().requires_grad_(), True)):
        with Record() as record:
            super_token_upsample(s, affinity, (4, 4), (7, 10), backend="cpu").sum().backward()
        assert record.flags == [expected]


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_infinite_token_leaves_the_padding_lanes_out(backend):
    """Cells of 3 x 3 pixels (9: not a multiple of the kernels' 8 lanes, so every cell has
    padding lanes of zero pixels) next to a token holding +inf: a padding lane's logit is
    inf * 0 = NaN. It must take no part in the sums: the tokens the reference keeps finite
    stay finite, and every NaN is where the reference has one."""
    torch.manual_seed(0)
    x = -1 - torch.rand(1, 1, 9, 9)  # negative: logits against +inf are -inf
    x[0, 0, 0, 0] = float("inf")  # the first cell's token (its mean) is +inf
    s, a = super_token_sampling(x, (3, 3), backend=backend)
    s_ref, a_ref = super_token_sampling_ref(x, (3, 3))
    assert s_ref.isfinite().sum() == 5  # (the cells away from the infinite pixel's row and column)
    torch.testing.assert_close(s, s_ref, equal_nan=True)
    torch.testing.assert_close(a, a_ref, equal_nan=True)


@pytest.mark.triton
def test_triton_upsample_backward_without_affinity_gradient():
    s = torch.randn(1, 4, 2, 3, requires_grad=True)
    a = torch.randn(1, 6, 16, 9).softmax(-1)
    dout = torch.randn(1, 4, 7, 10)
    (ref,) = torch.autograd.grad(super_token_upsample(s, a, (4, 4), (7, 10), backend="cpu"), s, dout)
    (out,) = torch.autograd.grad(super_token_upsample(s, a, (4, 4), (7, 10), backend="triton"), s, dout)
    assert_close(out, ref, torch.float32)


def test_float16_tokens_accumulate_in_float32():
    """A token whose affinity sum is tiny (~1e-10, far below float16's range) is still a weighted mean."""
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, :2, :2] = 30.0  # cell 0 is far from everything; cell 3's pixels barely choose token 0
    x[0, 1, 2:, 2:] = 1.0
    s16, a16 = super_token_sampling(x.half(), 2)
    s32, a32 = super_token_sampling_ref(x, (2, 2))
    assert a16.dtype == torch.float32
    assert_close(s16.float(), s32, torch.float16)


def test_cpu_kernels_do_not_depend_on_the_thread_count():
    x = torch.randn(2, 16, 23, 19, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):  # (3: chunks that start inside a band of cells)
            torch.set_num_threads(n)
            x.grad = None
            s, a = super_token_sampling(x, (4, 3), 2)
            out = super_token_upsample(s.tanh(), a, (4, 3), (23, 19))
            out.square().sum().backward()
            results.append((s.detach(), a, out.detach(), x.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for other in results[1:] for u, v in zip(results[0], other))


# --------------------------------------------------------------------------
# The layer


@pytest.mark.parametrize("kw", [dict(stoken_size=(3, 2), num_heads=2, qkv_bias=True),
                                dict(stoken_size=4, n_iter=2, num_heads=4, qk_scale=0.3),
                                dict(stoken_size=(2, 3), refine_attention=False),
                                dict(stoken_size=3, refine=False),
                                dict(stoken_size=(1, 1), num_heads=2)], ids=str)
def test_layer_matches_anchor(kw):
    torch.manual_seed(0)
    layer = StokenAttention(8, **kw).double()
    x = torch.randn(2, 8, 10, 7, dtype=torch.float64)
    xa, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = layer(xo), anchor_layer(layer, xa)
    assert_close(out, ref, torch.float64)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    ref.square().sum().backward()
    assert_close(xo.grad, xa.grad, torch.float64)
    for n, p in layer.named_parameters():
        assert_close(grads[n], p.grad, torch.float64, msg=n)


def test_refinement_runs_its_modules():
    """The refinement calls its qkv and proj convs (not only their weights): forward hooks fire
    and a replaced module (an adapter, a quantized conv) takes effect."""
    torch.manual_seed(0)
    layer = StokenAttention(8, (1, 1), num_heads=2)
    x = torch.randn(2, 8, 5, 6)
    seen = []
    for name in ("qkv", "proj"):
        getattr(layer.stoken_refine, name).register_forward_hook(lambda m, i, o, name=name: seen.append(name))
    base = layer(x)
    assert seen == ["qkv", "proj"]
    plain = torch.nn.Conv2d(8, 24, 1, bias=False)  # any 1x1 conv works in their place
    plain.load_state_dict(layer.stoken_refine.qkv.state_dict())
    layer.stoken_refine.qkv = plain
    assert_close(layer(x), base, torch.float32)
    layer.stoken_refine.proj = torch.nn.Sequential(layer.stoken_refine.proj, torch.nn.Tanh())
    assert_close(layer(x), torch.tanh(base), torch.float32)


def test_layer_compiles_without_graph_breaks():
    torch.manual_seed(0)
    layer = StokenAttention(16, (4, 3), num_heads=2, qkv_bias=True)
    x = torch.randn(2, 16, 13, 11)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = layer(xe)
    out = torch.compile(layer, fullgraph=True)(xc)
    assert_close(out, ref, torch.float32)
    ref.square().sum().backward()
    out.square().sum().backward()
    assert_close(xc.grad, xe.grad, torch.float32)


def test_layer_names_and_arguments():
    layer = StokenAttention(16, (4, 4), 1, True, True, 2, True)  # STViT's positional order
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "unfold.weights": (9, 1, 3, 3), "fold.weights": (9, 1, 3, 3),
        "stoken_refine.qkv.weight": (48, 16, 1, 1), "stoken_refine.qkv.bias": (48,),
        "stoken_refine.proj.weight": (16, 16, 1, 1), "stoken_refine.proj.bias": (16,)}
    assert torch.equal(layer.unfold.weights, torch.eye(9).reshape(9, 1, 3, 3))
    conv = StokenAttention(16, 4, refine_attention=False).state_dict()
    assert [k for k in conv if k.startswith("stoken_refine")] == [
        f"stoken_refine.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert tuple(conv["stoken_refine.1.weight"].shape) == (16, 1, 5, 5)
    with pytest.raises(ValueError, match="dim \\(10\\) must be divisible by num_heads \\(4\\)"):
        StokenAttention(10, 2, num_heads=4)
    with pytest.raises(ValueError, match="n_iter must be >= 1"):
        StokenAttention(8, 2, n_iter=0)
    with pytest.raises(TypeError, match="stoken_size must be an int or a tuple of 2"):
        StokenAttention(8, (2, 2, 2))


# --------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("build", [stvit_small, stvit_base, stvit_large], ids=lambda f: f.__name__)
def test_models_have_stvit_names_and_load_official_checkpoints(build):
    anchor = json.loads((DATA / "stvit_state_dict_shapes.json").read_text())[build.__name__]
    with torch.device("meta"):
        model = build()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(anchor) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if anchor[k] != v} == {}
    # An official checkpoint is a dict with the weights under 'model'.
    checkpoint = {"model": {k: torch.zeros(v, device="meta") for k, v in anchor.items()}, "epoch": 300}
    result = load_checkpoint(model, checkpoint)
    assert not result.missing_keys and not result.unexpected_keys


def test_stvit_small_forward_backward_matches_reference_backend():
    """STViT-S (all its stages, stoken sizes 8, 4, 1, 1; stage sizes 12 and 6 pad their cells) at
    48 x 48, fused ops vs the reference, training mode (batch statistics; no drop path: random)."""
    torch.manual_seed(0)
    model = stvit_small(num_classes=10, drop_path_rate=0.0)
    reference = stvit_small(num_classes=10, drop_path_rate=0.0, backend="reference")
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 48, 48)
    outs = []
    for m in (model, reference):
        out = m(x)
        out.square().sum().backward()
        outs.append((out, {n: p.grad for n, p in m.named_parameters()}))
    assert_close(outs[0][0], outs[1][0], torch.float32, scale=5)
    for n, g in outs[0][1].items():
        assert_close(g, outs[1][1][n], torch.float32, scale=200, msg=n)


def test_stvit_example_runs():
    model = STViT(embed_dim=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2],
                  stoken_size=[4, 2, 1, 1], projection=64, num_classes=10)
    assert model(torch.randn(1, 3, 40, 36)).shape == (1, 10)  # stage sizes not divisible by the stokens


# --------------------------------------------------------------------------
# Direct calls of the registered ops: clear ValueErrors from the C++ entry points


def _direct_bad_calls():
    x = torch.randn(2, 4, 9, 7)
    s, a, asum = torch.ops.fastvision.super_token_sampling_fwd(x, [3, 2], 1)
    ops = torch.ops.fastvision
    return [
        (lambda: ops.super_token_sampling_fwd(x, [3], 1), "stoken_size must be a list of 2 ints"),
        (lambda: ops.super_token_sampling_fwd(x, [0, 2], 1), "stoken_size[0] must be >= 1"),
        (lambda: ops.super_token_sampling_fwd(x, [3, 2], 0), "n_iter must be in [1, 1000]"),
        (lambda: ops.super_token_sampling_fwd(x[0], [3, 2], 1), "x must be a 4-D tensor"),
        (lambda: ops.super_token_sampling_fwd(x.transpose(2, 3), [3, 2], 1), "x must be contiguous"),
        (lambda: ops.super_token_sampling_fwd(x[:, :0], [3, 2], 1), "must have at least one channel"),
        (lambda: ops.super_token_sampling_fwd(x.int(), [3, 2], 1), "x must be float32, float16, bfloat16"),
        (lambda: ops.super_token_sampling_fwd(x, [2 ** 62, 2 ** 62], 1), "is too large for an image"),
        (lambda: ops.super_token_sampling_bwd(s, a, asum, [3, 2], [10, 7]), "dstokens must have shape"),
        (lambda: ops.super_token_sampling_bwd(s, a.double(), asum, [3, 2], [9, 7]), "affinity must be float32"),
        (lambda: ops.super_token_sampling_bwd(s, a, asum[:1], [3, 2], [9, 7]), "asum must have shape"),
        (lambda: ops.super_token_upsample_fwd(s, a[:, :, :5], [3, 2], [9, 7]), "affinity must have shape"),
        (lambda: ops.super_token_upsample_fwd(s, a, [3, 2], [9]), "out_size must be a list of 2 ints"),
        (lambda: ops.super_token_upsample_bwd(x.double(), s, a, [3, 2]), "dout must be float32 (stokens' dtype)"),
        (lambda: ops.super_token_upsample_bwd(x[:, :3], s, a, [3, 2]), "dout must have shape"),
        (lambda: ops.super_token_upsample_bwd(x, s, a.to("meta"), [3, 2]), "affinity is on meta"),
    ]


@pytest.mark.parametrize("index", range(16))
def test_direct_calls_raise_value_errors(index):
    call, match = _direct_bad_calls()[index]
    with pytest.raises(ValueError, match=f"^fastvision.super_token_[a-z_]+: .*{__import__('re').escape(match)}"):
        call()
