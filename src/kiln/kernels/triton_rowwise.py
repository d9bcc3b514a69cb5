"""Triton kernels generated from `kiln::rowwise` programs: one program instance per row.

A row program (kiln.ops.pointwise) is pointwise ops and reductions along the last axis; the
kernel holds one row of every operand in registers (up to `MAX_ROW` elements), so a
normalization or a softmax with its prologue and epilogue reads its input once and writes
its output once. The source is written by kiln from a validated program, op by op from the
pointwise templates (kiln.kernels.triton_pointwise) plus the reductions below, so loading an
engine never runs code that came from the file.

Rows are the output's leading dims, taken in the output's memory order and merged where every
operand allows; each operand is addressed through its (broadcast) strides over those dims and
its stride along the row (0 for an operand broadcast along it, e.g. a per-row scale).
Arithmetic runs in fp32 for fp16/bf16 values, reductions included.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel
from kiln.kernels.triton_lang import triton
from kiln.kernels.triton_pointwise import (
    _COMPUTE_TYPES,
    _HELPERS,
    _STORAGE_TYPES,
    _broadcast_strides,
    _compile,
    _coordinates,
    _instruction,
    coalesce,
)
from kiln.ops.pointwise import (
    DTYPES,
    PointwiseProgramError,
    Program,
    evaluate,
    layout_template,
    parse_row_program,
    value_dtypes,
)
from kiln.ops.vocabulary import ROW_REDUCTIONS

MAX_ROW = 8192  # elements of a row held in registers; longer rows are not candidates
INT32_LIMIT = 2**31 - 1
FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# (masked fill, Triton reduction) per reduction; the mean divides the sum by the row length
_REDUCE = {
    "row_sum": ("0.0", "tl.sum({0}, axis=0)"),
    "row_mean": ("0.0", "(tl.sum({0}, axis=0) / N)"),
    "row_max": ('float("-inf")', "tl.max({0}, axis=0)"),
    "row_min": ('float("inf")', "tl.min({0}, axis=0)"),
}
assert set(_REDUCE) == set(ROW_REDUCTIONS), "every row reduction needs a Triton form"


def generate_source(program: Program, dtypes: Sequence[torch.dtype], rank: int, int64: bool) -> tuple[str, str]:
    """(kernel name, Python source) of the row kernel for `program` with these value dtypes."""
    n = program.n_inputs
    params = [f"in{i}" for i in range(n)] + ["out", "N"]
    params += [f"size{d}" for d in range(1, rank)]
    params += [f"st{i}_{d}" for i in range(n + 1) for d in range(rank)] + [f"cs{i}" for i in range(n)]
    body = [
        "row = tl.program_id(0)" + (".to(tl.int64)" if int64 else ""),
        "cols = tl.arange(0, BLOCK)",
        "mask = cols < N",
        *(line.replace("idx", "row") for line in _coordinates(rank)),
    ]

    def base(i: int) -> str:
        return " + ".join(f"c{d} * st{i}_{d}" for d in range(rank))

    for i in range(n):
        load = f"tl.load(in{i} + ({base(i)}) + cols * cs{i}, mask=mask, other=0)"
        if _STORAGE_TYPES[dtypes[i]] != _COMPUTE_TYPES[dtypes[i]]:
            load += f".to({_COMPUTE_TYPES[dtypes[i]]})"
        body.append(f"v{i} = {load}")
    for k, ins in enumerate(program.body):
        if ins.op in _REDUCE:
            fill, reduce = _REDUCE[ins.op]
            (a,) = ins.args
            operand = f"v{a}" if dtypes[a].is_floating_point else f"v{a}.to(tl.float32)"
            expr = reduce.format(f"tl.where(mask, {operand}, {fill})")
        else:
            expr = _instruction(ins, dtypes[n + k], dtypes)
        body.append(f"v{n + k} = {expr}")
    result = f"v{n + len(program.body) - 1}"
    body.append(f"tl.store(out + ({base(n)}) + cols, {result}.to(out.dtype.element_ty), mask=mask)")
    digest = hashlib.sha1("\n".join(body + params).encode()).hexdigest()[:16]
    name = f"kiln_rowwise_{digest}"
    header = f"@triton.jit\ndef {name}({', '.join(params)}, BLOCK: tl.constexpr):\n"
    source = "import triton\nimport triton.language as tl\n" + _HELPERS + "\n\n" + header
    return name, source + "".join(f"    {line}\n" for line in body)


Meta = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class RowPlan:
    name: str
    source: str
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    rows: int
    scalars: tuple[int, ...]  # N, sizes, strides: the kernel's integer arguments
    block: int
    num_warps: int


@functools.lru_cache(maxsize=4096)
def row_plan(program_text: str, metas: tuple[Meta, ...]) -> RowPlan:
    """Everything about a launch that depends only on the program and the inputs' metadata;
    PointwiseProgramError where the kernel cannot run it (a row too long, a reduction over
    a broadcast value, a result narrower than the row)."""
    program = parse_row_program(program_text)
    for i, (_, _, dtype) in enumerate(metas):
        if dtype not in _COMPUTE_TYPES:
            raise PointwiseProgramError(f"rowwise input {i} has dtype {dtype}; supported: {', '.join(DTYPES)}")
    dtypes = value_dtypes(program, tuple((d, len(s) == 0) for s, _, d in metas))
    out_shape = tuple(torch.broadcast_shapes(*(s for s, _, _ in metas)))
    if not out_shape or not 1 <= out_shape[-1] <= MAX_ROW:
        raise PointwiseProgramError(f"rows of {out_shape} are not 1..{MAX_ROW} elements long")
    width = out_shape[-1]
    shapes = [v.shape for v in evaluate(program, [torch.empty(s, dtype=d, device="meta") for s, _, d in metas])]
    if tuple(shapes[-1]) != out_shape:
        raise PointwiseProgramError(f"the row program's result {tuple(shapes[-1])} is not the row shape {out_shape}")
    for ins in program.reductions:
        if shapes[ins.args[0]][-1] != width:
            raise PointwiseProgramError(f"{ins.op} reduces a value broadcast along the row")
    if not all(d.is_floating_point or d == torch.bool for d in dtypes[program.n_inputs:]):
        raise PointwiseProgramError("row kernels compute floating-point rows")
    lead = out_shape[:-1]
    strides = [_broadcast_strides(s, st, out_shape) for s, st, _ in metas]
    out_stride = list(torch.empty(out_shape, device="meta").stride())
    sizes, merged = coalesce(lead or (1,), [st[:-1] or [0] for st in strides] + [out_stride[:-1] or [0]])
    rows = math.prod(lead)
    block = max(16, 1 << max(width - 1, 0).bit_length())
    reach = max(
        [rows * width]
        + [sum((n - 1) * st for n, st in zip(sizes, m)) + (width - 1) * s[-1] for m, s in zip(merged, strides)]
    )
    name, source = generate_source(program, dtypes, len(sizes), reach > INT32_LIMIT)
    scalars = (width, *sizes[1:], *(m[d] for m in merged for d in range(len(sizes))), *(s[-1] for s in strides))
    warps = 1 if block <= 256 else 4 if block <= 2048 else 8
    return RowPlan(name, source, out_shape, dtypes[-1], rows, scalars, block, warps)


def launch(inputs: Sequence[torch.Tensor], program: str) -> torch.Tensor:
    """Run the row program over `inputs`, one program instance per row; equals kiln::rowwise."""
    plan = row_plan(program, tuple((tuple(x.shape), tuple(x.stride()), x.dtype) for x in inputs))
    out = torch.empty(plan.out_shape, dtype=plan.out_dtype, device=inputs[0].device)
    if plan.rows and plan.out_shape[-1]:
        kernel = _compile(plan.name, plan.source)
        kernel[(plan.rows,)](*inputs, out, *plan.scalars, BLOCK=plan.block, num_warps=plan.num_warps)
    template = layout_template(inputs, plan.out_shape)
    if template is not None and template.stride() != out.stride():  # the reference's layout: the first full input's
        return torch.empty_like(template, dtype=out.dtype).copy_(out)
    return out


def supports(call: OpCall) -> bool:
    """CUDA, a valid row program, and rows of at most MAX_ROW elements (the output's last dim;
    selection sees a list argument's tensors only through the output)."""
    if triton is None or call.device_type != "cuda" or len(call.outputs) != 1:
        return False
    out = call.outputs[0]
    if not out.shape or not 1 <= out.shape[-1] <= MAX_ROW or out.dtype not in FLOATS:
        return False
    try:
        parse_row_program(call.constant(1))
    except PointwiseProgramError:
        return False
    return True


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], str]:
    named = dict(zip(("inputs", "program"), args)) | kwargs
    return list(named["inputs"]), named["program"]


@register_kernel(
    "triton.rowwise",
    provider="triton",
    implements="kiln.rowwise.default",
    supports=supports,
    writes_planned_outputs=False,
    priority=Priority.DEFAULT,
)
def make_rowwise(name: str, out: OutVariant | None) -> StepFn:
    """A Triton kernel generated for the row program (a normalization, a softmax, with their
    prologue and epilogue): one program instance per row, the row in registers."""

    def run(args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[torch.Tensor]) -> torch.Tensor:
        inputs, program = _bind(args, kwargs)
        return launch(inputs, program)

    return run


def clear_caches() -> None:
    _compile.cache_clear()
    row_plan.cache_clear()
