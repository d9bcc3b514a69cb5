"""Converters for ``kiln::pointwise`` (a fused elementwise program) and ``kiln::rowwise`` (the same
with reductions along the last axis: norms, softmax), one TensorRT layer per instruction.

The program (``kiln.ops.pointwise``) is validated by its own parser; each value's dtype is what
torch's promotion gives (``kiln.ops.pointwise.value_dtypes``), so operands are cast exactly where
the reference implementation casts them. TensorRT fuses the resulting elementwise layers again. A row
reduction (``row_sum``/``row_mean``/``row_max``/``row_min``) is an IReduceLayer over its operand's
last axis, keepdim (the fusion pass guarantees that axis is the whole row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from kiln.tensorrt.convert.activations import GATED, LAYERS, act_layer, named_activation
from kiln.tensorrt.convert.errors import Decline
from kiln.tensorrt.convert.registry import converter

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext

__all__: list[str] = []

_BINARY = {"add": "SUM", "sub": "SUB", "mul": "PROD", "div": "DIV", "maximum": "MAX", "minimum": "MIN"}
_UNARY = {"neg": "NEG", "abs": "ABS", "reciprocal": "RECIP", "exp": "EXP", "log": "LOG", "sqrt": "SQRT", "erf": "ERF"}
_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_ROW_REDUCE = {"row_sum": "SUM", "row_mean": "AVG", "row_max": "MAX", "row_min": "MIN"}


@converter("kiln::pointwise")
def _pointwise(ctx: ConversionContext) -> Any:
    return _program(ctx, "parse_program")


@converter("kiln::rowwise")
def _rowwise(ctx: ConversionContext) -> Any:
    return _program(ctx, "parse_row_program")


def _program(ctx: ConversionContext, parser: str) -> Any:
    """The program's values in order; ``parser`` is the kiln.ops.pointwise function that reads it."""
    try:
        from kiln.ops import pointwise
        from kiln.ops.pointwise import Const, PointwiseProgramError, value_dtypes
    except ImportError as exc:  # kiln.ops.pointwise is optional to this converter
        raise Decline(f"kiln.ops.pointwise is unavailable ({exc})") from None
    inputs, text = ctx.args[0], ctx.args[1]
    try:
        program = getattr(pointwise, parser)(text)
        dtypes = value_dtypes(program, tuple(_signature(x) for x in ctx.node.args[0]))
    except PointwiseProgramError as exc:
        raise Decline(str(exc)) from None
    values: list[Any] = list(inputs)
    for ins in program.body:
        dtype = dtypes[len(values)]
        operands = [values[a] if isinstance(a, int) else a.value if isinstance(a, Const) else a for a in ins.args]
        kinds = [dtypes[a] if isinstance(a, int) else None for a in ins.args]
        values.append(_lower(ctx, ins.op, operands, kinds, dtype))
    return values[-1]


def _signature(arg: Any) -> tuple[torch.dtype, bool]:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
    if not isinstance(val, torch.Tensor):
        raise Decline(f"pointwise input {arg} is not a tensor")
    return val.dtype, val.dim() == 0


def _lower(
    ctx: ConversionContext, op: str, args: list[Any], kinds: list[torch.dtype | None], dtype: torch.dtype
) -> Any:
    """One instruction: ``args`` are ITensors, constants or torch tensors; ``dtype`` its result dtype."""
    trt, E = ctx.trt, ctx.trt.ElementWiseOperation
    out = ctx.dtype(dtype)
    if op in _BINARY:
        return ctx.elementwise(ctx.tensor(args[0], out), ctx.tensor(args[1], out), getattr(E, _BINARY[op]))
    if op in _UNARY:
        return ctx.unary(ctx.tensor(args[0], out), getattr(trt.UnaryOperation, _UNARY[op]))
    if op == "rsqrt":
        return ctx.unary(ctx.unary(ctx.tensor(args[0], out), trt.UnaryOperation.SQRT), trt.UnaryOperation.RECIP)
    if op in LAYERS or op in GATED:
        return named_activation(ctx, ctx.tensor(args[0], out), op)
    if op == "clamp":
        return _clamp(ctx, ctx.tensor(args[0], out), args[1], args[2], dtype)
    if op in _COMPARE:
        return _compare(ctx, op, args, kinds)
    if op in ("and", "or"):
        a, b = (ctx.tensor(x, trt.bool) for x in args)
        return ctx.elementwise(a, b, E.AND if op == "and" else E.OR)
    if op == "not":
        return ctx.unary(ctx.tensor(args[0], trt.bool), trt.UnaryOperation.NOT)
    if op == "where":
        cond = ctx.tensor(args[0], trt.bool)
        cond, a, b = ctx.broadcast(cond, ctx.tensor(args[1], out), ctx.tensor(args[2], out))
        return ctx.network.add_select(cond, a, b).get_output(0)
    if op == "cast":
        return ctx.tensor(args[0], out)
    if op in _ROW_REDUCE:
        if out not in (trt.float32, trt.float16, trt.bfloat16):
            raise Decline(f"{op} in {dtype} (row reductions in TensorRT here are floating point)")
        x = ctx.tensor(args[0], out)
        reduce = getattr(trt.ReduceOperation, _ROW_REDUCE[op])
        return ctx.network.add_reduce(x, reduce, 1 << (len(x.shape) - 1), True).get_output(0)
    raise Decline(f"pointwise op {op!r} has no TensorRT lowering")


def _clamp(ctx: ConversionContext, x: Any, low: Any, high: Any, dtype: torch.dtype) -> Any:
    if dtype in _FLOATS and x.dtype in (ctx.trt.float32, ctx.trt.float16, ctx.trt.bfloat16):
        return act_layer(ctx, x, "CLIP", float(low), float(high))
    E = ctx.trt.ElementWiseOperation
    x = ctx.elementwise(x, ctx.tensor(low, x.dtype), E.MAX)
    return ctx.elementwise(x, ctx.tensor(high, x.dtype), E.MIN)


def _compare(ctx: ConversionContext, op: str, args: list[Any], kinds: list[torch.dtype | None]) -> Any:
    compute = _promote(kinds, args)
    dtype = ctx.dtype(torch.int32 if compute == torch.bool else compute)
    a, b = ctx.tensor(args[0], dtype), ctx.tensor(args[1], dtype)
    E, NOT = ctx.trt.ElementWiseOperation, ctx.trt.UnaryOperation.NOT
    make: dict[str, Callable[[], Any]] = {
        "eq": lambda: ctx.elementwise(a, b, E.EQUAL),
        "ne": lambda: ctx.unary(ctx.elementwise(a, b, E.EQUAL), NOT),
        "lt": lambda: ctx.elementwise(a, b, E.LESS),
        "gt": lambda: ctx.elementwise(a, b, E.GREATER),
        "le": lambda: ctx.elementwise(ctx.elementwise(a, b, E.LESS), ctx.elementwise(a, b, E.EQUAL), E.OR),
        "ge": lambda: ctx.elementwise(ctx.elementwise(a, b, E.GREATER), ctx.elementwise(a, b, E.EQUAL), E.OR),
    }
    return make[op]()


def _promote(kinds: list[torch.dtype | None], args: list[Any]) -> torch.dtype:
    """torch's promotion of tensor operands of dtypes ``kinds`` with Python-number operands."""
    tensors = [k for k in kinds if k is not None]
    dtype = tensors[0]
    for k in tensors[1:]:
        dtype = torch.promote_types(dtype, k)
    for kind, arg in zip(kinds, args, strict=True):
        if kind is None and isinstance(arg, float) and not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        elif kind is None and isinstance(arg, int) and not isinstance(arg, bool) and dtype == torch.bool:
            dtype = torch.int64
    return dtype
