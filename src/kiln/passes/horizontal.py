"""Horizontal fusion (seed 000's "aggregation"): sibling linear layers that read the same
tensor (attention's Q/K/V projections; the gate and up projections of a gated MLP, whose
activation moves from the GEMM's epilogue into the pointwise product) become one GEMM launch
whose result is split into views — one kernel and one read of the input instead of several. Sibling convolutions of
one geometry and activation (Inception's 1×1 branches) become one convolution whose output
channels are split the same way."""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

from kiln import ops  # noqa: F401  (defines kiln::linear_act)
from kiln.graph import CapturedGraph, add_weight, aten, finish, infer_meta, is_weight, op_nodes, weight
from kiln.passes.registry import register_pass

LINEAR = torch.ops.kiln.linear_act.default
CONV = torch.ops.kiln.conv_bias_act.default
VIEWS = (aten.view.default, aten._unsafe_view.default)


# Activations a gated sibling's may become after the merge: ATen ops fuse_pointwise fuses into the
# product that gates (kiln.graph.activation names them back).
GATE_ACTIVATIONS = {
    "relu": (aten.relu.default, {}),
    "silu": (aten.silu.default, {}),
    "sigmoid": (aten.sigmoid.default, {}),
    "tanh": (aten.tanh.default, {}),
    "gelu": (aten.gelu.default, {}),
    "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}),
}


def _groups(graph: CapturedGraph) -> list[list[fx.Node]]:
    """Siblings reading one input with one bias-ness and dtype: all of one activation, or mixed
    where each activated one only gates another (act(x W1) * (x W2): SwiGLU / GeGLU MLPs)."""
    by_input: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in op_nodes(graph, LINEAR):
        x, w_t, bias, act = node.args
        if not is_weight(w_t) or not (bias is None or is_weight(bias)):
            continue
        by_input[(x, bias is None, node.meta["val"].dtype)].append(node)
    groups = []
    for nodes in by_input.values():
        acts = {n.args[3] for n in nodes}
        if len(acts) > 1 and all(n.args[3] == "none" or _gate(n, nodes) is not None for n in nodes):
            groups.append(nodes)
            continue
        by_act: dict[str, list[fx.Node]] = defaultdict(list)
        for n in nodes:
            by_act[n.args[3]].append(n)
        groups += [g for g in by_act.values() if len(g) > 1]
    return groups


def _through_views(node: fx.Node) -> fx.Node:
    """The last of the views `node` flows through, each its producer's only use."""
    while len(node.users) == 1 and next(iter(node.users)).target in (*VIEWS, aten.reshape.default):
        node = next(iter(node.users))
    return node


def _gate(node: fx.Node, siblings: list[fx.Node]) -> tuple[fx.Node, int] | None:
    """(product, operand index) where `node`'s activated output, through views, is one factor of a
    product whose other factor is, through views, another sibling's output; else None."""
    if node.args[3] not in GATE_ACTIVATIONS:
        return None
    value = _through_views(node)
    users = list(value.users)
    if len(users) != 1 or users[0].target != aten.mul.Tensor or len(users[0].args) != 2:
        return None
    product = users[0]
    if product.args[0] is product.args[1]:
        return None
    index = product.args.index(value)
    other = product.args[1 - index]
    if not isinstance(other, fx.Node):
        return None
    others = {_through_views(s): s for s in siblings if s is not node}
    if other not in others:
        return None
    return product, index


def _fuse(graph: CapturedGraph, siblings: list[fx.Node]) -> None:
    """Equal widths: one batched GEMM, [G, M, N], whose slices stay dense (fused attention
    kernels want dense Q, K and V). Mixed widths: one wide GEMM split into column views."""
    g = graph.module.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min(siblings, key=order.get)
    x, _, bias, act = first.args
    gates = []  # mixed activations: one GEMM without, each gate's applied again before its product
    if len({n.args[3] for n in siblings}) > 1:
        act = "none"
        gates = [(n.args[3], *_gate(n, siblings)) for n in siblings if n.args[3] != "none"]
    widths = [n.args[1].meta["val"].shape[1] for n in siblings]
    dtype = first.meta["val"].dtype
    weights = [weight(graph, n.args[1]) for n in siblings]
    biases = None if bias is None else [weight(graph, n.args[2]) for n in siblings]
    with g.inserting_before(first):
        if len(set(widths)) == 1 and act == "none":
            w = add_weight(graph, "hfused_weight", torch.stack(weights), first, dtype)
            # -1: no size baked into the graph (dynamic shapes, docs/dynamic-shapes.md)
            batched_x = g.call_function(aten.expand.default, (x, [len(siblings), -1, -1]))
            new_nodes = [batched_x]
            if biases is None:
                wide = g.call_function(aten.bmm.default, (batched_x, w))
            else:
                b = add_weight(graph, "hfused_bias", torch.stack(biases).unsqueeze(1), first, dtype)
                if graph.dims:  # baddbmm's meta function fails on symbolic sizes (torch 2.11-2.14)
                    product = g.call_function(aten.bmm.default, (batched_x, w))
                    new_nodes.append(product)
                    wide = g.call_function(aten.add.Tensor, (product, b))
                else:
                    wide = g.call_function(aten.baddbmm.default, (b, batched_x, w))
            new_nodes.append(wide)
            parts = [g.call_function(aten.select.int, (wide, 0, i)) for i in range(len(siblings))]
        else:
            w = add_weight(graph, "hfused_weight", torch.cat(weights, 1), first, dtype)
            b = None if biases is None else add_weight(graph, "hfused_bias", torch.cat(biases), first, dtype)
            wide = g.call_function(LINEAR, (x, w, b, act))
            split = g.call_function(aten.split_with_sizes.default, (wide, widths, 1))
            new_nodes = [wide, split]
            parts = [g.call_function(operator.getitem, (split, i)) for i in range(len(siblings))]
    _hand_over(siblings, new_nodes, parts, first)
    for name, product, index in gates:
        op, kwargs = GATE_ACTIVATIONS[name]
        with g.inserting_before(product):
            activated = g.call_function(op, (product.args[index],), kwargs)
        activated.meta["stack_trace"] = product.meta.get("stack_trace")
        infer_meta(activated)
        product.update_arg(index, activated)


def _hand_over(siblings: list[fx.Node], new_nodes: list[fx.Node], parts: list[fx.Node], first: fx.Node) -> None:
    """Give each sibling's uses to its part of the merged result."""
    for node in new_nodes + parts:
        node.meta["stack_trace"] = first.meta.get("stack_trace")
        infer_meta(node)
    for node, part in zip(siblings, parts):
        node.replace_all_uses_with(part)
        for user in part.users:  # a column or channel slice is not contiguous: views become reshapes
            if user.target in VIEWS:
                user.target = aten.reshape.default


def _conv_groups(graph: CapturedGraph) -> list[list[fx.Node]]:
    """Convolutions reading one tensor with one kernel size, stride, padding, dilation and
    activation, a bias and no residual (a residual is per convolution)."""
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in op_nodes(graph, CONV):
        x, w, b, stride, padding, dilation, groups_, act, residual = node.args
        if groups_ != 1 or residual is not None or not is_weight(w) or not is_weight(b):
            continue
        key = (x, tuple(w.meta["val"].shape[1:]), tuple(stride), tuple(padding), tuple(dilation), act,
               node.meta["val"].dtype)
        groups[key].append(node)
    return [g for g in groups.values() if len(g) > 1]


def _fuse_convs(graph: CapturedGraph, siblings: list[fx.Node]) -> None:
    """One convolution over the stacked output channels, split into channel views."""
    g = graph.module.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min(siblings, key=order.get)
    x, _, _, stride, padding, dilation, _, act, _ = first.args
    dtype = first.meta["val"].dtype
    widths = [n.args[1].meta["val"].shape[0] for n in siblings]
    w = add_weight(graph, "hfused_conv_weight", torch.cat([weight(graph, n.args[1]) for n in siblings]), first, dtype)
    b = add_weight(graph, "hfused_conv_bias", torch.cat([weight(graph, n.args[2]) for n in siblings]), first, dtype)
    with g.inserting_before(first):
        wide = g.call_function(CONV, (x, w, b, stride, padding, dilation, 1, act, None))
        split = g.call_function(aten.split_with_sizes.default, (wide, widths, 1))
        parts = [g.call_function(operator.getitem, (split, i)) for i in range(len(siblings))]
    _hand_over(siblings, [wide, split], parts, first)


@register_pass("horizontal_fuse")
def horizontal_fuse(graph: CapturedGraph) -> CapturedGraph:
    """Merge linear layers that share their input, activation and precision (or whose differing
    activations only gate a sibling: then one GEMM, each activation fused into its product)."""
    groups = _groups(graph)
    for siblings in groups:
        _fuse(graph, siblings)
    return finish(graph) if groups else graph


# Opt-in: measured on GoogLeNet (H200, fp16; benchmarks/horizontal_convs.py) 1.09x faster at
# batch 1 but 0.95x at batch 32, where the 3x3 convolutions reading channel slices of the
# fused output pay for copies that separate convolutions avoid.
@register_pass("horizontal_fuse_conv", default=False)
def horizontal_fuse_conv(graph: CapturedGraph) -> CapturedGraph:
    """Merge convolutions that share their input, geometry, activation and precision (opt-in)."""
    groups = _conv_groups(graph)
    for siblings in groups:
        _fuse_convs(graph, siblings)
    return finish(graph) if groups else graph
