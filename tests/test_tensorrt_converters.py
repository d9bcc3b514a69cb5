"""TensorRT converters: each builds a tiny network, checks shapes/dtypes, and builds an engine.

TensorRT-RTX's builder runs without a GPU, so every case here also serializes an engine on
the CPU. Executing engines (numerics against PyTorch) needs a GPU that the installed TensorRT
runs on: those tests are marked ``gpu`` and skip otherwise.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.tensorrt import api

if not api.available():
    pytest.skip(
        "needs TensorRT or TensorRT-RTX (pip install 'kiln[tensorrt-rtx]')",
        allow_module_level=True,
    )

import kiln.tensorrt as kt  # noqa: E402
from kiln.capture.export import capture  # noqa: E402
from kiln.tensorrt.convert.context import trt_dtype  # noqa: E402
from kiln.tensorrt.runtime.engine import torch_dtypes  # noqa: E402

aten = torch.ops.aten
CPU = torch.device("cpu")


class Fn(nn.Module):
    def __init__(self, fn: Callable[..., object]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> object:
        return self.fn(*args)


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    ops: list[object] = field(default_factory=list)  # core-ATen ops the case must exercise


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def ids(*shape: int, high: int = 10) -> torch.Tensor:
    return torch.randint(0, high, shape)


def _cases() -> list[Case]:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return [
        Case("conv2d", nn.Conv2d(3, 8, 3, stride=2, padding=1), (r(2, 3, 16, 16),), [aten.convolution.default]),
        Case(
            "conv2d_groups_dilation", nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, bias=False), (r(1, 4, 9, 9),)
        ),
        Case("conv1d", nn.Conv1d(3, 5, 3, padding=1), (r(2, 3, 10),)),
        Case("conv3d", nn.Conv3d(2, 4, 3), (r(1, 2, 5, 6, 7),)),
        Case("conv_transpose2d", nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (r(1, 4, 5, 5),)),
        Case("batch_norm", bn, (r(2, 4, 5, 5),), [aten._native_batch_norm_legit_no_training.default, operator.getitem]),
        Case("relu", Fn(F.relu), (r(2, 3),), [aten.relu.default]),
        Case("relu6", Fn(F.relu6), (r(2, 3),), [aten.hardtanh.default]),
        Case(
            "sigmoid_tanh",
            Fn(lambda x: torch.sigmoid(x) + torch.tanh(x)),
            (r(4, 5),),
            [aten.sigmoid.default, aten.tanh.default],
        ),
        Case("gelu", Fn(F.gelu), (r(3, 7),), [aten.gelu.default]),
        Case("gelu_tanh", Fn(lambda x: F.gelu(x, approximate="tanh")), (r(3, 7),)),
        Case("silu_hardswish", Fn(lambda x: F.silu(x) * F.hardswish(x) + F.hardsigmoid(x)), (r(3, 7),)),
        Case("leaky_elu_softplus", Fn(lambda x: F.leaky_relu(x, 0.2) + F.elu(x) + F.softplus(x)), (r(3, 7),)),
        Case("clamp", Fn(lambda x: x.clamp(-0.5, 0.7) + x.clamp(min=0.1)), (r(3, 7),)),
        Case(
            "arith",
            Fn(lambda a, b: (a + 2 * b - 1.5) * a / (b.abs() + 1) - a.sub(b, alpha=2)),
            (r(2, 3, 4), r(3, 4)),
            [aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor],
        ),
        Case("int_arith", Fn(lambda a: (a * 3 + 1) // 2), (ids(2, 5),)),
        Case("pow", Fn(lambda x: x**2 + x.abs() ** 1.5 + x.abs().sqrt()), (r(4, 4),)),
        Case("max_min", Fn(lambda a, b: torch.maximum(a, b) - torch.minimum(a, b)), (r(3, 4), r(1, 4))),
        Case(
            "compare_where",
            Fn(lambda a, b: torch.where((a > b) | (a <= 0.1), a, b * 2)),
            (r(3, 4), r(3, 4)),
            [aten.where.self, aten.gt.Tensor, aten.le.Scalar],
        ),
        Case(
            "logical",
            Fn(lambda a, b: ((a > 0) & torch.logical_not(b < 0)).logical_xor(a != b).float()),
            (r(3, 4), r(3, 4)),
            [aten.logical_not.default, aten.bitwise_and.Tensor],
        ),
        Case(
            "unary",
            Fn(
                lambda x: (
                    x.exp() + x.abs().add(1).log().neg() + torch.erf(x) + x.abs().add(1).rsqrt() + x.floor() + x.ceil()
                )
            ),
            (r(3, 5),),
        ),
        Case(
            "reduce",
            Fn(lambda x: x.mean(-1) + x.sum(1) + x.amax(1) - x.amin(-1)),
            (r(2, 6, 6),),
            [aten.mean.dim, aten.sum.dim_IntList, aten.amax.default],
        ),
        Case("any_all", Fn(lambda x: (x > 0).any(-1, keepdim=True) & (x > -3).all(-1, keepdim=True)), (r(2, 5),)),
        Case(
            "softmax",
            Fn(lambda x: F.softmax(x, -1) + F.log_softmax(x, 1)),
            (r(2, 4, 5),),
            [aten._softmax.default, aten._log_softmax.default],
        ),
        Case(
            "view_permute",
            Fn(lambda x: x.view(2, 12, 5).permute(2, 0, 1).reshape(5, -1)),
            (r(2, 3, 4, 5),),
            [aten.view.default, aten.permute.default],
        ),
        Case(
            "expand_squeeze",
            Fn(lambda x: x.unsqueeze(1).expand(2, 3, 4).unsqueeze(0).squeeze(0)),
            (r(2, 4),),
            [aten.expand.default],
        ),
        Case(
            "select_slice",
            Fn(lambda x: x[:, 1] + x[:, -1] + x[:, 1:5:2].sum(1) + x[..., 2:, :1].mean(-1)),
            (r(2, 6, 4),),
            [aten.select.int, aten.slice.Tensor],
        ),
        Case(
            "cat_split",
            Fn(lambda a, b: torch.cat([a, b], 1).split([2, 5], 1)[1]),
            (r(2, 3, 4), r(2, 4, 4)),
            [aten.cat.default],
        ),
        Case(
            "as_strided",
            Fn(
                lambda x: (
                    x.mean((2, 3), keepdim=True).as_strided((2, 6, 1, 1), (6, 1, 6, 6)).flatten(1)
                    + x.as_strided((2, 6), (1, 2), 3)
                )
            ),
            (r(2, 6, 3, 3),),
            [aten.as_strided.default],
        ),
        Case("pad", Fn(lambda x: F.pad(x, (1, 2, 0, 3), value=0.5)), (r(1, 2, 3, 4),), [aten.constant_pad_nd.default]),
        Case("max_pool", nn.MaxPool2d(3, 2, padding=1), (r(1, 3, 9, 9),), [aten.max_pool2d_with_indices.default]),
        Case("max_pool_ceil", nn.MaxPool2d(2, 2, ceil_mode=True), (r(1, 3, 9, 9),)),
        Case(
            "avg_pool",
            nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
            (r(1, 3, 9, 9),),
            [aten.avg_pool2d.default],
        ),
        Case("adaptive_avg_pool", nn.AdaptiveAvgPool2d((2, 3)), (r(1, 3, 8, 9),), [aten._adaptive_avg_pool2d.default]),
        Case(
            "adaptive_avg_pool_uneven",
            Fn(lambda x: F.adaptive_avg_pool2d(x, (3, 6)) + F.adaptive_avg_pool2d(x[:, :, :1, :1], (3, 6))),
            (r(1, 3, 7, 5),),
        ),
        Case(
            "adaptive_avg_pool3d",
            nn.AdaptiveAvgPool3d((1, 2, 3)),
            (r(1, 2, 4, 5, 6),),
            [aten._adaptive_avg_pool3d.default],
        ),
        Case(
            "cumsum",
            Fn(lambda x, i: x.cumsum(1) + (i > 4).cumsum(-1) + i.cumsum(0)),
            (r(2, 5), ids(2, 5)),
            [aten.cumsum.default],
        ),
        Case(
            "upsample",
            Fn(
                lambda x: (
                    F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=False),
                    F.interpolate(x, scale_factor=2.5, mode="bilinear"),
                    F.interpolate(x, size=(1, 7), mode="bilinear", align_corners=True),
                    F.interpolate(x, scale_factor=2, mode="nearest"),
                    F.interpolate(x, size=(6, 7), mode="nearest"),
                )
            ),
            (r(1, 2, 4, 5),),
            [aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.vec],
        ),
        Case("group_norm", nn.GroupNorm(2, 6).eval(), (r(2, 6, 3, 4),), [aten.native_group_norm.default]),
        Case("group_norm_1d", Fn(lambda x: F.group_norm(x, 3)), (r(2, 6, 5),)),
        Case(
            "argmax",
            Fn(
                lambda x, i: (
                    x.argmax(-1),
                    x.argmin(1, keepdim=True),
                    x.argmax(),
                    (i == 2).int().argmax(-1),
                )
            ),
            (r(2, 5, 4), ids(3, 6, high=3)),
            [aten.argmax.default, aten.argmin.default],
        ),
        Case("linear", nn.Linear(6, 3), (r(4, 6),), [aten.addmm.default]),
        Case("linear_3d", nn.Linear(6, 3, bias=False), (r(2, 4, 6),)),
        Case("bmm", Fn(lambda a, b: torch.bmm(a, b) + a @ b), (r(2, 3, 4), r(2, 4, 5)), [aten.bmm.default]),
        Case(
            "sdpa",
            Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
            (r(2, 3, 5, 8), r(2, 3, 7, 8), r(2, 3, 7, 4)),
            [aten.scaled_dot_product_attention.default],
        ),
        Case(
            "sdpa_masks",
            Fn(
                lambda q, k, v, m: (
                    F.scaled_dot_product_attention(q, k, v, attn_mask=m)
                    + F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
                    + F.scaled_dot_product_attention(q, k, v, attn_mask=m.float())
                )
            ),
            (r(1, 2, 6, 8), r(1, 2, 6, 8), r(1, 2, 6, 8), torch.rand(1, 1, 6, 6) > 0.3),
        ),
        Case("layer_norm", nn.LayerNorm(8), (r(2, 5, 8),), [aten.native_layer_norm.default]),
        Case("embedding", nn.Embedding(10, 4), (ids(2, 5),), [aten.embedding.default]),
        Case("gather", Fn(lambda x, i: torch.gather(x, 1, i)), (r(3, 5), ids(3, 2, high=5)), [aten.gather.default]),
        Case("index", Fn(lambda x, i: x[i] + x[:, i].sum(1)), (r(5, 5), ids(2, high=5)), [aten.index.Tensor]),
        Case("index_2d", Fn(lambda x, i, j: x[i, j]), (r(5, 6), ids(3, high=5), ids(3, high=5)), [aten.index.Tensor]),
        Case(
            "full_like_cast",
            Fn(lambda x: torch.full_like(x, 3.0) + x.to(torch.int32).float()),
            (r(3, 4),),
            [aten.full_like.default, aten._to_copy.default],
        ),
        Case("constants", Fn(lambda x: x + torch.arange(4.0) * 2), (r(3, 4),)),
        Case("multi_output", Fn(lambda x: (x.relu(), x.sigmoid(), x)), (r(2, 3),)),
        *_kiln_op_cases(),
    ]


def _kiln_op_cases() -> list[Case]:
    """kiln's fused ops (what the build passes produce)."""
    try:
        import kiln.ops.fused  # noqa: F401 - registers torch.ops.kiln.*
    except ImportError:
        return []
    kiln = torch.ops.kiln
    w, b = r(8, 3, 3, 3), r(8)
    conv = Fn(lambda x, res: kiln.conv_bias_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, "hardswish", res))
    wt = r(6, 4)
    linear = Fn(lambda x: kiln.linear_act(x, wt, b[:4], "gelu_tanh"))
    ln_w, ln_b = r(6), r(6)
    add_ln = Fn(lambda x, res: kiln.add_layer_norm(x, res, ln_w, ln_b, 1e-5))
    return [
        Case("kiln_conv_bias_act", conv, (r(1, 3, 6, 6), r(1, 8, 6, 6)), [kiln.conv_bias_act.default]),
        Case("kiln_linear_act", linear, (r(5, 6),), [kiln.linear_act.default]),
        Case("kiln_add_layer_norm", add_ln, (r(2, 3, 6), r(2, 3, 6)), [kiln.add_layer_norm.default]),
        *_pointwise_cases(),
    ]


def _pointwise_cases() -> list[Case]:
    """kiln::pointwise programs (what the pointwise fusion pass produces), every op kind."""
    try:
        import kiln.ops.pointwise  # noqa: F401 - registers torch.ops.kiln.pointwise
    except ImportError:
        return []
    floats = json.dumps({"kiln_pointwise": 1, "inputs": 2, "body": [
        ["mul", 0, {"const": 2.0}], ["sigmoid", 1], ["add", 2, 3], ["silu", 4],
        ["clamp", 5, {"const": -1.0}, {"const": 1.5}], ["hardswish", 6], ["abs", 0], ["add", 8, {"const": 1.0}],
        ["rsqrt", 9], ["mul", 7, 10], ["gelu_tanh", 11], ["maximum", 12, {"const": -0.05}], ["tanh", 13],
    ]})  # fmt: skip
    logic = json.dumps({"kiln_pointwise": 1, "inputs": 2, "body": [
        ["gt", 0, {"const": 0.0}], ["eq", 1, {"const": 2}], ["or", 2, 3], ["not", 4],
        ["cast", 1, {"dtype": "float32"}], ["where", 5, 6, {"const": -1.0}], ["le", 0, 7], ["and", 8, 5],
        ["where", 9, 0, 7], ["div", 1, {"const": 2}], ["add", 10, 11], ["exp", 12], ["log", 13], ["erf", 14],
    ]})  # fmt: skip
    rows = json.dumps({"kiln_rowwise": 1, "inputs": 2, "body": [
        ["mul", 0, 0], ["row_mean", 2], ["add", 3, {"const": 1e-6}], ["rsqrt", 4], ["mul", 0, 5], ["mul", 6, 1],
        ["row_max", 7], ["sub", 7, 8], ["exp", 9], ["row_sum", 10], ["div", 10, 11], ["row_min", 12], ["add", 12, 13],
    ]})  # fmt: skip
    pointwise, rowwise = torch.ops.kiln.pointwise, torch.ops.kiln.rowwise
    return [
        Case(
            "kiln_pointwise_floats",
            Fn(lambda x, g: pointwise([x, g], floats)),
            (r(2, 3, 4), r(2, 3, 1)),
            [pointwise.default],
        ),
        Case("kiln_pointwise_logic", Fn(lambda x, i: pointwise([x, i], logic)), (r(3, 4), ids(3, 4, high=4))),
        Case(
            "kiln_rowwise_norm_softmax",
            Fn(lambda x, w: rowwise([x, w], rows)),
            (r(2, 3, 8), r(8)),
            [rowwise.default],
        ),
    ]


CASES = _cases()


def _graph(case: Case) -> torch.fx.GraphModule:
    return capture(case.model, case.inputs, device=CPU).module


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_converter_builds_engine(case: Case) -> None:
    gm = _graph(case)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    missing = [op for op in case.ops if op not in targets]
    assert not missing, f"{case.name} no longer exercises {missing}; targets: {targets}"
    reasons = kt.supported_nodes(gm)
    assert {n.name: r for n, r in reasons.items() if r} == {}
    net = kt.build_network(gm)
    with torch.no_grad():
        expected = [t for t in torch.utils._pytree.tree_leaves(case.model(*case.inputs))]
    assert len(net.outputs) == len(expected)
    outputs = {net.network.get_output(i).name: net.network.get_output(i) for i in range(net.network.num_outputs)}
    for name, want in zip(net.outputs, expected, strict=True):
        got = outputs[name]
        assert tuple(got.shape) == tuple(want.shape), name
        assert got.dtype == trt_dtype(want.dtype), name
    built = kt.build_engine(net)
    assert len(built.serialized) > 0


def test_zoo_core_aten_ops_have_converters() -> None:
    # Counted with torch.export + run_decompositions on resnet18/50, alexnet, vgg11,
    # squeezenet1_1, densenet121, mobilenet_v2, efficientnet_b0 (timm), vit_b_16, BERT, plus
    # kiln's fused ops (kiln.ops.fused) that the build passes put in their place.
    zoo_ops = [
        aten._adaptive_avg_pool2d.default,
        aten._native_batch_norm_legit_no_training.default,
        aten._softmax.default,
        aten._to_copy.default,
        aten.add.Tensor,
        aten.addmm.default,
        aten.any.dim,
        aten.baddbmm.default,  # horizontal fusion of equal-width linears with biases
        aten.arange.start_step,
        aten.avg_pool2d.default,
        aten.bitwise_and.Tensor,
        aten.bmm.default,
        aten.cat.default,
        aten.clone.default,
        aten.convolution.default,
        aten.embedding.default,
        aten.eq.Scalar,
        aten.expand.default,
        aten.full_like.default,
        aten.gather.default,
        aten.ge.Scalar,
        aten.gelu.default,
        aten.hardtanh.default,
        aten.index.Tensor,
        aten.logical_not.default,
        aten.max_pool2d_with_indices.default,
        aten.mean.dim,
        aten.mul.Scalar,
        aten.mul.Tensor,
        aten.native_layer_norm.default,
        aten.permute.default,
        aten.relu.default,
        aten.scaled_dot_product_attention.default,  # kept whole by kiln.capture.export
        aten.select.int,
        aten.sigmoid.default,
        aten.slice.Tensor,
        aten.squeeze.dims,
        aten.tanh.default,
        aten.unsqueeze.default,
        aten.view.default,
        aten.where.self,
        operator.getitem,
        "kiln::conv_bias_act",
        "kiln::linear_act",
        "kiln::add_layer_norm",
        "kiln::pointwise",
        "kiln::rowwise",  # fuse_rowwise: norms and softmax with their elementwise neighbours
    ]
    # full, scalar_tensor and static arange take no tensors: they are folded into constants.
    assert [op for op in zoo_ops if kt.lookup(op) is None] == []


@pytest.mark.slow
def test_resnet18_converts_fully_and_builds() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    gm = capture(model, (torch.randn(1, 3, 224, 224),), device=CPU).module
    reasons = kt.supported_nodes(gm)
    assert [n for n, r in reasons.items() if r] == []
    (region,) = kt.partition(gm, supported=reasons)
    left_out = [n.name for n in reasons if n not in region]
    assert left_out == ["permute"]  # fc.weight.T: computed from weights, folded per region
    net = kt.build_network(gm)
    assert tuple(net.network.get_output(0).shape) == (1, 1000)
    built = kt.build_engine(net)
    assert len(built.serialized) > 40 << 20  # 11.7 M fp32 weights


def _traced(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.fx.GraphModule:
    """An FX graph of ATen calls as written (capture would decompose some of them), with shapes."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = torch.fx.symbolic_trace(fn)
    FakeTensorProp(gm).propagate(*inputs)
    return gm


def _baddbmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # kiln's horizontal fusion turns equal-width sibling linears with biases into one baddbmm
    return aten.add.Tensor(aten.baddbmm.default(c, a, b), aten.baddbmm.default(c, a, b, beta=0.5, alpha=2.0))


def test_baddbmm_from_horizontal_fusion_converts() -> None:
    gm = _traced(_baddbmm, r(3, 1, 5), r(3, 4, 6), r(3, 6, 5))
    assert {n.name: r for n, r in kt.supported_nodes(gm).items() if r} == {}
    net = kt.build_network(gm)
    assert tuple(net.network.get_output(0).shape) == (3, 4, 5)
    assert kt.build_engine(net).serialized


def test_precision_override_keeps_io_dtypes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    gm = capture(model, (torch.randn(1, 3, 8, 8),), device=CPU).module
    net = kt.build_network(gm, precision=torch.float16)
    trt = api.trt()
    assert net.network.get_input(0).dtype == trt.float32
    assert net.network.get_output(0).dtype == trt.float32
    layer_types = {net.network.get_layer(i).get_output(0).dtype for i in range(net.network.num_layers)}
    assert trt.float16 in layer_types
    assert kt.build_engine(net).serialized


# --- dynamic batch ----------------------------------------------------------------------


def _dynamic_graph(model: nn.Module, *inputs: torch.Tensor) -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = tuple({0: batch} for _ in inputs)
    return torch.export.export(model.eval(), inputs, dynamic_shapes=dynamic).run_decompositions().module()


def test_dynamic_batch_uses_an_optimization_profile() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    gm = _dynamic_graph(model, torch.randn(2, 3, 8, 8))
    net = kt.build_network(gm)
    assert tuple(net.network.get_input(0).shape) == (-1, 3, 8, 8)
    assert tuple(net.network.get_output(0).shape) == (-1, 2)
    with pytest.raises(kt.ConversionError, match="batch=\\(min, opt, max\\)"):
        kt.build_engine(net)
    assert kt.build_engine(net, batch=(1, 8, 32)).serialized


def test_dynamic_batch_symbolic_sizes_reach_views_and_arange() -> None:
    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = torch.arange(x.shape[0])[:, None, None]
            return (x + rows).view(x.shape[0], -1)

    model = Model()
    gm = _dynamic_graph(model, torch.randn(4, 3, 5))
    assert {n: r for n, r in kt.supported_nodes(gm).items() if r} == {}
    net = kt.build_network(gm)
    assert tuple(net.network.get_output(0).shape) == (-1, 15)
    assert kt.build_engine(net, batch=(1, 4, 16)).serialized


def test_dynamic_batch_full_cumsum_as_strided() -> None:
    class Model(nn.Module):  # as transformers builds position ids and masks from the batch size
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ones = torch.full((x.shape[0], x.shape[1]), 1.0)
            pooled = x[:, :, None, None].as_strided((x.shape[0], 6, 1, 1), (6, 1, 6, 6)).flatten(1)
            return (pooled + ones).cumsum(1) * torch.ones(x.shape[0], 1)

    gm = _dynamic_graph(Model(), torch.randn(4, 6))
    targets = {n.target for n in gm.graph.nodes}
    assert {aten.full.default, aten.cumsum.default, aten.as_strided.default} <= targets, targets
    assert {n: r for n, r in kt.supported_nodes(gm).items() if r} == {}
    net = kt.build_network(gm)
    assert tuple(net.network.get_output(0).shape) == (-1, 6)
    assert kt.build_engine(net, batch=(1, 4, 16)).serialized


def test_timing_cache_is_written_or_noted(tmp_path) -> None:
    gm = capture(nn.Linear(4, 4), (torch.randn(2, 4),), device=CPU).module
    cache = tmp_path / "timing.cache"
    built = kt.build_engine(kt.build_network(gm), timing_cache=str(cache))
    if api.flavor() == "tensorrt-rtx":
        assert any("TensorRT-RTX has none" in n for n in built.notes)
    else:
        assert cache.stat().st_size > 0
        again = kt.build_engine(kt.build_network(gm), timing_cache=str(cache))
        assert any("reused" in n for n in again.notes)


# --- registry, declining and partitioning -----------------------------------------------


class WithCumprod(nn.Module):
    """relu → cumprod (no converter) → relu, plus a branch around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x) * 2
        b = torch.cumprod(a, dim=-1)
        return torch.relu(b) + a.sigmoid()


def test_partition_leaves_unconverted_ops_to_kiln() -> None:
    gm = capture(WithCumprod(), (torch.randn(2, 8),), device=CPU).module
    reasons = kt.supported_nodes(gm)
    unsupported = {n.target: r for n, r in reasons.items() if r}
    assert unsupported == {aten.cumprod.default: "no TensorRT converter registered for aten.cumprod.default"}
    regions = kt.partition(gm, supported=reasons)
    names = [[n.name for n in region] for region in regions]
    assert len(regions) == 2, names
    cumprod = next(n for n in gm.graph.nodes if n.target is aten.cumprod.default)
    assert all(cumprod not in region for region in regions)
    _assert_acyclic(gm, regions)
    for region in regions:
        net = kt.build_network(gm, nodes=region)
        assert kt.build_engine(net).serialized
    first, second = (kt.build_network(gm, nodes=reg) for reg in regions)
    assert first.inputs == ["x"] and second.inputs[0] == "cumprod"


def _assert_acyclic(gm: torch.fx.GraphModule, regions: list[list[torch.fx.Node]]) -> None:
    """Contracting each region to one node must leave the graph acyclic."""
    owner = {n: i for i, region in enumerate(regions) for n in region}
    graph: dict[object, set[object]] = {}
    for node in gm.graph.nodes:
        src = owner.get(node, node)
        for user in node.users:
            dst = owner.get(user, user)
            if dst is not src:
                graph.setdefault(src, set()).add(dst)
    state: dict[object, int] = {}

    def visit(v: object) -> None:
        state[v] = 1
        for w in graph.get(v, ()):
            assert state.get(w) != 1, "partition created a cycle"
            if w not in state:
                visit(w)
        state[v] = 2

    for v in list(graph):
        if v not in state:
            visit(v)


def test_user_converter_overrides_and_declines() -> None:
    gm = capture(Fn(lambda x: torch.relu(x) + 1), (torch.randn(2, 3),), device=CPU).module
    calls = []

    @kt.converter(aten.relu.default)
    def relu_as_clip(ctx):  # noqa: ANN001, ANN202 - the documented user-facing form
        calls.append(ctx.node.name)
        layer = ctx.network.add_activation(ctx.args[0], ctx.trt.ActivationType.CLIP)
        layer.alpha, layer.beta = 0.0, 1e30
        return layer.get_output(0)

    @kt.converter(aten.add.Tensor)
    def no_add(ctx):  # noqa: ANN001, ANN202
        return NotImplemented

    try:
        assert kt.lookup(aten.relu.default) is relu_as_clip
        reasons = {n.target: r for n, r in kt.supported_nodes(gm).items()}
        assert calls and reasons[aten.relu.default] is None
        assert "declined" in reasons[aten.add.Tensor]

        @kt.converter("aten::relu")
        def relu_declines(ctx):  # noqa: ANN001, ANN202
            raise kt.Decline("not today")

        assert kt.lookup(aten.relu.default) is relu_declines  # latest registration wins
        reasons = {n.target: r for n, r in kt.supported_nodes(gm).items()}
        assert reasons[aten.relu.default] == "not today"
        kt.unregister(relu_declines)
    finally:
        kt.unregister(relu_as_clip)
        kt.unregister(no_add)
    assert kt.lookup(aten.relu.default).__module__ == "kiln.tensorrt.convert.elementwise"


def test_conversion_error_names_op_node_and_source_line() -> None:
    gm = capture(WithCumprod(), (torch.randn(2, 8),), device=CPU).module
    with pytest.raises(kt.ConversionError) as info:
        kt.build_network(gm)
    message = str(info.value)
    assert "aten.cumprod.default" in message and "node cumprod" in message
    assert "test_tensorrt_converters.py" in message and "torch.cumprod" in message
    assert "partition" in message


def test_converter_shape_bugs_are_caught() -> None:
    gm = capture(Fn(torch.relu), (torch.randn(2, 3),), device=CPU).module

    @kt.converter(aten.relu.default)
    def wrong(ctx):  # noqa: ANN001, ANN202
        return ctx.reshape(ctx.args[0], [3, 2])

    try:
        reasons = {n.target: r for n, r in kt.supported_nodes(gm).items()}
    finally:
        kt.unregister(wrong)
    assert "shape (3, 2), the graph says (2, 3)" in reasons[aten.relu.default]


# --- executing engines (GPU) ------------------------------------------------------------


def _runtime_or_skip() -> None:
    ok, reason = api.runtime_usable()
    if not ok:
        pytest.skip(reason)


def run_engine(serialized: bytes, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Execute a serialized engine on the current CUDA device (test helper)."""
    trt = api.trt()
    engine = trt.Runtime(api.logger()).deserialize_cuda_engine(serialized)
    assert engine is not None, "engine failed to deserialize"
    context = engine.create_execution_context()
    dtypes = torch_dtypes(trt)
    keep, outputs = [], {}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = inputs[name].cuda().contiguous()
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=dtypes[engine.get_tensor_dtype(name)], device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return outputs


def _compare(case_model: nn.Module, inputs: tuple[torch.Tensor, ...], gm, net, built) -> None:
    feeds = {n.name: t for n, t in zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs, strict=True)}
    got = run_engine(built.serialized, {k: feeds[k] for k in net.inputs})
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(case_model(*inputs))
    for name, ref in zip(net.outputs, want, strict=True):
        out = got[name].cpu()
        if ref.is_floating_point():
            torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3, msg=name)
        else:
            assert torch.equal(out, ref), name


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_converter_numerics_on_gpu(case: Case) -> None:
    _runtime_or_skip()
    gm = _graph(case)
    net = kt.build_network(gm)
    _compare(case.model, case.inputs, gm, net, kt.build_engine(net))


@pytest.mark.gpu
def test_resnet18_engine_matches_pytorch_on_gpu() -> None:
    _runtime_or_skip()
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 224, 224)
    gm = capture(model, (x,), device=CPU).module
    net = kt.build_network(gm)
    _compare(model, (x,), gm, net, kt.build_engine(net))


@pytest.mark.gpu
def test_baddbmm_numerics_on_gpu() -> None:
    _runtime_or_skip()
    inputs = (r(3, 1, 5), r(3, 4, 6), r(3, 6, 5))
    gm = _traced(_baddbmm, *inputs)
    net = kt.build_network(gm)
    _compare(Fn(_baddbmm), inputs, gm, net, kt.build_engine(net))


def test_a_converter_registered_before_the_built_ins_load_still_wins():
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from kiln.tensorrt.convert.registry import converter, lookup\n"
        "@converter(torch.ops.aten.relu.default)\n"
        "def mine(ctx): return None\n"
        "assert lookup(torch.ops.aten.relu.default) is mine, lookup(torch.ops.aten.relu.default)\n"
        "assert lookup(torch.ops.aten.sigmoid.default) is not None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
