"""Constant folding: ops whose inputs are all weights (transposes, reshapes, casts of
weights, constant factories) are computed once at build time (seed 000, point 5)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from kiln.graph import CapturedGraph, add_weight, finish, is_weight, op_nodes, weight
from kiln.passes.registry import register_pass

MAX_GROWTH = 2  # never fold an op whose result is much larger than its inputs (e.g. an expand)
# elements: a batch-independent mask or bias (Swin's [nW, H, N, N]) is folded, a batch-sized expand not
MIN_ALLOWED = 1 << 20
MIN_EXPAND = 1 << 16


def _foldable(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not _weight_only(node):
        return False
    # an expand is a free view at run time: folding it only stores copies (e.g. a mask per batch
    # row), unless what reads it folds too (then the copy is gone after the fold)
    expand = node.target == torch.ops.aten.expand.default and not _read_by_folds(node)
    return _small_enough(node, val, MIN_EXPAND if expand else MIN_ALLOWED)


def _foldable_results(node: fx.Node) -> bool:
    """An op with several results (read through getitem), e.g. the batch norm over a weight that
    weight-standardized convolutions (timm's ScaledStdConv2d) compute on every call."""
    val = node.meta.get("val")
    if not isinstance(val, (tuple, list)) or not node.users or not _weight_only(node):
        return False
    if not all(u.target is operator.getitem and isinstance(val[u.args[1]], torch.Tensor) for u in node.users):
        return False
    return all(_small_enough(node, val[u.args[1]], MIN_ALLOWED) for u in node.users)


def _weight_only(node: fx.Node) -> bool:
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded in op.tags:
        return False
    return all(is_weight(n) for n in node.all_input_nodes)


def _small_enough(node: fx.Node, val: torch.Tensor, floor: int) -> bool:
    inputs = sum(n.meta["val"].numel() for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor))
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
        if _foldable(node):
            changed |= _fold(graph, node, node, _compute(graph, node))
        elif _foldable_results(node):
            results = _compute(graph, node)
            for user in list(node.users):
                changed |= _fold(graph, user, node, results[user.args[1]])
    return finish(graph) if changed else graph


def _compute(graph: CapturedGraph, node: fx.Node) -> object:
    args = fx.node.map_arg(node.args, lambda n: weight(graph, n))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: weight(graph, n))
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _fold(graph: CapturedGraph, node: fx.Node, op: fx.Node, value: torch.Tensor) -> bool:
    """`node` (the op, or one getitem of its results) → a weight holding `value`."""
    if value.is_floating_point() and not node.meta["val"].is_floating_point():
        return False
    folded = add_weight(graph, f"folded_{node.name}", value, op, dtype=node.meta["val"].dtype)
    node.replace_all_uses_with(folded)
    return True
