"""`kiln keygen PRIVATE PUBLIC`: a new Ed25519 key pair for signing engine files."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from kiln.cli.app import command
from kiln.cli.common import console, fail


@command("keygen")
def keygen(
    private: Path = typer.Argument(..., metavar="PRIVATE", show_default=False,
                                   help="Private key file to write (PEM, readable by you only)."),
    public: Path = typer.Argument(..., metavar="PUBLIC", show_default=False,
                                  help="Public key file to write (PEM; hand it to whoever loads your engines)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing key files."),
) -> None:
    """Make a key pair for signing engine files.

    Sign with kiln build --sign-key PRIVATE; check with --trusted-key PUBLIC on run, inspect and
    bench, or kiln.load(path, trusted_keys=[PUBLIC]).
    """
    from kiln.errors import KilnError
    from kiln.runtime.signing import generate_key

    try:
        fingerprint = generate_key(private, public, overwrite=overwrite)
    except (KilnError, OSError, ImportError) as exc:
        raise fail(exc) from None
    console.print(f"wrote {escape(str(private))} (private: keep it secret) and {escape(str(public))} (public)")
    console.print(f"key: {escape(fingerprint)}")
