"""The Triton spatial mean against aten.mean over (H, W).

On the CPU the kernel runs in Triton's interpreter (a child process; see interpreter.py).
Tolerances: fp32 1e-5 (fp32 sums both ways, in another order); fp16 on the GPU 2e-3 (one
rounding of the result).
"""

from __future__ import annotations

import pytest
import torch

from interpreter import interpreted, run_interpreted_tests
from kiln.kernels import KERNELS
from kiln.kernels import triton_mean as tm

OP = "aten.mean.dim"


def test_triton_kernel_in_the_interpreter():
    run_interpreted_tests(__file__, tm.triton)


def _x(shape, device="cpu", dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last) + 0.5


@interpreted
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 70, 4, 4)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("keepdim", [True, False])
def test_interpreted_matches_aten(shape, splits, keepdim):
    x = _x(shape)
    got = tm.spatial_mean(x, keepdim, splits=splits)
    torch.testing.assert_close(got, x.mean((2, 3), keepdim=keepdim), atol=1e-5, rtol=1e-5)


@interpreted
def test_interpreted_other_layouts_and_dims_run_aten():
    run = KERNELS["triton.spatial_mean"].make(OP, None)
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(run((x, [2, 3], True), {}, []), x.mean((2, 3), keepdim=True))  # NCHW
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(run((cl, [1], False), {}, []), cl.mean(1))
    torch.testing.assert_close(run((cl, [-1, -2], True), {}, []), cl.mean((2, 3), keepdim=True))
    torch.testing.assert_close(run((cl, None, True), {}, []), cl.mean(None, keepdim=True))  # every dim


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 32, 112, 112), (32, 1152, 7, 7), (1, 96, 56, 56)])
def test_gpu_matches_aten(shape):
    x = _x(shape, "cuda", torch.float16)
    got = KERNELS["triton.spatial_mean"].make(OP, None)((x, [2, 3], True), {}, [])
    want = x.float().mean((2, 3), keepdim=True).half()
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dims,expected", [([2, 3], True), ([-1, -2], True), ([1], False), (None, False)])
def test_offered_for_spatial_means_only(dims, expected):
    from kiln.kernels import OpCall
    from kiln.specs import TensorSpec

    x = TensorSpec("x", (2, 8, 7, 7), torch.float16)
    call = OpCall(OP, (x, None, None), (x,), "cuda", (None, dims, True))
    assert KERNELS["triton.spatial_mean"].supports(call) == (expected and tm.triton is not None)
