"""8-bit GEMM kernels for kiln::qlinear (a quantized linear layer, kiln.ops.quant) and
kiln::qlinear_grouped (G of them reading one input, run as one GEMM over all G·N columns): cuBLASLt's
int8 and float8 GEMMs through torch._int_mm and torch._scaled_mm, with the activation's
quantization and the output's dequantization each one Triton pass.

    int8.int_mm               quantize x (Triton) → _int_mm: int8 × int8 → int32 (cuBLASLt)
                              → one Triton epilogue: acc · x_scale · w_scale[n] + bias, activation
    fp8.scaled_mm_tensorwise  quantize x (Triton) → _scaled_mm: e4m3 × e4m3 → fp32, unit scales
                              → the same epilogue
    fp8.scaled_mm_rowwise     quantize x (Triton) → _scaled_mm with row-wise scales (x_scale per
                              row, w_scale per column) and the bias in cuBLASLt's epilogue, in
                              the output dtype → the activation in place
    triton.qlinear_{int8,fp8}.{wide,narrow}
                              quantize x (Triton) → one Triton 8-bit GEMM whose epilogue
                              dequantizes, adds the bias and activates: the int32 / fp32
                              accumulator never goes to memory (timed candidates, two tile shapes)

The weight is stored [N, K] row-major in its 8-bit format (kiln.quant.fuse lays it out at build
time), so `w_q.t()` is the column-major [K, N] operand both GEMMs require, a view: nothing is
converted or transposed per call. Scale tensors the GEMM wants on the device are made on a
step's first call (before any CUDA-graph capture) and reused.

Where each applies (`supports`), so selection only offers it where it runs: CUDA, an fp16/bf16
activation, w_q in the kernel's format, Triton present (the quantize and epilogue passes); int8:
M > 16 and K, N multiples of 8 (torch._int_mm); fp8: compute capability ≥ 8.9 and K, N
multiples of 16 (torch._scaled_mm), row-wise scaling also needs torch ≥ 2.5's row-wise path
(tried by the tuner like any candidate: one that fails is dropped). The reference
(kiln.reference: dequantize, fp16 GEMM) is the fallback everywhere else.

Numbers: the 8-bit values are multiplied exactly (int32 accumulation for int8, fp32 for fp8)
and scaled once in fp32, where the reference rounds each dequantized operand to fp16 before
an fp16 GEMM: the two agree to about 1e-3 relative (tests/test_quant_qlinear.py).
"""

from __future__ import annotations

import torch

from kiln.kernels.cudnn import INPLACE
from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel
from kiln.kernels.triton_act import activation
from kiln.kernels.triton_gemm import tile_ranges
from kiln.kernels.triton_lang import jit, needs_triton, tl, triton

QLINEAR_OP = "kiln.qlinear.default"
GROUPED_OP = "kiln.qlinear_grouped.default"
HALF = (torch.float16, torch.bfloat16)
INT8_RANGE = (-128.0, 127.0)
FP8_RANGE = (-448.0, 448.0)


@jit
def quantize_kernel(x_ptr, q_ptr, M, K, stride_xm, stride_xk, scale, QMIN: tl.constexpr, QMAX: tl.constexpr,
                    IS_INT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    rows = rm.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), QMIN), QMAX)  # x / scale as torch divides: IEEE
    if IS_INT:
        y = (y + 12582912.0) - 12582912.0  # ± 1.5·2²³ rounds an fp32 |y| < 2²² half to even, as torch.round
    else:
        # round to e4m3's grid here (half to even), so the cast below is exact wherever it runs: the
        # spacing at y is 2^(exponent - 3) (3 mantissa bits), never finer than subnormals' 2^-9
        exponent = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        spacing = ((exponent + 124) << 23).to(tl.float32, bitcast=True)
        y = (y + spacing * 12582912.0) - spacing * 12582912.0
    tl.store(q_ptr + rows * K + rk[None, :], y.to(q_ptr.dtype.element_ty), mask=mask)


@jit
def dequant_epilogue_kernel(acc_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, stride_am, stride_om, x_scale,
                            GROUP_N, stride_og, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GROUPED: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < N
    mask = (rm < M)[:, None] & col_ok[None, :]
    rows = rm.to(tl.int64)[:, None]
    acc = tl.load(acc_ptr + rows * stride_am + rn[None, :], mask=mask, other=0).to(tl.float32)
    w_scale = tl.load(w_scale_ptr + rn, mask=col_ok, other=0.0)
    y = acc * (w_scale * x_scale)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = activation(y, ACT)
    if GROUPED:  # column j of the accumulator is column j % GROUP_N of group j // GROUP_N
        cols = (rn // GROUP_N).to(tl.int64) * stride_og + rn % GROUP_N
    else:
        cols = rn
    tl.store(out_ptr + rows * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x / scale rounded (int8: half to even) and saturated to `dtype`, as a dense [M, K] tensor:
    one Triton pass over x (any strides), what kiln::quantize_per_tensor computes."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    if q.numel() == 0:
        return q
    needs_triton("8-bit quantize")
    qmin, qmax = INT8_RANGE if dtype == torch.int8 else FP8_RANGE
    grid = (triton.cdiv(m, 32), triton.cdiv(k, 128))
    quantize_kernel[grid](x, q, m, k, x.stride(0), x.stride(1), float(scale), QMIN=qmin, QMAX=qmax,
                          IS_INT=dtype == torch.int8, BLOCK_M=32, BLOCK_K=128, num_warps=4)
    return q


def dequant_epilogue(acc: torch.Tensor, x_scale: float, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     act: str, dtype: torch.dtype, groups: int = 0) -> torch.Tensor:
    """act(acc · x_scale · w_scale[n] + bias) as `dtype`, computed in fp32: one Triton pass over
    the GEMM's int32 or fp32 accumulator [M, N] (unit column stride). With `groups` G > 0 the N
    columns are G groups of N / G, written as G dense [M, N / G] slices of a [G, M, N / G] result
    (w_scale and bias are read as flat [N] vectors)."""
    m, n = acc.shape
    group_n = n // groups if groups else n
    out = torch.empty((groups, m, group_n) if groups else (m, n), dtype=dtype, device=acc.device)
    if out.numel() == 0:
        return out
    needs_triton("8-bit GEMM epilogue")
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
    dequant_epilogue_kernel[grid](acc, w_scale, acc if bias is None else bias, out, m, n, acc.stride(0),
                                  out.stride(-2), float(x_scale), group_n, m * group_n, HAS_BIAS=bias is not None,
                                  ACT=act, GROUPED=groups > 0, BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return out


# -- where each kernel applies ------------------------------------------------------------------------


def _shapes(call: OpCall, fmt: torch.dtype) -> tuple[int, int, int] | None:
    """(M, K, N) of the one GEMM a qlinear (N output columns) or qlinear_grouped (G·N) call
    runs, on CUDA with a half-precision x and w_q in `fmt`; else None. The epilogues read
    w_scale[n] and bias[n] for every output column n, so both must be exactly w_q.shape[:-1]
    (fp32 scales, the bias in x's dtype): a broadcastable [1] or [G, 1] would be read past its end.
    G, N and K are at least 1 (dequant_epilogue and qgemm take groups=0 to mean ungrouped)."""
    x, _, w, s = call.inputs[:4]
    bias = call.inputs[4] if len(call.inputs) > 4 else None
    if call.device_type != "cuda" or triton is None or x is None or w is None or s is None:
        return None
    weight_dims = 3 if call.op == GROUPED_OP else 2
    if x.dtype not in HALF or w.dtype != fmt or len(x.shape) != 2 or len(w.shape) != weight_dims:
        return None
    if any(d < 1 for d in w.shape):
        return None
    channels = tuple(w.shape[:-1])
    if s.dtype != torch.float32 or tuple(s.shape) != channels:
        return None
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != channels):
        return None
    (m, k), wk = x.shape, w.shape[-1]
    n = w.shape[0] * w.shape[1] if weight_dims == 3 else w.shape[0]
    return (m, k, n) if wk == k else None


def _int8_fits(call: OpCall) -> bool:
    shapes = _shapes(call, torch.int8)
    if shapes is None:
        return False
    m, k, n = shapes
    return m > 16 and k % 8 == 0 and n % 8 == 0


def fp8_capable() -> bool:
    """This machine's GPU has float8 tensor cores (compute capability 8.9 or later)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _fp8_fits(call: OpCall) -> bool:
    shapes = _shapes(call, torch.float8_e4m3fn)
    if shapes is None or not fp8_capable():
        return False
    m, k, n = shapes
    return m > 0 and k % 16 == 0 and n % 16 == 0


# -- the kernels ----------------------------------------------------------------------------------------


def _operands(args: tuple, grouped: bool) -> tuple:
    """(x, x_scale, w_q, w_scale, bias, act, G) of a qlinear call; a qlinear_grouped's [G, N, K]
    weight, [G, N] scales and bias as one GEMM's [G·N, K], [G·N], G = 0 for an ungrouped call.
    The kernels read w_q row by row and w_scale and bias as dense vectors, so those come back
    contiguous (as the weights kiln writes already are: no copy then)."""
    x, x_scale, w_q, w_scale, bias, act = args
    g = w_q.shape[0] if grouped else 0
    if grouped:
        w_q, w_scale, bias = w_q.flatten(0, 1), w_scale.flatten(), None if bias is None else bias.flatten()
    bias = None if bias is None else bias.contiguous()
    return x, x_scale, w_q.contiguous(), w_scale.contiguous(), bias, act, g


@register_kernel("int8.int_mm", provider="cublaslt", implements=(QLINEAR_OP, GROUPED_OP), supports=_int8_fits,
                 writes_planned_outputs=False, priority=Priority.DEFAULT)
def make_int8(name: str, out: OutVariant | None) -> StepFn:
    """int8 × int8 → int32 on cuBLASLt (torch._int_mm), x quantized and the output dequantized
    (+ bias, activation) in one Triton pass each; qlinear_grouped as one GEMM over every group's
    columns, the epilogue writing each group's dense slice."""
    groups = name == GROUPED_OP

    def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
        x, x_scale, w_q, w_scale, bias, act, g = _operands(args, groups)
        acc = torch._int_mm(quantize(x, x_scale, torch.int8), w_q.t())
        return dequant_epilogue(acc, x_scale, w_scale, bias, act, x.dtype, g)

    return run


class _DeviceScalars:
    """Scale tensors a step's GEMM wants on the device, made on first use (a step's first call
    runs before CUDA-graph capture) and reused: no host-to-device copy per call."""

    def __init__(self) -> None:
        self.cache: dict[tuple, torch.Tensor] = {}

    def full(self, shape: tuple[int, ...], value: float, device: torch.device) -> torch.Tensor:
        key = (shape, value, device)
        t = self.cache.get(key)
        if t is None:
            t = self.cache[key] = torch.full(shape, value, dtype=torch.float32, device=device)
        return t


@register_kernel("fp8.scaled_mm_tensorwise", provider="cublaslt", implements=(QLINEAR_OP, GROUPED_OP),
                 supports=_fp8_fits, writes_planned_outputs=False, priority=Priority.DEFAULT)
def make_fp8_tensorwise(name: str, out: OutVariant | None) -> StepFn:
    """float8 e4m3 × e4m3 → fp32 on cuBLASLt (torch._scaled_mm, unit per-tensor scales), x
    quantized and the output dequantized per channel (+ bias, activation) in one Triton pass each;
    qlinear_grouped as one GEMM, as int8.int_mm."""
    scalars = _DeviceScalars()
    groups = name == GROUPED_OP

    def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
        x, x_scale, w_q, w_scale, bias, act, g = _operands(args, groups)
        one = scalars.full((), 1.0, x.device)
        acc = torch._scaled_mm(quantize(x, x_scale, w_q.dtype), w_q.t(), one, one, out_dtype=torch.float32)
        return dequant_epilogue(acc, x_scale, w_scale, bias, act, x.dtype, g)

    return run


@register_kernel("fp8.scaled_mm_rowwise", provider="cublaslt", implements=QLINEAR_OP, supports=_fp8_fits,
                 writes_planned_outputs=False, priority=Priority.CANDIDATE)
def make_fp8_rowwise(name: str, out: OutVariant | None) -> StepFn:
    """float8 e4m3 × e4m3 with the scales and bias in the GEMM's own epilogue (torch._scaled_mm's
    row-wise scaling: x_scale per row, w_scale per column), the activation in place after.
    A timed candidate: row-wise scaling's support varies with the torch and cuBLAS build."""
    scalars = _DeviceScalars()

    def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
        x, x_scale, w_q, w_scale, bias, act = args
        scale_a = scalars.full((x.shape[0], 1), x_scale, x.device)
        y = torch._scaled_mm(quantize(x, x_scale, w_q.dtype), w_q.t(), scale_a, w_scale.view(1, -1), bias=bias,
                             out_dtype=x.dtype)
        return INPLACE[act](y)

    return run


# -- one Triton 8-bit GEMM with the dequantize epilogue: no int32 / fp32 accumulator in memory ----------


@jit
def qgemm_kernel(a_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_om, x_scale,
                 GROUP_N, stride_og, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GROUPED: tl.constexpr,
                 IS_INT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr):
    rm, rn = tile_ranges(M, N, BLOCK_M, BLOCK_N, GROUP)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]  # [K, N] tile of the [N, K] weight
    if IS_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, out_dtype=acc.dtype)  # int8 x int8 accumulates in int32
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    w_scale = tl.load(w_scale_ptr + rn, mask=col_ok, other=0.0)
    y = acc.to(tl.float32) * (w_scale * x_scale)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = activation(y, ACT)
    if GROUPED:
        cols = (rn // GROUP_N).to(tl.int64) * stride_og + rn % GROUP_N
    else:
        cols = rn
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask)


QGEMM_CONFIGS = {"wide": (128, 128, 128, 8, 3), "narrow": (64, 64, 128, 4, 4)}  # (M, N, K tiles, warps, stages)


def qgemm(x: torch.Tensor, x_scale: float, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
          act: str, groups: int = 0, config: str = "wide") -> torch.Tensor:
    """kiln::qlinear (or, with `groups`, qlinear_grouped on flattened [G·N, K] weights): x quantized
    in one Triton pass, then one Triton 8-bit GEMM whose epilogue dequantizes, adds the bias,
    applies the activation and stores in x's dtype: the accumulator never leaves registers."""
    m, k = x.shape
    n = w_q.shape[0]
    group_n = n // groups if groups else n
    out = torch.empty((groups, m, group_n) if groups else (m, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    xq = quantize(x, x_scale, w_q.dtype)
    tm, tn, tk, warps, stages = QGEMM_CONFIGS[config]
    block_m = max(16, min(tm, triton.next_power_of_2(m)))
    block_n = max(16, min(tn, triton.next_power_of_2(n)))
    block_k = max(32, min(tk, triton.next_power_of_2(k)))
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    qgemm_kernel[grid](xq, w_q, w_scale, xq if bias is None else bias, out, m, n, k, xq.stride(0), w_q.stride(0),
                       out.stride(-2), float(x_scale), group_n, m * group_n, HAS_BIAS=bias is not None, ACT=act,
                       GROUPED=groups > 0, IS_INT=w_q.dtype == torch.int8, BLOCK_M=block_m, BLOCK_N=block_n,
                       BLOCK_K=block_k, GROUP=8, num_warps=warps, num_stages=stages)
    return out


def _triton_int8_fits(call: OpCall) -> bool:
    shapes = _shapes(call, torch.int8)
    return shapes is not None and shapes[1] % 16 == 0  # K: whole 16-byte rows for the tile loads


def _triton_fp8_fits(call: OpCall) -> bool:
    shapes = _shapes(call, torch.float8_e4m3fn)
    return shapes is not None and shapes[1] % 16 == 0 and fp8_capable()


def _register_triton(fmt: str, fits: object) -> None:
    for config in QGEMM_CONFIGS:

        @register_kernel(f"triton.qlinear_{fmt}.{config}", provider="triton", implements=(QLINEAR_OP, GROUPED_OP),
                         supports=fits, writes_planned_outputs=False, priority=Priority.CANDIDATE)
        def make(name: str, out: OutVariant | None, config: str = config) -> StepFn:
            """A Triton 8-bit GEMM (int8 → int32, or e4m3 → fp32) ending in the dequantize + bias +
            activation epilogue, x quantized in one Triton pass before it; a timed candidate."""
            grouped = name == GROUPED_OP

            def run(args: tuple, kwargs: dict, outs: list) -> torch.Tensor:
                x, x_scale, w_q, w_scale, bias, act, g = _operands(args, grouped)
                return qgemm(x, x_scale, w_q, w_scale, bias, act, g, config)

            return run


_register_triton("int8", _triton_int8_fits)
_register_triton("fp8", _triton_fp8_fits)
