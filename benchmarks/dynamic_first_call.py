"""First call at a new size, and peak memory at max, for a dynamic-shape engine on CUDA
(issue 13 targets: first call at a new size <= 50 ms; peak memory at max <= the static
engine's at max + 10%; docs/dynamic-shapes.md).

Builds the zoo model once as a dynamic engine (--batch MIN:OPT:MAX, optional --seq) and as a
static engine at max, saves both, then measures each phase in a fresh process (cuDNN's plan
caches are per process and per thread, so each phase starts cold, as a new server would):

- `first-call` with pad_while_capturing on, then off: load (timed: on, it captures opt and
  max), 3 calls at opt, then per new size: the 1st call (on: padded to a larger graph), the
  2nd, the time until the background warm-up is ready, the 3rd (on: captures the exact graph
  with one warm-up run), the 4th (a replay), and the largest difference between the 1st and
  the 4th answer (padded vs exact).
- `memory`: torch.cuda.max_memory_allocated from before load (peak stats reset, so the arena
  allocated at load counts) over 10 calls at max, for the static engine, the dynamic engine
  with pad_while_capturing on (captures opt and max at load) and off.

    python benchmarks/dynamic_first_call.py resnet50 --batch 1:8:64 --sizes 3,5,17,33 --precision fp16
    python benchmarks/dynamic_first_call.py bert-base --batch 1:8:64 --sizes 1,3,17 --precision fp16

Prints a table and, with --json PATH, writes the numbers. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _inputs(engine: Any, examples: tuple, batch: int) -> tuple:
    from kiln.bench.runner import resized_inputs

    dim = next(iter(engine.dims)) if "batch" not in engine.dims else "batch"
    return tuple(x.cuda() for x in resized_inputs(examples, engine.input_shapes_at(**{dim: batch})))


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, out


def _flat(out: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def phase_first_call(work: Path, pad: bool, sizes: list[int]) -> dict[str, Any]:
    import kiln

    examples = torch.load(work / "examples.pt")
    load_ms, engine = _timed(kiln.load, work / "dynamic.kiln", pad_while_capturing=pad)
    opt = engine.dims["batch"].opt
    x = _inputs(engine, examples, opt)
    for _ in range(3):
        engine(*x)
    rows = []
    for n in sizes:
        x = _inputs(engine, examples, n)
        padded_before = sum(c.padded_calls for c in engine.contexts)
        first, out1 = _timed(engine, *x)
        padded = sum(c.padded_calls for c in engine.contexts) > padded_before
        second, _ = _timed(engine, *x)
        key = engine.binding_key(x)
        t0 = time.perf_counter()
        while engine.warm_status(key) == "running" and time.perf_counter() - t0 < 120:
            time.sleep(0.002)
        ready_ms = (time.perf_counter() - t0) * 1e3
        third, _ = _timed(engine, *x)
        fourth, out4 = _timed(engine, *x)
        diff = max((float((a.float() - b.float()).abs().max()) for a, b in zip(_flat(out1), _flat(out4))),
                   default=0.0)
        rows.append({"batch": n, "padded": padded, "first_ms": first, "second_ms": second,
                     "warm_status": engine.warm_status(key), "waited_for_warmup_ms": ready_ms,
                     "third_ms": third, "fourth_ms": fourth, "max_abs_diff_first_vs_fourth": diff})
    return {"phase": "first-call", "pad_while_capturing": pad, "load_ms": load_ms, "rows": rows,
            "device": torch.cuda.get_device_name()}


def phase_memory(work: Path, which: str) -> dict[str, Any]:
    import kiln

    examples = torch.load(work / "examples.pt")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    path, pad = {"static": ("static.kiln", True), "dynamic": ("dynamic.kiln", True),
                 "dynamic-nopad": ("dynamic.kiln", False)}[which]
    engine = kiln.load(work / path, pad_while_capturing=pad)
    if engine.dims:
        x = _inputs(engine, examples, engine.dims["batch"].max)
    else:
        x = tuple(torch.load(work / "examples_max.pt"))
        x = tuple(t.cuda() for t in x)
    for _ in range(10):
        engine(*x)
    torch.cuda.synchronize()
    return {"phase": "memory", "engine": which, "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
            "reserved_mib": torch.cuda.memory_reserved() / 2**20,
            "arena_mib": engine.plan["memory"]["arena_bytes"] / 2**20}


def build(args: argparse.Namespace, work: Path) -> None:
    import kiln
    from kiln.bench.runner import at_opt, resized_inputs
    from kiln.cli.common import dynamic_shapes_for
    from kiln.shapes import Dim
    from kiln.zoo import resolve

    batch = Dim.parse("batch", args.batch)
    seq = Dim.parse("seq", args.seq) if args.seq else None
    entry = resolve(args.model, 1)
    dynamic_shapes = dynamic_shapes_for(entry.example_inputs, batch, seq)
    examples = at_opt(entry.model, entry.example_inputs, dynamic_shapes)
    config = kiln.BuildConfig(precision=args.precision, device="cuda", model_name=entry.name)
    engine = kiln.build(entry.model, examples, config=config, dynamic_shapes=dynamic_shapes)
    engine.save(work / "dynamic.kiln")
    at_max = resized_inputs(examples, engine.input_shapes_at(batch=batch.max))
    torch.save(tuple(x.cpu() for x in examples), work / "examples.pt")
    torch.save(tuple(x.cpu() for x in at_max), work / "examples_max.pt")
    print(f"dynamic engine: paddable {engine.paddable}, pad targets {engine.pad_targets()}", flush=True)
    del engine
    static = kiln.build(entry.model, at_max, config=config)
    static.save(work / "static.kiln")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", default="1:8:64")
    parser.add_argument("--seq", default=None, help="MIN:OPT:MAX for token inputs (not padded: another seq is "
                                                     "never answered by padding)")
    parser.add_argument("--sizes", default="3,5,17,33")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--arg", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.phase:  # a child process: one measurement, one JSON line
        work = Path(args.work)
        result = (phase_first_call(work, args.arg == "on", sizes) if args.phase == "first-call"
                  else phase_memory(work, args.arg))
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build(args, Path(tmp))
        for phase, arg in (("first-call", "on"), ("first-call", "off"), ("memory", "static"),
                           ("memory", "dynamic"), ("memory", "dynamic-nopad")):
            cmd = [sys.executable, __file__, args.model, "--batch", args.batch, "--sizes", args.sizes,
                   "--phase", phase, "--work", tmp, "--arg", arg]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"{phase} {arg} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}", flush=True)
                continue
            results.append(json.loads(lines[-1][len("RESULT "):]))
    for r in results:
        if r["phase"] == "first-call":
            print(f"\npad_while_capturing={r['pad_while_capturing']} on {r['device']}: load {r['load_ms']:.0f} ms")
            print("batch padded  1st ms  2nd ms  warm-up wait ms  3rd ms  4th ms  max |1st-4th|")
            for row in r["rows"]:
                print(f"{row['batch']:5d} {row['padded']!s:6} {row['first_ms']:7.2f} {row['second_ms']:7.2f} "
                      f"{row['waited_for_warmup_ms']:16.1f} {row['third_ms']:7.2f} {row['fourth_ms']:7.2f} "
                      f"{row['max_abs_diff_first_vs_fourth']:.3g}")
    memory = {r["engine"]: r for r in results if r["phase"] == "memory"}
    if memory:
        print("\npeak memory at max (MiB, from before load):")
        for name, r in memory.items():
            ratio = f"  {r['peak_mib'] / memory['static']['peak_mib']:.3f} x static" if "static" in memory else ""
            print(f"  {name:14s} {r['peak_mib']:9.1f}  (arena {r['arena_mib']:.1f}){ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
