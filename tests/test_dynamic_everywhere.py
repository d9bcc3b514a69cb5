"""Dynamic shapes everywhere else (issue 13, item 3; docs/dynamic-shapes.md "Where else the
dims go"): Engine.profile at the inputs' binding, `kiln bench ENGINE --batch` on a dynamic
engine beside static engines, ONNX export with dims, TensorRT optimization profiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln

torch.manual_seed(0)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(h.mean((2, 3)))


BATCH = kiln.Dim("batch", min=1, opt=4, max=16)


@pytest.fixture(scope="module")
def conv():
    model = ConvNet().eval()
    engine = kiln.build(model, (torch.randn(4, 3, 16, 16),), dynamic_shapes=({0: BATCH},),
                        config=kiln.BuildConfig(check_dims=False))
    return model, engine


# --- Engine.profile ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 16])
def test_profile_of_a_dynamic_engine_times_every_step_at_the_inputs_binding(conv, n):
    _, engine = conv
    rows = engine.profile(torch.randn(n, 3, 16, 16), iters=2)
    assert len(rows) == len(engine.step_specs) > 0
    assert all(r["ms"] >= 0 for r in rows)
    shapes = [tuple(r["shape"]) for r in rows if r["shape"]]
    assert shapes and all(isinstance(d, int) for s in shapes for d in s)  # concrete, not expressions
    assert all(s[0] == n for s in shapes if len(s) == 4)  # the conv activations at this batch
    assert engine(torch.randn(n, 3, 16, 16)).shape == (n, 10)  # the engine still runs after profiling


def test_profile_of_a_dynamic_engine_refuses_an_out_of_range_input(conv):
    _, engine = conv
    with pytest.raises(kiln.InputError, match="batch"):
        engine.profile(torch.randn(17, 3, 16, 16))
