"""Attention written out in ops → one scaled_dot_product_attention with an additive mask.

Models that write attention by hand (T5 and Swin in eager mode, ALiBi, explicit causal or
padding masks) export as

    bmm(q, kᵀ) [→ view] [× or ÷ scale] [+ bias, any broadcastable shape, in any view of the
    scores] [masked_fill(mask, -inf)] [→ cast] → _softmax(-1) [→ cast] → bmm(·, v)

with the 4-D matmuls flattened by Core ATen (expand → clone → view → bmm → view). This pass
matches that chain from the graph's structure alone and rewrites it to
`aten.scaled_dot_product_attention(q, k, v, bias, scale=s)`, which the memory-efficient and
cuDNN backends run with the bias read in place. The bias is the sum of the terms in their own
(broadcastable) shapes, never expanded to the scores' shape; where the terms were added in a
view with more batch dims (Swin's shifted-window mask, [B, nW, H, N, N]), q, k and v are
regrouped so that the bias still broadcasts ([B, nW·H, N, N] against a [1, nW·H, N, N] bias).
A masked_fill with a very negative value becomes the additive term where(mask, fill, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from kiln.graph import CapturedGraph, aten, copy_origin, finish, infer_meta, op_nodes
from kiln.passes.registry import register_pass

SDPA = aten.scaled_dot_product_attention.default
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
# masked_fill values that act as "never attend" when added instead of written
MASKED_BELOW = -1e4


@dataclass
class Scores:
    """What the chain from bmm(q, kᵀ) to the softmax adds and multiplies."""

    qk: fx.Node  # the first bmm
    scale: float = 1.0
    terms: list[tuple[fx.Node, float, tuple[int, ...]]] = field(default_factory=list)  # (term, coefficient, frame)
    frames: list[tuple[int, ...]] = field(default_factory=list)  # batch shapes the chain passes through
    chain: list[fx.Node] = field(default_factory=list)


def _val(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _shape(node: object) -> tuple[int, ...]:
    val = _val(node)
    return tuple(int(d) for d in val.shape) if val is not None else ()


def _scalar(x: object) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _constant_scalar(node: object) -> float | None:
    """The value of a 0-d constant tensor node (scalar_tensor / full([]))."""
    if isinstance(node, fx.Node) and node.op == "call_function":
        if node.target == aten.scalar_tensor.default:
            return _scalar(node.args[0])
        if node.target == aten.full.default and list(node.args[0]) == []:
            return _scalar(node.args[1])
    return _scalar(node)


def _walk_scores(softmax_in: fx.Node, last2: tuple[int, int]) -> Scores | None:
    """From the softmax's input back to bmm(q, kᵀ), collecting scale and additive terms."""
    node, factor = softmax_in, 1.0
    terms: list[tuple[object, float, tuple[int, ...]]] = []
    frames: list[tuple[int, ...]] = []
    chain: list[fx.Node] = []
    for _ in range(32):
        shape = _shape(node)
        if shape[-2:] != last2 or not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if chain and len(node.users) != 1:
            return None  # an intermediate used elsewhere: the written-out scores must stay
        chain.append(node)
        frame = shape[:-2]
        if not frames or frames[-1] != frame:
            frames.append(frame)
        t, args = node.target, node.args
        if t == aten.bmm.default:
            return Scores(node, factor, terms, frames, chain)
        if t in VIEWS or (t == aten._to_copy.default and set(node.kwargs) <= {"dtype"}):
            node = args[0]
        elif t == aten.clone.default or (t == aten.expand.default and _shape(args[0]) == shape):
            node = args[0]
        elif t in (aten.mul.Tensor, aten.div.Tensor) and _scalar(args[1]) is not None:
            s = _scalar(args[1])
            if s == 0:
                return None
            factor *= s if t == aten.mul.Tensor else 1.0 / s
            node = args[0]
        elif t == aten.mul.Tensor and _scalar(args[0]) is not None:
            factor *= _scalar(args[0])
            node = args[1]
        elif t in (aten.add.Tensor, aten.sub.Tensor):
            a, b = args[0], args[1]
            alpha = _scalar(node.kwargs.get("alpha", 1)) or 1.0
            sign = -alpha if t == aten.sub.Tensor else alpha
            if _scalar(b) is not None:  # a constant shift: softmax does not see it
                node = a
                continue
            chain_a = _shape(a) == shape and _is_scores(a)
            chain_b = _shape(b) == shape and _is_scores(b)
            if chain_a and not chain_b:
                terms.append((b, factor * sign, frame))
                node = a
            elif chain_b and not chain_a and t == aten.add.Tensor and alpha == 1.0:
                terms.append((a, factor, frame))
                node = b
            else:
                return None
        elif t == aten.where.self and _shape(args[2]) == shape and _constant_scalar(args[1]) is not None:
            fill = _constant_scalar(args[1])
            if fill > MASKED_BELOW or factor <= 0:
                return None
            terms.append((("masked", args[0], args[1]), factor, frame))
            node = args[2]
        else:
            return None
    return None


def _is_scores(node: object, depth: int = 12) -> bool:
    """Whether `node` leads back to a bmm through the ops a scores chain is made of (which
    operand of an add is the scores, when both have the scores' shape)."""
    if depth == 0 or not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target == aten.bmm.default:
        return True
    if node.target in (*VIEWS, aten.mul.Tensor, aten.div.Tensor, aten._to_copy.default, aten.clone.default,
                       aten.expand.default):
        return _is_scores(node.args[0], depth - 1)
    if node.target in (aten.add.Tensor, aten.sub.Tensor):
        return any(_is_scores(a, depth - 1) for a in node.args[:2])
    if node.target == aten.where.self:
        return _is_scores(node.args[2], depth - 1)
    return False


def _strip_to_batched(node: fx.Node) -> fx.Node:
    """Through view(clone(expand(x))) that only flatten batch dims: the tensor before them."""
    last2 = _shape(node)[-2:]
    for _ in range(8):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            break
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or _shape(src)[-2:] != last2:
            break
        same = math.prod(_shape(src)) == math.prod(_shape(node))
        if node.target in VIEWS and same:
            node = src
        elif node.target == aten.clone.default and same:
            node = src
        elif node.target == aten.expand.default and _shape(src) == _shape(node):
            node = src
        else:
            break
    return node


def _refine(frames: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The batch shape every frame's shape splits into (cut points: all frames' prefix products)."""
    total = math.prod(frames[0])
    cuts = {1, total}
    for f in frames:
        p = 1
        for d in f:
            p *= d
            cuts.add(p)
    ordered = sorted(cuts)
    if any(b % a for a, b in zip(ordered, ordered[1:])):
        return None
    return tuple(b // a for a, b in zip(ordered, ordered[1:]))


def _split(frame: tuple[int, ...], refined: tuple[int, ...]) -> list[list[int]]:
    """For each dim of `frame`, the sizes of `refined` it splits into."""
    groups, i = [], 0
    for d in frame:
        group, p = [], 1
        while p < d:
            group.append(refined[i])
            p *= refined[i]
            i += 1
        groups.append(group)
    return groups


class _Builder:
    def __init__(self, graph: CapturedGraph, before: fx.Node, origin: fx.Node) -> None:
        self.g, self.before, self.origin = graph.module.graph, before, origin

    def __call__(self, target: object, *args: object, **kwargs: object) -> fx.Node:
        with self.g.inserting_before(self.before):
            node = self.g.call_function(target, args, kwargs)
        copy_origin(node, self.origin)
        infer_meta(node)
        return node

    def view(self, node: fx.Node, shape: list[int]) -> fx.Node:
        if list(_shape(node)) == list(shape):
            return node
        val = _val(node)
        try:
            val.view(shape)
            return self(aten.view.default, node, list(shape))
        except (RuntimeError, ValueError):  # not expressible as a view of these strides: a copy
            return self(aten.reshape.default, node, list(shape))


def _term_in(build: _Builder, term: fx.Node, frame: tuple[int, ...], refined: tuple[int, ...],
             last2: tuple[int, int]) -> fx.Node:
    """A bias term broadcastable to frame + last2, reshaped (not expanded) to refined + last2."""
    shape = _shape(term)
    full = (1,) * (len(frame) + 2 - len(shape)) + shape
    sizes: list[int] = []
    for d, group in zip(full[:-2], _split(frame, refined)):
        sizes += group if d != 1 else [1] * len(group)
    return build.view(term, [*sizes, *full[-2:]])


def _rewrite(graph: CapturedGraph, softmax: fx.Node) -> bool:
    if graph.dims and any(isinstance(d, torch.SymInt) for d in getattr(_val(softmax), "shape", ())):
        return False  # the rewrite computes its views' sizes as integers: they would fix the dims
    if softmax.args[1] not in (-1, len(_shape(softmax)) - 1):
        return False
    last2 = _shape(softmax)[-2:]
    # forwards: [cast] → [expand] → view → bmm(·, v)
    node, out_chain = softmax, []
    while True:
        users = list(node.users)
        if len(users) != 1:
            return False
        user = users[0]
        if user.target == aten.bmm.default and user.args[0] is node:
            pv = user
            break
        ok = (user.target in VIEWS or user.target == aten.clone.default
              or (user.target == aten.expand.default and _shape(user) == _shape(node))
              or (user.target == aten._to_copy.default and set(user.kwargs) <= {"dtype"}))
        if not ok or _shape(user)[-2:] != last2 or len(out_chain) > 6:
            return False
        out_chain.append(user)
        node = user
    scores = _walk_scores(softmax.args[0], last2)
    if scores is None or any(len(n.users) != 1 for n in scores.chain[1:]):
        return False
    frames = [*scores.frames, _shape(softmax)[:-2]]
    frames = [f for f in frames if f]
    refined = _refine(frames) if frames else ()
    if refined is None:
        return False
    q3, kt3 = scores.qk.args
    v3 = pv.args[1]
    q, kt, v = (_strip_to_batched(n) for n in (q3, kt3, v3))
    dtype = _val(q).dtype
    if _val(kt).dtype != dtype or _val(v).dtype != dtype or not dtype.is_floating_point:
        return False
    build = _Builder(graph, pv, scores.qk)

    # the bias: the terms in their own shapes, in the refined frame
    bias = None
    for term, coef, frame in scores.terms:
        if isinstance(term, tuple):  # masked_fill(mask, fill): where(mask, fill, 0) as a term
            _, mask, fill = term
            zero = build(aten.full_like.default, fill, 0.0)
            term = build(aten.where.self, mask, fill, zero)
        if not isinstance(term, fx.Node) or _val(term) is None:
            return False
        piece = _term_in(build, term, frame, refined, last2)
        if coef != 1.0:
            piece = build(aten.mul.Tensor, piece, coef)
        bias = piece if bias is None else build(aten.add.Tensor, bias, piece)

    # group the refined batch dims into [X, Y] so the bias broadcasts as a view
    split = _grouping(refined, bias)
    if split is None:
        return False
    xy = [math.prod(refined[:split]), math.prod(refined[split:])]
    if bias is not None:
        b = _shape(bias)
        b = (1,) * (len(refined) + 2 - len(b)) + b
        merged = [_merged(b[:split], refined[:split]), _merged(b[split:len(refined)], refined[split:])]
        bias = build.view(bias, [*merged, *b[-2:]])
        if _val(bias).dtype != dtype:
            bias = build(aten._to_copy.default, bias, dtype=dtype)
    k = _transposed(build, kt)
    q4, k4, v4 = (build.view(n, [*xy, *_shape(n)[-2:]]) for n in (q, k, v))
    attn = build(SDPA, q4, k4, v4, bias, scale=scores.scale)
    # the output's strides depend on the backend chosen later (CUDA's fused ones lay [X, Y, L, D]
    # out as [X, L, Y, D]): reshape, a view where the strides allow one and a copy where not
    out = attn if list(_shape(attn)) == list(_shape(pv)) else build(aten.reshape.default, attn, list(_shape(pv)))
    if _val(out).dtype != _val(pv).dtype:
        out = build(aten._to_copy.default, out, dtype=_val(pv).dtype)
    copy_origin(attn, scores.qk)
    pv.replace_all_uses_with(out)
    return True


def _grouping(refined: tuple[int, ...], bias: fx.Node | None) -> int | None:
    """Where the refined batch dims split into sdpa's batch and head dims: the first split at
    which the bias, unexpanded, still broadcasts (each group all broadcast or all full)."""
    if len(refined) <= 1:
        return len(refined)
    b = _shape(bias) if bias is not None else ()
    b = (1,) * (len(refined) + 2 - len(b)) + b
    for split in range(1, len(refined)):
        if all(_mergeable(b[lo:hi], refined[lo:hi]) for lo, hi in ((0, split), (split, len(refined)))):
            return split
    return None


def _mergeable(bias_dims: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    """Dims of a bias broadcast to `sizes` merge into one without expanding it: all broadcast or all full."""
    return len({b == s for b, s in zip(bias_dims, sizes)}) <= 1


def _merged(bias_dims: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    return math.prod(b for b, s in zip(bias_dims, sizes) if b == s and s != 1) if any(
        b == s and s != 1 for b, s in zip(bias_dims, sizes)) else 1


def _transposed(build: _Builder, kt: fx.Node) -> fx.Node:
    """kᵀ's last two dims swapped back: a permute composed with the one that made kᵀ."""
    n = len(_shape(kt))
    swap = [*range(n - 2), n - 1, n - 2]
    if kt.op == "call_function" and kt.target == aten.permute.default:
        perm = [list(kt.args[1])[i] % n for i in swap]
        if perm == list(range(n)):
            return kt.args[0]
        return build(aten.permute.default, kt.args[0], perm)
    return build(aten.permute.default, kt, swap)


@register_pass("fuse_attention")
def fuse_attention(graph: CapturedGraph) -> CapturedGraph:
    """bmm(q, kᵀ) [× scale] [+ bias] → softmax → bmm(·, v) → scaled_dot_product_attention with an additive mask."""
    changed = False
    for softmax in op_nodes(graph, aten._softmax.default):
        if _rewrite(graph, softmax):
            changed = True
    return finish(graph) if changed else graph
