"""The runtime: bind inputs, run the plan's steps, replay a CUDA graph on the GPU.

Reads the JSON plan and the weights; imports nothing from the build side.
A deployment needs this module, kiln.kernels, kiln.specs, kiln.runtime.engine_file and the file.

An Engine holds what all calls share and none writes (plan, weights, steps); each call runs
in an execution context (kiln.runtime.context: arena, CUDA graph, stream) lent from a pool,
so one engine serves many threads at once.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from kiln.errors import DeviceMismatchError, EngineFileError, InputError, KilnError, KilnWarning, RunError
from kiln.kernels import OutVariant, StepFn, get_kernel
from kiln.runtime import engine_file, validate
from kiln.runtime.context import ContextPool, ExecutionContext, cudnn_benchmark
from kiln.shapes import Buckets, Dim, InputShape, ShapeCache, bind, dims_from_json, specialize_plan, use_fallback
from kiln.specs import TensorSpec, build_structure, decode_value, dtype_from_name

Vals = list[Any]

__all__ = ["Engine", "EngineModule", "ExecutionContext", "cudnn_benchmark", "default_device", "load"]


class _Step:
    """One plan step as every execution context shares it: its kernel and closures binding its
    arguments to slots and weights. Each context makes its own kernel function (make())."""

    def __init__(self, step: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device):
        self.name = step["name"]
        self.module, self.source = step.get("module"), step.get("source")  # descriptive, for errors
        out = step.get("out_variant")
        self.kernel = get_kernel(step["kernel"])
        self.op: str = step["op"]
        self.out_variant = OutVariant(out["op"], tuple(out["out_args"])) if out else None
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

    def failed(self, exc: Exception) -> RunError:
        """The error of this step's kernel raising `exc` while running."""
        module = f", module {self.module!r}" if self.module else ""
        source = f" Model source: {self.source}" if self.source else ""
        return RunError(
            f"step {self.name!r} ({self.op}{module}, kernel {self.kernel.name}) failed on these inputs: "
            f"{type(exc).__name__}: {_first_line(exc)}. Check the inputs' values (say, an index past an "
            f"embedding table's size).{source}"
        )

    def make(self) -> StepFn:
        """This step's kernel function for one execution context (a kernel may keep per-call
        state in it, as the TensorRT kernel keeps its execution context)."""
        return self.kernel.make(self.op, self.out_variant)


class _Program:
    """A static plan (one binding of a dynamic-shape plan) as every context shares it: its
    steps' kernels and argument binders, and when each slot can be released."""

    def __init__(self, plan: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device):
        self.plan = plan
        self.step_specs = [_Step(s, weights, device) for s in plan["steps"]]
        self.free_after = _release_schedule(plan, len(self.step_specs))
        self.n_slots = len(plan["slots"])
        self.output_refs = plan["output_refs"]
        self.graph_inputs = [(tuple(s["shape"]), dtype_from_name(s["dtype"])) for s in plan["graph_inputs"]]
        self.outputs = plan["outputs"]


def _release_schedule(plan: dict[str, Any], n_steps: int) -> list[list[int]]:
    free: list[list[int]] = [[] for _ in range(n_steps)]
    for slot, last in enumerate(plan["last_use"]):
        if 0 <= last < n_steps:
            free[last].append(slot)
    return free


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _StepTimer:
    """Runs one step and returns a function giving its duration in ms (CUDA events or wall clock)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, step: Callable[[Vals], None], vals: Vals) -> Callable[[], float]:
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


def default_device(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def _nbytes(spec: TensorSpec) -> int:
    count = 1
    for d in spec.shape:
        count *= d
    return count * torch.empty((), dtype=spec.dtype).element_size()


def _unusable_tensor(x: torch.Tensor, spec: TensorSpec) -> str | None:
    """Why a tensor cannot be an engine input whatever its shape, or None (check_inputs asks
    only once something else looks wrong: a quantized tensor has another dtype, a meta tensor
    another device, so the common case pays for none of this)."""
    if x.is_nested:
        return "a nested tensor; engines take dense (strided) tensors of the shape they were built for"
    if x.layout != torch.strided:
        return f"a sparse tensor (layout {x.layout}); engines take dense tensors: pass x.to_dense()"
    if x.is_quantized:
        return (f"a quantized tensor ({x.dtype}); the engine takes {spec.dtype}: pass x.dequantize()"
                " (or build a quantized engine)")
    if x.is_meta:
        return "a meta tensor (a shape without data); pass a tensor holding the input's values"
    return None


def _tensor_advice(x: Any, spec: TensorSpec) -> str:
    """What to pass instead of the non-tensor `x` where the engine takes `spec`."""
    want = f"a {spec.describe()} tensor"
    if hasattr(x, "__array__") or hasattr(x, "__dlpack__"):
        return f"pass torch.as_tensor(x) ({want})"
    if isinstance(x, (bool, int, float)) and not spec.shape:
        return f"pass torch.tensor({x!r}, dtype={spec.dtype})"
    if x is None:
        return f"the engine was built with {want} here; pass one (a None input means another engine)"
    return f"pass {want}"


class Engine:
    """A built model: call it like the original module.

    `engine(*args, **kwargs)` binds the inputs as the model's forward(...) would (keyword
    inputs by its parameter names), checks them against what the engine was built for, runs
    the plan (replaying a CUDA graph on the GPU) and returns fresh tensors in the structure
    the model returns. Calls from many threads run at once: each borrows an execution context
    (arena, CUDA graph, stream) from a pool that grows to the number of concurrent calls
    (at most `max_contexts`, when set; further calls wait); weights are shared.
    """

    # Set by load(): the fingerprint of the key that signed the file (kiln.runtime.signing), and
    # whether that signature was verified against the trusted keys given to load().
    signer: str | None = None
    signer_trusted: bool = False

    def __init__(
        self,
        header: dict[str, Any],
        weights: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        *,
        max_contexts: int | None = None,
        pad_while_capturing: bool = True,
    ):
        build = header["build"]
        self.header = header
        self.plan: dict[str, Any] = header["plan"]
        self.build_info: dict[str, Any] = build
        self.device = _check_device(build, device)
        self.weights = {k: v.detach().to(self.device) for k, v in weights.items()}  # read-only, never grad
        self.inputs = [TensorSpec.from_json(s) for s in self.plan["inputs"]]
        self.input_names = [s.name for s in self.inputs]
        self._traced = _traced_inputs(build)  # non-tensor arguments traced as constants, by name
        self.graph_inputs = [TensorSpec.from_json(s) for s in self.plan["graph_inputs"]]
        self.outputs = [None if s is None else TensorSpec.from_json(s) for s in self.plan["outputs"]]
        self.use_cuda_graph = self.device.type == "cuda" and os.environ.get("KILN_CUDA_GRAPH", "1") != "0"
        # dynamic shapes on CUDA: a call at a size without a graph yet is answered by a larger
        # captured size, padded, while its own graph is prepared in the background (see warm_in_background)
        self.pad_while_capturing = bool(pad_while_capturing)
        # dynamic shapes (docs/dynamic-shapes.md): dims by name; each binding's plan specialized once
        self.dims: dict[str, Dim] = dims_from_json(self.plan["dims"]) if "dims" in self.plan else {}
        if self.dims:
            self._init_dynamic()
            self.step_specs = self.program(self._opt_key).step_specs  # what the plan's steps are, at opt
            self.free_after = self.program(self._opt_key).free_after
        else:
            self.step_specs = [_Step(s, self.weights, self.device) for s in self.plan["steps"]]
            self.free_after = self._release_schedule()
        self._lock = threading.Lock()
        # CUDA: the calls of one engine run on the GPU one after another, in call order, each on
        # its caller's stream (a call on another stream than the last first waits for it); so
        # CUDA engines default to one pooled context (callers queue for it), as more would only
        # cost memory.
        self.gpu_order = threading.Lock()
        self._last_call: torch.cuda.Event | None = None
        self._last_stream: torch.cuda.Stream | None = None
        self._pool = ContextPool(self.create_context)
        if max_contexts is None and self.device.type == "cuda":
            max_contexts = 1
        self.max_contexts = max_contexts
        self._pool.add(self.create_context())  # the first now: kernels made and the arena allocated at load
        if self.dims:
            self.prepare_pad_targets()

    def after_previous_call(self, stream: torch.cuda.Stream) -> None:
        """CUDA, under gpu_order: work enqueued on `stream` from now on runs after the engine's
        previous call (on the same stream the stream's own order does that)."""
        if self._last_call is not None and self._last_stream != stream:
            stream.wait_event(self._last_call)

    def call_done(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        """CUDA, under gpu_order: the work enqueued on `stream` so far is this engine's last call;
        `event` (the calling context's own, reused: every wait on it is enqueued under gpu_order
        before the context records it again) marks its end."""
        event.record(stream)
        self._last_call, self._last_stream = event, stream

    def finish_previous_call(self) -> None:
        """CUDA: block until the engine's last call has finished on the GPU (before memory that
        call may still use is given back)."""
        last = self._last_call
        if last is not None:
            last.synchronize()

    # -- dynamic shapes ----------------------------------------------------------------------

    PROGRAM_CACHE = 32  # specialized plans kept per engine (shared by every context)

    def _init_dynamic(self) -> None:
        self.dim_order = list(self.dims)
        self.input_shapes = [InputShape(s.name, tuple(s.shape)) for s in self.inputs]
        where: dict[str, tuple[int, int]] = {}
        for i, spec in enumerate(self.inputs):
            for axis, d in enumerate(spec.shape):
                if isinstance(d, str):
                    where.setdefault(d, (i, axis))
        self._dim_axes = [where[d] for d in self.dim_order]  # where each dim's value is read
        self._opt_key = tuple(self.dims[d].opt for d in self.dim_order)
        self._programs: ShapeCache[tuple[int, ...], _Program] = ShapeCache(self.PROGRAM_CACHE)
        self._programs_lock = threading.Lock()
        self.shape_cache_size = 8  # per execution context: bound steps (and CUDA graphs) kept, by binding
        self.capture_after = 2  # CUDA: a binding's graph is captured at its call number capture_after (1: first)
        self.buckets: dict[str, Buckets] = {}
        self.paddable: list[str] = list(self.plan.get("paddable", []))
        self._warm_lock = threading.Lock()
        self._warming: dict[tuple[int, ...], Future] = {}  # bindings warmed up in the background
        self._warm_stream: torch.cuda.Stream | None = None
        for name, sizes in self.plan.get("buckets", {}).items():
            self.buckets[name] = Buckets(self.dims[name], sizes)

    def binding_key(self, inputs: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
        """The dims' values (in the engine's order) read off checked inputs."""
        return tuple(inputs[i].shape[axis] for i, axis in self._dim_axes)

    def program(self, key: tuple[int, ...]) -> _Program:
        """The plan specialized at one binding (dims in the engine's order), made once and kept
        in a bounded engine-wide cache: its steps as every context shares them."""
        with self._programs_lock:
            found = self._programs.get(key)
        if found is not None:
            return found
        made = _Program(self._specialize(dict(zip(self.dim_order, key))), self.weights, self.device)
        with self._programs_lock:
            self._programs.put(key, made)
        return made

    def _specialize(self, binding: dict[str, int]) -> dict[str, Any]:
        """The static plan for `binding`; a step whose kernel does not support this binding's
        sizes (its `supports`, asked with the actual shapes) runs its fallback kernel."""
        plan = specialize_plan(self.plan, binding)
        steps = []
        for step in plan["steps"]:
            name = step.get("fallback")
            if name is not None and not get_kernel(step["kernel"]).supports(self._op_call(step, plan)):
                step = use_fallback(step, name, get_kernel(name).writes_planned_outputs)
            steps.append(step)
        plan["steps"] = steps
        return plan

    def _op_call(self, step: dict[str, Any], plan: dict[str, Any]) -> Any:
        """What selection asked the kernel (kiln.select.selection.op_call), from a specialized plan."""
        from kiln.kernels import OpCall

        def spec(ref: Any) -> TensorSpec | None:
            if isinstance(ref, dict) and "slot" in ref:
                slot = plan["slots"][ref["slot"]]
                return TensorSpec(f"slot_{ref['slot']}", tuple(slot["shape"]), dtype_from_name(slot["dtype"]))
            if isinstance(ref, dict) and "weight" in ref:
                w = self.weights[ref["weight"]]
                return TensorSpec(ref["weight"], tuple(w.shape), w.dtype)
            return None

        outs = [plan["slots"][o] for o in step["outputs"]]
        return OpCall(
            step["op"],
            tuple(spec(a) for a in step["args"]),
            tuple(TensorSpec(step["name"], tuple(o["shape"]), dtype_from_name(o["dtype"])) for o in outs),
            self.device.type,
            tuple(decode_value(a, lambda r: None, self.device) for a in step["args"]),
        )

    def set_buckets(self, **sizes: list[int] | str | None) -> None:
        """Pad each named dim up to the next of these sizes (\"pow2\": min, powers of two, opt, max;
        None: no bucketing), so that only those sizes run; outputs are sliced back. Only a dim
        the build proved paddable can be bucketed."""
        self._check_dim_names(sizes)
        buckets = dict(self.buckets)  # replaced whole: calls running meanwhile see the old or the new policy
        for name, value in sizes.items():
            if value is None:
                buckets.pop(name, None)
                continue
            if name not in self.paddable:
                raise KilnError(
                    f"dim {name!r} cannot be bucketed: the build did not prove that padding it leaves the real "
                    "rows' outputs unchanged (every output must have it as one whole axis, and rows must not mix)"
                )
            dim = self.dims[name]
            try:
                buckets[name] = Buckets.powers_of_two(dim) if value == "pow2" else Buckets(dim, value)
            except ValueError as exc:
                raise KilnError(f"set_buckets: {exc}") from None
        self.buckets = buckets

    def _check_dim_names(self, sizes: dict[str, Any]) -> None:
        unknown = [n for n in sizes if n not in self.dims]
        if unknown:
            raise KilnError(f"this engine has no dim(s) {', '.join(map(repr, unknown))} (its dims: "
                            f"{', '.join(self.dims) or 'none: it has fixed shapes'})")

    def _binding(self, sizes: dict[str, int | list[int]], what: str) -> list[tuple[int, ...]]:
        """Every binding of these sizes per dim (an int or a list; the other dims at opt), each
        checked against its dim's range."""
        import itertools

        self._check_dim_names(sizes)
        choices = [[v] if isinstance(v, int) else list(v) for v in (sizes.get(d, self.dims[d].opt)
                                                                   for d in self.dim_order)]
        for d, values in zip(self.dim_order, choices):
            for v in values:
                if not isinstance(v, int) or isinstance(v, bool) or not self.dims[d].contains(v):
                    raise InputError(f"{what}: {d} = {v!r} is outside this engine's range {self.dims[d].min}.."
                                     f"{self.dims[d].max}")
        return [tuple(key) for key in itertools.product(*choices)]

    def bucket_key(self, key: tuple[int, ...]) -> tuple[int, ...]:
        buckets = self.buckets
        return tuple(buckets[d].bucket(v) if d in buckets else v for d, v in zip(self.dim_order, key))

    def pad_inputs(self, inputs: tuple[torch.Tensor, ...], key: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """Inputs padded (repeating the last row) up to binding `key` (a bucket, or a larger
        captured binding) along every axis whose dim differs; only a paddable dim may differ."""
        from kiln.shapes import pad_to

        sizes = dict(zip(self.dim_order, key))
        out = []
        for x, spec in zip(inputs, self.inputs):
            for axis, d in enumerate(spec.shape):
                if isinstance(d, str) and x.shape[axis] != sizes[d]:
                    if d not in self.paddable:
                        raise KilnError(f"internal: padding dim {d!r}, which the build did not prove paddable")
                    x = pad_to(x, axis, sizes[d])
            out.append(x)
        return tuple(out)

    def unpad_outputs(self, outputs: list[Any], real: tuple[int, ...], key: tuple[int, ...]) -> list[Any]:
        """Outputs of a run padded to binding `key`, sliced back to the real sizes along every
        axis whose dim was padded, each in memory of its own (a view would keep the padded
        rows alive, and torch.save would write them)."""
        sizes = dict(zip(self.dim_order, real))
        padded = dict(zip(self.dim_order, key))
        out = []
        for y, spec in zip(outputs, self.outputs):
            if isinstance(y, torch.Tensor) and spec is not None:
                sliced = y
                for axis, d in enumerate(spec.shape):
                    if isinstance(d, str) and sizes[d] != padded[d]:
                        sliced = sliced.narrow(axis, 0, sizes[d])
                if sliced is not y:
                    y = sliced.clone(memory_format=torch.contiguous_format)
            out.append(y)
        return out

    def covers(self, big: tuple[int, ...], key: tuple[int, ...]) -> bool:
        """Whether a call at binding `key` may be answered by a run at binding `big`, padded:
        `big` is at least `key` in every paddable dim and equal in every other."""
        return big != key and all(b == k or (d in self.paddable and b > k)
                                  for d, b, k in zip(self.dim_order, big, key))

    def pad_targets(self) -> list[tuple[int, ...]]:
        """The bindings prepared at load for calls at new sizes to be padded up to: every dim at
        opt, and the paddable dims at max (the others at opt); none if no dim is paddable."""
        if not self.paddable:
            return []
        keys = [self._opt_key, tuple(self.dims[d].max if d in self.paddable else self.dims[d].opt
                                     for d in self.dim_order)]
        if self.buckets:
            keys = [self.bucket_key(k) for k in keys]
        return list(dict.fromkeys(keys))

    def prepare_pad_targets(self) -> int:
        """On CUDA with graphs and `pad_while_capturing`: capture the pad targets in an idle
        pooled context (at load; kept before any other binding in its cache), so that a call at
        a size without a graph has a larger one to be padded to. Returns how many were prepared."""
        if not (self.dims and self.use_cuda_graph and self.pad_while_capturing):  # (use_cuda_graph: CUDA only)
            return 0
        keys = self.pad_targets()
        if keys:
            with self._pool.lend() as context:
                context.warmup(keys, pin=True)
        return len(keys)

    def warm_status(self, key: tuple[int, ...]) -> str | None:
        """Where the background warm-up of a binding stands: None (not asked), "running",
        "ready" or "failed"."""
        with self._warm_lock:
            future = self._warming.get(key)
        if future is None:
            return None
        if not future.done():
            return "running"
        if future.cancelled():  # dropped at exit before it ran
            return "failed"
        return "failed" if future.exception() is not None else "ready"

    def warm_in_background(self, key: tuple[int, ...]) -> None:
        """Warm a binding up on the capture thread (kiln.runtime.context.warm_binding), once;
        calls meanwhile go on (padded to a larger graph). Its graph is captured, cheaply, by
        the next call at that binding in each context after the warm-up has finished."""
        from kiln.runtime.context import _CAPTURER

        with self._warm_lock:
            if key in self._warming:
                return
            if len(self._warming) >= self.WARM_RECORDS:  # forget finished ones (they only make captures cheaper)
                for k in [k for k, f in self._warming.items() if f.done()]:
                    del self._warming[k]
            self._warming[key] = _CAPTURER.submit(lambda: _warm_quietly(self, key))

    WARM_RECORDS = 256  # background warm-ups remembered per engine

    def warm_stream(self) -> torch.cuda.Stream:
        """CUDA: the stream background warm-ups run on (made on first use)."""
        if self._warm_stream is None:
            self._warm_stream = torch.cuda.Stream(self.device)
        return self._warm_stream

    def warmup(self, **sizes: int | list[int]) -> int:
        """Prepare these sizes now in every idle pooled context (on CUDA: capture their graphs),
        e.g. engine.warmup(batch=[1, 8, 64]) at server start; other dims at opt. Returns how
        many bindings were prepared per context."""
        if not self.dims:
            raise KilnError("this engine has fixed shapes; warmup(...) is for dynamic-shape engines")
        keys = [self.bucket_key(key) if self.buckets else key for key in self._binding(sizes, "warmup")]
        with self._pool.lend() as context:
            context.warmup(keys)
        return len(keys)

    # -- running ---------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self.bind_inputs(args, kwargs)
        context = self._pool.acquire()
        try:
            return context.run(inputs)
        finally:
            self._pool.release(context)

    def create_context(self) -> ExecutionContext:
        """A new execution context of your own (arena, and on CUDA its CUDA graph and stream),
        callable like the engine. It runs one call at a time: using it from two threads at
        once raises KilnError. Calling the engine itself lends each call a pooled context."""
        return ExecutionContext(self)

    @property
    def contexts(self) -> tuple[ExecutionContext, ...]:
        """The pooled execution contexts created so far (idle or busy)."""
        return self._pool.contexts

    @property
    def max_contexts(self) -> int | None:
        """At most this many pooled contexts (None: as many as calls ever ran at once)."""
        return self._pool.limit

    @max_contexts.setter
    def max_contexts(self, limit: int | None) -> None:
        self._pool.set_limit(limit)

    def release_contexts(self) -> int:
        """Drop the idle pooled contexts, returning their memory; later calls create new ones."""
        if self.device.type == "cuda":
            with self.gpu_order:
                self.finish_previous_call()  # it may still use an idle context's arena
                return self._pool.clear()
        return self._pool.clear()

    @property
    def context_bytes(self) -> int:
        """Device memory each execution context adds, known from the plan: its arena, plus on
        CUDA the CUDA graph's static inputs. A captured graph also keeps a private pool for the
        buffers of kernels that allocate for themselves (ExecutionContext.graph_pool_bytes)."""
        statics = 0
        if self.device.type == "cuda":
            statics = sum(_nbytes(s) for s in self.graph_inputs) if not self.dims else sum(
                _nbytes(TensorSpec(s.name, self._max_shape(s), s.dtype))
                for s in self.graph_inputs)
        return int(self.plan["memory"]["arena_bytes"]) + statics

    def profile(self, *inputs: torch.Tensor, iters: int = 10) -> list[dict[str, Any]]:
        """Median time of every step (step by step, no CUDA graph), slowest first: where the time goes."""
        bound = self.bind_inputs(inputs, {})
        with self._pool.lend() as context:
            samples = context.time_steps(bound, _StepTimer(self.device), iters)
        # a dynamic-shape engine: the steps and shapes of the inputs' binding
        program = self.program(self.binding_key(bound)) if self.dims else self
        plan = program.plan
        rows = []
        for step, spec, ts in zip(program.step_specs, plan["steps"], samples):
            ts = sorted(ts[2:])
            out = plan["slots"][spec["outputs"][0]] if spec["outputs"] else {}
            rows.append({"step": step.name, "op": spec["op"], "kernel": spec["kernel"], "ms": ts[len(ts) // 2],
                         "shape": out.get("shape"), "stride": out.get("stride")})
        return sorted(rows, key=lambda r: -r["ms"])

    def input_shapes_at(self, **sizes: int) -> list[tuple[int, ...]]:
        """Each input's concrete shape with the dims at `sizes` (the rest at opt); a static
        engine's shapes as they are."""
        from kiln.shapes import evaluate

        if not self.dims:
            self._check_dim_names(sizes)
            return [tuple(s.shape) for s in self.inputs]
        keys = self._binding(sizes, "input_shapes_at")
        if len(keys) != 1:
            raise KilnError(f"input_shapes_at takes one size per dim, got {sizes}")
        binding = dict(zip(self.dim_order, keys[0]))
        return [tuple(evaluate(d, binding) for d in s.shape) for s in self.inputs]

    def _max_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        from kiln.shapes import evaluate

        binding = {n: d.max for n, d in self.dims.items()}
        return tuple(evaluate(d, binding) for d in spec.shape)

    def output_value(self, ref: Any, vals: Vals) -> Any:
        """One flat graph output of a run: a slot's value, a weight, or a constant."""
        if isinstance(ref, dict) and "slot" in ref:
            return vals[ref["slot"]]
        if isinstance(ref, dict) and "weight" in ref:
            return self.weights[ref["weight"]]
        return decode_value(ref, lambda r: None, self.device)

    def deliver(self, flat: list[Any]) -> list[Any]:
        """Outputs the caller owns. Each tensor gets its output spec's dtype, the dtype the
        model's graph produced (so only kiln's own precision lowering is cast back), in fresh
        memory: never a view of an arena, a static output, a weight or an input. Run under
        no_grad, none requires grad."""
        out = []
        for value, spec in zip(flat, self.outputs):
            if not isinstance(value, torch.Tensor):
                out.append(value)
            elif spec is not None and value.dtype != spec.dtype:
                out.append(value.to(spec.dtype))
            else:
                out.append(value.clone())
        return out

    def structure(self, flat: list[Any]) -> Any:
        """The model's output structure around delivered flat outputs."""
        return build_structure(self.plan["structure"], flat)

    def capture_failed(self, exc: BaseException) -> None:
        """A context's CUDA graph capture failed: every call runs step by step from now on."""
        with self._lock:
            first, self.use_cuda_graph = self.use_cuda_graph, False
        if first:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(f"CUDA graph capture failed ({reason}); running step by step", KilnWarning, stacklevel=5)

    # -- checking --------------------------------------------------------------------------

    def bind_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The inputs in the engine's order from positional and keyword arguments, bound as
        Python binds a call to the model's forward (keywords by its parameter names), checked."""
        if kwargs:
            args = self._by_name(tuple(args), kwargs)
        self.check_inputs(args)
        return tuple(args)

    def _by_name(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        names = self.input_names
        expected = f"the engine's inputs are ({', '.join(names)})"
        if len(args) > len(names):
            raise InputError(f"the engine takes {len(names)} input(s) ({', '.join(names)}), got {len(args)} "
                             f"positional and {len(kwargs)} keyword")
        bound = dict(zip(names, args))
        kwargs = self._drop_traced_constants(kwargs)
        unexpected = [k for k in kwargs if k not in names]
        if unexpected:
            raise InputError(f"unexpected keyword input(s) {', '.join(map(repr, unexpected))}; {expected}")
        twice = [k for k in kwargs if k in bound]
        if twice:
            raise InputError(f"input {twice[0]!r} is given both by position and by keyword; {expected}")
        bound.update(kwargs)
        missing = [n for n in names if n not in bound]
        if missing:
            raise InputError(f"missing input(s) {', '.join(map(repr, missing))}; {expected}")
        return tuple(bound[n] for n in names)

    def _drop_traced_constants(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments less those that repeat a value the engine was traced with: a
        non-tensor given at build (build_info["constant_inputs"]) or a parameter left out at
        build, at its default (build_info["default_inputs"]). Another value is an InputError
        (the engine cannot change it)."""
        traced = self._traced
        if not any(k in traced for k in kwargs):
            return kwargs
        rest = {}
        for key, value in kwargs.items():
            if key not in traced or key in self.input_names:
                rest[key] = value
                continue
            was, how = traced[key]
            if type(value) is type(was) and value == was:
                continue
            given = f"a tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"{key}={value!r}"
            raise InputError(
                f"keyword input {key!r} is {given}, but this engine was traced with {key}={was!r} ({how}): "
                "non-tensor arguments, and arguments left out at build, are fixed in an engine. Pass "
                f"{key}={was!r} or leave it out, or rebuild with kwargs={{{key!r}: ...}} (the value you need)."
            )
        return rest

    def check_inputs(self, inputs: tuple[Any, ...]) -> None:
        if len(inputs) != len(self.inputs):
            names = ", ".join(s.name for s in self.inputs)
            missing = [repr(n) for n in self.input_names[len(inputs):]]
            hint = f" (missing {', '.join(missing)})" if missing else ""
            raise InputError(f"the engine takes {len(self.inputs)} input(s) ({names}), got {len(inputs)}{hint}")
        for i, (x, spec) in enumerate(zip(inputs, self.inputs)):
            where = f"input {i} ({spec.name!r})"
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{where} must be a tensor, got {type(x).__name__}: {_tensor_advice(x, spec)}")
            if x.layout != torch.strided or x.is_nested:  # (quantized and meta: diagnosed below)
                raise InputError(f"{where} is {_unusable_tensor(x, spec)}")
            if x.dim() != len(spec.shape):
                raise InputError(
                    f"{where} has rank {x.dim()} (shape {tuple(x.shape)}); the engine expects rank "
                    f"{len(spec.shape)}, shape {spec.shape}"
                )
            if tuple(x.shape) != spec.shape and not self.dims:
                raise InputError(
                    f"{where} has shape {tuple(x.shape)}; the engine was built for {spec.shape}. "
                    "Engines have fixed shapes: rebuild with the new shape (kiln build --input-shape/--batch)."
                )
            if x.dtype != spec.dtype:
                problem = _unusable_tensor(x, spec)
                if problem is not None:
                    raise InputError(f"{where} is {problem}")
                raise InputError(f"{where} has dtype {x.dtype}; the engine expects {spec.dtype} (pass "
                                 f"x.to({spec.dtype}), or build the engine with {x.dtype} example inputs)")
            device = x.device
            if device != self.device and (device.type != self.device.type or (
                device.index is not None and self.device.index is not None and device.index != self.device.index
            )):
                problem = _unusable_tensor(x, spec)
                if problem is not None:
                    raise InputError(f"{where} is {problem}")
                raise InputError(
                    f"{where} is on {x.device}; the engine runs on {self.device}. Move it with .to('{self.device}')."
                )
        if self.dims:  # every dim in its range, the same wherever it appears, fixed axes as built
            bind([tuple(x.shape) for x in inputs], self.input_shapes, self.dims)

    # -- memory ----------------------------------------------------------------------------

    def _release_schedule(self) -> list[list[int]]:
        free: list[list[int]] = [[] for _ in self.step_specs]
        for slot, last in enumerate(self.plan["last_use"]):
            if 0 <= last < len(free):
                free[last].append(slot)
        return free

    # -- files and descriptions --------------------------------------------------------------

    def save(self, path: str | os.PathLike, sign_key: Any = None) -> None:
        """Write the engine file (JSON header + safetensors weights, no pickle). With `sign_key`
        (path to a PEM/OpenSSH Ed25519 private key, its bytes, or a key object) sign it, so that
        kiln.load(path, trusted_keys=[public key]) accepts it (kiln.runtime.signing).

        The plan is first checked as load() will check it: kiln never writes a file it would refuse."""
        validate.validate_header(
            self.header, {k: (v.dtype, tuple(v.shape)) for k, v in self.weights.items()}, where=str(path), saving=True
        )
        engine_file.write(path, self.header, self.weights, sign_key=sign_key)

    # -- what a module would be asked ---------------------------------------------------------

    def moved(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Check a move or cast (nn.Module._apply's `fn`): an engine's device and precision are
        fixed when it is built, so one that would change them is a KilnError (not a silent
        no-op); one that changes nothing (.cpu() of a CPU engine, .float()) passes."""
        floats = {s.dtype for s in self.inputs if s.dtype.is_floating_point} or {torch.float32}
        for dtype in sorted(floats, key=str):
            probe = torch.empty(0, dtype=dtype, device=self.device)
            try:
                moved = fn(probe)
                asked = f"{moved.dtype} on {moved.device}"
                unchanged = moved.device == probe.device and moved.dtype == dtype
            except Exception as exc:  # say, .cuda() on a machine without CUDA
                asked, unchanged = _first_line(exc), False
            if not unchanged:
                raise KilnError(
                    f"a kiln engine cannot be moved or cast (asked: {asked}): it runs on {self.device} at "
                    f"{self.build_info.get('precision', '?')} precision, with {dtype} inputs, as it was built. "
                    "Build another engine for the device and precision you want: kiln.build(model, inputs, "
                    "precision=..., device=...)."
                )

    # The model's own moves and modes, for code that calls them on what replaced the model:
    # each returns the engine where it changes nothing, else raises (see moved).
    def to(self, *args: Any, **kwargs: Any) -> Engine:
        self.moved(lambda t: t.to(*args, **kwargs))
        return self

    def cpu(self) -> Engine:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> Engine:
        self.moved(lambda t: t.cuda(device))
        return self

    def float(self) -> Engine:
        return self.to(torch.float32)

    def half(self) -> Engine:
        return self.to(torch.float16)

    def bfloat16(self) -> Engine:
        return self.to(torch.bfloat16)

    def double(self) -> Engine:
        return self.to(torch.float64)

    def eval(self) -> Engine:
        """An engine always runs with eval semantics."""
        return self

    def train(self, mode: bool = True) -> Engine:
        """Engines run inference only: train() changes nothing (dropout stays off, batch norm
        uses its running statistics, no gradient flows back), and says so with a KilnWarning."""
        if mode:
            warnings.warn(
                "kiln: an engine runs inference only; train() changes nothing: dropout stays off, batch norm "
                "uses its running statistics and no gradient flows back. Train the original model.",
                KilnWarning, stacklevel=2,
            )
        return self

    # -- copies -----------------------------------------------------------------------------

    def _copy(self, header: dict[str, Any], weights: dict[str, torch.Tensor]) -> Engine:
        """A new engine of this plan on these weights, with this engine's settings and no
        execution state (contexts, graphs, locks are its own)."""
        other = Engine(header, weights, self.device, max_contexts=self.max_contexts,
                       pad_while_capturing=self.pad_while_capturing)
        other.signer, other.signer_trusted = self.signer, self.signer_trusted
        if self.dims:
            other.buckets = dict(self.buckets)
            other.shape_cache_size, other.capture_after = self.shape_cache_size, self.capture_after
        return other

    def __copy__(self) -> Engine:
        """copy.copy: another engine sharing this one's (read-only) plan and weights, with
        execution contexts of its own."""
        return self._copy(self.header, self.weights)

    def __deepcopy__(self, memo: dict[int, Any]) -> Engine:
        """copy.deepcopy (also of a module holding an EngineModule): the plan and weights copied."""
        import copy

        other = self._copy(copy.deepcopy(self.header, memo), {k: v.clone() for k, v in self.weights.items()})
        memo[id(self)] = other
        return other

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise KilnError(
            "a kiln engine is not pickled (torch.save(engine), pickle.dumps): engine files are data, never "
            "code. Save it with engine.save(path) (EngineModule.save) and load it with kiln.load(path); "
            "copy.deepcopy(engine) copies it in memory."
        )

    def summary(self) -> str:
        b, m = self.build_info, self.plan["memory"]
        ins = ", ".join(f"{s.name}: {s.describe()}" for s in self.inputs)
        outs = ", ".join(s.describe() for s in self.outputs if s is not None)
        contexts = len(self.contexts)
        dims = ""
        if self.dims:
            ranges = ", ".join(f"{d.name} {d.min}..{d.max} (opt {d.opt})" for d in self.dims.values())
            planned = ", ".join(f"{k} {v}" for k, v in m.get("planned_at", {}).items())
            cached = max((len(c.shape_states) for c in self.contexts), default=0)
            kind = "CUDA graphs" if self.device.type == "cuda" else "shapes"
            dims = f"  dims:    {ranges}; memory planned for {planned}; {kind}: {cached} cached (of " \
                   f"{self.shape_cache_size}) per context\n"
            if self.buckets:
                dims += "  buckets: " + ", ".join(f"{k} {list(v.sizes)}" for k, v in self.buckets.items()) + "\n"
        return (
            f"kiln Engine({b.get('model', '?')}, {b['precision']} on {self.device}, "
            f"{len(self.step_specs)} steps, arena {m['arena_bytes'] / 2**20:.1f} MiB)\n"
            f"  inputs:  {ins}\n  outputs: {outs}\n{dims}"
            f"  execution contexts: {contexts} ({self.context_bytes / 2**20:.1f} MiB each: arena"
            f"{' + static inputs' if self.device.type == 'cuda' else ''})\n"
            f"  built with kiln {b['kiln_version']}, torch {b['torch_version']} on {b['device_name']}"
        )

    def __repr__(self) -> str:
        return self.summary()


def _warm_quietly(engine: Engine, key: tuple[int, ...]) -> None:
    """warm_binding, whose failure is recorded without its traceback (whose frames would keep the
    warm-up's scratch tensors alive for the engine's lifetime) and said once, as a warning."""
    from kiln.runtime.context import warm_binding

    try:
        warm_binding(engine, key)
    except Exception as exc:  # the calls at this size then run as before: step by step, then captured
        warnings.warn(f"kiln: preparing binding {key} in the background failed ({_first_line(exc)}); calls at "
                      "that size run without padding, as with pad_while_capturing=False", KilnWarning, stacklevel=1)
        exc.__context__ = exc.__cause__ = None
        raise exc.with_traceback(None) from None


def _traced_inputs(build: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """The non-tensor values an engine was traced with, by forward parameter name, and how it
    got each (descriptive build info: only well-formed entries count)."""
    out: dict[str, tuple[Any, str]] = {}
    for key, how in (("default_inputs", "its default"), ("constant_inputs", "given at build")):
        table = build.get(key)
        if isinstance(table, dict):
            for name, value in table.items():
                if isinstance(name, str) and (value is None or isinstance(value, (bool, int, float, str))):
                    out[name] = (value, how)
    return out


def device_argument(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; a DeviceMismatchError naming the argument if it is none."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceMismatchError(f"device={device!r} is not a device ({_first_line(exc)}); kiln engines run on "
                                  "'cpu' or 'cuda' (or 'cuda:N')") from None


def _check_device(build: dict[str, Any], device: str | torch.device | None) -> torch.device:
    built_for = build["device_type"]
    target = device_argument(device) if device is not None else torch.device(built_for)
    if target.type != built_for:
        rebuild = (f"Rebuild it for {target.type}: kiln build MODEL --device {target.type}"
                   if target.type in ("cpu", "cuda") else
                   f"kiln engines run on cpu or cuda: load it with device={built_for!r} (or leave device out)")
        raise DeviceMismatchError(
            f"this engine was built for {built_for} ({build['device_name']}); it cannot run on "
            f"{target.type}. {rebuild}"
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


def load(path: str | os.PathLike, device: str | torch.device | None = None, trusted_keys: Any = None, *,
         pad_while_capturing: bool = True) -> Engine:
    """Load an engine file; `device` defaults to the kind it was built for.

    `pad_while_capturing` (dynamic-shape engines on CUDA; docs/dynamic-shapes.md): capture the
    opt binding and the paddable dims' max at load, and answer a call at a size without a graph
    yet by padding it up to a larger captured size while its own graph is prepared in the
    background. False: no captures at load; such a call runs step by step, as before.

    The file is verified (digest; with `trusted_keys`, an Ed25519 signature by one of them:
    paths, PEM/OpenSSH bytes or public key objects) and its whole plan validated against
    kiln's closed vocabulary (kiln.runtime.validate) before any kernel is made or any step
    runs. Anything wrong with the file is an EngineFileError; `engine.signer` names the key
    that signed it (None if unsigned), `engine.signer_trusted` whether it was verified."""
    if device is not None:
        device_argument(device)  # a bad argument is named as such, not as a bad file
    contents = engine_file.read_engine(path, trusted_keys)
    try:
        engine = Engine(contents.header, contents.weights, device, pad_while_capturing=pad_while_capturing)
    except KilnError:
        raise
    except (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)) as exc:
        raise EngineFileError(f"{path}: not enough memory to load this engine ({_first_line(exc)})") from None
    except Exception as exc:  # last resort: the file passed validation, yet the runtime cannot use it
        raise EngineFileError(
            f"{path} passed kiln's checks but cannot be loaded ({type(exc).__name__}: {_first_line(exc)}). "
            "It was written by an incompatible kiln or is damaged: rebuild it (and please report this)."
        ) from None
    engine.signer, engine.signer_trusted = contents.signer, contents.signer_trusted
    return engine


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


class EngineModule(torch.nn.Module):
    """An nn.Module drop-in around an Engine (what kiln.compile returns)."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self.training = False  # an engine runs inference only (see train())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> EngineModule:
        """.to(), .cuda(), .cpu(), .half(), .double(), .bfloat16() ...: allowed only where they
        change nothing (Engine.moved)."""
        self.engine.moved(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> EngineModule:
        """Recorded (self.training) but changes nothing (Engine.train)."""
        self.engine.train(mode)
        return super().train(mode)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        given = [k for k in state_dict if k.startswith(prefix)]
        if given:
            raise KilnError(
                f"cannot load weights ({given[0]!r}{' ...' if len(given) > 1 else ''}) into a kiln engine: its "
                "weights were folded and fused when it was built. Load them into the original model and "
                "build again (kiln.compile(model, inputs))."
            )

    def save(self, path: str | os.PathLike, sign_key: Any = None) -> None:
        """Write the engine file; `sign_key` signs it (see Engine.save)."""
        self.engine.save(path, sign_key=sign_key)

    def extra_repr(self) -> str:
        return self.engine.summary()
