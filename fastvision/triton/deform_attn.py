"""Triton kernels for multi-scale deformable attention (Deformable DETR).

value (N, S, M, D); level tables value_spatial_shapes (L, 2) and
value_level_start_index (L,) (int64, read by the kernels on the device: no
host sync); sampling_locations (N, Lq, M, L, P, 2) as (x, y); attention_weights
(N, Lq, M, L, P); out (N, Lq, M * D). The oracle is
``fastvision.reference.deform_attn``; the bilinear rule is
``fastvision.triton._bilinear`` (zeros outside, pixel x W - 0.5, y H - 0.5).

Every program owns a block of BLOCK_Q (batch, query) rows of one head, as
[BLOCK_Q, BLOCK_D] tiles (a corner's D channels are contiguous in value).
Every value read is masked to the positions [0, S) of its batch element, so
level tables that do not tile value (direct calls of the op, not checked on
CUDA) read wrong values, never outside value.

Forward (``_msda_fwd_kernel``): the sum over levels and points of the weighted
bilinear samples, accumulated in float32.

Backward (``_msda_bwd_sample_kernel``, same programs): each sample's location and
weight gradients (gathers only: the sample's four corners against its dout
row). The value gradient is a scatter of w_k * a * dout to the corners:

* by default float32 atomics into a (N, S, M, D) buffer (as the anchor's CUDA
  kernel does);
* under torch.use_deterministic_algorithms(True) the kernel writes each
  (sample, corner)'s destination row and coefficient instead; the launcher
  sorts them by destination (stable: sample order within a row), and
  ``_msda_dvalue_gather_kernel`` sums every value row's contributions in that
  order: bit-identical runs.

Runs on CPU tensors under TRITON_INTERPRET=1 as well; nothing newer than
triton 3.6 is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bilinear import bilinear_coordinate_grads, bilinear_corners, bilinear_weights

__all__ = ["ms_deform_attn_fwd", "ms_deform_attn_bwd"]

MAX_TILE = 512  # BLOCK_Q * BLOCK_D: the dout tile and four corner tiles stay in registers


def _blocks(D: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_D): up to 16 query rows, fewer for wide heads."""
    block_d = triton.next_power_of_2(max(D, 1))
    return max(1, min(16, MAX_TILE // block_d)), block_d


@triton.jit
def _corner_rows(n, start, y0, x0, H, W, S, M, m, m0, m1, m2, m3, rmask):
    """Value row indexes ((n * S + pixel) * M + m, int64) of the four corners and their
    masks: valid corner, live query row, pixel inside [0, S)."""
    top = start + y0.to(tl.int64) * W + x0
    pix0, pix1, pix2, pix3 = top, top + 1, top + W, top + W + 1
    v0 = m0 & rmask & (pix0 >= 0) & (pix0 < S)
    v1 = m1 & rmask & (pix1 >= 0) & (pix1 < S)
    v2 = m2 & rmask & (pix2 >= 0) & (pix2 < S)
    v3 = m3 & rmask & (pix3 >= 0) & (pix3 < S)
    base = n * S
    return ((base + pix0) * M + m, (base + pix1) * M + m, (base + pix2) * M + m, (base + pix3) * M + m,
            v0, v1, v2, v3)


@triton.jit
def _sample_point(loc, attn, shapes, starts, rows, rmask, n, S, M, m, l, p, L, P):
    """One sampling point (level l, point p) of every row: its flat index, attention
    weight, level size, bilinear state and corner rows/masks."""
    H = tl.load(shapes + 2 * l)
    W = tl.load(shapes + 2 * l + 1)
    start = tl.load(starts + l)
    i = ((rows * M + m) * L + l) * P + p
    x = tl.load(loc + 2 * i, mask=rmask, other=0.0).to(tl.float32) * W.to(tl.float32) - 0.5
    y = tl.load(loc + 2 * i + 1, mask=rmask, other=0.0).to(tl.float32) * H.to(tl.float32) - 0.5
    a = tl.load(attn + i, mask=rmask, other=0.0).to(tl.float32)
    y0, x0, ly, lx, m0, m1, m2, m3 = bilinear_corners(y, x, H, W)
    r0, r1, r2, r3, v0, v1, v2, v3 = _corner_rows(n, start, y0, x0, H, W, S, M, m, m0, m1, m2, m3, rmask)
    return i, a, H, W, ly, lx, r0, r1, r2, r3, v0, v1, v2, v3


@triton.jit
def _load_rows(value, r, v, d, dmask, D):
    return tl.load(value + r[:, None] * D + d[None, :], mask=v[:, None] & dmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _program_rows(NLq, Lq, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's head m, its BLOCK_Q flat (batch, query) rows (int64), their mask and
    batch index, and the channel offsets d and their mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    return tl.program_id(1), rows, rows < NLq, rows // Lq, d, d < D


@triton.jit
def _msda_fwd_kernel(value, shapes, starts, loc, attn, out, NLq, Lq, S, M, D, L, P,
                     BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    m, rows, rmask, n, d, dmask = _program_rows(NLq, Lq, D, BLOCK_Q, BLOCK_D)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for l in range(L):
        for p in range(P):
            i, a, H, W, ly, lx, r0, r1, r2, r3, v0, v1, v2, v3 = _sample_point(
                loc, attn, shapes, starts, rows, rmask, n, S, M, m, l, p, L, P)
            w0, w1, w2, w3 = bilinear_weights(ly, lx, v0, v1, v2, v3)
            acc += (w0 * a)[:, None] * _load_rows(value, r0, v0, d, dmask, D)
            acc += (w1 * a)[:, None] * _load_rows(value, r1, v1, d, dmask, D)
            acc += (w2 * a)[:, None] * _load_rows(value, r2, v2, d, dmask, D)
            acc += (w3 * a)[:, None] * _load_rows(value, r3, v3, d, dmask, D)
    o = out + (rows * M + m)[:, None] * D + d[None, :]
    tl.store(o, acc.to(out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _scatter_corner(dvalue, keys, coefs, e, r, v, c, g, d, dmask, D, none, rmask, DETERMINISTIC: tl.constexpr):
    """Corner e of a sample: atomics into dvalue, or (deterministic) its row (`none` for
    a corner that reads nothing) and coefficient."""
    if DETERMINISTIC:
        tl.store(keys + e, tl.where(v, r, none), mask=rmask)
        tl.store(coefs + e, c, mask=rmask)
    else:
        tl.atomic_add(dvalue + r[:, None] * D + d[None, :], c[:, None] * g, mask=v[:, None] & dmask[None, :])


@triton.jit
def _msda_bwd_sample_kernel(dout, value, shapes, starts, loc, attn, dloc, dattn, dvalue, keys, coefs,
                            NLq, Lq, S, M, D, L, P, none, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                            DETERMINISTIC: tl.constexpr):
    m, rows, rmask, n, d, dmask = _program_rows(NLq, Lq, D, BLOCK_Q, BLOCK_D)
    g = _load_rows(dout, rows * M + m, rmask, d, dmask, D)
    for l in range(L):
        for p in range(P):
            i, a, H, W, ly, lx, r0, r1, r2, r3, v0, v1, v2, v3 = _sample_point(
                loc, attn, shapes, starts, rows, rmask, n, S, M, m, l, p, L, P)
            g0 = tl.sum(g * _load_rows(value, r0, v0, d, dmask, D), axis=1)
            g1 = tl.sum(g * _load_rows(value, r1, v1, d, dmask, D), axis=1)
            g2 = tl.sum(g * _load_rows(value, r2, v2, d, dmask, D), axis=1)
            g3 = tl.sum(g * _load_rows(value, r3, v3, d, dmask, D), axis=1)
            w0, w1, w2, w3 = bilinear_weights(ly, lx, v0, v1, v2, v3)
            gy, gx = bilinear_coordinate_grads(g0, g1, g2, g3, ly, lx)
            tl.store(dattn + i, (w0 * g0 + w1 * g1 + w2 * g2 + w3 * g3).to(dattn.dtype.element_ty), mask=rmask)
            # d pixel / d location: x W - 0.5, y H - 0.5.
            tl.store(dloc + 2 * i, (a * gx * W.to(tl.float32)).to(dloc.dtype.element_ty), mask=rmask)
            tl.store(dloc + 2 * i + 1, (a * gy * H.to(tl.float32)).to(dloc.dtype.element_ty), mask=rmask)
            e = 4 * i
            _scatter_corner(dvalue, keys, coefs, e, r0, v0, w0 * a, g, d, dmask, D, none, rmask, DETERMINISTIC)
            _scatter_corner(dvalue, keys, coefs, e + 1, r1, v1, w1 * a, g, d, dmask, D, none, rmask, DETERMINISTIC)
            _scatter_corner(dvalue, keys, coefs, e + 2, r2, v2, w2 * a, g, d, dmask, D, none, rmask, DETERMINISTIC)
            _scatter_corner(dvalue, keys, coefs, e + 3, r3, v3, w3 * a, g, d, dmask, D, none, rmask, DETERMINISTIC)


@triton.jit
def _msda_dvalue_gather_kernel(dout, order, coefs, bounds, dvalue, LP, D, BLOCK_D: tl.constexpr):
    """Value row r: the sum, in sorted order, of coef * dout row of its contributions
    (order[bounds[r]:bounds[r + 1]] are (sample, corner) indexes e; sample e // 4 has
    dout row e // 4 // LP)."""
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    lo = tl.load(bounds + r)
    hi = tl.load(bounds + r + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(lo, hi):
        e = tl.load(order + j)
        c = tl.load(coefs + e)
        acc += c * tl.load(dout + (e // 4 // LP) * D + d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(dvalue + r * D + d, acc.to(dvalue.dtype.element_ty), mask=dmask)


def _sizes(value, loc):
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    return N, S, M, D, Lq, L, P


def _grid(N, Lq, M, block_q):
    return (triton.cdiv(N * Lq, block_q), M)


def ms_deform_attn_fwd(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights):
    """-> out (N, Lq, M * D) in value's dtype."""
    N, S, M, D, Lq, L, P = _sizes(value, sampling_locations)
    out = value.new_empty((N, Lq, M * D))
    if out.numel() == 0:
        return out.zero_()
    block_q, block_d = _blocks(D)
    _msda_fwd_kernel[_grid(N, Lq, M, block_q)](value, value_spatial_shapes, value_level_start_index,
                                               sampling_locations, attention_weights, out, N * Lq, Lq, S, M, D, L, P,
                                               BLOCK_Q=block_q, BLOCK_D=block_d)
    return out


def ms_deform_attn_bwd(dout, value, value_spatial_shapes, value_level_start_index, sampling_locations,
                       attention_weights):
    """-> (dvalue, dsampling_locations, dattention_weights) in the inputs' dtypes."""
    N, S, M, D, Lq, L, P = _sizes(value, sampling_locations)
    dloc = torch.zeros_like(sampling_locations)
    dattn = torch.zeros_like(attention_weights)
    if N * Lq * M * L * P == 0 or D == 0:
        return torch.zeros_like(value), dloc, dattn
    deterministic = torch.are_deterministic_algorithms_enabled()
    f32 = dict(device=value.device, dtype=torch.float32)
    samples = N * Lq * M * L * P
    if deterministic:
        dvalue = torch.empty_like(value)
        keys = torch.empty(4 * samples, device=value.device, dtype=torch.int64)
        coefs = torch.empty(4 * samples, **f32)
    else:
        dvalue = torch.zeros(value.shape, **f32)
        keys = coefs = dvalue  # unused
    block_q, block_d = _blocks(D)
    _msda_bwd_sample_kernel[_grid(N, Lq, M, block_q)](dout, value, value_spatial_shapes, value_level_start_index,
                                                      sampling_locations, attention_weights, dloc, dattn, dvalue,
                                                      keys, coefs, N * Lq, Lq, S, M, D, L, P, N * S * M,
                                                      BLOCK_Q=block_q, BLOCK_D=block_d,
                                                      DETERMINISTIC=deterministic)
    if not deterministic:
        return dvalue.to(value.dtype), dloc, dattn
    rows = N * S * M
    if rows == 0:
        return dvalue, dloc, dattn
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(rows + 1, device=value.device, dtype=torch.int64))
    _msda_dvalue_gather_kernel[(rows,)](dout, order, coefs, bounds, dvalue, L * P, D, BLOCK_D=block_d)
    return dvalue, dloc, dattn
