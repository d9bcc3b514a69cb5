"""The engine file: one safetensors file whose metadata carries kiln's JSON header.

Layout (see docs/engine-format.md): a standard safetensors file. Its `__metadata__`
holds `kiln.format` ("kiln-engine"), `kiln.version` (the format version),
`kiln.header` (the plan and build info, JSON) and `kiln.sha256` (a digest over the
header and every tensor's bytes). Loading parses JSON and raw tensor bytes only:
no pickle, no code. Any damage is reported as EngineFileError.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from kiln.errors import EngineFileError

FORMAT = "kiln-engine"
FORMAT_VERSION = 1


def digest(header_json: str, weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header_json.encode())
    for name in sorted(weights):
        t = weights[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write(path: str | os.PathLike, header: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    header_json = json.dumps(header, allow_nan=False, separators=(",", ":"))
    cpu = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    metadata = {
        "kiln.format": FORMAT,
        "kiln.version": str(FORMAT_VERSION),
        "kiln.header": header_json,
        "kiln.sha256": digest(header_json, cpu),
    }
    data = save_safetensors(_unshare(cpu), metadata=metadata)
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, weights on the CPU) from an engine file, verified."""
    path = Path(path)
    if not path.is_file():
        raise EngineFileError(f"no engine file at {path}")
    data = path.read_bytes()
    metadata = _metadata(data, path)
    if metadata.get("kiln.format") != FORMAT:
        raise EngineFileError(
            f"{path} is a safetensors file but not a kiln engine (no kiln.format in its metadata)"
        )
    version = metadata.get("kiln.version")
    if version != str(FORMAT_VERSION):
        raise EngineFileError(
            f"{path} has engine format version {version}; this kiln reads version {FORMAT_VERSION}. "
            "Rebuild the engine with this kiln (kiln build ...), or use the kiln that wrote it."
        )
    try:
        weights = load_safetensors(data)
    except SafetensorError as exc:
        raise EngineFileError(f"{path} is damaged: its tensor data cannot be read ({exc}); rebuild it") from None
    header_json = metadata.get("kiln.header", "")
    if digest(header_json, weights) != metadata.get("kiln.sha256"):
        raise EngineFileError(
            f"{path} failed its integrity check: the header or weights were changed after it was "
            "written (corruption or tampering). Rebuild the engine."
        )
    try:
        header = json.loads(header_json)
    except json.JSONDecodeError as exc:
        raise EngineFileError(f"{path} has an unreadable header ({exc}); rebuild it") from None
    return header, weights


def _metadata(data: bytes, path: Path) -> dict[str, str]:
    if len(data) < 8:
        raise EngineFileError(f"{path} is truncated ({len(data)} bytes): not a kiln engine file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise EngineFileError(
            f"{path} is truncated or not an engine file: its header claims {n} bytes, "
            f"the file has {len(data)}. Rebuild or copy the file again."
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EngineFileError(f"{path} is not a kiln engine file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise EngineFileError(f"{path} is not a kiln engine file (unexpected header)")
    sizes = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(sizes, default=0) != len(data):
        raise EngineFileError(
            f"{path} is truncated or padded: {len(data)} bytes, expected {8 + n + max(sizes, default=0)}. "
            "Copy the file again or rebuild it."
        )
    return header.get("__metadata__") or {}


def _unshare(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each its own storage."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        if v.numel():
            seen.add(ptr)
    return out
