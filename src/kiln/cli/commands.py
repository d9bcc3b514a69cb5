"""Every `kiln` command, listed once.

A command is a module under kiln/cli/ holding one function decorated with
`@command("name")` (kiln.cli.app). Its module name goes in COMMANDS, in the order
`kiln --help` lists the commands; importing the module registers the command.
"""

from __future__ import annotations

import importlib

from kiln.cli.app import app, command, main

COMMANDS = (
    "build",
    "run",
    "inspect",
    "zoo",
    "catalog",
    "bench",
    "predict",
    "debug",
    "export_onnx",
    "trt_check",
    "keygen",
    "serve",
)


def _add_commands() -> None:
    """Import each command module (its @command registers it), in COMMANDS order."""
    for name in COMMANDS:
        importlib.import_module(f"kiln.cli.{name}")


_add_commands()

__all__ = ["COMMANDS", "app", "command", "main"]
