"""A Triton kernel for the spatial mean of a channels-last activation (`aten.mean.dim` over H, W).

Squeeze-excitation blocks and global pooling average every channel over the image. ATen's
reduction of a channels-last tensor over its middle dimensions reads with strides and leaves
most of the GPU idle for wide images with few channels. Here each program sums a
(pixels × channels) tile whose rows are contiguous; when batch × channel blocks are too few
to fill the GPU, the pixels are split across programs that add their partial sums into an
fp32 buffer with atomics. Other layouts and dims run ATen's kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel
from kiln.kernels.triton_lang import jit, needs_triton, tl, triton

OP = "aten.mean.dim"
BLOCK_PIXELS = 64
TARGET_PROGRAMS = 512


@jit
def spatial_mean_kernel(x_ptr, out_ptr, pixels, channels, pixels_per_split, scale,
                        ATOMIC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < channels
    first = tl.program_id(2) * pixels_per_split
    base = x_ptr + b * pixels * channels
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(first, first + pixels_per_split, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < pixels)[:, None] & col_mask[None, :]
        tile = tl.load(base + rows.to(tl.int64)[:, None] * channels + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    if ATOMIC:
        tl.atomic_add(out_ptr + b * channels + cols, acc * scale, mask=col_mask)
    else:
        tl.store(out_ptr + b * channels + cols, (acc * scale).to(out_ptr.dtype.element_ty), mask=col_mask)


def _spatial(x: Any, dims: Any) -> bool:
    return len(x.shape) == 4 and dims is not None and sorted(d % 4 for d in dims) == [2, 3]


def spatial_mean(x: torch.Tensor, keepdim: bool, splits: int | None = None) -> torch.Tensor:
    """x.mean((2, 3), keepdim) for a channels-last 4-D x, in fp32 and rounded once."""
    needs_triton("triton.spatial_mean")
    batch, channels, height, width = x.shape
    pixels = height * width
    block_c = min(64, triton.next_power_of_2(channels))
    channel_blocks = triton.cdiv(channels, block_c)
    if splits is None:
        splits = max(1, min(triton.cdiv(pixels, BLOCK_PIXELS), TARGET_PROGRAMS // (batch * channel_blocks)))
    per_split = triton.cdiv(triton.cdiv(pixels, splits), BLOCK_PIXELS) * BLOCK_PIXELS
    splits = triton.cdiv(pixels, per_split)
    atomic = splits > 1
    out = (torch.zeros if atomic else torch.empty)((batch, channels), dtype=torch.float32 if atomic else x.dtype,
                                                   device=x.device)
    if x.numel():
        spatial_mean_kernel[(batch, channel_blocks, splits)](
            x, out, pixels, channels, per_split, 1.0 / pixels, ATOMIC=atomic, BLOCK_P=BLOCK_PIXELS, BLOCK_C=block_c,
        )
    out = out.to(x.dtype)
    return out.view(batch, channels, 1, 1) if keepdim else out


def _supports(call: OpCall) -> bool:
    x = call.inputs[0]
    return (
        triton is not None
        and call.device_type == "cuda"
        and x is not None
        and len(x.shape) == 4
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and _spatial(x, call.constant(1))
    )


@register_kernel("triton.spatial_mean", provider="triton", implements=OP, supports=_supports,
                 writes_planned_outputs=False, priority=Priority.CANDIDATE)
def make_spatial_mean(name: str, out: OutVariant | None) -> StepFn:
    """Mean over H and W of a channels-last activation; anything else runs ATen's mean."""

    def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
        x, dims = args[0], args[1]
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        dtype = kwargs.get("dtype")
        fits = _spatial(x, dims) and x.is_contiguous(memory_format=torch.channels_last) and dtype is None
        if not fits:
            return torch.ops.aten.mean.dim(*args, **kwargs)
        return spatial_mean(x, keepdim)

    return run
