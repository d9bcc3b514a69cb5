"""Dead-layer elimination (seed 000, point 1): drop ops whose results nothing uses, and
merge duplicate ops (the same pure op on the same inputs, e.g. one view taken three times
for attention's three projections), so later passes see shared inputs as shared."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from kiln.capture import CapturedGraph
from kiln.passes import register_pass
from kiln.passes.util import finish, op_nodes


def _key(node: fx.Node) -> Any:
    def freeze(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, freeze(v)) for k, v in value.items()))
        return value

    return node.target, freeze(node.args), freeze(node.kwargs)


def _pure(node: fx.Node) -> bool:
    op = node.target
    if not isinstance(op, torch._ops.OpOverload):
        return op.__module__ == "_operator"  # getitem
    return not op._schema.is_mutable and torch.Tag.nondeterministic_seeded not in op.tags


@register_pass("dead_code")
def eliminate_dead_code(graph: CapturedGraph) -> CapturedGraph:
    """Remove unused ops and weights; merge duplicate pure ops (the graph is rewritten in place)."""
    seen: dict[Any, fx.Node] = {}
    for node in op_nodes(graph):
        if not _pure(node):
            continue
        key = _key(node)
        try:
            original = seen.setdefault(key, node)
        except TypeError:  # an unhashable argument: leave the node alone
            continue
        if original is not node:
            node.replace_all_uses_with(original)
    return finish(graph)
