"""Benchmarks of the criss-cross family: ``criss_cross_attention`` (CCNet, NCHW).

CCNet's head on a ResNet-101 (output stride 8) at 769 x 769: 97 x 97
positions, 512 value channels, 64 query/key channels (512 // 8), batch 2 (the
shape mmcv's ``CrissCrossAttention`` docstring times), and a wide map.
Baselines: fastvision's pure-PyTorch reference (every speedup divides it) and
mmcv's einsum formulation (the body of ``mmcv.ops.CrissCrossAttention.forward``
between its 1x1 convolutions and gamma, written out here: mmcv's module needs
mmcv, whose ops need its own build), which materialises the (B, H, W, H + W)
energies and attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvision.ops.criss_cross import criss_cross_attention
from fastvision.reference.criss_cross import criss_cross_attention_ref

from ..core import Case, Impl, Inputs, Suite, register

CASES = (
    Case("ccnet_97", dict(batch=2, C=512, Cqk=64, H=97, W=97), quick=True),
    Case("wide_65x129", dict(batch=2, C=256, Cqk=32, H=65, W=129)),
    Case("ccnet_97_batch8", dict(batch=8, C=512, Cqk=64, H=97, W=97), devices=("cuda",)),
)
TINY = dict(batch=1, C=16, Cqk=4, H=7, W=9)
CONFIG = "NCHW: query, key (batch, Cqk, H, W), value (batch, C, H, W); no scaling, one softmax over H + W"


def _facts(shape: dict) -> dict:
    return {"channels": max(shape["C"], shape["Cqk"])}


def make_inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    """q, k, v as the 1x1 convolutions of a feature map give them (small logits)."""
    B, C, Cqk, H, W = shape["batch"], shape["C"], shape["Cqk"], shape["H"], shape["W"]
    scale = Cqk ** -0.5
    x = {"q": torch.randn(B, Cqk, H, W, device=device, dtype=dtype) * scale ** 0.5,
         "k": torch.randn(B, Cqk, H, W, device=device, dtype=dtype) * scale ** 0.5,
         "v": torch.randn(B, C, H, W, device=device, dtype=dtype)}
    return {n: t.requires_grad_() for n, t in x.items()}, torch.randn(B, C, H, W, device=device, dtype=dtype)


def mmcv_einsum(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """mmcv's CrissCrossAttention.forward between its convolutions and gamma (mmcv >= 1.3.13)."""
    H = value.shape[2]
    neg_inf_diag = torch.diag(torch.tensor(float("-inf"), device=query.device).repeat(H), 0)
    energy_h = (torch.einsum("bchw,bciw->bwhi", query, key) + neg_inf_diag).transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", query, key)
    attn = F.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)
    out = torch.einsum("bciw,bhwi->bchw", value, attn[..., :H])
    out += torch.einsum("bchj,bhwj->bchw", value, attn[..., H:])
    return out


def _reference(shape: dict, device: str) -> Impl:
    return Impl(lambda x: criss_cross_attention_ref(x["q"], x["k"], x["v"]),
                note="fastvision.reference.criss_cross_attention_ref: pure PyTorch einsums over the "
                     "(B, H, W, H + W) energies, float32 accumulation")


def _fastvision(backend: str) -> Impl:
    return Impl(lambda x: criss_cross_attention(x["q"], x["k"], x["v"], backend=backend),
                note=f"fastvision.ops.criss_cross_attention(backend={backend!r}): the fused kernels through the "
                     "public op; no (B, H, W, H + W) tensor, only the (B, H, W) logsumexp kept for the backward")


def _baselines(shape: dict, device: str) -> dict[str, Impl]:
    return {"mmcv (einsum)": Impl(
        lambda x: mmcv_einsum(x["q"], x["k"], x["v"]),
        note="mmcv.ops.CrissCrossAttention's einsum formulation (its forward without the 1x1 convs, "
             "gamma and residual), as PyTorch autograd runs it; its -inf diagonal is built in every call, "
             "as mmcv does")}


def flops(shape: dict) -> float:
    """QK^T and PV over the H + W partners of every query."""
    B, C, Cqk, H, W = shape["batch"], shape["C"], shape["Cqk"], shape["H"], shape["W"]
    return 2.0 * B * H * W * (H + W) * (C + Cqk)


register(Suite("criss_cross", "criss_cross_attention", CASES, make_inputs, _facts, _fastvision, _reference,
               _baselines, tiny=TINY, config=CONFIG, flops=flops))
