"""The kernel catalog: every way kiln knows to run an op.

A kernel is registered with `@register_kernel(...)` on a factory that, given a
step's op and (optionally) the out-variant to write planned buffers through,
returns the callable the runtime invokes. Build-time selection asks each kernel
whether it `supports` a call (device, dtypes, shapes); the runtime only looks
kernels up by name. Adding a kernel touches its own module and test, nothing here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.specs import TensorSpec

StepFn = Callable[[tuple[Any, ...], dict[str, Any], list[torch.Tensor]], Any]


@dataclass(frozen=True)
class OpCall:
    """What selection knows about one call: the op, its tensor inputs, the device, and its
    constant arguments (strides, activation names; None where an argument is a tensor)."""

    op: str
    inputs: tuple[TensorSpec | None, ...]
    outputs: tuple[TensorSpec, ...]
    device_type: str
    constants: tuple[Any, ...] = ()

    def constant(self, index: int, default: Any = None) -> Any:
        return self.constants[index] if index < len(self.constants) else default


@dataclass(frozen=True)
class Kernel:
    name: str
    provider: str
    implements: Callable[[str], bool]
    supports: Callable[[OpCall], bool]
    make: Callable[[str, OutVariant | None], StepFn]
    writes_planned_outputs: bool = True
    doc: str = ""
    priority: int = 0  # the untimed choice: highest priority wins (reference kernels are -1)
    approximate: bool = False  # computes a stated approximation of the op; BuildConfig(exact=True) skips it
    writes_into: bool = False  # given outs=[view], writes its one result there (any strides) and returns it


@dataclass(frozen=True)
class OutVariant:
    """The `.out` overload of an op and the names of its out arguments, in output order."""

    op: str
    out_args: tuple[str, ...] = field(default_factory=tuple)


KERNELS: dict[str, Kernel] = {}


def register_kernel(
    name: str,
    *,
    provider: str,
    implements: Callable[[str], bool],
    supports: Callable[[OpCall], bool] = lambda call: True,
    writes_planned_outputs: bool = True,
    priority: int = 0,
    approximate: bool = False,
    writes_into: bool = False,
) -> Callable[[Callable[[str, OutVariant | None], StepFn]], Callable[[str, OutVariant | None], StepFn]]:
    """Register a kernel factory under `name` (later registrations of a name replace earlier).

    `writes_into`: the step function, when the plan hands it an output view (a slice of a
    concatenation, see kiln.plan.planner), writes its result there instead of allocating."""

    def deco(make: Callable[[str, OutVariant | None], StepFn]) -> Callable[[str, OutVariant | None], StepFn]:
        doc = (make.__doc__ or "").strip()
        KERNELS[name] = Kernel(
            name, provider, implements, supports, make, writes_planned_outputs, doc, priority, approximate, writes_into
        )
        return make

    return deco


def candidates(call: OpCall, exact: bool = False) -> list[Kernel]:
    """Every registered kernel that implements and supports this call, preferred first
    (with `exact`, none that computes an approximation)."""
    found = [
        k for k in KERNELS.values() if k.implements(call.op) and k.supports(call) and not (exact and k.approximate)
    ]
    order = {k.name: i for i, k in enumerate(found)}
    return sorted(found, key=lambda k: (-k.priority, -order[k.name]))


def get_kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise KeyError(
            f"kernel {name!r} is not in this kiln's catalog (known: {', '.join(sorted(KERNELS))}); "
            "the engine was built by a kiln with more kernels: rebuild it with this version"
        ) from None


def resolve_op(name: str) -> torch._ops.OpOverload:
    """'aten.relu.default' → torch.ops.aten.relu.default, refusing anything that is not an op."""
    parts = name.split(".")
    if len(parts) != 3 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"{name!r} is not an op name of the form namespace.op.overload")
    ns, op, overload = parts
    try:
        packet = getattr(getattr(torch.ops, ns), op)
        resolved = getattr(packet, overload)
    except (AttributeError, RuntimeError):
        raise ValueError(f"op {name} is not registered with torch in this process") from None
    if not isinstance(resolved, torch._ops.OpOverload):
        raise ValueError(f"{name!r} does not name an operator overload")
    return resolved


def op_name(op: torch._ops.OpOverload) -> str:
    return f"{op.namespace}.{op._schema.name.split('::')[-1]}.{op._overloadname}"


from kiln.kernels import (  # noqa: E402,F401,I001  (each registers its kernels)
    aten, attention, concat, conv_gemm, cublas, cudnn, reference, tensorrt, triton_conv, triton_gemm,
    triton_layer_norm, triton_mean, triton_pointwise,
)
