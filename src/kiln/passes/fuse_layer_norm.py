"""Residual add + layer norm → kiln::add_layer_norm: one kernel reads both inputs once,
writes the sum (when something else needs it) and the normalized result."""

from __future__ import annotations

import operator

import torch

from kiln import ops  # noqa: F401  (defines the kiln:: ops used below)
from kiln.graph import CapturedGraph, aten, finish, getitem_user, infer_meta, op_nodes, same_shape
from kiln.passes.registry import register_pass


@register_pass("fuse_layer_norm")
def fuse_layer_norm(graph: CapturedGraph) -> CapturedGraph:
    """Fuse an add feeding a last-dimension layer norm into one op."""
    changed = False
    g = graph.module.graph
    for ln in op_nodes(graph, aten.native_layer_norm.default):
        s, shape, w, b, eps = ln.args
        out = getitem_user(ln, 0)
        if out is None or any(u is not out for u in ln.users) or len(shape) != 1:
            continue
        if s.target != aten.add.Tensor or s.kwargs.get("alpha", 1) != 1 or not same_shape(s, s.args[1]):
            continue
        if not same_shape(s, s.args[0]):
            continue
        with g.inserting_before(ln):
            fused = g.call_function(torch.ops.kiln.add_layer_norm.default, (s.args[0], s.args[1], w, b, eps))
            normed = g.call_function(operator.getitem, (fused, 0))
            total = g.call_function(operator.getitem, (fused, 1))
        fused.meta["stack_trace"] = ln.meta.get("stack_trace")
        for node in (fused, normed, total):
            infer_meta(node)
        out.replace_all_uses_with(normed)
        s.replace_all_uses_with(total)
        changed = True
    return finish(graph) if changed else graph
