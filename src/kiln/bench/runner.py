"""`kiln bench`: kiln side by side with its peers, in one process, on the same inputs.

Measuring (`bench_model`, `bench_zoo`) is kept apart from the statistics and the report
writers, which are pure functions of what was measured: tests drive the runner with a fake
`timer` and `clock`. The result types live in `kiln.bench.results`, the JSON/markdown/PNG
writers in `kiln.bench.report`. The method is written down in docs/benchmarking.md.

Peers are timed in rounds: every peer is prepared (and its build time, outputs and memory
taken) first; then each round times every live peer once, in an order that rotates from round
to round, so a slow spell of the machine falls on all peers alike instead of on one. The
rounds' medians give the spread; rows whose tail or spread is high are flagged noisy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from kiln import __version__
from kiln.bench.peers import PEERS, Peer, PeerContext, PeerSkipped, Prepared, first_line
from kiln.bench.results import (
    BASELINE,
    PRECISIONS,
    Accuracy,
    BenchReport,
    BenchSettings,
    Environment,
    PeerResult,
    Stats,
    ZooEntry,
    ZooReport,
    stats_of,
)
from kiln.errors import KilnError, KilnWarning
from kiln.timing import Latency, measure
from kiln.zoo import ZOO_TABLE

__all__ = [
    "BASELINE", "PRECISIONS", "ZOO_MODELS", "Accuracy", "BenchReport", "BenchSettings", "DynamicBuild", "Environment",
    "PeerResult", "Stats", "ZooEntry", "ZooReport", "bench_model", "bench_zoo", "default_sizes",
]

ZOO_MODELS = ZOO_TABLE  # the broad zoo, one list for the table and the tests: kiln.zoo.ZOO_TABLE
REWARM = 1  # untimed calls before each later round: the caches another peer may have evicted
Inputs = tuple[torch.Tensor, ...]


class Timer(Protocol):
    """`kiln.timing.measure`'s signature: per-call latency of `fn` on `device`."""

    def __call__(self, fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> Latency: ...


Clock = Callable[[], float]  # seconds, like time.perf_counter


# --- statistics (pure) ----------------------------------------------------------------------


def stats(latency: Latency, settings: BenchSettings | None = None) -> Stats:
    """Statistics of one timed run (one round: no spread)."""
    return stats_of(latency.samples_ms, [], settings or BenchSettings())


def throughput(batch: int, median_ms: float) -> float | None:
    return batch * 1e3 / median_ms if median_ms > 0 else None


def attach_speedups(results: Sequence[PeerResult]) -> None:
    """speed-up = eager fp32 median / peer median, per batch size."""
    base = {r.batch: r.latency for r in results if _is_baseline(r) and r.latency}
    for r in results:
        if r.latency and r.batch in base and r.latency.median_ms > 0:
            r.speedup = base[r.batch].median_ms / r.latency.median_ms
            r.speedup_noisy = r.latency.noisy or base[r.batch].noisy


def attach_vs_static(results: Sequence[PeerResult]) -> None:
    """vs static = the dynamic engine's (kiln's) median / kiln-static's, per batch and precision."""
    static = {(r.batch, r.precision): r.latency for r in results if r.peer == "kiln-static" and r.latency}
    for r in results:
        base = static.get((r.batch, r.precision))
        if r.peer == "kiln" and r.latency and base and base.median_ms > 0:
            r.vs_static = r.latency.median_ms / base.median_ms


def _is_baseline(r: PeerResult) -> bool:
    return (r.peer, r.precision) == BASELINE and r.status == "ok"


def timed_iters(estimate_ms: float, settings: BenchSettings) -> int:
    """settings.iters, cut so one peer's timing stays near max_seconds (never < min_iters)."""
    if estimate_ms <= 0:
        return settings.iters
    budget = int(settings.max_seconds * 1e3 / estimate_ms)
    return min(settings.iters, max(settings.min_iters, budget))


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor (or array) in a nested output, as float32 CPU tensors, in pytree order."""
    if isinstance(value, torch.Tensor):
        return [value.detach().float().cpu()]
    if hasattr(value, "__array__") and hasattr(value, "dtype"):  # numpy / ONNX Runtime outputs
        return [torch.as_tensor(value.__array__()).float()]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensor_leaves(v)]
    return []


def compare_outputs(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], classifier: bool) -> Accuracy:
    """Max abs difference and cosine similarity over all outputs; top-1 for classifiers."""
    notes = [] if len(got) == len(ref) else [f"{len(got)} outputs vs {len(ref)} in eager"]
    pairs = [(g, r) for g, r in zip(got, ref, strict=False) if g.shape == r.shape]
    if len(pairs) < min(len(got), len(ref)):
        notes.append("some output shapes differ from eager")
    if not pairs:
        return Accuracy(math.nan, math.nan, None, "; ".join(notes or ["no outputs to compare"]))
    a = torch.cat([g.double().flatten() for g, _ in pairs])
    b = torch.cat([r.double().flatten() for _, r in pairs])
    max_abs = float((a - b).abs().max()) if a.numel() else 0.0
    top1 = None
    g0, r0 = pairs[0]
    if classifier and r0.dim() == 2:
        top1 = float((g0.argmax(-1) == r0.argmax(-1)).double().mean())
    return Accuracy(max_abs, _cosine(a, b), top1, "; ".join(notes))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    return float(a.dot(b) / (na * nb).clamp_min(1e-300))


def failure_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


# --- measuring -----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Memory:
    """Peak CUDA memory one peer allocates on top of what was live before it (None on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        if device.type == "cuda":
            _release(device)
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    def peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) - self.base


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _kiln_notes(into: list[str]) -> Iterator[None]:
    """Peers' warnings stay off the terminal; KilnWarnings go into the row's note."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    into.extend(str(w.message) for w in caught if issubclass(w.category, KilnWarning))


@dataclass
class LivePeer:
    """A prepared peer waiting for its rounds: what it runs, how many calls it gets, what it measured."""

    result: PeerResult
    prepared: Prepared
    device: torch.device  # where it is timed
    plan: list[int]  # timed calls per round
    samples: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def round_plan(iters: int, rounds: int) -> list[int]:
    """`iters` timed calls split over at most `rounds` rounds, as evenly as possible (never 0 per round)."""
    rounds = max(1, min(rounds, iters))
    base, extra = divmod(iters, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def prepare_peer(
    peer: Peer, ctx: PeerContext, settings: BenchSettings, *, clock: Clock = time.perf_counter
) -> tuple[PeerResult, LivePeer | None, list[torch.Tensor] | None]:
    """Prepare, first call (= build time), one more call to size the timing; nothing timed yet.

    Returns the result (its status and reason when the peer cannot run), the live peer to time
    in the rounds (None when it cannot run) and the first call's outputs.
    """
    result = PeerResult(peer.name, ctx.precision, int(ctx.inputs[0].shape[0]) if ctx.inputs else 1)
    prepared: Prepared | None = None
    notes: list[str] = []
    outputs = None
    live = None
    memory = _Memory(ctx.device)
    try:
        with _kiln_notes(notes):
            t0 = clock()
            with torch.no_grad():
                prepared = peer.prepare(ctx)
            with torch.inference_mode():
                out = prepared.run()
                _sync(ctx.device)
                built = clock() - t0
                outputs = tensor_leaves(prepared.fetch(out))
                t1 = clock()
                prepared.run()
                _sync(ctx.device)
                iters = timed_iters((clock() - t1) * 1e3, settings)
        result.build_seconds = prepared.build_seconds if prepared.build_seconds is not None else built
        result.peak_memory_bytes = memory.peak() if prepared.tracks_memory else None
        notes.insert(0, prepared.note)
        live = LivePeer(result, prepared, prepared.timing_device or ctx.device, round_plan(iters, settings.rounds),
                        notes=notes)
    except PeerSkipped as exc:
        result.status, result.reason = "skipped", str(exc)
    except Exception as exc:  # a failing peer is a row in the report, never a crash
        result.status, result.reason = "failed", failure_reason(exc)
    if live is None:
        if prepared is not None and prepared.close is not None:
            prepared.close()
        del prepared
        _release(ctx.device)
    result.note = "; ".join(n for n in notes if n)
    return result, live, outputs


def time_rounds(lives: Sequence[LivePeer], settings: BenchSettings, *, timer: Timer = measure) -> None:
    """Time the peers taking turns: round r times every live peer once, starting from peer r
    (a rotating order), its share of the calls; then each gets its statistics. Closes them all."""
    try:
        rounds = max((len(live.plan) for live in lives), default=0)
        for r in range(rounds):
            start = r % len(lives)
            for live in [*lives[start:], *lives[:start]]:
                if live.result.status != "ok" or r >= len(live.plan):
                    continue
                warmup = min(settings.warmup, sum(live.plan)) if r == 0 else REWARM
                try:
                    with _kiln_notes(live.notes), torch.inference_mode():
                        latency = timer(live.prepared.run, live.device, warmup=warmup, iters=live.plan[r])
                except Exception as exc:  # failing mid-run is reported like failing to prepare
                    live.result.status, live.result.reason = "failed", f"round {r + 1}: {failure_reason(exc)}"
                    continue
                live.samples += latency.samples_ms
                live.round_medians.append(latency.median)
        for live in lives:
            result = live.result
            if result.status == "ok" and live.samples:
                result.latency = stats_of(live.samples, live.round_medians, settings)
                result.throughput = throughput(result.batch, result.latency.median_ms)
            result.note = "; ".join(dict.fromkeys(n for n in live.notes if n))
    finally:
        for live in lives:
            if live.prepared.close is not None:
                live.prepared.close()


def h2d_copy(inputs: Inputs, device: torch.device, settings: BenchSettings, timer: Timer) -> Stats | None:
    """Time copying the inputs from pinned host memory to the device (as trtexec reports)."""
    if device.type != "cuda":
        return None
    host = [x.cpu().pin_memory() for x in inputs]
    dest = [torch.empty_like(x, device=device) for x in host]

    def copy() -> None:
        for d, h in zip(dest, host, strict=True):
            d.copy_(h, non_blocking=True)

    return stats(timer(copy, device, warmup=min(settings.warmup, 10), iters=settings.iters), settings)


def select_peers(names: Sequence[str] | None, registry: Mapping[str, Peer]) -> list[Peer]:
    """The peers to run, in registry order; eager (the baseline) and kiln always included."""
    if names is None:
        wanted = {n for n, p in registry.items() if p.default}
    else:
        unknown = [n for n in names if n not in registry and n not in ("all", "none")]
        if unknown:
            raise ValueError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(registry)}")
        wanted = set(names) - {"all", "none"}
        if "all" in names:
            wanted |= {n for n, p in registry.items() if p.default}
    wanted |= {"eager", "kiln"} & set(registry)
    return [p for n, p in registry.items() if n in wanted]


def run_plan(peers: Sequence[Peer], precisions: Sequence[str]) -> list[tuple[Peer, str]]:
    """eager fp32 first (the baseline and accuracy reference), then each peer per precision."""
    steps = [(p, "fp32") for p in peers if p.name == BASELINE[0]]
    for precision in precisions:
        steps += [(p, precision) for p in peers if (p.name, precision) != BASELINE]
    return steps


def effective_precisions(precisions: Sequence[str], device: torch.device) -> tuple[tuple[str, ...], list[str]]:
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"precision must be among {', '.join(PRECISIONS)}, got {', '.join(bad) or 'none'}")
    unique = tuple(dict.fromkeys(precisions))
    if device.type == "cpu" and unique != ("fp32",):
        return ("fp32",), ["fp16/bf16 need a CUDA GPU: benchmarking fp32 on the CPU instead"]
    return unique, []


# --- what is benchmarked: a zoo model or an engine file -----------------------------------


@dataclass
class ModelSource:
    name: str
    task: str
    pretrained: bool | None
    batches: tuple[int, ...]
    load: Callable[[int], tuple[torch.nn.Module | None, Inputs]]
    engine: Any = None
    precisions: tuple[str, ...] | None = None  # an engine file fixes its precision
    notes: list[str] = field(default_factory=list)
    companions: tuple[str, ...] = ()  # peers this source adds (a dynamic engine: kiln-static)


def is_engine_file(target: str) -> bool:
    return ".py" not in target and Path(target).is_file()


def open_source(
    target: str, settings: BenchSettings, dynamic: DynamicBuild | None = None
) -> tuple[ModelSource, torch.device]:
    """What to benchmark, and where: an engine file runs where it was built for by default;
    `dynamic`: a dynamic-shape engine built from the model here."""
    from kiln.builder import resolve_device

    if dynamic is not None:
        source = _built_dynamic_source(target, dynamic, settings, resolve_device(settings.device))
        return source, source.engine.device
    if is_engine_file(target):
        source = _engine_source(Path(target), settings, settings.device)
        return source, source.engine.device
    return _zoo_source(target, settings), resolve_device(settings.device)


def _zoo_source(target: str, settings: BenchSettings) -> ModelSource:
    from kiln import zoo

    batches = settings.batches or (1,)
    first = zoo.resolve(target, batch=batches[0], input_shape=settings.input_shape, seed=settings.seed)
    cache = {batches[0]: first}

    def load(batch: int) -> tuple[torch.nn.Module, Inputs]:
        zm = cache.pop(batch, None) or zoo.resolve(
            target, batch=batch, input_shape=settings.input_shape, seed=settings.seed
        )
        return zm.model, zm.example_inputs

    return ModelSource(first.name, first.task, first.pretrained, batches, load)


def _engine_source(path: Path, settings: BenchSettings, device: str | None) -> ModelSource:
    from kiln.runtime.engine import load as load_engine

    if settings.trusted_keys:
        engine = load_engine(path, device=device, trusted_keys=list(settings.trusted_keys))
    else:
        engine = load_engine(path, device=device)
    info = engine.build_info
    if batch_dim(engine) is not None:
        return _dynamic_engine_source(path, engine, settings)
    batch = engine.inputs[0].shape[0] if engine.inputs and engine.inputs[0].shape else 1
    built = f"{info['precision']}, batch {batch}, built in {info['build_seconds']} s"
    notes = [f"engine file {path} ({built})"]
    if settings.batches and settings.batches != (batch,):
        notes.append(f"engines have fixed shapes: --batch ignored, using the engine's batch {batch}")
    model, inputs, task, why = eager_for_engine(engine, info.get("model", path.stem), batch, info.get("seed", 0))
    if why:
        notes.append(why)
    return ModelSource(
        str(info.get("model", path.stem)),
        task,
        info.get("pretrained"),
        (batch,),
        lambda _batch: (model, inputs),
        engine=engine,
        precisions=(info["precision"],),
        notes=notes,
    )


def batch_dim(engine: Any) -> str | None:
    """The dim on axis 0 of a dynamic-shape engine's first input (its batch); None for a static engine."""
    if not getattr(engine, "dims", None) or not engine.inputs or not engine.inputs[0].shape:
        return None
    first = engine.inputs[0].shape[0]
    return first if isinstance(first, str) else None


def _dynamic_engine_source(path: Path, engine: Any, settings: BenchSettings) -> ModelSource:
    """A dynamic-shape engine file runs at each --batch size in its range (default: opt), beside
    a static engine built for that size (kiln-static) when the model can be rebuilt from the zoo."""
    info = engine.build_info
    name = str(info.get("model", path.stem))
    dim = batch_dim(engine)
    assert dim is not None
    seed = info.get("seed", 0)

    def eager_at(batch: int) -> tuple[torch.nn.Module | None, Inputs, str, str]:
        return eager_for_engine(engine, name, batch, seed, engine.input_shapes_at(**{dim: batch}))

    sizes = settings.batches or (engine.dims[dim].opt,)
    return dynamic_source(engine, name, f"engine file {path}", sizes, eager_at)


@dataclass
class DynamicBuild:
    """`kiln bench MODEL --batch MIN:OPT:MAX`: build one dynamic-shape engine from `model` and
    benchmark it as an engine file (`settings.batches`: the sizes; default `default_sizes`)."""

    model: Any  # the kiln.zoo.ZooModel: the module and its example inputs
    dynamic_shapes: Any  # kiln.build's dynamic_shapes for those inputs; axis 0 of the first input is the batch


def default_sizes(dim: Any) -> tuple[int, ...]:
    """The batch sizes a dynamic build is benchmarked at by default: min, opt, max and an awkward
    prime in between, the sizes kiln.shapes.probe_bindings checks the dim at, ascending."""
    from kiln.shapes import probe_bindings

    return tuple(sorted({binding[dim.name] for binding in probe_bindings([dim])}))


def _built_dynamic_source(target: str, dynamic: DynamicBuild, settings: BenchSettings,
                          device: torch.device) -> ModelSource:
    """Build the dynamic engine from the model once, then bench it as `dynamic_source` does an
    engine file, with the model itself as eager and kiln-static's model (inputs resized per size)."""
    from kiln.builder import BuildConfig, build

    precisions, notes = effective_precisions(settings.precisions, device)
    if len(precisions) != 1:
        raise ValueError(f"--batch MIN:OPT:MAX builds one dynamic engine: give one --precision, got "
                         f"{','.join(precisions)}")
    entry = dynamic.model
    examples = at_opt(entry.model, entry.example_inputs, dynamic.dynamic_shapes)
    config = BuildConfig(precision=precisions[0], device=str(device), model_name=entry.name,
                         extra_info={"pretrained": entry.pretrained})
    with _kiln_notes(notes):
        engine = build(entry.model, examples, config=config, dynamic_shapes=dynamic.dynamic_shapes)
    dim = batch_dim(engine)
    if dim is None:
        raise ValueError(f"the engine built from {target} has no dynamic batch (axis 0 of its first input)")

    def eager_at(batch: int) -> tuple[torch.nn.Module | None, Inputs, str, str]:
        shapes = engine.input_shapes_at(**{dim: batch})
        return entry.model, resized_inputs(examples, shapes), entry.task, ""

    source = dynamic_source(engine, entry.name, f"dynamic engine built from {target}",
                            settings.batches or default_sizes(engine.dims[dim]), eager_at, option="--sizes")
    source.notes += notes
    return source


def at_opt(model: torch.nn.Module, inputs: Inputs, dynamic_shapes: Any) -> Inputs:
    """The example inputs resized to every dim's opt: the model is resolved at batch 1, which is
    outside a range whose min is above 1 (the build traces at opt, and runs its examples)."""
    from kiln.dims import forward_arg_names, normalize

    spec = normalize(dynamic_shapes, inputs, forward_arg_names(model))
    return spec.at(inputs, spec.opt_binding())


def resized_inputs(inputs: Inputs, shapes: Sequence[Sequence[int]]) -> Inputs:
    """The model's example inputs cycled or truncated to `shapes` (token ids and masks stay valid)."""
    from kiln.dims import resize

    if len(inputs) != len(shapes):
        raise ValueError(f"the model takes {len(inputs)} inputs, its engine {len(shapes)}")
    out = []
    for x, shape in zip(inputs, shapes, strict=True):
        for axis, size in enumerate(shape):
            x = resize(x, axis, int(size))
        out.append(x)
    return tuple(out)


def dynamic_source(
    engine: Any,
    name: str,
    origin: str,
    sizes: Sequence[int],
    eager_at: Callable[[int], tuple[torch.nn.Module | None, Inputs, str, str]],
    option: str = "--batch",
) -> ModelSource:
    """A dynamic-shape engine at each batch size in `sizes` (each in its range; `option` names them
    in the error), beside a static engine built for that size (the kiln-static peer) and the peers.
    `eager_at(batch)`: the eager model (None: none), the inputs at that size, the task, a note."""
    info = engine.build_info
    dim = batch_dim(engine)
    assert dim is not None
    rng = engine.dims[dim]
    outside = [b for b in sizes if not rng.contains(b)]
    if outside:
        raise ValueError(
            f"{option} {','.join(map(str, outside))}: this engine takes {rng.describe()} "
            f"(axis 0 of its input {engine.inputs[0].name!r}); give sizes from {rng.min} to {rng.max}"
        )
    dims = ", ".join(d.describe() for d in engine.dims.values())
    notes = [
        f"{origin} ({info['precision']}, dynamic shapes: {dims}, built in {info['build_seconds']} s)",
        "vs static: the dynamic engine's median / the median of a static kiln engine built for the same "
        "shapes (kiln-static); the other dims at opt",
    ]
    seen = {sizes[0]: eager_at(sizes[0])}

    def load(batch: int) -> tuple[torch.nn.Module | None, Inputs]:
        found = seen.pop(batch, None) or eager_at(batch)
        return found[0], found[1]

    _, _, task, why = seen[sizes[0]]
    if why:
        notes.append(why)
    return ModelSource(name, task, info.get("pretrained"), tuple(sizes), load, engine=engine,
                       precisions=(info["precision"],), notes=notes, companions=("kiln-static",))


def eager_for_engine(
    engine: Any, name: str, batch: int, seed: int, shapes: Sequence[Sequence[int]] | None = None
) -> tuple[torch.nn.Module | None, Inputs, str, str]:
    """Rebuild the eager model from the zoo when the engine names a zoo model (same seed).
    `shapes`: the inputs' concrete shapes (a dynamic-shape engine's at one binding)."""
    from kiln import zoo

    shapes = [tuple(s) for s in shapes] if shapes is not None else [s.shape for s in engine.inputs]
    zm, problem = None, ""
    for input_shape in (tuple(shapes[0][1:]) if shapes else None, None):
        try:
            zm = zoo.resolve(name, batch=batch, input_shape=input_shape, seed=seed)
        except Exception as exc:  # unknown name, missing file, factory that fixes its inputs
            problem = failure_reason(exc)
            continue
        if [tuple(x.shape) for x in zm.example_inputs] == shapes:
            note = (
                f"eager rebuilt from the zoo with seed {seed}: its weights match the engine's "
                "only if the engine was built from the zoo with the same seed"
            )
            return zm.model, zm.example_inputs, zm.task, note
        got = [tuple(x.shape) for x in zm.example_inputs]
        problem = f"the zoo's {name} takes inputs {got}; the engine takes {shapes}"
    return None, random_inputs(engine, seed, shapes), "other", f"no eager model for {name!r} ({problem})"


def random_inputs(engine: Any, seed: int, shapes: Sequence[Sequence[int]] | None = None) -> Inputs:
    """Random inputs for `engine` (token ids within its recorded input ranges) of `shapes`, by
    default its inputs' shapes, a dynamic-shape engine's at opt (`Engine.input_shapes_at`)."""
    gen = torch.Generator().manual_seed(seed)
    ranges = engine.build_info.get("input_ranges") or [None] * len(engine.inputs)
    if shapes is None:
        shapes = engine.input_shapes_at() if getattr(engine, "dims", None) else [s.shape for s in engine.inputs]
    out = []
    for spec, shape, rng in zip(engine.inputs, shapes, ranges + [None] * len(engine.inputs), strict=False):
        shape = tuple(int(d) for d in shape)
        if spec.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(spec.dtype))
        else:
            low, high = rng or (0, 1)
            out.append(torch.randint(low, high + 1, shape, generator=gen).to(spec.dtype))
    return tuple(out)


# --- the runs -------------------------------------------------------------------------------


def environment(device: torch.device) -> Environment:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    versions = {}
    for package in ("onnxruntime", "onnxruntime-gpu", "tensorrt", "torchvision", "timm", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Environment(
        str(device), name, torch.__version__, __version__, date, versions, os.cpu_count(), load_average()
    )


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_notes(environment: Environment, results: Sequence[PeerResult]) -> list[str]:
    """What a reader must know before comparing rows: a busy machine, noisy rows."""
    notes = []
    if environment.busy():
        notes.append(
            f"the machine was busy before this run ({environment.load_line()}): timings include waiting "
            "for other work; compare rows only from a quiet run"
        )
    noisy = [r for r in results if r.noisy]
    if noisy:
        rows = ", ".join(f"{r.peer} {r.precision} batch {r.batch}" for r in noisy)
        notes.append(
            f"noisy timings ({rows}): their speed-ups are marked '?'; rerun on a quiet machine, "
            "or with more --iters and --rounds"
        )
    return notes


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device) -> Iterator[None]:
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda" or old
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def bench_model(
    target: str,
    settings: BenchSettings,
    *,
    timer: Timer = measure,
    clock: Clock = time.perf_counter,
    registry: Mapping[str, Peer] | None = None,
    on_result: Callable[[PeerResult], None] | None = None,
    dynamic: DynamicBuild | None = None,
) -> BenchReport:
    """Benchmark MODEL (zoo name, file.py:factory) or ENGINE (file) against the peers; with
    `dynamic`, a dynamic-shape engine built from MODEL, as an engine file is benchmarked."""
    registry = PEERS if registry is None else registry
    peers = select_peers(settings.peers, registry)
    source, device = open_source(target, settings, dynamic)
    peers += [registry[n] for n in source.companions if n in registry and registry[n] not in peers]
    precisions, notes = effective_precisions(source.precisions or settings.precisions, device)
    report = BenchReport(
        source.name, source.task, source.pretrained, environment(device), settings, [], notes=[*source.notes, *notes]
    )
    with _cudnn_benchmark(device), tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        for batch in source.batches:
            _bench_batch(report, source, batch, peers, precisions, device, Path(tmp), settings, timer, clock, on_result)
    attach_speedups(report.results)
    attach_vs_static(report.results)
    report.environment.load_after = load_average()
    report.notes += machine_notes(report.environment, report.results)
    return report


def _bench_batch(
    report: BenchReport,
    source: ModelSource,
    batch: int,
    peers: Sequence[Peer],
    precisions: Sequence[str],
    device: torch.device,
    workdir: Path,
    settings: BenchSettings,
    timer: Timer,
    clock: Clock,
    on_result: Callable[[PeerResult], None] | None,
) -> None:
    model, cpu_inputs = source.load(batch)
    inputs = tuple(x.to(device) for x in cpu_inputs)
    report.h2d_copy[batch] = h2d_copy(inputs, device, settings, timer)
    reference = None
    results, lives = [], []
    for peer, precision in run_plan(peers, precisions):
        ctx = PeerContext(model, inputs, device, precision, source.name, workdir, source.engine)
        result, live, outputs = prepare_peer(peer, ctx, settings, clock=clock)
        if (peer.name, precision) == BASELINE and result.status == "ok":
            reference = outputs
        if reference is not None and outputs is not None:
            result.accuracy = compare_outputs(outputs, reference, source.task == "classification")
        results.append(result)
        if live is not None:
            lives.append(live)
        elif on_result is not None:
            on_result(result)
    timed = [live.result for live in lives]
    try:
        time_rounds(lives, settings, timer=timer)
    finally:
        del lives
        _release(device)
    report.results += results
    for result in timed:
        if on_result is not None:
            on_result(result)


def _bench_child(name: str, settings: BenchSettings, conn: Any) -> None:
    try:
        conn.send(("ok", bench_model(name, settings)))
    except BaseException as exc:  # reported to the parent, which records the model's error
        conn.send(("error", failure_reason(exc)))
    finally:
        conn.close()


def bench_model_in_child(name: str, settings: BenchSettings) -> BenchReport:
    """bench_model in a fresh (spawned) process; its failure, or its death, is a KilnError."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_bench_child, args=(name, settings, child), name=f"kiln-bench-{name}")
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        proc.join()
        raise KilnError(f"the benchmark process of {name} died (exit code {proc.exitcode}) before reporting") from None
    finally:
        parent.close()
    proc.join()
    if status != "ok":
        raise KilnError(value)
    return value


def bench_zoo(
    models: Sequence[str],
    settings: BenchSettings,
    *,
    timer: Timer = measure,
    clock: Clock = time.perf_counter,
    registry: Mapping[str, Peer] | None = None,
    on_result: Callable[[PeerResult], None] | None = None,
    on_model: Callable[[ZooReport], None] | None = None,
) -> ZooReport:
    """The seed-004 table: eager vs kiln (plus any --against peers) per zoo model."""
    from kiln.builder import resolve_device

    device = resolve_device(settings.device)
    if settings.peers is None:
        settings = dataclasses.replace(settings, peers=("eager", "kiln"))
    zoo_report = ZooReport(environment(device), settings)
    # On a GPU each model runs in a process of its own (the "one process per model"): a
    # device-side assert or a crash in one model's peer poisons its CUDA context for good, and
    # allocator and compile caches would carry over to the next model. Injected timers and
    # registries (tests) stay in this process.
    isolate = device.type == "cuda" and timer is measure and registry is None
    for name in models:
        entry = ZooEntry(name)
        try:
            if isolate:
                entry.report = bench_model_in_child(name, settings)
            else:
                entry.report = bench_model(name, settings, timer=timer, clock=clock, registry=registry,
                                           on_result=on_result)
        except Exception as exc:  # one model failing never stops the table
            entry.error = failure_reason(exc)
        zoo_report.entries.append(entry)
        if not isolate:
            _release(device)
        zoo_report.environment.load_after = load_average()
        if on_model is not None:
            on_model(zoo_report)
    return zoo_report
