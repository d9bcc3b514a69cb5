"""Everything registered in this kiln, read from the registries themselves: passes (in pipeline
order), capture rewrites, kernels, TensorRT converters and benchmark peers. `kiln catalog`
prints it; tests/test_catalog.py holds the README's lists of passes and kernels to it.

Each registry lives with what it registers (docs/architecture.md: where new code goes):

    pass       kiln.passes          @register_pass, listed in kiln.passes.PIPELINE
    rewrite    kiln.capture.rewrites  @register_rewrite
    kernel     kiln.kernels         @register_kernel (module listed in kiln/kernels/__init__.py)
    converter  kiln.tensorrt        @kiln.tensorrt.converter (built-ins: kiln.tensorrt.convert.registry.BUILTINS)
    peer       kiln.bench.peers     @peer
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "Entry", "collect", "converters", "kernels", "passes", "peers", "rewrites"]


@dataclass(frozen=True)
class Entry:
    """One registered thing: its name, the module that registers it, a one-line detail and doc."""

    kind: str
    name: str
    module: str
    detail: str = ""
    doc: str = ""


def _first_line(text: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join((text or "").strip().split("\n\n")[0].split())


def _module(fn: Any) -> str:
    return getattr(fn, "__module__", "") or ""


def passes() -> list[Entry]:
    """Every pass, in the order a build runs them (opt-in ones where they would run)."""
    from kiln.passes import PASSES, PIPELINE

    return [
        Entry("pass", name, _module(PASSES[name].fn), "default" if PASSES[name].default else "opt-in",
              PASSES[name].doc)
        for name in PIPELINE
    ]


def rewrites() -> list[Entry]:
    from kiln.capture.rewrites import REWRITES

    return [
        Entry("rewrite", r.name, _module(r.make), f"{r.module_type.__module__}.{r.module_type.__qualname__}",
              _first_line(r.make.__doc__))
        for r in REWRITES.values()
    ]


def kernels() -> list[Entry]:
    """Every kernel, by provider, then name."""
    from kiln.kernels import KERNELS, Priority

    def detail(k: Any) -> str:
        ops = ", ".join(k.ops) if isinstance(k.ops, tuple) else "(a predicate)"
        level = Priority(k.priority).name.lower() if k.priority in Priority._value2member_map_ else str(k.priority)
        flags = [f for f, on in (("approximate", k.approximate), ("writes into views", k.writes_into)) if on]
        return "; ".join([ops or "no op (placed by the planner)", level, *flags])

    ordered = sorted(KERNELS.values(), key=lambda k: (k.provider, k.name))
    return [Entry("kernel", k.name, _module(k.make), detail(k), _first_line(k.doc)) for k in ordered]


def converters() -> list[Entry]:
    """Every TensorRT converter, one entry per function with the ops it converts (needs no TensorRT)."""
    import kiln.tensorrt as kt

    by_fn: dict[str, list[str]] = {}
    for key, fn in kt.registered().items():
        by_fn.setdefault(fn, []).append(key)
    entries = []
    for fn, keys in by_fn.items():
        module, _, name = fn.rpartition(".")
        entries.append(Entry("converter", name, module, ", ".join(keys)))
    return sorted(entries, key=lambda e: (e.module, e.detail))


def peers() -> list[Entry]:
    from kiln.bench.peers import PEERS

    return [
        Entry("peer", p.name, _module(p.prepare), "default" if p.default else "opt-in", _first_line(p.help))
        for p in PEERS.values()
    ]


KINDS: dict[str, Callable[[], list[Entry]]] = {
    "passes": passes,
    "rewrites": rewrites,
    "kernels": kernels,
    "converters": converters,
    "peers": peers,
}


def collect(kinds: list[str] | None = None) -> dict[str, list[Entry]]:
    """The named kinds (default: all), each read from its registry."""
    chosen = list(KINDS) if not kinds else kinds
    unknown = [k for k in chosen if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown catalog kind(s) {unknown}; known: {', '.join(KINDS)}")
    return {kind: KINDS[kind]() for kind in chosen}
