"""Where a graph node came from: the model's own source line, skipping torch, kiln and the
standard library, but not installed model packages (torchvision, transformers), which on most
installs live inside the standard library's folder (lib/python3.X/site-packages)."""

import os

import torch
import torchvision

from kiln.capture.export import capture
from kiln.graph import _plumbing, source_line


def test_installed_model_packages_are_not_plumbing():
    assert _plumbing(torch.nn.modules.linear.__file__)
    assert _plumbing(os.__file__)
    assert not _plumbing(torchvision.models.resnet.__file__)
    assert not _plumbing(__file__)


def test_a_torchvision_models_line_is_its_own_not_torchs():
    model = torchvision.models.resnet18(num_classes=10).eval()
    graph = capture(model, (torch.randn(1, 3, 32, 32),), device=torch.device("cpu"))
    fc = [n for n in graph.module.graph.nodes if n.op == "call_function"][-1]
    line = source_line(fc)
    assert "torchvision/models/resnet.py" in line.replace(os.sep, "/"), line
