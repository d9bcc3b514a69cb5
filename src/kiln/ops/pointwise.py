"""Fused elementwise programs: a small, whitelisted expression IR and the `kiln::pointwise` op.

A program is JSON text that an engine file stores as an op argument:

    {"kiln_pointwise": 1, "inputs": 2, "body": [["add", 0, 1], ["relu", 2], ["mul", 3, {"const": 0.5}]]}

Values are numbered inputs first (0 .. inputs-1), then one per body instruction in
order; an operand is either such a number (an earlier value), `{"const": number}`
(also "inf", "-inf", "nan"), or, for `cast`, `{"dtype": name}`. The last
instruction's value is the result. Inputs broadcast against each other like torch
operands do. Only the ops in `OPS` (kiln.ops.vocabulary.POINTWISE_OPS) exist: loading a
program validates it completely, so kernels generated from it (kiln.kernels.triton_pointwise)
only ever contain code that kiln wrote.

Row programs (`kiln::rowwise`, header key "kiln_rowwise") add the reductions of
`ROW_REDUCTIONS` (row_sum, row_mean, row_max, row_min: along the last axis of the broadcast
inputs, keepdim) to those ops, so a normalization or a softmax with its pointwise prologue
and epilogue is one program: e.g. RMSNorm is
`[["mul",0,0],["row_mean",2],["add",3,{"const":1e-6}],["rsqrt",4],["mul",0,5],["mul",6,1]]`.
A reduction's operand spans the whole row (its last dim is the row's), which the fusion
pass guarantees and kernels check.

The reference implementation interprets the program with torch ops, so a graph holding
`kiln::pointwise` nodes still runs under plain PyTorch. Its result is laid out like the
first input that has the result's full shape (contiguous when none has), which keeps
channels_last activations channels_last.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.ops.vocabulary import CONST, DTYPE, POINTWISE_OPS, ROW_REDUCTIONS, SCALAR, VALUE, OpDef
from kiln.specs import dtype_name

VERSION = 1
MAX_INPUTS = 64
MAX_INSTRUCTIONS = 1024
MAX_PROGRAM_CHARS = 1 << 20

# Value dtypes a program may read, produce or cast to.
DTYPES: dict[str, torch.dtype] = {
    dtype_name(d): d
    for d in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}
SPECIAL_CONSTANTS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class PointwiseProgramError(ValueError):
    """A pointwise program that is malformed, uses an unknown op, or cannot run on its inputs."""


@dataclass(frozen=True)
class Const:
    """A scalar constant operand; it promotes like a Python number does in torch."""

    value: bool | int | float

    # 1, 1.0 and True are equal in Python but promote differently in torch, and nan != nan.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Const) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[str, str]:
        return type(self.value).__name__, repr(self.value)

    def to_json(self) -> dict[str, Any]:
        v = self.value
        if isinstance(v, float) and not math.isfinite(v):
            return {"const": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
        return {"const": v}


Operand = int | Const | torch.dtype  # value number, constant, or a cast's target dtype


@dataclass(frozen=True)
class Instr:
    op: str
    args: tuple[Operand, ...]


POINTWISE_KIND, ROWWISE_KIND = "kiln_pointwise", "kiln_rowwise"  # the header key of each program kind


@dataclass(frozen=True)
class Program:
    n_inputs: int
    body: tuple[Instr, ...]
    kind: str = POINTWISE_KIND

    def to_json(self) -> str:
        """The canonical text: equal programs give equal text (the kernel cache key)."""
        body = [[ins.op, *(_operand_json(a) for a in ins.args)] for ins in self.body]
        return json.dumps(
            {self.kind: VERSION, "inputs": self.n_inputs, "body": body}, separators=(",", ":"), sort_keys=True
        )

    @property
    def reductions(self) -> tuple[Instr, ...]:
        return tuple(ins for ins in self.body if ins.op in ROW_REDUCTIONS)


def _operand_json(arg: Operand) -> Any:
    if isinstance(arg, Const):
        return arg.to_json()
    if isinstance(arg, torch.dtype):
        return {"dtype": dtype_name(arg)}
    return arg


# -- the op set: kiln.ops.vocabulary.POINTWISE_OPS ------------------------------------------------

OPS: dict[str, OpDef] = POINTWISE_OPS
ROW_OPS: dict[str, OpDef] = {**POINTWISE_OPS, **ROW_REDUCTIONS}
KIND_OPS: dict[str, dict[str, OpDef]] = {POINTWISE_KIND: OPS, ROWWISE_KIND: ROW_OPS}


# -- parsing and validation -----------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def parse_program(text: str) -> Program:
    """Validate program text completely; raise PointwiseProgramError naming the first problem."""
    return _parse(text, POINTWISE_KIND)


@functools.lru_cache(maxsize=4096)
def parse_row_program(text: str) -> Program:
    """Validate a row program (kiln::rowwise: pointwise ops and row reductions) completely."""
    return _parse(text, ROWWISE_KIND)


def _parse(text: str, kind: str) -> Program:
    ops = KIND_OPS[kind]
    if not isinstance(text, str):
        raise PointwiseProgramError(f"a pointwise program is JSON text, got {type(text).__name__}")
    if len(text) > MAX_PROGRAM_CHARS:
        raise PointwiseProgramError(f"pointwise program of {len(text)} characters exceeds {MAX_PROGRAM_CHARS}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PointwiseProgramError(f"pointwise program is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or set(obj) != {kind, "inputs", "body"}:
        raise PointwiseProgramError(f"a {kind} program is an object with exactly the keys {kind}, inputs, body")
    if obj[kind] != VERSION:
        raise PointwiseProgramError(
            f"{kind} program version {obj[kind]!r} is not supported (this kiln reads {VERSION})"
        )
    n_inputs = obj["inputs"]
    if not _is_int(n_inputs) or not 1 <= n_inputs <= MAX_INPUTS:
        raise PointwiseProgramError(f"'inputs' must be an integer in 1..{MAX_INPUTS}, got {n_inputs!r}")
    body = obj["body"]
    if not isinstance(body, list) or not 1 <= len(body) <= MAX_INSTRUCTIONS:
        raise PointwiseProgramError(f"'body' must be a list of 1..{MAX_INSTRUCTIONS} instructions")
    program = Program(n_inputs, tuple(_parse_instr(raw, n_inputs + i, i, ops) for i, raw in enumerate(body)), kind)
    _check_all_used(program)
    return program


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_instr(raw: Any, n_values: int, index: int, ops: dict[str, OpDef]) -> Instr:
    where = f"instruction {index}"
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise PointwiseProgramError(f"{where} must be a list [op, operands...], got {raw!r}")
    op, operands = raw[0], raw[1:]
    opdef = ops.get(op)
    if opdef is None:
        raise PointwiseProgramError(f"{where}: unknown op {op!r}; known: {', '.join(sorted(ops))}")
    if len(operands) != len(opdef.operands):
        raise PointwiseProgramError(f"{where}: {op} takes {len(opdef.operands)} operand(s), got {len(operands)}")
    args = tuple(_parse_operand(a, kind, n_values, f"{where} ({op})") for a, kind in zip(operands, opdef.operands))
    if not any(_is_int(a) for a in args):
        raise PointwiseProgramError(f"{where}: {op} has only constant operands; fold it before fusing")
    return Instr(op, args)


def _parse_operand(raw: Any, kind: str, n_values: int, where: str) -> Operand:
    if _is_int(raw):
        if kind not in (VALUE, SCALAR):
            raise PointwiseProgramError(f"{where}: expected a {kind} operand, got value reference {raw}")
        if not 0 <= raw < n_values:
            raise PointwiseProgramError(f"{where}: operand {raw} does not name an earlier value (0..{n_values - 1})")
        return raw
    if isinstance(raw, dict) and set(raw) == {"const"} and kind in (SCALAR, CONST):
        return Const(_parse_const(raw["const"], where))
    if isinstance(raw, dict) and set(raw) == {"dtype"} and kind == DTYPE:
        if raw["dtype"] not in DTYPES:
            raise PointwiseProgramError(f"{where}: dtype {raw['dtype']!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[raw["dtype"]]
    raise PointwiseProgramError(f"{where}: expected a {kind} operand, got {raw!r}")


def _parse_const(value: Any, where: str) -> bool | int | float:
    if isinstance(value, str) and value in SPECIAL_CONSTANTS:
        return SPECIAL_CONSTANTS[value]
    if isinstance(value, bool) or _is_int(value):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise PointwiseProgramError(f"{where}: constant {value!r} is not a number (or 'inf', '-inf', 'nan')")


def _check_all_used(program: Program) -> None:
    used = {a for ins in program.body for a in ins.args if _is_int(a)}
    last = program.n_inputs + len(program.body) - 1
    unused = [v for v in range(last) if v not in used]
    if unused:
        names = [f"input {v}" if v < program.n_inputs else f"instruction {v - program.n_inputs}" for v in unused]
        raise PointwiseProgramError(f"pointwise program computes values nothing uses: {', '.join(names)}")


# -- building -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Var:
    """A value while building: the k-th input or the result of the k-th instruction."""

    is_input: bool
    index: int


class ProgramBuilder:
    """Build a program op by op; inputs may be reordered when building."""

    def __init__(self, kind: str = POINTWISE_KIND) -> None:
        self.kind = kind
        self._n_inputs = 0
        self._body: list[tuple[str, tuple[Var | Const | torch.dtype, ...]]] = []

    def input(self) -> Var:
        self._n_inputs += 1
        return Var(True, self._n_inputs - 1)

    def emit(self, op: str, *args: Var | Const | torch.dtype | bool | int | float) -> Var:
        wrapped = tuple(a if isinstance(a, (Var, Const, torch.dtype)) else Const(a) for a in args)
        self._body.append((op, wrapped))
        return Var(False, len(self._body) - 1)

    def build(self, input_order: Sequence[int] | None = None) -> Program:
        """The validated program; `input_order[j]` is the builder input that becomes input j."""
        order = list(range(self._n_inputs)) if input_order is None else list(input_order)
        if sorted(order) != list(range(self._n_inputs)):
            raise ValueError(f"input_order {order} is not a permutation of the {self._n_inputs} inputs")
        position = {old: new for new, old in enumerate(order)}

        def number(a: Var | Const | torch.dtype) -> Operand:
            if not isinstance(a, Var):
                return a
            return position[a.index] if a.is_input else self._n_inputs + a.index

        body = tuple(Instr(op, tuple(number(a) for a in args)) for op, args in self._body)
        return _parse(Program(self._n_inputs, body, self.kind).to_json(), self.kind)


# -- the reference ------------------------------------------------------------------------------


def evaluate(program: Program, inputs: Sequence[torch.Tensor]) -> list[Any]:
    """Every value of the program (inputs first), computed with torch ops."""
    if len(inputs) != program.n_inputs:
        raise PointwiseProgramError(f"pointwise program takes {program.n_inputs} inputs, got {len(inputs)}")
    values: list[Any] = list(inputs)
    ops = KIND_OPS[program.kind]
    for ins in program.body:
        args = [values[a] if _is_int(a) else a.value if isinstance(a, Const) else a for a in ins.args]
        values.append(ops[ins.op].reference(*args))
    return values


def layout_template(inputs: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor | None:
    """The input whose layout the result takes: the first with the result's full shape."""
    return next((x for x in inputs if tuple(x.shape) == tuple(shape)), None)


def run_program(program: Program, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The program's result as a fresh tensor laid out like `layout_template`."""
    result = evaluate(program, inputs)[-1]
    template = layout_template(inputs, result.shape)
    fresh = all(result is not x for x in inputs)
    if template is None:
        if fresh and result.is_contiguous():
            return result
        return torch.empty(result.shape, dtype=result.dtype, device=result.device).copy_(result)
    if fresh and result.stride() == template.stride():
        return result
    return torch.empty_like(template, dtype=result.dtype).copy_(result)


@functools.lru_cache(maxsize=1024)
def value_dtypes(program: Program, signature: tuple[tuple[torch.dtype, bool], ...]) -> tuple[torch.dtype, ...]:
    """The dtype of every value for inputs of these (dtype, is_zero_dim): torch's promotion, exactly.

    Zero-dim tensors promote differently from dimensioned ones, hence the flag."""
    inputs = [torch.empty(() if zero_dim else (1,), dtype=d, device="meta") for d, zero_dim in signature]
    try:
        values = evaluate(program, inputs)
    except (RuntimeError, TypeError) as exc:
        dtypes = ", ".join(dtype_name(d) for d, _ in signature)
        raise PointwiseProgramError(f"pointwise program cannot run on inputs of dtype {dtypes}: {exc}") from None
    for v in values:
        if not isinstance(v, torch.Tensor) or dtype_name(v.dtype) not in DTYPES:
            raise PointwiseProgramError(f"pointwise program produces a value of unsupported type {v!r}")
    return tuple(v.dtype for v in values)


@torch.library.custom_op("kiln::pointwise", mutates_args=())
def pointwise(inputs: list[torch.Tensor], program: str) -> torch.Tensor:
    """A fused chain of elementwise ops over broadcast inputs (see kiln.ops.pointwise)."""
    return run_program(parse_program(program), inputs)


pointwise.register_fake(lambda inputs, program: run_program(parse_program(program), inputs))


@torch.library.custom_op("kiln::rowwise", mutates_args=())
def rowwise(inputs: list[torch.Tensor], program: str) -> torch.Tensor:
    """A fused row program: pointwise ops and reductions along the last axis (see kiln.ops.pointwise)."""
    return run_program(parse_row_program(program), inputs)


rowwise.register_fake(lambda inputs, program: run_program(parse_row_program(program), inputs))
