"""A Triton kernel for `kiln::add_layer_norm`: the residual add and the layer norm in one launch.

Each program normalizes ROWS rows of the flattened (rows, width) input with the whole row
in registers (width ≤ 8192): it adds the residual, stores the sum, and normalizes the
sum as stored, with fp32 statistics, so both outputs agree with the reference op. Narrow
rows share a program so that every program still moves a few thousand elements.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel
from kiln.kernels.triton_lang import jit, needs_triton, tl, triton

OP = "kiln.add_layer_norm.default"
MAX_WIDTH = 8192
ELEMENTS_PER_PROGRAM = 2048  # rows are packed into one program up to about this many elements
MAX_ROWS = 16
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ARG_NAMES = ("x", "residual", "weight", "bias", "eps")


@jit
def add_layer_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    sum_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    res_row_stride,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + rows64 * res_row_stride + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
    else:
        s = x.to(sum_ptr.dtype.element_ty)
    out_offsets = rows64 * n_cols + cols[None, :]
    tl.store(sum_ptr + out_offsets, s, mask=mask)
    s = s.to(tl.float32)
    mean = tl.sum(s, axis=1) / n_cols
    centered = tl.where(mask, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    y = centered * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` as (rows, width) with unit column stride: a view when its layout allows, else a copy."""
    flat = t.reshape(-1, width)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def launch_config(width: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for rows of `width` elements."""
    block_n = 1 << max(width - 1, 0).bit_length()
    rows = max(1, min(MAX_ROWS, ELEMENTS_PER_PROGRAM // block_n))
    elements = rows * block_n
    num_warps = 4 if elements <= 2048 else 8 if elements <= 4096 else 16
    return block_n, rows, num_warps


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual) over the last dim, in one kernel launch."""
    width = x.shape[-1]
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"triton.add_layer_norm handles rows of 1..{MAX_WIDTH} elements, got {width}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    total = torch.empty(x.shape, dtype=dtype, device=x.device)
    n_rows = x.numel() // width
    if n_rows == 0:
        return out, total
    needs_triton("triton.add_layer_norm")
    x2 = _rows(x, width)
    r2 = x2 if residual is None else _rows(residual, width)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))  # read as dense vectors
    block_n, rows, num_warps = launch_config(width)
    add_layer_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x2,
        r2,
        x2 if weight is None else weight,
        x2 if bias is None else bias,
        out,
        total,
        n_rows,
        width,
        x2.stride(0),
        r2.stride(0),
        float(eps),
        HAS_RES=residual is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        ROWS=rows,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out, total


def supports(call: OpCall) -> bool:
    """CUDA, fp16/bf16/fp32, rows of at most MAX_WIDTH, residual shaped like x, 1-D weight and bias."""
    if triton is None or call.device_type != "cuda" or not call.inputs or call.inputs[0] is None:
        return False
    specs = dict(zip(ARG_NAMES, call.inputs))
    x, residual = specs["x"], specs.get("residual")
    if x.dtype not in DTYPES or not x.shape or not 1 <= x.shape[-1] <= MAX_WIDTH:
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return False
    return all(specs.get(name) is None or tuple(specs[name].shape) == (x.shape[-1],) for name in ("weight", "bias"))


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    named = dict(zip(ARG_NAMES, args)) | kwargs
    return [named.get(name) for name in ARG_NAMES[:4]] + [named.get("eps", 1e-5)]


@register_kernel(
    "triton.add_layer_norm",
    provider="triton",
    implements=OP,
    supports=supports,
    writes_planned_outputs=False,
    priority=Priority.DEFAULT,
)
def make_add_layer_norm(name: str, out: OutVariant | None) -> StepFn:
    """Residual add + layer norm in one Triton launch, fp32 statistics, whole row in registers."""

    def run(args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return add_layer_norm(*_bind(args, kwargs))

    return run
