"""Build-phase passes: each a pure CapturedGraph → CapturedGraph function (README.md: the invariants).

A pass is registered with `@register_pass("name")` (kiln.passes.registry) in its own module
and runs where `PIPELINE` below puts it: `run_passes` applies every default pass in that
order (or the passes a BuildConfig names, in its order) and records how many op nodes each
one left, for `kiln inspect`. A pass registered with `default=False` runs only where a
BuildConfig names it (measured not to pay everywhere).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator

from torch import fx

from kiln.graph import CapturedGraph
from kiln.passes import (  # noqa: F401  (each registers its pass)
    attention_mask,
    batched_weight_matmul,
    causal_mask,
    channels_last,
    constant_fold,
    dead_code,
    fold_batchnorm,
    fuse_attention,
    fuse_conv,
    fuse_layer_norm,
    fuse_linear,
    fuse_pointwise,
    fuse_rowwise,
    gather_cat,
    horizontal,
)
from kiln.passes.registry import PASSES, Pass, RegisteredPass, register_pass

__all__ = [
    "PASSES",
    "PIPELINE",
    "Pass",
    "RegisteredPass",
    "copy_graph",
    "count_ops",
    "default_passes",
    "register_pass",
    "run_passes",
]

# Every registered pass, in the order a build runs them.
PIPELINE: tuple[str, ...] = (
    "dead_code",  # unused ops out, identities bypassed, duplicate pure ops merged
    # bmm(q, kᵀ) [× s] [+ bias] → softmax → bmm(·, v) → SDPA with an additive mask; before the folds
    # (its bias folds, trivial masks drop) and before fuse_rowwise (which would take the softmax)
    "fuse_attention",
    "batched_weight_matmul",  # bmm against a broadcast weight (+ bias) → one mm/addmm
    "constant_fold",  # subgraphs of weights alone → new weights
    "drop_trivial_attention_mask",  # constant attention masks that mask nothing → none
    # constant causal masks (folded just above) → is_causal=True, so flash attention can run them
    "causal_mask",
    "fold_batchnorm",  # conv → batch norm into the conv; other batch norms → scale + shift
    "fuse_conv",  # conv + bias [+ residual] [+ activation] → kiln::conv_bias_act
    "fuse_linear",  # matmul + bias [+ activation] → kiln::linear_act
    "horizontal_fuse",  # sibling linears reading one input → one linear
    "horizontal_fuse_conv",  # sibling convolutions (opt-in: default=False)
    "fuse_layer_norm",  # residual add + layer norm → kiln::add_layer_norm
    "channels_last",  # convolutional graphs → channels-last activations
    # cat of (negated) slices of one tensor (rotary's rotate_half) → index_select × a sign, which
    # fuse_pointwise then takes into the rotary product
    "gather_cat",
    "fuse_rowwise",  # last-dim reductions (norms, softmax) + their elementwise neighbours → kiln::rowwise
    "fuse_pointwise",  # chains of elementwise ops → kiln::pointwise
)


def _in_pipeline_order() -> None:
    """Check PIPELINE against the registry and order PASSES as the pipeline runs them."""
    missing, unlisted = set(PIPELINE) - set(PASSES), set(PASSES) - set(PIPELINE)
    if missing or unlisted:
        raise RuntimeError(
            f"kiln.passes.PIPELINE names passes nobody registered ({sorted(missing)}) or misses registered "
            f"ones ({sorted(unlisted)}): list every @register_pass name in PIPELINE, where it should run"
        )
    ordered = {name: PASSES[name] for name in PIPELINE}
    PASSES.clear()
    PASSES.update(ordered)


_in_pipeline_order()


def copy_graph(graph: CapturedGraph) -> CapturedGraph:
    """A copy a pass may rewrite in place; weight tensors are shared, not copied."""
    module = fx.GraphModule(graph.module, copy.deepcopy(graph.module.graph))
    return dataclasses.replace(graph, module=module, masters=dict(graph.masters))


def count_ops(graph: CapturedGraph) -> int:
    """Op nodes that become steps (getitem only picks an output of another op)."""
    return sum(1 for n in graph.module.graph.nodes if n.op == "call_function" and n.target is not operator.getitem)


def default_passes() -> list[str]:
    return [name for name in PIPELINE if PASSES[name].default]


def run_passes(graph: CapturedGraph, names: list[str] | None = None) -> tuple[CapturedGraph, list[dict]]:
    """Apply the named passes (default: every default pass, in PIPELINE order); report op counts."""
    chosen = default_passes() if names is None else names
    unknown = [n for n in chosen if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; known: {', '.join(PASSES)}")
    report = [{"pass": "capture", "ops": count_ops(graph)}]
    for name in chosen:
        with _no_guards(graph):
            graph = PASSES[name].fn(copy_graph(graph))
        report.append({"pass": name, "ops": count_ops(graph)})
    return graph, report


def _no_guards(graph: CapturedGraph) -> contextlib.AbstractContextManager:
    """Passes compare sizes (is this a broadcast? the same layout?). On a graph with dynamic dims
    such a comparison would add a guard to the shape environment, and a guard such as batch == 4
    fixes the dim at its traced size for every later stage. Passes decide at the traced sizes
    without guarding; the build's size check (check_dims) runs the engine across the range."""
    if not graph.dims:
        return contextlib.nullcontext()
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta.get("val") for n in graph.module.graph.nodes if n.op == "placeholder"])
    if mode is None or mode.shape_env is None:
        return contextlib.nullcontext()
    return mode.shape_env.suppress_guards()
