"""Benchmarks of the dcn family: ``dcn_aggregate`` (DCNv3 / DCNv4 aggregation, channels-last).

InternImage-T's first stage at 224 x 224: 56 x 56 positions, 4 groups of 16
channels, a 3x3 kernel (padding 1), batch 1 (the target case), a later stage
(14 x 14, 16 groups of 32), and a batch of 8 on CUDA. Offsets are a few
pixels, as trained ones are; the mask is used as given (DCNv4; DCNv3's module
takes its softmax first, outside the op). Baselines: fastvision's pure-PyTorch
reference (every speedup divides it) and InternImage's ``dcnv3_core_pytorch``
(its PyTorch fallback, ``fastvision.reference.dcn.dcnv3_core_pytorch``
written out faithfully: F.pad, its float32 sampling grid built in every call,
F.grid_sample over (N * G) images), what users without the CUDA extension run.
"""

from __future__ import annotations

import torch

from fastvision.ops.dcn import dcn_aggregate
from fastvision.reference.dcn import dcn_aggregate_ref, dcnv3_core_pytorch

from ..core import Case, Impl, Inputs, Suite, register

K = 9  # every case: 3x3 kernel, stride 1, padding 1, dilation 1
CASES = (
    Case("internimage_56", dict(batch=1, H=56, W=56, G=4, Cg=16), quick=True),
    Case("stage3_14", dict(batch=1, H=14, W=14, G=16, Cg=32)),
    Case("internimage_56_batch8", dict(batch=8, H=56, W=56, G=4, Cg=16), devices=("cuda",)),
)
TINY = dict(batch=1, H=7, W=8, G=2, Cg=4)
CONFIG = ("channels-last: input (N, H, W, G * Cg), offset (N, H, W, G * 9 * 2), mask (N, H, W, G * 9); "
          "3x3 kernel, stride 1, padding 1, dilation 1, offset_scale 1, mask as given")


def _facts(shape: dict) -> dict:
    return {"group_channels": shape["Cg"], "group": shape["G"]}


def make_inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    N, H, W, G, Cg = shape["batch"], shape["H"], shape["W"], shape["G"], shape["Cg"]
    x = {"input": torch.randn(N, H, W, G * Cg, device=device, dtype=dtype),
         "offset": (torch.randn(N, H, W, G * K * 2, device=device) * 2).to(dtype),
         "mask": torch.softmax(torch.randn(N, H, W, G, K, device=device), -1).flatten(-2).to(dtype)}
    return {n: t.requires_grad_() for n, t in x.items()}, torch.randn(N, H, W, G * Cg, device=device, dtype=dtype)


def _group(x: Inputs) -> int:
    return x["mask"].shape[-1] // K


def _reference(shape: dict, device: str) -> Impl:
    return Impl(lambda x: dcn_aggregate_ref(x["input"], x["offset"], x["mask"], 3, 1, 1, 1, _group(x)),
                note="fastvision.reference.dcn_aggregate_ref: pure PyTorch, the four corners gathered as "
                     "(N, Ho * Wo, G, K, Cg) tensors, float32 accumulation")


def _fastvision(backend: str) -> Impl:
    return Impl(lambda x: dcn_aggregate(x["input"], x["offset"], x["mask"], 3, 1, 1, 1, _group(x), backend=backend),
                note=f"fastvision.ops.dcn_aggregate(backend={backend!r}): the fused kernels through the public op; "
                     "deterministic backward (no atomics)")


def _baselines(shape: dict, device: str) -> dict[str, Impl]:
    def core(x):
        G, dtype = _group(x), x["input"].dtype
        # Half inputs: under autocast, as users run it (its float32 grid meets F.grid_sample's fp32 policy).
        with torch.autocast(x["input"].device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
            return dcnv3_core_pytorch(x["input"], x["offset"], x["mask"], 3, 3, 1, 1, 1, 1, 1, 1, G,
                                      x["input"].shape[-1] // G, 1.0, False)
    return {"dcnv3_core_pytorch": Impl(
        core, note="InternImage's dcnv3_core_pytorch (ops_dcnv3/functions/dcnv3_func.py) as its users call it: "
                   "F.pad, its reference points and dilation grid built in every call, F.grid_sample over "
                   "(N * G, Cg, H, W) images, autograd backward")}


def flops(shape: dict) -> float:
    """Four corners' multiply-adds per kernel point and channel."""
    return 2.0 * 4 * shape["batch"] * shape["H"] * shape["W"] * shape["G"] * shape["Cg"] * K


register(Suite("dcn_aggregate", "dcn_aggregate", CASES, make_inputs, _facts, _fastvision, _reference, _baselines,
               tiny=TINY, config=CONFIG, flops=flops))
