"""Benchmarks of the neighborhood attention family: ``na2d`` and ``na1d``.

Both time the fused op ``neighborhood_attention`` (heads-last layout).
DiNAT-mini's first stage: 56 x 56 tokens, 2 heads of 32, kernel 7, dilation
1 and 8; and a long 1-D sequence. Baselines: fastvision's pure-PyTorch
reference (every speedup divides it), dense SDPA over all tokens with the
windows as a mask (the mask built once per case, outside the timings), on
CUDA dense SDPA without a mask (SDPA's own throughput, for TFLOP/s), and
NATTEN where it installs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvision.ops.neighborhood import na1d, na2d
from fastvision.reference.neighborhood import axis_windows, neighborhood_attention_ref

from ..core import Case, Impl, Inputs, Suite, register

NA2D_CASES = (
    Case("dinat_mini_s1_d1", dict(batch=1, spatial=(56, 56), heads=2, head_dim=32, k=7, d=1), quick=True),
    Case("dinat_mini_s1_d8", dict(batch=1, spatial=(56, 56), heads=2, head_dim=32, k=7, d=8), quick=True),
    Case("dinat_mini_s1_batch32", dict(batch=32, spatial=(56, 56), heads=2, head_dim=32, k=7, d=1),
         devices=("cuda",)),
)
NA1D_CASES = (
    Case("long_2k", dict(batch=1, spatial=(2048,), heads=2, head_dim=32, k=63, d=1), quick=True),
    Case("long_8k", dict(batch=1, spatial=(8192,), heads=2, head_dim=32, k=63, d=1)),
)
CONFIG = "heads-last layout (batch, *spatial, heads, head_dim); no rpb; not causal; stride 1"
TINY = dict(batch=1, heads=1, head_dim=8)

# From this many tokens a reference call takes seconds on a CPU: its gathered
# (tokens, window, heads, head_dim) keys and values and the logits are large.
SLOW_TOKENS = 4096


def _facts(shape: dict) -> dict:
    return {"head_dim": shape["head_dim"], "head_dim_v": shape["head_dim"]}


def make_inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    """q, k, v (heads last) and the window (kernel size, dilation) the op is called with."""
    size = (shape["batch"], *shape["spatial"], shape["heads"], shape["head_dim"])
    x = {n: torch.randn(size, device=device, dtype=dtype).requires_grad_() for n in ("q", "k", "v")}
    x["window"] = (shape["k"], shape["d"])
    return x, torch.randn(size, device=device, dtype=dtype)


def _window(x: Inputs) -> dict:
    """The window as keywords (positional orders differ: NATTEN's puts stride before dilation)."""
    kernel_size, dilation = x["window"]
    return {"kernel_size": kernel_size, "dilation": dilation}


def flops(shape: dict) -> float:
    """QK^T and PV over the k^d neighbours of every query only."""
    tokens = math.prod(shape["spatial"])
    window = shape["k"] ** len(shape["spatial"])
    return 4.0 * shape["batch"] * shape["heads"] * tokens * window * shape["head_dim"]


def window_mask(spatial, k: int, d: int, device) -> torch.Tensor:
    """Dense (tokens, tokens) bool mask of the NA windows (True: attend), for masked SDPA."""
    mask = None
    for L in spatial:
        index, valid = axis_windows(L, k, d, device=device)
        axis = torch.zeros(L, L, dtype=torch.bool, device=device)
        axis.scatter_(1, torch.where(valid, index, index[:, :1]), True)
        mask = axis if mask is None else (mask[:, None, :, None] & axis[None, :, None, :]).flatten(2).flatten(0, 1)
    return mask


def _mask_setup(x: Inputs) -> dict:
    """The additive mask (0 inside the windows, -inf outside) in the inputs' dtype: SDPA
    would convert a bool mask to this form in every call."""
    q = x["q"]
    allowed = window_mask(q.shape[1:-2], *x["window"], q.device)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    return {"mask": mask}


def masked_sdpa(x: Inputs) -> torch.Tensor:
    """Dense attention over all tokens with the NA windows as an explicit mask
    (``x["mask"]`` from the set-up; built here when absent)."""
    mask = x["mask"] if "mask" in x else _mask_setup(x)["mask"]
    q, k, v = (x[n].flatten(1, -3).transpose(1, 2) for n in ("q", "k", "v"))  # (B, H, tokens, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(x["q"].shape)


def dense_sdpa(x: Inputs) -> torch.Tensor:
    q, k, v = (x[n].flatten(1, -3).transpose(1, 2) for n in ("q", "k", "v"))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x["q"].shape)


def _suite(op: str, cases: tuple[Case, ...], tiny: dict) -> Suite:
    fn = {"na1d": na1d, "na2d": na2d}[op]

    def reference(shape: dict, device: str) -> Impl:
        slow = math.prod(shape["spatial"]) >= SLOW_TOKENS and device == "cpu"
        return Impl(lambda x: neighborhood_attention_ref(x["q"], x["k"], x["v"], **_window(x)),
                    note="fastvision.reference.neighborhood_attention_ref: pure PyTorch; gathers every "
                         "query's window of keys and values; builds its window index tables in every call "
                         "(its API has no set-up step)",
                    slow=f"gathers {math.prod(shape['spatial'])} x {shape['k'] ** len(shape['spatial'])} "
                         "keys and values per head" if slow else "")

    def fastvision(backend: str) -> Impl:
        return Impl(lambda x: fn(x["q"], x["k"], x["v"], **_window(x), backend=backend),
                    note=f"fastvision.ops.{op}(backend={backend!r}): the fused kernel through the public op "
                         "(window rule computed in the kernel: no set-up)")

    def baselines(shape: dict, device: str) -> dict[str, Impl]:
        impls = {"sdpa (masked)": Impl(
            masked_sdpa, setup=_mask_setup,
            note="torch scaled_dot_product_attention over all tokens with the windows as a dense "
                 "(tokens, tokens) additive mask (0 / -inf, faster than a bool mask, which SDPA "
                 "converts in every call), built once per case in set-up, not timed")}
        if device == "cuda":
            impls["sdpa (dense, no mask)"] = Impl(
                dense_sdpa, note="SDPA over all tokens without a mask (another result): SDPA's own "
                                 "throughput at this head_dim and dtype, for the TFLOP/s comparison")
        try:
            import natten
        except ImportError:
            return impls
        impls["natten"] = Impl(
            lambda x: getattr(natten, op)(x["q"], x["k"], x["v"], **_window(x)),
            note=f"natten.{op} (NATTEN's own backend choice)")
        return impls

    return Suite(op, "neighborhood_attention", cases, make_inputs, _facts, fastvision, reference, baselines,
                 tiny=tiny, config=CONFIG, flops=flops)


register(_suite("na2d", NA2D_CASES, {**TINY, "spatial": (6, 6), "k": 3, "d": 2}))
register(_suite("na1d", NA1D_CASES, {**TINY, "spatial": (20,), "k": 5, "d": 1}))
