"""Attention with a constant causal mask → scaled_dot_product_attention(q, k, v, is_causal=True).

Decoders (transformers' GPT-2 and Llama, hand-written causal attention after fuse_attention)
reach the passes with the causal mask built in the graph; constant folding turns it into a
weight: a bool (batch, 1, L, L) mask (True = attend, the lower triangle) or an additive float
mask (0 on and below the diagonal, -inf or finfo.min above). Passed as attn_mask it is read on
every call, and on CUDA the flash backend, which takes no mask, cannot run the attention at all.

The pass decides from the mask's values alone: the constant as it reaches the call (through the
views, expands and casts between the weight and the call, evaluated on the weight) must equal,
in every leading (batch/head) slice, what is_causal=True computes in PyTorch's reference math,
`torch.ones(L, S).tril()`: True where kept for a bool mask; for an additive float mask exactly 0
where kept and -inf or at most finfo(dtype).min / 2 where dropped. A finite large negative is not
bit-identical to -inf in a row that masks everything, but a causal row always keeps its diagonal,
so exp() of the dropped scores is 0 either way and the softmax is the same up to rounding.

Left alone:
- a mask that is causal plus anything else (causal + padding, a bias, one entry changed): a
  causal call would drop the rest, so correctness keeps the mask;
- L != S, although torch's is_causal is then the top-left aligned mask: PyTorch's flash backend
  aligns a non-square causal mask bottom-right and refuses it, and kernel selection sees only an
  SDPA call's positional arguments (not the is_causal keyword), so a pinned backend could not
  decline it. Square masks mean the same on every backend and in the TensorRT converter;
- a mask whose leading dims would enlarge the output (a dim neither 1 nor q's), or whose shape
  depends on a dynamic dim, and a call that already says is_causal.
"""

from __future__ import annotations

import torch
from torch import fx

from kiln.graph import CapturedGraph, aten, finish, op_nodes
from kiln.passes.registry import register_pass

SDPA = aten.scaled_dot_product_attention.default
# Ops that only rearrange, repeat or cast a mask: its value at the call is the weight's, put
# through them (each evaluated on the weight, with its other arguments constant).
MASK_VIEWS = frozenset({
    aten.expand.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.permute.default,
    aten.slice.Tensor, aten.select.int, aten.clone.default, aten.alias.default, aten._to_copy.default,
})
OPTIONAL_ARGS = ("attn_mask", "dropout_p", "is_causal")  # SDPA's positional arguments after q, k, v


def _constant_value(graph: CapturedGraph, node: object) -> torch.Tensor | None:
    """The value `node` has at run time if it is a weight put through MASK_VIEWS; else None."""
    chain: list[fx.Node] = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in MASK_VIEWS:
        if _has_node((node.args[1:], node.kwargs)):
            return None  # a size or index computed at run time
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = getattr(graph.module, node.target)
    for op in reversed(chain):
        value = op.target(value, *op.args[1:], **op.kwargs)
    return value


def _has_node(args: object) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return bool(found)


def _leading_slice(mask: torch.Tensor, q_leading: tuple[object, ...]) -> torch.Tensor | None:
    """The mask with its broadcast (stride-0) leading dims cut to one; None where a leading dim
    is neither 1 nor q's (removing the mask would change the output's shape)."""
    leading = mask.shape[:-2]
    if len(leading) > len(q_leading):
        return None
    for i, (m, q) in enumerate(zip(reversed(leading), reversed(q_leading))):
        if m != 1 and not (isinstance(q, int) and m == q):
            return None
        dim = len(leading) - 1 - i
        if mask.stride(dim) == 0:
            mask = mask.narrow(dim, 0, 1)  # every slice along it is the same: check one
    return mask


def is_causal_mask(mask: torch.Tensor, q_shape: tuple[object, ...], k_shape: tuple[object, ...]) -> bool:
    """Whether SDPA with `mask` computes what is_causal=True computes, for q and k of these shapes
    (square only: see the module's docstring)."""
    length, source = q_shape[-2], k_shape[-2]
    if not isinstance(length, int) or length != source or mask.dim() < 2 or tuple(mask.shape[-2:]) != (length, source):
        return False
    sliced = _leading_slice(mask, tuple(q_shape[:-2]))
    if sliced is None:
        return False
    keep = torch.ones(length, source, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((sliced == keep).all())
    if not mask.dtype.is_floating_point:
        return False
    dropped = sliced <= torch.finfo(mask.dtype).min / 2  # -inf too; NaN is neither kept nor dropped
    return bool(torch.where(keep, sliced == 0, dropped).all())


def _shape(node: object) -> tuple[object, ...] | None:
    """The node's shape; a dynamic dim stays a SymInt (never equal to a constant mask's)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _make_causal(graph: CapturedGraph, node: fx.Node, checked: dict[tuple, bool]) -> bool:
    kwargs = {**dict(zip(OPTIONAL_ARGS, node.args[3:])), **node.kwargs}
    mask = kwargs.get("attn_mask")
    if not isinstance(mask, fx.Node) or kwargs.get("is_causal", False):
        return False
    q_shape, k_shape = _shape(node.args[0]), _shape(node.args[1])
    if q_shape is None or k_shape is None:
        return False
    key = (mask, str(q_shape), str(k_shape))  # one mask read by every layer: evaluated once (str: SymInts)
    if key not in checked:
        value = _constant_value(graph, mask)
        checked[key] = value is not None and is_causal_mask(value, q_shape, k_shape)
    if not checked[key]:
        return False
    del kwargs["attn_mask"]
    node.args = tuple(node.args[:3])
    node.kwargs = {**kwargs, "is_causal": True}
    return True


@register_pass("causal_mask")
def causal_mask(graph: CapturedGraph) -> CapturedGraph:
    """Constant causal attention masks (bool or additive, square) → scaled_dot_product_attention(is_causal=True)."""
    changed = False
    checked: dict[tuple, bool] = {}
    for node in op_nodes(graph, SDPA):
        if _make_causal(graph, node, checked):
            changed = True
    return finish(graph) if changed else graph
