"""Benchmarks of the deform_attn family: ``ms_deform_attn`` (Deformable DETR).

Deformable DETR's encoder self-attention: 4 levels from 64 x 64 down (64, 32,
16, 8: a 512 x 512 image at strides 8 to 64), every pixel a query (Lq = sum
H_l W_l = 5440), M 8 heads of D 32, P 4 points; batch 1 and 2. On CUDA also
an 800 x 1216 image's levels (100 x 152 down to 13 x 19) and the decoder's
cross-attention (300 queries). Sampling locations as the model makes them: each
query's reference point (its pixel centre in every level) plus offsets of about
2 pixels of each level; softmax attention weights.

The reference every speedup divides is Deformable DETR's pure-PyTorch
``ms_deform_attn_core_pytorch`` formulation (one ``F.grid_sample`` per level,
``fastvision.reference.deform_attn.ms_deform_attn_grid_sample``), as its users
run it: the level sizes read from the (L, 2) table in every call.
"""

from __future__ import annotations

import torch

from fastvision.ops.deform_attn import ms_deform_attn
from fastvision.reference.deform_attn import ms_deform_attn_grid_sample

from ..core import Case, Impl, Inputs, Suite, register

DETR_64 = ((64, 64), (32, 32), (16, 16), (8, 8))
DETR_800 = ((100, 152), (50, 76), (25, 38), (13, 19))
ENCODER = dict(M=8, D=32, P=4)
CASES = (
    Case("detr_encoder_64_batch1", dict(N=1, levels=DETR_64, queries="encoder", **ENCODER), quick=True),
    Case("detr_encoder_64_batch2", dict(N=2, levels=DETR_64, queries="encoder", **ENCODER)),
    Case("detr_decoder_64_batch2", dict(N=2, levels=DETR_64, queries=300, **ENCODER)),
    Case("detr_encoder_800x1216_batch2", dict(N=2, levels=DETR_800, queries="encoder", **ENCODER),
         devices=("cuda",)),
    Case("detr_decoder_800x1216_batch2", dict(N=2, levels=DETR_800, queries=300, **ENCODER), devices=("cuda",)),
)
TINY = dict(N=1, levels=((6, 5), (3, 3)), M=2, D=8, P=2)
CONFIG = ("value (N, S, M, D); locations: reference point + ~2-pixel offsets per level; softmax weights; "
          "float32 accumulation")


def _facts(shape: dict) -> dict:
    return {"head_dim": shape["D"]}


def _reference_points(levels, queries: int | str, device: str) -> torch.Tensor:
    """(Lq, 2) (x, y) in [0, 1]: every pixel centre of every level (the encoder), or
    `queries` random points (the decoder)."""
    if queries != "encoder":
        return torch.rand(queries, 2, device=device)
    points = []
    for h, w in levels:
        y, x = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w,
                              indexing="ij")
        points.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
    return torch.cat(points)


def make_inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    N, M, D, P, levels = shape["N"], shape["M"], shape["D"], shape["P"], shape["levels"]
    L = len(levels)
    shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    S = sum(h * w for h, w in levels)
    ref = _reference_points(levels, shape["queries"], device)
    Lq = ref.shape[0]
    wh = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32, device=device)
    offsets = torch.randn(N, Lq, M, L, P, 2, device=device) * 2.0
    loc = ref[None, :, None, None, None, :] + offsets / wh[None, None, None, :, None, :]
    attn = torch.softmax(torch.randn(N, Lq, M, L * P, device=device), -1).view(N, Lq, M, L, P)
    x = {"value": torch.randn(N, S, M, D, device=device, dtype=dtype).requires_grad_(),
         "sampling_locations": loc.to(dtype).requires_grad_(), "attention_weights": attn.to(dtype).requires_grad_(),
         "value_spatial_shapes": shapes, "value_level_start_index": starts}
    return x, torch.randn(N, Lq, M * D, device=device, dtype=dtype)


def _reference(shape: dict, device: str) -> Impl:
    return Impl(lambda x: ms_deform_attn_grid_sample(x["value"], x["value_spatial_shapes"], x["sampling_locations"],
                                                     x["attention_weights"]),
                note="Deformable DETR's ms_deform_attn_core_pytorch formulation (fastvision.reference.deform_attn."
                     "ms_deform_attn_grid_sample): one F.grid_sample per level, the (N * M, D, Lq, L * P) samples "
                     "stacked, weighted and summed; level sizes read from the table in every call")


def _fastvision(backend: str) -> Impl:
    return Impl(lambda x: ms_deform_attn(x["value"], x["value_spatial_shapes"], x["value_level_start_index"],
                                         x["sampling_locations"], x["attention_weights"], backend=backend),
                note=f"fastvision.ops.ms_deform_attn(backend={backend!r}): the fused kernels through the public op "
                     "(level tables checked: every call on CPU, once per table on CUDA)")


register(Suite("ms_deform_attn", "ms_deform_attn", CASES, make_inputs, _facts, _fastvision, _reference,
               tiny=TINY, config=CONFIG))
