"""Concatenation elimination (kiln.plan.planner): producers write straight into their slices of the
cat's output buffer and the cat launches nothing. CPU: ATen ops writing through `.out`;
GPU: kiln's Triton conv kernels writing into slices of a channels-last output (fp16
tolerance 2e-2 against eager fp32, as for the zoo engines)."""

import dataclasses

import pytest
import torch
from torch import nn

import kiln
from kiln.capture.export import capture
from kiln.kernels import KERNELS
from kiln.select.selection import _concat_writable, concat_inputs, fastest


class Concatenates(torch.nn.Module):
    """Inception-like: branches concatenated along channels, then read once more."""

    def __init__(self, dim: int = 1, shared: bool = False):
        super().__init__()
        self.dim, self.shared = dim, shared

    def forward(self, x):
        a, b, c = x + 1, x * 2, torch.sigmoid(x)
        y = torch.cat([a, b, c], self.dim) * 5
        return (y, a.sum()) if self.shared else y


def _slots_of_kind(engine, kind):
    return [i for i, s in enumerate(engine.plan["slots"]) if s["kind"] == kind]


@pytest.mark.parametrize("dim", [1, -1, 0])
def test_concat_inputs_are_written_straight_into_the_output(dim):
    x = torch.randn(2, 3, 4, 5)
    engine = kiln.build(Concatenates(dim).eval(), (x,), device="cpu")
    cat = next(s for s in engine.plan["steps"] if s["op"] == "aten.cat.default")
    assert cat["kernel"] == "planner.concat_in_place", "no copy kernel remains"
    slices = _slots_of_kind(engine, "slice")
    assert len(slices) == 3 and all(engine.plan["slots"][i]["base"] == cat["outputs"][0] for i in slices)
    torch.testing.assert_close(engine(x), Concatenates(dim)(x))


def test_concat_slices_share_the_output_buffer_and_keep_it_alive():
    x = torch.randn(2, 3, 4, 5)
    engine = kiln.build(Concatenates().eval(), (x,), device="cpu")
    plan = engine.plan
    steps = plan["steps"]
    cat_slot = next(s for s in steps if s["op"] == "aten.cat.default")["outputs"][0]
    (buf,) = [b for b in plan["memory"]["buffers"] if b["slot"] == cat_slot]
    first_writer = min(i for i, s in enumerate(steps) if s.get("writes_into") and s["outputs"][0] != cat_slot)
    assert buf["first"] == first_writer, "the buffer lives from the first slice's write"
    spans = sorted((plan["slots"][i]["offset"], plan["slots"][i]["nbytes"]) for i in _slots_of_kind(engine, "slice"))
    assert all(buf["offset"] <= off and off + n <= buf["offset"] + buf["nbytes"] for off, n in spans)
    assert not any(b["slot"] in _slots_of_kind(engine, "slice") for b in plan["memory"]["buffers"])


def test_concat_input_read_elsewhere_keeps_the_copy():
    x = torch.randn(2, 3, 4, 5)
    engine = kiln.build(Concatenates(shared=True).eval(), (x,), device="cpu")
    cat = next(s for s in engine.plan["steps"] if s["op"] == "aten.cat.default")
    assert cat["kernel"] == "aten" and not _slots_of_kind(engine, "slice")
    for got, want in zip(engine(x), Concatenates(shared=True)(x)):
        torch.testing.assert_close(got, want)



class Fire(nn.Module):
    """SqueezeNet's fire module: a 1×1 squeeze, then 1×1 and 3×3 expands concatenated."""

    def __init__(self):
        super().__init__()
        self.squeeze = nn.Conv2d(32, 16, 1)
        self.e1, self.e3 = nn.Conv2d(16, 48, 1), nn.Conv2d(16, 48, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)


def test_selection_knows_which_concat_inputs_could_be_written_in_place():
    x = torch.randn(2, 3, 4, 5)
    graph = capture(Concatenates().eval(), (x,), device=torch.device("cpu"))
    inputs = [n for n in graph.module.graph.nodes if n.op == "call_function" and n.target != torch.ops.aten.cat.default]
    assert all(_concat_writable(n, "cpu") for n in inputs[:3])
    graph = capture(Concatenates(shared=True).eval(), (x,), device=torch.device("cpu"))
    first = next(n for n in graph.module.graph.nodes if n.op == "call_function")
    assert not _concat_writable(first, "cpu"), "an input read elsewhere keeps the cat"


def test_a_kernel_that_leaves_the_copy_is_charged_for_it():
    times = {"cudnn": 0.010, "triton": 0.013}
    assert fastest(times, {"triton"}, copy_ms=0.0) == "cudnn"
    assert fastest(times, {"triton"}, copy_ms=0.005) == "triton", "0.010 + 0.005 copy > 0.013"
    assert fastest(times, {"cudnn", "triton"}, copy_ms=0.005) == "cudnn"


def test_concat_of_mixed_dtypes_is_not_placed():
    class Promotes(nn.Module):
        def forward(self, x):
            return torch.cat([x + 1, (x * 2).half()], 1)

    x = torch.randn(2, 3)
    graph = capture(Promotes().eval(), (x,), device=torch.device("cpu"))
    cat = next(n for n in graph.module.graph.nodes if n.target == torch.ops.aten.cat.default)
    assert concat_inputs(cat) is None, "cat promotes the half input: it is not written in place"
    engine = kiln.build(Promotes().eval(), (x,), device="cpu")
    assert not _slots_of_kind(engine, "slice")
    torch.testing.assert_close(engine(x), Promotes()(x))


@pytest.mark.gpu
def test_gpu_fire_module_concatenates_in_place(monkeypatch):
    for name in ("triton.conv1x1_act.narrow", "triton.conv_epilogue"):  # make them the untuned choice
        monkeypatch.setitem(KERNELS, name, dataclasses.replace(KERNELS[name], priority=10))
    model, x = Fire().eval(), torch.randn(4, 32, 14, 14)
    engine = kiln.build(model, (x,), config=kiln.BuildConfig(precision="fp16", device="cuda", tune=False))
    steps = engine.plan["steps"]
    cat = next(s for s in steps if s["op"] == "aten.cat.default")
    assert cat["kernel"] == "planner.concat_in_place"
    assert sum(s["kind"] == "slice" for s in engine.plan["slots"]) == 2
    want = model(x)
    got = engine(x.cuda()).float().cpu()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_fire_module_tuned_matches_eager(tmp_path):
    model, x = Fire().eval(), torch.randn(4, 32, 14, 14)
    config = kiln.BuildConfig(precision="fp16", device="cuda", timing_cache=str(tmp_path / "cache.json"))
    engine = kiln.build(model, (x,), config=config)
    expands = [s for s in engine.plan["steps"] if s["op"] == "kiln.conv_bias_act.default"][1:]
    assert all(s["concat_copy_ms"] is not None for s in expands), "the expands are charged the cat's copy"
    torch.testing.assert_close(engine(x.cuda()).float().cpu(), model(x), atol=2e-2, rtol=2e-2)
