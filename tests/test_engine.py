"""kiln.build / Engine / kiln.compile on small models, against eager, on the CPU."""

import pytest
import torch
from torch import nn

import kiln
from numerics import assert_close


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        a = self.lin(x)
        return {"sum": a + y, "parts": (a, [y * 2, x.shape[0] * y])}


@pytest.fixture
def small():
    model = Small().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 3, 16, 16)


def test_engine_matches_eager(small):
    model, x = small
    engine = kiln.build(model, (x,))
    assert_close(engine(x), model(x))
    other = torch.randn_like(x)
    assert_close(engine(other), model(other))


def test_outputs_keep_the_models_structure():
    model = Structured().eval()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    out = kiln.build(model, (x, y))(x, y)
    ref = model(x, y)
    assert set(out) == {"sum", "parts"}
    assert isinstance(out["parts"], tuple) and isinstance(out["parts"][1], list)
    assert_close(out, ref)


def test_outputs_are_fresh_tensors(small):
    model, x = small
    engine = kiln.build(model, (x,))
    first = engine(x)
    kept = first.clone()
    engine(torch.randn_like(x))
    assert torch.equal(first, kept), "a later call overwrote an earlier result"


def test_save_load_gives_identical_outputs(small, tmp_path):
    model, x = small
    engine = kiln.build(model, (x,))
    path = tmp_path / "small.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    assert torch.equal(loaded(x), engine(x))
    assert loaded.build_info["precision"] == "fp32"
    assert [s.shape for s in loaded.inputs] == [(2, 3, 16, 16)]


def test_compile_is_a_drop_in_module(small):
    model, x = small
    compiled = kiln.compile(model, (x,))
    assert isinstance(compiled, nn.Module)
    assert_close(compiled(x), model(x))
    assert "Engine" in repr(compiled)


def test_summary_names_inputs_outputs_and_precision(small):
    model, x = small
    text = kiln.build(model, (x,)).summary()
    assert "(2, 3, 16, 16) float32" in text and "(2, 4) float32" in text and "fp32" in text


def test_fp16_on_cpu_falls_back_to_fp32_and_says_so(small):
    model, x = small
    with pytest.warns(kiln.KilnWarning, match="fp32"):
        engine = kiln.build(model, (x,), precision="fp16", device="cpu")
    assert engine.build_info["precision"] == "fp32"
    assert engine.build_info["precision_requested"] == "fp16"


def test_unknown_precision_is_refused(small):
    model, x = small
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        kiln.build(model, (x,), precision="int3")


def test_integer_inputs_and_buffers():
    emb = nn.Embedding(10, 6).eval()
    ids = torch.randint(0, 10, (2, 5))
    engine = kiln.build(emb, (ids,))
    assert_close(engine(ids), emb(ids))
    assert engine.build_info["input_ranges"][0] == [int(ids.min()), int(ids.max())]


# -- errors at run time ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "inputs, message",
    [
        (lambda x: (), "takes 1 input"),
        (lambda x: (x, x), "takes 1 input"),
        (lambda x: (x[0],), "rank 3"),
        (lambda x: (torch.randn(4, 3, 16, 16),), r"shape \(4, 3, 16, 16\).*built for \(2, 3, 16, 16\)"),
        (lambda x: (x.double(),), "dtype torch.float64.*expects torch.float32"),
        (lambda x: (x.numpy(),), "must be a tensor"),
    ],
)
def test_bad_inputs_are_named(small, inputs, message):
    model, x = small
    engine = kiln.build(model, (x,))
    with pytest.raises(kiln.InputError, match=message) as info:
        engine(*inputs(x))
    if "rank" in message or "shape" in message or "dtype" in message:
        assert "'x'" in str(info.value)


def test_non_tensor_example_input_is_refused(small):
    model, _ = small
    with pytest.raises(kiln.CaptureError, match="example input 0 is a int"):
        kiln.build(model, (3,))


def test_model_that_cannot_be_exported_says_so():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(kiln.CaptureError, match="torch.export could not capture DataDependent"):
        kiln.build(DataDependent(), (torch.randn(3),))


def test_buffer_mutation_is_refused():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self, x):
            self.n.add_(1)
            return x + self.n

    with pytest.raises(kiln.CaptureError, match="mutates"):
        kiln.build(Counter(), (torch.randn(3),))


# -- inputs users pass ----------------------------------------------------------------------

@pytest.fixture
def structured():
    model = Structured().eval()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    return model, kiln.build(model, (x, y)), x, y


def test_keyword_inputs_bind_like_the_models_forward(structured):
    model, engine, x, y = structured
    assert engine.input_names == ["x", "y"]
    expected = engine(x, y)
    for out in (engine(x, y=y), engine(y=y, x=x), engine(x=x, y=y)):
        assert torch.equal(out["sum"], expected["sum"])
    assert_close(engine(y=y, x=x), model(x, y))
    module = kiln.compile(model, (x, y))
    assert_close(module(x, y=y), model(x, y))
    assert_close(module(y=y, x=x), model(x, y))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e, x, y: e(x), r"takes 2 input\(s\) \(x, y\), got 1 \(missing 'y'\)"),
        (lambda e, x, y: e(x=x), r"missing input\(s\) 'y'; the engine's inputs are \(x, y\)"),
        (lambda e, x, y: e(x, z=y), r"unexpected keyword input\(s\) 'z'; the engine's inputs are \(x, y\)"),
        (lambda e, x, y: e(x, y, x=x), r"given both by position and by keyword"),
        (lambda e, x, y: e(x, y, x, y=y), r"takes 2 input\(s\) \(x, y\), got 3 positional and 1 keyword"),
        (lambda e, x, y: e(x, x=y), r"'x' is given both by position and by keyword"),
    ],
)
def test_keyword_input_errors_name_the_inputs(structured, call, message):
    _, engine, x, y = structured
    with pytest.raises(kiln.InputError, match=message):
        call(engine, x, y)


def test_transformers_model_takes_input_ids_and_attention_mask_by_name():
    pytest.importorskip("transformers")
    from kiln import zoo

    entry = zoo.create("bert-tiny", batch=2, input_shape=(8,))
    ids = entry.example_inputs[0]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    model = entry.model.eval()
    engine = kiln.build(model, (ids, mask))
    assert engine.input_names[:2] == ["input_ids", "attention_mask"]
    out = engine(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    assert_close(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.last_hidden_state, engine(ids, mask).last_hidden_state)
    with pytest.raises(kiln.InputError, match="missing input.*'attention_mask'"):
        engine(input_ids=ids)


@pytest.mark.parametrize("make", [lambda x: x.clone().requires_grad_(), lambda x: nn.Parameter(x.clone())])
def test_inputs_that_require_grad_run_and_outputs_are_detached(small, make):
    model, x = small
    engine = kiln.build(model, (x,))
    leaf = make(x)
    with torch.enable_grad():
        out = engine(leaf)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, engine(x))
    assert leaf.grad is None and leaf.requires_grad  # the caller's tensor is left as it was
    assert not kiln.compile(model, (x,))(leaf).requires_grad


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x: x.to_sparse(), r"input 0 \('x'\) is a sparse tensor \(layout torch.sparse_coo\).*to_dense\(\)"),
        (lambda x: x.reshape(6, -1).to_sparse_csr(), r"sparse tensor \(layout torch.sparse_csr\)"),
        (lambda x: torch.empty_like(x, device="meta"), r"is a meta tensor \(a shape without data\)"),
        (lambda x: torch.quantize_per_tensor(x, 0.1, 0, torch.quint8),
         r"is a quantized tensor \(torch.quint8\).*dequantize\(\)"),
        (lambda x: x.tolist(), "must be a tensor, got list"),
        (lambda x: None, "must be a tensor, got NoneType"),
    ],
)
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_unusable_tensors_are_input_errors(small, make, message):
    model, x = small
    engine = kiln.build(model, (x,))
    with pytest.raises(kiln.InputError, match=message):
        engine(make(x))


# -- outputs --------------------------------------------------------------------------------

def test_outputs_keep_the_dtype_the_graph_produced():
    class Mixed(nn.Module):
        def forward(self, x, ids):
            return (x * 2).half(), x.sum(dim=1), ids + 1, (ids > 2)

    x, ids = torch.randn(3, 4), torch.randint(0, 5, (3,))
    engine = kiln.build(Mixed().eval(), (x, ids))
    out = engine(x, ids)
    ref = Mixed()(x, ids)
    assert [o.dtype for o in out] == [r.dtype for r in ref] == [torch.float16, torch.float32, torch.int64, torch.bool]
    for o, r in zip(out, ref):
        assert torch.equal(o, r)


def test_outputs_never_alias_inputs_weights_or_engine_memory():
    class PassThrough(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(4.0))

        def forward(self, x):
            return x, self.table, x.view(2, 2) * 1

    x = torch.randn(4)
    engine = kiln.build(PassThrough().eval(), (x,))
    a, table, b = engine(x)
    ptrs = {t.untyped_storage().data_ptr() for t in (a, table, b)}
    assert len(ptrs) == 3 and x.untyped_storage().data_ptr() not in ptrs
    assert all(w.untyped_storage().data_ptr() not in ptrs for w in engine.weights.values())
    a.add_(1), table.add_(1)
    assert torch.equal(engine(x)[0], x) and torch.equal(engine(x)[1], torch.arange(4.0))
