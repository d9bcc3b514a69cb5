"""`kiln trt-check ONNX|MODEL`: every ONNX node TensorRT's parser rejects, with its reason."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.app import command
from kiln.cli.common import batch_option, console, fail, input_shape_option, resolve_model


@command("trt-check")
def trt_check(
    target: str = typer.Argument(
        ..., metavar="ONNX|MODEL", show_default=False, help="An .onnx file, or a zoo name / path/to/file.py:factory."
    ),
    batch: int = batch_option("Batch size when exporting MODEL."),
    input_shape: Any = input_shape_option("Per-sample input shape when exporting MODEL."),
    opset: int = typer.Option(None, "--opset", metavar="N", min=7, show_default="the exporter's",
                              help="ONNX opset when exporting MODEL."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Export with dim 0 symbolic."),
) -> None:
    """List the ONNX nodes TensorRT's parser rejects, and why.

    Exits 0 when TensorRT takes the whole model, 1 when it rejects nodes, 2 when no TensorRT
    (nor TensorRT-RTX) is installed. Needs no GPU.
    """
    from kiln.errors import KilnError
    from kiln.tensorrt import api

    if not api.available():
        try:
            api.trt()
        except api.TensorRTUnavailable as exc:
            raise fail(exc, 2) from None
    with tempfile.TemporaryDirectory(prefix="kiln-trt-check-") as tmp:
        path = Path(target)
        if not (target.endswith(".onnx") and path.is_file()):
            if target.endswith(".onnx"):
                raise fail(FileNotFoundError(f"no ONNX file at {target}"))
            path = _export_for_check(target, batch, input_shape, opset, dynamic_batch, Path(tmp))
        try:
            with console.status(f"parsing {path.name} with {api.flavor()} {api.version()}…"):
                rejections = _check(path)
        except KilnError as exc:
            raise fail(exc) from None
        total = _node_count(path)
    _print_rejections(rejections, total, target)
    if rejections:
        raise typer.Exit(1)


def _export_for_check(
    model: str, batch: int, input_shape: tuple[int, ...] | None, opset: int | None, dynamic: bool, tmp: Path
) -> Path:
    from kiln.errors import KilnError
    from kiln.onnx.export import export_onnx

    entry = resolve_model(model, batch, input_shape)
    out = tmp / f"{Path(model.split(':')[-1]).stem}.onnx"
    try:
        with console.status(f"exporting [bold]{entry.name}[/] to ONNX…"):
            report = export_onnx(entry.model, entry.example_inputs, out, opset=opset, dynamic_batch=dynamic)
    except (KilnError, ImportError, OSError) as exc:
        raise fail(exc) from None
    console.print(f"exported with the {report.exporter} exporter, opset {report.opset}")
    return out


def _check(path: Path) -> list[Any]:
    from kiln.tensorrt.check import trt_check

    return trt_check(path)


def _node_count(path: Path) -> int | None:
    try:
        import onnx

        return len(onnx.load(str(path), load_external_data=False).graph.node)
    except Exception:  # noqa: BLE001 - the count is only for the summary line
        return None


def _print_rejections(rejections: list[Any], total: int | None, target: str) -> None:
    from kiln.tensorrt import api

    who = f"{api.flavor()} {api.version()}"
    nodes = f" of {total} nodes" if total is not None else ""
    if not rejections:
        console.print(f"[green]{who} parses all{nodes} of {target}[/]")
        return
    n_nodes = sum(1 for r in rejections if r.node_index >= 0)
    others = len(rejections) - n_nodes
    extra = f" and {others} graph input(s)/model error(s)" if others else ""
    table = Table(title=f"{n_nodes}{nodes}{extra} rejected by the {who} ONNX parser")
    table.add_column("#", justify="right")
    table.add_column("node")
    table.add_column("op")
    table.add_column("reason")
    for r in rejections:
        index = str(r.node_index) if r.node_index >= 0 else ""
        table.add_row(index, escape(r.node_name), escape(r.op_type), escape(r.reason))
    console.print(table)
