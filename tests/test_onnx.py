"""ONNX export (torch.onnx), onnx.checker, ONNX Runtime validation, onnxslim, `kiln export-onnx`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="needs kiln[onnx]: onnx")
ort = pytest.importorskip("onnxruntime", reason="needs kiln[onnx]: onnxruntime")
pytest.importorskip("onnxscript", reason="needs kiln[onnx]: onnxscript (torch.onnx dynamo)")

from kiln.onnx import export as konnx  # noqa: E402


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(image)))
        return self.fc(x.mean((2, 3)))


class TwoInTwoOut(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": a + b, "scaled": a * 2}


def _inputs(batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 16, 16),)


def test_export_uses_dynamo_and_validates(tmp_path) -> None:
    model = TinyNet().eval()
    report = konnx.export_onnx(model, _inputs(), tmp_path / "tiny.onnx")
    assert report.exporter == "dynamo" and report.fallback_reason is None
    assert report.inputs == ["image"] and report.outputs == ["output"]
    assert report.opset >= 18 and report.size_bytes > 0
    summary = konnx.check_onnx(report.path)
    assert summary.inputs[0][1] == [2, 3, 16, 16]
    result = konnx.validate_onnx(report.path, model, _inputs())
    assert result.passed and result.max_abs_diff < 1e-4
    assert result.atol == konnx.DEFAULT_ATOL and "|onnx - torch|" in result.tolerance


def test_dynamic_batch_runs_other_batch_sizes(tmp_path) -> None:
    model = TinyNet().eval()
    report = konnx.export_onnx(model, _inputs(2), tmp_path / "dyn.onnx", dynamic_batch=True)
    (name, shape, dtype) = konnx.check_onnx(report.path).inputs[0]
    assert isinstance(shape[0], str) and shape[1:] == [3, 16, 16] and dtype == "float"
    for batch in (1, 5):
        assert konnx.validate_onnx(report.path, model, _inputs(batch)).passed


def test_opset_and_named_multi_outputs(tmp_path) -> None:
    model = TwoInTwoOut()
    args = (torch.randn(3, 4), torch.randn(3, 4))
    report = konnx.export_onnx(model, args, tmp_path / "two.onnx", opset=18)
    assert report.opset == 18
    assert report.inputs == ["a", "b"] and report.outputs == ["total", "scaled"]
    result = konnx.validate_onnx(report.path, model, args)
    assert result.passed and [o.name for o in result.outputs] == ["total", "scaled"]


def test_validation_fails_against_other_weights(tmp_path) -> None:
    report = konnx.export_onnx(TinyNet().eval(), _inputs(), tmp_path / "a.onnx")
    other = TinyNet().eval()
    result = konnx.validate_onnx(report.path, other, _inputs(), atol=1e-5, rtol=1e-5)
    assert not result.passed and result.max_abs_diff > 1e-3
    assert result.outputs[0].passed is False


def test_falls_back_to_torchscript_and_says_why(tmp_path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo says no")

    monkeypatch.setattr(konnx, "_export_dynamo", broken)
    model = TinyNet().eval()
    report = konnx.export_onnx(model, _inputs(), tmp_path / "ts.onnx", dynamic_batch=True)
    assert report.exporter == "torchscript"
    assert report.fallback_reason == "RuntimeError: dynamo says no"
    assert konnx.validate_onnx(report.path, model, _inputs(3)).passed


def test_check_names_a_broken_file(tmp_path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(konnx.OnnxError, match="onnx.checker rejects"):
        konnx.check_onnx(bad)
    with pytest.raises(konnx.OnnxError, match="no ONNX file"):
        konnx.check_onnx(tmp_path / "missing.onnx")


def _redundant_onnx(path):
    """x → Identity → Relu, plus a constant subgraph (2 + 3) added to it: slim removes 3 nodes."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    nodes = [
        h.make_node("Identity", ["x"], ["x1"]),
        h.make_node("Relu", ["x1"], ["r"]),
        h.make_node("Constant", [], ["c2"], value=h.make_tensor("c2", TP.FLOAT, [1], [2.0])),
        h.make_node("Constant", [], ["c3"], value=h.make_tensor("c3", TP.FLOAT, [1], [3.0])),
        h.make_node("Add", ["c2", "c3"], ["c5"]),
        h.make_node("Add", ["r", "c5"], ["y"]),
    ]
    graph = h.make_graph(
        nodes,
        "redundant",
        [h.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
        [h.make_tensor_value_info("y", TP.FLOAT, [2, 3])],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def test_simplify_reports_op_histograms(tmp_path) -> None:
    pytest.importorskip("onnxslim")
    before, after = konnx.simplify_onnx(_redundant_onnx(tmp_path / "r.onnx"), tmp_path / "s.onnx")
    assert before == {"Constant": 2, "Add": 2, "Identity": 1, "Relu": 1}
    assert after == {"Relu": 1, "Add": 1}
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3).numpy()
    (y,) = session.run(None, {"x": x})
    assert abs(y - (x.clip(0) + 5)).max() < 1e-6


def test_export_with_simplify_keeps_a_valid_model(tmp_path) -> None:
    pytest.importorskip("onnxslim")
    model = TinyNet().eval()
    report = konnx.export_onnx(model, _inputs(), tmp_path / "s.onnx", simplify=True)
    assert report.ops_before and report.ops_after
    assert sum(report.ops_after.values()) <= sum(report.ops_before.values())
    assert konnx.validate_onnx(report.path, model, _inputs()).passed


def test_cli_export_onnx(tmp_path) -> None:
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from kiln.cli import app

    factory = tmp_path / "net.py"
    factory.write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())\n"
    )
    out = tmp_path / "m.onnx"
    args = ["export-onnx", f"{factory}:make", "-o", str(out), "--input-shape", "3,8,8"]
    result = CliRunner().invoke(app, [*args, "--dynamic-batch", "--simplify", "--opset", "18"])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    for text in ("dynamo", "onnx.checker", "ops before / after onnxslim", "PASS"):
        assert text in result.output, result.output
    failing = CliRunner().invoke(app, [*args, "--atol", "0", "--rtol", "0"])
    assert failing.exit_code in (0, 1)  # bit-exact or not: both are reported, never a crash
    assert "max abs difference" in failing.output
