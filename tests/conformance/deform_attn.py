"""Conformance spec of the deform_attn family: ms_deform_attn (Deformable DETR's multi-scale deformable attention)."""

import random

import torch

from fastvision.ops import ms_deform_attn
from fastvision.reference.deform_attn import ms_deform_attn_ref
from fastvision.testing import BadInput, OpSpec, Sample

DETR_LEVELS = ((16, 16), (8, 8), (4, 4), (2, 2))  # Deformable DETR's 4 levels, each half the last


def case(N=2, Lq=5, M=2, D=4, P=3, levels=((5, 7), (3, 2)), loc="border"):
    """A case: batch N, queries Lq, heads M, head dim D, points P, levels (H, W) each; loc
    says where the sampling locations are: 'inside' [0, 1], 'border' [-0.3, 1.3] (samples
    across every border), 'grid' exactly on pixel centres, half pixels and the borders
    x = -1, x = W (power-of-2 sizes: the products are exact), 'far' some at +-1e6, +-1e30, +-inf."""
    return dict(N=N, Lq=Lq, M=M, D=D, P=P, levels=tuple(levels), loc=loc)


def tables(levels):
    shapes = torch.tensor(levels, dtype=torch.int64).view(-1, 2)
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    return shapes, starts


def make(c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N, Lq, M, D, P, levels = c["N"], c["Lq"], c["M"], c["D"], c["P"], c["levels"]
    L = len(levels)
    shapes, starts = tables(levels)
    S = int(shapes.prod(1).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    size = (N, Lq, M, L, P, 2)
    if c["loc"] == "inside":
        loc = torch.rand(size, generator=g, dtype=torch.float64)
    elif c["loc"] == "grid":  # multiples of 1 / (4 max side) from -1/16 to 17/16 of the level
        loc = torch.randint(-2, 35, size, generator=g).double() / 32
    else:
        loc = torch.rand(size, generator=g, dtype=torch.float64) * 1.6 - 0.3
    if c["loc"] == "far":
        far = torch.tensor([1e6, -1e6, 1e30, -1e30, float("inf"), -float("inf")], dtype=torch.float64)
        pick = torch.rand(size, generator=g) < 0.3
        loc[pick] = far[torch.randint(0, len(far), (int(pick.sum()),), generator=g)]
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    return Sample((value.to(dtype), shapes, starts, loc.to(dtype), attn.to(dtype)))


EDGE = [
    case(),                                                   # two levels, H != W, across every border
    case(levels=((1, 1),), P=1, M=1, D=1, N=1, Lq=1),         # one 1x1 level, one point
    case(levels=((1, 9), (7, 1), (1, 1)), P=2),               # size-1 rows, columns and pixel
    case(levels=((6, 5), (3, 3), (2, 1), (1, 1)), P=8, D=3),  # 4 levels down to 1x1, P 8, D not 2^k
    case(levels=DETR_LEVELS[:3], M=3, D=5, P=4, Lq=7),        # odd head count and dim
    case(levels=((8, 4), (2, 1)), loc="grid", D=6),           # exactly on pixel centres and borders
    case(levels=((8, 8), (4, 2)), loc="grid", P=5, M=1),
    case(levels=((5, 7), (3, 2)), loc="far", P=4),            # far outside: zeros, no NaN
    case(loc="inside", levels=((4, 6), (2, 3), (1, 2)), D=16),
    case(N=0),                                                # empty batch
    case(Lq=0),                                               # no queries
    case(levels=((3, 4),), D=33, P=1),                        # one level, D past a power of 2
]
_rng = random.Random(5)
RANDOM = [case(N=_rng.choice([1, 2, 3]), Lq=_rng.choice([1, 4, 9]), M=_rng.choice([1, 2, 3, 8]),
               D=_rng.choice([1, 2, 7, 8, 12, 32]), P=_rng.choice([1, 2, 4, 8]),
               levels=tuple((_rng.choice([1, 2, 3, 5, 8]), _rng.choice([1, 2, 4, 6, 9]))
                            for _ in range(_rng.choice([1, 2, 3, 4]))),
               loc=_rng.choice(["inside", "border"]))
          for _ in range(14)]

BASIC = [case(), case(levels=DETR_LEVELS[:2], M=2, D=8, P=2, N=1, Lq=6)]
HALF = [case(levels=DETR_LEVELS, M=4, D=16, P=4, Lq=9), case(levels=((5, 7), (3, 2)), D=32, P=2, loc="grid")]
GRADCHECK = [case(N=1, Lq=3, M=2, D=3, P=2, levels=((3, 4), (2, 1))),
             case(N=2, Lq=2, M=1, D=2, P=3, levels=((1, 1), (2, 3), (4, 1))),
             case(N=1, Lq=2, M=2, D=5, P=1, levels=((5, 2),))]
OPCHECK = [case(N=2, Lq=3, M=2, D=4, P=2)]
COMPILE = [case(N=1, Lq=4, M=2, D=8, P=2)]
TRITON = [case(N=1, Lq=5, M=2, D=6, P=2), case(levels=((4, 4), (1, 3)), loc="grid", Lq=3, D=40, P=2)]
GPU = [c for c in EDGE if c["N"] > 0] + [
    case(N=2, Lq=1360, M=8, D=32, P=4, levels=((32, 32), (16, 16), (8, 8), (4, 4)), loc="inside"),
    case(N=2, Lq=300, M=8, D=32, P=4, levels=((40, 57), (20, 29), (10, 15), (5, 8)), loc="border"),
    case(N=1, Lq=100, M=4, D=48, P=4, levels=((23, 31), (12, 16)), loc="border"),
    case(N=2, Lq=64, M=2, D=260, P=2, levels=((9, 13), (5, 7)), loc="border")]  # wide heads: 1 query row a program
FUZZ = [(case(N=1, Lq=2, M=2, D=3, P=2), dt) for dt in (torch.float64, torch.float16, torch.bfloat16)]


def _bad():
    value, shapes, starts, loc, attn = make(case(), torch.float32, 0).args

    def bad(**overrides):
        a = {"value": value, "value_spatial_shapes": shapes, "value_level_start_index": starts,
             "sampling_locations": loc, "attention_weights": attn, **overrides}
        return Sample(tuple(a.values()))

    cases = [
        (dict(value=value[0]), ValueError, "value must be a 4-D tensor (N, S, M, D)"),
        (dict(value=value.long()), TypeError, "value must have dtype in"),
        (dict(sampling_locations=loc[..., 0]), ValueError, "sampling_locations must be a 6-D tensor"),
        (dict(sampling_locations=loc[:, :, :1]), ValueError, "sampling_locations must have shape (N, Lq, M, L, P, 2)"),
        (dict(sampling_locations=loc.double()), TypeError, "sampling_locations must have dtype in (float32)"),
        (dict(attention_weights=attn[..., :1]), ValueError, "attention_weights must have shape (N, Lq, M, L, P)"),
        (dict(attention_weights=attn.half()), TypeError, "attention_weights must have dtype in (float32)"),
        (dict(value_spatial_shapes=shapes.int()), TypeError, "value_spatial_shapes must have dtype in (int64)"),
        (dict(value_spatial_shapes=shapes[:1]), ValueError, "value_spatial_shapes must have shape (L, 2) = (2, 2)"),
        (dict(value_level_start_index=starts.float()), TypeError, "value_level_start_index must have dtype in"),
        (dict(value_level_start_index=starts[None]), ValueError, "value_level_start_index must have shape (L,)"),
        # Tables that do not tile value.
        (dict(value_spatial_shapes=torch.tensor([[5, 7], [3, 3]])), ValueError,
         "value_spatial_shapes[1] = (3, 3) must be a level (H, W) with H, W >= 1 whose pixels fit in value"),
        (dict(value_spatial_shapes=torch.tensor([[5, 7], [0, 2]])), ValueError, "value_spatial_shapes[1] = (0, 2)"),
        (dict(value_spatial_shapes=torch.tensor([[5, 7], [2, 2]])), ValueError,
         "value_spatial_shapes must cover value: sum of H * W = 39 but value has S = 41"),
        (dict(value_level_start_index=torch.tensor([0, 36])), ValueError,
         "value_level_start_index[1] must be 35 (the sum of H * W of the levels before it); got 36"),
        (dict(value_level_start_index=torch.tensor([1, 35])), ValueError, "value_level_start_index[0] must be 0"),
        (dict(value=value.to("meta")), ValueError, "all tensors must be on one device"),
        (dict(value=value.tolist()), TypeError, "value must be a torch.Tensor"),
    ]
    return [BadInput(match, bad(**o), exc, match) for o, exc, match in cases]


def _facts(sample):
    return {"head_dim": sample.args[0].shape[3]}


SPECS = [
    OpSpec(
        name="ms_deform_attn",
        op=ms_deform_attn,
        reference=ms_deform_attn_ref,
        fused_op="ms_deform_attn",
        make=make,
        outputs=("out",),
        differentiable_inputs=("value", "sampling_locations", "attention_weights"),
        cases=EDGE + RANDOM,
        basic_cases=BASIC,
        half_cases=HALF,
        gradcheck_cases=GRADCHECK,
        opcheck_cases=OPCHECK,
        compile_cases=COMPILE,
        triton_cases=TRITON,
        gpu_cases=GPU,
        bad_inputs=_bad,
        fuzz_cases=FUZZ,
        facts=_facts,
    ),
]
