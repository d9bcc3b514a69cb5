"""`kiln debug precision MODEL|ENGINE`: which layer makes a low-precision engine leave fp32.

Drives kiln.debug.precision.debug_precision: every layer of the model, captured at fp16/bf16 or
with simulated int8/fp8 (Q/DQ), against the fp32 capture, named by module path and source line;
the first layer beyond the tolerance, the likeliest culprit (the largest error of its own), and
with --bisect the shortest prefix of layers whose lowering breaks the output.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from kiln.cli.app import command
from kiln.cli.common import (
    DEBUG_PRECISIONS,
    NOT_ENGINES,
    Column,
    calib_batches_option,
    calib_method_option,
    calib_option,
    calibration_data,
    choice,
    console,
    example_batch,
    fail,
    fitted_table,
    input_shape_option,
    one_batch,
    resolve_model,
    usage,
)
from kiln.cli.describe import short_source

DEBUGGERS = ("precision",)
GRANULARITIES = {"layer": "module", "op": "op"}  # the CLI's word → debug_precision's
QUANTIZED = ("int8", "fp8")
MAX_ROWS = 60  # a longer table shows its first and last layers and the marked ones (--json has all)
# debug_precision's DEFAULT_TOL, as the help shows it (tests/test_cli_quant.py checks they agree)
TOLERANCE_HELP = "fp16 0.01, bf16 0.04, int8/fp8 0.1"


@dataclass
class _Subject:
    """What is debugged: a model (zoo entry), and the engine file it came from, if one was given."""

    entry: Any
    engine: Path | None = None
    precision: str | None = None  # the engine's, as debug_precision names it
    method: str | None = None  # the engine's calibrator


@command("debug")
def debug(
    what: str = typer.Argument(
        ..., metavar="precision", parser=choice(*DEBUGGERS), show_default=False,
        help="What to debug: precision (each layer's error against fp32).",
    ),
    target: str = typer.Argument(
        ..., metavar="MODEL|ENGINE", show_default=False,
        help="Zoo name, path/to/file.py:factory, or an engine file (the model it records is rebuilt).",
    ),
    precision: str = typer.Option(
        None, "--precision", parser=choice(*DEBUG_PRECISIONS), metavar="|".join(DEBUG_PRECISIONS),
        show_default="an engine's; else fp16", help="Precision compared with fp32 (int8/fp8: simulated Q/DQ).",
    ),
    calib: str = calib_option("Real inputs, the last batch compared (int8/fp8: the others calibrate)"),
    calib_method: str = calib_method_option(),
    calib_batches: int = calib_batches_option(),
    tolerance: float = typer.Option(
        None, "--tolerance", metavar="X", min=0.0, show_default=TOLERANCE_HELP,
        help="Relative error beyond which a layer counts as diverged.",
    ),
    granularity: str = typer.Option(
        "layer", "--granularity", parser=choice(*GRANULARITIES), metavar="|".join(GRANULARITIES),
        help="One row per leaf module (layer) or per op.",
    ),
    bisect: bool = typer.Option(False, "--bisect", help="Also find the shortest prefix of layers whose lowering "
                                "alone breaks the output."),
    json_path: Path = typer.Option(None, "--json", metavar="FILE", dir_okay=False,
                                   help="Also write the whole report (every layer) as JSON."),
    batch: int = typer.Option(None, "--batch", parser=one_batch, metavar="N", show_default="an engine's; else 1",
                              help="Batch size of the compared inputs."),
    input_shape: Any = input_shape_option(),
) -> None:
    """Find where a low-precision model diverges from fp32.

    kiln debug precision MODEL: per layer (module path, source line), the accumulated error and the
    layer's own (local) error; marks the first layer beyond tolerance and the likeliest culprit.
    """
    from kiln.errors import KilnError

    if calib_method is not None and precision is not None and precision not in QUANTIZED:
        raise usage(f"--calib-method is for --precision int8|fp8 (got --precision {precision})")
    subject = _subject(target, batch, input_shape)
    precision = precision or subject.precision or "fp16"
    method = calib_method or subject.method or ("max" if precision == "fp8" else "entropy")
    entry = subject.entry
    inputs, calibration, data_note = _data(entry, calib, calib_batches, precision)
    from kiln.debug.precision import debug_precision

    try:
        with console.status(f"[bold]comparing {escape(entry.name)} at {precision} with fp32[/]…"):
            report = debug_precision(entry.model, inputs, precision=precision, calibration=calibration,
                                     method=method, tol=tolerance, bisect=bisect,
                                     granularity=GRANULARITIES[granularity])
    except (KilnError, ValueError) as exc:
        raise fail(exc) from None
    if data_note:
        report.notes.insert(0, data_note)
    _nan_diverges(report)
    console.print(f"[bold]{escape(entry.name)}[/]: {escape(report.description)} vs fp32, tolerance "
                  f"{report.tolerance:g} (relative error)")
    console.print(precision_table(report, by_op=granularity == "op"))
    for line in verdict_lines(report, bisect):
        console.print(line)
    if json_path is not None:
        _write_json(json_path, report, entry.name, subject.engine)
        console.print(f"wrote {escape(str(json_path))}")


# --- what is debugged, and on which data -------------------------------------------------------


def _subject(target: str, batch: int | None, input_shape: Any) -> _Subject:
    path = Path(target)
    if ".py" in target or not path.is_file():
        return _Subject(resolve_model(target, batch or 1, input_shape))
    return _engine_subject(path, batch, input_shape)


def _engine_subject(path: Path, batch: int | None, input_shape: Any) -> _Subject:
    """The model an engine file was built from, rebuilt from the name its build info records."""
    import kiln.ops.quant  # noqa: F401  (registers the Q/DQ ops a quantized engine's plan names, for validation)
    from kiln import zoo
    from kiln.errors import KilnError
    from kiln.runtime.engine_file import read_engine

    if path.suffix.lower() in NOT_ENGINES:
        raise fail(f"{path} is {NOT_ENGINES[path.suffix.lower()]}")
    try:
        header = read_engine(path).header
    except (KilnError, ValueError, OSError) as exc:
        raise fail(exc) from None
    info = header.get("build") or {}
    name = info.get("model")
    shape = (header.get("plan", {}).get("inputs") or [{}])[0].get("shape") or []
    static = bool(shape) and all(isinstance(d, int) for d in shape)
    batch = batch or (shape[0] if static else 1)
    input_shape = input_shape or (tuple(shape[1:]) if static else None)
    try:
        entry = zoo.resolve(str(name), batch=batch, input_shape=input_shape)
    except zoo.ZooError as exc:
        if "returned its own example inputs" not in str(exc):
            raise _no_model(path, name, exc) from None
        entry = zoo.resolve(str(name))  # a factory's own example inputs, as kiln build used them
    except (KilnError, ValueError, TypeError, OSError, ImportError, SyntaxError) as exc:
        raise _no_model(path, name, exc) from None
    console.print(f"note: debugging {escape(entry.name)}, the model {escape(str(path))} records, rebuilt here (zoo "
                  "models with seed 0, as kiln build makes them); the engine file itself is not run")
    requested = info.get("precision_requested") or info.get("precision")
    precision = {"mixed": "int8"}.get(requested, requested)
    quant = info.get("quantization") or {}
    kept = [k.get("module") or k.get("node") for k in quant.get("kept") or [] if isinstance(k, dict)]
    if kept:
        console.print(f"note: the engine keeps {escape(', '.join(map(str, kept)))} in high precision; the debugger "
                      "quantizes every layer it can")
    return _Subject(entry, path, precision if precision in DEBUG_PRECISIONS else None, quant.get("calibrator"))


def _no_model(path: Path, name: Any, exc: BaseException) -> typer.Exit:
    return fail(f"{path} records its model as {name!r}, which kiln cannot rebuild here ({exc}); give the model "
                "instead: kiln debug precision MODEL (a zoo name or path/to/file.py:factory)")


def _data(entry: Any, calib: str | None, limit: int | None, precision: str) -> tuple[Any, Any, str | None]:
    """(the compared batch, calibration batches or None, a note): with --calib, its last batch is
    compared (for photos, a batch of other photos than the calibration ones) and the others calibrate."""
    from kiln.errors import KilnError

    batch = example_batch(entry)
    if calib is None:
        note = None
        if precision in QUANTIZED:
            note = "no --calib: calibrated on the compared inputs themselves (random); pass --calib for real data"
        return entry.example_inputs, None, note
    try:
        data = calibration_data(calib, entry, batch, limit, held_back=1)
    except (KilnError, ValueError, OSError, ImportError) as exc:
        raise fail(exc) from None
    batches = data.batches
    if len(batches) == 1:
        return batches[0], batches, f"data: {data.description}; the one batch both calibrates and is compared"
    return batches[-1], batches[:-1], f"data: {data.description}; the last batch is compared"


def _nan_diverges(report: Any) -> None:
    """A NaN error (inf - inf after an fp16 overflow) is beyond any tolerance; debug_precision's
    `error > tolerance` says otherwise, so the rows and the first divergent layer are corrected here."""
    for row in report.rows:
        if row.rel_error is not None and math.isnan(row.rel_error):
            row.diverged = True
    report.first_divergent = next((r for r in report.rows if r.diverged), None)


def _beyond(error: float, tolerance: float) -> bool:
    return not error <= tolerance  # NaN is beyond


# --- rendering -----------------------------------------------------------------------------------


def _num(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


def _mark(row: Any, report: Any) -> str:
    marks = [m for m, r in (("first", report.first_divergent), ("culprit", _culprit(report))) if r is row]
    return "+".join(marks) or (">tol" if row.diverged else "")


def _culprit(report: Any) -> Any:
    """The layer with the largest error of its own, when some layer is beyond tolerance."""
    worst = report.worst_local
    return worst if report.first_divergent is not None and worst is not None and worst.local_rel_error else None


def _shown(report: Any, max_rows: int | None) -> list[Any]:
    rows = report.rows
    if max_rows is None or len(rows) <= max_rows:
        return rows
    keep = set(range(max_rows // 2)) | set(range(len(rows) - max_rows // 2, len(rows)))
    keep |= {r.index for r in (report.first_divergent, _culprit(report)) if r is not None}
    return [r for r in rows if r.index in keep]


def precision_table(report: Any, width: int | None = None, max_rows: int | None = MAX_ROWS, by_op: bool = False
                    ) -> Any:
    """One row per layer (or op): where (module path, source line), its accumulated and local error,
    and the marks (first beyond tolerance, likeliest culprit); rows left out of a long table are counted."""
    columns = [Column("#", 3, "right", no_wrap=True), Column("", 9, no_wrap=True),
               Column("module path", 9, flexible=True), Column("source", 9, no_wrap=True),
               Column("accum.", 9, "right", no_wrap=True), Column("local", 9, "right", no_wrap=True),
               Column("op", 9 if by_op else 4, flexible=True),
               Column("cosine", 2, "right"), Column("shape", 1)]
    rows, styles = [], []
    previous = -1
    for r in _shown(report, max_rows):
        if r.index != previous + 1:
            rows.append(["…", "", f"({r.index - previous - 1} layers)", "", "", "", "", "", ""])
            styles.append("dim")
        previous = r.index
        fused = r.candidate is None
        rows.append([str(r.index), _mark(r, report), escape(r.where), escape(short_source(r.source)),
                     "fused" if fused else _num(r.rel_error), "-" if fused else _num(r.local_rel_error),
                     escape(r.op.removeprefix("aten.")), _num(r.cosine, ".6f"), "×".join(map(str, r.shape))])
        styles.append(_style(r, report))
    if previous != len(report.rows) - 1:
        rows.append(["…", "", f"({len(report.rows) - previous - 1} layers)", "", "", "", "", "", ""])
        styles.append("dim")
    caption = ("accum.: relative error of the layer's output, every layer lowered; local: its own, fed fp32 "
               "inputs; first: first beyond tolerance; culprit: largest local error")
    return fitted_table(columns, rows, width=width, styles=styles, caption=caption,
                        title=f"{len(report.rows)} layers, {report.precision} vs fp32")


def _style(row: Any, report: Any) -> str | None:
    if row is report.first_divergent:
        return "bold red"
    if row is _culprit(report):
        return "yellow"
    return "red" if row.diverged else None


def verdict_lines(report: Any, bisect: bool = False) -> list[str]:
    """The output's error, the first divergent layer, the culprit, the bisection, the notes."""
    out = report.output
    lines = [f"output: relative error {out['rel_error']:.3g}, cosine {out['cosine']:.6f} "
             f"({'beyond' if _beyond(out['rel_error'], report.tolerance) else 'within'} tolerance "
             f"{report.tolerance:g})"]
    first = report.first_divergent
    if first is not None:
        lines.append(f"[bold red]first layer beyond tolerance:[/] {_where(first)}, accumulated error "
                     f"{_num(first.rel_error, '.3g')}")
    else:
        lines.append("[green]no layer beyond tolerance[/]")
    culprit, worst = _culprit(report), report.worst_local
    if culprit is not None:
        lines.append(f"[yellow]likeliest culprit (largest local error, {culprit.local_rel_error:.3g}):[/] "
                     f"{_where(culprit)}")
    elif worst is not None and worst.local_rel_error:
        lines.append(f"largest local error: {worst.local_rel_error:.3g}, {_where(worst)}")
    b = report.bisection
    if b is not None and b.first_failing is not None:
        lines.append(f"[bold]bisection[/] ({len(b.steps)} runs): lowering the first {b.first_failing} of {b.layers} "
                     f"layers breaks the output; it ends at {escape(b.module or b.layer or '?')} "
                     f"({escape(short_source(b.source or ''))})")
    elif b is not None:
        lines.append(f"bisection: lowering all {b.layers} layers never failed the tolerance")
    elif bisect and math.isnan(out["rel_error"]):
        lines.append("bisection: not run, the output's error is NaN (the first layer beyond tolerance is where "
                     "it starts)")
    if report.eager_rel_error is not None:
        lines.append(f"[dim]fp32 capture vs eager: relative error {report.eager_rel_error:.2g}[/]")
    shown = len(_shown(report, MAX_ROWS))
    if shown < len(report.rows):
        lines.append(f"[dim]{len(report.rows) - shown} of {len(report.rows)} layers not shown: --json FILE has "
                     "them all[/]")
    return lines + [f"[dim]note: {escape(n)}[/]" for n in report.notes]


def _where(row: Any) -> str:
    return f"{escape(row.where)} ({escape(row.op)}) at {escape(short_source(row.source))}"


# --- JSON ----------------------------------------------------------------------------------------


def report_json(report: Any, model: str, engine: Path | None = None) -> dict[str, Any]:
    """The report as JSON allows it: infinities and NaN (an fp16 overflow) become strings."""
    data = {"model": model, "engine": None if engine is None else str(engine), **report.to_dict()}
    return _finite(data)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _write_json(path: Path, report: Any, model: str, engine: Path | None) -> None:
    try:
        path.write_text(json.dumps(report_json(report, model, engine), indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise fail(f"cannot write --json {path}: {exc}") from None
