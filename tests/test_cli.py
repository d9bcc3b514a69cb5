"""The kiln command line, end to end on small model files: conventions (help, version, one-line
errors for every bad argument, 80 columns), build/run/inspect, and signing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kiln.cli import COMMANDS, app
from kiln.cli import common as cli_common

runner = CliRunner(env={"COLUMNS": "80"})  # as in a CI log or a pipe

FACTORY = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv1(x))  # the block's source line


def make():
    model = nn.Sequential()
    model.add_module("block", Block())
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(4 * 6 * 6, 10))
    return model.eval(), (torch.randn(1, 3, 8, 8),)
'''


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.py"
    path.write_text(FACTORY)
    return f"{path}:make"


@pytest.fixture(scope="module")
def engine_path(factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "tiny.kiln"
    result = runner.invoke(app, ["build", factory, "--device", "cpu", "--precision", "fp32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for stage in ("capture", "passes", "select", "plan", "write"):
        assert stage in result.output
    assert out.is_file()
    return out


@pytest.fixture(scope="module")
def not_engines(tmp_path_factory):
    """Files a user might hand to a command that takes an engine."""
    d = tmp_path_factory.mktemp("not_engines")
    onnx = d / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x032.0" + bytes(200))  # an ONNX protobuf's first bytes
    garbage = d / "garbage.kiln"
    garbage.write_bytes(b"not an engine at all")
    script = d / "script.py"
    script.write_text("print('hello')\n")
    return {"onnx": onnx, "garbage": garbage, "py": script, "dir": d, "missing": d / "missing.kiln"}


def stderr_of(result) -> str:
    return result.stderr if result.stderr_bytes is not None else result.output


# --- conventions ---------------------------------------------------------------------------------


def test_help_lists_every_command_and_h_works_everywhere():
    result = runner.invoke(app, ["-h"])
    assert result.exit_code == 0
    listed = re.findall(r"^  (\S+)  ", result.output.split("Commands:")[1], flags=re.M)
    assert listed == [name.replace("_", "-") for name in COMMANDS]
    for name in listed:
        sub = runner.invoke(app, [name, "-h"])
        assert sub.exit_code == 0, sub.output
        assert sub.output.startswith(f"Usage: kiln {name} "), sub.output
        assert max(len(line) for line in sub.output.splitlines()) <= 80, f"kiln {name} -h is wider than 80 columns"
        assert not re.search(r"<(str|int|float|path|bool)>", sub.output), f"kiln {name} -h shows a type, not a metavar"
        assert "{" not in sub.output.splitlines()[0], "usage lines name arguments as MODEL / [MODEL], not {MODEL}"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    import kiln

    assert result.output.startswith(f"kiln {kiln.__version__} (torch {torch.__version__}")


def test_defaults_are_shown():
    out = " ".join(runner.invoke(app, ["build", "-h"]).output.split())
    assert "[default: fp16]" in out and "[default: auto]" in out and "[default: kiln]" in out
    assert "cuda when available" in out and "MODEL.kiln" in out
    out = " ".join(runner.invoke(app, ["bench", "-h"]).output.split())
    assert "[default: 5; x>=1]" in out  # --rounds


def test_vocabularies_match_the_builder_and_the_bench():
    from kiln import builder
    from kiln.bench import results

    assert cli_common.PRECISIONS == tuple(builder.PRECISIONS) == results.PRECISIONS
    for streams in cli_common.STREAMS:
        builder._check_config(builder.BuildConfig(streams=streams))
    for backend in cli_common.BACKENDS:
        builder._check_config(builder.BuildConfig(backend=backend))
    with pytest.raises(ValueError):
        builder._check_config(builder.BuildConfig(streams="sometimes"))


def test_batch_is_parsed_by_one_function():
    assert cli_common.parse_batches("1,32") == (1, 32)
    assert cli_common.parse_batches("8") == (8,)
    assert cli_common.parse_batches(None) is None
    assert cli_common.one_batch("8") == 8 and cli_common.one_batch(1) == 1
    for bad in ("0", "a", "1,,2", "-1"):
        with pytest.raises(Exception, match="batch"):
            cli_common.parse_batches(bad)
    with pytest.raises(Exception, match="one batch size"):
        cli_common.one_batch("1,32")
    assert cli_common.parse_shape("3x224x224") == cli_common.parse_shape("3,224,224") == (3, 224, 224)


def _bad_cases(factory, engine, files):
    """(argv, what the one-line message must mention) for every command."""
    onnx, garbage, py, folder, missing = (str(files[k]) for k in ("onnx", "garbage", "py", "dir", "missing"))
    model = factory
    cases = [
        ([], "usage"),
        (["nosuchcommand"], "no such command"),
        (["--nosuchoption"], "no such option"),
        # build
        (["build"], "missing argument 'MODEL'"),
        (["build", model, "--device", "tpu"], "'tpu' is not a device"),
        (["build", model, "--precision", "int8"], "--precision int8 needs calibration data"),
        (["build", model, "--precision", "int4"], "'int4' is not one of"),
        (["build", model, "--backend", "tensorrtt"], "did you mean tensorrt"),
        (["build", model, "--streams", "two"], "not one of auto, on, off"),
        (["build", model, "--batch", "0"], "positive"),
        (["build", model, "--batch", "1,32"], "one batch size"),
        (["build", model, "--batch", "x"], "batch size"),
        (["build", model, "--input-shape", "3,a"], "not a shape"),
        (["build", "nosuchmodel"], "unknown zoo model"),
        (["build", "resnet5O"], "resnet50"),
        (["build", f"{folder}/missing.py:make"], "missing.py"),
        (["build", model, "--sign-key", missing], "does not exist"),
        # run
        (["run"], "missing argument 'ENGINE'"),
        (["run", missing], "no engine file"),
        (["run", onnx], "ONNX model, not a kiln engine"),
        (["run", py], "Python source, not a kiln engine"),
        (["run", garbage], "not a kiln engine"),
        (["run", folder], "directory"),
        (["run", engine, "--device", "gpu"], "not a device"),
        (["run", engine, "--input", missing], "does not exist"),
        (["run", engine, "--input", py], "not a .npy array"),
        (["run", engine, "--iters", "0"], "--iters"),
        (["run", engine, "--trusted-key", missing], "does not exist"),
        # inspect
        (["inspect"], "missing argument 'ENGINE'"),
        (["inspect", onnx], "ONNX model"),
        (["inspect", garbage], "not a kiln engine"),
        (["inspect", engine, "--device", "tpu"], "not a device"),
        # zoo
        (["zoo", "extra"], "unexpected extra argument"),
        # bench
        (["bench"], "give MODEL or ENGINE, or --zoo"),
        (["bench", model, "--precision", "fp16,int8"], "'int8' is not one of"),
        (["bench", model, "--against", "onxruntime"], "did you mean onnxruntime"),
        (["bench", model, "--batch", "1,0"], "positive"),
        (["bench", model, "--rounds", "0"], "--rounds"),
        (["bench", model, "--device", "tpu"], "not a device"),
        (["bench", "nosuchmodel", "--device", "cpu", "--against", "none"], "unknown zoo model"),
        (["bench", garbage, "--device", "cpu"], "not a kiln engine"),
        (["bench", model, "--batch", "1:4:8", "--sizes", "2,9"], "--sizes 9: outside --batch 1:4:8"),
        (["bench", model, "--batch", "1:4"], "one range MIN:OPT:MAX"),
        (["bench", model, "--sizes", "3"], "--sizes goes with --batch MIN:OPT:MAX"),
        (["bench", model, "--batch", "1:2:4", "--seq", "2:4:8", "--device", "cpu"], "no token input"),
        # predict
        (["predict"], "missing argument 'MODEL|ENGINE'"),
        (["predict", "resnet18", "--precision", "int8"], "'int8' is not one of"),
        (["debug"], "missing argument 'precision'"),
        (["debug", "precision", model, "--precision", "fp32"], "'fp32' is not one of"),
        (["predict", "resnet18", "--topk", "0"], "--topk"),
        (["predict", "resnet18", str(files["missing"]) + ".jpg", "--device", "cpu"], "missing.kiln.jpg"),
        # export-onnx
        (["export-onnx", model], "missing option '-o'"),
        (["export-onnx", model, "-o", f"{folder}/m.onnx", "--batch", "0"], "positive"),
        (["export-onnx", "nosuchmodel", "-o", f"{folder}/m.onnx"], "unknown zoo model"),
        # trt-check
        (["trt-check"], "missing argument"),
        (["trt-check", f"{folder}/nothing.onnx"], ""),
        (["trt-check", model, "--batch", "x"], "batch size"),
        # keygen
        (["keygen"], "missing argument 'PRIVATE'"),
        (["keygen", py, f"{folder}/pub.pem"], "exists"),
        # catalog
        (["catalog", "kernals"], "did you mean kernels"),
        (["catalog", "--nosuch"], "no such option"),
        # serve (stops at the command line: no Ray started)
        (["serve"], "missing argument 'ENGINE...'"),
        (["serve", engine, "--port", "http"], "--port"),
        (["serve", engine, "--device", "tpu"], "not a device"),
        (["serve", engine, "--autoscaling", "{min"], "not JSON"),
    ]
    return cases


def test_every_command_has_bad_argument_cases(factory, engine_path, not_engines):
    covered = {argv[0] for argv, _ in _bad_cases(factory, str(engine_path), not_engines) if argv}
    missing = {name.replace("_", "-") for name in COMMANDS} - covered
    assert not missing, f"add bad-argument cases for: {sorted(missing)}"


def test_bad_arguments_give_one_line_and_no_traceback(factory, engine_path, not_engines):
    failures = []
    registered = {name.replace("_", "-") for name in COMMANDS}
    for argv, expect in _bad_cases(factory, str(engine_path), not_engines):
        if argv and not argv[0].startswith("-") and argv[0] not in registered and argv[0] != "nosuchcommand":
            continue  # a command of another helper's, not registered in this checkout
        result = runner.invoke(app, argv)
        err = stderr_of(result)
        lines = [line for line in err.splitlines() if line.strip()]
        problems = []
        if result.exit_code == 0:
            problems.append("exit code 0")
        if "Traceback" in result.output or result.exception and not isinstance(result.exception, SystemExit):
            problems.append(f"traceback / exception {result.exception!r}")
        if argv and not (len(lines) == 1 and lines[0].startswith("error: ")):
            problems.append(f"stderr is not one 'error:' line: {err!r}")
        if expect and expect.lower() not in result.output.lower():
            problems.append(f"message lacks {expect!r}: {result.output!r}")
        if problems:
            failures.append(f"kiln {' '.join(argv)}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


def test_unknown_model_points_at_kiln_zoo(tmp_path):
    result = runner.invoke(app, ["build", "resnet5O", "-o", str(tmp_path / "x.kiln")])
    assert result.exit_code == 1
    assert "`kiln zoo` lists the names" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_one_line(factory, tmp_path):
    result = runner.invoke(app, ["build", factory, "--device", "cuda", "-o", str(tmp_path / "x.kiln")])
    assert result.exit_code == 1 and "no usable CUDA GPU" in result.output and "building" not in result.output


def test_int8_fails_before_any_work(factory, tmp_path):
    result = runner.invoke(app, ["build", factory, "--precision", "int8", "-o", str(tmp_path / "x.kiln")])
    assert result.exit_code == 2 and "building" not in result.output and not (tmp_path / "x.kiln").exists()


# --- build, run, inspect -------------------------------------------------------------------------


def test_building_line_shows_the_precision_used(factory, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine fp16 is used as asked")
    result = runner.invoke(app, ["build", factory, "--precision", "fp16", "-o", str(tmp_path / "x.kiln")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "(batch 1, fp32, fp16 asked for, on cpu)" in text and "steps, fp32 on cpu)" in text


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
    assert "Traceback" not in result.output


def test_run_profile_lists_the_slowest_steps_by_module(engine_path):
    result = runner.invoke(app, ["run", str(engine_path), "--profile", "2"])
    assert result.exit_code == 0, result.output
    assert "sum of step times" in result.output
    assert "block.conv1" in result.output


def test_inspect_json_names_modules_and_the_models_source_lines(engine_path):
    result = runner.invoke(app, ["inspect", str(engine_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["inputs"][0]["shape"] == [1, 3, 8, 8]
    assert {s["kernel"] for s in info["steps"]} <= {"aten", "kiln.reference"}
    conv = next(s for s in info["steps"] if s["op"] == "kiln.conv_bias_act.default")  # conv + ReLU fused
    assert conv["module"] == "block.conv1", "a fused op is named by the layer it starts from"
    assert "tiny.py:" in conv["source"] and "the block's source line" in conv["source"]
    assert "torch/nn" not in conv["source"]
    head = next(s for s in info["steps"] if s["op"] == "kiln.linear_act.default")
    assert head["module"] == "head"
    assert all({"op", "kernel", "precision", "output_shape", "module", "source"} <= set(s) for s in info["steps"])
    assert info["memory"]["arena_bytes"] <= info["memory"]["activation_bytes"]
    assert info["build"]["torch_version"] == torch.__version__
    assert info["build"]["precision"] == "fp32"
    assert info["signer"] is None


def test_inspect_table_fits_80_columns_and_shows_modules(engine_path):
    result = runner.invoke(app, ["inspect", str(engine_path)])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert "block.conv1" in result.output and "kiln.conv_bias_act" in result.output
    assert "tiny.py:" in result.output  # the source column is kept at 80 columns
    assert "memory plan" in result.output and "signed by: nobody" in result.output


def test_inspect_timings_without_timings_explains_why(engine_path):
    result = runner.invoke(app, ["inspect", str(engine_path), "--timings"])
    assert result.exit_code == 0, result.output
    assert "kernel timings: none recorded" in result.output and "CUDA GPU" in result.output
    assert "candidates, ms" not in result.output


def test_inspect_timings_lists_each_tuned_steps_candidates():
    from rich.console import Console

    from kiln.cli.inspect import timings_table

    steps = [
        {"index": 0, "name": "conv", "module": "layer1.0.conv1", "kernel": "b", "candidates": ["a", "b", "c"],
         "timings_ms": {"a": 0.01, "b": 0.02}, "concat_copy_ms": 0.015},
        {"index": 1, "name": "relu", "module": "relu", "kernel": "aten", "candidates": ["aten"], "timings_ms": {}},
    ]
    console = Console(width=80, record=True)
    console.print(timings_table(steps, width=80))
    text = console.export_text()
    assert "b 0.0200, a 0.0100" in text, "the chosen kernel comes first, even when the copy made it win"
    assert "failed or disagreed" in text and "0.0150" in text and "layer1.0.conv1" in text
    assert max(len(line) for line in text.splitlines()) <= 80, "long candidate lists wrap inside their column"
    assert "relu" not in text, "untuned steps are left out"


def test_inspect_shows_tensorrt_regions_as_such():
    from rich.console import Console

    from kiln.cli.inspect import region_lines, steps_table

    region = {"ops": 53, "op_counts": {"aten.convolution.default": 20, "aten.relu.default": 17}, "engine_bytes": 2**20}
    steps = [
        {"index": 0, "name": "tensorrt_region", "module": "", "op": "kiln.tensorrt_region.default",
         "kernel": "tensorrt", "precision": "float16", "output_shape": [1, 1000], "memory": "heap",
         "source": "unknown source line (no stack trace recorded)", "tensorrt_region": region},
    ]
    from kiln.cli.describe import TENSORRT_REGION_OP
    from kiln.tensorrt.runtime.region import REGION_OP

    assert TENSORRT_REGION_OP == REGION_OP
    console = Console(width=80, record=True)
    console.print(steps_table(steps, width=80))
    text = console.export_text()
    assert "TensorRT region (53 ops)" in text
    line = region_lines(steps)[0]
    assert "TensorRT region: 53 ops" in line and "aten.convolution.default ×20" in line and "1.00 MiB" in line


def test_fitted_table_leaves_out_the_least_needed_columns_and_says_so():
    from rich.console import Console

    from kiln.cli.common import Column, fitted_table

    columns = [Column("name", 9), Column("wide", 1), Column("value", 8, "right")]
    rows = [["a" * 20, "x" * 60, "1.0"]]
    console = Console(width=60, record=True)
    console.print(fitted_table(columns, rows, width=60))
    text = console.export_text()
    assert "x" * 60 not in text and "a" * 20 in text and "1.0" in text
    assert "left out at 60 columns: wide" in text
    assert max(len(line) for line in text.splitlines()) <= 60


def test_build_streams_option_reaches_the_build(factory, tmp_path):
    out = tmp_path / "tiny.kiln"
    args = ["build", factory, "--device", "cpu", "--precision", "fp32", "-o", str(out)]
    result = runner.invoke(app, [*args, "--streams", "off"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    assert info["build"]["streams"]["mode"] == "off"


def test_zoo_lists_names():
    result = runner.invoke(app, ["zoo"])
    assert result.exit_code == 0 and "resnet50" in result.output and "file.py:factory" in result.output


def test_engine_profile_times_every_step(engine_path):
    import kiln

    engine = kiln.load(engine_path)
    rows = engine.profile(torch.randn(1, 3, 8, 8), iters=3)
    assert len(rows) == len(engine.plan["steps"])
    assert all(r["ms"] >= 0 for r in rows)
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)


# --- signing ---------------------------------------------------------------------------------------


def test_keygen_sign_and_check(factory, tmp_path):
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    result = runner.invoke(app, ["keygen", str(private), str(public)])
    assert result.exit_code == 0, result.output
    fingerprint = result.output.split("key: ")[1].strip()
    out = tmp_path / "signed.kiln"
    result = runner.invoke(app, ["build", factory, "--device", "cpu", "--precision", "fp32", "-o", str(out),
                                 "--sign-key", str(private)])
    assert result.exit_code == 0, result.output
    assert "signed with k.pem" in result.output

    checked = runner.invoke(app, ["inspect", str(out), "--trusted-key", str(public)])
    assert checked.exit_code == 0, checked.output
    assert f"signed by: {fingerprint} (verified" in " ".join(checked.output.split())
    unchecked = runner.invoke(app, ["inspect", str(out)])
    assert "not verified" in unchecked.output
    assert runner.invoke(app, ["run", str(out), "--trusted-key", str(public)]).exit_code == 0

    other_private, other_public = tmp_path / "o.pem", tmp_path / "o.pub"
    assert runner.invoke(app, ["keygen", str(other_private), str(other_public)]).exit_code == 0
    refused = runner.invoke(app, ["run", str(out), "--trusted-key", str(other_public)])
    assert refused.exit_code == 1 and "not one of" in refused.output and "Traceback" not in refused.output
    assert len([line for line in stderr_of(refused).splitlines() if line.strip()]) == 1
    again = runner.invoke(app, ["keygen", str(private), str(public)])
    assert again.exit_code == 1 and "exists" in again.output


def test_readme_help_block_is_kiln_h():
    """The README's `kiln -h` block is what `kiln -h` prints at 80 columns."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```text\n$ kiln -h\n", 1)[1].split("```", 1)[0]
    out = runner.invoke(app, ["-h"]).output
    assert block.strip() == out[out.index("Commands:"):].strip()
