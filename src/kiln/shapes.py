"""Symbolic shapes as data: sizes that are expressions over named dims, and what the runtime
does with them (see docs/dynamic-shapes.md).

An expression is JSON: an int, a dim name (a str), or one operation ``{op: [args]}`` with
`op` in a closed vocabulary (add, mul, floordiv, mod, max, min). ``["batch", 3, 224, 224]``
is a shape; ``{"mul": [128, "seq", "batch"]}`` a size. Inside step arguments, where a str is
an ordinary argument, a size is wrapped: ``{"sym": expr}``. Expressions are evaluated, never
executed, and `validate` bounds their size, depth, names and integers before a loader trusts
them.

The runtime side: `bind` reads the dims' values off the actual inputs (an `InputError`
names the range or the disagreeing inputs), `specialize_plan` turns a plan with expressions
into the plain fixed-shape plan for one binding, `ShapeCache` keeps per-binding state (a
CUDA graph, say) in a bounded LRU, and `Buckets` / `pad_to` / `unpad` implement padding a
dim up to the next bucket. Imports nothing from kiln's build side.
"""

from __future__ import annotations

import bisect
import collections
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Union

import torch

from kiln.errors import InputError

Expr = Union[int, str, dict[str, list[Any]]]  # noqa: UP007  (a JSON value, see the module doc)
Binding = Mapping[str, int]

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
MAX_SIZE = 2**31 - 1  # the largest value a dim may take (int32 indexing stays safe)
MAX_INT = 2**62  # integer literals in expressions stay far from overflow in any language
MAX_NODES = 256  # per expression
MAX_DEPTH = 32
OPS: dict[str, tuple[int, int | None]] = {  # op → (fewest, most) arguments
    "add": (1, None),
    "mul": (1, None),
    "floordiv": (2, 2),
    "mod": (2, 2),
    "max": (1, None),
    "min": (1, None),
}


class ShapeExprError(ValueError):
    """An expression is malformed, names an unknown dim, or cannot be evaluated."""


# -- dims ----------------------------------------------------------------------------------------


class Dim:
    """A named dynamic dimension with TensorRT's three points: the engine accepts every size
    from `min` to `max`, is tuned at `opt`, and plans memory for `max`.

        batch = kiln.Dim("batch", min=1, opt=8, max=64)
        kiln.build(model, (x,), dynamic_shapes=({0: batch},))

    `opt=None` means "the size of the example inputs" (the build resolves it).
    """

    __slots__ = ("name", "min", "opt", "max")

    def __init__(self, name: str, min: int = 1, opt: int | None = None, max: int | None = None):  # noqa: A002
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"a Dim's name must be an identifier of at most 64 characters, got {name!r}")
        if max is None:
            raise ValueError(
                f"Dim({name!r}) needs max=: kiln plans memory for the largest shape, e.g. "
                f"kiln.Dim({name!r}, min={min}, max=64)"
            )
        for label, value in (("min", min), ("max", max)) + ((("opt", opt),) if opt is not None else ()):
            if not _is_int(value):
                raise ValueError(f"Dim({name!r}): {label} must be an int, got {value!r}")
        if not 1 <= min <= max <= MAX_SIZE:
            raise ValueError(f"Dim({name!r}) needs 1 <= min <= max <= {MAX_SIZE}, got min={min}, max={max}")
        if opt is not None and not min <= opt <= max:
            raise ValueError(f"Dim({name!r}) needs min <= opt <= max, got min={min}, opt={opt}, max={max}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "min", int(min))
        object.__setattr__(self, "opt", None if opt is None else int(opt))
        object.__setattr__(self, "max", int(max))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Dim is immutable; use with_opt() for a copy with another opt")

    def with_opt(self, opt: int) -> Dim:
        return Dim(self.name, self.min, opt, self.max)

    @property
    def static(self) -> bool:
        """One size only (min == max): an ordinary fixed axis."""
        return self.min == self.max

    def contains(self, size: int) -> bool:
        return self.min <= size <= self.max

    def describe(self) -> str:
        """'batch 1..64 (opt 8)', as inspect and error messages show a range."""
        opt = "" if self.opt is None else f" (opt {self.opt})"
        return f"{self.name} {self.min}..{self.max}{opt}"

    def to_json(self) -> dict[str, Any]:
        if self.opt is None:
            raise ValueError(f"Dim({self.name!r}) has no opt yet; the build resolves it from the example inputs")
        return {"name": self.name, "min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_json(cls, obj: Any) -> Dim:
        if not isinstance(obj, dict) or set(obj) != {"name", "min", "opt", "max"}:
            raise ValueError(f"a dim must be an object with name, min, opt and max, got {obj!r}")
        if obj["opt"] is None:
            raise ValueError(f"dim {obj['name']!r} has no opt")
        return cls(obj["name"], obj["min"], obj["opt"], obj["max"])

    @classmethod
    def parse(cls, name: str, text: str) -> Dim | int:
        """A CLI range: 'MIN:OPT:MAX' is a Dim, a single 'N' a fixed size."""
        parts = text.strip().split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) == 1 and values[0] >= 1:
            return values[0]
        if len(values) != 3:
            raise ValueError(f"--{name} takes N (fixed) or MIN:OPT:MAX (a range, e.g. 1:8:64), got {text!r}")
        return cls(name, values[0], values[1], values[2])

    def _key(self) -> tuple[Any, ...]:
        return (self.name, self.min, self.opt, self.max)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dim) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        opt = "" if self.opt is None else f", opt={self.opt}"
        return f"kiln.Dim({self.name!r}, min={self.min}{opt}, max={self.max})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dims_from_json(obj: Any) -> dict[str, Dim]:
    """The engine file's `dims` list as name → Dim (each checked; names unique)."""
    if not isinstance(obj, list):
        raise ValueError(f"dims must be a list, got {type(obj).__name__}")
    dims: dict[str, Dim] = {}
    for item in obj:
        dim = Dim.from_json(item)
        if dim.name in dims:
            raise ValueError(f"dim {dim.name!r} is listed twice")
        dims[dim.name] = dim
    return dims


# -- expressions ---------------------------------------------------------------------------------


def validate(expr: Any, dims: Iterable[str] | None = None) -> Expr:
    """Check `expr` is a well-formed expression over `dims` (None: any dim name); returns it.

    Bounded: at most MAX_NODES nodes and MAX_DEPTH levels, integers within ±MAX_INT, every
    op in the vocabulary with a legal number of arguments."""
    known = None if dims is None else set(dims)
    count = 0

    def walk(e: Any, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise ShapeExprError(f"a shape expression has more than {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            raise ShapeExprError(f"a shape expression is nested more than {MAX_DEPTH} deep")
        if _is_int(e):
            if abs(e) > MAX_INT:
                raise ShapeExprError(f"integer {e} in a shape expression is out of range")
            return
        if isinstance(e, str):
            if not NAME.match(e):
                raise ShapeExprError(f"{e!r} is not a dim name")
            if known is not None and e not in known:
                raise ShapeExprError(f"shape expression names dim {e!r}, which is not one of {sorted(known)}")
            return
        if not isinstance(e, dict) or len(e) != 1:
            raise ShapeExprError(f"{e!r} is not a shape expression (int, dim name or {{op: [args]}})")
        (op, args), = e.items()
        if op not in OPS:
            raise ShapeExprError(f"unknown shape operation {op!r}; known: {', '.join(OPS)}")
        low, high = OPS[op]
        if not isinstance(args, list) or len(args) < low or (high is not None and len(args) > high):
            count_text = f"{low}{'' if high == low else ' or more'}"
            raise ShapeExprError(f"shape operation {op!r} takes {count_text} arguments, got {args!r}")
        for a in args:
            walk(a, depth + 1)

    walk(expr, 1)
    return expr


def evaluate(expr: Expr, binding: Binding) -> Any:
    """The value of `expr` with each dim bound (ints give an int; SymInts, as in a fake-tensor
    shape function, give a SymInt)."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, str):
        try:
            return binding[expr]
        except KeyError:
            raise ShapeExprError(f"dim {expr!r} has no value (bound: {sorted(binding)})") from None
    (op, args), = expr.items()
    values = [evaluate(a, binding) for a in args]
    if op == "add":
        return _fold(values, lambda a, b: a + b)
    if op == "mul":
        return _fold(values, lambda a, b: a * b)
    if op in ("floordiv", "mod"):
        a, b = values
        if isinstance(b, int) and b == 0:
            raise ShapeExprError(f"division by zero evaluating {render(expr)}")
        return a // b if op == "floordiv" else a % b
    symbolic = any(isinstance(v, torch.SymInt) for v in values)
    if op == "max":
        return _fold(values, torch.sym_max if symbolic else max)
    return _fold(values, torch.sym_min if symbolic else min)


def _fold(values: list[Any], fn: Callable[[Any, Any], Any]) -> Any:
    result = values[0]
    for v in values[1:]:
        result = fn(result, v)
    return result


def dims_of(expr: Expr) -> set[str]:
    if isinstance(expr, str):
        return {expr}
    if isinstance(expr, dict):
        (_, args), = expr.items()
        return set().union(*(dims_of(a) for a in args))
    return set()


def is_static(expr: Any) -> bool:
    return _is_int(expr)


_PRECEDENCE = {"add": 1, "mul": 2, "floordiv": 2, "mod": 2}


def render(expr: Expr) -> str:
    """A readable form: 'batch', '128*seq*batch', '(h - 1)//2 + 1', 'min(128, 128*seq)'."""

    def show(e: Expr, outer: int) -> str:
        if isinstance(e, (int, str)):
            return str(e)
        (op, args), = e.items()
        if op in ("max", "min"):
            return f"{op}({', '.join(show(a, 0) for a in args)})"
        mine = _PRECEDENCE[op]
        if op == "add":
            text = show(args[0], mine)
            for a in args[1:]:
                text += f" - {-a}" if _is_int(a) and a < 0 else f" + {show(a, mine)}"
        elif op == "mul":
            text = "*".join(show(a, mine + 1 if i else mine) for i, a in enumerate(args))
        else:
            text = f"{show(args[0], mine)}{'//' if op == 'floordiv' else ' % '}{show(args[1], mine + 1)}"
        return f"({text})" if mine < outer else text

    return show(expr, 0)


def render_shape(shape: Sequence[Expr]) -> str:
    return "(" + ", ".join(render(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def nondecreasing(expr: Expr, lows: Binding) -> bool:
    """True where `expr` provably never shrinks as any dim grows from its low end (`lows`:
    each dim's min). Planning memory once, for the largest shape, is sound for a size with
    this property. Conservative: False means "not shown", not "shrinks"."""

    def low(e: Expr) -> int:
        return evaluate(e, lows)

    def ok(e: Expr) -> bool:
        if isinstance(e, (int, str)):
            return True
        (op, args), = e.items()
        if op in ("add", "max", "min"):
            return all(ok(a) for a in args)
        if op == "mul":  # each factor nondecreasing and never negative (its least value is at the low end)
            return all(ok(a) and low(a) >= 0 for a in args)
        if op == "floordiv":
            return ok(args[0]) and _is_int(args[1]) and args[1] > 0
        return False  # mod wraps around

    return ok(expr)


# -- sympy → expressions (build side; torch's shape environment speaks sympy) ------------------------


# sympy function classes by name (torch.utils._sympy.functions defines its own Max/Min/Mod)
FUNCTIONS = {"FloorDiv": "floordiv", "CleanDiv": "floordiv", "Mod": "mod", "PythonMod": "mod", "Max": "max",
             "Min": "min"}


def from_sympy(expr: Any, names: Mapping[str, str]) -> Expr:
    """A sympy size expression (a SymInt's `node.expr`) as a kiln expression; `names` maps
    the shape environment's symbols (by name, e.g. 's77') to dim names."""
    import sympy

    def conv(e: Any) -> Expr:
        if isinstance(e, sympy.Integer):
            return int(e)
        if isinstance(e, sympy.Symbol):
            try:
                return names[e.name]
            except KeyError:
                raise ShapeExprError(
                    f"size {e} is not one of the dims ({', '.join(f'{k}={v}' for k, v in names.items())}); "
                    "it is probably data-dependent (nonzero, masked select, item()), which kiln engines cannot plan"
                ) from None
        if isinstance(e, sympy.Add):
            return make("add", [conv(a) for a in e.args])
        if isinstance(e, sympy.Mul):
            return make("mul", [conv(a) for a in e.args])
        if isinstance(e, sympy.Pow) and isinstance(e.exp, sympy.Integer) and 1 <= int(e.exp) <= 8:
            return make("mul", [conv(e.base)] * int(e.exp))
        op = FUNCTIONS.get(type(e).__name__)  # torch's own sympy functions (FloorDiv, PythonMod, Max ...)
        if op is not None and (op in ("max", "min") or len(e.args) == 2):
            return make(op, [conv(a) for a in e.args])
        raise ShapeExprError(f"size expression {e} uses {type(e).__name__}, which kiln shapes cannot express")

    return conv(expr)


def make(op: str, args: list[Expr]) -> Expr:
    """One operation, flattened and with constants folded: make('mul', [2, 'b', 64]) is
    {'mul': [128, 'b']}; make('add', ['b', 0]) is 'b'."""
    if op in ("add", "mul"):
        flat: list[Expr] = []
        for a in args:
            flat.extend(a[op] if isinstance(a, dict) and op in a else [a])
        const = 0 if op == "add" else 1
        rest = []
        for a in flat:
            if _is_int(a):
                const = const + a if op == "add" else const * a
            else:
                rest.append(a)
        if op == "mul" and const == 0:
            return 0
        if not rest:
            return const
        if op == "add":  # 'h - 1' reads as {"add": ["h", -1]}, '128*seq' as {"mul": [128, "seq"]}
            terms = rest + ([const] if const != 0 else [])
        else:
            terms = ([const] if const != 1 else []) + rest
        return terms[0] if len(terms) == 1 else {op: terms}
    if all(_is_int(a) for a in args):
        return evaluate({op: list(args)}, {})
    return {op: list(args)}


def expr_of(value: Any, names: Mapping[str, str]) -> Expr:
    """An int stays an int; a SymInt becomes its expression over the dims."""
    if isinstance(value, torch.SymInt):
        return from_sympy(value.node.expr, names)
    if _is_int(value):
        return int(value)
    raise ShapeExprError(f"{value!r} is not a size")


# -- binding inputs to dims --------------------------------------------------------------------------


@dataclass(frozen=True)
class InputShape:
    """What an engine input may look like: its name and one expression per axis."""

    name: str
    shape: tuple[Expr, ...]


def check_bindable(inputs: Sequence[InputShape], dims: Mapping[str, Dim]) -> None:
    """Every dim must appear alone as some input axis (so its value can be read off the
    inputs), and every name an input uses must be a declared dim."""
    plain = {d for spec in inputs for d in spec.shape if isinstance(d, str)}
    for spec in inputs:
        for axis, d in enumerate(spec.shape):
            validate(d, dims)
            missing = dims_of(d) - plain
            if missing:
                raise ShapeExprError(
                    f"input {spec.name!r} axis {axis} has size {render(d)}, and {', '.join(sorted(missing))} is "
                    "no input's whole axis: its value could not be read off the inputs"
                )
    unused = set(dims) - plain
    if unused:
        raise ShapeExprError(f"dim(s) {', '.join(sorted(unused))} appear on no input axis")


def bind(shapes: Sequence[Sequence[int]], inputs: Sequence[InputShape], dims: Mapping[str, Dim]) -> dict[str, int]:
    """Each dim's value, read off the actual input shapes; an InputError when an input has the
    wrong rank or a fixed axis of the wrong size, when a dim's value is outside its range, or
    when two inputs disagree about one dim."""
    if len(shapes) != len(inputs):
        names = ", ".join(s.name for s in inputs)
        raise InputError(f"the engine takes {len(inputs)} input(s) ({names}), got {len(shapes)}")
    binding: dict[str, int] = {}
    seen: dict[str, str] = {}  # dim → where its value came from
    for i, (shape, spec) in enumerate(zip(shapes, inputs)):
        where = f"input {i} ({spec.name!r})"
        if len(shape) != len(spec.shape):
            raise InputError(
                f"{where} has rank {len(shape)} (shape {tuple(shape)}); the engine expects rank "
                f"{len(spec.shape)}, shape {render_shape(spec.shape)}"
            )
        for axis, (size, d) in enumerate(zip(shape, spec.shape)):
            if not isinstance(d, str):
                continue
            dim = dims[d]
            if not dim.contains(size):
                raise InputError(
                    f"{where} has {d} = {size} (axis {axis} of shape {tuple(shape)}); this engine takes {d} from "
                    f"{dim.min} to {dim.max} ({dim!r}). "
                    + ("Split the input into parts of at most "
                       f"{dim.max}, or rebuild with a larger max." if size > dim.max else
                       f"Rebuild with min={size} or lower to run this size." if size >= 1 else
                       "An engine runs no empty input (a Dim's min is at least 1): skip the call, or make "
                       "the empty outputs yourself.")
                )
            if d in binding and binding[d] != size:
                raise InputError(
                    f"{where} has {d} = {size} (axis {axis}), but {seen[d]} has {d} = {binding[d]}; "
                    f"every axis named {d} must have the same size"
                )
            binding[d] = size
            seen.setdefault(d, f"{where} axis {axis}")
    for i, (shape, spec) in enumerate(zip(shapes, inputs)):
        for axis, (size, d) in enumerate(zip(shape, spec.shape)):
            if isinstance(d, str):
                continue
            want = evaluate(d, binding)
            if size != want:
                fixed = f"the engine was built for {want}" if _is_int(d) else f"{render(d)} = {want} here"
                raise InputError(
                    f"input {i} ({spec.name!r}) has size {size} at axis {axis} (shape {tuple(shape)}); {fixed}. "
                    f"The engine takes shape {render_shape(spec.shape)}"
                    + (" (this axis is fixed: rebuild with the new shape, or with a Dim for this axis)."
                       if _is_int(d) else ".")
                )
    return binding


def binding_key(binding: Binding, order: Sequence[str]) -> tuple[int, ...]:
    """A hashable key for a binding, the dims in the engine's order."""
    return tuple(binding[d] for d in order)


def probe_bindings(dims: Sequence[Dim]) -> list[dict[str, int]]:
    """The bindings a build checks a dynamic engine at: everything at opt, at min, at max; each
    dim alone at its min and max; and each dim at an awkward size (a prime strictly inside its
    range), which a kernel valid only for multiples of something fails."""
    if not dims:
        return [{}]
    opt = {d.name: d.opt if d.opt is not None else d.min for d in dims}
    found = [opt, {d.name: d.min for d in dims}, {d.name: d.max for d in dims}]
    for d in dims:
        found += [{**opt, d.name: d.min}, {**opt, d.name: d.max}]
        odd = awkward_size(d)
        if odd is not None:
            found.append({**opt, d.name: odd})
    unique: list[dict[str, int]] = []
    for b in found:
        if b not in unique:
            unique.append(b)
    return unique


def awkward_size(dim: Dim) -> int | None:
    """The largest prime strictly between min and max other than opt, if any (a size no
    power of two or tile width divides)."""
    for n in range(dim.max - 1, dim.min, -1):
        if n != dim.opt and n > 2 and all(n % p for p in range(2, int(n**0.5) + 1)):
            return n
        if dim.max - n > 10_000:
            break
    return None


# -- specializing a plan ------------------------------------------------------------------------------

SLOT_SIZE_FIELDS = ("offset", "nbytes", "base_offset")


def specialize_plan(plan: Mapping[str, Any], binding: Binding) -> dict[str, Any]:
    """The fixed-shape plan for one binding: every expression in input/output specs, slots
    (shape, stride, offset, nbytes, base_offset) and step arguments (`{"sym": e}`) evaluated.

    Everything else is shared with `plan`, not copied. The result has the layout of a static
    plan, so the runtime runs it like one. An arena slot that would reach past
    `memory.arena_bytes` (planned for the largest shape) is a ShapeExprError."""
    out = dict(plan)
    for key in ("inputs", "graph_inputs", "outputs"):
        if key in plan:
            out[key] = [None if s is None else {**s, "shape": _shape(s["shape"], binding)} for s in plan[key]]
    arena = plan.get("memory", {}).get("arena_bytes")
    slots = []
    for i, slot in enumerate(plan.get("slots", [])):
        new = {**slot, "shape": _shape(slot["shape"], binding), "stride": _shape(slot["stride"], binding)}
        for key in SLOT_SIZE_FIELDS:
            if key in slot and not _is_int(slot[key]):
                new[key] = _value(slot[key], binding)
        if arena is not None and "offset" in new and new["offset"] + new.get("nbytes", 0) > arena:
            raise ShapeExprError(
                f"slot {i} would end at byte {new['offset'] + new['nbytes']} with {dict(binding)}, past the "
                f"{arena}-byte arena planned for the largest shape; the plan is inconsistent (rebuild the engine)"
            )
        slots.append(new)
    if "slots" in plan:
        out["slots"] = slots
    if "steps" in plan:
        out["steps"] = [
            {**s, "args": substitute(s["args"], binding),
             "kwargs": {k: substitute(v, binding) for k, v in s["kwargs"].items()}}
            for s in plan["steps"]
        ]
    if "output_refs" in plan:
        out["output_refs"] = substitute(plan["output_refs"], binding)
    return out


def as_static_plan(
    plan: Mapping[str, Any], binding: Binding, fallbacks: bool | Mapping[str, bool] = False, tight: bool = False
) -> dict[str, Any]:
    """`plan` specialized at `binding` (specialize_plan) in exactly the form of a static plan:
    no `dims`, no `planned_at`, no `fallback` fields. With `fallbacks` a mapping (fallback
    kernel → whether it writes planned outputs), every step that has a fallback runs it (without
    its out-variant where it does not write planned outputs); with `tight`, the arena is what
    this binding's slots need (a static plan's arena is exactly that)."""
    out = specialize_plan(plan, binding)
    for key in ("dims", "paddable", "buckets"):
        out.pop(key, None)
    memory = {k: v for k, v in out.get("memory", {}).items() if k != "planned_at"}
    if tight:
        ends = [s["offset"] + s["nbytes"] for s in out.get("slots", []) if s.get("kind") in ("buffer", "slice")]
        memory["arena_bytes"] = max(ends, default=0)
    out["memory"] = memory
    steps = []
    for step in out.get("steps", []):
        name = step.get("fallback")
        if isinstance(fallbacks, Mapping) and isinstance(name, str):
            steps.append(use_fallback(step, name, bool(fallbacks.get(name, True))))
        else:
            steps.append({k: v for k, v in step.items() if k != "fallback"})
    out["steps"] = steps
    return out


def use_fallback(step: Mapping[str, Any], kernel: str, writes_planned_outputs: bool) -> dict[str, Any]:
    """`step` run by its fallback kernel: without the out-variant where that kernel allocates
    its own outputs."""
    new = {k: v for k, v in step.items() if k != "fallback"}
    new["kernel"] = kernel
    if not writes_planned_outputs:
        new["out_variant"] = None
        new.pop("writes_into", None)
    return new


def _value(e: Expr, binding: Binding) -> int:
    if isinstance(e, int):
        return e
    if isinstance(e, str):
        try:
            return binding[e]
        except KeyError:
            raise ShapeExprError(f"dim {e!r} has no value (bound: {sorted(binding)})") from None
    return evaluate(e, binding)


def _shape(shape: Sequence[Expr], binding: Binding) -> list[int]:
    return [_value(d, binding) for d in shape]


def substitute(value: Any, binding: Binding) -> Any:
    """`value` (encoded step arguments) with every {"sym": e} replaced by its int."""
    if isinstance(value, list):
        return [substitute(v, binding) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            (key, inner), = value.items()
            if key == "sym":
                return _value(inner, binding)
            if key == "tuple":
                return {"tuple": substitute(inner, binding)}
        return value
    return value


def validate_plan(plan: Mapping[str, Any], dims: Mapping[str, Dim]) -> None:
    """Every expression a plan holds is well-formed over `dims` (a loader's check: the file
    is data from anywhere); a ShapeExprError names the first bad one and where it is."""

    def check(e: Any, where: str) -> None:
        try:
            validate(e, dims)
        except ShapeExprError as exc:
            raise ShapeExprError(f"{where}: {exc}") from None

    for key in ("inputs", "graph_inputs", "outputs"):
        for i, spec in enumerate(plan.get(key, [])):
            if spec is not None:
                for axis, d in enumerate(spec.get("shape", [])):
                    check(d, f"{key}[{i}] axis {axis}")
    for i, slot in enumerate(plan.get("slots", [])):
        for field in ("shape", "stride"):
            for axis, d in enumerate(slot.get(field, [])):
                check(d, f"slot {i} {field}[{axis}]")
        for field in SLOT_SIZE_FIELDS:
            if field in slot:
                check(slot[field], f"slot {i} {field}")

    def walk(value: Any, where: str) -> None:
        if isinstance(value, list):
            for v in value:
                walk(v, where)
        elif isinstance(value, dict) and len(value) == 1:
            (key, inner), = value.items()
            if key == "sym":
                check(inner, where)
            elif key == "tuple":
                walk(inner, where)

    for step in plan.get("steps", []):
        walk(step.get("args", []), f"step {step.get('name')!r} args")
        walk(list(step.get("kwargs", {}).values()), f"step {step.get('name')!r} kwargs")
    walk(plan.get("output_refs", []), "output_refs")


# -- a bounded cache of per-binding state ------------------------------------------------------------

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ShapeCache(Generic[K, V]):
    """Least-recently-used cache of per-shape state (a specialized plan, its CUDA graph),
    holding at most `capacity` entries; `on_evict(key, value)` runs for each one dropped.

    One per execution context: not thread-safe, as a context serves one call at a time."""

    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None):
        if not _is_int(capacity) or capacity < 1:
            raise ValueError(f"a shape cache holds at least one entry, got capacity={capacity!r}")
        self.capacity = capacity
        self.on_evict = on_evict
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._pinned: set[K] = set()
        self.hits = self.misses = self.evictions = 0

    def pin(self, key: K) -> None:
        """Evict `key` only when every other entry but the newest is pinned too (a context's
        pad targets: the bindings calls at new sizes are padded up to)."""
        self._pinned.add(key)

    def unpin(self, key: K) -> None:
        """`key` is an ordinary entry again (no error if it was not pinned)."""
        self._pinned.discard(key)

    @property
    def pinned(self) -> frozenset[K]:
        return frozenset(self._pinned)

    def peek(self, key: K) -> V | None:
        """The entry for `key`, or None, without counting a hit or a miss or refreshing it."""
        return self._items.get(key)

    def items(self) -> list[tuple[K, V]]:
        """(key, value) pairs, least recently used first (nothing refreshed)."""
        return list(self._items.items())

    def get(self, key: K) -> V | None:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: K, value: V) -> None:
        if key in self._items:
            self._items.move_to_end(key)
        self._items[key] = value
        while len(self._items) > self.capacity:
            keys = list(self._items)[:-1]  # never the entry just put
            old_key = next((k for k in keys if k not in self._pinned), keys[0])
            old = self._items.pop(old_key)
            self._pinned.discard(old_key)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(old_key, old)

    def get_or_create(self, key: K, create: Callable[[], V]) -> V:
        value = self.get(key)
        if value is None:
            value = create()
            self.put(key, value)
        return value

    def clear(self) -> None:
        self._pinned.clear()
        while self._items:
            old_key, old = self._items.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old_key, old)

    def keys(self) -> list[K]:
        """Least recently used first."""
        return list(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, int]:
        return {"size": len(self), "capacity": self.capacity, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


# -- bucketing ------------------------------------------------------------------------------------------


class Buckets:
    """Sizes a dim is padded up to, so only these sizes ever run (and get a CUDA graph):
    `Buckets(batch, [1, 8, 16, 64])`. The largest must be the dim's max, so every size in
    range has a bucket; sizes must lie in the dim's range."""

    def __init__(self, dim: Dim, sizes: Iterable[int]):
        sizes = sorted(set(sizes))
        if not sizes or not all(_is_int(s) for s in sizes):
            raise ValueError(f"buckets for {dim.name} must be a non-empty list of ints, got {sizes!r}")
        outside = [s for s in sizes if not dim.contains(s)]
        if outside:
            raise ValueError(f"bucket size(s) {outside} for {dim.name} are outside its range {dim.min}..{dim.max}")
        if sizes[-1] != dim.max:
            raise ValueError(
                f"the largest bucket for {dim.name} must be its max ({dim.max}), got {sizes[-1]}: "
                "a size above the largest bucket would have nowhere to go"
            )
        self.dim = dim
        self.sizes = tuple(sizes)

    @classmethod
    def powers_of_two(cls, dim: Dim) -> Buckets:
        """min, every power of two in the range, opt, and max."""
        sizes = {dim.min, dim.max} | ({dim.opt} if dim.opt is not None else set())
        p = 1
        while p <= dim.max:
            if p >= dim.min:
                sizes.add(p)
            p *= 2
        return cls(dim, sizes)

    def bucket(self, size: int) -> int:
        """The smallest bucket that holds `size`."""
        if not self.dim.contains(size):
            raise InputError(
                f"{self.dim.name} = {size} is outside this engine's range {self.dim.min}..{self.dim.max} ({self.dim!r})"
            )
        return self.sizes[bisect.bisect_left(self.sizes, size)]

    def to_json(self) -> dict[str, Any]:
        return {"dim": self.dim.name, "sizes": list(self.sizes)}

    def __repr__(self) -> str:
        return f"Buckets({self.dim.name}, {list(self.sizes)})"


def bucket_binding(binding: Binding, buckets: Mapping[str, Buckets]) -> dict[str, int]:
    """The binding each bucketed dim is padded up to (other dims unchanged)."""
    return {d: buckets[d].bucket(n) if d in buckets else n for d, n in binding.items()}


def pad_to(x: torch.Tensor, axis: int, size: int, mode: str = "edge") -> torch.Tensor:
    """`x` grown along `axis` to `size`: new rows repeat the last row ("edge": values stay as
    valid as the real ones, token ids included) or are zeros ("zeros"). Returns `x` itself
    when it already has that size."""
    n = x.shape[axis]
    if size < n:
        raise ValueError(f"cannot pad axis {axis} of size {n} down to {size}")
    if size == n:
        return x
    if mode == "zeros":
        extra = list(x.shape)
        extra[axis] = size - n
        return torch.cat([x, x.new_zeros(extra)], dim=axis)
    if mode != "edge":
        raise ValueError(f"pad mode must be 'edge' or 'zeros', got {mode!r}")
    if n == 0:
        raise ValueError("cannot edge-pad an empty axis")
    index = torch.arange(size, device=x.device).clamp_(max=n - 1)
    return x.index_select(axis, index)


def unpad(y: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """The first `size` entries of `y` along `axis` (a view; the caller copies if it keeps it)."""
    return y.narrow(axis, 0, size)
