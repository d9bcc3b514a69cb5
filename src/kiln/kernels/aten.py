"""The reference kernel: the ATen op itself, for every ATen op the device's backend implements.

When the plan gives it output buffers it calls the op's `.out` overload so the
result lands in the memory plan's arena; otherwise ATen allocates.
"""

from __future__ import annotations

import functools

import torch

from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, op_name, register_kernel, resolve_op

BACKEND_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
PORTABLE_KEYS = ("CompositeExplicitAutograd", "CompositeImplicitAutograd", "CompositeExplicitAutogradNonFunctional")


@functools.cache
def _has_kernel(name: str, device_type: str) -> bool:
    op = resolve_op(name)
    qualified = f"aten::{op._schema.name.split('::')[-1]}" + (
        f".{op._overloadname}" if op._overloadname != "default" else ""
    )
    keys = (BACKEND_KEYS.get(device_type, device_type.upper()), *PORTABLE_KEYS)
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, k) for k in keys)


# Export decides view-or-copy from the strides fake tensors had; a kernel chosen at build time
# (a different attention backend, say) may hand back other strides. A view that no longer
# fits then copies instead of failing; when it fits, reshape is the same view.
RESHAPING_VIEWS = frozenset({"aten.view.default", "aten._unsafe_view.default"})


def supports(call: OpCall) -> bool:
    return _has_kernel(call.op, call.device_type)


# Every ATen op: ATen is its own reference. (Core ATen graphs on CUDA also hold backend ops
# such as _scaled_dot_product_cudnn_attention.)
@register_kernel("aten", provider="aten", implements="aten.*", supports=supports, priority=Priority.REFERENCE)
def make_aten(name: str, out: OutVariant | None) -> StepFn:
    """PyTorch's own ATen implementation (cuDNN, cuBLAS, or CPU kernels under it)."""
    op = resolve_op(name)
    if name in RESHAPING_VIEWS:
        return lambda args, kwargs, outs: args[0].reshape(*args[1:], **kwargs)
    if out is None:
        return lambda args, kwargs, outs: op(*args, **kwargs)
    out_op = resolve_op(out.op)
    names = out.out_args

    def run(args: tuple, kwargs: dict, outs: list[torch.Tensor]):
        return out_op(*args, **kwargs, **dict(zip(names, outs)))

    return run


@functools.cache
def out_variant(name: str, device_type: str) -> OutVariant | None:
    """The `.out` overload taking the same arguments as `name` plus out tensors, if the
    device's backend implements it natively. Many `.out` overloads are generated
    wrappers that compute into a fresh tensor and copy: writing through one would add
    a copy per step, so those ops allocate for themselves instead."""
    op = resolve_op(name)
    schema = op._schema
    if any(r.alias_info is not None for r in schema.returns):
        return None  # views and in-place ops never get buffers of their own
    wanted = [(a.name, str(a.type)) for a in schema.arguments]
    packet = op.overloadpacket
    for overload in packet.overloads():
        candidate = getattr(packet, overload)._schema
        outs = [a for a in candidate.arguments if a.is_out]
        rest = [(a.name, str(a.type)) for a in candidate.arguments if not a.is_out]
        if outs and rest == wanted and len(outs) == len(schema.returns):
            full_name = f"{op.namespace}::{candidate.name.split('::')[-1]}.{overload}"
            if not torch._C._dispatch_has_kernel_for_dispatch_key(full_name, device_type.upper()):
                return None
            return OutVariant(op_name(getattr(packet, overload)), tuple(a.name for a in outs))
    return None
