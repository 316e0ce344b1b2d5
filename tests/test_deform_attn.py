"""Multi-scale deformable attention specifics (the generic checks run on tests/conformance/deform_attn.py).

* The reference equals Deformable DETR's grid_sample formulation
  (ms_deform_attn_core_pytorch), values and gradients, in float64.
* Points far outside (inf, NaN, 1e30) read zeros: outputs and gradients finite.
* Determinism: the CPU backward is bit-identical across runs and thread
  counts; the Triton backward's deterministic path (sorted gather) and its
  atomic path under the interpreter; bit-identical twice on a GPU.
* Direct calls with level tables that do not tile value: clear errors from the
  C++ entry points and the Python checks; the Triton kernels called without
  checks never read or write outside value.
* MSDeformAttn: the anchor's parameter names and initialisation, forward equal
  to the anchor's module written over the grid_sample formulation (2- and
  4-coordinate reference points, padding mask), forward + backward on CPU.
* The encoder: a state dict with the published checkpoints' encoder keys
  loads with strict=True, the anchor's reference points, forward + backward.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conformance.deform_attn import case, make, tables

from fastvision.models import deformable_encoder, flatten_levels
from fastvision.models.deformable_detr import DeformableTransformerEncoder
from fastvision.ops import MSDeformAttn, ms_deform_attn
from fastvision.reference.deform_attn import ms_deform_attn_grid_sample, ms_deform_attn_ref
from fastvision.testing import assert_close, import_triton_kernels_interpreted

FWD, BWD = torch.ops.fastvision.ms_deform_attn_fwd, torch.ops.fastvision.ms_deform_attn_bwd


def _grads(fn, value, shapes, starts, loc, attn, dout=None):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out) if dout is None else dout
    return (out, *torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize("c", [case(), case(levels=((1, 9), (7, 1), (1, 1)), P=2),
                               case(levels=((6, 5), (3, 3), (2, 1), (1, 1)), P=8, D=3, M=3),
                               case(levels=((8, 4), (2, 1)), loc="grid")], ids=str)
def test_reference_is_grid_sample_formulation(c):
    value, shapes, starts, loc, attn = make(c, torch.float64, 0).args
    ours = _grads(ms_deform_attn_ref, value, shapes, starts, loc, attn)
    anchor = _grads(lambda v, s, _, lc, a: ms_deform_attn_grid_sample(v, s, lc, a), value, shapes, starts, loc, attn)
    # One difference: a point exactly on x = -1 or y = -1 (pixels) reads 0, and the
    # anchor's CUDA kernel (`h_im > -1 && w_im > -1 && ...`) and ours give it no
    # gradient, where grid_sample's backward gives the one-sided one.
    pixel = loc * torch.stack([shapes[:, 1], shapes[:, 0]], -1).view(1, 1, 1, -1, 1, 2) - 0.5
    on_edge = (pixel == -1).any(-1, keepdim=True).expand_as(loc)
    assert not ours[2][on_edge].count_nonzero()
    anchor[2][on_edge] = 0
    for a, b, name in zip(ours, anchor, ("out", "dvalue", "dloc", "dattn")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_far_outside_reads_zeros_without_nan(backend):
    value, shapes, starts, loc, attn = make(case(P=2), torch.float32, 0).args
    loc = loc.clone()
    far = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e6])
    loc[:, :, :, :, 0] = far[torch.arange(loc[:, :, :, :, 0].numel()) % len(far)].view_as(loc[:, :, :, :, 0])
    out, dv, dl, da = _grads(lambda *a: ms_deform_attn(*a, backend=backend), value, shapes, starts, loc, attn)
    for t in (out, dv, dl, da):
        assert torch.isfinite(t).all()
    # Only point 1 reads anything: the same as dropping point 0.
    keep = ms_deform_attn(value, shapes, starts, loc[:, :, :, :, 1:].contiguous(), attn[..., 1:].contiguous(),
                          backend=backend)
    assert_close(out, keep)
    assert not dl[:, :, :, :, 0].count_nonzero() and not da[..., 0].count_nonzero()


# --------------------------------------------------------------------------
# Determinism


def test_cpu_backward_is_bit_identical_across_runs_and_threads():
    sample = make(case(N=2, Lq=40, M=4, D=16, P=4, levels=((9, 11), (5, 6), (3, 3)), loc="border"),
                  torch.float32, 0).args
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with torch.no_grad():
                runs.append(BWD(torch.ones(2, 40, 64), *sample))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_triton_backward_paths_interpreted(deterministic):
    import_triton_kernels_interpreted("fastvision.triton.deform_attn")
    from fastvision.triton import deform_attn as tk
    value, shapes, starts, loc, attn = make(case(N=2, Lq=3, M=2, D=5, P=2, levels=((4, 3), (2, 2))),
                                            torch.float32, 1).args
    dout = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))
    ref = _grads(ms_deform_attn_ref, value, shapes, starts, loc, attn, dout)[1:]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        runs = [tk.ms_deform_attn_bwd(dout, value, shapes, starts, loc, attn) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    for got, want in zip(runs[0], ref):
        assert_close(got, want, scale=20)
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(*runs))


def deterministic_gpu_run(device, runs=1, backend="auto", dtype=torch.float32):
    """The gradients of `runs` backward passes under torch.use_deterministic_algorithms(True),
    and the inputs (bench/compile_check.py runs it on meta tensors)."""
    sample = make(case(N=2, Lq=500, M=8, D=32, P=4, levels=((32, 32), (16, 16), (8, 8), (4, 4)), loc="inside"),
                  dtype, 0).to(device)
    dout = torch.randn(2, 500, 256).to(device, dtype)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = [_grads(lambda *a: ms_deform_attn(*a, backend=backend), *sample.args, dout)[1:]
                 for _ in range(runs)]
    finally:
        torch.use_deterministic_algorithms(before)
    return grads, sample.args, dout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_backward_is_bit_identical_in_deterministic_mode(dtype):
    runs, (value, shapes, starts, loc, attn), dout = deterministic_gpu_run("cuda", runs=2, dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    ref = _grads(ms_deform_attn_ref, value.float(), shapes, starts, loc.float(), attn.float(), dout.float())[1:]
    for got, want in zip(runs[0], ref):
        assert_close(got, want, dtype, scale=20 if dtype == torch.float32 else 4)


@pytest.mark.gpu
def test_gpu_tables_checked_once_and_again_after_a_change():
    value, shapes, starts, loc, attn = make(case(), torch.float32, 0).to("cuda").args
    ms_deform_attn(value, shapes, starts, loc, attn)
    starts[1] += 1  # in place: the version counter changes, the tables are read again
    with pytest.raises(ValueError, match=r"value_level_start_index\[1\] must be 35"):
        ms_deform_attn(value, shapes, starts, loc, attn)


# --------------------------------------------------------------------------
# Direct calls: inconsistent level tables


BAD_TABLES = [
    (torch.tensor([[5, 7], [3, 2]]), torch.tensor([0, 36]), r"value_level_start_index\[1\] must be 35"),
    (torch.tensor([[5, 7], [3, 2]]), torch.tensor([-4, 35]), r"value_level_start_index\[0\] must be 0"),
    (torch.tensor([[5, 7], [30, 2]]), torch.tensor([0, 35]), r"value_spatial_shapes\[1\] = \(30, 2\)"),
    (torch.tensor([[5, 7], [-3, -2]]), torch.tensor([0, 35]), r"value_spatial_shapes\[1\] = \(-3, -2\)"),
    (torch.tensor([[2 ** 40, 2 ** 40], [3, 2]]), torch.tensor([0, 35]), r"value_spatial_shapes\[0\]"),
    (torch.tensor([[5, 7], [1, 2]]), torch.tensor([0, 35]), "value_spatial_shapes must cover value"),
]


@pytest.mark.parametrize("shapes,starts,match", BAD_TABLES)
def test_direct_calls_refuse_inconsistent_tables(shapes, starts, match):
    value, _, _, loc, attn = make(case(), torch.float32, 0).args
    with pytest.raises(ValueError, match="fastvision.ms_deform_attn_fwd: " + match):
        FWD(value, shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="fastvision.ms_deform_attn_bwd: " + match):
        BWD(torch.ones(2, 5, 8), value, shapes, starts, loc, attn)
    from fastvision.ops.deform_attn import _check_fwd
    with pytest.raises(ValueError, match="fastvision.ms_deform_attn_fwd: " + match):
        _check_fwd(value, shapes, starts, loc, attn)  # the Triton kernels' (and fake kernels') check


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # H = 2^40: the corner is masked
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_triton_kernels_stay_inside_value_with_inconsistent_tables(deterministic):
    """The unchecked Triton kernels on tables that point outside value: value sits inside
    a NaN-filled buffer, so a read outside it shows as NaN; dvalue's neighbours stay untouched."""
    import_triton_kernels_interpreted("fastvision.triton.deform_attn")
    from fastvision.triton import deform_attn as tk
    value, _, _, loc, attn = make(case(N=1, Lq=3, P=2, loc="inside"), torch.float32, 0).args
    buf = torch.full((value.numel() * 3,), float("nan"))
    inner = buf[value.numel():2 * value.numel()].view(value.shape)
    inner.copy_(value)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for shapes, starts, _ in BAD_TABLES:
            out = tk.ms_deform_attn_fwd(inner, shapes, starts, loc, attn)
            assert torch.isfinite(out).all()
            grads = tk.ms_deform_attn_bwd(torch.ones(out.shape), inner, shapes, starts, loc, attn)
            assert all(torch.isfinite(g).all() for g in grads)
    finally:
        torch.use_deterministic_algorithms(before)


# --------------------------------------------------------------------------
# MSDeformAttn


class AnchorMSDeformAttn(torch.nn.Module):
    """Deformable DETR's MSDeformAttn.forward over the grid_sample formulation (same parameters)."""

    def __init__(self, ours):
        super().__init__()
        self.m = ours

    def forward(self, query, reference_points, input_flatten, shapes, starts, padding_mask=None):
        m = self.m
        N, Lq, _ = query.shape
        value = m.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, input_flatten.shape[1], m.n_heads, m.d_model // m.n_heads)
        off = m.sampling_offsets(query).view(N, Lq, m.n_heads, m.n_levels, m.n_points, 2)
        aw = F.softmax(m.attention_weights(query).view(N, Lq, m.n_heads, -1), -1).view(
            N, Lq, m.n_heads, m.n_levels, m.n_points)
        if reference_points.shape[-1] == 2:
            norm = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
            loc = reference_points[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
        else:
            loc = reference_points[:, :, None, :, None, :2] + off / m.n_points * reference_points[:, :, None, :, None,
                                                                                                   2:] * 0.5
        return m.output_proj(ms_deform_attn_grid_sample(value, shapes, loc, aw))


def test_msdeformattn_names_and_anchor_init():
    m = MSDeformAttn(64, n_levels=3, n_heads=4, n_points=2)
    assert set(m.state_dict()) == {f"{p}.{k}" for p in ("sampling_offsets", "attention_weights", "value_proj",
                                                        "output_proj") for k in ("weight", "bias")}
    assert m.sampling_offsets.weight.shape == (4 * 3 * 2 * 2, 64) and m.attention_weights.weight.shape == (24, 64)
    assert not m.sampling_offsets.weight.count_nonzero() and not m.attention_weights.weight.count_nonzero()
    assert not m.attention_weights.bias.count_nonzero() and not m.value_proj.bias.count_nonzero()
    bias = m.sampling_offsets.bias.view(4, 3, 2, 2)
    # Head h points along angle 2 pi h / 4, scaled so the larger coordinate is 1, point i at i + 1.
    for h in range(4):
        d = torch.tensor([math.cos(2 * math.pi * h / 4), math.sin(2 * math.pi * h / 4)])
        d = d / d.abs().max()
        for i in range(2):
            for lvl in range(3):
                assert torch.allclose(bias[h, lvl, i], d * (i + 1), atol=1e-6)
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads, but got 30 and 4"):
        MSDeformAttn(30, n_heads=4)


@pytest.mark.parametrize("coords", [2, 4])
def test_msdeformattn_matches_anchor_module(coords):
    torch.manual_seed(0)
    m = MSDeformAttn(32, n_levels=2, n_heads=4, n_points=3)
    with torch.no_grad():  # non-trivial offsets and weights
        m.sampling_offsets.weight.normal_(0, 0.3)
        m.attention_weights.weight.normal_(0, 0.3)
    shapes, starts = tables(((6, 5), (3, 2)))
    S = 36
    x = torch.randn(2, S, 32)
    q = torch.randn(2, 7, 32, requires_grad=True)
    ref = torch.rand(2, 7, 2, coords)
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[1, -5:] = True
    out = m(q, ref, x, shapes, starts, mask)
    want = AnchorMSDeformAttn(m)(q, ref, x, shapes, starts, mask)
    assert out.shape == (2, 7, 32)
    assert_close(out, want)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="Last dim of reference_points must be 2 or 4"):
        m(q, torch.rand(2, 7, 2, 3), x, shapes, starts)


# --------------------------------------------------------------------------
# The encoder


def published_encoder_state_dict(layers=6, d_model=256, d_ffn=1024, heads=8, levels=4, points=4):
    """The `transformer.encoder.*` entries of Deformable DETR's r50 checkpoints (key names and
    shapes as models/deformable_transformer.py creates them), random values."""
    shapes = {"self_attn.sampling_offsets.weight": (heads * levels * points * 2, d_model),
              "self_attn.sampling_offsets.bias": (heads * levels * points * 2,),
              "self_attn.attention_weights.weight": (heads * levels * points, d_model),
              "self_attn.attention_weights.bias": (heads * levels * points,),
              "self_attn.value_proj.weight": (d_model, d_model), "self_attn.value_proj.bias": (d_model,),
              "self_attn.output_proj.weight": (d_model, d_model), "self_attn.output_proj.bias": (d_model,),
              "norm1.weight": (d_model,), "norm1.bias": (d_model,),
              "linear1.weight": (d_ffn, d_model), "linear1.bias": (d_ffn,),
              "linear2.weight": (d_model, d_ffn), "linear2.bias": (d_model,),
              "norm2.weight": (d_model,), "norm2.bias": (d_model,)}
    g = torch.Generator().manual_seed(0)
    return {f"transformer.encoder.layers.{i}.{k}": torch.randn(s, generator=g) * 0.02
            for i in range(layers) for k, s in shapes.items()}


def test_encoder_loads_published_keys_strictly():
    with torch.device("meta"):
        enc = deformable_encoder()
    full = published_encoder_state_dict()
    prefix = "transformer.encoder."
    enc.load_state_dict({k[len(prefix):]: v for k, v in full.items()}, strict=True, assign=True)
    assert enc.layers[5].self_attn.value_proj.weight.device.type == "cpu"


def test_encoder_reference_points_are_the_anchors():
    shapes = torch.tensor([[4, 6], [2, 3]])
    ratios = torch.tensor([[[1.0, 0.5], [1.0, 0.5]], [[0.75, 1.0], [0.5, 1.0]]])
    ref = DeformableTransformerEncoder.get_reference_points(shapes, ratios, "cpu")
    assert ref.shape == (2, 24 + 6, 2, 2)
    # Pixel (row 1, col 2) of level 0 in image 0: centre (2.5 / (1.0 * 6), 1.5 / (0.5 * 4)), then
    # scaled by each level's valid ratio.
    centre = torch.tensor([2.5 / 6, 1.5 / 2])
    assert torch.allclose(ref[0, 1 * 6 + 2], centre[None] * ratios[0], atol=1e-6)


def test_encoder_forward_backward_on_cpu():
    torch.manual_seed(0)
    enc = deformable_encoder(d_model=48, nhead=4, num_encoder_layers=2, dim_feedforward=64, dropout=0.0,
                             num_feature_levels=3, enc_n_points=2)
    srcs = [torch.randn(2, 48, h, w) for h, w in ((9, 7), (5, 4), (3, 2))]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in ((9, 7), (5, 4), (3, 2))]
    for m in masks:
        m[1, :, -1:] = True  # image 1 padded on the right
    level_embed = torch.randn(3, 48)
    src, shapes, starts, ratios, pos, mask = flatten_levels(srcs, masks, [torch.randn_like(s) for s in srcs],
                                                            level_embed)
    assert shapes.tolist() == [[9, 7], [5, 4], [3, 2]] and starts.tolist() == [0, 63, 83]
    src.requires_grad_()
    out = enc(src, shapes, starts, ratios, pos, mask)
    assert out.shape == (2, 89, 48)
    for layer in enc.layers:
        layer.self_attn.backend = "reference"
    assert_close(out, enc(src, shapes, starts, ratios, pos, mask), scale=5)
    out.square().mean().backward()
    assert torch.isfinite(src.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
