"""A Triton GEMM whose epilogue is the whole fused op: bias, residual and any activation.

cuBLASLt's epilogues cover bias + ReLU / tanh-GELU; anything else (SiLU, exact GELU, a
residual add) costs kiln a second pass over the output. For the 1×1 convolutions of
mobile networks that pass is most of the cost: with few input channels the GEMM reads
little and writes a lot, so reading the output back and writing it again doubles its time.
Here one Triton kernel computes the tile, adds bias (+ residual), applies the activation in
fp32 and stores once. It implements `kiln::conv_bias_act` for 1×1 convolutions over
channels-last pixels and `kiln::linear_act`, in fp16/bf16 (tl.dot would round fp32 inputs
to TF32), as timed candidates in two tile shapes: the tuner keeps it only where it beats
cuBLAS/cuDNN on the node's real shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kiln.kernels.conv_gemm import _pointwise_conv
from kiln.kernels.cudnn import _conv_then_inplace
from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel
from kiln.kernels.triton_act import activation
from kiln.kernels.triton_conv import pixel_rows
from kiln.kernels.triton_lang import jit, needs_triton, tl, triton

CONV_OP = "kiln.conv_bias_act.default"
LINEAR_OP = "kiln.linear_act.default"
HALF = (torch.float16, torch.bfloat16)


class Tiles(NamedTuple):
    """Largest tile of a config; narrow matrices get narrower tiles (down to tl.dot's 16)."""

    m: int
    n: int
    k: int
    warps: int
    stages: int


CONFIGS = {"wide": Tiles(128, 128, 64, 8, 3), "narrow": Tiles(64, 64, 64, 4, 4)}
GROUP_M = 8  # row tiles visited together, so their weight columns stay in L2


@jit
def tile_ranges(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """The output rows and columns of this program's tile: programs walk GROUP row tiles
    together down each column of tiles, so the weight columns they read stay in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group_rows = min(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@jit
def gemm_act_kernel(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, M, N, K, stride_am, stride_wk, stride_wn,
                    stride_rm, stride_om, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP: tl.constexpr):
    rm, rn = tile_ranges(M, N, BLOCK_M, BLOCK_N, GROUP)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    rows = rm.to(tl.int64)[:, None]
    if HAS_RES:
        acc += tl.load(res_ptr + rows * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = activation(acc, ACT)
    tl.store(out_ptr + rows * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _tile(size: int, largest: int) -> int:
    return max(16, min(largest, triton.next_power_of_2(size)))


def gemm_act(a: torch.Tensor, w_kn: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
             act: str, tiles: Tiles = CONFIGS["wide"], out: torch.Tensor | None = None) -> torch.Tensor:
    """act(a @ w_kn + bias (+ residual)) for a 2-D `a` with unit column stride, into `out`
    (an [M, N] view with unit column stride) or a fresh dense [M, N] tensor. `residual`, if
    given, is [M, N] with unit column stride; the kernel reads `bias` as a dense vector."""
    m, k = a.shape
    n = w_kn.shape[1]
    bias = None if bias is None else bias.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    needs_triton("triton GEMM")
    block_m, block_n, block_k = _tile(m, tiles.m), _tile(n, tiles.n), _tile(k, tiles.k)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    gemm_act_kernel[grid](
        a, w_kn, a if bias is None else bias, a if residual is None else residual, out, m, n, k,
        a.stride(0), w_kn.stride(0), w_kn.stride(1), 0 if residual is None else residual.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP=GROUP_M, num_warps=tiles.warps, num_stages=tiles.stages,
    )
    return out


def conv1x1_act(x, weight, bias, stride, padding, dilation, groups, act, residual,
                tiles: Tiles = CONFIGS["wide"], out: torch.Tensor | None = None) -> torch.Tensor:
    """A 1×1 stride-1 convolution over channels-last x as one GEMM with the op's epilogue,
    stored into `out`'s pixel rows if given (its slice of a concatenation); other layouts
    run cuDNN."""
    batch, c_in, height, width = x.shape
    rows = pixel_rows(x)
    res_rows = None if residual is None else pixel_rows(residual)
    out_rows = None if out is None else pixel_rows(out)
    if rows is None or (residual is not None and res_rows is None) or (out is not None and out_rows is None):
        y = _conv_then_inplace(x, weight, bias, stride, padding, dilation, groups, act, residual)
        return y if out is None else out.copy_(y)
    c_out = weight.shape[0]
    y = gemm_act(rows, weight.view(c_out, c_in).t(), bias, res_rows, act, tiles, out_rows)
    return out if out is not None else y.view(batch, height, width, c_out).permute(0, 3, 1, 2)


def linear_act(x, w_t, bias, act, tiles: Tiles = CONFIGS["wide"]) -> torch.Tensor:
    if x.stride(1) != 1:
        x = x.contiguous()
    return gemm_act(x, w_t, bias, None, act, tiles)


def _half_on_cuda(spec) -> bool:
    return triton is not None and spec is not None and spec.dtype in HALF


def _conv_fits(call: OpCall) -> bool:
    return call.device_type == "cuda" and _half_on_cuda(call.inputs[0]) and _pointwise_conv(call)


def _linear_fits(call: OpCall) -> bool:
    x = call.inputs[0]
    return call.device_type == "cuda" and _half_on_cuda(x) and len(x.shape) == 2 and x.dtype == call.inputs[1].dtype


def _register(config: str, tiles: Tiles) -> None:
    @register_kernel(f"triton.conv1x1_act.{config}", provider="triton", implements=CONV_OP, supports=_conv_fits,
                     writes_planned_outputs=False, priority=Priority.CANDIDATE, writes_into=True)
    def make_conv(name: str, out: OutVariant | None) -> StepFn:
        """A 1×1 convolution over channels-last pixels as one Triton GEMM ending in the
        op's bias, residual and activation."""
        return lambda args, kwargs, outs: conv1x1_act(*args, tiles=tiles, out=outs[0] if outs else None)

    @register_kernel(f"triton.linear_act.{config}", provider="triton", implements=LINEAR_OP, supports=_linear_fits,
                     writes_planned_outputs=False, priority=Priority.CANDIDATE)
    def make_linear(name: str, out: OutVariant | None) -> StepFn:
        """A linear layer as one Triton GEMM ending in the bias and any activation (exact GELU too)."""
        return lambda args, kwargs, outs: linear_act(*args, tiles=tiles)


for _config, _tiles in CONFIGS.items():
    _register(_config, _tiles)
