"""Pure-PyTorch criss-cross attention (CCNet), the oracle for the fast paths.

Semantics are mmcv's ``CrissCrossAttention`` (its einsum version), NCHW:
query and key (batch, Cqk, H, W), value (batch, C, H, W). Query (h, w)
attends to its column, keys (i, w) with i != h, and to its row, keys (h, j)
for every j (so the pixel itself is counted once, in its row), in one
softmax over the H + W logits q . k, without scaling:

    E_H[b, h, w, i] = sum_c Q[b, c, h, w] K[b, c, i, w]   (-inf where i == h)
    E_W[b, h, w, j] = sum_c Q[b, c, h, w] K[b, c, h, j]
    A = softmax(cat(E_H, E_W), -1)
    out[b, c, h, w] = sum_i V[b, c, i, w] A[b, h, w, i] + sum_j V[b, c, h, j] A[b, h, w, H + j]
"""

from __future__ import annotations

import torch

from .._checks import acc_dtype


def criss_cross_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              return_lse: bool = False):
    """out (query's dtype, value's shape) and, with return_lse, the logsumexp of the
    H + W logits (batch, H, W) in float32 (float64 for float64 inputs).

    Accumulates in float32 (float64 for float64 inputs); works on any device,
    meta tensors included.
    """
    acc = acc_dtype(query.dtype)
    q, k, v = query.to(acc), key.to(acc), value.to(acc)
    H = q.shape[2]
    energy_h = torch.einsum("bchw,bciw->bhwi", q, k)
    self_mask = torch.eye(H, dtype=torch.bool, device=q.device)[:, None, :]  # [h, 1, i]: i == h
    energy_h = energy_h.masked_fill(self_mask, float("-inf"))
    energy_w = torch.einsum("bchw,bchj->bhwj", q, k)
    energy = torch.cat([energy_h, energy_w], dim=-1)  # (B, H, W, H + W)
    attn = torch.softmax(energy, dim=-1)
    out = torch.einsum("bciw,bhwi->bchw", v, attn[..., :H]) + torch.einsum("bchj,bhwj->bchw", v, attn[..., H:])
    out = out.to(query.dtype)
    return (out, torch.logsumexp(energy, dim=-1)) if return_lse else out
