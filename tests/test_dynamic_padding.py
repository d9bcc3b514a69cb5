"""Padding while capturing (docs/dynamic-shapes.md, *The runtime*): on CUDA, a call at a size
without a CUDA graph yet is answered by the smallest larger captured binding, padded along
paddable dims only, while its own binding is warmed up in the background; later calls capture
and use the exact graph.

The CPU tests run the real policy, padding and background warm-up (kiln.runtime.context.
warm_binding, on real plans) with fake CUDA pieces: a context with a stand-in stream, a
"capture" that records the binding and a "replay" that runs the binding's steps on the CPU, so
every answer is a real computation compared with the model. GPU tests are marked gpu."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import kiln
from kiln.runtime import context as context_module
from kiln.runtime.context import ExecutionContext
from kiln.shapes import ShapeCache
from test_dynamic_engine import BATCH, ConvNet, Encoder, assert_threads_match_the_model, tokens

TOL = dict(rtol=1e-4, atol=1e-5)
FAST = kiln.BuildConfig(check_dims=False)


class _FakeGraph:
    def __init__(self, state):
        self.state = state

    def reset(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """Contexts that take the CUDA path on the CPU; returns the list of (binding, warm-up runs)
    each "capture" got."""
    captured: list[tuple[tuple[int, ...], int]] = []
    lock = threading.Lock()

    def capture_shape(self, state, warmups=2, on_failure=None):
        key = next(k for k, s in self.shape_states.items() if s is state)
        with lock:
            captured.append((key, warmups))
        state.graph = _FakeGraph(state)

    def replay(self, graph, statics, outputs, inputs):
        assert graph.state.program.graph_inputs == [(tuple(x.shape), s.dtype)
                                                    for x, s in zip(inputs, self.engine.graph_inputs)]
        with torch.no_grad():
            return self.engine.deliver(self.run_steps(self._bind(inputs), graph.state.program, graph.state.steps))

    def step_by_step(self, inputs, program=None, steps=None):
        with torch.no_grad():
            return self.engine.deliver(self.run_steps(self._bind(inputs), program, steps))

    real_init = ExecutionContext.__init__

    def init(self, engine):
        real_init(self, engine)
        self.stream = "fake-stream"  # the CUDA path, never touched by the fakes

    monkeypatch.setattr(ExecutionContext, "_capture_shape", capture_shape)
    monkeypatch.setattr(ExecutionContext, "_replay", replay)
    monkeypatch.setattr(ExecutionContext, "_step_by_step", step_by_step)
    monkeypatch.setattr(ExecutionContext, "__init__", init)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return captured


def _engine(model, inputs, dynamic_shapes):
    """A dynamic engine on the CPU whose contexts take the (fake) CUDA path, pad targets prepared."""
    built = kiln.build(model, inputs, dynamic_shapes=dynamic_shapes, config=FAST)
    engine = kiln.runtime.Engine(built.header, built.weights, "cpu")
    engine.use_cuda_graph = True
    engine.paddable = list(built.paddable)
    engine.release_contexts()  # the one made at construction predates the fakes' attributes
    engine.prepare_pad_targets()
    return engine


@pytest.fixture(scope="module")
def conv_model():
    model = ConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def gated_warmups(monkeypatch):
    """Background warm-ups wait for `gate` (set it to let them run); the keys they ran for."""
    gate, ran = threading.Event(), []
    real = context_module.warm_binding

    def warm(engine, key):
        assert gate.wait(30)
        ran.append(key)
        real(engine, key)

    monkeypatch.setattr(context_module, "warm_binding", warm)
    yield gate, ran
    gate.set()  # a failed test must not leave the capture thread waiting


def _finish_warmups(engine):
    for future in list(engine._warming.values()):
        future.exception(timeout=60)


def test_a_new_paddable_size_is_padded_to_a_larger_graph_until_its_own_is_captured(
        fake_cuda, conv_model, gated_warmups):
    gate, ran = gated_warmups
    engine = _engine(conv_model, (torch.randn(4, 3, 16, 16),), ({0: BATCH},))
    (context,) = engine.contexts
    assert engine.pad_targets() == [(4,), (16,)]
    assert fake_cuda == [((4,), 2), ((16,), 2)] and context.shape_states.pinned == {(4,), (16,)}
    x3 = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = conv_model(x3)
    for n in range(2):  # the warm-up has not run: both calls replay batch 4's graph, padded
        torch.testing.assert_close(engine(x3), want, **TOL)
        assert context.padded_calls == n + 1
    assert context.shape_states.peek((4,)).calls == 2 and context.shape_states.peek((3,)) is None
    assert engine.warm_status((3,)) == "running"
    gate.set()
    _finish_warmups(engine)
    assert ran == [(3,)] and engine.warm_status((3,)) == "ready"
    torch.testing.assert_close(engine(x3), want, **TOL)  # captured now, with one warm-up run
    assert fake_cuda[-1] == ((3,), 1) and context.padded_calls == 2
    torch.testing.assert_close(engine(x3), want, **TOL)  # replays its own graph
    assert context.shape_states.peek((3,)).calls == 2 and context.padded_calls == 2
    x9 = torch.randn(9, 3, 16, 16)  # above opt: padded to max
    with torch.no_grad():
        torch.testing.assert_close(engine(x9), conv_model(x9), **TOL)
    assert context.padded_calls == 3 and context.shape_states.peek((16,)).calls == 1


def test_padded_answers_match_exact_ones_at_every_size(fake_cuda, conv_model):
    engine = _engine(conv_model, (torch.randn(4, 3, 16, 16),), ({0: BATCH},))
    exact = kiln.build(conv_model, (torch.randn(4, 3, 16, 16),), dynamic_shapes=({0: BATCH},), config=FAST)
    exact.use_cuda_graph = False
    for n in (1, 2, 3, 5, 7, 11, 13, 15, 16):
        x = torch.randn(n, 3, 16, 16)
        torch.testing.assert_close(engine(x), exact(x), **TOL)
    assert engine.contexts[0].padded_calls >= 7


def test_non_paddable_dims_are_never_padded(fake_cuda, gated_warmups):
    gate, _ = gated_warmups
    gate.set()
    model = Encoder().eval()
    batch, seq = kiln.Dim("batch", min=1, opt=4, max=8), kiln.Dim("seq", min=2, opt=16, max=32)
    dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    engine = _engine(model, tokens(4, 16), dims)
    assert engine.paddable == ["batch"] and engine.pad_targets() == [(4, 16), (8, 16)]
    (context,) = engine.contexts
    engine.warmup(seq=[32], batch=[8])  # a graph larger in every dim: still no cover for another seq
    assert engine.covers((8, 32), (2, 32)) and not engine.covers((8, 32), (2, 10))
    assert not engine.covers((4, 32), (4, 16)) and not engine.covers((4, 16), (4, 16))
    for n, length in ((2, 10), (2, 10), (3, 20)):
        ids, mask = tokens(n, length)
        with torch.no_grad():
            torch.testing.assert_close(engine(ids, mask), model(ids, mask), **TOL)
    assert context.padded_calls == 0 and engine.warm_status((2, 10)) is None
    assert ((2, 10), 2) in fake_cuda  # today's policy: step by step, captured at the second call
    ids, mask = tokens(3, 16)  # seq at a prepared size: batch is padded
    with torch.no_grad():
        torch.testing.assert_close(engine(ids, mask), model(ids, mask), **TOL)
    assert context.padded_calls == 1
    with pytest.raises(kiln.KilnError, match="did not prove paddable"):
        engine.pad_inputs(tokens(2, 10), (2, 16))


def test_nothing_to_pad_to_keeps_the_step_by_step_first_call(fake_cuda, conv_model):
    engine = _engine(conv_model, (torch.randn(4, 3, 16, 16),), ({0: BATCH},))
    context = engine.create_context()  # a context of your own: the pool's graphs are not its own
    with torch.no_grad():
        context(torch.randn(16, 3, 16, 16))  # batch 16 made, run step by step, not captured
        x = torch.randn(3, 3, 16, 16)
        torch.testing.assert_close(context(x), conv_model(x), **TOL)
    assert context.shape_states.peek((16,)).graph is None
    assert context.padded_calls == 0 and engine.warm_status((3,)) is None
    assert context.shape_states.peek((3,)).graph is None


def test_the_knob_turns_padding_and_load_captures_off(fake_cuda, conv_model, tmp_path, gated_warmups):
    engine = _engine(conv_model, (torch.randn(4, 3, 16, 16),), ({0: BATCH},))
    engine.pad_while_capturing = False
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(engine(x), conv_model(x), **TOL)
    (context,) = engine.contexts
    assert context.padded_calls == 0 and engine.warm_status((3,)) is None
    assert fake_cuda[-1] == ((3,), 2)  # step by step, then captured at the second call, as before
    engine.save(tmp_path / "c.kiln")
    assert kiln.load(tmp_path / "c.kiln").pad_while_capturing is True
    off = kiln.load(tmp_path / "c.kiln", pad_while_capturing=False)
    assert off.pad_while_capturing is False
    off.use_cuda_graph = True
    before = len(fake_cuda)
    assert off.prepare_pad_targets() == 0 and len(fake_cuda) == before


def test_a_failed_background_warm_up_stops_the_padding(fake_cuda, conv_model, monkeypatch):
    def broken(engine, key):
        raise RuntimeError("no memory for scratch")

    monkeypatch.setattr(context_module, "warm_binding", broken)
    engine = _engine(conv_model, (torch.randn(4, 3, 16, 16),), ({0: BATCH},))
    x = torch.randn(3, 3, 16, 16)
    engine(x)
    _finish_warmups(engine)
    assert engine.warm_status((3,)) == "failed"
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(engine(x), conv_model(x), **TOL)
    assert engine.contexts[0].padded_calls == 1 and fake_cuda[-1] == ((3,), 2)


def test_threads_at_mixed_sizes_get_correct_answers_while_bindings_warm_up(fake_cuda, conv_model):
    engine = _engine(conv_model, (torch.randn(4, 3, 16, 16),), ({0: BATCH},))
    for _ in range(2):  # three contexts, each with its pad targets pinned
        extra = engine.create_context()
        extra.warmup(engine.pad_targets(), pin=True)
        engine._pool.add(extra)
    engine.max_contexts = 3
    sizes = [1, 2, 3, 5, 6, 7, 9, 12, 13, 15]
    torch.manual_seed(1)
    work = [[torch.randn(sizes[(t + i) % len(sizes)], 3, 16, 16) for i in range(12)] for t in range(8)]
    with torch.no_grad():
        wants = [[conv_model(x) for x in xs] for xs in work]
    start = threading.Barrier(len(work))

    def worker(xs):
        start.wait()
        return [engine(x) for x in xs]

    with ThreadPoolExecutor(len(work)) as pool:
        gots = list(pool.map(worker, work))
    for got, want in zip(gots, wants):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL)
    assert len(engine.contexts) == 3
    assert sum(c.padded_calls for c in engine.contexts) > 0
    _finish_warmups(engine)
    assert all(engine.warm_status((n,)) == "ready" for n in sizes if engine.warm_status((n,)) is not None)
    for context in engine.contexts:  # every later call at a warmed size gets (or captures) its own graph
        padded = context.padded_calls
        for n in sizes:
            x = torch.randn(n, 3, 16, 16)
            with torch.no_grad():
                torch.testing.assert_close(context(x), conv_model(x), **TOL)
        assert context.padded_calls == padded


def test_background_warm_up_runs_every_step_and_touches_no_context(conv_model, monkeypatch):
    from kiln.runtime.engine import _Step

    engine = kiln.build(conv_model, (torch.randn(4, 3, 16, 16),), dynamic_shapes=({0: BATCH},), config=FAST)
    (context,) = engine.contexts
    context.arena.fill_(7)
    made = []
    real_make = _Step.make
    monkeypatch.setattr(_Step, "make", lambda self: made.append(self.name) or real_make(self))
    context_module.warm_binding(engine, (5,))
    assert made == [s.name for s in engine.program((5,)).step_specs]
    assert bool((context.arena == 7).all()), "the warm-up wrote into a context's arena"


def test_shape_cache_keeps_pinned_entries_and_never_evicts_the_newest():
    dropped = []
    cache: ShapeCache[int, str] = ShapeCache(3, on_evict=lambda k, v: dropped.append(k))
    cache.put(1, "a")
    cache.put(2, "b")
    cache.pin(1)
    cache.pin(2)
    cache.put(3, "c")
    cache.put(4, "d")  # 3 is the only unpinned entry but the newest
    assert dropped == [3] and cache.keys() == [1, 2, 4]
    cache.pin(4)
    cache.put(5, "e")  # all pinned but the newest: the oldest goes
    assert dropped == [3, 1] and cache.keys() == [2, 4, 5] and cache.pinned == {2, 4}
    assert cache.peek(2) == "b" and cache.keys() == [2, 4, 5]  # peek refreshes nothing


def test_a_failed_background_warm_up_warns_once_and_keeps_no_scratch(fake_cuda, monkeypatch):
    from kiln.runtime.engine import _Step

    engine = _engine(ConvNet().eval(), (torch.randn(4, 3, 16, 16),), ({0: BATCH},))
    last = engine.program((4,)).step_specs[-1].name
    real_make = _Step.make

    def make(self):
        if self.name == last and threading.current_thread().name == "kiln-cuda-capture":
            def out_of_memory(*args, **kwargs):
                raise RuntimeError("CUDA out of memory (simulated)")
            return out_of_memory
        return real_make(self)

    monkeypatch.setattr(_Step, "make", make)
    with pytest.warns(kiln.KilnWarning, match=r"preparing binding \(3,\) in the background failed"):
        engine(torch.randn(3, 3, 16, 16))
        _finish_warmups(engine)
    assert engine.warm_status((3,)) == "failed"
    tb = engine._warming[(3,)].exception().__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "warm_binding" not in frames, "the warm-up's frame (and its scratch tensors) is not kept"


def test_after_exit_a_capture_runs_in_the_caller_and_queued_warm_ups_count_as_failed(monkeypatch):
    capturer = context_module._CaptureThread()
    capturer.submit(lambda: None).result()  # the worker runs
    capturer._stop()  # what atexit does
    assert capturer.run(lambda: 42) == 42, "no worker is left: waiting for it would hang the exit"
    queued = capturer.submit(lambda: 1)
    assert queued.cancelled()
    engine = _engine(ConvNet().eval(), (torch.randn(4, 3, 16, 16),), ({0: BATCH},))
    engine._warming[(5,)] = queued
    assert engine.warm_status((5,)) == "failed"


# -- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_new_size_is_padded_then_captured(cuda_conv):
    model, engine = cuda_conv
    engine.release_contexts()
    assert engine.prepare_pad_targets() == 2
    (context,) = engine.contexts
    assert {k for k, s in context.shape_states.items() if s.graph is not None} >= {(4,), (16,)}
    x = torch.randn(3, 3, 16, 16, device="cuda")
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(engine(x), want, rtol=1e-3, atol=1e-3)
    assert context.padded_calls == 1
    _finish_warmups(engine)
    assert engine.warm_status((3,)) == "ready"
    for _ in range(2):
        torch.testing.assert_close(engine(x), want, rtol=1e-3, atol=1e-3)
    assert context.padded_calls == 1 and context.shape_states.peek((3,)).graph is not None


@pytest.mark.gpu
def test_gpu_threads_on_their_own_streams_at_new_sizes(cuda_conv):
    model, engine = cuda_conv
    engine.release_contexts()
    engine.prepare_pad_targets()
    assert_threads_match_the_model(model, engine, sizes=(1, 2, 3, 5, 9, 11, 13, 15), calls=6, own_streams=True)
    assert sum(c.padded_calls for c in engine.contexts) > 0


def test_captures_a_call_waits_for_go_before_queued_background_warm_ups():
    from kiln.runtime.context import _CaptureThread

    capturer = _CaptureThread()
    release, order = threading.Event(), []
    first = capturer.submit(lambda: release.wait(30) and order.append("running warm-up"))
    queued = [capturer.submit(lambda i=i: order.append(f"warm-up {i}")) for i in range(2)]
    with ThreadPoolExecutor(1) as pool:
        urgent = pool.submit(capturer.run, lambda: order.append("capture") or threading.get_ident())
        while not capturer._urgent:
            threading.Event().wait(0.001)
        release.set()
        worker = urgent.result(timeout=30)
    for f in [first, *queued]:
        f.result(timeout=30)
    assert order == ["running warm-up", "capture", "warm-up 0", "warm-up 1"]
    assert worker != threading.get_ident() and capturer.run(threading.get_ident) == worker
    broken = capturer.submit(lambda: 1 / 0)
    assert isinstance(broken.exception(timeout=30), ZeroDivisionError)
    capturer._stop()


def test_a_pad_target_that_fails_to_capture_is_dropped_and_graphs_stay_on(fake_cuda, monkeypatch):
    # e.g. out of memory capturing max on a smaller GPU: before, any failed capture turned CUDA
    # graphs off for every size of the engine
    real = ExecutionContext._capture_shape

    def capture(self, state, warmups=2, on_failure=None):
        key = next(k for k, s in self.shape_states.items() if s is state)
        if key == (16,):
            (on_failure or self.engine.capture_failed)(RuntimeError("CUDA out of memory (simulated)"))
            return
        real(self, state, warmups)

    monkeypatch.setattr(ExecutionContext, "_capture_shape", capture)
    built = kiln.build(ConvNet().eval(), (torch.randn(4, 3, 16, 16),), dynamic_shapes=({0: BATCH},), config=FAST)
    engine = kiln.runtime.Engine(built.header, built.weights, "cpu")
    engine.use_cuda_graph, engine.paddable = True, list(built.paddable)
    engine.release_contexts()
    with pytest.warns(kiln.KilnWarning, match=r"capturing binding \(16,\) to pad smaller calls to failed"):
        assert engine.prepare_pad_targets() == 2
    (context,) = engine.contexts
    assert engine.use_cuda_graph, "the engine keeps its graphs"
    assert context.shape_states.pinned == {(4,)}
    assert context.shape_states.peek((4,)).graph is not None and context.shape_states.peek((16,)).graph is None
