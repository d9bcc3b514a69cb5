"""Each pass on a tiny graph: the graph changes as intended and outputs do not."""

import torch
from torch import nn

from kiln.capture import capture
from kiln.passes import PASSES, count_ops, run_passes


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x).relu()


def with_dead_code(graph):
    """Plant an unused op and an unused weight (export already drops the model's own)."""
    g = graph.module.graph
    x = next(n for n in g.nodes if n.op == "placeholder")
    with g.inserting_after(x):
        g.call_function(torch.ops.aten.sigmoid.default, (x,))
    graph.module.register_buffer("unused_weight", torch.zeros(3))
    with g.inserting_after(x):
        g.get_attr("unused_weight")
    graph.module.recompile()
    return graph


def _ops(graph):
    return [str(n.target) for n in graph.module.graph.nodes if n.op == "call_function"]


def test_dead_code_removes_unused_ops_and_weights():
    x = torch.randn(2, 4)
    before = with_dead_code(capture(Tiny().eval(), (x,), device=torch.device("cpu")))
    after = PASSES["dead_code"].fn(before)
    assert "aten.sigmoid.default" in _ops(before) and "aten.sigmoid.default" not in _ops(after)
    assert count_ops(after) == count_ops(before) - 1
    assert "unused_weight" not in dict(after.module.named_buffers())
    torch.testing.assert_close(after.run(x), before.run(x))


def test_run_passes_reports_op_counts_per_pass():
    x = torch.randn(2, 4)
    graph = with_dead_code(capture(Tiny().eval(), (x,), device=torch.device("cpu")))
    _, report = run_passes(graph)
    assert report[0]["pass"] == "capture" and [r["pass"] for r in report[1:]] == list(PASSES)
    assert report[-1]["ops"] < report[0]["ops"]


def test_unknown_pass_is_named():
    import pytest

    graph = capture(Tiny().eval(), (torch.randn(2, 4),), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown pass.*nope"):
        run_passes(graph, ["nope"])
