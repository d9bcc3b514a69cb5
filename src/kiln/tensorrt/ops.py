"""Built-in converters for the core ATen ops the zoo uses (registered on import).

Each takes a ``ConversionContext`` and returns the node's value. Arguments follow the ATen
schema; optional trailing arguments may be missing from ``ctx.args`` and are read with
``arg``. ``act_layer``, ``conv_nd`` and ``matmul`` are shared with ``kiln.tensorrt.kiln_ops``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.tensorrt.converters import Decline, converter

if TYPE_CHECKING:
    from kiln.tensorrt.context import ConversionContext

aten = torch.ops.aten


def _arg(ctx: ConversionContext, index: int, name: str, default: Any = None) -> Any:
    if len(ctx.args) > index:
        return ctx.args[index]
    return ctx.kwargs.get(name, default)


def _meta_like(x: Any) -> Any:
    """A value torch.result_type treats like the fx argument ``x`` (dtype and dim category)."""
    from torch import fx

    if isinstance(x, fx.Node):
        val = x.meta.get("val")
        if isinstance(val, torch.Tensor):
            return torch.empty(() if val.dim() == 0 else (1,), dtype=val.dtype, device="meta")
        return 1 if isinstance(val, torch.SymInt) else val
    return x


def _promoted(ctx: ConversionContext) -> torch.dtype:
    a, b = (_meta_like(x) for x in ctx.node.args[:2])
    return torch.result_type(a, b)


def _dims(dim: Any, rank: int) -> list[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(rank))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d % rank if rank else 0 for d in dims})


def _mask(dims: Sequence[int]) -> int:
    return sum(1 << d for d in dims)


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


# identity, casts, no-ops ------------------------------------------------------------------


@converter(aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default)
def _identity(ctx: ConversionContext) -> Any:
    return ctx.tensor(ctx.args[0], ctx.out_dtype)


@converter(aten._to_copy.default)
def _to_copy(ctx: ConversionContext) -> Any:
    return ctx.tensor(ctx.args[0], ctx.out_dtype)


@converter(operator.getitem)
def _getitem(ctx: ConversionContext) -> Any:
    values, index = ctx.args
    if not isinstance(values, (tuple, list)):
        raise Decline("getitem on a value that is not a tuple")
    out = values[index]
    if out is None:
        producer = ctx.node.args[0]
        raise Decline(f"output {index} of {getattr(producer, 'name', producer)} has no TensorRT value")
    return out


# elementwise ---------------------------------------------------------------------------

_ARITH = {
    aten.add.Tensor: "SUM",
    aten.add.Scalar: "SUM",
    aten.sub.Tensor: "SUB",
    aten.sub.Scalar: "SUB",
    aten.mul.Tensor: "PROD",
    aten.mul.Scalar: "PROD",
    aten.div.Tensor: "DIV",
    aten.div.Scalar: "DIV",
    aten.maximum.default: "MAX",
    aten.minimum.default: "MIN",
    aten.pow.Tensor_Tensor: "POW",
    aten.pow.Scalar: "POW",
    aten.floor_divide.default: "FLOOR_DIV",
}


@converter(*_ARITH)
def _arith(ctx: ConversionContext) -> Any:
    op = getattr(ctx.trt.ElementWiseOperation, _ARITH[ctx.node.target])
    a, b = ctx.args[0], ctx.args[1]
    dtype = ctx.out_dtype
    alpha = ctx.kwargs.get("alpha", 1)
    if alpha != 1:
        if ctx.is_tensor(b):
            b = ctx.elementwise(ctx.tensor(b, dtype), ctx.tensor(alpha, dtype), _E(ctx).PROD)
        else:
            b = b * alpha
    return ctx.elementwise(ctx.tensor(a, dtype), ctx.tensor(b, dtype), op)


def _E(ctx: ConversionContext) -> Any:  # noqa: N802 - mirrors TensorRT's enum name
    return ctx.trt.ElementWiseOperation


@converter(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(ctx: ConversionContext) -> Any:
    mode = ctx.kwargs.get("rounding_mode", _arg(ctx, 2, "rounding_mode"))
    dtype = ctx.out_dtype
    a, b = ctx.tensor(ctx.args[0], dtype), ctx.tensor(ctx.args[1], dtype)
    if mode is None:
        return ctx.elementwise(a, b, _E(ctx).DIV)
    if mode == "floor":
        return ctx.elementwise(a, b, _E(ctx).FLOOR_DIV)
    raise Decline(f"division with rounding_mode={mode!r}")


@converter(aten.pow.Tensor_Scalar)
def _pow_scalar(ctx: ConversionContext) -> Any:
    x, exponent = ctx.tensor(ctx.args[0], ctx.out_dtype), ctx.args[1]
    if exponent == 1:
        return x
    if exponent == 2:
        return ctx.elementwise(x, x, _E(ctx).PROD)
    if exponent == 0.5:
        return ctx.unary(x, ctx.trt.UnaryOperation.SQRT)
    return ctx.elementwise(x, ctx.tensor(exponent, x.dtype), _E(ctx).POW)


_COMPARE = {
    aten.eq.Tensor: "eq",
    aten.eq.Scalar: "eq",
    aten.ne.Tensor: "ne",
    aten.ne.Scalar: "ne",
    aten.lt.Tensor: "lt",
    aten.lt.Scalar: "lt",
    aten.le.Tensor: "le",
    aten.le.Scalar: "le",
    aten.gt.Tensor: "gt",
    aten.gt.Scalar: "gt",
    aten.ge.Tensor: "ge",
    aten.ge.Scalar: "ge",
}


@converter(*_COMPARE)
def _compare(ctx: ConversionContext) -> Any:
    kind = _COMPARE[ctx.node.target]
    compute = _promoted(ctx)
    dtype = ctx.dtype(torch.int32 if compute == torch.bool else compute)
    a, b = ctx.tensor(ctx.args[0], dtype), ctx.tensor(ctx.args[1], dtype)
    E = _E(ctx)
    if kind == "eq":
        return ctx.elementwise(a, b, E.EQUAL)
    if kind == "ne":
        return ctx.unary(ctx.elementwise(a, b, E.EQUAL), ctx.trt.UnaryOperation.NOT)
    strict = ctx.elementwise(a, b, E.LESS if kind in ("lt", "le") else E.GREATER)
    if kind in ("lt", "gt"):
        return strict
    return ctx.elementwise(strict, ctx.elementwise(a, b, E.EQUAL), E.OR)


_LOGICAL = {
    aten.bitwise_and.Tensor: "AND",
    aten.bitwise_and.Scalar: "AND",
    aten.bitwise_or.Tensor: "OR",
    aten.bitwise_or.Scalar: "OR",
    aten.bitwise_xor.Tensor: "XOR",
    aten.bitwise_xor.Scalar: "XOR",
    aten.logical_and.default: "AND",
    aten.logical_or.default: "OR",
    aten.logical_xor.default: "XOR",
}


@converter(*_LOGICAL)
def _logical(ctx: ConversionContext) -> Any:
    if ctx.out_dtype != ctx.trt.bool:
        raise Decline("bitwise operations on integers (TensorRT has them for bool only)")
    a, b = ctx.tensor(ctx.args[0], ctx.trt.bool), ctx.tensor(ctx.args[1], ctx.trt.bool)
    return ctx.elementwise(a, b, getattr(_E(ctx), _LOGICAL[ctx.node.target]))


@converter(aten.logical_not.default, aten.bitwise_not.default)
def _logical_not(ctx: ConversionContext) -> Any:
    if ctx.out_dtype != ctx.trt.bool:
        raise Decline("bitwise_not on integers (TensorRT has NOT for bool only)")
    return ctx.unary(ctx.tensor(ctx.args[0], ctx.trt.bool), ctx.trt.UnaryOperation.NOT)


@converter(aten.where.self)
def _where(ctx: ConversionContext) -> Any:
    dtype = ctx.out_dtype
    cond = ctx.tensor(ctx.args[0], ctx.trt.bool)
    cond, a, b = ctx.broadcast(cond, ctx.tensor(ctx.args[1], dtype), ctx.tensor(ctx.args[2], dtype))
    return ctx.network.add_select(cond, a, b).get_output(0)


_UNARY = {
    aten.exp.default: "EXP",
    aten.log.default: "LOG",
    aten.sqrt.default: "SQRT",
    aten.reciprocal.default: "RECIP",
    aten.abs.default: "ABS",
    aten.neg.default: "NEG",
    aten.sin.default: "SIN",
    aten.cos.default: "COS",
    aten.tan.default: "TAN",
    aten.sinh.default: "SINH",
    aten.cosh.default: "COSH",
    aten.asin.default: "ASIN",
    aten.acos.default: "ACOS",
    aten.atan.default: "ATAN",
    aten.asinh.default: "ASINH",
    aten.acosh.default: "ACOSH",
    aten.atanh.default: "ATANH",
    aten.ceil.default: "CEIL",
    aten.floor.default: "FLOOR",
    aten.erf.default: "ERF",
    aten.sign.default: "SIGN",
    aten.round.default: "ROUND",
}


@converter(*_UNARY)
def _unary(ctx: ConversionContext) -> Any:
    x = ctx.tensor(ctx.args[0], ctx.out_dtype)
    return ctx.unary(x, getattr(ctx.trt.UnaryOperation, _UNARY[ctx.node.target]))


@converter(aten.rsqrt.default)
def _rsqrt(ctx: ConversionContext) -> Any:
    U = ctx.trt.UnaryOperation
    return ctx.unary(ctx.unary(ctx.tensor(ctx.args[0], ctx.out_dtype), U.SQRT), U.RECIP)


@converter(aten.log1p.default, aten.expm1.default, aten.log2.default, aten.log10.default)
def _log_exp(ctx: ConversionContext) -> Any:
    U, E, target = ctx.trt.UnaryOperation, _E(ctx), ctx.node.target
    x = ctx.tensor(ctx.args[0], ctx.out_dtype)
    one = ctx.tensor(1.0, x.dtype)
    if target is aten.log1p.default:
        return ctx.unary(ctx.elementwise(x, one, E.SUM), U.LOG)
    if target is aten.expm1.default:
        return ctx.elementwise(ctx.unary(x, U.EXP), one, E.SUB)
    base = 2.0 if target is aten.log2.default else 10.0
    return ctx.elementwise(ctx.unary(x, U.LOG), ctx.tensor(math.log(base), x.dtype), E.DIV)


@converter(aten.isnan.default, aten.isinf.default)
def _isnan(ctx: ConversionContext) -> Any:
    op = "ISNAN" if ctx.node.target is aten.isnan.default else "ISINF"
    return ctx.unary(ctx.tensor(ctx.args[0]), getattr(ctx.trt.UnaryOperation, op))


# activations ---------------------------------------------------------------------------


def _activation(ctx: ConversionContext, kind: str, alpha: float | None = None, beta: float | None = None) -> Any:
    return act_layer(ctx, ctx.tensor(ctx.args[0], ctx.out_dtype), kind, alpha, beta)


def act_layer(ctx: ConversionContext, x: Any, kind: str, alpha: float | None = None, beta: float | None = None) -> Any:
    if x.dtype not in (ctx.trt.float32, ctx.trt.float16, ctx.trt.bfloat16):
        raise Decline(f"{kind.lower()} on {x.dtype} (TensorRT activations are floating point)")
    layer = ctx.network.add_activation(x, getattr(ctx.trt.ActivationType, kind))
    if alpha is not None:
        layer.alpha = alpha
    if beta is not None:
        layer.beta = beta
    return layer.get_output(0)


@converter(aten.relu.default)
def _relu(ctx: ConversionContext) -> Any:
    return _activation(ctx, "RELU")


@converter(aten.sigmoid.default)
def _sigmoid(ctx: ConversionContext) -> Any:
    return _activation(ctx, "SIGMOID")


@converter(aten.tanh.default)
def _tanh(ctx: ConversionContext) -> Any:
    return _activation(ctx, "TANH")


@converter(aten.gelu.default)
def _gelu(ctx: ConversionContext) -> Any:
    approximate = _arg(ctx, 1, "approximate", "none")
    return _activation(ctx, "GELU_TANH" if approximate == "tanh" else "GELU_ERF")


@converter(aten.hardtanh.default)
def _hardtanh(ctx: ConversionContext) -> Any:
    return _activation(ctx, "CLIP", _arg(ctx, 1, "min_val", -1.0), _arg(ctx, 2, "max_val", 1.0))


@converter(aten.leaky_relu.default)
def _leaky_relu(ctx: ConversionContext) -> Any:
    return _activation(ctx, "LEAKY_RELU", _arg(ctx, 1, "negative_slope", 0.01))


@converter(aten.elu.default)
def _elu(ctx: ConversionContext) -> Any:
    if _arg(ctx, 2, "scale", 1) != 1 or _arg(ctx, 3, "input_scale", 1) != 1:
        raise Decline("elu with scale or input_scale other than 1")
    return _activation(ctx, "ELU", _arg(ctx, 1, "alpha", 1.0))


@converter(aten.softplus.default)
def _softplus(ctx: ConversionContext) -> Any:
    beta = _arg(ctx, 1, "beta", 1.0)
    return _activation(ctx, "SOFTPLUS", 1.0 / beta, beta)


@converter(aten.hardsigmoid.default)
def _hardsigmoid(ctx: ConversionContext) -> Any:
    return _activation(ctx, "HARD_SIGMOID", 1.0 / 6.0, 0.5)


@converter(aten.hardswish.default, aten.silu.default)
def _gated(ctx: ConversionContext) -> Any:
    if ctx.node.target is aten.silu.default:
        gate = _activation(ctx, "SIGMOID")
    else:
        gate = _activation(ctx, "HARD_SIGMOID", 1.0 / 6.0, 0.5)
    return ctx.elementwise(ctx.tensor(ctx.args[0], ctx.out_dtype), gate, _E(ctx).PROD)


@converter(aten.clamp.default, aten.clamp.Tensor)
def _clamp(ctx: ConversionContext) -> Any:
    low, high = _arg(ctx, 1, "min"), _arg(ctx, 2, "max")
    x = ctx.tensor(ctx.args[0], ctx.out_dtype)
    numbers = isinstance(low, (int, float)) and isinstance(high, (int, float))
    if numbers and x.dtype in (ctx.trt.float32, ctx.trt.float16, ctx.trt.bfloat16):
        return act_layer(ctx, x, "CLIP", float(low), float(high))
    if low is not None:
        x = ctx.elementwise(x, ctx.tensor(low, x.dtype), _E(ctx).MAX)
    if high is not None:
        x = ctx.elementwise(x, ctx.tensor(high, x.dtype), _E(ctx).MIN)
    return x


# reductions and softmax ----------------------------------------------------------------


def _reduce(ctx: ConversionContext, op: str, dim: Any, keepdim: bool) -> Any:
    x = ctx.tensor(ctx.args[0])
    out = ctx.out_dtype
    rank = len(x.shape)
    if rank == 0:
        return ctx.cast(x, out)
    floating = out in (ctx.trt.float32, ctx.trt.float16, ctx.trt.bfloat16)
    compute = out if floating else ctx.trt.int32
    x = ctx.cast(x, compute)
    op_enum = getattr(ctx.trt.ReduceOperation, op)
    y = ctx.network.add_reduce(x, op_enum, _mask(_dims(dim, rank)), bool(keepdim)).get_output(0)
    return ctx.cast(y, out)


@converter(aten.mean.dim, aten.mean.default)
def _mean(ctx: ConversionContext) -> Any:
    return _reduce(ctx, "AVG", _arg(ctx, 1, "dim"), _arg(ctx, 2, "keepdim", False))


@converter(aten.sum.dim_IntList, aten.sum.default)
def _sum(ctx: ConversionContext) -> Any:
    return _reduce(ctx, "SUM", _arg(ctx, 1, "dim"), _arg(ctx, 2, "keepdim", False))


@converter(aten.prod.dim_int, aten.prod.default)
def _prod(ctx: ConversionContext) -> Any:
    return _reduce(ctx, "PROD", _arg(ctx, 1, "dim"), _arg(ctx, 2, "keepdim", False))


@converter(aten.amax.default, aten.any.dim, aten.any.dims, aten.any.default)
def _amax(ctx: ConversionContext) -> Any:
    return _reduce(ctx, "MAX", _arg(ctx, 1, "dim"), _arg(ctx, 2, "keepdim", False))


@converter(aten.amin.default, aten.all.dim, aten.all.dims, aten.all.default)
def _amin(ctx: ConversionContext) -> Any:
    return _reduce(ctx, "MIN", _arg(ctx, 1, "dim"), _arg(ctx, 2, "keepdim", False))


@converter(aten._softmax.default, aten._log_softmax.default)
def _softmax(ctx: ConversionContext) -> Any:
    x, dim, half_to_float = ctx.args[:3]
    if half_to_float:
        raise Decline("softmax with half_to_float=True")
    layer = ctx.network.add_softmax(ctx.tensor(x, ctx.out_dtype))
    layer.axes = 1 << ctx.axis(dim, len(x.shape))
    y = layer.get_output(0)
    if ctx.node.target is aten._log_softmax.default:
        y = ctx.unary(y, ctx.trt.UnaryOperation.LOG)
    return y


# shapes --------------------------------------------------------------------------------


@converter(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(ctx: ConversionContext) -> Any:
    return ctx.reshape(ctx.tensor(ctx.args[0]), list(ctx.args[1]))


@converter(aten.permute.default)
def _permute(ctx: ConversionContext) -> Any:
    x = ctx.tensor(ctx.args[0])
    rank = len(x.shape)
    layer = ctx.network.add_shuffle(x)
    layer.first_transpose = tuple(ctx.axis(d, rank) for d in ctx.args[1])
    return layer.get_output(0)


def _slice_layer(ctx: ConversionContext, x: Any, start: list[int], shape: list[Any], stride: list[int]) -> Any:
    static = not any(ctx.is_tensor(s) for s in shape)
    size = tuple(int(s) for s in shape) if static else (0,) * len(shape)
    layer = ctx.network.add_slice(x, tuple(start), size, tuple(stride))
    if not static:
        layer.set_input(2, ctx.shape_tensor(shape))
    return layer


def expand(ctx: ConversionContext, x: Any, sizes: Sequence[Any]) -> Any:
    """Broadcast ``x`` to ``sizes`` (-1 keeps a dim; ints or 1-element ITensors)."""
    rank = len(sizes)
    x = ctx.tensor(x, rank=rank)
    shape, stride = [], []
    for i, size in enumerate(sizes):
        if not ctx.is_tensor(size) and size == -1:
            size = ctx.dim_size(x, i)
        shape.append(size)
        broadcast = x.shape[i] == 1 and (ctx.is_tensor(size) or size != 1)
        stride.append(0 if broadcast else 1)
    if not any(ctx.is_tensor(s) for s in shape) and tuple(shape) == tuple(x.shape):
        return x
    return _slice_layer(ctx, x, [0] * rank, shape, stride).get_output(0)


@converter(aten.expand.default)
def _expand(ctx: ConversionContext) -> Any:
    return expand(ctx, ctx.args[0], list(ctx.args[1]))


@converter(aten.unsqueeze.default)
def _unsqueeze(ctx: ConversionContext) -> Any:
    x = ctx.tensor(ctx.args[0])
    shape = ctx.shape_of(x)
    shape.insert(ctx.axis(ctx.args[1], len(shape) + 1), 1)
    return ctx.reshape(x, shape)


@converter(aten.squeeze.dims, aten.squeeze.dim, aten.squeeze.default)
def _squeeze(ctx: ConversionContext) -> Any:
    x = ctx.tensor(ctx.args[0])
    rank = len(x.shape)
    dims = _dims(_arg(ctx, 1, "dim"), rank)
    if any(x.shape[d] < 0 for d in dims):
        raise Decline("squeeze of a dynamic dimension (its size is only known at run time)")
    shape = [s for d, s in enumerate(ctx.shape_of(x)) if not (d in dims and x.shape[d] == 1)]
    return ctx.reshape(x, shape)


@converter(aten.select.int)
def _select(ctx: ConversionContext) -> Any:
    x, dim, index = ctx.tensor(ctx.args[0]), ctx.args[1], ctx.args[2]
    dim = ctx.axis(dim, len(x.shape))
    if ctx.is_tensor(index):
        raise Decline("select with a symbolic index")
    if index < 0:
        if x.shape[dim] < 0:
            raise Decline("negative select index on a dynamic dimension")
        index += x.shape[dim]
    return ctx.network.add_gather(x, ctx.constant(np.array(index, dtype=np.int64)), dim).get_output(0)


@converter(aten.slice.Tensor)
def _slice(ctx: ConversionContext) -> Any:
    x = ctx.tensor(ctx.args[0])
    rank = len(x.shape)
    dim = ctx.axis(_arg(ctx, 1, "dim", 0), rank)
    start, end, step = _arg(ctx, 2, "start"), _arg(ctx, 3, "end"), _arg(ctx, 4, "step", 1)
    if any(ctx.is_tensor(v) for v in (start, end, step)) or step < 1:
        raise Decline("slice with symbolic bounds or a step below 1")
    size = x.shape[dim]
    shape = ctx.shape_of(x)
    begin = start or 0
    if size >= 0:
        stop = size if end is None else end
        begin, stop = (min(max(v + size if v < 0 else v, 0), size) for v in (begin, stop))
        length = max(0, math.ceil((stop - begin) / step))
        if length == size:
            return x
        shape[dim] = length
    elif begin >= 0 and step == 1 and (end is None or end >= 2**62):
        shape[dim] = ctx.elementwise(shape[dim], ctx.constant(np.array([begin])), _E(ctx).SUB)
    else:
        raise Decline("slice of a dynamic dimension with a negative start or a finite end")
    starts, strides = [0] * rank, [1] * rank
    starts[dim], strides[dim] = begin, step
    return _slice_layer(ctx, x, starts, shape, strides).get_output(0)


@converter(aten.cat.default)
def _cat(ctx: ConversionContext) -> Any:
    dtype = ctx.out_dtype
    tensors = [ctx.tensor(t, dtype) for t in ctx.args[0]]
    rank = max(len(t.shape) for t in tensors)
    tensors = [t for t in tensors if len(t.shape) == rank]  # legacy empty 1-D inputs
    layer = ctx.network.add_concatenation(tensors)
    layer.axis = ctx.axis(_arg(ctx, 1, "dim", 0), rank)
    return layer.get_output(0)


@converter(aten.split_with_sizes.default, aten.split.Tensor)
def _split(ctx: ConversionContext) -> Any:
    x, sizes = ctx.tensor(ctx.args[0]), ctx.args[1]
    rank = len(x.shape)
    dim = ctx.axis(_arg(ctx, 2, "dim", 0), rank)
    total = x.shape[dim]
    if total < 0:
        raise Decline("split of a dynamic dimension")
    if isinstance(sizes, int):
        sizes = [min(sizes, total - i) for i in range(0, total, sizes)]
    outs, begin = [], 0
    for size in sizes:
        shape, starts = ctx.shape_of(x), [0] * rank
        shape[dim], starts[dim] = size, begin
        outs.append(_slice_layer(ctx, x, starts, shape, [1] * rank).get_output(0))
        begin += size
    return tuple(outs)


@converter(aten.constant_pad_nd.default)
def _pad(ctx: ConversionContext) -> Any:
    x, pad, value = ctx.tensor(ctx.args[0]), ctx.args[1], _arg(ctx, 2, "value", 0)
    rank = len(x.shape)
    starts, shape = [0] * rank, ctx.shape_of(x)
    for i in range(len(pad) // 2):
        d = rank - 1 - i
        if x.shape[d] < 0:
            raise Decline("padding a dynamic dimension")
        starts[d] = -pad[2 * i]
        shape[d] = x.shape[d] + pad[2 * i] + pad[2 * i + 1]
    layer = _slice_layer(ctx, x, starts, shape, [1] * rank)
    layer.mode = ctx.trt.SampleMode.FILL
    layer.set_input(4, ctx.constant(np.array(value), x.dtype))
    return layer.get_output(0)


# creation ------------------------------------------------------------------------------


@converter(
    aten.full_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.empty_like.default,
)
def _full_like(ctx: ConversionContext) -> Any:
    fill = {aten.zeros_like.default: 0, aten.ones_like.default: 1, aten.empty_like.default: 0}
    value = fill.get(ctx.node.target, _arg(ctx, 1, "fill_value", 0))
    x = ctx.tensor(ctx.args[0])
    rank = len(x.shape)
    scalar = ctx.constant(torch.full((1,) * rank, value, dtype=ctx.val.dtype))
    return expand(ctx, scalar, ctx.shape_of(x))


@converter(aten.arange.start_step, aten.arange.start, aten.arange.default)
def _arange(ctx: ConversionContext) -> Any:
    """Only reached with a symbolic bound (static ranges are folded into constants)."""
    args = list(ctx.args)
    if ctx.node.target is aten.arange.default:
        args = [0, *args]
    start, end = args[0], args[1]
    step = args[2] if len(args) > 2 else 1
    if ctx.is_tensor(start) or ctx.is_tensor(step) or step != 1:
        raise Decline("arange with a symbolic start or a step other than 1")
    length = ctx.elementwise(ctx.tensor(end), ctx.constant(np.array([start])), _E(ctx).SUB)
    layer = ctx.network.add_fill((0,), ctx.trt.FillOperation.LINSPACE, ctx.out_dtype)
    layer.set_input(0, ctx.shape_tensor([length]))
    layer.set_input(1, ctx.constant(np.array(start), ctx.out_dtype))
    layer.set_input(2, ctx.constant(np.array([step]), ctx.out_dtype))
    return layer.get_output(0)


# pooling -------------------------------------------------------------------------------


def _pool(
    ctx: ConversionContext,
    kind: str,
    nd: int,
    kernel: Any,
    stride: Any,
    padding: Any,
    ceil_mode: bool,
) -> Any:
    x = ctx.tensor(ctx.args[0])
    if len(x.shape) != nd + 2:
        raise Decline(f"{nd}-d pooling of a rank-{len(x.shape)} tensor (needs a batch dim)")
    window = _ntuple(kernel, nd)
    layer = ctx.network.add_pooling_nd(x, getattr(ctx.trt.PoolingType, kind), window)
    layer.stride_nd = _ntuple(stride, nd) if stride else window
    layer.padding_nd = _ntuple(padding, nd)
    if ceil_mode:
        layer.padding_mode = ctx.trt.PaddingMode.EXPLICIT_ROUND_UP
    return layer


@converter(aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)
def _max_pool(ctx: ConversionContext) -> Any:
    nd = 2 if ctx.node.target is aten.max_pool2d_with_indices.default else 3
    if any(d != 1 for d in _ntuple(_arg(ctx, 4, "dilation", 1), nd)):
        raise Decline("max pooling with dilation")
    layer = _pool(
        ctx,
        "MAX",
        nd,
        ctx.args[1],
        _arg(ctx, 2, "stride"),
        _arg(ctx, 3, "padding", 0),
        _arg(ctx, 5, "ceil_mode", False),
    )
    return layer.get_output(0), None


@converter(aten.avg_pool2d.default, aten.avg_pool3d.default)
def _avg_pool(ctx: ConversionContext) -> Any:
    nd = 2 if ctx.node.target is aten.avg_pool2d.default else 3
    if _arg(ctx, 6, "divisor_override") is not None:
        raise Decline("average pooling with divisor_override")
    layer = _pool(
        ctx,
        "AVERAGE",
        nd,
        ctx.args[1],
        _arg(ctx, 2, "stride"),
        _arg(ctx, 3, "padding", 0),
        _arg(ctx, 4, "ceil_mode", False),
    )
    layer.average_count_excludes_padding = not _arg(ctx, 5, "count_include_pad", True)
    return layer.get_output(0)


@converter(aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool2d(ctx: ConversionContext) -> Any:
    x = ctx.tensor(ctx.args[0])
    if len(x.shape) != 4:
        raise Decline(f"adaptive pooling of a rank-{len(x.shape)} tensor (needs N, C, H, W)")
    out = _ntuple(ctx.args[1], 2)
    size = tuple(x.shape[-2:])
    if any(s < 0 for s in size) or any(s % o for s, o in zip(size, out, strict=True)):
        raise Decline(f"adaptive pooling from {size} to {out} (not an integer ratio)")
    window = tuple(s // o for s, o in zip(size, out, strict=True))
    layer = ctx.network.add_pooling_nd(x, ctx.trt.PoolingType.AVERAGE, window)
    layer.stride_nd = window
    return layer.get_output(0)


# linear algebra ------------------------------------------------------------------------


def matmul(ctx: ConversionContext, a: Any, b: Any) -> Any:
    dtype = ctx.out_dtype
    none = ctx.trt.MatrixOperation.NONE
    a, b = ctx.tensor(a, dtype), ctx.tensor(b, dtype)
    return ctx.network.add_matrix_multiply(a, none, b, none).get_output(0)


@converter(aten.mm.default, aten.bmm.default)
def _mm(ctx: ConversionContext) -> Any:
    return matmul(ctx, ctx.args[0], ctx.args[1])


@converter(aten.addmm.default, aten.baddbmm.default)
def _addmm(ctx: ConversionContext) -> Any:
    """beta * bias + alpha * (a @ b), 2-D (addmm) or batched (baddbmm, e.g. horizontally fused linears)."""
    bias, a, b = ctx.args[:3]
    beta, alpha = ctx.kwargs.get("beta", 1), ctx.kwargs.get("alpha", 1)
    y = matmul(ctx, a, b)
    dtype = ctx.out_dtype
    if alpha != 1:
        y = ctx.elementwise(y, ctx.tensor(alpha, dtype), _E(ctx).PROD)
    if beta == 0:
        return y
    if beta != 1:
        bias = (
            bias * beta
            if not ctx.is_tensor(bias)
            else ctx.elementwise(bias, ctx.tensor(beta, bias.dtype), _E(ctx).PROD)
        )
    return ctx.elementwise(y, ctx.tensor(bias, dtype), _E(ctx).SUM)


@converter(aten.convolution.default)
def _convolution(ctx: ConversionContext) -> Any:
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = ctx.args
    x = ctx.tensor(x)
    if len(w.shape) == 3:  # 1-d: run as 2-d with a trailing unit dimension
        x = ctx.reshape(x, ctx.shape_of(x) + [1])
        w = w.unsqueeze(-1) if isinstance(w, torch.Tensor) else ctx.reshape(w, [*w.shape, 1])
        y = conv_nd(
            ctx,
            x,
            w,
            b,
            [*stride, 1],
            [*padding, 0],
            [*dilation, 1],
            transposed,
            [*output_padding, 0],
            groups,
        )
        return ctx.reshape(y, ctx.shape_of(y)[:-1])
    return conv_nd(ctx, x, w, b, stride, padding, dilation, transposed, output_padding, groups)


def conv_nd(
    ctx: ConversionContext,
    x: Any,
    w: Any,
    b: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    transposed: bool,
    output_padding: Any,
    groups: int,
) -> Any:
    nd = len(w.shape) - 2
    if nd not in (2, 3):
        raise Decline(f"{nd}-d convolution (TensorRT has 2-d and 3-d)")
    trt, dtype = ctx.trt, x.dtype
    kernel_size = tuple(int(k) for k in w.shape[2:])
    kernel, bias = ctx.weights(w, dtype), ctx.weights(b, dtype) if b is not None else None
    empty = trt.Weights()
    if transposed:
        out_channels = int(w.shape[1]) * groups
        layer = ctx.network.add_deconvolution_nd(x, out_channels, kernel_size, kernel or empty, bias or empty)
        pad = _ntuple(padding, nd)
        post = tuple(p - o for p, o in zip(pad, _ntuple(output_padding, nd), strict=True))
        if any(p < 0 for p in post):
            raise Decline("transposed convolution with output_padding larger than padding")
        layer.pre_padding, layer.post_padding = pad, post
    else:
        out_channels = int(w.shape[0])
        layer = ctx.network.add_convolution_nd(x, out_channels, kernel_size, kernel or empty, bias or empty)
        layer.padding_nd = _ntuple(padding, nd)
    layer.stride_nd = _ntuple(stride, nd)
    layer.dilation_nd = _ntuple(dilation, nd)
    layer.num_groups = int(groups)
    if kernel is None:
        layer.set_input(1, ctx.tensor(w, dtype))
    if b is not None and bias is None:
        layer.set_input(2, ctx.tensor(b, dtype))
    return layer.get_output(0)


@converter(aten.scaled_dot_product_attention.default)
def _sdpa(ctx: ConversionContext) -> Any:
    """softmax(q·kᵀ·scale + mask)·v, rows that are fully masked give 0 (like torch's math path)."""
    dtype = ctx.out_dtype
    q, k, v = (ctx.tensor(t, dtype) for t in ctx.args[:3])
    mask, dropout, causal = _arg(ctx, 3, "attn_mask"), _arg(ctx, 4, "dropout_p", 0.0), _arg(ctx, 5, "is_causal", False)
    scale = ctx.kwargs.get("scale")
    if dropout:
        raise Decline("attention with dropout (build the model in eval mode)")
    if ctx.kwargs.get("enable_gqa", False) and q.shape[-3] != k.shape[-3]:
        raise Decline("grouped-query attention (enable_gqa) with fewer key/value heads")
    if scale is None:
        if q.shape[-1] < 0:
            raise Decline("attention with a dynamic head size and no explicit scale")
        scale = 1.0 / math.sqrt(q.shape[-1])
    M, E = ctx.trt.MatrixOperation, _E(ctx)
    q = ctx.elementwise(q, ctx.tensor(scale, dtype), E.PROD)
    scores = ctx.network.add_matrix_multiply(q, M.NONE, k, M.TRANSPOSE).get_output(0)
    keep = None  # bool, True where attention is allowed
    if causal:
        rows, cols = q.shape[-2], k.shape[-2]
        if rows < 0 or cols < 0:
            raise Decline("causal attention with a dynamic sequence length")
        keep = ctx.tensor(torch.ones(rows, cols, dtype=torch.bool).tril())
    if mask is not None:
        if _is_bool(ctx, mask):
            given = ctx.tensor(mask, ctx.trt.bool)
            keep = given if keep is None else ctx.elementwise(keep, given, E.AND)
        else:
            scores = ctx.elementwise(scores, ctx.tensor(mask, dtype), E.SUM)
    if keep is not None:
        cond, scores, blocked = ctx.broadcast(keep, scores, ctx.tensor(-math.inf, dtype))
        scores = ctx.network.add_select(cond, scores, blocked).get_output(0)
    softmax = ctx.network.add_softmax(scores)
    softmax.axes = 1 << (len(scores.shape) - 1)
    probs = softmax.get_output(0)
    if mask is not None or causal:
        finite = ctx.unary(ctx.elementwise(scores, ctx.tensor(-math.inf, dtype), E.EQUAL), ctx.trt.UnaryOperation.NOT)
        any_finite = ctx.network.add_reduce(
            ctx.cast(finite, ctx.trt.int32), ctx.trt.ReduceOperation.MAX, 1 << (len(scores.shape) - 1), True
        ).get_output(0)
        zeros = ctx.tensor(0.0, dtype)
        cond, probs, zeros = ctx.broadcast(ctx.cast(any_finite, ctx.trt.bool), probs, zeros)
        probs = ctx.network.add_select(cond, probs, zeros).get_output(0)
    return ctx.network.add_matrix_multiply(probs, M.NONE, v, M.NONE).get_output(0)


def _is_bool(ctx: ConversionContext, x: Any) -> bool:
    return (x.dtype == torch.bool) if isinstance(x, torch.Tensor) else x.dtype == ctx.trt.bool


# normalization -------------------------------------------------------------------------


def _batch_norm(ctx: ConversionContext, x: Any, w: Any, b: Any, mean: Any, var: Any, eps: float) -> Any:
    stats = (w, b, mean, var)
    if any(ctx.is_tensor(t) for t in stats) or mean is None or var is None:
        raise Decline("batch norm whose statistics are not constants (training mode?)")
    x = ctx.tensor(x)
    scale = torch.rsqrt(var.float() + eps)
    if w is not None:
        scale = scale * w.float()
    shift = -mean.float() * scale
    if b is not None:
        shift = shift + b.float()
    shape = (1, -1) + (1,) * (len(x.shape) - 2)
    y = ctx.elementwise(x, ctx.tensor(scale.reshape(shape), x.dtype), _E(ctx).PROD)
    return ctx.elementwise(y, ctx.tensor(shift.reshape(shape), x.dtype), _E(ctx).SUM)


@converter(aten._native_batch_norm_legit_no_training.default)
def _bn_no_training(ctx: ConversionContext) -> Any:
    x, w, b, mean, var, _momentum, eps = ctx.args[:7]
    return _batch_norm(ctx, x, w, b, mean, var, eps), None, None


@converter(aten.native_batch_norm.default, aten._native_batch_norm_legit.default)
def _bn(ctx: ConversionContext) -> Any:
    x, w, b, mean, var, training, _momentum, eps = ctx.args[:8]
    if training:
        raise Decline("batch norm in training mode (call model.eval() before building)")
    return _batch_norm(ctx, x, w, b, mean, var, eps), None, None


@converter(aten.native_layer_norm.default)
def _layer_norm(ctx: ConversionContext) -> Any:
    x, normalized_shape, w, b, eps = ctx.args[:5]
    x = ctx.tensor(x, ctx.out_dtype)
    rank, n = len(x.shape), len(normalized_shape)
    shape = tuple(normalized_shape)
    scale = ctx.tensor(torch.ones(shape) if w is None else w, x.dtype, rank=rank)
    bias = ctx.tensor(torch.zeros(shape) if b is None else b, x.dtype, rank=rank)
    layer = ctx.network.add_normalization(x, scale, bias, _mask(range(rank - n, rank)))
    layer.epsilon = float(eps)
    return layer.get_output(0), None, None


# indexing ------------------------------------------------------------------------------


@converter(aten.embedding.default)
def _embedding(ctx: ConversionContext) -> Any:
    weight, indices = ctx.args[:2]
    table = ctx.tensor(weight, ctx.out_dtype)
    return ctx.network.add_gather(table, ctx.tensor(indices), 0).get_output(0)


@converter(aten.index_select.default)
def _index_select(ctx: ConversionContext) -> Any:
    x, dim, index = ctx.tensor(ctx.args[0]), ctx.args[1], ctx.tensor(ctx.args[2])
    return ctx.network.add_gather(x, index, ctx.axis(dim, len(x.shape))).get_output(0)


@converter(aten.gather.default)
def _gather(ctx: ConversionContext) -> Any:
    x, dim, index = ctx.tensor(ctx.args[0]), ctx.args[1], ctx.tensor(ctx.args[2])
    layer = ctx.network.add_gather_v2(x, index, ctx.trt.GatherMode.ELEMENT)
    layer.axis = ctx.axis(dim, len(x.shape))
    return layer.get_output(0)


@converter(aten.index.Tensor)
def _index(ctx: ConversionContext) -> Any:
    x, indices = ctx.tensor(ctx.args[0]), list(ctx.args[1])
    used = [i for i, t in enumerate(indices) if t is not None]
    if not used:
        return x
    if any(_is_bool_index(ctx, i) for i in used):
        raise Decline("boolean-mask indexing (data-dependent output shape)")
    if len(used) == 1:
        axis = used[0]
        return ctx.network.add_gather(x, ctx.tensor(indices[axis]), axis).get_output(0)
    if used != list(range(len(used))):
        raise Decline("advanced indexing with several index tensors not on the leading dims")
    if all(isinstance(indices[i], torch.Tensor) for i in used):
        stacked = torch.stack(torch.broadcast_tensors(*[indices[i] for i in used]), dim=-1)
        index = ctx.tensor(stacked)
    else:
        tensors = [ctx.tensor(indices[i], ctx.trt.int64) for i in used]
        shape = _broadcast_shape(ctx, tensors)
        parts = [ctx.reshape(expand(ctx, t, shape), [*shape, 1]) for t in tensors]
        layer = ctx.network.add_concatenation(parts)
        layer.axis = len(shape)
        index = layer.get_output(0)
    return ctx.network.add_gather_v2(x, index, ctx.trt.GatherMode.ND).get_output(0)


def _broadcast_shape(ctx: ConversionContext, tensors: list[Any]) -> list[Any]:
    """The numpy-broadcast shape of ``tensors`` (ints, or 1-element ITensors when dynamic)."""
    rank = max(len(t.shape) for t in tensors)
    tensors = [ctx.tensor(t, rank=rank) for t in tensors]
    shape: list[Any] = []
    for d in range(rank):
        sizes = [int(t.shape[d]) for t in tensors]
        dynamic = [t for t, n in zip(tensors, sizes, strict=True) if n < 0]
        static = [n for n in sizes if n > 1]
        if static:
            shape.append(static[0])
        elif dynamic:
            shape.append(ctx.dim_size(dynamic[0], d))
        else:
            shape.append(1)
    return shape


def _is_bool_index(ctx: ConversionContext, i: int) -> bool:
    t = ctx.args[1][i]
    if isinstance(t, torch.Tensor):
        return t.dtype == torch.bool
    return t.dtype == ctx.trt.bool
