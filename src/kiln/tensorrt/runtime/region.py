"""A TensorRT region's spec: what one ``kiln::tensorrt_region`` step binds (see
``kiln.tensorrt.runtime.engine`` for the op and how it runs).

    kiln::tensorrt_region(Tensor[] inputs, Tensor engine, str spec) -> Tensor[]

``engine`` is a uint8 weight holding the serialized TensorRT engine, so its bytes live in the
kiln engine file with the other weights (safetensors: data, never code). ``spec`` is JSON
naming the TensorRT I/O tensors in binding order, with their static shapes and dtypes, and
the TensorRT that built the engine::

    {"kiln_tensorrt_region": 1, "flavor": "tensorrt-rtx", "version": "1.7.1.116",
     "inputs": [{"name": "x", "shape": [1, 3, 224, 224], "dtype": "float32"}],
     "outputs": [{"name": "addmm", "shape": [1, 1000], "dtype": "float32"}]}

Partitioning writes specs (kiln.tensorrt.partitioning.splice); the runtime reads them from
engine files, so ``parse_spec`` trusts nothing in one. Importing this module never imports
TensorRT.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from kiln.errors import KilnError
from kiln.specs import TensorSpec

__all__ = ["REGION_OP", "SPEC_VERSION", "RegionRuntimeError", "RegionSpec", "parse_spec"]

SPEC_VERSION = 1
REGION_OP = "kiln.tensorrt_region.default"  # the op's name in a plan (kiln.kernels.op_name)
_MAX_SPEC_CHARS = 1 << 20


class RegionRuntimeError(KilnError):
    """A TensorRT region cannot run here (no usable TensorRT runtime, or a mismatched engine)."""


@dataclass(frozen=True)
class RegionSpec:
    """What a region's engine binds: TensorRT tensor names, static shapes and dtypes, in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    flavor: str
    version: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "kiln_tensorrt_region": SPEC_VERSION,
                "flavor": self.flavor,
                "version": self.version,
                "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs],
            },
            separators=(",", ":"),
        )

    def describe(self) -> str:
        return f"{self.flavor} {self.version} engine, {len(self.inputs)} input(s), {len(self.outputs)} output(s)"


@functools.lru_cache(maxsize=256)
def parse_spec(text: str) -> RegionSpec:
    """Validate and parse a region spec (it comes from an engine file: trust nothing in it)."""
    if not isinstance(text, str) or len(text) > _MAX_SPEC_CHARS:
        raise RegionRuntimeError("a TensorRT region's spec is not a JSON string of sane size; rebuild the engine")
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict) or obj.get("kiln_tensorrt_region") != SPEC_VERSION:
            raise ValueError("not a region spec of version 1")
        inputs = tuple(_tensor(s) for s in obj["inputs"])
        outputs = tuple(_tensor(s) for s in obj["outputs"])
        flavor, version = str(obj["flavor"]), str(obj["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RegionRuntimeError(
            f"a TensorRT region's spec is malformed ({type(exc).__name__}: {exc}); the engine file was not "
            f"written by this kiln (region spec version {SPEC_VERSION}) or is damaged: rebuild it"
        ) from None
    if not outputs:
        raise RegionRuntimeError("a TensorRT region's spec names no outputs; rebuild the engine")
    return RegionSpec(inputs, outputs, flavor, version)


def _tensor(obj: Any) -> TensorSpec:
    spec = TensorSpec.from_json(obj)
    if any(d < 0 for d in spec.shape):
        raise ValueError(f"tensor {spec.name} has a dynamic shape {spec.shape}; kiln engines are fixed-shape")
    return spec
