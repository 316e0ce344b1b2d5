"""Pure-PyTorch neighborhood attention (NA / dilated NA), the oracle for the fast paths.

Layout is NATTEN's, heads last: query (batch, *spatial, heads, head_dim),
key/value (batch, *spatial, kv_heads, head_dim[_v]). Each query attends to
the keys of its window, chosen per axis by NATTEN's rule (:func:`axis_windows`,
the one Python copy of the rule: the layers use it too); the attended set is
the product of the per-axis windows, plus any ``additional_keys`` every query
sees. Index and mask tensors are built on the inputs' device (meta included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._checks import acc_dtype, per_axis


def axis_windows(L: int, k: int, d: int = 1, s: int = 1, causal: bool = False,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions (L, k) and validity mask (L, k) of every query on one axis.

    NATTEN's rule. With dilation d, position i belongs to group i % d and the
    rule runs in group coordinates (i // d) over the group's length
    L // d + (i % d < L % d). With left = k // 2 and right = k // 2 + k % 2 - 1:

    * not causal: the window keeps its full size k and shifts inward at the
      borders, start = max(leader - left, 0) - max(leader + right - (Lg - 1), 0),
      where leader = min((i // s) * s + s // 2, Lg - 1) is the middle query
      of i's stride group (queries of a stride group share their window);
    * causal: the window ends at the query itself and starts at
      max(leader - left - right, 0), leader = min((i // s) * s + s - 1, Lg - 1).

    Slot m of query i holds key ``start + m`` (group coordinates, mapped back
    to positions), valid when below the window's end (only causal windows can
    be shorter than k; their invalid slots hold key 0).
    """
    i = torch.arange(L, device=device)
    g, ig = i % d, i // d
    Lg = L // d + (g < L % d).long()
    left, right = k // 2, k // 2 + k % 2 - 1
    if causal:
        leader = torch.minimum((ig // s) * s + s - 1, Lg - 1)
        start = (leader - left - right).clamp(min=0)
        end = torch.minimum(ig + 1, Lg)
    else:
        leader = torch.minimum((ig // s) * s + s // 2, Lg - 1)
        start = (leader - left).clamp(min=0) - (leader + right - (Lg - 1)).clamp(min=0)
        end = start + k
    pos = start[:, None] + torch.arange(k, device=device)
    valid = pos < end[:, None]
    return torch.where(valid, pos * d + g[:, None], 0), valid


def neighborhood_attention_ref(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False,
                               rpb=None, scale=None, return_lse=False, *, additional_keys=None,
                               additional_values=None, attn_dropout: Callable | None = None):
    """Neighborhood attention over the spatial axes of [batch, *spatial, heads, dim].

    rpb (heads, 2k0-1[, 2k1-1[, 2k2-1]]) is added to the logits at index
    (j - i) / dilation + k - 1 per axis. additional_keys / additional_values
    (batch, n_extra, kv_heads, head_dim / head_dim_v) join every query's
    softmax. ``attn_dropout`` (e.g. an ``nn.Dropout``) is applied to the
    softmax weights, a contiguous (batch, *spatial, heads, window [+ n_extra])
    tensor (window slots in row-major order of the per-axis slots). Returns
    out (query's dtype) and, with return_lse, the logsumexp of the logits
    (batch, *spatial, heads), float32 (float64 for float64 inputs).
    Accumulates in float32 (float64 for float64 inputs).
    """
    nd = query.dim() - 3
    ks = per_axis(kernel_size, nd, "kernel_size")
    ds = per_axis(dilation, nd, "dilation")
    ss = per_axis(stride, nd, "stride")
    cs = per_axis(is_causal, nd, "is_causal", bool)
    B, *spatial, H, D = query.shape
    scale = D ** -0.5 if scale is None else scale
    acc = acc_dtype(query.dtype)
    device = query.device

    def heads(t):  # kv heads repeated up to the query heads (GQA)
        return t.to(acc).repeat_interleave(H // t.shape[-2], dim=-2)

    q, k, v = query.to(acc), heads(key), heads(value)

    # Flat key index and validity for every (query position, window slot).
    flat = torch.zeros([1] * (2 * nd), dtype=torch.long, device=device)
    valid = torch.ones([1] * (2 * nd), dtype=torch.bool, device=device)
    bias_index = []
    for a in range(nd):
        idx, ok = axis_windows(spatial[a], ks[a], ds[a], ss[a], cs[a], device=device)
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = spatial[a], ks[a]
        step = 1
        for b in range(a + 1, nd):
            step *= spatial[b]
        flat = flat + (idx * step).view(shape)
        valid = valid & ok.view(shape)
        pos = torch.arange(spatial[a], device=device)[:, None]
        bias_index.append(((idx - pos) // ds[a] + ks[a] - 1).view(shape))
    flat = flat.expand(*spatial, *ks).reshape(-1)
    valid = valid.expand(*spatial, *ks).reshape(*spatial, -1)

    npos = 1
    for size in spatial:
        npos *= size
    window = flat.numel() // max(npos, 1)
    kf = k.reshape(B, npos, H, D)[:, flat].reshape(B, *spatial, window, H, D)
    vf = v.reshape(B, npos, H, v.shape[-1])[:, flat].reshape(B, *spatial, window, H, v.shape[-1])
    logits = torch.einsum("b...hd,b...whd->b...hw", q, kf) * scale  # (B, *spatial, H, window)
    if rpb is not None:
        bias = rpb.to(acc)[(slice(None),) + tuple(bi.expand(*spatial, *ks) for bi in bias_index)]
        logits = logits + bias.reshape(H, *spatial, -1).movedim(0, -2)
    logits = logits.masked_fill(~valid[..., None, :], float("-inf"))
    if additional_keys is not None:
        extra = torch.einsum("b...hd,bnhd->b...hn", q, heads(additional_keys)) * scale
        logits = torch.cat([logits, extra], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.softmax(logits, dim=-1)
    if attn_dropout is not None:
        weights = attn_dropout(weights.contiguous())
    out = torch.einsum("b...hw,b...whe->b...he", weights[..., :window], vf)
    if additional_values is not None:
        out = out + torch.einsum("b...hn,bnhe->b...he", weights[..., window:], heads(additional_values))
    out = out.to(query.dtype)
    return (out, lse) if return_lse else out
