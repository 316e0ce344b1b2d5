"""Conformance specs of the selective_scan family: selective_scan and bi_selective_scan."""

import numpy as np
import torch

from fastvision.ops import bi_selective_scan, selective_scan
from fastvision.reference.selective_scan import bi_selective_scan_ref, selective_scan_ref
from fastvision.testing import BadInput, KnownFailure, OpSpec, Sample, random_cases


def make_inputs(batch=2, dim=4, L=19, N=5, bc="var", groups=2, z=True, D=True, bias=True,
                dtype=torch.float32, seed=0, requires_grad=False, delta_scale=1.0, A_scale=1.0, bc_fp32=False,
                softplus=True):
    """Random scan inputs [u, delta, A, B, C, D, z, delta_bias].

    bc is 'const' (dim, N), 'var' (batch, N, L) or 'group' (batch, G, N, L).
    A, D, delta_bias and constant B/C are float32 (float64 for float64 inputs),
    as the anchor keeps them; variable B/C are in `dtype` (float32 with bc_fp32).
    Without softplus, delta and delta_bias are >= 0 (a decaying state, as in use).
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    u = rnd(batch, dim, L)
    delta = (rnd(batch, dim, L, dt=torch.float64) * 0.5 * delta_scale).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    A = (-torch.rand(dim, N, generator=g, dtype=torch.float64).add(0.1) * A_scale).to(acc)
    shapes = {"const": (dim, N), "var": (batch, N, L), "group": (batch, groups, N, L)}
    bc_dt = acc if bc == "const" or bc_fp32 else dtype
    B = rnd(*shapes[bc], dt=bc_dt)
    C = rnd(*shapes[bc], dt=bc_dt)
    Dv = rnd(dim, dt=acc) if D else None
    zv = rnd(batch, dim, L) if z else None
    bv = rnd(dim, dt=acc, scale=0.5) if bias else None
    if not softplus:
        delta, bv = delta.abs(), None if bv is None else bv.abs()
    tensors = [u, delta, A, B, C, Dv, zv, bv]
    if requires_grad:
        tensors = [t.requires_grad_() if t is not None else None for t in tensors]
    return tensors


DEFAULTS = dict(batch=2, dim=4, L=19, N=5, bc="var", groups=2, z=True, D=True, bias=True, softplus=True,
                reverse=False, last=True)


def _inputs(c, dtype, seed, **kw):
    return make_inputs(c["batch"], c["dim"], c["L"], c["N"], c["bc"], c["groups"], c["z"], c["D"], c["bias"],
                       dtype=dtype, seed=seed, delta_scale=c.get("delta_scale", 1.0),
                       A_scale=c.get("A_scale", 1.0), bc_fp32=c.get("bc_fp32", False), softplus=c["softplus"],
                       **kw)


def _flags(c, *names):
    """The case's bool flags, as numpy bools when the case says numpy=True."""
    return [np.bool_(c[n]) if c.get("numpy") else c[n] for n in names]


def make_scan(case, dtype, seed):
    c = {**DEFAULTS, **case}
    softplus, last, reverse = _flags(c, "softplus", "last", "reverse")
    return Sample((*_inputs(c, dtype, seed), softplus, last), {"reverse": reverse})


def make_bi_scan(case, dtype, seed):
    c = {**DEFAULTS, **case}
    forward = _inputs(c, dtype, 2 * seed + 1)
    backward = _inputs(c, dtype, 2 * seed + 2)
    del backward[6]  # one z gates both directions
    (softplus,) = _flags(c, "softplus")
    return Sample((*forward, *backward, softplus))


COMPILE_NUMPY = {"L": 20, "N": 3, "numpy": True}  # numpy bools for the flags (known failure below)
NUMPY_COMPILE_BUG = (
    "BUG: torch.compile(fullgraph=True) fails when a bool argument (delta_softplus, return_last_state, "
    "reverse) is a numpy bool, which the eager op accepts: dynamo traces numpy scalars as tensors, and "
    "fastvision._checks.as_bool calls value.item() on them, an unbacked SymBool: 'Expected a value of type "
    "bool for argument delta_softplus but instead found type SymBool', or the graph break 'Unsupported "
    "torch.* op returned non-Tensor'")


def _numpy_compile_failures():
    return [KnownFailure(check, COMPILE_NUMPY, NUMPY_COMPILE_BUG)
            for check in ("test_torch_compile_fullgraph", "test_gpu_torch_compile_fullgraph")]


def _d_state(sample):
    return {"d_state": sample.args[2].shape[1]}


def _valid(c):
    return c["bc"] != "group" or c["dim"] % c["groups"] == 0


SPACE = {
    "batch": [2, 1, 3],
    "dim": [4, 1, 3, 6, 8],
    "L": [19, 1, 2, 16, 17, 63, 130],
    "N": [5, 1, 3, 16, 17],
    "bc": ["var", "const", "group"],
    "groups": [2, 1, 3],
    "z": [True, False],
    "D": [True, False],
    "bias": [True, False],
    "softplus": [True, False],
    "reverse": [False, True],
    "last": [True, False],
}
EDGE = [
    {"L": 1}, {"dim": 1, "bc": "const"}, {"batch": 1, "N": 1},
    {"L": 128, "N": 16}, {"L": 129, "N": 16}, {"L": 257, "N": 16, "reverse": True},  # chunk boundaries
    {"N": 256, "L": 33, "dim": 2, "bc": "const"},  # the anchor's largest d_state
    {"bc": "group", "groups": 4, "dim": 8}, {"bc": "group", "groups": 8, "dim": 8},  # a group per channel
    {"z": False, "D": False, "bias": False, "softplus": False},
    {"batch": 0}, {"L": 0, "reverse": True},  # empty batch, empty sequence
    {"numpy": True, "reverse": True, "last": False},  # numpy bools for the flags
]
# Inputs the Triton kernels' limits refuse (d_state > 256): backend checks.
TOO_LARGE_FOR_TRITON = {"N": 300, "L": 7, "dim": 2, "batch": 1}


def _bad_scan():
    def bad(**overrides):
        u, delta, A, B, C, D, z, bias = make_inputs(2, 4, 10, 3, "var")
        args = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)
        return Sample((), {**args, **overrides})

    cases = [
        (dict(u=torch.randn(2, 4)), ValueError, "u must be a 3-D tensor"),
        (dict(delta=torch.randn(2, 4, 11)), ValueError, "delta must have shape"),
        (dict(A=torch.randn(5, 3)), ValueError, "A must have shape"),
        (dict(A=torch.randn(4, 0)), ValueError, "d_state N must be >= 1"),
        (dict(A=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "A must have dtype"),
        (dict(B=torch.randn(3, 3, 10)), ValueError, "B must have shape"),
        (dict(C=torch.randn(2, 3, 3, 10)), ValueError, "groups G=3"),
        (dict(B=torch.randn(2, 4, 3, 10, 1)), ValueError, "B must have shape (dim, N)"),
        (dict(D=torch.randn(5)), ValueError, "D must have shape"),
        (dict(delta_bias=torch.randn(4, 1)), ValueError, "delta_bias must have shape"),
        (dict(z=torch.randn(2, 4, 9)), ValueError, "z must have shape"),
        (dict(u=torch.randn(2, 4, 10, dtype=torch.float64)), TypeError, "delta must have dtype"),
        (dict(u=torch.randint(0, 3, (2, 4, 10))), TypeError, "u must have dtype"),
        (dict(u=[1.0]), TypeError, "u must be a torch.Tensor"),
        (dict(z=torch.randn(2, 4, 10, device="meta")), ValueError, "one device"),
        (dict(delta_softplus="yes"), TypeError, "delta_softplus must be a bool"),
        (dict(reverse=1), TypeError, "reverse must be a bool"),
        (dict(return_last_state=np.int64(1)), TypeError, "return_last_state must be a bool"),
    ]
    return [BadInput(match, bad(**o), exc, match) for o, exc, match in cases]


def _bad_bi_scan():
    forward = make_inputs(2, 4, 10, 3, "var")
    names = ["u_b", "delta_b", "A_b", "B_b", "C_b", "D_b", "delta_bias_b"]

    def bad(kind="var", L=10, dtype=torch.float32, **overrides):
        backward = make_inputs(2, 4, L, 3, kind, dtype=dtype, seed=1)
        del backward[6]
        return Sample(tuple(forward), {**dict(zip(names, backward)), **overrides})

    return [
        BadInput("B_b-shape", bad("const"), ValueError, "B_b must have the shape and dtype of B"),
        BadInput("u_b-shape", bad(L=11), ValueError, "u_b must have the shape and dtype of u"),
        BadInput("u_b-dtype", bad(dtype=torch.float64), ValueError, "u_b must have the shape and dtype of u"),
        BadInput("D_b-shape", bad(D_b=torch.randn(5)), ValueError, "D_b must have shape"),
        BadInput("delta_bias_b-shape", bad(delta_bias_b=torch.randn(3)), ValueError, "delta_bias_b must have shape"),
        BadInput("u_b-device", bad(u_b=torch.randn(2, 4, 10, device="meta")), ValueError, "one device"),
        BadInput("delta_softplus", bad(delta_softplus=None), TypeError, "delta_softplus must be a bool"),
    ]


SCAN = OpSpec(
    name="selective_scan",
    op=selective_scan,
    reference=selective_scan_ref,
    fused_op="selective_scan",
    make=make_scan,
    outputs=("out", "last_state"),
    differentiable_inputs=("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
    cases=random_cases(SPACE, 36, seed=1, edge_cases=EDGE, valid=_valid),
    basic_cases=[{}, {"bc": "group", "reverse": True, "z": False, "D": False}, {"bc": "const", "L": 1},
                 TOO_LARGE_FOR_TRITON],
    half_cases=[{"L": 70}, {"bc": "group", "reverse": True, "bc_fp32": True}, {"bc": "const", "softplus": False}],
    gradcheck_cases=[
        {"batch": 2, "dim": 3, "L": 8, "N": 2, "bc": "var"},
        {"batch": 2, "dim": 3, "L": 8, "N": 2, "bc": "const", "reverse": True},
        {"batch": 2, "dim": 4, "L": 8, "N": 2, "bc": "group", "reverse": True, "last": False},
        # delta + delta_bias crosses the softplus threshold (20) at some steps;
        # A small keeps exp(delta A) away from 0.
        {"batch": 1, "dim": 2, "L": 9, "N": 3, "delta_scale": 60.0, "A_scale": 0.01},
    ],
    opcheck_cases=[{"L": 20, "N": 3}, {"L": 20, "N": 3, "bc": "group", "z": False, "reverse": True}],
    compile_cases=[{"L": 20, "N": 3, "reverse": True}, COMPILE_NUMPY],
    triton_cases=[{"batch": 1, "dim": 2, "L": 9, "N": 3, "bc": "var", "reverse": True},
                  {"batch": 2, "dim": 2, "L": 6, "N": 5, "bc": "const", "last": False, "z": False},
                  {"batch": 1, "dim": 4, "L": 7, "N": 2, "bc": "group", "bc_fp32": True},  # fp32 B, C with fp16 u
                  {"L": 0}],
    gpu_cases=[{"batch": 2, "dim": 8, "L": L, "N": N, "bc": bc, "reverse": r}
               for bc, N, L in [("var", 16, 197), ("const", 16, 300), ("group", 64, 129), ("var", 256, 40),
                                ("var", 5, 1)] for r in (False, True)],
    bad_inputs=_bad_scan,
    fuzz_cases=[({"L": 7, "N": 3, "bc": "const", "z": False, "reverse": True}, torch.float32),
                ({"L": 7, "N": 3, "bc": "group", "reverse": True}, torch.float64),
                ({"L": 7, "N": 3, "z": False}, torch.bfloat16),
                ({"L": 7, "N": 3, "bc": "group", "bc_fp32": True}, torch.float16),
                # a wide grouped case: partial SIMD blocks, two groups of 10 channels
                ({"batch": 1, "dim": 20, "L": 5, "N": 3, "bc": "group", "groups": 2}, torch.float32),
                # two chunks (chunk_len 128 at N = 16): the backward's checkpoints
                ({"batch": 1, "dim": 2, "L": 130, "N": 16, "bc": "group", "groups": 1}, torch.float32)],
    facts=_d_state,
    known_failures=_numpy_compile_failures(),
)

_BI_SPACE = {k: v for k, v in SPACE.items() if k not in ("reverse", "last")}
_BI_EDGE = [
    {"L": 1}, {"dim": 1, "bc": "const"}, {"L": 129, "N": 16}, {"bc": "group", "groups": 4, "dim": 8},
    {"z": False, "D": False, "bias": False, "softplus": False}, {"batch": 0}, {"numpy": True},
]

BI_SCAN = OpSpec(
    name="bi_selective_scan",
    op=bi_selective_scan,
    reference=bi_selective_scan_ref,
    fused_op="bi_selective_scan",
    make=make_bi_scan,
    outputs=("out",),
    differentiable_inputs=("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                           "u_b", "delta_b", "A_b", "B_b", "C_b", "D_b", "delta_bias_b"),
    cases=random_cases(_BI_SPACE, 12, seed=2, edge_cases=_BI_EDGE, valid=_valid),
    basic_cases=[{}, {"bc": "const", "z": False}, TOO_LARGE_FOR_TRITON],
    half_cases=[{"L": 37, "bc": "group"}],
    gradcheck_cases=[{"batch": 1, "dim": 2, "L": 7, "N": 3}],
    opcheck_cases=[{"L": 20, "N": 3, "bc": "const"}],
    compile_cases=[{"L": 20, "N": 3}, COMPILE_NUMPY],
    triton_cases=[{"batch": 1, "dim": 2, "L": 7, "N": 3, "bc": "group", "groups": 1}],
    gpu_cases=[{"batch": 2, "dim": 16, "L": 197, "N": 16}, {"batch": 2, "dim": 8, "L": 64, "N": 64, "bc": "group"}],
    bad_inputs=_bad_bi_scan,
    fuzz_cases=[({"L": 7, "N": 3}, torch.float32), ({"L": 7, "N": 3, "bc": "group", "z": False}, torch.bfloat16)],
    facts=_d_state,
    known_failures=_numpy_compile_failures(),
)

SPECS = [SCAN, BI_SCAN]
