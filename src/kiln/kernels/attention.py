"""scaled_dot_product_attention with each of PyTorch's fused backends pinned: flash,
memory-efficient and cuDNN attention. Which is fastest depends on the GPU, the shapes and
whether there is a mask, so the build times them (kiln.select.tune) instead of guessing."""

from __future__ import annotations

import threading

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel

SDPA = "aten.scaled_dot_product_attention.default"
BACKENDS = {
    "sdpa.flash": SDPBackend.FLASH_ATTENTION,
    "sdpa.efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa.cudnn": SDPBackend.CUDNN_ATTENTION,
}


def _on_cuda(call: OpCall) -> bool:
    q = call.inputs[0]
    return call.device_type == "cuda" and q is not None and q.dtype in (torch.float16, torch.bfloat16)


def _mask(call: OpCall) -> object:
    return call.inputs[3] if len(call.inputs) > 3 else None


def _without_mask(call: OpCall) -> bool:
    """Flash attention takes no attn_mask."""
    return _on_cuda(call) and _mask(call) is None


def _additive_mask_ok(call: OpCall) -> bool:
    """Memory-efficient and cuDNN attention take a bool mask or an additive one of q's dtype,
    broadcast over batch and heads (kiln.passes.fuse_attention casts the bias to q's dtype)."""
    mask = _mask(call)
    return _on_cuda(call) and (mask is None or mask.dtype in (torch.bool, call.inputs[0].dtype))


SUPPORTS = {"sdpa.flash": _without_mask, "sdpa.efficient": _additive_mask_ok, "sdpa.cudnn": _additive_mask_ok}


# sdpa_kernel sets PyTorch's process-wide backend flags and restores what it found on exit: two
# threads overlapping would run on each other's backend and could leave the flags narrowed for
# good. Pinned calls take turns (they run in Python only outside CUDA-graph replay).
_PINNED = threading.Lock()


def dense_last_dim(mask: object) -> object:
    """The mask with its last dim contiguous, as every fused backend requires (a permuted bias,
    e.g. T5's [1, H, L, L] computed as [1, L, L, H], has stride H there and would send the call
    to the math backend). Broadcast dims (stride 0) stay broadcast: only one slice is copied."""
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0 or mask.stride(-1) == 1 or mask.size(-1) == 1:
        return mask
    one = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for n, st in zip(mask.shape, mask.stride()))
    return mask[one].contiguous().expand(mask.shape)


def with_dense_mask(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """SDPA's arguments with the attention mask (positional or attn_mask=) made dense_last_dim."""
    if len(args) > 3:
        args = (*args[:3], dense_last_dim(args[3]), *args[4:])
    elif "attn_mask" in kwargs:
        kwargs = {**kwargs, "attn_mask": dense_last_dim(kwargs["attn_mask"])}
    return args, kwargs


# Which pinned backends get the mask made dense first. Memory-efficient attention takes the dense
# copy of a permuted bias (T5's). cuDNN is left as it was (a permuted mask makes it refuse the call,
# so the build drops it): on an H100 a T5 zoo run crashed ("unspecified launch failure") once the
# dense copy reached every backend, and which backend crashed was not found.
DENSE_MASK = {"sdpa.efficient"}


def _register(name: str, backend: SDPBackend) -> None:
    dense = name in DENSE_MASK

    def make(op_name: str, out: OutVariant | None) -> StepFn:
        def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
            if dense:
                args, kwargs = with_dense_mask(args, kwargs)
            with _PINNED, sdpa_kernel([backend]):
                return torch.ops.aten.scaled_dot_product_attention.default(*args, **kwargs)

        return run

    make.__doc__ = f"scaled_dot_product_attention on the {backend.name} backend only."
    # Below the aten kernel (which lets PyTorch pick a backend per call): chosen only when timed faster.
    register_kernel(name, provider="torch", implements=SDPA, supports=SUPPORTS[name], writes_planned_outputs=False,
                    priority=Priority.CANDIDATE)(make)


for _name, _backend in BACKENDS.items():
    _register(_name, _backend)
