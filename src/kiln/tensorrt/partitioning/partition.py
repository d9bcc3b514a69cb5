"""Partitioning: what TensorRT can take becomes TensorRT engines inside the kiln plan.

``find_regions`` groups the nodes that have converters into regions; ``partition_graph``
builds one fixed-shape, strongly typed engine per region and splices it into the graph as a
``kiln::tensorrt_region`` call (see ``kiln.tensorrt.runtime``). Nodes without a converter stay
as they are and run on kiln's own kernels between the regions. This is the
``--backend tensorrt`` stage of ``kiln.build``.
"""

from __future__ import annotations

import collections
import contextlib
import operator
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from kiln.errors import KilnError, KilnWarning
from kiln.graph import CapturedGraph, finish, source_line
from kiln.tensorrt import api
from kiln.tensorrt.convert.build import EngineBuild, build_engine
from kiln.tensorrt.convert.context import op_name
from kiln.tensorrt.convert.errors import ConversionError
from kiln.tensorrt.convert.network import NO_OPS, TRTNetwork, build_network, is_sym, supported_nodes, weight_nodes
from kiln.tensorrt.partitioning.splice import escaping_values, region_spec, splice_region, stable_toposort

__all__ = ["IncompleteConversionError", "find_regions", "partition_graph"]

# Ops that only reinterpret memory: a region of nothing else is cheaper as kiln views.
_VIEW_OPS = {
    operator.getitem,
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.squeeze.dims,
    torch.ops.aten.squeeze.default,
    torch.ops.aten.select.int,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.alias.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.t.default,
    torch.ops.aten.transpose.int,
}


class IncompleteConversionError(ConversionError):
    """``require_full`` was asked for, and some ops of the graph have no TensorRT conversion."""

    def __init__(self, ops: list[dict[str, str]]) -> None:
        self.ops = ops  # the report's "outside" rows: node, op, source, reason
        lines = [f"TensorRT cannot take {len(ops)} op(s) of this model, and a full conversion was required:"]
        lines += [f"  - {o['op']} (node {o['node']}) at {o['source']}: {o['reason']}" for o in ops]
        first = ops[0]["op"] if ops else "aten.cumprod.default"
        lines.append(
            "Register a converter for each (@kiln.tensorrt.converter(torch.ops."
            f"{first}), see kiln.tensorrt.convert.registry), rewrite those lines with ops TensorRT supports, "
            "or build without --require-full to run them on kiln's own kernels between TensorRT regions."
        )
        super().__init__("\n".join(lines))


# --- grouping ---------------------------------------------------------------------------


def find_regions(
    graph_module: fx.GraphModule,
    precision: torch.dtype | None = None,
    supported: dict[fx.Node, str | None] | None = None,
) -> list[list[fx.Node]]:
    """Group supported call_function nodes into regions, each to become one TensorRT engine.

    Two supported nodes share a region when an edge of supported nodes joins them and they
    depend on the same set of unsupported nodes. That rule can never create a cycle: a path
    that leaves a region through an unsupported node U and comes back would make U an
    ancestor of the re-entry node but not of the exit node, so their sets would differ.
    Nodes computed from weights alone and symbolic sizes are left out: each region's
    network recomputes them. Regions are listed in graph order, nodes in graph order.
    """
    if supported is None:
        supported = supported_nodes(graph_module, precision)
    nodes = list(graph_module.graph.nodes)
    constant = weight_nodes(graph_module.graph)
    blockers: dict[fx.Node, frozenset[fx.Node]] = {}
    for node in nodes:
        inputs = node.all_input_nodes
        below: frozenset[fx.Node] = frozenset().union(*(blockers[a] for a in inputs))
        if node.op == "call_function" and supported.get(node, "") is not None:
            below = below | {node}
        blockers[node] = below

    def member(node: fx.Node) -> bool:
        return (
            node.op == "call_function"
            and supported.get(node, "") is None
            and node not in constant
            and not is_sym(node.meta.get("val"))
            and node.target not in NO_OPS
        )

    parent: dict[fx.Node, fx.Node] = {n: n for n in nodes if member(n)}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in parent:
        for arg in node.all_input_nodes:
            if arg in parent and blockers[arg] == blockers[node]:
                parent[find(node)] = find(arg)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        if node in parent:
            groups.setdefault(find(node), []).append(node)
    return list(groups.values())


# --- partition_graph --------------------------------------------------------------------


@dataclass
class _Region:
    nodes: list[fx.Node]
    net: TRTNetwork | None = None
    built: EngineBuild | None = None
    skip: str | None = None  # why the region stays on kiln's kernels


def partition_graph(
    graph: CapturedGraph, *, require_full: bool = False, timing_cache: str | None = None
) -> tuple[CapturedGraph, dict[str, Any]]:
    """Every TensorRT-convertible region of ``graph`` as one ``kiln::tensorrt_region`` node.

    Returns the rewritten graph and a JSON-safe report: the regions (ops, inputs, outputs,
    engine size, build time), the ops left to kiln with their source lines and reasons, the
    TensorRT flavor and version, and the build seconds. ``require_full`` raises
    ``IncompleteConversionError`` listing every op TensorRT cannot take (before building any
    engine). ``timing_cache`` is kiln's kernel timing cache path (None: the default); TensorRT's
    own cache is kept beside it, where the builder has one. Raises ``TensorRTUnavailable``
    when no TensorRT is installed.
    """
    start = time.perf_counter()
    if getattr(graph, "dims", None):
        dims = ", ".join(d.describe() for d in graph.dims.values())
        raise KilnError(
            f"--backend tensorrt does not take dynamic shapes yet ({dims}): TensorRT regions are built for "
            "fixed shapes. Build with the kiln backend for a dynamic engine, or with fixed sizes for TensorRT"
        )
    api.trt()  # TensorRTUnavailable, with the install hint, before any work
    gm = graph.module
    supported = supported_nodes(gm)
    ops_total = _count_ops(gm.graph.nodes)
    regions = [_Region(nodes) for nodes in find_regions(gm, supported=supported)]
    for region in regions:
        region.skip = None if require_full else _not_worth_it(region.nodes)
        if region.skip is None:
            region.skip = _prepare(gm, region, require_full)
    outside = _outside_rows(gm, supported, regions)
    if require_full and outside:
        raise IncompleteConversionError(outside)
    cache_path, cache_note = _tensorrt_timing_cache(timing_cache)
    for region in regions:
        if region.skip is None:
            region.skip = _build(graph.device, region, cache_path, require_full)
    outside = _outside_rows(gm, supported, regions)
    usable, reason = api.runtime_usable(graph.device)
    built = [r for r in regions if r.skip is None]
    rows = []
    replaced: dict[fx.Node, fx.Node] = {}
    for region in built:
        assert region.net is not None and region.built is not None
        row = _region_row(region, region_spec(region.net))
        call = splice_region(graph, region.nodes, region.net, region.built.serialized, replaced)
        rows.append({"node": call.name, "weight": str(call.args[1].target), **row})
        region.built = None  # splice_region copied the engine into a weight
    stable_toposort(gm.graph)
    graph = finish(graph)
    if built and not usable:
        warnings.warn(f"this engine's TensorRT regions cannot run here: {reason}", KilnWarning, stacklevel=3)
    report = {
        "flavor": api.flavor(),
        "version": api.version(),
        "runtime": {"usable": usable, "reason": reason},
        "require_full": require_full,
        "ops_total": ops_total,
        "ops_converted": sum(r["ops"] for r in rows),
        "regions": rows,
        "outside": outside,
        "timing_cache": cache_note,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    return graph, report


def _count_ops(nodes: Any) -> int:
    return sum(1 for n in nodes if n.op == "call_function" and n.target is not operator.getitem)


def _not_worth_it(nodes: list[fx.Node]) -> str | None:
    if all(n.target in _VIEW_OPS for n in nodes):
        return "a region of view ops only: kiln runs them as free views, a TensorRT engine would copy"
    return None


def _prepare(gm: fx.GraphModule, region: _Region, require_full: bool) -> str | None:
    """Build the region's network (cheap); the reason it must stay on kiln, or None."""
    escaping = escaping_values(region.nodes)
    if escaping:
        return f"a TensorRT region cannot output the tuple-valued {', '.join(escaping)}"
    try:
        region.net = build_network(gm, nodes=region.nodes)
        region_spec(region.net)  # static shapes and tensor values only
    except ConversionError as exc:
        if require_full:
            raise
        return f"its region did not convert: {exc}"
    return None


def _build(device: torch.device, region: _Region, cache: str | None, require_full: bool) -> str | None:
    """Build the region's engine (the slow part); the reason it stays on kiln, or None."""
    assert region.net is not None
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with on_device:
            region.built = build_engine(region.net, timing_cache=cache)
        # keep what splicing needs; the TensorRT network and its host copies of the weights can go
        region.net = region.net._replace(network=None, builder=None)
    except ConversionError as exc:
        if require_full:
            raise
        region.net = None
        warnings.warn(f"a TensorRT region stays on kiln's kernels: {exc}", KilnWarning, stacklevel=4)
        return f"TensorRT could not build its region's engine: {exc}"
    return None


def _tensorrt_timing_cache(timing_cache: str | None) -> tuple[str | None, str]:
    """TensorRT's timing cache file, kept beside kiln's (a different format), and a note."""
    if api.flavor() == "tensorrt-rtx":
        return None, f"none: {api.flavor()} {api.version()} picks kernels at run time and has no timing cache"
    from kiln.select.tune import default_cache_path

    base = Path(timing_cache) if timing_cache else default_cache_path()
    path = base.with_name(f"{base.stem}.{api.flavor()}-{api.version()}.trtcache")
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path), str(path)


def _outside_rows(
    gm: fx.GraphModule, supported: dict[fx.Node, str | None], regions: list[_Region]
) -> list[dict[str, str]]:
    """The ops kiln's kernels will run: those live once the kept regions are engines, with reasons."""
    kept = {n: r for r in regions if r.skip is None for n in r.nodes}
    skipped = {n: r.skip for r in regions if r.skip is not None for n in r.nodes}
    constant = weight_nodes(gm.graph)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    live: set[fx.Node] = set()
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        region = kept.get(node)
        if region is not None:
            assert region.net is not None
            stack.extend(region.net.input_nodes)
        else:
            stack.extend(node.all_input_nodes)
    rows = []
    for node in gm.graph.nodes:
        if node not in live or node in kept or node.op != "call_function" or node.target is operator.getitem:
            continue
        reason = supported.get(node) or skipped.get(node)
        if reason is None:
            reason = "computed from weights alone" if node in constant else "left outside every region"
        rows.append({"node": node.name, "op": op_name(node.target), "source": source_line(node), "reason": reason})
    return rows


def _region_row(region: _Region, spec: Any) -> dict[str, Any]:
    assert region.built is not None
    counts = collections.Counter(op_name(n.target) for n in region.nodes if n.target is not operator.getitem)
    return {
        "ops": sum(counts.values()),
        "op_counts": dict(counts.most_common()),
        "inputs": [s.to_json() for s in spec.inputs],
        "outputs": [s.to_json() for s in spec.outputs],
        "engine_bytes": len(region.built.serialized),
        "build_seconds": round(region.built.seconds, 3),
        "notes": list(region.built.notes),
    }
