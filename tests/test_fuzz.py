"""The direct-call fuzz across every op, and its harness.

The fuzz itself runs per op in tests/test_conformance.py (test_direct_call_fuzz,
on the calls each spec's public op makes: fastvision.testing.fuzz_calls). Here:
those calls reach every registered op and replay unchanged; the Python checks
(fake and Triton kernels) reject whatever the C++ kernels reject; and the
harness records crashes and hangs.
"""

import functools

import pytest
import torch
from conformance import all_specs

from fastvision.testing import OpCall, unique_calls, fuzz_calls, fuzz_direct_calls, fuzz_mutations


@functools.cache
def _recorded() -> tuple:
    from test_masks import masks_direct_calls  # the codecs are no OpSpec: their calls are recorded there

    return tuple(unique_calls([*(c for spec in all_specs() for c in fuzz_calls(spec)), *masks_direct_calls()]))


def test_recording_covers_every_registered_op():
    recorded = {c.op for c in _recorded()}  # first: it loads the library (run alone, nothing else has)
    registered = {s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("fastvision::")}
    assert registered and recorded == registered, f"not recorded: {registered - recorded}"
    # Valid as recorded: replaying them unchanged works here too.
    for c in _recorded():
        c()


def test_scan_fuzz_reaches_several_chunks():
    """The backward's chunk loop and checkpoints are fuzzed too (L > chunk_len)."""
    bwd = [c for c in _recorded() if c.op == "fastvision::selective_scan_bwd"]
    assert any(c.args[2].shape[-1] > c.args[-1] for c in bwd)


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

    from fastvision.ops._library import FUSED_OPS

    for module in sorted({f.triton_module for f in FUSED_OPS.values() if f.triton_module}):
        mod = importlib.import_module(module)
        for fn in mod.__all__:
            monkeypatch.setattr(mod, fn, lambda *a, **k: (_ for _ in ()).throw(_Launched()))
    from fastvision.testing import apply_mutation

    missed, checked = [], 0
    for call in _recorded():
        if call.op.startswith(("fastvision::rle_", "fastvision::rrle_")):
            continue  # the codecs: no fused op (their fuzz is tests/test_masks.py's)
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
