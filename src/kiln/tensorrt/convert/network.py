"""FX graph (core ATen) → TensorRT network, one converter per node.

``build_network`` walks a captured graph (or a partition of it) in order and calls the
registered converter of each node with a ``ConversionContext``. Weights (``get_attr``) and
anything computed from weights alone are folded with PyTorch and reach converters as
``torch.Tensor`` constants; converters turn them into TensorRT constants lazily with
``ctx.tensor``. Symbolic sizes (dynamic batch) are rebuilt from the shapes of network
inputs. Networks are strongly typed: every tensor's precision is the dtype the graph says.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import fx

from kiln.ops.quant import DEQUANTIZE_OPS, QUANTIZE_OPS
from kiln.tensorrt import api
from kiln.tensorrt.convert.context import (
    ConversionContext,
    _State,
    _SymSource,
    node_source,
    op_name,
    trt_dtype,
)
from kiln.tensorrt.convert.errors import ConversionError, Decline
from kiln.tensorrt.convert.registry import lookup

__all__ = [
    "NO_OPS",
    "ConversionError",
    "TRTNetwork",
    "build_network",
    "is_sym",
    "supported_nodes",
    "trt_dtype",
    "weight_nodes",
]

# --- walking the graph ------------------------------------------------------------------


class TRTNetwork(NamedTuple):
    """A built network and what it binds to in the FX graph."""

    network: Any
    builder: Any
    inputs: list[str]  # network input names, in binding order
    outputs: list[str]  # network output names, one per graph output (may repeat)
    input_nodes: list[fx.Node]
    output_nodes: list[fx.Node]


# TensorRT reads constant weights from host memory it does not own until the engine is built:
# each network's arrays live here for as long as the network object does.
_KEEPALIVE: dict[int, list[Any]] = {}


class _Unavailable:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_symint(val: Any) -> bool:
    return isinstance(val, torch.SymInt)


def is_sym(val: Any) -> bool:
    return isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat))


# Runtime checks torch.export leaves in the graph; TensorRT has nothing to do for them.
NO_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def _meta_shape(val: Any) -> tuple[int, ...]:
    return tuple(int(d) if isinstance(d, int) else -1 for d in val.shape)


class _Walker:
    """Converts nodes one by one; in trial mode a failing node is recorded, not raised."""

    def __init__(self, gm: fx.GraphModule, precision: torch.dtype | None, trial: bool) -> None:
        trt = api.trt()
        self.gm = gm
        self.trial = trial
        builder = trt.Builder(api.logger())
        flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        self.state = _State(builder.create_network(flag), builder, precision)
        _KEEPALIVE[id(self.state.network)] = self.state.keepalive
        weakref.finalize(self.state.network, _KEEPALIVE.pop, id(self.state.network), None)
        self.reasons: dict[fx.Node, str | None] = {}
        self.inputs: list[fx.Node] = []
        self.names: set[str] = set()
        # symbolic sizes → the graph input that carries them (added on demand to a region)
        self.symbol_inputs: dict[Any, fx.Node] = {}
        self.weight_nodes = weight_nodes(gm.graph)
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            if node.op == "placeholder" and isinstance(val, torch.Tensor):
                for size in val.shape:
                    if _is_symint(size) and size.node.expr.is_Symbol:
                        self.symbol_inputs.setdefault(size.node.expr, node)

    # values -----------------------------------------------------------------------------
    def add_input(self, node: fx.Node, name: str | None = None) -> Any:
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return tuple(
                self._input_tensor(f"{name or node.name}.{i}", v) if isinstance(v, torch.Tensor) else None
                for i, v in enumerate(val)
            )
        if not isinstance(val, torch.Tensor):
            raise Decline(f"input {node.name} is not a tensor (meta val {type(val).__name__})")
        self.inputs.append(node)
        return self._input_tensor(name or node.name, val)

    def _input_tensor(self, name: str, val: torch.Tensor) -> Any:
        dtype = trt_dtype(self.state.map_dtype(val.dtype))
        graph_dtype = trt_dtype(val.dtype)
        tensor = self.state.network.add_input(name, graph_dtype, _meta_shape(val))
        self.names.add(name)
        for dim, size in enumerate(val.shape):
            if _is_symint(size) and size.node.expr.is_Symbol:
                self.state.symbols.setdefault(size.node.expr, _SymSource(tensor, dim))
        if dtype != graph_dtype:
            tensor = self.state.network.add_cast(tensor, dtype).get_output(0)
        return tensor

    def resolve(self, x: Any, ctx: ConversionContext) -> Any:
        if isinstance(x, fx.Node):
            val = x.meta.get("val")
            if _is_symint(val):
                return self.sym_tensor(val.node.expr, ctx)
            if is_sym(val):
                raise Decline(f"symbolic {type(val).__name__} input {x.name} is not supported")
            value = self.state.values.get(x)
            if isinstance(value, _Unavailable):
                raise Decline(value.reason)
            if value is None and x not in self.state.values:
                raise Decline(f"input {x.name} was not converted")
            return value
        if isinstance(x, (list, tuple)):
            return type(x)(self.resolve(a, ctx) for a in x)
        if isinstance(x, dict):
            return {k: self.resolve(v, ctx) for k, v in x.items()}
        if _is_symint(x):
            return self.sym_tensor(x.node.expr, ctx)
        return x

    def sym_tensor(self, expr: Any, ctx: ConversionContext) -> Any:
        """A symbolic size (sympy expression over input dims) as a 1-element int64 ITensor."""
        import sympy
        from torch.utils._sympy.functions import FloorDiv

        trt = ctx.trt
        if expr.is_Integer:
            return ctx.constant(np.array([int(expr)], dtype=np.int64))
        if expr.is_Symbol:
            source = self.state.symbols.get(expr)
            placeholder = self.symbol_inputs.get(expr)
            if source is None and placeholder is not None and placeholder not in self.inputs:
                self.state.values[placeholder] = self.add_input(placeholder)
                source = self.state.symbols.get(expr)
            if source is None:
                raise Decline(f"symbolic size {expr} comes from no input of this network")
            return ctx.dim_size(source.tensor, source.dim)
        ops = {sympy.Mul: trt.ElementWiseOperation.PROD, sympy.Add: trt.ElementWiseOperation.SUM}
        ops[FloorDiv] = trt.ElementWiseOperation.FLOOR_DIV
        op = ops.get(type(expr))
        if op is None:
            raise Decline(f"symbolic size {expr} ({type(expr).__name__}) is not supported")
        parts = [self.sym_tensor(a, ctx) for a in expr.args]
        out = parts[0]
        for p in parts[1:]:
            out = ctx.elementwise(out, p, op)
        return out

    # nodes ------------------------------------------------------------------------------
    def convert(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            self.state.values[node] = _fetch_attr(self.gm, str(node.target))
            return
        if node.op == "placeholder":
            self.state.values[node] = self.add_input(node)
            return
        if node.op != "call_function":
            return
        if is_sym(node.meta.get("val")) or node.target in NO_OPS:
            # sizes are rebuilt from input shapes where used; runtime asserts are dropped
            self.reasons[node] = None
            self.state.values[node] = None
            return
        try:
            self.state.values[node] = self._convert_call(node)
            self.reasons[node] = None
        except Exception as exc:  # noqa: BLE001 - trial mode records any failure
            reason = exc.reason if isinstance(exc, Decline) else f"{type(exc).__name__}: {exc}"
            if not self.trial:
                raise ConversionError(_failure_message(node, reason)) from exc
            self.reasons[node] = reason
            self.state.values[node] = self._stand_in(node, reason)

    def weights_only(self, node: fx.Node) -> bool:
        """Does ``node`` depend on weights alone (no graph input, nothing random)?"""
        return node in self.weight_nodes

    def materialize(self, node: fx.Node) -> None:
        """Convert a weights-only node and its producers into this network (folded if small)."""
        for arg in node.all_input_nodes:
            if arg not in self.state.values:
                self.materialize(arg)
        self.convert(node)

    def _stand_in(self, node: fx.Node, reason: str) -> Any:
        if isinstance(node.meta.get("val"), (tuple, list)):
            return _Unavailable(f"its multi-output input {node.name} stays outside TensorRT")
        try:
            return self.add_input(node, f"__standin_{node.name}")
        except Exception:  # noqa: BLE001
            return _Unavailable(f"input {node.name} cannot enter TensorRT ({reason})")

    def _convert_call(self, node: fx.Node) -> Any:
        state = self.state
        ctx = ConversionContext(state, node, (), {})
        first_layer = state.network.num_layers
        args = self.resolve(tuple(node.args), ctx)
        kwargs = self.resolve(dict(node.kwargs), ctx)
        folded = _fold(node, args, kwargs, ctx)
        if folded is not _NOT_FOLDED:
            return folded
        fn = lookup(node.target)
        if fn is None:
            raise Decline(f"no TensorRT converter registered for {op_name(node.target)}")
        ctx.args, ctx.kwargs = args, kwargs
        result = fn(ctx)
        if result is NotImplemented:
            raise Decline(f"the converter for {op_name(node.target)} declined")
        self._label_layers(node, first_layer)
        _check_result(ctx, result)
        return result

    def _label_layers(self, node: fx.Node, first: int) -> None:
        network = self.state.network
        where = node_source(node)
        for i in range(first, network.num_layers):
            layer = network.get_layer(i)
            layer.name = f"{node.name}/{i - first}" if i > first else node.name
            try:
                layer.metadata = f"{op_name(node.target)} {where}"
            except AttributeError:  # older TensorRT without layer metadata
                pass


_NOT_FOLDED = object()


def _fold(node: fx.Node, args: Any, kwargs: Any, ctx: ConversionContext) -> Any:
    """Compute a node whose inputs are all constants with PyTorch (weights, iota, masks)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) and target is not operator.getitem:
        return _NOT_FOLDED
    if _seeded(target) or _quantizing(target):
        return _NOT_FOLDED
    flat = list(_flatten((args, kwargs)))
    if any(ctx.is_tensor(x) or isinstance(x, _Unavailable) for x in flat):
        return _NOT_FOLDED
    if target is operator.getitem and not isinstance(args[0], (tuple, list)):
        return _NOT_FOLDED
    if _grows(node, flat):  # e.g. expand(weight): keep the broadcast inside TensorRT
        return _NOT_FOLDED
    try:
        with torch.no_grad():
            return target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - let the converter handle it instead
        return _NOT_FOLDED


_FOLD_FREE_ELEMENTS = 1 << 16


def _grows(node: fx.Node, flat_args: list[Any]) -> bool:
    """Would folding make a constant much larger than the constants it comes from?"""
    vals = node.meta.get("val")
    vals = vals if isinstance(vals, (tuple, list)) else (vals,)
    out = 0
    for val in vals:
        if isinstance(val, torch.Tensor):
            if any(not isinstance(d, int) for d in val.shape):
                return True
            out += val.numel()
    inputs = [x.numel() for x in flat_args if isinstance(x, torch.Tensor)]
    return out > max([_FOLD_FREE_ELEMENTS, *inputs])


def weight_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from weights alone: get_attr, and ops (not random) whose inputs all are."""
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (
            node.op == "call_function"
            and all(a in out for a in node.all_input_nodes)
            and not is_sym(node.meta.get("val"))
            and not _seeded(node.target)
        ):
            out.add(node)
    return out


def _quantizing(target: Any) -> bool:
    """kiln's Q/DQ ops: kept as TensorRT Q/DQ layers (explicit quantization), never folded, so an
    8-bit weight reaches the network as an 8-bit constant behind a dequantize."""
    return target in QUANTIZE_OPS or target in DEQUANTIZE_OPS


def _seeded(target: Any) -> bool:
    """Random ops: never folded into constants."""
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _flatten(x: Any) -> Iterable[Any]:
    if isinstance(x, (list, tuple)):
        for a in x:
            yield from _flatten(a)
    elif isinstance(x, dict):
        for a in x.values():
            yield from _flatten(a)
    else:
        yield x


def _check_result(ctx: ConversionContext, result: Any) -> None:
    """Catch converter bugs early: outputs must match the graph's shapes and dtypes."""
    vals = ctx.val if isinstance(ctx.val, (tuple, list)) else (ctx.val,)
    outs = result if isinstance(result, (tuple, list)) else (result,)
    if result is None:
        if ctx.node.users:
            raise Decline("the converter returned nothing but the node's value is used")
        return
    if len(outs) != len(vals):
        raise Decline(f"the converter returned {len(outs)} values, the op has {len(vals)}")
    for out, val in zip(outs, vals, strict=True):
        if not ctx.is_tensor(out) or not isinstance(val, torch.Tensor):
            continue
        want = _meta_shape(val)
        got = tuple(out.shape)
        if len(got) != len(want) or any(w >= 0 and g >= 0 and w != g for w, g in zip(want, got, strict=True)):
            raise Decline(f"converter produced shape {got}, the graph says {want}")
        if out.dtype != ctx.dtype(val.dtype):
            raise Decline(f"converter produced {out.dtype}, the graph says {val.dtype}")


def _failure_message(node: fx.Node, reason: str) -> str:
    return (
        f"TensorRT cannot convert node {node.name} ({op_name(node.target)}) at "
        f"{node_source(node)}: {reason}. Register a converter with "
        f"@kiln.tensorrt.converter({op_name(node.target)}), or leave this node to kiln's own "
        "kernels (kiln.tensorrt.partition_graph)."
    )


# --- public entry points ----------------------------------------------------------------


def supported_nodes(graph_module: fx.GraphModule, precision: torch.dtype | None = None) -> dict[fx.Node, str | None]:
    """For every call_function node: None when TensorRT can take it, else why not.

    Each node is converted for real into a scratch network; a node whose input failed gets
    a stand-in network input so that it is judged on its own merits.
    """
    walker = _Walker(graph_module, precision, trial=True)
    for node in graph_module.graph.nodes:
        walker.convert(node)
    return walker.reasons


def build_network(
    graph_module: fx.GraphModule,
    precision: torch.dtype | None = None,
    nodes: Sequence[fx.Node] | None = None,
) -> TRTNetwork:
    """Build a strongly typed TensorRT network for the graph, or for ``nodes`` of it.

    ``precision`` (e.g. torch.float16) overrides the graph's floating dtype inside the
    network; inputs and outputs keep the graph's dtypes (cast at the boundary). Without it
    each tensor keeps the dtype the graph gives it. ``nodes`` (call_function nodes, e.g. one
    list from ``partition``) builds only that region: its inputs are the values it reads
    from outside, its outputs the values read outside it.
    Raises ConversionError naming the node, op and source line when a node cannot convert.
    """
    graph = graph_module.graph
    region = set(nodes) if nodes is not None else None
    walker = _Walker(graph_module, precision, trial=False)
    state = walker.state
    for node in graph.nodes:
        if node.op == "get_attr":
            walker.convert(node)
        elif node.op == "placeholder":
            if node.users and (region is None or set(node.users) & region):
                walker.convert(node)
        elif node.op == "call_function":
            if region is None or node in region:
                for arg in node.all_input_nodes:
                    if arg in state.values or is_sym(arg.meta.get("val")):
                        continue
                    if walker.weights_only(arg):  # left out of regions: recompute it here
                        walker.materialize(arg)
                    else:
                        state.values[arg] = walker.add_input(arg)
                walker.convert(node)
    out_nodes = _region_outputs(graph, region)
    outputs = _mark_outputs(walker, out_nodes)
    return TRTNetwork(
        state.network,
        state.builder,
        [n.name for n in walker.inputs],
        outputs,
        list(walker.inputs),
        out_nodes,
    )


def _region_outputs(graph: fx.Graph, region: set[fx.Node] | None) -> list[fx.Node]:
    if region is None:
        out = next(n for n in graph.nodes if n.op == "output")
        flat = list(_flatten(out.args[0]))
        return [n for n in flat if isinstance(n, fx.Node)]
    ordered = [n for n in graph.nodes if n in region]
    return [
        n
        for n in ordered
        if any(u not in region and u.target not in NO_OPS for u in n.users)
        and isinstance(n.meta.get("val"), torch.Tensor)
    ]


def _mark_outputs(walker: _Walker, out_nodes: list[fx.Node]) -> list[str]:
    state = walker.state
    marked: dict[int, str] = {}
    names = []
    for node in out_nodes:
        ctx = ConversionContext(state, node, (), {})
        value = walker.resolve(node, ctx)
        if id(value) in marked:
            names.append(marked[id(value)])
            continue
        tensor = ctx.tensor(value)
        val = node.meta.get("val")
        graph_dtype = trt_dtype(val.dtype)
        if tensor.dtype != graph_dtype:
            tensor = ctx.cast(tensor, graph_dtype)
        if tensor.is_network_input or tensor.is_network_output:
            tensor = state.network.add_identity(tensor).get_output(0)
        name = node.name if node.name not in walker.names else f"{node.name}.out"
        tensor.name = name
        walker.names.add(name)
        state.network.mark_output(tensor)
        marked[id(value)] = name
        names.append(name)
    return names
