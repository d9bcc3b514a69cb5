"""Exceptions raised while building, turned into kiln errors that name the problem and where.

torch.export and fake-tensor shape propagation raise their own exception types, with long
messages written for PyTorch developers. `explain` classifies the known ones (data-dependent
guards and outputs, unsupported Python, user errors) into a CaptureError that summarizes the
original message, names the model's source line and says what to do; anything else becomes a
KilnError that names the build stage. The original exception stays chained (`__cause__`).
"""

from __future__ import annotations

import inspect
import logging
import re
import traceback
from collections.abc import Callable
from typing import Any

import torch

from kiln.capture.data_dependent import DATA_DEPENDENT_OPS, GENERIC_ADVICE
from kiln.errors import CaptureError, KilnError

CONTROL_FLOW_ADVICE = (
    "an engine is one static graph: replace Python `if`/loops on tensor values with torch.where "
    "(or torch.cond), keep .item() results as tensors, and give every tensor a fixed size (pad to "
    "a maximum); a size or flag that depends on weights only can be worked out once in __init__ "
    "(a Python number); torch._check(...) can bound a size for torch.export, but the engine still "
    "needs one shape per input"
)
UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output, which is not a known type")
_CALL = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n[ \t]*(.*)')


def _exception_types() -> dict[str, type]:
    """The torch exception types kiln knows, by name (missing ones skipped: torch moves them)."""
    found: dict[str, type] = {}
    where = {
        "GuardOnDataDependentSymNode": "torch.fx.experimental.symbolic_shapes",
        "ConstraintViolationError": "torch.fx.experimental.symbolic_shapes",
        "DataDependentOutputException": "torch._subclasses.fake_tensor",
        "DynamicOutputShapeException": "torch._subclasses.fake_tensor",
        "UnsupportedOperatorException": "torch._subclasses.fake_tensor",
        "UserError": "torch._dynamo.exc",
        "Unsupported": "torch._dynamo.exc",
        "TorchRuntimeError": "torch._dynamo.exc",
    }
    import importlib

    for name, module in where.items():
        try:
            found[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return found


def explain(exc: BaseException, model: Any, stage: str) -> KilnError:
    """A kiln error for `exc`, raised while `stage` ran on `model` (chain it: raise ... from exc)."""
    if isinstance(exc, KilnError):
        return exc
    name = type(model).__name__
    known = _exception_types()
    where = user_frame(exc, model)
    at = f"\n  at {where}" if where else ""
    summary = summarize(exc)

    def isa(*names: str) -> bool:
        return any(isinstance(exc, known[n]) for n in names if n in known)

    if isa("DataDependentOutputException", "DynamicOutputShapeException"):
        op = getattr(exc, "func", None)
        what, tip = DATA_DEPENDENT_OPS.get(op, (str(op), GENERIC_ADVICE))
        return _capture_error(
            f"torch.export could not capture {name}: {what} ({op}) gives an output whose shape or value "
            f"depends on the values of the inputs; a kiln engine has static shapes{at}\nWhat to do: {tip}.",
            op, where,
        )
    if isa("GuardOnDataDependentSymNode"):
        return _capture_error(
            f"torch.export could not capture {name}: the model branches on, or sizes a tensor by, a value "
            f"read from tensor data ({summary}){at}\nWhat to do: {CONTROL_FLOW_ADVICE}.", None, where,
        )
    if isa("UnsupportedOperatorException"):
        op = getattr(exc, "func", None)
        return _capture_error(
            f"torch.export could not capture {name}: the op {op} has no shape function (fake/meta kernel), so it "
            f"cannot be traced{at}\nWhat to do: register one with torch.library.register_fake, or avoid the op.",
            op, where,
        )
    unknown = UNKNOWN_OUTPUT.search(str(exc))
    if unknown:
        return _capture_error(
            f"torch.export could not capture {name}: it returns a {unknown.group(1)} object, which is not a "
            f"tensor or a container kiln knows{at}\nWhat to do: return tensors (in tuples, lists, dicts, "
            "namedtuples or transformers ModelOutputs); a Hugging Face model's cache goes with use_cache=False.",
            None, where,
        )
    if isa("UserError", "Unsupported", "ConstraintViolationError", "TorchRuntimeError") or stage == "capture":
        kind = getattr(getattr(exc, "error_type", None), "name", None)
        reason = f"{kind.lower().replace('_', ' ')}: {summary}" if kind else f"{type(exc).__name__}: {summary}"
        return _capture_error(
            f"torch.export could not capture {name}: {reason}{at}\nkiln needs a model that torch.export can "
            "trace with the example inputs (no data-dependent Python control flow); see the torch.export "
            "docs on graph breaks, or export a simpler wrapper around the model.", None, where,
        )
    return KilnError(
        f"kiln failed in its {stage} stage while building {name}: {type(exc).__name__}: {summary}{at}\n"
        "The model was captured, so this is a kiln bug or a construct kiln does not handle yet; please "
        "report it with the model (the original traceback is chained to this error)."
    )


def _capture_error(message: str, op: Any, where: str | None) -> CaptureError:
    error = CaptureError(message)
    error.op = None if op is None else str(op)  # type: ignore[attr-defined]
    error.source = where  # type: ignore[attr-defined]
    return error


def summarize(exc: BaseException, limit: int = 240) -> str:
    """The first meaningful line of an exception's message, shortened."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(exc).__name__


def user_frame(exc: BaseException, model: Any) -> str | None:
    """'file:line in function: code' of the model's source that raised `exc`, if it can be found:
    torch.export's "The following call raised this error" / "Original traceback" blocks, else the
    innermost traceback frame in a file that defines one of the model's modules."""
    text = str(exc)
    for marker in ("The following call raised this error:", "Original traceback:"):
        if marker in text:
            calls = _CALL.findall(text.split(marker, 1)[1])
            if calls:
                return _format(*calls[-1])
    files = _model_files(model)
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for link in chain:
        frames = [f for f in traceback.extract_tb(link.__traceback__) if f.filename in files]
        if frames:
            f = frames[-1]
            return _format(f.filename, str(f.lineno), f.name, f.line or "")
    return None


def specialization_sites(run: Callable[[], Any], model: Any) -> list[str]:
    """Where the model's code fixed a dynamic dim to its traced size ('file:line in function:
    code', each once): `run` repeats the failing torch.export call with torch's specialization
    log on (a stack per specialization, which non-strict export leaves out of its message)."""
    from torch.fx.experimental import _config as shapes_config

    stacks: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "SPECIALIZATION" and record.stack_info:
                stacks.append(record.stack_info)

    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    saved = log.handlers, log.level, log.propagate
    log.handlers, log.propagate = [_Collect(logging.DEBUG)], False  # collected, not printed
    log.setLevel(logging.DEBUG)
    try:
        with shapes_config.patch(print_specializations=True):
            run()
    except Exception:  # noqa: BLE001 - the failure is expected; only its log is wanted
        pass
    finally:
        log.handlers, level, log.propagate = saved
        log.setLevel(level)
    files, sites = _model_files(model), []
    for stack in stacks:
        calls = [c for c in _CALL.findall(stack) if c[0] in files]
        if calls and _format(*calls[-1]) not in sites:
            sites.append(_format(*calls[-1]))
    return sites


def _format(file: str, line: str, func: str, code: str) -> str:
    return f"{file}:{line} in {func}: {code.strip()}"


def _model_files(model: Any) -> set[str]:
    files: set[str] = set()
    modules = model.modules() if isinstance(model, torch.nn.Module) else []
    for module in modules:
        for cls in type(module).__mro__:
            if cls.__module__.startswith("torch.") or cls is object:
                continue
            try:
                files.add(inspect.getsourcefile(cls) or "")
            except (TypeError, OSError):
                continue
    files.discard("")
    return files
