"""The accuracy guard: metrics, targets, sensitivity ranking and the greedy keep-in-fp choice."""

import pytest
import torch
from torch import nn

from kiln.capture.export import capture
from kiln.quant.calibrate import calibrate
from kiln.quant.guard import Target, accuracy_guard, compare_outputs, parse_targets
from kiln.quant.sites import find_sites

CPU = torch.device("cpu")


class Outlier(nn.Module):
    """fc2 reads one feature 1000× larger than the rest (its weight for it is tiny, so it
    matters no more than the others): one per-tensor int8 scale for that input loses every
    other feature. fc2 is the layer to keep in high precision."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)
        gain = torch.ones(32)
        gain[0] = 1000.0
        self.register_buffer("gain", gain)
        with torch.no_grad():
            self.fc2.weight[:, 0] /= 1000.0

    def forward(self, x):
        h = self.fc1(x) * self.gain
        return self.fc3(self.fc2(h).relu())


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Outlier().eval()
    graph = capture(model, (torch.randn(8, 16),), device=CPU)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(8, 16, generator=gen),) for _ in range(4)]
    held = [(torch.randn(8, 16, generator=gen),) for _ in range(4)]
    table = calibrate(graph, calib, "max", "int8")
    return graph, table, held


def _site(graph, module):
    return next(s for s in find_sites(graph) if s.module == module)


@pytest.mark.parametrize("mode", ["one_at_a_time", "all_but_one"])
def test_guard_keeps_the_sensitive_layer(setup, mode):
    graph, table, held = setup
    qgraph, report = accuracy_guard(graph, table, held, "cosine>=0.999", mode=mode)
    assert not parse_targets(report.targets)[0].holds(report.quantized_all), "all-int8 must fail for this test"
    assert report.met
    assert [k.module for k in report.kept] == ["fc2"]
    assert report.sensitivities[0].module == "fc2"
    assert "sensitivity rank 1" in report.kept[0].reason and "cosine" in report.kept[0].reason
    assert report.final["cosine"] >= 0.999
    fc2 = next(n for n in qgraph.module.graph.nodes if n.name == _site(graph, "fc2").name)
    assert all(a.target != torch.ops.kiln.dequantize_per_tensor.default for a in fc2.all_input_nodes)
    # the returned graph is what the report measured
    refs = [graph.run(*s) for s in held]
    assert compare_outputs([qgraph.run(*s) for s in held], refs)["cosine"] == pytest.approx(report.final["cosine"])
    assert "met" in report.summary() and "fc2" in report.summary()


def test_a_met_target_keeps_nothing(setup):
    graph, table, held = setup
    _, report = accuracy_guard(graph, table, held, "cosine>=0.5")
    assert report.met and not report.kept and report.evaluations == 1 and not report.sensitivities


def test_max_kept_bounds_the_search(setup):
    graph, table, held = setup
    _, report = accuracy_guard(graph, table, held, "cosine>=0.999999999", max_kept=1)
    assert not report.met and len(report.kept) == 1
    assert "NOT met" in report.summary()
    assert report.to_dict()["kept"][0]["module"] == "fc2"


def test_guard_needs_held_back_samples(setup):
    graph, table, _ = setup
    with pytest.raises(ValueError, match="held-back samples"):
        accuracy_guard(graph, table, [], "cosine>=0.99")
    with pytest.raises(ValueError, match="mode must be"):
        accuracy_guard(graph, table, [(torch.randn(8, 16),)], mode="random")


def test_parse_targets():
    assert parse_targets("cosine>=0.999") == [Target("cosine", ">=", 0.999)]
    assert parse_targets(" top1 >= 0.99 , max_abs<=5e-2") == [Target("top1", ">=", 0.99), Target("max_abs", "<=", 0.05)]
    assert str(Target("cosine", ">=", 0.999)) == "cosine>=0.999"
    with pytest.raises(ValueError, match="unknown accuracy metric 'psnr'"):
        parse_targets("psnr>=30")
    with pytest.raises(ValueError, match="write METRIC>=VALUE"):
        parse_targets("cosine is high")
    with pytest.raises(ValueError, match="empty accuracy target"):
        parse_targets(" , ")


def test_compare_outputs_metrics():
    ref = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    same = compare_outputs([ref], [ref])
    assert same == {"cosine": 1.0, "min_cosine": 1.0, "top1": 1.0, "max_abs": 0.0, "rel_error": 0.0}
    flipped = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    m = compare_outputs([(flipped,)], [(ref,)])
    assert m["top1"] == 0.5
    assert m["min_cosine"] == pytest.approx(10 / 14)
    assert m["cosine"] == pytest.approx((1 + 10 / 14) / 2)
    assert m["max_abs"] == 2.0
    assert m["rel_error"] == pytest.approx((8 / 28) ** 0.5)
    assert Target("cosine", ">=", 0.9).damage(m) == pytest.approx(1 - m["cosine"])
    assert Target("max_abs", "<=", 1.0).damage(m) == 2.0
