"""cuBLASLt kernels for kiln's fused ops (linear epilogues, convolutions run as GEMMs) against the references."""

import pytest
import torch
import torch.nn.functional as F

from kiln import ops  # noqa: F401  (defines kiln::conv_bias_act and kiln::linear_act)
from kiln.kernels import KERNELS, OpCall
from kiln.specs import TensorSpec

CONV = "kiln.conv_bias_act.default"
LINEAR = "kiln.linear_act.default"
conv_bias_act = torch.ops.kiln.conv_bias_act.default


def _conv_args(batch, c_in, c_out, size, act, residual, stride=1, channels_last=True):
    x = torch.randn(batch, c_in, size, size, device="cuda", dtype=torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, 1, 1, device="cuda", dtype=torch.float16) / c_in**0.5
    b = torch.randn(c_out, device="cuda", dtype=torch.float16)
    out_size = (size - 1) // stride + 1
    r = torch.randn(batch, c_out, out_size, out_size, device="cuda", dtype=torch.float16) if residual else None
    if r is not None and channels_last:
        r = r.contiguous(memory_format=torch.channels_last)
    return (x, w, b, [stride, stride], [0, 0], [1, 1], 1, act, r)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["none", "relu", "silu", "sigmoid"])
@pytest.mark.parametrize("size,residual", [(1, False), (14, False), (14, True)])
def test_conv1x1_gemm_matches_reference(act, size, residual):
    args = _conv_args(8, 48, 96, size, act, residual)
    got = KERNELS["cublaslt.conv1x1_gemm"].make(CONV, None)(args, {}, [])
    torch.testing.assert_close(got.float(), conv_bias_act(*args).float(), atol=2e-2, rtol=2e-2)
    if size > 1:
        assert got.is_contiguous(memory_format=torch.channels_last), "pixels stay channels-last"


@pytest.mark.gpu
def test_conv1x1_gemm_falls_back_to_cudnn_for_nchw_pixels():
    args = _conv_args(4, 16, 32, 14, "relu", False, channels_last=False)
    got = KERNELS["cublaslt.conv1x1_gemm"].make(CONV, None)(args, {}, [])
    torch.testing.assert_close(got.float(), conv_bias_act(*args).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act,residual", [("none", False), ("relu", True)])
def test_patch_conv_gemm_matches_reference(channels_last, act, residual):
    x = torch.randn(4, 3, 64, 48, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    w = torch.randn(64, 3, 16, 16, device="cuda", dtype=torch.float16) / 28
    b = torch.randn(64, device="cuda", dtype=torch.float16)
    r = torch.randn(4, 64, 4, 3, device="cuda", dtype=torch.float16) if residual else None
    args = (x, w, b, [16, 16], [0, 0], [1, 1], 1, act, r)
    got = KERNELS["cublaslt.patch_conv_gemm"].make(CONV, None)(args, {}, [])
    want = conv_bias_act(*args)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.gpu
def test_gelu_tanh_epilogue_stays_within_fp16_rounding_of_exact_gelu():
    x = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    w_t = torch.randn(512, 1024, device="cuda", dtype=torch.float16) / 512**0.5
    b = torch.randn(1024, device="cuda", dtype=torch.float16)
    run = KERNELS["cublaslt.linear_gelu_tanh"].make(LINEAR, None)
    got = run((x, w_t, b, "gelu"), {}, [])
    exact = F.gelu(torch.addmm(b.float(), x.float(), w_t.float()))
    # 4.7e-4 approximation error + fp16 rounding of the GEMM output and of the GELU
    torch.testing.assert_close(got.float(), exact, atol=3e-3, rtol=3e-3)


def _spec(name, shape, dtype=torch.float16):
    return TensorSpec(name, shape, dtype)


def _linear_call(dtype, act):
    x, w, b = _spec("x", (8, 4), dtype), _spec("w", (4, 4), dtype), _spec("b", (4,), dtype)
    return OpCall(LINEAR, (x, w, b, None), (_spec("y", (8, 4), dtype),), "cuda", (None, None, None, act))


def test_gelu_tanh_epilogue_is_offered_for_half_precision_gelu_only():
    supports = KERNELS["cublaslt.linear_gelu_tanh"].supports
    assert supports(_linear_call(torch.float16, "gelu")) and supports(_linear_call(torch.bfloat16, "gelu"))
    assert not supports(_linear_call(torch.float32, "gelu")), "fp32 engines keep exact GELU"
    assert not supports(_linear_call(torch.float16, "relu")), "other activations: the exact epilogue kernel"


def _conv_call(x_shape, w_shape, stride, padding, dilation=(1, 1), groups=1, bias=True):
    x, w = _spec("x", x_shape), _spec("w", w_shape)
    b = _spec("b", (w_shape[0],)) if bias else None
    constants = (None, None, None, list(stride), list(padding), list(dilation), groups, "relu", None)
    return OpCall(CONV, (x, w, b, None, None, None, None, None, None), (_spec("y", (1,)),), "cuda", constants)


@pytest.mark.parametrize(
    "call,expected",
    [
        (_conv_call((2, 16, 14, 14), (32, 16, 1, 1), (1, 1), (0, 0)), True),
        (_conv_call((2, 16, 14, 14), (32, 16, 1, 1), (2, 2), (0, 0)), False),
        (_conv_call((2, 16, 14, 14), (32, 16, 1, 1), (1, 1), (0, 0), bias=False), False),
        (_conv_call((2, 16, 14, 14), (16, 1, 1, 1), (1, 1), (0, 0), groups=16), False),
        (_conv_call((2, 16, 14, 14), (32, 16, 3, 3), (1, 1), (1, 1)), False),
    ],
    ids=["1x1", "strided", "no bias", "grouped", "3x3"],
)
def test_conv1x1_gemm_takes_plain_pointwise_convolutions_only(call, expected):
    assert KERNELS["cublaslt.conv1x1_gemm"].supports(call) == expected


@pytest.mark.parametrize(
    "call,expected",
    [
        (_conv_call((2, 3, 224, 224), (768, 3, 16, 16), (16, 16), (0, 0)), True),
        (_conv_call((2, 3, 32, 32), (16, 3, 4, 4), (2, 2), (1, 1)), False),
        (_conv_call((2, 3, 30, 30), (16, 3, 4, 4), (4, 4), (0, 0)), False),
        (_conv_call((2, 3, 32, 32), (16, 3, 4, 4), (4, 4), (0, 0), dilation=(2, 2)), False),
        (_conv_call((2, 3, 32, 32), (16, 3, 1, 1), (1, 1), (0, 0)), False),
    ],
    ids=["patches", "overlapping", "ragged image", "dilated", "1x1"],
)
def test_patch_conv_gemm_takes_non_overlapping_patches_only(call, expected):
    assert KERNELS["cublaslt.patch_conv_gemm"].supports(call) == expected
