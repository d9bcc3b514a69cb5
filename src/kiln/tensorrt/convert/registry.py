"""The converter registry: one function per ATen op, in the spirit of torch2trt.

    @kiln.tensorrt.converter(torch.ops.aten.relu.default)
    def relu(ctx):
        return ctx.network.add_activation(ctx.args[0], ctx.trt.ActivationType.RELU).get_output(0)

A converter receives a ``ConversionContext`` (see ``kiln.tensorrt.convert.context``) and returns the
node's value: an ITensor, or a tuple for multi-output ops (None for outputs it cannot give).
It may decline with ``raise Decline("why")`` or ``return NotImplemented``; the node then stays
on kiln's own kernels. Keys are OpOverloads (``aten.add.Tensor``), OpOverloadPackets
(``aten.add``: every overload), Python callables (``operator.getitem``) or qualified names
(``"kiln::conv_bias_act"``, for ops registered later). The latest registration wins.
The built-in converters live in one module per op family (``BUILTINS``: the core ATen ops of
the zoo, kiln's own fused ops, ``kiln::pointwise`` programs, kiln's quantize/dequantize); they
register on the registry's first use, and rank below every converter registered from outside them.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kiln.tensorrt.convert.errors import Decline

if TYPE_CHECKING:
    from kiln.tensorrt.convert.context import ConversionContext

__all__ = ["BUILTINS", "Decline", "converter", "lookup", "registered", "unregister"]

ConverterFn = Callable[["ConversionContext"], Any]

# The modules of built-in converters, one per op family (kiln.tensorrt.convert.<name>).
BUILTINS = ("elementwise", "reduce", "shape", "nn", "kiln_ops", "pointwise", "quant")

_REGISTRY: dict[Any, list[tuple[int, ConverterFn]]] = {}
_ORDER = itertools.count()
_BUILTIN_ORDER = itertools.count(-(10**9))  # built-ins always rank below users' converters
_builtins = {"loaded": False, "loading": False}


def _ensure_builtins() -> None:
    """Import (and so register) the built-in converters on first use: they import this
    registry, which therefore cannot import them."""
    if _builtins["loaded"]:
        return
    _builtins["loaded"] = _builtins["loading"] = True
    try:
        for name in BUILTINS:
            importlib.import_module(f"{__package__}.{name}")
    finally:
        _builtins["loading"] = False


def _key(target: Any) -> Any:
    if isinstance(target, str):
        return target.replace(".", "::", 1) if "::" not in target else target
    return target


def converter(*targets: Any) -> Callable[[ConverterFn], ConverterFn]:
    """Register the decorated function as the TensorRT converter of ``targets``."""
    if not targets:
        raise TypeError("converter() needs at least one op, e.g. torch.ops.aten.relu.default")

    def register(fn: ConverterFn) -> ConverterFn:
        order = _BUILTIN_ORDER if _builtins["loading"] else _ORDER
        for target in targets:
            entries = _REGISTRY.setdefault(_key(target), [])
            entries.append((next(order), fn))
            entries.sort(key=lambda e: e[0])
        return fn

    return register


def unregister(fn: ConverterFn) -> None:
    """Remove ``fn`` wherever it is registered (earlier converters apply again)."""
    _ensure_builtins()
    for key in list(_REGISTRY):
        _REGISTRY[key] = [(i, f) for i, f in _REGISTRY[key] if f is not fn]
        if not _REGISTRY[key]:
            del _REGISTRY[key]


def _candidate_keys(target: Any) -> list[Any]:
    keys = [target]
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name  # "aten::relu"
        keys += [target.overloadpacket, f"{name}.{target._overloadname}", name]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        keys.append(target._qualified_op_name)
    return keys


def lookup(target: Any) -> ConverterFn | None:
    """The converter for ``target`` (latest registration among matching keys), or None."""
    _ensure_builtins()
    best: tuple[int, ConverterFn] | None = None
    for key in _candidate_keys(target):
        try:
            entries = _REGISTRY.get(key)
        except TypeError:  # unhashable target
            entries = None
        if entries and (best is None or entries[-1][0] > best[0]):
            best = entries[-1]
    return None if best is None else best[1]


def registered() -> dict[str, str]:
    """Every registered key → the name of the converter that handles it."""
    _ensure_builtins()
    out = {}
    for key, entries in _REGISTRY.items():
        fn = entries[-1][1]
        out[str(key)] = f"{fn.__module__}.{fn.__qualname__}"
    return dict(sorted(out.items()))
