"""Each pass on a tiny graph: the graph changes as intended and outputs do not."""

import torch
from torch import nn

from kiln.capture import capture
from kiln.passes import PASSES, count_ops, run_passes


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x).relu()


def with_dead_code(graph):
    """Plant an unused op and an unused weight (export already drops the model's own)."""
    g = graph.module.graph
    x = next(n for n in g.nodes if n.op == "placeholder")
    with g.inserting_after(x):
        g.call_function(torch.ops.aten.sigmoid.default, (x,))
    graph.module.register_buffer("unused_weight", torch.zeros(3))
    with g.inserting_after(x):
        g.get_attr("unused_weight")
    graph.module.recompile()
    return graph


def _ops(graph):
    return [str(n.target) for n in graph.module.graph.nodes if n.op == "call_function"]


def test_dead_code_removes_unused_ops_and_weights():
    x = torch.randn(2, 4)
    before = with_dead_code(capture(Tiny().eval(), (x,), device=torch.device("cpu")))
    after, _ = run_passes(before, ["dead_code"])
    assert "aten.sigmoid.default" in _ops(before) and "aten.sigmoid.default" not in _ops(after)
    assert count_ops(after) == count_ops(before) - 1
    assert "unused_weight" not in dict(after.module.named_buffers())
    torch.testing.assert_close(after.run(x), before.run(x))


def test_run_passes_reports_op_counts_per_pass():
    x = torch.randn(2, 4)
    graph = with_dead_code(capture(Tiny().eval(), (x,), device=torch.device("cpu")))
    _, report = run_passes(graph)
    assert report[0]["pass"] == "capture" and [r["pass"] for r in report[1:]] == list(PASSES)
    assert report[-1]["ops"] < report[0]["ops"]


def test_unknown_pass_is_named():
    import pytest

    graph = capture(Tiny().eval(), (torch.randn(2, 4),), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown pass.*nope"):
        run_passes(graph, ["nope"])


def _capture(model, *inputs):
    return capture(model.eval(), inputs, device=torch.device("cpu"))


def test_constant_fold_computes_weight_only_ops_at_build():
    class ScaledLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return x @ (self.w.t() * 0.5)  # transpose and scale of a weight: both foldable

    x = torch.randn(3, 4 * 1 + 2)
    before = _capture(ScaledLinear(), x)
    after, _ = run_passes(before, ["constant_fold"])
    assert {"aten.permute.default", "aten.mul.Tensor"} & set(_ops(before))
    assert not {"aten.permute.default", "aten.mul.Tensor"} & set(_ops(after))
    torch.testing.assert_close(after.run(x), before.run(x))


def test_constant_fold_leaves_input_dependent_ops():
    x = torch.randn(2, 4)
    before = _capture(Tiny(), x)
    after, _ = run_passes(before, ["constant_fold"])
    assert "aten.addmm.default" in _ops(after) and "aten.relu.default" in _ops(after)


class ConvBN(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8)
        self.pre = nn.BatchNorm2d(3)  # not after a conv: becomes scale + shift

    def forward(self, x):
        return torch.relu(self.bn(self.conv(self.pre(x))))


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


import pytest  # noqa: E402


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_into_conv_and_affine(bias):
    x = torch.randn(2, 3, 8, 8)
    before = _capture(_randomize_bn(ConvBN(bias)), x)
    after, _ = run_passes(before, ["fold_batchnorm"])
    bn = "aten._native_batch_norm_legit_no_training.default"
    assert _ops(before).count(bn) == 2 and bn not in _ops(after)
    assert "aten.mul.Tensor" in _ops(after) and "aten.add.Tensor" in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_uses_fp32_masters_of_fp16_weights():
    model = _randomize_bn(ConvBN())
    graph = capture(model.eval(), (torch.randn(2, 3, 8, 8),), device=torch.device("cpu"), compute_dtype=torch.float16)
    assert graph.masters["conv_weight"].dtype == torch.float32
    after, _ = run_passes(graph, ["fold_batchnorm"])
    conv = next(n for n in after.module.graph.nodes if n.target == torch.ops.aten.convolution.default)
    folded = getattr(after.module, conv.args[1].target)
    scale = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    exact = (model.conv.weight * scale.reshape(-1, 1, 1, 1)).detach()
    assert folded.dtype == torch.float16
    torch.testing.assert_close(folded, exact.half(), atol=0, rtol=0)
