"""Attention without a trivial mask: a mask fixed at build time that masks nothing (all True,
or all zeros when additive) is dropped from scaled_dot_product_attention, so the flash
kernels, which take no mask, can run it. Eager transformers makes the same check on every
call; an engine makes it once."""

from __future__ import annotations

import torch
from torch import fx

from kiln.graph import CapturedGraph, aten, finish, op_nodes
from kiln.passes.registry import register_pass

SDPA = aten.scaled_dot_product_attention.default
# Views that only repeat or rearrange values: "masks nothing" holds through them. (An
# expanded mask is not folded into a constant when large, so look through the expand.)
SAME_VALUES = (aten.expand.default, aten.view.default, aten.unsqueeze.default, aten.reshape.default,
               aten.permute.default, aten._unsafe_view.default)


def _masks_nothing(graph: CapturedGraph, mask: object) -> bool:
    while isinstance(mask, fx.Node) and mask.op == "call_function" and mask.target in SAME_VALUES:
        mask = mask.args[0]
    if not isinstance(mask, fx.Node) or mask.op != "get_attr":
        return False
    value = getattr(graph.module, mask.target)
    return bool(value.all()) if value.dtype == torch.bool else not bool(value.any())


@register_pass("drop_trivial_attention_mask")
def drop_trivial_attention_mask(graph: CapturedGraph) -> CapturedGraph:
    """Remove constant attention masks that mask nothing."""
    changed = False
    for node in op_nodes(graph, SDPA):
        if len(node.args) > 3 and _masks_nothing(graph, node.args[3]):
            node.args = (*node.args[:3], None, *node.args[4:])
            changed = True
        elif _masks_nothing(graph, node.kwargs.get("attn_mask")):
            node.kwargs = {**node.kwargs, "attn_mask": None}
            changed = True
    return finish(graph) if changed else graph
