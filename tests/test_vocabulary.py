"""Every backend covers kiln's one vocabulary (kiln.ops.vocabulary), or names what it skips.

Each backend is checked by running what it maps a name to against the vocabulary's torch
reference where this machine can run it (CPU; Triton in its interpreter, in a child process;
TensorRT by converting, since running needs a GPU). A name added to the vocabulary fails
here for every backend that does not map it.

Tolerances: fp32, 1e-5 (the same functions in another order of operations), Triton's
sigmoid-based tanh and erf-based GELU 1e-5 as well; cuBLASLt's GEMM paths 1e-4 (sums over 16).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from interpreter import interpreted, run_interpreted_tests
from kiln import ops  # noqa: F401  (defines the kiln:: ops)
from kiln.kernels import KERNELS, cublas, cudnn, triton_conv, triton_pointwise
from kiln.ops.vocabulary import ACTIVATIONS, CONST, NOT_POINTWISE_OPS, POINTWISE_OPS, SCALAR, VALUE, activation

ACTS = list(ACTIVATIONS)
LINEAR = "kiln.linear_act.default"


def _x() -> torch.Tensor:
    return torch.linspace(-6.0, 6.0, 97).reshape(1, 97)


def test_unknown_activation_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown activation 'swish'; known: none, relu"):
        activation("swish")


def test_pointwise_ops_include_every_activation_but_those_spelled_otherwise():
    assert set(ACTIVATIONS) - set(POINTWISE_OPS) == set(NOT_POINTWISE_OPS)
    for name in set(ACTIVATIONS) & set(POINTWISE_OPS):
        assert POINTWISE_OPS[name].reference is ACTIVATIONS[name], name


# -- kiln's fused ops and the capture side ----------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
def test_the_fused_op_reference_is_the_vocabulary(act):
    x, w, b = torch.randn(4, 8), torch.randn(8, 5), torch.randn(5)
    got = torch.ops.kiln.linear_act(x, w, b, act)
    torch.testing.assert_close(got, ACTIVATIONS[act](torch.addmm(b, x, w)), atol=0, rtol=0)


MODULES = {
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "silu": nn.SiLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "sigmoid": nn.Sigmoid(),
    "tanh": nn.Tanh(),
}
CAPTURE_SKIPS = {
    "none": "no activation: the fused op without one",
    "hardswish": "Core ATen decomposes it (x * clamp(x + 3, 0, 6) / 6): fuse_pointwise fuses that chain",
}


def test_capture_side_names_every_activation_or_skips_it():
    assert set(MODULES) | set(CAPTURE_SKIPS) == set(ACTIVATIONS)


@pytest.mark.parametrize("act", sorted(MODULES))
def test_the_passes_fuse_each_activation_as_the_model_spells_it(act):
    """nn.Linear + the activation module → one kiln::linear_act ending in that activation."""
    from kiln.capture.export import capture
    from kiln.passes import run_passes

    model = nn.Sequential(nn.Linear(8, 4), MODULES[act]).eval()
    graph = capture(model, (torch.randn(3, 8),), device=torch.device("cpu"))
    graph, _ = run_passes(graph, ["dead_code", "fuse_linear"])
    fused = [n for n in graph.module.graph.nodes if n.target == torch.ops.kiln.linear_act.default]
    assert [n.args[3] for n in fused] == [act]


# -- cuDNN / cuBLASLt ---------------------------------------------------------------------------------


def test_cudnn_inplace_epilogues_cover_the_vocabulary():
    assert set(cudnn.INPLACE) == set(ACTIVATIONS)


@pytest.mark.parametrize("act", ACTS)
def test_cudnn_inplace_epilogue_matches_the_reference(act):
    x = _x()
    torch.testing.assert_close(cudnn.INPLACE[act](x.clone()), ACTIVATIONS[act](x), atol=1e-5, rtol=1e-5)


def test_cublas_epilogues_are_vocabulary_activations():
    assert set(cublas.EPILOGUES) <= set(ACTIVATIONS)  # the rest: the GEMM, then cuDNN's in-place activation


def _linear_epilogue(act: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, w, b = (t.to(device) for t in (torch.randn(16, 16), torch.randn(16, 8) / 4, torch.randn(8)))
    got = KERNELS["cublaslt.linear_epilogue"].make(LINEAR, None)((x, w, b, act), {}, [])
    return got, torch.ops.kiln.linear_act(x, w, b, act)


@pytest.mark.parametrize("act", [a for a in ACTS if a != "gelu_tanh"])
def test_cublas_linear_epilogue_matches_the_reference(act):
    """The kernel's GEMM (epilogue or GEMM + in-place activation) runs on the CPU too; not its
    GELU epilogue, which the CPU computes exactly and cuBLASLt in the tanh form (the GPU test)."""
    got, want = _linear_epilogue(act, "cpu")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_gpu_cublas_linear_epilogue_matches_the_reference(act):
    got, want = _linear_epilogue(act, "cuda")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -- Triton -----------------------------------------------------------------------------------------


def test_triton_activation_in_the_interpreter():
    run_interpreted_tests(__file__, triton_conv.triton)


@interpreted
@pytest.mark.parametrize("act", ACTS)
def test_interpreted_triton_activation_matches_the_reference(act):
    """kiln.kernels.triton_act.activation, through the conv epilogue with nothing else to add."""
    y = _x().reshape(1, 97, 1, 1)
    got = triton_conv.bias_act_(y.clone(), None, None, act)
    torch.testing.assert_close(got, ACTIVATIONS[act](y), atol=1e-5, rtol=1e-5)


def test_triton_pointwise_has_a_form_for_every_pointwise_op():
    assert set(triton_pointwise.TRITON_OPS) == set(POINTWISE_OPS)  # numerics: test_pointwise.py, interpreted


# -- TensorRT ---------------------------------------------------------------------------------------


def _tensorrt():
    from kiln.tensorrt import api

    if not api.available():
        pytest.skip("needs TensorRT or TensorRT-RTX (pip install 'kiln[tensorrt-rtx]')")
    import kiln.tensorrt as kt

    return kt


TENSORRT_SKIPS = {"none": "the input itself, no layer"}


def test_tensorrt_layers_cover_the_vocabulary():
    from kiln.tensorrt.convert.activations import GATED, LAYERS

    assert set(ACTIVATIONS) <= set(LAYERS) | set(GATED) | set(TENSORRT_SKIPS)


class _Linear(nn.Module):
    def __init__(self, act: str) -> None:
        super().__init__()
        self.act = act
        self.w, self.b = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kiln.linear_act(x, self.w, self.b, self.act)


@pytest.mark.parametrize("act", ACTS)
def test_tensorrt_converts_the_fused_op_with_each_activation(act):
    from kiln.capture.export import capture

    kt = _tensorrt()
    gm = capture(_Linear(act).eval(), (torch.randn(3, 8),), device=torch.device("cpu")).module
    reasons = {n.name: r for n, r in kt.supported_nodes(gm).items() if n.op == "call_function"}
    assert reasons and all(r is None for r in reasons.values()), reasons


def _program(op: str) -> tuple[str, int]:
    """One instruction of `op` over fresh inputs (and constants where it takes them)."""
    operands: list = []
    constants = [0.25, 0.75]  # clamp's bounds
    inputs = 0
    for kind in POINTWISE_OPS[op].operands:
        if kind in (VALUE, SCALAR):
            operands.append(inputs)
            inputs += 1
        elif kind == CONST:
            operands.append({"const": constants.pop(0)})
        else:
            operands.append({"dtype": "float16"})
    return json.dumps({"kiln_pointwise": 1, "inputs": inputs, "body": [[op, *operands]]}), inputs


class _Pointwise(nn.Module):
    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.ops.kiln.pointwise(list(xs), self.program)


@pytest.mark.parametrize("op", sorted(POINTWISE_OPS))
def test_tensorrt_converts_every_pointwise_op(op):
    from kiln.capture.export import capture

    kt = _tensorrt()
    program, n = _program(op)
    logic = op in ("and", "or", "not", "where")
    inputs = tuple((torch.rand(2, 3) > 0.5) if logic and (i == 0 or op != "where") else torch.rand(2, 3)
                   for i in range(n))
    gm = capture(_Pointwise(program).eval(), inputs, device=torch.device("cpu")).module
    reasons = {n.name: r for n, r in kt.supported_nodes(gm).items() if n.op == "call_function"}
    assert reasons and all(r is None for r in reasons.values()), reasons
