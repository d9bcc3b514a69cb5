"""Post-training quantization as a build stage: what `kiln.build(..., precision="int8" | "fp8" |
"mixed", calibration=...)` runs between the passes and kernel selection.

    batches = calibration_batches(calibration, names, example, precision="int8")  # before capture
    graph, info = quantize_for_build(graph, batches, fmt="int8", method="entropy", accuracy=None)

Without an accuracy target every calibration batch is used to calibrate. With one (always for
"mixed"), the LAST `held_back` batches are held back: they are not calibrated on, and the
accuracy guard compares the quantized graph with the unquantized one on them, keeping the most
sensitive layers in high precision until the target holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kiln.errors import KilnError
from kiln.graph import CapturedGraph
from kiln.ops.quant import quant_format
from kiln.quant.calibrate import calibrate
from kiln.quant.calibrators import CALIBRATORS
from kiln.quant.fuse import fuse_qlinear
from kiln.quant.guard import GuardReport, accuracy_guard, parse_targets
from kiln.quant.insert import insert_qdq
from kiln.quant.sites import find_sites

# precision name → (quantization format, default calibrator, accuracy guard on by default)
QUANT_PRECISIONS: dict[str, tuple[str, str, bool]] = {
    "int8": ("int8", "entropy", False),
    "fp8": ("fp8_e4m3", "max", False),
    "mixed": ("int8", "entropy", True),
}
DEFAULT_TARGET = "cosine>=0.999"
MAX_SENSITIVITIES = 16  # the most sensitive layers listed in build_info


class QuantBuildError(KilnError, ValueError):
    """Quantization settings or calibration data a build cannot use."""


def check_settings(
    precision: str, calibration: Iterable[Any] | None, method: str | None, accuracy: str | None, held_back: int
) -> None:
    """Refuse bad quantization settings before any work (a QuantBuildError saying what to pass)."""
    if precision not in QUANT_PRECISIONS:
        raise QuantBuildError(f"{precision!r} is not a quantized precision; those are {', '.join(QUANT_PRECISIONS)}")
    if calibration is None:
        raise _no_calibration(precision)
    if method is not None and method not in CALIBRATORS:
        raise QuantBuildError(f"unknown calibration_method {method!r}; known: {', '.join(CALIBRATORS)}")
    if accuracy is not None:
        try:
            parse_targets(accuracy)
        except ValueError as exc:
            raise QuantBuildError(f"accuracy: {exc}") from None
    if not isinstance(held_back, int) or isinstance(held_back, bool) or held_back < 0:
        raise QuantBuildError(f"held_back must be a whole number >= 0, got {held_back!r}")
    if guard_target(precision, accuracy) is not None and held_back < 1:
        raise QuantBuildError(
            f"precision {precision!r} with an accuracy target checks on held-back calibration batches: "
            "held_back must be at least 1"
        )


def guard_target(precision: str, accuracy: str | None) -> str | None:
    """The accuracy target the build checks: the one given, "mixed"'s default, or None."""
    if accuracy is not None:
        return accuracy
    return DEFAULT_TARGET if QUANT_PRECISIONS[precision][2] else None


def calibration_batches(
    calibration: Iterable[Any] | None,
    names: Sequence[str],
    example: Sequence[torch.Tensor],
    *,
    precision: str,
    held_back: int = 0,
) -> list[tuple[torch.Tensor, ...]]:
    """The calibration data as a list of input tuples, checked against the example inputs
    (count, shape) before anything is captured. A batch is a tensor, a tuple of tensors in the
    engine's input order (`names`), or a dict of tensors by input name. `held_back` batches
    (the last ones) must be left over beyond at least one to calibrate on."""
    if calibration is None:
        raise _no_calibration(precision)
    if isinstance(calibration, (torch.Tensor, dict)):
        raise QuantBuildError(
            f"calibration= takes an iterable of batches (e.g. a list of tensors), got one {type(calibration).__name__}"
        )
    try:
        raw = list(calibration)
    except TypeError:
        raise QuantBuildError(
            f"calibration= must be an iterable of batches, got {type(calibration).__name__}"
        ) from None
    batches = [_one_batch(b, i, names, example) for i, b in enumerate(raw)]
    if len(batches) <= held_back:
        what = f"the accuracy check holds back the last {held_back}" if held_back else "none were given"
        raise QuantBuildError(
            f"precision {precision!r}: {len(batches)} calibration batch(es), {what}, leaving none to calibrate "
            f"on: pass at least {held_back + 1} batches" + (" (or a smaller held_back)" if held_back else "")
        )
    return batches


def _no_calibration(precision: str) -> QuantBuildError:
    return QuantBuildError(
        f"precision {precision!r} needs calibration data: pass calibration= (CLI: --calib), an iterable of "
        "batches shaped like the example inputs (a tensor, a tuple of tensors or a dict by input name per batch)"
    )


def _one_batch(batch: Any, i: int, names: Sequence[str], example: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, dict):
        unknown = set(batch) - set(names)
        missing = [n for n in names if n not in batch]
        if unknown or missing:
            raise QuantBuildError(
                f"calibration batch {i} names inputs {sorted(map(str, unknown))} and lacks {missing}; "
                f"the engine's inputs are {list(names)}"
            )
        batch = tuple(batch[n] for n in names)
    elif isinstance(batch, torch.Tensor):
        batch = (batch,)
    if not isinstance(batch, (tuple, list)) or not all(isinstance(x, torch.Tensor) for x in batch):
        raise QuantBuildError(
            f"calibration batch {i} is a {type(batch).__name__}; a batch is a tensor, a tuple of tensors "
            f"(inputs {list(names)}) or a dict of them by name"
        )
    if len(batch) != len(example):
        raise QuantBuildError(
            f"calibration batch {i} has {len(batch)} tensor(s); the engine takes {len(example)} ({list(names)})"
        )
    for name, x, want in zip(names, batch, example):
        if tuple(x.shape) != tuple(want.shape):
            raise QuantBuildError(
                f"calibration batch {i}: input {name} has shape {tuple(x.shape)}, the example input "
                f"{tuple(want.shape)}; calibration batches must have the example inputs' shapes"
            )
    return tuple(x.detach() for x in batch)


def quantize_for_build(
    graph: CapturedGraph,
    calibration: Sequence[tuple[torch.Tensor, ...]],
    *,
    fmt: str = "int8",
    method: str = "entropy",
    accuracy: str | None = None,
    held_back: int = 4,
    fuse: bool = True,
) -> tuple[CapturedGraph, dict[str, Any]]:
    """Calibrate `graph` (after the passes) and insert Q/DQ at its quantizable ops; returns the
    quantized graph and a JSON-safe description for `build_info["quantization"]`.

    Without `accuracy`, every batch calibrates. With it, the last `held_back` batches are held
    back (not calibrated on) and the accuracy guard keeps the most sensitive layers in the
    graph's compute precision until the target holds on them (each kept layer is listed with
    its module path and the reason). A target that still fails with every layer kept is
    reported (`accuracy.met` false), not raised: the caller decides.

    With `fuse`, each quantized linear layer's Q/DQ and GEMM then become one kiln::qlinear
    (kiln.quant.fuse: the same numbers, and the op the 8-bit GEMM kernels implement)."""
    qfmt = quant_format(fmt)
    batches = list(calibration)
    held = held_back if accuracy is not None else 0
    calib, samples = (batches[:-held], batches[-held:]) if held else (batches, [])
    layers = find_sites(graph)
    table = calibrate(graph, calib, method, qfmt, sites=layers)
    report: GuardReport | None = None
    if accuracy is None:
        qgraph = insert_qdq(graph, table)
    else:
        on_device = [tuple(x.to(graph.device) for x in s) for s in samples]
        qgraph, report = accuracy_guard(graph, table, on_device, accuracy)
    quantized = {n.meta["quant"]["site"] for n in qgraph.module.graph.nodes if "quant" in n.meta}
    fused = 0
    if fuse:
        qgraph, fused = fuse_qlinear(qgraph)
    info: dict[str, Any] = {
        "format": qfmt.name,
        "calibrator": method,
        "calibration_batches": len(calib),
        "held_back_batches": len(samples),
        "layers": len(layers),
        "quantized_layers": len(quantized),
        "fused_linears": fused,  # quantized layers that are one kiln::qlinear (an 8-bit GEMM where a kernel runs it)
        "weights": "per output channel, symmetric (max)",
        "activations": "per tensor, symmetric (calibrated)",
        "kept": [],
        "accuracy": None,
    }
    if report is not None:
        info["kept"] = [
            {"module": k.module or "<top level>", "node": k.name, "op": k.op, "reason": k.reason} for k in report.kept
        ]
        info["accuracy"] = {
            "targets": report.targets,
            "met": report.met,
            "mode": report.mode,
            "all_quantized": _finite(report.quantized_all),
            "final": _finite(report.final),
            "evaluations": report.evaluations,
            "most_sensitive": [
                {"module": s.module or "<top level>", "node": s.name, "damage": _finite(s.damage)}
                for s in report.sensitivities[:MAX_SENSITIVITIES]
            ],
            "summary": report.summary(),
        }
    return qgraph, info


def _finite(value: Any) -> Any:
    """Metrics as JSON allows them: NaN and infinities become strings."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
