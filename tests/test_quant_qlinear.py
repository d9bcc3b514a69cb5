"""kiln::qlinear: a quantized linear layer as one op (kiln.quant.fuse), its reference against the
Q/DQ graph it replaces, engines holding it (build, validate, save/load), and on a GPU its 8-bit
kernels (kiln.kernels.scaled_mm) against the reference.

CPU tolerances: none. The fusion keeps the simulated graph's numbers bit for bit (the reference
dequantizes as the DQ ops do and multiplies as kiln::linear_act does), so fused and unfused
graphs and engines are compared with torch.equal.

GPU tolerances (8-bit kernels vs the reference, fp16, relative L2 error of the whole output):
2e-3. The kernels multiply the 8-bit values exactly (int32 accumulation for int8, fp32 for fp8)
and scale once in fp32; the reference rounds each dequantized operand to fp16 (relative error
≤ 2⁻¹¹ ≈ 4.9e-4 per operand) before an fp16 GEMM, so the two differ by about 1e-3 at most in
the relative L2 sense; selection's own check (kiln.select.tune.REL_TOL) is 2e-2.

GPU engines against the fp32 model (cosine of the outputs): int8 >= 0.999, fp8 >= 0.995. The
simulated engines measure, on the CPU with the same models and data, int8 0.99987 (MLP) /
0.99993 (q/k/v), fp8 0.9984 / 0.9990; the 8-bit kernels differ from them by fp16 rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln
from interpreter import interpreted, run_interpreted_tests
from kiln.capture.export import capture
from kiln.kernels import KERNELS, OpCall, candidates
from kiln.ops.quant import FP8_E4M3, INT8
from kiln.passes import run_passes
from kiln.quant.calibrate import calibrate
from kiln.quant.fuse import fuse_qlinear
from kiln.quant.insert import insert_qdq
from kiln.runtime import engine_file
from kiln.runtime.validate import ALLOWED_OPS
from kiln.specs import TensorSpec

kiln_ops = torch.ops.kiln
CPU = torch.device("cpu")
QLINEAR = "kiln.qlinear.default"
FORMATS = {"int8": INT8, "fp8": FP8_E4M3}


class MLP(nn.Module):
    """Linear layers on a 3-D input (a view before each GEMM), with a GELU and a ReLU epilogue,
    a layer without bias, and a residual read of a quantized tensor (its Q/DQ has another user)."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.fc3 = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, 16)

    def forward(self, x):
        y = nn.functional.gelu(self.fc1(x))
        y = self.fc2(y).relu() + x
        return self.head(self.fc3(y))


def _batches(n, shape=(2, 8, 32), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen),) for _ in range(n)]


def _quantized(fmt="int8", model=None):
    torch.manual_seed(0)
    model = (model or MLP()).eval()
    batches = _batches(6)
    graph = run_passes(capture(model, batches[0], device=CPU, compute_dtype=torch.float32))[0]
    table = calibrate(graph, batches, "max", FORMATS[fmt])
    return model, graph, insert_qdq(graph, table), batches


def _count(graph, target):
    return sum(1 for n in graph.module.graph.nodes if n.target == target)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fusion_makes_each_quantized_linear_one_op_with_the_same_numbers(fmt):
    _, _, qgraph, batches = _quantized(fmt)
    assert _count(qgraph, kiln_ops.linear_act.default) == 4
    want = [qgraph.run(*b) for b in batches]
    fused, n = fuse_qlinear(qgraph)
    assert n == 4
    assert _count(fused, kiln_ops.qlinear.default) == 4
    for op in (kiln_ops.linear_act.default, kiln_ops.quantize_per_tensor.default,
               kiln_ops.dequantize_per_tensor.default, kiln_ops.dequantize_per_channel.default):
        assert _count(fused, op) == 0, op
    acts = sorted(n.args[5] for n in fused.module.graph.nodes if n.target == kiln_ops.qlinear.default)
    assert acts == ["gelu", "none", "none", "relu"]
    no_bias = [n for n in fused.module.graph.nodes if n.target == kiln_ops.qlinear.default and n.args[4] is None]
    assert len(no_bias) == 1
    # the weights: [N, K] in the 8-bit format, row-major, with [N] fp32 scales
    for node in fused.module.graph.nodes:
        if node.target == kiln_ops.qlinear.default:
            w, s = (getattr(fused.module, a.target) for a in node.args[2:4])
            assert w.dtype == FORMATS[fmt].dtype and w.is_contiguous() and s.shape == (w.shape[0],)
            assert s.dtype == torch.float32
    for b, expected in zip(batches, want):
        assert torch.equal(fused.run(*b), expected)


def test_fusion_keeps_convolutions_and_batched_gemms_quantized_as_they_were():
    class ConvAndScores(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))
            q = self.fc(y)
            return q[:, :, None] @ y[:, None, :]  # a GEMM of two activations

    torch.manual_seed(0)
    model = ConvAndScores().eval()
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(3)]
    graph = run_passes(capture(model, batches[0], device=CPU, compute_dtype=torch.float32))[0]
    qgraph = insert_qdq(graph, calibrate(graph, batches, "max", INT8))
    convs = _count(qgraph, kiln_ops.dequantize_per_channel.default) - 1
    fused, n = fuse_qlinear(qgraph)
    assert n == 1
    assert _count(fused, kiln_ops.dequantize_per_channel.default) == convs == 1
    assert _count(fused, kiln_ops.quantize_per_tensor.default) >= 1
    for b in batches:
        assert torch.equal(fused.run(*b), qgraph.run(*b))


def test_a_fusion_that_does_not_fit_is_left_alone():
    """Activations in int8 and weights in fp8 (insert_qdq's weight_format): no one format, no qlinear."""
    _, graph, _, batches = _quantized("int8")
    table = calibrate(graph, batches, "max", INT8)
    mixed = insert_qdq(graph, table, weight_format="fp8")
    fused, n = fuse_qlinear(mixed)
    assert n == 0 and fused is mixed


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_is_the_fake_quantized_linear(fmt, act, bias):
    f = FORMATS[fmt]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 32, generator=gen)
    w = torch.randn(16, 32, generator=gen)
    w_scale = w.abs().amax(1) / f.qmax
    w_q = f.quantize(w, w_scale[:, None])
    b = torch.randn(16, generator=gen) if bias else None
    x_scale = float(x.abs().max()) / f.qmax
    got = kiln_ops.qlinear(x, x_scale, w_q, w_scale, b, act)
    xd = f.fake_quantize(x, x_scale)
    wd = w_q.float() * w_scale[:, None]
    want = nn.functional.linear(xd, wd, b)
    want = {"none": want, "relu": want.relu(), "gelu": nn.functional.gelu(want)}[act]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32: the same sums in another order
    assert got.dtype == x.dtype and got.shape == (24, 16)


def test_reference_runs_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(40, 64, dtype=torch.float16)
        w = torch.empty(48, 64, dtype=torch.float8_e4m3fn)
        y = kiln_ops.qlinear(x, 0.1, w, torch.empty(48), torch.empty(48, dtype=torch.float16), "relu")
    assert y.shape == (40, 48) and y.dtype == torch.float16 and y.is_contiguous()


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_engine_with_qlinear_matches_the_simulated_engine_and_round_trips(precision, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = MLP().eval()
    calib = [b[0] for b in _batches(6)]
    tests = [b[0] for b in _batches(3, seed=9)]
    engine = kiln.build(model, (calib[0],), precision=precision, device="cpu", calibration=calib)
    steps = [s["op"] for s in engine.plan["steps"]]
    assert steps.count(QLINEAR) == 4 and "kiln.dequantize_per_channel.default" not in steps
    q = engine.build_info["quantization"]
    assert q["fused_linears"] == q["quantized_layers"] == 4 and q["eight_bit_gemms"] == 0 and q["simulated"]
    # the same build without the fusion: Q/DQ around kiln::linear_act
    monkeypatch.setattr("kiln.quant.build.fuse_qlinear", lambda graph: (graph, 0))
    simulated = kiln.build(model, (calib[0],), precision=precision, device="cpu", calibration=calib)
    assert QLINEAR not in [s["op"] for s in simulated.plan["steps"]]
    assert simulated.build_info["quantization"]["fused_linears"] == 0
    with torch.no_grad():
        for x in tests:
            assert torch.equal(engine(x), simulated(x))
    path = tmp_path / "q.kiln"
    engine.save(path)
    header, weights = engine_file.read(path)
    assert sum(w.dtype == FORMATS[precision].dtype for w in weights.values()) == 4
    loaded = kiln.load(path)
    assert loaded.build_info["quantization"] == q
    with torch.no_grad():
        for x in tests:
            assert torch.equal(loaded(x), engine(x))


class SeparateQKV(nn.Module):
    """Attention with separate q/k/v projections (as Hugging Face BERT): horizontal_fuse makes
    them one aten.baddbmm against a stacked [3, K, N] weight, fused as one kiln::qlinear_grouped."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_grouped_projection_is_one_op_with_the_same_numbers(precision, monkeypatch):
    torch.manual_seed(0)
    model = SeparateQKV().eval()
    calib = [b[0] for b in _batches(4)]
    engine = kiln.build(model, (calib[0],), precision=precision, device="cpu", calibration=calib)
    steps = [s["op"] for s in engine.plan["steps"]]
    assert steps.count("kiln.qlinear_grouped.default") == 1 and steps.count(QLINEAR) == 1
    assert not {"aten.baddbmm.default", "kiln.dequantize_per_channel.default"} & set(steps)
    assert engine.build_info["quantization"]["fused_linears"] == 2
    monkeypatch.setattr("kiln.quant.build.fuse_qlinear", lambda graph: (graph, 0))
    simulated = kiln.build(model, (calib[0],), precision=precision, device="cpu", calibration=calib)
    assert "aten.baddbmm.default" in [s["op"] for s in simulated.plan["steps"]]
    with torch.no_grad():
        for (x,) in _batches(3, seed=5):
            assert torch.equal(engine(x), simulated(x))


def test_validation_allows_qlinear_and_checks_its_activation(tmp_path):
    from engine_files import rewrite

    assert QLINEAR in ALLOWED_OPS and "kiln.qlinear_grouped.default" in ALLOWED_OPS
    torch.manual_seed(0)
    model = MLP().eval()
    calib = [b[0] for b in _batches(3)]
    path = tmp_path / "q.kiln"
    kiln.build(model, (calib[0],), precision="int8", device="cpu", calibration=calib).save(path)
    kiln.load(path)  # accepted
    header = engine_file.read(path)[0]
    i = next(i for i, s in enumerate(header["plan"]["steps"]) if s["op"] == QLINEAR)

    def bad_act(h):
        h["plan"]["steps"][i]["args"][5] = "__import__"

    with pytest.raises(kiln.EngineFileError, match="unknown activation"):
        kiln.load(rewrite(path, tmp_path / "act.kiln", bad_act))

    def unknown_op(h):
        h["plan"]["steps"][i]["op"] = "kiln.qlinear_fast.default"

    with pytest.raises(kiln.EngineFileError):
        kiln.load(rewrite(path, tmp_path / "op.kiln", unknown_op))


@pytest.fixture(scope="module")
def qkv_engine(tmp_path_factory):
    """An int8 engine file holding one kiln::qlinear and one kiln::qlinear_grouped (both with a bias)."""
    torch.manual_seed(0)
    calib = [b[0] for b in _batches(3)]
    path = tmp_path_factory.mktemp("qkv") / "qkv.kiln"
    kiln.build(SeparateQKV().eval(), (calib[0],), precision="int8", device="cpu", calibration=calib).save(path)
    return path


def _edited(src, dst, op, edit):
    """dst = src with the first `op` step's header entry and weights changed by edit(step, weights)
    (engine_file.write recomputes the digest: only validation stands between the edit and the runtime);
    returns dst and that step's name."""
    header, weights = engine_file.read(src)
    weights = dict(weights)
    step = next(s for s in header["plan"]["steps"] if s["op"] == op)
    edit(step, weights)
    engine_file.write(dst, header, weights)
    return dst, step["name"]


def _weight_edit(arg, change):
    def edit(step, weights):
        name = step["args"][arg]["weight"]
        weights[name] = change(weights[name])

    return edit


GROUPED = "kiln.qlinear_grouped.default"
BROADCAST_OPERANDS = [  # (op, argument: 3 w_scale / 4 bias, the stored tensor → a broadcastable one, words)
    (QLINEAR, 4, lambda t: t[:1].contiguous(), "bias must be"),
    (QLINEAR, 4, lambda t: t.half(), "bias must be"),  # fp16 bias in an fp32 engine: addmm raised at the first call
    (QLINEAR, 4, lambda t: t.long(), "bias must be"),
    (GROUPED, 3, lambda t: t[:, :1].contiguous(), "w_scale must be"),  # [G, 1]
    (GROUPED, 3, lambda t: t[:1].contiguous(), "w_scale must be"),  # [1, N]
    (GROUPED, 3, lambda t: t[:1, :1].contiguous(), "w_scale must be"),  # [1, 1]
    (GROUPED, 4, lambda t: t[:, :1].contiguous(), "bias must be"),
    (GROUPED, 4, lambda t: t[:1].contiguous(), "bias must be"),
    (GROUPED, 4, lambda t: t[:1, :1].contiguous(), "bias must be"),
    (GROUPED, 2, lambda t: t[:0].contiguous(), "every dimension at least 1"),  # G = 0
]


@pytest.mark.parametrize(("op", "arg", "change", "words"), BROADCAST_OPERANDS)
def test_load_refuses_scales_and_biases_that_only_broadcast(qkv_engine, tmp_path, op, arg, change, words):
    """The 8-bit kernels read w_scale[n] and bias[n] for every output column: a [1] bias or a [G, 1]
    scale, which the reference would broadcast, is refused at load (naming the step), as are a bias
    of another dtype and an empty group dimension."""
    kiln.load(qkv_engine)  # the file as built is accepted
    path, name = _edited(qkv_engine, tmp_path / "bad.kiln", op, _weight_edit(arg, change))
    with pytest.raises(kiln.EngineFileError, match=words) as info:
        kiln.load(path)
    assert name in str(info.value)


@pytest.mark.parametrize("op", [QLINEAR, GROUPED])
@pytest.mark.parametrize("x_scale", [{"float": "nan"}, {"float": "inf"}, {"float": "-inf"}, 0.0, -1.0, 1e-45,
                                     1e39, 0, -3, True])
def test_load_refuses_an_activation_scale_that_is_not_a_normal_positive_number(qkv_engine, tmp_path, op, x_scale):
    def edit(step, weights):
        step["args"][1] = x_scale

    path, name = _edited(qkv_engine, tmp_path / "bad.kiln", op, edit)
    with pytest.raises(kiln.EngineFileError, match="x_scale must be a") as info:
        kiln.load(path)
    assert name in str(info.value)
    for fine in (torch.finfo(torch.float32).tiny, 1e-3, 1, 1e38):  # normal positive fp32 values load

        def edit_ok(step, weights, fine=fine):
            step["args"][1] = fine

        kiln.load(_edited(qkv_engine, tmp_path / "ok.kiln", op, edit_ok)[0])


def test_activation_scales_kiln_writes_are_normal_numbers():
    tiny = torch.finfo(torch.float32).tiny
    for f in FORMATS.values():
        assert f.scale(1e-40) == tiny and f.scale(0.0) == 1.0 and f.scale(f.qmax) == 1.0


@pytest.mark.parametrize("grouped", [False, True])
def test_reference_refuses_operands_that_only_broadcast(grouped):
    m = torch.device("meta")
    op = kiln_ops.qlinear_grouped if grouped else kiln_ops.qlinear
    lead = (3, 32) if grouped else (32,)
    x = torch.empty(16, 64, dtype=torch.float16, device=m)
    w = torch.empty(*lead, 64, dtype=torch.int8, device=m)
    s = torch.empty(lead, device=m)
    b = torch.empty(lead, dtype=torch.float16, device=m)
    assert op(x, 0.1, w, s, b, "none").shape == ((3, 16, 32) if grouped else (16, 32))
    small = (3, 1) if grouped else (1,)
    bad = [
        (x, w, torch.empty(small, device=m), b),
        (x, w, s, torch.empty(small, dtype=torch.float16, device=m)),
        (x, w, s, b.float()),
        (x, w, s.half(), b),
        (x, torch.empty(*lead, 0, dtype=torch.int8, device=m), s, b),  # K = 0
        (x[:, :0], torch.empty(*lead, 0, dtype=torch.int8, device=m), s, b),
        (x, torch.empty(*lead[:-1], 0, 64, dtype=torch.int8, device=m), s[..., :0], b[..., :0]),  # N = 0
    ]
    if grouped:
        bad += [(x, w, torch.empty(1, 32, device=m), b), (x, w, s, torch.empty(1, 1, dtype=torch.float16, device=m)),
                (x, w[:0], s[:0], b[:0])]  # G = 0
    for operands in bad:
        xi, wi, si, bi = operands
        with pytest.raises(ValueError):
            op(xi, 0.1, wi, si, bi, "none")


def _grouped_call(fmt, g=3, m=64, k=64, n=32, scale=None, bias=None, dtype=torch.float16):
    w = TensorSpec("w", (g, n, k), FORMATS[fmt].dtype)
    inputs = (TensorSpec("x", (m, k), dtype), None, w, TensorSpec("s", scale or (g, n), torch.float32),
              TensorSpec("b", bias or (g, n), dtype), None)
    return OpCall(GROUPED, inputs, (TensorSpec("y", (g, m, n), dtype),), "cuda", (None, 0.1, None, None, None, "none"))


def test_kernels_refuse_scales_and_biases_that_only_broadcast(monkeypatch):
    """supports (as load's check_supports asks it) refuses what the kernels would read past: on a
    faked CUDA machine with fp8 tensor cores, every 8-bit kernel takes the exact shapes and none the
    broadcastable ones, an empty group or K dimension, or fp16 scales."""
    import kiln.kernels.scaled_mm as smm

    if smm.triton is None:
        pytest.skip("the 8-bit kernels need Triton")
    monkeypatch.setattr(smm, "fp8_capable", lambda: True)
    int8 = {"int8.int_mm", "triton.qlinear_int8.narrow", "triton.qlinear_int8.wide"}
    fp8 = {"fp8.scaled_mm_tensorwise", "triton.qlinear_fp8.narrow", "triton.qlinear_fp8.wide"}
    assert set(_eight_bit(_grouped_call("int8"))) == int8
    assert set(_eight_bit(_grouped_call("fp8"))) == fp8
    assert "fp8.scaled_mm_rowwise" in _eight_bit(_call("fp8"))
    for fmt in FORMATS:
        for shapes in ({"scale": (3, 1)}, {"scale": (1, 32)}, {"scale": (1, 1)}, {"scale": (96,)},
                       {"bias": (3, 1)}, {"bias": (1, 32)}, {"bias": (1, 1)}, {"bias": (96,)}, {"g": 0},
                       {"k": 0}, {"n": 0}):
            assert _eight_bit(_grouped_call(fmt, **shapes)) == [], (fmt, shapes)
        bias_1 = _call(fmt)
        bias_1 = OpCall(QLINEAR, (*bias_1.inputs[:4], TensorSpec("b", (1,), torch.float16), None), bias_1.outputs,
                        "cuda", bias_1.constants)
        assert _eight_bit(bias_1) == [], fmt
        half_scale = _call(fmt)
        half_scale = OpCall(QLINEAR, (*half_scale.inputs[:3], TensorSpec("s", (48,), torch.float16),
                                      *half_scale.inputs[4:]), half_scale.outputs, "cuda", half_scale.constants)
        assert _eight_bit(half_scale) == [], fmt
        assert _eight_bit(_call(fmt, k=0)) == [] == _eight_bit(_call(fmt, n=0)), fmt


# -- the 8-bit kernels: where they apply, and on a GPU what they compute ---------------------------------


def _call(fmt, m=64, k=64, n=48, device="cuda", dtype=torch.float16, bias=True, act="none"):
    w = TensorSpec("w", (n, k), FORMATS[fmt].dtype)
    inputs = (TensorSpec("x", (m, k), dtype), None, w, TensorSpec("s", (n,), torch.float32),
              TensorSpec("b", (n,), dtype) if bias else None, None)
    return OpCall(QLINEAR, inputs, (TensorSpec("y", (m, n), dtype),), device,
                  (None, 0.1, None, None, None, act))


def _eight_bit(call):
    return [k.name for k in candidates(call) if k.name != "kiln.reference"]


def test_kernels_apply_only_where_they_can_run():
    import kiln.kernels.scaled_mm as smm

    int8 = _eight_bit(_call("int8"))
    fp8 = _eight_bit(_call("fp8"))
    triton_int8 = ["triton.qlinear_int8.narrow", "triton.qlinear_int8.wide"]
    assert int8 == (["int8.int_mm", *triton_int8] if smm.triton is not None else [])  # default first, then timed
    assert set(fp8) <= {"fp8.scaled_mm_tensorwise", "fp8.scaled_mm_rowwise", "triton.qlinear_fp8.narrow",
                        "triton.qlinear_fp8.wide"}
    assert _eight_bit(_call("int8", device="cpu")) == [] == _eight_bit(_call("fp8", device="cpu"))
    assert _eight_bit(_call("int8", m=16)) == triton_int8  # _int_mm needs more than 16 rows; Triton does not
    assert _eight_bit(_call("int8", k=40)) == ["int8.int_mm"]  # _int_mm: K multiple of 8; Triton's tiles: 16
    assert _eight_bit(_call("int8", k=36)) == []
    assert _eight_bit(_call("fp8", n=40)) == []  # fp8: K and N multiples of 16
    assert _eight_bit(_call("int8", dtype=torch.float32)) == []  # a half-precision engine's linears
    # the reference always applies: after the default 8-bit kernel, before the timed candidates
    assert [k.name for k in candidates(_call("int8", k=36))] == ["kiln.reference"]
    assert [k.name for k in candidates(_call("int8"))][:2] == (
        ["int8.int_mm", "kiln.reference"] if smm.triton is not None else ["kiln.reference"])
    assert {"int8.int_mm", "fp8.scaled_mm_tensorwise", "fp8.scaled_mm_rowwise", *triton_int8} <= set(KERNELS)


def test_quantize_and_epilogue_in_the_interpreter():
    from kiln.kernels.triton_lang import triton

    run_interpreted_tests(__file__, triton)


@interpreted
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_interpreted_quantize_rounds_as_torch(fmt):
    """The Triton quantize pass against QuantFormat.quantize: ties (k + ½ for int8, the midpoints
    between e4m3 neighbours), saturation, subnormals, a strided x."""
    from kiln.kernels.scaled_mm import quantize

    f = FORMATS[fmt]
    scale = 0.25
    ties = torch.arange(-20, 20) + 0.5 if fmt == "int8" else torch.tensor([9.0, 11.0, 13.0, 17.0, 18.0, 120.0,
                                                                           124.0, 232.0, 2 ** -10, 3 * 2 ** -11])
    special = torch.cat([ties, -ties, torch.tensor([0.0, 1e6, -1e6, 127.49, 448.0, 460.0, 1e-30])]) * scale
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([special, torch.randn(64 * 40 - special.numel(), generator=gen) * 40 * scale]).reshape(64, 40)
    for operand in (x, x.t().contiguous().t()):  # row-major, and column-major (stride (1, 64))
        got = quantize(operand, scale, f.dtype)
        assert got.dtype == f.dtype and got.is_contiguous()
        assert torch.equal(got.float(), f.quantize(operand, scale).float())


@interpreted
@pytest.mark.parametrize("act", ["none", "gelu", "tanh"])
def test_interpreted_epilogue_scales_adds_bias_and_activates(act):
    from kiln.kernels.scaled_mm import dequant_epilogue
    from kiln.ops.vocabulary import activation

    gen = torch.Generator().manual_seed(0)
    acc = torch.randint(-5000, 5000, (37, 150), generator=gen, dtype=torch.int32)
    w_scale, bias = torch.rand(150, generator=gen) * 1e-3, torch.randn(150, generator=gen)
    got = dequant_epilogue(acc, 0.05, w_scale, bias, act, torch.float32)
    want = activation(act)(acc.float() * (w_scale * 0.05) + bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(dequant_epilogue(acc[:, :0], 0.05, w_scale[:0], None, act, torch.float32),
                       torch.empty(37, 0))


@interpreted
@pytest.mark.parametrize("grouped", [False, True])
def test_interpreted_triton_kernel_takes_weights_in_any_layout(grouped):
    """A column-major w_q and an expanded bias or scale (stride 0) give the reference's answer:
    the kernel reads rows and dense vectors, so the step makes them so first."""
    from kiln.kernels import scaled_mm as smm

    f = FORMATS["int8"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 32, generator=gen).half()
    shape = (2, 12) if grouped else (24,)
    w_q = f.quantize(torch.randn(*shape, 32, generator=gen), 0.02)
    w_scale = torch.full(shape, 0.02)
    bias_every_other = torch.randn(*shape, 2, generator=gen).half()
    bias = bias_every_other[..., 0].contiguous()
    op = kiln_ops.qlinear_grouped if grouped else kiln_ops.qlinear
    want = op(x, 0.01, w_q, w_scale, bias, "relu")
    w_col_major = w_q.transpose(-1, -2).contiguous().transpose(-1, -2)
    w_scale_expanded = w_scale[..., :1].expand(shape)  # every scale is 0.02
    strided_bias = bias_every_other[..., 0]  # stride 2
    assert not w_col_major.is_contiguous() and w_scale_expanded.stride()[-1] == 0
    args = smm._operands((x, 0.01, w_col_major, w_scale_expanded, strided_bias, "relu"), grouped)
    got = smm.qgemm(*args[:6], args[6], "narrow")
    err = float((got.double() - want.double()).norm() / want.double().norm())
    assert got.shape == want.shape and err < 2e-3, err  # the GPU tolerance (module docstring)


def _operands(fmt, m, k, n, bias, seed=0):
    f = FORMATS[fmt]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, 3] *= 8  # an outlier feature: clipping at the scale's edge is exercised
    w = torch.randn(n, k, generator=gen) * 0.05
    w_scale = w.abs().amax(1) / f.qmax
    w_q = f.quantize(w, w_scale[:, None])
    b = torch.randn(n, generator=gen) if bias else None
    x_scale = float(x.abs().max()) * 0.5 / f.qmax  # half the range: the top values saturate
    cuda = torch.device("cuda")
    return (x.half().to(cuda), x_scale, w_q.to(cuda), w_scale.to(cuda),
            None if b is None else b.half().to(cuda))


def _fp8_capable():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["int8.int_mm", "fp8.scaled_mm_tensorwise", "fp8.scaled_mm_rowwise",
                                    "triton.qlinear_int8.wide", "triton.qlinear_int8.narrow",
                                    "triton.qlinear_fp8.wide", "triton.qlinear_fp8.narrow"])
@pytest.mark.parametrize(("m", "k", "n", "bias", "act"), [
    (64, 64, 48, True, "none"),
    (4096, 768, 2304, True, "gelu"),  # BERT-base's q/k/v projection at batch 32 × 128 tokens
    (200, 3072, 768, True, "relu"),  # rows not a multiple of anything
    (32, 128, 256, False, "tanh"),
])
def test_kernel_matches_the_reference_on_the_gpu(kernel, m, k, n, bias, act):
    fmt = "fp8" if "fp8" in kernel else "int8"
    if fmt == "fp8" and not _fp8_capable():
        pytest.skip("float8 GEMMs need compute capability 8.9 or later")
    args = _operands(fmt, m, k, n, bias)
    call = OpCall(QLINEAR, (TensorSpec("x", (m, k), torch.float16), None,
                            TensorSpec("w", (n, k), args[2].dtype), TensorSpec("s", (n,), torch.float32),
                            TensorSpec("b", (n,), torch.float16) if bias else None, None),
                  (TensorSpec("y", (m, n), torch.float16),), "cuda", (None, args[1], None, None, None, act))
    assert kernel in [c.name for c in candidates(call)]
    fn = KERNELS[kernel].make(QLINEAR, None)
    args = (*args, act)
    with torch.inference_mode():
        want = kiln_ops.qlinear(*args).float()
        got = fn(args, {}, [])
        assert got.dtype == torch.float16 and got.shape == (m, n) and got.is_contiguous()
        got = got.float()
        err = float((got - want).norm() / want.norm())
    assert err < 2e-3, err
    assert torch.isfinite(got).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["int8.int_mm", "fp8.scaled_mm_tensorwise", "triton.qlinear_int8.wide",
                                    "triton.qlinear_fp8.narrow"])
@pytest.mark.parametrize(("m", "k", "n"), [(4096, 768, 768), (40, 64, 16)])  # BERT-base's q/k/v; a small one
def test_grouped_kernel_matches_the_reference_on_the_gpu(kernel, m, k, n):
    fmt = "fp8" if "fp8" in kernel else "int8"
    if fmt == "fp8" and not _fp8_capable():
        pytest.skip("float8 GEMMs need compute capability 8.9 or later")
    x, x_scale, w_q, w_scale, bias = _operands(fmt, m, k, 3 * n, True)
    args = (x, x_scale, w_q.view(3, n, k), w_scale.view(3, n), bias.view(3, n), "none")
    op = "kiln.qlinear_grouped.default"
    call = OpCall(op, (TensorSpec("x", (m, k), torch.float16), None, TensorSpec("w", (3, n, k), w_q.dtype),
                       TensorSpec("s", (3, n), torch.float32), TensorSpec("b", (3, n), torch.float16), None),
                  (TensorSpec("y", (3, m, n), torch.float16),), "cuda", (None, x_scale, None, None, None, "none"))
    assert kernel in [c.name for c in candidates(call)]
    with torch.inference_mode():
        want = kiln_ops.qlinear_grouped(*args).float()
        got = KERNELS[kernel].make(op, None)(args, {}, [])
        assert got.shape == (3, m, n) and got.is_contiguous()
        err = float((got.float() - want).norm() / want.norm())
    assert err < 2e-3, err


def _untimed_cuda_engine(make_model, precision: str, calibration_batches: int):
    """The model `make_model()` builds (seeded) and its 8-bit CUDA engine, untimed: each qlinear
    runs its DEFAULT 8-bit kernel (timed, the reference may win at these tiny sizes)."""
    if precision == "fp8" and not _fp8_capable():
        pytest.skip("float8 GEMMs need compute capability 8.9 or later")
    torch.manual_seed(0)
    model = make_model().eval()
    calib = [b[0] for b in _batches(calibration_batches, shape=(4, 16, 64))]
    config = kiln.BuildConfig(precision=precision, device="cuda", calibration=calib, tune=False)
    return model, kiln.build(model.cuda(), (calib[0].cuda(),), config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_cuda_engine_runs_its_linears_in_8_bits(precision):
    model, engine = _untimed_cuda_engine(lambda: MLP(d=64, hidden=128), precision, 6)
    tests = [b[0] for b in _batches(3, shape=(4, 16, 64), seed=9)]
    q = engine.build_info["quantization"]
    kernels = [s["kernel"] for s in engine.plan["steps"] if s["op"] == QLINEAR]
    assert kernels == [{"int8": "int8.int_mm", "fp8": "fp8.scaled_mm_tensorwise"}[precision]] * 4
    assert q["eight_bit_gemms"] == 4 == q["fused_linears"] and not q["simulated"]
    with torch.no_grad():
        for x in tests:
            got, want = engine(x.cuda()).float().cpu(), model(x.cuda()).float().cpu()
            cos = float(nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))
            assert cos >= {"int8": 0.999, "fp8": 0.995}[precision], cos


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_cuda_engine_runs_the_grouped_projection_in_8_bits(precision):
    model, engine = _untimed_cuda_engine(lambda: SeparateQKV(d=64), precision, 4)
    kernels = {s["op"]: s["kernel"] for s in engine.plan["steps"] if "qlinear" in s["op"]}
    default = {"int8": "int8.int_mm", "fp8": "fp8.scaled_mm_tensorwise"}[precision]
    assert kernels == {"kiln.qlinear_grouped.default": default, QLINEAR: default}
    assert engine.build_info["quantization"]["eight_bit_gemms"] == 2
    with torch.no_grad():
        for (x,) in _batches(3, shape=(4, 16, 64), seed=9):
            got, want = engine(x.cuda()).float().cpu(), model(x.cuda()).float().cpu()
            cos = float(nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))
            assert cos >= {"int8": 0.999, "fp8": 0.995}[precision], cos
