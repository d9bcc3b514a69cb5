"""Vertical fusion of elementwise chains into `kiln::pointwise` (seed 000, point 2; seed 003).

Chains such as add → relu, sigmoid → mul (SiLU, squeeze-excitation) or bias → gelu each
read and write a whole activation per op; fused they do it once. A group is grown from an
elementwise node up through its elementwise producers, taking a producer only when all of
its users are already in the group, so no intermediate value is needed outside it and the
group is convex. Each group of two or more ops becomes one `kiln::pointwise` node whose
program (kiln.ops.pointwise) the reference interprets and kiln.kernels.triton_pointwise
compiles.

A lone op is fused too when it broadcasts a smaller input over its output.
Producers may be smaller than the group's output (a [B, C, 1, 1] gate feeding a
[B, C, H, W] product); they are then recomputed for every output element, which costs
arithmetic but no memory traffic.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from kiln.graph import CapturedGraph
from kiln.ops.pointwise import (
    DTYPES,
    MAX_INPUTS,
    MAX_INSTRUCTIONS,
    POINTWISE_KIND,
    Const,
    PointwiseProgramError,
    Program,
    ProgramBuilder,
    Var,
)
from kiln.passes.registry import register_pass
from kiln.specs import dtype_name

aten = torch.ops.aten
Operand = Callable[[Any], Var | Const]
Lowering = Callable[[ProgramBuilder, fx.Node, Operand], Var]
POINTWISE = torch.ops.kiln.pointwise.default
MIN_GROUP = 2
KEPT_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


class _NotFusable(Exception):
    """This node's arguments fall outside what a pointwise program expresses."""


# -- ATen → program lowerings ---------------------------------------------------------------------


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _number(value: Any) -> Const:
    if isinstance(value, (bool, int, float)):
        return Const(value)
    raise _NotFusable(f"argument {value!r} is not a number")


def _unary(op: str) -> Lowering:
    def lower(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
        if len(node.args) != 1 or node.kwargs:
            raise _NotFusable("unexpected arguments")
        return b.emit(op, operand(node.args[0]))

    return lower


def _binary(op: str) -> Lowering:
    def lower(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
        if len(node.args) != 2 or node.kwargs:
            raise _NotFusable("unexpected arguments")
        return b.emit(op, operand(node.args[0]), operand(node.args[1]))

    return lower


def _with_alpha(op: str) -> Lowering:
    """add/sub(a, b, alpha) = a op alpha * b."""

    def lower(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
        alpha = _arg(node, 2, "alpha", 1)
        other = operand(node.args[1])
        if alpha != 1:
            scale = _number(alpha)
            other = Const(other.value * scale.value) if isinstance(other, Const) else b.emit("mul", other, scale)
        return b.emit(op, operand(node.args[0]), other)

    return lower


def _rsub(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    """rsub(x, other, alpha) = other - alpha * x."""
    alpha = _arg(node, 2, "alpha", 1)
    x = operand(node.args[0])
    if alpha != 1:
        x = b.emit("mul", x, _number(alpha))
    return b.emit("sub", operand(node.args[1]), x)


def _gelu(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    approximate = _arg(node, 1, "approximate", "none")
    if approximate not in ("none", "tanh"):
        raise _NotFusable(f"gelu approximate={approximate!r}")
    return b.emit("gelu" if approximate == "none" else "gelu_tanh", operand(node.args[0]))


def _hardtanh(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    low, high = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    return b.emit("clamp", operand(node.args[0]), _number(low), _number(high))


def _clamp(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    low, high = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
    x = operand(node.args[0])
    if low is not None and high is not None:
        return b.emit("clamp", x, _number(low), _number(high))
    if low is not None:
        return b.emit("maximum", x, _number(low))
    if high is not None:
        return b.emit("minimum", x, _number(high))
    raise _NotFusable("clamp without bounds")


def _bool_only(op: str, arity: int) -> Lowering:
    """bitwise and/or/not are the logical ops on bool tensors, and nothing a program expresses otherwise."""
    inner = _unary(op) if arity == 1 else _binary(op)

    def lower(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
        if any(_val(a) is None or _val(a).dtype != torch.bool for a in node.args):
            raise _NotFusable("bitwise op on non-bool tensors")
        return inner(b, node, operand)

    return lower


_COPY_KWARGS = {"dtype", "layout", "device", "pin_memory", "non_blocking", "memory_format"}


def _to_copy(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    """_to_copy that only changes the dtype (same device, layout kept)."""
    kw = node.kwargs
    source = _val(node.args[0]) if len(node.args) == 1 else None
    dtype = kw.get("dtype")
    if source is None or set(kw) - _COPY_KWARGS or dtype is None or dtype_name(dtype) not in DTYPES:
        raise _NotFusable("_to_copy that does more than change the dtype")
    if kw.get("layout") not in (None, torch.strided) or kw.get("pin_memory"):
        raise _NotFusable("_to_copy changes layout or pins memory")
    if kw.get("device") not in (None, source.device) or kw.get("memory_format") not in (None, torch.preserve_format):
        raise _NotFusable("_to_copy moves the tensor or changes its memory format")
    return b.emit("cast", operand(node.args[0]), dtype)


def _pow(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    """pow(x, c) for the exponents that are other ops exactly: x², x³, √x, 1/√x, 1/x."""
    x, exponent = operand(node.args[0]), _arg(node, 1, "exponent", None)
    if node.kwargs or isinstance(exponent, bool) or exponent not in (2, 3, 0.5, -0.5, -1):
        raise _NotFusable(f"pow with exponent {exponent!r}")
    if exponent == 2:
        return b.emit("mul", x, x)
    if exponent == 3:
        return b.emit("mul", b.emit("mul", x, x), x)
    if _val(node.args[0]) is None or not _val(node.args[0]).is_floating_point():
        raise _NotFusable("fractional power of an integer tensor")
    return b.emit({0.5: "sqrt", -0.5: "rsqrt", -1: "reciprocal"}[exponent], x)


def _isinf(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    source = _val(node.args[0])
    if source is None or not source.is_floating_point() or len(node.args) != 1:
        raise _NotFusable("isinf of a non-float tensor")
    return b.emit("eq", b.emit("abs", operand(node.args[0])), Const(float("inf")))


def _clamp_tensor(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    """clamp(x, min, max) with tensor bounds: maximum, then minimum (as torch clamps)."""
    x = operand(node.args[0])
    low, high = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
    if low is None and high is None:
        raise _NotFusable("clamp without bounds")
    if low is not None:
        x = b.emit("maximum", x, operand(low))
    if high is not None:
        x = b.emit("minimum", x, operand(high))
    return x


def _where(b: ProgramBuilder, node: fx.Node, operand: Operand) -> Var:
    if len(node.args) != 3 or node.kwargs:
        raise _NotFusable("unexpected arguments")
    return b.emit("where", *(operand(a) for a in node.args))


LOWERINGS: dict[Any, Lowering] = {
    aten.add.Tensor: _with_alpha("add"),
    aten.add.Scalar: _with_alpha("add"),
    aten.sub.Tensor: _with_alpha("sub"),
    aten.sub.Scalar: _with_alpha("sub"),
    aten.rsub.Scalar: _rsub,
    aten.rsub.Tensor: _rsub,
    aten.mul.Tensor: _binary("mul"),
    aten.mul.Scalar: _binary("mul"),
    aten.div.Tensor: _binary("div"),
    aten.div.Scalar: _binary("div"),
    aten.maximum.default: _binary("maximum"),
    aten.minimum.default: _binary("minimum"),
    **{
        getattr(aten, op).default: _unary(op)
        for op in (
            "neg",
            "abs",
            "reciprocal",
            "exp",
            "log",
            "sqrt",
            "rsqrt",
            "erf",
            "relu",
            "sigmoid",
            "tanh",
            "silu",
            "hardswish",
            "hardsigmoid",
        )
    },
    aten.gelu.default: _gelu,
    aten.hardtanh.default: _hardtanh,
    aten.clamp.default: _clamp,
    **{
        getattr(getattr(aten, op), overload): _binary(op)
        for op in ("eq", "ne", "gt", "ge", "lt", "le")
        for overload in ("Tensor", "Scalar")
    },
    aten.logical_not.default: _unary("not"),
    aten.logical_and.default: _binary("and"),
    aten.logical_or.default: _binary("or"),
    aten.bitwise_not.default: _bool_only("not", 1),
    aten.bitwise_and.Tensor: _bool_only("and", 2),
    aten.bitwise_or.Tensor: _bool_only("or", 2),
    aten.where.self: _where,
    aten.pow.Tensor_Scalar: _pow,
    aten.isinf.default: _isinf,
    aten.clamp.Tensor: _clamp_tensor,
    aten._to_copy.default: _to_copy,
}


# -- finding groups -------------------------------------------------------------------------------


def _val(value: Any) -> torch.Tensor | None:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is_program_tensor(val: torch.Tensor | None, device: torch.device) -> bool:
    return val is not None and val.device == device and dtype_name(val.dtype) in DTYPES


def fusable(node: fx.Node) -> bool:
    """Whether `node` is an elementwise op a pointwise program can express, with its arguments."""
    if node.op != "call_function" or node.target not in LOWERINGS:
        return False
    val = _val(node)
    if val is None or not _is_program_tensor(val, val.device):
        return False

    def check(arg: Any) -> Var | Const:
        if isinstance(arg, fx.Node):
            if not _is_program_tensor(_val(arg), val.device):
                raise _NotFusable(f"{arg.name} is not a tensor on {val.device} of a supported dtype")
            return Var(True, 0)
        return _number(arg)

    try:
        LOWERINGS[node.target](ProgramBuilder(), node, check)
    except _NotFusable:
        return False
    return True


def find_groups(graph: fx.Graph) -> list[list[fx.Node]]:
    """Maximal groups of fusable nodes whose intermediates are used only inside the group.

    Each group is in graph order; its last node (the root) is the only one used outside."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    ok = {n for n in nodes if fusable(n)}
    taken: set[fx.Node] = set()
    groups = []
    for root in reversed(nodes):
        if root not in ok or root in taken:
            continue
        group, frontier = {root}, [root]
        while frontier:
            for producer in frontier.pop().all_input_nodes:
                if producer in ok and producer not in taken and producer not in group:
                    if all(user in group for user in producer.users):
                        group.add(producer)
                        frontier.append(producer)
        taken |= group
        if len(group) >= MIN_GROUP or _broadcasts(root):
            groups.append(sorted(group, key=position.__getitem__))
    return groups


def _broadcasts(node: fx.Node) -> bool:
    """An op that stretches a smaller input over its output (the gate of a squeeze-excitation
    block): ATen runs those with its slow strided kernel, so one op alone is worth a kernel."""
    out = _val(node)
    return any(_val(arg).numel() not in (1, out.numel()) for arg in node.all_input_nodes)


# -- rewriting --------------------------------------------------------------------------------------


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and strides where strides matter (size-1 dims have no meaningful stride)."""
    if a.shape != b.shape:
        return False
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def lower_group(
    group: list[fx.Node], lowerings: dict[Any, Lowering] = LOWERINGS, kind: str = POINTWISE_KIND
) -> tuple[Program, list[fx.Node]]:
    """The program computing the group's root from its inputs, and those inputs in program order.

    An input laid out like the root goes first, since the result takes the first full-size
    input's layout."""
    b = ProgramBuilder(kind)
    values: dict[fx.Node, Var] = {}
    inputs: dict[fx.Node, Var] = {}

    def operand(arg: Any) -> Var | Const:
        if not isinstance(arg, fx.Node):
            return _number(arg)
        if arg in values:
            return values[arg]
        if arg not in inputs:
            inputs[arg] = b.input()
        return inputs[arg]

    for node in group:
        values[node] = lowerings[node.target](b, node, operand)
    root = _val(group[-1])
    order = list(inputs)
    like_root = [n for n in order if _same_layout(_val(n), root)]
    if like_root:
        order.remove(like_root[0])
        order.insert(0, like_root[0])
    return b.build([inputs[n].index for n in order]), order


def _fused_val(inputs: list[fx.Node], program: str, op: Any = POINTWISE) -> torch.Tensor | None:
    vals = [_val(n) for n in inputs]
    fake_mode = detect_fake_mode(vals)
    if fake_mode is None:
        return None
    with fake_mode:
        return op(vals, program)


def rewrite_group(
    graph: fx.Graph,
    group: list[fx.Node],
    op: Any = POINTWISE,
    lowerings: dict[Any, Lowering] = LOWERINGS,
    kind: str = POINTWISE_KIND,
    prefix: str = "pointwise",
) -> bool:
    """Replace `group` with one node of `op` (kiln::pointwise, kiln::rowwise) running its
    program; False (graph untouched) if it cannot."""
    root = group[-1]
    try:
        program, inputs = lower_group(group, lowerings, kind)
    except (_NotFusable, PointwiseProgramError):
        return False
    if len(inputs) > MAX_INPUTS or len(program.body) > MAX_INSTRUCTIONS:
        return False
    text = program.to_json()
    val = _fused_val(inputs, text, op)
    expected = _val(root)
    if val is None or val.dtype != expected.dtype or not _same_layout(val, expected):
        return False  # consumers were traced against the root's layout; keep it
    with graph.inserting_before(root):
        fused = graph.create_node("call_function", op, (inputs, text), name=f"{prefix}_{root.name}")
    fused.meta.update({k: root.meta[k] for k in KEPT_META if k in root.meta})
    fused.meta["val"] = val
    fused.meta["fused_from"] = [n.name for n in group]
    root.replace_all_uses_with(fused)
    for node in reversed(group):
        graph.erase_node(node)
    return True


@register_pass("fuse_pointwise")
def fuse_pointwise(graph: CapturedGraph) -> CapturedGraph:
    """Fuse chains of elementwise ops into single kiln::pointwise kernels."""
    g = copy.deepcopy(graph.module.graph)
    rewritten = [rewrite_group(g, group) for group in find_groups(g)]
    if not any(rewritten):
        return graph
    g.lint()
    return dataclasses.replace(graph, module=fx.GraphModule(graph.module, g))
