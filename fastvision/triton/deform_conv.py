"""Triton kernels for deformable convolution (DCNv1 / DCNv2), NCHW, torchvision's numbers.

input (B, Cin, H, W); offset (B, 2 * G * K, Ho, Wo); mask (B, G * K, Ho, Wo)
or None; weight (Cout, Cg, kh, kw), groups = Cin / Cg; K = kh * kw, P = Ho * Wo.
Bilinear sampling with zeros outside the image: ``fastvision.triton._bilinear``
(the oracle is ``fastvision.reference.deform_conv``).

Forward (``_dc_fwd_kernel``): an implicit GEMM, one program per (image, block of
BP positions, block of BO output channels, weight group). The A operand
[BP, BC] (positions x input channels, for one kernel point) is sampled in
registers (offsets, corners, mask) and fed to ``tl.dot`` with the weight tile
[BC, BO]: no column buffer in global memory. fp16 / bf16 on tensor cores;
float32 inputs with ``input_precision="ieee"`` (no TF32).

Backward, deterministic (no atomics; every program owns what it writes):
    ``_dc_bwd_col_kernel``, per (image, position block, offset group, kernel point): the
    column gradients dcol = dout^T W (tl.dot over output channels), stored as
    (B, K, P, Cin) float32 for the input gradient, and doffset / dmask from
    dcol and the corner values, summed over the group's channels in order
    (doffset with torchvision's corners-only rule, ``bilinear_corners_only``:
    one-sided at a coordinate exactly -1, where the sample reads 0).
    ``_dc_bwd_weight_kernel``, per (weight group, output block, channel block,
    kernel point, split): dweight = dout x columns, the columns sampled in
    registers again, summed over a fixed range of images and positions; the
    float32 splits are then summed in order.
    ``_dc_bwd_input_kernel``: the input gradient as a gather. The (sample,
    corner) pairs are sorted by the pixel they touch (a stable sort: a fixed
    order) and each pixel sums its pairs' mask * weight * dcol.
The bias gradient is dout's sum (in the wrapper).

Runs on CPU tensors under TRITON_INTERPRET=1 as well; nothing newer than
triton 3.6 is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bilinear import (bilinear_coordinate_grads, bilinear_corners, bilinear_corners_only, bilinear_in_range,
                        bilinear_weights)

__all__ = ["deform_conv2d_fwd", "deform_conv2d_bwd"]


@triton.jit
def _corner_values(plane, at, W, valid, m0, m1, m2, m3):
    """The four corners' values (float32, 0 where invalid) of samples whose top-left
    corner is at offset `at` of their channel planes."""
    v0 = tl.load(plane + at, mask=valid & m0, other=0.0).to(tl.float32)
    v1 = tl.load(plane + at + 1, mask=valid & m1, other=0.0).to(tl.float32)
    v2 = tl.load(plane + at + W, mask=valid & m2, other=0.0).to(tl.float32)
    v3 = tl.load(plane + at + W + 1, mask=valid & m3, other=0.0).to(tl.float32)
    return v0, v1, v2, v3


@triton.jit
def _sample_block(X, OFF, M, b, c, cmask, k, p, pmask, Cin, H, W, G, Cog, K, P, Wo, kw,
                  sh, sw, ph, pw, dh, dw, HAS_MASK: tl.constexpr):
    """mask * bilinear sample of channels c (BC) at kernel point k of positions p (BP):
    [BP, BC] float32 (0 outside the block)."""
    oh = p // Wo
    ow = p % Wo
    i = k // kw
    j = k % kw
    go = c // Cog
    valid = pmask[:, None] & cmask[None, :]
    ob = ((b * G + go) * K + k).to(tl.int64)  # (image, group, kernel point) index of offset pairs / mask
    dy = tl.load(OFF + (ob * 2 * P)[None, :] + p[:, None], mask=valid, other=0.0).to(tl.float32)
    dx = tl.load(OFF + (ob * 2 * P + P)[None, :] + p[:, None], mask=valid, other=0.0).to(tl.float32)
    y = (oh * sh - ph + i * dh).to(tl.float32)[:, None] + dy
    x = (ow * sw - pw + j * dw).to(tl.float32)[:, None] + dx
    y0, x0, ly, lx, m0, m1, m2, m3 = bilinear_corners(y, x, H, W)
    w0, w1, w2, w3 = bilinear_weights(ly, lx, m0, m1, m2, m3)
    plane = X + ((b * Cin + c).to(tl.int64) * H * W)[None, :]
    v0, v1, v2, v3 = _corner_values(plane, y0 * W + x0, W, valid, m0, m1, m2, m3)
    val = w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3
    if HAS_MASK:
        m = tl.load(M + (ob * P)[None, :] + p[:, None], mask=valid, other=0.0).to(tl.float32)
        val = m * val
    return val


@triton.jit
def _dc_fwd_kernel(X, OFF, M, Wt, Bias, Out, Cin, H, W, Cout, Cg, Og, Cog, G, K, P, Wo, kw,
                   sh, sw, ph, pw, dh, dw, n_pb,
                   HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                   BP: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_pb
    p = (pid % n_pb) * BP + tl.arange(0, BP)
    pmask = p < P
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    gw = tl.program_id(2)
    omask = o < Og
    co = gw * Og + o
    acc = tl.zeros([BP, BO], dtype=tl.float32)
    for k in range(0, K):
        for c0 in range(0, Cg, BC):
            cw = c0 + tl.arange(0, BC)
            cmask = cw < Cg
            a = _sample_block(X, OFF, M, b, gw * Cg + cw, cmask, k, p, pmask, Cin, H, W, G, Cog, K, P, Wo, kw,
                              sh, sw, ph, pw, dh, dw, HAS_MASK)
            wt = tl.load(Wt + (co[None, :] * Cg + cw[:, None]) * K + k, mask=cmask[:, None] & omask[None, :],
                         other=0.0)
            if IEEE:
                acc += tl.dot(a, wt.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a.to(Wt.dtype.element_ty), wt)
    if HAS_BIAS:
        acc += tl.load(Bias + co, mask=omask, other=0.0).to(tl.float32)[None, :]
    dst = Out + ((b * Cout + co).to(tl.int64) * P)[None, :] + p[:, None]
    tl.store(dst, acc.to(Out.dtype.element_ty), mask=pmask[:, None] & omask[None, :])


@triton.jit
def _dc_bwd_col_kernel(X, OFF, M, Wt, dO, dCol, dOff, dMask, Cin, H, W, Cout, Cg, Og, Cog, G, K, P, Wo, kw,
                       sh, sw, ph, pw, dh, dw, n_pb,
                       HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
                       BP: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_pb
    p = (pid % n_pb) * BP + tl.arange(0, BP)
    pmask = p < P
    go = tl.program_id(1)
    k = tl.program_id(2)
    oh = p // Wo
    ow = p % Wo
    i = k // kw
    j = k % kw
    ob = ((b * G + go) * K + k).to(tl.int64)
    dy = tl.load(OFF + ob * 2 * P + p, mask=pmask, other=0.0).to(tl.float32)
    dx = tl.load(OFF + ob * 2 * P + P + p, mask=pmask, other=0.0).to(tl.float32)
    y = (oh * sh - ph + i * dh).to(tl.float32) + dy
    x = (ow * sw - pw + j * dw).to(tl.float32) + dx
    # torchvision's offset gradient takes the corners without the range test (one-sided
    # at y == -1 / x == -1); inside the range they are bilinear_corners'. dmask is the
    # sample: 0 outside the range (the where after the loop).
    y0, x0, ly, lx, m0, m1, m2, m3 = bilinear_corners_only(y, x, H, W)
    in_range = bilinear_in_range(y, x, H, W)
    w0, w1, w2, w3 = bilinear_weights(ly, lx, m0, m1, m2, m3)
    at = (y0 * W + x0)[:, None]
    t_dy = tl.zeros([BP], dtype=tl.float32)
    t_dx = tl.zeros([BP], dtype=tl.float32)
    t_m = tl.zeros([BP], dtype=tl.float32)
    for c0 in range(go * Cog, go * Cog + Cog, BC):
        c = c0 + tl.arange(0, BC)
        cmask = c < go * Cog + Cog
        valid = pmask[:, None] & cmask[None, :]
        # dcol[p, c] = sum over c's weight group's outputs of dout[co, p] * weight[co, c - gw * Cg, k]
        gw = c // Cg
        co_lo = (c0 // Cg) * Og
        co_hi = (tl.minimum(c0 + BC, go * Cog + Cog) - 1) // Cg * Og + Og
        dcol = tl.zeros([BP, BC], dtype=tl.float32)
        for o0 in range(co_lo, co_hi, BO):
            co = o0 + tl.arange(0, BO)
            g_out = tl.load(dO + ((b * Cout + co).to(tl.int64) * P)[None, :] + p[:, None],
                            mask=pmask[:, None] & (co < co_hi)[None, :], other=0.0)
            wmask = (co[:, None] // Og == gw[None, :]) & cmask[None, :] & (co < co_hi)[:, None]
            wt = tl.load(Wt + (co[:, None] * Cg + (c - gw * Cg)[None, :]) * K + k, mask=wmask, other=0.0)
            if IEEE:
                dcol += tl.dot(g_out.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
            else:
                dcol += tl.dot(g_out, wt)
        tl.store(dCol + ((b.to(tl.int64) * K + k) * P + p)[:, None] * Cin + c[None, :], dcol, mask=valid)
        plane = X + ((b * Cin + c).to(tl.int64) * H * W)[None, :]
        v0, v1, v2, v3 = _corner_values(plane, at, W, valid, m0[:, None], m1[:, None], m2[:, None],
                                        m3[:, None])
        gy, gx = bilinear_coordinate_grads(v0, v1, v2, v3, ly[:, None], lx[:, None])
        t_dy += tl.sum(dcol * gy, axis=1)
        t_dx += tl.sum(dcol * gx, axis=1)
        t_m += tl.sum(dcol * (w0[:, None] * v0 + w1[:, None] * v1 + w2[:, None] * v2 + w3[:, None] * v3), axis=1)
    m = tl.full([BP], 1.0, dtype=tl.float32)
    if HAS_MASK:
        m = tl.load(M + ob * P + p, mask=pmask, other=0.0).to(tl.float32)
        t_m = tl.where(in_range, t_m, 0.0)
        tl.store(dMask + ob * P + p, t_m.to(dMask.dtype.element_ty), mask=pmask)
    tl.store(dOff + ob * 2 * P + p, (m * t_dy).to(dOff.dtype.element_ty), mask=pmask)
    tl.store(dOff + ob * 2 * P + P + p, (m * t_dx).to(dOff.dtype.element_ty), mask=pmask)


@triton.jit
def _dc_bwd_weight_kernel(dO, dW, X, OFF, M, Cin, H, W, Cout, Cg, Og, Cog, G, K, P, Wo, kw,
                          sh, sw, ph, pw, dh, dw, n_ob, n_pb, n_it, per_split,
                          HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
                          BP: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr):
    """Split s of the sum over (image, position block) iterations [s * per_split, ...):
    dW[s, co, cw, k] (float32); the splits are summed afterwards in order."""
    gw = tl.program_id(0) // n_ob
    o = (tl.program_id(0) % n_ob) * BO + tl.arange(0, BO)
    omask = o < Og
    co = gw * Og + o
    cw = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cw < Cg
    k = tl.program_id(2) % K
    split = tl.program_id(2) // K
    acc = tl.zeros([BO, BC], dtype=tl.float32)
    for it in range(split * per_split, tl.minimum(split * per_split + per_split, n_it)):
        b = it // n_pb
        p = (it % n_pb) * BP + tl.arange(0, BP)
        pmask = p < P
        col = _sample_block(X, OFF, M, b, gw * Cg + cw, cmask, k, p, pmask, Cin, H, W, G, Cog, K, P, Wo, kw,
                            sh, sw, ph, pw, dh, dw, HAS_MASK)
        g_out = tl.load(dO + ((b * Cout + co).to(tl.int64) * P)[:, None] + p[None, :],
                        mask=omask[:, None] & pmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(g_out.to(tl.float32), col, input_precision="ieee")
        else:
            acc += tl.dot(g_out, col.to(dO.dtype.element_ty))
    dst = dW + split.to(tl.int64) * Cout * Cg * K + (co[:, None] * Cg + cw[None, :]) * K + k
    tl.store(dst, acc, mask=omask[:, None] & cmask[None, :])


@triton.jit
def _dc_bwd_input_kernel(dX, dCol, Start, Src, Wgt, Cin, HW, Cog, G, n_qb,
                         BQ: tl.constexpr, BC: tl.constexpr):
    """dinput[b, c, q] = sum over pixel q's pairs (in order) of w * dcol[b, k, p, c]."""
    pid = tl.program_id(0)
    bg = pid // n_qb  # (image, offset group)
    q = (pid % n_qb) * BQ + tl.arange(0, BQ)
    qmask = q < HW
    b = bg // G
    c = (bg % G) * Cog + tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = c < (bg % G) * Cog + Cog
    row = bg.to(tl.int64) * HW + q
    start = tl.load(Start + row, mask=qmask, other=0)
    end = tl.load(Start + row + 1, mask=qmask, other=0)
    acc = tl.zeros([BQ, BC], dtype=tl.float32)
    for e in range(0, tl.max(end - start, axis=0)):
        live = qmask & (start + e < end)
        src = tl.load(Src + start + e, mask=live, other=0)
        w = tl.load(Wgt + start + e, mask=live, other=0.0)
        d = tl.load(dCol + src[:, None] * Cin + c[None, :], mask=live[:, None] & cmask[None, :], other=0.0)
        acc += w[:, None] * d
    tl.store(dX + ((b * Cin + c).to(tl.int64) * HW)[None, :] + q[:, None], acc.to(dX.dtype.element_ty),
             mask=qmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------
# Launchers (same names and arguments as the registered ops)

# BP positions, BC input channels, BO output channels per block (tl.dot needs >= 16). The
# sampled [BP, BC] operand holds ~20 float32 temporaries per element (offsets, corners,
# weights): 64 x 16 of them keep 4 warps clear of spills. One pipeline stage fewer than
# Triton's default: the gathers gain nothing from deeper prefetch, and shared memory stays
# under the 99 KB of sm_86 / sm_89.
BLOCKS = dict(BP=64, BC=16, BO=64)
# float32 (IEEE, FMA rather than tensor cores: both dot operands live in registers):
# half the positions per block.
BLOCKS_FP32 = dict(BP=32, BC=16, BO=64)
LAUNCH = dict(num_warps=4, num_stages=2)
# The column-gradient kernel with 8 warps: with 4, ptxas gives the fp16/bf16 kernel without a
# mask 128 registers on sm_80 and spills (bench/compile_check.py); 8 warps take 62-80, no spill.
COL_LAUNCH = dict(LAUNCH, num_warps=8)
WEIGHT_PROGRAMS = 1024  # the weight gradient's sum is split until about this many programs run


def _blocks(dtype, blocks):
    return {**(BLOCKS_FP32 if dtype == torch.float32 else BLOCKS), **(blocks or {})}


def _sizes(input, offset, weight, stride, padding, dilation):
    B, Cin, H, W = input.shape
    Cout, Cg, kh, kw = weight.shape
    K = kh * kw
    Ho, Wo = offset.shape[2], offset.shape[3]
    G = offset.shape[1] // (2 * K)
    return dict(B=B, Cin=Cin, H=H, W=W, Cout=Cout, Cg=Cg, Og=Cout // (Cin // Cg), groups=Cin // Cg, K=K, kw=kw,
                Ho=Ho, Wo=Wo, P=Ho * Wo, G=G, Cog=Cin // G, sh=stride[0], sw=stride[1], ph=padding[0],
                pw=padding[1], dh=dilation[0], dw=dilation[1])


def _geometry(s):
    return (s["Cin"], s["H"], s["W"], s["Cout"], s["Cg"], s["Og"], s["Cog"], s["G"], s["K"], s["P"], s["Wo"],
            s["kw"], s["sh"], s["sw"], s["ph"], s["pw"], s["dh"], s["dw"])


def deform_conv2d_fwd(input, offset, weight, bias, mask, stride, padding, dilation, *, blocks: dict | None = None):
    """-> out (B, Cout, Ho, Wo) in input's dtype. ``blocks`` (BP, BC, BO: powers of 2 >= 16;
    default BLOCKS, BLOCKS_FP32 for float32) overrides the block sizes (tests use small ones to cross block borders)."""
    s = _sizes(input, offset, weight, stride, padding, dilation)
    out = input.new_empty((s["B"], s["Cout"], s["Ho"], s["Wo"]))
    if out.numel() == 0:
        return out
    bs = _blocks(input.dtype, blocks)
    n_pb = triton.cdiv(s["P"], bs["BP"])
    grid = (s["B"] * n_pb, triton.cdiv(s["Og"], bs["BO"]), s["groups"])
    _dc_fwd_kernel[grid](input, offset, mask if mask is not None else input, weight,
                         bias if bias is not None else input, out, *_geometry(s), n_pb,
                         HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
                         IEEE=input.dtype == torch.float32, **bs, **LAUNCH)
    return out


def _pixel_pairs(offset, mask, s):
    """The input gradient's pairs sorted by pixel: (start (B * G * HW + 1,), src (n,), w (n,)).
    Pair (image b, group g, kernel point k, position p, corner q) touches pixel (b, g, pix)
    with weight mask * bilinear weight and reads dcol row (b * K + k) * P + p. The sort is
    stable, so each pixel's pairs keep the order (k, p, q): a fixed summation order."""
    B, G, K, P, H, W = s["B"], s["G"], s["K"], s["P"], s["H"], s["W"]
    dev = offset.device
    off = offset.float().reshape(B, G, K, 2, P)
    pos = torch.arange(P, device=dev)
    k = torch.arange(K, device=dev)
    base_y = ((pos // s["Wo"]) * s["sh"] - s["ph"])[None, :] + ((k // s["kw"]) * s["dh"])[:, None]  # (K, P)
    base_x = ((pos % s["Wo"]) * s["sw"] - s["pw"])[None, :] + ((k % s["kw"]) * s["dw"])[:, None]
    y = base_y.float() + off[:, :, :, 0]  # (B, G, K, P)
    x = base_x.float() + off[:, :, :, 1]
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    y = torch.where(inside, y, 0.0)
    x = torch.where(inside, x, 0.0)
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    m = mask.float().reshape(B, G, K, P) if mask is not None else torch.ones_like(ly)
    y0, x0 = y0.long(), x0.long()
    keys, weights = [], []
    for dy, dx, w in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        ok = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        bg = torch.arange(B * G, device=dev).reshape(B, G, 1, 1)
        keys.append(torch.where(ok, bg * (H * W) + yy * W + xx, B * G * H * W))  # invalid: after every pixel
        weights.append(m * w)
    keys = torch.stack(keys, -1).reshape(-1)  # order (b, g, k, p, q)
    weights = torch.stack(weights, -1).reshape(-1)
    rows = (torch.arange(B, device=dev).reshape(B, 1, 1, 1) * K + k.reshape(1, 1, K, 1)) * P + pos
    src = rows.expand(B, G, K, P).unsqueeze(-1).expand(B, G, K, P, 4).reshape(-1)
    sorted_keys, order = torch.sort(keys, stable=True)
    start = torch.searchsorted(sorted_keys, torch.arange(B * G * H * W + 1, device=dev))
    return start.contiguous(), src[order].contiguous(), weights[order].contiguous()


def deform_conv2d_bwd(dout, input, offset, weight, mask, stride, padding, dilation, *, blocks: dict | None = None):
    """-> (dinput, doffset, dweight, dmask) in input's dtype (dmask empty without a mask)."""
    s = _sizes(input, offset, weight, stride, padding, dilation)
    dinput, doffset = torch.empty_like(input), torch.empty_like(offset)
    dweight = torch.zeros_like(weight)
    dmask = torch.empty_like(mask) if mask is not None else input.new_empty(0)
    if s["B"] == 0:
        return dinput, doffset, dweight, dmask
    bs = _blocks(input.dtype, blocks)
    ieee = input.dtype == torch.float32
    m = mask if mask is not None else input
    geo = _geometry(s)
    n_pb = triton.cdiv(s["P"], bs["BP"])
    dcol = torch.empty((s["B"], s["K"], s["P"], s["Cin"]), device=input.device, dtype=torch.float32)
    _dc_bwd_col_kernel[(s["B"] * n_pb, s["G"], s["K"])](
        input, offset, m, weight, dout, dcol, doffset, dmask if mask is not None else doffset, *geo, n_pb,
        HAS_MASK=mask is not None, IEEE=ieee, **bs, **COL_LAUNCH)
    n_ob = triton.cdiv(s["Og"], bs["BO"])
    if s["Og"] > 0:
        # The sum over images and positions in `splits` parts (enough programs to fill a GPU;
        # a function of the shapes only, so the order of the sums is fixed), added in order.
        grid = (s["groups"] * n_ob, triton.cdiv(s["Cg"], bs["BC"]), s["K"])
        n_it = s["B"] * n_pb
        splits = max(1, min(n_it, WEIGHT_PROGRAMS // (grid[0] * grid[1] * grid[2]), 65535 // s["K"]))
        per_split = triton.cdiv(n_it, splits)
        splits = triton.cdiv(n_it, per_split)
        partial = torch.empty((splits, *weight.shape), device=input.device, dtype=torch.float32)
        _dc_bwd_weight_kernel[(grid[0], grid[1], s["K"] * splits)](
            dout, partial, input, offset, m, *geo, n_ob, n_pb, n_it, per_split, HAS_MASK=mask is not None,
            IEEE=ieee, **bs, **LAUNCH)
        dweight = partial.sum(0).to(weight.dtype)
    start, src, wgt = _pixel_pairs(offset, mask, s)
    BQ = 32
    n_qb = triton.cdiv(s["H"] * s["W"], BQ)
    _dc_bwd_input_kernel[(s["B"] * s["G"] * n_qb, triton.cdiv(s["Cog"], bs["BC"]))](
        dinput, dcol, start, src, wgt, s["Cin"], s["H"] * s["W"], s["Cog"], s["G"], n_qb, BQ=BQ, BC=bs["BC"])
    return dinput, doffset, dweight, dmask
