"""kiln's TensorRT backend: converters from core ATen to TensorRT, partitioning, ONNX checks.

Importing this package never needs TensorRT; functions that build networks raise
``TensorRTUnavailable`` with an install hint when neither ``tensorrt`` nor TensorRT-RTX is
installed. ``available()`` and ``runtime_usable(device)`` tell what works here.

    import kiln.tensorrt as kt

    @kt.converter(torch.ops.aten.cumprod.default)
    def cumprod(ctx): ...

One package per stage, like the compiler's own (the names below are importable from
``kiln.tensorrt`` itself, each loaded on first use so that the run side stays light):

- ``convert/``: conversion — the converter registry (``converter``, ``lookup``, ``Decline``),
  ``ConversionContext``, one module per op family, FX graph → network (``build_network``,
  ``supported_nodes``), network → engine (``build_engine``)
- ``partitioning/``: supported regions → ``kiln::tensorrt_region`` steps (``find_regions``,
  ``partition_graph``)
- ``runtime/``: the ``kiln::tensorrt_region`` op, its spec (``RegionSpec``) and running it
- ``api``: which TensorRT is installed, whether it runs here, its logger
- ``check``: what TensorRT's ONNX parser rejects (``trt_check``)

The runtime imports neither conversion nor partitioning; partitioning imports both.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TensorRTUnavailable": "api",
    "available": "api",
    "flavor": "api",
    "runtime_usable": "api",
    "version": "api",
    "Rejection": "check",
    "trt_check": "check",
    "Decline": "convert.errors",
    "ConversionError": "convert.errors",
    "converter": "convert.registry",
    "lookup": "convert.registry",
    "registered": "convert.registry",
    "unregister": "convert.registry",
    "ConversionContext": "convert.context",
    "TRTNetwork": "convert.network",
    "build_network": "convert.network",
    "supported_nodes": "convert.network",
    "EngineBuild": "convert.build",
    "build_engine": "convert.build",
    "IncompleteConversionError": "partitioning.partition",
    "find_regions": "partitioning.partition",
    "partition_graph": "partitioning.partition",
    "RegionRuntimeError": "runtime.region",
    "RegionSpec": "runtime.region",
    "run_region": "runtime.engine",
}
_ALIASES = {"partition": "find_regions"}  # the grouping function's earlier name

__all__ = [
    "ConversionContext",
    "ConversionError",
    "Decline",
    "EngineBuild",
    "IncompleteConversionError",
    "RegionRuntimeError",
    "RegionSpec",
    "Rejection",
    "TRTNetwork",
    "TensorRTUnavailable",
    "available",
    "build_engine",
    "build_network",
    "converter",
    "find_regions",
    "flavor",
    "lookup",
    "partition",
    "partition_graph",
    "registered",
    "run_region",
    "runtime_usable",
    "supported_nodes",
    "trt_check",
    "unregister",
    "version",
]


def __getattr__(name: str) -> Any:
    attribute = _ALIASES.get(name, name)
    module = _EXPORTS.get(attribute)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")  # a subpackage or module: kiln.tensorrt.convert
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_ALIASES})


if TYPE_CHECKING:
    from kiln.tensorrt.api import TensorRTUnavailable, available, flavor, runtime_usable, version
    from kiln.tensorrt.check import Rejection, trt_check
    from kiln.tensorrt.convert.build import EngineBuild, build_engine
    from kiln.tensorrt.convert.context import ConversionContext
    from kiln.tensorrt.convert.errors import ConversionError, Decline
    from kiln.tensorrt.convert.network import TRTNetwork, build_network, supported_nodes
    from kiln.tensorrt.convert.registry import converter, lookup, registered, unregister
    from kiln.tensorrt.partitioning.partition import IncompleteConversionError, find_regions, partition_graph
    from kiln.tensorrt.partitioning.partition import find_regions as partition
    from kiln.tensorrt.runtime.engine import run_region
    from kiln.tensorrt.runtime.region import RegionRuntimeError, RegionSpec
