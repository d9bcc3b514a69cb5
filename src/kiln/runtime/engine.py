"""The runtime: bind inputs, run the plan's steps, replay a CUDA graph on the GPU.

Reads the JSON plan and the weights; imports nothing from the build side.
A deployment needs this module, kiln.kernels, kiln.specs, kiln.runtime.engine_file and the file.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kiln.errors import DeviceMismatchError, EngineFileError, InputError, KilnWarning
from kiln.kernels import OutVariant, get_kernel
from kiln.runtime import engine_file
from kiln.specs import TensorSpec, build_structure, decode_value, dtype_from_name

Vals = list[Any]


class _Step:
    """One plan step, compiled to closures over slots, weights and arena views."""

    def __init__(self, step: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device):
        self.name = step["name"]
        out = step.get("out_variant")
        kernel = get_kernel(step["kernel"])
        self.fn = kernel.make(step["op"], OutVariant(out["op"], tuple(out["out_args"])) if out else None)
        self.args = _binder(decode_value(step["args"], lambda r: _resolve(r, weights), device))
        self.kwargs = {
            k: _binder(decode_value(v, lambda r: _resolve(r, weights), device)) for k, v in step["kwargs"].items()
        }
        self.outputs: list[int] = step["outputs"]
        self.multi: bool = step["multi"]
        self.planned = out is not None or bool(step.get("writes_into"))
        self.side = step.get("stream", 0) == 1  # runs on the side stream (kiln.plan.streams)
        self.fork = bool(step.get("fork"))  # the side stream first waits for the main stream
        self.join = bool(step.get("join"))  # the main stream first waits for the side stream
        self.out_views: list[torch.Tensor] = []

    def __call__(self, vals: Vals) -> None:
        args = self.args(vals)
        kwargs = {k: b(vals) for k, b in self.kwargs.items()}
        result = self.fn(tuple(args), kwargs, self.out_views)
        if self.multi:
            for slot, r in zip(self.outputs, result):
                vals[slot] = r
        else:
            vals[self.outputs[0]] = result


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _StepTimer:
    """Runs one step and returns a function giving its duration in ms (CUDA events or wall clock)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, step: _Step, vals: Vals) -> Callable[[], float]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(vals)
            end.record()
            return lambda: (end.synchronize(), start.elapsed_time(end))[1]
        t0 = time.perf_counter()
        step(vals)
        elapsed = (time.perf_counter() - t0) * 1e3
        return lambda: elapsed


def _resolve(ref: dict[str, Any], weights: dict[str, torch.Tensor]) -> Any:
    if "slot" in ref:
        return _Slot(int(ref["slot"]))
    if "weight" in ref:
        try:
            return weights[ref["weight"]]
        except KeyError:
            raise EngineFileError(f"the plan uses weight {ref['weight']!r}, which the file lacks") from None
    raise EngineFileError(f"unknown reference {ref!r} in the plan")


def _binder(template: Any) -> Callable[[Vals], Any]:
    if isinstance(template, _Slot):
        i = template.index
        return lambda vals: vals[i]
    if isinstance(template, (list, tuple)) and _has_slot(template):
        parts = [_binder(t) for t in template]
        kind = type(template)
        return lambda vals: kind(p(vals) for p in parts)
    return lambda vals: template


def _has_slot(template: Any) -> bool:
    if isinstance(template, _Slot):
        return True
    return isinstance(template, (list, tuple)) and any(_has_slot(t) for t in template)


def _view(arena: torch.Tensor, slot: dict[str, Any]) -> torch.Tensor:
    dtype = dtype_from_name(slot["dtype"])
    offset, nbytes = slot["offset"], slot["nbytes"]
    return arena[offset : offset + nbytes].view(dtype).as_strided(slot["shape"], slot["stride"])


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """cuDNN picks each convolution's algorithm by timing them, as engines run (and are tuned)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def default_device(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


class Engine:
    """A built model: call it like the original module.

    `engine(*inputs)` checks the inputs against what the engine was built for, runs
    the plan (replaying a CUDA graph on the GPU) and returns fresh tensors in the
    structure the model returns.
    """

    def __init__(
        self, header: dict[str, Any], weights: dict[str, torch.Tensor], device: str | torch.device | None = None
    ):
        build = header["build"]
        self.header = header
        self.plan: dict[str, Any] = header["plan"]
        self.build_info: dict[str, Any] = build
        self.device = _check_device(build, device)
        self.weights = {k: v.to(self.device) for k, v in weights.items()}
        self.inputs = [TensorSpec.from_json(s) for s in self.plan["inputs"]]
        self.graph_inputs = [TensorSpec.from_json(s) for s in self.plan["graph_inputs"]]
        self.outputs = [None if s is None else TensorSpec.from_json(s) for s in self.plan["outputs"]]
        self.use_cuda_graph = self.device.type == "cuda" and os.environ.get("KILN_CUDA_GRAPH", "1") != "0"
        self._steps = [_Step(s, self.weights, self.device) for s in self.plan["steps"]]
        side = self.device.type == "cuda" and any(s.side for s in self._steps)
        self._side_stream = torch.cuda.Stream(self.device) if side else None
        self._bind_arena()
        self._free_after = self._release_schedule()
        self._graph: torch.cuda.CUDAGraph | None = None

    # -- running ---------------------------------------------------------------------------

    def __call__(self, *inputs: torch.Tensor) -> Any:
        self.check_inputs(inputs)
        if self.use_cuda_graph:
            flat = self._replay(inputs)
        else:
            bound = [x.to(s.dtype).contiguous() for x, s in zip(inputs, self.graph_inputs)]
            flat = self.run_steps(bound)
        return build_structure(self.plan["structure"], self._deliver(flat))

    def run_steps(self, graph_inputs: list[torch.Tensor]) -> list[Any]:
        """Execute every step in order; returns the flat graph outputs (not yet cast or copied)."""
        vals: Vals = [None] * len(self.plan["slots"])
        vals[: len(graph_inputs)] = graph_inputs
        side = self._side_stream
        main = torch.cuda.current_stream(self.device) if side is not None else None
        for step, free in zip(self._steps, self._free_after):
            if side is not None and step.side:
                if step.fork:
                    side.wait_stream(main)
                with torch.cuda.stream(side):
                    step(vals)
            else:
                if side is not None and step.join:
                    main.wait_stream(side)
                step(vals)
            for slot in free:
                vals[slot] = None
        return [self._output(ref, vals) for ref in self.plan["output_refs"]]

    def profile(self, *inputs: torch.Tensor, iters: int = 10) -> list[dict[str, Any]]:
        """Median time of every step (step by step, no CUDA graph), slowest first: where the time goes."""
        self.check_inputs(inputs)
        bound = [x.to(s.dtype).contiguous() for x, s in zip(inputs, self.graph_inputs)]
        timer = _StepTimer(self.device)
        samples: list[list[float]] = [[] for _ in self._steps]
        for _ in range(iters + 2):
            vals: Vals = [None] * len(self.plan["slots"])
            vals[: len(bound)] = bound
            times = [timer(step, vals) for step in self._steps]
            for i, t in enumerate(times):
                samples[i].append(t())
        rows = []
        for step, spec, ts in zip(self._steps, self.plan["steps"], samples):
            ts = sorted(ts[2:])
            out = self.plan["slots"][spec["outputs"][0]] if spec["outputs"] else {}
            rows.append({"step": step.name, "op": spec["op"], "kernel": spec["kernel"], "ms": ts[len(ts) // 2],
                         "shape": out.get("shape"), "stride": out.get("stride")})
        return sorted(rows, key=lambda r: -r["ms"])

    def _output(self, ref: Any, vals: Vals) -> Any:
        if isinstance(ref, dict) and "slot" in ref:
            return vals[ref["slot"]]
        if isinstance(ref, dict) and "weight" in ref:
            return self.weights[ref["weight"]]
        return decode_value(ref, lambda r: None, self.device)

    def _deliver(self, flat: list[Any]) -> list[Any]:
        """Outputs the caller owns: cast to the model's dtype, never aliasing engine memory."""
        out = []
        for value, spec in zip(flat, self.outputs):
            if spec is None:
                out.append(value)
            elif value.dtype != spec.dtype:
                out.append(value.to(spec.dtype))
            else:
                out.append(value.clone())
        return out

    def _replay(self, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
        if self._graph is None:
            self._capture()
            if self._graph is None:
                return self.run_steps([x.to(s.dtype).contiguous() for x, s in zip(inputs, self.graph_inputs)])
        for static, x in zip(self._static_inputs, inputs):
            static.copy_(x)
        self._graph.replay()
        return self._static_outputs

    def _capture(self) -> None:
        self._static_inputs = [torch.zeros(s.shape, dtype=s.dtype, device=self.device) for s in self.graph_inputs]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            # cuDNN times its algorithms for these exact shapes during warm-up; the graph keeps the winners.
            with cudnn_benchmark(), torch.inference_mode():
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: lazy cuBLAS/cuDNN init must not happen during capture
                        self.run_steps(self._static_inputs)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._static_outputs = self.run_steps(self._static_inputs)
            self._graph = graph
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            self.use_cuda_graph = False
            warnings.warn(
                f"CUDA graph capture failed ({str(exc).splitlines()[0]}); running step by step",
                KilnWarning,
                stacklevel=3,
            )

    # -- checking --------------------------------------------------------------------------

    def check_inputs(self, inputs: tuple[Any, ...]) -> None:
        if len(inputs) != len(self.inputs):
            names = ", ".join(s.name for s in self.inputs)
            raise InputError(f"the engine takes {len(self.inputs)} input(s) ({names}), got {len(inputs)}")
        for i, (x, spec) in enumerate(zip(inputs, self.inputs)):
            where = f"input {i} ({spec.name!r})"
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{where} must be a tensor, got {type(x).__name__}")
            if x.dim() != len(spec.shape):
                raise InputError(
                    f"{where} has rank {x.dim()} (shape {tuple(x.shape)}); the engine expects rank "
                    f"{len(spec.shape)}, shape {spec.shape}"
                )
            if tuple(x.shape) != spec.shape:
                raise InputError(
                    f"{where} has shape {tuple(x.shape)}; the engine was built for {spec.shape}. "
                    "Engines have fixed shapes: rebuild with the new shape (kiln build --input-shape/--batch)."
                )
            if x.dtype != spec.dtype:
                raise InputError(f"{where} has dtype {x.dtype}; the engine expects {spec.dtype}")
            if x.device.type != self.device.type or (
                x.device.index is not None and self.device.index is not None and x.device.index != self.device.index
            ):
                raise InputError(
                    f"{where} is on {x.device}; the engine runs on {self.device}. Move it with .to('{self.device}')."
                )

    # -- memory ----------------------------------------------------------------------------

    def _bind_arena(self) -> None:
        slots = self.plan["slots"]
        self.arena = torch.empty(self.plan["memory"]["arena_bytes"], dtype=torch.uint8, device=self.device)
        for step in self._steps:
            if step.planned:
                step.out_views = [_view(self.arena, slots[o]) for o in step.outputs]

    def _release_schedule(self) -> list[list[int]]:
        free: list[list[int]] = [[] for _ in self._steps]
        for slot, last in enumerate(self.plan["last_use"]):
            if 0 <= last < len(free):
                free[last].append(slot)
        return free

    # -- files and descriptions --------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the engine file (JSON header + safetensors weights, no pickle)."""
        engine_file.write(path, self.header, self.weights)

    def summary(self) -> str:
        b, m = self.build_info, self.plan["memory"]
        ins = ", ".join(f"{s.name}: {s.describe()}" for s in self.inputs)
        outs = ", ".join(s.describe() for s in self.outputs if s is not None)
        return (
            f"kiln Engine({b.get('model', '?')}, {b['precision']} on {self.device}, "
            f"{len(self._steps)} steps, arena {m['arena_bytes'] / 2**20:.1f} MiB)\n"
            f"  inputs:  {ins}\n  outputs: {outs}\n"
            f"  built with kiln {b['kiln_version']}, torch {b['torch_version']} on {b['device_name']}"
        )

    def __repr__(self) -> str:
        return self.summary()


def _check_device(build: dict[str, Any], device: str | torch.device | None) -> torch.device:
    built_for = build["device_type"]
    target = torch.device(device) if device is not None else torch.device(built_for)
    if target.type != built_for:
        raise DeviceMismatchError(
            f"this engine was built for {built_for} ({build['device_name']}); it cannot run on "
            f"{target.type}. Rebuild it for {target.type}: kiln build MODEL --device {target.type}"
        )
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceMismatchError(
                f"this engine was built for a CUDA GPU ({build['device_name']}), and this machine has "
                "no usable CUDA device. Run it on a GPU machine, or rebuild with --device cpu."
            )
        if target.index is None:
            target = default_device("cuda")
        have = list(torch.cuda.get_device_capability(target))
        want = build.get("compute_capability")
        if want is not None and list(want) != have:
            raise DeviceMismatchError(
                f"this engine was built for compute capability {tuple(want)} ({build['device_name']}); "
                f"{torch.cuda.get_device_name(target)} has {tuple(have)}. Engines are tuned per GPU: "
                "rebuild it on this GPU."
            )
    return target


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> Engine:
    """Load an engine file; `device` defaults to the kind it was built for."""
    header, weights = engine_file.read(path)
    if not isinstance(header, dict) or "plan" not in header or "build" not in header:
        raise EngineFileError(f"{path} has no plan in its header; it was not written by kiln")
    return Engine(header, weights, device)


class EngineModule(torch.nn.Module):
    """An nn.Module drop-in around an Engine (what kiln.compile returns)."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.engine(*inputs)

    def save(self, path: str | os.PathLike) -> None:
        self.engine.save(path)

    def extra_repr(self) -> str:
        return self.engine.summary()
