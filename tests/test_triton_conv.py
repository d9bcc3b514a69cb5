"""The Triton conv epilogue (bias + residual + activation in one pass) against kiln::conv_bias_act.

On the CPU the kernel runs in Triton's interpreter (a child process; see interpreter.py).
Tolerances: fp32 1e-5 (the epilogue computes in fp32 like the reference); fp16 on the GPU
2e-2 (the reference rounds the biased sum to fp16 before the activation, the epilogue does not).
"""

from __future__ import annotations

import pytest
import torch

from interpreter import interpreted, run_interpreted_tests
from kiln import ops  # noqa: F401  (defines kiln::conv_bias_act)
from kiln.kernels import KERNELS
from kiln.kernels import triton_conv as tc
from kiln.ops.vocabulary import ACTIVATIONS

OP = "kiln.conv_bias_act.default"
ACTS = list(ACTIVATIONS)


def test_triton_kernel_in_the_interpreter():
    run_interpreted_tests(__file__, tc.triton)


def _args(device, dtype, act, residual, channels_last, groups=1, size=6):
    x = torch.randn(2, 8, size, size, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(8 if groups == 8 else 12, 8 // groups, 3, 3, device=device, dtype=dtype) / 5
    b = torch.randn(w.shape[0], device=device, dtype=dtype)
    r = None
    if residual:
        r = torch.randn(2, w.shape[0], size, size, device=device, dtype=dtype)
        r = r.contiguous(memory_format=torch.channels_last) if channels_last else r
    return (x, w, b, [1, 1], [1, 1], [1, 1], groups, act, r)


@interpreted
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cudnn_bias", [False, True])
def test_interpreted_matches_reference(act, residual, channels_last, cudnn_bias):
    args = _args("cpu", torch.float32, act, residual, channels_last)
    got = tc.conv_bias_act(*args, cudnn_bias=cudnn_bias)
    torch.testing.assert_close(got, torch.ops.kiln.conv_bias_act(*args), atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("channels_last", [False, True])
def test_interpreted_epilogue_reads_a_strided_bias_by_its_strides(channels_last):
    x, w, b, *rest, act, r = _args("cpu", torch.float32, "relu", False, channels_last)
    strided_bias = torch.stack([b, b + 1], 1)[:, 0]  # stride 2
    got = tc.conv_bias_act(x, w, strided_bias, *rest, act, r)
    torch.testing.assert_close(got, torch.ops.kiln.conv_bias_act(x, w, b, *rest, act, r), atol=1e-5, rtol=1e-5)


@interpreted
def test_interpreted_residual_in_another_layout_is_added_first():
    x, w, b, *rest, act, r = _args("cpu", torch.float32, "silu", True, channels_last=True)
    r = r.contiguous()  # NCHW residual, channels-last output
    got = tc.conv_bias_act(x, w, b, *rest, act, r)
    torch.testing.assert_close(got, torch.ops.kiln.conv_bias_act(x, w, b, *rest, act, r), atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 200, 5, 7), (2, 3, 33, 40)], ids=["wide", "tall"])
def test_interpreted_bias_act_spans_tiles_in_both_directions(channels_last, shape):
    """More channels than one column tile (channels-last) or pixels than one (NCHW), ragged edges."""
    y = torch.randn(shape)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    bias, residual = torch.randn(shape[1]), torch.randn(shape)
    if channels_last:
        residual = residual.contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.silu(y + bias.view(1, -1, 1, 1) + residual)
    got = tc.bias_act_(y.clone(memory_format=torch.preserve_format), bias, residual, "silu")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("kernel", ["triton.conv_epilogue", "triton.conv_act"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "nchw-falls-back-to-a-copy"])
def test_interpreted_writes_into_a_slice_of_a_concatenation(kernel, channels_last):
    args = _args("cpu", torch.float32, "silu", True, channels_last)
    whole = torch.full((2, 20, 6, 6), 7.0)
    whole = whole.contiguous(memory_format=torch.channels_last) if channels_last else whole
    got = KERNELS[kernel].make(OP, None)(args, {}, [whole[:, 5:17]])
    assert got.data_ptr() == whole[:, 5:17].data_ptr()
    torch.testing.assert_close(whole[:, 5:17], torch.ops.kiln.conv_bias_act(*args), atol=1e-5, rtol=1e-5)
    assert (whole[:, :5] == 7).all() and (whole[:, 17:] == 7).all(), "nothing outside the slice is written"


def test_bias_act_refuses_layouts_it_cannot_index():
    y = torch.randn(2, 8, 4, 4)[:, :, :, ::2]
    with pytest.raises(ValueError, match="dense NCHW or channels-last"):
        tc.bias_act_(y, torch.randn(8), None, "relu")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["triton.conv_epilogue", "triton.conv_act"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "depthwise"])
def test_gpu_matches_reference(kernel, act, groups):
    args = _args("cuda", torch.float16, act, act == "relu", channels_last=True, groups=groups, size=28)
    got = KERNELS[kernel].make(OP, None)(args, {}, [])
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), torch.ops.kiln.conv_bias_act(*args).float(), atol=2e-2, rtol=2e-2)


def test_cudnn_bias_without_residual_or_activation_needs_no_triton_pass(monkeypatch):
    def no_pass(*args):
        raise AssertionError("no epilogue to run")

    monkeypatch.setattr(tc, "bias_act_", no_pass)
    args = _args("cpu", torch.float32, "none", False, channels_last=True)
    got = tc.conv_bias_act(*args, cudnn_bias=True)
    torch.testing.assert_close(got, torch.ops.kiln.conv_bias_act(*args), atol=1e-5, rtol=1e-5)


def test_new_conv_kernels_are_never_the_untuned_default():
    from kiln.kernels import OpCall, candidates
    from kiln.specs import TensorSpec

    x, w, b = (TensorSpec(n, s, torch.float16) for n, s in (("x", (2, 8, 8, 8)), ("w", (8, 8, 1, 1)), ("b", (8,))))
    constants = (None, None, None, [1, 1], [0, 0], [1, 1], 1, "silu", None)
    call = OpCall(OP, (x, w, b) + (None,) * 6, (x,), "cuda", constants)
    names = [k.name for k in candidates(call)]
    assert names[0].startswith("cudnn."), names
    assert "cublaslt.conv1x1_gemm" in names, "the GEMM form is still a timed candidate"
