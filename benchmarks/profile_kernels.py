"""Where the GPU time goes: the top CUDA kernels of a kiln engine beside eager PyTorch.

    python benchmarks/profile_kernels.py bert-base --batch 32 --precision fp16
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import kiln
from kiln import zoo
from kiln.builder import PRECISIONS


def top_kernels(fn, rows: int) -> str:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    dtype = PRECISIONS[args.precision]
    entry = zoo.create(args.model, batch=args.batch)
    inputs = [x.cuda() for x in entry.example_inputs]
    engine = kiln.build(entry.model.cuda(), inputs, precision=args.precision, device="cuda")
    engine.use_cuda_graph = False
    eager = entry.model.to(dtype)
    eager_inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    with torch.inference_mode():
        print(f"== kiln {args.model} batch {args.batch} {args.precision}: {len(engine.plan['steps'])} steps")
        print(top_kernels(lambda: engine(*inputs), args.rows))
        print(f"== eager {args.model}")
        print(top_kernels(lambda: eager(*eager_inputs), args.rows))


if __name__ == "__main__":
    main()
