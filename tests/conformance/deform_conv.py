"""Conformance spec of the deform_conv family: deform_conv2d (torchvision's DCNv1 / DCNv2, NCHW)."""

import random

import torch

from fastvision.ops import deform_conv2d
from fastvision.reference.deform_conv import deform_conv2d_ref
from fastvision.testing import BadInput, OpSpec, Sample


def case(B=2, Cin=4, Cout=6, H=7, W=9, k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, G=1,
         mask=True, bias=True, scale=1.0):
    """A case: batch, channels, input size, kernel (kh, kw), stride / padding / dilation,
    weight groups, offset groups G, with mask (DCNv2) / bias; `scale` multiplies the
    offsets (large: samples pushed across every border)."""
    return dict(B=B, Cin=Cin, Cout=Cout, H=H, W=W, k=tuple(k), stride=tuple(stride), padding=tuple(padding),
                dilation=tuple(dilation), groups=groups, G=G, mask=mask, bias=bias, scale=scale)


def out_size(c):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c["k"], c["stride"], c["padding"], c["dilation"]
    return (c["H"] + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (c["W"] + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1


def make(c, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    (kh, kw), K = c["k"], c["k"][0] * c["k"][1]
    Ho, Wo = out_size(c)
    B, G = c["B"], c["G"]
    x = rnd(B, c["Cin"], c["H"], c["W"])
    offset = rnd(B, 2 * G * K, Ho, Wo, scale=c["scale"])
    weight = rnd(c["Cout"], c["Cin"] // c["groups"], kh, kw, scale=(c["Cin"] // c["groups"] * K) ** -0.5)
    bias = rnd(c["Cout"]) if c["bias"] else None
    mask = torch.rand(B, G * K, Ho, Wo, generator=g, dtype=torch.float64).to(dtype) if c["mask"] else None
    return Sample((x, offset, weight, bias), dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                                                  mask=mask))


EDGE = [
    case(),                                                      # DCNv2, 3x3, padding 1
    case(mask=False, bias=False),                                # DCNv1, no bias
    case(k=(1, 1), padding=(0, 0)),                              # kernel size 1
    case(k=(5, 5), padding=(2, 2), H=8, W=6),                    # kernel size 5
    case(k=(7, 7), padding=(3, 3), H=9, W=10, Cin=3, Cout=2),    # kernel size 7
    case(k=(3, 5), padding=(1, 2)),                              # kh != kw
    case(stride=(2, 2), padding=(0, 0), H=9, W=11),              # stride 2
    case(stride=(2, 1), dilation=(1, 2), padding=(2, 0), W=12),  # mixed stride / dilation / padding
    case(dilation=(2, 2), padding=(2, 2)),                       # dilation 2
    case(scale=6.0),                                             # offsets push samples across every border
    case(scale=20.0, H=4, W=5),                                  # most samples outside: zeros
    case(groups=2, Cin=4, Cout=6),                               # weight groups
    case(G=2, Cin=4),                                            # offset groups
    case(groups=2, G=3, Cin=6, Cout=4),                          # offset and weight groups interleave
    case(groups=4, G=2, Cin=8, Cout=8, mask=False),              # depthwise-like groups
    case(H=1, W=1, k=(1, 1), padding=(0, 0), B=1, Cin=1, Cout=1),  # a single pixel
    case(H=1, W=1, k=(3, 3), padding=(1, 1), Cin=2, Cout=3),     # one pixel, 3x3: most corners outside
    case(B=0),                                                   # empty batch
    case(Cin=16, Cout=32, H=20, W=21, B=1, scale=2.0),           # several position tiles / blocks
    case(Cin=40, Cout=20, H=6, W=6, G=2, groups=2, B=1),         # channel blocks of the Triton kernels
]
_rng = random.Random(5)


def _random_case():
    k = _rng.choice([1, 3, 5])
    groups, G = _rng.choice([1, 1, 2]), _rng.choice([1, 1, 2])
    cin = groups * G * _rng.choice([1, 2, 3])
    return case(B=_rng.choice([1, 2, 3]), Cin=cin, Cout=groups * _rng.choice([1, 2, 5]), H=_rng.choice([5, 6, 8, 11]),
                W=_rng.choice([5, 7, 10]), k=(k, k), stride=(_rng.choice([1, 2]), _rng.choice([1, 2])),
                padding=(k // 2, k // 2), dilation=(_rng.choice([1, 2]), 1), groups=groups, G=G,
                mask=_rng.random() < 0.6, bias=_rng.random() < 0.5, scale=_rng.choice([0.5, 1.0, 3.0]))


RANDOM = [_random_case() for _ in range(12)]

BASIC = [case(), case(mask=False, bias=False, groups=2, G=2, Cin=4, Cout=4)]
HALF = [case(Cin=8, Cout=16, H=9, W=10), case(mask=False, G=2, Cin=6, Cout=4, scale=3.0)]
GRADCHECK = [case(B=1, Cin=2, Cout=2, H=4, W=5, scale=1.5), case(B=1, Cin=2, Cout=2, H=3, W=3, k=(3, 1),
                                                                padding=(1, 0), G=2, groups=2, bias=False),
             case(B=1, Cin=2, Cout=1, H=4, W=4, stride=(2, 1), dilation=(1, 2), padding=(1, 2), mask=False)]
OPCHECK = [case(B=2, Cin=3, Cout=4, H=5, W=4), case(B=1, Cin=2, Cout=2, H=4, W=4, mask=False, bias=False)]
COMPILE = [case(B=1, Cin=4, Cout=4, H=6, W=5)]
TRITON = [case(B=1, Cin=4, Cout=6, H=5, W=6, scale=2.0), case(B=1, Cin=6, Cout=4, H=4, W=4, groups=2, G=3,
                                                              mask=False, stride=(2, 1)),
          case(B=0, H=3, W=3)]  # tiny: the interpreter is slow
GPU = [c for c in EDGE if c["B"] > 0] + [case(B=2, Cin=64, Cout=64, H=56, W=56),
                                         case(B=1, Cin=96, Cout=80, H=33, W=47, G=4, groups=2, stride=(2, 2))]
FUZZ = [(case(B=1, Cin=2, Cout=2, H=3, W=4), dt) for dt in (torch.float64, torch.float16, torch.bfloat16)]


def _bad():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3)
    off, m, b = torch.randn(2, 18, 4, 4), torch.rand(2, 9, 4, 4), torch.randn(8)

    def bad(**o):
        args = {"input": x, "offset": off, "weight": w, "bias": b, "stride": 1, "padding": 0, "dilation": 1,
                "mask": m, **o}
        return Sample((args["input"], args["offset"], args["weight"], args["bias"]),
                      dict(stride=args["stride"], padding=args["padding"], dilation=args["dilation"],
                           mask=args["mask"]))

    cases = [
        (dict(input=torch.randn(4, 6, 6)), ValueError, "input must be a 4-D tensor (batch, in_channels, H, W)"),
        (dict(offset=torch.randn(2, 18, 4)), ValueError, "offset must be a 4-D tensor"),
        (dict(weight=torch.randn(8, 4, 3)), ValueError, "weight must be a 4-D tensor"),
        (dict(mask=torch.rand(2, 9, 16)), ValueError, "mask must be a 4-D tensor"),
        (dict(bias=torch.randn(8, 1)), ValueError, "bias must be a 1-D tensor"),
        (dict(offset=torch.randn(2, 17, 4, 4)), ValueError, "offset.shape[1] must be a positive multiple of 2 * kh * kw"),
        (dict(offset=torch.randn(2, 54, 4, 4), mask=None), ValueError, "must be divisible by offset_groups = 3"),
        (dict(offset=torch.randn(2, 18, 5, 4)), ValueError, "offset must have shape (batch, 2 * offset_groups"),
        (dict(offset=torch.randn(1, 18, 4, 4)), ValueError, "offset must have shape"),
        (dict(mask=torch.rand(2, 18, 4, 4)), ValueError, "mask must have shape (batch, offset_groups * kh * kw, Ho, Wo)"),
        (dict(weight=torch.randn(8, 3, 3, 3)), ValueError, "shape[1] >= 1 dividing input's 4 channels"),
        (dict(weight=torch.randn(7, 2, 3, 3)), ValueError, "must be divisible by groups = 2"),
        (dict(bias=torch.randn(7)), ValueError, "bias must have shape (out_channels,) = (8,)"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(dilation=(1, 2, 3)), TypeError, "dilation must be an int or a tuple of 2"),
        (dict(input=torch.randn(2, 4, 2, 2)), ValueError, "the output would be empty"),
        (dict(offset=off.double()), TypeError, "offset must have dtype in (float32)"),
        (dict(mask=m.half()), TypeError, "mask must have dtype in (float32)"),
        (dict(input=x.long(), offset=off.long(), weight=w.long(), bias=None, mask=None), TypeError,
         "input must have dtype in"),
        (dict(weight=w.to("meta")), ValueError, "all tensors must be on one device"),
        (dict(offset=off.tolist()), TypeError, "offset must be a torch.Tensor"),
    ]
    return [BadInput(match, bad(**o), exc, match) for o, exc, match in cases]


def _facts(sample):
    x, _, w = sample.args[:3]
    return {"dtype": x.dtype, "kernel_points": w.shape[2] * w.shape[3], "groups": x.shape[1] // w.shape[1]}


SPECS = [
    OpSpec(
        name="deform_conv2d",
        op=deform_conv2d,
        reference=deform_conv2d_ref,
        fused_op="deform_conv2d",
        make=make,
        outputs=("out",),
        differentiable_inputs=("input", "offset", "weight", "bias", "mask"),
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
