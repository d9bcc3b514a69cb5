"""Converters for kiln's quantize / dequantize ops (``kiln.ops.quant``) as TensorRT Q/DQ layers.

kiln's Q/DQ is TensorRT's explicit quantization: symmetric (zero point 0), int8 or float8 e4m3,
one scale per tensor (a float argument) or one per channel (a constant 1-D fp32 tensor along
``axis``). ``kiln::quantize_*`` becomes an IQuantizeLayer, ``kiln::dequantize_*`` an
IDequantizeLayer; a dequantize whose input is a stored int8 / float8 weight gets that weight
as a constant of the 8-bit type (weights → DQ → conv / matmul; activations → Q → DQ → ...).
Scales must be build-time constants, which TensorRT requires; anything else declines and stays
on kiln's reference ops. Keyed by qualified name, so registering them does not import
``kiln.ops.quant``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.tensorrt.convert.errors import Decline
from kiln.tensorrt.convert.registry import converter

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext

__all__ = ["dequantize", "quantize"]

# Float types TensorRT's Q takes as input and DQ gives as output.
_FLOAT_SIDE = ("float32", "float16", "bfloat16")


# 8-bit types --------------------------------------------------------------------------


def _fp8(ctx: ConversionContext) -> Any:
    fp8 = getattr(ctx.trt, "fp8", None)
    if fp8 is None:
        raise Decline(f"this TensorRT ({ctx.trt.__name__}) has no fp8 data type")
    return fp8


def format_type(ctx: ConversionContext, fmt: Any) -> Any:
    """TensorRT DataType of kiln format name ``fmt`` ("int8", "fp8_e4m3" and aliases)."""
    from kiln.ops.quant import quant_format

    try:
        name = quant_format(fmt).name
    except ValueError as exc:
        raise Decline(f"quantization format {fmt!r} is not one TensorRT's Q/DQ layers take ({exc})") from None
    if name == "int8":
        return ctx.trt.int8
    if name == "fp8_e4m3":
        return _fp8(ctx)
    raise Decline(f"quantization format {name!r} has no TensorRT Q/DQ type (int8 and fp8_e4m3 do)")


def _storage_type(ctx: ConversionContext, dtype: torch.dtype) -> Any:
    if dtype == torch.int8:
        return ctx.trt.int8
    if dtype == torch.float8_e4m3fn:
        return _fp8(ctx)
    raise Decline(f"dequantize of a {dtype} tensor: TensorRT dequantizes int8 and float8_e4m3fn only")


def _check_float_side(ctx: ConversionContext, dtype: Any, what: str) -> None:
    allowed = [getattr(ctx.trt, n) for n in _FLOAT_SIDE if hasattr(ctx.trt, n)]
    if dtype not in allowed:
        raise Decline(f"{what} is {dtype}; TensorRT's Q/DQ layers need float32, float16 or bfloat16 there")


# operands -----------------------------------------------------------------------------


def _quantized_constant(ctx: ConversionContext, value: torch.Tensor) -> Any:
    """A stored int8 / float8 weight as a TensorRT constant of that 8-bit type."""
    dtype = _storage_type(ctx, value.dtype)
    if value.dtype == torch.int8:
        return ctx.constant(value, dtype)
    # numpy has no float8: hand TensorRT the raw bytes, typed as fp8
    raw = ctx.weights(value.contiguous().view(torch.uint8), ctx.trt.uint8)
    array = raw.numpy()  # the array ctx.weights keeps alive for the network's lifetime
    weights = ctx.trt.Weights(dtype, int(array.ctypes.data), int(array.size))
    return ctx.network.add_constant(tuple(value.shape), weights).get_output(0)


def _per_tensor_scale(ctx: ConversionContext, scale: Any, dtype: Any) -> Any:
    """A 0-d constant scale (TensorRT's per-tensor form) of the float type ``dtype``."""
    if ctx.is_tensor(scale) or (isinstance(scale, torch.Tensor) and scale.numel() != 1):
        raise Decline("the per-tensor scale is not a build-time constant (TensorRT needs a constant scale)")
    if not isinstance(scale, (int, float, torch.Tensor)):
        raise Decline(f"a per-tensor scale of type {type(scale).__name__}")
    value = float(scale)
    _check_scales(np.array([value]))
    return ctx.constant(torch.tensor(value, dtype=torch.float32), dtype)


def _per_channel_scale(ctx: ConversionContext, scales: Any, x: Any, axis: int, dtype: Any) -> tuple[Any, int]:
    """The 1-D constant scales of the float type ``dtype``, and ``axis`` in [0, rank)."""
    if not isinstance(scales, torch.Tensor):
        raise Decline("the per-channel scales are not a build-time constant (TensorRT needs constant scales)")
    rank = len(x.shape)
    axis = ctx.axis(int(axis), rank)
    size = int(x.shape[axis])
    if scales.dim() != 1:
        raise Decline(f"per-channel scales of shape {tuple(scales.shape)}: TensorRT takes a 1-D scale per axis")
    if size < 0:
        raise Decline(f"per-channel quantization along dynamic axis {axis}: the scale count must be fixed")
    if scales.numel() != size:
        raise Decline(f"{scales.numel()} per-channel scales for axis {axis} of size {size}")
    _check_scales(scales.detach().float().cpu().numpy())
    return ctx.constant(scales.detach().float(), dtype), axis


def _check_scales(values: np.ndarray) -> None:
    bad = [float(v) for v in values.ravel() if not (math.isfinite(float(v)) and float(v) > 0.0)]
    if bad:
        raise Decline(f"scale {bad[0]!r}: TensorRT's Q/DQ scales must be positive and finite")


# layers -------------------------------------------------------------------------------


def quantize(ctx: ConversionContext, x: Any, scale: Any, fmt: Any, axis: int | None = None) -> Any:
    """IQuantizeLayer: ``x`` (a float ITensor) to ``fmt`` at ``scale`` (per tensor, or along ``axis``)."""
    if not ctx.is_tensor(x):
        raise Decline("quantize of a constant: kiln stores quantized weights instead")
    _check_float_side(ctx, x.dtype, "the quantize input")
    out_type = format_type(ctx, fmt)
    if axis is None:
        s = _per_tensor_scale(ctx, scale, x.dtype)
    else:
        s, axis = _per_channel_scale(ctx, scale, x, axis, x.dtype)
    layer = ctx.network.add_quantize(x, s, out_type)
    if axis is not None:
        layer.axis = axis
    return layer.get_output(0)


def dequantize(ctx: ConversionContext, q: Any, scale: Any, axis: int | None = None) -> Any:
    """IDequantizeLayer: ``q`` (int8 / fp8, an ITensor or a stored weight) to the node's float type."""
    if isinstance(q, torch.Tensor):
        q = _quantized_constant(ctx, q)
    elif not ctx.is_tensor(q):
        raise Decline(f"dequantize of a {type(q).__name__}, not a tensor")
    elif q.dtype != ctx.trt.int8 and q.dtype != getattr(ctx.trt, "fp8", None):
        raise Decline(f"dequantize of a {q.dtype} tensor: TensorRT dequantizes int8 and fp8 only")
    out_type = ctx.out_dtype
    _check_float_side(ctx, out_type, "the dequantize output")
    if axis is None:
        s = _per_tensor_scale(ctx, scale, out_type)
    else:
        s, axis = _per_channel_scale(ctx, scale, q, axis, out_type)
    layer = ctx.network.add_dequantize(q, s, out_type)
    if axis is not None:
        layer.axis = axis
    return layer.get_output(0)


# converters ---------------------------------------------------------------------------


@converter("kiln::quantize_per_tensor")
def _quantize_per_tensor(ctx: ConversionContext) -> Any:
    x, scale, fmt = ctx.args
    return quantize(ctx, x, scale, fmt)


@converter("kiln::quantize_per_channel")
def _quantize_per_channel(ctx: ConversionContext) -> Any:
    x, scales, axis, fmt = ctx.args
    return quantize(ctx, x, scales, fmt, axis)


@converter("kiln::dequantize_per_tensor")
def _dequantize_per_tensor(ctx: ConversionContext) -> Any:
    q, scale, _dtype = ctx.args  # the output dtype comes from the node (after precision mapping)
    return dequantize(ctx, q, scale)


@converter("kiln::dequantize_per_channel")
def _dequantize_per_channel(ctx: ConversionContext) -> Any:
    q, scales, axis, _dtype = ctx.args
    return dequantize(ctx, q, scales, axis)
