"""`kiln build MODEL --batch MIN:OPT:MAX [--seq MIN:OPT:MAX]`: dynamic-shape engines from the
command line; `kiln inspect` shows the ranges, `kiln run` runs one at opt."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kiln
from dynamic_factories import FACTORY
from kiln.cli import app

runner = CliRunner(env={"COLUMNS": "100"})



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "dyn.py"
    path.write_text(FACTORY)
    return str(path)


@pytest.fixture(scope="module")
def token_engine(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "tokens.kiln"
    result = runner.invoke(app, ["build", f"{models}:tokens", "--device", "cpu", "--precision", "fp32",
                                 "--batch", "1:4:16", "--seq", "2:8:32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "batch 1..16 (opt 4), seq 2..32 (opt 8)" in " ".join(result.output.split())
    assert "check_dims" in result.output
    return out


def test_build_with_batch_and_seq_ranges(token_engine, models):
    engine = kiln.load(token_engine)
    assert {d.name: (d.min, d.opt, d.max) for d in engine.dims.values()} == {"batch": (1, 4, 16), "seq": (2, 8, 32)}
    assert [s.shape for s in engine.inputs] == [("batch", "seq"), ("batch", "seq")]
    import importlib.util

    spec = importlib.util.spec_from_file_location("dyn", models)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, _ = module.tokens()
    for n, length in ((1, 2), (16, 32), (3, 17)):
        ids, mask = torch.randint(0, 50, (n, length)), torch.ones(n, length, dtype=torch.long)
        with torch.no_grad():
            torch.testing.assert_close(engine(ids, mask), model(ids, mask), rtol=1e-4, atol=1e-5)


def test_inspect_shows_the_ranges(token_engine):
    result = runner.invoke(app, ["inspect", str(token_engine)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "dims: batch 1..16 (opt 4), seq 2..32 (opt 8); memory planned for batch 16, seq 32" in text
    assert "(batch, seq)" in result.output
    info = json.loads(runner.invoke(app, ["inspect", str(token_engine), "--json"]).output)
    assert info["dims"] == [{"name": "batch", "min": 1, "opt": 4, "max": 16}, {"name": "seq", "min": 2, "opt": 8,
                                                                                "max": 32}]
    assert info["inputs"][0]["shape"] == ["batch", "seq"]


def test_run_a_dynamic_engine_at_opt(token_engine):
    result = runner.invoke(app, ["run", str(token_engine)])
    assert result.exit_code == 0, result.output
    assert "(4, 4)" in result.output  # batch at opt


def test_batch_range_only(models, tmp_path):
    out = tmp_path / "image.kiln"
    result = runner.invoke(app, ["build", f"{models}:image", "--input-shape", "3,8,8", "--device", "cpu",
                                 "--precision", "fp32", "--batch", "1:2:8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    engine = kiln.load(out)
    assert engine.inputs[0].shape == ("batch", 3, 8, 8)
    assert engine(torch.randn(7, 3, 8, 8)).shape == (7, 3)


@pytest.mark.parametrize("args,message", [
    (["--batch", "1:8"], "MIN:OPT:MAX"),
    (["--batch", "8:4:16"], "opt"),
    (["--batch", "0:4:16"], "min"),
])
def test_bad_ranges_are_one_line_errors(models, args, message, tmp_path):
    result = runner.invoke(app, ["build", f"{models}:tokens", "--device", "cpu", *args, "-o", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_seq_needs_a_token_input(models, tmp_path):
    result = runner.invoke(app, ["build", f"{models}:image", "--input-shape", "3,8,8", "--device", "cpu",
                                 "--seq", "2:4:8", "-o", str(tmp_path / "x.kiln")])
    assert result.exit_code != 0
    assert "no token input" in result.output
