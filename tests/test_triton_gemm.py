"""The Triton GEMM with the fused op's epilogue against kiln::conv_bias_act / kiln::linear_act.

On the CPU the kernel runs in Triton's interpreter (a child process; see interpreter.py), in
fp32: tolerance 1e-4 (fp32 sums in another order). On the GPU, fp16: 2e-2 (the reference
rounds the GEMM to fp16 before bias and activation, the kernel rounds once at the end).
"""

from __future__ import annotations

import pytest
import torch

from interpreter import interpreted, run_interpreted_tests
from kiln import ops  # noqa: F401  (defines kiln::conv_bias_act, kiln::linear_act)
from kiln.kernels import KERNELS, OpCall, candidates
from kiln.kernels import triton_gemm as tg
from kiln.ops.vocabulary import ACTIVATIONS
from kiln.specs import TensorSpec

CONV = "kiln.conv_bias_act.default"
LINEAR = "kiln.linear_act.default"


def test_triton_kernel_in_the_interpreter():
    run_interpreted_tests(__file__, tg.triton)


def _conv_args(device, dtype, act, residual, size=5, c_in=20, c_out=40, batch=3):
    x = torch.randn(batch, c_in, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, 1, 1, device=device, dtype=dtype) / c_in**0.5
    b = torch.randn(c_out, device=device, dtype=dtype)
    r = None
    if residual:
        r = torch.randn(batch, c_out, size, size, device=device, dtype=dtype)
        r = r.contiguous(memory_format=torch.channels_last)
    return (x, w, b, [1, 1], [0, 0], [1, 1], 1, act, r)


@interpreted
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True])
def test_interpreted_conv1x1_matches_reference(act, residual):
    args = _conv_args("cpu", torch.float32, act, residual)
    got = tg.conv1x1_act(*args, tiles=tg.CONFIGS["narrow"])
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, torch.ops.kiln.conv_bias_act(*args), atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("config", list(tg.CONFIGS))
@pytest.mark.parametrize("m,k,n", [(7, 3, 5), (70, 150, 130), (200, 64, 16)])
def test_interpreted_gemm_spans_tiles_with_ragged_edges(config, m, k, n):
    """More rows, columns and depth than one tile, none a multiple of it; a transposed weight."""
    a, w = torch.randn(m, k), torch.randn(n, k)
    bias, residual = torch.randn(n), torch.randn(m, n)
    got = tg.gemm_act(a, w.t(), bias, residual, "gelu", tg.CONFIGS[config])
    want = torch.nn.functional.gelu(a @ w.t() + bias + residual)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@interpreted
def test_interpreted_gemm_reads_a_strided_bias_by_its_strides():
    a, w, bias_every_other = torch.randn(20, 24), torch.randn(24, 40), torch.randn(40, 2)
    bias = bias_every_other[:, 0]  # stride 2
    got = tg.gemm_act(a, w, bias, None, "none", tg.CONFIGS["narrow"])
    torch.testing.assert_close(got, a @ w + bias, atol=1e-4, rtol=1e-4)


@interpreted
def test_interpreted_linear_without_bias():
    x, w_t = torch.randn(9, 33), torch.randn(33, 17)
    got = tg.linear_act(x, w_t, None, "silu")
    torch.testing.assert_close(got, torch.ops.kiln.linear_act(x, w_t, None, "silu"), atol=1e-4, rtol=1e-4)


@interpreted
def test_interpreted_squeeze_excitation_conv_over_one_pixel():
    args = _conv_args("cpu", torch.float32, "sigmoid", False, size=1)
    got = tg.conv1x1_act(*args)
    torch.testing.assert_close(got, torch.ops.kiln.conv_bias_act(*args), atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("size", [5, 1])
def test_interpreted_conv1x1_writes_into_a_slice_of_a_concatenation(size):
    args = _conv_args("cpu", torch.float32, "relu", True, size=size)
    whole = torch.full((3, 50, size, size), 7.0).contiguous(memory_format=torch.channels_last)
    got = KERNELS["triton.conv1x1_act.narrow"].make(CONV, None)(args, {}, [whole[:, 4:44]])
    assert got.data_ptr() == whole[:, 4:44].data_ptr()
    torch.testing.assert_close(whole[:, 4:44], torch.ops.kiln.conv_bias_act(*args), atol=1e-4, rtol=1e-4)
    assert (whole[:, :4] == 7).all() and (whole[:, 44:] == 7).all(), "nothing outside the slice is written"


@pytest.mark.parametrize("into_slice", [False, True])
def test_nchw_input_runs_the_cudnn_path(monkeypatch, into_slice):
    def no_gemm(*args, **kwargs):
        raise AssertionError("NCHW pixels are not GEMM rows")

    monkeypatch.setattr(tg, "gemm_act", no_gemm)
    x, *rest = _conv_args("cpu", torch.float32, "relu", True)
    x = x.contiguous()
    whole = torch.zeros(3, 50, 5, 5)
    out = whole[:, 4:44] if into_slice else None
    got = tg.conv1x1_act(x, *rest, out=out)
    torch.testing.assert_close(got, torch.ops.kiln.conv_bias_act(x, *rest), atol=1e-5, rtol=1e-5)
    if into_slice:
        assert got.data_ptr() == out.data_ptr(), "the result is copied into the slice it was given"


def _specs(dtype, *shapes):
    return tuple(TensorSpec(f"t{i}", s, dtype) for i, s in enumerate(shapes))


def test_candidates_only_for_half_precision_1x1_convs_and_2d_linears():
    x, w, b = _specs(torch.float16, (2, 8, 8, 8), (16, 8, 1, 1), (16,))
    conv = OpCall(CONV, (x, w, b) + (None,) * 6, (x,), "cuda", (None,) * 3 + ([1, 1], [0, 0], [1, 1], 1, "silu"))
    names = [k.name for k in candidates(conv)]
    assert {"triton.conv1x1_act.wide", "triton.conv1x1_act.narrow"} <= set(names)
    assert names[0].startswith("cudnn."), "never the untuned default"
    strided = OpCall(CONV, conv.inputs, (x,), "cuda", (None,) * 3 + ([2, 2], [0, 0], [1, 1], 1, "silu"))
    assert not any(k.name.startswith("triton.conv1x1") for k in candidates(strided))
    x32, w32, b32 = _specs(torch.float32, (2, 8, 8, 8), (16, 8, 1, 1), (16,))
    fp32 = OpCall(CONV, (x32, w32, b32) + (None,) * 6, (x32,), "cuda", conv.constants)
    assert not any(k.name.startswith("triton.") for k in candidates(fp32) if "conv1x1" in k.name)
    xl, wl, bl = _specs(torch.bfloat16, (4, 8), (8, 16), (16,))
    linear = OpCall(LINEAR, (xl, wl, bl, None), (xl,), "cuda", (None, None, None, "gelu"))
    assert "triton.linear_act.wide" in [k.name for k in candidates(linear)]
    assert not any(k.name.startswith("triton.") for k in candidates(OpCall(LINEAR, linear.inputs, (xl,), "cpu")))


@pytest.mark.gpu
@pytest.mark.parametrize("config", list(tg.CONFIGS))
@pytest.mark.parametrize("act", ["silu", "relu", "gelu", "none"])
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_conv1x1_matches_reference(config, act, residual):
    args = _conv_args("cuda", torch.float16, act, residual, size=28, c_in=96, c_out=24, batch=4)
    got = KERNELS[f"triton.conv1x1_act.{config}"].make(CONV, None)(args, {}, [])
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), torch.ops.kiln.conv_bias_act(*args).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("config", list(tg.CONFIGS))
def test_gpu_linear_matches_reference(config):
    x = torch.randn(300, 768, device="cuda", dtype=torch.float16)
    w_t = torch.randn(3072, 768, device="cuda", dtype=torch.float16).t() / 768**0.5
    b = torch.randn(3072, device="cuda", dtype=torch.float16)
    got = KERNELS[f"triton.linear_act.{config}"].make(LINEAR, None)((x, w_t, b, "gelu"), {}, [])
    want = torch.ops.kiln.linear_act(x, w_t, b, "gelu")
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)

