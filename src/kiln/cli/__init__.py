"""The `kiln` command line: one Typer app (kiln.cli.app); each command is a module under
kiln/cli/ registered with `@command("name")` and listed once in kiln.cli.commands.COMMANDS."""

from kiln.cli.app import app, command, main
from kiln.cli.commands import COMMANDS

__all__ = ["COMMANDS", "app", "command", "main"]
