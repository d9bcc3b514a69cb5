"""kiln:: quantize / dequantize ops: reference numerics, formats, and fake propagation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kiln.ops.quant  # noqa: F401
from kiln.ops.quant import FP8_E4M3, INT8, format_of, quant_format

ops = torch.ops.kiln


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-3, 10.0), st.integers(0, 2**16))
def test_int8_round_trip_error_is_half_a_step(scale, seed):
    x = torch.randn(256, generator=torch.Generator().manual_seed(seed)) * 50 * scale
    q = ops.quantize_per_tensor(x, scale, "int8")
    assert q.dtype == torch.int8
    y = ops.dequantize_per_tensor(q, scale, torch.float32)
    inside = (x / scale).abs() <= 127
    assert torch.all((y - x)[inside].abs() <= scale / 2 * (1 + 1e-5))
    assert torch.all(y[~inside].abs() <= 128 * scale * (1 + 1e-6))  # saturated, never wrapped


def test_int8_saturates_at_the_format_limits():
    q = ops.quantize_per_tensor(torch.tensor([1e9, -1e9, 0.4, -0.6]), 1.0, "int8")
    assert q.tolist() == [127, -128, 0, -1]


def test_fp8_represents_its_own_values_exactly_and_saturates():
    grid = torch.tensor([0.0, 0.015625, 1.0, 1.125, -3.5, 240.0, 448.0])  # e4m3 values
    q = ops.quantize_per_tensor(grid * 0.5, 0.5, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(ops.dequantize_per_tensor(q, 0.5, torch.float32), grid * 0.5)
    big = ops.quantize_per_tensor(torch.tensor([1e6, -1e6]), 1.0, "fp8_e4m3").float()
    assert big.tolist() == [448.0, -448.0]
    assert not torch.isnan(big).any()


@pytest.mark.parametrize("fmt", [INT8, FP8_E4M3])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_maps_each_channel_max_to_the_format_max(fmt, axis):
    w = torch.randn(6, 5, 4) * torch.arange(1, 5).float()
    others = [d for d in range(3) if d != axis % 3]
    scales = w.abs().amax(others) / fmt.qmax
    q = ops.quantize_per_channel(w, scales, axis, fmt.name)
    assert q.dtype == fmt.dtype
    assert torch.equal(q.float().abs().amax(others), torch.full_like(scales, fmt.qmax))
    y = ops.dequantize_per_channel(q, scales, axis, torch.float16)
    assert y.dtype == torch.float16
    rel = float((y.float() - w).norm() / w.norm())
    assert rel < (0.01 if fmt is INT8 else 0.05)


def test_per_channel_checks_the_scale_shape():
    with pytest.raises(ValueError, match="per-channel scales of shape"):
        ops.quantize_per_channel(torch.randn(4, 3), torch.ones(3), 0, "int8")


def test_formats_by_name_and_dtype():
    assert quant_format("FP8") is FP8_E4M3 and quant_format("int8") is INT8
    assert format_of(torch.int8) is INT8 and format_of(torch.float8_e4m3fn) is FP8_E4M3
    with pytest.raises(ValueError, match="unknown quantization format 'int4'"):
        quant_format("int4")
    assert INT8.scale(0.0) == 1.0 and INT8.scale(float("nan")) == 1.0
    assert INT8.scale(12.7) == pytest.approx(0.1)


class _QDQ(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scales", torch.full((8,), 0.02))
        self.w = torch.nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        xq = ops.dequantize_per_tensor(ops.quantize_per_tensor(x, 0.05, "int8"), 0.05, x.dtype)
        wq = ops.dequantize_per_channel(ops.quantize_per_channel(self.w, self.scales, 0, "fp8_e4m3"), self.scales, 0,
                                        x.dtype)
        return xq @ wq.t()


def test_ops_export_and_propagate_shapes():
    """The fake implementations let torch.export trace through the ops."""
    model = _QDQ()
    program = torch.export.export(model, (torch.randn(3, 16),))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert ops.quantize_per_tensor.default in targets and ops.dequantize_per_channel.default in targets
    q = next(n for n in program.graph.nodes if n.target == ops.quantize_per_tensor.default)
    assert q.meta["val"].dtype == torch.int8 and tuple(q.meta["val"].shape) == (3, 16)
    x = torch.randn(3, 16)
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)
