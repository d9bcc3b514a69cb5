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
