"""Mamba-1 block (with Vision Mamba's bidirectional "v2" variant) and RMSNorm.

Layers only: the selective scan itself is :func:`fastvision.ops.selective_scan`
/ :func:`fastvision.ops.bi_selective_scan`; everything else here is plain
PyTorch.

Parameter names, shapes and initialisation follow ``Mamba`` of
state-spaces/mamba (``mamba_ssm/modules/mamba_simple.py``) and its
bidirectional extension in hustvl/Vim
(``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py``), so that their
checkpoints load with ``strict=True``:

    in_proj.weight (2*d_inner, d_model)      [in_proj.bias when bias=True]
    conv1d.weight (d_inner, 1, d_conv)       conv1d.bias (d_inner,) when conv_bias
    x_proj.weight (dt_rank + 2*d_state, d_inner)
    dt_proj.weight (d_inner, dt_rank)        dt_proj.bias (d_inner,)
    A_log (d_inner, d_state)                 D (d_inner,)
    out_proj.weight (d_model, d_inner)       [out_proj.bias when bias=True]
    bimamba_type="v2" adds A_b_log, conv1d_b.*, x_proj_b.weight, dt_proj_b.*, D_b
    init_layer_scale adds gamma (d_model,)

Vim's v2 block runs a second, independent Mamba branch over the *flipped*
sequence (``xz.flip(-1)``) and flips its output back.  Here no flipped copy
of any activation is made:

* the causal depthwise conv over the flipped sequence, flipped back, is an
  anti-causal conv over the original order with the kernel reversed:
  ``flip(causal(flip(x), w))[s] = b + sum_j w[K-1-j] x[s+j]``
  (see :func:`_anticausal_depthwise_conv1d`);
* the x_proj_b / dt_proj_b projections act per position, so order is moot;
* the scan over the flipped sequence, flipped back, is the same recurrence run
  from t = L-1 down to 0, which ``bi_selective_scan`` fuses with the forward
  scan (both gated by ``silu(z)``, summed).
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The module, not the function fastvision.ops re-exports under the same name.
scan_ops = importlib.import_module(".selective_scan", __package__)

__all__ = ["Mamba", "RMSNorm", "rms_norm_fn", "layer_norm_fn"]


# --------------------------------------------------------------------------- #
# Norms: plain-PyTorch equivalents of mamba_ssm.ops.triton.layer_norm's
# rms_norm_fn / layer_norm_fn (dropout, rowscale and x1 options left out).
# --------------------------------------------------------------------------- #
def _add_residual(x, residual, residual_in_fp32):
    """fp32 sum of x and residual plus the dtype mamba's fused kernel stores it in."""
    s = x.float() if residual is None else x.float() + residual.float()
    if residual is not None:
        res_dtype = residual.dtype
    else:
        res_dtype = torch.float32 if residual_in_fp32 else x.dtype
    return s, res_dtype


def rms_norm_fn(x, weight, bias=None, residual=None, eps=1e-6, prenorm=False,
                residual_in_fp32=False):
    """``y = (x + residual) / rms(x + residual) * weight (+ bias)``, computed in fp32.

    Returns ``y`` in ``x.dtype``; with ``prenorm=True`` returns ``(y, x + residual)``,
    the sum stored in ``residual.dtype`` (fp32 if ``residual is None and
    residual_in_fp32``, else ``x.dtype``), as mamba's fused add+norm does.
    """
    s, res_dtype = _add_residual(x, residual, residual_in_fp32)
    y = s * torch.rsqrt(s.square().mean(dim=-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return (y, s.to(res_dtype)) if prenorm else y


def layer_norm_fn(x, weight, bias=None, residual=None, eps=1e-6, prenorm=False,
                  residual_in_fp32=False):
    """LayerNorm counterpart of :func:`rms_norm_fn` (same residual/dtype rules)."""
    s, res_dtype = _add_residual(x, residual, residual_in_fp32)
    y = F.layer_norm(s, s.shape[-1:],
                     None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    y = y.to(x.dtype)
    return (y, s.to(res_dtype)) if prenorm else y


class RMSNorm(nn.Module):
    """RMSNorm with mamba's names: ``weight`` (ones), ``bias`` registered as None, ``eps``.

    ``forward(x, residual=None, prenorm=False, residual_in_fp32=False)`` mirrors
    mamba's RMSNorm, including the optional fused residual add.

    Example::

        >>> import torch
        >>> from fastvision.ops import RMSNorm
        >>> RMSNorm(192)(torch.randn(2, 197, 192)).shape
        torch.Size([2, 197, 192])
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False,
                residual_in_fp32: bool = False):
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps,
                           prenorm=prenorm, residual_in_fp32=residual_in_fp32)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


# --------------------------------------------------------------------------- #
# Depthwise short convolutions
# --------------------------------------------------------------------------- #
def _causal_depthwise_conv1d(x, weight, bias):
    """out[t] = bias + sum_k weight[k] * x[t - (K-1) + k]  (zeros before t = 0).

    x: (batch, dim, L); weight: (dim, 1, K).  Same as mamba's
    ``conv1d(x)[..., :L]`` with ``padding=K-1``.
    """
    K = weight.shape[-1]
    return F.conv1d(x, weight, bias, padding=K - 1, groups=x.shape[1])[..., : x.shape[-1]]


def _anticausal_depthwise_conv1d(x, weight, bias):
    """``flip(causal_conv(flip(x), weight))`` without flipping x.

    With x'[t] = x[L-1-t]:  causal(x')[L-1-s] = b + sum_k w[k] x'[L-1-s-(K-1)+k]
    = b + sum_k w[k] x[s+(K-1)-k] = b + sum_j w[K-1-j] x[s+j]  (zeros past L-1),
    i.e. a cross-correlation with the reversed kernel, padded on the right.
    The full ``padding=K-1`` conv yields L+K-1 outputs; output i sees
    x[i-(K-1) .. i], so the wanted ones are i = s+K-1, the last L.
    """
    K = weight.shape[-1]
    return F.conv1d(x, weight.flip(-1), bias, padding=K - 1, groups=x.shape[1])[..., K - 1:]


# --------------------------------------------------------------------------- #
# Mamba block
# --------------------------------------------------------------------------- #
class Mamba(nn.Module):
    """Mamba-1 mixer: (batch, L, d_model) -> (batch, L, d_model), full sequence.

    Arguments match ``mamba_ssm.modules.mamba_simple.Mamba`` plus Vim's
    ``bimamba_type`` ("none" or "v2"), ``if_divide_out`` (halve the summed v2
    branches) and ``init_layer_scale`` (learned ``gamma`` output scale).
    ``use_fast_path`` is accepted for compatibility and ignored.  Step-wise
    decoding (``inference_params`` with ``seqlen_offset > 0``) is not supported.

    Example::

        >>> import torch
        >>> from fastvision.ops import Mamba
        >>> block = Mamba(d_model=192, d_state=16, bimamba_type="v2")  # Vim-T's mixer
        >>> block(torch.randn(2, 197, 192)).shape
        torch.Size([2, 197, 192])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        bimamba_type: str = "none",
        if_divide_out: bool = False,
        init_layer_scale: float | None = None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if bimamba_type == "v1":
            raise NotImplementedError(
                "Mamba: bimamba_type='v1' (Vim's shared-conv bidirectional variant) is not "
                "implemented; Vim's published models use bimamba_type='v2'")
        if bimamba_type not in ("none", "v2"):
            raise ValueError(f"Mamba: bimamba_type must be 'none' or 'v2', got {bimamba_type!r}")
        if dt_init not in ("constant", "random"):
            raise ValueError(f"Mamba: dt_init must be 'constant' or 'random', got {dt_init!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.bimamba_type = bimamba_type
        self.if_divide_out = if_divide_out
        self.init_layer_scale = init_layer_scale
        if init_layer_scale is not None:
            self.gamma = nn.Parameter(init_layer_scale * torch.ones(d_model, **factory_kwargs))

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = self._make_conv(conv_bias, factory_kwargs)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False,
                                **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # dt projection: weight preserves variance; bias = softplus^-1(dt),
        # dt log-uniform in [dt_min, dt_max] (floored at dt_init_floor).
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(
            torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        # A model-level init that zeroes Linear biases must skip this one (mamba's flag).
        self.dt_proj.bias._no_reinit = True

        # S4D-real A (kept in fp32) and D skip (fp32), as mamba.
        self.A_log = nn.Parameter(self._s4d_real_log(device))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        if bimamba_type == "v2":
            self.A_b_log = nn.Parameter(self._s4d_real_log(device))
            self.A_b_log._no_weight_decay = True
            self.conv1d_b = self._make_conv(conv_bias, factory_kwargs)
            self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False,
                                      **factory_kwargs)
            # As in Vim: default nn.Linear init, no dt-specific init, no _no_reinit flag
            # (so VisionMamba's init zeroes dt_proj_b.bias, exactly as Vim does).
            self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)
            self.D_b = nn.Parameter(torch.ones(self.d_inner, device=device))
            self.D_b._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    def _make_conv(self, conv_bias, factory_kwargs):
        # Depthwise; padding kept as mamba's so the module (and its repr) matches.
        return nn.Conv1d(self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner,
                         padding=self.d_conv - 1, bias=conv_bias, **factory_kwargs)

    def _s4d_real_log(self, device):
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        return torch.log(A).expand(self.d_inner, -1).contiguous()

    def _ssm_inputs(self, x, x_proj, dt_proj):
        """x: (batch, d_inner, L) -> delta (batch, d_inner, L), B, C (batch, d_state, L)."""
        x_dbl = torch.matmul(x_proj.weight, x)  # (batch, dt_rank + 2 N, L), per position
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = torch.matmul(dt_proj.weight, dt)  # bias is added (in fp32) by the scan
        return delta, B.contiguous(), C.contiguous()

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        if inference_params is not None and getattr(inference_params, "seqlen_offset", 0) > 0:
            raise NotImplementedError("Mamba: step-wise decoding (seqlen_offset > 0) is not supported")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba: hidden_states must be (batch, seqlen, {self.d_model}), "
                f"got {tuple(hidden_states.shape)}")
        # Looked up per call, so that tests can swap in other implementations.
        selective_scan, bi_selective_scan = scan_ops.selective_scan, scan_ops.bi_selective_scan

        # (d_out, d_model) @ (batch, d_model, L) -> (batch, 2 d_inner, L), L fastest.
        xz = torch.matmul(self.in_proj.weight, hidden_states.transpose(1, 2))
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(dtype=xz.dtype)[:, None]
        x, z = xz.chunk(2, dim=1)

        A = -torch.exp(self.A_log.float())
        u = self.act(_causal_depthwise_conv1d(x, self.conv1d.weight, self.conv1d.bias))
        delta, B, C = self._ssm_inputs(u, self.x_proj, self.dt_proj)

        if self.bimamba_type == "v2":
            A_b = -torch.exp(self.A_b_log.float())
            u_b = self.act(_anticausal_depthwise_conv1d(x, self.conv1d_b.weight, self.conv1d_b.bias))
            delta_b, B_b, C_b = self._ssm_inputs(u_b, self.x_proj_b, self.dt_proj_b)
            y = bi_selective_scan(
                u, delta, A, B, C, self.D.float(), z, self.dt_proj.bias.float(),
                u_b, delta_b, A_b, B_b, C_b, self.D_b.float(), self.dt_proj_b.bias.float(),
                delta_softplus=True,
            )
            if self.if_divide_out:
                y = y / 2
        else:
            y = selective_scan(u, delta, A, B, C, self.D.float(), z=z,
                               delta_bias=self.dt_proj.bias.float(), delta_softplus=True)

        out = F.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)
        if self.init_layer_scale is not None:
            out = out * self.gamma
        return out

    def extra_repr(self):
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"expand={self.expand}, dt_rank={self.dt_rank}, bimamba_type={self.bimamba_type!r}, "
                f"if_divide_out={self.if_divide_out}")
