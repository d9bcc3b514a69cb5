"""Insert quantize/dequantize pairs around a graph's GEMM-like ops (simulated quantization).

Activations feeding a quantizable op get one Q/DQ pair per producing tensor (shared by every
quantized op that reads it), with the calibrated per-tensor scale. Weights are stored
quantized (int8 or float8 e4m3 constants, per-channel scales along the stored axis that
becomes the op's output channels) and dequantized where the op reads them, before the views
that led there. The result still runs under PyTorch: every op in it has a reference
implementation. A later pass may fuse each DQ → GEMM → Q into an 8-bit kernel.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
from torch import fx

import kiln.ops.fused  # noqa: F401  (the kiln:: fused ops the rules name)
import kiln.ops.quant  # noqa: F401  (defines the kiln:: Q/DQ ops)
from kiln.graph import CapturedGraph, add_weight, finish, infer_meta, weight
from kiln.ops.quant import QuantFormat, quant_format
from kiln.quant.params import CalibrationTable, ChannelQuant
from kiln.quant.sites import Site, WeightOperand, find_sites

kiln_ops = torch.ops.kiln
aten = torch.ops.aten
META_KEYS = ("stack_trace", "nn_module_stack")


def insert_qdq(
    graph: CapturedGraph,
    table: CalibrationTable,
    *,
    exclude: Iterable[str] = (),
    only: Iterable[str] | None = None,
    weight_format: str | QuantFormat | None = None,
) -> CapturedGraph:
    """A copy of `graph` with Q/DQ inserted at every quantizable op except those named in
    `exclude` (node names, as `find_sites` reports them); with `only`, at those ops alone."""
    fmt = table.fmt
    wfmt = fmt if weight_format is None else quant_format(weight_format)
    graph = _copy(graph)
    excluded = set(exclude)
    chosen = None if only is None else set(only)
    sites = [s for s in find_sites(graph) if s.name not in excluded and (chosen is None or s.name in chosen)]
    dq_of: dict[fx.Node, fx.Node] = {}
    for site in sites:
        for w in site.weights:
            _quantize_weight(graph, site, w, wfmt)
        args = list(site.node.args)
        for index, producer in site.activations.items():
            if producer not in dq_of:
                dq_of[producer] = _quantize_activation(graph, site, producer, table)
            args[index] = _replay(graph, dq_of[producer], site.views.get(index, []), site.node)
        site.node.args = tuple(args)
    return finish(graph)


def _replay(graph: CapturedGraph, start: fx.Node, chain: list[fx.Node], before: fx.Node) -> fx.Node:
    """Apply copies of the single-input ops in `chain` to `start`, inserted before `before`."""
    g = graph.module.graph
    cur = start
    for node in chain:
        with g.inserting_before(before):
            cur = g.call_function(node.target, (cur, *node.args[1:]), dict(node.kwargs))
        for key in META_KEYS:
            if key in node.meta:
                cur.meta[key] = node.meta[key]
        infer_meta(cur)
    return cur


def quantized_sites(graph: CapturedGraph) -> list[Site]:
    """The quantizable ops of a graph (what `exclude` and `only` name)."""
    return find_sites(graph)


def _copy(graph: CapturedGraph) -> CapturedGraph:
    module = fx.GraphModule(graph.module, copy.deepcopy(graph.module.graph))
    return dataclasses.replace(graph, module=module, masters=dict(graph.masters))


def _tag(node: fx.Node, like: fx.Node, role: str, site: Site) -> None:
    for key in META_KEYS:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["quant"] = {"role": role, "site": site.name}


def _quantize_activation(graph: CapturedGraph, site: Site, producer: fx.Node, table: CalibrationTable) -> fx.Node:
    q = table.quant(producer.name)
    dtype = producer.meta["val"].dtype
    g = graph.module.graph
    with g.inserting_before(site.node):  # after the producer: every later consumer can read it
        qn = g.call_function(kiln_ops.quantize_per_tensor.default, (producer, q.scale, q.fmt.name))
        dq = g.call_function(kiln_ops.dequantize_per_tensor.default, (qn, q.scale, dtype))
    for node in (qn, dq):
        _tag(node, site.node, "activation", site)
        infer_meta(node)
    return dq


def stored_axis(shape: tuple[int, ...], chain: list[fx.Node], channel_dim: int) -> int | None:
    """The axis of a stored weight that becomes dim `channel_dim` of the operand after the
    `chain` of views: found by running the chain on an index probe for each candidate axis.
    None when no axis maps to whole output channels (then the weight gets one scale)."""
    for axis in range(len(shape)):
        view = [1] * len(shape)
        view[axis] = -1
        probe = torch.arange(shape[axis], dtype=torch.float32).reshape(view).expand(shape).contiguous()
        try:
            for node in chain:
                if node.target == aten._to_copy.default:
                    continue
                if any(isinstance(a, fx.Node) for a in fx.node.map_aggregate(node.args[1:], lambda a: a)):
                    return None
                probe = node.target(probe, *node.args[1:], **node.kwargs)
        except (RuntimeError, TypeError, IndexError):
            return None
        if probe.dim() == 0:
            return None
        c = channel_dim % probe.dim()
        others = [d for d in range(probe.dim()) if d != c]
        if not others or torch.equal(probe.amax(others), probe.amin(others)):
            return axis
    return None


def _quantize_weight(graph: CapturedGraph, site: Site, w: WeightOperand, fmt: QuantFormat) -> None:
    value = weight(graph, w.constant).detach()
    stored_dtype = w.constant.meta["val"].dtype if isinstance(w.constant.meta.get("val"), torch.Tensor) else value.dtype
    axis = stored_axis(tuple(value.shape), w.chain, w.channel_dim) if value.dim() else None
    base = str(w.constant.target)
    g = graph.module.graph
    if axis is not None:
        cq = ChannelQuant.from_weight(value, axis, fmt)
        shape = [1] * value.dim()
        shape[axis] = -1
        qval = fmt.quantize(value, cq.scales.reshape(shape).to(value.device))
        qnode = add_weight(graph, f"{base}_q", qval, site.node, dtype=fmt.dtype)
        snode = add_weight(graph, f"{base}_scale", cq.scales.to(value.device), site.node, dtype=torch.float32)
        with g.inserting_before(site.node):
            dq = g.call_function(kiln_ops.dequantize_per_channel.default, (qnode, snode, axis, stored_dtype))
    else:
        scale = fmt.scale(float(value.abs().max())) if value.numel() else 1.0
        qval = fmt.quantize(value, scale)
        qnode = add_weight(graph, f"{base}_q", qval, site.node, dtype=fmt.dtype)
        with g.inserting_before(site.node):
            dq = g.call_function(kiln_ops.dequantize_per_tensor.default, (qnode, scale, stored_dtype))
    _tag(dq, site.node, "weight", site)
    infer_meta(dq)
    args = list(site.node.args)
    args[w.index] = _replay(graph, dq, w.chain, site.node)
    site.node.args = tuple(args)
