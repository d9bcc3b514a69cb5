"""Plain, JSON-safe descriptions shared by the build side and the runtime.

Tensor specs, dtype names, the nesting of a model's outputs, and the encoding of
non-tensor op arguments. Nothing here imports the build side.
"""

from __future__ import annotations

import collections
import importlib
import keyword
import math
import re
import sys
import warnings
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
    """A tensor's name, shape and dtype. In a dynamic-shape engine a size may be an expression
    over the engine's dims (kiln.shapes: a dim name or {op: [...]}), else it is an int."""

    name: str
    shape: tuple[Any, ...]
    dtype: torch.dtype

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TensorSpec:
        return cls(str(obj["name"]), tuple(_size(d) for d in obj["shape"]), dtype_from_name(obj["dtype"]))

    @property
    def dynamic(self) -> bool:
        return not all(isinstance(d, int) for d in self.shape)

    def describe(self) -> str:
        if self.dynamic:
            from kiln.shapes import render_shape

            return f"{render_shape(self.shape)} {dtype_name(self.dtype)}"
        return f"{tuple(self.shape)} {dtype_name(self.dtype)}"


def _size(d: Any) -> Any:
    """One size read from a file: an int, or a well-formed size expression (kiln.shapes.validate)."""
    if isinstance(d, (str, dict)):
        from kiln.shapes import validate

        return validate(d)
    return int(d)


# -- output structure ---------------------------------------------------------------------
#
# The nesting of a model's outputs, as data. Node kinds (a closed vocabulary; one key each):
#   {"leaf": i}                                   flat output i
#   {"list": [node, ...]}   {"tuple": [node, ...]}   {"size": [node, ...]} (a torch.Size: x.shape)
#   {"dict": {"keys": [str | int, ...], "values": [node, ...]}}
#   {"namedtuple": {"name": str, "fields": [str, ...], "values": [node, ...], "module": str?}}
#   {"model_output": {"class": "transformers.x.Y", "keys": [str, ...], "values": [node, ...]}}
# A namedtuple comes back as its own class when this process built or saw it, else as a
# collections.namedtuple with the same name and fields. A model_output class is resolved only
# from an allowlisted package (transformers) and only if it subclasses transformers' ModelOutput;
# otherwise it comes back as a dict, with a KilnWarning. Nothing named by a file is imported
# outside the allowlist, evaluated or unpickled.

STRUCTURE_KINDS = ("leaf", "list", "tuple", "size", "dict", "namedtuple", "model_output")
MAX_STRUCTURE_DEPTH = 64
MODEL_OUTPUT_PACKAGES = ("transformers",)  # packages whose ModelOutput classes a file may name
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
# Container classes this process has encoded (it built a model returning them): trusted.
_SEEN_NAMEDTUPLES: dict[str, type] = {}
_SEEN_MODEL_OUTPUTS: dict[str, type] = {}
_RESOLVED: dict[str, type | None] = {}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_model_output(cls: type) -> bool:
    generic = sys.modules.get("transformers.utils.generic")
    base = getattr(generic, "ModelOutput", None)
    return isinstance(base, type) and isinstance(cls, type) and issubclass(cls, base)


def encode_structure(spec: Any) -> dict[str, Any]:
    """A pytree TreeSpec as JSON (see the node kinds above). Containers kiln has no kind for
    become the builtin container they flatten like."""
    counter = iter(range(spec.num_leaves))

    def walk(s: Any) -> dict[str, Any]:
        if s.is_leaf():
            return {"leaf": next(counter)}
        kids = s.children() if callable(getattr(s, "children", None)) else s.children_specs
        children = [walk(c) for c in kids]
        context = s.context
        if s.type is list:
            return {"list": children}
        if s.type is torch.Size:
            return {"size": children}
        if isinstance(context, type) and issubclass(context, tuple) and hasattr(context, "_fields"):
            fields = [str(f) for f in context._fields]  # a namedtuple (pytree keeps its class as context)
            if len(fields) == len(children):
                _SEEN_NAMEDTUPLES[_class_path(context)] = context
                return {"namedtuple": {"name": context.__name__, "module": context.__module__,
                                       "qualname": context.__qualname__, "fields": fields, "values": children}}
        keyed = isinstance(context, list) and len(context) == len(children)
        if keyed and _is_model_output(s.type) and all(isinstance(k, str) for k in context):
            _SEEN_MODEL_OUTPUTS[_class_path(s.type)] = s.type
            return {"model_output": {"class": _class_path(s.type), "keys": list(context), "values": children}}
        if keyed and not issubclass(s.type, tuple) and all(isinstance(k, (str, int)) for k in context):
            return {"dict": {"keys": list(context), "values": children}}
        return {"tuple": children}

    return walk(spec)


def validate_structure(structure: Any, n_outputs: int) -> None:
    """Check a structure read from a file: known node kinds only, well-formed, at most
    MAX_STRUCTURE_DEPTH deep, and every flat output 0..n_outputs-1 used exactly once.
    Raises ValueError saying what is wrong and where."""
    seen: list[int] = []
    # iterative walk: (node, path, depth); no recursion, so any depth is safe to check
    stack: list[tuple[Any, str, int]] = [(structure, "structure", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_STRUCTURE_DEPTH:
            raise ValueError(f"{path}: output structure nested deeper than {MAX_STRUCTURE_DEPTH} levels")
        if not isinstance(node, dict) or len(node) != 1:
            raise ValueError(f"{path}: a structure node is an object with one key, got {_brief(node)}")
        (kind, body), = node.items()
        if kind not in STRUCTURE_KINDS:
            raise ValueError(f"{path}: unknown structure node kind {kind!r}; known: {', '.join(STRUCTURE_KINDS)}")
        where = f"{path}.{kind}"
        if kind == "leaf":
            if type(body) is not int or not 0 <= body < n_outputs:
                raise ValueError(f"{where}: leaf index must be an integer in [0, {n_outputs}), got {_brief(body)}")
            seen.append(body)
            continue
        if kind in ("list", "tuple", "size"):
            children = body
            if not isinstance(children, list):
                raise ValueError(f"{where}: expected a list of nodes, got {_brief(children)}")
        else:
            children = _check_keyed(kind, body, where)
        stack.extend((c, f"{where}[{i}]", depth + 1) for i, c in enumerate(children))
    if sorted(seen) != list(range(n_outputs)):
        missing = sorted(set(range(n_outputs)) - set(seen))
        repeated = sorted({i for i in seen if seen.count(i) > 1})
        raise ValueError(
            f"structure: the leaves must use each of the {n_outputs} outputs exactly once "
            f"(missing {missing[:8]}, repeated {repeated[:8]})"
        )


def _check_keyed(kind: str, body: Any, where: str) -> list[Any]:
    """The children of a dict / namedtuple / model_output node, after checking its fields."""
    names = {"dict": "keys", "namedtuple": "fields", "model_output": "keys"}[kind]
    required = {"dict": {"keys", "values"}, "namedtuple": {"name", "fields", "values"},
                "model_output": {"class", "keys", "values"}}[kind]
    optional = {"module", "qualname"} if kind == "namedtuple" else set()
    if not isinstance(body, dict) or not required <= set(body) or not set(body) <= required | optional:
        raise ValueError(f"{where}: expected an object with {sorted(required)}, got {_brief(body)}")
    keys, values = body[names], body["values"]
    if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
        raise ValueError(f"{where}: {names} and values must be lists of the same length")
    if kind == "dict":
        if not all(type(k) in (str, int) for k in keys):
            raise ValueError(f"{where}: dict keys must be strings or integers")
    elif not all(isinstance(k, str) and _IDENTIFIER.fullmatch(k) for k in keys):
        raise ValueError(f"{where}: {names} must be Python identifiers, got {_brief(keys)}")
    if len(set(map(repr, keys))) != len(keys):
        raise ValueError(f"{where}: repeated {names}")
    if kind == "namedtuple":
        for key in ("name", "module", "qualname"):
            value = body.get(key, "x")
            pattern = _IDENTIFIER if key == "name" else re.compile(r"[A-Za-z_<>][A-Za-z0-9_.<>]*")
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise ValueError(f"{where}: namedtuple {key} must be a Python name, got {_brief(value)}")
        if any(k.startswith("_") or keyword.iskeyword(k) for k in keys + [body["name"]]):
            raise ValueError(f"{where}: namedtuple fields cannot start with '_' or be keywords")
    if kind == "model_output" and not (isinstance(body["class"], str) and _DOTTED.fullmatch(body["class"])):
        raise ValueError(f"{where}: class must be a dotted Python name, got {_brief(body['class'])}")
    return values


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_structure(structure: dict[str, Any], flat: list[Any]) -> Any:
    """Rebuild the model's output nesting from its flat outputs."""
    (kind, body), = structure.items()
    if kind == "leaf":
        return flat[body]
    if kind == "list":
        return [build_structure(s, flat) for s in body]
    if kind in ("tuple", "size"):
        items = tuple(build_structure(s, flat) for s in body)
        return torch.Size(items) if kind == "size" and all(type(i) is int for i in items) else items
    values = [build_structure(v, flat) for v in body["values"]]
    if kind == "namedtuple":
        return namedtuple_class(body)(*values)
    if kind == "model_output":
        cls = model_output_class(body["class"])
        mapping = dict(zip(body["keys"], values))
        return mapping if cls is None else cls(**mapping)
    return dict(zip(body["keys"], values))


def namedtuple_class(body: dict[str, Any]) -> type:
    """The class of a namedtuple node: the original one if this process encoded it, else a
    collections.namedtuple of the same name and fields."""
    fields = tuple(body["fields"])
    path = f"{body.get('module', '')}.{body.get('qualname', body['name'])}"
    seen = _SEEN_NAMEDTUPLES.get(path)
    if seen is not None and tuple(getattr(seen, "_fields", ())) == fields:
        return seen
    key = f"namedtuple:{body['name']}({','.join(fields)})"
    made = _RESOLVED.get(key)
    if made is None:
        made = _RESOLVED[key] = collections.namedtuple(body["name"], fields)  # type: ignore[misc]
    return made


def model_output_class(path: str) -> type | None:
    """A transformers ModelOutput class named by `path`, or None (with a KilnWarning) when it
    cannot be resolved safely: outside the allowlisted packages, missing, or not a ModelOutput."""
    if path in _SEEN_MODEL_OUTPUTS:
        return _SEEN_MODEL_OUTPUTS[path]
    if path in _RESOLVED:
        return _RESOLVED[path]
    cls, why = _resolve_model_output(path)
    if cls is None:
        from kiln.errors import KilnWarning

        warnings.warn(f"the engine's output class {path} {why}; returning a dict instead", KilnWarning,
                      stacklevel=3)
    _RESOLVED[path] = cls
    return cls


def _resolve_model_output(path: str) -> tuple[type | None, str]:
    if not _DOTTED.fullmatch(path) or path.split(".")[0] not in MODEL_OUTPUT_PACKAGES:
        return None, f"is outside the packages kiln resolves output classes from ({', '.join(MODEL_OUTPUT_PACKAGES)})"
    module_name, _, name = path.rpartition(".")
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        importlib.import_module("transformers.utils.generic")
    except Exception as exc:  # not installed, or the module is gone in this version
        return None, f"cannot be imported here ({type(exc).__name__})"
    cls = module.__dict__.get(name)
    if not isinstance(cls, type) or not _is_model_output(cls):
        return None, "is not a transformers ModelOutput class here"
    return cls, ""


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
