"""`kiln catalog [KIND]`: what this kiln has registered — passes (in pipeline order), capture
rewrites, kernels, TensorRT converters, benchmark peers — read from the registries (kiln.catalog)."""

from __future__ import annotations

import json
import textwrap

import typer

from kiln.cli.app import command
from kiln.cli.common import choice, console

KINDS = ("passes", "rewrites", "kernels", "converters", "peers")  # kiln.catalog.KINDS, without importing it
TITLES = {
    "passes": "passes, in the order a build runs them (kiln.passes.PIPELINE)",
    "rewrites": "capture rewrites (kiln.capture.rewrites)",
    "kernels": "kernels (kiln.kernels): ops; priority; flags",
    "converters": "TensorRT converters (kiln.tensorrt): function: ops",
    "peers": "benchmark peers (kiln.bench.peers)",
}


@command("catalog")
def catalog(
    kind: str = typer.Argument(None, metavar="[KIND]", parser=choice(*KINDS),
                               help=f"One of {', '.join(KINDS)} (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON."),
) -> None:
    """List what this kiln has registered: passes, rewrites, kernels, converters, peers.

    Each entry names the module that registers it; docs/architecture.md says where new ones go.
    """
    from kiln import catalog as registry

    found = registry.collect([kind] if kind else None)
    if as_json:
        print(json.dumps({k: [e.__dict__ for e in entries] for k, entries in found.items()}, indent=2))
        return
    width = max(60, min(console.width, 100))
    for i, (name, entries) in enumerate(found.items()):
        if i:
            console.print()
        console.print(f"{TITLES[name]}: {len(entries)}", soft_wrap=True)
        for entry in entries:
            head = f"  {entry.name}  [{entry.detail}]" if entry.detail else f"  {entry.name}"
            console.print(head, soft_wrap=True, markup=False)
            text = entry.doc or f"({entry.module})"
            where = "" if not entry.doc else f" ({entry.module})"
            for line in textwrap.wrap(text + where, width - 6):
                console.print(f"      {line}", soft_wrap=True, markup=False)
