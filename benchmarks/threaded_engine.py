"""One engine called from many threads: how many outputs differ from the single-thread output
for the same input (issue 10's check), and the calls per second with 1 and N threads.

    python benchmarks/threaded_engine.py resnet18 --threads 8 --calls 1000 --device cuda --precision fp16
    python benchmarks/threaded_engine.py resnet18 --threads 8 --device cuda --own-streams --max-contexts 4
    python benchmarks/threaded_engine.py resnet18 --threads 8 --calls 50 --device cpu --input-shape 3,64,64

Each call gets its own input (a pool of --distinct inputs, used round-robin with an offset per
thread, so neighbouring calls and threads always differ). An output counts as wrong when it is
not bitwise equal to the single-threaded result for its input; where the engine is not bitwise
reproducible single-threaded (atomics in a reduction), when it differs by more than twice the
single-thread run-to-run spread (the report says which).
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import kiln
from kiln import zoo


def leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    if hasattr(out, "to_tuple"):
        return [t for v in out.to_tuple() for t in leaves(v)]
    return [t for v in out for t in leaves(v)]


def diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(leaves(a), leaves(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200, help="calls per thread")
    parser.add_argument("--distinct", type=int, default=64, help="distinct inputs")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-shape", help="e.g. 3,64,64 (zoo default otherwise)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--max-contexts", type=int, default=None)
    parser.add_argument("--own-streams", action="store_true", help="CUDA: each thread calls on a stream of its own")
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.input_shape.split(",")) if args.input_shape else None
    entry = zoo.create(args.model, batch=args.batch, input_shape=shape)
    device = torch.device(args.device)
    example = [x.to(device) for x in entry.example_inputs]
    engine = kiln.build(entry.model.to(device), example, precision=args.precision, device=args.device)
    if args.max_contexts is not None:
        engine.max_contexts = args.max_contexts
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = []
    for _ in range(args.distinct):
        inputs.append(tuple(
            (torch.randn(x.shape, generator=gen, dtype=x.dtype) if x.is_floating_point()
             else torch.randint(0, int(x.max()) + 1, x.shape, generator=gen, dtype=x.dtype)).to(device)
            for x in example
        ))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        expected = [engine(*x) for x in inputs]
        again = [engine(*x) for x in inputs]
    spread = max(diff(a, b) for a, b in zip(expected, again))

    def thread(t: int, start: threading.Barrier) -> list[tuple[int, object]]:
        stream = torch.cuda.Stream(device) if args.own_streams and device.type == "cuda" else None
        start.wait()
        with torch.inference_mode(), torch.cuda.stream(stream):
            out = [((t * 7 + i) % len(inputs), engine(*inputs[(t * 7 + i) % len(inputs)])) for i in range(args.calls)]
        if stream is not None:
            stream.synchronize()
        return out

    def run(threads: int) -> tuple[list, float]:
        start = threading.Barrier(threads)
        sync()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            results = [r for rs in pool.map(lambda t: thread(t, start), range(threads)) for r in rs]
        sync()
        return results, time.perf_counter() - t0

    single, single_s = run(1)
    many, many_s = run(args.threads)
    wrong = sum((diff(out, expected[i]) > 2 * spread) if spread else
                not all(torch.equal(a, b) for a, b in zip(leaves(out), leaves(expected[i])))
                for i, out in many)
    worst = max(diff(out, expected[i]) for i, out in many)
    # fresh contexts, one after another on this thread: does a context alone change the answer?
    with torch.inference_mode():
        fresh = [engine.create_context() for _ in range(2)]
        per_context = [[ctx(*x) for x in inputs[:8]] for ctx in fresh]
    context_diff = max(diff(a, expected[i]) for outs in per_context for i, a in enumerate(outs))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    streams = " (a stream each)" if args.own_streams else ""
    print(f"{args.model} {args.precision} on {engine.device} ({where}), "
          f"{args.threads} threads x {args.calls} calls{streams}: {wrong} of {len(many)} outputs wrong "
          f"({'bitwise' if not spread else f'beyond 2x the single-thread spread {spread:.3g}'})")
    print(f"  largest difference from the single-thread output: {worst:.3g}; "
          f"two fresh contexts called in turn differ from it by up to {context_diff:.3g}")
    contexts = getattr(engine, "contexts", None)  # (None: a kiln without execution contexts)
    if contexts is not None:
        print(f"  contexts: {len(contexts)} x {engine.context_bytes / 2**20:.1f} MiB (arena + static inputs); "
              f"graph pools (bytes): {[c.graph_pool_bytes for c in contexts]}")
    print(f"  1 thread: {len(single) / single_s:.1f} calls/s; {args.threads} threads: {len(many) / many_s:.1f} calls/s")


if __name__ == "__main__":
    main()
