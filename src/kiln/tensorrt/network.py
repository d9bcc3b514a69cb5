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
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import fx

from kiln.errors import KilnError
from kiln.tensorrt import api
from kiln.tensorrt.converters import Decline, lookup

__all__ = [
    "ConversionContext",
    "ConversionError",
    "TRTNetwork",
    "EngineBuild",
    "build_engine",
    "build_network",
    "partition",
    "node_source",
    "supported_nodes",
]


class ConversionError(KilnError):
    """A node could not be converted to TensorRT."""


def node_source(node: fx.Node) -> str:
    """'file:line in fn: code' of the model source that produced ``node``, when recorded."""
    try:
        from kiln.capture import source_line
    except ImportError:  # pragma: no cover
        return "unknown source line"
    return source_line(node)


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


_TORCH_TO_NP = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


def trt_dtype(dtype: torch.dtype) -> Any:
    """TensorRT DataType for a torch dtype (Decline when TensorRT has none)."""
    trt = api.trt()
    table = {
        torch.float32: trt.float32,
        torch.float16: trt.float16,
        torch.bfloat16: trt.bfloat16,
        torch.int32: trt.int32,
        torch.int64: trt.int64,
        torch.int8: trt.int8,
        torch.uint8: trt.uint8,
        torch.bool: trt.bool,
    }
    if dtype not in table:
        raise Decline(f"TensorRT has no {dtype} tensors")
    return table[dtype]


class _SymSource(NamedTuple):
    tensor: Any  # ITensor
    dim: int


@dataclass
class _State:
    """Everything one network build shares across converters."""

    network: Any
    builder: Any
    precision: torch.dtype | None
    values: dict[fx.Node, Any] = field(default_factory=dict)
    symbols: dict[Any, _SymSource] = field(default_factory=dict)
    consts: dict[tuple[int, Any, tuple[int, ...]], Any] = field(default_factory=dict)
    keepalive: list[Any] = field(default_factory=list)

    def map_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.precision is not None and dtype.is_floating_point:
            return self.precision
        return dtype


class ConversionContext:
    """What a converter sees: the network, the node, and its arguments.

    ``args``/``kwargs`` are the node's fx arguments with each tensor-valued Node replaced by its
    TensorRT ``ITensor`` (or a ``torch.Tensor`` when the value is a constant, e.g. a weight),
    each symbolic size by a 1-element int64 ``ITensor``, and plain Python values unchanged.
    """

    def __init__(self, state: _State, node: fx.Node, args: tuple, kwargs: dict) -> None:
        self._state = state
        self.node = node
        self.args = args
        self.kwargs = kwargs
        self.network = state.network
        self.builder = state.builder
        self.trt = api.trt()

    # -- node facts ----------------------------------------------------------------------
    @property
    def val(self) -> Any:
        """The node's ``meta['val']`` (FakeTensor, or a tuple of them)."""
        return self.node.meta.get("val")

    @property
    def out_dtype(self) -> Any:
        """TensorRT dtype of the node's (first) output, after precision mapping."""
        val = self.val
        if isinstance(val, (tuple, list)):
            val = val[0]
        return self.dtype(val.dtype)

    def dtype(self, dtype: torch.dtype) -> Any:
        """TensorRT dtype for a torch dtype, after the build's precision mapping."""
        return trt_dtype(self._state.map_dtype(dtype))

    def arg_val(self, index: int) -> Any:
        """``meta['val']`` of positional argument ``index`` (a FakeTensor), or the value itself."""
        arg = self.node.args[index]
        return arg.meta.get("val") if isinstance(arg, fx.Node) else arg

    # -- tensors -------------------------------------------------------------------------
    def is_tensor(self, x: Any) -> bool:
        return isinstance(x, self.trt.ITensor)

    def constant(self, value: Any, dtype: Any = None) -> Any:
        """A TensorRT constant from a torch tensor, numpy array or Python scalar."""
        trt = self.trt
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            if dtype is None:
                dtype = self.dtype(tensor.dtype)
        else:
            array = np.asarray(value)
            if dtype is None:
                dtype = {np.dtype(np.bool_): trt.bool, np.dtype(np.int64): trt.int64}.get(array.dtype, trt.float32)
            tensor = torch.from_numpy(array.copy())
        key = (id(value), dtype, tuple(tensor.shape))
        if isinstance(value, torch.Tensor) and key in self._state.consts:
            return self._state.consts[key][1]
        np_dtype = _trt_to_np(trt).get(dtype)
        if np_dtype is None:  # bfloat16 and friends: store fp32, cast in the network
            out = self.cast(self.constant(tensor.float(), trt.float32), dtype)
        else:
            array = tensor.to(_np_to_torch(np_dtype)).numpy().copy(order="C")
            self._state.keepalive.append(array)
            layer = self.network.add_constant(tuple(array.shape), trt.Weights(array))
            out = layer.get_output(0)
        if isinstance(value, torch.Tensor):
            self._state.consts[key] = (value, out)  # keep value alive: its id is the key
        return out

    def tensor(self, x: Any, dtype: Any = None, rank: int | None = None) -> Any:
        """``x`` as an ITensor: constants are added, ``dtype`` casts, ``rank`` prepends 1s."""
        if not self.is_tensor(x):
            if isinstance(x, (list, tuple)):
                raise Decline(f"expected a tensor, got a {type(x).__name__}")
            if rank is not None:
                t = x if isinstance(x, torch.Tensor) else torch.tensor(x)
                if t.dim() < rank:
                    x = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
            x = self.constant(x, dtype)
        if dtype is not None and x.dtype != dtype:
            x = self.cast(x, dtype)
        if rank is not None and len(x.shape) < rank:
            x = self.reshape(x, [1] * (rank - len(x.shape)) + self.shape_of(x))
        return x

    def weights(self, value: Any, dtype: Any) -> Any:
        """``trt.Weights`` holding constant ``value`` as ``dtype``; None if numpy cannot."""
        np_dtype = _trt_to_np(self.trt).get(dtype)
        if not isinstance(value, torch.Tensor) or np_dtype is None:
            return None
        array = value.detach().cpu().to(_np_to_torch(np_dtype)).numpy().copy(order="C")
        self._state.keepalive.append(array)
        return self.trt.Weights(array)

    def cast(self, x: Any, dtype: Any) -> Any:
        if x.dtype == dtype:
            return x
        return self.network.add_cast(x, dtype).get_output(0)

    def shape_of(self, x: Any) -> list[Any]:
        """Sizes of ``x``: ints where static, 1-element int64 ITensors where dynamic."""
        return [self.dim_size(x, d) for d in range(len(x.shape))]

    def reshape(self, x: Any, shape: Sequence[Any]) -> Any:
        """Reshape to ``shape`` (ints, -1 to infer one dim, or 1-element int64 ITensors)."""
        layer = self.network.add_shuffle(x)
        layer.zero_is_placeholder = False
        if any(self.is_tensor(s) for s in shape):
            layer.set_input(1, self.shape_tensor(shape))
        else:
            layer.reshape_dims = tuple(int(s) for s in shape)
        return layer.get_output(0)

    def shape_tensor(self, sizes: Sequence[Any]) -> Any:
        """A 1-D int64 shape tensor from ints and 1-element int64 ITensors."""
        parts = []
        for s in sizes:
            if self.is_tensor(s):
                s = s if tuple(s.shape) == (1,) else self.reshape(s, (1,))
                parts.append(self.cast(s, self.trt.int64))
            else:
                parts.append(self.constant(np.array([int(s)], dtype=np.int64)))
        if len(parts) == 1:
            return parts[0]
        return self.network.add_concatenation(parts).get_output(0)

    def dim_size(self, x: Any, dim: int) -> Any:
        """Size of ``x`` along ``dim``: an int when static, else a 1-element int64 ITensor."""
        size = x.shape[dim]
        if size >= 0:
            return int(size)
        shape = self.network.add_shape(x).get_output(0)
        index = self.constant(np.array([dim], dtype=np.int64))
        return self.network.add_gather(shape, index, 0).get_output(0)

    def broadcast(self, *xs: Any) -> list[Any]:
        """ITensors of equal rank (numpy broadcasting: prepend size-1 dims)."""
        rank = max(len(x.shape) for x in xs)
        return [self.tensor(x, rank=rank) for x in xs]

    def elementwise(self, a: Any, b: Any, op: Any) -> Any:
        a, b = self.broadcast(a, b)
        return self.network.add_elementwise(a, b, op).get_output(0)

    def unary(self, x: Any, op: Any) -> Any:
        return self.network.add_unary(x, op).get_output(0)

    def axis(self, dim: int, rank: int) -> int:
        if not -rank <= dim < max(rank, 1):
            raise Decline(f"dim {dim} out of range for rank {rank}")
        return dim % rank if rank else 0

    def decline(self, reason: str) -> None:
        raise Decline(reason)


def _np_to_torch(np_dtype: Any) -> torch.dtype:
    return {v: k for k, v in _TORCH_TO_NP.items()}[np_dtype]


def _trt_to_np(trt: Any) -> dict[Any, Any]:
    return {
        trt.float32: np.float32,
        trt.float16: np.float16,
        trt.int32: np.int32,
        trt.int64: np.int64,
        trt.int8: np.int8,
        trt.uint8: np.uint8,
        trt.bool: np.bool_,
    }


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


def _is_sym(val: Any) -> bool:
    return isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat))


# Runtime checks torch.export leaves in the graph; TensorRT has nothing to do for them.
_NO_OPS = {
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
            if _is_sym(val):
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
        if _is_sym(node.meta.get("val")) or node.target in _NO_OPS:
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
    if _seeded(target):
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
            and not _is_sym(node.meta.get("val"))
            and not _seeded(node.target)
        ):
            out.add(node)
    return out


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
        "kernels (kiln.tensorrt.partition)."
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
                    if arg in state.values or _is_sym(arg.meta.get("val")):
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
        if any(u not in region and u.target not in _NO_OPS for u in n.users)
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


# --- partitioning -----------------------------------------------------------------------


def partition(
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
            and not _is_sym(node.meta.get("val"))
            and node.target not in _NO_OPS
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


# --- engines ----------------------------------------------------------------------------


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
    import time
    from pathlib import Path

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
