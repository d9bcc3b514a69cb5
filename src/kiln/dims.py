"""Dynamic shapes on the build side: the user's `dynamic_shapes` → one checked description
(`DynamicSpec`) → torch.export's `dynamic_shapes`, example inputs at the size to trace, and
the names of the shape environment's symbols (see docs/dynamic-shapes.md).

    batch = kiln.Dim("batch", min=1, opt=8, max=64)
    kiln.build(model, (x,), dynamic_shapes=({0: batch},))           # by position
    kiln.build(model, (ids, mask), dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                   "attention_mask": {0: batch, 1: seq}})

min=1 works although torch.export specializes sizes 0 and 1: the example is traced at `opt`
(at 2 where opt is 1), torch.export is told the range starts at 1, and the build then checks
the engine at size 1 against the model, because a graph traced at a size >= 2 silently
assumes the size is not 1 wherever the model branches on it.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from kiln.shapes import Dim, Expr, InputShape, ShapeExprError, from_sympy


@dataclass(frozen=True)
class DynamicSpec:
    """Which input axes are dynamic, as which dims (opt resolved), and fixed sizes forced by
    a Dim with min == max."""

    dims: dict[str, Dim]  # in order of first appearance
    axes: tuple[dict[int, str], ...]  # per input: axis → dim name
    fixed: tuple[dict[int, int], ...] = field(default_factory=tuple)  # per input: axis → forced size

    @property
    def dynamic(self) -> bool:
        return bool(self.dims)

    def export_size(self, name: str) -> int:
        """The size traced for `name`: opt, or 2 where opt is 1 (torch.export specializes 0 and 1)."""
        dim = self.dims[name]
        return dim.opt if dim.opt >= 2 else min(2, dim.max)

    def input_shapes(self, inputs: Sequence[torch.Tensor], names: Sequence[str]) -> list[InputShape]:
        """Each input's shape with dim names on its dynamic axes."""
        shapes = []
        for i, (x, name) in enumerate(zip(inputs, names)):
            shape: list[Expr] = [int(d) for d in x.shape]
            for axis, size in self.fixed[i].items():
                shape[axis] = size
            for axis, dim in self.axes[i].items():
                shape[axis] = dim
            shapes.append(InputShape(name, tuple(shape)))
        return shapes

    def at(self, inputs: Sequence[torch.Tensor], binding: Mapping[str, int]) -> tuple[torch.Tensor, ...]:
        """The example inputs resized to `binding` (and to the forced sizes): repeated or
        truncated along each axis, so their values stay as valid as the originals."""
        out = []
        for i, x in enumerate(inputs):
            for axis, size in self.fixed[i].items():
                x = resize(x, axis, size)
            for axis, dim in self.axes[i].items():
                x = resize(x, axis, binding[dim])
            out.append(x)
        return tuple(out)

    def export_inputs(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.at(inputs, {d: self.export_size(d) for d in self.dims})

    def opt_binding(self) -> dict[str, int]:
        return {name: dim.opt for name, dim in self.dims.items()}

    def to_torch_export(self) -> tuple[dict[int, Any] | None, ...] | None:
        """torch.export's `dynamic_shapes` for the inputs as a tuple (None when nothing is
        dynamic). One torch Dim per kiln dim, so torch knows that axes sharing a name are equal."""
        if not self.dynamic:
            return None
        export_dims = {name: torch.export.Dim(name, min=d.min, max=d.max) for name, d in self.dims.items()}
        return tuple({axis: export_dims[d] for axis, d in axes.items()} or None for axes in self.axes)

    def symbol_names(self, values: Sequence[Any]) -> dict[str, str]:
        """The shape environment's symbol for each dim (e.g. {'s77': 'batch'}), read off the
        traced inputs' fake values (the user inputs' placeholders, in order)."""
        names: dict[str, str] = {}
        for i, (val, axes) in enumerate(zip(values, self.axes)):
            for axis, dim in axes.items():
                size = val.shape[axis] if isinstance(val, torch.Tensor) else None
                if not isinstance(size, torch.SymInt) or not size.node.expr.is_Symbol:
                    raise ShapeExprError(
                        f"input {i} axis {axis} ({dim}) was traced as {size!r}, not as a free size: torch.export "
                        f"fixed it. Check the model does not force that size, or make axis {axis} fixed"
                    )
                symbol = size.node.expr.name
                if names.get(symbol, dim) != dim:
                    raise ShapeExprError(
                        f"dims {names[symbol]} and {dim} were traced as one size ({symbol}): the model "
                        "requires them equal. Use one Dim for both axes"
                    )
                names[symbol] = dim
        return names

    def expr(self, value: Any, names: Mapping[str, str]) -> Expr:
        """An int or SymInt size (from node.meta['val']) as an expression over the dims."""
        if isinstance(value, torch.SymInt):
            return from_sympy(value.node.expr, names)
        return int(value)

    def to_json(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.dims.values()]


def normalize(
    dynamic_shapes: Any, example_inputs: Sequence[torch.Tensor], arg_names: Sequence[str] | None = None
) -> DynamicSpec:
    """The user's `dynamic_shapes` checked against the example inputs.

    Accepted forms: None; a tuple/list with one entry per input, each None, {axis: Dim} or
    a per-axis list of Dim/None; or a dict keyed by the forward's argument names with the
    same entries. A torch.export.Dim is taken as a kiln.Dim without opt. Every dim's opt
    defaults to the example's size on its axes (which must then agree)."""
    n = len(example_inputs)
    per_input: list[Any] = [None] * n
    if dynamic_shapes is None:
        pass
    elif isinstance(dynamic_shapes, Mapping):
        names = list(arg_names or [])
        for key, entry in dynamic_shapes.items():
            if key not in names[:n]:
                known = ", ".join(repr(a) for a in names[:n]) or "(none known)"
                raise ValueError(f"dynamic_shapes names argument {key!r}; the model's tensor arguments are {known}")
            per_input[names.index(key)] = entry
    elif isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != n:
            raise ValueError(
                f"dynamic_shapes has {len(dynamic_shapes)} entries for {n} example input(s): give one per input "
                "(None for a fully fixed input)"
            )
        per_input = list(dynamic_shapes)
    else:
        raise ValueError(
            f"dynamic_shapes must be a tuple (one entry per input) or a dict by argument name, got "
            f"{type(dynamic_shapes).__name__}"
        )

    declared: dict[str, Dim] = {}
    sizes: dict[str, tuple[int, str]] = {}  # dim → (example size, where)
    axes: list[dict[int, str]] = []
    fixed: list[dict[int, int]] = []
    for i, (entry, x) in enumerate(zip(per_input, example_inputs)):
        mine: dict[int, str] = {}
        forced: dict[int, int] = {}
        for axis, value in _axis_items(entry, x.dim(), i):
            if value is None:
                continue
            dim = _as_dim(value, i, axis)
            where = f"input {i} axis {axis}"
            if dim.name in declared and _range(declared[dim.name]) != _range(dim):
                raise ValueError(f"two different Dims are named {dim.name!r}: {declared[dim.name]!r} and {dim!r}")
            declared.setdefault(dim.name, dim)
            size = int(x.shape[axis])
            if dim.static:
                forced[axis] = dim.min
                continue
            if dim.name in sizes and sizes[dim.name][0] != size and dim.opt is None:
                raise ValueError(
                    f"{dim.name} is {size} at {where} but {sizes[dim.name][0]} at {sizes[dim.name][1]} in the example "
                    f"inputs; give Dim({dim.name!r}) an opt= or make the examples agree"
                )
            sizes.setdefault(dim.name, (size, where))
            mine[axis] = dim.name
        axes.append(mine)
        fixed.append(forced)

    dims: dict[str, Dim] = {}
    for name, dim in declared.items():
        if dim.static:
            continue
        if dim.opt is None:
            size, where = sizes[name]
            if not dim.contains(size):
                raise ValueError(
                    f"the example inputs have {name} = {size} ({where}), outside {dim!r}; give Dim({name!r}) an opt= "
                    "inside the range, or example inputs of a size inside it"
                )
            dim = dim.with_opt(size)
        dims[name] = dim
    return DynamicSpec(dims, tuple(axes), tuple(fixed))


def _axis_items(entry: Any, rank: int, index: int) -> list[tuple[int, Any]]:
    if entry is None:
        return []
    if isinstance(entry, Mapping):
        items = list(entry.items())
    elif isinstance(entry, (tuple, list)):
        if len(entry) != rank:
            raise ValueError(f"dynamic_shapes for input {index} lists {len(entry)} axes; the input has rank {rank}")
        items = list(enumerate(entry))
    else:
        raise ValueError(
            f"dynamic_shapes for input {index} must be None, {{axis: Dim}} or a list per axis, got "
            f"{type(entry).__name__}"
        )
    out = []
    seen: set[int] = set()
    for axis, value in items:
        if not isinstance(axis, int) or isinstance(axis, bool) or not -rank <= axis < rank:
            raise ValueError(f"dynamic_shapes for input {index}: axis {axis!r} is not an axis of a rank-{rank} input")
        axis %= rank
        if axis in seen:
            raise ValueError(f"dynamic_shapes for input {index} gives axis {axis} twice")
        seen.add(axis)
        out.append((axis, value))
    return sorted(out)


def _as_dim(value: Any, index: int, axis: int) -> Dim:
    if isinstance(value, Dim):
        return value
    if isinstance(value, torch.export.Dim):
        high = value.max
        if not isinstance(high, int) or high >= 2**31:
            raise ValueError(
                f"torch.export.Dim {value.__name__!r} (input {index} axis {axis}) has no finite max; kiln plans "
                f"memory for the largest shape: use kiln.Dim({value.__name__!r}, min=..., opt=..., max=...)"
            )
        return Dim(value.__name__, max(1, int(value.min)), None, high)
    raise ValueError(
        f"dynamic_shapes for input {index} axis {axis} is {value!r}; kiln needs a range: "
        "kiln.Dim(name, min=..., opt=..., max=...)"
    )


def _range(dim: Dim) -> tuple[int, int, int | None]:
    return (dim.min, dim.max, dim.opt)


def forward_arg_names(model: torch.nn.Module) -> list[str]:
    """The positional parameter names of `model.forward` (for dynamic_shapes given by name)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def resize(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """`x` with `size` entries along `axis`: cycled when growing (so token ids, masks and
    images stay valid inputs), truncated when shrinking."""
    n = x.shape[axis]
    if size == n:
        return x
    if n == 0:
        raise ValueError(f"cannot resize an empty axis {axis} to {size}")
    index = torch.arange(size, device=x.device) % n
    return x.index_select(axis, index)


def constraint_lines(exc: BaseException) -> list[str]:
    """The lines of a torch.export constraint violation that say which dim's range fails and
    why, and torch's suggested fix (the first line of the message alone only names the dims)."""
    lines, suggesting = [], False
    for line in str(exc).splitlines():
        text = line.strip()
        if text.startswith(("- Not all values", "- You marked")):
            lines.append(text)
        elif text == "Suggested fixes:":
            suggesting = True
        elif suggesting and text:
            lines.append(f"- torch.export suggests: {text}")
        else:
            suggesting = False
    return lines


# -- sizes as graph values (for passes that build new shape arguments) --------------------------------


def size_arg(graph: fx.Graph, value: Any, before: fx.Node) -> int | fx.Node:
    """A size for a new node's arguments: an int as it is; a SymInt as nodes that compute it
    from the inputs' sizes (aten.sym_size.int of a placeholder, then +, *, //, %, max, min),
    inserted before `before`. A SymInt itself must never go into a node's arguments: the
    graph's code would name the shape environment's symbol (NameError when it runs) and the
    plan could not encode it."""
    if not isinstance(value, torch.SymInt):
        return int(value)
    sources = _sources(graph)
    expr = from_sympy(value.node.expr, {name: name for name in sources})
    return _emit(graph, expr, sources, before)


def _sources(graph: fx.Graph) -> dict[str, tuple[fx.Node, int, torch.SymInt]]:
    """Each free size symbol → a placeholder axis that has it (the first found)."""
    found: dict[str, tuple[fx.Node, int, torch.SymInt]] = {}
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor):
            continue
        for axis, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                found.setdefault(size.node.expr.name, (node, axis, size))
    return found


_BINARY = {"add": operator.add, "mul": operator.mul, "floordiv": operator.floordiv, "mod": operator.mod,
           "max": torch.sym_max, "min": torch.sym_min}


def _emit(graph: fx.Graph, expr: Expr, sources: dict[str, tuple[fx.Node, int, torch.SymInt]],
          before: fx.Node) -> int | fx.Node:
    if isinstance(expr, int):
        return expr
    if isinstance(expr, str):
        placeholder, axis, size = sources[expr]
        for user in placeholder.users:
            if user.target == torch.ops.aten.sym_size.int and tuple(user.args) == (placeholder, axis):
                return user
        with graph.inserting_after(placeholder):
            node = graph.call_function(torch.ops.aten.sym_size.int, (placeholder, axis))
        node.meta["val"] = size
        return node
    (op, args), = expr.items()
    parts = [_emit(graph, a, sources, before) for a in args]
    values = [p.meta["val"] if isinstance(p, fx.Node) else p for p in parts]
    result, value = parts[0], values[0]
    for part, v in zip(parts[1:], values[1:]):
        with graph.inserting_before(before):
            result = graph.call_function(_BINARY[op], (result, part))
        value = _BINARY[op](value, v)
        result.meta["val"] = value
    return result
