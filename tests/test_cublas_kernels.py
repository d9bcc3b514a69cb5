"""cuBLASLt kernels for kiln's fused ops (linear epilogues, convolutions run as GEMMs) against the references."""

import pytest
import torch
import torch.nn.functional as F

from kiln import ops  # noqa: F401  (defines kiln::conv_bias_act and kiln::linear_act)
from kiln.kernels import KERNELS

CONV = "kiln.conv_bias_act.default"
LINEAR = "kiln.linear_act.default"
conv_bias_act = torch.ops.kiln.conv_bias_act.default
linear_act = torch.ops.kiln.linear_act.default


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
@pytest.mark.parametrize("stride,channels_last", [(2, True), (1, False)], ids=["strided", "nchw"])
def test_conv1x1_gemm_falls_back_to_cudnn_outside_its_case(stride, channels_last):
    args = _conv_args(4, 16, 32, 14, "relu", False, stride=stride, channels_last=channels_last)
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
def test_patch_conv_gemm_falls_back_for_overlapping_windows():
    x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.float16)
    w = torch.randn(16, 3, 4, 4, device="cuda", dtype=torch.float16) / 7
    b = torch.randn(16, device="cuda", dtype=torch.float16)
    args = (x, w, b, [2, 2], [1, 1], [1, 1], 1, "none", None)
    got = KERNELS["cublaslt.patch_conv_gemm"].make(CONV, None)(args, {}, [])
    torch.testing.assert_close(got.float(), conv_bias_act(*args).float(), atol=2e-2, rtol=2e-2)


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
    for act in ("none", "relu"):
        torch.testing.assert_close(run((x, w_t, b, act), {}, []), linear_act(x, w_t, b, act), atol=2e-2, rtol=2e-2)


def test_gelu_tanh_epilogue_is_offered_for_half_precision_only():
    from kiln.kernels import OpCall
    from kiln.specs import TensorSpec

    def call(dtype):
        x, w, b = (TensorSpec(n, s, dtype) for n, s in (("x", (8, 4)), ("w", (4, 4)), ("b", (4,))))
        return OpCall(LINEAR, (x, w, b, None), (TensorSpec("y", (8, 4), dtype),), "cuda")

    supports = KERNELS["cublaslt.linear_gelu_tanh"].supports
    assert supports(call(torch.float16)) and supports(call(torch.bfloat16))
    assert not supports(call(torch.float32)), "fp32 engines keep exact GELU"
