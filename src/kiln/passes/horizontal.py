"""Horizontal fusion (seed 000's "aggregation"): sibling linear layers that read the same
tensor (attention's Q/K/V projections) become one GEMM launch whose result is split into
views — one kernel and one read of the input instead of several. Sibling convolutions of
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


def _groups(graph: CapturedGraph) -> list[list[fx.Node]]:
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in op_nodes(graph, LINEAR):
        x, w_t, bias, act = node.args
        if not is_weight(w_t) or not (bias is None or is_weight(bias)):
            continue
        groups[(x, act, bias is None, node.meta["val"].dtype)].append(node)
    return [g for g in groups.values() if len(g) > 1]


def _fuse(graph: CapturedGraph, siblings: list[fx.Node]) -> None:
    """Equal widths: one batched GEMM, [G, M, N], whose slices stay dense (fused attention
    kernels want dense Q, K and V). Mixed widths: one wide GEMM split into column views."""
    g = graph.module.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min(siblings, key=order.get)
    x, _, bias, act = first.args
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
    """Merge linear layers that share their input, activation and precision."""
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
