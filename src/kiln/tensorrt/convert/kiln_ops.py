"""Converters for kiln's own fused ops (``kiln.ops.fused``), what the build passes leave in a graph.

Keyed by qualified name, so registering them does not import ``kiln.ops.fused``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kiln.tensorrt.convert.activations import named_activation
from kiln.tensorrt.convert.errors import Decline
from kiln.tensorrt.convert.nn import conv_nd, matmul
from kiln.tensorrt.convert.registry import converter

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext


@converter("kiln::conv_bias_act")
def _conv_bias_act(ctx: ConversionContext) -> Any:
    x, w, b, stride, padding, dilation, groups, act, residual = ctx.args
    x = ctx.tensor(x, ctx.out_dtype)
    if len(w.shape) != 4:
        raise Decline(f"kiln::conv_bias_act with a {len(w.shape) - 2}-d kernel")
    y = conv_nd(ctx, x, w, b, stride, padding, dilation, False, [0, 0], groups)
    if residual is not None:
        y = ctx.elementwise(y, ctx.tensor(residual, y.dtype), ctx.trt.ElementWiseOperation.SUM)
    return named_activation(ctx, y, act)


@converter("kiln::linear_act")
def _linear_act(ctx: ConversionContext) -> Any:
    x, weight_t, bias, act = ctx.args
    y = matmul(ctx, x, weight_t)
    if bias is not None:
        y = ctx.elementwise(y, ctx.tensor(bias, y.dtype), ctx.trt.ElementWiseOperation.SUM)
    return named_activation(ctx, y, act)


@converter("kiln::add_layer_norm")
def _add_layer_norm(ctx: ConversionContext) -> Any:
    x, residual, w, b, eps = ctx.args
    dtype = ctx.out_dtype
    s = ctx.tensor(x, dtype)
    if residual is not None:
        s = ctx.elementwise(s, ctx.tensor(residual, dtype), ctx.trt.ElementWiseOperation.SUM)
    rank, width = len(s.shape), int(s.shape[-1])
    if width < 0:
        raise Decline("layer norm over a dynamic last dimension")
    scale = ctx.tensor(torch.ones(width) if w is None else w, dtype, rank=rank)
    shift = ctx.tensor(torch.zeros(width) if b is None else b, dtype, rank=rank)
    layer = ctx.network.add_normalization(s, scale, shift, 1 << (rank - 1))
    layer.epsilon = float(eps)
    # the second output is s itself; an identity keeps the two outputs distinct tensors
    return layer.get_output(0), ctx.network.add_identity(s).get_output(0)
