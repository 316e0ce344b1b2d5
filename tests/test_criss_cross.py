"""Criss-cross attention specifics (the generic checks run on tests/conformance/criss_cross.py).

* The reference equals mmcv's einsum formulation, written out here as mmcv
  writes it (the -inf diagonal added, one softmax over the concatenation).
* The layer: mmcv's parameter names, gamma 0 at first, y = gamma * cca + x
  equal to mmcv's module on the same weights, mmcv / official CCNet state
  dicts load with strict=True.
* RCCAModule / ccnet_head: CCNet's module names, forward and backward on CPU,
  the recurrence reuses one attention.
* The CPU kernel's determinism (bit-identical gradients across thread counts)
  and the direct calls' errors (C++ entry points and Python checks).
* The Triton launchers under the interpreter with small blocks (several w,
  partner and channel blocks per call).
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvision.models import ccnet_head
from fastvision.ops import CrissCrossAttention, RCCAModule, criss_cross_attention
from fastvision.reference.criss_cross import criss_cross_attention_ref
from fastvision.testing import assert_close, import_triton_kernels_interpreted


def mmcv_formula(query, key, value):
    """mmcv's CrissCrossAttention.forward between its convolutions and gamma (einsum version)."""
    B, C, H, W = value.shape
    energy_h = torch.einsum("bchw,bciw->bwhi", query, key) + torch.diag(
        torch.tensor(float("-inf"), dtype=query.dtype).repeat(H), 0)
    energy_h = energy_h.transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", query, key)
    attn = F.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)
    out = torch.einsum("bciw,bhwi->bchw", value, attn[..., :H])
    return out + torch.einsum("bchj,bhwj->bchw", value, attn[..., H:])


class MmcvCCA(nn.Module):
    """mmcv.ops.CrissCrossAttention's parameters and forward (mmcv.cnn.Scale as `gamma.scale`)."""

    def __init__(self, in_channels):
        super().__init__()
        self.query_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = nn.Module()
        self.gamma.scale = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x):
        out = mmcv_formula(self.query_conv(x), self.key_conv(x), self.value_conv(x))
        return out * self.gamma.scale + x


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 7), (1, 2, 3, 1, 6), (2, 4, 2, 6, 1), (1, 1, 1, 1, 1)])
def test_reference_is_mmcv_formula(shape):
    B, Cqk, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, Cqk, H, W, generator=g, dtype=torch.float64), torch.randn(B, Cqk, H, W, generator=g,
                                                                                      dtype=torch.float64)
    v = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    torch.testing.assert_close(criss_cross_attention_ref(q, k, v), mmcv_formula(q, k, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(criss_cross_attention(q, k, v), mmcv_formula(q, k, v), rtol=1e-10, atol=1e-12)


def test_self_is_counted_once_in_its_row():
    """Only the pixel's own key matches its query: it gets the weight of one logit
    (in its row), not two (the column's copy is -inf)."""
    H, W = 3, 4
    q = torch.zeros(1, 1, H, W, dtype=torch.float64)
    k = torch.zeros_like(q)
    v = torch.zeros(1, 1, H, W, dtype=torch.float64)
    q[0, 0, 1, 2] = k[0, 0, 1, 2] = 1.0  # logit 1 at the pixel itself, 0 elsewhere
    v[0, 0, 1, 2] = 1.0
    out = criss_cross_attention(q, k, v)
    e = torch.e
    expect = e / (e + (H - 1) + (W - 1))  # H - 1 column logits, W - 1 others in the row
    assert out[0, 0, 1, 2].item() == pytest.approx(expect, rel=1e-12)


# --------------------------------------------------------------------------
# Layers


def test_layer_matches_mmcv_module_and_loads_its_state_dict():
    torch.manual_seed(0)
    ours, mmcv = CrissCrossAttention(32), MmcvCCA(32)
    assert ours.gamma.scale.item() == 0.0
    assert set(ours.state_dict()) == set(mmcv.state_dict()) == {
        "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
        "value_conv.weight", "value_conv.bias", "gamma.scale"}
    with torch.no_grad():
        mmcv.gamma.scale.fill_(0.7)
    ours.load_state_dict(mmcv.state_dict(), strict=True)
    x = torch.randn(2, 32, 9, 11)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), mmcv(x2)
    assert_close(y1, y2)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    assert_close(x1.grad, x2.grad, scale=20)
    for (n, a), b in zip(ours.named_parameters(), mmcv.parameters()):
        assert_close(a.grad, b.grad, scale=20, msg=n)


def test_layer_loads_official_ccnet_gamma():
    """speedinghzl/CCNet stores gamma as a bare (1,) parameter named `gamma`."""
    ours = CrissCrossAttention(16)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    state["gamma"] = torch.tensor([0.25])
    del state["gamma.scale"]
    ours.load_state_dict(state, strict=True)
    assert ours.gamma.scale.item() == 0.25


def test_layer_rejects_wrong_input():
    with pytest.raises(ValueError, match=r"CrissCrossAttention: x must be a \(batch, 16, H, W\) tensor"):
        CrissCrossAttention(16)(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        CrissCrossAttention(0)


def test_rcca_module_names_and_training_step():
    torch.manual_seed(0)
    head = ccnet_head(64, num_classes=5, recurrence=2, channels=24)
    names = set(head.state_dict())
    for n in ("conva.0.weight", "conva.1.weight", "conva.1.running_mean", "cca.query_conv.weight",
              "cca.gamma.scale", "convb.0.weight", "convb.1.running_var", "bottleneck.0.weight",
              "bottleneck.1.bias", "bottleneck.3.weight", "bottleneck.3.bias"):
        assert n in names, n
    assert head.conva[0].out_channels == 16 and head.bottleneck[0].in_channels == 64 + 16
    with torch.no_grad():
        head.cca.gamma.scale.fill_(0.5)  # else the attention has no effect at initialisation
    x = torch.randn(2, 64, 9, 13, requires_grad=True)
    y = head(x)
    assert y.shape == (2, 5, 9, 13)
    y.square().mean().backward()
    for n, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert torch.isfinite(x.grad).all()


def test_rcca_recurrence_reuses_one_attention():
    torch.manual_seed(1)
    m = RCCAModule(32, 8, recurrence=3).eval()
    with torch.no_grad():
        m.cca.gamma.scale.fill_(1.0)
        x = torch.randn(1, 32, 6, 7)
        a = m.conva(x)
        for _ in range(3):
            a = m.cca(a)
        expect = m.bottleneck(torch.cat([x, m.convb(a)], 1))
        assert_close(m(x), expect)
    assert RCCAModule(32, 8).recurrence == 2


# --------------------------------------------------------------------------
# CPU kernel: determinism, direct calls


def test_no_value_channels_keeps_batch_elements_apart():
    """C = 0: no channel step runs in the column backward, whose dS buffer is reused
    from one batch element (and group of columns) to the next; a NaN in one
    element's query must not reach the others' gradients (all zero, as the
    reference's)."""
    q, k = torch.randn(3, 3, 4, 5), torch.randn(3, 3, 4, 5)
    q[0, 0, 0, 0] = float("nan")
    v = torch.randn(3, 0, 4, 5)
    grads = []
    for fn in (criss_cross_attention, criss_cross_attention_ref):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        fn(qq, kk, v).sum().backward()
        grads.append((qq.grad[1:], kk.grad[1:]))
    for got, want in zip(*grads):
        assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))


def test_cpu_backward_is_bit_identical_across_thread_counts():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 24, 19, generator=g), torch.randn(2, 8, 24, 19, generator=g)
    # 40 value channels: two channel steps of the column passes
    v, dout = torch.randn(2, 40, 24, 19, generator=g), torch.randn(2, 40, 24, 19, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, lse = torch.ops.fastvision.criss_cross_fwd(q, k, v)
            results.append((out, lse, *torch.ops.fastvision.criss_cross_bwd(dout, q, k, v, out, lse)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def _direct_args():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 5, 3, 4)
    out, lse = torch.ops.fastvision.criss_cross_fwd(q, k, v)
    return q, k, v, out, lse


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {"key": a["key"][:, :1].contiguous()}, "key must have shape (batch, Cqk, H, W) like query"),
    (lambda a: {"query": a["query"][0]}, "query must be a 4-D tensor (batch, Cqk, H, W)"),
    (lambda a: {"value": a["value"][:, :, :2].contiguous()}, "value must have shape (batch, C, H, W)"),
    (lambda a: {"value": a["value"].double()}, "value must be float32 (query's dtype)"),
    (lambda a: {"query": a["query"].int()}, "query must be float32, float16, bfloat16 or float64"),
    (lambda a: {"key": a["key"].transpose(2, 3)}, "key must"),
    (lambda a: {"lse": a["lse"].double()}, "lse must be float32 (the accumulate dtype"),
    (lambda a: {"lse": a["lse"][:, :2].contiguous()}, "lse must have shape (batch, H, W)"),
    (lambda a: {"out": a["out"][:, :4].contiguous()}, "out must have shape (batch, C, H, W) like value"),
    (lambda a: {"dout": a["dout"].half()}, "dout must be float32 (query's dtype)"),
    (lambda a: {"query": a["query"].transpose(2, 3).contiguous().transpose(2, 3)}, "query must be contiguous"),
])
def test_direct_calls_raise_value_errors(mutate, match):
    """The C++ entry points check every tensor they touch; the Python checks
    (fake and Triton kernels) say the same."""
    q, k, v, out, lse = _direct_args()
    a = dict(dout=torch.randn_like(out), query=q, key=k, value=v, out=out, lse=lse)
    a.update(mutate(a))
    bwd_args = [a[n] for n in ("dout", "query", "key", "value", "out", "lse")]
    with pytest.raises(ValueError, match=r"^fastvision\.criss_cross_bwd: " + __import__("re").escape(match)):
        torch.ops.fastvision.criss_cross_bwd(*bwd_args)
    from fastvision.ops.criss_cross import _CC
    with pytest.raises(ValueError, match=r"^fastvision\.criss_cross_bwd: "):
        _CC.backward.check(*bwd_args)
    if {"dout", "out", "lse"}.isdisjoint(mutate(a)):
        with pytest.raises(ValueError, match=r"^fastvision\.criss_cross_fwd: "):
            torch.ops.fastvision.criss_cross_fwd(a["query"], a["key"], a["value"])
        with pytest.raises(ValueError, match=r"^fastvision\.criss_cross_fwd: "):
            _CC.forward.check(a["query"], a["key"], a["value"])


def test_direct_call_on_meta_checks_shapes():
    q = torch.randn(1, 2, 3, 4, device="meta")
    with pytest.raises(ValueError, match="fastvision.criss_cross_fwd: key must have shape"):
        torch.ops.fastvision.criss_cross_fwd(q, torch.randn(1, 3, 3, 4, device="meta"), q)
    out, lse = torch.ops.fastvision.criss_cross_fwd(q, q, torch.randn(1, 5, 3, 4, device="meta"))
    assert out.shape == (1, 5, 3, 4) and lse.shape == (1, 3, 4) and lse.dtype == torch.float32


# --------------------------------------------------------------------------
# Triton launchers, interpreted, with small blocks

# The kernels use no tl.dot, so the interpreter takes blocks of 4: every axis crosses blocks cheaply.
SMALL = dict(BW=4, BK=4, BCH=4, BC=4)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(1, 5, 6, 6, 7), (2, 3, 5, 1, 9), (1, 4, 3, 9, 1)],
                         ids=["blocks-crossed", "one-row", "one-column"])
def test_triton_launchers_small_blocks(shape):
    tc = import_triton_kernels_interpreted("fastvision.triton.criss_cross")
    B, Cqk, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, Cqk, H, W, generator=g), torch.randn(B, Cqk, H, W, generator=g)
    v, dout = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    out, lse = tc.criss_cross_fwd(q, k, v, blocks=SMALL)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = criss_cross_attention_ref(*leaves, return_lse=True)
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    dq, dk, dv = tc.criss_cross_bwd(dout, q, k, v, out, lse, blocks=SMALL)
    for got, want in zip((dq, dk, dv), torch.autograd.grad(ref, leaves, dout)):
        assert_close(got, want, scale=20)


def _anon_huge_kb(ptr: int, nbytes: int) -> int:
    """AnonHugePages (kB) of this process's mappings over [ptr, ptr + nbytes) (an advised
    range is a mapping of its own: the buffer's head and tail are others)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < ptr + nbytes and ptr < hi
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_large_outputs_ask_for_huge_pages():
    """Every op's large CPU outputs (alloc_empty, csrc/common/alloc.h) are advised
    transparent huge pages: first touches of a 38 MB output took a quarter of the CCNet
    forward in 4 KB faults. numpy's large arrays (which numpy advises alike) are the
    control: where they get no huge pages (THP off, no free huge pages), neither can we."""
    import numpy as np

    # 48 MiB buffers: above glibc's largest mmap threshold (32 MiB), so fresh mappings
    # (a smaller one can reuse heap pages already faulted in 4 KB).
    control = np.empty(12 << 20, np.float32)
    control.fill(1)
    if _anon_huge_kb(control.ctypes.data, control.nbytes) == 0:
        pytest.skip("the system gives numpy's advised arrays no huge pages")
    q, k = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64)
    out = criss_cross_attention(q, k, torch.randn(1, 3072, 64, 64))
    assert _anon_huge_kb(out.data_ptr(), out.nbytes) >= 32 << 10
    # FASTVISION_HUGE_PAGES=0 turns the advice off (read once: a new process).
    child = (
        "import torch, tests.test_criss_cross as t\n"
        "q, k = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64)\n"
        "out = t.criss_cross_attention(q, k, torch.randn(1, 3072, 64, 64))\n"
        "print(t._anon_huge_kb(out.data_ptr(), out.nbytes))\n")
    env = dict(os.environ, FASTVISION_HUGE_PAGES="0")
    run = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backward_is_bit_identical_run_to_run():
    """The Triton backward has no float atomics: two runs agree bit for bit, with
    or without torch.use_deterministic_algorithms."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 16, 33, 45, generator=g).cuda().requires_grad_() for _ in range(2))
    v = torch.randn(2, 128, 33, 45, generator=g).cuda().requires_grad_()

    def grads():
        out = criss_cross_attention(q, k, v)
        return torch.autograd.grad(out.square().sum(), (q, k, v))

    first = grads()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))
