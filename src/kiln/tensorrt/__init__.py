"""kiln's TensorRT backend: converters from core ATen to TensorRT, partitioning, ONNX checks.

Importing this package never needs TensorRT; functions that build networks raise
``TensorRTUnavailable`` with an install hint when neither ``tensorrt`` nor TensorRT-RTX is
installed. ``available()`` and ``runtime_usable(device)`` tell what works here.

Modules (names below are importable from ``kiln.tensorrt`` itself, loaded on first use so
that the run side, ``kiln.tensorrt.region`` and ``kiln.tensorrt.engine``, stays light):

- ``api``: which TensorRT is installed, whether it runs here, its logger
- ``converters``: the converter registry; ``ops``, ``kiln_ops``, ``pointwise``: built-in converters
  (``ops`` gathers ``convert_elementwise``, ``convert_reduce``, ``convert_shape``, ``convert_nn``)
- ``context``: ``ConversionContext``, what a converter sees
- ``network``: FX graph → TensorRT network (``build_network``, ``supported_nodes``)
- ``build``: network → serialized engine (``build_engine``)
- ``partition``: supported regions → ``kiln::tensorrt_region`` steps (``partition_graph``)
- ``region``: the ``kiln::tensorrt_region`` op and its spec; ``engine``: running one
- ``check``: what TensorRT's ONNX parser rejects (``trt_check``)
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
    "Decline": "converters",
    "converter": "converters",
    "lookup": "converters",
    "registered": "converters",
    "unregister": "converters",
    "ConversionContext": "context",
    "ConversionError": "context",
    "TRTNetwork": "network",
    "build_network": "network",
    "supported_nodes": "network",
    "EngineBuild": "build",
    "build_engine": "build",
    "IncompleteConversionError": "partition",
    "find_regions": "partition",
    "partition_graph": "partition",
    "RegionRuntimeError": "region",
    "RegionSpec": "region",
}

# ``partition`` is the module kiln.tensorrt.partition, callable as the grouping function find_regions.
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
    "runtime_usable",
    "supported_nodes",
    "trt_check",
    "unregister",
    "version",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")  # a submodule: kiln.tensorrt.network
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from kiln.tensorrt.api import TensorRTUnavailable, available, flavor, runtime_usable, version
    from kiln.tensorrt.build import EngineBuild, build_engine
    from kiln.tensorrt.check import Rejection, trt_check
    from kiln.tensorrt.context import ConversionContext, ConversionError
    from kiln.tensorrt.converters import Decline, converter, lookup, registered, unregister
    from kiln.tensorrt.network import TRTNetwork, build_network, supported_nodes
    from kiln.tensorrt.partition import IncompleteConversionError, find_regions, partition_graph
    from kiln.tensorrt.region import RegionRuntimeError, RegionSpec
