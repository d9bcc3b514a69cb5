"""Side streams for independent branches (kiln.plan.streams): which steps go to the side stream,
that the memory plan keeps both streams' bytes apart, and that answers do not change.
CPU: plans and fp32 engines (streams are ignored on the CPU). GPU: fp16 engines against
eager fp32 at 2e-2, with and without CUDA-graph replay."""

import pytest
import torch
from torch import nn

import kiln
from kiln.builder import STREAM_GAIN
from kiln.capture.export import capture
from kiln.passes import run_passes
from kiln.plan import memory
from kiln.plan.planner import make_plan
from kiln.plan.streams import side_branches
from kiln.select.selection import select_kernels


class DownsampleBlock(nn.Module):
    """A ResNet bottleneck whose shortcut is a 1×1 convolution: a fork → join."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.conv3, self.down = nn.Conv2d(4, 16, 1), nn.Conv2d(8, 16, 1)

    def forward(self, x):
        x = torch.relu(x * 2)
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.relu(self.conv3(y) + self.down(x))


class PointwiseShortcut(DownsampleBlock):
    """The shortcut is a chain of ATen elementwise ops: unfused (no passes) they write arena buffers."""

    def forward(self, x):
        x = torch.relu(x * 2)
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.relu(self.conv3(y) + (x.repeat(1, 2, 1, 1) + 1) * 3)


class NoBranch(nn.Module):
    def forward(self, x):
        return torch.relu(x * 2 + 1).sum()


def _plan(model, x, multi_stream=True, passes=None):
    graph, _ = run_passes(capture(model.eval(), (x,), device=torch.device("cpu")), passes)
    return make_plan(graph, select_kernels(graph), multi_stream=multi_stream)


def test_the_shortcut_convolution_goes_to_the_side_stream():
    plan = _plan(DownsampleBlock(), torch.randn(2, 8, 6, 6))
    steps = plan["steps"]
    assert plan["side_branches"] == 1
    (side,) = [s for s in steps if s.get("stream") == 1]
    assert side["op"] == "kiln.conv_bias_act.default" and side["fork"]
    join = next(i for i, s in enumerate(steps) if s.get("join"))
    assert {"slot": side["outputs"][0]} in steps[join]["args"], "the join reads the side branch"
    assert sum(1 for s in steps if s.get("join")) == 1


def test_models_without_a_fork_get_no_side_stream():
    plan = _plan(NoBranch(), torch.randn(3, 4))
    assert plan["side_branches"] == 0 and not any(s.get("stream") for s in plan["steps"])
    assert side_branches(plan["steps"], set()) == []


def test_side_stream_buffers_are_apart_from_the_main_branch():
    plan = _plan(PointwiseShortcut(), torch.randn(2, 8, 6, 6), passes=[])
    steps = plan["steps"]
    join = next(i for i, s in enumerate(steps) if s.get("join"))
    chain = [s for s in steps if s.get("stream") == 1]
    (read,) = [a["slot"] for a in chain[0]["args"] if isinstance(a, dict)]
    fork = next(i for i, s in enumerate(steps) if read in s["outputs"])
    assert fork < min(i for i, s in enumerate(steps) if s.get("stream") == 1) - 3, "the main branch runs beside"
    assert [s["op"] for s in chain] == ["aten.repeat.default", "aten.add.Tensor", "aten.mul.Tensor"]
    side_slots = {o for s in chain for o in s["outputs"]}
    bufs = plan["memory"]["buffers"]
    assert len([b for b in bufs if b["slot"] in side_slots]) == 2, "add and mul write arena buffers"
    for b in bufs:
        if b["slot"] in side_slots:
            assert b["first"] <= fork + 1 and b["last"] >= join, "alive over the whole fork → join span"
    fork_out = steps[fork]["outputs"][0]
    assert plan["last_use"][fork_out] >= join, "what the side stream reads outlives the join"
    placed = [memory.Buffer(b["nbytes"], b["first"], b["last"]) for b in bufs]
    offsets = [b["offset"] for b in bufs]
    for i, a in enumerate(placed):
        for j, c in enumerate(placed[:i]):
            if a.alive_with(c):
                assert offsets[i] + a.nbytes <= offsets[j] or offsets[j] + c.nbytes <= offsets[i]


def test_a_multi_stream_plan_runs_the_same_on_the_cpu():
    model, x = DownsampleBlock().eval(), torch.randn(2, 8, 6, 6)
    engine = kiln.build(model, (x,), config=kiln.BuildConfig(device="cpu", streams="on"))
    assert engine.build_info["streams"] == {"mode": "on", "side_branches": 0, "used": False}, "CPU: one stream"
    torch.testing.assert_close(engine(x), model(x), atol=1e-5, rtol=1e-5)


def test_unknown_streams_mode_is_named():
    with pytest.raises(ValueError, match="streams must be"):
        kiln.build(NoBranch(), (torch.randn(3, 4),), config=kiln.BuildConfig(device="cpu", streams="two"))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", ["1", "0"])
def test_gpu_side_stream_engine_matches_eager(cuda_graph, monkeypatch):
    monkeypatch.setenv("KILN_CUDA_GRAPH", cuda_graph)
    model, x = DownsampleBlock().eval(), torch.randn(4, 8, 28, 28)
    config = kiln.BuildConfig(precision="fp16", device="cuda", streams="on", tune=False)
    engine = kiln.build(model, (x,), config=config)
    assert engine.build_info["streams"]["used"] and engine.plan["side_branches"] == 1
    for _ in range(3):  # replays reuse the arena: a race between the streams would show here
        torch.testing.assert_close(engine(x.cuda()).float().cpu(), model(x), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_auto_streams_are_timed_and_recorded(tmp_path):
    model, x = DownsampleBlock().eval(), torch.randn(1, 8, 28, 28)
    config = kiln.BuildConfig(precision="fp16", device="cuda", timing_cache=str(tmp_path / "c.json"))
    engine = kiln.build(model, (x,), config=config)
    info = engine.build_info["streams"]
    assert info["side_branches"] == 1 and {"single_stream_ms", "side_stream_ms"} <= set(info)
    assert info["used"] == (info["side_stream_ms"] < info["single_stream_ms"] * STREAM_GAIN)
    torch.testing.assert_close(engine(x.cuda()).float().cpu(), model(x), atol=2e-2, rtol=2e-2)
