"""The precision debugger: each layer of a kiln-transformed graph compared with fp32, named by
PyTorch module path and source line; the first layer that diverges; bisection over layers.

The reference is the model captured in fp32 (checked against eager fp32 when the model is
given). The candidate is what an engine would run: the model captured at fp16 / bf16,
after kiln's passes, or with simulated int8 / fp8 quantization (Q/DQ), or any graph passed
in. For each layer (a leaf module's output, or every op with granularity="op") two errors:

- accumulated: the candidate run end to end, against the reference at that point;
- local: the candidate's op fed the reference's inputs, so only its own error shows.

The first layer whose accumulated error passes the tolerance is where the output starts to
go wrong; the layer with the largest local error is the likeliest culprit. Bisection
(precision fp16 / bf16 / int8 / fp8) lowers only a prefix of the layers and finds the
shortest prefix whose output fails the tolerance, in O(log n) runs: the layer it ends at is
the one that breaks the output (assuming errors only grow as more layers are lowered).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from kiln.graph import CapturedGraph, module_path, source_line
from kiln.quant.calibrate import as_batch, graph_inputs
from kiln.quant.sites import VIEW_OPS, op_name

# Relative-error tolerance per candidate precision (what "diverged" means by default).
DEFAULT_TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2, "int8": 0.1, "fp8": 0.1, "fp8_e4m3": 0.1}
LOW_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
QUANT = ("int8", "fp8", "fp8_e4m3")


@dataclass
class LayerRow:
    index: int  # position in the reference graph's order
    node: str  # reference node name
    module: str  # "layer2.0.conv1"; "" at the model's top level
    op: str
    source: str
    shape: tuple[int, ...]
    candidate: str | None = None  # the candidate node compared with it; None: fused away / absent
    matched_by: str | None = None  # "name" | "position" (feeds the same argument of a same-named op)
    rel_error: float | None = None  # accumulated: ‖cand − ref‖ / ‖ref‖
    cosine: float | None = None
    max_abs: float | None = None
    local_rel_error: float | None = None  # the candidate op fed the reference's inputs
    diverged: bool = False

    @property
    def where(self) -> str:
        return self.module or f"<top level> {self.node}"


@dataclass
class BisectStep:
    layers: int  # a prefix of this many layers lowered
    rel_error: float  # of the model output
    fails: bool


@dataclass
class Bisection:
    layers: int  # how many layers were candidates
    first_failing: int | None  # 1-based length of the shortest failing prefix; None: even all pass
    layer: str | None  # node name of the layer that completes it
    module: str | None
    source: str | None
    steps: list[BisectStep] = field(default_factory=list)


@dataclass
class PrecisionReport:
    precision: str
    description: str
    tolerance: float
    rows: list[LayerRow]
    output: dict[str, float]  # candidate vs reference at the model output
    eager_rel_error: float | None = None  # reference capture vs eager fp32 (model given)
    first_divergent: LayerRow | None = None
    worst_local: LayerRow | None = None
    bisection: Bisection | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- running graphs node by node ------------------------------------------------------------


class _Runner(fx.Interpreter):
    """Interprets a graph, recording some nodes' values; optionally replacing recorded values
    by given ones (reference substitution), or running some nodes in a lower precision."""

    def __init__(
        self,
        module: fx.GraphModule,
        record: Iterable[str] = (),
        substitute: dict[str, torch.Tensor] | None = None,
        lower: tuple[set[str], torch.dtype] | None = None,
    ) -> None:
        super().__init__(module)
        self.record = set(record)
        self.substitute = substitute or {}
        self.lower = lower
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if self.lower is not None and n.op == "call_function" and n.name in self.lower[0]:
            result = self._run_lowered(n, self.lower[1])
        else:
            result = super().run_node(n)
        if n.name in self.record and isinstance(result, torch.Tensor):
            self.values[n.name] = result.detach()
        sub = self.substitute.get(n.name)
        if sub is not None and isinstance(result, torch.Tensor) and sub.shape == result.shape:
            result = sub.to(result.dtype)
        return result

    def _run_lowered(self, n: fx.Node, dtype: torch.dtype) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)

        def low(x: Any) -> Any:
            return x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x

        args, kwargs = fx.node.map_aggregate((args, kwargs), low)
        result = n.target(*args, **kwargs)
        return fx.node.map_aggregate(
            result, lambda x: x.float() if isinstance(x, torch.Tensor) and x.dtype == dtype else x
        )


def _run(graph: CapturedGraph, batch: Any, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    runner = _Runner(graph.module, **kwargs)
    with torch.no_grad():
        out = runner.run(*graph_inputs(graph, batch))
    return out, runner.values


# --- which nodes are layers, and how candidate nodes match them ------------------------------


def _float_value(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) and val.is_floating_point() else None


def _module_key(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else None


def _compute_nodes(graph: CapturedGraph) -> list[fx.Node]:
    return [
        n
        for n in graph.module.graph.nodes
        if n.op == "call_function" and n.target not in VIEW_OPS and _float_value(n) is not None
        and getattr(n.target, "__name__", "") != "getitem"
    ]


def _lasts(nodes: Sequence[fx.Node], key: Callable[[fx.Node], str | None]) -> dict[str, fx.Node]:
    last: dict[str, fx.Node] = {}
    for n in nodes:
        k = key(n)
        if k:
            last[k] = n
    return last


def layer_nodes(graph: CapturedGraph, granularity: str = "module") -> list[fx.Node]:
    """The reference nodes reported as layers: each leaf module call's output (the last op
    under its innermost module), or every op with granularity="op"; plus the graph outputs."""
    nodes = [n for n in graph.module.graph.nodes if n.op == "call_function" and _float_value(n) is not None]
    if granularity == "op":
        chosen = set(_compute_nodes(graph))
    elif granularity == "module":
        chosen = {n for n in _lasts(nodes, _module_key).values()}
    else:
        raise ValueError(f"granularity must be 'module' or 'op', got {granularity!r}")
    out = next(n for n in graph.module.graph.nodes if n.op == "output")
    for a in out.all_input_nodes:
        if _float_value(a) is not None:
            chosen.add(a)
    return [n for n in graph.module.graph.nodes if n in chosen]


def _match(reference: CapturedGraph, candidate: CapturedGraph, rows: list[fx.Node]) -> dict[str, tuple[fx.Node, str]]:
    """Candidate node computing each reference row's value: the node of the same name (passes
    and Q/DQ insertion keep the names of ops they leave alone), else the node that feeds the
    same argument of a same-named op, or the same graph output (a fused op takes the uses of
    the last node it replaces, so it feeds what that node fed)."""
    ref_by_name = {n.name: n for n in reference.module.graph.nodes}
    wanted = {r.name for r in rows}
    found: dict[str, tuple[fx.Node, str]] = {}

    def same_shape(c: fx.Node, r: fx.Node) -> bool:
        cv, rv = _float_value(c), _float_value(r)
        return cv is not None and rv is not None and tuple(cv.shape) == tuple(rv.shape)

    def flat_args(n: fx.Node) -> list[object]:
        out: list[object] = []
        fx.node.map_aggregate((n.args, n.kwargs), lambda a: out.append(a))
        return out

    for c in candidate.module.graph.nodes:
        r = ref_by_name.get(c.name)
        if c.op == "call_function" and r is not None and r.name in wanted and same_shape(c, r):
            found[r.name] = (c, "name")
    for user in candidate.module.graph.nodes:
        anchor = ref_by_name.get(user.name)
        if anchor is None or user.op not in ("call_function", "output") or anchor.target != user.target:
            continue
        for c, r in zip(flat_args(user), flat_args(anchor)):
            if (isinstance(c, fx.Node) and isinstance(r, fx.Node) and r.name in wanted and r.name not in found
                    and c.op == "call_function" and same_shape(c, r)):
                found[r.name] = (c, "position")
    return found


# --- errors ---------------------------------------------------------------------------------


def _errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    y, ref = y.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
    diff = y - ref
    norm = float(ref.norm())
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.norm() > 0)
    cos = float(torch.nn.functional.cosine_similarity(y, ref, dim=0, eps=1e-30)) if y.numel() else 1.0
    return rel, cos, float(diff.abs().max()) if diff.numel() else 0.0


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat(v)]
    return []


def _output_error(out: Any, ref: Any) -> float:
    pairs = [(y, r) for y, r in zip(_flat(out), _flat(ref)) if r.is_floating_point()]
    num = sum(float((y.double().cpu() - r.double().cpu()).norm() ** 2) for y, r in pairs)
    den = sum(float(r.double().cpu().norm() ** 2) for _, r in pairs)
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


# --- candidates -----------------------------------------------------------------------------


def cast_graph(graph: CapturedGraph, dtype: torch.dtype) -> CapturedGraph:
    """A copy of `graph` with floating weights and inputs in `dtype` (for a graph given
    without its model; with the model, capturing at that precision is closer to an engine)."""
    module = fx.GraphModule(graph.module, copy.deepcopy(graph.module.graph))
    for name, buf in list(module.named_buffers()):
        if buf.is_floating_point() and buf.dtype == torch.float32:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, buf.to(dtype))
    inputs = [
        dataclasses.replace(s, dtype=dtype) if s.dtype == torch.float32 else s for s in graph.graph_inputs
    ]
    cast = dataclasses.replace(graph, module=module, graph_inputs=inputs, compute_dtype=dtype)
    from kiln.graph import refresh_meta

    refresh_meta(cast)
    return cast


def _capture(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> CapturedGraph:
    from kiln.capture.export import capture

    return capture(model, inputs, device=torch.device("cpu"), compute_dtype=dtype)


def _with_passes(graph: CapturedGraph, passes: bool | list[str] | None) -> CapturedGraph:
    if not passes:
        return graph
    from kiln.passes import run_passes

    return run_passes(graph, None if passes is True else list(passes))[0]


# --- the debugger ---------------------------------------------------------------------------


def debug_precision(
    model_or_graph: torch.nn.Module | CapturedGraph,
    inputs: Any,
    *,
    precision: str = "fp16",
    candidate: CapturedGraph | None = None,
    passes: bool | list[str] | None = False,
    calibration: Iterable[Any] | None = None,
    method: str = "entropy",
    tol: float | None = None,
    bisect: bool = True,
    granularity: str = "module",
) -> PrecisionReport:
    """Compare each layer of the candidate graph with fp32 (see the module docstring).

    `model_or_graph`: an nn.Module (captured here at fp32 on CPU) or an fp32 CapturedGraph.
    `inputs`: one batch (a tensor or tuple of tensors). `precision`: fp32 / fp16 / bf16 /
    int8 / fp8, unless `candidate` is given. `passes`: also run kiln's passes on the
    candidate (True: the default passes; or a list of names). `calibration`: batches for
    int8/fp8 (default: `inputs`). `tol`: relative error that counts as diverged."""
    batch = as_batch(inputs)
    precision = precision.lower()
    notes: list[str] = []
    model = model_or_graph if isinstance(model_or_graph, torch.nn.Module) else None
    if isinstance(model_or_graph, CapturedGraph):
        reference = model_or_graph
        if reference.compute_dtype != torch.float32:
            notes.append(f"the reference graph computes in {reference.compute_dtype}, not fp32")
    elif model is not None:
        reference = _capture(model, batch, torch.float32)
    else:
        raise TypeError(f"debug_precision takes an nn.Module or a CapturedGraph, got {type(model_or_graph).__name__}")

    if precision not in (*LOW_DTYPES, *QUANT, "fp32"):
        raise ValueError(f"precision must be one of fp32, fp16, bf16, int8, fp8; got {precision!r}")
    # With passes at a lower precision, the reference runs the same passes in fp32: the fused
    # graph's layers (named by the module they start at) are compared one to one.
    fused_reference = bool(passes) and precision != "fp32" and candidate is None
    if fused_reference:
        reference = _with_passes(reference, passes)
        notes.append("the fp32 reference ran the same kiln passes (its output is compared with eager below)")
    table = None
    if candidate is not None:
        description = "the given graph"
    elif precision in LOW_DTYPES:
        dtype = LOW_DTYPES[precision]
        candidate = _capture(model, batch, dtype) if model is not None else cast_graph(reference, dtype)
        description = f"captured at {precision}" if model is not None else f"graph cast to {precision}"
        if fused_reference and model is not None:
            candidate = _with_passes(candidate, passes)
    elif precision in QUANT:
        from kiln.quant.calibrate import calibrate
        from kiln.quant.insert import insert_qdq

        table = calibrate(reference, calibration if calibration is not None else [batch], method, precision)
        candidate = insert_qdq(reference, table)
        description = f"simulated {table.fmt.name} (Q/DQ, {method} calibration over {table.batches} batches)"
    else:
        candidate = _with_passes(reference, passes) if passes else reference
        description = "fp32"
    if passes:
        description += " after kiln passes"
    tolerance = DEFAULT_TOL.get(precision, 1e-2) if tol is None else float(tol)

    layers = layer_nodes(reference, granularity)
    matches = _match(reference, candidate, layers)
    ref_out, ref_vals = _run(reference, batch, record=[n.name for n in layers])
    cand_names = [c.name for c, _ in matches.values()]
    cand_out, cand_vals = _run(candidate, batch, record=cand_names)
    substitute = {matches[r][0].name: ref_vals[r] for r in matches if r in ref_vals}
    _, local_vals = _run(candidate, batch, record=cand_names, substitute=substitute)

    rows: list[LayerRow] = []
    for i, node in enumerate(layers):
        shape = tuple(_float_value(node).shape)
        row = LayerRow(i, node.name, module_path(node), op_name(node), source_line(node), shape)
        match = matches.get(node.name)
        if match is not None and node.name in ref_vals and match[0].name in cand_vals:
            c, how = match
            row.candidate, row.matched_by = c.name, how
            row.rel_error, row.cosine, row.max_abs = _errors(cand_vals[c.name], ref_vals[node.name])
            if c.name in local_vals:
                row.local_rel_error = _errors(local_vals[c.name], ref_vals[node.name])[0]
            row.diverged = not row.rel_error <= tolerance  # (NaN diverges)
        rows.append(row)

    rel, cos, mx = _errors(*(torch.cat([t.flatten().double() for t in _flat(v)]) for v in (cand_out, ref_out)))
    report = PrecisionReport(
        precision, description, tolerance, rows, {"rel_error": rel, "cosine": cos, "max_abs": mx}, notes=notes
    )
    if model is not None:
        with torch.no_grad():
            eager = model.eval()(*batch)
        report.eager_rel_error = _output_error(reference.run(*batch), eager)
    report.first_divergent = next((r for r in rows if r.diverged), None)
    local = [r for r in rows if r.local_rel_error is not None]
    report.worst_local = max(local, key=lambda r: r.local_rel_error) if local else None
    unmatched = sum(r.candidate is None for r in rows)
    if unmatched:
        notes.append(f"{unmatched} of {len(rows)} layers have no counterpart in the candidate (fused away)")
    if bisect and (precision in LOW_DTYPES or table is not None) and not rel <= tolerance:
        report.bisection = _bisect(reference, batch, ref_out, precision, table, tolerance)
    elif bisect and rel <= tolerance:
        notes.append(f"the output is within tolerance ({rel:.3g} <= {tolerance:g}): nothing to bisect")
    return report


def _bisect(
    reference: CapturedGraph, batch: Any, ref_out: Any, precision: str, table: Any, tolerance: float
) -> Bisection:
    """The shortest prefix of layers whose lowering alone fails the output tolerance."""
    if table is not None:
        from kiln.quant.insert import insert_qdq
        from kiln.quant.sites import find_sites

        order = find_sites(reference)

        def output_error(k: int) -> float:
            graph = insert_qdq(reference, table, only=[s.name for s in order[:k]])
            return _output_error(_run(graph, batch)[0], ref_out)

        names = [(s.name, s.module, source_line(s.node)) for s in order]
    else:
        nodes = _compute_nodes(reference)
        dtype = LOW_DTYPES[precision]

        def output_error(k: int) -> float:
            lowered = {n.name for n in nodes[:k]}
            return _output_error(_run(reference, batch, lower=(lowered, dtype))[0], ref_out)

        names = [(n.name, module_path(n), source_line(n)) for n in nodes]
    steps: list[BisectStep] = []

    def fails(k: int) -> bool:
        err = output_error(k)
        steps.append(BisectStep(k, err, not err <= tolerance))
        return not err <= tolerance

    n = len(names)
    result = Bisection(n, None, None, None, None, steps)
    if not n or not fails(n):
        return result
    lo, hi = 0, n  # prefix lo passes (0 lowers nothing), prefix hi fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid
    result.first_failing = hi
    result.layer, result.module, result.source = names[hi - 1]
    return result


# --- rendering ------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "—" if x is None else format(x, spec)


def render_precision(report: PrecisionReport, max_rows: int | None = 60) -> Any:
    """A rich renderable: the per-layer table, then the verdict lines."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"precision: {report.description} vs fp32 (tolerance rel. error {report.tolerance:g})")
    for col, justify in (("#", "right"), ("layer (module path)", "left"), ("op", "left"), ("shape", "left"),
                         ("rel. error", "right"), ("cosine", "right"), ("local", "right"), ("source", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    rows = report.rows
    if max_rows is not None and len(rows) > max_rows:
        keep = set(range(max_rows // 2)) | set(range(len(rows) - max_rows // 2, len(rows)))
        for r in (report.first_divergent, report.worst_local):
            if r is not None:
                keep.add(r.index)
        rows = [r for r in rows if r.index in keep]
    previous = -1
    for r in rows:
        if r.index != previous + 1:
            table.add_row("…", f"({r.index - previous - 1} layers)", "", "", "", "", "", "")
        previous = r.index
        style = "bold red" if r is report.first_divergent else ("red" if r.diverged else None)
        if r is report.worst_local and style is None:
            style = "yellow"
        table.add_row(
            str(r.index), r.where, r.op, "×".join(map(str, r.shape)),
            _fmt(r.rel_error) if r.candidate else "fused", _fmt(r.cosine, ".6f"), _fmt(r.local_rel_error),
            r.source.rsplit("/", 1)[-1], style=style,
        )
    lines = [Text(f"output: rel. error {report.output['rel_error']:.3g}, cosine {report.output['cosine']:.6f}")]
    if report.eager_rel_error is not None:
        lines.append(Text(f"fp32 capture vs eager: rel. error {report.eager_rel_error:.2g}"))
    if report.first_divergent is not None:
        r = report.first_divergent
        lines.append(Text(f"first layer beyond tolerance: {r.where} ({r.op}) at {r.source}", style="bold red"))
    else:
        lines.append(Text("no layer beyond tolerance", style="green"))
    if report.worst_local is not None and report.worst_local.local_rel_error:
        r = report.worst_local
        lines.append(Text(f"largest own (local) error: {r.where} ({r.op}) {r.local_rel_error:.3g} at {r.source}"))
    b = report.bisection
    if b is not None and b.first_failing is not None:
        lines.append(Text(
            f"bisection ({len(b.steps)} runs): lowering the first {b.first_failing} of {b.layers} layers breaks the "
            f"output; it ends at {b.module or b.layer} ({b.source})", style="bold"))
    elif b is not None:
        lines.append(Text(f"bisection: lowering all {b.layers} layers one prefix at a time never failed"))
    lines += [Text(n, style="dim") for n in report.notes]
    return Group(table, *lines)
