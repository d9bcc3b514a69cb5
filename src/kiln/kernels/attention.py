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


def _register(name: str, backend: SDPBackend) -> None:
    def make(op_name: str, out: OutVariant | None) -> StepFn:
        def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
            with _PINNED, sdpa_kernel([backend]):
                return torch.ops.aten.scaled_dot_product_attention.default(*args, **kwargs)

        return run

    make.__doc__ = f"scaled_dot_product_attention on the {backend.name} backend only."
    # Below the aten kernel (which lets PyTorch pick a backend per call): chosen only when timed faster.
    register_kernel(name, provider="torch", implements=SDPA, supports=SUPPORTS[name], writes_planned_outputs=False,
                    priority=Priority.CANDIDATE)(make)


for _name, _backend in BACKENDS.items():
    _register(_name, _backend)
