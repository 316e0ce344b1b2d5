"""Benchmarks of the selective scan family: ``selective_scan`` and ``bi_selective_scan``.

Shapes as in Vision Mamba (Vim): B/C variable (batch, N, L), z gate, D skip,
delta_bias and softplus; dim is d_inner (Vim-S: 768, Vim-B: 1536). Baselines:
fastvision's pure-PyTorch reference (every speedup divides it), mamba_ssm's
CUDA kernels where mamba_ssm installs, and on CPU what mamba_ssm runs without
them (its ``selective_scan_ref``, carried here as mamba_ssm needs CUDA to
install); for the bidirectional scan, Vim's unfused form (two scans + flips).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from fastvision.ops.selective_scan import bi_selective_scan, selective_scan
from fastvision.reference.selective_scan import bi_selective_scan_ref, selective_scan_ref

from ..core import Case, Impl, Inputs, Suite, register, usable_backends

CASES = (
    Case("vim_s", dict(batch=2, dim=768, L=197, N=16), quick=True),
    Case("long_1k", dict(batch=2, dim=768, L=1024, N=16)),
    Case("long_4k", dict(batch=2, dim=768, L=4096, N=16)),
    Case("vim_b_batch64", dict(batch=64, dim=1536, L=197, N=16), devices=("cuda",)),
)
TINY = dict(batch=1, dim=8, L=24, N=4)
CONFIG = "B, C variable (batch, N, L); z gate; D; delta_bias; delta_softplus=True"

# The references step over L in Python (a few small ops per step, and autograd
# through them): from this length on one fwd+bwd takes seconds on a CPU.
SLOW_L = 1024


def _facts(shape: dict) -> dict:
    return {"d_state": shape["N"]}


def _direction(shape: dict, device: str, dtype: torch.dtype, suffix: str = "") -> Inputs:
    """One direction's tensors, initialised as Mamba does (S4D-real A, dt in [1e-3, 1e-1])."""
    batch, dim, L, N = shape["batch"], shape["dim"], shape["L"], shape["N"]
    dt = torch.empty(dim, device=device).uniform_(math.log(1e-3), math.log(1e-1)).exp()
    t = {
        "u": torch.randn(batch, dim, L, device=device, dtype=dtype),
        "delta": 0.1 * torch.randn(batch, dim, L, device=device, dtype=dtype),
        "A": -torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, N, L, device=device, dtype=dtype),
        "C": torch.randn(batch, N, L, device=device, dtype=dtype),
        "D": torch.ones(dim, device=device),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus(delta_bias) = dt
    }
    return {k + suffix: v.requires_grad_() for k, v in t.items()}


def make_scan_inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    x = _direction(shape, device, dtype)
    x["z"] = torch.randn_like(x["u"]).requires_grad_()
    return x, torch.randn_like(x["u"])


def make_bi_inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    x, dout = make_scan_inputs(shape, device, dtype)
    return {**x, **_direction(shape, device, dtype, "_b")}, dout


def scan_args(x: Inputs, s: str = ""):
    return (x["u" + s], x["delta" + s], x["A" + s], x["B" + s], x["C" + s], x["D" + s],
            x["z"], x["delta_bias" + s])


def _bi_args(x: Inputs):
    return (*scan_args(x), *scan_args(x, "_b")[:6], x["delta_bias_b"])


def _anchor_module(device: str):
    """mamba_ssm's selective_scan_interface on CUDA when it imports, else None."""
    if device != "cuda":
        return None
    try:
        from mamba_ssm.ops import selective_scan_interface
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return selective_scan_interface


def _slow(shape: dict) -> str:
    if shape["L"] >= SLOW_L:
        return f"a Python loop over L = {shape['L']} steps (with autograd through it) takes seconds"
    return ""


# --------------------------------------------------------------------------
# selective_scan


MAMBA_CPU = "mamba_ssm CPU path (selective_scan_ref)"


def mamba_cpu_path(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """What mamba_ssm runs without its CUDA kernels: its pure-PyTorch
    selective_scan_ref, which first materialises exp(delta A) and delta B u for
    every step ((batch, dim, L, N) each), then loops over time. mamba_ssm only
    installs with CUDA, so the benchmark carries this equivalent (same
    semantics as fastvision.reference, which steps without materialising)."""
    delta = delta.float() + delta_bias[:, None]
    delta = torch.nn.functional.softplus(delta) if delta_softplus else delta
    decay = torch.exp(delta[..., None] * A[:, None, :])                      # (b, d, L, N)
    drive = (delta * u.float())[..., None] * B.float().transpose(1, 2)[:, None]  # (b, d, L, N)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(u.shape[-1]):
        x = decay[:, :, t] * x + drive[:, :, t]
        ys.append((x * C[:, None, :, t].float()).sum(-1))
    y = torch.stack(ys, dim=-1) + u * D[:, None]
    return (y * torch.nn.functional.silu(z.float())).to(u.dtype)


def _scan_reference(shape: dict, device: str) -> Impl:
    return Impl(lambda x: selective_scan_ref(*scan_args(x), delta_softplus=True),
                note="fastvision.reference.selective_scan_ref: pure PyTorch, a Python loop over L "
                     "(fp32 state), autograd through it",
                slow=_slow(shape))


def _scan_fastvision(backend: str) -> Impl:
    return Impl(lambda x: selective_scan(*scan_args(x), True, backend=backend),
                note=f"fastvision.ops.selective_scan(backend={backend!r}): the fused kernel through the "
                     "public op (argument checks, autograd)")


def _mamba_cpu_impl(shape: dict) -> Impl:
    L = shape["L"]
    return Impl(lambda x: mamba_cpu_path(*scan_args(x)),
                note="mamba_ssm's selective_scan_ref as mamba_ssm runs it without CUDA (a copy: "
                     "mamba_ssm needs CUDA to install): materialises exp(delta A) and delta B u as "
                     "(batch, dim, L, N), then a Python loop over L",
                slow="its backward grows as L^2 (autograd of every step's slice of the (b, d, L, N) tensors)",
                skip_quick=(f"one fwd+bwd takes about a minute at L = {L}" if L >= SLOW_L else ""),
                skip=(f"one fwd+bwd takes many minutes at L = {L} (its backward grows as L^2)"
                      if L > SLOW_L else ""))


def _scan_baselines(shape: dict, device: str) -> dict[str, Impl]:
    anchor = _anchor_module(device)
    if anchor is not None:
        return {"mamba_ssm": Impl(lambda x: anchor.selective_scan_fn(*scan_args(x), True),
                                  note="mamba_ssm selective_scan_fn: its CUDA kernels")}
    if device == "cpu":
        return {MAMBA_CPU: _mamba_cpu_impl(shape)}
    return {}


register(Suite("selective_scan", "selective_scan", CASES, make_scan_inputs, _facts, _scan_fastvision,
               _scan_reference, _scan_baselines, tiny=TINY, config=CONFIG, bandwidth=True))


# --------------------------------------------------------------------------
# bi_selective_scan


def two_scans_flips(scan, x: Inputs) -> torch.Tensor:
    """Vim's bimamba v2 without fusion: scan + scan of the flipped *_b tensors, flipped back."""
    flip = {k: x[k].flip(-1) for k in ("u_b", "delta_b", "B_b", "C_b")}
    out = scan(*scan_args(x), True)
    out_b = scan(flip["u_b"], flip["delta_b"], x["A_b"], flip["B_b"], flip["C_b"], x["D_b"],
                 x["z"].flip(-1), x["delta_bias_b"], True)
    return out + out_b.flip(-1)


def _bi_reference(shape: dict, device: str) -> Impl:
    return Impl(lambda x: bi_selective_scan_ref(*_bi_args(x), True),
                note="fastvision.reference.bi_selective_scan_ref: pure PyTorch, two Python loops over L",
                slow=_slow(shape))


def _bi_fastvision(backend: str) -> Impl:
    return Impl(lambda x: bi_selective_scan(*_bi_args(x), True, backend=backend),
                note=f"fastvision.ops.bi_selective_scan(backend={backend!r}): both directions in one "
                     "fused kernel")


def _bi_baselines(shape: dict, device: str) -> dict[str, Impl]:
    impls = {}
    backends = usable_backends("selective_scan", device, **_facts(shape))
    if backends:  # the unfused form on the backend "auto" picks (CUDA C++ over Triton)
        best = "cuda" if "cuda" in backends else backends[0]
        impls[f"{best} (2 scans+flips)"] = Impl(
            partial(two_scans_flips, partial(selective_scan, backend=best)),
            note=f"two fastvision selective_scan(backend={best!r}) calls; flips of the *_b inputs, z "
                 "and the output are timed too (Vim's form without the fused kernel)")
    anchor = _anchor_module(device)
    if anchor is not None:
        impls["mamba_ssm (2 scans+flips)"] = Impl(
            partial(two_scans_flips, anchor.selective_scan_fn),
            note="two mamba_ssm selective_scan_fn calls with flips, as Vim runs them")
    return impls


register(Suite("bi_selective_scan", "bi_selective_scan", CASES, make_bi_inputs, _facts, _bi_fastvision,
               _bi_reference, _bi_baselines, tiny=TINY, bandwidth=True,
               config="backward direction: its own u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b "
                      "shaped as the forward ones, z shared; " + CONFIG))
