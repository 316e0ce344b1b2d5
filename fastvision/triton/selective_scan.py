"""Triton kernels for the selective scan (Mamba S6) and Vim's bidirectional scan.

Recurrence, per (batch b, channel d), state x in R^N (fp32):

    delta_t = softplus(delta_t + delta_bias)          (softplus optional, threshold 20)
    x_t     = exp(delta_t A) * x_{t-1} + delta_t B_t u_t
    y_t     = sum_n C_t x_t
    out_t   = (y_t + D u_t) * silu(z_t)                (no gate when z is None)

One program handles one (b, d) row and walks the sequence in chunks of
``CHUNK`` steps. A chunk is an [N_PAD, CHUNK] tile: the linear recurrence is
solved inside the tile with ``tl.associative_scan`` over affine maps and the
state after the chunk is carried into the next one (and saved as a
checkpoint for the backward pass, which recomputes each chunk's states from
these checkpoints instead of storing all L states).

``REVERSE`` runs t = L-1 down to 0 by loading with reversed indices: step p
of the processing order is time t = L-1-p. Chunks are counted in processing
order everywhere (chunk_states[..., c, :] is the state after chunk c).

B and C are either constant, (dim, N), or variable, (batch, G, N, L) where
channel d reads group d // (dim // G).

At 8 warps the kernels launch with a register budget (``maxnreg``; the
launchers' ``_fwd_budget`` / ``_bwd_budget``): without one ptxas fitted them
to 80 or 128 registers for occupancy and spilled at N 16.

Everything here runs on CPU tensors under TRITON_INTERPRET=1 as well; it uses
nothing newer than triton 3.6 offers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "bi_selective_scan_fwd"]


# --------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (a, b) stands for the map v -> a * v + b; this is "apply 1, then 2".
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(v):
    # log1p(exp(v)) for v <= 20, else v (torch's threshold). log1p is written
    # with Kahan's trick, log(w) * e / (w - 1), which stays accurate for tiny e
    # where log(1 + e) would round to 0.
    e = tl.exp(tl.minimum(v, 20.0))  # clamp: the v > 20 branch is discarded
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(v <= 20.0, log1p_e, v)


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _delta(dt_row, t, t_mask, dbias, SOFTPLUS: tl.constexpr):
    """Effective step delta at times t (fp32); 0 where masked, so exp(0*A) = 1
    and delta*B*u = 0 turn masked steps into identity steps of the scan."""
    v = tl.load(dt_row + t, mask=t_mask, other=0.0).to(tl.float32) + dbias
    if SOFTPLUS:
        v = _softplus(v)
    return tl.where(t_mask, v, 0.0)


@triton.jit
def _load_bc(row, n, n_mask, n_off, t, t_mask, VAR: tl.constexpr, BC_const):
    """B or C as an [N_PAD, CHUNK] fp32 tile (variable) or [N_PAD, 1] column (constant)."""
    if VAR:
        val = tl.load(row + n_off[:, None] + t[None, :],
                      mask=n_mask[:, None] & t_mask[None, :], other=0.0).to(tl.float32)
    else:
        val = BC_const[:, None]
    return val


@triton.jit
def _bc_row(ptr, b, d, dim, G, N, L, VAR: tl.constexpr):
    """Pointer to this program's B/C: the (b, group) slab if variable, else row d."""
    if VAR:
        g = d // (dim // G)
        row = ptr + (b.to(tl.int64) * G + g) * N * L
    else:
        row = ptr + d.to(tl.int64) * N
    return row


@triton.jit
def _fwd_pass(u_row, dt_row, z_row, A_row, B_row, C_row, D, dbias,
              cs_row, acc_row, out_row, L, N, n_chunks,
              REVERSE: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
              HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, ACCUM: tl.constexpr,
              CHUNK: tl.constexpr, N_PAD: tl.constexpr):
    """Scan one (b, d) row in one direction; returns the final state [N_PAD].

    Writes out_row[t] = gated (y_t + D u_t) (plus acc_row[t] when ACCUM, an
    fp32 buffer holding the other direction) and cs_row[c, :] = state after
    chunk c.
    """
    s = tl.arange(0, CHUNK)
    n = tl.arange(0, N_PAD)
    n_mask = n < N
    n_off = n.to(tl.int64) * L  # offset of row n in a variable (N, L) B/C slab
    # Padded rows have A = 0 and B = C = 0: their state stays 0 and adds nothing.
    A = tl.load(A_row + n, mask=n_mask, other=0.0)
    B_const = A  # placeholders, replaced when B/C are constant
    C_const = A
    if not VAR_B:
        B_const = tl.load(B_row + n, mask=n_mask, other=0.0).to(tl.float32)
    if not VAR_C:
        C_const = tl.load(C_row + n, mask=n_mask, other=0.0).to(tl.float32)

    x = tl.zeros([N_PAD], dtype=tl.float32)
    for c in range(0, n_chunks):
        p = c * CHUNK + s  # processing-order step index
        t_mask = p < L
        if REVERSE:
            t = L - 1 - p
        else:
            t = p
        u = tl.load(u_row + t, mask=t_mask, other=0.0).to(tl.float32)
        dt = _delta(dt_row, t, t_mask, dbias, SOFTPLUS)
        B = _load_bc(B_row, n, n_mask, n_off, t, t_mask, VAR_B, B_const)
        C = _load_bc(C_row, n, n_mask, n_off, t, t_mask, VAR_C, C_const)

        # Padded rows (n >= N) have A = B = C = 0: keep them the identity
        # step even when dt is inf (inf * 0 would make them NaN, and the sum
        # over n would spread it into y).
        dA = tl.where(n_mask[:, None], tl.exp(dt[None, :] * A[:, None]), 1.0)
        dBu = tl.where(n_mask[:, None], B * (dt * u)[None, :], 0.0)
        # (a_cum, b_cum)[s] = composition of steps 0..s of the chunk, so the
        # state after step s is a_cum * x_carry + b_cum.
        a_cum, b_cum = tl.associative_scan((dA, dBu), axis=1, combine_fn=_affine_combine)
        xs = a_cum * x[:, None] + b_cum

        y = tl.sum(xs * C, axis=0) + D * u
        if HAS_Z:
            z = tl.load(z_row + t, mask=t_mask, other=0.0).to(tl.float32)
            y = y * z * _sigmoid(z)
        if ACCUM:
            y += tl.load(acc_row + t, mask=t_mask, other=0.0)
        tl.store(out_row + t, y.to(out_row.dtype.element_ty), mask=t_mask)

        # Masked tail steps are identities, so the last column is the state
        # after the chunk's last real step.
        x = tl.sum(tl.where(s[None, :] == CHUNK - 1, xs, 0.0), axis=1)
        tl.store(cs_row + c * N + n, x, mask=n_mask)
    return x


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _selective_scan_fwd_kernel(
        u_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dbias_ptr,
        out_ptr, last_ptr, cs_ptr,
        dim, L, N, GB, GC, n_chunks,
        REVERSE: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
        HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
        CHUNK: tl.constexpr, N_PAD: tl.constexpr):
    pid = tl.program_id(0)  # = b * dim + d
    b = pid // dim
    d = pid % dim
    row = pid.to(tl.int64) * L
    n = tl.arange(0, N_PAD)
    x = _fwd_pass(u_ptr + row, dt_ptr + row, z_ptr + row, A_ptr + d * N,
                  _bc_row(B_ptr, b, d, dim, GB, N, L, VAR_B),
                  _bc_row(C_ptr, b, d, dim, GC, N, L, VAR_C),
                  tl.load(D_ptr + d), tl.load(dbias_ptr + d),
                  cs_ptr + pid.to(tl.int64) * n_chunks * N, out_ptr + row, out_ptr + row,
                  L, N, n_chunks, REVERSE, VAR_B, VAR_C, HAS_Z, SOFTPLUS, False, CHUNK, N_PAD)
    tl.store(last_ptr + pid.to(tl.int64) * N + n, x, mask=n < N)


@triton.jit
def _bi_selective_scan_fwd_kernel(
        u_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dbias_ptr,
        ub_ptr, dtb_ptr, Ab_ptr, Bb_ptr, Cb_ptr, Db_ptr, dbiasb_ptr,
        out_ptr, acc_ptr, cs_ptr, csb_ptr,
        dim, L, N, GB, GC, GBb, GCb, n_chunks,
        VAR_B: tl.constexpr, VAR_C: tl.constexpr, VAR_BB: tl.constexpr, VAR_CB: tl.constexpr,
        HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
        CHUNK: tl.constexpr, N_PAD: tl.constexpr):
    pid = tl.program_id(0)  # = b * dim + d
    b = pid // dim
    d = pid % dim
    row = pid.to(tl.int64) * L
    cs_off = pid.to(tl.int64) * n_chunks * N
    # Pass 1, forward direction: gated result into the fp32 buffer acc
    # (which is `out` itself when out is fp32).
    _fwd_pass(u_ptr + row, dt_ptr + row, z_ptr + row, A_ptr + d * N,
              _bc_row(B_ptr, b, d, dim, GB, N, L, VAR_B),
              _bc_row(C_ptr, b, d, dim, GC, N, L, VAR_C),
              tl.load(D_ptr + d), tl.load(dbias_ptr + d),
              cs_ptr + cs_off, acc_ptr + row, acc_ptr + row,
              L, N, n_chunks, False, VAR_B, VAR_C, HAS_Z, SOFTPLUS, False, CHUNK, N_PAD)
    # Pass 2 reads what other threads of this program wrote in pass 1.
    tl.debug_barrier()
    # Pass 2, reverse direction: add to acc in fp32, cast once into out.
    _fwd_pass(ub_ptr + row, dtb_ptr + row, z_ptr + row, Ab_ptr + d * N,
              _bc_row(Bb_ptr, b, d, dim, GBb, N, L, VAR_BB),
              _bc_row(Cb_ptr, b, d, dim, GCb, N, L, VAR_CB),
              tl.load(Db_ptr + d), tl.load(dbiasb_ptr + d),
              csb_ptr + cs_off, acc_ptr + row, out_ptr + row,
              L, N, n_chunks, True, VAR_BB, VAR_CB, HAS_Z, SOFTPLUS, True, CHUNK, N_PAD)


@triton.jit
def _selective_scan_bwd_kernel(
        dout_ptr, dlast_ptr, u_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dbias_ptr, cs_ptr,
        du_ptr, ddt_ptr, dz_ptr, dA_part_ptr, dB_ptr, dC_ptr, dD_part_ptr, ddbias_part_ptr,
        dim, L, N, GB, GC, n_chunks,
        REVERSE: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
        HAS_Z: tl.constexpr, HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr,
        CHUNK: tl.constexpr, N_PAD: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Adjoint of one (b, d) row, chunks visited in reverse processing order.

    Per-channel gradients (dA, dD, ddelta_bias and constant dB/dC) are written
    as per-(b, d) partials that the launcher sums over batch (deterministic);
    variable dB/dC, shared by the channels of a group, are atomically added
    into fp32 buffers shaped like B/C, or with DETERMINISTIC stored as
    per-channel partials, (batch, dim, N, L), that the launcher sums over
    each group's channels in a fixed order.
    """
    pid = tl.program_id(0)  # = b * dim + d
    b = pid // dim
    d = pid % dim
    row = pid.to(tl.int64) * L
    cs_row = cs_ptr + pid.to(tl.int64) * n_chunks * N
    s = tl.arange(0, CHUNK)
    n = tl.arange(0, N_PAD)
    n_mask = n < N
    n_off = n.to(tl.int64) * L

    A = tl.load(A_ptr + d * N + n, mask=n_mask, other=0.0)
    D = tl.load(D_ptr + d)
    dbias = tl.load(dbias_ptr + d)
    B_row = _bc_row(B_ptr, b, d, dim, GB, N, L, VAR_B)
    C_row = _bc_row(C_ptr, b, d, dim, GC, N, L, VAR_C)
    # dB/dC use the same offsets as B/C (same shapes; fp32 buffers), or
    # one group per channel for the deterministic partials.
    if DETERMINISTIC:
        dB_row = _bc_row(dB_ptr, b, d, dim, dim, N, L, VAR_B)
        dC_row = _bc_row(dC_ptr, b, d, dim, dim, N, L, VAR_C)
    else:
        dB_row = _bc_row(dB_ptr, b, d, dim, GB, N, L, VAR_B)
        dC_row = _bc_row(dC_ptr, b, d, dim, GC, N, L, VAR_C)
    B_const = A  # placeholders, replaced when B/C are constant
    C_const = A
    if not VAR_B:
        B_const = tl.load(B_row + n, mask=n_mask, other=0.0).to(tl.float32)
    if not VAR_C:
        C_const = tl.load(C_row + n, mask=n_mask, other=0.0).to(tl.float32)

    # h_carry = adjoint of the state after the current chunk's last step that
    # flows in from later steps: dlast_state for the final chunk.
    if HAS_DLAST:
        h_carry = tl.load(dlast_ptr + pid.to(tl.int64) * N + n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        h_carry = tl.zeros([N_PAD], dtype=tl.float32)
    dA_acc = tl.zeros([N_PAD], dtype=tl.float32)
    dB_acc = tl.zeros([N_PAD], dtype=tl.float32)
    dC_acc = tl.zeros([N_PAD], dtype=tl.float32)
    dD_acc = tl.zeros([CHUNK], dtype=tl.float32)
    ddbias_acc = tl.zeros([CHUNK], dtype=tl.float32)

    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        p = c * CHUNK + s
        t_mask = p < L
        if REVERSE:
            t = L - 1 - p
        else:
            t = p

        # ---- recompute the chunk's states from its checkpoint
        # State before the chunk: checkpoint c-1, zeros for c = 0.
        prev = (c - 1) * N + n
        x0 = tl.load(cs_row + prev, mask=n_mask & (prev >= 0), other=0.0)
        u = tl.load(u_ptr + row + t, mask=t_mask, other=0.0).to(tl.float32)
        dt = _delta(dt_ptr + row, t, t_mask, dbias, SOFTPLUS)
        B = _load_bc(B_row, n, n_mask, n_off, t, t_mask, VAR_B, B_const)
        C = _load_bc(C_row, n, n_mask, n_off, t, t_mask, VAR_C, C_const)
        # Padded rows: identity steps, as in the forward.
        dA = tl.where(n_mask[:, None], tl.exp(dt[None, :] * A[:, None]), 1.0)
        dBu = tl.where(n_mask[:, None], B * (dt * u)[None, :], 0.0)
        # The gradients need x_{t-1} itself: rebuilding it from x_t as
        # x_t - dBu cancels when dA x_{t-1} is small next to dBu (large
        # steps) and is NaN for every later step after one NaN u. So scan
        # the chunk's steps shifted by one (the previous step's decay and
        # input at each position, identity at the first), which gives
        # x_{t-1} (x0 at the first step), then take one step to x_t.
        pm = p - 1
        tm_mask = (s > 0) & (pm < L)
        if REVERSE:
            tm = L - 1 - pm
        else:
            tm = pm
        u_m = tl.load(u_ptr + row + tm, mask=tm_mask, other=0.0).to(tl.float32)
        dt_m = _delta(dt_ptr + row, tm, tm_mask, dbias, SOFTPLUS)
        B_m = _load_bc(B_row, n, n_mask, n_off, tm, tm_mask, VAR_B, B_const)
        dA_m = tl.where(n_mask[:, None], tl.exp(dt_m[None, :] * A[:, None]), 1.0)
        dBu_m = tl.where(n_mask[:, None] & tm_mask[None, :], B_m * (dt_m * u_m)[None, :], 0.0)
        a_cum, b_cum = tl.associative_scan((dA_m, dBu_m), axis=1, combine_fn=_affine_combine)
        x_prev = a_cum * x0[:, None] + b_cum  # x_{t-1}
        xs = dA * x_prev + dBu  # x_t

        # ---- output gate
        dout = tl.load(dout_ptr + row + t, mask=t_mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + row + t, mask=t_mask, other=0.0).to(tl.float32)
            sig = _sigmoid(z)
            pre = tl.sum(xs * C, axis=0) + D * u
            dz = dout * pre * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=t_mask)
            dy = dout * z * sig
        else:
            dy = dout  # 0 on masked steps

        # ---- adjoint h_t = dy_t C_t + dA_{t+1} h_{t+1}, a reverse scan of
        # (dA_{t+1}, dy_t C_t). dA_{t+1} is the next processing step's decay,
        # reloaded at shifted indices; it is 1 past the last step, so the
        # final step picks up dlast_state from h_carry unchanged.
        p1 = p + 1
        t1_mask = p1 < L
        if REVERSE:
            t1 = L - 1 - p1
        else:
            t1 = p1
        dt1 = _delta(dt_ptr + row, t1, t1_mask, dbias, SOFTPLUS)
        dA1 = tl.where(n_mask[:, None], tl.exp(dt1[None, :] * A[:, None]), 1.0)
        a_rev, b_rev = tl.associative_scan((dA1, dy[None, :] * C), axis=1,
                                           combine_fn=_affine_combine, reverse=True)
        h = a_rev * h_carry[:, None] + b_rev
        # h at the chunk's first step feeds the previous chunk through that
        # chunk's last dA1 (the decay of this first step).
        h_carry = tl.sum(tl.where(s[None, :] == 0, h, 0.0), axis=1)

        # ---- gradients (masked steps past L add nothing, even where the
        # carried state is NaN or inf)
        hdt = h * dt[None, :]
        hx = (h * x_prev) * dA  # adjoint of dt A
        # Sums over n skip the padded rows (0 * inf there would be NaN).
        du = dy * D + tl.sum(tl.where(n_mask[:, None], hdt * B, 0.0), axis=0)
        ddt = tl.sum(tl.where(n_mask[:, None], A[:, None] * hx + (h * u[None, :]) * B, 0.0), axis=0)
        dA_acc += tl.sum(tl.where(t_mask[None, :], dt[None, :] * hx, 0.0), axis=1)
        dB_t = hdt * u[None, :]
        dC_t = tl.where(t_mask[None, :], dy[None, :] * xs, 0.0)
        nt_mask = n_mask[:, None] & t_mask[None, :]
        if VAR_B:
            if DETERMINISTIC:
                tl.store(dB_row + n_off[:, None] + t[None, :], dB_t, mask=nt_mask)
            else:
                tl.atomic_add(dB_row + n_off[:, None] + t[None, :], dB_t, mask=nt_mask, sem="relaxed")
        else:
            dB_acc += tl.sum(tl.where(t_mask[None, :], dB_t, 0.0), axis=1)
        if VAR_C:
            if DETERMINISTIC:
                tl.store(dC_row + n_off[:, None] + t[None, :], dC_t, mask=nt_mask)
            else:
                tl.atomic_add(dC_row + n_off[:, None] + t[None, :], dC_t, mask=nt_mask, sem="relaxed")
        else:
            dC_acc += tl.sum(dC_t, axis=1)
        dD_acc += dy * u

        # Back through bias + softplus to the raw delta input.
        if SOFTPLUS:
            v = tl.load(dt_ptr + row + t, mask=t_mask, other=0.0).to(tl.float32) + dbias
            ddt = tl.where(v <= 20.0, ddt * _sigmoid(v), ddt)
        ddt = tl.where(t_mask, ddt, 0.0)
        ddbias_acc += ddt
        tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=t_mask)
        tl.store(ddt_ptr + row + t, ddt.to(ddt_ptr.dtype.element_ty), mask=t_mask)

    part = pid.to(tl.int64) * N + n
    tl.store(dA_part_ptr + part, dA_acc, mask=n_mask)
    if not VAR_B:
        tl.store(dB_ptr + part, dB_acc, mask=n_mask)  # dB is a (batch, dim, N) partial here
    if not VAR_C:
        tl.store(dC_ptr + part, dC_acc, mask=n_mask)
    tl.store(dD_part_ptr + pid, tl.sum(dD_acc, axis=0))
    tl.store(ddbias_part_ptr + pid, tl.sum(ddbias_acc, axis=0))


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _n_pad(N: int) -> int:
    assert 1 <= N <= 256, f"selective_scan: N must be in [1, 256], got {N}"
    return triton.next_power_of_2(N)


def _num_warps(n_pad: int, chunk_len: int) -> int:
    # About 8 tile elements per thread, 1 to 8 warps.
    return max(1, min(8, (n_pad * chunk_len) // 256))


# Register budgets at 8 warps (launch options; none given: ptxas's choice). Without
# one, ptxas fitted the kernels at N 16 to 80 or 128 registers (three or two 8-warp
# blocks per SM) and spilled 12-20 B (bench/compile_check.py). The forward fits 128
# without spilling up to N 64 (two blocks per SM); the backward needs more (up to 255).
def _fwd_budget(n_pad: int, num_warps: int) -> dict:
    return {"maxnreg": 128} if num_warps == 8 and n_pad <= 64 else {}


def _bwd_budget(num_warps: int) -> dict:
    return {"maxnreg": 255} if num_warps == 8 else {}


def _check_chunk(chunk_len: int) -> None:
    assert chunk_len >= 1 and chunk_len & (chunk_len - 1) == 0, \
        f"chunk_len must be a power of 2, got {chunk_len}"


def _groups(BC: torch.Tensor, dim: int) -> tuple[bool, int]:
    """(is_variable, G) for a B/C operand."""
    if BC.dim() == 4:
        G = BC.shape[1]
        assert G >= 1 and dim % G == 0, f"G={G} must divide dim={dim}"
        return True, G
    assert BC.dim() == 2, "B/C must be (dim, N) or (batch, G, N, L)"
    return False, 1


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                       reverse: bool, chunk_len: int):
    """-> (out (batch, dim, L) u.dtype, last_state (batch, dim, N) fp32,
    chunk_states (batch, dim, ceil(L / chunk_len), N) fp32)."""
    _check_chunk(chunk_len)
    batch, dim, L = u.shape
    N = A.shape[1]
    n_pad = _n_pad(N)
    var_b, GB = _groups(B, dim)
    var_c, GC = _groups(C, dim)
    n_chunks = triton.cdiv(L, chunk_len)
    out = torch.empty_like(u)
    last_state = torch.zeros(batch, dim, N, device=u.device, dtype=torch.float32)
    chunk_states = torch.empty(batch, dim, n_chunks, N, device=u.device, dtype=torch.float32)
    if batch * dim == 0 or L == 0:
        return out, last_state, chunk_states
    num_warps = _num_warps(n_pad, chunk_len)
    _selective_scan_fwd_kernel[(batch * dim,)](
        u, delta, z if z is not None else u, A, B, C, D, delta_bias,
        out, last_state, chunk_states,
        dim, L, N, GB, GC, n_chunks,
        REVERSE=bool(reverse), VAR_B=var_b, VAR_C=var_c, HAS_Z=z is not None,
        SOFTPLUS=bool(delta_softplus), CHUNK=chunk_len, N_PAD=n_pad,
        num_warps=num_warps, **_fwd_budget(n_pad, num_warps))
    return out, last_state, chunk_states


def bi_selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                          u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
                          delta_softplus: bool, chunk_len: int):
    """Vim's bidirectional scan, both directions in one launch.

    -> (out, chunk_states, chunk_states_b); out = silu(z) * ((y + D u) + (y_b + D_b u_b))
    where the *_b scan runs from t = L-1 down to 0; chunk_states_b counts
    chunks in that (reverse) processing order.
    """
    _check_chunk(chunk_len)
    batch, dim, L = u.shape
    N = A.shape[1]
    assert A_b.shape[1] == N, "both directions must share N"
    n_pad = _n_pad(N)
    var_b, GB = _groups(B, dim)
    var_c, GC = _groups(C, dim)
    var_bb, GBb = _groups(B_b, dim)
    var_cb, GCb = _groups(C_b, dim)
    n_chunks = triton.cdiv(L, chunk_len)
    out = torch.empty_like(u)
    # fp32 out can hold the forward partial sum itself; otherwise use scratch.
    acc = out if out.dtype == torch.float32 else torch.empty(u.shape, device=u.device,
                                                             dtype=torch.float32)
    cs = torch.empty(batch, dim, n_chunks, N, device=u.device, dtype=torch.float32)
    cs_b = torch.empty_like(cs)
    if batch * dim == 0 or L == 0:
        return out, cs, cs_b
    _bi_selective_scan_fwd_kernel[(batch * dim,)](
        u, delta, z if z is not None else u, A, B, C, D, delta_bias,
        u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
        out, acc, cs, cs_b,
        dim, L, N, GB, GC, GBb, GCb, n_chunks,
        VAR_B=var_b, VAR_C=var_c, VAR_BB=var_bb, VAR_CB=var_cb, HAS_Z=z is not None,
        SOFTPLUS=bool(delta_softplus), CHUNK=chunk_len, N_PAD=n_pad,
        num_warps=_num_warps(n_pad, chunk_len))
    return out, cs, cs_b


def selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                       delta_softplus: bool, reverse: bool, chunk_len: int):
    """-> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); see the module docstring.

    dz is an empty tensor when z is None; dB/dC match B/C in shape and dtype.
    Under torch.use_deterministic_algorithms(True), variable dB/dC come from
    per-channel partials summed in a fixed order (dim / G times dB's memory,
    in float32) instead of float atomics: bit-identical run to run.
    """
    _check_chunk(chunk_len)
    batch, dim, L = u.shape
    N = A.shape[1]
    n_pad = _n_pad(N)
    var_b, GB = _groups(B, dim)
    var_c, GC = _groups(C, dim)
    n_chunks = triton.cdiv(L, chunk_len)
    assert chunk_states.shape == (batch, dim, n_chunks, N), "chunk_states shape mismatch"
    dev, f32 = u.device, torch.float32

    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else torch.empty(0, device=dev, dtype=u.dtype)
    dA_part = torch.zeros(batch, dim, N, device=dev, dtype=f32)
    dD_part = torch.zeros(batch, dim, device=dev, dtype=f32)
    ddbias_part = torch.zeros(batch, dim, device=dev, dtype=f32)
    # Variable: fp32 accumulators shaped like B/C (per-channel partials when
    # deterministic). Constant: (batch, dim, N) partials.
    deterministic = torch.are_deterministic_algorithms_enabled()

    def grad_buffer(var, shape):
        if not var:
            return torch.zeros(batch, dim, N, device=dev, dtype=f32)
        return torch.zeros((batch, dim, N, L) if deterministic else shape, device=dev, dtype=f32)
    dB_buf, dC_buf = grad_buffer(var_b, B.shape), grad_buffer(var_c, C.shape)

    if batch * dim > 0 and L > 0:
        num_warps = _num_warps(n_pad, chunk_len)
        _selective_scan_bwd_kernel[(batch * dim,)](
            dout, dlast_state if dlast_state is not None else dA_part,
            u, delta, z if z is not None else u, A, B, C, D, delta_bias, chunk_states,
            du, ddelta, dz if z is not None else du, dA_part, dB_buf, dC_buf, dD_part, ddbias_part,
            dim, L, N, GB, GC, n_chunks,
            REVERSE=bool(reverse), VAR_B=var_b, VAR_C=var_c, HAS_Z=z is not None,
            HAS_DLAST=dlast_state is not None, SOFTPLUS=bool(delta_softplus),
            CHUNK=chunk_len, N_PAD=n_pad, DETERMINISTIC=deterministic, num_warps=num_warps,
            **_bwd_budget(num_warps))
    else:
        du.zero_()
        ddelta.zero_()
        dz.zero_()

    def finish(buf, var, G, like):
        if not var:
            return buf.sum(0).to(like.dtype)
        if deterministic:  # per-channel partials -> the group's sum
            buf = buf.view(batch, G, dim // G, N, L).sum(2)
        return buf.to(like.dtype)
    dB, dC = finish(dB_buf, var_b, GB, B), finish(dC_buf, var_c, GC, C)
    return du, ddelta, dA_part.sum(0), dB, dC, dD_part.sum(0), dz, ddbias_part.sum(0)
