"""What `kiln bench` measured, as plain dataclasses: the settings, per-peer results with their
statistics (and whether they are noisy), the machine, and whole reports.

The runner (`kiln.bench.runner`) fills these in; the writers (`kiln.bench.report`) turn them into
tables, JSON, markdown and plots. Both import this module, and neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

PRECISIONS = ("fp32", "fp16", "bf16")
BASELINE = ("eager", "fp32")  # the speed-up baseline and the accuracy reference

# A row is noisy when its timings say a comparison with it may mislead:
NOISY_TAIL = 1.5  # p90 more than 1.5× the median: many calls were held up
NOISY_SPREAD = 0.10  # the rounds' medians differ by more than 10% of the median
BUSY_LOAD = 0.5  # 1-minute load average above half the CPU count before the run: a busy machine


@dataclass
class BenchSettings:
    batches: tuple[int, ...] | None = None  # None: (1,), or an engine file's own batch
    precisions: tuple[str, ...] = ("fp16",)
    peers: tuple[str, ...] | None = None  # None: every default peer; eager and kiln always run
    device: str | None = None  # None: CUDA when available
    iters: int = 100  # timed calls per peer, over all rounds
    warmup: int = 20  # untimed calls before a peer's first round
    rounds: int = 5  # peers take turns: each round times every peer once, in a rotating order
    max_seconds: float = 20.0  # timing budget per peer: fewer iterations for slow peers
    min_iters: int = 5
    input_shape: tuple[int, ...] | None = None
    seed: int = 0
    trusted_keys: tuple[str, ...] | None = None  # public keys an engine file must be signed with
    noisy_tail: float = NOISY_TAIL
    noisy_spread: float = NOISY_SPREAD


@dataclass
class Stats:
    median_ms: float
    p90_ms: float
    p99_ms: float
    iters: int
    p10_ms: float | None = None
    round_medians_ms: list[float] = field(default_factory=list)  # one per round, in round order
    spread: float | None = None  # (max - min) of the round medians / overall median
    noise: str = ""  # why the row is noisy; empty when it is not

    @property
    def noisy(self) -> bool:
        return bool(self.noise)


def round_spread(round_medians: Sequence[float], median: float) -> float | None:
    """How far apart the rounds' medians are, relative to the overall median (None for one round)."""
    if len(round_medians) < 2 or median <= 0:
        return None
    return (max(round_medians) - min(round_medians)) / median


def noise_reason(median: float, p90: float, spread: float | None, tail: float, max_spread: float) -> str:
    """Why timings with this median, p90 and round spread may mislead ('' when they look steady)."""
    reasons = []
    if median > 0 and p90 / median > tail:
        reasons.append(f"p90 is {p90 / median:.1f}× the median")
    if spread is not None and spread > max_spread:
        reasons.append(f"round medians differ by {spread:.0%}")
    return "; ".join(reasons)


def stats_of(samples: Sequence[float], round_medians: Sequence[float], settings: BenchSettings) -> Stats:
    from kiln.timing import Latency

    lat = Latency(list(samples))
    median, p90 = lat.median, lat.p90
    spread = round_spread(round_medians, median)
    return Stats(
        median_ms=median,
        p90_ms=p90,
        p99_ms=lat.p99,
        iters=len(samples),
        p10_ms=lat.percentile(10),
        round_medians_ms=[float(m) for m in round_medians],
        spread=spread,
        noise=noise_reason(median, p90, spread, settings.noisy_tail, settings.noisy_spread),
    )


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
    speedup_noisy: bool = False  # this row's or the baseline's timings are noisy
    vs_static: float | None = None  # a dynamic-shape engine: its median / the static engine's for this size
    build_seconds: float | None = None
    peak_memory_bytes: int | None = None
    accuracy: Accuracy | None = None

    @property
    def noisy(self) -> bool:
        return self.latency is not None and self.latency.noisy


@dataclass
class Environment:
    device: str
    device_name: str
    torch_version: str
    kiln_version: str
    date: str
    versions: dict[str, str] = field(default_factory=dict)
    cpu_count: int | None = None
    load_before: list[float] | None = None  # os.getloadavg(): 1, 5 and 15-minute load averages
    load_after: list[float] | None = None

    def load_line(self) -> str:
        if self.load_before is None:
            return f"{self.cpu_count or '?'} CPUs"
        after = f", {self.load_after[0]:.2f} after the run" if self.load_after else ""
        return f"load {self.load_before[0]:.2f} on {self.cpu_count or '?'} CPUs{after}"

    def busy(self) -> bool:
        """The machine was busy before the run: CPU timings include waiting for other work."""
        return bool(self.load_before and self.cpu_count and self.load_before[0] > BUSY_LOAD * self.cpu_count)

    def line(self, sep: str = " · ") -> str:
        return sep.join(
            (
                f"{self.device_name} ({self.device})",
                f"torch {self.torch_version} · kiln {self.kiln_version} · {self.date}",
                self.load_line(),
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

    def noisy(self) -> list[PeerResult]:
        return [r for r in self.results if r.noisy]


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
