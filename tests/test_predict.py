"""kiln predict on the CPU: real photographs from scikit-image, resnet18, eager vs engine."""

from __future__ import annotations

import textwrap

import pytest
import torch
from typer.testing import CliRunner

import kiln
from kiln import zoo
from kiln.builder import BuildConfig
from kiln.cli import app
from kiln.debug import predict as P


@pytest.fixture(scope="module")
def chelsea_report() -> P.PredictReport:
    return P.predict("resnet18", ["skimage:chelsea", "skimage:coffee"], topk=5, device="cpu")


def test_predict_resnet18_on_a_real_photograph(chelsea_report):
    report = chelsea_report
    assert report.model == "resnet18" and report.precision == "fp32"  # fp16 falls back on the CPU
    assert "torchvision" in report.preprocessing
    assert [r.image for r in report.images] == ["skimage:chelsea", "skimage:coffee"]
    for result in report.images:
        for pred in (result.engine, result.eager):
            assert len(pred.labels) == len(pred.probs) == 5
            assert all(isinstance(label, str) and label for label in pred.labels)
            assert pred.probs == sorted(pred.probs, reverse=True)
            assert 0 < sum(pred.probs) <= 1 + 1e-6
        assert result.agreement.verdict == "agree"
        assert result.agreement.same_top1 and result.agreement.topk_overlap == 5
        assert result.agreement.max_prob_diff < 1e-4


def test_predict_says_plainly_that_weights_are_random(chelsea_report):
    assert chelsea_report.pretrained is False
    assert "RANDOM" in chelsea_report.weights_warning
    assert "meaningless" in chelsea_report.weights_warning


def test_predict_from_an_engine_file_rebuilds_eager_from_the_zoo(tmp_path):
    zm = zoo.create("resnet18")
    config = BuildConfig(device="cpu", model_name="resnet18", extra_info={"pretrained": False})
    kiln.build(zm.model, zm.example_inputs, config=config).save(tmp_path / "r18.kiln")
    report = P.predict(str(tmp_path / "r18.kiln"), ["skimage:astronaut"], topk=3)
    (result,) = report.images
    assert result.eager is not None and result.agreement.same_top1
    assert len(result.engine.labels) == 3
    assert any("seed 0" in n for n in report.notes)
    assert report.pretrained is False


def test_predict_from_an_engine_with_no_zoo_model_runs_the_engine_alone(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1000)).eval()
    engine = kiln.build(model, (torch.randn(1, 3, 8, 8),), device="cpu")
    engine.save(tmp_path / "odd.kiln")
    report = P.predict(str(tmp_path / "odd.kiln"), ["skimage:coffee"], topk=2)
    (result,) = report.images
    assert result.eager is None and result.agreement is None and len(result.engine.labels) == 2
    assert "ImageNet default" in report.preprocessing
    assert any("no eager model" in n for n in report.notes)


def test_predict_refuses_a_model_that_is_not_a_classifier(tmp_path):
    path = tmp_path / "enc.py"
    path.write_text(
        textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Linear(4, 4), torch.randn(1, 4)
    """)
    )
    with pytest.raises(P.PredictError, match="ImageNet classifier"):
        P.predict(f"{path}:make", ["skimage:chelsea"])


def test_images_from_files_and_samples(tmp_path):
    from PIL import Image

    Image.new("L", (40, 30), 128).save(tmp_path / "grey.png")
    assert P.load_image(str(tmp_path / "grey.png")).mode == "RGB"
    assert P.load_image("skimage:camera").size == (512, 512)  # greyscale sample, made RGB
    with pytest.raises(P.PredictError, match="chelsea"):
        P.load_image("skimage:chelsae")
    with pytest.raises(P.PredictError, match="not a file"):
        P.load_image(str(tmp_path / "missing.jpg"))
    (tmp_path / "junk.jpg").write_text("not an image")
    with pytest.raises(P.PredictError, match="cannot read"):
        P.load_image(str(tmp_path / "junk.jpg"))


def test_fixed_batch_engines_get_padded_chunks():
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x

    chunks = P.run_in_batches(fn, torch.arange(5.0).reshape(5, 1), batch=2)
    assert seen == [2, 2, 2]
    assert [n for _, n in chunks] == [2, 2, 1]
    assert chunks[-1][0].flatten().tolist() == [4.0, 4.0]


def test_agreement_verdicts():
    a = torch.tensor([0.5, 0.3, 0.2, 0.0])
    assert P.agreement(a, a, k=2).verdict == "agree"
    b = torch.tensor([0.5, 0.1, 0.15, 0.25])  # same top-1, second place differs
    assert P.agreement(a, b, k=2).verdict.startswith("same top-1")
    c = torch.tensor([0.1, 0.6, 0.2, 0.1])
    disagree = P.agreement(a, c, k=2)
    assert disagree.verdict.startswith("DISAGREE") and disagree.max_prob_diff == pytest.approx(0.4)


def test_predict_command_prints_both_sides_and_the_warning():
    result = CliRunner(env={"COLUMNS": "80"}).invoke(
        app, ["predict", "squeezenet1_1", "--sample", "chelsea", "--topk", "3", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "RANDOM" in result.output and "agree" in result.output
    assert "engine" in result.output and "eager" in result.output
    table = result.output[result.output.index("skimage:chelsea"):]
    assert max(len(line) for line in table.splitlines()) <= 80


def test_predict_command_reports_a_bad_image():
    result = CliRunner().invoke(app, ["predict", "resnet18", "skimage:nope"])
    assert result.exit_code == 1
    assert "no scikit-image sample 'nope'" in result.output and "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_predict_precision_is_a_checked_choice():
    result = CliRunner().invoke(app, ["predict", "resnet18", "skimage:chelsea", "--precision", "int8"])
    assert result.exit_code == 2 and "'int8' is not one of fp32, fp16, bf16" in result.output
