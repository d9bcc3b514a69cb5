"""The reference kernel for kiln's own fused ops: their torch.library reference
implementations, which run anywhere PyTorch does."""

from __future__ import annotations

from kiln import ops  # noqa: F401  (defines the kiln:: ops this kernel resolves)
from kiln.kernels.registry import OutVariant, Priority, StepFn, register_kernel, resolve_op


@register_kernel(
    "kiln.reference",
    provider="reference",
    implements="kiln.*",
    writes_planned_outputs=False,
    priority=Priority.REFERENCE,
)
def make_reference(name: str, out: OutVariant | None) -> StepFn:
    """kiln's reference implementation of a fused op (ATen calls, step by step)."""
    op = resolve_op(name)
    return lambda args, kwargs, outs: op(*args, **kwargs)
