"""Triton kernels for neighborhood attention (NA) and dilated NA, 1-D to 3-D.

Layout is NATTEN's, heads last: query (B, *spatial, H, D), key (B, *spatial,
Hkv, D), value (B, *spatial, Hkv, Dv); query head h reads kv head
h // (H // Hkv). Each query attends to the keys of its window, the product of
per-axis windows given by NATTEN's rule (``_window`` below; the oracle is
``fastvision.reference.neighborhood``).

Everything is written for three spatial axes; fewer axes are leading axes of
length 1 (window 1, dilation 1), and the ``NDIM`` constexpr drops their masks.

Tiling and dilation
    A query tile is a TQ0 x TQ1 x TQ2 box of one dilation group, in group
    coordinates: per axis, group g holds the positions g, g + d, g + 2d, ...
    and group coordinate c is position c * d + g. Tiles index memory with
    this arithmetic directly, so dilation needs no permutation copy. The
    window rule runs in group coordinates on the group's length
    L // d + (g < L % d). Window start and end are non-decreasing in the query
    index, so per axis the union of a tile's windows lies in
    [start(first query), end(last query)); that box is the tile's key region,
    walked in TK0 x TK1 x TK2 key blocks. Masks come from the rule: key c is
    attended by query i iff start(i) <= c < end(i) on every axis.

Forward
    Flash-style online softmax in base 2 over the key blocks of the region,
    QK^T and PV with tl.dot (head dims padded to a power of two >= 16 with
    masks; Dv may differ from D). Writes out and the float32 logsumexp.

Backward (recomputes P; no k^d-sized tensor is stored)
    ``_na_bwd_dq_kernel``: over query tiles, like the forward, in two passes
    over the key blocks. Pass 1 recomputes each row's max logit m, its
    normaliser l and the key of the max (argmax), then Delta_i =
    rowsum(dout_i * out_i) and dS at the argmax, P_max (dP_max - Delta +
    dlse) with P_max = 1 / l and dP_max by the same rowsum over that key's
    value row. Pass 2: P = exp2(S - m) / l, dS = P (dP - Delta + dlse) (the
    argmax's from pass 1), dq = scale dS K; drpb is accumulated there with
    atomic adds into a float32 buffer of partials, one (H, R) table per
    batch element (summed by the launcher). The row statistics go to a
    buffer for the next kernel.
    ``_na_bwd_dkdv_kernel``: over key tiles of one kv head. The queries whose
    windows meet a key tile form, per axis, the range [first i with
    end(i) > first key, first i with start(i) > last key), found by binary
    search on the (monotone) rule; the program walks that region in query
    blocks for every query head of its GQA group and owns its dk/dv rows, so
    no atomics are needed for dk/dv. P and dS come from the rows' statistics;
    at each row's argmax it takes P_max and dS_max as the dq kernel stored
    them.

Saturated softmax (one logit far above the rest, e.g. logits ~1e3-1e4)
    The exact gradient at the max key is then tiny, and autograd through the
    reference gets it exactly (P_max == 1, dP_max == Delta). tl.dot in
    different kernels or tile shapes rounds the logits differently (by
    ~ulp(S): 1e-3 at 1e4), and the forward's lse is rounded too, so a P
    recomputed as exp(S - lse) would be off by that much at the max key, and
    dS there by that times dP. So the normaliser is recomputed from the dq
    kernel's own logits (the max weight is exp2(0) = 1 exactly, and l == 1 in
    a saturated row), Delta and dP_max are the same rowsum of equal rows
    (out == v_max there), and the dk/dv kernel takes the max key's P and dS
    from the dq kernel instead of its own logits. Where the other keys'
    weights are not negligible, their P carry the usual ~ulp(S) rounding
    (as the reference's do).

Registers (no spills in the fp16/bf16 configurations at head dims 32-128;
bench/compile_check.py)
    The rpb tables go to the kernels reversed, so that the gather's index
    grows along the query rows (``_rpb_index``); the dq kernel keeps its
    pass-1 argmax as an int32 position in its key walk (the key/value row
    index, int64, is formed once after the pass) and runs one pipeline stage
    in fp16/bf16 (8 warps with rpb); every launch has ``maxnreg=255`` (no
    register squeeze for occupancy).

inf and NaN in the inputs reach what they reach in the reference: masked
logits are replaced by -inf before use. The products whose left factor is a
masked-out zero (P V, dS K, P^T dO, dS^T Q) would still spread an inf or NaN
of a row the other row does not attend (0 * inf = NaN), so every kernel runs
twice: the main launch (SAFE=False) uses plain dots and flags each program
whose right-hand operands held inf or NaN; the second (SAFE=True) exits at
once for unflagged programs and recomputes the flagged ones with
_masked_dot's exact path. The rare path's tiles then cost the main kernels no
registers (they spilled with it inline).

Runs on CPU tensors under TRITON_INTERPRET=1 as well; nothing newer than
triton 3.6 is used.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["na_fwd", "na_bwd"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------
# Device helpers: the window rule and tile set-up
# --------------------------------------------------------------------------


@triton.jit
def _group_len(L, dil, g):
    """Length of dilation group g on an axis of length L."""
    return L // dil + (g < L % dil).to(tl.int32)


@triton.jit
def _window(i, L, k, s, CAUSAL: tl.constexpr):
    """[start, end) of query i's window in group coordinates, group length L.

    NATTEN's rule: left = k // 2, right = k // 2 + k % 2 - 1. Non-causal: the
    window of the stride group's leader, full size k, shifted inward at the
    borders. Causal: from the leader's start up to the query itself.
    """
    left = k // 2
    right = k // 2 + k % 2 - 1
    base = (i // s) * s
    if CAUSAL:
        leader = tl.minimum(base + s - 1, L - 1)
        start = tl.maximum(leader - left - right, 0)
        end = tl.minimum(i + 1, L)
    else:
        leader = tl.minimum(base + s // 2, L - 1)
        start = tl.maximum(leader - left, 0) + tl.where(leader + right >= L, L - right - leader - 1, 0)
        end = start + k
    return start, end


@triton.jit
def _query_axis(t, g, L, dil, k, s, local, TQ: tl.constexpr, CAUSAL: tl.constexpr):
    """One axis of a query tile: tile t of group g, rows at ``local``.

    Returns the rows' group coordinates, validity and window [ws, we), and
    the tile's key region [ks, ke) (empty when the tile is past the group).
    """
    Lg = _group_len(L, dil, g)
    first = t * TQ
    last = tl.minimum(first + TQ, Lg) - 1
    qg = first + local
    ws, we = _window(qg, Lg, k, s, CAUSAL)
    ks, _ = _window(first, Lg, k, s, CAUSAL)
    _, ke = _window(last, Lg, k, s, CAUSAL)
    ke = tl.where(first < Lg, ke, ks)
    return qg, qg < Lg, ws, we, ks, ke


@triton.jit
def _first_query(j, Lg, k, s, n_iter, BY_END: tl.constexpr, CAUSAL: tl.constexpr):
    """Smallest query i in [0, Lg] with end(i) > j (BY_END) or start(i) > j.

    Both are non-decreasing in i, so a binary search of n_iter >= log2(Lg + 1)
    steps finds it; Lg when there is none.
    """
    lo = Lg * 0
    hi = Lg
    for _ in range(0, n_iter):
        mid = (lo + hi) // 2
        start, end = _window(mid, Lg, k, s, CAUSAL)
        if BY_END:
            hit = end > j
            miss = end <= j
        else:
            hit = start > j
            miss = start <= j
        active = lo < hi
        hi = tl.where(active & hit, mid, hi)
        lo = tl.where(active & miss, mid + 1, lo)
    return lo


@triton.jit
def _split_tile(tile, DIL0, DIL1, DIL2, NT0, NT1, NT2):
    """tile = ((((g0 * DIL1 + g1) * DIL2 + g2) * NT0 + t0) * NT1 + t1) * NT2 + t2."""
    t2 = tile % NT2
    tile = tile // NT2
    t1 = tile % NT1
    tile = tile // NT1
    t0 = tile % NT0
    tile = tile // NT0
    g2 = tile % DIL2
    tile = tile // DIL2
    g1 = tile % DIL1
    g0 = tile // DIL1
    return t0, t1, t2, g0, g1, g2


@triton.jit
def _flat_pos(b, c0, c1, c2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2):
    """int64 flat index of spatial position (group coords c, groups g) in batch b."""
    p0 = c0 * DIL0 + g0
    p1 = c1 * DIL1 + g1
    p2 = c2 * DIL2 + g2
    return ((b.to(tl.int64) * L0 + p0) * L1 + p1) * L2 + p2


@triton.jit
def _pair_mask(qg0, ws0, we0, qg1, ws1, we1, qg2, ws2, we2, kg0, kg1, kg2,
               NDIM: tl.constexpr, Q_ROWS: tl.constexpr):
    """Attended (query, key) pairs: key inside the query's window on every axis.

    Q_ROWS: the tile is [queries, keys]; otherwise [keys, queries].
    """
    if Q_ROWS:
        m = (ws2[:, None] <= kg2[None, :]) & (kg2[None, :] < we2[:, None])
        if NDIM >= 2:
            m = m & (ws1[:, None] <= kg1[None, :]) & (kg1[None, :] < we1[:, None])
        if NDIM >= 3:
            m = m & (ws0[:, None] <= kg0[None, :]) & (kg0[None, :] < we0[:, None])
    else:
        m = (ws2[None, :] <= kg2[:, None]) & (kg2[:, None] < we2[None, :])
        if NDIM >= 2:
            m = m & (ws1[None, :] <= kg1[:, None]) & (kg1[:, None] < we1[None, :])
        if NDIM >= 3:
            m = m & (ws0[None, :] <= kg0[:, None]) & (kg0[:, None] < we0[None, :])
    return m


@triton.jit
def _rpb_index(qg0, qg1, qg2, kg0, kg1, kg2, K0, K1, K2, NDIM: tl.constexpr, Q_ROWS: tl.constexpr):
    """Flat index into a head's *reversed* rpb table (the launchers flip it):
    sum_a ((i - j) / d + k - 1) * stride_a, group coordinates; rpb[j - i] is
    reversed[k - 1 + i - j] per axis, and reversing every axis of a row-major
    table reverses its flat order.

    Why reversed: the index then grows with the query (the tile's rows), so
    Triton lays the gather out with a warp's threads along the rows, and the
    dq kernel's per-row vectors (window bounds, statistics) take one register
    per thread instead of 32 in the layout of the keys-major index: with it,
    the dq kernel's first pass spilled 1.4-1.7 KB at head dim 32 (2-D/3-D,
    64 x 64 tiles; bench/compile_check.py)."""
    R2 = 2 * K2 - 1
    R1 = 2 * K1 - 1
    if Q_ROWS:
        idx = qg2[:, None] - kg2[None, :] + (K2 - 1)
        if NDIM >= 2:
            idx += (qg1[:, None] - kg1[None, :] + (K1 - 1)) * R2
        if NDIM >= 3:
            idx += (qg0[:, None] - kg0[None, :] + (K0 - 1)) * (R1 * R2)
    else:
        idx = qg2[None, :] - kg2[:, None] + (K2 - 1)
        if NDIM >= 2:
            idx += (qg1[None, :] - kg1[:, None] + (K1 - 1)) * R2
        if NDIM >= 3:
            idx += (qg0[None, :] - kg0[:, None] + (K0 - 1)) * (R1 * R2)
    return idx


@triton.jit
def _key_block(blk, ks0, ks1, ks2, nb1, nb2, lk0, lk1, lk2,
               TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr):
    """Group coordinates of key block blk of a region starting at ks, nb blocks per axis."""
    bb2 = blk % nb2
    rest = blk // nb2
    bb1 = rest % nb1
    bb0 = rest // nb1
    return ks0 + bb0 * TK0 + lk0, ks1 + bb1 * TK1 + lk1, ks2 + bb2 * TK2 + lk2


@triton.jit
def _query_tile_logits(q, k_ptr, rpb_ptr, blk, b, h, hk, HKV, scale2, q_valid, dq_,
                       qg0, ws0, we0, qg1, ws1, we1, qg2, ws2, we2,
                       ks0, ks1, ks2, ke0, ke1, ke2, nb1, nb2, lk0, lk1, lk2,
                       g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2, K0, K1, K2,
                       D: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
                       NDIM: tl.constexpr, HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    """Key block `blk` of a query tile's region, as every query-major pass reads
    it: the keys' key/value rows and validity, the keys, the base-2 logits
    (rpb added) and the attended-pair mask; and the rpb index (with rpb)."""
    kg0, kg1, kg2 = _key_block(blk, ks0, ks1, ks2, nb1, nb2, lk0, lk1, lk2, TK0, TK1, TK2)
    k_valid = (kg0 < ke0) & (kg1 < ke1) & (kg2 < ke2)
    kv_row = _flat_pos(b, kg0, kg1, kg2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2) * HKV + hk
    kt = tl.load(k_ptr + kv_row[:, None] * D + dq_[None, :],
                 mask=k_valid[:, None] & (dq_ < D)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * scale2
    mask = q_valid[:, None] & _pair_mask(qg0, ws0, we0, qg1, ws1, we1, qg2, ws2, we2,
                                         kg0, kg1, kg2, NDIM, True)
    idx = kv_row  # no rpb: unused
    if HAS_RPB:
        idx = _rpb_index(qg0, qg1, qg2, kg0, kg1, kg2, K0, K1, K2, NDIM, True)
        R = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
        s += tl.load(rpb_ptr + h * R + idx, mask=mask, other=0.0) * 1.4426950408889634
    return kv_row, k_valid, kt, s, mask, idx


@triton.jit
def _nonfinite(x):
    """1 (int32) when the tile holds inf or NaN, else 0."""
    return tl.max(((x != x) | (x == float("inf")) | (x == float("-inf"))).to(tl.int32))


@triton.jit
def _masked_dot(acc, a, b, mask, DOT_PREC: tl.constexpr, SAFE: tl.constexpr):
    """acc + a @ b over the attended pairs only (mask: a's shape), as the
    reference's sums over each window are.

    Outside the mask a is an exact 0, and a plain tl.dot would still
    multiply it by b: an inf or NaN in a row of b that the row of a does not
    attend would spread into it (0 * inf = NaN). Without SAFE this is the
    plain dot (the main launch, which flags such blocks: module docstring).
    With SAFE, when the block of b holds inf or NaN those entries go through
    tl.dot as 0 and are added afterwards one row of b at a time, only for
    attended pairs, in IEEE arithmetic as the reference's sum (x * inf is
    NaN for x == 0 or NaN, +-inf otherwise; +inf + -inf is NaN).
    """
    bad = (b != b) | (b == float("inf")) | (b == float("-inf"))
    if not SAFE:
        acc += tl.dot(a.to(b.dtype), b, input_precision=DOT_PREC)
    elif tl.max(bad.to(tl.int32)) > 0:
        acc += tl.dot(a.to(b.dtype), tl.where(bad, 0.0, b).to(b.dtype), input_precision=DOT_PREC)
        k = tl.arange(0, a.shape[1])
        bad_rows = tl.max(bad.to(tl.int32), 1)
        for j in range(0, a.shape[1]):
            if tl.max(tl.where(k == j, bad_rows, 0)) > 0:
                # Column j of a and row j of b, exactly (one term per sum).
                a_j = tl.sum(tl.where(k[None, :] == j, a.to(tl.float32), 0.0), 1)
                m_j = tl.max(tl.where(k[None, :] == j, mask.to(tl.int32), 0), 1) > 0
                b_j = tl.sum(tl.where(k[:, None] == j, b.to(tl.float32), 0.0), 0)
                bad_j = (b_j != b_j) | (b_j == float("inf")) | (b_j == float("-inf"))
                acc += tl.where(m_j[:, None] & bad_j[None, :], a_j[:, None] * b_j[None, :], 0.0)
    else:
        acc += tl.dot(a.to(b.dtype), b, input_precision=DOT_PREC)
    return acc


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _na_fwd_kernel(
        q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, lse_ptr, flag_ptr,
        H, HKV, n_tiles, scale2,
        L0, L1, L2, K0, K1, K2, DIL0, DIL1, DIL2, S0, S1, S2, NT0, NT1, NT2,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, NDIM: tl.constexpr,
        HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
        TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, SAFE: tl.constexpr):
    pid = tl.program_id(0)
    if SAFE:  # the re-run: only the programs whose operands held inf or NaN
        if tl.load(flag_ptr + pid) == 0:
            return
    tile = pid % n_tiles
    bh = pid // n_tiles
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    t0, t1, t2, g0, g1, g2 = _split_tile(tile, DIL0, DIL1, DIL2, NT0, NT1, NT2)

    r = tl.arange(0, TQ0 * TQ1 * TQ2)
    qg0, qv0, ws0, we0, ks0, ke0 = _query_axis(t0, g0, L0, DIL0, K0, S0, r // (TQ1 * TQ2), TQ0, C0)
    qg1, qv1, ws1, we1, ks1, ke1 = _query_axis(t1, g1, L1, DIL1, K1, S1, (r // TQ2) % TQ1, TQ1, C1)
    qg2, qv2, ws2, we2, ks2, ke2 = _query_axis(t2, g2, L2, DIL2, K2, S2, r % TQ2, TQ2, C2)
    q_valid = qv0 & qv1 & qv2
    q_pos = _flat_pos(b, qg0, qg1, qg2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2)

    dq_ = tl.arange(0, D_PAD)
    dv_ = tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + (q_pos * H + h)[:, None] * D + dq_[None, :],
                mask=q_valid[:, None] & (dq_ < D)[None, :], other=0.0)

    c = tl.arange(0, TK0 * TK1 * TK2)
    lk0 = c // (TK1 * TK2)
    lk1 = (c // TK2) % TK1
    lk2 = c % TK2
    nb0 = (ke0 - ks0 + TK0 - 1) // TK0
    nb1 = (ke1 - ks1 + TK1 - 1) // TK1
    nb2 = (ke2 - ks2 + TK2 - 1) // TK2

    m_i = tl.full([TQ0 * TQ1 * TQ2], float("-inf"), tl.float32)
    l_i = tl.zeros([TQ0 * TQ1 * TQ2], tl.float32)
    acc = tl.zeros([TQ0 * TQ1 * TQ2, DV_PAD], tl.float32)
    bad = pid * 0  # 1 once an operand of a masked product held inf or NaN
    for blk in range(0, nb0 * nb1 * nb2):
        kv_row, k_valid, kt, s, mask, idx = _query_tile_logits(
            q, k_ptr, rpb_ptr, blk, b, h, hk, HKV, scale2, q_valid, dq_,
            qg0, ws0, we0, qg1, ws1, we1, qg2, ws2, we2, ks0, ks1, ks2, ke0, ke1, ke2, nb1, nb2,
            lk0, lk1, lk2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2, K0, K1, K2,
            D, TK0, TK1, TK2, NDIM, HAS_RPB, DOT_PREC)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_ptr + kv_row[:, None] * DV + dv_[None, :],
                     mask=k_valid[:, None] & (dv_ < DV)[None, :], other=0.0)
        acc = _masked_dot(acc * alpha[:, None], p, vt, mask, DOT_PREC, SAFE)
        bad = tl.maximum(bad, _nonfinite(vt))
        m_i = m_new

    # As the reference: an all -inf window gives NaN (0 / 0) and lse -inf, a
    # +inf logit NaN and lse +inf (torch.logsumexp), a NaN logit NaN.
    out = acc / tl.where(q_valid, l_i, 1.0)[:, None]  # (padding rows: no 0 / 0)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    lse = tl.where(l_i != l_i, float("nan"), lse)
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    row = q_pos * H + h
    tl.store(out_ptr + row[:, None] * DV + dv_[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_valid[:, None] & (dv_ < DV)[None, :])
    tl.store(lse_ptr + row, lse, mask=q_valid)
    if not SAFE:
        tl.store(flag_ptr + pid, bad)


@triton.jit
def _na_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, out_ptr, dlse_ptr, dq_ptr, drpb_ptr, stat_ptr, amax_ptr,
        flag_ptr, H, HKV, n_tiles, scale, scale2,
        L0, L1, L2, K0, K1, K2, DIL0, DIL1, DIL2, S0, S1, S2, NT0, NT1, NT2,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, NDIM: tl.constexpr,
        HAS_RPB: tl.constexpr, HAS_DLSE: tl.constexpr, DOT_PREC: tl.constexpr,
        D: tl.constexpr, DV: tl.constexpr,
        TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
        TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, DETERMINISTIC: tl.constexpr, SAFE: tl.constexpr):
    """Per query tile: the row statistics (pass 1), then dq and drpb (pass 2).

    Pass 1 recomputes each row's max logit m and normaliser l (online, as the
    forward) and the key of the max (argmax). Then, per row: Delta =
    rowsum(dout * out), dP at the argmax by the same rowsum over that key's
    value row, and dS at the argmax, P_max (dP_max - Delta) + P_max dlse
    with P_max = 1 / l. In a saturated row l == 1 and out == v_max exactly,
    so P_max == 1 and dS_max == dlse exactly, as autograd through the
    reference gets. The statistics (m, 1 / l, Delta - dlse, dS_max; argmax)
    are stored for the key-major kernel, whose tl.dot rounds the logits
    differently: it takes P and dS at the argmax from here, and only the
    small weights of the other keys from its own logits.
    Pass 2: P = exp2(S - m) / l, dS = P (dP - Delta + dlse) (the stored dS at
    the argmax), dq = scale dS K, drpb by atomic adds into this batch
    element's (H, R) table of partials, or with DETERMINISTIC stored in the
    query row's own (R) table (a row's keys have distinct offsets) that the
    launcher sums in a fixed order.
    """
    pid = tl.program_id(0)
    if SAFE:  # the re-run: only the programs whose operands held inf or NaN
        if tl.load(flag_ptr + pid) == 0:
            return
    tile = pid % n_tiles
    bh = pid // n_tiles
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    t0, t1, t2, g0, g1, g2 = _split_tile(tile, DIL0, DIL1, DIL2, NT0, NT1, NT2)

    r = tl.arange(0, TQ0 * TQ1 * TQ2)
    qg0, qv0, ws0, we0, ks0, ke0 = _query_axis(t0, g0, L0, DIL0, K0, S0, r // (TQ1 * TQ2), TQ0, C0)
    qg1, qv1, ws1, we1, ks1, ke1 = _query_axis(t1, g1, L1, DIL1, K1, S1, (r // TQ2) % TQ1, TQ1, C1)
    qg2, qv2, ws2, we2, ks2, ke2 = _query_axis(t2, g2, L2, DIL2, K2, S2, r % TQ2, TQ2, C2)
    q_valid = qv0 & qv1 & qv2
    row = _flat_pos(b, qg0, qg1, qg2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2) * H + h

    dq_ = tl.arange(0, D_PAD)
    dv_ = tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + row[:, None] * D + dq_[None, :],
                mask=q_valid[:, None] & (dq_ < D)[None, :], other=0.0)
    do_mask = q_valid[:, None] & (dv_ < DV)[None, :]
    do = tl.load(do_ptr + row[:, None] * DV + dv_[None, :], mask=do_mask, other=0.0)

    c = tl.arange(0, TK0 * TK1 * TK2)
    lk0 = c // (TK1 * TK2)
    lk1 = (c // TK2) % TK1
    lk2 = c % TK2
    nb0 = (ke0 - ks0 + TK0 - 1) // TK0
    nb1 = (ke1 - ks1 + TK1 - 1) // TK1
    nb2 = (ke2 - ks2 + TK2 - 1) // TK2
    R = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    drpb_row = drpb_ptr + (b.to(tl.int64) * H + h) * R

    # ---- pass 1: row max, normaliser, argmax (its position in the key walk; the key/value row after it)
    m_i = tl.full([TQ0 * TQ1 * TQ2], float("-inf"), tl.float32)
    l_i = tl.zeros([TQ0 * TQ1 * TQ2], tl.float32)
    NK: tl.constexpr = TK0 * TK1 * TK2
    am_at = tl.full([TQ0 * TQ1 * TQ2], -1, tl.int32)  # blk * NK + column of the max
    for blk in range(0, nb0 * nb1 * nb2):
        kv_row, k_valid, kt, s, mask, idx = _query_tile_logits(
            q, k_ptr, rpb_ptr, blk, b, h, hk, HKV, scale2, q_valid, dq_,
            qg0, ws0, we0, qg1, ws1, we1, qg2, ws2, we2, ks0, ks1, ks2, ke0, ke1, ke2, nb1, nb2,
            lk0, lk1, lk2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2, K0, K1, K2,
            D, TK0, TK1, TK2, NDIM, HAS_RPB, DOT_PREC)
        s = tl.where(mask, s, float("-inf"))
        bm = tl.max(s, 1)
        m_new = tl.maximum(m_i, bm)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
        # strictly greater: the first of equal maxima
        am_at = tl.where(bm > m_i, blk * NK + tl.argmax(s, 1), am_at)
        m_i = m_new
    # The argmax as a key/value row index (-1: none), for the dk/dv kernel.
    # (max(nb, 1): no division by zero for tiles past the group's end, am_at == -1)
    kg0, kg1, kg2 = _key_block(am_at // NK, ks0, ks1, ks2, tl.maximum(nb1, 1), tl.maximum(nb2, 1),
                               (am_at % NK) // (TK1 * TK2),
                               (am_at % NK // TK2) % TK1, am_at % TK2, TK0, TK1, TK2)
    am = _flat_pos(b, kg0, kg1, kg2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2) * HKV + hk
    am = tl.where(am_at >= 0, am, -1)

    # ---- per row: Delta, dP and dS at the argmax, stored statistics
    # P_max (the max weight is exp2(0) = 1); inf for an all -inf row. Rows
    # past the tile's end get harmless values (no inf / NaN arithmetic).
    inv = 1.0 / tl.where(q_valid, l_i, 1.0)
    m_i = tl.where(q_valid, m_i, 0.0)
    va = tl.load(v_ptr + am[:, None] * DV + dv_[None, :], mask=do_mask & (am >= 0)[:, None],
                 other=0.0).to(tl.float32)
    o = tl.load(out_ptr + row[:, None] * DV + dv_[None, :], mask=do_mask, other=0.0).to(tl.float32)
    dof = do.to(tl.float32)
    delta = tl.sum(dof * o, 1)
    dpm = tl.sum(dof * va, 1)  # same reduction as delta: equal when out == v_max
    if HAS_DLSE:
        dl = tl.load(dlse_ptr + row, mask=q_valid, other=0.0)
    else:
        dl = tl.zeros([TQ0 * TQ1 * TQ2], tl.float32)
    dm = delta - dl
    dsmax = inv * ((dpm - delta) + dl)
    st = stat_ptr + row * 4
    tl.store(st, m_i, mask=q_valid)
    tl.store(st + 1, inv, mask=q_valid)
    tl.store(st + 2, dm, mask=q_valid)
    tl.store(st + 3, dsmax, mask=q_valid)
    tl.store(amax_ptr + row, am, mask=q_valid)

    # ---- pass 2: dS, dq, drpb
    dq = tl.zeros([TQ0 * TQ1 * TQ2, D_PAD], tl.float32)
    bad = pid * 0
    for blk in range(0, nb0 * nb1 * nb2):
        kv_row, k_valid, kt, s, mask, idx = _query_tile_logits(
            q, k_ptr, rpb_ptr, blk, b, h, hk, HKV, scale2, q_valid, dq_,
            qg0, ws0, we0, qg1, ws1, we1, qg2, ws2, we2, ks0, ks1, ks2, ke0, ke1, ke2, nb1, nb2,
            lk0, lk1, lk2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2, K0, K1, K2,
            D, TK0, TK1, TK2, NDIM, HAS_RPB, DOT_PREC)
        vt = tl.load(v_ptr + kv_row[:, None] * DV + dv_[None, :],
                     mask=k_valid[:, None] & (dv_ < DV)[None, :], other=0.0)
        p = tl.where(mask, tl.exp2(s - m_i[:, None]) * inv[:, None], 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
        ds = tl.where(mask, p * (dp - dm[:, None]), 0.0)
        ds = tl.where((blk * NK + c)[None, :] == am_at[:, None], dsmax[:, None], ds)
        dq = _masked_dot(dq, ds, kt, mask, DOT_PREC, SAFE)
        bad = tl.maximum(bad, _nonfinite(kt))
        if HAS_RPB and not SAFE:  # (dS is right in the main launch: added once)
            if DETERMINISTIC:
                tl.store(drpb_ptr + row.to(tl.int64)[:, None] * R + idx, ds, mask=mask)
            else:
                tl.atomic_add(drpb_row + idx, ds, mask=mask, sem="relaxed")

    dq = dq * scale
    tl.store(dq_ptr + row[:, None] * D + dq_[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=q_valid[:, None] & (dq_ < D)[None, :])
    if not SAFE:
        tl.store(flag_ptr + pid, bad)


@triton.jit
def _na_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, stat_ptr, amax_ptr, dk_ptr, dv_ptr, flag_ptr,
        H, HKV, n_tiles, scale, scale2, n_iter,
        L0, L1, L2, K0, K1, K2, DIL0, DIL1, DIL2, S0, S1, S2, NT0, NT1, NT2,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, NDIM: tl.constexpr,
        HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
        TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, SAFE: tl.constexpr):
    """dk, dv over key tiles (TK box of one dilation group, one kv head); walks
    the query region of the tile in TQ blocks for each query head of the group.
    P = exp2(S - m) / l and dS = P (dP - Dm) from the query rows' statistics;
    at each row's argmax key, P = 1 / l and dS = dS_max as the dq kernel
    computed them (this kernel's logits round differently from its)."""
    pid = tl.program_id(0)
    if SAFE:  # the re-run: only the programs whose operands held inf or NaN
        if tl.load(flag_ptr + pid) == 0:
            return
    tile = pid % n_tiles
    bh = pid // n_tiles
    b = bh // HKV
    hk = bh % HKV
    group = H // HKV
    t0, t1, t2, g0, g1, g2 = _split_tile(tile, DIL0, DIL1, DIL2, NT0, NT1, NT2)

    c = tl.arange(0, TK0 * TK1 * TK2)
    Lg0 = _group_len(L0, DIL0, g0)
    Lg1 = _group_len(L1, DIL1, g1)
    Lg2 = _group_len(L2, DIL2, g2)
    f0 = t0 * TK0
    f1 = t1 * TK1
    f2 = t2 * TK2
    kg0 = f0 + c // (TK1 * TK2)
    kg1 = f1 + (c // TK2) % TK1
    kg2 = f2 + c % TK2
    k_valid = (kg0 < Lg0) & (kg1 < Lg1) & (kg2 < Lg2)
    kv_row = _flat_pos(b, kg0, kg1, kg2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2) * HKV + hk

    # Query region per axis: [first i whose window ends after the first key,
    # first i whose window starts after the last key).
    qs0 = _first_query(f0, Lg0, K0, S0, n_iter, True, C0)
    qs1 = _first_query(f1, Lg1, K1, S1, n_iter, True, C1)
    qs2 = _first_query(f2, Lg2, K2, S2, n_iter, True, C2)
    qe0 = _first_query(tl.minimum(f0 + TK0, Lg0) - 1, Lg0, K0, S0, n_iter, False, C0)
    qe1 = _first_query(tl.minimum(f1 + TK1, Lg1) - 1, Lg1, K1, S1, n_iter, False, C1)
    qe2 = _first_query(tl.minimum(f2 + TK2, Lg2) - 1, Lg2, K2, S2, n_iter, False, C2)
    qe0 = tl.where(f0 < Lg0, qe0, qs0)
    qe1 = tl.where(f1 < Lg1, qe1, qs1)
    qe2 = tl.where(f2 < Lg2, qe2, qs2)
    nb0 = tl.maximum(qe0 - qs0 + TQ0 - 1, 0) // TQ0
    nb1 = tl.maximum(qe1 - qs1 + TQ1 - 1, 0) // TQ1
    nb2 = tl.maximum(qe2 - qs2 + TQ2 - 1, 0) // TQ2
    n_blocks = nb0 * nb1 * nb2

    dq_ = tl.arange(0, D_PAD)
    dv_ = tl.arange(0, DV_PAD)
    kt = tl.load(k_ptr + kv_row[:, None] * D + dq_[None, :],
                 mask=k_valid[:, None] & (dq_ < D)[None, :], other=0.0)
    vt = tl.load(v_ptr + kv_row[:, None] * DV + dv_[None, :],
                 mask=k_valid[:, None] & (dv_ < DV)[None, :], other=0.0)

    r = tl.arange(0, TQ0 * TQ1 * TQ2)
    lq0 = r // (TQ1 * TQ2)
    lq1 = (r // TQ2) % TQ1
    lq2 = r % TQ2
    R = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)

    dk = tl.zeros([TK0 * TK1 * TK2, D_PAD], tl.float32)
    dv = tl.zeros([TK0 * TK1 * TK2, DV_PAD], tl.float32)
    bad = pid * 0
    for it in range(0, n_blocks * group):
        h = hk * group + it // n_blocks
        qg0, qg1, qg2 = _key_block(it % n_blocks, qs0, qs1, qs2, nb1, nb2, lq0, lq1, lq2, TQ0, TQ1, TQ2)
        q_valid = (qg0 < qe0) & (qg1 < qe1) & (qg2 < qe2)
        ws0, we0 = _window(qg0, Lg0, K0, S0, C0)
        ws1, we1 = _window(qg1, Lg1, K1, S1, C1)
        ws2, we2 = _window(qg2, Lg2, K2, S2, C2)
        row = _flat_pos(b, qg0, qg1, qg2, g0, g1, g2, L0, L1, L2, DIL0, DIL1, DIL2) * H + h
        q = tl.load(q_ptr + row[:, None] * D + dq_[None, :],
                    mask=q_valid[:, None] & (dq_ < D)[None, :], other=0.0)
        do = tl.load(do_ptr + row[:, None] * DV + dv_[None, :],
                     mask=q_valid[:, None] & (dv_ < DV)[None, :], other=0.0)
        st = stat_ptr + row * 4
        m = tl.load(st, mask=q_valid, other=0.0)
        inv = tl.load(st + 1, mask=q_valid, other=0.0)
        dm = tl.load(st + 2, mask=q_valid, other=0.0)
        dsmax = tl.load(st + 3, mask=q_valid, other=0.0)
        am = tl.load(amax_ptr + row, mask=q_valid, other=-1)

        # Transposed tiles: [keys, queries].
        s_t = tl.dot(kt, tl.trans(q), input_precision=DOT_PREC) * scale2
        mask = q_valid[None, :] & _pair_mask(qg0, ws0, we0, qg1, ws1, we1, qg2, ws2, we2,
                                             kg0, kg1, kg2, NDIM, False)
        if HAS_RPB:
            idx = _rpb_index(qg0, qg1, qg2, kg0, kg1, kg2, K0, K1, K2, NDIM, False)
            s_t += tl.load(rpb_ptr + h * R + idx, mask=mask, other=0.0) * 1.4426950408889634
        is_max = kv_row[:, None] == am[None, :]
        pt = tl.where(mask, tl.exp2(s_t - m[None, :]) * inv[None, :], 0.0)
        pt = tl.where(is_max, inv[None, :], pt)
        dpt = tl.dot(vt, tl.trans(do), input_precision=DOT_PREC)
        dst = tl.where(mask, pt * (dpt - dm[None, :]), 0.0)
        dst = tl.where(is_max, dsmax[None, :], dst)
        dv = _masked_dot(dv, pt, do, mask, DOT_PREC, SAFE)
        dk = _masked_dot(dk, dst, q, mask, DOT_PREC, SAFE)
        bad = tl.maximum(bad, tl.maximum(_nonfinite(do), _nonfinite(q)))

    dk = dk * scale
    tl.store(dk_ptr + kv_row[:, None] * D + dq_[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=k_valid[:, None] & (dq_ < D)[None, :])
    tl.store(dv_ptr + kv_row[:, None] * DV + dv_[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=k_valid[:, None] & (dv_ < DV)[None, :])
    if not SAFE:
        tl.store(flag_ptr + pid, bad)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _pad_dim(n: int) -> int:
    assert 0 <= n <= 256, f"neighborhood attention: head_dim must be at most 256, got {n}"
    return max(16, triton.next_power_of_2(n))


def _pad3(values, fill) -> list:
    values = list(values)
    return [fill] * (3 - len(values)) + values


def _group_max(L: int, d: int) -> int:
    return -(-L // d)


def _query_tile(ext, nd: int, block: int) -> list:
    """Per-axis tile (powers of 2, product `block`), grown round-robin from the
    last axis up to the axis' extent; >= 16 rows in all (tl.dot's minimum)."""
    tile = [1, 1, 1]
    caps = [triton.next_power_of_2(max(e, 1)) for e in ext]
    while math.prod(tile) < block:
        grew = False
        for a in range(2, 2 - nd, -1):
            if tile[a] < caps[a] and math.prod(tile) < block:
                tile[a] *= 2
                grew = True
        if not grew:
            break
    while math.prod(tile) < 16:
        tile[2] *= 2
    return tile


def _key_tile(ext, block: int) -> list:
    """Per-axis tile of at most `block` elements covering the region's extents
    last axis first; >= 16 elements in all."""
    tile, room = [1, 1, 1], block
    for a in (2, 1, 0):
        tile[a] = max(1, min(triton.next_power_of_2(max(ext[a], 1)), room))
        room //= tile[a]
    while math.prod(tile) < 16:
        tile[2] *= 2
    return tile


def _user_tile(tile, nd: int) -> list:
    tile = [1] * (3 - nd) + [int(t) for t in tile]
    assert len(tile) == 3 and all(t >= 1 and t & (t - 1) == 0 for t in tile), \
        f"tiles must be powers of 2, one per spatial axis; got {tile}"
    assert math.prod(tile) >= 16, f"a tile needs at least 16 elements (tl.dot); got {tile}"
    return tile


class _Problem:
    """Shapes and per-axis parameters, padded to three spatial axes."""

    def __init__(self, query, key, value, kernel_size, dilation, stride, is_causal):
        nd = query.dim() - 3
        assert 1 <= nd <= 3, \
            f"query must be (B, *spatial, H, D) with 1-3 spatial axes; got {tuple(query.shape)}"
        for name, v in (("kernel_size", kernel_size), ("dilation", dilation), ("stride", stride),
                        ("is_causal", is_causal)):
            assert len(v) == nd, f"{name} needs one entry per spatial axis ({nd}); got {v}"
        self.nd = nd
        self.B = query.shape[0]
        self.spatial = list(query.shape[1:-2])
        self.H, self.D = query.shape[-2:]
        self.Hkv = key.shape[-2]
        self.Dv = value.shape[-1]
        assert self.Hkv >= 1 and self.H % self.Hkv == 0, f"kv heads {self.Hkv} must divide heads {self.H}"
        self.L = _pad3(self.spatial, 1)
        self.k = _pad3([int(v) for v in kernel_size], 1)
        self.d = _pad3([int(v) for v in dilation], 1)
        self.s = _pad3([int(v) for v in stride], 1)
        self.c = _pad3([bool(v) for v in is_causal], False)
        self.ext = [_group_max(L, d) for L, d in zip(self.L, self.d)]
        self.D_PAD = _pad_dim(self.D)
        self.DV_PAD = _pad_dim(self.Dv)
        self.empty = query.numel() == 0 or value.shape[-1] == 0 or self.Hkv == 0
        self.dot_prec = "ieee" if query.dtype == torch.float32 else "tf32"
        # Tile sizes (elements per query tile / key block). fp32 uses exact
        # (FMA) dots, whose operands live in registers: smaller tiles.
        big = max(self.D_PAD, self.DV_PAD) > 64
        self.block = 32 if big or query.dtype == torch.float32 else 64
        wide = max(self.D_PAD, self.DV_PAD) >= 256
        self.num_warps = 8 if wide else 4
        # Two pipeline stages at head dim 256: with three, fp32 needs 164-228 KB of shared
        # memory (over sm_80's 163 KB, and the dq re-run over sm_90's 227 KB;
        # bench/compile_check.py); with two, 100-164 KB.
        self.num_stages = 2 if wide else 3
        # maxnreg=255 (in consts): the whole register file a thread may have. Without a
        # budget ptxas fitted kernels that need a little more to 168 registers on sm_80
        # (three 4-warp blocks per SM) and spilled 8-16 B doing it; with it they take
        # what they need (at most 255: two blocks), and none spills.

    def axis_args(self, tile, heads):
        """(tiles per (batch, head), per-axis kernel arguments) for a launch over `tile`s."""
        nt = [-(-e // t) for e, t in zip(self.ext, tile)]
        n_tiles = math.prod(nt) * math.prod(self.d)
        assert n_tiles * self.B * heads < 2 ** 31, "neighborhood attention: too many tiles for one launch"
        return n_tiles, [*self.L, *self.k, *self.d, *self.s, *nt]

    def consts(self, has_rpb, tq, tk):
        return dict(C0=self.c[0], C1=self.c[1], C2=self.c[2], NDIM=self.nd, HAS_RPB=has_rpb,
                    DOT_PREC=self.dot_prec, D=self.D, DV=self.Dv, TQ0=tq[0], TQ1=tq[1], TQ2=tq[2],
                    TK0=tk[0], TK1=tk[1], TK2=tk[2], D_PAD=self.D_PAD, DV_PAD=self.DV_PAD,
                    num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=255)

    def query_major_tiles(self, q_tile, k_tile):
        """(query tile, key block) for kernels walking query tiles."""
        tq = _user_tile(q_tile, self.nd) if q_tile is not None else _query_tile(self.ext, self.nd, self.block)
        if k_tile is not None:
            tk = _user_tile(k_tile, self.nd)
        else:
            tk = _key_tile([min(t + k - 1, e) for t, k, e in zip(tq, self.k, self.ext)], self.block)
        return tq, tk

    def key_major_tiles(self, q_tile, k_tile):
        """(query block, key tile) for the dk/dv kernel walking key tiles. Its query
        block is half the forward's key block: the kernel holds four tiles of
        logits' size (S, P, dP, dS) besides its accumulators, and spilled
        registers at the full size (head dim 32, 64 x 64; bench/compile_check.py)."""
        tk = _user_tile(k_tile, self.nd) if k_tile is not None else _query_tile(self.ext, self.nd, self.block)
        if q_tile is not None:
            tq = _user_tile(q_tile, self.nd)
        else:
            tq = _key_tile([min(t + k - 1, e) for t, k, e in zip(tk, self.k, self.ext)], self.block // 2)
        return tq, tk


def _rpb_arg(rpb, query, H, ks):
    if rpb is None:
        return query, False
    R = math.prod(2 * k - 1 for k in ks)
    assert rpb.numel() == H * R, \
        f"rpb must be (H, 2k-1 per axis) = ({H}, {[2 * k - 1 for k in ks]}); got {tuple(rpb.shape)}"
    # Reversed (every axis flipped): see _rpb_index.
    return rpb.float().reshape(H, R).flip(1).contiguous(), True


def na_fwd(query, key, value, rpb, kernel_size, dilation, stride, is_causal, scale,
           *, q_tile=None, k_tile=None):
    """-> (out (B, *spatial, H, Dv) query.dtype, lse (B, *spatial, H) float32).

    q_tile / k_tile (per-axis powers of 2) override the tile heuristics.
    """
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    pb = _Problem(query, key, value, kernel_size, dilation, stride, is_causal)
    out = torch.empty(*query.shape[:-1], pb.Dv, device=query.device, dtype=query.dtype)
    lse = torch.empty(query.shape[:-1], device=query.device, dtype=torch.float32)
    if pb.empty:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    rpb_t, has_rpb = _rpb_arg(rpb, query, pb.H, pb.k)
    tq, tk = pb.query_major_tiles(q_tile, k_tile)
    n_tiles, axes = pb.axis_args(tq, pb.H)
    grid = n_tiles * pb.B * pb.H
    flags = torch.empty(grid, device=query.device, dtype=torch.int32)
    for safe in (False, True):  # the main launch, then the re-run of flagged programs
        _na_fwd_kernel[(grid,)](
            query, key, value, rpb_t, out, lse, flags,
            pb.H, pb.Hkv, n_tiles, float(scale) * LOG2E, *axes,
            SAFE=safe, **pb.consts(has_rpb, tq, tk))
    return out, lse


def na_bwd(dout, dlse, query, key, value, rpb, out, lse, kernel_size, dilation, stride,
           is_causal, scale, *, q_tile=None, k_tile=None):
    """-> (dquery, dkey, dvalue in the inputs' dtypes, drpb float32 like rpb or torch.empty(0)).

    q_tile is the query block and k_tile the key block of both backward
    kernels (per-axis powers of 2); None picks them by heuristic.
    """
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    dout, out = dout.to(query.dtype).contiguous(), out.to(query.dtype).contiguous()
    lse = lse.float().contiguous()
    pb = _Problem(query, key, value, kernel_size, dilation, stride, is_causal)
    dev = query.device
    # Every position belongs to exactly one tile of each kernel, so the
    # kernels write every element of dq, dk and dv.
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    drpb = torch.zeros_like(rpb, dtype=torch.float32) if rpb is not None else torch.empty(0, device=dev)
    if pb.empty:
        return dq.zero_(), dk.zero_(), dv.zero_(), drpb
    rpb_t, has_rpb = _rpb_arg(rpb, query, pb.H, pb.k)

    # Per query row, from the dq kernel for the dk/dv kernel: max logit (base
    # 2), 1 / normaliser, Delta - dlse, dS at the argmax; the argmax as a
    # key/value row index.
    stat = torch.empty(*lse.shape, 4, device=dev, dtype=torch.float32)
    amax = torch.empty(lse.shape, device=dev, dtype=torch.int64)
    has_dlse = dlse is not None
    dlse_t = dlse.float().contiguous() if has_dlse else stat

    scale = float(scale)
    R = math.prod(2 * k - 1 for k in pb.k)
    # drpb partials: one (H, R) table per batch element, added into with float
    # atomics; under torch.use_deterministic_algorithms(True) one (R) table per
    # query row instead (lse.numel() x R floats), stored without atomics.
    deterministic = torch.are_deterministic_algorithms_enabled()
    part_shape = (lse.numel() // pb.H, pb.H, R) if deterministic else (pb.B, pb.H, R)
    drpb_part = torch.zeros(part_shape, device=dev, dtype=torch.float32) if has_rpb else stat
    tq, tk = pb.query_major_tiles(q_tile, k_tile)
    n_tiles, axes = pb.axis_args(tq, pb.H)
    grid = n_tiles * pb.B * pb.H
    flags = torch.empty(grid, device=dev, dtype=torch.int32)
    # In fp16/bf16 the dq kernel runs unpipelined (one stage): prefetching the next key
    # block's K, V (and rpb gather) took the registers that made it spill at 255 (head
    # dim 32 with rpb, 48; bench/compile_check.py). Not in fp32: its FMA dots read their
    # operands from the pipeline's shared memory, and with one stage it spilled KBs. The
    # re-run (flagged programs only) has one stage in every dtype: in fp32 at head dim
    # 256 it needed 164 KB of shared memory with two, over sm_80's 163 KB. With rpb the
    # fp16/bf16 kernel runs 8 warps: at 4, the 3-D case still spilled 12 B at 255 registers.
    mma = pb.dot_prec != "ieee"  # fp16/bf16 (tensor-core dots)
    consts = pb.consts(has_rpb, tq, tk)
    if has_rpb and mma:
        consts["num_warps"] = 8
    for safe in (False, True):
        stages = 1 if safe or mma else pb.num_stages
        _na_bwd_dq_kernel[(grid,)](
            query, key, value, rpb_t, dout, out, dlse_t, dq, drpb_part, stat, amax, flags,
            pb.H, pb.Hkv, n_tiles, scale, scale * LOG2E, *axes,
            HAS_DLSE=has_dlse, DETERMINISTIC=deterministic, SAFE=safe, **dict(consts, num_stages=stages))

    tq, tk = pb.key_major_tiles(q_tile, k_tile)
    n_tiles, axes = pb.axis_args(tk, pb.Hkv)
    n_iter = max(pb.ext).bit_length() + 1
    grid = n_tiles * pb.B * pb.Hkv
    flags = torch.empty(grid, device=dev, dtype=torch.int32)
    for safe in (False, True):
        _na_bwd_dkdv_kernel[(grid,)](
            query, key, value, rpb_t, dout, stat, amax, dk, dv, flags,
            pb.H, pb.Hkv, n_tiles, scale, scale * LOG2E, n_iter, *axes,
            SAFE=safe, **pb.consts(has_rpb, tq, tk))

    if has_rpb:
        drpb = drpb_part.sum(0).flip(-1).reshape(rpb.shape)  # (partials in reversed order)
    return dq, dk, dv, drpb
