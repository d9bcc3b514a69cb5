"""`kiln bench`: kiln side by side with its peers, in one process, on the same inputs.

Measuring (`bench_model`, `bench_zoo`) is kept apart from the statistics and the report
writers, which are pure functions of what was measured: tests drive the runner with a fake
`timer` and `clock`. The method is written down in docs/benchmarking.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
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
from kiln.bench_peers import PEERS, Peer, PeerContext, PeerSkipped, Prepared, first_line
from kiln.errors import KilnWarning
from kiln.timing import Latency, measure

PRECISIONS = ("fp32", "fp16", "bf16")
BASELINE = ("eager", "fp32")
SCHEMA = "kiln.bench/1"
ZOO_MODELS = (
    "alexnet",
    "squeezenet1_0",
    "squeezenet1_1",
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
    *(f"densenet{d}" for d in (121, 161, 169, 201)),
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    "mobilenet_v2",
    "efficientnet_b0",
    "vit_b_16",
    "bert-base",
)
Inputs = tuple[torch.Tensor, ...]


class Timer(Protocol):
    """`kiln.timing.measure`'s signature: per-call latency of `fn` on `device`."""

    def __call__(self, fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> Latency: ...


Clock = Callable[[], float]  # seconds, like time.perf_counter


@dataclass
class BenchSettings:
    batches: tuple[int, ...] | None = None  # None: (1,), or an engine file's own batch
    precisions: tuple[str, ...] = ("fp16",)
    peers: tuple[str, ...] | None = None  # None: every default peer; eager and kiln always run
    device: str | None = None  # None: CUDA when available
    iters: int = 100
    warmup: int = 20
    max_seconds: float = 20.0  # timing budget per peer: fewer iterations for slow peers
    min_iters: int = 5
    input_shape: tuple[int, ...] | None = None
    seed: int = 0


@dataclass
class Stats:
    median_ms: float
    p90_ms: float
    p99_ms: float
    iters: int


@dataclass
class Accuracy:
    max_abs: float
    cosine: float
    top1_agreement: float | None = None  # fraction of the batch; classifiers only
    note: str = ""


@dataclass
class PeerResult:
    peer: str
    precision: str
    batch: int
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    note: str = ""
    latency: Stats | None = None
    throughput: float | None = None  # items/s
    speedup: float | None = None  # eager fp32 median / this median, same batch
    build_seconds: float | None = None
    peak_memory_bytes: int | None = None
    accuracy: Accuracy | None = None


@dataclass
class Environment:
    device: str
    device_name: str
    torch_version: str
    kiln_version: str
    date: str
    versions: dict[str, str] = field(default_factory=dict)

    def line(self, sep: str = " · ") -> str:
        return sep.join(
            (
                f"{self.device_name} ({self.device})",
                f"torch {self.torch_version} · kiln {self.kiln_version} · {self.date}",
            )
        )


@dataclass
class BenchReport:
    model: str
    task: str
    pretrained: bool | None
    environment: Environment
    settings: BenchSettings
    results: list[PeerResult]
    h2d_copy: dict[int, Stats | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --- statistics (pure) ----------------------------------------------------------------------


def stats(latency: Latency) -> Stats:
    return Stats(latency.median, latency.p90, latency.p99, len(latency.samples_ms))


def throughput(batch: int, median_ms: float) -> float | None:
    return batch * 1e3 / median_ms if median_ms > 0 else None


def attach_speedups(results: Sequence[PeerResult]) -> None:
    """speed-up = eager fp32 median / peer median, per batch size."""
    base = {r.batch: r.latency.median_ms for r in results if _is_baseline(r) and r.latency}
    for r in results:
        if r.latency and r.batch in base and r.latency.median_ms > 0:
            r.speedup = base[r.batch] / r.latency.median_ms


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


def run_peer(
    peer: Peer, ctx: PeerContext, settings: BenchSettings, *, timer: Timer = measure, clock: Clock = time.perf_counter
) -> tuple[PeerResult, list[torch.Tensor] | None]:
    """Prepare, first call (= build time), time; returns the result and the first outputs."""
    result = PeerResult(peer.name, ctx.precision, int(ctx.inputs[0].shape[0]) if ctx.inputs else 1)
    prepared: Prepared | None = None
    notes: list[str] = []
    outputs = None
    memory = _Memory(ctx.device)
    try:
        with _kiln_notes(notes):
            t0 = clock()
            with torch.no_grad():
                prepared = peer.prepare(ctx)
            outputs = _time_prepared(prepared, ctx, settings, result, t0, timer, clock)
        result.peak_memory_bytes = memory.peak() if prepared.tracks_memory else None
        notes.insert(0, prepared.note)
    except PeerSkipped as exc:
        result.status, result.reason = "skipped", str(exc)
    except Exception as exc:  # a failing peer is a row in the report, never a crash
        result.status, result.reason = "failed", failure_reason(exc)
    finally:
        if prepared is not None and prepared.close is not None:
            prepared.close()
        del prepared
        _release(ctx.device)
    result.note = "; ".join(n for n in notes if n)
    return result, outputs


def _time_prepared(
    prepared: Prepared,
    ctx: PeerContext,
    settings: BenchSettings,
    result: PeerResult,
    t0: float,
    timer: Timer,
    clock: Clock,
) -> list[torch.Tensor]:
    device = prepared.timing_device or ctx.device
    with torch.inference_mode():
        out = prepared.run()
        _sync(ctx.device)
        built = clock() - t0
        outputs = tensor_leaves(prepared.fetch(out))
        t1 = clock()
        prepared.run()
        _sync(ctx.device)
        iters = timed_iters((clock() - t1) * 1e3, settings)
        latency = timer(prepared.run, device, warmup=min(settings.warmup, iters), iters=iters)
    result.latency = stats(latency)
    result.throughput = throughput(result.batch, result.latency.median_ms)
    result.build_seconds = prepared.build_seconds if prepared.build_seconds is not None else built
    return outputs


def h2d_copy(inputs: Inputs, device: torch.device, settings: BenchSettings, timer: Timer) -> Stats | None:
    """Time copying the inputs from pinned host memory to the device (as trtexec reports)."""
    if device.type != "cuda":
        return None
    host = [x.cpu().pin_memory() for x in inputs]
    dest = [torch.empty_like(x, device=device) for x in host]

    def copy() -> None:
        for d, h in zip(dest, host, strict=True):
            d.copy_(h, non_blocking=True)

    return stats(timer(copy, device, warmup=min(settings.warmup, 10), iters=settings.iters))


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


def is_engine_file(target: str) -> bool:
    return ".py" not in target and Path(target).is_file()


def open_source(target: str, settings: BenchSettings) -> tuple[ModelSource, torch.device]:
    """What to benchmark, and where: an engine file runs where it was built for by default."""
    from kiln.builder import resolve_device

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
    from kiln.runtime import load as load_engine

    engine = load_engine(path, device=device)
    info = engine.build_info
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


def eager_for_engine(engine: Any, name: str, batch: int, seed: int) -> tuple[torch.nn.Module | None, Inputs, str, str]:
    """Rebuild the eager model from the zoo when the engine names a zoo model (same seed)."""
    from kiln import zoo

    shapes = [s.shape for s in engine.inputs]
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
    return None, random_inputs(engine, seed), "other", f"no eager model for {name!r} ({problem})"


def random_inputs(engine: Any, seed: int) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    ranges = engine.build_info.get("input_ranges") or [None] * len(engine.inputs)
    out = []
    for spec, rng in zip(engine.inputs, ranges, strict=False):
        if spec.dtype.is_floating_point:
            out.append(torch.randn(spec.shape, generator=gen).to(spec.dtype))
        else:
            low, high = rng or (0, 1)
            out.append(torch.randint(low, high + 1, spec.shape, generator=gen).to(spec.dtype))
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
    return Environment(str(device), name, torch.__version__, __version__, date, versions)


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
) -> BenchReport:
    """Benchmark MODEL (zoo name, file.py:factory) or ENGINE (file) against the peers."""
    registry = PEERS if registry is None else registry
    peers = select_peers(settings.peers, registry)
    source, device = open_source(target, settings)
    precisions, notes = effective_precisions(source.precisions or settings.precisions, device)
    report = BenchReport(
        source.name, source.task, source.pretrained, environment(device), settings, [], notes=[*source.notes, *notes]
    )
    with _cudnn_benchmark(device), tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        for batch in source.batches:
            _bench_batch(report, source, batch, peers, precisions, device, Path(tmp), settings, timer, clock, on_result)
    attach_speedups(report.results)
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
    for peer, precision in run_plan(peers, precisions):
        ctx = PeerContext(model, inputs, device, precision, source.name, workdir, source.engine)
        result, outputs = run_peer(peer, ctx, settings, timer=timer, clock=clock)
        if (peer.name, precision) == BASELINE and result.status == "ok":
            reference = outputs
        if reference is not None and outputs is not None:
            result.accuracy = compare_outputs(outputs, reference, source.task == "classification")
        report.results.append(result)
        if on_result is not None:
            on_result(result)


@dataclass
class ZooEntry:
    model: str
    report: BenchReport | None = None
    error: str = ""


@dataclass
class ZooReport:
    environment: Environment
    settings: BenchSettings
    entries: list[ZooEntry] = field(default_factory=list)


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
    for name in models:
        entry = ZooEntry(name)
        try:
            entry.report = bench_model(name, settings, timer=timer, clock=clock, registry=registry, on_result=on_result)
        except Exception as exc:  # one model failing never stops the table
            entry.error = failure_reason(exc)
        zoo_report.entries.append(entry)
        _release(device)
        if on_model is not None:
            on_model(zoo_report)
    return zoo_report


# --- reports (pure) -------------------------------------------------------------------------

COLUMNS = (
    "peer",
    "precision",
    "batch",
    "median ms",
    "p90 ms",
    "p99 ms",
    "items/s",
    "speed-up",
    "build s",
    "peak MiB",
    "max abs diff",
    "cosine",
    "top-1 agree",
    "note",
)


def fmt_ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def result_cells(r: PeerResult) -> list[str]:
    """One report row, as text: shared by the terminal table and the markdown."""
    lat, acc = r.latency, r.accuracy
    mem = None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20
    note = f"{r.status}: {r.reason}" if r.status != "ok" else r.note
    if r.status != "ok" and r.note:
        note += f" ({r.note})"
    return [
        r.peer,
        r.precision,
        str(r.batch),
        fmt_ms(lat and lat.median_ms),
        fmt_ms(lat and lat.p90_ms),
        fmt_ms(lat and lat.p99_ms),
        _fmt(r.throughput, ".1f"),
        _fmt(r.speedup, ".3g") + ("×" if r.speedup else ""),
        _fmt(r.build_seconds, ".2f"),
        _fmt(mem, ".1f"),
        _fmt(acc and acc.max_abs, ".2e"),
        _fmt(acc and acc.cosine, ".6f"),
        _fmt(acc and acc.top1_agreement and acc.top1_agreement * 100, ".0f")
        + ("%" if acc and acc.top1_agreement is not None else ""),
        note,
    ]


def weights_line(pretrained: bool | None) -> str:
    if pretrained is False:
        return (
            "weights: random (no offline weights); timings hold, and the accuracy columns "
            "compare each peer with eager fp32 on the same weights"
        )
    return "weights: pretrained" if pretrained else "weights: unknown"


def report_to_dict(report: BenchReport) -> dict[str, Any]:
    data = dataclasses.asdict(report)
    data["h2d_copy"] = {str(k): v for k, v in data["h2d_copy"].items()}
    return {"schema": SCHEMA, "kind": "model", **_json_safe(data)}


def zoo_to_dict(zoo_report: ZooReport) -> dict[str, Any]:
    entries = [
        {"model": e.model, "error": e.error, "report": e.report and report_to_dict(e.report)}
        for e in zoo_report.entries
    ]
    return {
        "schema": SCHEMA,
        "kind": "zoo",
        "environment": dataclasses.asdict(zoo_report.environment),
        "settings": _json_safe(dataclasses.asdict(zoo_report.settings)),
        "entries": entries,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def report_markdown(report: BenchReport) -> str:
    s = report.settings
    lines = [
        f"# kiln bench: {report.model}",
        "",
        f"{report.environment.line()}  ",
        f"{weights_line(report.pretrained)}  ",
        f"timing: up to {s.iters} iterations after {s.warmup} warm-up calls, at most ~{s.max_seconds:g} s per peer",
        "",
        _md_row(COLUMNS),
        _md_row(["---"] * len(COLUMNS)),
        *(_md_row(result_cells(r)) for r in report.results),
        "",
    ]
    for batch, copy in report.h2d_copy.items():
        if copy is not None:
            lines.append(
                f"- host→device input copy (pinned), batch {batch}: median "
                f"{fmt_ms(copy.median_ms)} ms, p99 {fmt_ms(copy.p99_ms)} ms "
                "(not included in the latencies above)"
            )
    lines += [f"- {n}" for n in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def zoo_columns(zoo_report: ZooReport) -> list[tuple[str, str]]:
    """(peer, precision) pairs of the zoo table: eager and kiln per precision, then the others."""
    precisions = _zoo_precisions(zoo_report)
    others = [p for p in zoo_report.settings.peers or () if p not in ("eager", "kiln")]
    return [(peer, p) for p in precisions for peer in ("eager", "kiln", *others)]


def _zoo_precisions(zoo_report: ZooReport) -> list[str]:
    seen = [
        r.precision
        for e in zoo_report.entries
        if e.report
        for r in e.report.results
        if (r.peer, r.precision) != BASELINE
    ]
    return list(dict.fromkeys(seen)) or list(zoo_report.settings.precisions)


def zoo_rows(zoo_report: ZooReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows: model | batch | eager P | kiln P | speed-up | … | top-1 | note."""
    columns = zoo_columns(zoo_report)
    precisions = _zoo_precisions(zoo_report)
    header = ["model", "batch"]
    for p in precisions:
        header += [f"{peer} {p} ms" for peer, q in columns if q == p] + [f"speed-up {p}"]
    header += ["kiln top-1 agree", "kiln max abs diff", "note"]
    rows = []
    for entry in zoo_report.entries:
        if entry.report is None:
            rows.append([entry.model, "—", *["—"] * (len(header) - 3), f"failed: {entry.error}"])
            continue
        for batch in dict.fromkeys(r.batch for r in entry.report.results):
            rows.append(_zoo_row(entry.model, batch, entry.report, precisions, columns))
    return header, rows


def _zoo_row(
    model: str, batch: int, report: BenchReport, precisions: list[str], columns: list[tuple[str, str]]
) -> list[str]:
    found = {(r.peer, r.precision): r for r in report.results if r.batch == batch}
    row, notes = [model, str(batch)], []
    for p in precisions:
        for peer, q in columns:
            if q == p:
                r = found.get((peer, p))
                row.append(fmt_ms(r.latency.median_ms) if r and r.latency else (r.status if r else "—"))
                if r and r.status != "ok":
                    notes.append(f"{peer} {p} {r.status}: {r.reason}")
        eager, kiln = found.get(("eager", p)), found.get(("kiln", p))
        ok = eager and kiln and eager.latency and kiln.latency
        row.append(f"{eager.latency.median_ms / kiln.latency.median_ms:.2f}×" if ok else "—")
    kiln_acc = next((found[("kiln", p)].accuracy for p in precisions if found.get(("kiln", p))), None)
    top1 = kiln_acc and kiln_acc.top1_agreement
    row += [
        _fmt(top1 and top1 * 100, ".0f") + ("%" if top1 is not None else ""),
        _fmt(kiln_acc and kiln_acc.max_abs, ".2e"),
        "; ".join(notes),
    ]
    return row


def zoo_markdown(zoo_report: ZooReport) -> str:
    header, rows = zoo_rows(zoo_report)
    s = zoo_report.settings
    first = next((e.report for e in zoo_report.entries if e.report), None)
    lines = [
        "# kiln zoo benchmark",
        "",
        f"{zoo_report.environment.line()}  ",
        f"median latency per call, up to {s.iters} iterations after {s.warmup} warm-up calls; "
        "speed-up = eager / kiln at the same precision  ",
        (weights_line(first.pretrained) if first else "") + "  ",
        "",
        _md_row(header),
        _md_row(["---"] * len(header)),
        *(_md_row(r) for r in rows),
    ]
    return "\n".join(lines) + "\n"


def write_json(data: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


# --- plots ----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save

    return Figure(figsize=(width, height), layout="constrained")


def _bars(ax: Any, labels: list[str], series: dict[str, list[float | None]], horizontal: bool) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    values = [v for vs in series.values() for v in vs if v]
    for i, (name, vals) in enumerate(series.items()):
        pos = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        heights = [v or 0.0 for v in vals]
        bars = (ax.barh if horizontal else ax.bar)(pos, heights, width, label=name)
        ax.bar_label(bars, labels=[fmt_ms(v) if v else "" for v in vals], fontsize=7, padding=2)
    ticks = ax.set_yticks if horizontal else ax.set_xticks
    ticks(range(len(labels)), labels, **({} if horizontal else {"rotation": 30, "ha": "right"}))
    if values and max(values) / min(values) > 30:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
    (ax.set_xlabel if horizontal else ax.set_ylabel)("median latency (ms)")
    if n > 1:
        ax.legend(fontsize=8)
    elif series:
        (ax.set_ylabel if horizontal else ax.set_xlabel)(next(iter(series)))


def _title(fig: Any, title: str, env: Environment) -> None:
    fig.suptitle(f"{title}\n{env.line(sep=chr(10))}", fontsize=9)


def plot_report(report: BenchReport, path: Path) -> None:
    """Bar chart: median latency per peer (x) and batch size (bars), labelled with the setup."""
    labels = list(dict.fromkeys(f"{r.peer} {r.precision}" for r in report.results if r.latency))
    batches = list(dict.fromkeys(r.batch for r in report.results))
    found = {(f"{r.peer} {r.precision}", r.batch): r.latency.median_ms for r in report.results if r.latency}
    series = {f"batch {b}": [found.get((label, b)) for label in labels] for b in batches}
    fig = _figure(max(7.0, 1.0 + 1.1 * len(labels)), 5.0)
    ax = fig.add_subplot()
    _bars(ax, labels, series, horizontal=False)
    _title(fig, f"kiln bench: {report.model}", report.environment)
    missing = [f"{r.peer} {r.precision}: {r.status}" for r in report.results if r.status != "ok"]
    if missing:
        fig.supxlabel("not timed (see the report): " + "; ".join(dict.fromkeys(missing)), fontsize=6)
    fig.savefig(path, dpi=120, format="png")


def plot_zoo(zoo_report: ZooReport, path: Path) -> None:
    """Horizontal bars per zoo model: eager vs kiln (and other peers) median latency."""
    columns = zoo_columns(zoo_report)
    batch = (zoo_report.settings.batches or (1,))[0]
    entries = [e for e in zoo_report.entries if e.report]
    labels = [e.model for e in entries]
    series: dict[str, list[float | None]] = {}
    for peer, p in columns:
        series[f"{peer} {p}"] = [_median(e.report, peer, p, batch) for e in entries if e.report]
    fig = _figure(8.0, max(3.0, 0.45 * len(labels) * max(1, len(columns)) / 2 + 1.5))
    ax = fig.add_subplot()
    _bars(ax, labels, series, horizontal=True)
    ax.invert_yaxis()
    _title(fig, f"kiln zoo, batch {batch}", zoo_report.environment)
    fig.savefig(path, dpi=120, format="png")


def _median(report: BenchReport, peer: str, precision: str, batch: int) -> float | None:
    found = [r for r in report.results if (r.peer, r.precision, r.batch) == (peer, precision, batch)]
    return found[0].latency.median_ms if found and found[0].latency else None
