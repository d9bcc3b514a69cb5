"""The `kiln` command line: one Typer app; each command registers itself in its own module."""

from kiln.cli.commands import app, main

__all__ = ["app", "main"]
