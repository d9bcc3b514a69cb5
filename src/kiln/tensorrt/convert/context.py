"""What a converter sees: ``ConversionContext``, plus dtype mapping.

A ``ConversionContext`` wraps one node being converted: its TensorRT-valued arguments, the
network, and helpers that add constants, casts, reshapes and broadcasts. ``_State`` is what
one network build shares across converters (see ``kiln.tensorrt.convert.network``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import fx

from kiln.graph import source_line
from kiln.tensorrt import api
from kiln.tensorrt.convert.errors import ConversionError, Decline

__all__ = ["ConversionContext", "ConversionError", "node_source", "op_name", "trt_dtype"]


def node_source(node: fx.Node) -> str:
    """'file:line in fn: code' of the model source that produced ``node``, when recorded."""
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
    if hasattr(trt, "fp8"):
        table[torch.float8_e4m3fn] = trt.fp8
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
        if self.precision is not None and dtype.is_floating_point and dtype.itemsize > 1:  # float8 stays
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
