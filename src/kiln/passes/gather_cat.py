"""A concatenation of slices of one tensor, some negated, is one gather: rotary embeddings'
`rotate_half(x) = cat(-x[..., h:], x[..., :h])` (Llama, GPT-NeoX, Qwen, …) launches a negation
and a copy per call; `index_select(x, dim, index) * sign` launches one gather, and the sign (a
constant row of ±1) is one more operand of the pointwise group that usually follows
(`x * cos + rotate_half(x) * sin`), which fuse_pointwise then runs as one kernel.

Taken: `cat([p0, p1, …], dim)` where every piece is `slice(x, dim, start, end)` with step 1 of the
same tensor x along the same dim, or `neg` of one, and x's size along dim is static. The decision
is the graph's structure only.
"""

from __future__ import annotations

import torch
from torch import fx

from kiln.graph import CapturedGraph, add_weight, aten, finish, infer_meta, op_nodes
from kiln.passes.registry import register_pass


def _piece(node: object) -> tuple[fx.Node, int, int, int, bool] | None:
    """(x, dim, start, end, negated) for `slice(x, dim, start, end)` or `neg` of one."""
    negated = False
    if isinstance(node, fx.Node) and node.target == aten.neg.default:
        node, negated = node.args[0], True
    if not isinstance(node, fx.Node) or node.target != aten.slice.Tensor:
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, end, step = args[:5]
    step = node.kwargs.get("step", 1 if step is None else step)
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if step != 1 or not isinstance(val, torch.Tensor) or not isinstance(dim, int):
        return None
    dim %= val.dim()
    size = val.shape[dim]
    if not isinstance(size, int):
        return None
    start = 0 if start is None else start
    end = size if end is None else end
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    return x, dim, _clip(start, size), _clip(end, size), negated


def _clip(i: int, size: int) -> int:
    """A slice bound as Python clips it (negative from the end)."""
    return max(0, min(size, i + size if i < 0 else i))


def _gather(cat: fx.Node) -> tuple[fx.Node, int, list[int], list[float]] | None:
    """(x, dim, index, sign) when `cat` only rearranges (and negates) slices of one tensor."""
    tensors = cat.args[0]
    val = cat.meta.get("val")
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not isinstance(val, torch.Tensor):
        return None
    pieces = [_piece(t) for t in tensors]
    if any(p is None for p in pieces):
        return None
    x, dim = pieces[0][0], pieces[0][1]
    cat_dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % val.dim()
    if cat_dim != dim or any(p[0] is not x or p[1] != dim for p in pieces):
        return None
    if not x.meta["val"].is_floating_point() or x.meta["val"].dtype != val.dtype:
        return None
    index, sign = [], []
    for _, _, start, end, negated in pieces:
        index += range(start, end)
        sign += [-1.0 if negated else 1.0] * (end - start)
    return x, dim, index, sign


@register_pass("gather_cat")
def gather_cat(graph: CapturedGraph) -> CapturedGraph:
    """cat of (negated) slices of one tensor along one dim → index_select [× a constant sign]."""
    g, changed = graph.module.graph, False
    for cat in op_nodes(graph, aten.cat.default):
        found = _gather(cat)
        if found is None:
            continue
        x, dim, index, sign = found
        rank = x.meta["val"].dim()
        with g.inserting_before(cat):
            idx = add_weight(graph, "gather_index", torch.tensor(index, dtype=torch.int64), cat, torch.int64)
            out = g.call_function(aten.index_select.default, (x, dim, idx))
            new = [out]
            if any(s < 0 for s in sign):
                shape = [1] * rank
                shape[dim] = len(sign)
                signs = add_weight(graph, "gather_sign", torch.tensor(sign).view(shape), cat, x.meta["val"].dtype)
                out = g.call_function(aten.mul.Tensor, (out, signs))
                new.append(out)
        for node in new:
            node.meta["stack_trace"] = cat.meta.get("stack_trace")
            infer_meta(node)
        cat.replace_all_uses_with(out)
        changed = True
    return finish(graph) if changed else graph
