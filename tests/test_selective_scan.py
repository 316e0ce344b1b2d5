"""Selective scan: what is particular to the family.

The generic checks (forward and backward vs the reference over random shapes
and edge cases, half precision, float64 gradcheck, opcheck, torch.compile,
meta tensors, backends, non-contiguous inputs, bad input, Triton and GPU runs)
run on the specs in tests/conformance/selective_scan.py (tests/test_conformance.py).
Here: reverse scans and the bidirectional scan against their definitions by
flips and by two single scans, the checkpoint interval rule, and bounded
backward memory. (Triton launchers and chunking: test_triton_selective_scan_interp.py.)
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from conformance.selective_scan import make_inputs

from fastvision.ops import bi_selective_scan, scan_chunk_len, selective_scan
from fastvision.reference.selective_scan import selective_scan_ref
from fastvision.testing import assert_close


def test_reverse_equals_flipped_scan():
    u, delta, A, B, C, D, z, bias = make_inputs(2, 4, 40, 6, "group", 2)
    out, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, reverse=True)
    f = lambda x: x.flip(-1)  # noqa: E731
    ref, ref_last = selective_scan_ref(f(u), f(delta), A, f(B), f(C), D, f(z), bias, True, True)
    assert_close(out, ref.flip(-1))
    assert_close(last, ref_last)


@pytest.mark.parametrize("bc", ["var", "const", "group"])
@pytest.mark.parametrize("z", [True, False])
def test_bi_selective_scan_equals_two_scans(bc, z):
    """The fused bidirectional scan is a forward scan plus a reverse scan of the *_b
    tensors as given (no flips), each gated by z: outputs and gradients."""
    fwd = make_inputs(2, 4, 37, 5, bc, 2, z=z, requires_grad=True, seed=1)
    bwd = make_inputs(2, 4, 37, 5, bc, 2, z=False, requires_grad=True, seed=2)
    del bwd[6]
    out = bi_selective_scan(*fwd, *bwd, delta_softplus=True)
    z_ = fwd[6]
    two = (selective_scan(*fwd, delta_softplus=True)
           + selective_scan(*bwd[:6], z_, bwd[6], delta_softplus=True, reverse=True))
    assert_close(out, two)
    leaves = [x for x in fwd + bwd if x is not None]
    w = torch.linspace(-1.5, 2.0, out.numel()).view_as(out)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    two_grads = torch.autograd.grad((two * w).sum(), leaves)
    for g, rg in zip(grads, two_grads):
        assert_close(g, rg, torch.float32, scale=20)


def test_chunk_len_rule():
    assert scan_chunk_len(16) == 128 and scan_chunk_len(1) == 128
    assert scan_chunk_len(64) == 32 and scan_chunk_len(256) == 16
    assert all(scan_chunk_len(n) & (scan_chunk_len(n) - 1) == 0 for n in range(1, 300))


def test_backward_memory_does_not_grow_with_L_times_N():
    """Peak RSS of a backward whose full state history would need 1 GiB stays far below it."""
    batch, dim, L, N = 1, 256, 16384, 64  # all states: 256 * 16384 * 64 * 4 B = 1 GiB
    code = textwrap.dedent(f"""
        import resource, torch
        from fastvision.ops import selective_scan
        torch.manual_seed(0)
        u = torch.randn({batch}, {dim}, {L}, requires_grad=True)
        delta = torch.rand({batch}, {dim}, {L})
        A = -torch.rand({dim}, {N})
        B = torch.randn({batch}, {N}, {L}); C = torch.randn({batch}, {N}, {L})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        selective_scan(u, delta, A, B, C, delta_softplus=True).sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grew = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True).stdout.strip())
    full_states = batch * dim * L * N * 4
    assert grew < full_states / 4, f"backward grew RSS by {grew / 2**20:.0f} MiB"
