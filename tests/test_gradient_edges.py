"""Gradients at the edges, against a float64 oracle: no worse than plain fp32 autograd.

The oracle is autograd through ``fastvision.reference`` in float64 (the
references compute in float64 for float64 inputs). For each fp32 gradient,
err = max |got - oracle| / max |oracle|, and the fused kernels must satisfy
err <= 10 * err(fp32 autograd through the reference) + 1e-4, in the regimes
where fused backward passes usually lose to autograd:

* neighborhood attention with a saturated softmax: logits up to ~1e4, made
  large through ``scale`` or through the magnitude of q and k, with and
  without rpb and lse gradients. The exact gradient at a row's max key is
  then tiny (often below fp32's range), and autograd through the reference
  gets it (P_max == 1, dP_max == Delta); a backward that recomputes P from
  a rounded lse or from logits rounded differently gets an error of the
  size of dP there, which can be 1e68 times the oracle gradient.
* selective scan with large steps (delta up to 1e6, exp(delta A) ~ 0): a
  backward that rebuilds exp(delta A) x_{t-1} as x_t - delta B u cancels.

Also: inf and NaN in the inputs give inf and NaN in the same places of the
outputs and every gradient as in autograd through the fp32 reference (NaN
in one step of u, infinite delta, NaN in a key / query / value row, -inf
and +inf logits through rpb, an all -inf window).

CPU kernels through the public API; Triton kernels through their launchers
under the interpreter (``-m triton``), with small tiles / chunks so that
windows cross several key blocks and sequences several chunks.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastvision.ops import bi_selective_scan, na1d, na2d, na3d, selective_scan
from fastvision.reference.neighborhood import neighborhood_attention_ref
from fastvision.reference.selective_scan import bi_selective_scan_ref, selective_scan_ref

NA = {1: na1d, 2: na2d, 3: na3d}
FACTOR, SLACK = 10.0, 1e-4


# --------------------------------------------------------------------------
# helpers


def rel_err(got: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |got - oracle| / max |oracle| (the absolute error where the oracle is all 0)."""
    oracle = oracle.double()
    err = (got.double() - oracle).abs().max().item()
    top = oracle.abs().max().item()
    return err / top if top > 0 else err


def assert_edge_grads(names, got, ref32, oracle, what: str) -> None:
    """Every gradient within FACTOR x the fp32 reference's error + SLACK."""
    report, bad = [], []
    for name, g, r, o in zip(names, got, ref32, oracle):
        e, er = rel_err(g, o), rel_err(r, o)
        report.append(f"{name} {e:.1e} (fp32 ref {er:.1e})")
        if not e <= FACTOR * er + SLACK:
            bad.append(name)
    assert not bad, f"{what}: {', '.join(bad)} worse than fp32 autograd: " + "; ".join(report)


def pattern(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    t = t.double()
    c = torch.zeros(t.shape, dtype=torch.int8)
    c[torch.isnan(t)] = 1
    c[t == float("inf")] = 2
    c[t == float("-inf")] = 3
    return c


def assert_same_nonfinite(names, got, ref, what: str) -> None:
    bad = []
    for name, g, r in zip(names, got, ref):
        pg, pr = pattern(g), pattern(r)
        if not torch.equal(pg, pr):
            bad.append(f"{name}: {int((pg != pr).sum())} of {pg.numel()} entries differ "
                       f"(NaN {int((pg == 1).sum())} vs {int((pr == 1).sum())}, "
                       f"inf {int((pg >= 2).sum())} vs {int((pr >= 2).sum())})")
    assert not bad, f"{what}: inf/NaN not where the reference has them: " + "; ".join(bad)


def triton_module(name: str):
    from fastvision.testing import import_triton_kernels_interpreted

    return import_triton_kernels_interpreted(name)


# --------------------------------------------------------------------------
# neighborhood attention


def na_problem(nd, spatial, k, *, heads=2, kv_heads=None, head_dim=16, rpb=False, mag=1.0,
               batch=1, seed=0):
    """float64 inputs, output / lse cotangents. rpb scales with mag^2 like the logits."""
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, *spatial, heads, head_dim, generator=g, dtype=torch.float64) * mag
    key = torch.randn(batch, *spatial, kv_heads, head_dim, generator=g, dtype=torch.float64) * mag
    v = torch.randn(batch, *spatial, kv_heads, head_dim, generator=g, dtype=torch.float64)
    bias = (torch.randn(heads, *[2 * x - 1 for x in k], generator=g, dtype=torch.float64) * mag * mag
            if rpb else None)
    dout = torch.randn(batch, *spatial, heads, head_dim, generator=g, dtype=torch.float64)
    dlse = torch.randn(batch, *spatial, heads, generator=g, dtype=torch.float64)
    return dict(q=q, k=key, v=v, rpb=bias), dout, dlse


def na_run(fn, x, dout, dlse, dtype, lse: bool, **kw):
    """[out, (lse,) dq, dk, dv, (drpb)] from autograd through fn(q, k, v, rpb=, **kw)."""
    leaves = {n: t.to(dtype).requires_grad_() for n, t in x.items() if t is not None}
    res = fn(leaves["q"], leaves["k"], leaves["v"], rpb=leaves.get("rpb"), return_lse=lse, **kw)
    outs = list(res) if lse else [res]
    loss = (outs[0].double() * dout).sum()
    if lse:
        loss = loss + (outs[1].double() * dlse).sum()
    return outs + list(torch.autograd.grad(loss, list(leaves.values())))


def na_names(x, lse):
    return ["out"] + (["lse"] if lse else []) + ["dq", "dk", "dv"] + (["drpb"] if x["rpb"] is not None else [])


def check_na_edges(nd, spatial, k, dilation=1, causal=False, *, scale=None, lse=False, ours=None,
                   what="", **prob):
    x, dout, dlse = na_problem(nd, spatial, k, **prob)
    kw = dict(kernel_size=k, dilation=dilation, is_causal=causal, scale=scale)
    ref = lambda *a, **k_: neighborhood_attention_ref(*a, **k_)  # noqa: E731
    oracle = na_run(ref, x, dout, dlse, torch.float64, lse, **kw)
    ref32 = na_run(ref, x, dout, dlse, torch.float32, lse, **kw)
    got = ours(x, dout, dlse, lse, kw)
    n_out = 2 if lse else 1
    names = na_names(x, lse)
    assert_edge_grads(names[n_out:], got[n_out:], ref32[n_out:], oracle[n_out:], what)


def na_cpu(nd):
    def run(x, dout, dlse, lse, kw):
        return na_run(lambda *a, **k_: NA[nd](*a, backend="cpu", **k_), x, dout, dlse, torch.float32, lse, **kw)
    return run


# (nd, spatial, kernel, dilation, causal, problem options)
NA_CONFIGS = [
    (1, (40,), (7,), 1, False, dict(rpb=True)),
    (1, (30,), (5,), 2, True, dict(heads=4, kv_heads=2, head_dim=12)),
    (2, (8, 7), (3, 3), (1, 2), False, dict(rpb=True)),
    (2, (7, 9), (3, 5), 1, (True, False), dict(heads=2, kv_heads=1, head_dim=8)),
    (3, (4, 5, 6), (3, 3, 3), 1, False, dict(rpb=True, heads=1)),
    (3, (5, 4, 6), (3, 3, 3), (1, 1, 2), (False, True, False), dict(heads=2, kv_heads=1, head_dim=20)),
]
# Logits ~1e3 through scale (out gradient only) and ~1e4 through |q|, |k| (with lse).
NA_REGIMES = [dict(scale=1e3, lse=False), dict(mag=100.0, scale=1.0, lse=True)]


def _na_id(c):
    nd, sp, k, d, cz, opt = c
    return f"{nd}d-{'x'.join(map(str, sp))}-k{k[0]}-d{d}-c{cz}-" + "-".join(f"{a}{b}" for a, b in opt.items())


@pytest.mark.parametrize("regime", NA_REGIMES, ids=["scale1e3", "qk1e4_lse"])
@pytest.mark.parametrize("config", NA_CONFIGS, ids=_na_id)
def test_na_cpu_saturated_softmax(config, regime):
    nd, spatial, k, dilation, causal, opt = config
    check_na_edges(nd, spatial, k, dilation, causal, ours=na_cpu(nd), what=f"na{nd}d cpu",
                   **opt, **regime)


@pytest.mark.parametrize("scale", [1e2, 1e4])
@pytest.mark.parametrize("lse", [False, True])
def test_na_cpu_saturated_softmax_rpb_scale(scale, lse):
    """Large logits through scale with rpb of the same size, 1-D and 2-D."""
    for nd, spatial, k in ((1, (24,), (5,)), (2, (6, 6), (3, 3))):
        check_na_edges(nd, spatial, k, scale=scale, lse=lse, rpb=True, ours=na_cpu(nd),
                       what=f"na{nd}d cpu scale={scale}", mag=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_na_cpu_saturated_softmax_half(dtype):
    """fp16 / bf16 inputs (fp32 inside): gradients at logits ~1e3 within FACTOR x the
    reference's in the same dtype, against the oracle on the same rounded inputs."""
    x, dout, dlse = na_problem(1, (32,), (7,), rpb=True, mag=1.0)
    x = {n: (t.to(dtype).double() if t is not None else None) for n, t in x.items()}
    kw = dict(kernel_size=(7,), scale=1e3)
    ref = neighborhood_attention_ref
    oracle = na_run(ref, x, dout, dlse, torch.float64, True, **kw)
    ref_h = na_run(ref, x, dout, dlse, dtype, True, **kw)
    got = na_run(lambda *a, **k_: na1d(*a, backend="cpu", **k_), x, dout, dlse, dtype, True, **kw)
    assert_edge_grads(["dq", "dk", "dv", "drpb"], got[2:], ref_h[2:], oracle[2:], f"na1d cpu {dtype}")


def na_nonfinite_problem(kind, nd, seed=0):
    spatial = {1: (12,), 2: (6, 5), 3: (3, 4, 5)}[nd]
    k = (3,) * nd
    x, dout, dlse = na_problem(nd, spatial, k, heads=2, rpb=kind.startswith("rpb"), seed=seed)
    x = {n: (t.float().double() if t is not None else None) for n, t in x.items()}
    q, key, v, bias = (x[n].view(-1, 2, 16) if n != "rpb" else x[n] for n in ("q", "k", "v", "rpb"))
    if kind == "nan_key_row":
        key[5, 1] = float("nan")
    elif kind == "nan_key_entry":
        key[5, 1, 3] = float("nan")
    elif kind == "nan_query_row":
        q[4, 0] = float("nan")
    elif kind == "nan_value_row":
        v[7, 1] = float("nan")
    elif kind == "inf_key_entry":
        key[5, 1, 2] = float("inf")
    elif kind == "rpb_neginf":  # some -inf logits
        bias.view(2, -1)[0, 1] = float("-inf")
        bias.view(2, -1)[1, 3] = float("-inf")
    elif kind == "rpb_all_neginf":  # every logit of head 1 -inf: NaN rows, lse -inf
        bias[1] = float("-inf")
    elif kind == "rpb_posinf":
        bias.view(2, -1)[0, 2] = float("inf")
    return x, dout, dlse, k


NA_NONFINITE = ["nan_key_row", "nan_key_entry", "nan_query_row", "nan_value_row", "inf_key_entry",
                "rpb_neginf", "rpb_all_neginf", "rpb_posinf"]


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("kind", NA_NONFINITE)
def test_na_cpu_nonfinite_inputs(kind, nd):
    x, dout, dlse, k = na_nonfinite_problem(kind, nd)
    ref = na_run(neighborhood_attention_ref, x, dout, dlse, torch.float32, True, kernel_size=k)
    got = na_run(lambda *a, **k_: NA[nd](*a, backend="cpu", **k_), x, dout, dlse, torch.float32, True,
                 kernel_size=k)
    assert_same_nonfinite(na_names(x, True), got, ref, f"na{nd}d cpu {kind}")


# ---- Triton (interpreter)

SMALL_TILE = {1: (16,), 2: (4, 4), 3: (2, 2, 4)}


def na_triton(nd, tiles=True):
    def run(x, dout, dlse, lse, kw):
        tna = triton_module("fastvision.triton.neighborhood")
        f32 = {n: (t.float() if t is not None else None) for n, t in x.items()}
        ks = tuple(kw["kernel_size"])
        ds = kw["dilation"] if isinstance(kw["dilation"], tuple) else (kw["dilation"],) * nd
        cs = kw["is_causal"] if isinstance(kw["is_causal"], tuple) else (kw["is_causal"],) * nd
        scale = kw["scale"] if kw["scale"] is not None else f32["q"].shape[-1] ** -0.5
        args = (ks, ds, (1,) * nd, cs, scale)
        tile = dict(q_tile=SMALL_TILE[nd], k_tile=SMALL_TILE[nd]) if tiles else {}
        out, l_ = tna.na_fwd(f32["q"], f32["k"], f32["v"], f32["rpb"], *args, **tile)
        grads = tna.na_bwd(dout.float(), dlse.float() if lse else None, f32["q"], f32["k"], f32["v"],
                           f32["rpb"], out, l_, *args, **tile)
        grads = list(grads[:3]) + ([grads[3]] if f32["rpb"] is not None else [])
        return [out] + ([l_] if lse else []) + grads
    return run


# (config, regimes): the interpreter is slow, so 3-D runs one regime.
NA_TRITON_CASES = [
    ((1, (24,), (5,), 1, False, dict(rpb=True)), NA_REGIMES),
    ((2, (6, 6), (3, 3), (1, 2), False, dict(heads=2, kv_heads=1)), NA_REGIMES),
    ((3, (3, 3, 4), (3, 3, 3), 1, (False, False, True), dict(heads=1)), NA_REGIMES[1:]),
]


# numpy (the interpreter) warns about the inf / NaN arithmetic these cases are about.
@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("config,regime", [(c, r) for c, rs in NA_TRITON_CASES for r in rs],
                         ids=[f"{_na_id(c)}-{'scale1e3' if 'mag' not in r else 'qk1e4_lse'}"
                              for c, rs in NA_TRITON_CASES for r in rs])
def test_na_triton_saturated_softmax(config, regime):
    nd, spatial, k, dilation, causal, opt = config
    check_na_edges(nd, spatial, k, dilation, causal, ours=na_triton(nd), what=f"na{nd}d triton",
                   **opt, **regime)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", NA_NONFINITE)
def test_na_triton_nonfinite_inputs(kind):
    nd = 1
    x, dout, dlse, k = na_nonfinite_problem(kind, nd)
    kw = dict(kernel_size=k, dilation=1, is_causal=False, scale=None)
    ref = na_run(neighborhood_attention_ref, x, dout, dlse, torch.float32, True, **kw)
    got = na_triton(nd)(x, dout, dlse, True, kw)
    assert_same_nonfinite(na_names(x, True), got, ref, f"na{nd}d triton {kind}")


# --------------------------------------------------------------------------
# selective scan


def scan_problem(*, batch=2, dim=4, L=48, N=4, delta_scale=1.0, variable=True, groups=1, z=False,
                 D=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    bc = (lambda: torch.randn(batch, groups, N, L, **f64)) if variable else (lambda: torch.randn(dim, N, **f64))
    x = dict(u=torch.randn(batch, dim, L, **f64), delta=torch.rand(batch, dim, L, **f64) * delta_scale,
             A=-torch.rand(dim, N, **f64) - 0.1, B=bc(), C=bc(),
             D=torch.randn(dim, **f64) if D else None, z=torch.randn(batch, dim, L, **f64) if z else None,
             delta_bias=torch.randn(dim, **f64) * 0.1 if bias else None)
    return x, torch.randn(batch, dim, L, **f64)


SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_run(fn, x, dout, dtype, **kw):
    """[out, du, ddelta, dA, dB, dC, (dD, dz, ddelta_bias)] by autograd."""
    leaves = {n: x[n].to(dtype).requires_grad_() for n in SCAN_ARGS if x[n] is not None}
    args = [leaves.get(n) for n in SCAN_ARGS]
    out = fn(*args, **kw)
    return [out] + list(torch.autograd.grad((out.double() * dout).sum(), list(leaves.values())))


def scan_names(x):
    return ["out"] + ["d" + n for n in SCAN_ARGS if x[n] is not None]


def check_scan_edges(x, dout, ours, what, **kw):
    oracle = scan_run(selective_scan_ref, x, dout, torch.float64, **kw)
    ref32 = scan_run(selective_scan_ref, x, dout, torch.float32, **kw)
    got = ours(x, dout, **kw)
    assert_edge_grads(scan_names(x)[1:], got[1:], ref32[1:], oracle[1:], what)


def scan_cpu(x, dout, **kw):
    return scan_run(lambda *a, **k: selective_scan(*a, backend="cpu", **k), x, dout, torch.float32, **kw)


SCAN_CONFIGS = [
    dict(),
    dict(variable=False, z=True, D=True),
    dict(groups=2, z=True, bias=True),
    dict(variable=False, D=True, bias=True),
]
SCAN_FLAGS = [dict(), dict(reverse=True, delta_softplus=True)]


@pytest.mark.parametrize("delta_scale", [1e4, 1e6])
@pytest.mark.parametrize("flags", SCAN_FLAGS, ids=["fwd", "reverse_softplus"])
@pytest.mark.parametrize("config", SCAN_CONFIGS, ids=lambda c: "-".join(f"{a}{b}" for a, b in c.items()) or "var")
def test_scan_cpu_large_steps(config, flags, delta_scale):
    x, dout = scan_problem(delta_scale=delta_scale, **config)
    check_scan_edges(x, dout, scan_cpu, f"selective_scan cpu {config} {flags} delta {delta_scale:g}", **flags)


@pytest.mark.parametrize("delta_scale", [1e4, 1e6])
def test_bi_scan_cpu_large_steps(delta_scale):
    f, dout = scan_problem(delta_scale=delta_scale, D=True, bias=True, z=True)
    b, _ = scan_problem(delta_scale=delta_scale, D=True, bias=True, seed=1)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias",
             "u_b", "delta_b", "A_b", "B_b", "C_b", "D_b", "delta_bias_b"]
    tensors = [f[n] for n in SCAN_ARGS] + [b[n] for n in ("u", "delta", "A", "B", "C", "D", "delta_bias")]

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in tensors]
        out = fn(*leaves, True)
        return list(torch.autograd.grad((out.double() * dout).sum(), leaves))

    oracle = run(bi_selective_scan_ref, torch.float64)
    ref32 = run(bi_selective_scan_ref, torch.float32)
    got = run(lambda *a: bi_selective_scan(*a, backend="cpu"), torch.float32)
    assert_edge_grads(["d" + n for n in names], got, ref32, oracle, f"bi_selective_scan cpu delta {delta_scale:g}")


def scan_nonfinite_problem(kind, reverse, L=20):
    x, dout = scan_problem(batch=1, dim=4, L=L, N=3, D=True, z=True)
    x = {n: (t.float().double() if t is not None else None) for n, t in x.items()}
    last = 0 if reverse else L - 1
    if kind == "nan_u_step":
        x["u"][0, 1, 7] = float("nan")
    elif kind == "nan_u_last_step":  # x_t is NaN only at the last step: dA stays finite
        x["u"][0, 1, last] = float("nan")
    elif kind == "inf_delta_step":
        x["delta"][0, 2, 9] = float("inf")
    elif kind == "inf_delta_last_step":
        x["delta"][0, 2, last] = float("inf")
    elif kind == "neginf_delta_step":
        x["delta"][0, 2, 9] = float("-inf")
    elif kind == "nan_delta_step":
        x["delta"][0, 2, 9] = float("nan")
    elif kind == "nan_B_entry":
        x["B"][0, 0, 1, 5] = float("nan")
    return x, dout


SCAN_NONFINITE = ["nan_u_step", "nan_u_last_step", "inf_delta_step", "inf_delta_last_step",
                  "neginf_delta_step", "nan_delta_step", "nan_B_entry"]


@pytest.mark.parametrize("flags", [dict(), dict(reverse=True, delta_softplus=True)], ids=["fwd", "reverse_softplus"])
@pytest.mark.parametrize("kind", SCAN_NONFINITE)
def test_scan_cpu_nonfinite_inputs(kind, flags):
    x, dout = scan_nonfinite_problem(kind, flags.get("reverse", False))
    ref = scan_run(selective_scan_ref, x, dout, torch.float32, **flags)
    got = scan_cpu(x, dout, **flags)
    assert_same_nonfinite(scan_names(x), got, ref, f"selective_scan cpu {kind} {flags}")


# ---- Triton (interpreter): the launchers with chunks of 8 steps

def scan_triton(x, dout, *, reverse=False, delta_softplus=False, chunk=8):
    tss = triton_module("fastvision.triton.selective_scan")
    f = {n: (t.float() if t is not None else None) for n in SCAN_ARGS for t in [x[n]]}
    dim = f["u"].shape[1]
    D = f["D"] if f["D"] is not None else f["u"].new_zeros(dim)
    bias = f["delta_bias"] if f["delta_bias"] is not None else f["u"].new_zeros(dim)
    args = (f["u"], f["delta"], f["A"], f["B"], f["C"], D, f["z"], bias)
    out, _, states = tss.selective_scan_fwd(*args, delta_softplus, reverse, chunk)
    grads = tss.selective_scan_bwd(dout.float(), None, *args, states, delta_softplus, reverse, chunk)
    keep = [True] * 5 + [x["D"] is not None, x["z"] is not None, x["delta_bias"] is not None]
    order = [0, 1, 2, 3, 4, 5, 6, 7]  # du, ddelta, dA, dB, dC, dD, dz, ddelta_bias
    return [out] + [grads[i] for i in order if keep[i]]


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("delta_scale", [1e4, 1e6])
@pytest.mark.parametrize("case", [
    (dict(batch=1, dim=2, L=20), dict()),
    (dict(batch=1, dim=2, L=20, variable=False, z=True, D=True), dict(reverse=True, delta_softplus=True)),
    (dict(batch=1, dim=2, L=20, groups=2, bias=True), dict(reverse=True)),
], ids=["var", "const_z_reverse_softplus", "grouped_reverse"])
def test_scan_triton_large_steps(case, delta_scale):
    config, flags = case
    x, dout = scan_problem(delta_scale=delta_scale, **config)
    check_scan_edges(x, dout, scan_triton, f"selective_scan triton {config} {flags}", **flags)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", ["nan_u_step", "nan_u_last_step", "inf_delta_step", "nan_B_entry"])
def test_scan_triton_nonfinite_inputs(kind):
    flags = dict(reverse=True, delta_softplus=True) if kind == "inf_delta_step" else {}
    x, dout = scan_nonfinite_problem(kind, flags.get("reverse", False))
    ref = scan_run(selective_scan_ref, x, dout, torch.float32, **flags)
    got = scan_triton(x, dout, **flags)
    assert_same_nonfinite(scan_names(x), got, ref, f"selective_scan triton {kind} {flags}")
