"""GPU smoke test: every kernel once per dtype, forward and backward, against
the float32 reference. The first thing to run on a GPU machine
(``bash bench/gpu_check.sh --stage smoke``).

Covers selective_scan (constant, variable and grouped B/C; reverse; with and
without z/D/delta_bias/softplus; d_state 5 to 256) on the Triton and CUDA C++
backends, bi_selective_scan on both, and na1d/na2d/na3d on Triton (rpb,
causal, stride, dilation, GQA/MQA, head_dim_v != head_dim, a head_dim that is
not a power of two, additional_keys/values), criss_cross_attention on
Triton (several w, partner and channel blocks; H or W = 1), super token
sampling + upsampling on Triton (padding, n_iter 2, 320 channels),
deform_conv2d on Triton (DCNv1 / DCNv2, weight and offset groups, stride,
kernel 5, offsets across the borders), dcn_aggregate on Triton (DCNv3 softmax
with remove_center, DCNv4 weights, a non-square strided kernel, Cg not a power
of two) and ms_deform_attn on Triton (Deformable DETR's 4 levels, samples across
every border; a head dim of 96 on a 7 x 1 level) in float32, float16 and bfloat16.

The cases are data (:data:`CASES`), run by one function (:func:`check_case`)
on any device: ``bench/compile_check.py`` runs the fast path of every case on
meta tensors to list the Triton configurations it launches (and compiles them
in parallel before the smoke run), and :func:`test_smoke_on_cpu_interpreter`
runs the float32 cases on CPU tensors under TRITON_INTERPRET=1, so the test's
own logic is checked on machines without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

from fastvision import _extension
from fastvision.ops import (bi_selective_scan, criss_cross_attention, dcn_aggregate, deform_conv2d,
                            ms_deform_attn, na1d, na2d, na3d, selective_scan, super_token_sampling,
                            super_token_upsample)
from fastvision.testing import assert_close

import conformance.dcn as tdcn
import conformance.deform_attn as tda
import conformance.neighborhood as tn
import conformance.selective_scan as tss

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NA = {1: na1d, 2: na2d, 3: na3d}


@dataclass(frozen=True)
class SmokeCase:
    """One configuration. kind: 'scan', 'bi_scan', 'na', 'cca', 'stoken' or 'dcn'; params: the
    tests' make_inputs arguments plus the op's flags; backends: the fast
    backends to check (each against backend='reference')."""
    name: str
    kind: str
    params: dict = field(default_factory=dict)
    backends: tuple = ("triton",)


def _scan(name, backends=("triton", "cuda"), **kw):
    p = dict(batch=2, dim=8, L=100, N=16, bc="var", groups=2, z=True, D=True, bias=True,
             softplus=True, reverse=False)
    p.update(kw)
    return SmokeCase(name, "scan", p, backends)


def _na(name, nd, spatial, kernel_size, dilation=None, stride=None, is_causal=None, n_extra=0, **kw):
    c = tn.edge(nd, spatial, kernel_size, dilation, stride, is_causal, **kw)
    c["n_extra"] = n_extra
    return SmokeCase(name, "na", c)


CASES = [
    # L 300 with N 16: chunks of 128, the last one partial.
    _scan("scan-var-N16-L300", L=300),
    _scan("scan-const-N16-reverse", bc="const", L=130, reverse=True),
    _scan("scan-group-N64", bc="group", groups=2, N=64, L=129),
    _scan("scan-var-N5-reverse-plain", N=5, L=70, reverse=True, z=False, D=False, bias=False, softplus=False),
    _scan("scan-var-N256", N=256, L=40, dim=4),
    SmokeCase("bi-var-N16", "bi_scan", dict(batch=2, dim=8, L=197, N=16, bc="var", bc_b="var"),
              ("triton", "cuda")),
    SmokeCase("bi-group-N32", "bi_scan", dict(batch=2, dim=8, L=65, N=32, bc="group", bc_b="group"),
              ("triton", "cuda")),
    _na("na1d-rpb-dilation", 1, (40,), (7,), (2,), rpb=True, head_dim=32, head_dim_v=32),
    _na("na1d-causal-stride-mqa-extra", 1, (37,), (5,), (3,), (2,), (True,), heads=4, kv_heads=1,
        head_dim=64, head_dim_v=64, n_extra=3),
    _na("na2d-rpb-dilation", 2, (14, 15), (5, 3), (2, 1), rpb=True, head_dim=32, head_dim_v=32),
    _na("na2d-causal-stride-gqa-d128", 2, (12, 13), (3, 5), (1, 2), (2, 1), (True, False), heads=4,
        kv_heads=2, head_dim=128, head_dim_v=128),
    _na("na2d-extra-keys-d48", 2, (10, 9), (3, 3), head_dim=48, head_dim_v=48, n_extra=5),
    _na("na3d-rpb-dilation", 3, (5, 6, 7), (3, 3, 3), (1, 2, 1), rpb=True, head_dim=32, head_dim_v=32),
    _na("na3d-causal-stride-gqa-dv", 3, (6, 5, 8), (2, 3, 4), (1, 1, 2), (2, 1, 3), (True, False, False),
        heads=4, kv_heads=2, head_dim=16, head_dim_v=32),
    # criss-cross (CCNet): NCHW query/key (B, Cqk, H, W), value (B, C, H, W)
    SmokeCase("cca-ccnet-like", "cca", dict(B=2, Cqk=16, C=128, H=33, W=45)),
    SmokeCase("cca-one-row", "cca", dict(B=1, Cqk=8, C=70, H=1, W=40)),
    SmokeCase("cca-one-column", "cca", dict(B=2, Cqk=5, C=3, H=37, W=1)),
    # Super tokens: every kernel (pool, cell, fold, spread) forward and backward.
    SmokeCase("stoken-s8-padded", "stoken", dict(batch=2, C=64, H=30, W=27, stoken=(8, 8), n_iter=1)),
    SmokeCase("stoken-s4x3-iter2-c96", "stoken", dict(batch=1, C=96, H=17, W=20, stoken=(4, 3), n_iter=2)),
    SmokeCase("stoken-s2-c320", "stoken", dict(batch=1, C=320, H=9, W=7, stoken=(2, 2), n_iter=1)),
    # deform_conv2d: input (B, Cin, H, W), offsets ~ scale * N(0, 1) pixels; every kernel (forward,
    # column gradients, weight gradient, input-gradient gather).
    SmokeCase("dcn2-r50-like", "deform_conv",
              dict(B=2, Cin=64, Cout=64, H=20, W=21, k=3, stride=1, G=1, groups=1, mask=True, scale=1.0)),
    SmokeCase("dcn1-groups-stride", "deform_conv",
              dict(B=1, Cin=48, Cout=40, H=17, W=13, k=3, stride=2, G=3, groups=2, mask=False, scale=3.0)),
    SmokeCase("dcn2-k5-borders", "deform_conv",
              dict(B=2, Cin=20, Cout=36, H=9, W=11, k=5, stride=1, G=2, groups=1, mask=True, scale=6.0)),
    # Multi-scale deformable attention: Deformable DETR's 4 levels (borders crossed), a wide head.
    SmokeCase("msda-detr-levels", "msda", dict(N=2, Lq=200, M=8, D=32, P=4,
                                               levels=((32, 40), (16, 20), (8, 10), (4, 5)))),
    SmokeCase("msda-d96-one-level", "msda", dict(N=1, Lq=50, M=2, D=96, P=3, levels=((7, 1),))),
    # DCNv3 / DCNv4 aggregation (channels-last); cases of tests/conformance/dcn.py.
    SmokeCase("dcn-v3-softmax-rc", "dcn", tdcn.case(N=2, H=28, W=29, G=4, Cg=16, sm=True, rc=True, spread=0.2)),
    SmokeCase("dcn-v4-g8-c32", "dcn", tdcn.case(N=1, H=20, W=22, G=8, Cg=32, spread=0.5)),
    SmokeCase("dcn-3x5-stride-cg12", "dcn", tdcn.case(N=2, H=17, W=19, G=3, Cg=12, k=(3, 5), s=(2, 1), p=(1, 2),
                                                      d=(1, 2), scale=0.5, spread=1.2)),
]


# --------------------------------------------------------------------------
# Inputs, fast path, reference


def _scan_direction(p, bc, device, dtype, seed):
    t = tss.make_inputs(p["batch"], p["dim"], p["L"], p["N"], bc, p.get("groups", 2), z=p.get("z", True),
                        D=p.get("D", True), bias=p.get("bias", True), dtype=dtype, seed=seed)
    return [x.to(device) if x is not None else None for x in t]


def make_inputs(case: SmokeCase, device, dtype, seed: int = 0) -> dict:
    """The case's differentiable inputs by name (leaves, requires_grad set)."""
    p = case.params
    if case.kind == "scan":
        t = _scan_direction(p, p["bc"], device, dtype, seed)
        x = dict(zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), t))
    elif case.kind == "bi_scan":
        f = _scan_direction(p, p["bc"], device, dtype, seed)
        b = _scan_direction(p, p["bc_b"], device, dtype, seed + 1)
        names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
        x = dict(zip(names, f))
        x.update({n + "_b": v for n, v in zip(names, b) if n != "z"})
    elif case.kind == "cca":
        g = torch.Generator().manual_seed(seed)
        qk = (p["B"], p["Cqk"], p["H"], p["W"])
        x = {n: (torch.randn(*shape, generator=g) * 0.5).to(device, dtype)
             for n, shape in (("q", qk), ("k", qk), ("v", (p["B"], p["C"], p["H"], p["W"])))}
    elif case.kind == "stoken":
        g = torch.Generator().manual_seed(seed)
        x = dict(x=torch.randn(p["batch"], p["C"], p["H"], p["W"], generator=g).to(device, dtype))
    elif case.kind == "msda":
        value, _, _, loc, attn = tda.make(tda.case(**p), dtype, seed).to(device).args
        x = dict(value=value, sampling_locations=loc, attention_weights=attn)
    elif case.kind == "deform_conv":
        g = torch.Generator().manual_seed(seed)
        k, B, G = p["k"], p["B"], p["G"]
        Ho, Wo = (p["H"] + 2 * (k // 2) - k) // p["stride"] + 1, (p["W"] + 2 * (k // 2) - k) // p["stride"] + 1
        shapes = dict(input=(B, p["Cin"], p["H"], p["W"]), offset=(B, 2 * G * k * k, Ho, Wo),
                      weight=(p["Cout"], p["Cin"] // p["groups"], k, k), bias=(p["Cout"],))
        scales = dict(input=1.0, offset=p["scale"], weight=(p["Cin"] // p["groups"] * k * k) ** -0.5, bias=1.0)
        x = {n: (torch.randn(*shape, generator=g) * scales[n]).to(device, dtype) for n, shape in shapes.items()}
        if p["mask"]:
            x["mask"] = torch.rand(B, G * k * k, Ho, Wo, generator=g).to(device, dtype)
    elif case.kind == "dcn":
        x = dict(zip(("input", "offset", "mask"), (t.to(device) for t in tdcn.make(p, dtype, seed).args[:3])))
    else:
        q, k, v, rpb, ak, av = (t.to(device) if t is not None else None for t in tn.make_inputs(p, dtype, seed))
        x = dict(q=q, k=k, v=v, rpb=rpb, additional_keys=ak, additional_values=av)
    return {n: t.requires_grad_() for n, t in x.items() if t is not None}


def run(case: SmokeCase, x: dict, backend: str) -> dict:
    """The op on inputs `x` with `backend`: its outputs by name."""
    p = case.params
    if case.kind == "scan":
        out, last = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"), x.get("z"),
                                   x.get("delta_bias"), p["softplus"], True, reverse=p["reverse"],
                                   backend=backend)
        return {"out": out, "last_state": last}
    if case.kind == "bi_scan":
        f = [x.get(n) for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        b = [x.get(n + "_b") for n in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
        return {"out": bi_selective_scan(*f, *b, True, backend=backend)}
    if case.kind == "cca":
        return {"out": criss_cross_attention(x["q"], x["k"], x["v"], backend=backend)}
    if case.kind == "msda":
        shapes, starts = (t.to(x["value"].device) for t in tda.tables(p["levels"]))
        return {"out": ms_deform_attn(x["value"], shapes, starts, x["sampling_locations"], x["attention_weights"],
                                      backend=backend)}
    if case.kind == "dcn":
        kw = tdcn.make(p, torch.float32, 0).kwargs
        return {"out": dcn_aggregate(x["input"], x["offset"], x["mask"], p["k"], **kw, backend=backend)}
    if case.kind == "stoken":
        stokens, affinity = super_token_sampling(x["x"], p["stoken"], p["n_iter"], backend=backend)
        # A nonlinearity between the ops, so that both backward kernels see a general gradient.
        out = super_token_upsample(torch.tanh(stokens), affinity, p["stoken"], (p["H"], p["W"]), backend=backend)
        return {"out": out, "affinity": affinity}
    if case.kind == "deform_conv":
        k = p["k"]
        return {"out": deform_conv2d(x["input"], x["offset"], x["weight"], x["bias"], p["stride"], k // 2, 1,
                                     x.get("mask"), backend=backend)}
    out, lse = NA[p["nd"]](x["q"], x["k"], x["v"], p["kernel_size"], p["stride"], p["dilation"],
                           p["is_causal"], None, x.get("additional_keys"), x.get("additional_values"),
                           rpb=x.get("rpb"), return_lse=True, backend=backend)
    return {"out": out, "lse": lse}


def loss(outputs: dict) -> torch.Tensor:
    """A float64 loss whose gradient differs at every output element."""
    total = 0
    for i, t in enumerate(outputs.values()):
        w = torch.linspace(-1.5 + i, 2.0 - i, t.numel(), dtype=torch.float64, device=t.device).view_as(t)
        total = total + (t.double() * w).sum()
    return total


def run_fast_path(case: SmokeCase, device, dtype, backend: str = "triton") -> None:
    """Forward and backward of the fast path only (no reference): what
    bench/compile_check.py runs on meta tensors to list the kernel launches."""
    x = make_inputs(case, device, dtype)
    torch.autograd.grad(loss(run(case, x, backend)), list(x.values()))


def check_case(case: SmokeCase, device, backend: str, dtype) -> None:
    """Forward and backward of `backend` against the reference on float32 copies of the inputs."""
    x = make_inputs(case, device, dtype)
    outs = run(case, x, backend)
    x32 = {n: t.detach().float().requires_grad_() for n, t in x.items()}
    refs = run(case, x32, "reference")
    grads = torch.autograd.grad(loss(outs), list(x.values()))
    ref_grads = torch.autograd.grad(loss(refs), list(x32.values()))
    where = f"{case.name} {backend} {dtype}"
    for name, t in outs.items():
        assert t.device == x[next(iter(x))].device, f"{where}: {name} on {t.device}"
        assert torch.isfinite(t).all(), f"{where}: {name} has NaN/inf"
        same = {"out": dtype}.get(name, torch.float32)
        assert t.dtype == same, f"{where}: {name} is {t.dtype}, expected {same}"
        # As the GPU tests: the state after L steps accumulates half-precision input rounding.
        scale = {"out": 2, "lse": 1}.get(name, 50 if dtype != torch.float32 else 1)
        assert_close(t.float(), refs[name].float(), dtype, scale=scale, msg=f"{where}: {name}")
    for (name, xt), g, rg in zip(x.items(), grads, ref_grads):
        assert g.dtype == xt.dtype, f"{where}: grad of {name} is {g.dtype}, expected {xt.dtype}"
        assert torch.isfinite(g).all(), f"{where}: grad of {name} has NaN/inf"
        assert_close(g.float(), rg, dtype, scale=20 if dtype == torch.float32 else 4,
                     msg=f"{where}: grad of {name}")


# --------------------------------------------------------------------------
# Tests

GPU_PARAMS = [pytest.param(c, b, id=f"{c.name}-{b}") for c in CASES for b in c.backends]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case, backend", GPU_PARAMS)
def test_smoke(case, backend, dtype):
    if backend == "cuda" and not _extension.CUDA_LOADED:
        pytest.fail("the CUDA C++ kernels are not loaded ("
                    + (_extension.CUDA_ERROR or "fastvision was built without nvcc or torch has no CUDA")
                    + "): run `bash bench/gpu_check.sh --stage build` first")
    check_case(case, "cuda", backend, dtype)


def shrunk(case: SmokeCase) -> SmokeCase:
    """The case at a size the Triton interpreter runs in seconds: one batch
    element; scans: one row per group, a few steps; NA: each axis just longer
    than its window, heads only as many as the GQA ratio needs."""
    p = case.params
    if case.kind == "na":
        spatial = tuple(min(L, k * d + 2) for L, k, d in zip(p["spatial"], p["kernel_size"], p["dilation"]))
        p = dict(p, batch=1, spatial=spatial, heads=p["heads"] // p["kv_heads"], kv_heads=1)
    elif case.kind == "cca":
        p = dict(B=1, Cqk=min(p["Cqk"], 4), C=min(p["C"], 12), H=min(p["H"], 10), W=min(p["W"], 12))
    elif case.kind == "msda":
        p = dict(p, N=1, Lq=min(p["Lq"], 4), M=min(p["M"], 2), P=min(p["P"], 2), levels=p["levels"][:2])
    elif case.kind == "stoken":
        p = dict(p, batch=1, H=min(p["H"], 2 * p["stoken"][0] + 1), W=min(p["W"], 2 * p["stoken"][1] + 1))
    elif case.kind == "deform_conv":
        p = dict(p, B=1, Cin=p["G"] * p["groups"] * 2, Cout=p["groups"] * 3, H=min(p["H"], 6), W=min(p["W"], 7))
    elif case.kind == "dcn":
        p = dict(p, N=1, H=min(p["H"], 6), W=min(p["W"], 7), G=min(p["G"], 2))
    else:
        p = dict(p, batch=1, dim=2, L=min(p["L"], 20), N=min(p["N"], 32))
    return SmokeCase(case.name, case.kind, p, case.backends)


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_smoke_on_cpu_interpreter(case):
    """The float32 cases, shrunk, on CPU tensors under the Triton interpreter:
    the smoke test's own checks, run where there is no GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py when there is no GPU)")
    check_case(shrunk(case), "cpu", "triton", torch.float32)
