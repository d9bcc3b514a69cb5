"""`kiln bench` and `kiln predict`: command functions for kiln.cli.commands to register.

    app.command("bench")(bench_command)
    app.command("predict")(predict_command)

`python -m kiln.cli.bench bench|predict …` runs them without the main CLI.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kiln.cli.common import console, fail


def _csv(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        values = tuple(int(v) for v in _csv(text.replace("x", ",")))
    except ValueError:
        raise typer.BadParameter(f"{what} must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return values


def _peer_names(text: str | None) -> tuple[str, ...] | None:
    from kiln.bench.peers import PEERS

    names = _csv(text)
    if not names:
        return None
    for name in names:
        if name not in PEERS and name not in ("all", "none"):
            close = difflib.get_close_matches(name, list(PEERS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise typer.BadParameter(f"unknown peer {name!r}{hint}; known: {', '.join(PEERS)}, all")
    return tuple(names)




# --- kiln bench -----------------------------------------------------------------------------


def bench_command(
    target: str = typer.Argument(
        None, metavar="MODEL|ENGINE", help="Zoo name, path/to/file.py:factory, or an engine file."
    ),
    batch: str = typer.Option(None, "--batch", help="Batch sizes, e.g. 1,32 (default: 1)."),
    precision: str = typer.Option("fp16", "--precision", help="fp32, fp16, bf16, comma-separated (CPU: fp32 only)."),
    against: str = typer.Option(
        None,
        "--against",
        help="Peers besides eager and kiln, comma-separated: eager-cudagraph, compile, "
        "compile-reduce-overhead, compile-max-autotune, onnxruntime, tensorrt, all "
        "[default: all default peers; with --zoo: none].",
    ),
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    iters: int = typer.Option(100, "--iters", min=1, help="Timed iterations per peer."),
    warmup: int = typer.Option(20, "--warmup", min=0, help="Untimed calls before timing."),
    max_seconds: float = typer.Option(
        20.0, "--max-seconds", help="Timing budget per peer; slow peers get fewer iterations."
    ),
    input_shape: str = typer.Option(
        None, "--input-shape", help="Per-sample input shape, e.g. 3,224,224 (or 128 for BERT)."
    ),
    json_path: Path = typer.Option(None, "--json", help="Write the results as JSON."),
    markdown: Path = typer.Option(None, "--markdown", help="Write the results as a markdown table."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG bar chart of the latencies."),
    zoo: bool = typer.Option(False, "--zoo", help="The zoo table: eager vs kiln over many models."),
    models: str = typer.Option(None, "--models", help="With --zoo: these models, comma-separated."),
) -> None:
    """Benchmark MODEL or ENGINE side by side with eager PyTorch, torch.compile, ONNX Runtime, …"""
    from kiln.bench import runner as bench
    from kiln.errors import KilnError

    settings = bench.BenchSettings(
        batches=_ints(batch, "--batch"),
        precisions=tuple(_csv(precision)),
        peers=_peer_names(against),
        device=device,
        iters=iters,
        warmup=warmup,
        max_seconds=max_seconds,
        input_shape=_ints(input_shape, "--input-shape"),
    )
    outputs = {"json": json_path, "markdown": markdown, "plot": plot}
    if zoo:
        names = _csv(models) or _csv(target) or list(bench.ZOO_MODELS)
        _run_zoo(names, settings, outputs)
        return
    if not target:
        raise typer.BadParameter("give MODEL or ENGINE, or --zoo")
    try:
        report = bench.bench_model(target, settings, on_result=_progress)
    except (KilnError, ValueError, OSError, RuntimeError) as exc:
        raise fail(exc) from None
    console.print(result_table(report))
    for line in _footer(report):
        console.print(line)
    _write(report, outputs)


def _progress(result: Any) -> None:
    status = {"ok": "[green]✓[/]", "skipped": "[yellow]–[/]", "failed": "[red]✗[/]"}[result.status]
    what = f"{result.peer} {result.precision} batch {result.batch}"
    if result.latency:
        console.print(f"  {status} {what}: {result.latency.median_ms:.3f} ms")
    else:
        console.print(f"  {status} {what}: {result.status}: {result.reason}")


def result_table(report: Any) -> Table:
    """The terminal's view of the markdown table: fewer, shorter columns; notes go below."""
    from rich import box

    from kiln.bench import runner as bench

    short = {
        "batch": "batch",
        "median ms": "median",
        "p99 ms": "p99",
        "items/s": "items/s",
        "speed-up": "×eager",
        "build s": "build s",
        "peak MiB": "MiB",
        "max abs diff": "max|Δ|",
        "top-1 agree": "top-1",
    }
    rows = [bench.result_cells(r) for r in report.results]
    index = [bench.COLUMNS.index(c) for c in short]
    index = [j for j in index if any(row[j] != "—" for row in rows)]  # e.g. no MiB on the CPU
    title = f"kiln bench: {report.model} (latency in ms)"
    table = Table(box=box.SIMPLE_HEAD, title=title, caption=report.environment.line())
    table.add_column("peer", overflow="fold")
    for j in index:
        table.add_column(short[bench.COLUMNS[j]], justify="right")
    for i, (r, cells) in enumerate(zip(report.results, rows, strict=True), 1):
        style = {"skipped": "yellow", "failed": "red"}.get(r.status)
        peer = f"{r.peer} {r.precision}{_mark(i, cells[-1])}"
        table.add_row(peer, *(cells[j] for j in index), style=style)
    return table


def _mark(index: int, note: str) -> str:
    return f" [{index}]" if note else ""


def _footer(report: Any) -> list[str]:
    from kiln.bench import runner as bench

    lines = [
        f"[{i}] {r.peer} {r.precision} batch {r.batch}: {cells[-1]}"
        for i, r in enumerate(report.results, 1)
        if (cells := bench.result_cells(r))[-1]
    ]
    lines.append(bench.weights_line(report.pretrained))
    for b, copy in report.h2d_copy.items():
        if copy is not None:
            lines.append(f"host→device input copy (pinned), batch {b}: {copy.median_ms:.3f} ms median")
    return lines + [f"note: {n}" for n in report.notes]


def _write(report: Any, outputs: dict[str, Path | None]) -> None:
    from kiln.bench import runner as bench

    zoo = isinstance(report, bench.ZooReport)
    if outputs["json"]:
        bench.write_json(bench.zoo_to_dict(report) if zoo else bench.report_to_dict(report), outputs["json"])
    if outputs["markdown"]:
        text = bench.zoo_markdown(report) if zoo else bench.report_markdown(report)
        Path(outputs["markdown"]).write_text(text)
    if outputs["plot"]:
        (bench.plot_zoo if zoo else bench.plot_report)(report, outputs["plot"])


def _run_zoo(names: list[str], settings: Any, outputs: dict[str, Path | None]) -> None:
    from kiln.bench import runner as bench
    from kiln.errors import KilnError

    def on_model(zoo_report: Any) -> None:
        entry = zoo_report.entries[-1]
        mark = "[red]✗[/]" if entry.error else "[green]✓[/]"
        console.print(f"{mark} {entry.model} ({len(zoo_report.entries)}/{len(names)}) {entry.error}")
        _write(zoo_report, outputs)  # rewritten after each model: a cut-short run keeps its rows

    try:
        zoo_report = bench.bench_zoo(names, settings, on_model=on_model)
    except (KilnError, ValueError, OSError, RuntimeError) as exc:
        raise fail(exc) from None
    header, rows = bench.zoo_rows(zoo_report)
    table = Table(title="kiln zoo benchmark", caption=zoo_report.environment.line())
    table.add_column(header[0], overflow="fold")
    for name in header[1:-1]:
        table.add_column(name, justify="right")
    notes = []
    for row in rows:
        if row[-1]:
            notes.append(f"[{len(notes) + 1}] {row[0]}: {row[-1]}")
        table.add_row(row[0] + (f" [{len(notes)}]" if row[-1] else ""), *row[1:-1])
    console.print(table)
    for line in notes:
        console.print(line, markup=False)


# --- kiln predict ---------------------------------------------------------------------------


def predict_command(
    target: str = typer.Argument(..., metavar="MODEL|ENGINE", help="Zoo classifier name or engine file."),
    images: list[str] = typer.Argument(
        None, metavar="IMAGE...", help="Image files, or skimage:NAME samples (e.g. skimage:chelsea)."
    ),
    sample: list[str] = typer.Option(
        None, "--sample", help="A scikit-image sample photograph: chelsea, coffee, astronaut, … (repeat)."
    ),
    topk: int = typer.Option(5, "--topk", min=1, help="How many labels to show."),
    precision: str = typer.Option("fp16", "--precision", help="Engine precision when building MODEL."),
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the zoo's random weights."),
) -> None:
    """Top-k ImageNet labels for IMAGE(s) from eager and from the engine, side by side."""
    from kiln.debug.predict import SKIMAGE_PREFIX, predict
    from kiln.errors import KilnError

    specs = [*(images or []), *(SKIMAGE_PREFIX + s for s in sample or [])]
    try:
        report = predict(target, specs, topk=topk, precision=precision, device=device, seed=seed)
    except (KilnError, ValueError, OSError) as exc:
        raise fail(exc) from None
    for line in predict_lines(report):
        console.print(line)
    for result in report.images:
        console.print(prediction_table(result))
        if result.agreement:
            console.print(agreement_line(result.agreement))


def predict_lines(report: Any) -> list[str]:
    engine = f"{report.precision} engine on {report.device}"
    lines = [f"[bold]{report.model}[/] ({engine}); preprocessing: {report.preprocessing}"]
    if report.weights_warning:
        lines.append(f"[bold yellow]warning:[/] {report.weights_warning}")
    return lines + [f"note: {n}" for n in report.notes]


def prediction_table(result: Any) -> Table:
    table = Table("#", "engine", "prob", title=result.image)
    eager = result.eager
    if eager:
        table.add_column("eager")
        table.add_column("prob")
    for i, (label, prob) in enumerate(zip(result.engine.labels, result.engine.probs, strict=True)):
        row = [str(i + 1), label, f"{prob:.4f}"]
        if eager:
            row += [eager.labels[i], f"{eager.probs[i]:.4f}"]
        table.add_row(*row)
    return table


def agreement_line(a: Any) -> str:
    color = "green" if a.verdict == "agree" else "yellow" if a.same_top1 else "red"
    return (
        f"[{color}]{a.verdict}[/]: same top-1 {'yes' if a.same_top1 else 'no'}, "
        f"top-{a.k} overlap {a.topk_overlap}/{a.k}, max prob difference {a.max_prob_diff:.2e}"
    )


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
app.command("bench")(bench_command)
app.command("predict")(predict_command)


if __name__ == "__main__":
    app()
