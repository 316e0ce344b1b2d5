"""Triton kernels for super token sampling and upsampling (STViT's StokenAttention).

Layouts as the registered ops (csrc/registration.cpp): images (B, C, H0, W0)
and tokens (B, C, hh, ww) NCHW, affinity (B, hh*ww, h*w, 9); neighbour
k = 3 * dy + dx of cell (i, j) is token (i + dy - 1, j + dx - 1), a zero vector
outside the grid. The oracle is ``fastvision.reference.super_token``.

One program per (batch, cell). It holds the cell's 9 neighbour tokens as a
(16, C) tile (rows 9..15 and out-of-grid rows zero) and walks the cell's pixels
in chunks of (BLOCK_P, C), read from the NCHW image with masks (the padding
reads as zeros and takes part, as in STViT):

* ``_cell_kernel`` (SAMPLE): logits = X NB^T * C ** -0.5, softmax over the 9,
  partial sums part = A^T X and sum_p A, per cell, in one read of x per
  iteration; the last iteration also stores the affinity. (not SAMPLE, the
  upsampling's backward: daffinity = dout NB^T, part = A^T dout.)
* ``_fold_kernel``: per token, the partials of the (up to) 9 cells that send
  to it, summed in the fixed order k = 0..8 (no float atomics: results do not
  depend on scheduling), divided by (sum + 1e-12) when sampling.
* ``_spread_kernel``: pixels = A NB, written to the NCHW image (upsampling;
  the sampling's backward with NB = dstokens / (asum + 1e-12)).

At 8 warps the cell kernel launches with ``maxnreg=255`` (``_cell_budget``):
without it ptxas fitted it to 80 registers and spilled.

Everything accumulates in float32 (tl.dot with IEEE precision: TF32 would
lose the logits' precision); half inputs are widened on load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["super_token_sampling_fwd", "super_token_sampling_bwd", "super_token_upsample_fwd",
           "super_token_upsample_bwd"]

EPS = tl.constexpr(1e-12)  # STViT's (a constexpr: kernels may read no other globals)


@triton.jit
def _pixels(x_ptr, b, c_offs, cell, p0, C, H0, W0, ww, h: tl.constexpr, w: tl.constexpr,
            BLOCK_P: tl.constexpr):
    """Pointers (BLOCK_P, BLOCK_C) to a chunk of the cell's pixels, the mask of those in the
    image, and the mask of those in the cell (padding included)."""
    p = p0 + tl.arange(0, BLOCK_P)
    y = (cell // ww) * h + p // w
    xcol = (cell % ww) * w + p % w
    in_cell = p < h * w
    in_img = in_cell & (y < H0) & (xcol < W0)
    plane = (b * C + c_offs.to(tl.int64)) * H0 * W0
    ptrs = x_ptr + plane[None, :] + (y * W0 + xcol).to(tl.int64)[:, None]
    return ptrs, in_img, in_cell


@triton.jit
def _neighbour_tile(tok_ptr, sb, st, sc, b, cell, c_offs, C, hh, ww, asum_ptr, NORMALIZE: tl.constexpr):
    """(16, BLOCK_C) float32: the 9 neighbour tokens of `cell` (token t, channel c at
    tok + b * sb + t * st + c * sc), zeros outside the grid and in rows 9..15;
    divided by (asum + eps) per token when NORMALIZE."""
    k = tl.arange(0, 16)
    ti = cell // ww + k // 3 - 1
    tj = cell % ww + k % 3 - 1
    ok = (k < 9) & (ti >= 0) & (ti < hh) & (tj >= 0) & (tj < ww)
    t = tl.where(ok, ti * ww + tj, 0)
    ptrs = tok_ptr + b * sb + (t * st)[:, None] + (c_offs * sc)[None, :]
    nb = tl.load(ptrs, mask=ok[:, None] & (c_offs < C)[None, :], other=0.0).to(tl.float32)
    if NORMALIZE:
        den = tl.load(asum_ptr + b * hh * ww + t, mask=ok, other=0.0)
        nb = nb / (den + EPS)[:, None]
    return nb


@triton.jit
def _pool_kernel(x_ptr, tok_ptr, C, H0, W0, hh, ww, h: tl.constexpr, w: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """tok (B, N, C) float32 = the means of the padded cells (STViT's adaptive average pool)."""
    pid = tl.program_id(0).to(tl.int64)
    N = hh * ww
    b, cell = pid // N, pid % N
    c_offs = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(0, h * w, BLOCK_P):
        ptrs, in_img, _ = _pixels(x_ptr, b, c_offs, cell, p0, C, H0, W0, ww, h, w, BLOCK_P)
        acc += tl.sum(tl.load(ptrs, mask=in_img[:, None] & (c_offs < C)[None, :], other=0.0).to(tl.float32), 0)
    tl.store(tok_ptr + pid * C + c_offs, acc / (h * w), mask=c_offs < C)


@triton.jit
def _cell_kernel(x_ptr, tok_ptr, sb, st, sc, aff_ptr, daff_ptr, part_ptr, psum_ptr, scale, C, H0, W0, hh, ww,
                 h: tl.constexpr, w: tl.constexpr, SAMPLE: tl.constexpr, WRITE_AFF: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """SAMPLE: affinity (softmax of the scaled logits) and the partial sums A^T x of one cell.
    Otherwise (upsampling's backward, x = dout): daffinity = dout NB^T (when WRITE_AFF)
    and partials A^T dout."""
    pid = tl.program_id(0).to(tl.int64)
    N = hh * ww
    b, cell = pid // N, pid % N
    c_offs = tl.arange(0, BLOCK_C)
    k = tl.arange(0, 16)
    nb = _neighbour_tile(tok_ptr, sb, st, sc, b, cell, c_offs, C, hh, ww, psum_ptr, False)
    part = tl.zeros((16, BLOCK_C), tl.float32)
    psum = tl.zeros((16,), tl.float32)
    for p0 in range(0, h * w, BLOCK_P):
        ptrs, in_img, in_cell = _pixels(x_ptr, b, c_offs, cell, p0, C, H0, W0, ww, h, w, BLOCK_P)
        X = tl.load(ptrs, mask=in_img[:, None] & (c_offs < C)[None, :], other=0.0).to(tl.float32)
        logits = tl.dot(X, tl.trans(nb), input_precision="ieee")  # (BLOCK_P, 16)
        p = p0 + tl.arange(0, BLOCK_P)
        aff_offs = (pid * h * w + p)[:, None] * 9 + k[None, :]
        aff_mask = in_cell[:, None] & (k < 9)[None, :]
        if SAMPLE:
            s = tl.where((k < 9)[None, :], logits * scale, float("-inf"))
            e = tl.exp(s - tl.max(s, 1)[:, None])
            A = e / tl.sum(e, 1)[:, None]
            A = tl.where(in_cell[:, None], A, 0.0)
            if WRITE_AFF:
                tl.store(aff_ptr + aff_offs, A, mask=aff_mask)
        else:
            if WRITE_AFF:  # daffinity asked for
                tl.store(daff_ptr + aff_offs, logits, mask=aff_mask)
            A = tl.load(aff_ptr + aff_offs, mask=aff_mask, other=0.0)
        part += tl.dot(tl.trans(A), X, input_precision="ieee")
        psum += tl.sum(A, 0)
    part_ptrs = part_ptr + (pid * 9 + k)[:, None] * C + c_offs[None, :]
    tl.store(part_ptrs, part, mask=(k < 9)[:, None] & (c_offs < C)[None, :])
    if SAMPLE:
        tl.store(psum_ptr + pid * 9 + k, psum, mask=k < 9)


@triton.jit
def _fold_kernel(out_ptr, part_ptr, psum_ptr, tok_ptr, asum_ptr, C, hh, ww, NORMALIZE: tl.constexpr,
                 WRITE_TOK: tl.constexpr, WRITE_OUT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Token t of batch b: the sum over k = 0..8 (fixed order) of the partials of the cell
    that has t as its neighbour k; divided by (affinity sum + eps) when NORMALIZE.
    Written to tok (B, N, C) float32 and/or out (B, C, hh, ww) (and asum (B, hh, ww)).
    out comes first: compile_check names a configuration by its first pointer's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    N = hh * ww
    b, t = pid // N, pid % N
    c_offs = tl.arange(0, BLOCK_C)
    cmask = c_offs < C
    row = tl.zeros((BLOCK_C,), tl.float32)
    den = 0.0
    for k in tl.static_range(9):
        si = t // ww - k // 3 + 1
        sj = t % ww - k % 3 + 1
        ok = (si >= 0) & (si < hh) & (sj >= 0) & (sj < ww)
        src = b * N + tl.where(ok, si * ww + sj, 0)  # a valid address either way
        row += tl.where(ok, tl.load(part_ptr + (src * 9 + k) * C + c_offs, mask=cmask, other=0.0), 0.0)
        if NORMALIZE:
            den += tl.where(ok, tl.load(psum_ptr + src * 9 + k), 0.0)
    if NORMALIZE:
        row = row / (den + EPS)
    if WRITE_TOK:
        tl.store(tok_ptr + pid * C + c_offs, row, mask=cmask)
    if WRITE_OUT:
        tl.store(out_ptr + (b * C + c_offs) * N + t, row.to(out_ptr.dtype.element_ty), mask=cmask)
        if NORMALIZE:
            tl.store(asum_ptr + pid, den)


@triton.jit
def _spread_kernel(tok_ptr, sb, st, sc, asum_ptr, aff_ptr, out_ptr, C, H0, W0, hh, ww, h: tl.constexpr,
                   w: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out pixels of one cell = A NB (NB divided by (asum + eps) per token when NORMALIZE)."""
    pid = tl.program_id(0).to(tl.int64)
    N = hh * ww
    b, cell = pid // N, pid % N
    c_offs = tl.arange(0, BLOCK_C)
    k = tl.arange(0, 16)
    nb = _neighbour_tile(tok_ptr, sb, st, sc, b, cell, c_offs, C, hh, ww, asum_ptr, NORMALIZE)
    for p0 in range(0, h * w, BLOCK_P):
        ptrs, in_img, in_cell = _pixels(out_ptr, b, c_offs, cell, p0, C, H0, W0, ww, h, w, BLOCK_P)
        p = p0 + tl.arange(0, BLOCK_P)
        A = tl.load(aff_ptr + (pid * h * w + p)[:, None] * 9 + k[None, :],
                    mask=in_cell[:, None] & (k < 9)[None, :], other=0.0)
        Y = tl.dot(A, nb, input_precision="ieee")  # (BLOCK_P, BLOCK_C)
        tl.store(ptrs, Y.to(out_ptr.dtype.element_ty), mask=in_img[:, None] & (c_offs < C)[None, :])


# --------------------------------------------------------------------------
# Launchers, named and shaped like the registered ops (arguments checked by the caller).


def _blocks(C: int, P: int) -> dict:
    """Channel block (>= 16, tl.dot's minimum), pixel chunk and warps for C channels, P pixels per cell."""
    block_c = max(16, triton.next_power_of_2(C))
    block_p = max(16, min(triton.next_power_of_2(P), 4096 // block_c))
    return dict(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4 if block_c <= 128 else 8)


def _cell_budget(blocks: dict) -> dict:
    """The cell kernel's register budget at 8 warps (a launch option): without one, ptxas
    fitted it to 80 registers (three blocks per SM) and spilled 8-16 B (BLOCK_C 512, sm_80;
    bench/compile_check.py); with the whole register file allowed it takes 100, no spill."""
    return {"maxnreg": 255} if blocks["num_warps"] == 8 else {}


def _no_float64(op: str, t: torch.Tensor) -> None:
    if t.dtype == torch.float64:
        raise ValueError(f"fastvision.{op}: the Triton kernels take float32, float16 or bfloat16 tensors; got "
                         "float64 (use the CPU kernels)")


def _grid_of(stoken_size, size):
    (h, w), (H0, W0) = stoken_size, size
    return h, w, -(-H0 // h), -(-W0 // w)


def super_token_sampling_fwd(x: torch.Tensor, stoken_size: list[int], n_iter: int):
    _no_float64("super_token_sampling_fwd", x)
    B, C, H0, W0 = x.shape
    h, w, hh, ww = _grid_of(stoken_size, (H0, W0))
    N = hh * ww
    f32 = dict(device=x.device, dtype=torch.float32)
    stokens = x.new_empty((B, C, hh, ww))
    affinity = torch.empty((B, N, h * w, 9), **f32)
    asum = torch.empty((B, hh, ww), **f32)
    if B == 0:
        return stokens, affinity, asum
    tok = torch.empty((B, N, C), **f32)
    part = torch.empty((B, N, 9, C), **f32)
    psum = torch.empty((B, N, 9), **f32)
    blocks = _blocks(C, h * w)
    geo = dict(h=h, w=w)
    _pool_kernel[(B * N,)](x, tok, C, H0, W0, hh, ww, **geo, **blocks)
    for it in range(n_iter):
        last = it == n_iter - 1
        _cell_kernel[(B * N,)](x, tok, N * C, C, 1, affinity, affinity, part, psum, C ** -0.5, C, H0, W0, hh, ww,
                               **geo, SAMPLE=True, WRITE_AFF=last, **blocks, **_cell_budget(blocks))
        _fold_kernel[(B * N,)](stokens, part, psum, tok, asum, C, hh, ww, NORMALIZE=True, WRITE_TOK=not last,
                               WRITE_OUT=last, BLOCK_C=blocks["BLOCK_C"], num_warps=blocks["num_warps"])
    return stokens, affinity, asum


def super_token_sampling_bwd(dstokens: torch.Tensor, affinity: torch.Tensor, asum: torch.Tensor,
                             stoken_size: list[int], size: list[int]):
    _no_float64("super_token_sampling_bwd", dstokens)
    B, C = dstokens.shape[:2]
    h, w, hh, ww = _grid_of(stoken_size, size)
    dx = dstokens.new_empty((B, C, *size))
    if B > 0:
        N = hh * ww
        _spread_kernel[(B * N,)](dstokens, C * N, 1, N, asum, affinity, dx, C, size[0], size[1], hh, ww, h=h, w=w,
                                 NORMALIZE=True, **_blocks(C, h * w))
    return dx


def super_token_upsample_fwd(stokens: torch.Tensor, affinity: torch.Tensor, stoken_size: list[int],
                             out_size: list[int]):
    _no_float64("super_token_upsample_fwd", stokens)
    B, C = stokens.shape[:2]
    h, w, hh, ww = _grid_of(stoken_size, out_size)
    out = stokens.new_empty((B, C, *out_size))
    if B > 0:
        N = hh * ww
        _spread_kernel[(B * N,)](stokens, C * N, 1, N, affinity, affinity, out, C, out_size[0], out_size[1], hh,
                                 ww, h=h, w=w, NORMALIZE=False, **_blocks(C, h * w))
    return out


def super_token_upsample_bwd(dout: torch.Tensor, stokens: torch.Tensor, affinity: torch.Tensor,
                             stoken_size: list[int], affinity_grad: bool = True):
    _no_float64("super_token_upsample_bwd", dout)
    B, C, H0, W0 = dout.shape
    h, w, hh, ww = _grid_of(stoken_size, (H0, W0))
    dstokens = torch.empty_like(stokens)
    daffinity = torch.empty_like(affinity) if affinity_grad else affinity.new_empty((0,))
    if B == 0:
        return dstokens, daffinity
    N = hh * ww
    part = torch.empty((B, N, 9, C), device=dout.device, dtype=torch.float32)
    blocks = _blocks(C, h * w)
    _cell_kernel[(B * N,)](dout, stokens, C * N, 1, N, affinity, daffinity, part, part, 1.0, C, H0, W0, hh, ww,
                           h=h, w=w, SAMPLE=False, WRITE_AFF=affinity_grad, **blocks,
                           **_cell_budget(blocks))
    _fold_kernel[(B * N,)](dstokens, part, part, part, part, C, hh, ww, NORMALIZE=False, WRITE_TOK=False,
                           WRITE_OUT=True, BLOCK_C=blocks["BLOCK_C"], num_warps=blocks["num_warps"])
    return dstokens, daffinity
