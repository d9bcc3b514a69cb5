"""Data-dependent shapes and values in a captured graph: folded where static, refused otherwise.

torch.export traces an op whose output size depends on tensor values (boolean-mask indexing,
nonzero, masked_select) or that reads a value into Python (.item()) with an unbacked symbol
(u0, zuf0) in place of the size or value. An engine has one static shape per tensor, so:

- where the data is constant (a mask that is a weight, or computed from weights only), the op
  is worked out now: a constant boolean mask becomes constant integer indices (aten.index
  with index tensors, static shape); a nonzero / .item() of constants becomes a weight / a
  number; the size checks torch.export added for the symbol then fold away;
- in a graph with dynamic dims, a .item() of a tensor computed from the inputs' sizes only
  (DeBERTa's torch.tensor(min(seq, k)) read back as slice bounds) becomes that size expression,
  and the checks torch.export added for the value fold away where they hold across the ranges;
- anything else is a CaptureError naming the op and the model's source line, with advice.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from kiln.dims import size_arg
from kiln.errors import CaptureError
from kiln.graph import source_line

aten = torch.ops.aten

# op → (what the user wrote, what to do instead)
_MASK = (
    "keep the shape static: torch.where(mask, x, 0) instead of x[mask], or a mask that is a weight "
    "or computed from weights only (kiln folds those into fixed indices)"
)
_ITEM = (
    "keep the value a tensor (x * t instead of x * t.item()), or compute it from weights only "
    "(kiln folds those)"
)
DATA_DEPENDENT_OPS: dict[Any, tuple[str, str]] = {
    aten.index.Tensor: ("boolean-mask indexing (x[mask])", _MASK),
    aten.nonzero.default: ("nonzero", _MASK.replace("x[mask]", "nonzero")),
    aten.masked_select.default: ("masked_select", _MASK.replace("x[mask]", "masked_select")),
    aten._local_scalar_dense.default: (".item() / int() / float() of a tensor", _ITEM),
    aten.item.default: (".item() / int() / float() of a tensor", _ITEM),
}
GENERIC_ADVICE = (
    "make the shape static (pad to a fixed size); torch._check(...) can bound a size for "
    "torch.export, but an engine still needs one fixed shape"
)
SCALAR_OPS = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}
CHECK_OPS = {aten._assert_scalar.default, aten.sym_constrain_range.default,
             aten.sym_constrain_range_for_size.default}
MASK_DTYPES = (torch.bool, torch.uint8)


class _NotConstant(Exception):
    pass


def symbols(val: Any) -> set[Any]:
    """The unbacked (data-dependent) symbols in a node's value: sizes, strides or scalars."""
    if isinstance(val, (list, tuple)):
        return set().union(*(symbols(v) for v in val)) if val else set()
    if isinstance(val, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return set(free_unbacked_symbols(val))
    return set()


def make_static(module: fx.GraphModule, masters: dict[str, torch.Tensor], model_name: str) -> int:
    """Fold every data-dependent op of `module` whose data is constant; raise CaptureError
    naming the others. Returns the number of ops folded."""
    graph = module.graph
    constants = _Constants(module, masters)
    if _fold_size_items(module, constants):
        _refresh_symbolic(module)
    origins = _origins(graph)
    if not origins:
        return 0
    refused = [node for node in origins if not _fold(node, module, constants)]
    if refused:
        raise data_dependent_error(model_name, refused)
    graph.lint()
    _refresh(module)
    _fold_scalars(module)
    left = [n for n in graph.nodes if symbols(n.meta.get("val"))]
    if left:
        raise data_dependent_error(model_name, left[:1])
    module.recompile()
    return len(origins)


def data_dependent_error(model_name: str, nodes: list[fx.Node]) -> CaptureError:
    lines = [
        f"{model_name} has {len(nodes)} op(s) whose output shape or value depends on the values of "
        "its inputs; a kiln engine has static shapes:"
    ]
    advice: list[str] = []
    problems = []
    for node in nodes:
        what, tip = DATA_DEPENDENT_OPS.get(node.target, (_op_name(node), GENERIC_ADVICE))
        where = source_line(node)
        problems.append((_op_name(node), node.name, where))
        lines.append(f"  - {what} ({_op_name(node)}, node {node.name}) at {where}")
        if tip not in advice:
            advice.append(tip)
    lines.append("What to do: " + "; ".join(advice) + ".")
    error = CaptureError("\n".join(lines))
    error.problems = problems  # type: ignore[attr-defined]  # (op, node, source line), as UnsupportedOpError
    return error


def _op_name(node: fx.Node) -> str:
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _origins(graph: fx.Graph) -> list[fx.Node]:
    """Nodes that introduce a data-dependent symbol (not just pass one on)."""
    found = []
    for node in graph.nodes:
        own = symbols(node.meta.get("val"))
        if own and own - set().union(*(symbols(n.meta.get("val")) for n in node.all_input_nodes)):
            found.append(node)
    return found


class _Constants:
    """Values of nodes computed from weights only (fp32 masters where the graph stores less)."""

    def __init__(self, module: fx.GraphModule, masters: dict[str, torch.Tensor]):
        self.module, self.masters = module, masters
        self.memo: dict[fx.Node, Any] = {}

    def __call__(self, node: fx.Node) -> Any:
        if node in self.memo:
            return self.memo[node]
        if node.op == "get_attr":
            value = self.masters.get(node.target)
            value = getattr(self.module, node.target) if value is None else value
        elif node.op == "call_function" and _pure(node.target):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self)
            with torch.no_grad():
                value = node.target(*args, **kwargs)
        else:
            raise _NotConstant(node.name)
        self.memo[node] = value
        return value

    def get(self, node: Any) -> Any:
        try:
            return self(node) if isinstance(node, fx.Node) else node
        except (_NotConstant, RecursionError):
            return _NotConstant


def _pure(target: Any) -> bool:
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not target._schema.is_mutable


def _fold(node: fx.Node, module: fx.GraphModule, constants: _Constants) -> bool:
    """Replace one data-dependent node by its static equivalent; False where its data varies."""
    if node.op != "call_function":
        return False
    value = constants.get(node)
    if value is not _NotConstant:
        _replace_with_constant(node, module, value)
        return True
    if node.target is aten.index.Tensor:
        return _fold_index(node, module, constants)
    if node.target is aten.masked_select.default:
        return _fold_masked_select(node, module, constants)
    return False


# 0-d integer tensor ops whose value, on sizes, is the same arithmetic on the sizes.
_SIZE_ARITHMETIC: dict[Any, Any] = {
    aten.add.Tensor: operator.add, aten.add.Scalar: operator.add, aten.sub.Tensor: operator.sub,
    aten.sub.Scalar: operator.sub, aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul,
    aten.neg.default: operator.neg, aten.minimum.default: torch.sym_min, aten.maximum.default: torch.sym_max,
}
_SIZE_COPIES = {aten.scalar_tensor.default, aten._to_copy.default, aten.clone.default, aten.lift_fresh_copy.default,
                aten.alias.default}


def _size_value(arg: Any, constants: _Constants) -> Any:
    """The int or SymInt that a 0-d integer tensor holds when it is computed from sizes only
    (DeBERTa's torch.tensor(min(seq, k)), then arithmetic); None otherwise."""
    if isinstance(arg, (int, torch.SymInt)) and not isinstance(arg, bool):
        return arg
    if not isinstance(arg, fx.Node):
        return None
    val = arg.meta.get("val")
    if isinstance(val, torch.SymInt):
        return None if symbols(val) else val
    if not isinstance(val, torch.Tensor) or val.dim() != 0 or val.dtype.is_floating_point or val.dtype == torch.bool:
        return None
    constant = constants.get(arg)
    if isinstance(constant, torch.Tensor):
        return int(constant)
    if arg.target in _SIZE_COPIES:
        return _size_value(arg.args[0], constants)
    if arg.target in _SIZE_ARITHMETIC and arg.kwargs.get("alpha", 1) == 1:
        values = [_size_value(a, constants) for a in arg.args]
        return None if any(v is None for v in values) else _SIZE_ARITHMETIC[arg.target](*values)
    return None


def _fold_size_items(module: fx.GraphModule, constants: _Constants) -> bool:
    """.item() of a tensor computed from the inputs' sizes only, in a graph with dynamic dims,
    becomes that size expression (nodes on aten.sym_size), so it is no data-dependent value;
    the range checks torch.export added for the value it read go with it."""
    graph = module.graph
    if not _symbolic_sizes(graph):
        return False
    folded = False
    for node in list(graph.nodes):
        if node.target not in (aten._local_scalar_dense.default, aten.item.default):
            continue
        value = _size_value(node.args[0], constants)
        if value is None:
            continue
        for check in [u for u in _scalar_users(node) if u.target in CHECK_OPS]:
            graph.erase_node(check)
        if isinstance(value, torch.SymInt):
            node.replace_all_uses_with(size_arg(graph, value, node))
        else:
            _substitute(node, int(value))
        graph.erase_node(node)
        folded = True
    if folded:
        graph.eliminate_dead_code()
    return folded


def _scalar_users(node: fx.Node) -> list[fx.Node]:
    """Nodes that compute on `node`'s scalar value (SymInt / SymBool arithmetic and checks)."""
    found: list[fx.Node] = []
    todo = list(node.users)
    while todo:
        user = todo.pop()
        if user in found or isinstance(user.meta.get("val"), torch.Tensor):
            continue
        found.append(user)
        todo.extend(user.users)
    return found


def _symbolic_sizes(graph: fx.Graph) -> bool:
    return any(isinstance(d, torch.SymInt) for n in graph.nodes if n.op == "placeholder"
               for d in getattr(n.meta.get("val"), "shape", ()))


def _refresh_symbolic(module: fx.GraphModule) -> None:
    """Recompute meta["val"] from the placeholders' own symbolic values (dynamic dims)."""
    vals = [n.meta["val"] for n in module.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(vals)
    mode.allow_non_fake_inputs = True
    module.recompile()
    with enable_python_dispatcher():
        FakeTensorProp(module, mode).propagate_dont_convert_inputs(*vals)
    # torch.export's checks on values it could not see (a slice's length once its bounds were
    # .item()s) are facts about the sizes now: those that hold across the ranges go.
    graph = module.graph
    for node in list(graph.nodes):
        if node.target in CHECK_OPS and node.args and _holds(node.args[0]):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    module.recompile()


def _holds(condition: Any) -> bool:
    value = condition.meta.get("val") if isinstance(condition, fx.Node) else condition
    if isinstance(value, torch.SymBool):
        return statically_known_true(value)
    return value is True


def _fold_index(node: fx.Node, module: fx.GraphModule, constants: _Constants) -> bool:
    """x[..., mask, ...] with a constant boolean mask → x[..., i0, i1, ...] (mask.nonzero())."""
    x, indices = node.args[0], list(node.args[1])
    new: list[Any] = []
    for index in indices:
        val = index.meta.get("val") if isinstance(index, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.dtype in MASK_DTYPES:
            mask = constants.get(index)
            if mask is _NotConstant:
                return False
            parts = mask.to(torch.bool).nonzero(as_tuple=True)
            new.extend(_constant_node(module, f"{node.name}_index", p, node) for p in parts)
        else:
            new.append(index)
    _replace(node, aten.index.Tensor, (x, new))
    return True


def _fold_masked_select(node: fx.Node, module: fx.GraphModule, constants: _Constants) -> bool:
    """masked_select(x, mask) with a constant mask → expand(x)[i0, i1, ...]."""
    x, mask_node = node.args[0], node.args[1]
    mask = constants.get(mask_node)
    if mask is _NotConstant or not isinstance(x, fx.Node):
        return False
    shape = list(torch.broadcast_shapes(tuple(x.meta["val"].shape), tuple(mask.shape)))
    if list(x.meta["val"].shape) != shape:
        graph = node.graph
        with graph.inserting_before(node):
            x = graph.call_function(aten.expand.default, (x, shape))
        x.meta["stack_trace"] = node.meta.get("stack_trace")
    parts = mask.to(torch.bool).expand(shape).nonzero(as_tuple=True)
    indices = [_constant_node(module, f"{node.name}_index", p, node) for p in parts]
    _replace(node, aten.index.Tensor, (x, indices))
    return True


def _replace(node: fx.Node, target: Any, args: tuple) -> None:
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta["stack_trace"] = node.meta.get("stack_trace")
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _replace_with_constant(node: fx.Node, module: fx.GraphModule, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        val = node.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else value.dtype
        node.replace_all_uses_with(_constant_node(module, f"folded_{node.name}", value.to(dtype), node))
    elif isinstance(value, (bool, int, float)):
        _substitute(node, value)
    else:
        raise CaptureError(f"cannot fold {_op_name(node)} (node {node.name}) at {source_line(node)}: "
                           f"its value is a {type(value).__name__}")
    node.graph.erase_node(node)


def _substitute(node: fx.Node, value: Any) -> None:
    """Every use of `node` takes the literal `value` instead."""
    for user in list(node.users):
        user.args, user.kwargs = fx.node.map_arg(
            (user.args, user.kwargs), lambda n: value if n is node else n
        )


def _constant_node(module: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    attr, i = name, 1
    while hasattr(module, attr):
        attr, i = f"{name}_{i}", i + 1
    module.register_buffer(attr, value.detach().contiguous())
    with before.graph.inserting_before(before):
        node = before.graph.get_attr(attr)
    node.meta["val"] = value
    return node


def _refresh(module: fx.GraphModule) -> None:
    """Recompute every node's meta["val"] now that the shapes are static."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = []
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            val = mode.from_tensor(torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device))
        inputs.append(val)
    module.recompile()
    FakeTensorProp(module, mode).propagate_dont_convert_inputs(*inputs)


def _fold_scalars(module: fx.GraphModule) -> None:
    """Size reads and Python arithmetic on static values become literals; satisfied checks go."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        val = node.meta.get("val")
        plain = type(val) in (bool, int, float)
        if plain and (node.target in SCALAR_OPS or getattr(node.target, "__module__", None) in ("_operator", "math")
                      or node.target in (math.trunc, math.floor, math.ceil)):
            _substitute(node, val)
            graph.erase_node(node)
        elif node.target in CHECK_OPS and not node.all_input_nodes:
            if node.target is aten._assert_scalar.default and not node.args[0]:
                raise CaptureError(f"a size check of the model fails once its masks are folded: {node.args[1]}")
            graph.erase_node(node)
