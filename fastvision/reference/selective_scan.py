"""Pure-PyTorch selective scan (S6), the oracle the fast paths are tested against.

Semantics follow ``selective_scan_ref`` of state-spaces/mamba: fp32 state,
softplus with threshold 20, grouped B/C repeated over ``dim // G`` channels,
``out = (y + D * u) * silu(z)``, output cast back to ``u``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_channel(BC: torch.Tensor, dim: int, acc: torch.dtype) -> torch.Tensor:
    """B or C as (batch, dim, N, L) (variable) or (dim, N) (constant) in the accumulate dtype."""
    BC = BC.to(acc)
    if BC.dim() == 3:  # (batch, N, L): shared by every channel
        return BC.unsqueeze(1)
    if BC.dim() == 4:  # (batch, G, N, L): channel d uses group d // (dim // G)
        return BC.repeat_interleave(dim // BC.shape[1], dim=1)
    return BC


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False, *, reverse=False):
    """x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t;  y_t = C_t . x_t (+ D u_t);  out = y * silu(z).

    ``reverse=True`` runs the same recurrence from t = L-1 down to 0.
    """
    dtype_in = u.dtype
    acc = torch.float64 if dtype_in == torch.float64 else torch.float32  # fp32 state, as the anchor
    u = u.to(acc)
    delta = delta.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(acc)
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, as the anchor
    batch, dim, L = u.shape
    A = A.to(acc)
    B = _per_channel(B, dim, acc)
    C = _per_channel(C, dim, acc)
    x = u.new_zeros(batch, dim, A.shape[1])
    ys = [None] * L
    steps = range(L - 1, -1, -1) if reverse else range(L)
    for t in steps:
        Bt = B[..., t] if B.dim() == 4 else B
        Ct = C[..., t] if C.dim() == 4 else C
        dt = delta[:, :, t, None]
        x = torch.exp(dt * A) * x + dt * Bt * u[:, :, t, None]
        ys[t] = (x * Ct).sum(-1)
    y = torch.stack(ys, dim=2) if L else u.new_zeros(batch, dim, 0)
    out = y if D is None else y + u * D.to(acc)[:, None]
    if z is not None:
        out = out * F.silu(z.to(acc))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def bi_selective_scan_ref(u, delta, A, B, C, D, z, delta_bias,
                          u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
                          delta_softplus=True):
    """Vim's bidirectional ("v2") scan, written with flips as Vim does.

    forward scan over (u, delta, ...) plus a scan of the flipped *_b tensors
    flipped back, each gated by silu(z), summed.
    """
    fwd = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    def flip(t):
        return None if t is None or t.dim() < 3 else t.flip(-1)

    bwd = selective_scan_ref(u_b.flip(-1), delta_b.flip(-1), A_b,
                             flip(B_b) if B_b.dim() >= 3 else B_b,
                             flip(C_b) if C_b.dim() >= 3 else C_b,
                             D_b, flip(z), delta_bias_b, delta_softplus)
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    return (fwd.to(acc) + bwd.flip(-1).to(acc)).to(u.dtype)
