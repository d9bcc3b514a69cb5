"""Median latency of a kiln engine beside eager PyTorch, in one process on one GPU.

    python benchmarks/core_latency.py resnet50 --batch 1,32 --precision fp16

The fuller side-by-side benchmark is `kiln bench`; this script is the quick check
quoted in issue notes.
"""

from __future__ import annotations

import argparse

import torch

import kiln
from kiln import zoo
from kiln.builder import PRECISIONS
from kiln.timing import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    dtype = PRECISIONS[args.precision]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} kiln {kiln.__version__}")
    eager_h, kiln_h = f"eager {args.precision}", f"kiln {args.precision}"
    print(f"{'model':<12} {'batch':>5} {eager_h:>14} {kiln_h:>14} {'speed-up':>9} {'build s':>8}")
    for batch in (int(b) for b in args.batch.split(",")):
        entry = zoo.create(args.model, batch=batch)
        inputs = [x.to(device) for x in entry.example_inputs]
        eager_model = entry.model.to(device, dtype)
        eager_inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
        with torch.inference_mode():
            eager = measure(lambda m=eager_model, xs=eager_inputs: m(*xs), device, warmup=20, iters=args.iters)
        engine = kiln.build(entry.model.float(), inputs, precision=args.precision, device="cuda")
        with torch.inference_mode():
            ours = measure(lambda e=engine, xs=inputs: e(*xs), device, warmup=20, iters=args.iters)
        print(
            f"{args.model:<12} {batch:>5} {eager.median:>11.3f} ms {ours.median:>11.3f} ms "
            f"{eager.median / ours.median:>8.2f}x {engine.build_info['build_seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
