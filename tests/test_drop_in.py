"""An engine as a drop-in for the model: any user's shapes, threads and files.

Users replace `model` with `kiln.build(model, inputs)` (or `kiln.compile`) and expect the
model's answers for whatever they pass (views of any layout, under autocast, repeated
keyword constants), or a kiln error naming the problem; never a raw traceback and never a
silently different answer (a move, cast, pickle or weight load the engine cannot honour).
"""

import copy
import io
import pickle
import random
import threading
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import kiln

BATCH = kiln.Dim("batch", min=1, opt=4, max=8)
SHAPE = (3, 6, 6)  # one sample


class ConvHead(nn.Module):
    """Convolution, batch norm, pooling, a linear head, and the batch as a Python number."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3))).softmax(-1), x.shape[0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ConvHead().eval()


@pytest.fixture(scope="module")
def static(model):
    return kiln.build(model, (torch.randn(4, *SHAPE),), device="cpu")


@pytest.fixture(scope="module")
def dynamic(model):
    return kiln.build(model, (torch.randn(4, *SHAPE),), device="cpu", dynamic_shapes=({0: BATCH},))


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def _assert_same(out, ref, exact=False):
    assert out[1] == ref[1]
    if exact:
        assert torch.equal(out[0], ref[0])
    else:
        torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)


# -- inputs of any layout ------------------------------------------------------------------


@st.composite
def strided_inputs(draw, batches):
    """A tensor of shape (n, 3, 6, 6) whose memory is laid out anyhow: axes permuted in memory,
    a step along one axis, a storage offset, or the batch broadcast from one row (stride 0)."""
    n = draw(batches)
    shape = (n, *SHAPE)
    order = draw(st.permutations(range(4)))
    step_axis, step = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    offset = draw(st.integers(0, 5))
    broadcast = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    stored = [shape[a] for a in order]  # the memory order of the axes
    where = order.index(step_axis)
    stored[where] *= step
    if broadcast:
        stored[order.index(0)] = 1
    flat = torch.randn(offset + torch.Size(stored).numel(), generator=g)
    base = flat[offset:].view(stored)
    base = base[(slice(None),) * where + (slice(None, None, step),)]
    x = base.permute([order.index(a) for a in range(4)])
    if broadcast:
        x = x.expand(shape)
    assert x.shape == shape
    return x


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(x=strided_inputs(st.just(4)))
def test_static_engine_takes_inputs_of_any_layout(model, static, x):
    out = static(x)
    _assert_same(out, static(x.contiguous()), exact=True)
    _assert_same(out, _eager(model, x))


@FUZZ
@given(x=strided_inputs(st.integers(1, 8)), channels_last=st.booleans())
def test_dynamic_engine_takes_inputs_of_any_layout_and_size(model, dynamic, x, channels_last):
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = dynamic(x)
    _assert_same(out, dynamic(x.contiguous()), exact=True)
    _assert_same(out, _eager(model, x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                   torch.bool, torch.complex64])
def test_another_dtype_is_an_input_error_naming_both(dynamic, dtype):
    x = torch.ones(2, *SHAPE).to(dtype)
    with pytest.raises(kiln.InputError, match=rf"input 0 \('x'\) has dtype {dtype}; the engine expects torch.float32"):
        dynamic(x)


class Scaled(nn.Module):
    def forward(self, x, t):
        return x * t


@pytest.mark.parametrize("args, message", [
    ((lambda: (torch.randn(3).numpy(), torch.tensor(1.0))),
     r"input 0 \('x'\) must be a tensor, got ndarray: pass torch.as_tensor\(x\) \(a \(3,\) float32 tensor\)"),
    ((lambda: (torch.randn(3), 2.0)), r"input 1 \('t'\) must be a tensor, got float: pass torch.tensor\(2.0, "
                                      r"dtype=torch.float32\)"),
    ((lambda: (None, torch.tensor(1.0))), r"got NoneType: the engine was built with a \(3,\) float32 tensor here"),
    ((lambda: ([1.0, 2.0, 3.0], torch.tensor(1.0))), r"got list: pass a \(3,\) float32 tensor"),
    ((lambda: (torch.randn(3).double(), torch.tensor(1.0))),
     r"has dtype torch.float64; the engine expects torch.float32 \(pass x.to\(torch.float32\)"),
])
def test_a_wrong_input_says_what_to_pass_instead(args, message):
    engine = kiln.build(Scaled().eval(), (torch.randn(3), torch.tensor(2.0)), device="cpu")
    with pytest.raises(kiln.InputError, match=message):
        engine(*args())


def test_an_empty_batch_is_named_without_advising_an_impossible_dim(dynamic):
    with pytest.raises(kiln.InputError, match="batch = 0") as info:
        dynamic(torch.randn(0, *SHAPE))
    assert "min=0" not in str(info.value) and "empty" in str(info.value)
    with pytest.raises(ValueError):  # what the old advice asked for
        kiln.Dim("batch", min=0, max=8)


def test_autocast_does_not_change_the_engines_answers(static, dynamic):
    x = torch.randn(4, *SHAPE)
    for engine in (static, dynamic):
        plain = engine(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = engine(x)
        assert cast[0].dtype == torch.float32
        assert torch.equal(cast[0], plain[0]), "autocast reached the engine's kernels"


def test_one_tensor_given_for_two_inputs():
    class Pair(nn.Module):
        def forward(self, a, b):
            return (a * 2).relu() + b, a - b

    a = torch.randn(3, 4)
    engine = kiln.build(Pair().eval(), (a, torch.randn(3, 4)), device="cpu")
    out = engine(a, b=a)
    torch.testing.assert_close(out, Pair().eval()(a, a))
    assert torch.equal(out[1], torch.zeros(3, 4))


def test_a_step_failing_on_the_inputs_values_is_a_run_error_naming_the_step():
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(10, 4)

        def forward(self, ids):
            return self.table(ids) * 2

    model, ids = Lookup().eval(), torch.randint(0, 10, (2, 5))
    engine = kiln.build(model, (ids,), device="cpu")
    bad = ids.clone()
    bad[1, 3] = 10
    message = (r"step 'embedding' \(aten.embedding.default, module 'table', kernel aten\) failed on these inputs: "
               r"IndexError: index out of range in self\. Check the inputs' values.*"
               r"Model source: .*test_drop_in.py:\d+ in forward: return self.table\(ids\)")
    with pytest.raises(kiln.RunError, match=message):
        engine(bad)
    torch.testing.assert_close(engine(ids), _eager(model, ids))  # the failed call left nothing behind


# -- keyword constants ---------------------------------------------------------------------


class Options(nn.Module):
    def forward(self, x, mask=None, scale=2.0, flag=True):
        y = x * scale if flag else x
        return y if mask is None else y * mask


def test_a_call_may_repeat_the_constants_it_was_built_with(tmp_path):
    x = torch.randn(3)
    engine = kiln.build(Options().eval(), (x,), kwargs={"scale": 3.0}, device="cpu")
    assert engine.build_info["default_inputs"] == {"mask": None, "flag": True}
    engine.save(tmp_path / "options.kiln")
    for e in (engine, kiln.load(tmp_path / "options.kiln")):
        want = x * 3.0
        torch.testing.assert_close(e(x, scale=3.0), want)
        torch.testing.assert_close(e(x, mask=None, flag=True), want)
        torch.testing.assert_close(e(x=x, scale=3.0, mask=None), want)


def test_a_default_the_file_cannot_hold_is_left_out_and_the_engine_saves(tmp_path):
    class Joined(nn.Module):
        def forward(self, x, sep="\x1b[0m", tag="a b"):
            return x * 2

    engine = kiln.build(Joined().eval(), (torch.randn(2),), device="cpu")
    assert engine.build_info["default_inputs"] == {"tag": "a b"}
    engine.save(tmp_path / "joined.kiln")
    assert kiln.load(tmp_path / "joined.kiln")(torch.ones(2), tag="a b").tolist() == [2.0, 2.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": 5.0}, r"'scale' is scale=5.0, but this engine was traced with scale=3.0 \(given at build\)"),
    ({"scale": 3}, r"'scale' is scale=3, but this engine was traced with scale=3.0"),
    ({"flag": False}, r"'flag' is flag=False, but this engine was traced with flag=True \(its default\)"),
    ({"mask": torch.ones(3)}, r"'mask' is a tensor \(3,\), but this engine was traced with mask=None \(its default\)"),
    ({"other": 1}, r"unexpected keyword input\(s\) 'other'"),
])
def test_a_constant_the_engine_cannot_change_is_named(kwargs, message):
    engine = kiln.build(Options().eval(), (torch.randn(3),), kwargs={"scale": 3.0}, device="cpu")
    with pytest.raises(kiln.InputError, match=message):
        engine(torch.randn(3), **kwargs)


class Three(nn.Module):
    def forward(self, a, b, c, scale=2.0, mask=None):
        y = (a - b) * c * scale
        return y if mask is None else y * mask


@pytest.fixture(scope="module")
def three():
    t = torch.randn(3)
    return Three().eval(), kiln.build(Three().eval(), (t, t, t), device="cpu")


ARGUMENT = {"a": torch.randn(3), "b": torch.randn(3), "c": torch.randn(3), "extra": torch.randn(3)}


@settings(FUZZ, max_examples=150)
@given(positional=st.integers(0, 5), keywords=st.lists(st.sampled_from(["a", "b", "c", "scale", "mask", "extra"]),
                                                       unique=True),
       scale=st.sampled_from([2.0, 3.0, 2]), mask=st.sampled_from([None, "tensor"]))
def test_any_call_binds_as_forward_or_is_an_input_error(three, positional, keywords, scale, mask):
    """As the model's forward binds it: the model's answer where forward takes the call and the
    engine can (the traced constants repeated), else an InputError, never another exception."""
    model, engine = three
    values = {**ARGUMENT, "scale": scale, "mask": ARGUMENT["a"] if mask == "tensor" else None}
    order = ["a", "b", "c", "scale", "mask"]
    args = [values[n] for n in order[:positional]]
    kwargs = {n: values[n] for n in keywords}
    try:
        want = model(*args, **kwargs)
    except TypeError:
        want = None  # forward cannot take this call
    fixed = args[3:] == [] and all(kwargs.get(k, d) is d or (type(kwargs[k]) is float and kwargs[k] == d)
                                    for k, d in (("scale", 2.0), ("mask", None)))
    if want is None or not fixed:
        with pytest.raises(kiln.InputError):
            engine(*args, **kwargs)
    else:
        torch.testing.assert_close(engine(*args, **kwargs), want)


# -- outputs and weights -------------------------------------------------------------------


def test_the_engine_keeps_its_weights_when_the_model_changes_after_the_build():
    """The capture lifts the model's parameters as they are: an engine sharing their memory
    changed its answers (only where no pass had folded them) when the model trained on."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("gain", torch.ones(4))

        def forward(self, x):
            return self.fc(x) * self.gain

    model = Mixed().eval()
    x = torch.randn(2, 4)
    engine = kiln.build(model, (x,), device="cpu")
    before = engine(x)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
        model.gain.mul_(3.0)
    assert torch.equal(engine(x), before)
    model.load_state_dict(Mixed().state_dict())  # copies into the same tensors
    assert torch.equal(engine(x), before)


def test_non_tensor_outputs_come_back_as_the_model_gives_them(tmp_path):
    class Shapes(nn.Module):
        def forward(self, x):
            return {"y": x * 2, "shape": x.shape, "rows": x.size(0), "name": "shapes", "none": None, "half": 0.5}

    model, x = Shapes().eval(), torch.randn(3, 4)
    for dynamic_shapes in (None, ({0: BATCH},)):
        engine = kiln.build(model, (x,), device="cpu", dynamic_shapes=dynamic_shapes)
        engine.save(tmp_path / "shapes.kiln")
        for e in (engine, kiln.load(tmp_path / "shapes.kiln")):
            for n in ((3,) if dynamic_shapes is None else (1, 3, 8)):
                xn = torch.randn(n, 4)
                out, want = e(xn), model(xn)
                assert type(out["shape"]) is torch.Size and out["shape"] == want["shape"] == (n, 4)
                assert {k: v for k, v in out.items() if k != "y"} == {k: v for k, v in want.items() if k != "y"}
                torch.testing.assert_close(out["y"], want["y"])


def test_outputs_that_are_one_tensor_in_the_model_come_back_separate():
    class Aliased(nn.Module):
        def forward(self, x):
            y = x + 1
            return y, y, y.view(-1), x

    model, x = Aliased().eval(), torch.randn(3, 4)
    engine = kiln.build(model, (x,), device="cpu")
    out = engine(x)
    torch.testing.assert_close(out, model(x))
    out[0].zero_()
    assert not out[1].eq(0).all() and not out[2].eq(0).all() and torch.equal(out[3], x)


@pytest.mark.parametrize("device, message", [
    ("bogus", r"device='bogus' is not a device .*kiln engines run on 'cpu' or 'cuda'"),
    ("meta", r"built for cpu .* cannot run on meta\. kiln engines run on cpu or cuda: load it with device='cpu'"),
])
def test_loading_on_a_device_kiln_cannot_use_names_the_argument_not_the_file(static, tmp_path, device, message):
    static.save(tmp_path / "e.kiln")
    with pytest.raises(kiln.DeviceMismatchError, match=message):
        kiln.load(tmp_path / "e.kiln", device=device)


@pytest.mark.parametrize("device, message", [("bogus", "device='bogus' is not a device"),
                                             ("meta", "kiln builds engines for cpu or cuda, not meta")])
def test_building_for_a_device_kiln_cannot_use_is_named(device, message):
    with pytest.raises(kiln.DeviceMismatchError, match=message):
        kiln.build(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), device=device)


# -- copies and pickles --------------------------------------------------------------------


def test_deepcopy_and_copy_give_working_engines(static):
    x = torch.randn(4, *SHAPE)
    want = static(x)
    deep = copy.deepcopy(static)
    _assert_same(deep(x), want, exact=True)
    assert all(deep.weights[k].data_ptr() != v.data_ptr() for k, v in static.weights.items() if v.numel())
    shallow = copy.copy(static)
    _assert_same(shallow(x), want, exact=True)
    assert shallow.contexts and not set(map(id, shallow.contexts)) & set(map(id, static.contexts))
    module = copy.deepcopy(kiln.compile(ConvHead().eval(), (x,), device="cpu"))
    assert module(x)[0].shape == (4, 5)


def test_dynamic_deepcopy_keeps_the_buckets():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU()).eval()
    engine = kiln.build(model, (torch.randn(4, 6),), device="cpu", dynamic_shapes=({0: BATCH},))
    engine.set_buckets(batch=[4, 8])
    other = copy.deepcopy(engine)
    assert {k: list(v.sizes) for k, v in other.buckets.items()} == {"batch": [4, 8]}
    x = torch.randn(3, 6)
    assert torch.equal(other(x), engine(x))


@pytest.mark.parametrize("how", ["pickle", "torch.save", "torch.save module"])
def test_pickling_an_engine_is_a_kiln_error_pointing_at_save(static, how):
    target = kiln.runtime.engine.EngineModule(static) if how.endswith("module") else static
    with pytest.raises(kiln.KilnError, match=r"not pickled.*engine.save\(path\).*kiln.load\(path\)"):
        if how == "pickle":
            pickle.dumps(target)
        else:
            torch.save(target, io.BytesIO())


# -- the module drop-in ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def module(model):
    return kiln.compile(model, (torch.randn(4, *SHAPE),), device="cpu")


@pytest.mark.parametrize("move", [
    lambda m: m.half(), lambda m: m.double(), lambda m: m.bfloat16(), lambda m: m.to(torch.float64),
    lambda m: m.to("meta"), lambda m: nn.Sequential(m).half(), lambda m: m.to_empty(device="meta"),
])
def test_a_move_or_cast_the_engine_cannot_do_is_a_kiln_error(module, move):
    with pytest.raises(kiln.KilnError, match=r"cannot be moved or cast.*runs on cpu at fp32.*kiln.build"):
        move(module)
    assert module(torch.randn(4, *SHAPE))[0].dtype == torch.float32


def test_a_move_or_cast_that_changes_nothing_is_allowed(module):
    x = torch.randn(4, *SHAPE)
    assert module.cpu() is module and module.float() is module and module.to("cpu", torch.float32) is module
    assert module(x)[0].shape == (4, 5)


@pytest.mark.parametrize("move", [
    lambda e: e.half(), lambda e: e.double(), lambda e: e.bfloat16(), lambda e: e.to(torch.float16),
    lambda e: e.to("meta"), lambda e: e.to("cpu", torch.float64), lambda e: e.cuda(),
])
def test_the_engine_itself_answers_a_models_moves(static, move):
    """Code written for the model calls model.eval(), .to(device), .float() on what replaced it."""
    x = torch.randn(4, *SHAPE)
    assert static.eval() is static and static.cpu() is static and static.float() is static
    assert static.to("cpu") is static and static.to(torch.float32) is static and static.to(x) is static
    with pytest.raises(kiln.KilnError, match=r"cannot be moved or cast.*runs on cpu at fp32"):
        move(static)
    with pytest.warns(kiln.KilnWarning, match="inference only"):
        assert static.train() is static
    _assert_same(static(x), static(x.clone()), exact=True)


def test_train_changes_nothing_and_says_so(module):
    assert not module.training, "an inference module starts in eval mode"
    x = torch.randn(4, *SHAPE)
    want = module(x)
    with pytest.warns(kiln.KilnWarning, match="inference only"):
        module.train()
    try:
        _assert_same(module(x), want, exact=True)
    finally:
        module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.eval()


@pytest.mark.parametrize("strict", [True, False])
def test_loading_weights_into_the_engine_is_a_kiln_error(module, model, strict):
    with pytest.raises(kiln.KilnError, match=r"cannot load weights \('conv.weight' ...\).*build again"):
        module.load_state_dict(model.state_dict(), strict=strict)
    parent = nn.Sequential(module)
    with pytest.raises(kiln.KilnError, match="cannot load weights"):
        parent.load_state_dict({"0." + k: v for k, v in model.state_dict().items()}, strict=strict)
    assert module.state_dict() == {} and parent.load_state_dict({}) is not None


def test_module_hooks_run(module):
    x = torch.randn(4, *SHAPE)
    seen = []
    handles = [module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape)),
               module.register_forward_hook(lambda m, args, out: (out[0] * 0, out[1]))]
    try:
        out = module(x)
    finally:
        for h in handles:
            h.remove()
    assert seen == [x.shape] and torch.equal(out[0], torch.zeros(4, 5))


# -- the dynamic-shape API -------------------------------------------------------------------


@pytest.fixture(scope="module")
def paddable():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU()).eval()
    return model, kiln.build(model, (torch.randn(4, 6),), device="cpu", dynamic_shapes=({0: BATCH},))


@pytest.mark.parametrize("call, error, message", [
    (lambda e: e.set_buckets(batch=[3, 100]), kiln.KilnError, r"set_buckets: bucket size\(s\) \[100\] .* 1\.\.8"),
    (lambda e: e.set_buckets(batch=[]), kiln.KilnError, "set_buckets: buckets for batch must be a non-empty list"),
    (lambda e: e.set_buckets(seq=[4]), kiln.KilnError, r"no dim\(s\) 'seq' \(its dims: batch\)"),
    (lambda e: e.warmup(batch=[2, 0]), kiln.InputError, r"warmup: batch = 0 is outside this engine's range 1\.\.8"),
    (lambda e: e.input_shapes_at(batch=9), kiln.InputError, "input_shapes_at: batch = 9 is outside"),
    (lambda e: e.input_shapes_at(batch=[1, 2]), kiln.KilnError, "one size per dim"),
])
def test_dynamic_api_misuse_is_a_kiln_error(paddable, call, error, message):
    _, engine = paddable
    with pytest.raises(error, match=message):
        call(engine)


def test_dynamic_api_takes_a_single_size_and_keeps_a_failed_set_buckets_out(paddable):
    model, engine = paddable
    assert engine.warmup(batch=5) == 1 and engine.input_shapes_at(batch=3) == [(3, 6)]
    engine.set_buckets(batch=[4, 8])
    try:
        with pytest.raises(kiln.KilnError):
            engine.set_buckets(batch=None, seq=[2])  # refused whole: the batch buckets stay
        assert engine.bucket_key((3,)) == (4,)
        x = torch.randn(3, 6)
        torch.testing.assert_close(engine(x), _eager(model, x))
    finally:
        engine.set_buckets(batch=None)
    static = kiln.build(model, (torch.randn(4, 6),), device="cpu")
    assert static.input_shapes_at() == [(4, 6)]
    with pytest.raises(kiln.KilnError, match="its dims: none: it has fixed shapes"):
        static.input_shapes_at(batch=2)


def test_a_bucketed_output_holds_only_its_own_rows(paddable):
    model, engine = paddable
    engine.set_buckets(batch=[8])
    try:
        x = torch.randn(3, 6)
        y = engine(x)
    finally:
        engine.set_buckets(batch=None)
    torch.testing.assert_close(y, _eager(model, x))
    assert y.is_contiguous() and y.untyped_storage().nbytes() == y.numel() * y.element_size()


# -- threads ---------------------------------------------------------------------------------


def test_threads_at_random_sizes_with_releases_saves_and_copies(model, dynamic, tmp_path):
    """Six threads call one dynamic engine at random batch sizes while contexts are released,
    the engine is saved, loaded and deep-copied: every answer is the single-thread answer."""
    inputs = {n: torch.randn(n, *SHAPE) for n in range(1, 9)}
    want = {n: dynamic(x) for n, x in inputs.items()}
    errors: list[str] = []

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            n = rng.randint(1, 8)
            out = dynamic(inputs[n])
            if not (torch.equal(out[0], want[n][0]) and out[1] == n):
                errors.append(f"thread {seed}: batch {n} differs")
            out[0].add_(1.0)  # the caller owns its outputs: no other call may see this
            if rng.random() < 0.15:
                dynamic.release_contexts()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for i in range(3):
        path = tmp_path / f"e{i}.kiln"
        dynamic.save(path)
        for other in (kiln.load(path), copy.deepcopy(dynamic)):
            _assert_same(other(inputs[5]), want[5], exact=True)
    for t in threads:
        t.join()
    assert errors == []
    _assert_same(dynamic(inputs[3]), _eager(model, inputs[3]))
