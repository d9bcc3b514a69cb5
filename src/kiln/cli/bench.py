"""`kiln bench MODEL|ENGINE` and `kiln bench --zoo`: kiln side by side with its peers.

The terminal table is the markdown table's short form: the columns that fit the terminal,
noisy rows marked, notes and reasons underneath. The method: docs/benchmarking.md.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    dynamic_shapes_for,
    fail,
    fitted_table,
    input_shape_option,
    parse_batches,
    parse_range,
    resolve_model,
    trusted_key_option,
    usage,
)


def parse_peers(text: str | None) -> tuple[str, ...] | None:
    """--against: peer names from the registry, comma-separated, or all / none."""
    from kiln.bench.peers import PEERS

    return choices(*PEERS, extra=("all", "none"))(text)


def parse_batch_sizes_or_range(text: str | Sequence[int] | None) -> Any:
    """--batch: sizes N[,N…] (as every --batch list in kiln) or a range MIN:OPT:MAX (a kiln.Dim
    named batch, as `kiln build --batch` reads it)."""
    if isinstance(text, str) and ":" in text:
        if text.count(":") != 2 or "," in text:
            raise bad(f"--batch takes sizes N[,N…] (e.g. 1,32) or one range MIN:OPT:MAX (e.g. 1:8:64), got {text!r}")
        return parse_range("batch", text)
    return parse_batches(text)


@command("bench")
def bench(
    target: str = typer.Argument(
        None, metavar="MODEL|ENGINE", show_default=False,
        help="Zoo name (kiln zoo), path/to/file.py:factory, or an engine file.",
    ),
    batch: Any = typer.Option(
        None, "--batch", parser=parse_batch_sizes_or_range, metavar="N[,N…]|MIN:OPT:MAX",
        show_default="1, or an engine's own",
        help="Batch sizes, e.g. 1,32; or, for MODEL, a range, e.g. 1:8:64: one dynamic-shape engine is built "
        "from MODEL and run at each of --sizes beside a static engine built for that size (÷static).",
    ),
    sizes: Any = typer.Option(
        None, "--sizes", parser=parse_batches, metavar="N[,N…]", show_default="min, opt, a prime between, max",
        help="With --batch MIN:OPT:MAX: the batch sizes to run the dynamic engine at, e.g. 1,3,8,17,64.",
    ),
    seq: Any = typer.Option(
        None, "--seq", parser=lambda t: parse_range("seq", t), metavar="N|MIN:OPT:MAX", show_default=False,
        help="Sequence length of token inputs: N (as --input-shape N), or with --batch MIN:OPT:MAX a range built "
        "into the engine (axis 1 of integer inputs), e.g. 16:128:512; the rows run at its opt.",
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
    --batch MIN:OPT:MAX builds one dynamic-shape engine from MODEL and runs it at each of --sizes
    beside a static engine built for that size, as for a dynamic ENGINE --batch 1,3,8.
    The method: docs/benchmarking.md.
    """
    from kiln.bench import runner
    from kiln.errors import KilnError
    from kiln.shapes import Dim

    if not zoo and not target:
        raise bad("give MODEL or ENGINE, or --zoo")
    if zoo and target and models:
        raise bad("give the models either as MODEL or as --models, not both")
    _check_dynamic_options(target, zoo, batch, sizes, seq, precision)
    if isinstance(seq, int) and input_shape is None:
        input_shape = (seq,)  # --seq N: a fixed sequence length, as --input-shape N (as kiln build reads it)
    ranges = [d for d in (batch, seq) if isinstance(d, Dim)]
    dynamic = _dynamic_build(target, batch, seq, input_shape) if isinstance(batch, Dim) else None
    if dynamic is not None:
        batch = sizes or runner.default_sizes(batch)
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
    if dynamic is not None:
        described = ", ".join(d.describe() for d in ranges)
        console.print(f"building a dynamic-shape engine ({escape(described)}) to run at batch "
                      f"{','.join(map(str, batch))}")
    try:
        report = runner.bench_model(target, settings, on_result=_progress, dynamic=dynamic)
    except (KilnError, ValueError, OSError, RuntimeError, ImportError, SyntaxError) as exc:
        raise fail(exc) from None
    console.print(result_table(report))
    for line in footer(report):
        console.print(escape(line))
    _write(report, outputs, dynamic_json(ranges, batch) if dynamic else None)


def _check_dynamic_options(target: str | None, zoo: bool, batch: Any, sizes: Any, seq: Any,
                           precisions: Sequence[str]) -> None:
    """--batch MIN:OPT:MAX, --sizes and --seq MIN:OPT:MAX fit together (exit 2, before any work)."""
    from kiln.bench.runner import is_engine_file
    from kiln.shapes import Dim

    if not isinstance(batch, Dim):
        if sizes is not None:
            raise usage("--sizes goes with --batch MIN:OPT:MAX (a dynamic-shape build); give the sizes to run "
                        "as --batch 1,32")
        if isinstance(seq, Dim):
            raise usage("--seq MIN:OPT:MAX goes with --batch MIN:OPT:MAX: kiln bench runs a dynamic build at "
                        "batch sizes, with the sequence length at its opt")
        return
    spec = f"{batch.min}:{batch.opt}:{batch.max}"
    if zoo:
        raise usage(f"--batch {spec} is for one MODEL, not --zoo; give batch sizes, e.g. --batch 1,32")
    if target and is_engine_file(target):
        raise usage(f"--batch {spec} builds a dynamic-shape engine from MODEL; an engine file has its own range: "
                    "give the sizes to run it at, e.g. --batch 1,3,8")
    if len(precisions) != 1:
        raise usage(f"--batch {spec} builds one dynamic-shape engine: give one --precision, got "
                    f"{','.join(precisions)}")
    outside = [n for n in sizes or () if not batch.contains(n)]
    if outside:
        raise usage(f"--sizes {','.join(map(str, outside))}: outside --batch {spec} ({batch.describe()}); give "
                    f"sizes from {batch.min} to {batch.max}")


def _dynamic_build(target: str, batch: Any, seq: Any, input_shape: tuple[int, ...] | None) -> Any:
    """The model at batch 1 (the runner resizes its inputs to opt before building) and its dynamic_shapes."""
    from kiln.bench.runner import DynamicBuild

    entry = resolve_model(target, 1, input_shape)
    return DynamicBuild(entry, dynamic_shapes_for(entry.example_inputs, batch, seq))


def dynamic_json(ranges: Sequence[Any], sizes: Sequence[int]) -> dict[str, Any]:
    """The --json report's record of a dynamic build: its ranges and the batch sizes run."""
    return {"dims": [d.to_json() for d in ranges], "batch_sizes": list(sizes)}


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


def _write(report: Any, outputs: dict[str, Path | None], dynamic: dict[str, Any] | None = None) -> None:
    from kiln.bench import report as writers
    from kiln.bench.results import ZooReport

    zoo = isinstance(report, ZooReport)
    try:
        if outputs["json"]:
            data = writers.zoo_to_dict(report) if zoo else writers.report_to_dict(report)
            if dynamic is not None:
                data["dynamic"] = dynamic
            writers.write_json(data, outputs["json"])
        if outputs["markdown"]:
            text = writers.zoo_markdown(report) if zoo else writers.report_markdown(report)
            Path(outputs["markdown"]).write_text(text)
        if outputs["plot"]:
            (writers.plot_zoo if zoo else writers.plot_report)(report, outputs["plot"])
    except (OSError, ImportError) as exc:
        raise fail(exc) from None


def _zoo_width(column: str) -> int:
    if column.startswith("speed-up"):
        return 8
    if column.startswith("vs best"):
        return 12
    return 7 if column.endswith(" ms") else 6 if column == "batch" else 3


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
    columns = [Column(header[0], 9)] + [Column(name, _zoo_width(name), "right", no_wrap=True) for name in header[1:-1]]
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
