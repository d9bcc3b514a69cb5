"""The concatenation the memory planner has already done: each input was written straight
into its slice of the output buffer (kiln.plan.planner), so the step only hands the buffer on.
Never a selection candidate; the planner puts it in place of `aten.cat`."""

from __future__ import annotations

from kiln.kernels.registry import OutVariant, StepFn, register_kernel

NAME = "planner.concat_in_place"


@register_kernel(NAME, provider="planner", implements=(), writes_into=True)  # implements no op: never a candidate
def make_concat_in_place(name: str, out: OutVariant | None) -> StepFn:
    """No kernel: the inputs already sit in their slices of the output."""
    return lambda args, kwargs, outs: outs[0]
