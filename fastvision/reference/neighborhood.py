"""Pure-PyTorch neighborhood attention (NA / dilated NA), the oracle for the fast paths.

Layout is NATTEN's, heads last: query (batch, *spatial, heads, head_dim),
key/value (batch, *spatial, kv_heads, head_dim[_v]). Each query attends to
the keys of its window, chosen per axis by NATTEN's rule (see
:func:`axis_windows`); the attended set is the product of the per-axis windows.
"""

from __future__ import annotations

import torch


def window_bounds(i: int, L: int, k: int, s: int, causal: bool) -> tuple[int, int]:
    """[start, end) of query i's window on an axis of length L (no dilation).

    Non-causal: the window keeps its full size k and shifts inward at the
    borders; queries in one stride group share the window of their leader.
    Causal: it ends at the query itself.
    """
    left, right = k // 2, k // 2 + k % 2 - 1
    if causal:
        leader = min((i // s) * s + s - 1, L - 1)
        return max(leader - left - right, 0), min(i + 1, L)
    leader = min((i // s) * s + s // 2, L - 1)
    start = max(leader - left, 0) + (L - right - leader - 1 if leader + right >= L else 0)
    return start, start + k


def axis_windows(L: int, k: int, d: int = 1, s: int = 1, causal: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions (L, k) and validity mask (L, k) of every query on one axis.

    With dilation d, position i belongs to group i % d and the rule runs in
    group coordinates (i // d) over the group's length. Slot m of query i
    holds key ``start + m`` (group coordinates, mapped back), valid when
    below the window's end (only causal windows can be shorter than k).
    """
    index = torch.zeros(L, k, dtype=torch.long)
    valid = torch.zeros(L, k, dtype=torch.bool)
    for i in range(L):
        g, ig = i % d, i // d
        Lg = L // d + (1 if g < L % d else 0)
        start, end = window_bounds(ig, Lg, k, s, causal)
        for m in range(k):
            if start + m < end:
                index[i, m] = (start + m) * d + g
                valid[i, m] = True
    return index, valid


def _tuple(v, n: int, name: str) -> tuple:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if len(t) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n}; got {v!r}")
    return t


def neighborhood_attention_ref(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False,
                               rpb=None, scale=None, return_lse=False):
    """Neighborhood attention over the spatial axes of [batch, *spatial, heads, dim].

    rpb (heads, 2k0-1[, 2k1-1[, 2k2-1]]) is added to the logits at index
    (j - i) / dilation + k - 1 per axis. Returns out (query's dtype) and, with
    return_lse, the float32 logsumexp of the logits (batch, *spatial, heads).
    """
    nd = query.dim() - 3
    ks = _tuple(kernel_size, nd, "kernel_size")
    ds = _tuple(dilation, nd, "dilation")
    ss = _tuple(stride, nd, "stride")
    cs = _tuple(is_causal, nd, "is_causal")
    B, *spatial, H, D = query.shape
    Hkv = key.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.to(acc)
    k = key.to(acc).repeat_interleave(H // Hkv, dim=-2)
    v = value.to(acc).repeat_interleave(H // Hkv, dim=-2)

    # Flat key index and validity for every (query position, window slot).
    flat = torch.zeros([1] * (2 * nd), dtype=torch.long)
    valid = torch.ones([1] * (2 * nd), dtype=torch.bool)
    bias_index = []
    for a in range(nd):
        idx, ok = axis_windows(spatial[a], ks[a], ds[a], ss[a], cs[a])
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = spatial[a], ks[a]
        step = 1
        for b in range(a + 1, nd):
            step *= spatial[b]
        flat = flat + (idx * step).view(shape)
        valid = valid & ok.view(shape)
        pos = torch.arange(spatial[a])[:, None]
        bias_index.append(((idx - pos) // ds[a] + ks[a] - 1).view(shape))
    flat = flat.expand(*spatial, *ks).reshape(-1)
    valid = valid.expand(*spatial, *ks).reshape(*spatial, -1)

    npos = 1
    for size in spatial:
        npos *= size
    window = flat.numel() // npos
    kf = k.reshape(B, npos, H, D)[:, flat].reshape(B, *spatial, window, H, D)
    vf = v.reshape(B, npos, H, v.shape[-1])[:, flat].reshape(B, *spatial, window, H, v.shape[-1])
    logits = torch.einsum("b...hd,b...whd->b...hw", q, kf) * scale  # (B, *spatial, H, window)
    if rpb is not None:
        bias = rpb.to(acc)[(slice(None),) + tuple(bi.expand(*spatial, *ks) for bi in bias_index)]
        logits = logits + bias.reshape(H, *spatial, -1).movedim(0, -2)
    logits = logits.masked_fill(~valid[..., None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("b...hw,b...whe->b...he", torch.softmax(logits, dim=-1), vf).to(query.dtype)
    return (out, lse) if return_lse else out
