"""kiln's one vocabulary of elementwise operations, each with its torch reference.

- `ACTIVATIONS`: the activations a fused op ends in (`kiln::conv_bias_act`, `kiln::linear_act`
  take one by name), as out-of-place torch functions.
- `POINTWISE_OPS`: the ops of the pointwise IR (`kiln::pointwise` programs, see
  kiln.ops.pointwise), with the kinds of their operands and their torch reference. Its
  activations are the same functions as `ACTIVATIONS`' (relu6 is `clamp(x, 0, 6)` there).

Every backend maps these names to what it runs — cuDNN's in-place epilogues
(kiln.kernels.cudnn.INPLACE), cuBLASLt's GEMM epilogues (kiln.kernels.cublas.EPILOGUES),
Triton's activation function (kiln.kernels.triton_act), the Triton pointwise code generator
(kiln.kernels.triton_pointwise), TensorRT layers (kiln.tensorrt.convert.activations) — and
says which names it leaves to another path. tests/test_vocabulary.py holds each backend to the
whole vocabulary. A new activation is added here first; that test then names every backend
that lacks it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _relu6(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, 0.0, 6.0)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Activation] = {
    "none": _identity,
    "relu": torch.relu,
    "relu6": _relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def activation(name: str) -> Activation:
    """The reference of activation `name`; ValueError naming the known ones otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


# -- the pointwise IR's ops ------------------------------------------------------------------------

# Operand kinds: "value" an earlier value; "scalar" a value or a constant; "const" a constant;
# "dtype" a cast target.
VALUE, SCALAR, CONST, DTYPE = "value", "scalar", "const", "dtype"


@dataclass(frozen=True)
class OpDef:
    operands: tuple[str, ...]
    reference: Callable[..., Any]


def _maximum(a: Any, b: Any) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    return torch.maximum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, min=b)


def _minimum(a: Any, b: Any) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    return torch.minimum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, max=b)


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpDef:
    return OpDef((VALUE,), fn)


def _binary(fn: Callable[[Any, Any], Any]) -> OpDef:
    return OpDef((SCALAR, SCALAR), fn)


POINTWISE_OPS: dict[str, OpDef] = {
    # arithmetic (Python operators: torch promotion rules, constants on either side)
    "add": _binary(operator.add),
    "sub": _binary(operator.sub),
    "mul": _binary(operator.mul),
    "div": _binary(operator.truediv),
    "maximum": _binary(_maximum),
    "minimum": _binary(_minimum),
    "neg": _unary(torch.neg),
    "abs": _unary(torch.abs),
    "reciprocal": _unary(torch.reciprocal),
    "exp": _unary(torch.exp),
    "log": _unary(torch.log),
    "sqrt": _unary(torch.sqrt),
    "rsqrt": _unary(torch.rsqrt),
    "erf": _unary(torch.erf),
    # activations (the fused ops' own, but "none" and "relu6", which programs spell as clamp)
    **{
        name: _unary(ACTIVATIONS[name])
        for name in ("relu", "sigmoid", "tanh", "silu", "gelu", "gelu_tanh", "hardswish")
    },
    "hardsigmoid": _unary(F.hardsigmoid),
    "clamp": OpDef((VALUE, CONST, CONST), torch.clamp),
    # comparisons and logic
    "eq": _binary(operator.eq),
    "ne": _binary(operator.ne),
    "gt": _binary(operator.gt),
    "ge": _binary(operator.ge),
    "lt": _binary(operator.lt),
    "le": _binary(operator.le),
    "and": OpDef((VALUE, VALUE), torch.logical_and),
    "or": OpDef((VALUE, VALUE), torch.logical_or),
    "not": _unary(torch.logical_not),
    "where": OpDef((VALUE, SCALAR, SCALAR), torch.where),
    # conversion
    "cast": OpDef((VALUE, DTYPE), lambda x, dtype: x.to(dtype)),
}

# Reductions along the last axis (keepdim) that row programs (kiln::rowwise) add to POINTWISE_OPS:
# one row of the broadcast inputs in, one value per row out, broadcast back to later ops.
ROW_REDUCTIONS: dict[str, OpDef] = {
    "row_sum": OpDef((VALUE,), lambda x: torch.sum(x, -1, keepdim=True)),
    "row_mean": OpDef((VALUE,), lambda x: torch.mean(x, -1, keepdim=True)),
    "row_max": OpDef((VALUE,), lambda x: torch.amax(x, -1, keepdim=True)),
    "row_min": OpDef((VALUE,), lambda x: torch.amin(x, -1, keepdim=True)),
}

# Activations a pointwise program spells with other ops.
NOT_POINTWISE_OPS = {"none": "nothing to compute", "relu6": "clamp(x, 0, 6)"}
