"""Every generic check, on every op's conformance spec (tests/conformance/<family>.py).

A spec (:class:`fastvision.testing.OpSpec`) gives an op's public function, its
reference, sample inputs per check, bad inputs, differentiable inputs and
outputs, tolerances and the fused op it runs. The checks:

* forward and backward vs the reference (float32), over many shapes and edge cases;
* float16 / bfloat16 forward and backward vs the float32 reference;
* float64 forward and backward vs the (float64) reference, to float64 precision;
* float64 gradcheck (every output, alone and together: unused outputs get no gradient);
* torch.library.opcheck of the registered forward and backward ops on the
  direct calls the public op makes (recorded with :func:`fastvision.testing.recorded_calls`);
* torch.compile(fullgraph=True) forward and backward equal eager;
* meta tensors: the op (backend="auto") and the reference give the CPU run's shapes and dtypes;
* double backward raises NotImplementedError;
* backends: an unknown name, and every backend that cannot run the inputs
  (FusedOp.why_not), raise ValueError with the reason; the others equal the
  reference; backend="reference" is the reference, bit for bit;
* non-contiguous inputs give the contiguous inputs' results and gradients;
* bad inputs raise the stated exception with the stated message;
* direct-call fuzz: the recorded direct calls replayed with one argument
  mutated, in child processes (:func:`fastvision.testing.fuzz_direct_calls`);
* Triton kernels under the interpreter (``-m triton``): backend="triton" in float32 and
  float16 vs the float32 reference;
* GPU (``-m gpu``, skipped without CUDA): every backend usable on CUDA vs the
  float32 reference in float32/16/bf16, and torch.compile on CUDA.
"""

import re

import pytest
import torch
from conformance import all_specs

from fastvision.ops._library import AUTO_ORDER, FUSED_OPS
from fastvision.testing import (assert_close, case_id, check_compile, check_gradcheck, fuzz_calls,
                                fuzz_direct_calls, fuzz_mutations, import_triton_kernels_interpreted,
                                recorded_calls)

SPECS = all_specs()
HALF = [torch.float16, torch.bfloat16]


CHECKS_BY_CASES = {}  # test name -> the OpSpec case list it runs on (for known failures)


def _params(cases_attr, check):
    """(spec, case, seed) for every case of every spec, with readable ids; a spec's
    known failures of `check` on a case are xfail(strict=True)."""
    CHECKS_BY_CASES[check] = cases_attr
    out = []
    for spec in SPECS:
        for seed, case in enumerate(getattr(spec, cases_attr)):
            cid = case_id({k: v for k, v in case.items() if k != "nd"})
            marks = [pytest.mark.xfail(strict=True, reason=f.reason)
                     for f in spec.known_failures if f.check == check and f.case == case]
            out.append(pytest.param(spec, case, seed, id=f"{spec.name}-{seed}-{cid}", marks=marks))
    return out


def over(cases_attr):
    """Parametrizes a check with (spec, case, seed) over each spec's `cases_attr` list."""
    def parametrize(check):
        return pytest.mark.parametrize("spec,case,seed", _params(cases_attr, check.__name__))(check)
    return parametrize


def _by_spec(values):
    return [pytest.param(spec, v, id=f"{spec.name}-{getattr(v, 'id', v)}") for spec in SPECS for v in values(spec)]


def compare(spec, outs, grads, ref_outs, ref_grads, dtype=torch.float32, what=""):
    """Outputs and gradients (shape, values; dtype for float32/64 inputs) against the
    reference's, with testing.TOLERANCES[dtype] times the spec's forward / backward
    multipliers (in float32, or float64 where either side is float64).

    A gradient None (input unused) stands for zeros.
    """
    assert len(outs) == len(ref_outs), f"{what}{len(outs)} outputs, the reference gives {len(ref_outs)}"
    for name, o, r in zip(spec.outputs, outs, ref_outs):
        assert o.shape == r.shape, f"{what}{name}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
        if dtype in (torch.float32, torch.float64):
            assert o.dtype == r.dtype, f"{what}{name}: dtype {o.dtype} != reference {r.dtype}"
        assert_close(_wide(o, r), _wide(r, o), dtype, scale=spec.tolerance(dtype), msg=f"{what}{name}")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        r = ref_grads[name]
        if r is None or g is None:  # autograd's None (input unused) stands for zeros
            other = r if g is None else g
            assert other is None or not other.count_nonzero(), f"{what}d{name}: None vs nonzero {other}"
            continue
        assert g.shape == r.shape, f"{what}d{name}: shape {tuple(g.shape)} != reference {tuple(r.shape)}"
        assert_close(_wide(g, r), _wide(r, g), dtype, scale=spec.tolerance(dtype, backward=True),
                     msg=f"{what}d{name}")


def _wide(t, other):
    return t.double() if torch.float64 in (t.dtype, other.dtype) else t.float()


def _input_dtypes(sample):
    return [t.dtype for t in sample.tensors()]


def _check_grad_dtypes(spec, sample, grads):
    args = spec.bind(sample).arguments
    for name, g in grads.items():
        if g is not None:
            assert g.dtype == args[name].dtype, f"d{name} has dtype {g.dtype}, {name} {args[name].dtype}"


def _upcast(t):
    return t.float() if t.dtype in HALF else t


# --------------------------------------------------------------------------
# Numerics


@over("cases")
def test_forward_backward_match_reference(spec, case, seed):
    sample = spec.sample(case, torch.float32, seed)
    outs, grads = spec.forward_backward(sample)
    ref_outs, ref_grads = spec.forward_backward(sample, reference=True)
    _check_grad_dtypes(spec, sample, grads)
    compare(spec, outs, grads, ref_outs, ref_grads)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@over("half_cases")
def test_half_precision_vs_float32_reference(spec, case, seed, dtype):
    sample = spec.sample(case, dtype, seed)
    assert dtype in _input_dtypes(sample), "a half-precision case must have half-precision inputs"
    outs, grads = spec.forward_backward(sample)
    _check_grad_dtypes(spec, sample, grads)
    # Output dtypes: the reference's on these (half) inputs, asked cheaply on meta tensors.
    meta = spec.call(sample.to("meta"), reference=True)
    assert [o.dtype for o in outs] == [m.dtype for m in meta]
    ref_outs, ref_grads = spec.forward_backward(sample.map_tensors(_upcast), reference=True)
    compare(spec, outs, grads, ref_outs, ref_grads, dtype)


@over("gradcheck_cases")
def test_float64_matches_reference(spec, case, seed):
    """float64 in, float64 math: the kernels agree with the (float64) reference to float64 precision."""
    sample = spec.sample(case, torch.float64, seed)
    outs, grads = spec.forward_backward(sample)
    _check_grad_dtypes(spec, sample, grads)
    ref_outs, ref_grads = spec.forward_backward(sample, reference=True)
    compare(spec, outs, grads, ref_outs, ref_grads, torch.float64)


@over("gradcheck_cases")
def test_gradcheck_float64(spec, case, seed):
    sample = spec.sample(case, torch.float64, seed)
    names = spec.grad_inputs(sample)
    args = spec.bind(sample).arguments
    assert names and all(args[n].dtype == torch.float64 for n in names)

    def fn(*tensors):
        return spec.call(spec.substitute(sample, dict(zip(names, tensors))))

    # gradcheck backpropagates from one output at a time: the others get no gradient.
    check_gradcheck(fn, [args[n].detach().clone().requires_grad_() for n in names])


# --------------------------------------------------------------------------
# The registered ops: opcheck on recorded direct calls, compile, meta tensors


@over("opcheck_cases")
def test_opcheck_recorded_calls(spec, case, seed):
    calls = recorded_calls(spec, [case])
    fused = spec.fused
    names = {c.op for c in calls}
    assert {fused.forward.qualname, fused.backward.qualname} <= names, f"recorded only {sorted(names)}"
    for call in calls:
        args = call.args
        if call.op == fused.forward.qualname:  # autograd registration: inputs that need grad
            args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                         for a in args)
        result = torch.library.opcheck(call.resolve(), args, call.kwargs)
        failed = {k: v for k, v in result.items() if v != "SUCCESS"}
        assert not failed, f"opcheck of {call.op}: {failed}"


@over("compile_cases")
def test_torch_compile_fullgraph(spec, case, seed):
    sample = spec.sample(case, torch.float32, seed)
    names = spec.grad_inputs(sample)
    args = spec.bind(sample).arguments

    def fn(*tensors):
        return spec.call(spec.substitute(sample, dict(zip(names, tensors))))

    check_compile(fn, [args[n] for n in names])


@over("basic_cases")
def test_meta_tensors(spec, case, seed):
    """The op (backend="auto") and the reference run on meta tensors, with the CPU run's shapes and dtypes."""
    sample = spec.sample(case, torch.float32, seed)
    cpu = spec.call(sample)
    meta = sample.to("meta")
    for what, outs in (("op", spec.call(meta)), ("reference", spec.call(meta, reference=True))):
        assert [o.device.type for o in outs] == ["meta"] * len(outs), what
        assert [(o.shape, o.dtype) for o in outs] == [(o.shape, o.dtype) for o in cpu], what


# --------------------------------------------------------------------------
# Autograd and backends


@over("basic_cases")
def test_double_backward_raises(spec, case, seed):
    sample, leaves = spec.with_leaves(spec.sample(case, torch.float32, seed))
    grads = torch.autograd.grad(spec.loss(spec.call(sample)), list(leaves.values()), create_graph=True)
    second = sum(g.sum() for g in grads if g is not None and g.requires_grad)
    with pytest.raises(NotImplementedError, match="double backward"):
        second.backward()


@over("basic_cases")
def test_backends(spec, case, seed):
    """Unknown names and backends that cannot run the inputs raise ValueError with
    FusedOp.why_not's reason; the others equal the reference."""
    sample = spec.sample(case, torch.float32, seed)
    ref = spec.call(sample, reference=True)
    assert all(torch.equal(a, b) for a, b in zip(spec.call(sample, "reference"), ref)), \
        "backend='reference' must be the reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        spec.call(sample, "fast")
    device = sample.tensors()[0].device
    facts = spec.facts(sample)
    for backend in AUTO_ORDER:
        reason = spec.fused.why_not(backend, device, **facts)
        if reason is not None:
            with pytest.raises(ValueError, match=re.escape(f"backend={backend!r} {reason}")):
                spec.call(sample, backend)
        elif backend == "triton" and device.type == "cpu":
            continue  # the interpreter is slow: test_triton_backend_interpreted
        else:
            outs = spec.call(sample, backend)
            compare(spec, outs, {}, ref, {}, what=f"backend={backend!r}: ")
    compare(spec, spec.call(sample), {}, ref, {}, what="backend='auto': ")


def _noncontiguous(t):
    """The same values in storage with every stride doubled (not contiguous unless numel <= 1)."""
    return torch.empty(*t.shape, 2, dtype=t.dtype, device=t.device)[..., 0].copy_(t)


@over("basic_cases")
def test_noncontiguous_inputs(spec, case, seed):
    sample = spec.sample(case, torch.float32, seed)
    strided = sample.map_tensors(_noncontiguous)
    assert not any(t.is_contiguous() for t in spec.with_leaves(strided)[0].tensors() if t.numel() > 1)
    outs, grads = spec.forward_backward(strided)
    ref_outs, ref_grads = spec.forward_backward(sample)
    compare(spec, outs, grads, ref_outs, ref_grads)


@pytest.mark.parametrize("spec,bad", _by_spec(lambda spec: spec.bad_inputs()))
def test_bad_inputs_raise_clear_errors(spec, bad):
    with pytest.raises(bad.error, match=re.escape(bad.match)):
        spec.call(bad.sample)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_direct_call_fuzz(spec):
    """Each recorded direct call replayed with one argument mutated, in child
    processes: no crash, no hang, wrong dtypes raise, clear "fastvision.<op>: " errors."""
    calls = fuzz_calls(spec)
    report = fuzz_direct_calls(calls, jobs=2, timeout=60.0)
    print(f"\n{spec.name}: {report.replays} replays of {len(calls)} calls ({report.raised} raised) in "
          f"{report.seconds:.1f} s; exceptions {report.exceptions}")
    report.assert_ok()
    assert report.replays == sum(len(fuzz_mutations(c)) for c in calls)
    assert report.raised > report.replays // 2  # most mutations are invalid: the checks do run


def test_every_fused_op_has_a_spec():
    assert set(FUSED_OPS) <= {spec.fused_op for spec in SPECS}


def test_known_failures_name_a_check_and_its_case():
    for spec in SPECS:
        for failure in spec.known_failures:
            assert failure.check in CHECKS_BY_CASES, f"{spec.name}: no check {failure.check!r}"
            assert failure.case in getattr(spec, CHECKS_BY_CASES[failure.check]), \
                f"{spec.name}: {failure.check} does not run on {failure.case}"


# --------------------------------------------------------------------------
# Triton kernels on CPU tensors (interpreter)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # the interpreter has no bf16
@over("triton_cases")
def test_triton_backend_interpreted(spec, case, seed, dtype):
    import_triton_kernels_interpreted(spec.fused.triton_module)
    sample = spec.sample(case, dtype, seed)
    outs, grads = spec.forward_backward(sample, "triton")
    _check_grad_dtypes(spec, sample, grads)
    ref_outs, ref_grads = spec.forward_backward(sample.map_tensors(_upcast), reference=True)
    compare(spec, outs, grads, ref_outs, ref_grads, dtype)


# --------------------------------------------------------------------------
# GPU


def _gpu_backends(spec):
    usable = [b for b, why in spec.fused.usable_backends("cuda").items() if why is None and b != "reference"]
    return ["auto", *usable]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@over("gpu_cases")
def test_gpu_backends_vs_float32_reference(spec, case, seed, dtype):
    sample = spec.sample(case, dtype, seed).to("cuda")
    ref_outs, ref_grads = spec.forward_backward(sample.map_tensors(_upcast), reference=True)
    for backend in _gpu_backends(spec):
        outs, grads = spec.forward_backward(sample, backend)
        assert all(o.is_cuda for o in outs)
        _check_grad_dtypes(spec, sample, grads)
        compare(spec, outs, grads, ref_outs, ref_grads, dtype, what=f"backend={backend!r} {dtype}: ")


@pytest.mark.gpu
@over("compile_cases")
def test_gpu_torch_compile_fullgraph(spec, case, seed):
    sample = spec.sample(case, torch.float32, seed).to("cuda")
    names = spec.grad_inputs(sample)
    args = spec.bind(sample).arguments

    def fn(*tensors):
        return spec.call(spec.substitute(sample, dict(zip(names, tensors))))

    check_compile(fn, [args[n] for n in names])
