"""One engine, many threads: execution contexts (kiln.runtime.context).

Every call of a threaded run must give exactly what a single-threaded call gives for the
same input; contexts are pooled (no growth in steady state); a context used by two threads
at once raises instead of mixing results.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import kiln
from kiln.runtime.context import ExecutionContext

THREADS = 8


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h) + h)
        return self.fc(h.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Embedding, one pre-norm attention block and an MLP: the ops of a transformer, small."""

    def __init__(self, vocab=50, d=32, heads=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.1)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids) + self.pos[:, : ids.shape[1]]
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return {"logits": self.head(h), "pooled": h.mean(dim=1)}


def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    return [t for v in out for t in _leaves(v)]


def _same(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(la, lb))


def hammer(call, inputs_per_thread):
    """Run call(*inputs) for every input of every thread, THREADS threads at once, all
    starting together; the outputs, per thread, in order."""
    start = threading.Barrier(len(inputs_per_thread))

    def worker(inputs):
        start.wait()
        return [call(*x) for x in inputs]

    with ThreadPoolExecutor(len(inputs_per_thread)) as pool:
        return list(pool.map(worker, inputs_per_thread))


def wrong_outputs(engine, inputs_per_thread):
    """(wrong, total): threaded outputs that differ from the single-thread output for the same input."""
    expected = [[engine(*x) for x in inputs] for inputs in inputs_per_thread]
    got = hammer(engine, inputs_per_thread)
    pairs = [(g, e) for gs, es in zip(got, expected) for g, e in zip(gs, es)]
    return sum(not _same(g, e) for g, e in pairs), len(pairs)


@pytest.fixture(scope="module")
def conv_engine():
    model = ConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model, kiln.build(model, (torch.randn(2, 3, 16, 16),))


@pytest.fixture(scope="module")
def transformer_engine():
    model = TinyTransformer().eval()
    return model, kiln.build(model, (torch.randint(0, 50, (2, 12)),))


def test_threads_get_the_single_thread_outputs_conv(conv_engine):
    model, engine = conv_engine
    inputs = [[(torch.randn(2, 3, 16, 16),) for _ in range(50)] for _ in range(THREADS)]
    wrong, total = wrong_outputs(engine, inputs)
    assert (wrong, total) == (0, THREADS * 50)
    with torch.no_grad():  # and the engine still computes the model
        torch.testing.assert_close(engine(*inputs[3][7]), model(*inputs[3][7]), atol=1e-4, rtol=1e-4)


def test_threads_get_the_single_thread_outputs_transformer(transformer_engine):
    _, engine = transformer_engine
    inputs = [[(torch.randint(0, 50, (2, 12)),) for _ in range(50)] for _ in range(THREADS)]
    wrong, total = wrong_outputs(engine, inputs)
    assert (wrong, total) == (0, THREADS * 50)


def test_pooled_contexts_are_reused_not_grown(conv_engine):
    _, engine = conv_engine
    x = torch.randn(2, 3, 16, 16)
    engine(x)
    before = engine.contexts
    for _ in range(20):
        engine(x)
    assert engine.contexts == before, "single-threaded calls should reuse one context"
    inputs = [[(torch.randn(2, 3, 16, 16),)] * 30 for _ in range(THREADS)]
    hammer(engine, inputs)
    grown = engine.contexts
    assert 1 <= len(grown) <= THREADS
    for _ in range(3):
        hammer(engine, inputs)
    assert len(engine.contexts) <= THREADS
    assert all(isinstance(c, ExecutionContext) for c in engine.contexts)
    assert sum(c.calls for c in engine.contexts) >= 20 + 4 * THREADS * 30


def test_max_contexts_bounds_the_pool(conv_engine):
    model, _ = conv_engine
    engine = kiln.build(model, (torch.randn(2, 3, 16, 16),))
    engine.max_contexts = 2
    inputs = [[(torch.randn(2, 3, 16, 16),) for _ in range(10)] for _ in range(THREADS)]
    wrong, total = wrong_outputs(engine, inputs)
    assert wrong == 0 and len(engine.contexts) <= 2
    with pytest.raises(ValueError, match="at least 1"):
        engine.max_contexts = 0
    engine.max_contexts = None
    idle = len(engine.contexts)
    assert engine.release_contexts() == idle and engine.contexts == ()
    assert _same(engine(*inputs[0][0]), engine(*inputs[0][0]))  # a new context on demand


def test_create_context_runs_like_the_engine(conv_engine):
    _, engine = conv_engine
    ctx = engine.create_context()
    assert ctx not in engine.contexts
    x = torch.randn(2, 3, 16, 16)
    assert _same(ctx(x), engine(x))
    assert _same(ctx(x=x), engine(x))
    assert ctx.calls == 2
    assert ctx.nbytes >= engine.plan["memory"]["arena_bytes"]
    # contexts created by hand, one per thread, are as safe as the pool
    contexts = [engine.create_context() for _ in range(4)]
    inputs = [[(torch.randn(2, 3, 16, 16),) for _ in range(20)] for _ in contexts]
    expected = [[engine(*x) for x in xs] for xs in inputs]
    start = threading.Barrier(len(contexts))

    def worker(i):
        start.wait()
        return [contexts[i](*x) for x in inputs[i]]

    with ThreadPoolExecutor(len(contexts)) as pool:
        got = list(pool.map(worker, range(len(contexts))))
    assert all(_same(g, e) for gs, es in zip(got, expected) for g, e in zip(gs, es))


def _blocking(ctx):
    """Make ctx's first step wait for an event: (entered, release) events."""
    entered, release = threading.Event(), threading.Event()
    step = ctx.steps[0]
    inner = step.fn

    def fn(*args):
        entered.set()
        assert release.wait(30)
        return inner(*args)

    step.fn = fn
    return entered, release


def test_one_context_used_by_two_threads_raises(conv_engine):
    _, engine = conv_engine
    ctx = engine.create_context()
    x, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    entered, release = _blocking(ctx)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(ctx, x)
        assert entered.wait(30)
        with pytest.raises(kiln.KilnError, match="already running a call"):
            ctx(y)
        with pytest.raises(kiln.KilnError, match="already running a call"):
            ctx.time_steps((y,), lambda step, vals: (step(vals), lambda: 0.0)[1], iters=1)
        assert _same(engine(y), engine(y))  # the engine lends other contexts meanwhile
        release.set()
        assert _same(first.result(timeout=30), engine(x))
    assert _same(ctx(y), engine(y))  # free again after the call


def test_a_blocked_call_does_not_hold_up_the_engine(conv_engine):
    model, _ = conv_engine
    engine = kiln.build(model, (torch.randn(2, 3, 16, 16),))
    (busy,) = engine.contexts
    entered, release = _blocking(busy)
    x, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(engine, x)
        assert entered.wait(30)
        second = engine(y)  # runs on a second context while the first is busy
        assert len(engine.contexts) == 2
        release.set()
        out_x = first.result(timeout=30)
    with torch.no_grad():
        torch.testing.assert_close(second, model(y), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out_x, model(x), atol=1e-4, rtol=1e-4)


def test_outputs_never_alias_a_contexts_arena(conv_engine):
    _, engine = conv_engine
    x = torch.randn(2, 3, 16, 16)
    out = engine(x)
    for ctx in engine.contexts:
        lo = ctx.arena.untyped_storage().data_ptr()
        hi = lo + ctx.arena.numel()
        assert not lo <= out.untyped_storage().data_ptr() < hi


def test_context_memory_is_reported(conv_engine):
    _, engine = conv_engine
    assert engine.context_bytes == engine.plan["memory"]["arena_bytes"]  # CPU: the arena only
    assert "execution contexts:" in engine.summary()


# -- CUDA ------------------------------------------------------------------------------------


def _gpu_wrong_outputs(engine, inputs_per_thread):
    """(wrong, total, exact): compared exactly where the engine is bitwise reproducible
    single-threaded (exact=True); otherwise within twice the single-thread run-to-run spread."""
    with torch.inference_mode():
        expected = [[engine(*x) for x in xs] for xs in inputs_per_thread]
        again = [[engine(*x) for x in xs] for xs in inputs_per_thread]
    spread = max(
        float((a.float() - b.float()).abs().max())
        for es, gs in zip(expected, again) for e, g in zip(es, gs) for a, b in zip(_leaves(e), _leaves(g))
    )

    def call(*x):
        with torch.inference_mode():
            return engine(*x)

    got = hammer(call, inputs_per_thread)
    torch.cuda.synchronize()
    wrong = 0
    for gs, es in zip(got, expected):
        for g, e in zip(gs, es):
            if spread == 0:
                wrong += not _same(g, e)
            else:
                wrong += any(float((a.float() - b.float()).abs().max()) > 2 * spread
                             for a, b in zip(_leaves(g), _leaves(e)))
    return wrong, sum(len(gs) for gs in got), spread == 0


@pytest.mark.gpu
@pytest.mark.parametrize("max_contexts", [None, THREADS], ids=["default-pool", "a-context-per-thread"])
def test_gpu_resnet18_fp16_threads_get_the_single_thread_outputs(max_contexts):
    from kiln import zoo

    entry = zoo.create("resnet18", batch=2)
    engine = kiln.build(entry.model.cuda(), [x.cuda() for x in entry.example_inputs], precision="fp16",
                        device="cuda")
    if max_contexts is not None:
        engine.max_contexts = max_contexts
    calls = 200
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [[(torch.randn(2, 3, 224, 224, device="cuda", generator=gen),) for _ in range(calls)]
              for _ in range(THREADS)]
    wrong, total, exact = _gpu_wrong_outputs(engine, inputs)
    print(f"resnet18 fp16, {THREADS} threads x {calls} calls: {wrong} of {total} wrong "
          f"({'exact' if exact else 'within the single-thread spread'}); {len(engine.contexts)} contexts")
    assert (wrong, total) == (0, THREADS * calls)
    assert 1 <= len(engine.contexts) <= THREADS
    graphs = [c.graph for c in engine.contexts]
    assert all(g is not None for g in graphs) and len({id(g) for g in graphs}) == len(graphs)
    assert engine.outputs[0].dtype == torch.float32  # the model's dtype, not the fp16 inside
    assert engine.context_bytes >= engine.plan["memory"]["arena_bytes"]


@pytest.mark.gpu
def test_gpu_threads_on_their_own_streams_and_a_side_stream_plan():
    class Fork(nn.Module):  # a downsample shortcut beside the main branch: a side-stream candidate
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.b = nn.Conv2d(32, 32, 3, padding=1)
            self.short = nn.Conv2d(16, 32, 1, stride=2)

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))) + self.short(x))

    x = torch.randn(4, 16, 32, 32, device="cuda")
    engine = kiln.build(Fork().eval().cuda(), (x,), device="cuda", config=kiln.BuildConfig(streams="on"))
    inputs = [[(torch.randn_like(x),) for _ in range(50)] for _ in range(4)]
    with torch.inference_mode():
        expected = [[engine(*i) for i in xs] for xs in inputs]
    streams = [torch.cuda.Stream() for _ in inputs]
    start = threading.Barrier(len(inputs))

    def worker(t):
        start.wait()
        with torch.cuda.stream(streams[t]), torch.inference_mode():
            outs = [engine(*i) for i in inputs[t]]
        streams[t].synchronize()
        return outs

    with ThreadPoolExecutor(len(inputs)) as pool:
        got = list(pool.map(worker, range(len(inputs))))
    wrong = sum(not torch.allclose(g, e, atol=1e-3, rtol=1e-3) for gs, es in zip(got, expected)
                for g, e in zip(gs, es))
    assert wrong == 0


@pytest.mark.gpu
def test_gpu_create_context_captures_its_own_graph():
    model = ConvNet().eval().cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    engine = kiln.build(model, (x,), device="cuda")
    ctx = engine.create_context()
    out = ctx(x)
    assert ctx.graph is not None and all(ctx.graph is not c.graph for c in engine.contexts)
    assert ctx.graph_pool_bytes is None or ctx.graph_pool_bytes >= 0
    assert ctx.nbytes >= engine.context_bytes
    torch.testing.assert_close(out, engine(x), atol=0, rtol=0)
    entered, release = _blocking(ctx)
    engine.use_cuda_graph = False  # step by step, so the blocked step is reached
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(ctx, x)
        assert entered.wait(30)
        with pytest.raises(kiln.KilnError, match="already running a call"):
            ctx(x)
        release.set()
        torch.testing.assert_close(first.result(timeout=30), out, atol=1e-3, rtol=1e-3)


def test_a_context_made_under_inference_mode_serves_calls_outside_it(conv_engine):
    _, engine = conv_engine
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        ctx = engine.create_context()
        inside = ctx(x)
    assert _same(ctx(x), inside)
    assert not ctx.arena.is_inference()


def test_each_context_runs_a_tensorrt_region_on_an_execution_context_of_its_own(monkeypatch):
    """A TensorRT execution context holds per-call state (addresses, scratch memory): each kiln
    context's step function forks its own from the shared, deserialized engine, once."""
    from kiln.kernels import get_kernel
    from kiln.kernels import tensorrt as trt_kernel

    class Shared:
        def __init__(self):
            self.forks = []

        def for_context(self):
            twin = lambda inputs, twin_id=len(self.forks): [inputs[0] + twin_id]  # noqa: E731
            self.forks.append(twin)
            return twin

    shared = Shared()
    monkeypatch.setattr(trt_kernel, "runner_for", lambda engine, spec, device: shared)
    kernel = get_kernel("tensorrt")
    first, second = (kernel.make("kiln.tensorrt_region.default", None) for _ in range(2))
    args = ((torch.zeros(2),), torch.zeros(4, dtype=torch.uint8), "spec")
    ran_first = [float(first(args, {}, [])[0][0]) for _ in range(3)]
    ran_second = [float(second(args, {}, [])[0][0]) for _ in range(3)]
    assert ran_first == [0.0] * 3 and ran_second == [1.0] * 3  # each on its own fork, always the same
    assert len(shared.forks) == 2  # one per step function, made on first use


def test_pinned_attention_backends_leave_the_global_flags_as_they_were():
    """sdpa_kernel saves and restores process-wide flags: threads overlapping it must not leave
    PyTorch with some attention backends switched off."""
    from torch.nn.attention import _cur_sdpa_kernel_backends

    from kiln.kernels import get_kernel

    before = sorted(map(int, _cur_sdpa_kernel_backends()))
    fns = [get_kernel(name).make("aten.scaled_dot_product_attention.default", None)
           for name in ("sdpa.flash", "sdpa.efficient", "sdpa.cudnn")]
    q = torch.randn(1, 2, 4, 8)

    def worker(i):
        for _ in range(200):
            try:
                fns[i % len(fns)]((q, q, q), {}, [])
            except RuntimeError:  # a backend this device lacks
                pass

    hammer_args = [[(i,)] for i in range(6)]
    hammer(worker, hammer_args)
    assert sorted(map(int, _cur_sdpa_kernel_backends())) == before


def test_cuda_captures_all_run_on_one_thread_one_at_a_time():
    """PyTorch caches cuDNN plans per thread: every graph capture runs on one worker thread, so
    contexts captured for different threads keep the same algorithms (and bits)."""
    from kiln.runtime.context import _CaptureThread

    capturer = _CaptureThread()
    seen, active, most = [], [0], [0]
    lock = threading.Lock()

    def capture():
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        seen.append(threading.get_ident())
        threading.Event().wait(0.01)
        nested = capturer.run(threading.get_ident)  # from the capture thread itself: inline
        with lock:
            active[0] -= 1
        return nested

    with ThreadPoolExecutor(8) as pool:
        nested = list(pool.map(lambda _: capturer.run(capture), range(16)))
    assert len(set(seen)) == 1 and seen[0] != threading.get_ident()
    assert set(nested) == set(seen) and most[0] == 1

    def broken():
        raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        capturer.run(broken)


class _Stream:
    """Records the events a (fake) CUDA stream was made to wait on."""

    def __init__(self, name):
        self.name, self.waited = name, []

    def wait_event(self, event):
        self.waited.append(event)

    def __eq__(self, other):
        return isinstance(other, _Stream) and other.name == self.name

    __hash__ = None


class _Event:
    def __init__(self):
        self.recorded_on = []

    def record(self, stream):
        self.recorded_on.append(stream.name)

    def synchronize(self):
        self.recorded_on.append("synchronized")


def _fresh_order(engine, monkeypatch):
    monkeypatch.setattr(engine, "_last_call", None)
    monkeypatch.setattr(engine, "_last_stream", None)


def test_calls_wait_for_the_previous_call_only_from_another_stream(conv_engine, monkeypatch):
    """Call order on CUDA: a call on the previous call's stream is ordered by the stream itself;
    a call on another stream waits for the previous call's event."""
    _, engine = conv_engine
    _fresh_order(engine, monkeypatch)
    first, second = _Stream("first"), _Stream("second")
    engine.after_previous_call(first)
    assert first.waited == []  # no call before
    done = _Event()
    engine.call_done(first, done)
    assert done.recorded_on == ["first"]
    same = _Stream("first")  # the same stream, another Stream object (as current_stream() returns)
    engine.after_previous_call(same)
    assert same.waited == []
    engine.after_previous_call(second)
    assert second.waited == [done]
    later = _Event()
    engine.call_done(second, later)
    engine.after_previous_call(first)
    assert first.waited == [later]


def test_an_evicted_graph_is_dropped_after_the_engines_last_call(conv_engine, monkeypatch):
    _, engine = conv_engine
    _fresh_order(engine, monkeypatch)
    done = _Event()
    engine.call_done(_Stream("s"), done)
    order = []

    class State:
        graph = object()

        def drop(self):
            order.append(list(done.recorded_on))

    ctx = engine.create_context()
    ctx._evicted((1,), State())
    assert order == [["s", "synchronized"]], "the graph's memory went back before the last call finished"
    State.graph = None
    done.recorded_on.clear()
    ctx._evicted((2,), State())
    assert order[-1] == [], "a binding without a graph needs no wait"
