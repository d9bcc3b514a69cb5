"""A batched matmul against one weight matrix (what Core ATen makes of a linear layer on a
transposed 3-D input, as in nn.MultiheadAttention with batch_first) is one large GEMM:
bmm(A, expand(W)) → reshape(A) @ W, plus the bias add that follows, as addmm."""

from __future__ import annotations

from torch import fx

from kiln.dims import size_arg
from kiln.graph import CapturedGraph, aten, finish, infer_meta, op_nodes, single_user
from kiln.passes.registry import register_pass

PASS_THROUGH = (aten.view.default, aten._unsafe_view.default, aten.expand.default, aten.reshape.default)
CONSTANT_VIEWS = (aten.permute.default, aten.t.default)


def _shared_matrix(node: fx.Node) -> fx.Node | None:
    """The 2-D constant that `node` broadcasts over the batch dimension, if it is one."""
    val = node.meta["val"]
    if val.dim() != 3 or val.stride(0) != 0:
        return None
    while node.target in PASS_THROUGH:
        node = node.args[0]
    inner = node
    while inner.op == "call_function" and inner.target in CONSTANT_VIEWS:
        inner = inner.args[0]
    return node if inner.op == "get_attr" and node.meta["val"].dim() == 2 else None


def _bias_add(out: fx.Node, width: int) -> tuple[fx.Node, fx.Node] | None:
    """(add node, bias) when `out` (through one view) only feeds `+ bias` with a 1-D bias."""
    user = single_user(out)
    if user is not None and user.target in (aten.view.default, aten._unsafe_view.default):
        user = single_user(user)
    if user is None or user.target != aten.add.Tensor or user.kwargs.get("alpha", 1) != 1:
        return None
    bias = user.args[1]
    val = bias.meta.get("val") if isinstance(bias, fx.Node) else None
    if bias.op != "get_attr" or val is None or tuple(val.shape) != (width,):
        return None
    return user, bias


@register_pass("batched_weight_matmul")
def batched_weight_matmul(graph: CapturedGraph) -> CapturedGraph:
    """Turn bmm against a broadcast weight (and its bias add) into one mm/addmm."""
    g, changed = graph.module.graph, False
    for bmm in op_nodes(graph, aten.bmm.default):
        a, b = bmm.args
        w = _shared_matrix(b)
        if w is None:
            continue
        k = a.meta["val"].shape[-1]
        n = w.meta["val"].shape[1]
        found = _bias_add(bmm, n)
        last = found[0] if found else bmm
        # the result in the shape of the node it replaces: a bias added in a 4-D view of the
        # bmm ([B·N, M, n] viewed as [B, N, M, n]) keeps that view's shape
        sizes = [size_arg(g, d, last) for d in last.meta["val"].shape]  # nodes for symbolic sizes
        with g.inserting_before(last):
            flat = g.call_function(aten.reshape.default, (a, [-1, k]))
            if found:
                product = g.call_function(aten.addmm.default, (found[1], flat, w))
            else:
                product = g.call_function(aten.mm.default, (flat, w))
            out = g.call_function(aten.view.default, (product, sizes))
        for node in (flat, product, out):
            node.meta["stack_trace"] = bmm.meta.get("stack_trace")
            infer_meta(node)
        last.replace_all_uses_with(out)
        changed = True
    return finish(graph) if changed else graph
