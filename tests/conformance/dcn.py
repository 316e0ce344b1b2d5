"""Conformance specs of the dcn family: dcn_aggregate (DCNv3 / DCNv4 aggregation, channels-last)
and dcnv4 (DCNv4's packed offset_mask layout, DCNv4Function's argument order)."""

import random

import torch

from fastvision.ops import dcn_aggregate, dcnv4
from fastvision.reference.dcn import dcn_aggregate_ref, dcnv4_ref, out_size
from fastvision.testing import BadInput, OpSpec, Sample


def case(N=2, H=5, W=6, G=2, Cg=3, k=3, s=1, p=1, d=1, scale=1.0, rc=False, sm=False, spread=2.0):
    """A case: batch, input size, groups, channels per group, kernel / stride / padding / dilation
    (an int or (h, w)), offset_scale, remove_center, mask_softmax; offsets are uniform in
    +-spread * (H, W) (spread >= 1 pushes samples across every border)."""
    return dict(N=N, H=H, W=W, G=G, Cg=Cg, k=k, s=s, p=p, d=d, scale=scale, rc=rc, sm=sm, spread=spread)


def _hw(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def geometry(c):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_hw(c[n]) for n in ("k", "s", "p", "d"))
    Ho, Wo = out_size(c["H"], kh, sh, ph, dh), out_size(c["W"], kw, sw, pw, dw)
    return Ho, Wo, kh * kw - int(c["rc"])


def _tensors(c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo, K = geometry(c)
    N, G = c["N"], c["G"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = rnd(N, c["H"], c["W"], G * c["Cg"])
    span = torch.tensor([c["W"], c["H"]], dtype=torch.float64) * c["spread"]
    off = ((torch.rand(N, Ho, Wo, G * K, 2, generator=g, dtype=torch.float64) * 2 - 1) * span).flatten(-2)
    mask = rnd(N, Ho, Wo, G * K) if c["sm"] else torch.rand(N, Ho, Wo, G * K, generator=g, dtype=torch.float64)
    return x.to(dtype), off.to(dtype), mask.to(dtype)


def make(c, dtype, seed):
    x, off, mask = _tensors(c, dtype, seed)
    return Sample((x, off, mask, c["k"]), dict(stride=c["s"], padding=c["p"], dilation=c["d"], group=c["G"],
                                               offset_scale=c["scale"], remove_center=c["rc"],
                                               mask_softmax=c["sm"]))


def pack(off, mask, G, K, extra=None):
    """DCNv4's offset_mask: per group 2K offsets then K weights, zero-padded to a multiple of 8 channels
    (or by `extra` channels of noise)."""
    lead = off.shape[:-1]
    om = torch.cat([off.unflatten(-1, (G, 2 * K)), mask.unflatten(-1, (G, K))], -1).flatten(-2)
    width = -(-G * K * 3 // 8) * 8 if extra is None else G * K * 3 + extra
    return torch.cat([om, torch.full((*lead, width - G * K * 3), 0.5, dtype=om.dtype)], -1)


def make_v4(c, dtype, seed):
    x, off, mask = _tensors(c, dtype, seed)
    Ho, Wo, K = geometry(c)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_hw(c[n]) for n in ("k", "s", "p", "d"))
    return Sample((x, pack(off, mask, c["G"], K), kh, kw, sh, sw, ph, pw, dh, dw, c["G"], c["Cg"], c["scale"], 256,
                   int(c["rc"])), dict(softmax=c["sm"]))


def reference_v4(input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                 group, group_channels, offset_scale, im2col_step=256, remove_center=0, softmax=False):
    return dcnv4_ref(input, offset_mask, (kernel_h, kernel_w), (stride_h, stride_w), (pad_h, pad_w),
                     (dilation_h, dilation_w), group, offset_scale, bool(remove_center), softmax)


EDGE = [
    case(),                                                    # 3x3, pad 1, offsets across every border
    case(spread=0.2),                                          # mostly inside
    case(k=1, p=0),                                            # 1x1
    case(k=5, p=2, H=7, W=8, G=1, Cg=4),                       # 5x5
    case(k=7, p=3, H=8, W=7, G=1, Cg=2, N=1),                  # 7x7
    case(k=(3, 5), p=(1, 2), H=6, W=9),                        # non-square kernel
    case(k=(2, 4), p=(0, 1), rc=True),                         # even kernel, remove_center drops (kw/2, kh/2)
    case(k=3, rc=True, sm=True),                               # DCNv3 with remove_center
    case(sm=True, G=4, Cg=2),                                  # mask softmax per group
    case(scale=0.5, d=2, p=2, H=7, W=7),                       # offset_scale != 1 scales grid and offsets
    case(s=2, p=1, H=9, W=8),                                  # stride 2
    case(s=(2, 1), p=(2, 0), d=(1, 2), H=8, W=9),              # pad_h != pad_w, mixed stride / dilation
    case(p=(0, 3), H=6, W=4),                                  # pad_w > pad_h (dcnv3_core_pytorch swaps them)
    case(N=0),                                                 # empty batch
    case(G=1, Cg=1, N=1),                                      # one channel
    case(G=2, Cg=40, H=4, W=5, N=1),                           # wide groups
    case(N=2, H=10, W=9, G=3, Cg=8, spread=0.5),               # more outputs than a block
    case(H=1, W=1, k=3, p=1, N=1),                             # a single pixel
]
_rng = random.Random(5)
RANDOM = [case(N=_rng.choice([1, 2]), H=_rng.choice([3, 5, 8]), W=_rng.choice([2, 4, 7]), G=_rng.choice([1, 2, 3]),
               Cg=_rng.choice([1, 4, 8, 9]), k=_rng.choice([1, 3, (3, 1), (1, 3), (3, 5)]), s=_rng.choice([1, 2]),
               p=_rng.choice([1, 2, (2, 1)]), d=_rng.choice([1, 2]), scale=_rng.choice([1.0, 0.5, 2.0]),
               rc=_rng.choice([False, True]), sm=_rng.choice([False, True]), spread=_rng.choice([0.3, 1.5]))
          for _ in range(12)]
RANDOM = [c for c in RANDOM if not (c["rc"] and _hw(c["k"]) == (1, 1)) and min(geometry(c)[:2]) >= 1]

BASIC = [case(), case(k=(3, 5), p=(2, 1), s=(1, 2), rc=True, sm=True, N=1)]
HALF = [case(G=2, Cg=16, H=8, W=9, spread=0.6), case(sm=True, rc=True, G=4, Cg=8, spread=1.2)]
# Small: gradcheck perturbs every input element (two op calls each).
GRADCHECK = [case(N=1, H=3, W=4, G=2, Cg=2, k=(3, 1), p=(1, 0)),
             case(N=1, H=3, W=4, G=1, Cg=3, k=(2, 3), p=(1, 0), s=(1, 2), d=(2, 1), rc=True, sm=True, scale=0.7)]
OPCHECK = [case(N=1, H=4, W=5, G=2, Cg=3), case(N=1, H=4, W=4, G=2, Cg=2, sm=True, rc=True)]
COMPILE = [case(N=1, H=5, W=4, G=2, Cg=4)]
TRITON = [case(N=1, H=4, W=5, G=2, Cg=3), case(N=1, H=5, W=3, G=1, Cg=5, k=(3, 5), p=(1, 2), s=(2, 1), sm=True,
                                               rc=True, scale=0.5), case(N=0, H=3, W=3)]
GPU = [c for c in EDGE if c["N"] > 0] + [case(N=2, H=56, W=56, G=4, Cg=16, spread=0.1),
                                         case(N=1, H=28, W=28, G=8, Cg=32, sm=True, spread=0.1)]
FUZZ = [(case(N=1, H=3, W=4, G=1, Cg=2), dt) for dt in (torch.float64, torch.float16, torch.bfloat16)]


def _bad():
    x, off, m = torch.randn(2, 5, 6, 6), torch.randn(2, 5, 6, 2 * 9 * 2), torch.rand(2, 5, 6, 2 * 9)

    def bad(**o):
        a = {"input": x, "offset": off, "mask": m, "kernel_size": 3, "padding": 1, "group": 2, **o}
        return Sample((a.pop("input"), a.pop("offset"), a.pop("mask"), a.pop("kernel_size")), a)

    cases = [
        (dict(input=torch.randn(5, 6, 6)), ValueError, "input must be a 4-D tensor (N, H, W, group * Cg)"),
        (dict(offset=torch.randn(2, 5, 6, 35)), ValueError, "offset must have shape (2, 5, 6, 36)"),
        (dict(mask=torch.rand(2, 5, 5, 18)), ValueError, "mask must have shape (2, 5, 6, 18)"),
        (dict(padding=0), ValueError, "offset must have shape (2, 3, 4, 36)"),
        (dict(mask=m.double()), TypeError, "mask must have dtype in (float32)"),
        (dict(input=x.long()), TypeError, "input must have dtype in"),
        (dict(group=4), ValueError, "group must divide input's channels: got 6 channels and group=4"),
        (dict(group=0), ValueError, "group must be >= 1"),
        (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size must be an int or a tuple of 2"),
        (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(kernel_size=9, padding=0), ValueError, "the dilated kernel (9 x 9) must fit the padded input (5 x 6)"),
        (dict(kernel_size=1, padding=0, remove_center=True), ValueError, "remove_center needs more than one"),
        (dict(offset_scale="1"), TypeError, "offset_scale must be a float"),
        (dict(mask_softmax=2), TypeError, "mask_softmax must be a bool"),
        (dict(mask=m.to("meta")), ValueError, "all tensors must be on one device"),
        (dict(offset=off.tolist()), TypeError, "offset must be a torch.Tensor"),
    ]
    return [BadInput(match, bad(**o), exc, match) for o, exc, match in cases]


def _bad_v4():
    x, om = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 56)  # G=2, K=9: 54 -> 56

    def call(*args, **kw):
        return Sample((x, om, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, *args), kw)
    out = [BadInput("short offset_mask", Sample((x, om[..., :50], 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0)), ValueError,
                    "offset_mask must have at least group * K * 3 = 54 channels (DCNv4 pads them to 56)"),
           BadInput("group_channels", Sample((x, om, 3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0)), ValueError,
                    "input's channels must be group * group_channels = 6; got 8"),
           BadInput("im2col_step", call(0), ValueError, "im2col_step must be >= 1"),
           BadInput("remove_center", call(256, 2), ValueError, "remove_center must be a bool (or 0 / 1)")]
    return out


def _facts(sample):
    x = sample.args[0]
    group = sample.kwargs.get("group") if "group" in sample.kwargs else sample.args[10]
    return {"group_channels": x.shape[-1] // group, "group": group}


_COMMON = dict(fused_op="dcn_aggregate", outputs=("out",), cases=EDGE + RANDOM, basic_cases=BASIC, half_cases=HALF,
               gradcheck_cases=GRADCHECK, opcheck_cases=OPCHECK, compile_cases=COMPILE, triton_cases=TRITON,
               gpu_cases=GPU, fuzz_cases=FUZZ, facts=_facts)

SPECS = [
    OpSpec(name="dcn_aggregate", op=dcn_aggregate, reference=dcn_aggregate_ref, make=make,
           differentiable_inputs=("input", "offset", "mask"), bad_inputs=_bad, **_COMMON),
    OpSpec(name="dcnv4", op=dcnv4, reference=reference_v4, make=make_v4,
           differentiable_inputs=("input", "offset_mask"), bad_inputs=_bad_v4,
           **{**_COMMON, "cases": EDGE[:8] + RANDOM[:4], "gpu_cases": GPU[-2:], "fuzz_cases": (),
              "opcheck_cases": OPCHECK[1:]}),  # the same registered ops as dcn_aggregate: fewer replays
]
