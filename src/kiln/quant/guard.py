"""The accuracy guard: compare a quantized graph with fp32 on held-back samples, measure each
layer's sensitivity, and keep the most sensitive layers in high precision until a stated
target holds ("cosine>=0.999", "top1>=0.99", "max_abs<=0.05", several joined by commas).

Metrics (over all held-back samples, outputs flattened per batch row):
  cosine      mean cosine similarity of output rows with fp32's
  min_cosine  the lowest row cosine
  top1        share of rows (of outputs with ≥ 2 dims) whose argmax over the last dim agrees
  max_abs     largest absolute difference
  rel_error   ‖out − ref‖ / ‖ref‖ over everything
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kiln.graph import CapturedGraph
from kiln.quant.calibrate import as_batch
from kiln.quant.insert import insert_qdq
from kiln.quant.params import CalibrationTable
from kiln.quant.sites import Site, find_sites

# metric name → True when larger is better
METRICS: dict[str, bool] = {"cosine": True, "min_cosine": True, "top1": True, "max_abs": False, "rel_error": False}
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_TARGET = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Target:
    metric: str
    op: str
    value: float

    def holds(self, metrics: dict[str, float]) -> bool:
        return _OPS[self.op](metrics[self.metric], self.value)

    def damage(self, metrics: dict[str, float]) -> float:
        """How far from perfect the metric is (0 for an exact match with fp32)."""
        got = metrics[self.metric]
        return 1.0 - got if METRICS[self.metric] else got

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_targets(text: str | Target | Sequence[str | Target]) -> list[Target]:
    """"cosine>=0.999" or "cosine>=0.999,top1>=0.99" → targets; a ValueError says what is wrong."""
    if isinstance(text, Target):
        return [text]
    if not isinstance(text, str):
        return [t for item in text for t in parse_targets(item)]
    targets = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _TARGET.match(part)
        if not m:
            raise ValueError(
                f"cannot read accuracy target {part!r}: write METRIC>=VALUE or METRIC<=VALUE, "
                f"e.g. cosine>=0.999 (metrics: {', '.join(METRICS)})"
            )
        metric, op, value = m.groups()
        if metric not in METRICS:
            raise ValueError(f"unknown accuracy metric {metric!r} in {part!r}; known: {', '.join(METRICS)}")
        try:
            targets.append(Target(metric, op, float(value)))
        except ValueError:
            raise ValueError(f"accuracy target {part!r}: {value!r} is not a number") from None
    if not targets:
        raise ValueError("empty accuracy target; e.g. cosine>=0.999")
    return targets


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _leaves(v)]
    return []


def compare_outputs(outputs: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    """The metrics of `outputs` against `references` (one model output per held-back batch)."""
    cosines, agree, total_rows = [], 0, 0
    max_abs, err2, ref2 = 0.0, 0.0, 0.0
    for out, ref in zip(outputs, references):
        for y, r in zip(_leaves(out), _leaves(ref)):
            if not r.is_floating_point():
                continue
            y, r = y.detach().double().cpu(), r.detach().double().cpu()
            rows_y = y.reshape(y.shape[0], -1) if y.dim() >= 2 else y.reshape(1, -1)
            rows_r = r.reshape(r.shape[0], -1) if r.dim() >= 2 else r.reshape(1, -1)
            cosines.append(torch.nn.functional.cosine_similarity(rows_y, rows_r, dim=1, eps=1e-30))
            if r.dim() >= 2:
                agree += int((y.argmax(-1) == r.argmax(-1)).sum())
                total_rows += r.argmax(-1).numel()
            diff = y - r
            max_abs = max(max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
            err2 += float((diff * diff).sum())
            ref2 += float((r * r).sum())
    if not cosines:
        raise ValueError("no floating-point outputs to compare")
    cos = torch.cat(cosines)
    return {
        "cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top1": agree / total_rows if total_rows else 1.0,
        "max_abs": max_abs,
        "rel_error": (err2 / ref2) ** 0.5 if ref2 > 0 else float(err2 > 0),
    }


def evaluate(graph: CapturedGraph, samples: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    with torch.no_grad():
        outputs = [graph.run(*as_batch(s)) for s in samples]
    return compare_outputs(outputs, references)


@dataclass
class LayerSensitivity:
    name: str  # node name of the quantizable op
    module: str  # module path ("layer2.0.conv1")
    op: str
    source: str
    damage: float  # of the first target's metric, 0 = exact (see Target.damage)
    metrics: dict[str, float]  # measured for this layer's probe (see GuardReport.mode)


@dataclass
class KeptLayer:
    name: str
    module: str
    op: str
    source: str
    reason: str


@dataclass
class GuardReport:
    targets: list[str]
    mode: str  # "one_at_a_time": each layer quantized alone; "all_but_one": all others quantized
    quantized_all: dict[str, float]  # every layer quantized
    final: dict[str, float]  # with `kept` in high precision
    met: bool
    layers: int
    kept: list[KeptLayer] = field(default_factory=list)
    sensitivities: list[LayerSensitivity] = field(default_factory=list)  # most sensitive first
    evaluations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        targets = ", ".join(self.targets)
        first = parse_targets(self.targets)[0].metric
        state = "met" if self.met else "NOT met"
        kept = ", ".join(k.module or k.name for k in self.kept) or "none"
        return (
            f"accuracy target {targets} {state}: {first} {self.quantized_all.get(first, float('nan')):.6g} with all "
            f"{self.layers} layers quantized, {self.final.get(first, float('nan')):.6g} with {len(self.kept)} kept in "
            f"high precision ({kept})"
        )


def _describe(site: Site) -> tuple[str, str, str, str]:
    return site.name, site.module, site.op, site.source


def accuracy_guard(
    graph: CapturedGraph,
    table: CalibrationTable,
    samples: Iterable[Any],
    target: str | Target | Sequence[Target] = "cosine>=0.999",
    *,
    mode: str = "one_at_a_time",
    max_kept: int | None = None,
    exclude: Iterable[str] = (),
) -> tuple[CapturedGraph, GuardReport]:
    """Quantize `graph` (fp32) with `table`; if the target fails on the held-back `samples`,
    rank layers by sensitivity and keep the most sensitive in high precision, one at a time,
    until it holds (or `max_kept` are kept). Returns the quantized graph and the report."""
    targets = parse_targets(target)
    if mode not in ("one_at_a_time", "all_but_one"):
        raise ValueError(f"mode must be 'one_at_a_time' or 'all_but_one', got {mode!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("the accuracy guard needs held-back samples; none were given")
    with torch.no_grad():
        references = [graph.run(*as_batch(s)) for s in samples]
    kept_names = list(dict.fromkeys(exclude))
    sites = [s for s in find_sites(graph) if s.name not in kept_names]
    evaluations = 0

    def measure(**kwargs: Any) -> dict[str, float]:
        nonlocal evaluations
        evaluations += 1
        return evaluate(insert_qdq(graph, table, **kwargs), samples, references)

    all_metrics = measure(exclude=kept_names)
    met = all(t.holds(all_metrics) for t in targets)
    report = GuardReport([str(t) for t in targets], mode, all_metrics, all_metrics, met, len(sites))
    if report.met or not sites:
        report.evaluations = evaluations
        return insert_qdq(graph, table, exclude=kept_names), report

    primary = targets[0]
    ranked = []
    for site in sites:
        if mode == "one_at_a_time":
            metrics = measure(only=[site.name])
            damage = primary.damage(metrics)
        else:
            metrics = measure(exclude=[*kept_names, site.name])
            damage = primary.damage(all_metrics) - primary.damage(metrics)  # what keeping it saves
        ranked.append(LayerSensitivity(*_describe(site), damage, metrics))
    ranked.sort(key=lambda s: s.damage, reverse=True)
    report.sensitivities = ranked

    limit = len(ranked) if max_kept is None else min(max_kept, len(ranked))
    final = all_metrics
    by_name = {s.name: s for s in sites}
    for rank, layer in enumerate(ranked[:limit], 1):
        kept_names.append(layer.name)
        final = measure(exclude=kept_names)
        now = ", ".join(f"{t.metric} {final[t.metric]:.6g}" for t in targets)
        probe = "quantized alone" if mode == "one_at_a_time" else "left out of quantization"
        reason = (
            f"sensitivity rank {rank}: {primary.metric} damage {layer.damage:.3g} when {probe}; "
            f"kept in high precision → {now}"
        )
        report.kept.append(KeptLayer(*_describe(by_name[layer.name]), reason))
        if all(t.holds(final) for t in targets):
            break
    report.final = final
    report.met = all(t.holds(final) for t in targets)
    report.evaluations = evaluations
    return insert_qdq(graph, table, exclude=kept_names), report
