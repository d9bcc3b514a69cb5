"""`kiln bench MODEL --batch MIN:OPT:MAX [--sizes N,…] [--seq MIN:OPT:MAX]`: one dynamic-shape engine
built from the model, run at each size beside a static engine built for that size (as `kiln bench
ENGINE --batch` runs a dynamic engine file)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dynamic_factories import FACTORY
from kiln.cli import app

runner = CliRunner(env={"COLUMNS": "160"})
FAST = ["--device", "cpu", "--against", "none", "--iters", "2", "--warmup", "0", "--rounds", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "dyn.py"
    path.write_text(FACTORY)
    return str(path)


def rows_of(data):
    return {(r["peer"], r["batch"]): r for r in data["results"]}


def test_range_with_sizes_runs_each_size_beside_a_static_engine(models, tmp_path):
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", f"{models}:image", "--input-shape", "3,8,8", "--batch", "1:4:8",
                                 "--sizes", "1,3,8", *FAST, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "÷static" in result.output
    data = json.loads(out.read_text())
    assert data["dynamic"] == {"dims": [{"name": "batch", "min": 1, "opt": 4, "max": 8}], "batch_sizes": [1, 3, 8]}
    assert data["settings"]["batches"] == [1, 3, 8]
    rows = rows_of(data)
    assert set(rows) == {(p, b) for p in ("eager", "kiln", "kiln-static") for b in (1, 3, 8)}  # one of each per size
    for b in (1, 3, 8):
        dyn, static = rows["kiln", b], rows["kiln-static", b]
        assert (dyn["status"], static["status"]) == ("ok", "ok"), (dyn["reason"], static["reason"])
        assert dyn["vs_static"] == pytest.approx(dyn["latency"]["median_ms"] / static["latency"]["median_ms"])
        assert dyn["accuracy"]["max_abs"] < 1e-4 and static["accuracy"]["max_abs"] < 1e-4  # both vs eager, this size
        assert "dynamic engine (batch 1..8 (opt 4)); first call at these shapes" in dyn["note"]
        assert f"static engine built for ({b}, 3, 8, 8)" in static["note"]
    assert any(n.startswith("dynamic engine built from") and "batch 1..8 (opt 4)" in n for n in data["notes"])


def test_default_sizes_are_min_opt_max_and_a_prime_between(models, tmp_path):
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", f"{models}:image", "--input-shape", "3,8,8", "--batch", "2:4:12",
                                 *FAST, "--against", "kiln-static", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["dynamic"]["batch_sizes"] == [2, 4, 11, 12]  # 11: kiln.shapes.awkward_size
    assert sorted(b for p, b in rows_of(data) if p == "kiln") == [2, 4, 11, 12]
    assert all(r["vs_static"] > 0 for r in data["results"] if r["peer"] == "kiln")


def test_token_model_with_a_seq_range_runs_at_the_seq_opt(models, tmp_path):
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", f"{models}:tokens", "--batch", "1:2:4", "--seq", "2:8:16",
                                 "--sizes", "3", *FAST, "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [d["name"] for d in data["dynamic"]["dims"]] == ["batch", "seq"]
    rows = rows_of(data)
    assert rows["kiln-static", 3]["note"].endswith("static engine built for (3, 8), (3, 8)")
    assert rows["kiln", 3]["vs_static"] > 0 and rows["kiln", 3]["accuracy"]["max_abs"] < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--batch", "1:4:8", "--sizes", "3,9"], "--sizes 9: outside --batch 1:4:8 (batch 1..8 (opt 4))"),
    (["--batch", "1:4"], "--batch takes sizes N[,N…] (e.g. 1,32) or one range MIN:OPT:MAX"),
    (["--batch", "4:2:8"], "min <= opt <= max"),
    (["--sizes", "3"], "--sizes goes with --batch MIN:OPT:MAX"),
    (["--batch", "1:4:8", "--seq", "2:4:8"], "no token input"),
    (["--batch", "2", "--seq", "2:4:8"], "--seq MIN:OPT:MAX goes with --batch MIN:OPT:MAX"),
    (["--batch", "1:4:8", "--precision", "fp32,fp16"], "give one --precision"),
])
def test_bad_ranges_are_one_line_errors(models, args, message):
    result = runner.invoke(app, ["bench", f"{models}:image", "--input-shape", "3,8,8", *args, *FAST])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.strip()][0].startswith("error: ")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_a_range_on_an_engine_file_points_at_its_sizes(models, tmp_path):
    engine = tmp_path / "e.kiln"
    engine.write_bytes(b"not read: refused before loading")
    result = runner.invoke(app, ["bench", str(engine), "--batch", "1:4:8", *FAST])
    assert result.exit_code == 2
    assert "an engine file has its own range" in result.output


def test_a_list_stays_batch_sizes_of_the_model_and_a_range_is_a_dynamic_build(models, tmp_path):
    runs = {}
    for batch in ("1,2", "1:2:2"):
        out = tmp_path / f"{batch.replace(':', '-')}.json"
        result = runner.invoke(app, ["bench", f"{models}:image", "--input-shape", "3,8,8", "--batch", batch,
                                     *FAST, "--json", str(out)])
        assert result.exit_code == 0, result.output
        runs[batch] = json.loads(out.read_text())
    assert "dynamic" not in runs["1,2"] and set(rows_of(runs["1,2"])) == {(p, b) for p in ("eager", "kiln")
                                                                          for b in (1, 2)}
    assert set(rows_of(runs["1:2:2"])) == {(p, b) for p in ("eager", "kiln", "kiln-static") for b in (1, 2)}
