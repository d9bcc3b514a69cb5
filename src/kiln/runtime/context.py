"""Execution contexts: the state one call of an engine writes, as TensorRT's IExecutionContext.

An Engine holds what every call shares and nobody writes: the plan, the weights and each
step's argument binders. An ExecutionContext holds what one call writes: the arena (every
planned intermediate and output), each step's views into it, each kernel's own per-call
state (its step function is made per context: a TensorRT region gets an execution context
of its own), and on CUDA a stream, a side stream, a CUDA graph and the graph's static
inputs. A context runs one call at a time and says so when used by two threads at once;
`Engine.__call__` lends each call a context from a ContextPool, so concurrent calls never
share state and steady-state calls create nothing.

CUDA specifics. A call runs on the caller's current stream, as TensorRT's enqueue does: its
inputs are ready there, its outputs are fresh tensors of that stream, and a call costs no stream
switch and no cross-stream wait. An engine's calls run on the GPU in call order
(`Engine.gpu_order`): a call on another stream than the engine's previous call first waits for
that call's event, so a context's arena, static inputs and graph are never used by two calls
at once. The results are copied out of the arena (and the graph's static outputs) before the
context goes back to the pool. Memory a call may still use (an evicted graph, a dropped
context's arena) is given back only after the engine's last call has finished. A context's
own stream serves its graph captures; a capture, which would record any work enqueued on the
capturing stream by any thread (pool streams can be shared), runs alone: `_GATE` lets calls
enqueue work together but a capture only while no call enqueues.

Every CUDA graph of the process is warmed up and captured on one thread (`_CAPTURER`).
PyTorch caches cuDNN's chosen convolution plans per thread, and the warm-up lets cuDNN time
its algorithms: contexts captured on different threads could keep different algorithms and
give answers that differ in the last bits (measured: resnet18 fp16 on an H100, 8 contexts
captured by 8 threads, 2100 of 2400 outputs off by up to 2e-3). One capturing thread sees one
cache, so every context of an engine runs the same algorithms.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from kiln.errors import KilnError, KilnWarning
from kiln.shapes import ShapeCache
from kiln.specs import decode_value, dtype_from_name

if TYPE_CHECKING:
    from kiln.runtime.engine import Engine, _Program, _Step

Vals = list[Any]


def arena_view(arena: torch.Tensor, slot: dict[str, Any]) -> torch.Tensor:
    """The tensor a planned slot is: a dtype/shape/stride view of its bytes in the arena."""
    dtype = dtype_from_name(slot["dtype"])
    offset, nbytes = slot["offset"], slot["nbytes"]
    return arena[offset : offset + nbytes].view(dtype).as_strided(slot["shape"], slot["stride"])


# -- process-wide CUDA state, shared safely ---------------------------------------------------

_BENCHMARK_LOCK = threading.Lock()
_BENCHMARK_USERS = 0
_BENCHMARK_SAVED = False


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """cuDNN picks each convolution's algorithm by timing them, as engines run (and are tuned).

    The flag is process-wide: overlapping uses (threads capturing at once) count, and the
    last one out restores the value the first one found."""
    global _BENCHMARK_USERS, _BENCHMARK_SAVED
    with _BENCHMARK_LOCK:
        if _BENCHMARK_USERS == 0:
            _BENCHMARK_SAVED = torch.backends.cudnn.benchmark
        _BENCHMARK_USERS += 1
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        with _BENCHMARK_LOCK:
            _BENCHMARK_USERS -= 1
            if _BENCHMARK_USERS == 0:
                torch.backends.cudnn.benchmark = _BENCHMARK_SAVED


class _LaunchGate:
    """Many calls may enqueue CUDA work at once; a graph capture waits until none does and
    keeps new ones out until it ends (writers first, so a busy engine still captures)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._launching = 0
        self._capturing = False
        self._waiting = 0

    def enter(self) -> None:
        """A call starts enqueuing work (waits while a capture runs or waits to run)."""
        with self._cond:
            while self._capturing or self._waiting:
                self._cond.wait()
            self._launching += 1

    def exit(self) -> None:
        with self._cond:
            self._launching -= 1
            if not self._launching and self._waiting:
                self._cond.notify_all()

    @contextlib.contextmanager
    def launching(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.exit()

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._capturing or self._launching:
                self._cond.wait()
            self._waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()


_GATE = _LaunchGate()


class _CaptureThread:
    """Runs functions on one long-lived worker thread, one at a time (see the module docstring:
    PyTorch's per-thread cuDNN plan cache). A call from that thread itself runs inline.

    `run` (a capture a call waits for) goes before every queued `submit` (a background warm-up,
    which nobody waits for); each kind runs in the order given. At exit, queued background work
    is dropped and the worker is waited for."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._urgent: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._background: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._local = threading.local()

    def _work(self) -> None:
        self._local.inside = True
        while True:
            with self._cond:
                while not (self._urgent or self._background or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._urgent:
                    return
                fn, future = (self._urgent or self._background).popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
                    future.set_exception(exc)
            del fn, future

    def _put(self, queue: collections.deque[tuple[Callable[[], Any], Future]], fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopping:  # at exit the worker is gone: nothing queued would ever run
                if queue is self._background:
                    future.cancel()
                    return future
                urgent = True
            else:
                urgent = False
        if urgent:  # a capture a call waits for: run it here rather than wait forever
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)
            return future
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="kiln-cuda-capture", daemon=True)
                self._thread.start()
                atexit.register(self._stop)
            queue.append((fn, future))
            self._cond.notify()
        return future

    def _stop(self) -> None:
        with self._cond:
            self._stopping = True
            for _, future in self._background:
                future.cancel()
            self._background.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)

    def run(self, fn: Callable[[], Any]) -> Any:
        if getattr(self._local, "inside", False):
            return fn()
        return self._put(self._urgent, fn).result()

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker when no `run` is waiting; don't wait for it."""
        return self._put(self._background, fn)


_CAPTURER = _CaptureThread()


def warm_binding(engine: Engine, key: tuple[int, ...]) -> None:
    """Get one binding of a dynamic-shape engine ready to capture cheaply, touching no context:
    run each of its steps once on zero-filled scratch tensors of the step's own shapes, strides
    and dtypes (one step's inputs and outputs alive at a time), on the capture thread (which
    captures every graph: its per-thread cuDNN cache then holds this binding's timed
    algorithms), with cuDNN benchmarking, on a stream of the engine's own. Lazy set-up, cuDNN
    plans and Triton variants for these sizes are then done; the values computed are thrown
    away. Runs while the engine serves calls (Engine.warm_in_background)."""
    program = engine.program(key)
    device = engine.device
    slots = program.plan["slots"]
    with contextlib.ExitStack() as scope:
        stream = None
        if device.type == "cuda":
            scope.enter_context(torch.cuda.device(device))
            stream = engine.warm_stream()
            scope.enter_context(torch.cuda.stream(stream))
            scope.enter_context(cudnn_benchmark())
        scope.enter_context(torch.inference_mode())
        for step, spec in zip(program.step_specs, program.plan["steps"]):
            vals: Vals = [None] * program.n_slots
            for slot in _slots_read(spec, device):
                vals[slot] = _scratch(slots[slot], device)
            outs = [_scratch(slots[o], device) for o in step.outputs] if step.planned else []
            fn = step.make()
            with _GATE.launching():
                fn(tuple(step.args(vals)), {k: b(vals) for k, b in step.kwargs.items()}, outs)
            del vals, outs, fn
        if stream is not None:
            stream.synchronize()  # before its scratch memory can serve anything else


def _slots_read(step: dict[str, Any], device: torch.device) -> list[int]:
    """The slots a plan step's arguments refer to."""
    read: list[int] = []
    for value in (step["args"], list(step["kwargs"].values())):
        decode_value(value, lambda ref: read.append(ref["slot"]) if "slot" in ref else None, device)
    return read


def _scratch(slot: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Zeros with a slot's shape, stride and dtype (zeros: valid indices, finite values)."""
    shape, stride = slot["shape"], slot["stride"]
    extent = 0 if any(d == 0 for d in shape) else 1 + sum((d - 1) * st for d, st in zip(shape, stride))
    base = torch.zeros(extent, dtype=dtype_from_name(slot["dtype"]), device=device)
    return base.as_strided(shape, stride)


# -- the context ------------------------------------------------------------------------------


class BoundStep:
    """One plan step as one context runs it: the shared step, this context's kernel function
    and its output views into this context's arena."""

    __slots__ = ("step", "fn", "out_views")

    def __init__(self, step: _Step, arena: torch.Tensor | None, slots: list[dict[str, Any]]):
        self.step = step
        self.fn = step.make()
        self.out_views = [arena_view(arena, slots[o]) for o in step.outputs] if step.planned else []

    @property
    def name(self) -> str:
        return self.step.name

    def __call__(self, vals: Vals) -> None:
        step = self.step
        try:
            result = self.fn(tuple(step.args(vals)), {k: b(vals) for k, b in step.kwargs.items()}, self.out_views)
        except (KilnError, MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # a call's failure, named; a failing capture sees the kernel's own error
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            raise step.failed(exc) from exc
        if step.multi:
            for slot, r in zip(step.outputs, result):
                vals[slot] = r
        else:
            vals[step.outputs[0]] = result


class ExecutionContext:
    """The per-call state of an engine: arena, output views, kernel state and (CUDA) stream,
    CUDA graph and static inputs. Call it like the engine; one call at a time.

    Contexts come from `engine.create_context()` (yours to keep) or from the engine's pool
    (what `engine(...)` uses). Using one context from two threads at once raises KilnError
    instead of mixing their results; give each thread its own context."""

    def __init__(self, engine: Engine):
        self.engine = engine
        device = engine.device
        cuda = device.type == "cuda"
        self.stream: torch.cuda.Stream | None = torch.cuda.Stream(device) if cuda else None  # captures
        self._done: torch.cuda.Event | None = torch.cuda.Event() if cuda else None  # the end of its last call
        side = cuda and any(s.side for s in engine.step_specs)
        self.side_stream: torch.cuda.Stream | None = torch.cuda.Stream(device) if side else None
        # on the context's stream, the only one that ever touches it; never an inference tensor
        # (a context made during a call under inference_mode serves later calls outside it)
        with torch.cuda.stream(self.stream), torch.inference_mode(False):
            self.arena = torch.empty(engine.plan["memory"]["arena_bytes"], dtype=torch.uint8, device=device)
            if engine.dims:  # dynamic shapes: one arena planned for max; bound steps per binding (below)
                self.steps = []
            else:
                self.steps = [BoundStep(s, self.arena, engine.plan["slots"]) for s in engine.step_specs]
        # dynamic shapes: per binding, the bound steps (and on CUDA its graph), least recently used dropped
        self.shape_states: ShapeCache[tuple[int, ...], _ShapeState] = ShapeCache(
            getattr(engine, "shape_cache_size", 8), on_evict=self._evicted
        )
        self._max_inputs: list[torch.Tensor] = []  # CUDA: one max-size static buffer per input
        self._graph_pool: Any = None  # CUDA: the private memory pool every graph of this context shares
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_pool_bytes: int | None = None  # the CUDA graph's private memory pool, measured at capture
        self._static_inputs: list[torch.Tensor] = []
        self._static_outputs: list[Any] = []
        self._busy = threading.Lock()
        self.calls = 0
        self.padded_calls = 0  # dynamic shapes on CUDA: calls answered by a larger binding's graph, padded

    @property
    def nbytes(self) -> int:
        """Device memory this context holds: its arena, the graph's static inputs once captured,
        and the graph's private pool (intermediates kernels allocate for themselves)."""
        statics = sum(t.numel() * t.element_size() for t in self._static_inputs + self._max_inputs)
        return self.arena.numel() + statics + (self.graph_pool_bytes or 0)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.engine.bind_inputs(args, kwargs))

    def run(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """Run checked positional inputs (Engine.bind_inputs) and return the model's structure."""
        if not self._busy.acquire(blocking=False):
            raise self._in_use()
        try:
            self.calls += 1
            device_type = self.engine.device.type
            if torch.is_autocast_enabled(device_type):  # the engine runs at its build precision
                with torch.autocast(device_type, enabled=False):
                    return self.engine.structure(self._run(inputs))
            return self.engine.structure(self._run(inputs))
        finally:
            self._busy.release()

    @staticmethod
    def _in_use() -> KilnError:
        return KilnError(
            "this execution context is already running a call (in another thread): a context runs one "
            "call at a time. Give each thread its own (engine.create_context()), or call the engine "
            "itself, which lends every call a context of its own."
        )

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise self._in_use()
        try:
            yield
        finally:
            self._busy.release()

    # -- running ---------------------------------------------------------------------------

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
        engine = self.engine
        if engine.dims:
            return self._run_dynamic(inputs)
        if self.stream is None:
            with torch.no_grad():
                return engine.deliver(self.run_steps(self._bind(inputs)))
        with engine.gpu_order:
            return self._run_cuda(inputs)

    def _run_cuda(self, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
        engine = self.engine
        if engine.use_cuda_graph and self.graph is None:
            self._capture()
        if engine.use_cuda_graph and self.graph is not None:
            return self._replay(self.graph, self._static_inputs, self._static_outputs, inputs)
        return self._step_by_step(inputs)

    def _replay(self, graph: torch.cuda.CUDAGraph, statics: list[torch.Tensor], outputs: list[Any],
                inputs: tuple[torch.Tensor, ...]) -> list[Any]:
        """CUDA, under gpu_order: copy the inputs in, replay, copy the outputs out, on the
        caller's stream after the engine's previous call."""
        engine = self.engine
        caller = torch.cuda.current_stream(engine.device)
        _GATE.enter()
        try:
            engine.after_previous_call(caller)
            for static, x in zip(statics, inputs):
                static.copy_(x.detach() if x.requires_grad else x)
            graph.replay()
            out = engine.deliver(outputs)
            engine.call_done(caller, self._done)
        finally:
            _GATE.exit()
        return out

    def _step_by_step(self, inputs: tuple[torch.Tensor, ...], program: _Program | None = None,
                      steps: list[BoundStep] | None = None) -> list[Any]:
        """CUDA, under gpu_order: run the steps on the caller's stream after the engine's
        previous call (no CUDA graph: disabled, failed, or a binding not captured yet)."""
        engine = self.engine
        caller = torch.cuda.current_stream(engine.device)
        _GATE.enter()
        try:
            engine.after_previous_call(caller)
            with torch.no_grad():
                out = engine.deliver(self.run_steps(self._bind(inputs), program, steps))
            engine.call_done(caller, self._done)
        finally:
            _GATE.exit()
        return out

    # -- dynamic shapes ----------------------------------------------------------------------

    def shape_state(self, key: tuple[int, ...]) -> _ShapeState:
        """This context's state for one binding (made on first use, kept in a bounded LRU)."""
        state = self.shape_states.get(key)
        if state is None:
            program = self.engine.program(key)
            self.shape_states.capacity = max(1, int(self.engine.shape_cache_size))
            with torch.cuda.stream(self.stream), torch.inference_mode(False):
                state = _ShapeState(program, self.arena)
            self.shape_states.put(key, state)
        return state

    def _run_dynamic(self, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
        engine = self.engine
        real = engine.binding_key(inputs)
        key = engine.bucket_key(real) if engine.buckets else real
        capture_now = False
        if self.stream is not None and engine.use_cuda_graph and engine.pad_while_capturing and engine.paddable:
            exact = self.shape_states.peek(key)
            if exact is None or exact.graph is None:
                status = engine.warm_status(key)
                if status == "ready":  # warmed up in the background: capturing now is cheap
                    capture_now = True
                elif status != "failed":
                    cover = self.cover(key)
                    if cover is not None:
                        engine.warm_in_background(key)
                        return self._run_padded(inputs, real, cover)
        state = self.shape_state(key)
        if key != real:  # bucketed: pad the inputs up to the bucket, slice the outputs back
            inputs = engine.pad_inputs(inputs, key)
        if self.stream is None:
            with torch.no_grad():
                out = engine.deliver(self.run_steps(self._bind(inputs), state.program, state.steps))
            return engine.unpad_outputs(out, real, key) if key != real else out
        with engine.gpu_order:
            return self._run_dynamic_cuda(inputs, state, real, key, capture_now)

    def cover(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        """The smallest binding with a captured graph in this context that a call at `key` can be
        padded up to (Engine.covers: larger or equal in paddable dims, equal in the others), or None."""
        engine = self.engine
        best: tuple[int, int, tuple[int, ...]] | None = None
        for other, state in self.shape_states.items():
            if state.graph is not None and engine.covers(other, key):
                size = 1
                for v in other:
                    size *= v
                if best is None or (size, sum(other), other) < best:
                    best = (size, sum(other), other)
        return None if best is None else best[2]

    def _run_padded(self, inputs: tuple[torch.Tensor, ...], real: tuple[int, ...], cover: tuple[int, ...]) -> list[Any]:
        """Answer a call at a binding without a graph yet by replaying a larger binding's graph:
        inputs padded (repeating the last row) along the paddable dims that differ, outputs sliced
        back. The build proved padded rows never change the real rows' values."""
        engine = self.engine
        state = self.shape_states.get(cover)  # refreshed: a pad target stays recently used
        padded = engine.pad_inputs(inputs, cover)
        with engine.gpu_order:
            state.calls += 1
            self.padded_calls += 1
            out = self._replay(state.graph, state.static_inputs, state.static_outputs, padded)
        return engine.unpad_outputs(out, real, cover)

    def _run_dynamic_cuda(self, inputs: tuple[torch.Tensor, ...], state: _ShapeState, real: tuple[int, ...],
                          key: tuple[int, ...], capture_now: bool = False) -> list[Any]:
        engine = self.engine
        state.calls += 1
        if engine.use_cuda_graph and state.graph is None and (capture_now or state.calls >= engine.capture_after):
            self._capture_shape(state, warmups=1 if capture_now else 2)
        if engine.use_cuda_graph and state.graph is not None:
            out = self._replay(state.graph, state.static_inputs, state.static_outputs, inputs)
        else:
            out = self._step_by_step(inputs, state.program, state.steps)
        return engine.unpad_outputs(out, real, key) if key != real else out

    def _evicted(self, key: tuple[int, ...], state: _ShapeState) -> None:
        """A binding dropped from the LRU: its graph's memory goes back to the context's pool
        once the engine's last call (which may have replayed it) has finished."""
        if state.graph is not None:
            self.engine.finish_previous_call()
        state.drop()

    def _static_views(self, program: _Program) -> list[torch.Tensor]:
        """Each graph input at this binding: the first elements of its max-size buffer, in shape."""
        engine = self.engine
        if not self._max_inputs:
            with torch.cuda.stream(self.stream), torch.inference_mode(False):
                self._max_inputs = [torch.zeros(engine._max_shape(s), dtype=s.dtype, device=engine.device).reshape(-1)
                                    for s in engine.graph_inputs]
        views = []
        for buf, (shape, _) in zip(self._max_inputs, program.graph_inputs):
            numel = 1
            for d in shape:
                numel *= d
            views.append(buf[:numel].view(shape))
        return views

    def _capture_shape(self, state: _ShapeState, warmups: int = 2,
                       on_failure: Callable[[BaseException], None] | None = None) -> None:
        self._on_capture_thread(lambda: self._capture_shape_here(state, warmups, on_failure))

    def _capture_shape_here(self, state: _ShapeState, warmups: int = 2,
                            on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Capture the CUDA graph of one binding. Every graph of this context reads the same
        max-size input buffers and shares one private memory pool: the context replays one at a
        time and copies each replay's outputs out before the next, so their intermediates may
        share memory. One warm-up run is enough for a binding warmed up in the background
        (warm_binding: cuDNN's timings are then in the capture thread's cache)."""
        engine = self.engine
        try:
            with torch.cuda.stream(self.stream), torch.inference_mode(False):
                engine.after_previous_call(self.stream)  # other bindings' graphs use this arena too
                statics = self._static_views(state.program)
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.stream(self.stream), cudnn_benchmark(), torch.inference_mode():
                with _GATE.launching():
                    for _ in range(warmups):
                        self.run_steps(statics, state.program, state.steps)
                graph = torch.cuda.CUDAGraph()
                with _GATE.capturing():
                    before = torch.cuda.memory_reserved(engine.device)
                    with torch.cuda.graph(graph, pool=self._graph_pool, stream=self.stream,
                                          capture_error_mode="thread_local"):
                        outputs = self.run_steps(statics, state.program, state.steps)
                    self.graph_pool_bytes = _grown(before, engine.device)
            engine.call_done(self.stream, self._done)
        except RuntimeError as exc:
            self.stream.synchronize()
            (on_failure or engine.capture_failed)(exc)
            return
        state.static_inputs, state.static_outputs, state.graph = statics, outputs, graph

    def warmup(self, keys: list[tuple[int, ...]], pin: bool = False) -> None:
        """Make (and on CUDA capture) the state of each binding now; with `pin`, keep them in
        the context's cache before any other binding (Engine.prepare_pad_targets)."""
        engine = self.engine
        with self._exclusive():
            for key in keys:
                state = self.shape_state(key)
                if pin:
                    self.shape_states.pin(key)
                if self.stream is not None and engine.use_cuda_graph and state.graph is None:
                    with engine.gpu_order:
                        self._capture_shape(state, on_failure=self._pad_target_failed(key) if pin else None)

    def _pad_target_failed(self, key: tuple[int, ...]) -> Callable[[BaseException], None]:
        """What a failed capture of a pad target does (say, out of memory at max on a smaller GPU):
        that binding is not a pad target, and the engine keeps its CUDA graphs for every other."""
        def failed(exc: BaseException) -> None:
            self.shape_states.unpin(key)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(f"kiln: capturing binding {key} to pad smaller calls to failed ({reason}); calls are "
                          "not padded to it", KilnWarning, stacklevel=2)
        return failed

    def _bind(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [(x.detach() if x.requires_grad else x).to(s.dtype).contiguous()
                for x, s in zip(inputs, self.engine.graph_inputs)]

    def run_steps(
        self, graph_inputs: list[torch.Tensor], program: _Program | None = None, steps: list[BoundStep] | None = None
    ) -> list[Any]:
        """Execute every step in order on the current stream; the flat graph outputs, not yet
        cast or copied (they may be views of this context's arena). A dynamic-shape engine
        passes one binding's program and this context's steps for it."""
        engine = self.engine
        source = engine if program is None else program
        vals: Vals = [None] * (len(engine.plan["slots"]) if program is None else program.n_slots)
        vals[: len(graph_inputs)] = graph_inputs
        side = self.side_stream
        main = torch.cuda.current_stream(engine.device) if side is not None else None
        for bound, free in zip(self.steps if steps is None else steps, source.free_after):
            step = bound.step
            if side is not None and step.side:
                if step.fork:
                    side.wait_stream(main)
                with torch.cuda.stream(side):
                    bound(vals)
            else:
                if side is not None and step.join:
                    main.wait_stream(side)
                bound(vals)
            for slot in free:
                vals[slot] = None
        refs = engine.plan["output_refs"] if program is None else program.output_refs
        return [engine.output_value(ref, vals) for ref in refs]

    def time_steps(
        self, inputs: tuple[torch.Tensor, ...], timer: Callable[[Callable[[Vals], None], Vals], Callable[[], float]],
        iters: int,
    ) -> list[list[float]]:
        """Each step's duration (ms) over iters + 2 step-by-step runs (Engine.profile). A
        dynamic-shape engine times the steps of the inputs' binding (no bucketing)."""
        with self._exclusive():
            steps, n_slots = self.steps, len(self.engine.plan["slots"])
            if self.engine.dims:
                state = self.shape_state(self.engine.binding_key(inputs))
                steps, n_slots = state.steps, state.program.n_slots
            samples: list[list[float]] = [[] for _ in steps]
            with contextlib.ExitStack() as scope:
                scope.enter_context(torch.no_grad())
                if self.stream is not None:
                    caller = torch.cuda.current_stream(self.engine.device)
                    scope.enter_context(self.engine.gpu_order)
                    scope.enter_context(_GATE.launching())
                    scope.enter_context(torch.cuda.stream(self.stream))
                    self.stream.wait_stream(caller)
                    self.engine.after_previous_call(self.stream)
                bound = self._bind(inputs)
                for _ in range(iters + 2):
                    vals: Vals = [None] * n_slots
                    vals[: len(bound)] = bound
                    times = [timer(step, vals) for step in steps]
                    for i, t in enumerate(times):
                        samples[i].append(t())
                if self.stream is not None:
                    self.engine.call_done(self.stream, self._done)
                    caller.wait_event(self._done)
            return samples

    def _capture(self) -> None:
        self._on_capture_thread(self._capture_here)

    def _on_capture_thread(self, capture: Callable[[], None]) -> None:
        def on_device() -> None:
            with torch.cuda.device(self.engine.device):
                capture()

        _CAPTURER.run(on_device)

    def _capture_here(self) -> None:
        """Capture this context's CUDA graph on its stream; on failure run step by step from now on."""
        engine = self.engine
        device = engine.device
        try:
            with torch.cuda.stream(self.stream), torch.inference_mode(False):  # each call copies inputs in
                engine.after_previous_call(self.stream)
                statics = [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in engine.graph_inputs]
            with torch.cuda.stream(self.stream), cudnn_benchmark(), torch.inference_mode():
                # cuDNN times its algorithms for these exact shapes during warm-up; the graph keeps the
                # winners. Warm-up also does lazy cuBLAS/cuDNN/Triton/TensorRT set-up outside the capture.
                with _GATE.launching():
                    for _ in range(2):
                        self.run_steps(statics)
                graph = torch.cuda.CUDAGraph()
                with _GATE.capturing():
                    before = torch.cuda.memory_reserved(device)
                    with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                        outputs = self.run_steps(statics)
                    self.graph_pool_bytes = _grown(before, device)
            engine.call_done(self.stream, self._done)  # the warm-up wrote the arena on this stream
        except RuntimeError as exc:
            self.stream.synchronize()
            engine.capture_failed(exc)
            return
        self._static_inputs, self._static_outputs, self.graph = statics, outputs, graph


class _ShapeState:
    """One binding of a dynamic-shape engine in one context: the program's steps bound to this
    context's arena (views at this binding's shapes), and on CUDA its graph once captured."""

    __slots__ = ("program", "steps", "graph", "static_inputs", "static_outputs", "calls")

    def __init__(self, program: _Program, arena: torch.Tensor):
        self.program = program
        self.steps = [BoundStep(s, arena, program.plan["slots"]) for s in program.step_specs]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_outputs: list[Any] = []
        self.calls = 0

    def drop(self) -> None:
        """Evicted: release the graph (its memory goes back to the context's pool)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.static_inputs, self.static_outputs = None, [], []


def _grown(reserved_before: int, device: torch.device) -> int:
    """Memory the allocator reserved during a capture: the graph's private pool (captures run
    alone). torch.cuda.memory_snapshot(mempool_id=...) would measure the pool exactly, but it
    crashed the process on torch 2.11 (H100), so it is not used."""
    return max(0, torch.cuda.memory_reserved(device) - reserved_before)


# -- the pool ---------------------------------------------------------------------------------


class ContextPool:
    """Idle contexts, lent one per call and given back after it (thread-safe).

    A call takes an idle context or creates one, so the pool grows to the largest number of
    calls that ever ran at once and then stays that size. With `limit` set, a call that finds
    `limit` contexts all busy waits for one instead of creating another."""

    def __init__(self, create: Callable[[], ExecutionContext], limit: int | None = None):
        self._create = create
        self._cond = threading.Condition()
        self._idle: list[ExecutionContext] = []
        self._all: list[ExecutionContext] = []
        self._pending = 0  # being created outside the lock
        self.limit = limit

    @property
    def contexts(self) -> tuple[ExecutionContext, ...]:
        with self._cond:
            return tuple(self._all)

    def set_limit(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"max_contexts must be at least 1 (or None: no limit), got {limit}")
        with self._cond:
            self.limit = limit
            self._cond.notify_all()

    def add(self, context: ExecutionContext) -> None:
        with self._cond:
            self._all.append(context)
            self._idle.append(context)
            self._cond.notify()

    def acquire(self) -> ExecutionContext:
        with self._cond:
            while not self._idle and self.limit is not None and len(self._all) + self._pending >= self.limit:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._pending += 1
        try:
            context = self._create()
        except BaseException:
            with self._cond:
                self._pending -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._pending -= 1
            self._all.append(context)
        return context

    def release(self, context: ExecutionContext) -> None:
        with self._cond:
            self._idle.append(context)
            self._cond.notify()

    @contextlib.contextmanager
    def lend(self) -> Iterator[ExecutionContext]:
        context = self.acquire()
        try:
            yield context
        finally:
            self.release(context)

    def clear(self) -> int:
        """Drop the idle contexts (their memory goes back when nothing else holds them); busy
        ones stay. Returns how many were dropped."""
        with self._cond:
            dropped = {id(c) for c in self._idle}
            self._idle.clear()
            self._all = [c for c in self._all if id(c) not in dropped]
            return len(dropped)
