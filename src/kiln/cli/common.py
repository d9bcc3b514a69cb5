"""What every kiln command shares: the consoles, shape parsing, and error exits."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'3,224,224' (or '3x224x224') → (3, 224, 224); empty → None."""
    if not text:
        return None
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a shape like 3,224,224") from None


def fail(exc: BaseException, code: int = 1) -> typer.Exit:
    """Print `exc` as an error (no traceback, markup-safe) and return the exit to raise."""
    err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(code)
