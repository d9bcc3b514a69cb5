"""The Triton kernel for kiln::add_layer_norm against the op's reference implementation.

On the CPU the kernel runs in Triton's interpreter: TRITON_INTERPRET must be set before
Triton is imported, so the `test_interpreted_*` tests run in a subprocess started with it
(calling the kernel factory directly, bypassing its CUDA-only `supports`). Tolerances:
fp32 1e-5; fp16 2e-3 (one fp16 rounding of the output, statistics in fp32 both ways);
bf16 on the GPU 2e-2.
"""

from __future__ import annotations

import pytest
import torch

from interpreter import interpreted, run_interpreted_tests
from kiln import ops  # noqa: F401  (defines kiln::add_layer_norm)
from kiln.kernels import KERNELS, OpCall
from kiln.kernels import triton_layer_norm as tln
from kiln.specs import TensorSpec

OP = "kiln.add_layer_norm.default"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def test_triton_kernel_in_the_interpreter():
    """Run this file's test_interpreted_* tests in a process that starts with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__, tln.triton)


def _inputs(shape, dtype, device, residual, weight, bias):
    width = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    w = torch.randn(width, dtype=dtype, device=device) if weight else None
    b = torch.randn(width, dtype=dtype, device=device) if bias else None
    return x, r, w, b, 1e-5


def _check(args, dtype):
    run = KERNELS["triton.add_layer_norm"].make(OP, None)
    got = run(args, {}, [])
    want = torch.ops.kiln.add_layer_norm(*args)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, **TOL[dtype])


FLAGS = [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(4, 768), (3, 7, 100)])
@pytest.mark.parametrize("residual, weight, bias", FLAGS)
def test_interpreted_matches_reference(shape, dtype, residual, weight, bias):
    _check(_inputs(shape, dtype, "cpu", residual, weight, bias), dtype)


@interpreted
def test_interpreted_strided_rows_and_keyword_arguments():
    """Rows apart in memory, a transposed residual, and a weight and bias with stride 2."""
    x = torch.randn(5, 128)[:, :100]  # rows 128 apart: read in place
    r = torch.randn(100, 5).t()  # columns not unit-stride: copied
    w, b = torch.randn(100, 2)[:, 1], torch.randn(2, 100).t()[:, 0]  # weight and bias with stride 2
    run = KERNELS["triton.add_layer_norm"].make(OP, None)
    got = run((x, r), {"weight": w, "bias": b, "eps": 1e-6}, [])
    for g, want in zip(got, torch.ops.kiln.add_layer_norm(x, r, w, b, 1e-6)):
        torch.testing.assert_close(g, want, **TOL[torch.float32])


def test_launch_config_packs_narrow_rows():
    assert tln.launch_config(100) == (128, 16, 4)
    assert tln.launch_config(768) == (1024, 2, 4)
    assert tln.launch_config(8192) == (8192, 1, 16)


def _call(shape=(8, 768), dtype=torch.float16, residual=True, wshape=(768,), device="cuda"):
    spec = TensorSpec("x", shape, dtype)
    r = TensorSpec("r", shape, dtype) if residual else None
    w = TensorSpec("w", wshape, dtype)
    return OpCall(OP, (spec, r, w, w, None), (spec, spec), device)


def test_supports_cuda_float_rows_up_to_8192():
    kernel = KERNELS["triton.add_layer_norm"]
    assert kernel.implements(OP) and not kernel.implements("aten.native_layer_norm.default")
    assert kernel.supports(_call()) == (tln.triton is not None)
    assert kernel.supports(_call(residual=False)) == (tln.triton is not None)
    assert not kernel.supports(_call(device="cpu"))
    assert not kernel.supports(_call(shape=(2, 8193), wshape=(8193,)))
    assert not kernel.supports(_call(dtype=torch.float64))
    assert not kernel.supports(_call(wshape=(3,)))
    mismatched = OpCall(OP, (TensorSpec("x", (8, 768), torch.float16), TensorSpec("r", (1, 768), torch.float16)),
                        (), "cuda")
    assert not kernel.supports(mismatched)


def test_width_beyond_the_kernel_is_refused_by_name():
    with pytest.raises(ValueError, match="rows of 1..8192 elements, got 9000"):
        tln.add_layer_norm(torch.randn(2, 9000), None, None, None, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 768), (3, 7, 100), (2, 8192), (64, 1024)])
@pytest.mark.parametrize("residual, weight, bias", FLAGS)
def test_matches_reference_on_cuda(shape, dtype, residual, weight, bias):
    _check(_inputs(shape, dtype, "cuda", residual, weight, bias), dtype)


@pytest.mark.gpu
def test_replays_in_a_cuda_graph():
    x, r, w, b, eps = _inputs((128, 768), torch.float16, "cuda", True, True, True)
    run = KERNELS["triton.add_layer_norm"].make(OP, None)
    run((x, r, w, b, eps), {}, [])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, total = run((x, r, w, b, eps), {}, [])
    x.copy_(torch.randn_like(x))
    graph.replay()
    want_out, want_total = torch.ops.kiln.add_layer_norm(x, r, w, b, eps)
    torch.testing.assert_close(out, want_out, **TOL[torch.float16])
    torch.testing.assert_close(total, want_total, **TOL[torch.float16])
