"""Conformance spec of the criss-cross family: criss_cross_attention (mmcv's CCNet attention, NCHW)."""

import random

import torch

from fastvision.ops import criss_cross_attention
from fastvision.reference.criss_cross import criss_cross_attention_ref
from fastvision.testing import BadInput, OpSpec, Sample


def case(B=2, Cqk=4, C=6, H=5, W=7, **kw):
    """A case: batch, query/key channels, value channels, height, width; `scale`
    multiplies query and key (large logits: a saturated softmax)."""
    return dict(B=B, Cqk=Cqk, C=C, H=H, W=W, **kw)


def make(c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c = {"scale": 1.0, **c}

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    B, Cqk, C, H, W = c["B"], c["Cqk"], c["C"], c["H"], c["W"]
    return Sample((rnd(B, Cqk, H, W, scale=c["scale"]), rnd(B, Cqk, H, W, scale=c["scale"]), rnd(B, C, H, W)))


EDGE = [
    case(),                                  # H != W
    case(H=1, W=9),                          # one row: the column part is only the -inf self logit
    case(H=8, W=1),                          # one column: the row part is only the pixel itself
    case(H=1, W=1, B=1, Cqk=1, C=1),         # a single pixel: softmax of one logit
    case(B=0),                               # empty batch
    case(Cqk=1, C=1, H=4, W=6),              # one channel each
    case(Cqk=8, C=64, H=16, W=21, B=1),      # CCNet-like C = 8 Cqk, crosses the kernels' blocks
    case(Cqk=5, C=3, H=19, W=18),            # C < Cqk, odd sizes
    case(H=6, W=7, scale=6.0),               # logits ~ +-100: saturated softmax
    case(Cqk=16, C=32, H=33, W=12, B=1),     # H > 32: several row blocks and partner blocks
    # CPU blocks (common/gemm.h): value channels in steps of 36 (70 = 36 + 34), register blocks of 6
    # outputs x 16 lanes whose last block overlaps the one before (70 outputs); row tails of 1 to 4
    # lanes by dot products (H, W = 17, 19), fewer outputs than a block (Cqk = 3), 8 x 8 transpose
    # tiles with tails on both axes
    case(Cqk=3, C=70, H=17, W=19, B=1),
    case(Cqk=5, C=37, H=24, W=16),           # W one block exactly, H: a one-vector tail, a 1-channel step
    case(Cqk=7, C=13, H=30, W=28, B=1),      # tails of 14 and 12 lanes: two vectors, overlapping
    # dot-product tails with r in two pieces (W = 130 > 128 keys), 13 = 2 x 6 + 1 outputs
    case(Cqk=6, C=13, H=18, W=130, B=1),
    case(Cqk=1, C=2, H=300, W=30, B=1),      # column groups of 2^21 / H^2 = 23 columns: two groups
]
_rng = random.Random(3)
RANDOM = [case(B=_rng.choice([1, 2, 3]), Cqk=_rng.choice([1, 2, 4, 8, 9]), C=_rng.choice([1, 3, 8, 17]),
               H=_rng.choice([1, 2, 3, 7, 10, 13]), W=_rng.choice([1, 2, 5, 9, 11, 16]))
          for _ in range(12)]

BASIC = [case(), case(H=9, W=4, Cqk=3, C=5, B=1)]
HALF = [case(Cqk=8, C=16, H=9, W=12), case(H=1, W=7, Cqk=4, C=8), case(Cqk=4, C=40, H=17, W=18, B=1)]
GRADCHECK = [case(B=1, Cqk=2, C=3, H=4, W=5), case(B=2, Cqk=3, C=2, H=3, W=1), case(B=1, Cqk=2, C=2, H=1, W=4),
             case(B=1, Cqk=2, C=5, H=17, W=1),   # float64 through the overlapping register blocks
             case(B=1, Cqk=2, C=7, H=9, W=10)]   # float64 (8-lane blocks) dot-product tails of 1 and 2 lanes
OPCHECK = [case(B=2, Cqk=3, C=4, H=5, W=4)]
COMPILE = [case(B=1, Cqk=4, C=8, H=6, W=5)]
TRITON = [case(B=1, Cqk=4, C=6, H=5, W=7), case(B=0, H=3, W=3)]  # tiny: the interpreter is slow
GPU = [c for c in EDGE if c["B"] > 0] + [case(B=2, Cqk=64, C=512, H=97, W=97),
                                         case(B=1, Cqk=32, C=256, H=64, W=130)]
FUZZ = [(case(B=1, Cqk=2, C=3, H=3, W=4), dt) for dt in (torch.float64, torch.float16, torch.bfloat16)]


def _bad():
    q, k, v = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6), torch.randn(2, 8, 5, 6)

    def bad(**overrides):
        args = {"query": q, "key": k, "value": v, **overrides}
        return Sample((args["query"], args["key"], args["value"]))

    cases = [
        (dict(query=torch.randn(2, 4, 5)), ValueError, "query must be a 4-D tensor (batch, Cqk, H, W)"),
        (dict(key=torch.randn(2, 4, 5, 6, 1)), ValueError, "key must be a 4-D tensor (batch, Cqk, H, W)"),
        (dict(value=torch.randn(8, 5, 6)), ValueError, "value must be a 4-D tensor (batch, C, H, W)"),
        (dict(key=torch.randn(2, 3, 5, 6)), ValueError, "key must have query's shape (batch, Cqk, H, W)"),
        (dict(key=torch.randn(2, 4, 6, 5)), ValueError, "key must have query's shape"),
        (dict(value=torch.randn(1, 8, 5, 6)), ValueError, "value must have query's batch, H and W"),
        (dict(value=torch.randn(2, 8, 5, 7)), ValueError, "value must have query's batch, H and W"),
        (dict(key=k.double()), TypeError, "key must have dtype in (float32)"),
        (dict(value=v.half()), TypeError, "value must have dtype in (float32)"),
        (dict(query=q.long(), key=k.long(), value=v.long()), TypeError, "query must have dtype in"),
        (dict(value=v.to("meta")), ValueError, "all tensors must be on one device"),
        (dict(query=q.tolist()), TypeError, "query must be a torch.Tensor"),
    ]
    return [BadInput(match, bad(**o), exc, match) for o, exc, match in cases]


def _facts(sample):
    q, _, v = sample.args
    return {"channels": max(q.shape[1], v.shape[1])}


SPECS = [
    OpSpec(
        name="criss_cross_attention",
        op=criss_cross_attention,
        reference=criss_cross_attention_ref,
        fused_op="criss_cross_attention",
        make=make,
        outputs=("out",),
        differentiable_inputs=("query", "key", "value"),
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
