"""Reports of `kiln bench` runs: table cells, JSON, markdown and PNG plots.

Pure functions of what `kiln.bench.runner` measured (a `BenchReport` or a `ZooReport`, types in
`kiln.bench.results`); nothing here measures or touches a device. Noisy rows are flagged in every
form: the note column, a '?' after their speed-ups, and hatched bars with p10–p90 whiskers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.bench.results import BASELINE, BenchReport, Environment, PeerResult, Stats, ZooReport

SCHEMA = "kiln.bench/2"


# --- reports (pure) -------------------------------------------------------------------------

COLUMNS = (
    "peer",
    "precision",
    "batch",
    "median ms",
    "p90 ms",
    "p99 ms",
    "spread",
    "items/s",
    "speed-up",
    "vs static",
    "build s",
    "peak MiB",
    "max abs diff",
    "cosine",
    "top-1 agree",
    "note",
)


def fmt_ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def spread_cell(lat: Stats | None) -> str:
    """The rounds' spread as a percentage of the median ('—' for a single round)."""
    return "—" if lat is None or lat.spread is None else f"{lat.spread:.0%}"


def speedup_cell(r: PeerResult) -> str:
    if r.speedup is None:
        return "—"
    return f"{r.speedup:.3g}×" + ("?" if r.speedup_noisy else "")


def note_cell(r: PeerResult) -> str:
    note = f"{r.status}: {r.reason}" if r.status != "ok" else r.note
    if r.status != "ok" and r.note:
        note += f" ({r.note})"
    if r.latency and r.latency.noisy:
        note = f"noisy: {r.latency.noise}" + (f"; {note}" if note else "")
    return note


def result_cells(r: PeerResult) -> list[str]:
    """One report row, as text: shared by the terminal table and the markdown."""
    lat, acc = r.latency, r.accuracy
    mem = None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20
    note = note_cell(r)
    return [
        r.peer,
        r.precision,
        str(r.batch),
        fmt_ms(lat and lat.median_ms),
        fmt_ms(lat and lat.p90_ms),
        fmt_ms(lat and lat.p99_ms),
        spread_cell(lat),
        _fmt(r.throughput, ".1f"),
        speedup_cell(r),
        _fmt(r.vs_static, ".3f"),
        _fmt(r.build_seconds, ".2f"),
        _fmt(mem, ".1f"),
        _fmt(acc and acc.max_abs, ".2e"),
        _fmt(acc and acc.cosine, ".6f"),
        _fmt(acc and acc.top1_agreement and acc.top1_agreement * 100, ".0f")
        + ("%" if acc and acc.top1_agreement is not None else ""),
        note,
    ]


def weights_line(pretrained: bool | None) -> str:
    if pretrained is False:
        return (
            "weights: random (no offline weights); timings hold, and the accuracy columns "
            "compare each peer with eager fp32 on the same weights"
        )
    return "weights: pretrained" if pretrained else "weights: unknown"


def report_to_dict(report: BenchReport) -> dict[str, Any]:
    data = dataclasses.asdict(report)
    data["h2d_copy"] = {str(k): v for k, v in data["h2d_copy"].items()}
    return {"schema": SCHEMA, "kind": "model", **_json_safe(data)}


def zoo_to_dict(zoo_report: ZooReport) -> dict[str, Any]:
    entries = [
        {"model": e.model, "error": e.error, "report": e.report and report_to_dict(e.report)}
        for e in zoo_report.entries
    ]
    return {
        "schema": SCHEMA,
        "kind": "zoo",
        "environment": dataclasses.asdict(zoo_report.environment),
        "settings": _json_safe(dataclasses.asdict(zoo_report.settings)),
        "entries": entries,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def report_markdown(report: BenchReport) -> str:
    s = report.settings
    lines = [
        f"# kiln bench: {report.model}",
        "",
        f"{report.environment.line()}  ",
        f"{weights_line(report.pretrained)}  ",
        f"timing: up to {s.iters} calls per peer after {s.warmup} warm-up calls, in {s.rounds} rounds taking "
        f"turns with the other peers, at most ~{s.max_seconds:g} s per peer; spread: how far apart the rounds' "
        f"medians are; noisy: p90 over {s.noisy_tail:g}× the median or spread over {s.noisy_spread:.0%}",
        "",
        _md_row(COLUMNS),
        _md_row(["---"] * len(COLUMNS)),
        *(_md_row(result_cells(r)) for r in report.results),
        "",
    ]
    for batch, copy in report.h2d_copy.items():
        if copy is not None:
            lines.append(
                f"- host→device input copy (pinned), batch {batch}: median "
                f"{fmt_ms(copy.median_ms)} ms, p99 {fmt_ms(copy.p99_ms)} ms "
                "(not included in the latencies above)"
            )
    lines += [f"- {n}" for n in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def zoo_columns(zoo_report: ZooReport) -> list[tuple[str, str]]:
    """(peer, precision) pairs of the zoo table: eager and kiln per precision, then the others."""
    precisions = _zoo_precisions(zoo_report)
    others = [p for p in zoo_report.settings.peers or () if p not in ("eager", "kiln")]
    return [(peer, p) for p in precisions for peer in ("eager", "kiln", *others)]


def _zoo_precisions(zoo_report: ZooReport) -> list[str]:
    seen = [
        r.precision
        for e in zoo_report.entries
        if e.report
        for r in e.report.results
        if (r.peer, r.precision) != BASELINE
    ]
    return list(dict.fromkeys(seen)) or list(zoo_report.settings.precisions)


def zoo_rows(zoo_report: ZooReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows: model | batch | eager P | kiln P | speed-up | … | top-1 | note."""
    columns = zoo_columns(zoo_report)
    precisions = _zoo_precisions(zoo_report)
    header = ["model", "batch"]
    for p in precisions:
        header += [f"{peer} {p} ms" for peer, q in columns if q == p] + [f"speed-up {p}"]
        if _has_other_peers(columns, p):
            header.append(f"vs best peer {p}")
    header += ["kiln top-1 agree", "kiln max abs diff", "kiln build s", "note"]
    rows = []
    for entry in zoo_report.entries:
        if entry.report is None:
            rows.append([entry.model, "—", *["—"] * (len(header) - 3), f"failed: {entry.error}"])
            continue
        for batch in dict.fromkeys(r.batch for r in entry.report.results):
            rows.append(_zoo_row(entry.model, batch, entry.report, precisions, columns))
    return header, rows


def _zoo_row(
    model: str, batch: int, report: BenchReport, precisions: list[str], columns: list[tuple[str, str]]
) -> list[str]:
    found = {(r.peer, r.precision): r for r in report.results if r.batch == batch}
    row, notes = [model, str(batch)], []
    for p in precisions:
        for peer, q in columns:
            if q == p:
                r = found.get((peer, p))
                row.append(fmt_ms(r.latency.median_ms) if r and r.latency else (r.status if r else "—"))
                if r and r.status != "ok":
                    notes.append(f"{peer} {p} {r.status}: {r.reason}")
                if r and r.latency and r.latency.noisy:
                    notes.append(f"{peer} {p} noisy: {r.latency.noise}")
        eager, kiln = found.get(("eager", p)), found.get(("kiln", p))
        row.append(_ratio(eager, kiln))
        if _has_other_peers(columns, p):
            timed = [found.get((peer, p)) for peer, q in columns if q == p and peer != "kiln"]
            timed = [r for r in timed if r and r.latency]
            best = min(timed, key=lambda r: r.latency.median_ms, default=None)
            row.append(_ratio(best, kiln) + (f" {best.peer}" if best and kiln and kiln.latency else ""))
    kiln_results = [found[("kiln", p)] for p in precisions if found.get(("kiln", p))]
    kiln_acc = next((r.accuracy for r in kiln_results), None)
    build = next((r.build_seconds for r in kiln_results if r.build_seconds is not None), None)
    top1 = kiln_acc and kiln_acc.top1_agreement
    row += [
        _fmt(top1 and top1 * 100, ".0f") + ("%" if top1 is not None else ""),
        _fmt(kiln_acc and kiln_acc.max_abs, ".2e"),
        _fmt(build, ".1f"),
        "; ".join(notes),
    ]
    return row


def _has_other_peers(columns: list[tuple[str, str]], precision: str) -> bool:
    return any(q == precision and peer not in ("eager", "kiln") for peer, q in columns)


def _ratio(base: PeerResult | None, kiln: PeerResult | None) -> str:
    """base's median over kiln's ('?' when either is noisy), or — when one was not timed."""
    if not (base and kiln and base.latency and kiln.latency):
        return "—"
    doubt = "?" if base.latency.noisy or kiln.latency.noisy else ""
    return f"{base.latency.median_ms / kiln.latency.median_ms:.2f}×{doubt}"


def zoo_markdown(zoo_report: ZooReport) -> str:
    header, rows = zoo_rows(zoo_report)
    s = zoo_report.settings
    first = next((e.report for e in zoo_report.entries if e.report), None)
    lines = [
        "# kiln zoo benchmark",
        "",
        f"{zoo_report.environment.line()}  ",
        f"median latency per call, up to {s.iters} calls after {s.warmup} warm-up calls, in {s.rounds} rounds "
        "taking turns with the other peers; speed-up = eager / kiln at the same precision; vs best peer = "
        "the fastest other peer's median / kiln's, naming that peer ('?': from noisy timings, see the note)  ",
        (weights_line(first.pretrained) if first else "") + "  ",
        "",
        _md_row(header),
        _md_row(["---"] * len(header)),
        *(_md_row(r) for r in rows),
    ]
    if zoo_report.environment.busy():
        lines += ["", f"- the machine was busy before this run ({zoo_report.environment.load_line()})"]
    return "\n".join(lines) + "\n"


def write_json(data: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


# --- plots ----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save

    return Figure(figsize=(width, height), layout="constrained")


def _bars(ax: Any, labels: list[str], series: dict[str, list[Stats | None]], horizontal: bool) -> bool:
    """Median bars with p10–p90 whiskers; noisy bars hatched and labelled. True if any was noisy."""
    n = max(len(series), 1)
    width = 0.8 / n
    values = [v for ss in series.values() for s in ss if s for v in (s.median_ms, s.p90_ms) if v]
    any_noisy = False
    for i, (name, stats) in enumerate(series.items()):
        pos = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        heights = [s.median_ms if s else 0.0 for s in stats]
        low = [max(0.0, s.median_ms - s.p10_ms) if s and s.p10_ms is not None else 0.0 for s in stats]
        high = [max(0.0, s.p90_ms - s.median_ms) if s else 0.0 for s in stats]
        whiskers = {("xerr" if horizontal else "yerr"): [low, high], "capsize": 2, "error_kw": {"linewidth": 0.8}}
        bars = (ax.barh if horizontal else ax.bar)(pos, heights, width, label=name, **whiskers)
        for bar, s in zip(bars, stats):
            if s is not None and s.noisy:
                bar.set_hatch("///")
                any_noisy = True
        texts = [(fmt_ms(s.median_ms) + (" noisy" if s.noisy else "")) if s else "" for s in stats]
        ax.bar_label(bars, labels=texts, fontsize=7, padding=2)
    ticks = ax.set_yticks if horizontal else ax.set_xticks
    ticks(range(len(labels)), labels, **({} if horizontal else {"rotation": 30, "ha": "right"}))
    if values and max(values) / min(values) > 30:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
    (ax.set_xlabel if horizontal else ax.set_ylabel)("median latency (ms); whiskers: p10–p90")
    if n > 1:
        ax.legend(fontsize=8)
    elif series:
        (ax.set_ylabel if horizontal else ax.set_xlabel)(next(iter(series)))
    return any_noisy


NOISY_CAPTION = "hatched: noisy timings (p90 far above the median, or rounds disagreeing): do not compare them"


def _title(fig: Any, title: str, env: Environment) -> None:
    fig.suptitle(f"{title}\n{env.line(sep=chr(10))}", fontsize=9)


def plot_report(report: BenchReport, path: Path) -> None:
    """Bar chart: median latency per peer (x) and batch size (bars), labelled with the setup."""
    labels = list(dict.fromkeys(f"{r.peer} {r.precision}" for r in report.results if r.latency))
    batches = list(dict.fromkeys(r.batch for r in report.results))
    found = {(f"{r.peer} {r.precision}", r.batch): r.latency for r in report.results if r.latency}
    series = {f"batch {b}": [found.get((label, b)) for label in labels] for b in batches}
    fig = _figure(max(7.0, 1.0 + 1.1 * len(labels)), 5.0)
    ax = fig.add_subplot()
    noisy = _bars(ax, labels, series, horizontal=False)
    _title(fig, f"kiln bench: {report.model}", report.environment)
    missing = [f"{r.peer} {r.precision}: {r.status}" for r in report.results if r.status != "ok"]
    captions = [NOISY_CAPTION] if noisy else []
    if missing:
        captions.append("not timed (see the report): " + "; ".join(dict.fromkeys(missing)))
    if captions:
        fig.supxlabel("\n".join(captions), fontsize=6)
    fig.savefig(path, dpi=120, format="png")


def plot_zoo(zoo_report: ZooReport, path: Path) -> None:
    """Horizontal bars per zoo model: eager vs kiln (and other peers) median latency."""
    columns = zoo_columns(zoo_report)
    batch = (zoo_report.settings.batches or (1,))[0]
    entries = [e for e in zoo_report.entries if e.report]
    labels = [e.model for e in entries]
    series: dict[str, list[Stats | None]] = {}
    for peer, p in columns:
        series[f"{peer} {p}"] = [_latency(e.report, peer, p, batch) for e in entries if e.report]
    fig = _figure(8.0, max(3.0, 0.45 * len(labels) * max(1, len(columns)) / 2 + 1.5))
    ax = fig.add_subplot()
    if _bars(ax, labels, series, horizontal=True):
        fig.supxlabel(NOISY_CAPTION, fontsize=6)
    ax.invert_yaxis()
    _title(fig, f"kiln zoo, batch {batch}", zoo_report.environment)
    fig.savefig(path, dpi=120, format="png")


def _latency(report: BenchReport, peer: str, precision: str, batch: int) -> Stats | None:
    found = [r for r in report.results if (r.peer, r.precision, r.batch) == (peer, precision, batch)]
    return found[0].latency if found else None
