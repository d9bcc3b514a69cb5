"""Argument helpers shared by the built-in ATen converters (the op-family modules of this package).

``_arg`` reads an optional trailing ATen argument, ``_dims``/``_mask`` turn a ``dim`` argument
into sorted axes and a TensorRT axes bitmask, ``_ntuple`` widens a size/stride argument, and
``_E`` is TensorRT's ``ElementWiseOperation`` enum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext


def _arg(ctx: ConversionContext, index: int, name: str, default: Any = None) -> Any:
    if len(ctx.args) > index:
        return ctx.args[index]
    return ctx.kwargs.get(name, default)


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


def _E(ctx: ConversionContext) -> Any:  # noqa: N802 - mirrors TensorRT's enum name
    return ctx.trt.ElementWiseOperation
