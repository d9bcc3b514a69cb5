"""TensorRT converters for kiln's quantize/dequantize ops (kiln.tensorrt.convert.quant).

Graphs come from kiln.quant (calibrate + insert_qdq on a captured model) or from tiny functions
calling the kiln:: Q/DQ ops. TensorRT-RTX's builder runs on the CPU, so each network is built
into a serialized engine here; executing it needs a GPU the installed TensorRT runs on (``gpu``).

Stored 8-bit weights reach the network as 8-bit constants behind a dequantize (the network
builder never folds Q/DQ ops), and float8_e4m3fn maps to trt.fp8 whatever the precision.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kiln.tensorrt import api

if not api.available():
    pytest.skip("needs TensorRT or TensorRT-RTX (pip install 'kiln[tensorrt-rtx]')", allow_module_level=True)

import kiln.tensorrt as kt  # noqa: E402
from kiln.capture.export import capture  # noqa: E402
from kiln.graph import CapturedGraph  # noqa: E402
from kiln.ops.quant import QUANTIZE_OPS  # noqa: E402
from kiln.quant.calibrate import calibrate  # noqa: E402
from kiln.quant.insert import insert_qdq  # noqa: E402
from kiln.tensorrt.partitioning.partition import find_regions  # noqa: E402

CPU = torch.device("cpu")
kiln_ops = torch.ops.kiln


class Fn(nn.Module):
    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn
        self.eval()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 16)).eval()


def _example() -> torch.Tensor:
    return torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(1))


def _quantized(fmt: str) -> tuple[CapturedGraph, CapturedGraph]:
    """The captured model, and the same graph with Q/DQ inserted (calibrated on 4 batches)."""
    graph = capture(_model(), (_example(),), device=CPU)
    gen = torch.Generator().manual_seed(2)
    table = calibrate(graph, [(torch.randn(2, 16, 6, 6, generator=gen),) for _ in range(4)], "max", fmt)
    return graph, insert_qdq(graph, table)


def _layers(net: kt.TRTNetwork, kind: str) -> list:
    """The network's Quantize / Dequantize layers, as their own classes (to read axis, to_type)."""
    trt = api.trt()
    layer_type = getattr(trt.LayerType, kind.upper())
    cls = trt.IQuantizeLayer if kind == "quantize" else trt.IDequantizeLayer
    out = []
    for i in range(net.network.num_layers):
        layer = net.network.get_layer(i)
        if layer.type == layer_type:
            layer.__class__ = cls
            out.append(layer)
    return out


def _count(gm: torch.fx.GraphModule, targets: tuple) -> int:
    return sum(1 for n in gm.graph.nodes if n.target in targets)


def _declined(gm: torch.fx.GraphModule) -> dict[str, str]:
    return {n.name: r for n, r in kt.supported_nodes(gm).items() if r}


# --- activations: Q → DQ per tensor ------------------------------------------------------


@pytest.mark.parametrize("precision", [None, torch.float16], ids=["fp32", "fp16"])
def test_int8_activations_become_quantize_dequantize_layers(precision: torch.dtype | None) -> None:
    _, qgraph = _quantized("int8")
    gm = qgraph.module
    assert _declined(gm) == {}
    net = kt.build_network(gm, precision=precision)
    trt = api.trt()
    float_type = trt.float16 if precision == torch.float16 else trt.float32
    quantize, dequantize = _layers(net, "quantize"), _layers(net, "dequantize")
    assert len(quantize) == _count(gm, QUANTIZE_OPS) == 2
    for layer in quantize:
        assert layer.get_output(0).dtype == trt.int8
        assert layer.get_input(0).dtype == float_type
        scale = layer.get_input(1)
        assert tuple(scale.shape) == () and scale.dtype == float_type  # per tensor: a 0-d constant
    activation_dq = [layer for layer in dequantize if tuple(layer.get_input(1).shape) == ()]
    assert len(activation_dq) == 2
    for layer in activation_dq:
        assert layer.get_input(0).dtype == trt.int8 and layer.get_output(0).dtype == float_type
    assert len(kt.build_engine(net).serialized) > 0


# --- per channel, along an axis ------------------------------------------------------------


def _per_channel_graph(axis: int, fmt: str = "int8") -> torch.fx.GraphModule:
    scales = torch.tensor([0.01, 0.02, 0.03, 0.04])

    def qdq(x: torch.Tensor) -> torch.Tensor:
        q = kiln_ops.quantize_per_channel(x, scales, axis, fmt)
        return kiln_ops.dequantize_per_channel(q, scales, axis, torch.float32) * 2

    return capture(Fn(qdq), (torch.randn(3, 4, 5),), device=CPU).module


@pytest.mark.parametrize("axis", [1, -2])
def test_per_channel_scales_set_the_layer_axis(axis: int) -> None:
    gm = _per_channel_graph(axis)
    assert _declined(gm) == {}
    net = kt.build_network(gm)
    trt = api.trt()
    (q,), (dq,) = _layers(net, "quantize"), _layers(net, "dequantize")
    assert (q.axis, dq.axis) == (1, 1)
    assert q.get_output(0).dtype == trt.int8 and dq.get_output(0).dtype == trt.float32
    assert tuple(q.get_input(1).shape) == (4,) and tuple(dq.get_input(1).shape) == (4,)
    assert len(kt.build_engine(net).serialized) > 0


# --- what TensorRT's Q/DQ cannot express: declined, left to kiln ----------------------------


def _qdq_graph(scale: float = 0.05) -> torch.fx.GraphModule:
    def qdq(x: torch.Tensor) -> torch.Tensor:
        q = kiln_ops.quantize_per_tensor(x, scale, "int8")
        return kiln_ops.dequantize_per_tensor(q, scale, torch.float32).relu()

    return capture(Fn(qdq), (torch.randn(2, 8),), device=CPU).module


def _node(gm: torch.fx.GraphModule, target) -> torch.fx.Node:  # noqa: ANN001
    return next(n for n in gm.graph.nodes if n.target == target)


def _set_arg(gm: torch.fx.GraphModule, target, index: int, value) -> str:  # noqa: ANN001
    node = _node(gm, target)
    args = list(node.args)
    args[index] = value
    node.args = tuple(args)
    return node.name


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0.0, "scale 0.0: TensorRT's Q/DQ scales must be positive and finite"),
        (-0.1, "scale -0.1: TensorRT's Q/DQ scales must be positive and finite"),
        (math.nan, "scale nan: TensorRT's Q/DQ scales must be positive and finite"),
        (math.inf, "scale inf: TensorRT's Q/DQ scales must be positive and finite"),
    ],
)
def test_bad_scales_decline(value: float, reason: str) -> None:
    gm = _qdq_graph()
    name = _set_arg(gm, kiln_ops.quantize_per_tensor.default, 1, value)
    assert _declined(gm)[name] == reason


def test_unknown_format_declines() -> None:
    gm = _qdq_graph()
    name = _set_arg(gm, kiln_ops.quantize_per_tensor.default, 2, "int4")
    assert _declined(gm)[name].startswith("quantization format 'int4' is not one TensorRT's Q/DQ layers take")


def test_scales_computed_at_run_time_decline_and_stay_with_kiln() -> None:
    def qdq(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        q = kiln_ops.quantize_per_channel(x.relu(), scales, 1, "int8")
        return kiln_ops.dequantize_per_channel(q, scales, 1, torch.float32)

    gm = capture(Fn(qdq), (torch.randn(3, 4), torch.full((4,), 0.1)), device=CPU).module
    reasons = _declined(gm)
    q = _node(gm, kiln_ops.quantize_per_channel.default)
    dq = _node(gm, kiln_ops.dequantize_per_channel.default)
    constant = "the per-channel scales are not a build-time constant (TensorRT needs constant scales)"
    assert reasons[q.name] == constant
    assert reasons[dq.name] == constant
    regions = find_regions(gm)
    inside = {n for region in regions for n in region}
    assert q not in inside and dq not in inside


def test_dequantize_of_a_wider_integer_declines() -> None:
    def dq(q: torch.Tensor) -> torch.Tensor:
        return kiln_ops.dequantize_per_tensor(q, 0.1, torch.float32)

    gm = capture(Fn(dq), (torch.randint(-5, 5, (2, 3), dtype=torch.int32),), device=CPU).module
    node = _node(gm, kiln_ops.dequantize_per_tensor.default)
    assert _declined(gm)[node.name] == "dequantize of a DataType.INT32 tensor: TensorRT dequantizes int8 and fp8 only"


def test_per_channel_scale_count_must_match_the_axis() -> None:
    gm = _per_channel_graph(1)
    name = _set_arg(gm, kiln_ops.quantize_per_channel.default, 1, torch.full((3,), 0.1))
    assert _declined(gm)[name] == "3 per-channel scales for axis 1 of size 4"


# --- stored weights: int8 / fp8 constants → DQ → conv / matmul -------------------------------


def _weight_dequantizes(net: kt.TRTNetwork) -> list:
    trt = api.trt()
    return [
        layer
        for layer in _layers(net, "dequantize")
        if layer.get_input(0).dtype in (trt.int8, trt.fp8)
        and layer.get_output(0).dtype == trt.float32
        and tuple(layer.get_input(1).shape) != ()
    ]


def test_int8_weights_stay_int8_behind_a_dequantize() -> None:
    _, qgraph = _quantized("int8")
    net = kt.build_network(qgraph.module)
    assert len(_weight_dequantizes(net)) == 2


def test_fp8_activations_convert() -> None:
    _, qgraph = _quantized("fp8")
    assert _declined(qgraph.module) == {}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("precision", [None, torch.float16], ids=["fp32", "fp16"])
def test_explicit_quantization_pattern_builds(fmt: str, precision: torch.dtype | None) -> None:
    trt = api.trt()
    storage = trt.int8 if fmt == "int8" else trt.fp8
    float_type = trt.float16 if precision == torch.float16 else trt.float32
    _, qgraph = _quantized(fmt)
    gm = qgraph.module
    assert _declined(gm) == {}
    net = kt.build_network(gm, precision=precision)
    quantize, dequantize = _layers(net, "quantize"), _layers(net, "dequantize")
    assert [q.get_output(0).dtype for q in quantize] == [storage, storage]
    weight_dq = [d for d in dequantize if tuple(d.get_input(1).shape) != ()]
    # conv weight (32, 16, 3, 3) and linear weight (16, 1152): int8 / fp8 constants, scales along axis 0
    assert [tuple(d.get_input(0).shape) for d in weight_dq] == [(32, 16, 3, 3), (16, 1152)]
    assert [tuple(d.get_input(1).shape) for d in weight_dq] == [(32,), (16,)]
    for layer in weight_dq:
        assert layer.axis == 0
        assert layer.get_input(0).dtype == storage and layer.get_output(0).dtype == float_type
    assert len(dequantize) == 4
    assert len(kt.build_engine(net).serialized) > 0


def _fp8_weight_graph() -> tuple[torch.fx.GraphModule, torch.Tensor, torch.Tensor]:
    stored = torch.tensor([[1.0, -2.0, 0.0], [0.5, 448.0, -0.125]]).to(torch.float8_e4m3fn)
    scales = torch.tensor([0.5, 0.25])

    def dq(x: torch.Tensor) -> torch.Tensor:
        return x @ kiln_ops.dequantize_per_channel(stored, scales, 0, torch.float32)

    return capture(Fn(dq), (torch.randn(4, 2),), device=CPU).module, stored, scales


def test_fp8_weights_become_an_fp8_constant() -> None:
    """numpy has no float8: the constant is made from the stored bytes, typed trt.fp8 (the Python API
    cannot read fp8 weights back, so the values are checked on a GPU)."""
    gm, stored, _ = _fp8_weight_graph()
    net = kt.build_network(gm)
    trt = api.trt()
    (layer,) = _layers(net, "dequantize")
    constant = layer.get_input(0)
    assert constant.dtype == trt.fp8 and tuple(constant.shape) == (2, 3)
    assert layer.axis == 0 and tuple(layer.get_input(1).shape) == (2,)
    producer = next(
        net.network.get_layer(i)
        for i in range(net.network.num_layers)
        if net.network.get_layer(i).get_output(0).name == constant.name
    )
    producer.__class__ = trt.IConstantLayer
    assert producer.weights.dtype == trt.fp8 and producer.weights.nbytes == stored.numel()
    assert len(kt.build_engine(net).serialized) > 0


# --- executing (GPU) ------------------------------------------------------------------------


@pytest.mark.gpu
def test_int8_engine_matches_the_simulated_graph_on_gpu() -> None:
    ok, reason = api.runtime_usable()
    if not ok:
        pytest.skip(reason)
    from test_tensorrt_converters import run_engine

    _, qgraph = _quantized("int8")
    net = kt.build_network(qgraph.module)
    built = kt.build_engine(net)
    x = _example()
    (want,) = qgraph.run(x)
    got = run_engine(built.serialized, {net.inputs[0]: x})[net.outputs[0]].cpu()
    # int8 GEMMs accumulate exactly; rounding ties and fp32 ordering may move a value one step
    cos = torch.nn.functional.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0)
    assert float(cos) > 0.999
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@pytest.mark.gpu
def test_fp8_weight_values_on_gpu() -> None:
    ok, reason = api.runtime_usable()
    if not ok:
        pytest.skip(reason)
    from test_tensorrt_converters import run_engine

    gm, stored, scales = _fp8_weight_graph()
    net = kt.build_network(gm)
    x = torch.randn(4, 2)
    got = run_engine(kt.build_engine(net).serialized, {net.inputs[0]: x})[net.outputs[0]].cpu()
    torch.testing.assert_close(got, x @ (stored.float() * scales[:, None]), rtol=1e-3, atol=1e-3)
