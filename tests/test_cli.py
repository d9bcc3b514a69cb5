"""The kiln command line, end to end on a small model file."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kiln.cli.commands import app

runner = CliRunner()

FACTORY = '''
import torch
from torch import nn

def make():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    return model, (torch.randn(1, 3, 8, 8),)
'''


@pytest.fixture
def engine_path(tmp_path):
    factory = tmp_path / "tiny.py"
    factory.write_text(FACTORY)
    out = tmp_path / "tiny.kiln"
    result = runner.invoke(app, ["build", f"{factory}:make", "--device", "cpu", "--precision", "fp32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for stage in ("capture", "passes", "select", "plan", "write"):
        assert stage in result.output
    assert out.is_file()
    return out


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("build", "run", "inspect", "zoo"):
        assert command in result.output


def test_run_random_and_benchmark(engine_path):
    result = runner.invoke(app, ["run", str(engine_path), "--benchmark", "--iters", "5", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    assert "(1, 10)" in result.output and "median" in result.output and "p90" in result.output


def test_run_with_npy_input(engine_path, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, 8, 8), dtype=np.float32))
    result = runner.invoke(app, ["run", str(engine_path), "--input", str(x)])
    assert result.exit_code == 0, result.output


def test_run_with_wrong_input_shape_names_the_problem(engine_path, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 3, 8, 8), dtype=np.float32))
    result = runner.invoke(app, ["run", str(engine_path), "--input", str(x)])
    assert result.exit_code == 1
    assert "built for (1, 3, 8, 8)" in result.output


def test_inspect_json(engine_path):
    result = runner.invoke(app, ["inspect", str(engine_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["inputs"][0]["shape"] == [1, 3, 8, 8]
    assert {s["kernel"] for s in info["steps"]} <= {"aten", "kiln.reference"}
    assert any(s["op"] == "kiln.conv_bias_act.default" for s in info["steps"]), "conv + ReLU should be fused"
    assert all({"op", "kernel", "precision", "output_shape"} <= set(s) for s in info["steps"])
    assert info["memory"]["arena_bytes"] <= info["memory"]["activation_bytes"]
    assert info["build"]["torch_version"] == torch.__version__
    assert info["build"]["precision"] == "fp32"


def test_inspect_table(engine_path, monkeypatch):
    from kiln.cli import commands as cli

    monkeypatch.setattr(cli.console, "width", 200)
    result = runner.invoke(app, ["inspect", str(engine_path)])
    assert result.exit_code == 0, result.output
    assert "memory plan" in result.output and "kiln.conv_bias_act.default" in result.output


def test_inspect_timings_lists_each_tuned_steps_candidates():
    from rich.console import Console

    from kiln.cli.commands import _timings_table

    steps = [
        {"index": 0, "name": "conv", "kernel": "b", "candidates": ["a", "b", "c"],
         "timings_ms": {"a": 0.01, "b": 0.02}, "concat_copy_ms": 0.015},
        {"index": 1, "name": "relu", "kernel": "aten", "candidates": ["aten"], "timings_ms": {}},
    ]
    console = Console(width=200, record=True)
    console.print(_timings_table(steps))
    text = console.export_text()
    assert "b 0.0200, a 0.0100" in text, "the chosen kernel comes first, even when the copy made it win"
    assert "failed or disagreed: c" in text and "0.0150" in text
    assert "relu" not in text, "untuned steps are left out"


def test_build_streams_option_reaches_the_build(tmp_path):
    factory = tmp_path / "tiny.py"
    factory.write_text(FACTORY)
    out = tmp_path / "tiny.kiln"
    args = ["build", f"{factory}:make", "--device", "cpu", "--precision", "fp32", "-o", str(out)]
    result = runner.invoke(app, [*args, "--streams", "off"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    assert info["build"]["streams"]["mode"] == "off"
    result = runner.invoke(app, [*args, "--streams", "two"])
    assert result.exit_code == 1 and "streams must be" in result.output


def test_unknown_model_is_an_error_not_a_traceback(tmp_path):
    result = runner.invoke(app, ["build", "resnet5O", "-o", str(tmp_path / "x.kiln")])
    assert result.exit_code == 1
    assert "resnet50" in result.output  # the close match is suggested


def test_damaged_engine_is_an_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.kiln"
    bad.write_bytes(b"not an engine at all")
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 1 and "error" in result.output


def test_run_profile_lists_the_slowest_steps(engine_path, monkeypatch):
    from kiln.cli import commands as cli

    monkeypatch.setattr(cli.console, "width", 200)
    result = runner.invoke(app, ["run", str(engine_path), "--profile", "2"])
    assert result.exit_code == 0, result.output
    assert "2 slowest steps" in result.output and "sum of step times" in result.output
    assert "kiln.conv_bias_act.default" in result.output or "aten." in result.output


def test_engine_profile_times_every_step(engine_path):
    import kiln

    engine = kiln.load(engine_path)
    rows = engine.profile(torch.randn(1, 3, 8, 8), iters=3)
    assert len(rows) == len(engine.plan["steps"])
    assert all(r["ms"] >= 0 for r in rows)
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
