"""Built-in converters for ATen neural-network ops: pooling, linear algebra, normalization.

Max/average/adaptive pooling, linear algebra (mm/bmm, addmm/baddbmm, convolution, scaled
dot-product attention) and normalization (batch norm in eval mode, layer norm). ``conv_nd``
and ``matmul`` are shared with ``kiln.tensorrt.convert.kiln_ops``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from kiln.tensorrt.convert.args import _E, _arg, _mask, _ntuple
from kiln.tensorrt.convert.errors import Decline
from kiln.tensorrt.convert.registry import converter
from kiln.tensorrt.convert.shape import slice_layer

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext

aten = torch.ops.aten


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


_ADAPTIVE_AVG = {aten._adaptive_avg_pool2d.default: 2, aten._adaptive_avg_pool3d.default: 3}


@converter(*_ADAPTIVE_AVG)
def _adaptive_avg_pool(ctx: ConversionContext) -> Any:
    """An integer ratio is one pooling layer; any other, as Torch-TensorRT lowers it, averages
    each output cell's input window [floor(i*n/o), ceil((i+1)*n/o)): windows are rectangular, so
    one spatial axis at a time (slices, AVG reduce, concatenation along that axis)."""
    nd = _ADAPTIVE_AVG[ctx.node.target]
    x = ctx.tensor(ctx.args[0])
    rank = len(x.shape)
    out = _ntuple(ctx.args[1], nd)
    size = tuple(int(s) for s in x.shape[-nd:])
    if rank < nd + 1 or any(s < 0 for s in size):
        raise Decline(f"adaptive pooling of shape {tuple(x.shape)} (needs {nd} static spatial dims)")
    if rank == nd + 2 and all(s % o == 0 for s, o in zip(size, out, strict=True)):
        window = tuple(s // o for s, o in zip(size, out, strict=True))
        layer = ctx.network.add_pooling_nd(x, ctx.trt.PoolingType.AVERAGE, window)
        layer.stride_nd = window
        return layer.get_output(0)
    for i, (n, o) in enumerate(zip(size, out, strict=True)):
        if n != o:
            x = _adaptive_axis(ctx, x, rank - nd + i, n, o)
    return x


def _adaptive_axis(ctx: ConversionContext, x: Any, axis: int, n: int, o: int) -> Any:
    """Adaptive average pooling of static axis ``axis`` from ``n`` to ``o`` cells."""
    cells = []
    for i in range(o):
        begin, end = (i * n) // o, -((-(i + 1) * n) // o)
        starts, shape = [0] * len(x.shape), ctx.shape_of(x)
        starts[axis], shape[axis] = begin, end - begin
        cell = slice_layer(ctx, x, starts, shape, [1] * len(shape)).get_output(0)
        if end - begin > 1:
            cell = ctx.network.add_reduce(cell, ctx.trt.ReduceOperation.AVG, 1 << axis, True).get_output(0)
        cells.append(cell)
    if len(cells) == 1:
        return cells[0]
    layer = ctx.network.add_concatenation(cells)
    layer.axis = axis
    return layer.get_output(0)


# resizing ------------------------------------------------------------------------------

_RESIZE = {
    aten.upsample_nearest2d.vec: ("NEAREST", 2),
    aten.upsample_nearest2d.default: ("NEAREST", 2),
    aten.upsample_bilinear2d.vec: ("LINEAR", 2),
    aten.upsample_bilinear2d.default: ("LINEAR", 2),
    aten.upsample_nearest1d.vec: ("NEAREST", 1),
    aten.upsample_nearest3d.vec: ("NEAREST", 3),
    aten.upsample_trilinear3d.vec: ("LINEAR", 3),
}


@converter(*_RESIZE)
def _upsample(ctx: ConversionContext) -> Any:
    """An IResizeLayer, as Torch-TensorRT and TensorRT's ONNX parser lower interpolate: PyTorch maps
    output pixel d to input coordinate (d + 0.5) * s - 0.5 (linear; clamped at the edges) or
    floor(d * s) (nearest), with s = 1 / scale_factor when one is given, else in / out; so a given
    scale factor sets the layer's scales and an output size its shape."""
    mode, nd = _RESIZE[ctx.node.target]
    x = ctx.tensor(ctx.args[0], ctx.out_dtype)
    linear = mode == "LINEAR"
    align = bool(_arg(ctx, 2, "align_corners", False)) if linear else False
    rest = list(ctx.args[3 if linear else 2 :])
    if ctx.node.target in (aten.upsample_nearest2d.default, aten.upsample_bilinear2d.default):
        scales = None if all(v is None for v in rest) else [v or 0.0 for v in rest]
    else:
        scales = rest[0] if rest else ctx.kwargs.get("scale_factors")
    rank = len(x.shape)
    if rank != nd + 2:
        raise Decline(f"{nd}-d resizing of a rank-{rank} tensor")
    trt = ctx.trt
    layer = ctx.network.add_resize(x)
    layer.resize_mode = getattr(trt.InterpolationMode, mode)
    layer.selector_for_single_pixel = trt.ResizeSelector.FORMULA
    if linear:
        transform = "ALIGN_CORNERS" if align else "HALF_PIXEL"
    else:
        transform = "ASYMMETRIC"
        layer.nearest_rounding = trt.ResizeRoundMode.FLOOR
    layer.coordinate_transformation = getattr(trt.ResizeCoordinateTransformation, transform)
    if scales is not None and not align and all(float(v) > 0 for v in scales):
        layer.scales = [1.0, 1.0, *(float(v) for v in _ntuple_f(scales, nd))]
        return layer.get_output(0)
    out = list(ctx.val.shape[-nd:])
    if any(not isinstance(v, int) for v in out):
        raise Decline("resizing to a symbolic spatial size")
    shape = ctx.shape_of(x)[:2] + out
    if any(ctx.is_tensor(v) for v in shape):
        layer.set_input(1, ctx.shape_tensor(shape))
    else:
        layer.shape = tuple(int(v) for v in shape)
    return layer.get_output(0)


def _ntuple_f(value: Any, n: int) -> list[float]:
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return values * n if len(values) == 1 else values


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


@converter(aten.native_group_norm.default)
def _group_norm(ctx: ConversionContext) -> Any:
    """Torch-TensorRT's lowering: (N, C, *) viewed as (N, G, C/G * rest), normalized over the last
    axis (a layer norm without affine), viewed back, then the per-channel weight and bias."""
    x, w, b, _n, channels, _hw, groups, eps = ctx.args[:8]
    x = ctx.tensor(x, ctx.out_dtype)
    rank = len(x.shape)
    if rank < 2 or any(d < 0 for d in x.shape[1:]):
        raise Decline("group norm needs static channel and spatial sizes")
    shape = ctx.shape_of(x)
    grouped = ctx.reshape(x, [shape[0], int(groups), -1])
    ones = ctx.tensor(torch.ones(1, 1, 1), x.dtype)
    zeros = ctx.tensor(torch.zeros(1, 1, 1), x.dtype)
    layer = ctx.network.add_normalization(grouped, ones, zeros, 1 << 2)
    layer.epsilon = float(eps)
    y = ctx.reshape(layer.get_output(0), shape)
    per_channel = (1, int(channels)) + (1,) * (rank - 2)
    if w is not None:
        y = ctx.elementwise(y, ctx.tensor(_per_channel(ctx, w, per_channel), x.dtype), _E(ctx).PROD)
    if b is not None:
        y = ctx.elementwise(y, ctx.tensor(_per_channel(ctx, b, per_channel), x.dtype), _E(ctx).SUM)
    return y, None, None


def _per_channel(ctx: ConversionContext, v: Any, shape: tuple[int, ...]) -> Any:
    return v.reshape(shape) if isinstance(v, torch.Tensor) else ctx.reshape(v, list(shape))
