"""The precision debugger: per-layer comparison with fp32 named by module path, the first
divergent layer, local errors and bisection, for bf16 / fp16 / int8 candidates."""

import dataclasses

import pytest
import torch
from rich.console import Console
from torch import nn

from kiln.capture.export import capture
from kiln.debug.precision import debug_precision, render_precision

CPU = torch.device("cpu")


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return (self.bn(self.conv(x)) + x).relu()


class Fragile(nn.Module):
    """Exact in fp32, destroyed in bf16: a large offset swamps the 8-bit mantissa."""

    def forward(self, x):
        return (x + 4096.0) - 4096.0


class Net(nn.Module):
    def __init__(self, fragile=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(Block(8), Block(8))
        self.fragile = Fragile() if fragile else nn.Identity()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.fragile(self.body(self.stem(x)))
        return self.head(y.mean((2, 3)))


def _x(batch=2):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _row(report, module):
    return next(r for r in report.rows if r.module == module)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_layers_named_by_module(precision):
    report = debug_precision(Net().eval(), _x(), precision=precision)
    modules = [r.module for r in report.rows]
    for name in ("stem", "body.0.conv", "body.0.bn", "body.1.conv", "head"):
        assert name in modules
    assert report.eager_rel_error == 0.0
    assert all(r.candidate is not None for r in report.rows), "a capture at lower precision keeps every layer"
    assert report.first_divergent is None and report.bisection is None
    assert 0 < report.output["rel_error"] < report.tolerance
    assert _row(report, "body.0.conv").source.endswith("return (self.bn(self.conv(x)) + x).relu()")
    assert all(r.local_rel_error is not None for r in report.rows)


def test_bf16_divergence_is_found_and_bisected():
    report = debug_precision(Net(fragile=True).eval(), _x(), precision="bf16")
    first = report.first_divergent
    assert first is not None and first.module == "fragile", [(r.module, r.rel_error) for r in report.rows]
    assert report.worst_local.module == "fragile"
    b = report.bisection
    assert b is not None and b.module == "fragile" and "4096" in b.source
    assert len(b.steps) <= 2 + (b.layers - 1).bit_length()
    assert b.steps[0].fails and b.steps[0].layers == b.layers


def test_a_corrupted_layer_is_the_first_to_diverge_and_the_worst_locally():
    model = Net().eval()
    x = _x()
    reference = capture(model, (x,), device=CPU)
    bad = dataclasses.replace(reference)
    bad.module = torch.fx.GraphModule(reference.module, reference.module.graph)
    bad.module.register_buffer("body_1_conv_weight", reference.module.body_1_conv_weight * 1.3)
    report = debug_precision(reference, x, precision="fp32", candidate=bad, tol=1e-3)
    assert report.first_divergent.module == "body.1.conv"
    assert report.worst_local.module == "body.1.conv"
    assert _row(report, "body.0.conv").rel_error == 0.0
    downstream = _row(report, "head")
    assert downstream.diverged and downstream.local_rel_error < 1e-6, "head itself is exact given exact inputs"


class Overflows(nn.Module):
    """x in fp32; NaN in fp16 where x * 1e5 passes 65504, the largest half (inf - inf)."""

    def forward(self, x):
        big = x * 1e5
        return big - big + x


def test_a_layer_that_turns_nan_in_fp16_diverges_there():
    class WithOverflow(Net):
        def __init__(self):
            super().__init__()
            self.fragile = Overflows()

    report = debug_precision(WithOverflow().eval(), _x(), precision="fp16")
    first = report.first_divergent
    assert first is not None and first.module == "fragile", [(r.module, r.rel_error) for r in report.rows]
    assert _row(report, "head").diverged, "NaN downstream counts as diverged"
    assert report.bisection is not None and report.bisection.module == "fragile"


def test_int8_rows_and_bisection_end_at_a_quantized_layer():
    report = debug_precision(Net().eval(), _x(4), precision="int8", method="max", tol=1e-4)
    assert report.output["rel_error"] > 1e-4
    assert _row(report, "stem").local_rel_error > 0
    assert _row(report, "body.0.bn").local_rel_error < 1e-5, "batch norm is not quantized"
    b = report.bisection
    assert b is not None and b.first_failing is not None
    assert b.module in {"stem", "body.0.conv", "body.1.conv", "head"}


def test_fp32_passes_compare_what_survives_fusion():
    """Checking the passes themselves: the fused graph against the unfused fp32 capture."""
    report = debug_precision(Net().eval(), _x(), precision="fp32", passes=True)
    assert any(r.candidate is None for r in report.rows), "batch norm folds into the convolution"
    assert any("fused away" in n for n in report.notes)
    compared = [r for r in report.rows if r.candidate is not None]
    assert compared and all(r.rel_error < 1e-4 for r in compared)
    assert _row(report, "head").candidate is not None
    # conv → bn → add → relu is one op now, compared where the chain ends (what feeds mean)
    last_block = [r for r in report.rows if r.module == "body.1"][-1]
    assert last_block.candidate is not None and last_block.matched_by == "position"
    assert _row(report, "body.0.conv").candidate is None


def test_bf16_after_passes_compares_fused_layers_one_to_one():
    report = debug_precision(Net().eval(), _x(), precision="bf16", passes=True)
    assert all(r.candidate is not None and r.matched_by == "name" for r in report.rows)
    ops = {r.module: r.op for r in report.rows}
    assert ops["body.0.conv"] == "kiln.conv_bias_act", "a fused op is named by the module it starts at"
    assert report.eager_rel_error < 1e-5, "the fused fp32 reference still matches eager"
    assert 0 < report.output["rel_error"] < report.tolerance


def test_render_names_the_divergent_layer():
    report = debug_precision(Net(fragile=True).eval(), _x(), precision="bf16")
    console = Console(record=True, width=220)
    console.print(render_precision(report))
    text = console.export_text()
    assert "fragile" in text and "first layer beyond tolerance: fragile" in text
    assert "bisection" in text and "body.0.conv" in text


def test_graph_without_model_is_cast_for_low_precision():
    x = _x()
    reference = capture(Net().eval(), (x,), device=CPU)
    report = debug_precision(reference, x, precision="bf16")
    assert report.description == "graph cast to bf16"
    assert report.eager_rel_error is None
    assert 0 < report.output["rel_error"] < report.tolerance


def test_bad_arguments():
    with pytest.raises(ValueError, match="precision must be one of"):
        debug_precision(Net().eval(), _x(), precision="int4")
    with pytest.raises(TypeError, match="nn.Module or a CapturedGraph"):
        debug_precision("resnet", _x())
