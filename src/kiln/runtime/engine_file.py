"""The engine file: one safetensors file whose metadata carries kiln's JSON header.

Layout (see docs/engine-format.md): a standard safetensors file. Its `__metadata__` holds
`kiln.format` ("kiln-engine"), `kiln.version` (the format version), `kiln.header` (the plan and
build info, JSON) and `kiln.sha256`: a digest over the format, the header and every tensor's
name, dtype, shape and bytes. A signed file also holds `kiln.signature` (Ed25519 over the
digest) and `kiln.signer` (the signing public key); see kiln.runtime.signing.

Reading parses JSON and copies bytes; nothing is unpickled and no code runs. The reader
parses the safetensors container itself, checks every tensor's entry against the file before
reading it, verifies the digest (and, given trusted keys, the signature) over the raw bytes,
validates the plan (kiln.runtime.validate), and only then makes tensors of exactly the bytes
it hashed. Any damage is an EngineFileError, and a file that is not an engine at all is named
for what it looks like (ONNX, a PyTorch checkpoint, a pickle ...).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import struct
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from kiln.errors import EngineFileError
from kiln.runtime import validate

FORMAT = "kiln-engine"
FORMAT_VERSION = 2
DYNAMIC_FORMAT_VERSION = 3  # a plan with dynamic dims (docs/dynamic-shapes.md); static plans stay version 2
READ_VERSIONS = (FORMAT_VERSION, DYNAMIC_FORMAT_VERSION)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on its JSON header
_DIGEST_DOMAIN = b"kiln-engine digest v2\x00"

# safetensors dtype codes (the format's spec) and the torch dtypes they hold.
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_ST_CODES = {dtype: code for code, dtype in ST_DTYPES.items()}


@dataclass(frozen=True)
class _Entry:
    """One tensor of the file as its index describes it; begin/end are absolute byte offsets."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return ST_DTYPES[self.code]


@dataclass
class EngineFile:
    """A verified engine file: its header, its weights (CPU tensors), and who signed it."""

    header: dict[str, Any]
    weights: dict[str, torch.Tensor]
    signer: str | None = None  # fingerprint of the key named by the file's signature, or None if unsigned
    signer_trusted: bool = False  # the signature was verified against one of the trusted keys


# -- the digest ------------------------------------------------------------------------------------


def _field(h: Any, data: bytes | memoryview) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def digest(
    header_json: str, tensors: Iterable[tuple[str, str, Sequence[int], bytes | memoryview]],
    version: int = FORMAT_VERSION,
) -> str:
    """SHA-256 over the format, the header JSON and, in name order, each tensor's name, dtype
    code, shape and bytes (every field length-prefixed, so no two files share a digest input)."""
    h = hashlib.sha256(_DIGEST_DOMAIN)
    _field(h, f"{FORMAT}/{version}".encode())
    _field(h, header_json.encode())
    for name, code, shape, data in sorted(tensors, key=lambda t: t[0]):
        _field(h, name.encode())
        _field(h, code.encode())
        _field(h, json.dumps([int(d) for d in shape]).encode())
        _field(h, data)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# -- writing -----------------------------------------------------------------------------------------


def write(
    path: str | os.PathLike, header: dict[str, Any], weights: dict[str, torch.Tensor], sign_key: Any = None
) -> None:
    """Write an engine file atomically; with `sign_key` (a PEM/OpenSSH private key path or
    bytes, or an Ed25519 private key object) also sign it (kiln.runtime.signing)."""
    header_json = json.dumps(header, allow_nan=False, separators=(",", ":"))
    cpu = _unshare({k: v.detach().contiguous().cpu() for k, v in weights.items()})
    for name, t in cpu.items():
        if t.dtype not in _ST_CODES:
            raise EngineFileError(f"weight {name!r} has dtype {t.dtype}, which engine files cannot hold")
    plan = header.get("plan") if isinstance(header, dict) else None
    version = DYNAMIC_FORMAT_VERSION if isinstance(plan, dict) and plan.get("dims") else FORMAT_VERSION
    sha = digest(header_json, ((k, _ST_CODES[t.dtype], t.shape, _tensor_bytes(t)) for k, t in cpu.items()), version)
    metadata = {
        "kiln.format": FORMAT,
        "kiln.version": str(version),
        "kiln.header": header_json,
        "kiln.sha256": sha,
    }
    if sign_key is not None:
        from kiln.runtime import signing

        metadata.update(signing.sign(sha, sign_key))
    data = save_safetensors(cpu, metadata=metadata)
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


# -- reading -----------------------------------------------------------------------------------------


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, weights on the CPU) from an engine file, verified and validated."""
    contents = read_engine(path)
    return contents.header, contents.weights


def read_engine(path: str | os.PathLike, trusted_keys: Any = None) -> EngineFile:
    """Read, verify and validate an engine file. With `trusted_keys` (see
    kiln.runtime.signing.load_public_keys), refuse it unless one of them signed it."""
    path = Path(path)
    trusted = None
    if trusted_keys is not None:
        from kiln.runtime import signing

        trusted = signing.load_public_keys(trusted_keys)
    data = _read_bytes(path)
    entries, metadata = _parse_container(data, path)
    version = _check_format(metadata, path)
    header_json = metadata["kiln.header"]
    expected = metadata["kiln.sha256"]
    actual = digest(
        header_json, ((e.name, e.code, e.shape, memoryview(data)[e.begin:e.end]) for e in entries), version
    )
    if not hmac.compare_digest(actual, expected):
        raise EngineFileError(
            f"{path} failed its integrity check: the header or weights were changed after it was "
            "written (corruption or tampering). Rebuild the engine."
        )
    signer, trusted_ok = _check_signature(metadata, actual, trusted, path)
    header = _parse_json(header_json, path, "its kiln header")
    dynamic = isinstance(header, dict) and isinstance(header.get("plan"), dict) and "dims" in header["plan"]
    if dynamic != (version == DYNAMIC_FORMAT_VERSION):
        raise EngineFileError(
            f"{path} is format version {version} but its plan {'has' if dynamic else 'has no'} dynamic dims "
            f"(version {DYNAMIC_FORMAT_VERSION} is for dynamic-shape engines only): the file is damaged; rebuild it"
        )
    validate.validate_header(header, {e.name: (e.dtype, e.shape) for e in entries}, where=str(path))
    weights = _tensors(data, entries)
    validate.check_weight_indices(header, weights, str(path))
    return EngineFile(header, weights, signer, trusted_ok)


def _read_bytes(path: Path) -> bytearray:
    if not path.exists():
        raise EngineFileError(f"no engine file at {path}")
    if path.is_dir():
        raise EngineFileError(f"{path} is a directory, not a kiln engine file: pass the .kiln file itself")
    if not path.is_file():
        raise EngineFileError(f"{path} is not a regular file, so not a kiln engine file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = bytearray(size)
            got = f.readinto(data)
    except OSError as exc:
        raise EngineFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if got != size:
        raise EngineFileError(f"{path} changed while it was read ({got} of {size} bytes); try again")
    return data


def _parse_json(raw: bytes | bytearray | str, path: Path, what: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise ValueError("a key appears twice")
        return out

    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        return json.loads(text, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:200]
        raise EngineFileError(f"{path} is damaged or not a kiln engine file: {what} is not valid JSON ({reason})") \
            from None


def _parse_container(data: bytearray, path: Path) -> tuple[list[_Entry], dict[str, str]]:
    """The safetensors index (every entry checked against the file) and its metadata."""
    if len(data) == 0:
        raise EngineFileError(f"{path} is empty (0 bytes): not a kiln engine file")
    if len(data) < 9:
        raise EngineFileError(f"{path} is truncated or not a kiln engine file: it has only {len(data)} bytes")
    if data[8:9] != b"{":
        looks = describe_foreign(bytes(data[:4096]), path)
        raise EngineFileError(f"{path} is {looks}" if looks else
                              f"{path} is not a kiln engine file (it is not a safetensors file: unrecognized "
                              f"content, {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise EngineFileError(f"{path} is not a kiln engine file (its header length field is not plausible)")
    if 8 + n > len(data):
        raise EngineFileError(
            f"{path} is truncated: its header needs {8 + n} bytes, the file has {len(data)}. "
            "Copy the file again or rebuild it."
        )
    index = _parse_json(memoryview(data)[8 : 8 + n], path, "its safetensors header")
    if not isinstance(index, dict):
        raise EngineFileError(f"{path} is not a kiln engine file (its safetensors header is not an object)")
    metadata = index.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise EngineFileError(f"{path} is a safetensors file but not a kiln engine (no kiln metadata)")
    start = 8 + n
    entries = [_entry(name, spec, start, len(data), path) for name, spec in index.items()]
    covered = start
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != covered:
            raise EngineFileError(f"{path} is damaged: tensor {e.name!r} does not start where the previous one "
                                  "ends (overlapping or gapped tensor data); rebuild it")
        covered = e.end
    if covered != len(data):
        raise EngineFileError(
            f"{path} is truncated or padded: {len(data)} bytes, its index accounts for {covered}. "
            "Copy the file again or rebuild it."
        )
    return entries, metadata


def _entry(name: str, spec: Any, start: int, size: int, path: Path) -> _Entry:
    where = f"{path} is damaged: tensor {name[:80]!r}"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise EngineFileError(f"{where} has a malformed index entry; rebuild it")
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if len(name) > validate.MAX_NAME_CHARS:
        raise EngineFileError(f"{where} has a name longer than {validate.MAX_NAME_CHARS} characters")
    if code not in ST_DTYPES:
        raise EngineFileError(f"{where} has unknown dtype {str(code)[:20]!r}; rebuild it")
    if (not isinstance(shape, list) or len(shape) > validate.MAX_RANK
            or not all(type(d) is int and 0 <= d <= validate.MAX_DIM for d in shape)):
        raise EngineFileError(f"{where} has a malformed shape; rebuild it")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise EngineFileError(f"{where} has malformed data offsets; rebuild it")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * ST_DTYPES[code].itemsize
    if nbytes > validate.MAX_TENSOR_BYTES:
        raise EngineFileError(f"{where} claims {nbytes} bytes, more than the limit {validate.MAX_TENSOR_BYTES}")
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != nbytes or start + end > size:
        raise EngineFileError(f"{where} has data offsets that do not match its dtype and shape, or reach past "
                              "the end of the file (truncated or edited); rebuild it")
    return _Entry(name, code, tuple(shape), start + begin, start + end)


def _check_format(metadata: dict[str, str], path: Path) -> int:
    """The file's format version (one this kiln reads), after checking the metadata's keys."""
    if metadata.get("kiln.format") != FORMAT:
        raise EngineFileError(f"{path} is a safetensors file but not a kiln engine (no kiln.format in its metadata)")
    version = metadata.get("kiln.version")
    if version not in tuple(str(v) for v in READ_VERSIONS):
        older = version is not None and version.isdigit() and int(version) < FORMAT_VERSION
        why = (" It was written by an older kiln: format 2's integrity check also covers every tensor's "
               "dtype and shape." if older else "")
        raise EngineFileError(
            f"{path} has engine format version {str(version)[:20]}; this kiln reads version "
            f"{FORMAT_VERSION} ({DYNAMIC_FORMAT_VERSION} for dynamic-shape engines).{why} "
            "Rebuild the engine with this kiln (kiln build ...), or use the kiln that wrote it."
        )
    for key in ("kiln.header", "kiln.sha256"):
        if key not in metadata:
            raise EngineFileError(f"{path} is damaged: its metadata has no {key}; rebuild it")
    return int(version)


def _check_signature(
    metadata: dict[str, str], sha: str, trusted: list[Any] | None, path: Path
) -> tuple[str | None, bool]:
    signature, signer = metadata.get("kiln.signature"), metadata.get("kiln.signer")
    if signature is None and signer is None:
        if trusted is not None:
            raise EngineFileError(
                f"{path} is not signed, and only engines signed by a trusted key may load here. "
                "Sign it when building (kiln build ... --sign-key KEY), or load it without trusted keys."
            )
        return None, False
    if signature is None or signer is None:
        raise EngineFileError(f"{path} has a damaged signature (kiln.signature and kiln.signer go together)")
    try:
        raw_public = base64.b64decode(signer, validate=True)
        raw_signature = base64.b64decode(signature, validate=True)
    except ValueError:
        raise EngineFileError(f"{path} has a damaged signature (not base64)") from None
    if len(raw_public) != 32 or len(raw_signature) != 64:
        raise EngineFileError(f"{path} has a damaged signature (not an Ed25519 key and signature)")
    from kiln.runtime.signing import fingerprint_raw

    fingerprint = fingerprint_raw(raw_public)
    if trusted is None:
        return fingerprint, False
    from kiln.runtime import signing

    signing.verify(sha, raw_signature, raw_public, trusted, str(path))
    return fingerprint, True


def _tensors(data: bytearray, entries: list[_Entry]) -> dict[str, torch.Tensor]:
    """CPU tensors holding exactly the bytes the digest covered."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        if e.end == e.begin:
            t = torch.empty(e.shape, dtype=e.dtype)
        else:
            raw = torch.frombuffer(data, dtype=torch.uint8, count=e.end - e.begin, offset=e.begin).clone()
            t = raw.view(e.dtype).reshape(e.shape)
        if e.dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:
            raise EngineFileError(f"weight {e.name!r} is a bool tensor holding bytes other than 0 and 1")
        out[e.name] = t
    return out


# -- what a file that is not an engine looks like ------------------------------------------------------


def describe_foreign(head: bytes, path: Path | None = None) -> str | None:
    """What a file that is not a kiln engine looks like, from its first bytes (None: unknown)."""
    suffix = path.suffix.lower() if path is not None else ""
    build = "build an engine from the PyTorch model with `kiln build MODEL`"
    if head.startswith(b"PK\x03\x04"):
        names = _zip_names(head, path)
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return f"a TorchScript archive (torch.jit.save), not a kiln engine: {build}"
        if any(n.endswith("data.pkl") for n in names) or suffix in (".pt", ".pth", ".bin", ".ckpt"):
            return ("a PyTorch checkpoint (torch.save), not a kiln engine: a checkpoint holds weights, not a "
                    "model; load the model in Python and build it with kiln.build(model, inputs) or `kiln build MODEL`")
        if any(n.endswith(".json") and "archive_format" in n for n in names) or suffix == ".pt2":
            return f"a torch.export archive (.pt2), not a kiln engine: {build}"
        return "a zip archive, not a kiln engine"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        if head[2:4] == b"\x8a\x0a":
            return (f"a PyTorch checkpoint in the legacy (pickle) torch.save format, not a kiln engine: {build}. "
                    "kiln never unpickles files")
        return "a pickle, not a kiln engine (kiln never unpickles files: engines are safetensors + JSON)"
    if suffix == ".onnx" or (
        len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)
    ):
        return ("an ONNX model, not a kiln engine: kiln builds engines from PyTorch models "
                "(`kiln build MODEL`); `kiln trt-check FILE.onnx` checks ONNX files")
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy array (.npy), not a kiln engine"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (e.g. a Keras model), not a kiln engine"
    if head.startswith(b"GGUF"):
        return "a GGUF model file, not a kiln engine"
    if head[:1] in (b"{", b"[") or suffix == ".json":
        return "a JSON or text file, not a kiln engine"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file, not a kiln engine" if suffix != ".py" else \
            "Python source, not a kiln engine: build one with `kiln build path/to/file.py:factory`"
    return None


def _zip_names(head: bytes, path: Path | None) -> list[str]:
    """Member names of a zip archive (read from the whole file where there is one)."""
    try:
        source = path if path is not None and path.is_file() else io.BytesIO(head)
        with zipfile.ZipFile(source) as z:
            return z.namelist()[:1000]
    except Exception:  # a damaged or partial archive: judge by the suffix alone
        return []
