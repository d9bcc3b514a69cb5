"""trt_check (TensorRT's ONNX parser, node by node), the TensorRT import shim, and `kiln trt-check`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.tensorrt import api

needs_trt = pytest.mark.skipif(
    not api.available(), reason="needs TensorRT or TensorRT-RTX (pip install 'kiln[tensorrt-rtx]')"
)


def _bad_onnx(path):
    """Relu → Det → Relu, a BitShift on a uint32 input, and a Compress: 3 ops TensorRT lacks."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as TP
    from onnx import helper as h

    nodes = [
        h.make_node("Relu", ["x"], ["a"], name="relu0"),
        h.make_node("Det", ["a"], ["d"], name="det0"),
        h.make_node("Relu", ["d"], ["e"], name="relu1"),
        h.make_node("BitShift", ["i", "i"], ["j"], name="shift0", direction="LEFT"),
        h.make_node("Compress", ["a", "c"], ["k"], name="comp0", axis=0),
    ]
    graph = h.make_graph(
        nodes,
        "bad",
        [
            h.make_tensor_value_info("x", TP.FLOAT, [3, 4, 4]),
            h.make_tensor_value_info("i", TP.UINT32, [4]),
            h.make_tensor_value_info("c", TP.BOOL, [3]),
        ],
        [
            h.make_tensor_value_info("e", TP.FLOAT, [3]),
            h.make_tensor_value_info("j", TP.UINT32, [4]),
            h.make_tensor_value_info("k", TP.FLOAT, ["n", 4, 4]),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _good_onnx(path):
    pytest.importorskip("onnxscript")
    from kiln.onnx.export import export_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    export_onnx(model.eval(), (torch.randn(1, 3, 8, 8),), path)
    return path


@needs_trt
def test_trt_check_lists_every_rejected_node_with_reason(tmp_path) -> None:
    from kiln.tensorrt import trt_check

    rejections = trt_check(_bad_onnx(tmp_path / "bad.onnx"))
    by_name = {r.node_name: r for r in rejections}
    assert set(by_name) == {"i", "det0", "shift0", "comp0"}
    assert by_name["det0"].op_type == "Det" and by_name["det0"].node_index == 1
    assert "no importer for ONNX op Det" in by_name["det0"].reason
    assert by_name["comp0"].op_type == "Compress"
    assert by_name["i"].op_type == "(graph input)" and "UINT32" in by_name["i"].reason


@needs_trt
def test_trt_check_accepts_an_exported_cnn(tmp_path) -> None:
    from kiln.tensorrt import trt_check

    assert trt_check(_good_onnx(tmp_path / "cnn.onnx")) == []


@needs_trt
def test_trt_check_missing_file_says_how_to_make_one(tmp_path) -> None:
    from kiln.tensorrt import trt_check

    with pytest.raises(KilnError, match="kiln export-onnx"):
        trt_check(tmp_path / "nope.onnx")


# --- the import shim ----------------------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setattr(api, "_load", lambda: (None, None, "import tensorrt: No module"))


def test_unavailable_message_says_what_to_install(no_tensorrt) -> None:
    assert not api.available() and api.flavor() is None
    with pytest.raises(api.TensorRTUnavailable) as info:
        api.trt()
    assert isinstance(info.value, KilnError)
    assert "pip install tensorrt" in str(info.value) and "tensorrt-rtx" in str(info.value)
    ok, reason = api.runtime_usable()
    assert not ok and "Neither TensorRT nor TensorRT-RTX" in reason


@needs_trt
def test_runtime_refuses_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = api.runtime_usable()
    assert not ok and "no CUDA GPU" in reason


@needs_trt
def test_tensorrt_rtx_refuses_hopper(monkeypatch) -> None:
    if api.flavor() != "tensorrt-rtx":
        pytest.skip("TensorRT-RTX specific")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100")
    ok, reason = api.runtime_usable()
    assert not ok
    assert "compute capability 9.0" in reason and "pip install tensorrt" in reason


# --- CLI ----------------------------------------------------------------------------------


def _cli():
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from kiln.cli import app

    return CliRunner(), app


@needs_trt
def test_cli_trt_check_exit_codes(tmp_path) -> None:
    runner, app = _cli()
    bad = runner.invoke(app, ["trt-check", str(_bad_onnx(tmp_path / "bad.onnx"))])
    assert bad.exit_code == 1, bad.output
    assert "det0" in bad.output and "Compress" in bad.output
    good = runner.invoke(app, ["trt-check", str(_good_onnx(tmp_path / "cnn.onnx"))])
    assert good.exit_code == 0, good.output
    assert "parses all" in good.output


@needs_trt
def test_cli_trt_check_exports_a_model_spec_first(tmp_path) -> None:
    pytest.importorskip("onnxscript")
    factory = tmp_path / "tiny.py"
    factory.write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU())\n"
    )
    runner, app = _cli()
    result = runner.invoke(app, ["trt-check", f"{factory}:make", "--input-shape", "8"])
    assert result.exit_code == 0, result.output
    assert "dynamo exporter" in result.output and "parses all" in result.output


def test_cli_trt_check_without_tensorrt(no_tensorrt, tmp_path) -> None:
    runner, app = _cli()
    result = runner.invoke(app, ["trt-check", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
