"""The `kiln` command line: build, run, inspect (and the commands other modules add)."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kiln.cli.common import console, fail, parse_shape

app = typer.Typer(
    help="kiln: build a PyTorch model into an inference engine file and run it fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)




class _StageDisplay:
    """Shows each build stage with a spinner while it runs and its time when done."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with console.status(f"[bold]{name}[/]…"):
            yield
        console.print(f"  [green]✓[/] {name:<16} {time.perf_counter() - t0:7.2f} s")




@app.command()
def build(
    model: str = typer.Argument(..., help="Zoo name (kiln zoo lists them) or path/to/file.py:factory."),
    output: Path = typer.Option(None, "-o", "--output", help="Engine file to write [default: MODEL.kiln]."),
    precision: str = typer.Option("fp16", help="fp32, fp16 or bf16 (fp16/bf16 need a CUDA GPU)."),
    device: str = typer.Option(None, help="cuda or cpu [default: cuda when available]."),
    batch: int = typer.Option(1, help="Batch size the engine is built for."),
    input_shape: str = typer.Option(None, help="Per-sample input shape, e.g. 3,224,224 (or 128 for BERT)."),
    backend: str = typer.Option("kiln", help="kiln, or tensorrt: supported regions run as TensorRT engines."),
    require_full: bool = typer.Option(False, help="With --backend tensorrt: fail unless every op converts."),
    timing_cache: Path = typer.Option(None, help="Kernel timing cache (default: ~/.cache/kiln/timing-cache.json)."),
    exact: bool = typer.Option(False, help="No approximate kernels (such as tanh-GELU for exact GELU in fp16)."),
    streams: str = typer.Option("auto", help="Side streams for independent branches: auto (kept where timed "
                                "faster at build), on or off."),
) -> None:
    """Build MODEL into an engine file."""
    import torch

    from kiln import zoo
    from kiln.builder import BuildConfig
    from kiln.builder import build as build_engine
    from kiln.errors import KilnError, KilnWarning

    try:
        entry = zoo.resolve(model, batch=batch, input_shape=parse_shape(input_shape))
    except (KilnError, ValueError, FileNotFoundError) as exc:
        raise fail(exc) from None
    if not entry.pretrained:
        console.print(f"[yellow]note:[/] {entry.note}")
    if device is None and not torch.cuda.is_available():
        console.print("[yellow]note:[/] no CUDA GPU here: building and running on the CPU")
    target = output or Path(f"{Path(model.split(':')[-1]).stem}.kiln")
    config = BuildConfig(precision=precision, device=device, model_name=entry.name, backend=backend,
                         require_full=require_full, timing_cache=None if timing_cache is None else str(timing_cache),
                         exact=exact, streams=streams, extra_info={"pretrained": entry.pretrained})
    console.print(f"building [bold]{entry.name}[/] (batch {batch}, {precision})")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KilnWarning)
        try:
            display = _StageDisplay()
            engine = build_engine(entry.model, entry.example_inputs, config=config, reporter=display)
            with display.stage("write"):
                engine.save(target)
        except (KilnError, ValueError) as exc:
            raise fail(exc) from None
    for w in caught:
        if issubclass(w.category, KilnWarning):
            console.print(f"[yellow]note:[/] {w.message}")
    size = target.stat().st_size / 2**20
    console.print(
        f"wrote [bold]{target}[/] ({size:.1f} MiB, {len(engine.plan['steps'])} steps, "
        f"{engine.build_info['precision']} on {engine.device}) in {time.perf_counter() - t0:.1f} s"
    )


def _inputs(engine: Any, files: list[Path] | None, seed: int) -> list[Any]:
    import numpy as np
    import torch

    if files:
        if len(files) != len(engine.inputs):
            raise typer.BadParameter(f"the engine takes {len(engine.inputs)} input(s), got {len(files)} --input")
        return [torch.from_numpy(np.load(f, allow_pickle=False)).to(engine.device) for f in files]
    gen = torch.Generator().manual_seed(seed)
    ranges = engine.build_info.get("input_ranges") or [None] * len(engine.inputs)
    out = []
    for spec, rng in zip(engine.inputs, ranges):
        if spec.dtype.is_floating_point:
            x = torch.randn(spec.shape, generator=gen).to(spec.dtype)
        elif spec.dtype == torch.bool:
            x = torch.rand(spec.shape, generator=gen) > 0.5
        else:
            low, high = rng if rng else (0, 1)
            x = torch.randint(low, high + 1, spec.shape, generator=gen, dtype=spec.dtype)
        out.append(x.to(engine.device))
    return out


def _leaves(value: Any, prefix: str = "output") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


@app.command()
def run(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="Engine file written by kiln build."),
    input: list[Path] = typer.Option(None, "--input", help=".npy file per input, in order (repeat)."),
    random: bool = typer.Option(False, "--random", help="Random inputs (the default when no --input)."),
    benchmark: bool = typer.Option(False, "--benchmark", help="Time the engine: median/p90 latency."),
    profile: int = typer.Option(0, "--profile", help="Show the N slowest steps (timed one by one)."),
    iters: int = typer.Option(100, help="Timed iterations for --benchmark."),
    warmup: int = typer.Option(20, help="Untimed iterations before timing."),
    device: str = typer.Option(None, help="Device to load onto [default: the kind it was built for]."),
    seed: int = typer.Option(0, help="Seed for random inputs."),
) -> None:
    """Run an engine on inputs and summarize its outputs (optionally benchmark it)."""
    import torch

    from kiln import load
    from kiln.errors import KilnError
    from kiln.timing import measure

    try:
        engine = load(engine_path, device=device)
        inputs = _inputs(engine, None if random else input, seed)
        with torch.inference_mode():
            result = engine(*inputs)
    except (KilnError, ValueError, OSError) as exc:
        raise fail(exc) from None
    console.print(engine.summary())
    table = Table("output", "shape", "dtype", "min", "max", "mean", "top-5 (last dim)")
    for name, t in _leaves(result):
        if not isinstance(t, torch.Tensor):
            table.add_row(name, "-", type(t).__name__, "", "", "", "")
            continue
        f = t.float()
        top = ""
        if t.dim() == 2 and t.shape[-1] >= 5:
            top = ", ".join(str(i) for i in f[0].topk(5).indices.tolist())
        table.add_row(name, str(tuple(t.shape)), str(t.dtype).removeprefix("torch."),
                      f"{f.min():.4g}", f"{f.max():.4g}", f"{f.mean():.4g}", top)
    console.print(table)
    if profile:
        with torch.inference_mode():
            rows = engine.profile(*inputs)
        prof = Table("step", "op", "kernel", "ms", "output shape", "stride", title=f"{profile} slowest steps")
        for r in rows[:profile]:
            prof.add_row(r["step"], r["op"], r["kernel"], f"{r['ms']:.4f}", str(r["shape"]), str(r["stride"]))
        console.print(prof)
        console.print(f"sum of step times: {sum(r['ms'] for r in rows):.3f} ms over {len(rows)} steps")
    if benchmark:
        with torch.inference_mode():
            lat = measure(lambda: engine(*inputs), engine.device, warmup=warmup, iters=iters)
        batch = engine.inputs[0].shape[0] if engine.inputs and engine.inputs[0].shape else 1
        console.print(
            f"latency over {iters} runs on {engine.device} ({engine.build_info['device_name']}): "
            f"median [bold]{lat.median:.3f} ms[/], p90 {lat.p90:.3f} ms, p99 {lat.p99:.3f} ms; "
            f"throughput {batch / lat.median * 1e3:.1f} items/s (batch {batch})"
        )


def _timings_table(steps: list[dict]) -> Table:
    """Per tuned step: every candidate's measured time, the chosen one first and in bold."""
    table = Table("#", "step", "candidates, ms (chosen in bold)", "cat copy ms", title="kernel timings")
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
        table.add_row(str(s["index"]), s["name"], cells, "-" if copy is None else f"{copy:.4f}")
    return table


@app.command()
def inspect(
    engine_path: Path = typer.Argument(..., metavar="ENGINE"),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    device: str = typer.Option(None, help="Device to load onto [default: the kind it was built for]."),
    timings: bool = typer.Option(False, "--timings", help="Also list each tuned step's candidates and times."),
) -> None:
    """Show an engine's inputs/outputs, steps (op, kernel, precision, shape), memory plan and build info;
    with --timings, the candidate kernels timed for each step."""
    from kiln import load
    from kiln.cli.describe import describe
    from kiln.errors import KilnError

    try:
        info = describe(load(engine_path, device=device))
    except KilnError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(info, indent=2))
        return
    io = Table("", "name", "shape", "dtype", title="inputs and outputs")
    for kind, specs in (("in", info["inputs"]), ("out", info["outputs"])):
        for s in specs:
            io.add_row(kind, s["name"], str(tuple(s["shape"])), s["dtype"])
    console.print(io)
    steps = Table("#", "step", "op", "kernel", "precision", "output shape", "memory", title="steps")
    for column in steps.columns:
        column.overflow = "fold"
    for s in info["steps"]:
        steps.add_row(str(s["index"]), s["name"], s["op"], s["kernel"], str(s["precision"]),
                      str(tuple(s["output_shape"] or ())), str(s["memory"]))
    console.print(steps)
    if timings:
        console.print(_timings_table(info["steps"]))
    m = info["memory"]
    console.print(
        f"memory plan: arena [bold]{m['arena_bytes'] / 2**20:.2f} MiB[/] for "
        f"{m['planned_buffers']} buffers totalling {m['activation_bytes'] / 2**20:.2f} MiB of activations "
        f"({m['reuse_ratio'] or '-'}x reuse; peak live {m['peak_live_bytes'] / 2**20:.2f} MiB; "
        f"{m['heap_bytes'] / 2**20:.2f} MiB allocated by ops outside the arena)"
    )
    b = info["build"]
    t = b.get("tensorrt")
    if t:
        outside = "".join(f"\n  - {o['op']} at {o['source']}: {o['reason']}" for o in t["outside"])
        console.print(
            f"tensorrt: {t['flavor']} {t['version']}, {len(t['regions'])} region(s), "
            f"{t['ops_converted']}/{t['ops_total']} ops; {len(t['outside'])} op(s) on kiln's kernels{outside}"
        )
    passes = " → ".join(f"{p['pass']} ({p['ops']} ops)" for p in b.get("passes", []))
    rewrites = ", ".join(f"{name} ×{n}" for name, n in b.get("capture_rewrites", {}).items()) or "none"
    st = b.get("streams") or {}
    side = f"{st.get('side_branches', 0)} side branch(es), {'used' if st.get('used') else 'not used'}"
    if "side_stream_ms" in st:
        side += f" (timed at build: {st['side_stream_ms']:.4f} ms with, {st['single_stream_ms']:.4f} ms without)"
    console.print(
        f"build: kiln {b['kiln_version']}, torch {b['torch_version']}, {b['device_name']} "
        f"(compute capability {b['compute_capability']}), {b['precision']} "
        f"(asked {b['precision_requested']}), {b['build_seconds']} s on {b['created']}\n"
        f"capture rewrites: {rewrites}\npasses: {passes}\nstreams: {side}"
    )


@app.command(name="zoo")
def list_zoo() -> None:
    """List the model names `kiln build` accepts."""
    from kiln import zoo

    console.print(" ".join(zoo.names()))


def _add_commands() -> None:
    """Commands defined beside the features they drive."""
    from kiln.cli.bench import bench_command, predict_command
    from kiln.cli.onnx import export_onnx_command, trt_check_command

    app.command("bench")(bench_command)
    app.command("predict")(predict_command)
    app.command("export-onnx")(export_onnx_command)
    app.command("trt-check")(trt_check_command)
    app.command("serve")(__import__("kiln.cli.serve", fromlist=["serve_command"]).serve_command)


_add_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
