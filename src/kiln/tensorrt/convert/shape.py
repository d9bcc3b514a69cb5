"""Built-in converters for ATen shape ops: views, slicing, cat/split, padding, creation, indexing.

Views and reshapes (view, permute, expand, squeeze/unsqueeze), select/slice, cat/split,
constant padding, tensor creation (``*_like``, ``arange``) and indexing (embedding,
index_select, gather, index). ``expand`` (broadcast an ITensor to given sizes) is public
for other converters, as is ``slice_layer`` (an ISliceLayer with static or dynamic sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.tensorrt.convert.args import _E, _arg, _dims
from kiln.tensorrt.convert.errors import Decline
from kiln.tensorrt.convert.registry import converter

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext

aten = torch.ops.aten


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


def slice_layer(ctx: ConversionContext, x: Any, start: list[int], shape: list[Any], stride: list[int]) -> Any:
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
    return slice_layer(ctx, x, [0] * rank, shape, stride).get_output(0)


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
    return slice_layer(ctx, x, starts, shape, strides).get_output(0)


@converter(aten.as_strided.default)
def _as_strided(ctx: ConversionContext) -> Any:
    """The input's storage read through (size, stride, storage_offset), for an input that the
    graph lays out contiguously from offset 0. A view that reads every element in order is a
    reshape (dynamic sizes too: e.g. a 1x1 adaptive pool's mean viewed with channels-last
    strides); any other static one gathers the flattened input at the element offsets PyTorch
    reads (as Torch-TensorRT lowers it)."""
    source = ctx.arg_val(0)
    size, stride = ([_val(v) for v in ctx.node.args[i]] for i in (1, 2))
    args = ctx.node.args
    offset = _val(args[3] if len(args) > 3 else ctx.node.kwargs.get("storage_offset")) or 0
    if not isinstance(source, torch.Tensor) or not _contiguous_from_zero(source):
        raise Decline("as_strided of an input that is not laid out contiguously from offset 0")
    x = ctx.tensor(ctx.args[0])
    if offset == 0 and _reads_in_order(source, size, stride):
        return ctx.reshape(x, list(ctx.args[1]))
    if any(not isinstance(v, int) for v in (*size, *stride, offset, *source.shape)):
        raise Decline("as_strided with symbolic sizes that do not just reshape its input")
    try:
        index = torch.as_strided(torch.arange(source.numel()), size, stride, offset)
    except RuntimeError as exc:
        raise Decline(f"as_strided reads outside its input ({exc})") from None
    flat = ctx.reshape(x, [-1])
    return ctx.network.add_gather(flat, ctx.constant(index.contiguous()), 0).get_output(0)


def _val(arg: Any) -> Any:
    """An fx argument's value: a size node's SymInt, else the argument itself."""
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def _same(a: Any, b: Any) -> bool:
    """Equal ints, or SymInts with equal expressions (no guard added)."""
    ea = a.node.expr if isinstance(a, torch.SymInt) else a
    eb = b.node.expr if isinstance(b, torch.SymInt) else b
    return bool(ea == eb)


def _contiguous_strides(shape: Sequence[Any]) -> list[Any]:
    strides, step = [], 1
    for n in reversed(list(shape)):
        strides.append(step)
        step = step * n
    return strides[::-1]


def _contiguous_from_zero(val: torch.Tensor) -> bool:
    if not _same(val.storage_offset(), 0):
        return False
    want = _contiguous_strides(val.shape)
    return all(_same(n, 1) or _same(s, w) for n, s, w in zip(val.shape, val.stride(), want, strict=True))


def _reads_in_order(source: torch.Tensor, size: list[Any], stride: list[Any]) -> bool:
    """Does (size, stride) from offset 0 read all of contiguous ``source``, element by element?"""
    numel_size, numel_source = 1, 1
    for n in size:
        numel_size = numel_size * n
    for n in source.shape:
        numel_source = numel_source * n
    want = _contiguous_strides(size)
    in_order = all(_same(n, 1) or _same(s, w) for n, s, w in zip(size, stride, want, strict=True))
    return in_order and _same(numel_size, numel_source)


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
        outs.append(slice_layer(ctx, x, starts, shape, [1] * rank).get_output(0))
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
    layer = slice_layer(ctx, x, starts, shape, [1] * rank)
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


@converter(aten.full.default)
def _full(ctx: ConversionContext) -> Any:
    """Only reached with a symbolic size (a static full is folded into a constant)."""
    sizes, value = list(ctx.args[0]), ctx.args[1]
    if ctx.is_tensor(value):
        raise Decline("full with a fill value computed at run time")
    scalar = ctx.constant(torch.full((1,) * len(sizes), value, dtype=ctx.val.dtype))
    return expand(ctx, scalar, sizes)


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
