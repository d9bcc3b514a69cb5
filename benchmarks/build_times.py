"""Build time with a cold and a warm timing cache, and the op counts before and after the passes.

    python benchmarks/build_times.py resnet50 efficientnet_b0 vit_b_16 bert-base --batch 32

Each model is built twice into the same fresh timing cache: the first build times every
candidate kernel (cold), the second finds them all in the cache (warm). The op counts are
those of the captured graph and of the graph the passes leave (each op becomes one step).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import kiln
from kiln import zoo


def build_once(name: str, batch: int, precision: str, cache: Path) -> dict:
    entry = zoo.create(name, batch=batch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = kiln.BuildConfig(precision=precision, device=device, timing_cache=str(cache), model_name=name)
    engine = kiln.build(entry.model, entry.example_inputs, config=config)
    return engine.header["build"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="fp16")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}, kiln {kiln.__version__}, {args.precision}, batch {args.batch}\n")
    print("| model | cold build s | warm build s | kernel timing, cold s | cache hits (warm) "
          "| ops captured | ops after passes | capture rewrites |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "timing-cache.json"
            cold = build_once(name, args.batch, args.precision, cache)
            warm = build_once(name, args.batch, args.precision, cache)
        passes = cold["passes"]
        hits = (warm.get("timing_cache") or {}).get("hits", "-")
        rewrites = ", ".join(f"{k} ×{v}" for k, v in cold.get("capture_rewrites", {}).items()) or "-"
        print(f"| {name} | {cold['build_seconds']:.1f} | {warm['build_seconds']:.1f} "
              f"| {cold['stage_seconds']['select']:.1f} | {hits} | {passes[0]['ops']} | {passes[-1]['ops']} "
              f"| {rewrites} |", flush=True)


if __name__ == "__main__":
    main()
