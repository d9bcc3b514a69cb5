"""Pre-integration probe for dynamic shapes (docs/dynamic-shapes.md, "Integration notes").

Captures small models with dynamic dims through kiln's own capture (torch.export is given
the dims by patching it, since capture does not take them yet), then runs each default pass,
the kernels' `supports` as on CUDA, and the planner, and reports per stage: exceptions (with
the kiln line), guards the stage added to the shape environment (decisions taken at the
traced size), whether the graph stayed symbolic, and whether it still matches eager at other
sizes. With --symbolic, graph.refresh_meta keeps the symbolic input values instead of
rebuilding fake inputs from the concrete TensorSpecs (the change capture/graph need).

    python benchmarks/dynamic_shapes_probe.py [--symbolic] [--models resnet18,bert,mha,mobilenet]

CPU only; a minute or two. Not a test: it documents where integration has to change code.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import unittest.mock
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import kiln.capture.export as capture_module
import kiln.graph as graph_module
from kiln.dims import normalize
from kiln.kernels import KERNELS
from kiln.passes import PASSES, copy_graph, default_passes
from kiln.shapes import Dim, evaluate, make, nondecreasing, specialize_plan
from kiln.shapes import expr_of as shape_expr

REAL_EXPORT = torch.export.export


def capture(model: torch.nn.Module, inputs: tuple, dynamic_shapes: Any) -> Any:
    spec = normalize(dynamic_shapes, inputs)

    def export(m: torch.nn.Module, args: tuple, *rest: Any, **kw: Any) -> Any:
        return REAL_EXPORT(m, args, *rest, dynamic_shapes=spec.to_torch_export(), **kw)

    with unittest.mock.patch.object(torch.export, "export", export):
        graph = capture_module.capture(model.eval(), spec.export_inputs(inputs), device=torch.device("cpu"))
    return graph, spec


def placeholders(graph: Any) -> list:
    return [n for n in graph.module.graph.nodes if n.op == "placeholder"]


def symbolic_refresh(graph: Any) -> None:
    vals = [n.meta["val"] for n in placeholders(graph)]
    mode = detect_fake_mode(vals)
    mode.allow_non_fake_inputs = True
    FakeTensorProp(graph.module, mode).propagate_dont_convert_inputs(*vals)


def is_symbolic(graph: Any) -> bool:
    return any(isinstance(d, torch.SymInt) for n in placeholders(graph) for d in n.meta["val"].shape)


def shape_env(graph: Any) -> Any:
    mode = detect_fake_mode([n.meta["val"] for n in placeholders(graph)])
    return mode.shape_env if mode is not None else None


def where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/kiln/" in f.filename] or frames
    f = ours[-1]
    return f"{f.filename.split('src/')[-1]}:{f.lineno} `{(f.line or '').strip()[:90]}`"


def first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return first_tensor(next(iter(value.values())))
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    return first_tensor(value[0])


def mismatches(graph: Any, model: torch.nn.Module, make_inputs: Any, sizes: list[int]) -> list[str]:
    bad = []
    for n in sizes:
        x = make_inputs(n)
        try:
            with torch.no_grad():
                want, got = first_tensor(model(*x)), first_tensor(graph.run(*x))
            if want.shape != got.shape or not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
                bad.append(f"size {n}: {tuple(got.shape)} differs from eager {tuple(want.shape)}")
        except Exception as exc:  # the probe reports every failure, whatever it is
            bad.append(f"size {n}: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}")
    return bad


def guards_since(env: Any, start: int) -> list[str]:
    return [] if env is None else [f"{g.expr} ({g.sloc})" for g in env.guards[start:]]


def run_model(name: str, model: torch.nn.Module, inputs: tuple, dyn: Any, make_inputs: Any, sizes: list[int],
              symbolic: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"model": name, "passes": {}}
    graph, spec = capture(model, inputs, dyn)
    env = shape_env(graph)
    report["capture"] = {"symbolic": is_symbolic(graph), "mismatches": mismatches(graph, model, make_inputs, sizes),
                         "ranges": {str(k): str(v) for k, v in (env.var_to_range.items() if env else [])}}
    from kiln.passes import channels_last

    stages = [(p, PASSES[p].fn) for p in default_passes()] + [("to_channels_last (forced)",
                                                              channels_last.to_channels_last)]
    for pass_name, fn in stages:
        start = len(env.guards) if env else 0
        try:
            new = fn(copy_graph(graph))
        except Exception as exc:
            first = str(exc).splitlines()[0][:160]
            report["passes"][pass_name] = {"fails": f"{where(exc)}: {type(exc).__name__}: {first}"}
            continue
        report["passes"][pass_name] = {
            "symbolic": is_symbolic(new),
            "guards": guards_since(env, start),
            "mismatches": mismatches(new, model, make_inputs, sizes),
        }
        graph = new
    report["supports"] = supports_on_cuda(graph, env)
    report["expressions"] = expressions(graph, spec) if is_symbolic(graph) else "concrete after the passes"
    report["planner"] = planner(graph)
    return report


def supports_on_cuda(graph: Any, env: Any) -> list[str]:
    from kiln.select.selection import op_call

    problems: set[str] = set()
    for node in graph.module.graph.nodes:
        if node.op != "call_function":
            continue
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat)):
            problems.add(f"symbolic scalar node {node.target} ({node.name}) would become a step")
            continue
        try:
            call = op_call(node, "cuda")
        except Exception as exc:
            problems.add(f"op_call({node.target}): {where(exc)} {type(exc).__name__}")
            continue
        for kernel in KERNELS.values():
            if not kernel.implements(call.op):
                continue
            start = len(env.guards) if env else 0
            try:
                kernel.supports(call)
            except Exception as exc:
                problems.add(f"{kernel.name}.supports: {where(exc)} {type(exc).__name__}")
            added = guards_since(env, start)
            if added:
                problems.add(f"{kernel.name}.supports added guards {added}")
    return sorted(problems)


def expressions(graph: Any, spec: Any) -> dict[str, Any]:
    """Every size the graph's values have, as kiln expressions: coverage and monotone sizes."""
    names = spec.symbol_names([n.meta["val"] for n in placeholders(graph)])
    lows = {d.name: d.min for d in spec.dims.values()}
    distinct: set[str] = set()
    not_monotone: set[str] = set()
    failures: set[str] = set()
    slots = []
    for node in graph.module.graph.nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (list, tuple)) else [val]:
            if not isinstance(v, torch.Tensor):
                continue
            try:
                shape = [shape_expr(d, names) for d in v.shape]
                stride = [shape_expr(d, names) for d in v.stride()]
            except Exception as exc:
                failures.add(f"{node.name}: {exc}")
                continue
            nbytes = make("mul", [v.element_size(), *shape])
            distinct.update(json.dumps(e) for e in (*shape, *stride, nbytes))
            if not nondecreasing(nbytes, lows):
                not_monotone.add(json.dumps(nbytes))
            slots.append({"shape": shape, "stride": stride, "dtype": "float32", "kind": "heap", "nbytes": nbytes})
    plan = {"slots": slots, "steps": [], "inputs": [], "outputs": []}
    binding = {d.name: d.max for d in spec.dims.values()}
    t0 = time.perf_counter()
    for _ in range(10):
        specialize_plan(plan, binding)
    per = (time.perf_counter() - t0) / 10 * 1e3
    sample = sorted(distinct, key=len)[-3:]
    return {"tensor_values": len(slots), "distinct": len(distinct), "failures": sorted(failures),
            "not_monotone": sorted(not_monotone), "specialize_ms": round(per, 3), "largest": sample,
            "max_binding_ok": all(evaluate(s["nbytes"], binding) >= 0 for s in slots)}


def planner(graph: Any) -> str:
    from kiln.plan.planner import make_plan
    from kiln.select.selection import Selection, select_kernels

    try:
        selections = select_kernels(graph)
    except Exception as exc:
        selections = {n: Selection("aten", ["aten"]) for n in graph.module.graph.nodes if n.op == "call_function"}
        note = f"select_kernels fails: {where(exc)}: {type(exc).__name__}: {str(exc).splitlines()[1][:120]}; "
    else:
        note = "select_kernels ok; "
    try:
        json.dumps(make_plan(graph, selections))
        return note + "make_plan ok"
    except Exception as exc:
        return note + f"make_plan fails: {where(exc)}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def models(chosen: list[str]) -> list[tuple]:
    import torchvision

    from kiln import zoo

    batch = Dim("batch", min=1, opt=4, max=16)
    found = []
    if "resnet18" in chosen:
        found.append(("resnet18, batch 1:4:16", torchvision.models.resnet18(), (torch.randn(4, 3, 64, 64),),
                      ({0: batch},), lambda n: (torch.randn(n, 3, 64, 64),), [1, 3, 16]))
    if "mobilenet" in chosen:
        found.append(("mobilenet_v2, batch 1:4:16", torchvision.models.mobilenet_v2(), (torch.randn(4, 3, 64, 64),),
                      ({0: batch},), lambda n: (torch.randn(n, 3, 64, 64),), [1, 3]))
    if "bert" in chosen:
        bert = zoo.create("bert-tiny", batch=4, input_shape=(32,)).model
        seq = Dim("seq", min=2, opt=32, max=128)
        found.append(("bert-tiny, batch 1:4:16, seq 2:32:128", bert, (torch.randint(0, 1000, (4, 32)),),
                      ({0: batch, 1: seq},), lambda n: (torch.randint(0, 1000, (n, 77 if n == 3 else 32)),),
                      [1, 3, 16]))
    if "mha" in chosen:
        class SelfAttention(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.attn(x, x, x, need_weights=False)[0]

        found.append(("batch-first MultiheadAttention, batch 1:4:16", SelfAttention(), (torch.randn(4, 10, 64),),
                      ({0: batch},), lambda n: (torch.randn(n, 10, 64),), [1, 3, 16]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbolic", action="store_true", help="keep symbolic values in graph.refresh_meta")
    parser.add_argument("--models", default="resnet18,bert,mha,mobilenet")
    args = parser.parse_args()
    torch.manual_seed(0)
    with unittest.mock.patch.object(graph_module, "refresh_meta", symbolic_refresh) if args.symbolic else \
            unittest.mock.patch.object(graph_module, "refresh_meta", graph_module.refresh_meta):
        for name, model, inputs, dyn, make_inputs, sizes in models(args.models.split(",")):
            report = run_model(name, model.eval(), inputs, dyn, make_inputs, sizes, args.symbolic)
            print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
