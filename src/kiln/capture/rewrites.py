"""Capture-time rewrites: modules whose traced form is slow trace through an equivalent forward.

torch.export records what a module's Python forward does. For a few library modules that
trace is a poor starting point for the passes, and recovering the intent from the decomposed
ops is harder than not losing it: while `capture` exports, each module of a registered type
gets the registered forward instead (on that instance only, restored afterwards). A rewrite
computes the same function with the same weights, checks its preconditions on the actual
call, and falls back to the module's own forward when any does not hold.

Add one with `@register_rewrite(ModuleType)`; the build report lists what was applied.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Forward = Callable[..., object]
# make(module, original_forward, note) -> forward; call note() each time the rewrite applies
MakeForward = Callable[[nn.Module, Forward, Callable[[], None]], Forward]


@dataclass(frozen=True)
class Rewrite:
    name: str
    module_type: type[nn.Module]
    make: MakeForward


REWRITES: dict[str, Rewrite] = {}


def register_rewrite(module_type: type[nn.Module], name: str | None = None) -> Callable[[MakeForward], MakeForward]:
    """Trace every module of exactly `module_type` (not subclasses) through the decorated forward."""

    def deco(make: MakeForward) -> MakeForward:
        key = name or make.__name__
        REWRITES[key] = Rewrite(key, module_type, make)
        return make

    return deco


def check_names(names: list[str] | None) -> None:
    unknown = [n for n in names or [] if n not in REWRITES]
    if unknown:
        raise ValueError(f"unknown capture rewrite(s) {unknown}; known: {', '.join(REWRITES)}")


@contextlib.contextmanager
def rewritten(model: nn.Module, names: list[str] | None = None) -> Iterator[Counter]:
    """Within the block, matching submodules of `model` run their rewrite; yields applied counts."""
    check_names(names)
    chosen = [REWRITES[n] for n in (REWRITES if names is None else names)]
    applied: Counter = Counter()
    patched: list[tuple[nn.Module, object]] = []
    try:
        for module in model.modules():
            for rewrite in chosen:
                if type(module) is rewrite.module_type:
                    own = module.__dict__.get("forward")
                    note = _counter(applied, rewrite.name)
                    module.forward = rewrite.make(module, module.forward, note)
                    patched.append((module, own))
        yield applied
    finally:
        for module, own in reversed(patched):  # last patch first, so each module ends as it began
            if own is None:
                del module.forward
            else:
                module.forward = own


def _counter(applied: Counter, name: str) -> Callable[[], None]:
    def note() -> None:
        applied[name] += 1

    return note


@register_rewrite(nn.MultiheadAttention)
def batch_first_attention(module: nn.MultiheadAttention, original: Forward, note: Callable[[], None]) -> Forward:
    """Self-attention of a batch_first nn.MultiheadAttention, computed batch-first.

    F.multi_head_attention_forward transposes the [B, L, E] input to [L, B, E], copies the
    packed projection into head-major Q/K/V and transposes the output back: three copies a
    block, and a residual stream read with strides. Here Q, K and V are strided views of one
    [B, L, 3E] projection (what the flash / cuDNN kernels read directly) and the output
    projection writes [B, L, E] rows in order. Same weights, same maths.
    """

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        plain = _plain_self_attention(module, query, key, value, key_padding_mask, need_weights, attn_mask)
        if not plain or is_causal:
            return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        note()
        batch, length, embed = query.shape
        heads = module.num_heads
        qkv = F.linear(query, module.in_proj_weight, module.in_proj_bias)
        q, k, v = qkv.unflatten(-1, (3, heads, embed // heads)).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, length, embed)
        return F.linear(out, module.out_proj.weight, module.out_proj.bias), None

    return forward


def _plain_self_attention(module: nn.MultiheadAttention, query, key, value, key_padding_mask, need_weights,
                          attn_mask) -> bool:
    """The cases the rewrite covers: unmasked batch-first self-attention, no weights returned
    (and is_causal off, checked by the caller)."""
    return (
        isinstance(query, torch.Tensor)
        and query is key is value
        and query.dim() == 3
        and module.batch_first
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
        and (not module.training or module.dropout == 0.0)
        and key_padding_mask is None
        and attn_mask is None
        and not need_weights
    )
