"""Vertical fusion: matrix multiply + bias + activation → kiln::linear_act, which cuBLASLt
runs with the bias and ReLU/GELU in the GEMM's epilogue (kiln.kernels.cublas)."""

from __future__ import annotations

import torch

from kiln import ops  # noqa: F401  (defines the kiln:: ops used below)
from kiln.graph import CapturedGraph, aten, finish, following_activation, op_nodes, replace_with, single_user
from kiln.passes.registry import register_pass

VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


@register_pass("fuse_linear")
def fuse_linear(graph: CapturedGraph) -> CapturedGraph:
    """Fuse addmm/mm with a following activation (possibly after a view) into one linear op."""
    changed = False
    for mm in op_nodes(graph, aten.addmm.default, aten.mm.default):
        if mm.target == aten.addmm.default:
            if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
                continue
            bias, x, w_t = mm.args
            if bias.meta["val"].dim() != 1:
                continue
        else:
            (x, w_t), bias = mm.args, None
        user = single_user(mm)
        view = user if user is not None and user.target in VIEWS else None
        found = following_activation(view if view is not None else mm)
        act, act_node = found if found is not None else (None, None)
        if act is None:
            replace_with(graph, mm, torch.ops.kiln.linear_act.default, (x, w_t, bias, "none"))
        elif view is None:
            replace_with(graph, act_node, torch.ops.kiln.linear_act.default, (x, w_t, bias, act))
        else:  # addmm → view → act (linear layers on 3-D inputs): act moves before the view
            replace_with(graph, mm, torch.ops.kiln.linear_act.default, (x, w_t, bias, act))
            act_node.replace_all_uses_with(view)
        changed = True
    return finish(graph) if changed else graph
