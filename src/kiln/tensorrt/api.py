"""Which TensorRT is installed, and can it run here?

kiln works with either NVIDIA TensorRT (``import tensorrt``, data-center and desktop GPUs) or
TensorRT for RTX (``pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs``, module
``tensorrt_rtx_bindings``; some builds name it ``tensorrt_rtx``). Both expose the same Python
API for what kiln uses: the network definition, the builder and the ONNX parser. The builder and
the parser run without a GPU; only executing an engine needs one, and TensorRT-RTX only runs on
the compute capabilities it lists in ``ComputeCapability`` (7.5, 8.x, 12.x: not Hopper's 9.0).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

try:
    from kiln.errors import KilnError as _KilnError
except ImportError:  # pragma: no cover - kiln.errors ships with kiln
    _KilnError = Exception  # type: ignore[misc,assignment]

__all__ = [
    "TensorRTUnavailable",
    "available",
    "capture_log",
    "flavor",
    "logger",
    "runtime_usable",
    "trt",
    "version",
]

# (module name, flavor), tried in order; KILN_TENSORRT=tensorrt|tensorrt-rtx picks one.
_CANDIDATES = (
    ("tensorrt", "tensorrt"),
    ("tensorrt_rtx", "tensorrt-rtx"),
    ("tensorrt_rtx_bindings", "tensorrt-rtx"),
)
INSTALL_HINT = (
    "Install one of them: `pip install tensorrt` (NVIDIA TensorRT) or "
    "`pip install 'kiln[tensorrt-rtx]'` (TensorRT for RTX: tensorrt-rtx-cu13-bindings and "
    "tensorrt-rtx-cu13-libs)."
)


class TensorRTUnavailable(_KilnError, RuntimeError):
    """Neither TensorRT nor TensorRT-RTX can be imported, or it cannot run on this device."""


@functools.cache
def _load() -> tuple[ModuleType | None, str | None, str]:
    wanted = os.environ.get("KILN_TENSORRT", "").strip().lower()
    problems: list[str] = []
    for module_name, kind in _CANDIDATES:
        if wanted and wanted != kind:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            problems.append(f"import {module_name}: {exc}")
            continue
        if not hasattr(module, "Builder"):  # e.g. a namespace package left by an old install
            problems.append(f"import {module_name}: no Builder (broken install?)")
            continue
        return module, kind, ""
    if wanted and not problems:
        problems.append(f"KILN_TENSORRT={wanted!r} names neither 'tensorrt' nor 'tensorrt-rtx'")
    return None, None, "; ".join(problems)


def trt() -> ModuleType:
    """The TensorRT Python module (TensorRT or TensorRT-RTX), or TensorRTUnavailable."""
    module, _, problems = _load()
    if module is None:
        raise TensorRTUnavailable(
            f"Neither TensorRT nor TensorRT-RTX is installed in this Python environment ({problems}). {INSTALL_HINT}"
        )
    return module


def available() -> bool:
    """True when a TensorRT builder can be created (no GPU needed)."""
    return _load()[0] is not None


def flavor() -> str | None:
    """'tensorrt', 'tensorrt-rtx', or None when neither is installed."""
    return _load()[1]


def version() -> str | None:
    module = _load()[0]
    return None if module is None else str(getattr(module, "__version__", "unknown"))


def _supported_rtx_capabilities(module: ModuleType) -> list[tuple[int, int]]:
    names = getattr(getattr(module, "ComputeCapability", None), "__members__", {})
    caps = []
    for name in names:
        if name.startswith("SM") and name[2:].isdigit():
            sm = int(name[2:])
            caps.append((sm // 10, sm % 10))
    return sorted(caps)


def runtime_usable(device: Any = None) -> tuple[bool, str]:
    """Can an engine run on ``device`` (a torch device or index; default: current CUDA)?

    Returns ``(ok, reason)``; ``reason`` says what is missing and what to do. Building and
    parsing work without this; only executing an engine needs it.
    """
    if not available():
        return False, _unavailable_reason()
    import torch

    if not torch.cuda.is_available():
        return False, (
            f"{flavor()} {version()} is installed, but no CUDA GPU is visible to PyTorch: "
            "TensorRT engines can be built here but not run. Run on a machine with an NVIDIA GPU."
        )
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    dev = torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    if dev.type != "cuda":
        return False, f"TensorRT engines run on CUDA devices, not {dev}"
    major, minor = torch.cuda.get_device_capability(dev)
    name = torch.cuda.get_device_name(dev)
    if flavor() == "tensorrt-rtx":
        caps = _supported_rtx_capabilities(trt())
        if caps and (major, minor) not in caps:
            listed = ", ".join(f"{a}.{b}" for a, b in caps)
            return False, (
                f"TensorRT-RTX {version()} cannot run on {name} (compute capability "
                f"{major}.{minor}); it supports {listed}. Install NVIDIA TensorRT "
                "(`pip install tensorrt`) for this GPU, or let kiln run these ops itself."
            )
    elif (major, minor) < (7, 5):
        return (
            False,
            f"TensorRT {version()} needs compute capability >= 7.5; {name} is {major}.{minor}",
        )
    try:
        runtime = trt().Runtime(logger())
    except Exception as exc:  # the runtime refuses this driver / device
        return False, f"{flavor()} {version()} runtime cannot start on {name}: {exc}"
    if runtime is None:
        return False, f"{flavor()} {version()} runtime cannot start on {name} (see its log)"
    return True, f"{flavor()} {version()} on {name} (compute capability {major}.{minor})"


def _unavailable_reason() -> str:
    try:
        trt()
    except TensorRTUnavailable as exc:
        return str(exc)
    return ""


# --- logging ---------------------------------------------------------------------------

_RECORDS: list[list[tuple[str, str]]] = []


@functools.cache
def logger() -> Any:
    """The one TensorRT logger kiln uses (TensorRT wants one per process).

    Warnings and errors go to Python's ``logging`` (logger ``kiln.tensorrt``); inside
    ``capture_log()`` every message is also recorded.
    """
    import logging

    module = trt()
    py_log = logging.getLogger("kiln.tensorrt")
    py_log.addHandler(logging.NullHandler())  # silent unless the application configures logging
    severity = module.ILogger.Severity
    names = {
        severity.INTERNAL_ERROR: "internal_error",
        severity.ERROR: "error",
        severity.WARNING: "warning",
        severity.INFO: "info",
        severity.VERBOSE: "verbose",
    }
    levels = {"internal_error": 50, "error": 40, "warning": 30, "info": 10, "verbose": 5}

    class _Logger(module.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            module.ILogger.__init__(self)

        def log(self, sev: Any, msg: str) -> None:
            level = names.get(sev, "info")
            for record in _RECORDS:
                record.append((level, msg))
            if levels[level] >= 30:
                py_log.log(levels[level], msg)

    return _Logger()


@contextlib.contextmanager
def capture_log() -> Iterator[list[tuple[str, str]]]:
    """Record TensorRT log messages as ``(severity, message)`` pairs while the block runs."""
    record: list[tuple[str, str]] = []
    _RECORDS.append(record)
    try:
        yield record
    finally:
        _RECORDS.remove(record)
