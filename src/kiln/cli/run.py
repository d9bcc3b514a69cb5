"""`kiln run ENGINE`: run an engine on inputs, summarize its outputs; --benchmark, --profile N."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from kiln.cli.app import command
from kiln.cli.common import Column, console, fail, fitted_table, load_device_option, open_engine, trusted_key_option


def random_inputs(engine: Any, seed: int) -> list[Any]:
    """Seeded inputs of the engine's shapes and dtypes (integer inputs within the ranges it was built with)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ranges = engine.build_info.get("input_ranges") or [None] * len(engine.inputs)
    out = []
    shapes = engine.input_shapes_at() if getattr(engine, "dims", None) else [s.shape for s in engine.inputs]  # opt
    for spec, shape, rng in zip(engine.inputs, shapes, ranges):
        if spec.dtype.is_floating_point:
            x = torch.randn(shape, generator=gen).to(spec.dtype)
        elif spec.dtype == torch.bool:
            x = torch.rand(shape, generator=gen) > 0.5
        else:
            low, high = rng if rng else (0, 1)
            x = torch.randint(low, high + 1, shape, generator=gen, dtype=spec.dtype)
        out.append(x.to(engine.device))
    return out


def _npy_inputs(engine: Any, files: list[Path]) -> list[Any]:
    import numpy as np
    import torch

    if len(files) != len(engine.inputs):
        raise fail(f"the engine takes {len(engine.inputs)} input(s), got {len(files)} --input")
    out = []
    for f in files:
        try:
            array = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise fail(f"--input {f}: not a .npy array ({exc})") from None
        out.append(torch.from_numpy(array).to(engine.device))
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


@command("run")
def run(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="Engine file written by kiln build."),
    input: list[Path] = typer.Option(
        None, "--input", metavar="FILE", exists=True, dir_okay=False, show_default="random inputs",
        help=".npy file per input, in order (repeat).",
    ),
    random: bool = typer.Option(False, "--random", help="Random inputs (the default when no --input)."),
    benchmark: bool = typer.Option(False, "--benchmark", help="Time the engine: median/p90 latency."),
    profile: int = typer.Option(0, "--profile", metavar="N", min=0, help="Show the N slowest steps (timed one by "
                                "one)."),
    iters: int = typer.Option(100, "--iters", metavar="N", min=1, help="Timed iterations for --benchmark."),
    warmup: int = typer.Option(20, "--warmup", metavar="N", min=0, help="Untimed iterations before timing."),
    device: str = load_device_option(),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed for random inputs."),
    trusted_key: list[Path] = trusted_key_option(),
) -> None:
    """Run an engine and summarize its outputs.

    --benchmark times it, --profile N lists its N slowest steps. Inputs are .npy files
    (--input, one per engine input) or seeded random tensors.
    """
    import torch

    from kiln.errors import KilnError
    from kiln.timing import measure

    engine = open_engine(engine_path, device, trusted_key)
    inputs = random_inputs(engine, seed) if random or not input else _npy_inputs(engine, input)
    try:
        with torch.inference_mode():
            result = engine(*inputs)
    except (KilnError, ValueError) as exc:
        raise fail(exc) from None
    console.print(escape(engine.summary()))
    rows = []
    for name, t in _leaves(result):
        if not isinstance(t, torch.Tensor):
            rows.append([name, "-", type(t).__name__, "", "", "", ""])
            continue
        f = t.float()
        top = ""
        if t.dim() == 2 and t.shape[-1] >= 5:
            top = ", ".join(str(i) for i in f[0].topk(5).indices.tolist())
        rows.append([name, str(tuple(t.shape)), str(t.dtype).removeprefix("torch."),
                     f"{f.min():.4g}", f"{f.max():.4g}", f"{f.mean():.4g}", top])
    columns = [Column("output", 9), Column("shape", 8), Column("dtype", 6), Column("min", 4, "right"),
               Column("max", 4, "right"), Column("mean", 4, "right"), Column("top-5 (last dim)", 2)]
    console.print(fitted_table(columns, rows))
    if profile:
        with torch.inference_mode():
            steps = engine.profile(*inputs)
        modules = {s["name"]: s.get("module") for s in engine.plan["steps"]}
        rows = [[escape(modules.get(r["step"]) or f"({r['step']})"), escape(r["op"].removesuffix(".default")),
                 escape(r["kernel"]), f"{r['ms']:.4f}", str(r["shape"]), str(r["stride"])]
                for r in steps[:profile]]
        columns = [Column("module", 7), Column("op", 6), Column("kernel", 8), Column("ms", 9, "right"),
                   Column("output shape", 3), Column("stride", 1)]
        console.print(fitted_table(columns, rows, title=f"{profile} slowest steps"))
        console.print(f"sum of step times: {sum(r['ms'] for r in steps):.3f} ms over {len(steps)} steps")
    if benchmark:
        with torch.inference_mode():
            lat = measure(lambda: engine(*inputs), engine.device, warmup=warmup, iters=iters)
        batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
        console.print(
            f"latency over {iters} runs on {engine.device} ({escape(engine.build_info['device_name'])}): "
            f"median [bold]{lat.median:.3f} ms[/], p90 {lat.p90:.3f} ms, p99 {lat.p99:.3f} ms; "
            f"throughput {batch / lat.median * 1e3:.1f} items/s (batch {batch})"
        )
