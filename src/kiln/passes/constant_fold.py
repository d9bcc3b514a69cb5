"""Constant folding: ops whose inputs are all weights (transposes, reshapes, casts of
weights, constant factories) are computed once at build time (seed 000, point 5)."""

from __future__ import annotations

import torch
from torch import fx

from kiln.graph import CapturedGraph, add_weight, finish, is_weight, op_nodes, weight
from kiln.passes.registry import register_pass

MAX_GROWTH = 2  # never fold an op whose result is much larger than its inputs (e.g. an expand)
# elements: a batch-independent mask or bias (Swin's [nW, H, N, N]) is folded, a batch-sized expand not
MIN_ALLOWED = 1 << 20
MIN_EXPAND = 1 << 16


def _foldable(node: fx.Node) -> bool:
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded in op.tags:
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not all(is_weight(n) for n in node.all_input_nodes):
        return False
    inputs = sum(n.meta["val"].numel() for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor))
    # an expand is a free view at run time: folding it only stores copies (e.g. a mask per batch
    # row), unless what reads it folds too (then the copy is gone after the fold)
    floor = MIN_EXPAND if op == torch.ops.aten.expand.default and not _read_by_folds(node) else MIN_ALLOWED
    return val.numel() <= max(floor, MAX_GROWTH * inputs)


def _read_by_folds(node: fx.Node) -> bool:
    """Every user of `node` computes from weights and `node` alone (so it folds next)."""
    return bool(node.users) and all(
        user.op == "call_function" and all(n is node or is_weight(n) for n in user.all_input_nodes)
        for user in node.users
    )


@register_pass("constant_fold")
def fold_constants(graph: CapturedGraph) -> CapturedGraph:
    """Compute weight-only ops at build time and store their results as weights."""
    changed = False
    for node in op_nodes(graph):
        if not _foldable(node):
            continue
        args = fx.node.map_arg(node.args, lambda n: weight(graph, n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: weight(graph, n))
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if value.is_floating_point() and not node.meta["val"].is_floating_point():
            continue
        folded = add_weight(graph, f"folded_{node.name}", value, node, dtype=node.meta["val"].dtype)
        node.replace_all_uses_with(folded)
        changed = True
    return finish(graph) if changed else graph
