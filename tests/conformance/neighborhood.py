"""Conformance specs of the neighborhood family: na1d, na2d, na3d (NATTEN's argument order)."""

import random

import numpy as np
import torch

from fastvision.ops import na1d, na2d, na3d
from fastvision.reference.neighborhood import neighborhood_attention_ref
from fastvision.testing import BadInput, KnownFailure, OpSpec, Sample

NA = {1: na1d, 2: na2d, 3: na3d}


def na_reference(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                 additional_keys=None, additional_values=None, *, rpb=None, return_lse=False):
    """The reference with the public functions' (NATTEN's) argument order."""
    return neighborhood_attention_ref(query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale,
                                      return_lse, additional_keys=additional_keys,
                                      additional_values=additional_values)


def edge(nd, spatial, kernel_size, dilation=None, stride=None, is_causal=None, **kw):
    """A case: every setting of one call. Options beyond the window:

    rpb (and rpb_fp32: float32 rpb with half inputs), n_extra additional keys
    with extra_heads kv heads, lse (return_lse), scale, numpy (numpy scalars
    for every int/bool/float argument), positional (NATTEN's positional order
    for everything up to additional_values).
    """
    c = dict(nd=nd, batch=2, spatial=spatial, kernel_size=kernel_size, dilation=dilation or (1,) * nd,
             stride=stride or (1,) * nd, is_causal=is_causal or (False,) * nd, heads=2, kv_heads=2,
             head_dim=8, head_dim_v=8, rpb=False)
    c.update(kw)
    return c


def make_case(rng: random.Random, nd: int) -> dict:
    """A random legal configuration with nd spatial axes, and random options."""
    spatial, ks, ds, ss, cs = [], [], [], [], []
    causal_ok = rng.random() < 0.35
    for _ in range(nd):
        k = rng.choice([1, 2, 3, 4, 5] if nd == 3 else [2, 3, 4, 5, 6, 7])
        d = rng.choice([1, 1, 2, 3])
        L = k * d + rng.choice([0, 1, 2, 3, 5, 8] if nd < 3 else [0, 1, 2, 3])
        spatial.append(L)
        ks.append(k)
        ds.append(d)
        ss.append(rng.choice([1, 1, rng.randint(1, k)]))
        cs.append(causal_ok and rng.random() < 0.6)
    Hkv = rng.choice([1, 2])
    H = Hkv * rng.choice([1, 2])
    D = rng.choice([4, 8, 16, 32])
    rpb = not any(cs) and all(s == 1 for s in ss) and rng.random() < 0.5
    n_extra = rng.choice([0, 0, 0, 1, 3])
    return dict(nd=nd, batch=rng.choice([1, 2]), spatial=tuple(spatial), kernel_size=tuple(ks),
                dilation=tuple(ds), stride=tuple(ss), is_causal=tuple(cs), heads=H, kv_heads=Hkv,
                head_dim=D, head_dim_v=rng.choice([D, D, 8]), rpb=rpb, n_extra=n_extra,
                extra_heads=rng.choice([1, Hkv]), lse=rng.random() < 0.7,
                scale=rng.choice([None, None, 0.3]), numpy=rng.random() < 0.2, positional=rng.random() < 0.3)


def _per_axis(values, numpy_type, as_numpy):
    """A per-axis setting as the case gives it: one scalar when every axis agrees, else a tuple."""
    values = tuple(numpy_type(v) for v in values) if as_numpy else tuple(values)
    return values[0] if len(set(values)) == 1 else values


def make_inputs(case, dtype=torch.float32, seed=0, requires_grad=False):
    """query, key, value, rpb, additional_keys, additional_values of a case (None where absent)."""
    c = {"n_extra": 0, "extra_heads": None, "rpb_fp32": False, **case}
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt).requires_grad_(requires_grad)

    B, sp, H, Hkv, D, Dv = c["batch"], c["spatial"], c["heads"], c["kv_heads"], c["head_dim"], c["head_dim_v"]
    q, k, v = rnd(B, *sp, H, D), rnd(B, *sp, Hkv, D), rnd(B, *sp, Hkv, Dv)
    rpb_dtype = torch.float32 if c["rpb_fp32"] else dtype
    rpb = rnd(H, *(2 * x - 1 for x in c["kernel_size"]), dt=rpb_dtype) if c["rpb"] else None
    ak = av = None
    if c["n_extra"]:
        He = c["extra_heads"] or Hkv
        ak, av = rnd(B, c["n_extra"], He, D), rnd(B, c["n_extra"], He, Dv)
    return q, k, v, rpb, ak, av


def make_na(case, dtype, seed):
    c = {"lse": True, "scale": None, "numpy": False, "positional": False, **case}
    q, k, v, rpb, ak, av = make_inputs(c, dtype, seed)
    np_ = c["numpy"]
    ks = _per_axis(c["kernel_size"], np.int64, np_)
    stride = _per_axis(c["stride"], np.int32, np_)
    dilation = _per_axis(c["dilation"], np.int64, np_)
    causal = _per_axis(c["is_causal"], np.bool_, np_)
    scale = np.float32(c["scale"]) if np_ and c["scale"] is not None else c["scale"]
    lse = np.bool_(c["lse"]) if np_ else c["lse"]
    if c["positional"]:
        return Sample((q, k, v, ks, stride, dilation, causal, scale, ak, av), dict(rpb=rpb, return_lse=lse))
    return Sample((q, k, v, ks), dict(stride=stride, dilation=dilation, is_causal=causal, scale=scale,
                                      additional_keys=ak, additional_values=av, rpb=rpb, return_lse=lse))


def _head_dims(sample):
    a = sample.args
    return {"head_dim": a[0].shape[-1], "head_dim_v": a[2].shape[-1]}


EDGE = [
    edge(1, (13,), (5,)),                                          # odd kernel, both borders
    edge(1, (13,), (4,), rpb=True),                                # even kernel + rpb
    edge(1, (9,), (9,)),                                           # window = whole axis
    edge(1, (13,), (4,), (3,)),                                    # dilation, 13 % 3 != 0
    edge(1, (14,), (3,), (4,), rpb=True),                          # dilation + rpb, uneven groups
    edge(1, (12,), (4,), (3,), rpb=True, heads=4, kv_heads=1),     # rpb + MQA
    edge(1, (11,), (4,), is_causal=(True,)),                       # causal, even kernel
    edge(1, (17,), (5,), (2,), (3,), (True,)),                     # causal + dilation + stride
    edge(1, (15,), (4,), stride=(4,)),                             # stride == kernel
    edge(1, (16,), (6,), (2,), (4,)),                              # even kernel, stride, dilation
    edge(1, (1,), (1,)),                                           # size-1 axis (kernel 1)
    edge(1, (13,), (5,), batch=0),                                 # empty batch
    edge(1, (10,), (3,), heads=6, kv_heads=2, head_dim=16, head_dim_v=4),  # GQA, Dv < D
    edge(1, (40,), (13,), (2,), head_dim=64, head_dim_v=64, heads=3, kv_heads=1),
    edge(1, (21,), (7,), (3,), rpb=True, head_dim=16, head_dim_v=16),
    edge(1, (30,), (11,), head_dim=256, head_dim_v=256, heads=1, kv_heads=1, batch=1),
    edge(1, (12,), (5,), n_extra=3, heads=4, kv_heads=2, extra_heads=1, rpb=True),  # extra keys, own GQA
    edge(1, (11,), (3,), (2,), (2,), (True,), n_extra=1, lse=False, positional=True),
    edge(1, (10,), (4,), (2,), numpy=True, scale=0.3, positional=True, n_extra=2),   # numpy scalars
    edge(1, (9,), (3,), lse=False, scale=1.7),
    edge(2, (9, 11), (3, 4), (2, 1), (1, 2), (False, True)),       # causal on one axis only
    edge(2, (9, 11), (3, 4), (2, 2), rpb=True),                    # 2-D rpb with dilation
    edge(2, (7, 7), (7, 7), rpb=True),                             # kernel == size: all borders
    edge(2, (1, 8), (1, 3), rpb=True),                             # size-1 axis with rpb
    edge(2, (8, 10), (2, 5), (4, 2), (2, 3), (True, True)),        # causal both, kernel * dil == L
    edge(2, (6, 9), (3, 3), batch=0, rpb=True),                    # empty batch with rpb
    # Head dims with compile-time kernels (16, 32, 64, 128) and others, with
    # windows longer and shorter than the 8-row blocks of the dot products.
    edge(2, (9, 10), (3, 5), (2, 1), rpb=True, head_dim=32, head_dim_v=32, heads=4, kv_heads=2),
    edge(2, (7, 8), (2, 3), (1, 2), (2, 1), (True, False), head_dim=128, head_dim_v=128, heads=1, kv_heads=1),
    edge(2, (8, 9), (3, 3), head_dim=48, head_dim_v=48),
    edge(2, (6, 6), (3, 3), head_dim=32, head_dim_v=64),          # mixed: runtime head dims
    edge(2, (7, 9), (3, 5), (2, 1), (1, 2), (True, False), n_extra=4, heads=6, kv_heads=3, extra_heads=3),
    edge(2, (6, 7), (3, 3), (1, 2), numpy=True, rpb=True, n_extra=1, scale=0.5),
    edge(3, (5, 6, 7), (2, 3, 3), (2, 1, 2), (2, 1, 3), (True, False, False)),
    edge(3, (5, 6, 7), (3, 2, 3), (1, 3, 2), rpb=True, heads=4, kv_heads=2, head_dim_v=16),
    edge(3, (4, 1, 6), (3, 1, 4), (1, 1, 1), (3, 1, 2), (False, False, True)),  # size-1 middle axis
    edge(3, (3, 4, 5), (3, 3, 3), batch=0),                                      # empty batch
    edge(3, (4, 5, 6), (2, 3, 3), (1, 1, 2), (1, 2, 1), (False, True, False), n_extra=2, extra_heads=1,
         positional=True, numpy=True, lse=False),
]

_rng = random.Random(1)
RANDOM = [make_case(_rng, nd) for nd in (1, 2, 3) for _ in range(8 if nd < 3 else 6)]

BASIC = {
    1: [edge(1, (13,), (5,), (2,), rpb=True, n_extra=2),
        edge(1, (11,), (4,), (1,), (2,), (True,), heads=4, kv_heads=2, lse=False, positional=True),
        edge(1, (5,), (3,), head_dim=264, head_dim_v=8, heads=1, kv_heads=1, batch=1)],  # too large for Triton
    2: [edge(2, (8, 9), (3, 5), (2, 1), rpb=True, heads=4, kv_heads=2, n_extra=2),
        edge(2, (7, 8), (3, 3), (1, 2), (2, 1), (True, False), lse=False),
        edge(2, (4, 5), (3, 3), head_dim=8, head_dim_v=264, heads=1, kv_heads=1, batch=1)],
    3: [edge(3, (4, 5, 6), (3, 2, 3), (1, 2, 2), rpb=True, heads=2, kv_heads=1),
        edge(3, (4, 5, 6), (2, 3, 3), (2, 1, 1), (2, 1, 3), (True, False, True), n_extra=1, lse=False),
        edge(3, (3, 3, 3), (3, 3, 3), head_dim=264, head_dim_v=264, heads=1, kv_heads=1, batch=1)],
}
HALF = {
    1: [edge(1, (17,), (5,), (3,), n_extra=3, heads=4, kv_heads=2, extra_heads=1, head_dim=32, head_dim_v=16)],
    2: [edge(2, (10, 9), (5, 3), (2, 1), rpb=True, heads=4, kv_heads=2, head_dim=32, head_dim_v=16),
        edge(2, (8, 9), (3, 3), (1, 2), (2, 1), (True, False), head_dim=16, head_dim_v=16),
        edge(2, (7, 8), (5, 3), rpb=True, rpb_fp32=True, n_extra=2, head_dim=16, head_dim_v=16)],  # fp32 rpb
    3: [edge(3, (4, 5, 6), (3, 3, 3), (1, 1, 2), rpb=True, head_dim=16, head_dim_v=16)],
}
GRADCHECK = {  # float64, tiny: gradients of query, key, value, rpb, additional keys/values, through out and lse
    1: [edge(1, (7,), (3,), (2,), rpb=True, head_dim=3, head_dim_v=2, batch=1, n_extra=2, extra_heads=1)],
    2: [edge(2, (5, 6), (3, 2), (1, 2), (1, 2), (False, True), heads=2, kv_heads=1, head_dim=3, head_dim_v=4,
             batch=1),
        edge(2, (3, 4), (3, 3), rpb=True, heads=2, kv_heads=1, head_dim=2, head_dim_v=3, batch=1, n_extra=1,
             lse=False)],
    3: [edge(3, (2, 3, 4), (2, 2, 3), (1, 1, 1), rpb=True, heads=1, kv_heads=1, head_dim=2, head_dim_v=3,
             batch=1)],
}
OPCHECK = {
    1: [edge(1, (9,), (4,), (2,), (2,), (True,), lse=False)],
    2: [edge(2, (6, 7), (3, 2), (2, 1), rpb=True, heads=4, kv_heads=2, head_dim_v=4, n_extra=1)],
    3: [edge(3, (3, 4, 5), (2, 3, 3), (1, 1, 1), (1, 2, 1), (False, True, False))],
}
COMPILE = {
    1: [edge(1, (11,), (3,), (2,), n_extra=2, heads=2, kv_heads=1)],
    2: [edge(2, (7, 8), (3, 3), (2, 1), rpb=True)],
    3: [edge(3, (3, 4, 5), (2, 3, 3), (1, 1, 1), (1, 2, 1), (False, True, False), lse=False)],
}
# numpy scalars for kernel_size, stride, dilation, is_causal, scale, return_lse (known failure below)
COMPILE_NUMPY = {
    1: edge(1, (9,), (3,), (2,), numpy=True, scale=0.5),
    2: edge(2, (6, 7), (3, 3), (1, 2), numpy=True),
    3: edge(3, (3, 4, 5), (2, 3, 3), is_causal=(True, False, False), numpy=True),
}
NUMPY_COMPILE_BUG = (
    "BUG: torch.compile(fullgraph=True) fails when an int or bool argument is a numpy scalar, which the eager "
    "op accepts: dynamo traces numpy scalars as tensors, and fastvision._checks.as_int / as_bool call "
    "value.item() on them, an unbacked symbol: 'Could not guard on data-dependent expression u0 < 1' "
    "(_check_args), a SymInt list the op's int[] schema rejects, or the graph break 'Unsupported torch.* op "
    "returned non-Tensor'")
TRITON = {  # small: the interpreter is slow (head_dim >= 16: tl.dot's smallest tile)
    1: [edge(1, (11,), (4,), (2,), (2,), (True,), heads=2, kv_heads=1, head_dim=16, head_dim_v=16, batch=1,
             n_extra=2)],
    2: [edge(2, (5, 6), (3, 2), (1, 2), rpb=True, heads=2, kv_heads=1, head_dim=16, head_dim_v=16, batch=1),
        edge(2, (4, 5), (3, 3), batch=0, rpb=True, head_dim=16, head_dim_v=16)],  # empty batch
    3: [edge(3, (3, 4, 6), (2, 3, 3), (1, 1, 2), (1, 2, 1), (False, False, True), head_dim=16, head_dim_v=32,
             batch=2, heads=1, kv_heads=1, lse=False)],
}
GPU = {nd: [c for c in EDGE if c["nd"] == nd and c["batch"] > 0] for nd in (1, 2, 3)}
GPU[1].append(edge(1, (8192,), (63,), is_causal=(True,), heads=4, kv_heads=2, head_dim=64, head_dim_v=64))
GPU[2].append(edge(2, (56, 56), (7, 7), (8, 8), rpb=True, heads=2, kv_heads=2, head_dim=32, head_dim_v=32))
GPU[3].append(edge(3, (8, 12, 12), (3, 5, 5), (1, 2, 2), head_dim=128, head_dim_v=128))


# --------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, never a crash.


def _bad_na2d():
    q, k, v, _ = (torch.randn(2, 6, 7, 4, 8), torch.randn(2, 6, 7, 2, 8), torch.randn(2, 6, 7, 2, 8), None)
    rpb = torch.randn(4, 5, 5)

    def bad(**overrides):
        return Sample((), {**dict(query=q, key=k, value=v, kernel_size=3, rpb=rpb), **overrides})

    ak, av = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    cases = [
        (dict(kernel_size=4, dilation=2), ValueError, "on spatial axis 0 (dim 1 of query, length 6)"),
        (dict(kernel_size=(3, 8), rpb=None), ValueError, "on spatial axis 1 (dim 2 of query, length 7)"),
        (dict(query=torch.randn(2, 6, 7, 32)), ValueError,
         "query must be a 5-D tensor (batch, H, W, heads, head_dim)"),
        (dict(key=torch.randn(2, 6, 7, 2)), ValueError, "key must be a 5-D tensor"),
        (dict(key=torch.randn(2, 6, 7, 3, 8), value=torch.randn(2, 6, 7, 3, 8)), ValueError, "must divide"),
        (dict(value=torch.randn(2, 6, 7, 1, 8)), ValueError, "key and value must have the same number of heads"),
        (dict(key=torch.randn(2, 6, 7, 2, 4)), ValueError, "key's head_dim must equal query's"),
        (dict(key=torch.randn(2, 7, 6, 2, 8)), ValueError, "key and value must have query's batch and spatial"),
        (dict(rpb=torch.randn(4, 5, 4)), ValueError, "rpb must have shape"),
        (dict(rpb=torch.randn(2, 5, 5)), ValueError, "rpb must have shape"),
        (dict(is_causal=(True, False)), ValueError,
         "rpb (relative positional bias) cannot be combined with is_causal"),
        (dict(stride=2), ValueError, "rpb (relative positional bias) needs stride 1"),
        (dict(stride=4, rpb=None), ValueError, "stride must not exceed kernel_size"),
        (dict(kernel_size=0, rpb=None), ValueError, "must be >= 1"),
        (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size must be an int or a tuple of 2"),
        (dict(dilation=1.5), TypeError, "dilation must be an int"),
        (dict(stride=np.float64(1.0)), TypeError, "stride must be an int"),
        (dict(is_causal=1), TypeError, "is_causal must be a bool"),
        (dict(query=torch.randint(0, 3, (2, 6, 7, 4, 8))), TypeError, "query must have dtype"),
        (dict(key=torch.randn(2, 6, 7, 2, 8, dtype=torch.float64)), TypeError, "key must have dtype"),
        (dict(rpb=torch.randn(4, 5, 5, dtype=torch.float64)), TypeError, "rpb must have dtype"),
        (dict(value=torch.randn(2, 6, 7, 2, 8, device="meta")), ValueError, "one device"),
        (dict(query=[1.0]), TypeError, "query must be a torch.Tensor"),
        (dict(scale="big"), TypeError, "scale must be a float"),
        (dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
        (dict(additional_keys=ak), ValueError, "additional_keys and additional_values must be given together"),
        (dict(additional_keys=ak[:1], additional_values=av[:1]), ValueError, "additional_keys must have shape"),
        (dict(additional_keys=torch.randn(2, 3, 3, 8), additional_values=torch.randn(2, 3, 3, 8)), ValueError,
         "kv_heads dividing heads=4"),
        (dict(additional_keys=ak, additional_values=av[..., :5]), ValueError, "additional_values must have shape"),
        (dict(additional_keys=ak.double(), additional_values=av), TypeError, "additional_keys must have dtype"),
        (dict(additional_keys=ak[0], additional_values=av[0]), ValueError, "additional_keys must be a 4-D tensor"),
        (dict(additional_keys=ak.to("meta"), additional_values=av), ValueError, "one device"),
    ]
    return [BadInput(match, bad(**o), exc, match) for o, exc, match in cases]


def _bad_rank_and_window(nd):
    fn = f"na{nd}d"

    def sample(spatial, **kw):
        q = torch.randn(1, *spatial, 2, 8)
        return Sample((q, q, q), {"kernel_size": 3, **kw})

    wrong = (8,) * (2 if nd == 1 else nd - 1)
    long_axis = (5,) * nd
    return [
        BadInput("rank", sample(wrong), ValueError, f"{fn}: query must be a {nd + 3}-D tensor"),
        BadInput("window-too-large", sample(long_axis, kernel_size=3, dilation=2), ValueError,
                 "on spatial axis 0 (dim 1 of query, length 5) kernel_size 3 * dilation 2 = 6 > 5"),
        BadInput("per-axis-count", sample(long_axis, kernel_size=(3,) * (nd + 1)), TypeError,
                 f"kernel_size must be an int or a tuple of {nd} (one per spatial axis) for {fn}"),
        BadInput("stride>kernel", sample(long_axis, stride=4), ValueError, "stride must not exceed kernel_size"),
        BadInput("causal-type", sample(long_axis, is_causal=(True, "no", False)[:nd] if nd > 1 else "no"),
                 TypeError, "is_causal must be a bool"),
        BadInput("extra-keys-alone", sample(long_axis, additional_values=torch.randn(1, 2, 2, 8)), ValueError,
                 "additional_keys and additional_values must be given together"),
    ]


# Every option the wrappers pass to na_fwd / na_bwd, in every input dtype, on small shapes.
FUZZ = {
    1: [(edge(1, (9,), (3,), (2,), rpb=True, head_dim=4, head_dim_v=4), torch.float32),
        (edge(1, (8,), (3,), is_causal=(True,), heads=4, kv_heads=2, head_dim=4, head_dim_v=6), torch.float32),
        (edge(1, (8,), (4,), stride=(2,), head_dim=4, head_dim_v=4, lse=False), torch.float64),
        (edge(1, (8,), (3,), head_dim=4, head_dim_v=4, n_extra=2, extra_heads=1, heads=2, kv_heads=2),
         torch.float16)],
    2: [(edge(2, (5, 6), (3, 2), (1, 2), rpb=True, head_dim=4, head_dim_v=4), torch.float32),
        (edge(2, (5, 4), (3, 3), stride=(2, 1), is_causal=(True, False), kv_heads=1, head_dim=4, head_dim_v=4),
         torch.bfloat16)],
    3: [(edge(3, (3, 4, 3), (3, 3, 3), rpb=True, head_dim=4, head_dim_v=4), torch.float32),
        (edge(3, (3, 4, 4), (2, 3, 2), (1, 1, 2), is_causal=(False, True, False), head_dim=16, head_dim_v=16),
         torch.float32)],
}


def _spec(nd, bad_inputs):
    return OpSpec(
        name=f"na{nd}d",
        op=NA[nd],
        reference=na_reference,
        fused_op="neighborhood_attention",
        make=make_na,
        outputs=("out", "lse"),
        differentiable_inputs=("query", "key", "value", "additional_keys", "additional_values", "rpb"),
        cases=[c for c in EDGE + RANDOM if c["nd"] == nd],
        basic_cases=BASIC[nd],
        half_cases=HALF[nd],
        gradcheck_cases=GRADCHECK[nd],
        opcheck_cases=OPCHECK[nd],
        compile_cases=[*COMPILE[nd], COMPILE_NUMPY[nd]],
        triton_cases=TRITON[nd],
        gpu_cases=GPU[nd],
        bad_inputs=bad_inputs,
        fuzz_cases=FUZZ[nd],
        facts=_head_dims,
        known_failures=[KnownFailure(check, COMPILE_NUMPY[nd], NUMPY_COMPILE_BUG)
                        for check in ("test_torch_compile_fullgraph", "test_gpu_torch_compile_fullgraph")],
    )


SPECS = [
    _spec(1, lambda: _bad_rank_and_window(1)),
    _spec(2, lambda: _bad_na2d() + _bad_rank_and_window(2)),
    _spec(3, lambda: _bad_rank_and_window(3)),
]
