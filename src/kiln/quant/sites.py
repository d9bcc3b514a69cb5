"""Where a graph can be quantized: the GEMM-like ops, their activation and weight operands.

A rule per op target (register, don't branch): which arguments are GEMM operands, and
for each the dimension that indexes the op's output channels when it is a weight (per-
channel scales run along it). An operand is a weight when it traces back to a constant
(get_attr) through views and casts only; every other floating operand is an activation
and gets one scale per tensor. Bias and residual arguments stay in high precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from kiln.graph import CapturedGraph, module_path, source_line

aten = torch.ops.aten


@dataclass(frozen=True)
class QuantRule:
    # GEMM operand argument index → output-channel dim of that operand when it is a weight
    # (None: always an activation, e.g. a convolution's input)
    operands: dict[int, int | None]


QUANT_RULES: dict[object, QuantRule] = {}


def register_rule(target: object, operands: dict[int, int | None]) -> None:
    QUANT_RULES[target] = QuantRule(dict(operands))


register_rule(aten.convolution.default, {0: None, 1: 0})
register_rule(aten.mm.default, {0: -2, 1: -1})
register_rule(aten.addmm.default, {1: -2, 2: -1})
register_rule(aten.baddbmm.default, {1: -2, 2: -1})  # horizontal_fuse's q/k/v GEMM with bias
register_rule(aten.bmm.default, {0: -2, 1: -1})
register_rule(torch.ops.kiln.conv_bias_act.default, {0: None, 1: 0})
register_rule(torch.ops.kiln.linear_act.default, {0: None, 1: -1})

# Ops a weight may pass through between its constant and the GEMM (layout only, or a cast).
VIEW_OPS = {
    aten.permute.default,
    aten.t.default,
    aten.transpose.int,
    aten.expand.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.clone.default,
    aten.alias.default,
    aten._to_copy.default,
}


# Layout-only ops: quantizing per tensor commutes with them, so an activation read through
# them is quantized once, at the tensor they view (one scale, where its producer writes it).
LAYOUT_OPS = VIEW_OPS - {aten._to_copy.default}


@dataclass
class WeightOperand:
    index: int  # argument index in the op
    constant: fx.Node  # the get_attr
    chain: list[fx.Node]  # view/cast nodes from the constant to the op, in order
    channel_dim: int  # output-channel dim of the operand as the op sees it


@dataclass
class Site:
    """One quantizable op (a "layer"): its activation operands and weight operands."""

    node: fx.Node
    activations: dict[int, fx.Node] = field(default_factory=dict)  # arg index → producer
    weights: list[WeightOperand] = field(default_factory=list)
    # arg index → layout ops from the producer to the operand, in order
    views: dict[int, list[fx.Node]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def module(self) -> str:
        return module_path(self.node)

    @property
    def op(self) -> str:
        return op_name(self.node)

    @property
    def source(self) -> str:
        return source_line(self.node)

    def describe(self) -> str:
        where = self.module or "<top level>"
        return f"{where} ({self.op}, node {self.name})"


def op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    overload = getattr(target, "_overloadpacket", None)
    if overload is not None:
        ns = getattr(target, "namespace", "aten")
        return f"{ns}.{overload.__name__}"
    return name


def _is_float_value(node: object) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _trace(node: fx.Node, ops: set) -> tuple[fx.Node, list[fx.Node]]:
    """The node `node` is derived from through `ops` (each taking it as argument 0), and the chain."""
    chain: list[fx.Node] = []
    cur = node
    while cur.op == "call_function" and cur.target in ops and cur.args and isinstance(cur.args[0], fx.Node):
        chain.append(cur)
        cur = cur.args[0]
    return cur, chain[::-1]


def trace_weight(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The constant (get_attr) `node` is a view or cast of, and the chain from it to `node`."""
    root, chain = _trace(node, VIEW_OPS)
    return (root, chain) if root.op == "get_attr" else None


def trace_activation(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The tensor an activation operand is a layout view of, and the views from it."""
    root, chain = _trace(node, LAYOUT_OPS)
    return (root, chain) if _is_float_value(root) else (node, [])


def find_sites(graph: CapturedGraph, targets: dict[object, QuantRule] | None = None) -> list[Site]:
    """Every quantizable op of `graph`, in graph order. An op none of whose operands is a
    floating tensor is skipped; so is one whose operands are all weights (folded instead)."""
    rules = QUANT_RULES if targets is None else targets
    sites = []
    for node in graph.module.graph.nodes:
        if node.op != "call_function" or node.target not in rules:
            continue
        site = Site(node)
        for index, channel_dim in rules[node.target].operands.items():
            if index >= len(node.args) or not _is_float_value(node.args[index]):
                continue
            arg = node.args[index]
            traced = trace_weight(arg) if channel_dim is not None else None
            if traced is not None:
                constant, chain = traced
                site.weights.append(WeightOperand(index, constant, chain, channel_dim))
            else:
                site.activations[index], site.views[index] = trace_activation(arg)
        if site.activations:
            sites.append(site)
    return sites
