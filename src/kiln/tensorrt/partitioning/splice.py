"""Replace a region of an FX graph by one ``kiln::tensorrt_region`` call.

The region's nodes go; in their place come a uint8 weight holding the serialized engine, one
call of the op, and an ``operator.getitem`` per value the rest of the graph reads. The graph is
then put back in a valid order (a stable topological sort): a region's call must follow every
input it reads and precede every reader of its outputs, which its first node's place does not
always give.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Sequence

import torch
from torch import fx

from kiln.graph import CapturedGraph, add_weight, infer_meta
from kiln.specs import TensorSpec
from kiln.tensorrt import api
from kiln.tensorrt.convert.errors import ConversionError
from kiln.tensorrt.convert.network import NO_OPS, TRTNetwork
from kiln.tensorrt.runtime import engine as _engine  # noqa: F401  (defines kiln::tensorrt_region)
from kiln.tensorrt.runtime.region import RegionSpec

__all__ = ["escaping_values", "region_spec", "splice_region", "stable_toposort"]


def region_spec(net: TRTNetwork) -> RegionSpec:
    """The spec of ``net``: its inputs, then its distinct outputs, with the graph's static shapes."""
    inputs = tuple(_spec(name, node) for name, node in zip(net.inputs, net.input_nodes, strict=True))
    outputs: dict[str, TensorSpec] = {}
    for name, node in zip(net.outputs, net.output_nodes, strict=True):
        outputs.setdefault(name, _spec(name, node))
    return RegionSpec(inputs, tuple(outputs.values()), api.flavor() or "", api.version() or "")


def _spec(name: str, node: fx.Node) -> TensorSpec:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ConversionError(f"region value {node.name} is a {type(val).__name__}, not a tensor")
    if not all(isinstance(d, int) for d in val.shape):
        raise ConversionError(
            f"region value {node.name} has the dynamic shape {tuple(val.shape)}; kiln engines are fixed-shape"
        )
    return TensorSpec(name, tuple(int(d) for d in val.shape), val.dtype)


def escaping_values(nodes: Sequence[fx.Node]) -> list[str]:
    """Region nodes read outside the region that a network cannot output (e.g. a tuple-valued op)."""
    members = set(nodes)
    bad = []
    for node in nodes:
        outside = [u for u in node.users if u not in members and u.target not in NO_OPS]
        if outside and not isinstance(node.meta.get("val"), torch.Tensor):
            bad.append(f"{node.name} (read by {', '.join(u.name for u in outside)})")
    return bad


def splice_region(
    graph: CapturedGraph,
    nodes: Sequence[fx.Node],
    net: TRTNetwork,
    serialized: bytes,
    replaced: dict[fx.Node, fx.Node],
) -> fx.Node:
    """Replace ``nodes`` (one region, in graph order) by a call running ``serialized``; returns the call.

    ``replaced`` maps nodes of regions spliced earlier to the getitem nodes now standing for them
    (a region may read another's output); this call adds its own. Leaves the graph possibly out
    of order: run ``stable_toposort`` once every region is spliced.
    """
    g = graph.module.graph
    spec = region_spec(net)
    first = nodes[0]
    data = torch.frombuffer(bytearray(serialized), dtype=torch.uint8).to(graph.device)
    engine = add_weight(graph, "tensorrt_engine", data, before=first, dtype=torch.uint8)
    with g.inserting_before(first):
        inputs = [replaced.get(n, n) for n in net.input_nodes]
        args = (inputs, engine, spec.to_json())
        call = g.create_node("call_function", torch.ops.kiln.tensorrt_region.default, args, name="tensorrt_region")
    call.meta["stack_trace"] = next((n.meta["stack_trace"] for n in nodes if n.meta.get("stack_trace")), None)
    infer_meta(call)
    index = {s.name: i for i, s in enumerate(spec.outputs)}
    members = set(nodes)
    for node, name in zip(net.output_nodes, net.outputs, strict=True):
        with g.inserting_before(first):
            get = g.call_function(operator.getitem, (call, index[name]))
        get.meta["val"] = call.meta["val"][index[name]]
        get.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(get, delete_user_cb=lambda user: user not in members)
        replaced[node] = get
    for node in reversed(nodes):
        for user in list(node.users):
            if user not in members and user.target in NO_OPS:
                g.erase_node(user)
        g.erase_node(node)
    return call


def stable_toposort(graph: fx.Graph) -> None:
    """Reorder ``graph`` so every node follows its inputs, keeping the current order where it can."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(n.all_input_nodes) for n in nodes}
    ready = [position[n] for n in nodes if waiting[n] == 0 and n.op != "output"]
    heapq.heapify(ready)
    order: list[fx.Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0 and user.op != "output":
                heapq.heappush(ready, position[user])
    order += [n for n in nodes if n.op == "output"]
    if len(order) != len(nodes):
        raise ConversionError("splicing TensorRT regions left a cycle in the graph (a kiln bug: please report it)")
    if order == nodes:
        return
    for before, after in zip(order, order[1:]):
        before.append(after)
