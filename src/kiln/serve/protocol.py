"""The Open Inference Protocol (KServe v2) on the wire: pure encoding and decoding, no Ray.

What a server needs to speak the protocol Triton, KServe and Seldon clients use:
model metadata, decoding an inference request (JSON `data`, or the binary tensor
extension) into tensors checked against the model's signature, and encoding the
response. Every problem with a request is a `kiln.InputError` whose message says what
is wrong and where (which input, which field); the server answers it with HTTP 400.

Binary tensor extension (as Triton's): the request body is a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw, little-endian, row-major
bytes of each input whose `parameters.binary_data_size` is given, in the order the
inputs are listed. Outputs are returned the same way when the request asks for it
(`parameters.binary_data_output`, or `binary_data` on a requested output).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kiln.errors import InputError, KilnError

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
EXTENSIONS = ["binary_tensor_data"]

# The protocol's datatype names for the dtypes an engine can take or return.
DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
# Which JSON number kinds (numpy's dtype.kind of the parsed `data`) each datatype accepts.
_JSON_KINDS = {"BOOL": "b", "FP16": "iuf", "BF16": "iuf", "FP32": "iuf", "FP64": "iuf"}
_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
          "INT64": np.int64, "FP16": np.float16, "BF16": np.float32, "FP32": np.float32, "FP64": np.float64}


def datatype_name(dtype: torch.dtype) -> str:
    """The protocol's name for a torch dtype (FP32, INT64, …)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise KilnError(
            f"tensors of dtype {dtype} cannot be carried by the Open Inference Protocol "
            f"(it knows {', '.join(DATATYPES)})"
        ) from None


@dataclass(frozen=True)
class TensorMeta:
    """One input or output as the protocol describes it; -1 marks the batch axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @property
    def dtype(self) -> torch.dtype:
        return DATATYPES[self.datatype]


@dataclass(frozen=True)
class Signature:
    """What a model takes and returns, in the protocol's terms."""

    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]


def model_metadata(name: str, signature: Signature, platform: str = "kiln", versions: Sequence[str] = ()) -> dict:
    """The body of `GET /v2/models/NAME`."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [m.to_json() for m in signature.inputs],
        "outputs": [m.to_json() for m in signature.outputs],
    }


def server_metadata(version: str) -> dict:
    """The body of `GET /v2`."""
    return {"name": "kiln", "version": version, "extensions": EXTENSIONS}


def error_body(message: str) -> bytes:
    """The protocol's error response body: {"error": message}."""
    return json.dumps({"error": message}).encode()


# -- requests --------------------------------------------------------------------------------------


@dataclass
class InferRequest:
    """A decoded inference request: one tensor per model input, in the model's order."""

    inputs: list[torch.Tensor]
    id: str | None = None
    outputs: list[str] | None = None  # requested output names; None: all of them
    binary_outputs: set[str] = field(default_factory=set)
    parameters: dict[str, Any] = field(default_factory=dict)


def decode_request(body: bytes, signature: Signature, header_length: int | str | None = None) -> InferRequest:
    """Parse an inference request body and check it against `signature`.

    `header_length` is the `Inference-Header-Content-Length` header (binary extension):
    the JSON header is the first `header_length` bytes, raw tensor data follows.
    Raises InputError naming what is wrong.
    """
    binary: bytes | memoryview = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except (TypeError, ValueError):
            raise InputError(f"the Inference-Header-Content-Length header is not a number: {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise InputError(f"Inference-Header-Content-Length is {n}, but the request body has {len(body)} bytes")
        binary = memoryview(body)[n:]  # the tensors' bytes, not copied until each tensor takes its own
        body = body[:n]
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InputError(f"the request body must be a JSON object, got {type(doc).__name__}")
    parameters = _object(doc.get("parameters", {}), "the request's 'parameters'")
    entries = doc.get("inputs")
    if not isinstance(entries, list):
        raise InputError("the request has no 'inputs' list")
    expected = {m.name: i for i, m in enumerate(signature.inputs)}
    tensors: list[torch.Tensor | None] = [None] * len(signature.inputs)
    offset = 0
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"inputs[{k}] must be a JSON object, got {type(entry).__name__}")
        name = entry.get("name")
        if name not in expected:
            names = ", ".join(m.name for m in signature.inputs)
            raise InputError(f"inputs[{k}] is named {name!r}; this model's inputs are: {names}")
        index = expected[name]
        if tensors[index] is not None:
            raise InputError(f"input {name!r} is given twice")
        tensors[index], used = _decode_input(entry, signature.inputs[index], binary, offset)
        offset += used
    missing = [m.name for m, t in zip(signature.inputs, tensors) if t is None]
    if missing:
        raise InputError(f"the request lacks input(s) {', '.join(map(repr, missing))}")
    if offset != len(binary):
        raise InputError(
            f"the request carries {len(binary)} bytes of binary data after its JSON header, "
            f"but its inputs' binary_data_size add up to {offset}"
        )
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError(f"the request 'id' must be a string, got {type(request_id).__name__}")
    all_binary = bool(parameters.get("binary_data_output"))
    outputs, binary_outputs = _requested_outputs(doc.get("outputs"), signature, all_binary)
    return InferRequest(
        inputs=tensors,  # type: ignore[arg-type]  # every slot is filled (missing ones raised)
        id=request_id,
        outputs=outputs,
        binary_outputs=binary_outputs,
        parameters=parameters,
    )


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _decode_input(entry: dict[str, Any], meta: TensorMeta, binary: bytes | memoryview,
                  offset: int) -> tuple[torch.Tensor, int]:
    """One input's tensor and how many bytes of binary data it used."""
    where = f"input {meta.name!r}"
    datatype = entry.get("datatype")
    if datatype != meta.datatype:
        raise InputError(f"{where} has datatype {datatype!r}; the model takes {meta.datatype}")
    shape = _shape(entry.get("shape"), meta, where)
    numel = math.prod(shape)
    parameters = _object(entry.get("parameters") or {}, f"{where}'s 'parameters'")
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in entry:
            raise InputError(f"{where} has both 'data' and binary_data_size; give one")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputError(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        itemsize = meta.dtype.itemsize
        if size != numel * itemsize:
            raise InputError(
                f"{where}: binary_data_size is {size} bytes, but shape {list(shape)} of {meta.datatype} "
                f"needs {numel * itemsize}"
            )
        if offset + size > len(binary):
            raise InputError(
                f"{where}: binary_data_size is {size} bytes, but only {len(binary) - offset} bytes of "
                "binary data are left after the JSON header"
            )
        raw = bytearray(binary[offset : offset + size])
        flat = torch.frombuffer(raw, dtype=meta.dtype) if size else torch.empty(0, dtype=meta.dtype)
        return flat.reshape(shape), size
    if "data" not in entry:
        raise InputError(f"{where} has neither 'data' nor parameters.binary_data_size")
    return _from_json(entry["data"], meta, shape, where), 0


def _shape(value: Any, meta: TensorMeta, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InputError(f"{where}: 'shape' must be a list of integers, got {value!r}")
    shape = tuple(value)
    want = list(meta.shape)
    if len(shape) != len(want):
        raise InputError(f"{where} has shape {list(shape)} (rank {len(shape)}); the model takes shape {want}")
    for got, need in zip(shape, want):
        if (need == -1 and got < 1) or (need != -1 and got != need):
            raise InputError(
                f"{where} has shape {list(shape)}; the model takes shape {want}"
                + (" (-1: any batch size of at least 1)" if -1 in want else "")
            )
    return shape


def _from_json(data: Any, meta: TensorMeta, shape: tuple[int, ...], where: str) -> torch.Tensor:
    if not isinstance(data, list):
        raise InputError(f"{where}: 'data' must be a list of numbers, got {type(data).__name__}")
    try:
        array = np.asarray(data)
    except ValueError:
        raise InputError(f"{where}: 'data' is a ragged nested list; give it flat (row-major) or nested by "
                         "shape") from None
    numel = math.prod(shape)
    kinds = _JSON_KINDS.get(meta.datatype, "iu")
    if array.size and array.dtype.kind not in kinds:
        raise InputError(f"{where}: 'data' holds {_kind_name(array)}; {meta.datatype} takes {_kinds_name(kinds)}")
    if array.size != numel:
        raise InputError(f"{where}: 'data' has {array.size} values; shape {list(shape)} needs {numel}")
    if array.ndim > 1 and array.shape != shape:
        raise InputError(f"{where}: 'data' is nested as {list(array.shape)}, but 'shape' says {list(shape)}")
    if array.size and array.dtype.kind in "iu" and meta.dtype not in (torch.float16, torch.bfloat16,
                                                                     torch.float32, torch.float64):
        info = np.iinfo(_NUMPY[meta.datatype])
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise InputError(f"{where}: 'data' holds {low}..{high}, outside {meta.datatype}'s {info.min}..{info.max}")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=_NUMPY[meta.datatype]).reshape(shape))
    return tensor.to(meta.dtype) if meta.dtype == torch.bfloat16 else tensor


def _kind_name(array: np.ndarray) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "non-integer numbers",
            "U": "strings", "O": "mixed values or numbers too large"}.get(array.dtype.kind, str(array.dtype))


def _kinds_name(kinds: str) -> str:
    return {"b": "true/false", "iu": "integers", "iuf": "numbers"}[kinds]


def _requested_outputs(value: Any, signature: Signature, all_binary: bool) -> tuple[list[str] | None, set[str]]:
    names = [m.name for m in signature.outputs]
    if value is None:
        return None, set(names) if all_binary else set()
    if not isinstance(value, list):
        raise InputError(f"the request's 'outputs' must be a list, got {type(value).__name__}")
    wanted: list[str] = []
    binary: set[str] = set()
    for k, entry in enumerate(value):
        if not isinstance(entry, dict) or entry.get("name") not in names:
            got = entry.get("name") if isinstance(entry, dict) else entry
            raise InputError(f"outputs[{k}] asks for {got!r}; this model's outputs are: {', '.join(names)}")
        name = entry["name"]
        if name in wanted:
            raise InputError(f"output {name!r} is asked for twice")
        wanted.append(name)
        parameters = _object(entry.get("parameters") or {}, f"output {name!r}'s 'parameters'")
        if parameters.get("binary_data", all_binary):
            binary.add(name)
    return wanted, binary


def match_tensors(inputs: Mapping[str, Any] | Sequence[Any], signature: Signature) -> list[torch.Tensor]:
    """Inputs given by name (a mapping) or in order, as CPU tensors in the model's order, checked
    against `signature` like a request's (the handle API's counterpart of decode_request)."""
    metas = signature.inputs
    names = [m.name for m in metas]
    if isinstance(inputs, Mapping):
        unknown = [k for k in inputs if k not in names]
        if unknown:
            raise InputError(f"unknown input(s) {', '.join(map(repr, unknown))}; this model's inputs are: "
                             f"{', '.join(names)}")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputError(f"the inputs lack {', '.join(map(repr, missing))}")
        values = [inputs[n] for n in names]
    else:
        values = list(inputs)
        if len(values) != len(metas):
            raise InputError(f"the model takes {len(metas)} input(s) ({', '.join(names)}), got {len(values)}")
    tensors = []
    for value, meta in zip(values, metas):
        where = f"input {meta.name!r}"
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"{where} is not a tensor or array: {exc}") from None
        if tensor.dtype != meta.dtype:
            got = _NAMES.get(tensor.dtype, str(tensor.dtype))
            raise InputError(f"{where} has datatype {got}; the model takes {meta.datatype}")
        _shape(list(tensor.shape), meta, where)
        tensors.append(tensor.detach().cpu())
    return tensors


# -- responses ------------------------------------------------------------------------------------


def encode_response(
    model_name: str,
    request: InferRequest,
    outputs: Mapping[str, torch.Tensor],
    model_version: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers for the outputs `request` asked for.

    JSON `data` is flat, row-major. Binary outputs follow the JSON header, and the
    headers then carry Inference-Header-Content-Length.
    """
    names = request.outputs if request.outputs is not None else list(outputs)
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        entries.append(_tensor_entry(name, outputs[name], name in request.binary_outputs, blobs))
    doc: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if model_version is not None:
        doc["model_version"] = model_version
    if request.id is not None:
        doc["id"] = request.id
    return _body(doc, blobs)


def _tensor_entry(name: str, tensor: torch.Tensor, binary: bool, blobs: list[bytes]) -> dict[str, Any]:
    """One tensor's JSON entry; its bytes appended to `blobs` instead of `data` when binary."""
    tensor = tensor.detach().cpu().contiguous()
    entry: dict[str, Any] = {"name": name, "datatype": datatype_name(tensor.dtype), "shape": list(tensor.shape)}
    if binary:
        raw = raw_bytes(tensor)
        entry["parameters"] = {"binary_data_size": len(raw)}
        blobs.append(raw)
    else:
        entry["data"] = json_data(tensor)
    return entry


def _body(doc: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """The JSON header, then the binary blobs (with Inference-Header-Content-Length) if any."""
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": JSON_TYPE}
    return header + b"".join(blobs), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's row-major bytes (the binary extension's layout)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def json_data(tensor: torch.Tensor) -> list[Any]:
    """A tensor's values, flat and row-major, as JSON numbers (or booleans)."""
    flat = tensor.detach().cpu().reshape(-1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return flat.tolist()


# -- clients (the load test and the tests speak the protocol with these) ------------------------------


def encode_request(
    inputs: Mapping[str, torch.Tensor], binary: bool = False, request_id: str | None = None,
    outputs: Sequence[str] | None = None, binary_outputs: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """A request body and headers for `inputs` (name → tensor): the client side of decode_request."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, tensor in inputs.items():
        entries.append(_tensor_entry(name, tensor, binary, blobs))
    doc: dict[str, Any] = {"inputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs]
    elif binary_outputs:
        doc["parameters"] = {"binary_data_output": True}
    return _body(doc, blobs)


def decode_response(body: bytes, header_length: int | str | None = None) -> dict[str, torch.Tensor]:
    """Output name → tensor from a response body: the client side of encode_response."""
    binary = b""
    if header_length is not None:
        n = int(header_length)
        body, binary = body[:n], body[n:]
    doc = json.loads(body)
    if "error" in doc:
        raise InputError(doc["error"])
    result: dict[str, torch.Tensor] = {}
    offset = 0
    for entry in doc["outputs"]:
        dtype = DATATYPES[entry["datatype"]]
        shape = tuple(entry["shape"])
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = bytearray(binary[offset : offset + size])
            offset += size
            flat = torch.frombuffer(raw, dtype=dtype) if size else torch.empty(0, dtype=dtype)
        else:
            flat = torch.tensor(entry["data"], dtype=torch.float32 if dtype == torch.bfloat16 else dtype).to(dtype)
        result[entry["name"]] = flat.reshape(shape)
    return result
