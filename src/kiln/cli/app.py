"""The one Typer app behind `kiln`, and the one way a command joins it: `@command("name")`.

A command is a function in its own module under kiln/cli/, decorated with `@command`; the
module is listed once, in kiln.cli.commands.COMMANDS, which `kiln --help` follows in order.
Every user error ends the same way: one line on stderr, `error: …`, and a non-zero exit
(2 for a bad command line, 1 for a problem found while working); no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

try:  # newer typer carries its own copy of click; older typer uses click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException  # type: ignore[assignment]

    NoArgsIsHelpError = ()  # type: ignore[assignment,misc]

from kiln.cli.common import err_line

F = TypeVar("F", bound=Callable[..., Any])

HELP_OPTIONS = ["-h", "--help"]


class KilnGroup(TyperGroup):
    """Runs a command and turns every command-line or kiln error into one line on stderr."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        from kiln.errors import KilnError

        try:
            result = super().main(args=args, prog_name=prog_name or "kiln", standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help())
            code = 2  # a command line that does nothing is a mistake in a script
        except ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "kiln"
            err_line(f"{where}: {_first_lower(exc.format_message())} (see `{where} -h`)")
            code = exc.exit_code
        except typer.Abort:
            err_line("aborted")
            code = 1
        except KilnError as exc:  # a command that did not catch its own: still one message, no traceback
            err_line(str(exc))
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


class KilnCommand(TyperCommand):
    """A command whose help reads conventionally: `kiln build [OPTIONS] MODEL` (optional
    arguments in brackets), arguments listed by their metavar, values by their metavar."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                if param.nargs != 1 and not name.endswith("..."):
                    name += "..."
                pieces.append(name if param.required or name.startswith("[") else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((param.metavar or (param.name or "").upper(), record[1]))
            else:
                opts.append(record)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        if opts:
            with formatter.section("Options"):
                formatter.write_dl(opts)


def _first_lower(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


app = typer.Typer(
    cls=KilnGroup,
    name="kiln",
    help="kiln: build a PyTorch model into an inference engine file and run it fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain, conventional help: readable at 80 columns and in pipes and CI logs
    context_settings={"help_option_names": HELP_OPTIONS, "terminal_width": 80},  # help reads the same everywhere
)


def command(name: str) -> Callable[[F], F]:
    """Register the decorated function as `kiln NAME` (its docstring is the help)."""

    def register(fn: F) -> F:
        app.command(name, cls=KilnCommand)(fn)
        return fn

    return register


def _version(value: bool) -> None:
    if value:
        import platform

        import torch

        from kiln import __version__

        typer.echo(f"kiln {__version__} (torch {torch.__version__}, Python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print kiln's version and exit."
    ),
) -> None:
    """kiln: build a PyTorch model into an inference engine file and run it fast.

    kiln zoo lists the model names; kiln COMMAND -h explains each command.
    """


def main() -> None:
    import kiln.cli.commands  # noqa: F401  (registers every command)

    app()
