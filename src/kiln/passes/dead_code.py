"""Dead-layer elimination (seed 000, point 1): drop ops whose results nothing uses, bypass
identities (dropout in eval exports as a clone; views and copies that change nothing), and
merge duplicate ops (the same pure op on the same inputs, e.g. one view taken three times
for attention's three projections), so later passes see shared inputs as shared."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from kiln.graph import CapturedGraph, finish, op_nodes
from kiln.passes.registry import register_pass


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


aten = torch.ops.aten
SAME_SHAPE_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
                    aten.alias.default}


def _same_tensor(a: Any, b: Any) -> bool:
    """Same shape, dtype, device and strides (where strides matter): b can stand for a."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _identity_of(node: fx.Node) -> fx.Node | None:
    """The input `node` merely repeats, if it is an identity: a clone (dropout in eval), a
    same-dtype copy, a view to the same shape, a permutation that permutes nothing, a slice
    of a whole dimension, a padding by nothing (Swin pads windows by `-size % window`)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, op = node.args[0], node.target
    identity = (
        op in (aten.clone.default, aten._to_copy.default, aten.detach.default) or op in SAME_SHAPE_VIEWS
        or (op == aten.permute.default and list(node.args[1]) == list(range(len(node.args[1]))))
        or (op == aten.slice.Tensor and _arg(node, 4, "step", 1) == 1 and _arg(node, 2, "start", 0) in (0, None)
            and _same_shape(node, source))
        or (op == aten.constant_pad_nd.default and all(isinstance(p, int) and p == 0 for p in node.args[1]))
    )
    if identity and _same_tensor(source.meta.get("val"), node.meta.get("val")):
        return source
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


@register_pass("dead_code")
def eliminate_dead_code(graph: CapturedGraph) -> CapturedGraph:
    """Remove unused ops and weights, bypass identities, merge duplicate pure ops (in place)."""
    seen: dict[Any, fx.Node] = {}
    for node in op_nodes(graph):
        if not _pure(node):
            continue
        source = _identity_of(node)
        if source is not None:
            node.replace_all_uses_with(source)
            continue
        key = _key(node)
        try:
            original = seen.setdefault(key, node)
        except TypeError:  # an unhashable argument: leave the node alone
            continue
        if original is not node:
            node.replace_all_uses_with(original)
    return finish(graph)
