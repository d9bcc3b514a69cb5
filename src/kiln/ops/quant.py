"""Quantize / dequantize as kiln ops: 8-bit formats and their reference implementations.

Symmetric quantization only (zero point 0), as TensorRT's explicit Q/DQ: a real value
x is stored as q = clamp(round(x / scale)) in int8, or as the float8 e4m3 value nearest
to x / scale (saturated at ±448). Activations take one scale per tensor (a float
argument of the op), weights one scale per output channel (an fp32 tensor and the axis
it runs along). A graph with Q/DQ pairs in it still runs under plain PyTorch: this is
the CPU reference path (simulated quantization) that the 8-bit kernels are checked
against.

This module lives on the runtime side (kiln.ops): an engine that stores int8 / fp8
weights and Q/DQ steps needs these ops and nothing from the build side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.ops.library import define_op
from kiln.ops.vocabulary import activation

# The smallest scale kiln writes or accepts: fp32's smallest normal number (a denormal or zero
# scale makes x / scale overflow or lose its precision).
MIN_SCALE = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class QuantFormat:
    """An 8-bit storage format: its name, storage dtype and largest representable magnitude."""

    name: str
    dtype: torch.dtype
    qmax: float  # the largest |q|: scale = amax / qmax
    qmin: float  # the most negative q

    def scale(self, amax: float) -> float:
        """The scale that maps `amax` to the format's largest value (1.0 for an all-zero tensor),
        never below fp32's smallest normal number (MIN_SCALE): an engine's activation scales are
        checked to be normal fp32 numbers at load (kiln.runtime.validate)."""
        amax = float(amax)
        if not amax > 0.0 or amax != amax or amax == float("inf"):
            return 1.0
        return max(amax / self.qmax, MIN_SCALE)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        y = x.float() / scale
        if self.dtype.is_floating_point:
            return y.clamp(self.qmin, self.qmax).to(self.dtype)
        return torch.round(y).clamp(self.qmin, self.qmax).to(self.dtype)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """x rounded to the format at `scale` and back, in fp32 (what Q then DQ computes)."""
        return self.quantize(x, scale).float() * scale


INT8 = QuantFormat("int8", torch.int8, 127.0, -128.0)
FP8_E4M3 = QuantFormat("fp8_e4m3", torch.float8_e4m3fn, 448.0, -448.0)
FORMATS: dict[str, QuantFormat] = {f.name: f for f in (INT8, FP8_E4M3)}
FORMAT_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3"}


def quant_format(name: str | QuantFormat) -> QuantFormat:
    """The format called `name` ("int8", "fp8" / "fp8_e4m3"); a ValueError names the known ones."""
    if isinstance(name, QuantFormat):
        return name
    key = FORMAT_ALIASES.get(str(name).lower(), str(name).lower())
    try:
        return FORMATS[key]
    except KeyError:
        known = ", ".join([*FORMATS, *FORMAT_ALIASES])
        raise ValueError(f"unknown quantization format {name!r}; known: {known}") from None


def format_of(dtype: torch.dtype) -> QuantFormat:
    for f in FORMATS.values():
        if f.dtype == dtype:
            return f
    raise ValueError(f"{dtype} is not a quantized storage dtype; known: {[str(f.dtype) for f in FORMATS.values()]}")


def _channel_shape(x: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % x.dim()
    if scales.dim() != 1 or scales.shape[0] != x.shape[axis]:
        raise ValueError(
            f"per-channel scales of shape {tuple(scales.shape)} do not match axis {axis} of a tensor "
            f"of shape {tuple(x.shape)}"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return scales.float().reshape(shape)


@define_op("quantize_per_tensor")
def quantize_per_tensor(x: torch.Tensor, scale: float, fmt: str) -> torch.Tensor:
    """x / scale in the 8-bit format `fmt` ("int8" or "fp8_e4m3"), rounded and saturated."""
    return quant_format(fmt).quantize(x, scale)


@define_op("dequantize_per_tensor")
def dequantize_per_tensor(q: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """q · scale as `dtype` (q: int8 or float8_e4m3fn)."""
    return (q.float() * scale).to(dtype)


@define_op("quantize_per_channel")
def quantize_per_channel(x: torch.Tensor, scales: torch.Tensor, axis: int, fmt: str) -> torch.Tensor:
    """x / scales[c] along `axis`, in the 8-bit format `fmt`."""
    return quant_format(fmt).quantize(x, _channel_shape(x, scales, axis))


@define_op("dequantize_per_channel")
def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor, axis: int, dtype: torch.dtype) -> torch.Tensor:
    """q · scales[c] along `axis`, as `dtype`."""
    return (q.float() * _channel_shape(q, scales, axis)).to(dtype)


def _check_qlinear_operands(op: str, x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None) -> None:
    """The operands' shapes and dtypes exactly as kiln::qlinear (`op` "qlinear": w_q [N, K]) or
    kiln::qlinear_grouped ("qlinear_grouped": w_q [G, N, K]) documents them, without broadcasting:
    w_scale fp32 and the bias (or None) in x's dtype, both of shape w_q.shape[:-1], every weight
    dimension at least 1, x [M, K]. The 8-bit kernels read one scale and one bias element per output
    column, so anything else (a [1] bias, a [G, 1] scale) would read past the tensor; this runs at
    build time and, on meta tensors, when an engine file is loaded (which then refuses it)."""
    weight_dims = 3 if op == "qlinear_grouped" else 2
    layout = "[G, N, K]" if weight_dims == 3 else "[N, K]"
    if w_q.dim() != weight_dims or any(d < 1 for d in w_q.shape):
        raise ValueError(f"kiln::{op} takes a {layout} weight with every dimension at least 1, got shape "
                         f"{tuple(w_q.shape)}")
    want = tuple(w_q.shape[:-1])
    if tuple(w_scale.shape) != want or w_scale.dtype != torch.float32:
        raise ValueError(f"kiln::{op}'s w_scale must be fp32 of shape {want} (one scale per output channel), got "
                         f"{w_scale.dtype} of shape {tuple(w_scale.shape)}")
    if bias is not None and (tuple(bias.shape) != want or bias.dtype != x.dtype):
        raise ValueError(f"kiln::{op}'s bias must be None or {x.dtype} (x's dtype) of shape {want}, got "
                         f"{bias.dtype} of shape {tuple(bias.shape)}")
    if x.dim() != 2:
        raise ValueError(f"kiln::{op} takes a 2-D input [M, K], got shape {tuple(x.shape)}")


@define_op("qlinear")
def qlinear(
    x: torch.Tensor, x_scale: float, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: str
) -> torch.Tensor:
    """act(Q/DQ(x) @ DQ(w_q)ᵀ + bias): one quantized linear layer, computed as its Q/DQ graph
    would (kiln.quant.fuse makes it of one).

    x: [M, K] in the compute dtype, quantized per tensor at `x_scale` to w_q's format; w_q:
    [N, K] int8 or float8_e4m3fn (nn.Linear's layout, so w_q.t() is the column-major [K, N]
    operand cuBLASLt's 8-bit GEMMs take); w_scale: [N] fp32, one scale per output channel;
    bias: [N] in x's dtype or None (exactly: nothing broadcasts, _check_qlinear_operands); act: a
    kiln.ops.vocabulary activation. The result has x's dtype. This reference dequantizes both
    operands exactly as dequantize_per_tensor and dequantize_per_channel do and multiplies as
    kiln::linear_act does, so it is bit for bit the simulated path; the 8-bit kernels
    (kiln.kernels.scaled_mm) multiply the 8-bit values."""
    fmt = format_of(w_q.dtype)
    _check_qlinear_operands("qlinear", x, w_q, w_scale, bias)
    xd = (fmt.quantize(x, x_scale).float() * x_scale).to(x.dtype)
    wd = (w_q.float() * _channel_shape(w_q, w_scale, 0)).to(x.dtype).t().contiguous()  # [K, N], as the DQ graph's
    y = xd @ wd if bias is None else torch.addmm(bias, xd, wd)
    return activation(act)(y)


@define_op("qlinear_grouped")
def qlinear_grouped(
    x: torch.Tensor, x_scale: float, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: str
) -> torch.Tensor:
    """G quantized linear layers reading one input (horizontal_fuse's q/k/v projection, a batched
    GEMM against a stacked weight), [G, M, N] with each [M, N] slice dense: kiln::qlinear's
    arithmetic per group, as the Q/DQ graph computed it (baddbmm of the expanded input).

    x: [M, K]; w_q: [G, N, K] 8-bit, so w_q.view(G·N, K).t() is one column-major GEMM operand
    for all groups; w_scale: [G, N] fp32; bias: [G, N] in x's dtype or None (exactly, as qlinear's)."""
    fmt = format_of(w_q.dtype)
    _check_qlinear_operands("qlinear_grouped", x, w_q, w_scale, bias)
    xd = (fmt.quantize(x, x_scale).float() * x_scale).to(x.dtype).expand(w_q.shape[0], -1, -1)
    wd = (w_q.float() * w_scale.float()[:, :, None]).to(x.dtype).transpose(1, 2).contiguous()  # [G, K, N]
    y = torch.bmm(xd, wd) if bias is None else torch.baddbmm(bias.unsqueeze(1), xd, wd)
    return activation(act)(y)


QUANTIZE_OPS = (torch.ops.kiln.quantize_per_tensor.default, torch.ops.kiln.quantize_per_channel.default)
DEQUANTIZE_OPS = (torch.ops.kiln.dequantize_per_tensor.default, torch.ops.kiln.dequantize_per_channel.default)
QUANTIZED_GEMM_OPS = (torch.ops.kiln.qlinear.default, torch.ops.kiln.qlinear_grouped.default)
