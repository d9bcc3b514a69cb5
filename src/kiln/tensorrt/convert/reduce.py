"""Built-in converters for ATen reductions (mean, sum, prod, amax/amin, any/all, argmax/argmin),
cumsum and softmax."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.tensorrt.convert.args import _arg, _dims, _mask
from kiln.tensorrt.convert.errors import Decline
from kiln.tensorrt.convert.registry import converter

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext

aten = torch.ops.aten


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


@converter(aten.cumsum.default)
def _cumsum(ctx: ConversionContext) -> Any:
    """An ICumulativeLayer (SUM, inclusive, forward), in the output's dtype (torch sums bool and
    integers as int64); the axis is a build-time 0-D constant, as TensorRT requires."""
    trt, out = ctx.trt, ctx.out_dtype
    if out not in (trt.float32, trt.float16, trt.bfloat16, trt.int32, trt.int64):
        raise Decline(f"cumsum in {out} (TensorRT's cumulative layer takes float and int32/int64)")
    x = ctx.tensor(ctx.args[0], out)
    rank = len(x.shape)
    if rank == 0:
        return x
    axis = ctx.constant(np.array(ctx.axis(ctx.args[1], rank), dtype=np.int64), trt.int64)
    return ctx.network.add_cumulative(x, axis, trt.CumulativeOperation.SUM, False, False).get_output(0)


@converter(aten.argmax.default, aten.argmin.default)
def _argmax(ctx: ConversionContext) -> Any:
    """The first index of the extreme value, as PyTorch picks among ties: the extreme (MAX/MIN
    reduce, keepdim), then the smallest index where the input equals it (no reliance on how
    TopK breaks ties). NaN inputs are not ranked as PyTorch ranks them."""
    trt = ctx.trt
    x = ctx.tensor(ctx.args[0])
    dim, keepdim = _arg(ctx, 1, "dim"), bool(_arg(ctx, 2, "keepdim", False))
    if x.dtype == trt.bool:
        x = ctx.cast(x, trt.int32)
    if x.dtype not in (trt.float32, trt.float16, trt.bfloat16, trt.int32):
        raise Decline(f"argmax/argmin of {x.dtype} (TensorRT reduces float and int32)")
    if dim is None:
        x, dim, rank_out = ctx.reshape(x, [-1]), 0, len(x.shape)
    else:
        rank_out = len(x.shape)
    rank = len(x.shape)
    axis = ctx.axis(dim, rank)
    n = int(x.shape[axis])
    if n < 0:
        raise Decline("argmax/argmin along a dynamic dimension")
    op = trt.ReduceOperation.MAX if ctx.node.target is aten.argmax.default else trt.ReduceOperation.MIN
    extreme = ctx.network.add_reduce(x, op, 1 << axis, True).get_output(0)
    hit = ctx.elementwise(x, extreme, trt.ElementWiseOperation.EQUAL)
    positions = torch.arange(n, dtype=torch.int32).reshape([n if d == axis else 1 for d in range(rank)])
    cond, index, never = ctx.broadcast(hit, ctx.tensor(positions), ctx.tensor(np.array(n, dtype=np.int32), trt.int32))
    first = ctx.network.add_select(cond, index, never).get_output(0)
    keep = keepdim and _arg(ctx, 1, "dim") is not None
    out = ctx.network.add_reduce(first, trt.ReduceOperation.MIN, 1 << axis, keep).get_output(0)
    if keepdim and _arg(ctx, 1, "dim") is None:
        out = ctx.reshape(out, [1] * rank_out)
    return ctx.cast(out, ctx.out_dtype)
