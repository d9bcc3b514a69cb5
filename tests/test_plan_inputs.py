"""The planner makes the graph inputs the first slots, in order, whatever the node order."""

import torch
from torch import nn

from kiln.capture import capture
from kiln.graph import aten, infer_meta
from kiln.plan import make_plan
from kiln.select import select_kernels


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return torch.relu(x) + y


def test_a_node_between_placeholders_does_not_take_an_input_slot():
    inputs = (torch.randn(2, 3), torch.randn(2, 3))
    graph = capture(TwoInputs().eval(), inputs, device=torch.device("cpu"))
    g = graph.module.graph
    x, y = [n for n in g.nodes if n.op == "placeholder"]
    with g.inserting_after(x):  # as channels_last puts a layout copy right after its input
        copy = g.call_function(aten.clone.default, (x,))
    x.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    infer_meta(copy)
    graph.module.recompile()
    assert [n.op for n in g.nodes][:3] == ["placeholder", "call_function", "placeholder"]

    plan = make_plan(graph, select_kernels(graph))
    assert [s["kind"] for s in plan["slots"][:2]] == ["input", "input"]
    assert all(s["kind"] != "input" for s in plan["slots"][2:])
