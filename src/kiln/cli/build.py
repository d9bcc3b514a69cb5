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
    STREAMS,
    choice,
    console,
    device_option,
    dynamic_batch_option,
    dynamic_shapes_for,
    fail,
    input_shape_option,
    precision_option,
    resolve_model,
    seq_option,
)


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
    precision: str = precision_option("fp16"),
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
) -> None:
    """Build MODEL into an engine file.

    Capture, passes, kernel selection, plan, write; --backend tensorrt puts TensorRT regions inside.
    """
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
    if device is None and target_device.type == "cpu":
        console.print("[yellow]note:[/] no CUDA GPU here: building and running on the CPU")
    target = output or Path(f"{Path(model.split(':')[-1]).stem}.kiln")
    config = BuildConfig(precision=precision, device=device, model_name=entry.name, backend=backend,
                         require_full=require_full, timing_cache=None if timing_cache is None else str(timing_cache),
                         exact=exact, streams=streams, extra_info={"pretrained": entry.pretrained})
    t0 = time.perf_counter()
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KilnWarning)
        used = resolve_precision(precision, target_device)
        asked = "" if used == precision else f", {precision} asked for"
        ranges = "".join(f", {d.name} {d.min}..{d.max} (opt {d.opt})" for d in (batch, seq) if isinstance(d, Dim))
        shown = "" if isinstance(batch, Dim) else f"batch {batch}, "
        console.print(f"building [bold]{escape(entry.name)}[/] ({shown}{used}{asked}, on {target_device}{ranges})")
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
