"""`kiln inspect ENGINE`: inputs/outputs, steps in the model's language (module path, source
line), TensorRT regions, the memory plan, build info and who signed the file; --timings, --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from kiln.cli.app import command
from kiln.cli.common import Column, console, fitted_table, load_device_option, open_engine, trusted_key_option
from kiln.cli.describe import describe, dims_line, render_shape, short_op, short_source


@command("inspect")
def inspect(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="Engine file written by kiln build."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    device: str = load_device_option(),
    timings: bool = typer.Option(False, "--timings", help="Also list each tuned step's candidates and times."),
    trusted_key: list[Path] = trusted_key_option(),
) -> None:
    """Show an engine's steps, memory plan, build info and signer.

    Each step names the model's module and source line; --timings lists the kernels timed per step.
    """
    info = describe(open_engine(engine_path, device, trusted_key))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    io_rows = [[kind, s["name"], render_shape(s["shape"]), s["dtype"]]
               for kind, specs in (("in", info["inputs"]), ("out", info["outputs"])) for s in specs]
    console.print(fitted_table([Column("", 9), Column("name", 8), Column("shape", 7), Column("dtype", 6)], io_rows,
                               title="inputs and outputs"))
    console.print(steps_table(info["steps"]))
    for line in region_lines(info["steps"]):
        console.print(line)
    if timings:
        console.print(timings_table(info["steps"]) if any(s["timings_ms"] for s in info["steps"])
                      else no_timings_line(info["build"]))
    for line in summary_lines(info):
        console.print(line)


def steps_table(steps: list[dict[str, Any]], width: int | None = None) -> Any:
    """One row per step: where in the model (module, source line), what (op, kernel) and its output."""
    rows = []
    for s in steps:
        region = s.get("tensorrt_region")
        op = f"TensorRT region ({region['ops']} ops)" if region else short_op(s["op"])
        rows.append([str(s["index"]), escape(s["module"] or f"({s['name']})"), escape(op),
                     escape(s["kernel"] + (f" (else {s['fallback']})" if s.get("fallback") else "")),
                     str(s["precision"]), render_shape(s["output_shape"] or ()), str(s["memory"]),
                     escape(short_source(s["source"]))])
    columns = [Column("#", 9, "right"), Column("module", 8), Column("op", 7), Column("kernel", 8),
               Column("precision", 3), Column("output shape", 5), Column("memory", 1), Column("source", 6)]
    return fitted_table(columns, rows, title="steps (module: the model's nn.Module path; (name): no module)",
                        width=width)


def region_lines(steps: list[dict[str, Any]]) -> list[str]:
    """What each TensorRT region step holds: its ops by kind and its engine's size."""
    lines = []
    for s in steps:
        region = s.get("tensorrt_region")
        if region:
            ops = ", ".join(f"{op} ×{n}" for op, n in list(region["op_counts"].items())[:6])
            more = ", …" if len(region["op_counts"]) > 6 else ""
            lines.append(f"step {s['index']} is a TensorRT region: {region['ops']} ops ({escape(ops)}{more}), "
                         f"engine {region['engine_bytes'] / 2**20:.2f} MiB")
    return lines


def timings_table(steps: list[dict[str, Any]], width: int | None = None) -> Any:
    """Per tuned step: every candidate's measured time, the chosen one first and in bold."""
    rows = []
    for s in steps:
        times = s["timings_ms"] or {}
        if not times:
            continue
        ranked = sorted(times, key=lambda k: (k != s["kernel"], times[k]))
        cells = ", ".join(f"[bold]{k} {times[k]:.4f}[/]" if k == s["kernel"] else f"{k} {times[k]:.4f}" for k in ranked)
        untimed = [k for k in s["candidates"] if k not in times]
        if untimed:
            cells += f" (failed or disagreed: {', '.join(untimed)})"
        copy = s.get("concat_copy_ms")
        rows.append([str(s["index"]), escape(s.get("module") or s["name"]), cells,
                     "-" if copy is None else f"{copy:.4f}"])
    columns = [Column("#", 9, "right"), Column("module", 8),
               Column("candidates, ms (chosen first, in bold)", 9, flexible=True), Column("cat copy ms", 3, "right")]
    return fitted_table(columns, rows, title="kernel timings", width=width)


def no_timings_line(build: dict[str, Any]) -> str:
    """Why an engine has no timings, instead of an empty table."""
    where = build.get("device_type") or "cpu"
    if where != "cuda":
        why = (f"this engine was built on the {where}, and kiln times candidate kernels only when building "
               "on a CUDA GPU")
    else:
        why = "no step of this engine had more than one candidate kernel, or tuning was turned off (tune=False)"
    return f"kernel timings: none recorded: {why}; each step runs the catalog's default kernel."


def signer_line(signer: str | None, verified: bool) -> str:
    if not signer:
        return "signed by: nobody (an unsigned file; kiln build --sign-key KEY signs one)"
    how = "verified with a --trusted-key" if verified else "not verified: pass --trusted-key PUBLIC_KEY to check it"
    return f"signed by: {escape(signer)} ({how})"


def summary_lines(info: dict[str, Any]) -> list[str]:
    m, b = info["memory"], info["build"]
    dims = dims_line(info)
    lines = [dims] if dims else []
    lines += [
        f"memory plan: arena [bold]{m['arena_bytes'] / 2**20:.2f} MiB[/] for "
        f"{m['planned_buffers']} buffers totalling {m['activation_bytes'] / 2**20:.2f} MiB of activations "
        f"({m['reuse_ratio'] or '-'}x reuse; peak live {m['peak_live_bytes'] / 2**20:.2f} MiB; "
        f"{m['heap_bytes'] / 2**20:.2f} MiB allocated by ops outside the arena)"
    ]
    t = b.get("tensorrt")
    if t:
        outside = "".join(f"\n  - {escape(o['op'])} at {escape(o['source'])}: {escape(o['reason'])}"
                          for o in t["outside"])
        lines.append(
            f"tensorrt: {t['flavor']} {t['version']}, {len(t['regions'])} region(s), "
            f"{t['ops_converted']}/{t['ops_total']} ops; {len(t['outside'])} op(s) on kiln's kernels{outside}"
        )
    passes = " → ".join(f"{p['pass']} ({p['ops']} ops)" for p in b.get("passes", []))
    rewrites = ", ".join(f"{name} ×{n}" for name, n in b.get("capture_rewrites", {}).items()) or "none"
    st = b.get("streams") or {}
    side = f"{st.get('side_branches', 0)} side branch(es), {'used' if st.get('used') else 'not used'}"
    if "side_stream_ms" in st:
        side += f" (timed at build: {st['side_stream_ms']:.4f} ms with, {st['single_stream_ms']:.4f} ms without)"
    cc = b.get("compute_capability")
    lines.append(
        f"build: kiln {b['kiln_version']}, torch {b['torch_version']}, {escape(str(b['device_name']))}"
        + (f" (compute capability {cc[0]}.{cc[1]})" if cc else "")
        + f", {b['precision']} (asked {b['precision_requested']}), {b['build_seconds']} s on {b['created']}\n"
        f"capture rewrites: {rewrites}\npasses: {passes}\nstreams: {side}"
    )
    lines.append(signer_line(info.get("signer"), info.get("signer_verified", False)))
    return lines
