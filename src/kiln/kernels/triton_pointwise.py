"""Triton kernels generated from `kiln::pointwise` programs: one launch per fused elementwise chain.

The source is written by kiln from a program that `kiln.ops.pointwise.parse_program` has
validated, op by op from the templates below, so loading an engine never runs code that
came from the file. One kernel is generated per (program, input dtypes, operand layout
kinds, rank) and cached; Triton caches the compiled binaries per specialization.

Each program instance handles BLOCK consecutive elements of the output in its memory
order (the output is dense and laid out like `kiln.ops.pointwise.layout_template`). Dims are
put in that order and merged where every operand allows, so same-layout operands read at
the output's own offset, broadcast ones through per-dim strides (0 on broadcast dims).

Arithmetic runs in fp32 for fp16/bf16 values (fp64 for fp64): intermediates are not
rounded to the narrow dtype as separate eager ops would round them; explicit casts are.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.kernels.registry import OpCall, OutVariant, Priority, StepFn, register_kernel
from kiln.kernels.triton_lang import needs_triton, triton
from kiln.ops.pointwise import (
    DTYPES,
    Const,
    Instr,
    PointwiseProgramError,
    Program,
    layout_template,
    parse_program,
    value_dtypes,
)
from kiln.specs import dtype_name

MAX_BLOCK = 1024
INT32_LIMIT = 2**31 - 1

LINEAR, SCALAR, STRIDED = "linear", "scalar", "strided"  # how an operand is addressed

_COMPUTE_TYPES = {
    torch.float16: "tl.float32",
    torch.bfloat16: "tl.float32",
    torch.float32: "tl.float32",
    torch.float64: "tl.float64",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
    torch.bool: "tl.int1",
}
_STORAGE_TYPES = {**_COMPUTE_TYPES, torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}

_HELPERS = """
@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tanh(x):
    # tl.math has no tanh and libdevice's does not run in the interpreter; ~1e-7 absolute in fp32
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
"""

# Result expressions in the result's compute type; operands are already converted to it. Every
# op of kiln.ops.vocabulary.POINTWISE_OPS has one (cast, comparisons and logic below).
_FLOAT_TEMPLATES: dict[str, str] = {
    "add": "({0} + {1})",
    "sub": "({0} - {1})",
    "mul": "({0} * {1})",
    "div": "({0} / {1})",
    "maximum": "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
    "minimum": "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
    "neg": "(-{0})",
    "abs": "tl.abs({0})",
    "reciprocal": "(1.0 / {0})",
    "exp": "tl.exp({0})",
    "log": "tl.log({0})",
    "sqrt": "tl.sqrt({0})",
    "rsqrt": "tl.rsqrt({0})",
    "erf": "tl.math.erf({0})",
    "relu": "tl.where({0} < 0, 0.0, {0})",
    "sigmoid": "tl.sigmoid({0})",
    "tanh": "_tanh({0})",
    "silu": "({0} * tl.sigmoid({0}))",
    "gelu": "(0.5 * {0} * (1.0 + tl.math.erf({0} * 0.7071067811865476)))",
    "gelu_tanh": "(0.5 * {0} * (1.0 + _tanh(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0}))))",
    "hardswish": "({0} * _clamp({0} + 3.0, 0.0, 6.0) / 6.0)",
    "hardsigmoid": "(_clamp({0} + 3.0, 0.0, 6.0) / 6.0)",
    "clamp": "_clamp({0}, {1}, {2})",
    "where": "tl.where({0}, {1}, {2})",
}
_INT_TEMPLATES: dict[str, str] = {
    **{op: _FLOAT_TEMPLATES[op] for op in ("add", "sub", "mul", "neg", "abs", "where")},
    "maximum": "tl.maximum({0}, {1})",
    "minimum": "tl.minimum({0}, {1})",
    "relu": "tl.where({0} < 0, 0, {0})",
    "clamp": "tl.minimum(tl.maximum({0}, {1}), {2})",
}
# torch computes bool add/mul/max/min as logic; Triton's int1 arithmetic would wrap around
_BOOL_TEMPLATES: dict[str, str] = {
    "add": "({0} | {1})",
    "mul": "({0} & {1})",
    "maximum": "({0} | {1})",
    "minimum": "({0} & {1})",
    "where": _FLOAT_TEMPLATES["where"],
}
_COMPARISONS = {"eq": "==", "ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_LOGIC = {"and": "({0} & {1})", "or": "({0} | {1})", "not": "({0} == 0)"}
TRITON_OPS = frozenset(_FLOAT_TEMPLATES) | frozenset(_COMPARISONS) | frozenset(_LOGIC) | {"cast"}


# -- code generation ----------------------------------------------------------------------------


def _literal(c: Const) -> str:
    v = c.value
    if isinstance(v, float) and not math.isfinite(v):
        return f'float("{v}")'
    return repr(v)


def _convert(expr: str, dtype: torch.dtype, compute: str) -> str:
    """`expr`, a value of `dtype` held in its compute type, in compute type `compute`."""
    if _COMPUTE_TYPES[dtype] == compute:
        return expr
    if compute == "tl.int1":
        return f"({expr} != 0)"
    return f"{expr}.to({compute})"


def _comparison_type(dtypes: list[torch.dtype]) -> str:
    common = functools.reduce(torch.promote_types, dtypes)
    return _COMPUTE_TYPES[common]


def _cast(expr: str, src: torch.dtype, dst: torch.dtype) -> str:
    if src == dst:
        return expr
    if dst == torch.bool:
        return f"({expr} != 0)"
    if dst in (torch.float16, torch.bfloat16):  # round to the narrow type, keep computing in fp32
        return f"{expr}.to({_STORAGE_TYPES[dst]}).to(tl.float32)"
    return _convert(expr, src, _COMPUTE_TYPES[dst])


def _instruction(ins: Instr, result: torch.dtype, dtypes: Sequence[torch.dtype]) -> str:
    """The Triton expression for one instruction; `dtypes` are the torch dtypes of all values."""

    def operand(a: Any, compute: str) -> str:
        return _literal(a) if isinstance(a, Const) else _convert(f"v{a}", dtypes[a], compute)

    refs = [a for a in ins.args if isinstance(a, int)]
    if ins.op == "cast":
        return _cast(f"v{ins.args[0]}", dtypes[ins.args[0]], ins.args[1])
    if ins.op in _COMPARISONS:
        compute = _comparison_type([dtypes[a] for a in refs])
        a, b = (operand(x, compute) for x in ins.args)
        return f"({a} {_COMPARISONS[ins.op]} {b})"
    if ins.op in _LOGIC:
        return _LOGIC[ins.op].format(*(operand(x, "tl.int1") for x in ins.args))
    compute = _COMPUTE_TYPES[result]
    templates = (
        _FLOAT_TEMPLATES if result.is_floating_point else _BOOL_TEMPLATES if result == torch.bool else _INT_TEMPLATES
    )
    if ins.op not in templates:
        raise PointwiseProgramError(f"op {ins.op!r} has no Triton form for {dtype_name(result)} values")
    args = [operand(x, compute) for x in ins.args]
    if ins.op == "where":
        args[0] = operand(ins.args[0], "tl.int1")
    return templates[ins.op].format(*args)


def _load(i: int, kind: str, dtype: torch.dtype, rank: int) -> str:
    if kind == LINEAR:
        load = f"tl.load(in{i} + idx, mask=mask)"
    elif kind == SCALAR:
        load = f"tl.load(in{i})"
    else:
        offset = " + ".join(f"c{d} * st{i}_{d}" for d in range(rank))
        load = f"tl.load(in{i} + ({offset}), mask=mask)"
    if _STORAGE_TYPES[dtype] != _COMPUTE_TYPES[dtype]:
        load += f".to({_COMPUTE_TYPES[dtype]})"
    return load


def _coordinates(rank: int) -> list[str]:
    """c0..c{rank-1}: idx split over the (outer → inner) dims, sizes in size1..size{rank-1}."""
    if rank == 1:
        return ["c0 = idx"]
    lines = ["rem = idx"]
    for d in range(rank - 1, 0, -1):
        lines.append(f"c{d} = rem % size{d}")
        lines.append(f"rem = rem // size{d}")
    lines.append("c0 = rem")
    return lines


def generate_source(
    program: Program, dtypes: Sequence[torch.dtype], kinds: Sequence[str], rank: int, int64: bool
) -> tuple[str, str]:
    """(kernel name, Python source) of the Triton kernel for `program` with these value dtypes."""
    n = program.n_inputs
    strided = [i for i in range(n) if kinds[i] == STRIDED]
    params = [f"in{i}" for i in range(n)] + ["out", "numel"]
    if strided:
        params += [f"size{d}" for d in range(1, rank)]
        params += [f"st{i}_{d}" for i in strided for d in range(rank)]
    body = [
        "pid = tl.program_id(0)" + (".to(tl.int64)" if int64 else ""),
        "idx = pid * BLOCK + tl.arange(0, BLOCK)",
        "mask = idx < numel",
    ]
    if strided:
        body += _coordinates(rank)
    body += [f"v{i} = {_load(i, kinds[i], dtypes[i], rank)}" for i in range(n)]
    for k, ins in enumerate(program.body):
        body.append(f"v{n + k} = {_instruction(ins, dtypes[n + k], dtypes)}")
    body.append(f"tl.store(out + idx, v{n + len(program.body) - 1}.to(out.dtype.element_ty), mask=mask)")
    digest = hashlib.sha1("\n".join(body + params).encode()).hexdigest()[:16]
    name = f"kiln_pointwise_{digest}"
    header = f"@triton.jit\ndef {name}({', '.join(params)}, BLOCK: tl.constexpr):\n"
    source = "import triton\nimport triton.language as tl\n" + _HELPERS + "\n\n" + header
    return name, source + "".join(f"    {line}\n" for line in body)


@functools.lru_cache(maxsize=512)
def _compile(name: str, source: str) -> Any:
    """The jitted kernel for generated `source`; linecache lets Triton read the source back."""
    needs_triton("triton.pointwise")
    filename = f"<kiln-generated {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    scope: dict[str, Any] = {"__name__": f"kiln.generated.{name}"}
    exec(compile(source, filename, "exec"), scope)  # source built above from validated IR only
    return scope[name]


# -- launch planning -----------------------------------------------------------------------------


Meta = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]  # shape, stride, dtype of one input


@dataclass(frozen=True)
class LaunchPlan:
    kernel: Any
    out_shape: tuple[int, ...]
    out_stride: tuple[int, ...]
    out_dtype: torch.dtype
    numel: int
    scalars: tuple[int, ...]  # numel, sizes, strides: the kernel's integer arguments
    block: int
    num_warps: int


def _broadcast_strides(shape: Sequence[int], stride: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    lead = len(out_shape) - len(shape)
    result = [0] * len(out_shape)
    for d, (size, st) in enumerate(zip(shape, stride)):
        if size != 1:
            result[lead + d] = st
    return result


def _output_stride(metas: Sequence[Meta], shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, ...]:
    """The strides kiln.ops.pointwise.run_program gives its result (torch decides, on meta)."""
    inputs = [torch.empty_strided(s, st, dtype=d, device="meta") for s, st, d in metas]
    template = layout_template(inputs, shape)
    if template is None:
        return torch.empty(shape, dtype=dtype, device="meta").stride()
    return torch.empty_like(template, dtype=dtype).stride()


def coalesce(out_shape: Sequence[int], strides: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """Dims in the memory order of the output (`strides[-1]`), merged where every operand allows.

    Returns (sizes outer → inner, per-operand strides over those dims)."""
    dims = sorted((d for d in range(len(out_shape)) if out_shape[d] != 1), key=lambda d: -strides[-1][d])
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in strides]
    for d in dims:
        if sizes and all(m[-1] == st[d] * out_shape[d] for m, st in zip(merged, strides)):
            sizes[-1] *= out_shape[d]
            for m, st in zip(merged, strides):
                m[-1] = st[d]
            continue
        sizes.append(out_shape[d])
        for m, st in zip(merged, strides):
            m.append(st[d])
    if not sizes:
        return [1], [[0] for _ in strides]
    return sizes, merged


def _kind(strides: list[int], out_strides: list[int]) -> str:
    if strides == out_strides:
        return LINEAR
    return SCALAR if not any(strides) else STRIDED


@functools.lru_cache(maxsize=4096)
def launch_plan(program_text: str, metas: tuple[Meta, ...]) -> LaunchPlan:
    """Everything about a launch that depends only on the program and the inputs' metadata."""
    program = parse_program(program_text)
    for i, (_, _, dtype) in enumerate(metas):
        if dtype not in _COMPUTE_TYPES:
            raise PointwiseProgramError(f"pointwise input {i} has dtype {dtype}; supported: {', '.join(DTYPES)}")
    dtypes = value_dtypes(program, tuple((d, len(s) == 0) for s, _, d in metas))
    out_shape = tuple(torch.broadcast_shapes(*(s for s, _, _ in metas)))
    out_stride = _output_stride(metas, out_shape, dtypes[-1])
    strides = [_broadcast_strides(s, st, out_shape) for s, st, _ in metas] + [list(out_stride)]
    sizes, merged = coalesce(out_shape, strides)
    kinds = [_kind(m, merged[-1]) for m in merged[:-1]]
    numel = math.prod(out_shape)
    block = min(MAX_BLOCK, max(128, 1 << max(numel - 1, 0).bit_length()))
    reach = max([numel + block] + [sum((n - 1) * st for n, st in zip(sizes, m)) for m in merged])
    strided = [i for i, k in enumerate(kinds) if k == STRIDED]
    scalars = (numel, *(sizes[1:] if strided else ()), *(merged[i][d] for i in strided for d in range(len(sizes))))
    name, source = generate_source(program, dtypes, kinds, len(sizes), reach > INT32_LIMIT)
    return LaunchPlan(
        _compile(name, source), out_shape, out_stride, dtypes[-1], numel, scalars, block, max(1, min(4, block // 256))
    )


def launch(inputs: Sequence[torch.Tensor], program: str) -> torch.Tensor:
    """Run `program` over `inputs` in one kernel; the result equals kiln::pointwise's."""
    plan = launch_plan(program, tuple((tuple(x.shape), tuple(x.stride()), x.dtype) for x in inputs))
    out = torch.empty_strided(plan.out_shape, plan.out_stride, dtype=plan.out_dtype, device=inputs[0].device)
    if plan.numel:
        grid = (triton.cdiv(plan.numel, plan.block),)
        plan.kernel[grid](*inputs, out, *plan.scalars, BLOCK=plan.block, num_warps=plan.num_warps)
    return out


def clear_caches() -> None:
    """Forget generated kernels and launch plans (after switching TRITON_INTERPRET, in tests)."""
    _compile.cache_clear()
    launch_plan.cache_clear()


# -- registration ---------------------------------------------------------------------------------


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], str]:
    named = dict(zip(("inputs", "program"), args)) | kwargs
    return list(named["inputs"]), named["program"]


def supports(call: OpCall) -> bool:
    return triton is not None and call.device_type == "cuda"


@register_kernel(
    "triton.pointwise",
    provider="triton",
    implements="kiln.pointwise.default",
    supports=supports,
    writes_planned_outputs=False,
    priority=Priority.DEFAULT,
)
def make_pointwise(name: str, out: OutVariant | None) -> StepFn:
    """A Triton kernel generated for the fused elementwise program: one launch, one pass over memory."""

    def run(args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[torch.Tensor]) -> torch.Tensor:
        inputs, program = _bind(args, kwargs)
        return launch(inputs, program)

    return run
