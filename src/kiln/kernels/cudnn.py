"""cuDNN kernels for kiln::conv_bias_act.

cuDNN's fused "conv + bias + ReLU" and "conv + bias + add + ReLU" kernels (which torch
exposes as aten.cudnn_convolution_relu / cudnn_convolution_add_relu) do the whole op in
one kernel; other activations run as conv + bias followed by the activation in place
(`INPLACE`: the vocabulary's activations, kiln.ops.vocabulary, as torch applies them in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel

CONV_OP = "kiln.conv_bias_act.default"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INPLACE = {  # every activation of kiln.ops.vocabulary.ACTIVATIONS (GELUs out of place: torch has no GELU_)
    "none": lambda y: y,
    "relu": torch.relu_,
    "relu6": lambda y: y.clamp_(0.0, 6.0),
    "silu": lambda y: F.silu(y, inplace=True),
    "hardswish": lambda y: F.hardswish(y, inplace=True),
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


def _conv2d_on_cuda(call: OpCall) -> bool:
    x = call.inputs[0]
    return call.device_type == "cuda" and x is not None and len(x.shape) == 4 and x.dtype in FLOATS


@register_kernel(
    "cudnn.conv_bias_relu",
    provider="cudnn",
    implements=CONV_OP,
    supports=_conv2d_on_cuda,
    writes_planned_outputs=False,
    priority=Priority.CANDIDATE,  # timed against cudnn.conv_then_act, which is the untimed choice
)
def make_fused_relu(name: str, out: OutVariant | None) -> StepFn:
    """One cuDNN kernel: conv + bias [+ residual] + ReLU (other activations: not this kernel)."""

    def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
        x, w, b, stride, padding, dilation, groups, act, residual = args
        if act == "relu" and residual is None:
            return torch.ops.aten.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)
        if act == "relu":
            return torch.ops.aten.cudnn_convolution_add_relu(x, w, residual, 1.0, b, stride, padding, dilation, groups)
        return _conv_then_inplace(x, w, b, stride, padding, dilation, groups, act, residual)

    return run


def _conv_then_inplace(x, w, b, stride, padding, dilation, groups, act, residual) -> torch.Tensor:
    y = torch.ops.aten.convolution.default(x, w, b, stride, padding, dilation, False, [0, 0], groups)
    if residual is not None:
        y.add_(residual)
    return INPLACE[act](y)


@register_kernel(
    "cudnn.conv_then_act",
    provider="cudnn",
    implements=CONV_OP,
    supports=_conv2d_on_cuda,
    writes_planned_outputs=False,
    priority=Priority.DEFAULT,
)
def make_conv_then_act(name: str, out: OutVariant | None) -> StepFn:
    """cuDNN convolution with bias, then the residual add and activation in place."""
    return lambda args, kwargs, outs: _conv_then_inplace(*args)
