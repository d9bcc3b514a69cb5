"""Layout: convolutional models run channels_last (NHWC) end to end on the GPU, the layout
cuDNN's tensor-core kernels use natively; the input is converted once, weights at build
time, and nothing flips back between layers."""

from __future__ import annotations

import torch

from kiln.graph import CapturedGraph, aten, finish, op_nodes
from kiln.passes.registry import register_pass

CONVS = (aten.convolution.default, torch.ops.kiln.conv_bias_act.default)
# Views that need a particular layout become reshapes: still views wherever the layout allows.
LAYOUT_BOUND_VIEWS = (aten.view.default, aten._unsafe_view.default)


HEAVY = (
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.scaled_dot_product_attention.default,
    torch.ops.kiln.linear_act.default,
)


def is_convolutional(graph: CapturedGraph) -> bool:
    """Mostly convolutions among the heavy ops (a ViT's one patch convolution does not count)."""
    convs = sum(1 for n in op_nodes(graph, *CONVS) if n.args[1].meta["val"].dim() == 4)
    others = sum(1 for _ in op_nodes(graph, *HEAVY))
    return convs > 0 and convs >= others


def to_channels_last(graph: CapturedGraph) -> CapturedGraph:
    convs = [n for n in op_nodes(graph, *CONVS) if n.args[1].meta["val"].dim() == 4]
    if not convs:
        return graph
    module, g = graph.module, graph.module.graph
    for conv in convs:
        w = conv.args[1]
        if w.op == "get_attr":
            tensor = getattr(module, w.target)
            setattr(module, w.target, tensor.contiguous(memory_format=torch.channels_last))
    for node in [n for n in g.nodes if n.op == "placeholder"]:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 4 and val.is_floating_point():
            with g.inserting_after(node):
                nhwc = g.call_function(aten.clone.default, (node,), {"memory_format": torch.channels_last})
            node.replace_all_uses_with(nhwc, delete_user_cb=lambda user, nhwc=nhwc: user is not nhwc)
    for view in op_nodes(graph, *LAYOUT_BOUND_VIEWS):
        view.target = aten.reshape.default
    return finish(graph)


@register_pass("channels_last")
def channels_last(graph: CapturedGraph) -> CapturedGraph:
    """Convert convolutional graphs to channels_last on CUDA (CPU graphs keep their layout)."""
    if graph.device.type != "cuda" or not is_convolutional(graph):
        return graph
    return to_channels_last(graph)
