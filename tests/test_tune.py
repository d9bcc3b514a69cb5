"""Kernel timing: GPU time of CUDA-graph replays; a timing cache keyed by how it was measured."""

import time

import pytest
import torch
from torch import nn

from kiln.capture.export import capture
from kiln.select import tune


@pytest.mark.gpu
def test_timing_leaves_out_host_overhead_that_graph_replay_removes():
    x = torch.randn(64, device="cuda")

    def slow_host(args, kwargs, outs):
        time.sleep(0.002)  # 2 ms of Python per call; the GPU work is one tiny kernel
        return args[0] + 1

    assert tune.time_kernel(slow_host, (x,), {}, iters=5) < 0.5


@pytest.mark.gpu
def test_candidates_that_cannot_be_captured_are_timed_by_plain_calls():
    x = torch.randn(64, device="cuda")

    def syncs(args, kwargs, outs):
        torch.cuda.synchronize()  # not allowed while a CUDA graph is being captured
        return args[0] + 1

    assert tune._captured(syncs, (x,), {}, 2) is None
    assert 0 < tune.time_kernel(syncs, (x,), {}, iters=5) < 50
    assert torch.randn(4, device="cuda").isfinite().all(), "random ops work after a failed capture"


@pytest.mark.gpu
def test_cache_key_names_the_timing_method():
    graph = capture(nn.ReLU().eval(), (torch.randn(2, 3),), device=torch.device("cpu"))
    node = next(n for n in graph.module.graph.nodes if n.op == "call_function")
    assert tune.TIMING_METHOD in tune.signature(node, torch.device("cuda"))


def test_a_candidate_that_fails_in_any_way_is_dropped(monkeypatch):
    from kiln.kernels import KERNELS, register_kernel

    @register_kernel("test.broken_relu", provider="test", implements=lambda op: op == "aten.relu.default")
    def make_broken(name, out):
        def run(args, kwargs, outs):
            raise ValueError("out of resources")  # not a RuntimeError, as Triton's compile errors are not

        return run

    try:
        graph = capture(nn.ReLU().eval(), (torch.randn(2, 3),), device=torch.device("cpu"))
        node = next(n for n in graph.module.graph.nodes if n.op == "call_function")
        monkeypatch.setattr(tune, "time_kernel", lambda fn, args, kwargs: 1.0)
        timings = tune.tune_node(node, "aten.relu.default", ["test.broken_relu", "aten"], graph.module,
                                 torch.device("cpu"))
        assert timings == {"aten": 1.0}
    finally:
        del KERNELS["test.broken_relu"]


def test_exact_builds_leave_approximate_kernels_out():
    import kiln
    from kiln.kernels import KERNELS, register_kernel

    @register_kernel("test.approximate_relu", provider="test", implements=lambda op: op == "aten.relu.default",
                     priority=5, approximate=True)
    def make_approximate(name, out):
        return lambda args, kwargs, outs: torch.clamp(args[0], min=0.0)

    try:
        x = torch.randn(2, 3)
        default = kiln.build(nn.ReLU().eval(), (x,), device="cpu")
        exact = kiln.build(nn.ReLU().eval(), (x,), config=kiln.BuildConfig(device="cpu", exact=True))
        assert default.plan["steps"][0]["kernel"] == "test.approximate_relu"
        assert exact.plan["steps"][0]["kernel"] == "aten"
        assert "test.approximate_relu" not in exact.plan["steps"][0]["candidates"]
        assert exact.header["build"]["exact"] is True
    finally:
        del KERNELS["test.approximate_relu"]
    assert KERNELS["cublaslt.linear_gelu_tanh"].approximate


def test_candidates_are_timed_with_cudnn_benchmark_on_as_engines_run(monkeypatch):
    seen = []
    def record(fn, args, kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return 1.0

    monkeypatch.setattr(tune, "time_kernel", record)
    graph = capture(nn.ReLU().eval(), (torch.randn(2, 3),), device=torch.device("cpu"))
    node = next(n for n in graph.module.graph.nodes if n.op == "call_function")
    before = torch.backends.cudnn.benchmark
    tune.tune_node(node, "aten.relu.default", ["aten"], graph.module, torch.device("cpu"))
    assert seen == [True] and torch.backends.cudnn.benchmark == before
