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


def kernels_by_step(engine, inputs, rows: int, find: str | None = None) -> str:
    """Each plan step's CUDA time and the kernels it launched, slowest steps first."""
    from torch.profiler import record_function

    steps, specs = engine.create_context().steps, engine.plan["steps"]  # one context's bound steps
    bound = [x.to(s.dtype).contiguous() for x, s in zip(inputs, engine.graph_inputs)]

    def run(watch: int | None = None) -> list[str]:
        vals = [None] * len(engine.plan["slots"])
        vals[: len(bound)] = bound
        kernels: list[str] = []
        for i, step in enumerate(steps):
            if i != watch:
                with record_function(f"step{i}"):
                    step(vals)
                continue
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step(vals)
                torch.cuda.synchronize()
            kernels = [f"{e.key[:90]} {e.device_time_total:.1f}us" for e in prof.key_averages()
                       if e.device_time_total > 0]
        return kernels

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    times = {int(e.key[4:]): e.device_time_total for e in prof.key_averages()
             if e.key.startswith("step") and e.key[4:].isdigit()}
    lines = []
    chosen = sorted(times.items(), key=lambda kv: -kv[1])[:rows]
    if find:  # the steps that launch a kernel whose name contains `find`
        chosen = [(i, us) for i, us in sorted(times.items()) if any(find in k for k in run(watch=i))][:rows]
    for i, us in chosen:
        spec = specs[i]
        out = engine.plan["slots"][spec["outputs"][0]] if spec["outputs"] else {}
        lines.append(f"{us:8.1f}us  #{i} {spec['op']} [{spec['kernel']}] {out.get('shape')} {out.get('stride')}")
        lines += [f"              {k}" for k in run(watch=i)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--compile", action="store_true", help="also profile torch.compile (default mode)")
    parser.add_argument("--steps", action="store_true", help="also list kiln's steps with the kernels each launched")
    parser.add_argument("--find", help="with --steps: list the steps launching a kernel whose name contains this")
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
        if args.steps:
            print(f"== kiln {args.model}: slowest steps and their kernels")
            print(kernels_by_step(engine, inputs, args.rows, args.find))
        print(f"== eager {args.model}")
        print(top_kernels(lambda: eager(*eager_inputs), args.rows))
        if args.compile:
            compiled = torch.compile(eager)
            print(f"== torch.compile {args.model}")
            print(top_kernels(lambda: compiled(*eager_inputs), args.rows))


if __name__ == "__main__":
    main()
