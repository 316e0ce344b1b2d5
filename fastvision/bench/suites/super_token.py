"""Benchmarks of the super token family (STViT): ``super_token`` and ``super_token_ops``.

``super_token`` times the layer, ``StokenAttention`` (sampling, multi-head
refinement of the super tokens, upsampling), at STViT-S's first two stages;
``super_token_ops`` the two fused ops alone (sampling, then upsampling the
sampled tokens). The baseline is the same computation on fastvision's
pure-PyTorch reference (``backend="reference"``: STViT's formulas, the same
weights), which every speedup divides. Forward + backward are the gradients of
the input x (the refinement's parameters take part in the graph but their
gradients are not asked for, in every implementation alike).
"""

from __future__ import annotations

import copy

import torch

from fastvision.ops import StokenAttention, super_token_sampling, super_token_upsample

from ..core import Case, Impl, Inputs, Suite, register

LAYER_CASES = (
    Case("stvit_s_stage1", dict(batch=2, dim=64, size=(56, 56), stoken=8, heads=1, n_iter=1), quick=True),
    Case("stvit_s_stage2", dict(batch=2, dim=128, size=(28, 28), stoken=4, heads=2, n_iter=1), quick=True),
    Case("stvit_s_stage1_iter2", dict(batch=2, dim=64, size=(56, 56), stoken=8, heads=1, n_iter=2)),
    Case("stvit_s_stage1_batch64", dict(batch=64, dim=64, size=(56, 56), stoken=8, heads=1, n_iter=1),
         devices=("cuda",)),
)
OPS_CASES = (
    Case("stvit_s_stage1", dict(batch=2, dim=64, size=(56, 56), stoken=8, heads=1, n_iter=1), quick=True),
    Case("stvit_s_stage1_batch64", dict(batch=64, dim=64, size=(56, 56), stoken=8, heads=1, n_iter=1),
         devices=("cuda",)),
)
CONFIG = "NCHW input (batch, dim, H, W); STViT-S widths and heads; qkv_bias=True as in STViT's models"
TINY = dict(batch=1, dim=8, size=(9, 7), stoken=3, heads=2)


def _facts(shape: dict) -> dict:
    return {"channels": shape["dim"]}


def make_inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    """x (requires grad), the layer (seeded weights, shared by every implementation), dout."""
    torch.manual_seed(0)
    layer = StokenAttention(shape["dim"], shape["stoken"], shape["n_iter"], num_heads=shape["heads"], qkv_bias=True)
    x = torch.randn(shape["batch"], shape["dim"], *shape["size"], device=device, dtype=dtype)
    inputs = {"x": x.requires_grad_(), "layer": layer.to(device=device, dtype=dtype), "n_iter": shape["n_iter"],
              "stoken": shape["stoken"]}
    return inputs, torch.randn_like(x)


def _layer(x: Inputs, backend: str) -> torch.Tensor:
    layer = copy.copy(x["layer"])  # shares the weights; only the backend differs
    layer.backend = backend
    return layer(x["x"])


def _ops(x: Inputs, backend: str) -> torch.Tensor:
    stokens, affinity = super_token_sampling(x["x"], x["stoken"], x["n_iter"], backend=backend)
    return super_token_upsample(stokens, affinity, x["stoken"], x["x"].shape[2:], backend=backend)


def _suite(op: str, cases: tuple[Case, ...], run, what: str) -> Suite:
    def reference(shape: dict, device: str) -> Impl:
        return Impl(lambda x: run(x, "reference"),
                    note=f"{what} on fastvision.reference.super_token (pure PyTorch, STViT's formulas: "
                         "padded pixel tiles, batched 9-neighbour matmuls, fold by shifted sums)")

    def fastvision(backend: str) -> Impl:
        return Impl(lambda x: run(x, backend), note=f"{what} with backend={backend!r}: the fused kernels")

    return Suite(op, "super_token_sampling", cases, make_inputs, _facts, fastvision, reference,
                 tiny=TINY, config=CONFIG)


register(_suite("super_token", LAYER_CASES, _layer, "StokenAttention (sampling, attention refinement, upsampling)"))
register(_suite("super_token_ops", OPS_CASES, _ops, "super_token_sampling + super_token_upsample"))
