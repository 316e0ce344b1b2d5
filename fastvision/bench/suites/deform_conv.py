"""Benchmarks of the deform_conv family: ``deform_conv2d`` (DCNv2 with a mask, NCHW).

The DCNv2 layer of a ResNet-50 stage-2 block (64 -> 64 channels, 3x3, 56 x 56,
batch 2: the issue's CPU target) and a stage-3-like one (128 channels, 28 x 28,
2 offset groups) on CUDA too. Baselines: fastvision's pure-PyTorch reference
(every speedup divides it) and torchvision's ``torchvision.ops.deform_conv2d``
(its im2col + GEMM kernels: CPU and CUDA) where torchvision imports beside this
torch; the table says so when it does not.
"""

from __future__ import annotations

import torch

from fastvision.ops.deform_conv import deform_conv2d
from fastvision.reference.deform_conv import deform_conv2d_ref

from ..core import Case, Impl, Inputs, Suite, register

CASES = (
    Case("r50_s2_56", dict(batch=2, Cin=64, Cout=64, H=56, W=56, k=3, G=1), quick=True),
    Case("r50_s3_28_g2", dict(batch=4, Cin=128, Cout=128, H=28, W=28, k=3, G=2)),
    Case("r50_s2_56_batch16", dict(batch=16, Cin=64, Cout=64, H=56, W=56, k=3, G=1), devices=("cuda",)),
)
TINY = dict(batch=1, Cin=4, Cout=4, H=6, W=7)
CONFIG = "NCHW, DCNv2 (with mask), stride 1, padding k // 2, dilation 1, bias, offsets ~ N(0, 1) pixels"


def _facts(shape: dict) -> dict:
    return {"dtype": torch.float32, "kernel_points": shape["k"] ** 2, "groups": 1}


def make_inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    B, Cin, Cout, H, W, k, G = (shape[n] for n in ("batch", "Cin", "Cout", "H", "W", "k", "G"))
    x = {"input": torch.randn(B, Cin, H, W, device=device, dtype=dtype),
         "offset": torch.randn(B, 2 * G * k * k, H, W, device=device, dtype=dtype),
         "weight": torch.randn(Cout, Cin, k, k, device=device, dtype=dtype) * (Cin * k * k) ** -0.5,
         "bias": torch.randn(Cout, device=device, dtype=dtype),
         "mask": torch.rand(B, G * k * k, H, W, device=device, dtype=dtype)}
    return {n: t.requires_grad_() for n, t in x.items()}, torch.randn(B, Cout, H, W, device=device, dtype=dtype)


def _args(x: Inputs) -> tuple:
    pad = x["weight"].shape[-1] // 2
    return (x["input"], x["offset"], x["weight"], x["bias"], 1, pad, 1, x["mask"])


def _reference(shape: dict, device: str) -> Impl:
    return Impl(lambda x: deform_conv2d_ref(*_args(x)),
                note="fastvision.reference.deform_conv2d_ref: pure PyTorch gathers of the four corners into "
                     "(B, Cin, K, Ho * Wo) columns, einsum with the weight, autograd backward")


def _fastvision(backend: str) -> Impl:
    return Impl(lambda x: deform_conv2d(*_args(x), backend=backend),
                note=f"fastvision.ops.deform_conv2d(backend={backend!r}): sampling fused into the GEMM (CPU: "
                     "per-tile columns in cache; Triton: in the tl.dot operand); deterministic backward")


def _baselines(shape: dict, device: str) -> dict[str, Impl]:
    try:
        from torchvision.ops import deform_conv2d as tv_deform_conv2d
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        return {"torchvision": Impl(lambda x: None, skip=f"torchvision does not import here ({type(e).__name__})")}
    return {"torchvision": Impl(lambda x: tv_deform_conv2d(*_args(x)),
                                note="torchvision.ops.deform_conv2d: im2col into a column buffer, then addmm "
                                     "per weight group; col2im with atomics (CUDA) for the input gradient")}


def flops(shape: dict) -> float:
    """The GEMM of the convolution: 2 * B * Cout * Cin * k^2 * H * W."""
    return 2.0 * shape["batch"] * shape["Cout"] * shape["Cin"] * shape["k"] ** 2 * shape["H"] * shape["W"]


register(Suite("deform_conv2d", "deform_conv2d", CASES, make_inputs, _facts, _fastvision, _reference, _baselines,
               tiny=TINY, config=CONFIG, flops=flops))
