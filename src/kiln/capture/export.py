"""Capture: nn.Module + example inputs → a core-ATen FX graph with weights as constants.

torch.export does the tracing; `run_decompositions()` lowers to the Core ATen opset.
The exported program's lifted parameters, buffers and constants become `get_attr`
nodes on a plain GraphModule, so each pass sees one self-contained graph that
PyTorch can still run eagerly.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind, OutputKind

from kiln.capture.rewrites import check_names, rewritten
from kiln.errors import CaptureError
from kiln.graph import CapturedGraph, source_line  # noqa: F401  (re-exported)
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


def capture(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    rewrites: list[str] | None = None,
) -> CapturedGraph:
    """Export `model` on `device` with floating weights and inputs in `compute_dtype`.

    `rewrites` names the kiln.capture.rewrites to trace through (None: all of them)."""
    example_inputs = check_example_inputs(example_inputs)
    check_names(rewrites)
    user_specs = [
        TensorSpec(f"input_{i}", tuple(x.shape), x.dtype) for i, x in enumerate(example_inputs)
    ]
    model_dtype = _model_float_dtype(model, example_inputs)
    originals = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    model = _on_device(model, device, compute_dtype)
    args = tuple(_cast(x, device, compute_dtype) for x in example_inputs)
    try:
        with torch.no_grad(), rewritten(model, rewrites) as applied:
            program = torch.export.export(model, args)
            program = program.run_decompositions(_decompositions())
    except Exception as exc:  # torch.export raises many kinds; all mean "could not capture"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{first}\nkiln needs a model that torch.export can trace with the example inputs "
            "(no data-dependent Python control flow); see the torch.export docs on "
            "graph breaks, or export a simpler wrapper around the model."
        ) from exc

    _check_no_mutation(program)
    module, input_names, targets = _to_graph_module(program)
    masters = {
        attr: originals[target].detach()
        for attr, target in targets.items()
        if target in originals and originals[target].dtype != getattr(module, attr).dtype
    }
    for spec, name in zip(user_specs, input_names):
        spec.name = name
    graph_inputs = [TensorSpec(s.name, s.shape, _compute(s.dtype, compute_dtype)) for s in user_specs]
    outputs = _output_specs(module, model_dtype)
    structure = encode_structure(program.call_spec.out_spec)
    return CapturedGraph(
        module, user_specs, graph_inputs, outputs, structure, torch.device(device), compute_dtype, masters,
        dict(applied),
    )


def check_example_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise CaptureError(
            "example_inputs must be a tensor or a non-empty tuple of tensors, got "
            f"{type(example_inputs).__name__}"
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(
                f"example input {i} is a {type(x).__name__}; kiln engines take tensors only. "
                "Bind non-tensor arguments in a wrapper module (functools.partial or a small "
                "nn.Module) before building."
            )
    return tuple(example_inputs)


def _on_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    tensors = list(model.parameters()) + list(model.buffers())
    needs_move = any(t.device != torch.device(device) for t in tensors)
    needs_cast = any(t.is_floating_point() and t.dtype != dtype for t in tensors)
    if needs_move or needs_cast:
        model = copy.deepcopy(model).to(device=device)
        if needs_cast:
            model = model.to(dtype=dtype)
    return model.eval()


def _compute(dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    return compute_dtype if dtype.is_floating_point else dtype


def _cast(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(device=device, dtype=_compute(x.dtype, dtype))


def _model_float_dtype(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.dtype:
    """The float dtype the original model computes in: what its outputs come back as."""
    floats = [t.dtype for t in model.parameters() if t.is_floating_point()]
    floats += [x.dtype for x in inputs if x.is_floating_point()]
    return floats[0] if floats else torch.float32


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


def _output_specs(module: fx.GraphModule, model_dtype: torch.dtype) -> list[TensorSpec | None]:
    """User-facing output specs (None for a non-tensor output); floats in the model's dtype."""
    out_node = next(n for n in module.graph.nodes if n.op == "output")
    specs: list[TensorSpec | None] = []
    for i, arg in enumerate(out_node.args[0]):
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        dtype = model_dtype if val.dtype.is_floating_point else val.dtype
        specs.append(TensorSpec(f"output_{i}", tuple(val.shape), dtype))
    return specs
