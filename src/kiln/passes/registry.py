"""The pass registry: `@register_pass("name")` on a pure CapturedGraph → CapturedGraph function.

Registration records a pass; where it runs is the `PIPELINE` list in kiln.passes (the
invariants every pass keeps are in this package's README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kiln.graph import CapturedGraph

__all__ = ["PASSES", "Pass", "RegisteredPass", "register_pass"]

Pass = Callable[[CapturedGraph], CapturedGraph]


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    fn: Pass
    doc: str
    default: bool = True  # False: runs only where a BuildConfig names it (measured not to pay everywhere)


PASSES: dict[str, RegisteredPass] = {}


def register_pass(name: str, default: bool = True) -> Callable[[Pass], Pass]:
    def deco(fn: Pass) -> Pass:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        PASSES[name] = RegisteredPass(name, fn, doc, default)
        return fn

    return deco
