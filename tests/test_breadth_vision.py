"""A few cheap models from the breadth campaign (benchmarks/breadth_vision.py): architectures
outside kiln's zoo, each built static and with a dynamic batch (1..4) and saved and loaded, against
eager fp32 (the campaign's tolerance: relative error 1e-4, or at most twice eager fp32's own
distance from float64 eager). The full campaign runs from the command line (its docstring)."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("timm")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "breadth_vision.py"
_spec = importlib.util.spec_from_file_location("breadth_vision", _PATH)
breadth = importlib.util.module_from_spec(_spec)
sys.modules["breadth_vision"] = breadth  # its dataclasses look their module up
_spec.loader.exec_module(breadth)

CHEAP = ["squeezenet1_1", "timm/mobilenetv4_conv_small"]


@pytest.mark.parametrize("name", CHEAP)
def test_breadth_model_builds_static_dynamic_and_round_trips(name):
    case = next(c for c in breadth.CASES if c.name == name)
    result = breadth.check(case, timeout=120)
    assert result.result == "ok", f"{result.stage}: {result.error}"
    assert {"static", "static file", "dynamic b1", "dynamic b3", "dynamic b4", "dynamic file"} <= set(result.errors)
