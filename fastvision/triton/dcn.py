"""Triton kernels for DCNv3 / DCNv4 aggregation, channels-last.

input (N, H, W, G * Cg); offset (N, Ho, Wo, G * K * 2) as (dx, dy) pairs;
mask (N, Ho, Wo, G * K); out (N, Ho, Wo, G * Cg). The sampling rule (the DCNv3
CUDA op's) and the oracle are in ``fastvision.reference.dcn``; bilinear
sampling is ``_bilinear.py``'s.

Forward (``_dcn_fwd_kernel``, one program per (block of BQ outputs, group)):
a [BQ, Cg] accumulator; per kernel point, the four corners of every output's
sample are loaded as [BQ, Cg] tiles (channels contiguous) and added with the
mask weight times the bilinear weight. With mask_softmax the weights are the
softmax over the group's K points (max and sum in two passes first).

It launches with ``maxnreg=255`` (the whole register file allowed): without a
budget ptxas fitted the bf16 softmax variant at Cg 32 to 48 registers on sm_80
and spilled 16 B (bench/compile_check.py); with it, 72 registers and no spill.

Backward, deterministic, no atomics:
    ``_dcn_bwd_sample_kernel`` (per output block and group): dmask (the
    gradient of the weights; the launcher applies the softmax's backward) and
    doffset, each output owning its own; it also writes every (output,
    point, corner)'s coefficient m * w_k and its target input row
    (n, pixel, g) (a sentinel where the corner reads nothing).
    The launcher sorts the targets (stable), which gives each input row its
    contributions in a fixed order (CSR row pointers from searchsorted).
    ``_dcn_bwd_input_kernel`` (per block of input rows): dinput[row] = sum
    over its contributions of coefficient * dout[output, g, :]: a gather.

Runs on CPU tensors under TRITON_INTERPRET=1 as well; nothing newer than
triton 3.6 is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bilinear import bilinear_coordinate_grads, bilinear_corners, bilinear_weights

__all__ = ["dcn_fwd", "dcn_bwd"]


@triton.jit
def _outputs(pid, Ho, Wo, NQ, sh, sw, ph, pw, dh, dw, kh, kw, scale, BQ: tl.constexpr):
    """The block's output indices q (int64), their batch index, valid mask, and the grid's top-left (bx, by)."""
    q = pid.to(tl.int64) * BQ + tl.arange(0, BQ)
    qmask = q < NQ
    Q = Ho * Wo
    n = q // Q
    r = q % Q
    ho = r // Wo
    wo = r % Wo
    half_h = (dh * (kh - 1)) // 2
    half_w = (dw * (kw - 1)) // 2
    # The CUDA op's arithmetic: p0 - half * scale, p0 = o * stride - pad + half.
    bx = (wo * sw - pw + half_w).to(tl.float32) - half_w * scale
    by = (ho * sh - ph + half_h).to(tl.float32) - half_h * scale
    return q, n, qmask, bx, by


@triton.jit
def _point(p, OffRow, qmask, bx, by, kh, dh, dw, center, remove_center, scale):
    """Sampling point (x, y) of kernel point p (x outer, y inner; the centre skipped with remove_center)."""
    t = p + (p >= center).to(tl.int32) * remove_center
    i = t // kh
    j = t % kh
    ox = tl.load(OffRow + 2 * p, mask=qmask, other=0.0).to(tl.float32)
    oy = tl.load(OffRow + 2 * p + 1, mask=qmask, other=0.0).to(tl.float32)
    return bx + (i * dw + ox) * scale, by + (j * dh + oy) * scale


@triton.jit
def _softmax_stats(MaskRow, qmask, K, SOFTMAX: tl.constexpr, BQ: tl.constexpr):
    """(max, sum of exp) over each output's K weights; (0, 1) without softmax."""
    mx = tl.zeros([BQ], dtype=tl.float32)
    sm = tl.full([BQ], 1.0, dtype=tl.float32)
    if SOFTMAX:
        mx = tl.full([BQ], float("-inf"), dtype=tl.float32)
        for p in range(0, K):
            mx = tl.maximum(mx, tl.load(MaskRow + p, mask=qmask, other=0.0).to(tl.float32))
        sm = tl.zeros([BQ], dtype=tl.float32)
        for p in range(0, K):
            sm += tl.exp(tl.load(MaskRow + p, mask=qmask, other=0.0).to(tl.float32) - mx)
    return mx, sm


@triton.jit
def _weight(MaskRow, p, qmask, mx, sm, SOFTMAX: tl.constexpr):
    m = tl.load(MaskRow + p, mask=qmask, other=0.0).to(tl.float32)
    if SOFTMAX:
        m = tl.exp(m - mx) / sm
    return m


@triton.jit
def _corners(Img, y, x, H, W, C, c):
    """The sample's top-left (y0, x0), the addresses of its four corners' channel rows ([BQ, BC]),
    the fractions and which corners are valid (bilinear_corners)."""
    y0, x0, ly, lx, m0, m1, m2, m3 = bilinear_corners(y, x, H, W)
    at = (y0.to(tl.int64) * W + x0) * C
    row = ((at * 0 + W) * C)[:, None]  # W * C in int64: an image row may exceed 2^31 elements
    a0 = Img[:, None] + at[:, None] + c[None, :]
    return y0, x0, a0, a0 + C, a0 + row, a0 + row + C, ly, lx, m0, m1, m2, m3


@triton.jit
def _dcn_fwd_kernel(In, Off, Mask, Out, H, W, Ho, Wo, NQ, G, Cg, K, kh, kw, sh, sw, ph, pw, dh, dw, center,
                    remove_center, scale, SOFTMAX: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr):
    g = tl.program_id(1)
    q, n, qmask, bx, by = _outputs(tl.program_id(0), Ho, Wo, NQ, sh, sw, ph, pw, dh, dw, kh, kw, scale, BQ)
    C = G * Cg
    c = tl.arange(0, BC)
    cmask = (c < Cg)[None, :]
    Img = In + n * H * W * C + g * Cg  # [BQ] pointers
    OffRow = Off + (q * G + g) * K * 2
    MaskRow = Mask + (q * G + g) * K
    mx, sm = _softmax_stats(MaskRow, qmask, K, SOFTMAX, BQ)
    acc = tl.zeros([BQ, BC], dtype=tl.float32)
    for p in range(0, K):
        x, y = _point(p, OffRow, qmask, bx, by, kh, dh, dw, center, remove_center, scale)
        m = _weight(MaskRow, p, qmask, mx, sm, SOFTMAX)
        _, _, a0, a1, a2, a3, ly, lx, m0, m1, m2, m3 = _corners(Img, y, x, H, W, C, c)
        w0, w1, w2, w3 = bilinear_weights(ly, lx, m0 & qmask, m1 & qmask, m2 & qmask, m3 & qmask)
        v0 = tl.load(a0, mask=(m0 & qmask)[:, None] & cmask, other=0.0).to(tl.float32)
        v1 = tl.load(a1, mask=(m1 & qmask)[:, None] & cmask, other=0.0).to(tl.float32)
        v2 = tl.load(a2, mask=(m2 & qmask)[:, None] & cmask, other=0.0).to(tl.float32)
        v3 = tl.load(a3, mask=(m3 & qmask)[:, None] & cmask, other=0.0).to(tl.float32)
        acc += m[:, None] * (w0[:, None] * v0 + w1[:, None] * v1 + w2[:, None] * v2 + w3[:, None] * v3)
    out = Out + (q * C + g * Cg)[:, None] + c[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=qmask[:, None] & cmask)


@triton.jit
def _dcn_bwd_sample_kernel(dOut, In, Off, Mask, dOff, dM, Coef, Target, R, H, W, Ho, Wo, NQ, G, Cg, K, kh, kw, sh, sw,
                           ph, pw, dh, dw, center, remove_center, scale, SOFTMAX: tl.constexpr, BQ: tl.constexpr,
                           BC: tl.constexpr):
    g = tl.program_id(1)
    q, n, qmask, bx, by = _outputs(tl.program_id(0), Ho, Wo, NQ, sh, sw, ph, pw, dh, dw, kh, kw, scale, BQ)
    C = G * Cg
    c = tl.arange(0, BC)
    cmask = (c < Cg)[None, :]
    Img = In + n * H * W * C + g * Cg
    row = q * G + g
    OffRow = Off + row * K * 2
    MaskRow = Mask + row * K
    go = tl.load(dOut + (q * C + g * Cg)[:, None] + c[None, :], mask=qmask[:, None] & cmask, other=0.0)
    go = go.to(tl.float32)
    mx, sm = _softmax_stats(MaskRow, qmask, K, SOFTMAX, BQ)
    sentinel = R  # N * H * W * G: past every input row, sorts last
    pix0 = n * H * W
    for p in range(0, K):
        x, y = _point(p, OffRow, qmask, bx, by, kh, dh, dw, center, remove_center, scale)
        m = _weight(MaskRow, p, qmask, mx, sm, SOFTMAX)
        y0, x0, a0, a1, a2, a3, ly, lx, m0, m1, m2, m3 = _corners(Img, y, x, H, W, C, c)
        m0, m1, m2, m3 = m0 & qmask, m1 & qmask, m2 & qmask, m3 & qmask
        d0 = tl.sum(go * tl.load(a0, mask=m0[:, None] & cmask, other=0.0).to(tl.float32), axis=1)
        d1 = tl.sum(go * tl.load(a1, mask=m1[:, None] & cmask, other=0.0).to(tl.float32), axis=1)
        d2 = tl.sum(go * tl.load(a2, mask=m2[:, None] & cmask, other=0.0).to(tl.float32), axis=1)
        d3 = tl.sum(go * tl.load(a3, mask=m3[:, None] & cmask, other=0.0).to(tl.float32), axis=1)
        w0, w1, w2, w3 = bilinear_weights(ly, lx, m0, m1, m2, m3)
        gy, gx = bilinear_coordinate_grads(d0, d1, d2, d3, ly, lx)
        tl.store(dM + row * K + p, w0 * d0 + w1 * d1 + w2 * d2 + w3 * d3, mask=qmask)
        tl.store(dOff + row * K * 2 + 2 * p, m * gx * scale, mask=qmask)
        tl.store(dOff + row * K * 2 + 2 * p + 1, m * gy * scale, mask=qmask)
        # Scatter list: coefficient and target input row (n, pixel, g) of each corner.
        e = (row * K + p) * 4
        top = (pix0 + y0.to(tl.int64) * W + x0) * G + g
        below = (top * 0 + W) * G  # int64
        tl.store(Coef + e, m * w0, mask=qmask)
        tl.store(Coef + e + 1, m * w1, mask=qmask)
        tl.store(Coef + e + 2, m * w2, mask=qmask)
        tl.store(Coef + e + 3, m * w3, mask=qmask)
        tl.store(Target + e, tl.where(m0, top, sentinel), mask=qmask)
        tl.store(Target + e + 1, tl.where(m1, top + G, sentinel), mask=qmask)
        tl.store(Target + e + 2, tl.where(m2, top + below, sentinel), mask=qmask)
        tl.store(Target + e + 3, tl.where(m3, top + below + G, sentinel), mask=qmask)


@triton.jit
def _dcn_bwd_input_kernel(dOut, Coef, Order, RowPtr, dIn, R, Cg, K, BR: tl.constexpr, BC: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rmask = r < R
    c = tl.arange(0, BC)
    cmask = (c < Cg)[None, :]
    start = tl.load(RowPtr + r, mask=rmask, other=0)
    count = tl.load(RowPtr + r + 1, mask=rmask, other=0) - start
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for j in range(0, tl.max(count, axis=0)):
        live = j < count
        e = tl.load(Order + start + j, mask=live, other=0)
        coef = tl.load(Coef + e, mask=live, other=0.0)
        # Entry e belongs to output row (q * G + g) = e // (4K); dout's row of that (q, g) has Cg channels.
        go = tl.load(dOut + (e // (4 * K) * Cg)[:, None] + c[None, :], mask=live[:, None] & cmask, other=0.0)
        acc += coef[:, None] * go.to(tl.float32)
    tl.store(dIn + (r * Cg)[:, None] + c[None, :], acc.to(dIn.dtype.element_ty), mask=rmask[:, None] & cmask)


# --------------------------------------------------------------------------
# Launchers (same names and arguments as the registered ops)


def _geometry(input, kernel_size, stride, padding, dilation, group, remove_center):
    N, H, W, C = input.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    K = kh * kw - int(remove_center)
    center = (kw // 2) * kh + kh // 2
    return N, H, W, C, Ho, Wo, K, (kh, kw, sh, sw, ph, pw, dh, dw, center, int(remove_center))


def _blocks(Cg: int, blocks: dict | None) -> dict:
    """BC: the channels of a group, padded to a power of 2; BQ outputs (BR input rows) per program,
    so that a [BQ, BC] tile holds about 1024 elements (the kernels hold four corner tiles and an
    accumulator: larger tiles spill at 4 warps)."""
    BC = triton.next_power_of_2(max(Cg, 1))
    bq = max(1, min(64, 1024 // BC))
    return {"BQ": bq, "BR": bq, "BC": BC, **(blocks or {})}


def dcn_fwd(input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center,
            mask_softmax, *, blocks: dict | None = None):
    """-> out (N, Ho, Wo, C) in input's dtype. ``blocks`` (BQ, BC) overrides the block sizes."""
    N, H, W, C, Ho, Wo, K, geo = _geometry(input, kernel_size, stride, padding, dilation, group, remove_center)
    out = input.new_empty((N, Ho, Wo, C))
    NQ = N * Ho * Wo
    if NQ == 0 or C == 0:
        return out.zero_()
    bs = _blocks(C // group, blocks)
    grid = (triton.cdiv(NQ, bs["BQ"]), group)
    _dcn_fwd_kernel[grid](input, offset, mask, out, H, W, Ho, Wo, NQ, group, C // group, K, *geo,
                          float(offset_scale), SOFTMAX=bool(mask_softmax), BQ=bs["BQ"], BC=bs["BC"],
                          maxnreg=255)  # see the module docstring
    return out


def dcn_bwd(dout, input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center,
            mask_softmax, *, blocks: dict | None = None):
    """-> (dinput, doffset, dmask) in the inputs' dtype; ``blocks`` (BQ, BR, BC) as for the forward."""
    N, H, W, C, Ho, Wo, K, geo = _geometry(input, kernel_size, stride, padding, dilation, group, remove_center)
    NQ = N * Ho * Wo
    f32 = dict(device=input.device, dtype=torch.float32)
    if NQ == 0 or C == 0 or N * H * W == 0:
        return torch.zeros_like(input), torch.zeros_like(offset), torch.zeros_like(mask)
    Cg = C // group
    bs = _blocks(Cg, blocks)
    doffset = torch.empty(offset.shape, **f32)
    dm = torch.empty(mask.shape, **f32)
    entries = NQ * group * K * 4
    rows = N * H * W * group
    coef = torch.empty(entries, **f32)
    target = torch.empty(entries, device=input.device, dtype=torch.int64)
    _dcn_bwd_sample_kernel[(triton.cdiv(NQ, bs["BQ"]), group)](
        dout, input, offset, mask, doffset, dm, coef, target, rows, H, W, Ho, Wo, NQ, group, Cg, K, *geo,
        float(offset_scale), SOFTMAX=bool(mask_softmax), BQ=bs["BQ"], BC=bs["BC"])
    # Each input row's contributions in a fixed order: a stable sort by target row.
    sorted_target, order = torch.sort(target, stable=True)
    row_ptr = torch.searchsorted(sorted_target, torch.arange(rows + 1, device=input.device, dtype=torch.int64))
    dinput = torch.empty(input.shape, **f32)
    _dcn_bwd_input_kernel[(triton.cdiv(rows, bs["BR"]),)](dout, coef, order, row_ptr, dinput, rows, Cg, K,
                                                          BR=bs["BR"], BC=bs["BC"])
    if mask_softmax:  # through the softmax: d logit = m (dm - sum_p m_p dm_p), per group
        m = torch.softmax(mask.float().unflatten(-1, (group, K)), dim=-1)
        dmu = dm.unflatten(-1, (group, K))
        dm = (m * (dmu - (m * dmu).sum(-1, keepdim=True))).flatten(-2)
    return dinput.to(input.dtype), doffset.to(input.dtype), dm.to(input.dtype)
