"""Build-phase passes: each a pure CapturedGraph → CapturedGraph function.

Register one with `@register_pass("name")` in its own module; `run_passes` applies
them in registration order (or the order a BuildConfig names) and records how many
op nodes each one left, for `kiln inspect`. A pass registered with `default=False`
runs only where a BuildConfig names it (measured not to pay everywhere).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass

from torch import fx

from kiln.graph import CapturedGraph

Pass = Callable[[CapturedGraph], CapturedGraph]


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    fn: Pass
    doc: str
    default: bool = True


PASSES: dict[str, RegisteredPass] = {}


def register_pass(name: str, default: bool = True) -> Callable[[Pass], Pass]:
    def deco(fn: Pass) -> Pass:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        PASSES[name] = RegisteredPass(name, fn, doc, default)
        return fn

    return deco


def copy_graph(graph: CapturedGraph) -> CapturedGraph:
    """A copy a pass may rewrite in place; weight tensors are shared, not copied."""
    module = fx.GraphModule(graph.module, copy.deepcopy(graph.module.graph))
    return dataclasses.replace(graph, module=module, masters=dict(graph.masters))


def count_ops(graph: CapturedGraph) -> int:
    """Op nodes that become steps (getitem only picks an output of another op)."""
    return sum(1 for n in graph.module.graph.nodes if n.op == "call_function" and n.target is not operator.getitem)


def default_passes() -> list[str]:
    return [name for name, p in PASSES.items() if p.default]


def run_passes(graph: CapturedGraph, names: list[str] | None = None) -> tuple[CapturedGraph, list[dict]]:
    """Apply the named passes (default: every default pass, in registration order); report op counts."""
    chosen = default_passes() if names is None else names
    unknown = [n for n in chosen if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; known: {', '.join(PASSES)}")
    report = [{"pass": "capture", "ops": count_ops(graph)}]
    for name in chosen:
        graph = PASSES[name].fn(copy_graph(graph))
        report.append({"pass": name, "ops": count_ops(graph)})
    return graph, report


# Registration order is the default pass order.
from kiln.passes import (  # noqa: E402,F401,I001
    dead_code,
    batched_weight_matmul,
    constant_fold,
    attention_mask,
    fold_batchnorm,
    fuse_conv,
    fuse_linear,
    horizontal,
    fuse_layer_norm,
    channels_last,
    fuse_pointwise,
)
