"""`kiln bench MODEL|ENGINE` and `kiln bench --zoo`: kiln side by side with its peers.

The terminal table is the markdown table's short form: the columns that fit the terminal,
noisy rows marked, notes and reasons underneath. The method: docs/benchmarking.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from kiln.cli.app import command
from kiln.cli.common import (
    PRECISIONS,
    Column,
    bad,
    choices,
    console,
    csv,
    device_option,
    fail,
    fitted_table,
    input_shape_option,
    parse_batches,
    trusted_key_option,
)


def parse_peers(text: str | None) -> tuple[str, ...] | None:
    """--against: peer names from the registry, comma-separated, or all / none."""
    from kiln.bench.peers import PEERS

    return choices(*PEERS, extra=("all", "none"))(text)


@command("bench")
def bench(
    target: str = typer.Argument(
        None, metavar="MODEL|ENGINE", show_default=False,
        help="Zoo name (kiln zoo), path/to/file.py:factory, or an engine file.",
    ),
    batch: Any = typer.Option(
        None, "--batch", parser=parse_batches, metavar="N[,N…]", show_default="1, or an engine's own",
        help="Batch sizes, e.g. 1,32.",
    ),
    precision: Any = typer.Option(
        "fp16", "--precision", parser=choices(*PRECISIONS), metavar="P[,P…]",
        help=f"Precisions among {', '.join(PRECISIONS)} (CPU: fp32 only).",
    ),
    against: Any = typer.Option(
        None, "--against", parser=parse_peers, metavar="PEER[,PEER…]", show_default="every default peer; --zoo: none",
        help="Peers besides eager and kiln: eager-cudagraph, compile, compile-reduce-overhead, compile-max-autotune, "
        "onnxruntime, tensorrt, all, none.",
    ),
    device: str = device_option(),
    iters: int = typer.Option(100, "--iters", metavar="N", min=1, help="Timed calls per peer, over all rounds."),
    warmup: int = typer.Option(20, "--warmup", metavar="N", min=0, help="Untimed calls before a peer's first round."),
    rounds: int = typer.Option(
        5, "--rounds", metavar="N", min=1, help="Rounds in which the peers take turns (their spread is reported)."
    ),
    max_seconds: float = typer.Option(
        20.0, "--max-seconds", metavar="S", min=0.001, help="Timing budget per peer; slow peers get fewer calls."
    ),
    input_shape: Any = input_shape_option(),
    json_path: Path = typer.Option(None, "--json", metavar="FILE", dir_okay=False, help="Write the results as JSON."),
    markdown: Path = typer.Option(None, "--markdown", metavar="FILE", dir_okay=False, help="Write a markdown table."),
    plot: Path = typer.Option(None, "--plot", metavar="FILE", dir_okay=False, help="Write a PNG bar chart."),
    zoo: bool = typer.Option(False, "--zoo", help="The zoo table: eager vs kiln over many models."),
    models: str = typer.Option(
        None, "--models", metavar="MODEL[,MODEL…]", show_default="the zoo table's", help="With --zoo: these models."
    ),
    trusted_key: list[Path] = trusted_key_option(),
) -> None:
    """Time MODEL or ENGINE side by side with its peers.

    Peers: eager PyTorch, CUDA graphs, torch.compile, ONNX Runtime, TensorRT. The peers take
    turns in rounds; the spread is reported and noisy rows are flagged.
    The method: docs/benchmarking.md.
    """
    from kiln.bench import runner
    from kiln.errors import KilnError

    if not zoo and not target:
        raise bad("give MODEL or ENGINE, or --zoo")
    if zoo and target and models:
        raise bad("give the models either as MODEL or as --models, not both")
    settings = runner.BenchSettings(
        batches=batch,
        precisions=precision,
        peers=against,
        device=device,
        iters=iters,
        warmup=warmup,
        rounds=rounds,
        max_seconds=max_seconds,
        input_shape=input_shape,
        trusted_keys=tuple(str(k) for k in trusted_key) if trusted_key else None,
    )
    outputs = {"json": json_path, "markdown": markdown, "plot": plot}
    if zoo:
        _run_zoo(csv(models) or csv(target) or list(runner.ZOO_MODELS), settings, outputs)
        return
    try:
        report = runner.bench_model(target, settings, on_result=_progress)
    except (KilnError, ValueError, OSError, RuntimeError, ImportError, SyntaxError) as exc:
        raise fail(exc) from None
    console.print(result_table(report))
    for line in footer(report):
        console.print(escape(line))
    _write(report, outputs)


def _progress(result: Any) -> None:
    status = {"ok": "[green]✓[/]", "skipped": "[yellow]–[/]", "failed": "[red]✗[/]"}[result.status]
    what = f"{result.peer} {result.precision} batch {result.batch}"
    if result.latency:
        noisy = " [yellow](noisy)[/]" if result.latency.noisy else ""
        console.print(f"  {status} {what}: {result.latency.median_ms:.3f} ms{noisy}")
    else:
        console.print(f"  {status} {what}: {result.status}: {escape(result.reason)}")


SHORT = {  # the markdown column → the terminal's heading, and how much it matters (9: always kept)
    "batch": ("batch", 8),
    "median ms": ("median", 9),
    "p90 ms": ("p90", 6),
    "p99 ms": ("p99", 1),
    "spread": ("spread", 7),
    "items/s": ("items/s", 2),
    "speed-up": ("×eager", 8),
    "vs static": ("÷static", 8),
    "build s": ("build s", 4),
    "peak MiB": ("MiB", 3),
    "max abs diff": ("max|Δ|", 5),
    "top-1 agree": ("top-1", 4),
}


def result_table(report: Any) -> Any:
    """The terminal's view of the markdown table: the columns that fit, notes below."""
    from kiln.bench import report as writers

    rows = [writers.result_cells(r) for r in report.results]
    index = [writers.COLUMNS.index(c) for c in SHORT]
    index = [j for j in index if any(row[j] != "—" for row in rows)]  # e.g. no MiB on the CPU
    columns = [Column("peer", 9)] + [
        Column(SHORT[writers.COLUMNS[j]][0], SHORT[writers.COLUMNS[j]][1], "right", no_wrap=True) for j in index
    ]
    table_rows, styles = [], []
    for i, (r, cells) in enumerate(zip(report.results, rows, strict=True), 1):
        styles.append({"skipped": "yellow", "failed": "red"}.get(r.status) or ("yellow" if r.noisy else None))
        noisy = " noisy" if r.noisy else ""
        peer = f"{r.peer} {r.precision}{noisy}{_mark(i, cells[-1])}"
        table_rows.append([escape(peer), *(cells[j] for j in index)])
    title = f"kiln bench: {report.model} (latency in ms)"
    return fitted_table(columns, table_rows, title=escape(title), styles=styles,
                        caption=escape(report.environment.line()))


def _mark(index: int, note: str) -> str:
    return f" [{index}]" if note else ""


def footer(report: Any) -> list[str]:
    """The notes under the table: numbered row notes, weights, the input copy, the report's notes."""
    from kiln.bench import report as writers

    lines = [
        f"[{i}] {r.peer} {r.precision} batch {r.batch}: {cells[-1]}"
        for i, r in enumerate(report.results, 1)
        if (cells := writers.result_cells(r))[-1]
    ]
    lines.append(writers.weights_line(report.pretrained))
    for b, copy in report.h2d_copy.items():
        if copy is not None:
            lines.append(f"host→device input copy (pinned), batch {b}: {copy.median_ms:.3f} ms median")
    return lines + [f"note: {n}" for n in report.notes]


def _write(report: Any, outputs: dict[str, Path | None]) -> None:
    from kiln.bench import report as writers
    from kiln.bench.results import ZooReport

    zoo = isinstance(report, ZooReport)
    try:
        if outputs["json"]:
            writers.write_json(writers.zoo_to_dict(report) if zoo else writers.report_to_dict(report), outputs["json"])
        if outputs["markdown"]:
            text = writers.zoo_markdown(report) if zoo else writers.report_markdown(report)
            Path(outputs["markdown"]).write_text(text)
        if outputs["plot"]:
            (writers.plot_zoo if zoo else writers.plot_report)(report, outputs["plot"])
    except (OSError, ImportError) as exc:
        raise fail(exc) from None


def _run_zoo(names: list[str], settings: Any, outputs: dict[str, Path | None]) -> None:
    from kiln.bench import report as writers
    from kiln.bench import runner
    from kiln.errors import KilnError

    def on_model(zoo_report: Any) -> None:
        entry = zoo_report.entries[-1]
        mark = "[red]✗[/]" if entry.error else "[green]✓[/]"
        console.print(f"{mark} {escape(entry.model)} ({len(zoo_report.entries)}/{len(names)}) {escape(entry.error)}")
        _write(zoo_report, outputs)  # rewritten after each model: a cut-short run keeps its rows

    try:
        zoo_report = runner.bench_zoo(names, settings, on_model=on_model)
    except (KilnError, ValueError, OSError, RuntimeError) as exc:
        raise fail(exc) from None
    header, rows = writers.zoo_rows(zoo_report)
    columns = [Column(header[0], 9)] + [
        Column(name, 8 if name.startswith("speed-up") else 7 if name.endswith(" ms") else 6 if name == "batch" else 3,
               "right", no_wrap=True)
        for name in header[1:-1]
    ]
    notes, table_rows = [], []
    for row in rows:
        if row[-1]:
            notes.append(f"[{len(notes) + 1}] {row[0]}: {row[-1]}")
        table_rows.append([escape(row[0] + (f" [{len(notes)}]" if row[-1] else "")), *row[1:-1]])
    console.print(fitted_table(columns, table_rows, title="kiln zoo benchmark",
                               caption=escape(zoo_report.environment.line())))
    for line in notes:
        console.print(line, markup=False)
    if zoo_report.environment.busy():
        console.print(f"note: the machine was busy before this run ({zoo_report.environment.load_line()})",
                      markup=False)
