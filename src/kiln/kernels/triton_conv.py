"""cuDNN convolution + one Triton epilogue for `kiln::conv_bias_act` with any activation.

cuDNN's fused kernels that PyTorch reaches cover bias + ReLU only. For SiLU, sigmoid,
hardswish or GELU the alternative is convolution with bias (cuDNN adds the bias as a
separate broadcast kernel), then the residual add, then the activation: up to three passes
over the output. Here cuDNN convolves without bias and one Triton kernel applies
bias (+ residual) + activation in place: one pass. cuDNN's choice of algorithm depends on
whether it adds the bias itself (depthwise convolutions get a faster one with it), so a
second kernel leaves the bias to cuDNN and the rest to Triton. The tuner keeps the faster.
"""

from __future__ import annotations

import torch

from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel
from kiln.kernels.triton_act import activation
from kiln.kernels.triton_lang import jit, needs_triton, tl, triton

OP = "kiln.conv_bias_act.default"
TILE = 2048  # elements per program
MAX_BLOCK_COLS = 128


@jit
def bias_act_kernel(y_ptr, b_ptr, r_ptr, out_ptr, rows, cols, channels, out_row_stride, BIAS_ON_COLS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # y is a (rows x cols) matrix: (pixels x channels) channels-last, (batch*channels x
    # pixels) NCHW. Tiles of it take the bias as a row or column vector, so no element
    # computes its channel with a division. The result goes to out (y itself, or the
    # rows of another tensor: a slice of a concatenation, out_row_stride apart).
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = r < rows
    col_ok = c < cols
    mask = row_ok[:, None] & col_ok[None, :]
    offs = r.to(tl.int64)[:, None] * cols + c[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        if BIAS_ON_COLS:
            y += tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:
            y += tl.load(b_ptr + r % channels, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_RES:
        y += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = activation(y, ACT)
    out_offs = r.to(tl.int64)[:, None] * out_row_stride + c[None, :]
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _layout(y: torch.Tensor) -> bool | None:
    """True: channels-last dense; False: NCHW dense; None: neither (the kernel cannot index it)."""
    if y.is_contiguous(memory_format=torch.channels_last):
        return True
    return False if y.is_contiguous() else None


def pixel_rows(t: torch.Tensor) -> torch.Tensor | None:
    """A 4-D tensor as its [N·H·W, C] pixel rows with unit column stride, as a view (a
    channels-last tensor, or a channel slice of one), else None."""
    try:
        rows = t.permute(0, 2, 3, 1).view(-1, t.shape[1])
    except RuntimeError:
        return None
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else None


def bias_act_(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, act: str,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """act(y + bias[channel] (+ residual)) for a 4-D NCHW or channels-last y, in place, or
    into `out` (a channels-last y's pixel rows go to out's, e.g. its slice of a concatenation)."""
    channels_last = _layout(y)
    if channels_last is None:
        raise ValueError(f"bias_act_ needs a dense NCHW or channels-last tensor, got strides {y.stride()}")
    bias = None if bias is None else bias.contiguous()  # the kernel reads it as a dense vector
    if residual is not None and residual.stride() != y.stride():
        y.add_(residual)
        residual = None
    out_rows = None if out is None or not channels_last else pixel_rows(out)
    if out is not None and out_rows is None:
        return out.copy_(bias_act_(y, bias, residual, act))
    if y.numel():
        needs_triton("triton.conv_epilogue")
        batch, channels, height, width = y.shape
        rows, cols = (batch * height * width, channels) if channels_last else (batch * channels, height * width)
        block_c = min(MAX_BLOCK_COLS, triton.next_power_of_2(cols))
        block_r = max(1, TILE // block_c)
        bias_act_kernel[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))](
            y, y if bias is None else bias, y if residual is None else residual, y if out is None else out_rows,
            rows, cols, channels, cols if out is None else out_rows.stride(0), BIAS_ON_COLS=channels_last,
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act, BLOCK_R=block_r, BLOCK_C=block_c,
        )
    return y if out is None else out


def conv_bias_act(x, weight, bias, stride, padding, dilation, groups, act, residual,
                  cudnn_bias: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """cuDNN convolution, then the epilogue in one Triton pass (writing into `out` if given);
    with `cudnn_bias` the bias goes to cuDNN (which then may pick another algorithm) and
    Triton does the rest."""
    conv_bias = bias if cudnn_bias else None
    y = torch.ops.aten.convolution.default(x, weight, conv_bias, stride, padding, dilation, False, [0, 0], groups)
    if cudnn_bias:
        bias = None
        if residual is None and act == "none" and out is None:
            return y
        if _layout(y) is not None:
            return bias_act_(y, None, residual, act, out)
    if bias is None or _layout(y) is None:
        from kiln.kernels.cudnn import INPLACE

        if bias is not None:
            y.add_(bias.view(1, -1, 1, 1))
        if residual is not None:
            y.add_(residual)
        y = INPLACE[act](y)
        return y if out is None else out.copy_(y)
    return bias_act_(y, bias, residual, act, out)


def _supports(call: OpCall) -> bool:
    x = call.inputs[0]
    return triton is not None and call.device_type == "cuda" and x is not None and len(x.shape) == 4 and (
        x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


@register_kernel("triton.conv_epilogue", provider="triton", implements=OP, supports=_supports,
                 writes_planned_outputs=False, priority=Priority.CANDIDATE, writes_into=True)
def make_conv_epilogue(name: str, out: OutVariant | None) -> StepFn:
    """cuDNN convolution without bias, then bias (+ residual) + activation in one Triton pass."""
    return lambda args, kwargs, outs: conv_bias_act(*args, out=outs[0] if outs else None)


@register_kernel("triton.conv_act", provider="triton", implements=OP, supports=_supports,
                 writes_planned_outputs=False, priority=Priority.CANDIDATE, writes_into=True)
def make_conv_act(name: str, out: OutVariant | None) -> StepFn:
    """cuDNN convolution with its bias, then (residual +) activation in one Triton pass."""
    return lambda args, kwargs, outs: conv_bias_act(*args, cudnn_bias=True, out=outs[0] if outs else None)
