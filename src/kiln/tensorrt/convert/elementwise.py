"""Built-in converters for pointwise ATen ops: identity/casts, arithmetic, comparisons, logic, activations.

The activations' layers come from ``kiln.tensorrt.convert.activations``, shared with kiln's fused ops.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch

from kiln.tensorrt.convert.activations import GATED, LAYERS, act_layer
from kiln.tensorrt.convert.args import _E, _arg
from kiln.tensorrt.convert.errors import Decline
from kiln.tensorrt.convert.registry import converter

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext

aten = torch.ops.aten


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
    return _activation(ctx, *LAYERS["hardsigmoid"])


@converter(aten.hardswish.default, aten.silu.default)
def _gated(ctx: ConversionContext) -> Any:
    gate = _activation(ctx, *GATED["silu" if ctx.node.target is aten.silu.default else "hardswish"])
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
