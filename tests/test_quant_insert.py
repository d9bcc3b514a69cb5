"""Q/DQ insertion and the calibration runner on captured graphs (simulated quantization on CPU)."""

import pytest
import torch
from torch import nn

from kiln.capture.export import capture
from kiln.ops.quant import FP8_E4M3, INT8
from kiln.quant.calibrate import calibrate
from kiln.quant.insert import insert_qdq, stored_axis
from kiln.quant.params import CalibrationTable
from kiln.quant.sites import find_sites

ops = torch.ops.kiln
CPU = torch.device("cpu")


class Net(nn.Module):
    """conv → bn → relu → pool → linear, then q/k/v projections sharing one input, and a
    matmul of two activations (attention scores)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 12)
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 6))  # used as x @ w: (in, out)

    def forward(self, x):
        y = self.bn(self.conv(x)).relu().mean((2, 3))
        y = self.fc(y).view(-1, 3, 4)
        q, k = self.q(y), self.k(y)
        scores = q @ k.transpose(1, 2)
        return scores, y @ self.w


def _graph(model=None, dtype=torch.float32, batch=2):
    model = (model or Net()).eval()
    return capture(model, (torch.randn(batch, 3, 8, 8),), device=CPU, compute_dtype=dtype)


def _batches(n, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=gen),) for _ in range(n)]


def _count(graph, target):
    return sum(1 for n in graph.module.graph.nodes if n.target == target)


def _cos(a, b):
    return float(nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_sites_find_weights_and_activations():
    graph = _graph()
    sites = {s.module: s for s in find_sites(graph)}
    assert set(sites) >= {"conv", "fc", "q", "k"}
    conv = sites["conv"]
    assert [w.constant.target for w in conv.weights] == ["conv_weight"]
    assert list(conv.activations) == [0]
    # q's and k's linears read the same tensor; the score matmul reads two activations
    assert sites["q"].activations[1 if sites["q"].op == "aten.addmm" else 0] is not None
    two_acts = [s for s in find_sites(graph) if len(s.activations) == 2]
    assert len(two_acts) == 1 and not two_acts[0].weights


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_graph_runs_close_to_fp32(fmt):
    graph = _graph()
    table = calibrate(graph, _batches(4), "max", fmt)
    qgraph = insert_qdq(graph, table)
    sites = find_sites(graph)
    n_acts = len({p for s in sites for p in s.activations.values()})
    assert _count(qgraph, ops.quantize_per_tensor.default) == n_acts
    assert _count(qgraph, ops.dequantize_per_channel.default) == sum(len(s.weights) for s in sites)
    x = torch.randn(2, 3, 8, 8)
    for ref, out in zip(graph.run(x), qgraph.run(x)):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert not torch.equal(out, ref), "quantization changed nothing: the test could not fail"
        assert _cos(out, ref) > (0.999 if fmt == "int8" else 0.995)
    stored = {n: b.dtype for n, b in qgraph.module.named_buffers()}
    assert stored["conv_weight_q"] == (INT8 if fmt == "int8" else FP8_E4M3).dtype
    assert "conv_weight" not in stored, "the float weight is replaced, not kept beside its quantized copy"


def test_simulated_linear_matches_hand_written_fake_quantization():
    lin = nn.Linear(16, 8).eval()
    graph = capture(lin, (torch.randn(4, 16),), device=CPU)
    x = torch.randn(4, 16)
    table = CalibrationTable(INT8, "max", {p.name: 3.0 for s in find_sites(graph) for p in s.activations.values()})
    out = insert_qdq(graph, table).run(x)
    sx = 3.0 / 127
    w_scales = lin.weight.detach().abs().amax(1) / 127
    wq = torch.clamp(torch.round(lin.weight.detach() / w_scales[:, None]), -128, 127) * w_scales[:, None]
    xq = torch.clamp(torch.round(x / sx), -128, 127) * sx
    torch.testing.assert_close(out, xq @ wq.t() + lin.bias.detach(), rtol=1e-6, atol=1e-6)


def test_weight_used_as_x_at_w_is_quantized_along_its_output_axis():
    graph = _graph()
    site = next(s for s in find_sites(graph) if any(w.constant.target == "w" for w in s.weights))
    w = next(w for w in site.weights if w.constant.target == "w")
    assert stored_axis((4, 6), w.chain, w.channel_dim) == 1
    linear = next(s for s in find_sites(graph) if s.module == "fc").weights[0]
    assert stored_axis((12, 8), linear.chain, linear.channel_dim) == 0


def test_excluding_every_site_leaves_the_graph_exact():
    graph = _graph()
    table = calibrate(graph, _batches(1), "max", "int8")
    plain = insert_qdq(graph, table, exclude=[s.name for s in find_sites(graph)])
    assert _count(plain, ops.quantize_per_tensor.default) == 0
    x = torch.randn(2, 3, 8, 8)
    for ref, out in zip(graph.run(x), plain.run(x)):
        assert torch.equal(ref, out)


def test_only_quantizes_the_named_site():
    graph = _graph()
    conv = next(s for s in find_sites(graph) if s.module == "conv")
    table = calibrate(graph, _batches(1), "max", "int8")
    one = insert_qdq(graph, table, only=[conv.name])
    assert _count(one, ops.quantize_per_tensor.default) == 1
    assert _count(one, ops.dequantize_per_channel.default) == 1
    dq = next(n for n in one.module.graph.nodes if n.target == ops.dequantize_per_tensor.default)
    assert dq.meta["quant"] == {"role": "activation", "site": conv.name}
    assert dq.meta["nn_module_stack"] == conv.node.meta["nn_module_stack"]


def test_shared_input_gets_one_quantizer():
    """q and k read the same tensor: one Q/DQ pair feeds both (one scale, as 8-bit kernels need)."""
    graph = _graph()
    sites = {s.module: s for s in find_sites(graph)}
    shared = set(sites["q"].activations.values()) & set(sites["k"].activations.values())
    assert len(shared) == 1
    table = calibrate(graph, _batches(1), "max", "int8")
    qgraph = insert_qdq(graph, table, only=[sites["q"].name, sites["k"].name])
    assert _count(qgraph, ops.quantize_per_tensor.default) == 1


def test_max_calibration_observes_the_inputs_of_quantized_ops():
    model = Net().eval()
    graph = _graph(model)
    batches = _batches(3)
    seen = []
    hook = model.conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].abs().max()))
    with torch.no_grad():
        for (x,) in batches:
            model(x)
    hook.remove()
    table = calibrate(graph, batches, "max", "int8")
    conv = next(s for s in find_sites(graph) if s.module == "conv")
    assert table.amax[conv.activations[0].name] == pytest.approx(float(max(seen)))
    assert table.batches == 3


def test_fp16_graph_quantizes_with_fp32_scales():
    graph = _graph(dtype=torch.float16)
    table = calibrate(graph, _batches(2), "entropy", "int8")
    qgraph = insert_qdq(graph, table)
    assert qgraph.module.get_buffer("conv_weight_scale").dtype == torch.float32
    x = torch.randn(2, 3, 8, 8)
    ref = graph.run(x)
    out = qgraph.run(x)
    assert _cos(out[0], ref[0]) > 0.99


def test_calibration_errors_name_the_problem():
    graph = _graph()
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(graph, [])
    with pytest.raises(ValueError, match=r"shape \(1, 3, 8, 8\); the graph was captured for \(2, 3, 8, 8\)"):
        calibrate(graph, [(torch.randn(1, 3, 8, 8),)])
    with pytest.raises(TypeError, match="a tensor or a tuple of tensors"):
        calibrate(graph, ["not a tensor"])
    table = CalibrationTable(INT8, "max", {})
    with pytest.raises(KeyError, match="no calibrated range for tensor"):
        insert_qdq(graph, table)


def test_calibration_table_round_trips_as_json():
    import json

    table = calibrate(_graph(), _batches(1), "percentile:99.9", "fp8")
    again = CalibrationTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again == table
    with pytest.raises(ValueError, match="not a calibration table"):
        CalibrationTable.from_dict({"format": "int8"})


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantizes_after_kiln_passes(fmt):
    """Fused ops (kiln::conv_bias_act, kiln::linear_act with its (in, out) weight) are sites too."""
    from kiln.passes import run_passes

    graph, _ = run_passes(_graph())
    sites = find_sites(graph)
    targets = {s.node.target for s in sites}
    assert ops.conv_bias_act.default in targets and ops.linear_act.default in targets
    linear = next(s for s in sites if s.node.target == ops.linear_act.default)
    assert stored_axis(tuple(linear.weights[0].constant.meta["val"].shape), [], -1) == 1
    table = calibrate(graph, _batches(2), "mse", fmt)
    qgraph = insert_qdq(graph, table)
    x = torch.randn(2, 3, 8, 8)
    for ref, out in zip(graph.run(x), qgraph.run(x)):
        assert not torch.equal(out, ref)
        assert _cos(out, ref) > (0.999 if fmt == "int8" else 0.995)
