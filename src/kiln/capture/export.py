"""Capture: nn.Module + example inputs → a core-ATen FX graph with weights as constants.

torch.export does the tracing; `run_decompositions()` lowers to the Core ATen opset.
The exported program's lifted parameters, buffers and constants become `get_attr`
nodes on a plain GraphModule, so each pass sees one self-contained graph that
PyTorch can still run eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from kiln.capture.data_dependent import make_static
from kiln.capture.failures import UNKNOWN_OUTPUT, explain, specialization_sites
from kiln.capture.rewrites import check_names, rewritten
from kiln.dims import DynamicSpec, constraint_lines
from kiln.errors import CaptureError, KilnError, KilnWarning
from kiln.graph import CapturedGraph, source_line  # noqa: F401  (re-exported)
from kiln.shapes import ShapeExprError, expr_of
from kiln.specs import TensorSpec, encode_structure

DROPPED_OPS = {torch.ops.aten._assert_tensor_metadata.default}
# Kept whole instead of decomposed: at run time they dispatch to fused kernels
# (flash / memory-efficient / cuDNN attention) that their decompositions cannot reach.
KEPT_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)


def _decompositions() -> dict:
    table = torch.export.default_decompositions()
    for op in KEPT_OPS:
        table.pop(op, None)
    return table


@dataclass
class ExampleInputs:
    """Example inputs bound to the model's forward parameters.

    `tensors` are the engine's inputs in graph order (positional arguments, then keyword
    arguments in the order of forward's parameters); `names` are their forward parameter
    names (what the engine binds keyword arguments by); `constants` are non-tensor keyword
    arguments (None, bool, int, float, str), traced as constants and baked into the engine."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, Any]
    names: list[str]
    constants: dict[str, Any] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.args + tuple(v for v in self.kwargs.values() if isinstance(v, torch.Tensor))

    def map(self, fn: Callable[[torch.Tensor], Any]) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) with `fn` applied to every tensor."""
        return (tuple(fn(x) for x in self.args),
                {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()})


CONSTANT_TYPES = (type(None), bool, int, float, str)


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    rewrites: list[str] | None = None,
    kwargs: dict[str, Any] | None = None,
    dynamic: DynamicSpec | None = None,
) -> CapturedGraph:
    """Export `model` on `device` with floating weights and inputs in `compute_dtype`.

    With `dynamic` (kiln.dims.normalize), the axes it names are traced as symbols over their
    Dims' ranges (at opt, or 2 where opt is 1) and the graph's shapes are symbolic
    (docs/dynamic-shapes.md).

    `example_inputs` is a tensor, a tuple of tensors, or a dict of them by forward parameter
    name; `kwargs` adds keyword inputs. `rewrites` names the kiln.capture.rewrites to trace
    through (None: all of them). The caller's model is left as it was (train/eval mode,
    device, dtype, parameters)."""
    check_model(model)
    inputs = bind_example_inputs(model, example_inputs, kwargs)
    check_names(rewrites)
    dynamic = dynamic if dynamic is not None and dynamic.dynamic else None
    if dynamic is not None:
        inputs = _resized(inputs, dynamic.export_inputs(inputs.tensors))
    user_specs = [TensorSpec(name, tuple(x.shape), x.dtype) for name, x in zip(inputs.names, inputs.tensors)]
    originals = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with eval_mode(model):
        traced, cast = _on_device(model, device, compute_dtype)
        cast = cast or any(x.is_floating_point() and x.dtype != compute_dtype for x in inputs.tensors)
        try:
            try:
                program, applied = _export(traced, inputs, device, compute_dtype, rewrites, dynamic)
            except Exception as exc:
                if not _without_cache(model, inputs, exc):
                    raise
                program, applied = _export(traced, inputs, device, compute_dtype, rewrites, dynamic)
        except Exception as exc:  # torch.export raises many kinds; explain() names the known ones
            if dynamic is not None and constraint_lines(exc):
                sites = specialization_sites(
                    lambda: _export(traced, inputs, device, compute_dtype, rewrites, dynamic), model)
                raise CaptureError(
                    f"torch.export cannot trace {type(model).__name__} over the ranges given "
                    f"({', '.join(d.describe() for d in dynamic.dims.values())}):\n  "
                    + "\n  ".join(constraint_lines(exc) + [f"- the model fixes a size at {s}" for s in sites])
                    + "\nWhat to do: narrow the range (or fix that axis), as suggested above"
                    + (", or change the code there so that it does not need the size as a fixed Python number "
                       "(a loop or branch over it)." if sites else ".")
                ) from exc
            raise explain(exc, model, "capture") from exc
        _check_no_mutation(program)
        eager_dtypes = _eager_output_dtypes(model, inputs) if cast else None

    module, input_names, targets = _to_graph_module(program)
    masters = {
        attr: originals[target].detach()
        for attr, target in targets.items()
        if target in originals and originals[target].dtype != getattr(module, attr).dtype
    }
    try:
        make_static(module, masters, type(model).__name__)
    except KilnError:
        raise
    except Exception as exc:
        raise explain(exc, model, "capture") from exc
    if len(input_names) != len(user_specs):
        raise CaptureError(
            f"torch.export gave {type(model).__name__} {len(input_names)} tensor input(s) for "
            f"{len(user_specs)} example tensor(s) ({', '.join(inputs.names)}); pass tensors, not nested containers"
        )
    dims, symbols = {}, {}
    if dynamic is not None:
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        try:
            symbols = dynamic.symbol_names([n.meta.get("val") for n in placeholders])
        except ShapeExprError as exc:
            raise CaptureError(f"{type(model).__name__}: {exc}") from None
        dims = dict(dynamic.dims)
        shaped = dynamic.input_shapes(inputs.tensors, inputs.names)
        user_specs = [TensorSpec(s.name, tuple(i.shape), s.dtype) for s, i in zip(user_specs, shaped)]
    graph_inputs = [TensorSpec(s.name, s.shape, _compute(s.dtype, compute_dtype)) for s in user_specs]
    outputs = _output_specs(module, compute_dtype, _model_float_dtype(model, inputs.tensors), eager_dtypes)
    if dynamic is not None:
        try:
            outputs = [None if o is None else TensorSpec(o.name, tuple(expr_of(d, symbols) for d in o.shape), o.dtype)
                       for o in outputs]
        except ShapeExprError as exc:
            raise CaptureError(
                f"{type(model).__name__}: an output's size is not an expression over the dims: {exc}"
            ) from None
    structure = encode_structure(program.call_spec.out_spec)
    return CapturedGraph(
        module, user_specs, graph_inputs, outputs, structure, torch.device(device), compute_dtype, masters,
        applied, dims, symbols,
    )


def _resized(inputs: ExampleInputs, tensors: tuple[torch.Tensor, ...]) -> ExampleInputs:
    """`inputs` with its tensors replaced, in order, by `tensors` (the example resized for tracing)."""
    it = iter(tensors)
    args = tuple(next(it) for _ in inputs.args)
    kwargs = {k: next(it) if isinstance(v, torch.Tensor) else v for k, v in inputs.kwargs.items()}
    return ExampleInputs(args, kwargs, list(inputs.names), dict(inputs.constants))


def _export(
    model: torch.nn.Module, inputs: ExampleInputs, device: torch.device, compute_dtype: torch.dtype,
    rewrites: list[str] | None, dynamic: DynamicSpec | None = None,
) -> tuple[torch.export.ExportedProgram, dict[str, int]]:
    args, kwargs = inputs.map(lambda x: _cast(x, device, compute_dtype))
    extra: dict[str, Any] = {}
    if dynamic is not None:
        per_input = dynamic.to_torch_export()
        if kwargs:  # by forward parameter name: positional ones first, then the keyword ones
            names = iter(zip(inputs.names, per_input))
            by_name: dict[str, Any] = {}
            for _ in args:
                name, axes = next(names)
                by_name[name] = axes
            for key, value in kwargs.items():
                by_name[key] = next(names)[1] if isinstance(value, torch.Tensor) else None
            extra["dynamic_shapes"] = by_name
        else:
            extra["dynamic_shapes"] = per_input
    with torch.no_grad(), rewritten(model, rewrites) as applied:
        program = torch.export.export(model, args, kwargs, **extra)
        program = program.run_decompositions(_decompositions())
    return program, dict(applied)


def _without_cache(model: torch.nn.Module, inputs: ExampleInputs, exc: Exception) -> bool:
    """When the model returned a transformers Cache (past key/values for generation, which an
    engine neither takes nor returns) and its forward has a `use_cache` switch the caller left
    unset: switch it off in `inputs` (a constant input, in the build info), warn, and say so."""
    found = UNKNOWN_OUTPUT.search(str(exc))
    cache_utils = sys.modules.get("transformers.cache_utils")
    base = getattr(cache_utils, "Cache", None)
    if found is None or not isinstance(base, type):
        return False
    module, _, name = found.group(1).rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    params = _forward_parameters(model) or []
    names = [p.name for p in params]
    if not (isinstance(cls, type) and issubclass(cls, base)) or "use_cache" not in names:
        return False
    if "use_cache" in inputs.kwargs or names.index("use_cache") < len(inputs.args):
        return False
    warnings.warn(
        f"{type(model).__name__} returns a {name} (cached keys/values for generation), which an engine "
        "cannot return; built with use_cache=False, so the engine's output has no past key/values. "
        "Pass kwargs={'use_cache': False} to build it so without this warning.",
        KilnWarning,
        stacklevel=_caller_stacklevel(),
    )
    inputs.kwargs["use_cache"] = False
    inputs.constants["use_cache"] = False
    return True


def check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        what = type(model).__name__
        hint = (
            "an ExportedProgram: pass the nn.Module you exported (kiln runs torch.export itself)"
            if isinstance(model, torch.export.ExportedProgram)
            else "wrap a function in a small nn.Module whose forward calls it"
            if callable(model)
            else "pass the model (an nn.Module) and its example inputs"
        )
        raise KilnError(f"kiln builds torch.nn.Module models; got a {what}. What to do: {hint}.")


def bind_example_inputs(model: Any, example_inputs: Any, kwargs: dict[str, Any] | None = None) -> ExampleInputs:
    """Check the example inputs and bind them to `model`'s forward parameter names (an
    ExampleInputs passes through as it is)."""
    if isinstance(example_inputs, ExampleInputs):
        return example_inputs
    if isinstance(example_inputs, dict):
        if kwargs:
            raise CaptureError("give keyword inputs either as example_inputs (a dict) or as kwargs, not both")
        example_inputs, kwargs = (), example_inputs
    given = example_inputs
    if example_inputs is None:
        example_inputs = ()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = dict(kwargs or {})
    if not isinstance(example_inputs, (tuple, list)) or not (example_inputs or kwargs):
        what = "an empty tuple" if isinstance(given, (tuple, list)) else f"a {type(given).__name__}"
        raise CaptureError(
            "example_inputs must be a tensor, a non-empty tuple of tensors or a dict of them by "
            f"forward parameter name (or give kwargs=), got {what}"
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(
                f"example input {i} is a {type(x).__name__}; kiln engines take tensors only. "
                "Bind non-tensor arguments in a wrapper module (functools.partial or a small "
                "nn.Module) before building, or pass them by keyword (constants)."
            )
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise CaptureError(f"keyword input names must be strings, got {key!r}")
        if not isinstance(value, (torch.Tensor, *CONSTANT_TYPES)):
            raise CaptureError(
                f"keyword input {key!r} is a {type(value).__name__}; kiln engines take tensors (and "
                "None/bool/int/float/str constants). Bind it in a wrapper module before building."
            )
    args = tuple(example_inputs)
    params = _forward_parameters(model)
    if params is None:  # no inspectable signature
        names = [f"input_{i}" for i in range(len(args))]
        ordered = kwargs
    else:
        try:
            inspect.Signature(params).bind(*args, **kwargs)
        except TypeError as exc:
            shown = ", ".join(p.name for p in params)
            raise CaptureError(
                f"the example inputs do not fit {type(model).__name__}.forward({shown}): {exc}"
            ) from None
        names = _positional_names(params, len(args))
        order = {p.name: i for i, p in enumerate(params)}
        ordered = dict(sorted(kwargs.items(), key=lambda kv: order.get(kv[0], len(order))))
    names += [k for k, v in ordered.items() if isinstance(v, torch.Tensor)]
    constants = {k: v for k, v in ordered.items() if not isinstance(v, torch.Tensor)}
    inputs = ExampleInputs(args, ordered, names, constants)
    if not inputs.tensors:
        raise CaptureError("the example inputs hold no tensor; an engine needs at least one tensor input")
    return inputs


def check_example_inputs(
    example_inputs: Any, kwargs: dict[str, Any] | None = None, model: Any = None
) -> tuple[torch.Tensor, ...]:
    """The example tensors in the engine's input order."""
    return bind_example_inputs(model, example_inputs, kwargs).tensors


def _forward_parameters(model: Any) -> list[inspect.Parameter] | None:
    forward = getattr(model, "forward", None)
    if forward is None:
        return None
    try:
        return list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None


def _positional_names(params: list[inspect.Parameter], count: int) -> list[str]:
    names: list[str] = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    star = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), "input")
    for i in range(count):
        names.append(positional[i].name if i < len(positional) else f"{star}_{i - len(positional)}")
    return names


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block (with a KilnWarning if it was training); every
    submodule's own train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    if any(training for _, training in modes):
        warnings.warn(
            f"{type(model).__name__} is in train mode; kiln builds it with eval semantics (as after "
            "model.eval(): dropout off, batch norm uses its running statistics). Your model is left "
            "in train mode.",
            KilnWarning,
            stacklevel=_caller_stacklevel(),
        )
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def _caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside kiln (and contextlib), seen from
    the function that calls this: the user's line that asked for the build."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level


def _on_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, bool]:
    """The model to trace (a copy when it must move or change dtype), and whether it was cast."""
    tensors = list(model.parameters()) + list(model.buffers())
    needs_move = any(t.device != torch.device(device) for t in tensors)
    needs_cast = any(t.is_floating_point() and t.dtype != dtype for t in tensors)
    if needs_move or needs_cast:
        model = copy.deepcopy(model).to(device=device)
        if needs_cast:
            model = model.to(dtype=dtype)
    return model, needs_cast


def _compute(dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    return compute_dtype if dtype.is_floating_point else dtype


def _cast(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(device=device, dtype=_compute(x.dtype, dtype))


def _model_float_dtype(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.dtype:
    """The float dtype the original model computes in."""
    floats = [t.dtype for t in model.parameters() if t.is_floating_point()]
    floats += [x.dtype for x in inputs if x.is_floating_point()]
    return floats[0] if floats else torch.float32


def _eager_output_dtypes(model: torch.nn.Module, inputs: ExampleInputs) -> list[torch.dtype | None] | None:
    """The dtype of each flat output of the original model (its own dtypes, not the build's),
    from a fake-tensor run: no real compute. Runs on a copy of the module tree whose weights
    are fake, so nothing of the caller's model changes. None when the run is not possible."""
    try:
        tensors = {**dict(model.named_parameters(remove_duplicate=False)),
                   **dict(model.named_buffers(remove_duplicate=False))}
        shadow = copy.deepcopy(model, memo={id(t): t for t in tensors.values()})
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = {name: mode.from_tensor(t) for name, t in tensors.items()}
            args, kwargs = inputs.map(mode.from_tensor)
            with torch.no_grad():
                out = torch.func.functional_call(shadow, fake, args, kwargs)
        return [x.dtype if isinstance(x, torch.Tensor) else None for x in pytree.tree_leaves(out)]
    except Exception:  # noqa: BLE001 - any failure: fall back to the dtypes the graph gives
        return None


def _check_no_mutation(program: torch.export.ExportedProgram) -> None:
    mutated = [
        spec.target or spec.arg.name
        for spec in program.graph_signature.output_specs
        if spec.kind != OutputKind.USER_OUTPUT
    ]
    if mutated:
        raise CaptureError(
            f"the model mutates {', '.join(map(str, mutated))} during forward; an engine "
            "cannot keep state between calls. Run the model in eval() mode, or remove the "
            "in-place update of buffers/inputs."
        )


def _to_graph_module(program: torch.export.ExportedProgram) -> tuple[fx.GraphModule, list[str], dict[str, str]]:
    """The program as a plain GraphModule, its user input names, and weight attr → state_dict key."""
    graph = copy.deepcopy(program.graph_module.graph)
    weights = {**program.state_dict, **program.constants}
    root = torch.nn.Module()
    taken: set[str] = set()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    kinds = dict(zip(placeholders, program.graph_signature.input_specs))  # same order by contract
    input_names: list[str] = []
    targets: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op == "placeholder":
            spec = kinds[node]
            if spec.kind == InputKind.USER_INPUT:
                if node.users or "val" in node.meta and isinstance(node.meta["val"], torch.Tensor):
                    input_names.append(spec.arg.name)
                else:
                    graph.erase_node(node)
                continue
            attr = _unique(re.sub(r"\W", "_", spec.target), taken)
            targets[attr] = spec.target
            root.register_buffer(attr, weights[spec.target].detach())
            with graph.inserting_before(node):
                getter = graph.get_attr(attr)
            getter.meta = dict(node.meta)
            node.replace_all_uses_with(getter)
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in DROPPED_OPS:
            graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(root, graph), input_names, targets


def _unique(name: str, taken: set[str]) -> str:
    base, i = name, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _output_specs(
    module: fx.GraphModule,
    compute_dtype: torch.dtype,
    model_dtype: torch.dtype,
    eager: list[torch.dtype | None] | None,
) -> list[TensorSpec | None]:
    """User-facing output specs (None for a non-tensor output). Each has the dtype the model
    itself gives: the graph's own dtype, except where kiln lowered the precision (then the
    model's eager dtype, from a fake run, or the model's float dtype for a compute-dtype output)."""
    out_node = next(n for n in module.graph.nodes if n.op == "output")
    values = out_node.args[0]
    if eager is not None and len(eager) != len(values):
        eager = None
    specs: list[TensorSpec | None] = []
    for i, arg in enumerate(values):
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        dtype = val.dtype
        if eager is not None and eager[i] is not None and dtype.is_floating_point and eager[i].is_floating_point:
            dtype = eager[i]
        elif eager is None and dtype == compute_dtype and dtype != model_dtype:
            dtype = model_dtype
        specs.append(TensorSpec(f"output_{i}", tuple(val.shape), dtype))
    return specs
