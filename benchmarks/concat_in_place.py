"""What concatenation elimination saves: one engine with the cats done in place, one with
the planner's elimination switched off (same kernel choices, from one timing cache), timed
side by side in one process.

    python benchmarks/concat_in_place.py squeezenet1_1 --batch 1,32 --precision fp16
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import ab_args
import torch

import kiln
from kiln import zoo
from kiln.plan import planner as plan
from kiln.timing import measure


def build(name: str, batch: int, precision: str, cache: Path, in_place: bool) -> kiln.Engine:
    entry = zoo.create(name, batch=batch)
    config = kiln.BuildConfig(precision=precision, device="cuda", timing_cache=str(cache), model_name=name)
    if in_place:
        return kiln.build(entry.model, entry.example_inputs, config=config)
    with mock.patch.object(plan._Planner, "concat_in_place", lambda self, node, slot: False):
        return kiln.build(entry.model, entry.example_inputs, config=config)


def main() -> None:
    args = ab_args.parse(__doc__.splitlines()[0])
    device = torch.device("cuda")
    print("| model | batch | cats | in place | copy kept ms | in place ms | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "timing-cache.json"
        for name in args.models:
            for batch in (int(b) for b in args.batch.split(",")):
                engines = {flag: build(name, batch, args.precision, cache, flag) for flag in (False, True)}
                inputs = [x.to(device) for x in zoo.create(name, batch=batch).example_inputs]
                ms = {}
                with torch.inference_mode():
                    for flag, engine in engines.items():
                        run = lambda e=engine, xs=inputs: e(*xs)  # noqa: E731
                        ms[flag] = measure(run, device, warmup=20, iters=args.iters).median
                cats = [s for s in engines[True].plan["steps"] if s["op"] == "aten.cat.default"]
                in_place = sum(s["kernel"] == "planner.concat_in_place" for s in cats)
                print(f"| {name} | {batch} | {len(cats)} | {in_place} | {ms[False]:.3f} | {ms[True]:.3f} "
                      f"| {ms[False] / ms[True]:.3f}× |")


if __name__ == "__main__":
    main()
