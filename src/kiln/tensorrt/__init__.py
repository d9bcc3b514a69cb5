"""kiln's TensorRT backend: converters from core ATen to TensorRT, partitioning, ONNX checks.

Importing this package never needs TensorRT; functions that build networks raise
``TensorRTUnavailable`` with an install hint when neither ``tensorrt`` nor TensorRT-RTX is
installed. ``available()`` and ``runtime_usable(device)`` tell what works here.
"""

from kiln.tensorrt.api import TensorRTUnavailable, available, flavor, runtime_usable, version
from kiln.tensorrt.check import Rejection, trt_check
from kiln.tensorrt.converters import Decline, converter, lookup, registered, unregister
from kiln.tensorrt.network import (
    ConversionContext,
    ConversionError,
    EngineBuild,
    TRTNetwork,
    build_engine,
    build_network,
    partition,
    supported_nodes,
)

__all__ = [
    "ConversionContext",
    "ConversionError",
    "Decline",
    "EngineBuild",
    "Rejection",
    "TRTNetwork",
    "TensorRTUnavailable",
    "available",
    "build_engine",
    "build_network",
    "converter",
    "flavor",
    "lookup",
    "partition",
    "registered",
    "runtime_usable",
    "supported_nodes",
    "trt_check",
    "unregister",
    "version",
]
