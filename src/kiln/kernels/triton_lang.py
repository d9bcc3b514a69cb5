"""Triton, where this torch build has it: the one place kiln's Triton kernels import it from.

    from kiln.kernels.triton_lang import jit, needs_triton, tl, triton

    @jit
    def my_kernel(x_ptr, n, BLOCK: tl.constexpr): ...

Kernels are defined at module level with `jit` (`triton.jit`, or the plain function where
Triton is missing: CPU-only torch builds ship without it, and then no Triton kernel is a
candidate). Triton decides at `jit` time whether a kernel runs compiled or in its CPU
interpreter, so TRITON_INTERPRET=1 must be set before kiln.kernels is imported (the tests run
interpreted kernels in a child process: tests/interpreter.py). `needs_triton` is the error a
launcher raises when called without Triton.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton
    triton = tl = None

__all__ = ["available", "jit", "needs_triton", "tl", "triton"]


def available() -> bool:
    return triton is not None


def jit(fn: Callable[..., Any]) -> Any:
    """`triton.jit(fn)`; without Triton, `fn` itself (never launched: `needs_triton` stops it)."""
    return fn if triton is None else triton.jit(fn)


def needs_triton(kernel: str) -> None:
    """Raise RuntimeError naming `kernel` when Triton is missing."""
    if triton is None:
        raise RuntimeError(f"the {kernel} kernel needs Triton, which this torch build lacks")
