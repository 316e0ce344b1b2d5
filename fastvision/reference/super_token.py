"""Pure-PyTorch super token sampling and upsampling (STViT), the oracle for the fast paths.

Semantics of hhb072/STViT ``models/stvit.py`` ``StokenAttention.stoken_forward``,
written from its formulas. For x (B, C, H0, W0) and stoken size (h, w):

1. x is padded with zeros at the right and bottom to multiples of (h, w); the
   padded pixels take part in everything below. hh = H // h, ww = W // w.
2. The initial super tokens are the means of the (padded) cells.
3. n_iter times, without gradient: each pixel's logits against the 9 super
   tokens of the 3x3 neighbourhood of its cell (neighbour k = 3 * dy + dx is the
   token at (i + dy - 1, j + dx - 1); outside the grid a zero vector, logit 0,
   which still takes softmax mass), times C ** -0.5, softmax over the 9. When
   more iterations follow, the tokens are updated as in 4.
4. S_j = sum_p A_pj x_p / (sum_p A_pj + 1e-12): the sums run over every pixel
   that has token j among its 9 (STViT's fold), the affinity A is detached, the
   gradient flows through x only.

Upsampling maps tokens back: out_p = sum_k A_pk S_(k-th neighbour of p's cell),
cropped to (H0, W0).

Accumulation in float32 (float64 for float64 inputs); every tensor is built on
the inputs' device, so meta tensors work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import acc_dtype

EPS = 1e-12  # STViT's: added to the affinity sums before dividing


def neighbours(s: torch.Tensor) -> torch.Tensor:
    """The 9 neighbour tokens of every cell: s (B, C, hh, ww) -> (B, hh*ww, C, 9), zeros outside
    (STViT's Unfold: a 3x3 identity convolution with zero padding)."""
    B, C, hh, ww = s.shape
    p = F.pad(s, (1, 1, 1, 1))
    nb = torch.stack([p[:, :, dy:dy + hh, dx:dx + ww] for dy in range(3) for dx in range(3)], dim=-1)
    return nb.permute(0, 2, 3, 1, 4).reshape(B, hh * ww, C, 9)


def fold(t: torch.Tensor, hh: int, ww: int) -> torch.Tensor:
    """The adjoint of :func:`neighbours`: t (B, hh*ww, ..., 9) of values sent by each cell to
    its 9 neighbours -> (B, ..., hh, ww), the sums each token receives (STViT's Fold)."""
    B = t.shape[0]
    t = t.reshape(B, hh, ww, *t.shape[2:]).movedim(1, -1).movedim(1, -1)  # (B, ..., 9, hh, ww)
    out = 0
    for dy in range(3):
        for dx in range(3):
            # Cell (i, j) sends to token (i + dy - 1, j + dx - 1): shift, then crop the border.
            out = out + F.pad(t[..., 3 * dy + dx, :, :], (dx, 2 - dx, dy, 2 - dy))[..., 1:hh + 1, 1:ww + 1]
    return out


def _padded_pixels(x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
    """x (B, C, H0, W0) zero-padded and split into cells: (B, hh*ww, h*w, C), hh, ww."""
    B, C, H0, W0 = x.shape
    x = F.pad(x, (0, (w - W0 % w) % w, 0, (h - H0 % h) % h))
    hh, ww = x.shape[2] // h, x.shape[3] // w
    pixels = x.reshape(B, C, hh, h, ww, w).permute(0, 2, 4, 3, 5, 1).reshape(B, hh * ww, h * w, C)
    return pixels, hh, ww


def super_token_sampling_ref(x: torch.Tensor, stoken_size: tuple[int, int], n_iter: int = 1
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(stokens (B, C, hh, ww) in x's dtype, affinity (B, hh*ww, h*w, 9) in the accumulate dtype).

    Differentiable in x through stokens; the affinity carries no gradient (as in STViT).
    """
    h, w = stoken_size
    B, C = x.shape[:2]
    pixels, hh, ww = _padded_pixels(x.to(acc_dtype(x.dtype)), h, w)
    scale = C ** -0.5
    with torch.no_grad():
        s = pixels.mean(2).transpose(1, 2).reshape(B, C, hh, ww)  # adaptive average pool
        for it in range(n_iter):
            affinity = (pixels @ neighbours(s) * scale).softmax(-1)  # (B, N, h*w, 9)
            asum = fold(affinity.sum(2), hh, ww)  # (B, hh, ww)
            if it < n_iter - 1:
                s = fold(pixels.transpose(-1, -2) @ affinity, hh, ww) / (asum[:, None] + EPS)
    s = fold(pixels.transpose(-1, -2) @ affinity, hh, ww) / (asum[:, None] + EPS)
    return s.to(x.dtype), affinity


def super_token_upsample_ref(stokens: torch.Tensor, affinity: torch.Tensor, stoken_size: tuple[int, int],
                             out_size: tuple[int, int]) -> torch.Tensor:
    """out (B, C, H0, W0) in stokens' dtype; differentiable in stokens and affinity."""
    h, w = stoken_size
    H0, W0 = out_size
    B, C, hh, ww = stokens.shape
    acc = acc_dtype(stokens.dtype)
    pix = neighbours(stokens.to(acc)) @ affinity.to(acc).transpose(-1, -2)  # (B, N, C, h*w)
    out = pix.reshape(B, hh, ww, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, hh * h, ww * w)
    return out[:, :, :H0, :W0].to(stokens.dtype)
