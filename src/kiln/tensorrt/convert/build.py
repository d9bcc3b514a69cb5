"""Serialize a built network into a TensorRT engine (the slow step; no GPU needed for TensorRT-RTX)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.tensorrt import api
from kiln.tensorrt.convert.errors import ConversionError
from kiln.tensorrt.convert.network import TRTNetwork

__all__ = ["EngineBuild", "ShapeRange", "build_engine"]


@dataclass
class EngineBuild:
    """A serialized TensorRT engine and how it was built."""

    serialized: bytes
    seconds: float
    inputs: list[str]
    outputs: list[str]
    notes: list[str]


ShapeRange = tuple[Sequence[int], Sequence[int], Sequence[int]]


def build_engine(
    net: TRTNetwork,
    *,
    batch: tuple[int, int, int] | None = None,
    shapes: dict[str, ShapeRange] | None = None,
    timing_cache: str | None = None,
    optimization_level: int | None = None,
    workspace_bytes: int | None = None,
) -> EngineBuild:
    """Build and serialize an engine for ``net`` (works without a GPU for TensorRT-RTX).

    Dynamic input dims need an optimization profile: ``shapes`` gives (min, opt, max) shapes
    per input name; ``batch=(min, opt, max)`` is the shorthand that sets the graph's one
    symbolic size (the batch of a graph exported with a dynamic dim 0; inputs of a region
    whose dim 0 is e.g. batch*heads follow from it). ``timing_cache`` is a file read before
    and written after the build so later builds reuse tactic timings (TensorRT only:
    TensorRT-RTX has no timing cache and picks kernels at run time, so the option is noted
    and skipped there).
    """
    trt = api.trt()
    builder, network = net.builder, net.network
    config = builder.create_builder_config()
    notes: list[str] = []
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = _profile(builder, net, batch, shapes or {})
    if profile is not None:
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        if api.flavor() == "tensorrt-rtx":
            notes.append("timing cache skipped: TensorRT-RTX has none (kernels chosen at run time)")
        else:
            path = Path(timing_cache)
            data = path.read_bytes() if path.is_file() else b""
            cache = config.create_timing_cache(data)
            config.set_timing_cache(cache, False)
            notes.append(f"timing cache {'reused' if data else 'created'}: {path}")
    start = time.perf_counter()
    with api.capture_log() as log:
        serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        errors = [m for level, m in log if level in ("error", "internal_error")]
        raise ConversionError(
            f"{api.flavor()} {api.version()} could not build the engine:\n  "
            + "\n  ".join(errors[-10:] or ["(no error logged)"])
        )
    if cache is not None and timing_cache is not None:
        Path(timing_cache).write_bytes(bytes(memoryview(cache.serialize())))
    return EngineBuild(bytes(memoryview(serialized)), seconds, net.inputs, net.outputs, notes)


def shape_ranges(net: TRTNetwork, dims: Mapping[str, Any], symbols: Mapping[str, str]) -> dict[str, ShapeRange]:
    """build_engine's ``shapes`` from kiln dims (docs/dynamic-shapes.md): each network input's
    symbolic shape evaluated at the all-min, opt and all-max bindings. ``dims``: name →
    kiln.Dim; ``symbols``: shape-environment symbol → dim name (CapturedGraph.symbols)."""
    from kiln.shapes import evaluate, from_sympy

    bindings = [{n: getattr(d, point) for n, d in dims.items()} for point in ("min", "opt", "max")]
    ranges: dict[str, ShapeRange] = {}
    for node in net.input_nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not any(isinstance(d, torch.SymInt) for d in val.shape):
            continue
        exprs = [from_sympy(d.node.expr, symbols) if isinstance(d, torch.SymInt) else int(d) for d in val.shape]
        low, opt, high = ([int(evaluate(e, b)) for e in exprs] for b in bindings)
        ranges[node.name] = (low, opt, high)
    return ranges


def _profile(builder: Any, net: TRTNetwork, batch: Any, shapes: dict[str, ShapeRange]) -> Any:
    network = net.network
    dynamic = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            dynamic.append(tensor)
    if not dynamic:
        return None
    vals = {n.name: n.meta.get("val") for n in net.input_nodes}
    symbols = {
        d.node.expr
        for v in vals.values()
        if isinstance(v, torch.Tensor)
        for d in v.shape
        if isinstance(d, torch.SymInt)
    }
    free = set().union(*(e.free_symbols for e in symbols)) if symbols else set()
    profile = builder.create_optimization_profile()
    for tensor in dynamic:
        dims = tuple(tensor.shape)
        val = vals.get(tensor.name)
        if tensor.name in shapes:
            low, opt, high = (tuple(int(d) for d in s) for s in shapes[tensor.name])
        elif batch is not None and len(free) == 1 and isinstance(val, torch.Tensor):
            (symbol,) = free
            low, opt, high = (
                tuple(int(d.node.expr.subs(symbol, b)) if isinstance(d, torch.SymInt) else int(d) for d in val.shape)
                for b in batch
            )
        elif batch is not None and all(d >= 0 for d in dims[1:]):
            low, opt, high = ((int(b), *dims[1:]) for b in batch)
        else:
            raise ConversionError(
                f"network input {tensor.name} has dynamic shape {dims}: pass "
                "shapes={name: (min, opt, max)} to build_engine (batch=(min, opt, max) "
                "works when the graph has a single symbolic size)"
            )
        profile.set_shape(tensor.name, low, opt, high)
    return profile
