"""Deformable DETR's encoder (Zhu et al., ICLR 2021) on fastvision's multi-scale deformable attention.

:func:`deformable_encoder` builds the encoder stack of fundamentalvision/Deformable-DETR
(``models/deformable_transformer.py``: ``DeformableTransformerEncoder`` of
``DeformableTransformerEncoderLayer``\\ s, module names ``layers.<i>.self_attn``,
``norm1``, ``linear1``, ``linear2``, ``norm2``), so the ``transformer.encoder.*``
entries of its checkpoints load with ``strict=True`` (prefix removed).
:func:`flatten_levels` prepares its inputs from per-level feature maps as
``DeformableTransformer.forward`` does.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvision.ops.deform_attn_layers import MSDeformAttn

__all__ = ["DeformableTransformerEncoderLayer", "DeformableTransformerEncoder", "deformable_encoder",
           "flatten_levels"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a ReLU FFN; post-norm, as the anchor."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *, backend: str = "auto"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise RuntimeError(f"activation should be relu/gelu, not {activation}.")
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _ACTIVATIONS[activation]
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor | None, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        query = src if pos is None else src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(query, reference_points, src, spatial_shapes,
                                                            level_start_index, padding_mask)))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    """`num_layers` copies of `encoder_layer`; every query's reference point is its own pixel centre."""

    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios: Tensor, device) -> Tensor:
        """(N, S, L, 2): each pixel's centre (x, y) normalised by its level's valid
        (unpadded) size, then scaled into every level by that level's valid ratio."""
        points = []
        for lvl, (h, w) in enumerate(spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor)
                                     else spatial_shapes):
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                          torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                pos: Tensor | None = None, padding_mask: Tensor | None = None) -> Tensor:
        # spatial_shapes: the (L, 2) int64 tensor, or (H, W) pairs as Python ints (what
        # torch.export takes as constants: the reference points depend on their values).
        levels = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else [tuple(p) for p in spatial_shapes]
        if not isinstance(spatial_shapes, Tensor):
            spatial_shapes = torch.as_tensor(levels, dtype=torch.long, device=src.device)
        output = src
        reference_points = self.get_reference_points(levels, valid_ratios, device=src.device)
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


def deformable_encoder(d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, dim_feedforward: int = 1024,
                       dropout: float = 0.1, activation: str = "relu", num_feature_levels: int = 4,
                       enc_n_points: int = 4, *, backend: str = "auto") -> DeformableTransformerEncoder:
    """Deformable DETR's encoder with ``DeformableTransformer``'s arguments (defaults: the
    published r50 models), initialised as the anchor (Xavier on matrices, then each
    attention's own reset).

    Example::

        >>> import torch
        >>> from fastvision.models import deformable_encoder, flatten_levels
        >>> enc = deformable_encoder(d_model=64, nhead=4, num_encoder_layers=2, num_feature_levels=2)
        >>> srcs = [torch.randn(1, 64, 8, 8), torch.randn(1, 64, 4, 4)]
        >>> masks = [torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool)]
        >>> src, shapes, starts, ratios, pos, mask = flatten_levels(srcs, masks, [torch.zeros_like(s) for s in srcs])
        >>> enc(src, shapes, starts, ratios, pos, mask).shape
        torch.Size([1, 80, 64])
    """
    layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels,
                                              nhead, enc_n_points, backend=backend)
    encoder = DeformableTransformerEncoder(layer, num_encoder_layers)
    for p in encoder.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in encoder.modules():
        if isinstance(m, MSDeformAttn):
            m._reset_parameters()
    return encoder


def flatten_levels(srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                   level_embed: Tensor | None = None):
    """The encoder's inputs from per-level maps, as ``DeformableTransformer.forward``:
    srcs / pos_embeds (N, C, H_l, W_l), masks (N, H_l, W_l) bool (True at padding),
    level_embed (L, C) or None. -> (src (N, S, C), spatial_shapes (L, 2), level_start_index (L,),
    valid_ratios (N, L, 2), pos (N, S, C) with the level embeddings added, padding mask (N, S))."""
    flat, flat_masks, flat_pos, shapes = [], [], [], []
    for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
        shapes.append(src.shape[2:])
        flat.append(src.flatten(2).transpose(1, 2))
        flat_masks.append(mask.flatten(1))
        pos = pos.flatten(2).transpose(1, 2)
        flat_pos.append(pos if level_embed is None else pos + level_embed[lvl].view(1, 1, -1))
    src = torch.cat(flat, 1)
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
    starts = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)
    return src, spatial_shapes, starts, valid_ratios, torch.cat(flat_pos, 1), torch.cat(flat_masks, 1)


def _valid_ratio(mask: Tensor) -> Tensor:
    """(N, 2): the unpadded fraction (w, h) of a (N, H, W) padding mask."""
    _, H, W = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / W, valid_h.float() / H], -1)
