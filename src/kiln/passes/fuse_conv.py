"""Vertical fusion: convolution + bias [+ residual add] [+ activation] → kiln::conv_bias_act
(seed 000 point 2, seed 003's "3x3 CBR"). cuDNN runs conv+bias+ReLU and conv+bias+add+ReLU
as single fused kernels (kiln.kernels.cudnn)."""

from __future__ import annotations

import torch
from torch import fx

from kiln import ops  # noqa: F401  (defines the kiln:: ops used below)
from kiln.graph import (
    CapturedGraph,
    aten,
    finish,
    following_activation,
    op_nodes,
    replace_with,
    same_shape,
    single_user,
)
from kiln.passes.registry import register_pass


def _residual(conv_out: fx.Node, add: fx.Node | None) -> fx.Node | None:
    if add is None or add.target != aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    a, b = add.args
    other = b if a is conv_out else a
    if other is conv_out or not same_shape(conv_out, other):
        return None
    return other


def _gate(act: str, result: fx.Node) -> bool:
    """A sigmoid whose every use scales a larger tensor (a squeeze-excitation gate): it stays
    outside the convolution, and fuse_pointwise computes it inside the product's kernel."""
    size = result.meta["val"].numel()
    return act == "sigmoid" and all(
        u.target == aten.mul.Tensor and u.meta["val"].numel() > size for u in result.users
    )


@register_pass("fuse_conv")
def fuse_conv(graph: CapturedGraph) -> CapturedGraph:
    """Fuse each 2-D convolution with the bias, residual add and activation that follow it."""
    changed = False
    for conv in op_nodes(graph, aten.convolution.default):
        x, w, b, stride, padding, dilation, transposed, output_padding, groups = conv.args
        if transposed or conv.meta["val"].dim() != 4 or any(output_padding):
            continue
        last, act = conv, "none"
        residual = _residual(conv, single_user(conv))
        if residual is not None:
            last = single_user(conv)
        found = following_activation(last)
        if found is not None and not _gate(*found):
            act, last = found
        replace_with(
            graph,
            last,
            torch.ops.kiln.conv_bias_act.default,
            (x, w, b, list(stride), list(padding), list(dilation), groups, act, residual),
        )
        changed = True
    return finish(graph) if changed else graph
