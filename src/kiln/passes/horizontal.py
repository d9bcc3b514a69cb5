"""Horizontal fusion (seed 000's "aggregation"): sibling linear layers that read the same
tensor (attention's Q/K/V projections) become one wider GEMM whose result is split into
views — one kernel launch and one read of the input instead of several."""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

from kiln import ops  # noqa: F401  (defines kiln::linear_act)
from kiln.capture import CapturedGraph
from kiln.passes import register_pass
from kiln.passes.util import add_weight, aten, finish, infer_meta, is_weight, op_nodes, weight

LINEAR = torch.ops.kiln.linear_act.default
VIEWS = (aten.view.default, aten._unsafe_view.default)


def _groups(graph: CapturedGraph) -> list[list[fx.Node]]:
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in op_nodes(graph, LINEAR):
        x, w_t, bias, act = node.args
        if not is_weight(w_t) or not (bias is None or is_weight(bias)):
            continue
        groups[(x, act, bias is None, node.meta["val"].dtype)].append(node)
    return [g for g in groups.values() if len(g) > 1]


def _fuse(graph: CapturedGraph, siblings: list[fx.Node]) -> None:
    g = graph.module.graph
    first = min(siblings, key=lambda n: list(g.nodes).index(n))
    x, _, has_no_bias, act = first.args[0], None, first.args[2] is None, first.args[3]
    widths = [n.args[1].meta["val"].shape[1] for n in siblings]
    dtype = first.meta["val"].dtype
    w = add_weight(graph, "hfused_weight", torch.cat([weight(graph, n.args[1]) for n in siblings], 1), first, dtype)
    b = None
    if not has_no_bias:
        b = add_weight(graph, "hfused_bias", torch.cat([weight(graph, n.args[2]) for n in siblings]), first, dtype)
    with g.inserting_before(first):
        wide = g.call_function(LINEAR, (x, w, b, act))
        parts = g.call_function(aten.split_with_sizes.default, (wide, widths, 1))
    wide.meta["stack_trace"] = first.meta.get("stack_trace")
    infer_meta(wide)
    infer_meta(parts)
    for i, node in enumerate(siblings):
        with g.inserting_before(first):
            part = g.call_function(operator.getitem, (parts, i))
        infer_meta(part)
        node.replace_all_uses_with(part)
        for user in part.users:  # a column slice is not contiguous: views become reshapes
            if user.target in VIEWS:
                user.target = aten.reshape.default


@register_pass("horizontal_fuse")
def horizontal_fuse(graph: CapturedGraph) -> CapturedGraph:
    """Merge linear layers that share their input, activation and precision."""
    groups = _groups(graph)
    for siblings in groups:
        _fuse(graph, siblings)
    return finish(graph) if groups else graph
