"""How conversion says no: a converter's ``Decline`` (this node stays on kiln's kernels) and
``ConversionError`` (a conversion that was required failed). Both the registry and the
context raise them, so they live below both."""

from __future__ import annotations

from kiln.errors import KilnError

__all__ = ["ConversionError", "Decline"]


class Decline(Exception):  # noqa: N818 - a converter's answer, not an error
    """Raised by a converter that cannot handle this particular node."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConversionError(KilnError):
    """A node could not be converted to TensorRT."""
