"""Helpers for tests that take engine files apart: small engines, header edits written back with
kiln's own writer (digest recomputed), raw container edits, and a guard that no file outside a
test's temporary directory is written while an engine loads or runs."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.runtime import engine_file


def tiny_conv_net() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """conv → bn → relu → strided conv → relu6 → pool → linear: a 5-step engine."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()
    return model, (torch.randn(2, 3, 16, 16),)


def header_and_weights(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    header, weights = engine_file.read(path)
    return copy.deepcopy(header), weights


def rewrite(src: Path, dst: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    """dst = src with its header changed by `change` (in place), written by kiln's own writer:
    the digest is recomputed, so only validation stands between the edit and the runtime."""
    header, weights = header_and_weights(src)
    change(header)
    engine_file.write(dst, header, weights)
    return dst


def raw_rewrite(src: Path, dst: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    """dst = src with its safetensors index (the JSON before the tensor bytes) changed by
    `change`; the digest is *not* recomputed."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    index = json.loads(data[8 : 8 + n])
    change(index)
    raw = json.dumps(index).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return dst


# -- nothing outside the temporary directory is written ---------------------------------------------

_WATCH: dict[str, Any] = {"root": None, "writes": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.truncate", "os.chmod", "os.symlink",
                "os.link", "shutil.rmtree", "shutil.move", "shutil.copyfile"}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    root = _WATCH["root"]
    if root is None:
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        paths = [path] if writes else []
    elif event in _PATH_EVENTS:
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
    else:
        return
    for p in paths:
        if isinstance(p, int):
            continue
        text = os.fsdecode(p)
        full = os.path.realpath(text)
        if not full.startswith(root) and "__pycache__" not in full:
            _WATCH["writes"].append((event, text))


_installed = False


def _install() -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True


def _snapshot(dirs: list[Path]) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                out[str(p)] = (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes()[:4096])
    return out


@contextlib.contextmanager
def writes_confined_to(tmp: Path, canaries: list[Path] | None = None) -> Iterator[list[tuple[str, str]]]:
    """Within the block, record every file write Python sees (audit hooks) outside `tmp`, and
    check that the files under `canaries` (directories outside `tmp`) keep their bytes and times.
    Asserts on exit that nothing outside `tmp` was written."""
    _install()
    before = _snapshot(canaries or [])
    _WATCH["root"], _WATCH["writes"] = os.path.realpath(tmp), []
    try:
        yield _WATCH["writes"]
    finally:
        writes, _WATCH["root"] = list(_WATCH["writes"]), None
    assert not writes, f"files outside {tmp} were written: {writes[:5]}"
    assert _snapshot(canaries or []) == before, "a canary file outside the test's directory changed"


def make_canaries(directory: Path) -> Path:
    """A directory of files a malicious plan would like to overwrite or read."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "victim.py").write_text("print('original')\n")
    (directory / "secret.txt").write_text("the secret\n")
    return directory
