"""The kernel registry: `register_kernel`, the `Kernel` record, and how candidates are ordered.

A kernel is registered with `@register_kernel(...)` on a factory that, given a step's op and
(optionally) the out-variant to write planned buffers through, returns the callable the
runtime invokes:

    @register_kernel("cudnn.conv_then_act", provider="cudnn", implements="kiln.conv_bias_act.default",
                     supports=_conv2d_on_cuda, writes_planned_outputs=False)
    def make_conv_then_act(name, out): ...

`implements` names the op (or a tuple of ops; "aten.*" is every op of a namespace).
Build-time selection asks each kernel that implements a call's op whether it `supports`
the call (device, dtypes, shapes, constant arguments); the runtime only looks kernels up
by name.

Order: a build that does not time the candidates (no timing cache, or a CPU build) runs
the first; tuning times them all. Candidates are ordered by `Priority`, highest first, and
kernels of equal priority by name — never by the order modules happened to be imported.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.specs import TensorSpec

__all__ = [
    "KERNELS",
    "Kernel",
    "OpCall",
    "OutVariant",
    "Priority",
    "StepFn",
    "candidates",
    "get_kernel",
    "op_name",
    "register_kernel",
    "resolve_op",
]

StepFn = Callable[[tuple[Any, ...], dict[str, Any], list[torch.Tensor]], Any]


class Priority(enum.IntEnum):
    """Where a kernel stands among its op's candidates (higher first; ties by kernel name)."""

    PREFERRED = 1  # before every other kernel of its op, timed or not (a TensorRT region's engine)
    DEFAULT = 0  # the untimed choice: what a build runs when it does not time candidates
    REFERENCE = -1  # the op's reference (ATen itself, kiln's torch.library references): always correct
    CANDIDATE = -2  # timed against the others; chosen only where measured faster, never by default


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
class OutVariant:
    """The `.out` overload of an op and the names of its out arguments, in output order."""

    op: str
    out_args: tuple[str, ...] = field(default_factory=tuple)


Implements = str | tuple[str, ...] | Callable[[str], bool]
Factory = Callable[[str, "OutVariant | None"], StepFn]


def _supports_every_call(call: OpCall) -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    name: str
    provider: str
    ops: tuple[str, ...] | Callable[[str], bool]  # op names ("ns.*": every op of ns), or a predicate
    supports: Callable[[OpCall], bool]
    make: Factory
    writes_planned_outputs: bool = True
    doc: str = ""
    priority: int = Priority.DEFAULT
    approximate: bool = False  # computes a stated approximation of the op; BuildConfig(exact=True) skips it
    writes_into: bool = False  # given outs=[view], writes its one result there (any strides) and returns it

    def implements(self, op: str) -> bool:
        if callable(self.ops):
            return bool(self.ops(op))
        return any(op == pattern or (pattern.endswith(".*") and op.startswith(pattern[:-1])) for pattern in self.ops)


KERNELS: dict[str, Kernel] = {}


def register_kernel(
    name: str,
    *,
    provider: str,
    implements: Implements,
    supports: Callable[[OpCall], bool] = _supports_every_call,
    writes_planned_outputs: bool = True,
    priority: int = Priority.DEFAULT,
    approximate: bool = False,
    writes_into: bool = False,
) -> Callable[[Factory], Factory]:
    """Register a kernel factory under `name` (a later registration of a name replaces the earlier).

    `implements`: the op name (e.g. "kiln.linear_act.default"), a tuple of them, or "ns.*" for
    every op of namespace ns. `supports`: whether the kernel can run a given call. `writes_into`:
    the step function, when the plan hands it an output view (a slice of a concatenation, see
    kiln.plan.planner), writes its result there instead of allocating."""
    ops = (implements,) if isinstance(implements, str) else implements
    if not callable(ops) and not all(isinstance(op, str) for op in ops):
        raise TypeError(f"kernel {name!r}: implements= takes op names (a str or a tuple of str), got {implements!r}")

    def deco(make: Factory) -> Factory:
        doc = (make.__doc__ or "").strip()
        KERNELS[name] = Kernel(
            name, provider, ops, supports, make, writes_planned_outputs, doc, priority, approximate, writes_into
        )
        return make

    return deco


def candidates(call: OpCall, exact: bool = False) -> list[Kernel]:
    """Every registered kernel that implements and supports this call, preferred first: by
    priority, then by name (with `exact`, none that computes an approximation)."""
    found = [
        k for k in KERNELS.values() if k.implements(call.op) and k.supports(call) and not (exact and k.approximate)
    ]
    return sorted(found, key=lambda k: (-k.priority, k.name))


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
