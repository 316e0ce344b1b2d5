"""Conformance specs of the super_token family (STViT): super_token_sampling and super_token_upsample."""

import random

import numpy as np
import torch

from fastvision.ops import super_token_sampling, super_token_upsample
from fastvision.reference.super_token import super_token_sampling_ref, super_token_upsample_ref
from fastvision._checks import per_axis
from fastvision.testing import BadInput, OpSpec, Sample


def sampling_reference(x, stoken_size, n_iter=1):
    """The reference with the public function's arguments (an int or a pair)."""
    return super_token_sampling_ref(x, per_axis(stoken_size, 2, "stoken_size"), int(n_iter))


def upsample_reference(stokens, affinity, stoken_size, out_size):
    return super_token_upsample_ref(stokens, affinity, per_axis(stoken_size, 2, "stoken_size"),
                                    per_axis(out_size, 2, "out_size"))


def case(batch=2, C=4, H=9, W=7, stoken=(3, 2), n_iter=1, **kw):
    """One setting. Options: gain (x's scale), numpy (numpy scalars for the ints), positional."""
    return dict(batch=batch, C=C, H=H, W=W, stoken=stoken, n_iter=n_iter, **kw)


def _ints(c, values):
    values = tuple(np.int64(v) for v in values) if c.get("numpy") else tuple(values)
    return values[0] if len(set(values)) == 1 else values


def _rnd(g, *shape, dtype, gain=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * gain).to(dtype)


def make_sampling(c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = _rnd(g, c["batch"], c["C"], c["H"], c["W"], dtype=dtype, gain=c.get("gain", 1.0))
    ss = _ints(c, c["stoken"])
    n_iter = np.int64(c["n_iter"]) if c.get("numpy") else c["n_iter"]
    if c.get("positional"):
        return Sample((x, ss, n_iter))
    return Sample((x, ss), dict(n_iter=n_iter))


def make_upsample(c, dtype, seed):
    """Tokens in `dtype`; the affinity a softmax over 9, in the accumulate dtype (as sampling returns it)."""
    g = torch.Generator().manual_seed(seed)
    (h, w), H, W = c["stoken"], c["H"], c["W"]
    hh, ww = -(-H // h), -(-W // w)
    stokens = _rnd(g, c["batch"], c["C"], hh, ww, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    affinity = _rnd(g, c["batch"], hh * ww, h * w, 9, dtype=torch.float64, gain=2.0).softmax(-1).to(acc)
    return Sample((stokens, affinity, _ints(c, c["stoken"]), _ints(c, (H, W))))


def _channels(sample):
    return {"channels": sample.args[0].shape[1]}


EDGE = [
    case(),                                                # padding on both axes, H != W
    case(H=8, W=6, stoken=(4, 3)),                         # divisible
    case(H=1, W=9, stoken=(2, 4)),                         # H = 1: one row of padded cells
    case(H=7, W=1, stoken=(3, 3), n_iter=2),               # W = 1
    case(H=5, W=6, stoken=(8, 8)),                         # stoken larger than the image: one cell
    case(H=4, W=5, stoken=(1, 1), n_iter=2),               # one pixel per cell
    case(H=6, W=7, stoken=(2, 3), n_iter=3),
    case(C=1, H=6, W=6, stoken=(2, 2)),                    # one channel
    case(batch=0, H=6, W=5, stoken=(2, 2)),                # empty batch
    case(batch=1, C=24, H=11, W=13, stoken=(4, 4), n_iter=2),
    case(C=8, H=10, W=10, stoken=(5, 2), numpy=True),      # numpy scalars
    case(C=3, H=9, W=8, stoken=(3, 4), positional=True),
    case(C=6, H=9, W=9, stoken=(3, 3), gain=40.0),         # saturated softmax
    case(C=5, H=7, W=19, stoken=(3, 8), n_iter=2),         # rows of whole vectors (w = 8) beside padded cells
    case(batch=1, C=2, H=4, W=33, stoken=(2, 16)),         # w = 16, the last column of cells one pixel wide
]

_rng = random.Random(3)
RANDOM = [case(batch=_rng.choice([1, 2]), C=_rng.choice([1, 3, 8, 17]), H=_rng.randint(1, 13), W=_rng.randint(1, 13),
               stoken=(_rng.randint(1, 5), _rng.randint(1, 5)), n_iter=_rng.choice([1, 1, 2]))
          for _ in range(14)]

BASIC = [case(C=5, H=9, W=7, stoken=(3, 2), n_iter=2), case(C=520, H=4, W=5, stoken=(2, 2), batch=1)]  # C > Triton's
HALF = [case(C=16, H=11, W=9, stoken=(4, 3), n_iter=2), case(C=8, H=8, W=8, stoken=(2, 2))]
# gradcheck's finite differences move the affinity, which STViT's gradient (like the
# reference's) treats as a constant; a large gain saturates every softmax (exact 0/1
# weights, or exact ties between out-of-grid zero tokens), where the two agree.
# tests/test_super_token.py also gradchecks the backward with a fixed, fractional affinity.
GRADCHECK_SAMPLING = [case(batch=1, C=3, H=5, W=6, stoken=(2, 3), gain=60.0),
                      case(batch=2, C=2, H=4, W=5, stoken=(2, 2), n_iter=2, gain=60.0)]
GRADCHECK_UPSAMPLE = [case(batch=1, C=3, H=5, W=6, stoken=(2, 3)), case(batch=2, C=2, H=4, W=3, stoken=(3, 1))]
OPCHECK = [case(C=5, H=7, W=6, stoken=(3, 2), n_iter=2)]
COMPILE = [case(C=6, H=9, W=7, stoken=(3, 2), n_iter=2)]
TRITON = [case(batch=1, C=5, H=7, W=6, stoken=(3, 2), n_iter=2), case(batch=1, C=20, H=9, W=5, stoken=(4, 4)),
          case(batch=0, H=4, W=4, stoken=(2, 2))]
GPU = [c for c in EDGE if c["batch"] > 0] + [case(batch=2, C=64, H=56, W=56, stoken=(8, 8)),
                                            case(batch=2, C=128, H=28, W=28, stoken=(4, 4), n_iter=2)]
FUZZ = [(case(C=3, H=5, W=4, stoken=(2, 3)), torch.float64), (case(C=3, H=4, W=4, stoken=(2, 2)), torch.float16),
        (case(batch=0, C=2, H=3, W=3, stoken=(2, 2)), torch.bfloat16)]


# --------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, never a crash.


def _bad_sampling():
    x = torch.randn(2, 4, 9, 7)

    def bad(**overrides):
        return Sample((), {**dict(x=x, stoken_size=(3, 2), n_iter=1), **overrides})

    cases = [
        (dict(x=torch.randn(4, 9, 7)), ValueError, "x must be a 4-D tensor (batch, C, H, W)"),
        (dict(x=torch.randn(2, 0, 9, 7)), ValueError, "x must have C, H and W >= 1"),
        (dict(x=torch.randn(2, 4, 0, 7)), ValueError, "x must have C, H and W >= 1"),
        (dict(x=torch.randint(0, 3, (2, 4, 9, 7))), TypeError, "x must have dtype"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(stoken_size=0), ValueError, "stoken_size must be >= 1"),
        (dict(stoken_size=(3, 2, 1)), TypeError, "stoken_size must be an int or a tuple of 2"),
        (dict(stoken_size=2.0), TypeError, "stoken_size must be an int"),
        (dict(n_iter=0), ValueError, "n_iter must be >= 1"),
        (dict(n_iter=10 ** 6), ValueError, "n_iter must be <= 1000"),
        (dict(n_iter=1.0), TypeError, "n_iter must be an int"),
        (dict(n_iter=True), TypeError, "n_iter must be an int"),
    ]
    return [BadInput(match, bad(**o), exc, match) for o, exc, match in cases]


def _bad_upsample():
    s, a = torch.randn(2, 4, 3, 4), torch.rand(2, 12, 6, 9)

    def bad(**overrides):
        return Sample((), {**dict(stokens=s, affinity=a, stoken_size=(3, 2), out_size=(9, 7)), **overrides})

    cases = [
        (dict(stokens=torch.randn(4, 3, 4)), ValueError, "stokens must be a 4-D tensor (batch, C, hh, ww)"),
        (dict(affinity=a[0]), ValueError, "affinity must be a 4-D tensor (batch, hh*ww, h*w, 9)"),
        (dict(out_size=(10, 7)), ValueError, "stokens must have shape (batch, C >= 1, ceil(H / h), ceil(W / w))"),
        (dict(stoken_size=(2, 2)), ValueError, "stokens must have shape"),
        (dict(affinity=a[:, :, :5]), ValueError, "affinity must have shape (batch, hh*ww, h*w, 9) = (2, 12, 6, 9)"),
        (dict(affinity=a[:1]), ValueError, "affinity must have shape"),
        (dict(stokens=s.to(torch.int32)), TypeError, "stokens must have dtype"),
        (dict(affinity=a.to("meta")), ValueError, "one device"),
        (dict(out_size=(9, 0)), ValueError, "out_size must be >= 1"),
        (dict(out_size="big"), TypeError, "out_size must be an int or a tuple of 2"),
    ]
    return [BadInput(match, bad(**o), exc, match) for o, exc, match in cases]


SPECS = [
    OpSpec(
        name="super_token_sampling",
        op=super_token_sampling,
        reference=sampling_reference,
        fused_op="super_token_sampling",
        make=make_sampling,
        outputs=("stokens", "affinity"),
        differentiable_inputs=("x",),
        differentiable_outputs=("stokens",),  # the affinity is computed without gradient, as in STViT
        cases=EDGE + RANDOM,
        basic_cases=BASIC,
        half_cases=HALF,
        gradcheck_cases=GRADCHECK_SAMPLING,
        opcheck_cases=OPCHECK,
        compile_cases=COMPILE,
        triton_cases=TRITON,
        gpu_cases=GPU,
        bad_inputs=_bad_sampling,
        fuzz_cases=FUZZ,
        facts=_channels,
    ),
    OpSpec(
        name="super_token_upsample",
        op=super_token_upsample,
        reference=upsample_reference,
        fused_op="super_token_upsample",
        make=make_upsample,
        outputs=("out",),
        differentiable_inputs=("stokens", "affinity"),
        cases=EDGE + RANDOM,
        basic_cases=BASIC,
        half_cases=HALF,
        gradcheck_cases=GRADCHECK_UPSAMPLE,
        opcheck_cases=OPCHECK,
        compile_cases=COMPILE,
        triton_cases=TRITON,
        gpu_cases=GPU,
        bad_inputs=_bad_upsample,
        fuzz_cases=FUZZ,
        facts=_channels,
    ),
]
