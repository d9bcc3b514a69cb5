"""Kernel timing: GPU time of CUDA-graph replays; a timing cache keyed by how it was measured."""

import time

import pytest
import torch
from torch import nn

from kiln import tune
from kiln.capture import capture


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
