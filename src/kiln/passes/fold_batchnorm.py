"""Batch-norm folding: an inference batch norm after a convolution becomes part of the
convolution's weights and bias; one left on its own becomes a per-channel scale and shift
(which the pointwise fusion then merges with its neighbours)."""

from __future__ import annotations

import torch
from torch import fx

from kiln.graph import CapturedGraph, add_weight, aten, finish, getitem_user, is_weight, op_nodes, single_user, weight
from kiln.passes.registry import register_pass

BATCH_NORM = aten._native_batch_norm_legit_no_training.default


def _scale_shift(graph: CapturedGraph, bn: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    _, gamma, beta, mean, var, _, eps = bn.args
    if not all(is_weight(n) for n in (mean, var)) or not all(n is None or is_weight(n) for n in (gamma, beta)):
        return None
    mean, var = weight(graph, mean).double(), weight(graph, var).double()
    gamma = torch.ones_like(mean) if gamma is None else weight(graph, gamma).double()
    beta = torch.zeros_like(mean) if beta is None else weight(graph, beta).double()
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - mean * scale


def _fold_into_conv(graph: CapturedGraph, conv: fx.Node, bn: fx.Node, out: fx.Node) -> bool:
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = conv.args
    if transposed or not is_weight(w) or not (b is None or is_weight(b)):
        return False
    folded = _scale_shift(graph, bn)
    if folded is None:
        return False
    scale, shift = folded
    wt = weight(graph, w).double()
    new_w = wt * scale.reshape(-1, *([1] * (wt.dim() - 1)))
    new_b = shift if b is None else weight(graph, b).double() * scale + shift
    dtype = conv.meta["val"].dtype
    w_node = add_weight(graph, f"{w.target}_bnfold", new_w.float(), conv, dtype=dtype)
    b_node = add_weight(graph, f"{w.target}_bnfold_bias", new_b.float(), conv, dtype=dtype)
    conv.args = (x, w_node, b_node, stride, padding, dilation, transposed, output_padding, groups)
    out.replace_all_uses_with(conv)
    return True


def _to_affine(graph: CapturedGraph, bn: fx.Node, out: fx.Node) -> bool:
    folded = _scale_shift(graph, bn)
    if folded is None:
        return False
    x = bn.args[0]
    scale, shift = folded
    rank = x.meta["val"].dim()
    shape = (-1,) + (1,) * (rank - 2)
    dtype = out.meta["val"].dtype
    s = add_weight(graph, f"{bn.name}_scale", scale.float().reshape(shape), bn, dtype=dtype)
    t = add_weight(graph, f"{bn.name}_shift", shift.float().reshape(shape), bn, dtype=dtype)
    g = graph.module.graph
    with g.inserting_before(out):
        mul = g.call_function(aten.mul.Tensor, (x, s))
        add = g.call_function(aten.add.Tensor, (mul, t))
    for new in (mul, add):
        new.meta["stack_trace"] = bn.meta.get("stack_trace")
    out.replace_all_uses_with(add)
    return True


@register_pass("fold_batchnorm")
def fold_batchnorm(graph: CapturedGraph) -> CapturedGraph:
    """Fold conv → batch norm into the conv; turn other batch norms into scale + shift."""
    changed = False
    for bn in op_nodes(graph, BATCH_NORM):
        out = getitem_user(bn, 0)
        if out is None or any(u is not out for u in bn.users):
            continue
        x = bn.args[0]
        if x.target == aten.convolution.default and single_user(x) is bn:
            changed |= _fold_into_conv(graph, x, bn, out)
        elif x.meta["val"].dim() >= 2:
            changed |= _to_affine(graph, bn, out)
    return finish(graph) if changed else graph
