"""Reductions along the last axis fused with their pointwise producers and consumers → `kiln::rowwise`.

Any normalization or softmax written out in ops is a chain of elementwise ops around one
or more reductions along the last (contiguous) axis with keepdim: RMSNorm is
`x * rsqrt(mean(x²) + eps) * w`, LayerNorm `(x - mean(x)) * rsqrt(mean((x - mean)²) + eps)
* w + b`, softmax `exp(x - max) / sum(exp(x - max))` (ATen's `_softmax` over the last dim
is lowered so), with scales, biases and masks before it. ATen runs each op as a pass over
memory; a row program (kiln.ops.pointwise) runs the whole region with one row in registers.

A region is grown from its root (the last node, the only one used outside) up through
producers whose users are all in it, to a fixed point, as fuse_pointwise grows its groups.
Every node must be elementwise (what fuse_pointwise lowers), a reduction over the last dim
with keepdim (mean, sum, amax, amin; var with a correction as mean and mean of squares), or
a softmax over the last dim; every value broadcasts to the root's shape, whose last dim is
the row, and a reduction's operand spans the whole row. A region without a reduction is
left to fuse_pointwise, which runs next. The decision is the graph's structure only.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kiln.graph import CapturedGraph
from kiln.ops.pointwise import ROWWISE_KIND, Const, ProgramBuilder, Var
from kiln.passes.fuse_pointwise import (
    LOWERINGS,
    Lowering,
    Operand,
    _arg,
    _NotFusable,
    _val,
    fusable,
    rewrite_group,
)
from kiln.passes.registry import register_pass

aten = torch.ops.aten
ROWWISE = torch.ops.kiln.rowwise.default
MAX_ROW = 8192  # kiln.kernels.triton_rowwise.MAX_ROW: longer rows stay ATen's
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _last_dim(node: fx.Node, dims: Any) -> bool:
    """Whether `dims` names exactly the last dim of `node`'s input."""
    source = _val(node.args[0])
    if source is None or source.dim() == 0:
        return False
    if isinstance(dims, int):
        dims = [dims]
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, source.dim() - 1)


def _reduction(op: str, dim_index: int = 1) -> Lowering:
    def lower(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
        dims = _arg(node, dim_index, "dim", None)
        keepdim = _arg(node, dim_index + 1, "keepdim", False)
        if not keepdim or not _last_dim(node, dims) or node.kwargs.get("dtype") is not None or len(node.args) > 3:
            raise _NotFusable("not a keepdim reduction over the last dim")
        return b.emit(op, operand(node.args[0]))

    return lower


def _var(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    """var(x, [-1], correction=c, keepdim=True) = mean((x - mean(x))²) · n / (n - c)."""
    dims = _arg(node, 1, "dim", None)
    correction = node.kwargs.get("correction")
    correction = 1 if correction is None else correction
    if not node.kwargs.get("keepdim", False) or not _last_dim(node, dims) or len(node.args) > 2:
        raise _NotFusable("not a keepdim variance over the last dim")
    n = _val(node.args[0]).shape[-1]
    if not isinstance(n, int) or not isinstance(correction, (int, float)) or n - correction <= 0:
        raise _NotFusable(f"variance correction {correction!r} over {n} elements")
    x = operand(node.args[0])
    centered = b.emit("sub", x, b.emit("row_mean", x))
    var = b.emit("row_mean", b.emit("mul", centered, centered))
    return var if correction == 0 else b.emit("mul", var, Const(n / (n - correction)))


def _softmax(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    """softmax over the last dim: exp(x - max) / sum(exp(x - max))."""
    if len(node.args) != 3 or not _last_dim(node, node.args[1]):
        raise _NotFusable("softmax over another dim")
    x = operand(node.args[0])
    if node.args[2]:  # half_to_float
        x = b.emit("cast", x, torch.float32)
    e = b.emit("exp", b.emit("sub", x, b.emit("row_max", x)))
    return b.emit("div", e, b.emit("row_sum", e))


REDUCTIONS: dict[Any, Lowering] = {
    aten.mean.dim: _reduction("row_mean"),
    aten.sum.dim_IntList: _reduction("row_sum"),
    aten.amax.default: _reduction("row_max"),
    aten.amin.default: _reduction("row_min"),
    aten.var.correction: _var,
    aten._softmax.default: _softmax,
}
ROW_LOWERINGS: dict[Any, Lowering] = {**LOWERINGS, **REDUCTIONS}


def _is_reduction(node: fx.Node) -> bool:
    """A reduction (or softmax) over the last dim of a float tensor that a row program expresses."""
    if node.op != "call_function" or node.target not in REDUCTIONS:
        return False
    source, val = _val(node.args[0]) if node.args else None, _val(node)
    if source is None or val is None or source.dtype not in FLOATS or source.device != val.device:
        return False
    try:
        REDUCTIONS[node.target](ProgramBuilder(ROWWISE_KIND), node, lambda a: Var(True, 0))
    except _NotFusable:
        return False
    return True


def _known(claim: Any) -> bool:
    """A size comparison that holds for every value of the dims (dynamic shapes), never a guard
    that would fix a dim at its traced size; a plain bool as it is."""
    return statically_known_true(claim) if isinstance(claim, torch.SymBool) else bool(claim)


def _fits(node: fx.Node, shape: torch.Size) -> bool:
    """Whether `node`'s value broadcasts to the row shape, and a reduction's operand spans the row."""
    sizes = _val(node).shape
    if len(sizes) > len(shape):
        return False
    for size, full in zip(reversed(sizes), reversed(shape)):
        if not (_known(size == full) or _known(size == 1)):
            return False
    return node.target not in REDUCTIONS or _known(_val(node.args[0]).shape[-1] == shape[-1])


def find_regions(graph: fx.Graph) -> list[list[fx.Node]]:
    """Convex regions (in graph order, root last) with at least one row reduction."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    ok = {n for n in nodes if fusable(n) or _is_reduction(n)}
    taken: set[fx.Node] = set()
    regions = []
    for root in reversed(nodes):
        if root not in ok or root in taken:
            continue
        shape = _val(root).shape
        if len(shape) == 0 or not isinstance(shape[-1], int) or not 2 <= shape[-1] <= MAX_ROW:
            continue  # (a row of dynamic length: its kernel is generated for one row length)
        if _val(root).dtype not in FLOATS:
            continue
        region, grown = {root}, True
        while grown:
            grown = False
            for member in list(region):
                for producer in member.all_input_nodes:
                    if producer in ok and producer not in taken and producer not in region:
                        if all(user in region for user in producer.users) and _fits(producer, shape):
                            region.add(producer)
                            grown = True
        if not _fits(root, shape) or not any(n.target in REDUCTIONS for n in region) or len(region) < 2:
            continue
        taken |= region
        regions.append(sorted(region, key=position.__getitem__))
    return regions


@register_pass("fuse_rowwise")
def fuse_rowwise(graph: CapturedGraph) -> CapturedGraph:
    """Fuse last-dim reductions (norms, softmax) with their elementwise neighbours into kiln::rowwise."""
    g = copy.deepcopy(graph.module.graph)
    rewritten = [
        rewrite_group(g, region, ROWWISE, ROW_LOWERINGS, ROWWISE_KIND, "rowwise") for region in find_regions(g)
    ]
    if not any(rewritten):
        return graph
    g.lint()
    return dataclasses.replace(graph, module=fx.GraphModule(graph.module, g))
