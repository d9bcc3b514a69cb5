"""`kiln export-onnx MODEL -o FILE`: export to ONNX, check, simplify, validate with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.app import command
from kiln.cli.common import (
    bad,
    batch_or_range,
    console,
    dynamic_shapes_for,
    fail,
    input_shape_option,
    resolve_model,
    seq_option,
)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@command("export-onnx")
def export_onnx(
    model: str = typer.Argument(
        ..., metavar="MODEL", show_default=False, help="Zoo name (kiln zoo) or path/to/file.py:factory."
    ),
    output: Path = typer.Option(..., "-o", "--output", metavar="FILE", dir_okay=False, help="ONNX file to write."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Make dim 0 symbolic."),
    opset: int = typer.Option(None, "--opset", metavar="N", min=7, show_default="the exporter's", help="ONNX opset."),
    simplify: bool = typer.Option(False, "--simplify", help="Simplify with onnxslim."),
    batch: Any = typer.Option(
        "1", "--batch", parser=batch_or_range, metavar="N|MIN:OPT:MAX",
        help="Batch size of the example inputs, or a range MIN:OPT:MAX (e.g. 1:8:64): axis 0 of every input "
        "symbolic, traced at OPT, validated at sizes across the range.",
    ),
    seq: Any = seq_option(),
    input_shape: Any = input_shape_option(),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare ONNX Runtime (CPU) with PyTorch."),
    atol: float = typer.Option(1e-4, "--atol", metavar="X", min=0.0, help="Absolute tolerance."),
    rtol: float = typer.Option(1e-3, "--rtol", metavar="X", min=0.0, help="Relative tolerance."),
) -> None:
    """Export MODEL to ONNX, check it and validate it.

    torch.onnx export, onnx.checker, optional onnxslim, ONNX Runtime against PyTorch.
    """
    from kiln.errors import KilnError
    from kiln.onnx.export import export_onnx as export
    from kiln.onnx.export import validate_onnx, validate_onnx_dims
    from kiln.shapes import Dim

    if dynamic_batch and isinstance(batch, Dim):
        raise bad("give --dynamic-batch or --batch MIN:OPT:MAX, not both (--dynamic-batch is --batch 1:N:65536)")
    if isinstance(seq, int) and input_shape is None:
        input_shape = (seq,)  # --seq N: a fixed sequence length, as --input-shape N
    entry = resolve_model(model, 1 if isinstance(batch, Dim) else batch, input_shape)
    dynamic_shapes = dynamic_shapes_for(entry.example_inputs, batch, seq)
    try:
        with console.status(f"exporting [bold]{entry.name}[/] to ONNX…"):
            report = export(
                entry.model,
                entry.example_inputs,
                output,
                opset=opset,
                dynamic_batch=dynamic_batch,
                simplify=simplify,
                dynamic_shapes=dynamic_shapes,
            )
    except (KilnError, ImportError, OSError) as exc:
        raise fail(exc) from None
    _print_export(report)
    if report.ops_before is not None and report.ops_after is not None:
        _print_histogram(report.ops_before, report.ops_after)
    if not validate:
        return
    tol = dict(atol=atol, rtol=rtol)
    try:
        with console.status("validating with ONNX Runtime…"):
            if dynamic_shapes is None:
                results = [({}, validate_onnx(report.path, entry.model, entry.example_inputs, **tol))]
            else:
                results = validate_onnx_dims(report.path, entry.model, entry.example_inputs, dynamic_shapes, **tol)
    except (KilnError, ImportError, OSError) as exc:
        raise fail(exc) from None
    for binding, result in results:
        _print_validation(result, binding)
    if not all(result.passed for _, result in results):
        raise typer.Exit(1)


def _print_export(report: Any) -> None:
    table = Table(title=f"ONNX export: {escape(str(report.path))}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    exporter = {"dynamo": "torch.onnx dynamo (torch.export)", "torchscript": "torch.onnx TorchScript"}
    table.add_row("exporter", exporter.get(report.exporter, report.exporter))
    if report.fallback_reason:
        table.add_row("dynamo failed", f"[yellow]{escape(report.fallback_reason)}[/]")
    table.add_row("opset", str(report.opset))
    if report.dims:
        table.add_row("dims", escape(", ".join(report.dims)))
    else:
        table.add_row("dynamic batch", "yes" if report.dynamic_batch else "no")
    table.add_row("inputs", escape(", ".join(report.inputs)))
    table.add_row("outputs", escape(", ".join(report.outputs)))
    table.add_row("size", mib(report.size_bytes))
    table.add_row("export time", f"{report.seconds:.1f} s")
    table.add_row("onnx.checker", "[green]ok[/]")
    console.print(table)


def _print_histogram(before: dict[str, int], after: dict[str, int]) -> None:
    table = Table(title="ops before / after onnxslim")
    table.add_column("op")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for op in sorted(set(before) | set(after), key=lambda o: (-before.get(o, 0), o)):
        b, a = before.get(op, 0), after.get(op, 0)
        change = "" if a == b else f"[{'green' if a < b else 'yellow'}]{a - b:+d}[/]"
        table.add_row(op, str(b), str(a), change)
    table.add_row("[bold]total[/]", str(sum(before.values())), str(sum(after.values())), "")
    console.print(table)


def _print_validation(result: Any, binding: dict[str, int] | None = None) -> None:
    at = f" at {', '.join(f'{k}={v}' for k, v in binding.items())}" if binding else ""
    table = Table(title=f"ONNX Runtime ({result.provider}) vs PyTorch{at}: {result.tolerance}")
    table.add_column("output")
    table.add_column("shape")
    table.add_column("max |diff|", justify="right")
    table.add_column("result")
    for out in result.outputs:
        verdict = "[green]pass[/]" if out.passed else "[red]FAIL[/]"
        table.add_row(escape(out.name), "×".join(map(str, out.shape)), f"{out.max_abs_diff:.3g}", verdict)
    console.print(table)
    word = "[green]PASS[/]" if result.passed else "[red]FAIL[/]"
    console.print(f"{word}{at}: max abs difference {result.max_abs_diff:.3g} ({result.tolerance})")
