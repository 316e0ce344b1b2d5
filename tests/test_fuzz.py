"""Direct calls of every registered op, fuzzed: one argument mutated, replayed in child processes.

Valid calls are recorded while small public calls run (forward and backward,
every layout the wrappers produce); fastvision.testing.fuzz_direct_calls then
replays each with one argument mutated and checks: no crash, no hang, wrong
dtypes raise, errors are Python exceptions with "fastvision.<op>: " messages
that name no source path. Other suites (the conformance specs) can feed
their own recorded calls to the same function.
"""

import functools

import pytest
import torch

from fastvision.ops import bi_selective_scan, na1d, na2d, na3d, selective_scan
from fastvision.testing import OpCall, fuzz_direct_calls, fuzz_mutations, record_direct_calls

ops = torch.ops.fastvision


def _scan_inputs(batch=2, dim=4, L=7, N=3, bc="var", groups=2, z=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=dt).requires_grad_()

    def BC():
        if bc == "const":
            return r(dim, N, dt=torch.float32)
        if bc == "var":
            return r(batch, N, L)
        return r(batch, groups, N, L)

    A = (-torch.rand(dim, N, generator=g) - 0.1).requires_grad_()
    return dict(u=r(batch, dim, L), delta=(torch.rand(batch, dim, L, generator=g, dtype=dtype) * 0.5).requires_grad_(),
                A=A, B=BC(), C=BC(), D=r(dim, dt=torch.float32), z=r(batch, dim, L) if z else None,
                delta_bias=r(dim, dt=torch.float32))


def _scenario():
    """Small valid public calls (forward + backward) that reach every op and layout."""
    for bc, z, reverse, dtype in [("var", True, False, torch.float32), ("const", False, True, torch.float32),
                                  ("group", True, True, torch.float64), ("var", False, False, torch.bfloat16)]:
        a = _scan_inputs(bc=bc, z=z, dtype=dtype)
        out, last = selective_scan(**a, delta_softplus=True, return_last_state=True, reverse=reverse)
        (out.float().sum() + last.sum()).backward()
    # A wide grouped case (partial SIMD blocks, two groups of 10 channels).
    a = _scan_inputs(batch=1, dim=20, L=5, bc="group", groups=2)
    selective_scan(**a).sum().backward()
    # Several chunks (the wrappers' chunk_len exceeds these short sequences).
    a = {k: (v.detach() if v is not None else None) for k, v in _scan_inputs(L=7, bc="group", groups=1).items()}
    out, last, states = ops.selective_scan_fwd(*a.values(), False, False, 3)
    ops.selective_scan_bwd(torch.randn_like(out), torch.randn_like(last), *a.values(), states, False, False, 3)
    for bc in ("var", "const"):
        f = _scan_inputs(bc=bc)
        b = _scan_inputs(bc=bc)
        bi_selective_scan(*f.values(), b["u"], b["delta"], b["A"], b["B"], b["C"], b["D"], b["delta_bias"]
                          ).sum().backward()

    g = torch.Generator().manual_seed(1)

    def qkv(spatial, heads=2, kv_heads=2, d=4, dv=4, dtype=torch.float32):
        def r(*shape):
            return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
        return r(1, *spatial, heads, d), r(1, *spatial, kv_heads, d), r(1, *spatial, kv_heads, dv)

    def run(fn, q, k, v, *a, lse=False, **kw):
        res = fn(q, k, v, *a, return_lse=lse, **kw)
        if lse:
            out, l = res
            (out.float().sum() + l.sum()).backward()
        else:
            res.float().sum().backward()

    run(na1d, *qkv((9,)), 3, dilation=2, rpb=torch.randn(2, 5, requires_grad=True))
    run(na1d, *qkv((8,), heads=4, kv_heads=2, dv=6), 3, is_causal=True, lse=True)
    run(na1d, *qkv((8,), dtype=torch.float64), 4, stride=2)
    run(na2d, *qkv((5, 6)), (3, 2), dilation=(1, 2), rpb=torch.randn(2, 5, 3, requires_grad=True), lse=True)
    run(na2d, *qkv((5, 4), heads=2, kv_heads=1, dtype=torch.bfloat16), 3, stride=(2, 1), is_causal=(True, False))
    run(na3d, *qkv((3, 4, 3)), 3, rpb=torch.randn(2, 5, 5, 5, requires_grad=True))
    run(na3d, *qkv((3, 4, 4), d=16, dv=16), (2, 3, 2), dilation=(1, 1, 2), is_causal=(False, True, False), lse=True)


@functools.cache
def _recorded() -> tuple:
    return tuple(record_direct_calls(_scenario))


def test_recording_covers_every_registered_op():
    registered = {s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("fastvision::")}
    recorded = {c.op for c in _recorded()}
    assert registered and recorded == registered, f"not recorded: {registered - recorded}"
    # Valid as recorded: replaying them unchanged works here too.
    for c in _recorded():
        c()


def test_fuzz_direct_calls_never_crash_or_hang():
    calls = _recorded()
    report = fuzz_direct_calls(calls, jobs=2, timeout=60.0)
    print(f"\nfuzz: {report.replays} replays of {len(calls)} calls ({report.raised} raised, {report.ran} ran) "
          f"in {report.children} children, {report.seconds:.1f} s; exceptions {report.exceptions}")
    report.assert_ok()
    assert report.replays == sum(len(fuzz_mutations(c)) for c in calls)
    assert report.raised > report.replays // 2  # most mutations are invalid: the checks do run


# A test op whose kernel aborts on a negative and hangs on 1: the harness must
# record both against their mutations and carry on in new children.
_SELFTEST_PREAMBLE = """
import builtins, os, time, torch
if not hasattr(builtins, "_fvfuzztest_lib"):
    lib = torch.library.Library("fvfuzztest", "DEF")
    lib.define("crashy(Tensor x, int mode) -> Tensor")

    def crashy(x, mode):
        if mode < 0:
            os.abort()
        if mode == 1:
            time.sleep(600)
        if not x.is_floating_point():
            raise ValueError("fastvision.crashy: x must be a float tensor")
        return x.clone()

    lib.impl("crashy", crashy, "CPU")
    builtins._fvfuzztest_lib = lib  # keeps the registration alive
"""


def test_fuzz_harness_records_crashes_and_hangs():
    exec(_SELFTEST_PREAMBLE, {})
    call = OpCall("fvfuzztest::crashy", (torch.randn(3), 0))

    def few(c):  # the unmutated call, the int mutations and one wrong dtype
        return [m for m in fuzz_mutations(c) if m.arg < 0 or m.kind == "int" or m.value == "int32"]

    report = fuzz_direct_calls([call], jobs=1, timeout=3.0, mutations=few, preamble=[_SELFTEST_PREAMBLE])
    text = "\n".join(report.failures)
    assert report.replays == len(few(call))
    assert text.count("crashed (signal 6)") == 2, text  # mode -1 and -(2**63)
    assert text.count("hung") == 1 and "mode: int 1" in text, text
    assert len(report.failures) == 3, text
    assert report.children == 3  # a new child after each crash and the hang (none after the last)


def _python_kernels(name: str):
    """The op's fake kernel and Triton entry (both run the op's Python checks first)."""
    from fastvision.ops._library import FUSED_OPS

    for fused in FUSED_OPS.values():
        for kernel in (fused.forward, fused.backward):
            if kernel.name == name:
                return kernel, fused.triton_kernel(kernel)
    raise LookupError(name)


class _Launched(Exception):
    """The Triton kernel would have launched: its checks let the call through."""


def test_python_entry_points_reject_what_the_cpu_kernels_reject(monkeypatch):
    """Direct calls reach the Triton kernels (registered for CUDA) and the fake
    kernels (torch.compile) without the C++ checks: every mutated call the C++
    kernel rejects, their Python checks reject too, before any launch."""
    pytest.importorskip("triton")
    import importlib

    for module in ("fastvision.triton.selective_scan", "fastvision.triton.neighborhood"):
        mod = importlib.import_module(module)
        for fn in mod.__all__:
            monkeypatch.setattr(mod, fn, lambda *a, **k: (_ for _ in ()).throw(_Launched()))
    from fastvision.testing import apply_mutation

    missed, checked = [], 0
    for call in _recorded():
        kernel, triton_entry = _python_kernels(call.op.split("::")[1])
        for m in fuzz_mutations(call):
            mutated = apply_mutation(call, m)
            try:
                mutated()
                continue  # valid for the C++ kernel: nothing to compare
            except (ValueError, TypeError, MemoryError, RuntimeError):
                pass
            checked += 1
            for path, fn in (("triton", triton_entry), ("check", kernel.check)):
                try:
                    fn(*mutated.args)
                except ValueError as err:
                    assert str(err).startswith(f"fastvision.{kernel.name}: "), str(err)
                except _Launched:
                    missed.append(f"{path}: {m.describe(call)}")
                else:
                    missed.append(f"{path}: {m.describe(call)} (no error)")
    assert checked > 1000
    assert not missed, f"{len(missed)} calls the C++ kernel rejects pass the Python checks:\n" + "\n".join(missed[:40])
