"""kiln.catalog reads every registry; the README's lists of passes, capture rewrites and kernels
say exactly what the registries hold (in pipeline order for the passes); `kiln catalog` prints it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kiln import catalog
from kiln.capture.rewrites import REWRITES
from kiln.kernels import KERNELS
from kiln.passes import PASSES, PIPELINE

README = Path(__file__).resolve().parents[1] / "README.md"


def _paragraph(starts: str) -> str:
    """The README paragraph that begins with `starts`."""
    paragraphs = re.split(r"\n\s*\n", README.read_text())
    found = [p for p in paragraphs if p.startswith(starts)]
    assert len(found) == 1, f"README.md has {len(found)} paragraphs starting {starts!r}"
    return found[0]


def _names(text: str, pattern: str) -> list[str]:
    """Backticked names in `text` matching `pattern`, in order; `a.{b,c}` is a.b and a.c."""
    out = []
    for token in re.findall(r"`([^`]+)`", text):
        brace = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", token)
        for name in [f"{brace[1]}{part}{brace[3]}" for part in brace[2].split(",")] if brace else [token]:
            if re.fullmatch(pattern, name):
                out.append(name)
    return out


def test_name_extraction():
    assert _names("`a.{x,y}` and `kiln::op`, `b_c`, `BuildConfig(x)`", r"[a-z_.]+") == ["a.x", "a.y", "b_c"]


def test_readme_lists_the_passes_in_pipeline_order():
    text = _paragraph("The passes, in order")
    default, _, opt_in = text.partition("Opt-in")
    assert _names(default, r"[a-z_]+") == [n for n in PIPELINE if PASSES[n].default]
    assert _names(opt_in, r"[a-z_]+") == [n for n in PIPELINE if not PASSES[n].default]


def test_readme_lists_every_kernel():
    listed = _names(_paragraph("Kernels"), r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
    assert len(listed) == len(set(listed)), "a kernel is listed twice"
    assert set(listed) == set(KERNELS)


def test_readme_lists_every_capture_rewrite():
    assert set(_names(_paragraph("Capture rewrites"), r"[a-z][a-z0-9_]*")) == set(REWRITES)


def test_catalog_reads_every_registry():
    import kiln.tensorrt as kt
    from kiln.bench.peers import PEERS

    found = catalog.collect()
    assert list(found) == list(catalog.KINDS)
    assert [e.name for e in found["passes"]] == list(PIPELINE)
    assert {e.name for e in found["kernels"]} == set(KERNELS)
    assert {e.name for e in found["rewrites"]} == set(REWRITES)
    assert {e.name for e in found["peers"]} == set(PEERS)
    converted = {op for e in found["converters"] for op in e.detail.split(", ")}
    assert converted == set(kt.registered())
    assert all(e.module.startswith("kiln.") and e.doc for e in found["passes"] + found["kernels"])


def test_catalog_names_unknown_kinds():
    with pytest.raises(ValueError, match="unknown catalog kind.*known: passes, rewrites"):
        catalog.collect(["pases"])


def test_kernel_entries_say_priority_and_ops():
    kernels = {e.name: e for e in catalog.kernels()}
    assert kernels["cublaslt.linear_gelu_tanh"].detail == "kiln.linear_act.default; candidate; approximate"
    assert kernels["aten"].detail == "aten.*; reference"
    assert kernels["tensorrt"].detail == "kiln.tensorrt_region.default; preferred"


def _cli(*args: str):
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    import kiln.cli.catalog  # noqa: F401  (registers the command, until kiln.cli.commands lists it)
    from kiln.cli.app import app

    return CliRunner().invoke(app, ["catalog", *args])


def test_cli_kinds_are_the_catalogs():
    from kiln.cli.catalog import KINDS

    assert KINDS == tuple(catalog.KINDS)


def test_kiln_catalog_prints_every_kind():
    result = _cli()
    assert result.exit_code == 0, result.output
    for title in ("passes, in the order", "capture rewrites", "kernels", "TensorRT converters", "benchmark peers"):
        assert title in result.output
    assert result.output.index("dead_code") < result.output.index("fuse_pointwise")
    assert "triton.linear_act.narrow" in result.output and "_conv_bias_act" in result.output


def test_kiln_catalog_json_of_one_kind():
    result = _cli("passes", "--json")
    assert result.exit_code == 0, result.output
    assert [e["name"] for e in json.loads(result.output)["passes"]] == list(PIPELINE)


def test_kiln_catalog_refuses_an_unknown_kind_in_one_line():
    result = _cli("kernel")
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "not one of passes" in result.output


def test_a_registered_pass_missing_from_the_pipeline_is_refused():
    import kiln.passes as passes
    from kiln.passes.registry import register_pass

    register_pass("test_unlisted")(lambda graph: graph)
    try:
        with pytest.raises(RuntimeError, match=r"misses registered ones \(\['test_unlisted'\]\)"):
            passes._in_pipeline_order()
    finally:
        del PASSES["test_unlisted"]
    passes._in_pipeline_order()
    assert list(PASSES) == list(PIPELINE)
