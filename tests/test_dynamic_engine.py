"""Dynamic shapes end to end (docs/dynamic-shapes.md): kiln.build(..., dynamic_shapes=...) on
CPU for a conv net and a small transformer, correct at min (1), opt, max and odd sizes; the
file round trip (format 3); range errors; the build's check at size 1; per-binding kernel
fallbacks; bucketing. GPU tests: one CUDA graph per size per context, its bounded cache."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kiln
from kiln.kernels import KERNELS, register_kernel
from kiln.runtime import engine_file, validate

torch.manual_seed(0)
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 on CPU: the engine runs the same ATen math as eager
FAST = kiln.BuildConfig(check_dims=False)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))
        return self.fc(h.mean((2, 3)))


class Encoder(nn.Module):
    """Token ids and a mask → per-token logits and a pooled vector (two outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.head = nn.Linear(32, 5)

    def forward(self, input_ids, attention_mask):
        h = self.layer(self.emb(input_ids) * attention_mask.unsqueeze(-1))
        return {"logits": self.head(h), "pooled": h.mean(1)}


BATCH = kiln.Dim("batch", min=1, opt=4, max=16)


@pytest.fixture(scope="module")
def conv():
    model = ConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    engine = kiln.build(model, (torch.randn(4, 3, 16, 16),), dynamic_shapes=({0: BATCH},))
    return model, engine


@pytest.fixture(scope="module")
def encoder():
    model = Encoder().eval()
    batch = kiln.Dim("batch", min=1, opt=4, max=8)
    seq = kiln.Dim("seq", min=2, opt=16, max=32)
    ids, mask = torch.randint(0, 100, (4, 16)), torch.ones(4, 16)
    engine = kiln.build(model, (ids, mask), dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                            "attention_mask": {0: batch, 1: seq}})
    return model, engine


def tokens(n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(n, length)
    mask[:, length // 2 + 1:] = 0.0
    return torch.randint(0, 100, (n, length)), mask


# -- conv net ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 7, 13, 16])  # min, 2, opt, odd, the build's awkward prime, max
def test_conv_matches_eager_across_the_range(conv, n):
    model, engine = conv
    x = torch.randn(n, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    got = engine(x)
    assert got.shape == (n, 10)
    torch.testing.assert_close(got, want, **TOL)


def test_conv_build_checked_every_probe_size(conv):
    _, engine = conv
    checked = engine.build_info["dims"]["checked"]
    sizes = [c["binding"]["batch"] for c in checked]
    assert {1, 4, 16} <= set(sizes)  # min, opt, max (and an awkward prime)
    assert all(c["max_abs_error"] < 1e-4 for c in checked)
    assert engine.build_info["dims"]["dims"] == [{"name": "batch", "min": 1, "opt": 4, "max": 16}]


def test_sizes_interleave_and_repeat(conv):
    """Alternating sizes reuse each size's cached state and never mix results."""
    model, engine = conv
    xs = {n: torch.randn(n, 3, 16, 16) for n in (3, 16, 1, 3, 9, 16)}
    for _ in range(2):
        for x in xs.values():
            with torch.no_grad():
                torch.testing.assert_close(engine(x), model(x), **TOL)


def test_out_of_range_is_an_input_error_naming_the_range(conv):
    _, engine = conv
    with pytest.raises(kiln.InputError, match=r"batch = 17 .*takes batch from 1 to 16 .*Dim\('batch', min=1"):
        engine(torch.randn(17, 3, 16, 16))
    with pytest.raises(kiln.InputError, match=r"size 15 at axis 2 .*built for 16"):
        engine(torch.randn(2, 3, 15, 16))  # a fixed axis stays fixed
    with pytest.raises(kiln.InputError, match="rank 3"):
        engine(torch.randn(3, 16, 16))


def test_summary_shows_dims_and_memory_plan(conv):
    _, engine = conv
    text = str(engine)
    assert "x: (batch, 3, 16, 16) float32" in text
    assert "batch 1..16 (opt 4)" in text
    assert "memory planned for batch 16" in text
    assert engine.dims == {"batch": BATCH}


def test_memory_is_planned_for_max(conv):
    _, engine = conv
    plan = engine.plan
    assert plan["memory"]["planned_at"] == {"batch": 16}
    buffers = [s for s in plan["slots"] if s["kind"] == "buffer"]
    assert buffers, "a dynamic plan still places buffers in the arena"
    for slot in buffers:  # every buffer's size is an expression; at max it fits the arena
        binding = {"batch": 16}
        end = slot["offset"] + kiln.shapes.evaluate(slot["nbytes"], binding)
        assert end <= plan["memory"]["arena_bytes"]


def test_save_load_round_trip(conv, tmp_path):
    model, engine = conv
    path = tmp_path / "conv.kiln"
    engine.save(path)
    meta = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])["__metadata__"]
    assert meta["kiln.version"] == "3"  # dynamic dims: format 3
    loaded = kiln.load(path)
    assert loaded.dims == engine.dims
    assert "batch 1..16 (opt 4)" in str(loaded)
    for n in (1, 5, 16):
        x = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), **TOL)
    with pytest.raises(kiln.InputError, match="from 1 to 16"):
        loaded(torch.randn(20, 3, 16, 16))


def test_static_engines_are_unchanged(tmp_path):
    """No dims: no dims in the plan, format 2, the fixed-shape error as before."""
    model = ConvNet().eval()
    engine = kiln.build(model, (torch.randn(2, 3, 16, 16),))
    assert "dims" not in engine.plan and engine.dims == {}
    assert all(isinstance(d, int) for s in engine.plan["slots"] for d in s["shape"])
    path = tmp_path / "static.kiln"
    engine.save(path)
    meta = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])["__metadata__"]
    assert meta["kiln.version"] == "2"
    with pytest.raises(kiln.InputError, match="Engines have fixed shapes"):
        engine(torch.randn(3, 3, 16, 16))


# -- transformer ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,length", [(1, 2), (4, 16), (8, 32), (3, 7), (1, 31), (8, 2)])
def test_encoder_matches_eager_across_batch_and_seq(encoder, n, length):
    model, engine = encoder
    ids, mask = tokens(n, length)
    with torch.no_grad():
        want = model(ids, mask)
    got = engine(input_ids=ids, attention_mask=mask)
    assert got["logits"].shape == (n, length, 5) and got["pooled"].shape == (n, 32)
    torch.testing.assert_close(got["logits"], want["logits"], **TOL)
    torch.testing.assert_close(got["pooled"], want["pooled"], **TOL)


def test_encoder_inputs_must_agree_on_a_dim(encoder):
    _, engine = encoder
    with pytest.raises(kiln.InputError, match=r"'attention_mask'\) has seq = 6 .*'input_ids'\) axis 1 has seq = 5"):
        engine(torch.randint(0, 100, (2, 5)), torch.ones(2, 6))
    with pytest.raises(kiln.InputError, match="takes seq from 2 to 32"):
        engine(*tokens(2, 33))
    with pytest.raises(kiln.InputError, match="Rebuild with min=1"):
        engine(*tokens(2, 1))


def test_encoder_round_trip(encoder, tmp_path):
    model, engine = encoder
    engine.save(tmp_path / "enc.kiln")
    loaded = kiln.load(tmp_path / "enc.kiln")
    ids, mask = tokens(5, 11)
    with torch.no_grad():
        want = model(ids, mask)
    torch.testing.assert_close(loaded(ids, mask)["logits"], want["logits"], **TOL)
    assert "input_ids: (batch, seq) int64" in str(loaded)


# -- what the build checks -------------------------------------------------------------------


class BranchesOnOne(nn.Module):
    """Different math at batch 1: torch.export traces the "not 1" path silently."""

    def forward(self, x):
        if x.shape[0] == 1:
            return x * 3.0
        return x * 2.0


def test_model_that_treats_size_one_differently_is_caught():
    with pytest.raises(kiln.KilnError, match=r"differs from the model at batch = 1.*set min=2 for batch"):
        kiln.build(BranchesOnOne().eval(), (torch.randn(4, 3),),
                   dynamic_shapes=({0: kiln.Dim("batch", min=1, max=8)},))
    engine = kiln.build(BranchesOnOne().eval(), (torch.randn(4, 3),),
                        dynamic_shapes=({0: kiln.Dim("batch", min=2, max=8)},))
    x = torch.randn(2, 3)
    torch.testing.assert_close(engine(x), x * 2.0)


class _Skewed:
    """An engine whose outputs are off by `rel` everywhere (a low-precision engine's rounding)
    and by `bad` (a factor, or NaN) at one batch size."""

    def __init__(self, engine, rel: float, at: int | None = None, bad: float = 3.0) -> None:
        self.engine, self.device, self.rel, self.at, self.bad = engine, engine.device, rel, at, bad

    def __call__(self, *args, **kwargs):
        out = self.engine(*args, **kwargs)
        return out * (self.bad if out.shape[0] == self.at else 1 + self.rel)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_size_check_allows_the_engines_own_rounding_and_catches_a_size_that_differs(precision):
    """A deep low-precision engine is as far from the fp32 model at every size as at the traced
    one (resnet50 fp16 on an H100: 0.056 max abs error on random-weight logits): the check
    judges each size against the engine's error at the traced sizes, not an absolute bound."""
    from kiln.builder import _relative, check_dims
    from kiln.capture.export import bind_example_inputs
    from kiln.dims import normalize

    model, x = ConvNet().eval(), torch.randn(4, 3, 16, 16)
    dynamic = ({0: kiln.Dim("batch", min=1, opt=4, max=8)},)
    engine = kiln.build(model, (x,), dynamic_shapes=dynamic, config=FAST)
    inputs = bind_example_inputs(model, (x,), {})
    spec = normalize(dynamic, inputs.tensors, inputs.names)
    checked = check_dims(_Skewed(engine, rel=0.2), model, inputs, spec, precision)
    assert [c["binding"]["batch"] for c in checked] == [4, 1, 8, 7]
    for bad in (3.0, float("nan")):
        with pytest.raises(kiln.KilnError, match=r"differs from the model at batch = 7: output 0 has max abs"):
            check_dims(_Skewed(engine, rel=0.2, at=7, bad=bad), model, inputs, spec, precision)
    assert _relative(torch.ones(3), torch.zeros(3)) == float("inf") and _relative(torch.zeros(2), torch.zeros(2)) == 0


def test_example_outside_the_range_is_traced_and_checked_at_opt():
    """An example at batch 1 with a range from 2: the build traces at opt and the size check
    takes its baseline there, never running the engine at the example's size."""
    model = ConvNet().eval()
    engine = kiln.build(model, (torch.randn(1, 3, 16, 16),), dynamic_shapes=({0: kiln.Dim("batch", min=2, opt=4,
                                                                                            max=12)},))
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(engine(x), model(x), **TOL)
    assert [c["binding"]["batch"] for c in engine.build_info["dims"]["checked"]] == [4, 2, 12, 11]


def test_bad_dynamic_shapes_are_named():
    with pytest.raises(kiln.KilnError, match="dynamic_shapes.*2 entries for 1 example input"):
        kiln.build(ConvNet(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: BATCH}, None))
    with pytest.raises(kiln.KilnError, match="dynamic_shapes.*argument 'y'"):
        kiln.build(ConvNet(), (torch.randn(2, 3, 16, 16),), dynamic_shapes={"y": {0: BATCH}})


# -- kernels valid only at some sizes ---------------------------------------------------------


class SinNet(nn.Module):
    def forward(self, x):
        return torch.sin(x * 2.0)


def test_a_kernel_valid_for_some_sizes_runs_only_there():
    """A kernel whose `supports` holds only for an even batch is chosen (at opt) with a
    fallback; at run time each size asks the kernel and runs the fallback where it says no."""
    ran: list[int] = []

    def even_batch(call):
        return call.outputs[0].shape[0] % 2 == 0

    @register_kernel("test.even_sin", provider="test", implements="aten.sin.default", supports=even_batch,
                     priority=100, writes_planned_outputs=False)
    def make(name, out):
        def run(args, kwargs, outs):
            ran.append(args[0].shape[0])
            return torch.sin(args[0])
        return run

    try:
        engine = kiln.build(SinNet().eval(), (torch.randn(4, 3),), config=kiln.BuildConfig(passes=[], check_dims=False),
                            dynamic_shapes=({0: kiln.Dim("batch", min=1, opt=4, max=9)},))
        step = next(s for s in engine.plan["steps"] if s["op"] == "aten.sin.default")
        assert step["kernel"] == "test.even_sin" and step["fallback"] == "aten"
        for n in (1, 2, 3, 4, 9, 8):
            x = torch.randn(n, 3)
            torch.testing.assert_close(engine(x), torch.sin(x * 2.0))
        assert ran == [2, 4, 8]
    finally:
        KERNELS.pop("test.even_sin", None)


# -- the file is data: what loading refuses -------------------------------------------------------


def _header(engine):
    return json.loads(json.dumps(engine.header))


def _weights(engine):
    return {k: (v.dtype, tuple(v.shape)) for k, v in engine.weights.items()}


def test_loading_refuses_bad_dims_and_expressions(conv):
    _, engine = conv
    validate.validate_header(_header(engine), _weights(engine))  # as built: fine
    cases = {
        "unknown dim": lambda h: h["plan"]["slots"][1]["shape"].__setitem__(0, "height"),
        "bad op": lambda h: h["plan"]["slots"][1]["shape"].__setitem__(0, {"pow": ["batch", 2]}),
        "min above max": lambda h: h["plan"]["dims"][0].update(min=20),
        "dim on no input": lambda h: h["plan"]["dims"].append({"name": "extra", "min": 1, "opt": 2, "max": 4}),
        "arena too small at max": lambda h: h["plan"]["memory"].update(arena_bytes=64),
    }
    for what, damage in cases.items():
        header = _header(engine)
        damage(header)
        with pytest.raises(kiln.EngineFileError):
            validate.validate_header(header, _weights(engine))
        assert what


def test_format_version_must_match_the_plan(conv, tmp_path, monkeypatch):
    """A static plan written as format 3 (or the reverse) is refused."""
    _, engine = conv
    monkeypatch.setattr(engine_file, "DYNAMIC_FORMAT_VERSION", 2)
    engine.save(tmp_path / "wrong.kiln")
    monkeypatch.undo()
    with pytest.raises(kiln.EngineFileError, match="format version 2 but its plan has dynamic dims"):
        kiln.load(tmp_path / "wrong.kiln")


# -- bucketing ---------------------------------------------------------------------------------------


def test_bucketing_pads_the_batch_and_slices_the_outputs(conv):
    model, engine = conv
    assert engine.paddable == ["batch"]
    engine.set_buckets(batch=[2, 8, 16])
    try:
        context = engine.create_context()
        for n in (1, 3, 5, 9, 16):
            x = torch.randn(n, 3, 16, 16)
            with torch.no_grad():
                torch.testing.assert_close(context(x), model(x), **TOL)
        assert sorted(context.shape_states.keys()) == [(2,), (8,), (16,)]  # only the buckets ran
        assert "buckets: batch [2, 8, 16]" in str(engine)
    finally:
        engine.set_buckets(batch=None)


def test_a_sequence_dim_cannot_be_bucketed(encoder):
    _, engine = encoder
    assert engine.paddable == ["batch"]  # pooled over seq: padding seq would change it
    with pytest.raises(kiln.KilnError, match="'seq' cannot be bucketed"):
        engine.set_buckets(seq=[8, 32])


def test_buckets_from_the_build_are_in_the_file(tmp_path):
    model = ConvNet().eval()
    engine = kiln.build(model, (torch.randn(4, 3, 16, 16),), dynamic_shapes=({0: BATCH},),
                        config=kiln.BuildConfig(buckets={"batch": "pow2"}, check_dims=False))
    assert engine.plan["buckets"] == {"batch": [1, 2, 4, 8, 16]}
    engine.save(tmp_path / "b.kiln")
    loaded = kiln.load(tmp_path / "b.kiln")
    assert list(loaded.buckets["batch"].sizes) == [1, 2, 4, 8, 16]
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), **TOL)
    header = _header(engine)
    header["plan"]["buckets"] = {"batch": [3, 5]}  # the largest bucket must be max
    with pytest.raises(kiln.EngineFileError, match="largest bucket"):
        validate.validate_header(header, _weights(engine))


def test_kernels_are_timed_at_the_traced_size():
    """Tuning materializes a symbolic node's arguments at the size it was traced at (opt)."""
    from kiln.capture.export import capture
    from kiln.dims import normalize
    from kiln.select.tune import materialize

    x = torch.randn(4, 3, 16, 16)
    spec = normalize(({0: BATCH},), (x,))
    graph = capture(ConvNet().eval(), (x,), device=torch.device("cpu"), dynamic=spec)
    view = next(n for n in graph.module.graph.nodes if n.op == "call_function" and n.target is
                torch.ops.aten.convolution.default)
    args, _ = materialize(view, graph.module, torch.device("cpu"))
    assert args[0].shape == (4, 3, 16, 16)


# -- CUDA: one graph per size, per context, in a bounded cache ----------------------------------------


@pytest.mark.gpu
def test_cuda_graph_per_size_captured_on_second_call(cuda_conv):
    model, engine = cuda_conv
    engine.pad_while_capturing = False  # (on: tests/test_dynamic_padding.py)
    try:
        context = engine.create_context()
        for n in (3, 3, 3, 16, 16, 1):
            x = torch.randn(n, 3, 16, 16, device="cuda")
            with torch.no_grad():
                want = model(x)
            torch.testing.assert_close(context(x), want, rtol=1e-3, atol=1e-3)
    finally:
        engine.pad_while_capturing = True
    assert context.shape_states.get((3,)).graph is not None  # 3 calls: captured on the second
    assert context.shape_states.get((16,)).graph is not None
    assert context.shape_states.get((1,)).graph is None  # one call: ran step by step


@pytest.mark.gpu
def test_cuda_graph_cache_is_bounded_and_evicts(cuda_conv):
    model, engine = cuda_conv
    engine.shape_cache_size = 2
    engine.pad_while_capturing = False
    try:
        context = engine.create_context()
        for n in (2, 2, 5, 5, 7, 7, 2, 2):
            x = torch.randn(n, 3, 16, 16, device="cuda")
            with torch.no_grad():
                torch.testing.assert_close(context(x), model(x), rtol=1e-3, atol=1e-3)
        assert len(context.shape_states) == 2
        assert context.shape_states.keys() == [(7,), (2,)]
        assert context.shape_states.stats()["evictions"] >= 1
    finally:
        engine.shape_cache_size = 8
        engine.pad_while_capturing = True


@pytest.mark.gpu
def test_cuda_warmup_captures_ahead_and_replays_correctly(cuda_conv):
    model, engine = cuda_conv
    engine.release_contexts()
    assert engine.warmup(batch=[1, 8, 16]) == 3
    context = engine.contexts[0]
    assert all(context.shape_states.get((n,)).graph is not None for n in (1, 8, 16))
    for n in (16, 1, 8):
        x = torch.randn(n, 3, 16, 16, device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(engine(x), model(x), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_cuda_concurrent_contexts_at_different_sizes(cuda_conv):
    assert_threads_match_the_model(*cuda_conv, sizes=(1, 4, 9, 16), calls=5)


def assert_threads_match_the_model(model, engine, sizes, calls: int, own_streams: bool = False) -> None:
    """One thread per batch size calls the CUDA conv engine `calls` times (each on a stream of its
    own with `own_streams`); every answer equals the model's within 1e-3."""
    import contextlib
    import threading

    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with torch.cuda.stream(torch.cuda.Stream()) if own_streams else contextlib.nullcontext():
                for _ in range(calls):
                    x = torch.randn(n, 3, 16, 16, device="cuda")
                    with torch.no_grad():
                        want = model(x)
                    torch.testing.assert_close(engine(x), want, rtol=1e-3, atol=1e-3)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


class _Attends(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_refresh_meta_takes_attention_from_the_shapes_in_a_dynamic_graph(monkeypatch):
    """On CUDA, SDPA's fake kernel reads sizes as integers and so fixes dynamic dims (bert-base on
    an H100); a dynamic graph's refresh computes its value from the shapes instead."""
    from kiln import graph as graph_module
    from kiln.capture.export import capture
    from kiln.dims import normalize

    q = torch.randn(4, 2, 8, 16)
    spec = normalize(({0: kiln.Dim("batch", min=1, opt=4, max=8)},), (q,))
    captured = capture(_Attends().eval(), spec.export_inputs((q,)), device=torch.device("cpu"), dynamic=spec)
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    assert any(n.target is sdpa for n in captured.module.graph.nodes)
    used = []
    rule = graph_module.SHAPE_ONLY_META[sdpa]
    monkeypatch.setitem(graph_module.SHAPE_ONLY_META, sdpa, lambda *a, **k: used.append(1) or rule(*a, **k))
    graph_module.refresh_meta(captured)
    assert used, "the dynamic graph's refresh dispatched attention instead of using its shape rule"
    (out,) = [n for n in captured.module.graph.nodes if n.op == "output"][0].args[0]
    assert isinstance(out.meta["val"].shape[0], torch.SymInt)


SEQ_DIMS = {0: kiln.Dim("batch", min=1, opt=2, max=4), 1: kiln.Dim("seq", min=4, opt=16, max=32)}


class PadsTheSequence(nn.Module):
    """A padding of a dynamic axis (ConvBERT's span convolution: F.unfold pads the sequence)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * mask.unsqueeze(-1)
        padded = torch.nn.functional.pad(x.transpose(1, 2).contiguous().unsqueeze(-1), (0, 0, 4, 4))
        return padded[:, :, :-8] + padded[:, :, 8:]


def test_refresh_meta_keeps_a_padded_dynamic_axis_symbolic():
    """constant_pad_nd's C++ meta kernel reads sizes as integers: outside the Python dispatcher
    (how torch.export traces) a refresh gave ConvBERT's padding the traced batch and length, and
    the plan then wrote other sizes into buffers of that shape. The fake-tensor cache (export's
    results) hides it until an op's inputs change, so the refresh here runs without it."""
    from torch._subclasses.fake_tensor import disable_fake_tensor_cache

    from kiln import graph as graph_module
    from kiln.capture.export import capture
    from kiln.dims import normalize

    inputs = (torch.randn(2, 16, 8), torch.ones(2, 16))
    spec = normalize((SEQ_DIMS, SEQ_DIMS), inputs)
    captured = capture(PadsTheSequence().eval(), spec.export_inputs(inputs), device=torch.device("cpu"), dynamic=spec)
    with disable_fake_tensor_cache(captured.module.graph.find_nodes(op="placeholder")[0].meta["val"].fake_mode):
        graph_module.refresh_meta(captured)
    (pad,) = [n for n in captured.module.graph.nodes if n.target is torch.ops.aten.constant_pad_nd.default]
    assert all(isinstance(d, torch.SymInt) for d in pad.meta["val"].shape[::2]), pad.meta["val"].shape


def test_a_pass_keeps_a_padded_dynamic_axis_right_at_every_size():
    """The engine after a pass (its refresh) is right at every batch and length (fp32, the same
    ATen ops as eager: 1e-6)."""
    model = PadsTheSequence().eval()
    engine = kiln.build(model, (torch.randn(2, 16, 8), torch.ones(2, 16)), dynamic_shapes=(SEQ_DIMS, SEQ_DIMS),
                        config=kiln.BuildConfig(passes=["dead_code"]))
    for batch, length in [(1, 4), (4, 32), (3, 9), (2, 16)]:
        y, mask = torch.randn(batch, length, 8), (torch.rand(batch, length) > 0.3).float()
        torch.testing.assert_close(engine(y, mask), model(y, mask), atol=1e-6, rtol=1e-6)


class LoopsOverTheSequence(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, 0]
        for i in range(1, x.shape[1]):  # a Python loop over a dynamic size
            out = out * 0.5 + x[:, i]
        return out


def test_a_size_the_model_fixes_is_named_with_its_source_line():
    """Non-strict torch.export says only that a dim was specialized; the CaptureError names the
    model's line that did it (found by repeating the export with torch's specialization log)."""
    dims = ({0: kiln.Dim("batch", min=1, opt=2, max=4), 1: kiln.Dim("seq", min=4, opt=8, max=16)},)
    with pytest.raises(kiln.CaptureError) as info:
        kiln.build(LoopsOverTheSequence(), (torch.randn(2, 8, 3),), dynamic_shapes=dims)
    message = str(info.value)
    assert "the model fixes a size at" in message and "test_dynamic_engine.py" in message
    assert "# a Python loop over a dynamic size" in message, message


class SpanOfTheSequence(nn.Module):
    """DeBERTa's relative-position span: a tensor made from a size, then slicing bounds read
    back from it with .item() (a data-dependent value to torch.export)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        span = torch.tensor(min(x.shape[1], 32))
        rows = self.table[32 - span : 32 + span]  # 2 * seq rows
        return x @ rows.T


def test_an_item_of_a_size_is_that_size_in_a_dynamic_engine():
    """.item() of a tensor computed from sizes only becomes the size expression, so the engine
    takes every length of the range (fp32, the same ATen ops: 1e-5)."""
    model = SpanOfTheSequence().eval()
    engine = kiln.build(model, (torch.randn(2, 8, 8),), dynamic_shapes=(SEQ_DIMS,))
    for batch, length in [(1, 4), (4, 32), (3, 9)]:
        y = torch.randn(batch, length, 8)
        with torch.no_grad():
            torch.testing.assert_close(engine(y), model(y), atol=1e-5, rtol=1e-5)


class CentersTheBatch(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)  # every row depends on every other: padding changes them


def test_a_dim_whose_rows_mix_is_not_paddable():
    engine = kiln.build(CentersTheBatch().eval(), (torch.randn(4, 8),), dynamic_shapes=({0: BATCH},),
                        config=kiln.BuildConfig(check_dims=False))
    assert engine.paddable == []
    with pytest.raises(kiln.KilnError, match="cannot be bucketed"):
        engine.set_buckets(batch="pow2")


def test_paddable_allows_rounding_at_the_engines_precision_but_not_more():
    from kiln.builder import PAD_REL_ERROR, _rel_error

    want = torch.randn(64, 100)
    assert _rel_error(want.clone(), want) == 0.0
    rounded = want.half().float()  # what other fp16 kernels at another size may differ by
    assert _rel_error(rounded, want) <= PAD_REL_ERROR["fp16"]
    assert _rel_error(rounded, want) > PAD_REL_ERROR["fp32"]
    mixed = want - want.mean(0, keepdim=True)
    assert _rel_error(mixed, want) > PAD_REL_ERROR["bf16"]
    nan = want.clone()
    nan[3, 4] = float("nan")
    assert _rel_error(nan, want) == float("inf") and _rel_error(want, nan) == float("inf")


class ReturnsItsBatch(nn.Module):
    def forward(self, x):
        return x * 2, x.shape[0]


class ConvAlongLength(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_a_dim_returned_as_a_number_is_not_paddable():
    # padded, the call would answer the padded size
    engine = kiln.build(ReturnsItsBatch().eval(), (torch.randn(4, 8),), dynamic_shapes=({0: BATCH},),
                        config=kiln.BuildConfig(check_dims=False))
    assert engine.paddable == []


def test_a_dim_whose_last_rows_read_their_neighbours_is_not_paddable_even_at_a_loose_bound(monkeypatch):
    # a convolution along the length: only the last real position sees the padding, which the
    # whole output's relative error hides at bf16's bound; the worst row does not
    import kiln.builder

    monkeypatch.setattr(kiln.builder, "compute_precision", lambda precision, device: "bf16")
    torch.manual_seed(0)
    length = kiln.Dim("length", min=2, opt=64, max=1024)
    engine = kiln.build(ConvAlongLength().eval(), (torch.randn(2, 16, 64),), dynamic_shapes=({2: length},),
                        config=kiln.BuildConfig(check_dims=False))
    assert engine.paddable == []
