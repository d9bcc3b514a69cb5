"""Load test for `kiln serve`: N concurrent clients, requests/s, p50/p99 latency and errors,
optionally with a replica killed mid-run. Every request is accounted for: answered and equal
to the engine called in-process, answered wrong, or failed with the error its client saw
(a client re-sends a request that got a 5xx or no answer up to --retries times, and each
re-send is counted). Nothing may be lost silently: the script exits 1 if any request was
answered wrong or never accounted for.

    python benchmarks/serve_load.py --requests 1000 --clients 16 --replicas 2 --kill-at 0.3
    python benchmarks/serve_load.py --engine resnet50.kiln --binary --clients 64 --requests 5000 \\
        --engine-throughput          # GPU: compare with the engine's own batch throughput

Without --engine it builds a small MLP for the CPU (batch --batch) into a temporary folder.
The server is a local Ray instance on 127.0.0.1, started and stopped by this script.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import kiln
import kiln.serve
from kiln.errors import InputError
from kiln.serve.batching import engine_batching, flat_outputs, run_batched
from kiln.serve.client import Client, ServerError


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", type=Path, help="engine file to serve [default: build a small MLP for the CPU]")
    p.add_argument("--batch", type=int, default=8, help="batch of the MLP built without --engine")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (threads, one connection each)")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes sharing the clients (one Python process saturates near one core: the "
                        "report says how busy each was)")
    p.add_argument("--direct-ingress", action="store_true",
                   help="serve with direct ingress and send each client to a replica's own HTTP port, not the proxy")
    p.add_argument("--rows", type=int, default=1, help="rows (samples) per request on a batched model")
    p.add_argument("--distinct", type=int, default=64, help="distinct request inputs, cycled")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replicas-per-gpu", type=int, default=1,
                   help="CUDA replicas share each GPU this many ways (give --replicas accordingly)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--device", choices=("cpu", "cuda"), help="[default: the kind the engine was built for]")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--binary", action="store_true", help="binary tensor extension instead of JSON data")
    p.add_argument("--kill-at", type=float, default=0.0,
                   help="kill one replica (ray.kill) once this fraction of requests is answered; 0: never")
    p.add_argument("--retries", type=int, default=1, help="re-sends of a request that got a 5xx or no answer")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a client waits for an answer")
    p.add_argument("--request-timeout-s", type=float, default=30.0,
                   help="the server answers a request not done in this time with HTTP 408 (kiln serve's default)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest difference from the engine in-process, relative to the output's largest value, "
                        "that counts as the same answer [default: 0 (bitwise) for a CPU engine; 1e-2 for CUDA, "
                        "where the server's process may pick other cuDNN algorithms than this one]")
    p.add_argument("--engine-throughput", action="store_true",
                   help="also time the engine in-process at its own batch (rows/s) before serving")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    args = p.parse_args()
    if args.kill_at and args.processes > 1:
        p.error("--kill-at counts answers in this process: use it with --processes 1")
    return args


def build_mlp(folder: Path, batch: int) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    ).eval()
    path = folder / "mlp.kiln"
    kiln.build(model, (torch.randn(batch, 64),), device="cpu").save(path)
    return path


def random_input(spec: kiln.specs.TensorSpec, rows: int | None, gen: torch.Generator) -> torch.Tensor:
    shape = tuple(spec.shape) if rows is None else (rows, *spec.shape[1:])
    if spec.dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(spec.dtype)
    if spec.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.zeros(shape, dtype=spec.dtype)  # integer inputs: index 0 is valid for any embedding


@dataclass
class Outcome:
    status: str = "lost"  # ok, wrong, failed (lost: never finished)
    attempts: int = 0
    latency_ms: float | None = None
    errors: list[str] = field(default_factory=list)


def kill_one_replica(model: str) -> str:
    """ray.kill one live replica of `model`; returns its actor name."""
    import ray

    prefix = f"SERVE_REPLICA::{model}#"
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    if not names:
        raise RuntimeError(f"no replica of {model} to kill")
    victim = names[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


def main() -> int:
    args = parse()
    tmp = tempfile.TemporaryDirectory()
    path = args.engine or build_mlp(Path(tmp.name), args.batch)
    name = kiln.serve.model_name(path)

    inputs, references, rows, engine_rows_per_s = in_process(args, path)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    t_start = time.perf_counter()
    served = kiln.serve.run([path], port=args.port, replicas=args.replicas, max_batch=args.max_batch,
                            batch_wait_ms=args.batch_wait_ms, device=args.device,
                            request_timeout_s=args.request_timeout_s or None, direct_ingress=args.direct_ingress,
                            replicas_per_gpu=args.replicas_per_gpu)
    startup_s = time.perf_counter() - t_start
    try:
        results = load(args, served.url, name, inputs, references, served.direct.get(name))
    finally:
        kiln.serve.shutdown(served)
    results.update(engine=str(path), startup_s=round(startup_s, 1), engine_rows_per_s=engine_rows_per_s,
                   rows_per_request=rows or "engine shape")
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if results["wrong"] or results["lost"] else 0


def difference(got: dict, want: dict) -> float:
    """The largest |got - want| over the outputs, relative to each output's largest |want|; inf
    where the outputs' names or shapes differ."""
    if set(got) != set(want):
        return float("inf")
    worst = 0.0
    for k, w in want.items():
        g = got[k]
        if g.shape != w.shape or g.dtype != w.dtype:
            return float("inf")
        if torch.equal(g, w):
            continue
        scale = float(w.double().abs().max()) or 1.0
        worst = max(worst, float((g.double() - w.double()).abs().max()) / scale)
    return worst


def in_process(args: argparse.Namespace, path: Path) -> tuple[list[dict], list[dict], int | None, float | None]:
    """Request inputs, and their references: the engine in-process, on the padded batches the server runs
    (and, with --engine-throughput, the engine's own rows/s at its batch)."""
    engine = kiln.load(path, device=args.device)
    if args.tolerance is None:
        args.tolerance = 1e-2 if engine.device.type == "cuda" else 0.0
    batching = engine_batching(engine)
    tensor_outputs = [i for i, s in enumerate(engine.outputs) if s is not None]
    names_out = [engine.outputs[i].name for i in tensor_outputs]

    def call(chunk: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = flat_outputs(engine(*[x.to(engine.device) for x in chunk]))
        return [flat[i].cpu() for i in tensor_outputs]

    gen = torch.Generator().manual_seed(1)
    rows = args.rows if batching is not None else None
    inputs = [{s.name: random_input(s, rows, gen) for s in engine.inputs} for _ in range(args.distinct)]
    references = []
    with torch.inference_mode():
        for x in inputs:
            (outputs,) = run_batched(call, [list(x.values())], batching)
            if isinstance(outputs, Exception):
                raise outputs
            references.append(dict(zip(names_out, outputs)))
    rows_per_s = None
    if args.engine_throughput:
        full = [random_input(s, None, gen).to(engine.device) for s in engine.inputs]
        with torch.inference_mode():
            for _ in range(3):
                engine(*full)
            iters, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 3.0:
                flat_outputs(engine(*full))[tensor_outputs[0]].cpu()
                iters += 1
        rows_per_s = iters * engine.inputs[0].shape[0] / (time.perf_counter() - t0)
    return inputs, references, rows, rows_per_s


def run_share(args: argparse.Namespace, urls: list[str], fallback: str, name: str, inputs: list[dict],
              references: list[dict], indices: list[int], threads: int,
              on_finish: Callable[[], None] | None = None) -> dict:
    """Send the requests `indices` from `threads` clients (one connection each); client k talks to
    urls[k % len(urls)], and to `fallback` (the proxy) once its URL stops answering (a replica gone)."""
    outcomes = {i: Outcome() for i in indices}
    pending = iter(indices)
    lock = threading.Lock()
    resent = [0]
    worst, bitwise = [0.0], [0]
    tolerance = args.tolerance

    def client_loop(k: int) -> None:
        url = urls[k % len(urls)]
        client = Client(url, timeout=args.timeout)
        while True:
            with lock:
                i = next(pending, None)
            if i is None:
                break
            outcome = outcomes[i]
            for _ in range(1 + args.retries):
                outcome.attempts += 1
                t0 = time.perf_counter()
                try:
                    got = client.infer(name, inputs[i % len(inputs)], binary=args.binary, request_id=str(i))
                except InputError as exc:  # a 4xx for a good request: a bug, not retried
                    outcome.errors.append(str(exc))
                    outcome.status = "failed"
                    break
                except ServerError as exc:
                    outcome.errors.append(str(exc))
                    outcome.status = "failed"
                    if exc.status is None and url != fallback:  # its replica is gone: through the proxy from now
                        with lock:
                            resent[0] += client.resent
                        client.close()
                        url, client = fallback, Client(fallback, timeout=args.timeout)
                    continue
                outcome.latency_ms = (time.perf_counter() - t0) * 1e3
                want = references[i % len(references)]
                diff = difference(got, want)
                with lock:
                    worst[0] = max(worst[0], diff)
                    bitwise[0] += diff == 0.0
                outcome.status = "ok" if diff <= tolerance else "wrong"
                break
            if on_finish is not None:
                on_finish()
        with lock:
            resent[0] += client.resent
        client.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(client_loop, k) for k in range(threads)]:
            f.result()
    return {"outcomes": outcomes, "resent": resent[0], "worst": worst[0], "bitwise": bitwise[0],
            "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - t0}


def _client_process(share: dict, ready: Any, start: Any, results: Any) -> None:
    torch.set_num_threads(1)
    ready.put(1)
    start.wait()
    result = run_share(**share)
    result["outcomes"] = {i: vars(o) for i, o in result["outcomes"].items()}  # plain data across processes
    results.put(result)


def load(args: argparse.Namespace, url: str, name: str, inputs: list[dict], references: list[dict],
         direct: list[str] | None = None) -> dict:
    urls = direct or [url]
    finished = threading.Semaphore(0)
    killed: dict[str, object] = {}
    indices = list(range(args.requests))
    processes = max(1, min(args.processes, args.clients))

    def killer() -> None:
        target = max(1, int(args.kill_at * args.requests))
        for _ in range(target):
            finished.acquire()
        killed["at_request"] = target
        killed["t"] = time.perf_counter()
        killed["replica"] = kill_one_replica(name)

    kill_thread = threading.Thread(target=killer, daemon=True) if args.kill_at > 0 else None
    if processes == 1:
        t0 = time.perf_counter()
        if kill_thread:
            kill_thread.start()
        shares = [run_share(args, urls, url, name, inputs, references, indices, args.clients,
                            on_finish=finished.release)]
        wall = time.perf_counter() - t0
    else:  # client processes (spawned: this one holds Ray's threads), started together once all are up
        ctx = multiprocessing.get_context("spawn")
        ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
        threads = [args.clients // processes + (p < args.clients % processes) for p in range(processes)]
        workers = [ctx.Process(target=_client_process, daemon=True, args=(
            {"args": args, "urls": urls[p:] + urls[:p], "fallback": url, "name": name, "inputs": inputs,
             "references": references, "indices": indices[p::processes], "threads": threads[p]},
            ready, start, results)) for p in range(processes)]
        for w in workers:
            w.start()
        for _ in workers:
            ready.get(timeout=300)
        t0 = time.perf_counter()
        start.set()
        shares = [results.get() for _ in workers]
        for share in shares:
            share["outcomes"] = {i: Outcome(**o) for i, o in share["outcomes"].items()}
        wall = time.perf_counter() - t0
        for w in workers:
            w.join(timeout=30)
    if kill_thread:
        kill_thread.join(timeout=30)

    outcomes = [o for share in shares for o in share["outcomes"].values()]
    counts = collections.Counter(o.status for o in outcomes)
    latencies = sorted(o.latency_ms for o in outcomes if o.status == "ok")
    errors = collections.Counter(e[:160] for o in outcomes for e in o.errors)
    after_ready = Client(url).ready()
    busy = [share["cpu_s"] / share["wall_s"] for share in shares if share["wall_s"] > 0]
    return {
        "model": name, "requests": args.requests, "clients": args.clients, "binary": args.binary,
        "replicas": args.replicas, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
        "client_processes": processes, "urls": urls,
        "client_cpu_busy": [round(b, 2) for b in busy],
        "wall_s": round(wall, 2), "answered_per_s": round(counts["ok"] / wall, 1),
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2) if latencies else None,
        "ok": counts["ok"], "wrong": counts["wrong"], "failed": counts["failed"], "lost": counts["lost"],
        "failed_attempts": sum(len(o.errors) for o in outcomes),
        "retried_then_ok": sum(1 for o in outcomes if o.status == "ok" and o.attempts > 1),
        "resent_on_closed_connection": sum(share["resent"] for share in shares),
        "killed": {k: v for k, v in killed.items() if k != "t"} or None,
        "killed_at_s": round(float(killed["t"]) - t0, 2) if "t" in killed else None,
        "ready_after": after_ready,
        "errors": dict(errors.most_common(10)),
        "tolerance": args.tolerance, "bitwise_equal": sum(share["bitwise"] for share in shares),
        "max_relative_difference": max(share["worst"] for share in shares),
    }


def report(r: dict) -> None:
    print(f"kiln serve load test: {r['model']} ({r['engine']}), server up in {r['startup_s']} s")
    print(f"  {r['requests']} requests from {r['clients']} clients ({'binary' if r['binary'] else 'JSON'}, "
          f"{r['rows_per_request']} row(s) each), {r['replicas']} replica(s), max batch {r['max_batch']}, "
          f"wait {r['batch_wait_ms']} ms")
    print(f"  {r['answered_per_s']} answers/s over {r['wall_s']} s; latency p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms")
    busy = r.get("client_cpu_busy") or [0.0]
    print(f"  sent to {', '.join(r['urls'])} from {r['client_processes']} client process(es), each busy "
          f"{', '.join(f'{b:.0%}' for b in busy)} of a core"
          + ("  ← a client process near 100% caps the measurement: raise --processes" if max(busy) > 0.85 else ""))
    print(f"  ok {r['ok']}, wrong {r['wrong']}, failed {r['failed']}, lost {r['lost']}; "
          f"failed attempts {r['failed_attempts']}, retried then ok {r['retried_then_ok']}, "
          f"re-sent on a closed connection {r['resent_on_closed_connection']}")
    print(f"  answers vs the engine in-process: {r['bitwise_equal']} bitwise equal, largest difference "
          f"{r['max_relative_difference']:.2g} of the reference's largest value (allowed: {r['tolerance']:.2g})")
    if r["killed"]:
        print(f"  killed {r['killed']['replica']} after {r['killed']['at_request']} answers "
              f"({r['killed_at_s']} s into the run); server ready afterwards: {r['ready_after']}")
    if r["engine_rows_per_s"]:
        print(f"  engine in-process at its own batch: {r['engine_rows_per_s']:.0f} rows/s; served: "
              f"{r['answered_per_s'] * (r['rows_per_request'] if isinstance(r['rows_per_request'], int) else 1):.0f} "
              f"rows/s")
    for message, n in r["errors"].items():
        print(f"  error ×{n}: {message}")


if __name__ == "__main__":
    raise SystemExit(main())
