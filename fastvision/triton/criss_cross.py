"""Triton kernels for criss-cross attention (CCNet), NCHW.

query, key (B, Cqk, H, W); value (B, C, H, W). Query (h, w) attends to the
keys of its column (i, w), i != h, and of its row (h, j), every j, in one
softmax over the H + W logits q . k (the oracle is
``fastvision.reference.criss_cross``).

Every kernel works on a block of BW consecutive positions w of one row
(contiguous in NCHW) against blocks of BK partners; a (partner, w) pair's
address is one 2-D offset tile, so the column part (partner (i, w): the
same w) and the row part (partner (h, j): every w sees the same j) are the
same code with different offsets. Channel sums run over channel chunks as
broadcast products of [chunk, BK, BW] tiles (the column part has no matrix
product to give tl.dot).

Forward (``_cc_fwd_kernel``, one program per (batch, row h, w block,
value-channel block)): online softmax over the column blocks then the row
blocks (running max and sum per query, the accumulator rescaled), out =
acc / sum; the program of channel block 0 writes lse = max + log(sum). No
(B, H, W, H + W) tensor is stored; each value-channel block recomputes the
logits (cheap next to the value sums when Cqk << C, as in CCNet: C / 8).

Backward (P = exp(E - lse), Delta = sum_c dout * out, dS = P (dP - Delta)),
deterministic, no atomics: every program owns the gradient elements it
writes.
    ``_cc_bwd_dq_kernel``: per (batch, query row, w block, query-channel
    block): dquery from the query's row and column.
    ``_cc_bwd_dkdv_kernel``: per (batch, key row i, w block, channel block):
    the queries that see key (i, w) are its column (h, w), h != i, and its
    row (i, w'), every w'; dkey and dvalue are gathered from both.

Runs on CPU tensors under TRITON_INTERPRET=1 as well; nothing newer than
triton 3.6 is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["criss_cross_fwd", "criss_cross_bwd"]


@triton.jit
def _pair_dot(X, xoff, Y, yoff, valid, n, HW, BK: tl.constexpr, BW: tl.constexpr, BCH: tl.constexpr):
    """[BK, BW] sums over n channels of X[c * HW + xoff] * Y[c * HW + yoff] (0 where not valid)."""
    acc = tl.zeros([BK, BW], dtype=tl.float32)
    for c0 in range(0, n, BCH):
        c = c0 + tl.arange(0, BCH)
        step = (c.to(tl.int64) * HW)[:, None, None]
        m = (c < n)[:, None, None] & valid[None, :, :]
        x = tl.load(X + step + xoff[None, :, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(Y + step + yoff[None, :, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, axis=0)
    return acc


@triton.jit
def _weighted(acc, weight, X, off, valid, c, cmask, HW):
    """acc[c, w] + sum_k weight[k, w] * X[c * HW + off[k, w]] for the channels c."""
    step = (c.to(tl.int64) * HW)[:, None, None]
    x = tl.load(X + step + off[None, :, :], mask=cmask[:, None, None] & valid[None, :, :], other=0.0)
    return acc + tl.sum(weight[None, :, :] * x.to(tl.float32), axis=1)


@triton.jit
def _column_keys(k0, h, w, wmask, H, W, BK: tl.constexpr):
    """Offsets and validity of column partners (i, w), i in [k0, k0 + BK), i != h."""
    i = k0 + tl.arange(0, BK)
    off = i[:, None] * W + w[None, :]
    valid = (i < H)[:, None] & wmask[None, :] & (i != h)[:, None]
    return off, valid


@triton.jit
def _row_keys(k0, h, w, wmask, W, BK: tl.constexpr):
    """Offsets and validity of row partners (h, j), j in [k0, k0 + BK), for every w."""
    j = k0 + tl.arange(0, BK)
    off = h * W + j[:, None] + 0 * w[None, :]
    valid = (j < W)[:, None] & wmask[None, :]
    return off, valid


@triton.jit
def _online(e, valid, m, l, acc, V, voff, c, cmask, HW):
    """One online-softmax step over a [BK, BW] block of logits."""
    e = tl.where(valid, e, float("-inf"))
    m_new = tl.maximum(m, tl.max(e, axis=0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked block so far: no NaN
    alpha = tl.exp(m - m_use)
    p = tl.where(valid, tl.exp(e - m_use[None, :]), 0.0)
    l = l * alpha + tl.sum(p, axis=0)
    acc = _weighted(acc * alpha[None, :], p, V, voff, valid, c, cmask, HW)
    return m_new, l, acc


@triton.jit
def _cc_fwd_kernel(Q, K, V, Out, Lse, Cqk, C, H, W, n_wb,
                   BW: tl.constexpr, BK: tl.constexpr, BCH: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    wb = pid % n_wb
    h = (pid // n_wb) % H
    b = (pid // n_wb // H).to(tl.int64)
    HW = H * W
    w = wb * BW + tl.arange(0, BW)
    wmask = w < W
    Qb, Kb = Q + b * Cqk * HW, K + b * Cqk * HW
    Vb, Ob = V + b * C * HW, Out + b * C * HW
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < C
    m = tl.full([BW], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BW], dtype=tl.float32)
    acc = tl.zeros([BC, BW], dtype=tl.float32)
    qoff = h * W + w[None, :] + 0 * tl.arange(0, BK)[:, None]
    for k0 in range(0, H, BK):
        off, valid = _column_keys(k0, h, w, wmask, H, W, BK)
        e = _pair_dot(Qb, qoff, Kb, off, valid, Cqk, HW, BK, BW, BCH)
        m, l, acc = _online(e, valid, m, l, acc, Vb, off, c, cmask, HW)
    for k0 in range(0, W, BK):
        off, valid = _row_keys(k0, h, w, wmask, W, BK)
        e = _pair_dot(Qb, qoff, Kb, off, valid, Cqk, HW, BK, BW, BCH)
        m, l, acc = _online(e, valid, m, l, acc, Vb, off, c, cmask, HW)
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc / l_safe[None, :]
    step = (c.to(tl.int64) * HW)[:, None]
    tl.store(Ob + step + (h * W + w)[None, :], out.to(Out.dtype.element_ty),
             mask=cmask[:, None] & wmask[None, :])
    if pid_c == 0:
        tl.store(Lse + b * HW + h * W + w, m + tl.log(l_safe), mask=wmask)


@triton.jit
def _dscores(Qb, qoff, Kb, koff, dOb, Vb, valid, lse, delta, Cqk, C, HW,
             BK: tl.constexpr, BW: tl.constexpr, BCH: tl.constexpr):
    """P and dS of a [BK, BW] block of (query, key) pairs at offsets qoff / koff."""
    e = _pair_dot(Qb, qoff, Kb, koff, valid, Cqk, HW, BK, BW, BCH)
    p = tl.where(valid, tl.exp(e - lse), 0.0)
    dp = _pair_dot(dOb, qoff, Vb, koff, valid, C, HW, BK, BW, BCH)
    return p, p * (dp - delta)


@triton.jit
def _cc_bwd_dq_kernel(Q, K, V, dO, Lse, Delta, dQ, Cqk, C, H, W, n_wb,
                      BW: tl.constexpr, BK: tl.constexpr, BCH: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    wb = pid % n_wb
    h = (pid // n_wb) % H
    b = (pid // n_wb // H).to(tl.int64)
    HW = H * W
    w = wb * BW + tl.arange(0, BW)
    wmask = w < W
    Qb, Kb = Q + b * Cqk * HW, K + b * Cqk * HW
    Vb, dOb = V + b * C * HW, dO + b * C * HW
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < Cqk
    lse = tl.load(Lse + b * HW + h * W + w, mask=wmask, other=0.0)[None, :]
    delta = tl.load(Delta + b * HW + h * W + w, mask=wmask, other=0.0)[None, :]
    qoff = h * W + w[None, :] + 0 * tl.arange(0, BK)[:, None]
    acc = tl.zeros([BC, BW], dtype=tl.float32)
    for k0 in range(0, H, BK):
        off, valid = _column_keys(k0, h, w, wmask, H, W, BK)
        p, ds = _dscores(Qb, qoff, Kb, off, dOb, Vb, valid, lse, delta, Cqk, C, HW, BK, BW, BCH)
        acc = _weighted(acc, ds, Kb, off, valid, c, cmask, HW)
    for k0 in range(0, W, BK):
        off, valid = _row_keys(k0, h, w, wmask, W, BK)
        p, ds = _dscores(Qb, qoff, Kb, off, dOb, Vb, valid, lse, delta, Cqk, C, HW, BK, BW, BCH)
        acc = _weighted(acc, ds, Kb, off, valid, c, cmask, HW)
    step = (c.to(tl.int64) * HW)[:, None]
    tl.store(dQ + b * Cqk * HW + step + (h * W + w)[None, :], acc.to(dQ.dtype.element_ty),
             mask=cmask[:, None] & wmask[None, :])


@triton.jit
def _cc_bwd_dkdv_kernel(Q, K, V, dO, Lse, Delta, dK, dV, Cqk, C, H, W, n_wb,
                        BW: tl.constexpr, BK: tl.constexpr, BCH: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    wb = pid % n_wb
    i = (pid // n_wb) % H  # the key row
    b = (pid // n_wb // H).to(tl.int64)
    HW = H * W
    w = wb * BW + tl.arange(0, BW)
    wmask = w < W
    Qb, Kb = Q + b * Cqk * HW, K + b * Cqk * HW
    Vb, dOb = V + b * C * HW, dO + b * C * HW
    Lb, Db = Lse + b * HW, Delta + b * HW
    c = pid_c * BC + tl.arange(0, BC)
    vmask = c < C
    kmask = c < Cqk
    koff = i * W + w[None, :] + 0 * tl.arange(0, BK)[:, None]
    dk = tl.zeros([BC, BW], dtype=tl.float32)
    dv = tl.zeros([BC, BW], dtype=tl.float32)
    # Column queries (h, w), h != i: the same offset arithmetic as column keys.
    for q0 in range(0, H, BK):
        qoff, valid = _column_keys(q0, i, w, wmask, H, W, BK)
        lse = tl.load(Lb + qoff, mask=valid, other=0.0)
        delta = tl.load(Db + qoff, mask=valid, other=0.0)
        p, ds = _dscores(Qb, qoff, Kb, koff, dOb, Vb, valid, lse, delta, Cqk, C, HW, BK, BW, BCH)
        dv = _weighted(dv, p, dOb, qoff, valid, c, vmask, HW)
        dk = _weighted(dk, ds, Qb, qoff, valid, c, kmask, HW)
    # Row queries (i, w'), every w'.
    for q0 in range(0, W, BK):
        qoff, valid = _row_keys(q0, i, w, wmask, W, BK)
        lse = tl.load(Lb + qoff, mask=valid, other=0.0)
        delta = tl.load(Db + qoff, mask=valid, other=0.0)
        p, ds = _dscores(Qb, qoff, Kb, koff, dOb, Vb, valid, lse, delta, Cqk, C, HW, BK, BW, BCH)
        dv = _weighted(dv, p, dOb, qoff, valid, c, vmask, HW)
        dk = _weighted(dk, ds, Qb, qoff, valid, c, kmask, HW)
    step = (c.to(tl.int64) * HW)[:, None]
    pos = (i * W + w)[None, :]
    tl.store(dV + b * C * HW + step + pos, dv.to(dV.dtype.element_ty), mask=vmask[:, None] & wmask[None, :])
    tl.store(dK + b * Cqk * HW + step + pos, dk.to(dK.dtype.element_ty), mask=kmask[:, None] & wmask[None, :])


# --------------------------------------------------------------------------
# Launchers (same names and arguments as the registered ops)


# Block sizes: BW positions per program, BK partners per step, BCH channels per
# logit chunk, BC output channels per program (powers of 2; no tl.dot, so no
# minimum of 16). Narrow position blocks leave room for wide channel blocks:
# the [BC, BK, BW] = [64, 8, 8] value tiles keep the logits' recomputation per
# channel block (Cqk / BC of the value work) small for CCNet's Cqk = C / 8.
BLOCKS = dict(BW=8, BK=8, BCH=32, BC=64)
# The dk/dv kernel holds a key block's dk and dv accumulators and the query-side tiles: at
# 4 warps it needs more than 255 registers on sm_80 and spills 140-144 B (bench/compile_check.py);
# 8 warps take 215-222 registers, no spill, on sm_80 and sm_90.
DKDV_WARPS = 8


def criss_cross_fwd(query, key, value, *, blocks: dict | None = None):
    """-> (out (B, C, H, W) in query's dtype, lse (B, H, W) float32).

    ``blocks`` (BW, BK, BCH, BC: powers of 2; default BLOCKS)
    overrides the block sizes (tests use small ones to cross block borders)."""
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    B, Cqk, H, W = query.shape
    C = value.shape[1]
    out = torch.empty_like(value)
    lse = torch.empty((B, H, W), device=query.device, dtype=torch.float32)
    if B * H * W == 0:
        return out, lse
    bs = {**BLOCKS, **(blocks or {})}
    n_wb = triton.cdiv(W, bs["BW"])
    grid = (B * H * n_wb, max(1, triton.cdiv(C, bs["BC"])))
    _cc_fwd_kernel[grid](query, key, value, out, lse, Cqk, C, H, W, n_wb, **bs)
    return out, lse


def criss_cross_bwd(dout, query, key, value, out, lse, *, blocks: dict | None = None):
    """-> (dquery, dkey, dvalue) in the inputs' dtypes; ``blocks`` as for the forward."""
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.float().contiguous()
    B, Cqk, H, W = query.shape
    C = value.shape[1]
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    if B * H * W == 0:
        return dq, dk, dv
    delta = (dout.float() * out.float()).sum(1).contiguous()  # (B, H, W): sum_j P dP
    bs = {**BLOCKS, **(blocks or {})}
    n_wb = triton.cdiv(W, bs["BW"])
    _cc_bwd_dq_kernel[(B * H * n_wb, max(1, triton.cdiv(Cqk, bs["BC"])))](
        query, key, value, dout, lse, delta, dq, Cqk, C, H, W, n_wb, **bs)
    _cc_bwd_dkdv_kernel[(B * H * n_wb, max(1, triton.cdiv(max(C, Cqk), bs["BC"])))](
        query, key, value, dout, lse, delta, dk, dv, Cqk, C, H, W, n_wb, **bs, num_warps=DKDV_WARPS)
    return dq, dk, dv
