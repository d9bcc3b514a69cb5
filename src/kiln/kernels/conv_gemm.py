"""Convolutions that are GEMMs, run by cuBLASLt for `kiln::conv_bias_act`.

A 1×1 convolution over channels-last pixels and a convolution whose stride equals its
kernel (a ViT's patch embedding) are matrix products once the input is viewed the right
way; cuBLASLt then runs them with the bias in the GEMM, where cuDNN would pick an implicit-
GEMM convolution with layout conversions or a broadcast bias kernel around it. Each falls
back to cuDNN for inputs laid out otherwise; the tuner keeps whichever is faster per node.
"""

from __future__ import annotations

import torch

from kiln.kernels.cudnn import CONV_OP, INPLACE, _conv2d_on_cuda, _conv_then_inplace
from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel


def _plain_conv(call: OpCall) -> bool:
    """A 2-D convolution on CUDA with a bias, no dilation and one group."""
    return (
        _conv2d_on_cuda(call)
        and call.inputs[1] is not None
        and call.inputs[2] is not None
        and tuple(call.constant(5, ())) == (1, 1)
        and call.constant(6) == 1
    )


def _pointwise_conv(call: OpCall) -> bool:
    """1×1 kernel, stride 1, no padding."""
    return (
        _plain_conv(call)
        and tuple(call.inputs[1].shape[2:]) == (1, 1)
        and tuple(call.constant(3, ())) == (1, 1)
        and tuple(call.constant(4, ())) == (0, 0)
    )


@register_kernel(
    "cublaslt.conv1x1_gemm",
    provider="cublaslt",
    implements=CONV_OP,
    supports=_pointwise_conv,
    writes_planned_outputs=False,
    priority=Priority.CANDIDATE,
)
def make_conv1x1_gemm(name: str, out: OutVariant | None) -> StepFn:
    """A 1×1 convolution (stride 1, no padding, one group) over channels-last pixels as one
    GEMM: [pixels, C_in] @ [C_in, C_out] with the bias (and ReLU) in the epilogue. Squeeze-
    excitation convolutions over a 1×1 map are tiny GEMMs that cuDNN runs as slow convs."""

    def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
        x, w, b, stride, padding, dilation, groups, act, residual = args
        batch, c_in, height, width = x.shape
        if height * width != 1 and not x.is_contiguous(memory_format=torch.channels_last):
            return _conv_then_inplace(*args)  # NCHW pixels are not GEMM rows
        rows = x.permute(0, 2, 3, 1).reshape(-1, c_in)
        w_t = w.view(w.shape[0], c_in).t()
        if act == "relu" and residual is None:
            y = torch.ops.aten._addmm_activation(b, rows, w_t)
        else:
            y = torch.addmm(b, rows, w_t)
        y = y.view(batch, height, width, -1).permute(0, 3, 1, 2)
        if residual is not None:
            y.add_(residual)
            return INPLACE[act](y) if act != "none" else y
        return y if act in ("none", "relu") else INPLACE[act](y)

    return run


def _patch_conv(call: OpCall) -> bool:
    """A square k×k kernel (k > 1), stride k, no padding, and an image that k divides."""
    if not _plain_conv(call):
        return False
    k = call.inputs[1].shape[2]
    height, width = call.inputs[0].shape[2:]
    return (
        k > 1
        and tuple(call.inputs[1].shape[2:]) == (k, k)
        and tuple(call.constant(3, ())) == (k, k)
        and tuple(call.constant(4, ())) == (0, 0)
        and height % k == 0
        and width % k == 0
    )


@register_kernel(
    "cublaslt.patch_conv_gemm",
    provider="cublaslt",
    implements=CONV_OP,
    supports=_patch_conv,
    writes_planned_outputs=False,
    priority=Priority.CANDIDATE,
)
def make_patch_conv_gemm(name: str, out: OutVariant | None) -> StepFn:
    """A convolution whose stride equals its kernel (ViT's patch embedding) as one GEMM: the
    patches do not overlap, so im2col is a reshape, and [patches, C·k·k] @ [C·k·k, C_out]
    replaces an implicit-GEMM convolution with layout conversions around it. The output
    keeps the input's memory format, as the convolution's would."""

    def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
        x, w, b, stride, padding, dilation, groups, act, residual = args
        c_out, c_in, k, _ = w.shape
        batch, _, height, width = x.shape
        rows, cols = height // k, width // k
        patches = x.view(batch, c_in, rows, k, cols, k).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
        w2d = w.reshape(c_out, -1)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = torch.addmm(b, patches.view(batch * rows * cols, -1), w2d.t())
            y = y.view(batch, rows, cols, c_out).permute(0, 3, 1, 2)
        else:
            y = torch.baddbmm(b.view(1, c_out, 1), w2d.expand(batch, -1, -1), patches.transpose(1, 2))
            y = y.view(batch, c_out, rows, cols)
        if residual is not None:
            y.add_(residual)
        return y if act == "none" else INPLACE[act](y)

    return run
