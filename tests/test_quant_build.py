"""kiln.build(..., precision="int8" | "fp8" | "mixed", calibration=...): post-training quantization
wired into the build, on the CPU reference path (Q/DQ reference ops around fp32 kernels).

Tolerances (engine vs the fp32 eager model, on 4 inputs not calibrated on, from the calibration
batches' distribution). Measured with the models below at seeds 0-2: conv net int8 cosine
>= 0.99999 / relative error <= 0.0041, fp8 >= 0.99985 / <= 0.018; transformer block int8
>= 0.99986 / <= 0.017, fp8 >= 0.99897 / <= 0.046. The bounds are those with 2-3x margin."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import kiln
from kiln.quant import compare_outputs
from kiln.runtime import engine_file
from test_quant_guard import Outlier  # fc2 reads one feature 1000x larger: the layer to keep

CPU = "cpu"
QDQ_OPS = {
    "kiln.quantize_per_tensor.default",
    "kiln.dequantize_per_tensor.default",
    "kiln.dequantize_per_channel.default",
}
# precision → (min cosine, max relative error) per model
BOUNDS = {
    "conv": {"int8": (0.9999, 0.01), "fp8": (0.999, 0.04)},
    "block": {"int8": (0.999, 0.04), "fp8": (0.995, 0.1)},
}


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x))


class Block(nn.Module):
    """A transformer encoder block (attention + MLP, layer norms) and a linear head."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.layer(x))


MODELS = {"conv": (ConvNet, (4, 3, 16, 16)), "block": (Block, (2, 8, 32)), "outlier": (Outlier, (8, 16))}


def _setup(name, seed=0, n_calib=8, n_test=4):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().eval()
    gen = torch.Generator().manual_seed(100 + seed)
    calib = [torch.randn(*shape, generator=gen) for _ in range(n_calib)]
    tests = [torch.randn(*shape, generator=gen) for _ in range(n_test)]
    return model, calib, tests


def _cos(a, b):
    return float(nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _ops(engine):
    return [s["op"] for s in engine.plan["steps"]]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("name", ["conv", "block"])
def test_quantized_engine_close_to_fp32(name, precision):
    model, calib, tests = _setup(name)
    engine = kiln.build(model, (calib[0],), precision=precision, device=CPU, calibration=calib)
    fp32 = kiln.build(model, (calib[0],), device=CPU)
    min_cos, max_rel = BOUNDS[name][precision]
    with torch.no_grad():
        for x in tests:
            want, got = model(x), engine(x)
            assert _cos(got, want) >= min_cos and _rel(got, want) <= max_rel, (_cos(got, want), _rel(got, want))
            # quantized for real: further from the model than the fp32 engine's rounding
            assert _rel(got, want) > 10 * max(_rel(fp32(x), want), 1e-6)
    ops = _ops(engine)
    assert QDQ_OPS <= set(ops) or name == "block"  # the block is linears alone: every one a kiln::qlinear
    info = engine.build_info
    assert info["precision"] == precision and info["device_type"] == "cpu"
    q = info["quantization"]
    layers = {"conv": 4, "block": 5}[name]  # convs + linears; the block's q/k/v projection is one linear
    linears = {"conv": 1, "block": 5}[name]
    assert q["format"] == {"int8": "int8", "fp8": "fp8_e4m3"}[precision]
    assert q["calibrator"] == {"int8": "entropy", "fp8": "max"}[precision]
    assert (q["calibration_batches"], q["held_back_batches"]) == (8, 0)
    assert q["layers"] == q["quantized_layers"] == layers and q["kept"] == [] and q["accuracy"] is None
    assert q["compute_precision"] == "fp32" and q["simulated"] and "simulated" in q["execution"]
    assert q["fused_linears"] == linears and q["eight_bit_gemms"] == 0  # the reference kernel on the CPU
    # one per quantized weight: a convolution's DQ, or a linear layer's kiln::qlinear (kiln.quant.fuse)
    assert ops.count("kiln.dequantize_per_channel.default") == layers - linears
    assert ops.count("kiln.qlinear.default") == linears


def test_weights_are_stored_in_8_bits(tmp_path):
    model, calib, _ = _setup("conv")
    for precision, dtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        path = tmp_path / f"{precision}.kiln"
        kiln.build(model, (calib[0],), precision=precision, device=CPU, calibration=calib).save(path)
        _, weights = engine_file.read(path)
        eight_bit = [k for k, w in weights.items() if w.dtype == dtype]
        assert len(eight_bit) == 4, sorted(weights)
        # every 8-bit weight has its per-channel fp32 scales beside it; no fp32 copy of a conv/linear weight
        assert all(w.dim() == 1 or w.dtype == dtype for w in weights.values())


@pytest.mark.parametrize("precision", ["int8", "fp8", "mixed"])
def test_save_load_round_trip(precision, tmp_path):
    model, calib, tests = _setup("conv")
    engine = kiln.build(model, (calib[0],), precision=precision, device=CPU, calibration=calib)
    path = tmp_path / "q.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    assert loaded.build_info["quantization"] == engine.build_info["quantization"]
    assert QDQ_OPS <= set(_ops(loaded))
    with torch.no_grad():
        for x in tests:
            assert torch.equal(loaded(x), engine(x))


FRESH_LOAD = """
import sys, torch, kiln
engine = kiln.load(sys.argv[1])
torch.save(engine(torch.load(sys.argv[2])), sys.argv[3])
assert not [m for m in sys.modules if m.startswith(("kiln.quant", "kiln.builder"))], "build side loaded"
"""


def test_load_in_a_fresh_interpreter(tmp_path):
    model, calib, tests = _setup("conv")
    engine = kiln.build(model, (calib[0],), precision="int8", device=CPU, calibration=calib)
    engine.save(tmp_path / "q.kiln")
    torch.save(tests[0], tmp_path / "x.pt")
    run = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(tmp_path / "q.kiln"), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), engine(tests[0]))


def test_mixed_keeps_the_sensitive_layer():
    model, calib, tests = _setup("outlier")
    int8 = kiln.build(model, (calib[0],), precision="int8", device=CPU, calibration=calib)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kiln.KilnWarning)  # the target is met: no warning
        mixed = kiln.build(model, (calib[0],), precision="mixed", device=CPU, calibration=calib, held_back=3)
    q = mixed.build_info["quantization"]
    assert (q["calibration_batches"], q["held_back_batches"]) == (5, 3)
    assert q["accuracy"]["targets"] == ["cosine>=0.999"] and q["accuracy"]["met"]
    assert q["accuracy"]["all_quantized"]["cosine"] < 0.999 <= q["accuracy"]["final"]["cosine"]
    assert [k["module"] for k in q["kept"]] == ["fc2"]
    assert "sensitivity rank 1" in q["kept"][0]["reason"]
    assert (q["layers"], q["quantized_layers"]) == (3, 2)
    assert _ops(mixed).count("kiln.qlinear.default") == 2 == q["fused_linears"]
    # on inputs neither calibrated nor held back (the guard's metric: mean cosine of output rows);
    # measured 0.9988 with fc2 kept, 0.870 with every layer in int8
    with torch.no_grad():
        want = [model(x) for x in tests]
        assert compare_outputs([mixed(x) for x in tests], want)["cosine"] >= 0.997
        assert compare_outputs([int8(x) for x in tests], want)["cosine"] < 0.95  # what the guard fixed


def test_impossible_target_keeps_every_layer_and_warns():
    model, calib, tests = _setup("outlier")
    with pytest.warns(kiln.KilnWarning, match=r"max_abs<0 NOT met"):
        engine = kiln.build(model, (calib[0],), precision="int8", device=CPU, calibration=calib,
                            accuracy="max_abs<0")
    q = engine.build_info["quantization"]
    assert not q["accuracy"]["met"] and q["accuracy"]["final"]["max_abs"] == 0.0
    assert sorted(k["module"] for k in q["kept"]) == ["fc1", "fc2", "fc3"]
    assert all(k["reason"] for k in q["kept"]) and q["quantized_layers"] == 0
    assert not QDQ_OPS & set(_ops(engine))
    with torch.no_grad():
        torch.testing.assert_close(engine(tests[0]), model(tests[0]), rtol=1e-4, atol=1e-5)


def test_calibration_method_and_batches_as_tuples_or_dicts():
    model, calib, tests = _setup("conv", n_calib=3)
    as_tuples = kiln.build(model, (calib[0],), precision="int8", device=CPU, calibration=[(c,) for c in calib],
                           calibration_method="max")
    as_dicts = kiln.build(model, (calib[0],), precision="int8", device=CPU, calibration=[{"x": c} for c in calib],
                          calibration_method="max")
    assert as_tuples.build_info["quantization"]["calibrator"] == "max"
    with torch.no_grad():
        assert torch.equal(as_tuples(tests[0]), as_dicts(tests[0]))


class _NoCapture(BaseException):  # not an Exception: the build must not wrap it as a KilnError
    pass


@pytest.fixture
def no_capture(monkeypatch):
    """Fails the test if the build gets as far as capturing the model."""

    def capture(*args, **kwargs):
        raise _NoCapture("the build captured the model before refusing its settings")

    monkeypatch.setattr("kiln.builder.capture", capture)


@pytest.mark.parametrize("precision", ["int8", "fp8", "mixed"])
def test_missing_calibration_fails_before_capture(precision, no_capture):
    model, calib, _ = _setup("conv")
    with pytest.raises(kiln.KilnError, match=r"needs calibration data: pass calibration= \(CLI: --calib\)"):
        kiln.build(model, (calib[0],), precision=precision, device=CPU)
    config = kiln.BuildConfig(precision=precision, device=CPU)
    with pytest.raises(kiln.KilnError, match="calibration="):
        kiln.build(model, (calib[0],), config=config)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"calibration": []}, r"0 calibration batch\(es\)"),
        ({"calibration": [torch.randn(4, 3, 8, 8)]}, r"batch 0: input x has shape \(4, 3, 8, 8\)"),
        ({"calibration": [(torch.randn(4, 3, 16, 16),) * 2]}, "batch 0 has 2 tensor"),
        ({"calibration": [[1, 2]]}, "batch 0 is a list"),
        ({"calibration": torch.randn(4, 3, 16, 16)}, "iterable of batches"),
        ({"calibration": [torch.randn(4, 3, 16, 16)] * 4, "accuracy": "cosine>=0.99"}, "holds back the last 4"),
        ({"calibration": [torch.randn(4, 3, 16, 16)], "calibration_method": "kl"}, "unknown calibration_method"),
        ({"calibration": [torch.randn(4, 3, 16, 16)], "accuracy": "cosine=0.9"}, "accuracy: cannot read"),
        ({"calibration": [torch.randn(4, 3, 16, 16)] * 2, "accuracy": "cosine>=0.9", "held_back": 0},
         "held_back must be at least 1"),
    ],
)
def test_bad_calibration_settings_fail_before_capture(options, message, no_capture):
    model, calib, _ = _setup("conv")
    with pytest.raises(kiln.KilnError, match=message):
        kiln.build(model, (calib[0],), precision="int8", device=CPU, **options)


def test_quantization_options_with_a_float_precision_and_dynamic_shapes(no_capture):
    model, calib, _ = _setup("conv")
    with pytest.raises(kiln.KilnError, match="for the quantized precisions"):
        kiln.build(model, (calib[0],), precision="fp32", device=CPU, calibration=calib)
    with pytest.raises(kiln.KilnError, match="static shapes"):
        kiln.build(model, (calib[0],), precision="int8", device=CPU, calibration=calib,
                   dynamic_shapes=({0: kiln.Dim("batch", min=1, max=8)},))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_tensorrt_backend_takes_the_quantized_graph(fmt):
    """Explicit quantization: the Q/DQ ops and the 8-bit weights go into the TensorRT region
    (built here, run only where the installed TensorRT runs)."""
    from kiln.tensorrt import api

    if not api.available():
        pytest.skip("needs TensorRT or TensorRT-RTX (pip install 'kiln[tensorrt-rtx]')")
    model, calib, _ = _setup("conv")
    config = kiln.BuildConfig(precision=fmt, device=CPU, calibration=calib, backend="tensorrt")
    with pytest.warns(kiln.KilnWarning):
        engine = kiln.build(model, (calib[0],), config=config)
    report = engine.build_info["tensorrt"]
    assert report["regions"] and not report["outside"], report
    assert [s["op"] for s in engine.plan["steps"]] == ["kiln.tensorrt_region.default"]
    assert engine.build_info["quantization"]["quantized_layers"] >= 2


def test_unknown_precision_lists_the_quantized_ones(no_capture):
    model, calib, _ = _setup("conv")
    with pytest.raises(ValueError, match="fp32, fp16, bf16, int8, fp8, mixed, got 'int4'"):
        kiln.build(model, (calib[0],), precision="int4", device=CPU, calibration=calib)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_cuda_quantized_engine_computes_in_fp16(precision):
    model, calib, tests = _setup("conv")
    engine = kiln.build(model.cuda(), (calib[0].cuda(),), precision=precision, device="cuda", calibration=calib)
    q = engine.build_info["quantization"]
    assert q["compute_precision"] == "fp16" and q["quantized_layers"] == 4
    min_cos, _ = BOUNDS["conv"][precision]
    with torch.no_grad():
        for x in tests:
            got, want = engine(x.cuda()).float().cpu(), model(x.cuda()).float().cpu()
            assert _cos(got, want) >= min_cos - 0.001  # fp16 rounding on top of the 8-bit one


class SeparateQKV(nn.Module):
    """Attention with separate q/k/v projections (as Hugging Face BERT): horizontal_fuse makes
    them one aten.baddbmm against a stacked [3, K, N] weight."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, 4, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, n, 32))


def test_fused_qkv_projection_is_quantized():
    torch.manual_seed(0)
    model = SeparateQKV().eval()
    calib = [torch.randn(2, 8, 32) for _ in range(6)]
    engine = kiln.build(model, (calib[0],), precision="int8", device=CPU, calibration=calib)
    # q/k/v as one GEMM (horizontal_fuse's baddbmm), quantized as one kiln::qlinear_grouped; and o
    assert "kiln.qlinear_grouped.default" in _ops(engine) and "aten.baddbmm.default" not in _ops(engine)
    assert engine.build_info["quantization"]["quantized_layers"] == 2 == engine.build_info["quantization"][
        "fused_linears"]
