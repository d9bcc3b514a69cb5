"""Kernel selection: for every op node, the catalog's candidates and the one chosen.

With one candidate the choice is trivial; where several can run a node, the
fastest measured one wins (see kiln.select.tune once timing lands). Ops that no kernel
implements are all reported together, each with the model source line it came from.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from kiln.capture.data_dependent import CHECK_OPS
from kiln.errors import UnsupportedOpError
from kiln.graph import CapturedGraph, module_path, source_line
from kiln.kernels import OpCall, candidates, get_kernel, op_name
from kiln.kernels.aten import out_variant
from kiln.select.tune import TimingCache, copy_signature, hinted_all, signature, time_copy, tune_node
from kiln.shapes import evaluate, from_sympy, probe_bindings
from kiln.specs import TensorSpec

PLANNER_OPS = {operator.getitem}  # resolved by the planner, never a step
SCALAR_CHECKS = CHECK_OPS  # size assertions torch.export may leave: no step in a dynamic-shape plan


@dataclass
class Selection:
    kernel: str
    candidates: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    concat_copy_ms: float | None = None  # charged to candidates that cannot write into a concat slice
    fallback: str | None = None  # dynamic shapes: run where `kernel` does not support a binding's sizes


def node_op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return op_name(target)
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def is_scalar_node(node: fx.Node) -> bool:
    """A node computing a size (aten.sym_size, operator.mul of sizes ...) or checking one: in a
    dynamic-shape graph it is no step; the planner stores its value as an expression."""
    val = node.meta.get("val")
    if isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        return True
    return node.target in SCALAR_CHECKS


def op_call(
    node: fx.Node, device_type: str, binding: Mapping[str, int] | None = None, symbols: Mapping[str, str] | None = None
) -> OpCall:
    """What kernels are asked about `node`. Symbolic sizes are evaluated at `binding` (a dynamic
    graph's dims → sizes, with `symbols` mapping the shape environment's symbols to dims)."""

    def size(d: Any) -> int:
        if isinstance(d, torch.SymInt):
            return evaluate(from_sympy(d.node.expr, symbols or {}), binding or {})
        return int(d)

    def concrete(d: Any) -> Any:
        return size(d) if isinstance(d, torch.SymInt) else d

    def spec(value: object) -> TensorSpec | None:
        val = value.meta.get("val") if isinstance(value, fx.Node) else None
        if isinstance(val, torch.Tensor):
            return TensorSpec(value.name, tuple(size(d) for d in val.shape), val.dtype)
        return None

    def constant(a: Any) -> Any:
        a = fx.node.map_arg(a, lambda n: None if not isinstance(n.meta.get("val"), torch.SymInt) else n.meta["val"])
        return torch.utils._pytree.tree_map(concrete, a) if binding is not None else a

    val = node.meta.get("val")
    outs = val if isinstance(val, (tuple, list)) else (val,)
    return OpCall(
        node_op_name(node),
        tuple(spec(a) for a in node.args),
        tuple(TensorSpec(node.name, tuple(size(d) for d in v.shape), v.dtype)
              for v in outs if isinstance(v, torch.Tensor)),
        device_type,
        tuple(constant(a) for a in node.args),
    )


def select_kernels(
    graph: CapturedGraph, cache: TimingCache | None = None, exact: bool = False
) -> dict[fx.Node, Selection]:
    """Each op node's kernel: the preferred candidate, or with a timing cache on CUDA the
    fastest one that agrees with the reference (measured now, or remembered). With `exact`,
    kernels that compute an approximation of their op are not candidates."""
    chosen: dict[fx.Node, Selection] = {}
    problems: list[tuple[str, str, str]] = []
    modules: list[str] = []
    dims = list(graph.dims.values())
    opt = {d.name: d.opt for d in dims} if dims else None
    for node in graph.module.graph.nodes:
        if node.op != "call_function" or node.target in PLANNER_OPS or (dims and is_scalar_node(node)):
            continue
        call = op_call(node, graph.device.type, opt, graph.symbols)  # dynamic: the candidates at opt
        found = candidates(call, exact) if isinstance(node.target, torch._ops.OpOverload) else []
        if not found:
            problems.append((call.op, node.name, source_line(node)))
            modules.append(module_path(node))
            continue
        names = [k.name for k in found]
        chosen[node] = Selection(kernel=names[0], candidates=names)
        if cache is not None and len(names) > 1 and graph.device.type == "cuda":
            _tune(chosen[node], node, call.op, graph, cache)
        if dims:
            _fallback(chosen[node], node, graph, dims)
    if problems:
        raise UnsupportedOpError(problems, modules)
    return chosen


def _fallback(selection: Selection, node: fx.Node, graph: CapturedGraph, dims: list[Any]) -> None:
    """Where the chosen kernel does not support the call at every probe binding
    (kiln.shapes.probe_bindings), the fallback: the fastest timed (else the most preferred)
    candidate that supports all of them (the op's reference kernel supports any size). The
    runtime asks the kernel per binding and runs the fallback where it says no."""
    calls = [op_call(node, graph.device.type, b, graph.symbols) for b in probe_bindings(dims)]
    kernel = get_kernel(selection.kernel)
    if all(kernel.supports(c) for c in calls):
        return
    ok = [n for n in selection.candidates if all(get_kernel(n).supports(c) for c in calls)]
    if not ok:
        raise UnsupportedOpError([(node_op_name(node), node.name, source_line(node))], [module_path(node)])
    timed = [n for n in ok if n in selection.timings_ms]
    selection.fallback = min(timed, key=selection.timings_ms.get) if timed else ok[0]


def _tune(selection: Selection, node: fx.Node, op: str, graph: CapturedGraph, cache: TimingCache) -> None:
    key = signature(node, graph.device)
    entry = cache.entries.get(key)
    if entry is not None and set(entry) <= set(selection.candidates):
        cache.hits += 1
    else:
        cache.misses += 1
        entry = tune_node(node, op, selection.candidates, graph.module, graph.device)
        cache.entries[key] = entry
    if entry:
        selection.timings_ms = dict(entry)
        writers = {k for k in entry if writes_into(k, op, graph.device.type)}
        if writers and len(writers) < len(entry) and _concat_writable(node, graph.device.type):
            selection.concat_copy_ms = _copy_ms(node, graph.device, cache)
        selection.kernel = fastest(entry, writers, selection.concat_copy_ms or 0.0)


def fastest(timings_ms: dict[str, float], writers: set[str], copy_ms: float) -> str:
    """The candidate with the least time, charging `copy_ms` to those not in `writers` (the
    concatenation's copy they leave behind)."""
    return min(timings_ms, key=lambda k: timings_ms[k] + (0.0 if k in writers else copy_ms))


def writes_into(kernel: str, op: str, device_type: str) -> bool:
    """Whether `kernel` can write its result into a view the planner gives it (kiln.plan.planner)."""
    k = get_kernel(kernel)
    return k.writes_into or (k.writes_planned_outputs and out_variant(op, device_type) is not None)


def concat_inputs(cat: fx.Node) -> list[fx.Node] | None:
    """The inputs of an `aten.cat` the planner may place in its output (kiln.plan.planner): each the
    result of an op, read by this cat alone and once, non-empty and of the cat's dtype.
    None where any is not."""
    val = cat.meta.get("val")
    if cat.target != torch.ops.aten.cat.default or not isinstance(val, torch.Tensor) or val.numel() == 0:
        return None
    tensors = list(cat.args[0])
    for t in tensors:
        if not isinstance(t, fx.Node) or t.op != "call_function" or len(t.users) != 1 or tensors.count(t) != 1:
            return None
        t_val = t.meta.get("val")
        if not isinstance(t_val, torch.Tensor) or t_val.dtype != val.dtype or t_val.numel() == 0:
            return None
    return tensors


def _concat_writable(node: fx.Node, device_type: str) -> bool:
    """`node` is read only by a concatenation whose inputs each have a kernel that could write
    straight into its slice: the planner then drops the cat's copy if they all do (kiln.plan.planner)."""
    users = list(node.users)
    tensors = concat_inputs(users[0]) if len(users) == 1 else None
    if tensors is None:
        return False
    calls = [op_call(t, device_type) for t in tensors]
    return all(any(writes_into(k.name, c.op, device_type) for k in candidates(c)) for c in calls)


def _copy_ms(node: fx.Node, device: torch.device, cache: TimingCache) -> float:
    """What the cat spends copying this input: one read and one write of it (timed, cached)."""
    val = node.meta["val"]
    shape = tuple(hinted_all(val.shape))
    key = copy_signature(shape, val.dtype, device)
    if key not in cache.entries:
        cache.entries[key] = {"copy": time_copy(shape, val.dtype, device)}
    return cache.entries[key]["copy"]
