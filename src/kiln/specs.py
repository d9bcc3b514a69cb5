"""Plain, JSON-safe descriptions shared by the build side and the runtime.

Tensor specs, dtype names, the nesting of a model's outputs, and the encoding of
non-tensor op arguments. Nothing here imports the build side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64,
        torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
        torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2,
    )
}
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
    "channels_last_3d": torch.channels_last_3d,
}
LAYOUTS = {"strided": torch.strided}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TensorSpec:
        return cls(str(obj["name"]), tuple(int(d) for d in obj["shape"]), dtype_from_name(obj["dtype"]))

    def describe(self) -> str:
        return f"{tuple(self.shape)} {dtype_name(self.dtype)}"


# -- output structure ---------------------------------------------------------------------

def encode_structure(spec: Any) -> dict[str, Any]:
    """A pytree TreeSpec as JSON: tuple/list/dict/leaf. Other containers (namedtuple,
    transformers' ModelOutput) become the builtin container they flatten like."""
    counter = iter(range(spec.num_leaves))

    def walk(s: Any) -> dict[str, Any]:
        if s.is_leaf():
            return {"leaf": next(counter)}
        kids = s.children() if callable(getattr(s, "children", None)) else s.children_specs
        children = [walk(c) for c in kids]
        context = s.context
        if s.type is list:
            return {"list": children}
        if isinstance(context, list) and len(context) == len(children) and not issubclass(s.type, tuple):
            if all(isinstance(k, (str, int)) for k in context):
                return {"dict": {"keys": list(context), "values": children}}
        return {"tuple": children}

    return walk(spec)


def build_structure(structure: dict[str, Any], flat: list[Any]) -> Any:
    """Rebuild the model's output nesting from its flat outputs."""
    if "leaf" in structure:
        return flat[structure["leaf"]]
    if "list" in structure:
        return [build_structure(s, flat) for s in structure["list"]]
    if "tuple" in structure:
        return tuple(build_structure(s, flat) for s in structure["tuple"])
    d = structure["dict"]
    return {k: build_structure(v, flat) for k, v in zip(d["keys"], d["values"])}


# -- op arguments ---------------------------------------------------------------------------

def encode_value(value: Any, tensor_ref: Callable[[Any], dict[str, Any] | None]) -> Any:
    """Encode an FX argument as JSON. `tensor_ref` maps graph values (nodes) to references."""
    ref = tensor_ref(value)
    if ref is not None:
        return ref
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        items = [encode_value(v, tensor_ref) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, torch.dtype):
        return {"dtype": dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.memory_format):
        return {"memory_format": next(k for k, v in MEMORY_FORMATS.items() if v == value)}
    if isinstance(value, torch.layout):
        return {"layout": next(k for k, v in LAYOUTS.items() if v == value)}
    raise TypeError(f"cannot store an argument of type {type(value).__name__} ({value!r})")


def decode_value(obj: Any, resolve: Callable[[dict[str, Any]], Any], device: torch.device) -> Any:
    """Inverse of encode_value; `resolve` turns a tensor reference into a runtime value."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode_value(v, resolve, device) for v in obj]
    (key, val), = obj.items()
    if key == "tuple":
        return tuple(decode_value(v, resolve, device) for v in val)
    if key == "float":
        return float(val)
    if key == "dtype":
        return dtype_from_name(val)
    if key == "device":
        return device
    if key == "memory_format":
        return MEMORY_FORMATS[val]
    if key == "layout":
        return LAYOUTS[val]
    return resolve(obj)
