"""The FX graph toolkit every stage shares: the captured graph, weights, new constants,
clean-up, fresh shape metadata, and where a node came from in the model's source."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from kiln.specs import TensorSpec, build_structure

aten = torch.ops.aten


@dataclass
class CapturedGraph:
    """A captured model: the graph, what goes in, and how outputs are shaped."""

    module: fx.GraphModule
    inputs: list[TensorSpec]  # what the user passes (names, shapes, the model's own dtypes)
    graph_inputs: list[TensorSpec]  # what the graph's placeholders take (compute dtype)
    outputs: list[TensorSpec | None]  # flat outputs as the user receives them; None: not a tensor
    structure: dict[str, Any]  # JSON-safe nesting of the flat outputs
    device: torch.device
    compute_dtype: torch.dtype
    # fp32 originals of weights stored in a lower precision, for passes that fold weights
    masters: dict[str, torch.Tensor] = field(default_factory=dict)
    rewrites: dict[str, int] = field(default_factory=dict)  # capture-time rewrites applied, with counts
    # dynamic shapes (docs/dynamic-shapes.md): the Dims by name, and shape-environment symbol → dim name
    dims: dict[str, Any] = field(default_factory=dict)
    symbols: dict[str, str] = field(default_factory=dict)

    def run(self, *inputs: torch.Tensor) -> Any:
        """Run the graph eagerly, casting like an engine does; returns the model's structure."""
        cast = [x.to(s.dtype) for x, s in zip(inputs, self.graph_inputs)]
        flat = self.module(*cast)
        flat = [
            t.to(spec.dtype) if spec is not None else t
            for t, spec in zip(flat, self.outputs)
        ]
        return build_structure(self.structure, flat)


def source_line(node: fx.Node) -> str:
    """The innermost 'file:line in function: code' of the model's own source that produced `node`.

    Frames inside torch, kiln and the standard library are skipped (nn.Module plumbing,
    F.conv2d, kiln's capture rewrites), so the line is the model's (`out = self.conv1(x)`),
    not torch/nn/modules/conv.py. Only when every frame is such plumbing is the innermost kept.
    """
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return "unknown source line (no stack trace recorded)"
    own = [f for f in frames if not _plumbing(f[0])]
    file, line, func, code = (own or frames)[-1]
    return f"{file}:{line} in {func}: {code.strip()}"


@functools.cache
def _plumbing_dirs() -> tuple[str, ...]:
    import kiln

    dirs = [Path(torch.__file__).parent, Path(kiln.__file__).parent, Path(sysconfig.get_paths()["stdlib"])]
    return tuple(str(d.resolve()) + os.sep for d in dirs)


@functools.cache
def _package_dirs() -> tuple[str, ...]:
    """Where installed packages live; inside the standard library's folder on most installs
    (lib/python3.X/site-packages), and never plumbing themselves (torchvision, transformers)."""
    paths = sysconfig.get_paths()
    return tuple(str(Path(paths[k]).resolve()) + os.sep for k in ("purelib", "platlib"))


def _plumbing(file: str) -> bool:
    """A frame of torch, kiln or the standard library, not of the model."""
    try:
        path = str(Path(file).resolve())
    except (OSError, ValueError):
        return False
    torch_or_kiln = _plumbing_dirs()[:2]
    if path.startswith(torch_or_kiln):
        return True
    return path.startswith(_plumbing_dirs()[2]) and not path.startswith(_package_dirs())


_INDEX = re.compile(r"\[(?:'([^']*)'|(\d+))\]")


def module_path(node: fx.Node) -> str:
    """The model's nn.Module path that produced `node`, e.g. 'layer2.0.conv1' ('' for the root or unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = path.removeprefix("L['self']").removeprefix("L__self__")
    path = _INDEX.sub(lambda m: "." + (m.group(1) or m.group(2)), path)  # layer2[0] → layer2.0
    return path.strip(".")


ORIGIN_META = ("stack_trace", "nn_module_stack")  # where a node came from: source line and module


def copy_origin(new: fx.Node, old: fx.Node) -> None:
    """Give `new` the source line and module path of `old` (a node it replaces)."""
    for key in ORIGIN_META:
        if old.meta.get(key) is not None:
            new.meta[key] = old.meta[key]


def chain_start(last: fx.Node, inputs: Sequence[object]) -> fx.Node:
    """The first node of the chain that ends at `last` and reads `inputs` (the convolution of
    conv → add → relu): a fused op's origin, so its module path names the layer it computes."""
    given = {a for a in inputs if isinstance(a, fx.Node)}
    node = last
    for _ in range(16):  # fused chains are short; never walk the whole graph
        earlier = [n for n in node.all_input_nodes if n.op == "call_function" and n not in given]
        if len(earlier) != 1 or len(earlier[0].users) != 1:  # a chain's inner nodes feed only the chain
            break
        node = earlier[0]
    return node


def op_nodes(graph: CapturedGraph, *targets: object) -> Iterator[fx.Node]:
    for node in list(graph.module.graph.nodes):
        if node.op == "call_function" and (not targets or node.target in targets):
            yield node


def is_weight(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def weight(graph: CapturedGraph, node: fx.Node) -> torch.Tensor:
    """A weight at full precision: its fp32 master when the graph stores it lower."""
    master = graph.masters.get(node.target)
    if master is not None:
        return master.to(graph.device)
    return getattr(graph.module, node.target)


def add_weight(
    graph: CapturedGraph, name: str, value: torch.Tensor, before: fx.Node, dtype: torch.dtype | None = None
) -> fx.Node:
    """A new constant as a get_attr node, stored in `dtype` (default: the graph's precision
    for floats); a more precise `value` is kept as its master for later folds."""
    attr, i = name, 1
    while hasattr(graph.module, attr):
        attr, i = f"{name}_{i}", i + 1
    if dtype is None:
        dtype = graph.compute_dtype if value.is_floating_point() else value.dtype
    stored = value.to(dtype)
    graph.module.register_buffer(attr, stored.detach().contiguous())
    if stored.dtype != value.dtype:
        graph.masters[attr] = value.detach()
    with graph.module.graph.inserting_before(before):
        node = graph.module.graph.get_attr(attr)
    node.meta["val"] = stored
    return node


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def getitem_user(node: fx.Node, index: int) -> fx.Node | None:
    """The getitem node taking output `index` of a multi-output node, if it is the only user."""
    import operator

    users = [u for u in node.users if u.target is operator.getitem and u.args[1] == index]
    return users[0] if len(users) == 1 else None


def finish(graph: CapturedGraph) -> CapturedGraph:
    """Drop dead nodes and unused weights, rebuild the module, refresh shapes and strides."""
    g = graph.module.graph
    g.eliminate_dead_code()
    used = set()
    for node in list(g.nodes):
        if node.op == "get_attr":
            if node.users:
                used.add(node.target)
            else:
                g.erase_node(node)
    g.lint()
    module = fx.GraphModule(graph.module, g)
    masters = {k: v for k, v in graph.masters.items() if k in used}
    result = dataclasses.replace(graph, module=module, masters=masters)
    refresh_meta(result)
    return result


def _attention_meta(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """[..., L, Ev] like the fused kernels lay it out: [B, H, L, Ev] as [B, L, H, Ev] in memory."""
    if query.dim() == 4:
        b, h, length, _ = query.shape
        return query.new_empty((b, length, h, value.shape[-1])).transpose(1, 2)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


# Ops whose fake value a graph with dynamic dims computes from the shapes alone, without
# dispatching them: on CUDA, scaled_dot_product_attention's fake kernel chooses a backend by
# reading sizes as integers, which guards the batch to the traced size (measured on an H100:
# bert-base fp16 with batch 1..64 came out of its first refresh with batch fixed at 8).
SHAPE_ONLY_META: dict[Any, Any] = {torch.ops.aten.scaled_dot_product_attention.default: _attention_meta}


class _SymbolicProp(FakeTensorProp):
    """FakeTensorProp that keeps dynamic dims symbolic through SHAPE_ONLY_META's ops."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        rule = SHAPE_ONLY_META.get(target)
        if rule is not None:
            return rule(*args, **kwargs)
        return super().call_function(target, args, kwargs)


def refresh_meta(graph: CapturedGraph) -> None:
    """Recompute every node's meta["val"] (shape, dtype, strides) after a rewrite. A graph with
    dynamic dims propagates from its placeholders' own symbolic values, so shapes stay symbolic,
    under the Python dispatcher as torch.export traced it: without it some C++ meta kernels
    (constant_pad_nd, which F.unfold's padding becomes) read sizes as integers and return the
    traced sizes, which the fake-tensor cache had hidden until an op's inputs changed."""
    if graph.dims:
        from torch._guards import detect_fake_mode

        vals = [n.meta["val"] for n in graph.module.graph.nodes if n.op == "placeholder"]
        mode = detect_fake_mode(vals)
        mode.allow_non_fake_inputs = True
        with enable_python_dispatcher():
            _SymbolicProp(graph.module, mode).propagate_dont_convert_inputs(*vals)
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = [
        mode.from_tensor(torch.empty(s.shape, dtype=s.dtype, device=graph.device)) for s in graph.graph_inputs
    ]
    FakeTensorProp(graph.module, mode).propagate_dont_convert_inputs(*inputs)


def activation(node: fx.Node) -> str | None:
    """The kiln activation name of an ATen activation node (see kiln.ops.vocabulary.ACTIVATIONS)."""
    target, args, kwargs = node.target, node.args, node.kwargs
    if target == aten.relu.default:
        return "relu"
    if target == aten.hardtanh.default and tuple(args[1:]) == (0.0, 6.0):
        return "relu6"
    if target == aten.gelu.default:
        return "gelu_tanh" if kwargs.get("approximate", args[1] if len(args) > 1 else "none") == "tanh" else "gelu"
    simple = {
        aten.silu.default: "silu",
        aten.hardswish.default: "hardswish",
        aten.sigmoid.default: "sigmoid",
        aten.tanh.default: "tanh",
    }
    return simple.get(target)


def following_activation(node: fx.Node) -> tuple[str, fx.Node] | None:
    """The activation applied to `node` and the node that yields its result: a single
    activation op, or x * sigmoid(x) (how Core ATen spells SiLU), also computed in fp32
    between casts (how it spells SiLU of fp16/bf16 tensors)."""
    upcast = _upcast_silu(node)
    if upcast is not None:
        return "silu", upcast
    users = list(node.users)
    if len(users) == 1 and activation(users[0]) is not None and users[0].args[0] is node:
        return activation(users[0]), users[0]
    if len(users) == 2:
        sig = next((u for u in users if u.target == aten.sigmoid.default), None)
        mul = next((u for u in users if u.target == aten.mul.Tensor), None)
        if sig is not None and mul is not None and set(mul.args) == {node, sig} and list(sig.users) == [mul]:
            return "silu", mul
    return None


def _only_user_casts(node: fx.Node, dtype: torch.dtype) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].target == aten._to_copy.default and set(users[0].kwargs) <= {"dtype"}:
        val = users[0].meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype == dtype:
            return users[0]
    return None


def _upcast_silu(node: fx.Node) -> fx.Node | None:
    """The final cast of cast(x, fp32) → x·sigmoid(x) → cast back, for a half-precision x."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype not in (torch.float16, torch.bfloat16):
        return None
    up = _only_user_casts(node, torch.float32)
    inner = following_activation(up) if up is not None else None
    if inner is None or inner[0] != "silu" or inner[1].target != aten.mul.Tensor:
        return None
    return _only_user_casts(inner[1], val.dtype)


def same_shape(a: fx.Node, b: object) -> bool:
    return (
        isinstance(b, fx.Node)
        and isinstance(b.meta.get("val"), torch.Tensor)
        and tuple(a.meta["val"].shape) == tuple(b.meta["val"].shape)
        and a.meta["val"].dtype == b.meta["val"].dtype
    )


def replace_with(graph: CapturedGraph, last: fx.Node, target: object, args: tuple) -> fx.Node:
    """Insert target(*args) before `last` and give it `last`'s uses; its source line and module
    are those of the chain's first node (the convolution of conv → add → relu)."""
    g = graph.module.graph
    with g.inserting_before(last):
        new = g.call_function(target, args)
    copy_origin(new, chain_start(last, args))
    infer_meta(new)
    last.replace_all_uses_with(new)
    return new


def infer_meta(node: fx.Node) -> None:
    """Set meta["val"] of a new node from its inputs' fake values, so later matches see shapes."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta["val"] for n in node.all_input_nodes]) or FakeTensorMode()
    mode.allow_non_fake_inputs = True

    def fake(n: fx.Node) -> Any:  # real values (weights) as fakes of this mode: symbolic shapes need it
        val = n.meta["val"]
        if mode.shape_env is not None and isinstance(val, torch.Tensor) and not isinstance(val, FakeTensor):
            return mode.from_tensor(val)
        return val

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), fake)
    symbolic = mode.shape_env is not None
    rule = SHAPE_ONLY_META.get(node.target) if symbolic else None
    with enable_python_dispatcher() if symbolic else contextlib.nullcontext(), mode:
        node.meta["val"] = (rule or node.target)(*args, **kwargs)
