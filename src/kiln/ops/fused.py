"""kiln's own fused ops: `torch.library` custom ops with reference implementations.

A graph rewritten by kiln's passes still runs under plain PyTorch: each op below
computes with ATen what the fused kernels in kiln.kernels compute in one go. The
fake (meta) implementation is the reference itself, run on fake tensors, so shapes
and strides always agree with what the reference produces. The activations they end in
are kiln.ops.vocabulary.ACTIVATIONS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ops.library import define_op
from kiln.ops.vocabulary import activation


@define_op("conv_bias_act")
def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """act(conv(x, weight) + bias [+ residual])."""
    y = torch.ops.aten.convolution.default(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)
    if residual is not None:
        y = y + residual
    return activation(act)(y)


@define_op("linear_act")
def linear_act(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x @ weight_t + bias) for 2-D x; weight_t is the (in, out) transposed weight."""
    y = x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)
    return activation(act)(y)


@define_op("add_layer_norm")
def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual) over the last dim, x + residual), both contiguous.

    The sum is written contiguous whatever the inputs' layouts: it is the residual stream
    every later block reads, and a transposed sum (attention computed sequence-first)
    would make every later add and norm run on strided memory."""
    if residual is None:
        s = x.clone(memory_format=torch.contiguous_format)
    else:
        s = torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
        torch.add(x, residual, out=s)
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s
