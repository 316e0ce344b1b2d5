"""torch.export of every model builder and of one function calling every op, and an
AOTInductor-compiled model on the CPU.

Both come from the registries: the builders from fastvision.models.registry.MODELS
(each built in its small configuration: the same modules, fewer layers), the ops
from the conformance specs (each spec's first compile case). The fake kernels make
tracing possible; the exported program must keep the fused ops (no decomposition
into the reference) and give eager's results.
"""

import pytest
import torch
from conformance import all_specs

from fastvision.models.registry import MODELS, builders
from fastvision.ops._library import FUSED_OPS
from fastvision.testing import assert_close

SPECS = all_specs()


def _fastvision_ops(graph_module) -> set[str]:
    """The fastvision ops the exported graph calls (``fastvision::<name>``)."""
    return {node.target.name().split("::")[1].split(".")[0] for node in graph_module.graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "fastvision"}


def test_every_public_builder_is_registered():
    """A builder without an entry would escape export, timm and load_official."""
    missing = sorted(set(builders()) - set(MODELS))
    assert not missing, f"add these builders to fastvision/models/registry.py MODELS: {missing}"


@pytest.mark.parametrize("name", list(MODELS))
def test_export_model_builder(name):
    torch.manual_seed(0)
    entry = MODELS[name]
    model = entry.build_small().eval()
    inputs = entry.example_input(2)
    ep = torch.export.export(model, inputs)
    assert _fastvision_ops(ep.graph_module), f"{name}: no fastvision op in the exported graph"
    with torch.no_grad():
        assert_close(ep.module()(*inputs), model(*inputs))


class EveryOp(torch.nn.Module):
    """Calls every spec's public op on its own inputs; returns every output."""

    def __init__(self, specs, samples):
        super().__init__()
        self.calls = [(spec, sample) for spec, sample in zip(specs, samples)]

    def forward(self, *tensors):
        outs, i = [], 0
        for spec, sample in self.calls:
            n = len(sample.tensors())
            it = iter(tensors[i:i + n])
            i += n
            outs += spec.call(sample.map_tensors(lambda _: next(it)))
        return tuple(outs)


def test_export_function_calling_every_op():
    samples = [spec.sample(spec.compile_cases[0], torch.float32, 0) for spec in SPECS]
    module = EveryOp(SPECS, samples)
    inputs = tuple(t for s in samples for t in s.tensors())
    ep = torch.export.export(module, inputs)
    found = _fastvision_ops(ep.graph_module)
    wanted = {FUSED_OPS[spec.fused_op].forward.name for spec in SPECS}
    assert wanted <= found, f"forward ops missing from the exported graph: {sorted(wanted - found)}"
    assert set(FUSED_OPS) <= {spec.fused_op for spec in SPECS}, "a fused op without a conformance spec"
    for got, want in zip(ep.module()(*inputs), module(*inputs)):
        assert_close(got, want)


@pytest.mark.slow
def test_aot_inductor_cpu_model_matches_eager(tmp_path):
    """A model with a fused op, exported, compiled ahead of time by AOTInductor into a
    .pt2 package (C++ that calls the registered op), loaded back, equal to eager."""
    torch.manual_seed(0)
    entry = MODELS["ccnet_head"]
    model = entry.build_small().eval()
    inputs = entry.example_input(2)
    ep = torch.export.export(model, inputs)
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "ccnet_head.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        want = model(*inputs)
        assert_close(compiled(*inputs), want)
        other = entry.example_input(2)  # new values, same shapes
        assert_close(compiled(*other), model(*other))
