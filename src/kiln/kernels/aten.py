"""The reference kernel: the ATen op itself, for every op of the Core ATen opset.

When the plan gives it output buffers it calls the op's `.out` overload so the
result lands in the memory plan's arena; otherwise ATen allocates.
"""

from __future__ import annotations

import functools

import torch

from kiln.kernels import OutVariant, StepFn, op_name, register_kernel, resolve_op

# Ops outside the Core ATen tag that core-ATen graphs still contain.
EXTRA_OPS = {"aten._unsafe_view.default", "aten.alias.default", "aten.lift_fresh_copy.default"}


@functools.cache
def implements(name: str) -> bool:
    if name in EXTRA_OPS:
        return True
    try:
        op = resolve_op(name)
    except ValueError:
        return False
    return op.namespace == "aten" and torch.Tag.core in op.tags


@register_kernel("aten", provider="aten", implements=implements)
def make_aten(name: str, out: OutVariant | None) -> StepFn:
    """PyTorch's own ATen implementation (cuDNN, cuBLAS, or CPU kernels under it)."""
    op = resolve_op(name)
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
