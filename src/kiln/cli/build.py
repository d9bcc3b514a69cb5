"""`kiln build MODEL`: capture, passes, select, plan, write one engine file."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from kiln.cli.app import command
from kiln.cli.common import (
    BACKENDS,
    BUILD_PRECISIONS,
    HELD_BACK_BATCHES,
    PRECISION_HELP,
    QUANT_PRECISIONS,
    STREAMS,
    CalibrationData,
    calib_batches_option,
    calib_method_option,
    calib_option,
    calibration_data,
    choice,
    console,
    device_option,
    dynamic_batch_option,
    dynamic_shapes_for,
    example_batch,
    fail,
    input_shape_option,
    parse_accuracy,
    precision_option,
    resolve_model,
    seq_option,
    usage,
)

QUANT_HELP = (" int8, fp8 and mixed (int8, with the layers that most hurt --accuracy kept in high precision) "
              "need --calib.")


class _StageDisplay:
    """Shows each build stage with a spinner while it runs and its time when done."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with console.status(f"[bold]{name}[/]…"):
            yield
        console.print(f"  [green]✓[/] {name:<16} {time.perf_counter() - t0:7.2f} s")


@command("build")
def build(
    model: str = typer.Argument(
        ..., metavar="MODEL", help="Zoo name (kiln zoo lists them) or path/to/file.py:factory.", show_default=False
    ),
    output: Path = typer.Option(
        None, "-o", "--output", metavar="ENGINE", show_default="MODEL.kiln", help="Engine file to write."
    ),
    precision: str = precision_option("fp16", BUILD_PRECISIONS, PRECISION_HELP + QUANT_HELP),
    device: str = device_option(),
    batch: Any = dynamic_batch_option(),
    seq: Any = seq_option(),
    input_shape: Any = input_shape_option(),
    backend: str = typer.Option(
        "kiln", "--backend", parser=choice(*BACKENDS), metavar="|".join(BACKENDS),
        help="kiln, or tensorrt: regions TensorRT converts run as TensorRT engines inside the plan.",
    ),
    require_full: bool = typer.Option(False, "--require-full", help="With --backend tensorrt: fail unless every op "
                                      "converts."),
    timing_cache: Path = typer.Option(
        None, "--timing-cache", metavar="FILE", show_default="~/.cache/kiln/timing-cache.json",
        help="Kernel timing cache.", dir_okay=False,
    ),
    exact: bool = typer.Option(False, "--exact", help="No approximate kernels (such as tanh-GELU for exact GELU in "
                               "fp16)."),
    streams: str = typer.Option(
        "auto", "--streams", parser=choice(*STREAMS), metavar="|".join(STREAMS),
        help="Side streams for independent branches: auto keeps them where timed faster at build.",
    ),
    sign_key: Path = typer.Option(
        None, "--sign-key", metavar="KEY", exists=True, dir_okay=False,
        help="Private key (from kiln keygen) to sign the engine file with.",
    ),
    calib: str = calib_option("Calibration data for int8, fp8 and mixed"),
    calib_method: str = calib_method_option(),
    calib_batches: int = calib_batches_option(),
    accuracy: str = typer.Option(
        None, "--accuracy", parser=parse_accuracy, metavar="TARGET", show_default="none; mixed: cosine>=0.999",
        help="Keep the layers that most hurt it in high precision until TARGET holds on held-back batches, "
        "e.g. cosine>=0.999 or top1>=0.99.",
    ),
) -> None:
    """Build MODEL into an engine file.

    Capture, passes, kernel selection, plan, write; --backend tensorrt puts TensorRT regions inside;
    --precision int8|fp8|mixed --calib SRC quantizes with calibration data.
    """
    _check_quant_options(precision, calib, calib_method, calib_batches, accuracy)
    _check_quant_build(precision, backend, batch, seq)
    from kiln.builder import BuildConfig, resolve_device, resolve_precision
    from kiln.builder import build as build_engine
    from kiln.errors import KilnError, KilnWarning

    try:
        target_device = resolve_device(device)
    except (KilnError, RuntimeError) as exc:
        raise fail(exc) from None
    from kiln.shapes import Dim

    if isinstance(seq, int) and input_shape is None:
        input_shape = (seq,)  # --seq N: a fixed sequence length, as --input-shape N
    # a range: examples at batch 1, resized to OPT for tracing (a factory's own inputs are kept)
    entry = resolve_model(model, 1 if isinstance(batch, Dim) else batch, input_shape)
    dynamic_shapes = dynamic_shapes_for(entry.example_inputs, batch, seq)
    calib_data = None
    if calib is not None:
        guarded = accuracy is not None or precision == "mixed"  # the builder then holds back the last batches
        try:
            calib_data = calibration_data(calib, entry, example_batch(entry), calib_batches,
                                          HELD_BACK_BATCHES if guarded else 0)
        except (KilnError, ValueError, OSError, ImportError) as exc:
            raise fail(exc) from None
    if device is None and target_device.type == "cpu":
        console.print("[yellow]note:[/] no CUDA GPU here: building and running on the CPU")
    target = output or Path(f"{Path(model.split(':')[-1]).stem}.kiln")
    config = BuildConfig(precision=precision, device=device, model_name=entry.name, backend=backend,
                         require_full=require_full, timing_cache=None if timing_cache is None else str(timing_cache),
                         exact=exact, streams=streams, extra_info={"pretrained": entry.pretrained},
                         **_quant_settings(calib_data, calib_method, accuracy))
    t0 = time.perf_counter()
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KilnWarning)
        try:
            used = resolve_precision(precision, target_device)
        except (KilnError, ValueError) as exc:
            raise fail(exc) from None
        asked = "" if used == precision else f", {precision} asked for"
        ranges = "".join(f", {d.name} {d.min}..{d.max} (opt {d.opt})" for d in (batch, seq) if isinstance(d, Dim))
        shown = "" if isinstance(batch, Dim) else f"batch {example_batch(entry)}, "  # a factory's own, if it has
        console.print(f"building [bold]{escape(entry.name)}[/] ({shown}{used}{asked}, on {target_device}{ranges})")
        if calib_data is not None:
            console.print(f"  calibration: {escape(calib_data.description)}")
        try:
            display = _StageDisplay()
            engine = build_engine(entry.model, entry.example_inputs, config=config, reporter=display,
                                  dynamic_shapes=dynamic_shapes)
            with display.stage("write"):
                _save(engine, target, sign_key)
        except (KilnError, ValueError) as exc:
            raise fail(exc) from None
    for w in caught:
        if issubclass(w.category, KilnWarning) and str(w.message) not in notes:
            notes.append(str(w.message))
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    for line in quantization_lines(engine.build_info.get("quantization")):
        console.print(line)
    size = target.stat().st_size / 2**20
    signed = f", signed with {sign_key.name}" if sign_key else ""
    console.print(
        f"wrote [bold]{escape(str(target))}[/] ({size:.1f} MiB, {len(engine.plan['steps'])} steps, "
        f"{engine.build_info['precision']} on {engine.device}{signed}) in {time.perf_counter() - t0:.1f} s"
    )


def _save(engine: object, target: Path, sign_key: Path | None) -> None:
    if sign_key is None:
        engine.save(target)  # type: ignore[attr-defined]
    else:
        engine.save(target, sign_key=str(sign_key))  # type: ignore[attr-defined]


def _check_quant_options(precision: str, calib: str | None, method: str | None, batches: int | None,
                         accuracy: str | None) -> None:
    """Quantization options fit the precision: checked before any work (exit 2)."""
    if precision in QUANT_PRECISIONS and calib is None:
        raise usage(f"--precision {precision} needs calibration data: pass --calib SRC, e.g. --calib photos "
                    "(SRC: photos, a directory of images, a .safetensors or .pt file of input tensors, or a .txt "
                    "file of sentences)")
    given = [name for name, value in (("--calib", calib), ("--calib-method", method), ("--calib-batches", batches),
                                      ("--accuracy", accuracy)) if value is not None]
    if precision not in QUANT_PRECISIONS and given:
        verb = "is" if len(given) == 1 else "are"
        raise usage(f"{', '.join(given)} {verb} for quantized engines: add --precision {'|'.join(QUANT_PRECISIONS)} "
                    f"(got --precision {precision})")


def _check_quant_build(precision: str, backend: str, batch: Any, seq: Any) -> None:
    """What the builder cannot quantize yet, said before calibration data is read (exit 2)."""
    from kiln.shapes import Dim

    if precision not in QUANT_PRECISIONS:
        return
    if isinstance(batch, Dim) or isinstance(seq, Dim):
        raise usage(f"--precision {precision} is for static shapes for now: give --batch N (and --seq N or "
                    "--input-shape), not a range")


def _quant_settings(data: CalibrationData | None, method: str | None, accuracy: str | None) -> dict[str, Any]:
    """The BuildConfig fields of a quantized build (none for fp32/fp16/bf16)."""
    if data is None:
        return {}
    settings: dict[str, Any] = {"calibration": data.batches, "calibration_method": method, "accuracy": accuracy}
    if data.held_back:
        settings["held_back"] = data.held_back
    return settings


def quantization_lines(info: dict[str, Any] | None) -> list[str]:
    """What build_info["quantization"] (kiln.quant.build) says: the layers quantized and how, the
    accuracy check, the layers kept in high precision. A target not met is the builder's warning."""
    if not info:
        return []
    lines = [f"quantized {info['quantized_layers']} of {info['layers']} layers to {escape(info['format'])} "
             f"({escape(info['calibrator'])} calibration, {info['calibration_batches']} batches)"]
    if info.get("execution"):
        lines[0] += f"; {escape(info['execution'])}"
    check = info.get("accuracy")
    if check and check.get("met"):
        lines.append(escape(check["summary"]))
    kept = info.get("kept") or []
    if kept:
        names = ", ".join(escape(str(k.get("module") or k.get("node"))) for k in kept)
        lines.append(f"kept in high precision ({len(kept)}): {names}")
    return lines
