"""`kiln export-onnx` and `kiln trt-check`: command functions for kiln.cli.commands to register.

app.command("export-onnx")(export_onnx_command)
app.command("trt-check")(trt_check_command)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.common import console, fail, parse_shape


def _resolve(model: str, batch: int, input_shape: str | None) -> Any:
    from kiln import zoo
    from kiln.errors import KilnError

    try:
        entry = zoo.resolve(model, batch=batch, input_shape=parse_shape(input_shape))
    except (KilnError, ValueError, FileNotFoundError) as exc:
        raise fail(exc) from None
    if getattr(entry, "note", None):
        console.print(f"[yellow]note:[/] {entry.note}")
    return entry


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# --- kiln export-onnx -------------------------------------------------------------------


def export_onnx_command(
    model: str = typer.Argument(..., help="Zoo name or path/to/file.py:factory."),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Make dim 0 symbolic."),
    opset: int = typer.Option(None, "--opset", help="ONNX opset [default: the exporter's]."),
    simplify: bool = typer.Option(False, "--simplify", help="Simplify with onnxslim."),
    batch: int = typer.Option(1, help="Batch size of the example inputs."),
    input_shape: str = typer.Option(None, help="Per-sample input shape, e.g. 3,224,224."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare ONNX Runtime (CPU) with PyTorch."),
    atol: float = typer.Option(None, help="Absolute tolerance [default: 1e-4]."),
    rtol: float = typer.Option(None, help="Relative tolerance [default: 1e-3]."),
) -> None:
    """Export MODEL to ONNX with torch.onnx, check it, and validate it with ONNX Runtime."""
    from kiln.errors import KilnError
    from kiln.onnx.export import DEFAULT_ATOL, DEFAULT_RTOL, export_onnx, validate_onnx

    entry = _resolve(model, batch, input_shape)
    try:
        with console.status(f"exporting [bold]{entry.name}[/] to ONNX…"):
            report = export_onnx(
                entry.model,
                entry.example_inputs,
                output,
                opset=opset,
                dynamic_batch=dynamic_batch,
                simplify=simplify,
            )
    except (KilnError, ImportError) as exc:
        raise fail(exc) from None
    _print_export(report)
    if report.ops_before is not None and report.ops_after is not None:
        _print_histogram(report.ops_before, report.ops_after)
    if not validate:
        return
    tol = dict(atol=DEFAULT_ATOL if atol is None else atol, rtol=DEFAULT_RTOL if rtol is None else rtol)
    try:
        with console.status("validating with ONNX Runtime…"):
            result = validate_onnx(report.path, entry.model, entry.example_inputs, **tol)
    except (KilnError, ImportError) as exc:
        raise fail(exc) from None
    _print_validation(result)
    if not result.passed:
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
    table.add_row("dynamic batch", "yes" if report.dynamic_batch else "no")
    table.add_row("inputs", escape(", ".join(report.inputs)))
    table.add_row("outputs", escape(", ".join(report.outputs)))
    table.add_row("size", _mib(report.size_bytes))
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


def _print_validation(result: Any) -> None:
    table = Table(title=f"ONNX Runtime ({result.provider}) vs PyTorch: {result.tolerance}")
    table.add_column("output")
    table.add_column("shape")
    table.add_column("max |diff|", justify="right")
    table.add_column("result")
    for out in result.outputs:
        verdict = "[green]pass[/]" if out.passed else "[red]FAIL[/]"
        table.add_row(escape(out.name), "×".join(map(str, out.shape)), f"{out.max_abs_diff:.3g}", verdict)
    console.print(table)
    word = "[green]PASS[/]" if result.passed else "[red]FAIL[/]"
    console.print(f"{word}: max abs difference {result.max_abs_diff:.3g} ({result.tolerance})")


# --- kiln trt-check ---------------------------------------------------------------------


def trt_check_command(
    target: str = typer.Argument(..., help="An .onnx file, or a zoo name / path.py:factory."),
    batch: int = typer.Option(1, help="Batch size when exporting MODEL."),
    input_shape: str = typer.Option(None, help="Per-sample input shape when exporting MODEL."),
    opset: int = typer.Option(None, "--opset", help="ONNX opset when exporting MODEL."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Export with dim 0 symbolic."),
) -> None:
    """List every ONNX node TensorRT's parser rejects, with the parser's reason.

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
    model: str, batch: int, input_shape: str | None, opset: int | None, dynamic: bool, tmp: Path
) -> Path:
    from kiln.errors import KilnError
    from kiln.onnx.export import export_onnx

    entry = _resolve(model, batch, input_shape)
    out = tmp / f"{Path(model.split(':')[-1]).stem}.onnx"
    try:
        with console.status(f"exporting [bold]{entry.name}[/] to ONNX…"):
            report = export_onnx(entry.model, entry.example_inputs, out, opset=opset, dynamic_batch=dynamic)
    except (KilnError, ImportError) as exc:
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


if __name__ == "__main__":  # python -m kiln.cli.onnx export-onnx|trt-check …
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    _app.command("export-onnx")(export_onnx_command)
    _app.command("trt-check")(trt_check_command)
    _app()
