"""kiln.build with the inputs users pass and the outputs models return, on the CPU:
keyword inputs named after forward's parameters; outputs as the model's own types and dtypes;
the caller's model left as it was."""

import collections
import warnings

import pytest
import torch
from torch import nn

import kiln
from kiln import specs

Heads = collections.namedtuple("Heads", ["logits", "features"])


class Keyworded(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask=None, *, scale=1.0, bias=None):
        y = self.lin(x) * scale
        if mask is not None:
            y = y * mask
        return y + bias if bias is not None else y


def test_keyword_inputs_are_named_after_forward_parameters():
    model = Keyworded().eval()
    x, mask, bias = torch.randn(3, 4), torch.rand(3, 4), torch.randn(4)
    # given out of order: the engine orders them as forward declares them
    engine = kiln.build(model, (x,), kwargs={"bias": bias, "scale": 2.0, "mask": mask}, device="cpu")
    assert [s.name for s in engine.inputs] == ["x", "mask", "bias"]
    assert engine.build_info["constant_inputs"] == {"scale": 2.0}
    with torch.no_grad():
        torch.testing.assert_close(engine(x, mask, bias), model(x, mask=mask, bias=bias, scale=2.0))


def test_example_inputs_as_a_dict_by_parameter_name():
    model = Keyworded().eval()
    x, bias = torch.randn(3, 4), torch.randn(4)
    engine = kiln.build(model, {"bias": bias, "x": x}, device="cpu")
    assert [s.name for s in engine.inputs] == ["x", "bias"]
    with torch.no_grad():
        torch.testing.assert_close(engine(x, bias), model(x, bias=bias))


def test_positional_inputs_are_named_after_forward_parameters_too():
    model = Keyworded().eval()
    x, mask = torch.randn(3, 4), torch.rand(3, 4)
    engine = kiln.build(model, (x, mask), device="cpu")
    assert [s.name for s in engine.inputs] == ["x", "mask"]


def test_compile_takes_keyword_inputs():
    model = Keyworded().eval()
    x, bias = torch.randn(3, 4), torch.randn(4)
    compiled = kiln.compile(model, (x,), kwargs={"bias": bias}, device="cpu")
    assert [s.name for s in compiled.engine.inputs] == ["x", "bias"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, bias), model(x, bias=bias))


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((torch.randn(3, 4),), {"y": torch.randn(3, 4)}, r"do not fit Keyworded.forward\(x, mask, scale, bias\).*'y'"),
        ((), {"mask": torch.randn(3, 4)}, "missing a required argument: 'x'"),
        ((torch.randn(3, 4),), {"x": torch.randn(3, 4)}, "multiple values for argument 'x'"),
        ((torch.randn(3, 4),), {"bias": [torch.randn(4)]}, "keyword input 'bias' is a list"),
        ((), {"x": None}, "no tensor"),
        (None, None, "got a NoneType"),
        ((), None, "got an empty tuple"),
    ],
)
def test_keyword_inputs_that_do_not_fit_are_named(args, kwargs, message):
    with pytest.raises(kiln.CaptureError, match=message):
        kiln.build(Keyworded().eval(), args, kwargs=kwargs, device="cpu")


def _tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=32)
    return BertModel(config).eval()


def test_hugging_face_model_with_keyword_inputs_returns_its_model_output(tmp_path):
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions as Output

    model = _tiny_bert()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    engine = kiln.build(model, {"input_ids": ids, "attention_mask": mask}, device="cpu")
    assert [s.name for s in engine.inputs] == ["input_ids", "attention_mask"]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    for loaded in (engine, _reload(engine, tmp_path)):
        out = loaded(ids, mask)
        assert type(out) is Output
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["pooler_output"], ref.pooler_output, atol=1e-5, rtol=1e-5)
        assert list(out.keys()) == list(ref.keys())


def _reload(engine, tmp_path):
    path = tmp_path / "model.kiln"
    engine.save(path)
    return kiln.load(path)


class ReturnsNamedTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return Heads(logits=h, features=[h.relu(), x])


def test_namedtuple_output_is_that_namedtuple(tmp_path):
    model, x = ReturnsNamedTuple().eval(), torch.randn(2, 4)
    engine = kiln.build(model, (x,), device="cpu")
    out = engine(x)
    assert type(out) is Heads and isinstance(out.features, list)
    torch.testing.assert_close(out.logits, model(x).logits.detach())
    # loaded where the class is unknown: a namedtuple of the same name and fields
    path = tmp_path / "nt.kiln"
    engine.save(path)
    saved = dict(specs._SEEN_NAMEDTUPLES)
    specs._SEEN_NAMEDTUPLES.clear()
    try:
        out = kiln.load(path)(x)
    finally:
        specs._SEEN_NAMEDTUPLES.update(saved)
    assert type(out) is not Heads and type(out).__name__ == "Heads" and out._fields == Heads._fields
    torch.testing.assert_close(out.logits, model(x).logits.detach())


class MixedDtypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return h.half(), h, h.argmax(-1), h.to(torch.bfloat16)


def test_each_output_keeps_the_dtype_the_model_gives():
    model, x = MixedDtypes().eval(), torch.randn(2, 4)
    out = kiln.build(model, (x,), device="cpu")(x)
    assert [t.dtype for t in out] == [torch.float16, torch.float32, torch.int64, torch.bfloat16]
    with torch.no_grad():
        for got, want in zip(out, model(x)):
            torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_only_kilns_own_precision_lowering_is_cast_back():
    # a float64 model built in float32 (the CPU's build precision): float64 outputs come back
    # float64, while an output the model itself gives in float32 or float16 stays so
    model = MixedDtypes().double().eval()
    x = torch.randn(2, 4, dtype=torch.float64)
    engine = kiln.build(model, (x,), device="cpu")
    assert engine.graph_inputs[0].dtype == torch.float32, "the engine computes in float32"
    out = engine(x)
    assert [t.dtype for t in out] == [torch.float16, torch.float64, torch.int64, torch.bfloat16]
    assert model.lin.weight.dtype == torch.float64, "the caller's model is not cast"


@pytest.mark.gpu
def test_gpu_fp32_model_at_fp16_gets_fp32_back_and_fp16_outputs_stay_fp16():
    model, x = MixedDtypes().eval(), torch.randn(2, 4)
    engine = kiln.build(model, (x,), precision="fp16", device="cuda")
    out = engine(x.cuda())
    assert [t.dtype for t in out] == [torch.float16, torch.float32, torch.int64, torch.bfloat16]
    assert next(model.parameters()).device.type == "cpu" and model.lin.weight.dtype == torch.float32


# -- the caller's model --------------------------------------------------------------------------

class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.drop(self.lin(x)))


def test_train_mode_model_is_built_with_eval_semantics_and_a_warning():
    model = WithDropout()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    model.train()
    model.lin.eval()  # a mixed state must come back exactly as it was
    modes = {name: m.training for name, m in model.named_modules()}
    x = torch.randn(4, 8)
    with pytest.warns(kiln.KilnWarning, match="train mode.*eval semantics.*dropout") as record:
        engine = kiln.build(model, (x,), device="cpu")
    assert any(r.filename == __file__ for r in record), "the warning points at the caller's line"
    assert {name: m.training for name, m in model.named_modules()} == modes
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(engine(x), expected, atol=1e-5, rtol=1e-5)


def test_eval_model_stays_in_eval_without_a_warning():
    model = WithDropout().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kiln.KilnWarning)
        kiln.build(model, (torch.randn(4, 8),), device="cpu")
    assert not any(m.training for m in model.modules())


def test_model_weights_device_and_dtype_are_untouched():
    model = WithDropout().eval()
    before = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    kiln.build(model, (torch.randn(4, 8),), device="cpu")
    after = model.state_dict(keep_vars=True)
    for key, (tensor, value) in before.items():
        assert after[key] is tensor and torch.equal(after[key], value) and after[key].dtype == value.dtype
    assert "forward" not in vars(model) and all("forward" not in vars(m) for m in model.modules())


def test_mode_is_restored_when_the_build_fails():
    class Fails(WithDropout):
        def forward(self, x):
            return x[x > 0]

    model = Fails().train()
    with pytest.raises(kiln.CaptureError):
        kiln.build(model, (torch.randn(4, 8),), device="cpu")
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize(
    "thing, message",
    [
        (lambda x: x * 2, "got a function.*nn.Module whose forward calls it"),
        ("resnet18", "got a str"),
        (None, "got a NoneType"),
    ],
)
def test_a_non_module_is_a_kiln_error_naming_its_type(thing, message):
    for entry in (kiln.build, kiln.compile):
        with pytest.raises(kiln.KilnError, match=message):
            entry(thing, (torch.randn(2),))


def test_an_exported_program_is_refused_with_advice():
    program = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(kiln.KilnError, match="ExportedProgram.*pass the nn.Module you exported"):
        kiln.build(program, (torch.randn(1, 2),))


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def test_gpt2_with_its_default_cache_builds_without_it_and_says_so():
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    model, ids = _tiny_gpt2(), torch.randint(0, 100, (2, 8))
    assert model.config.use_cache, "the default config returns a DynamicCache"
    with pytest.warns(kiln.KilnWarning, match="returns a DynamicCache.*use_cache=False"):
        engine = kiln.build(model, (ids,), device="cpu")
    assert engine.build_info["constant_inputs"] == {"use_cache": False}
    out = engine(ids)
    assert type(out) is CausalLMOutputWithCrossAttentions and list(out.keys()) == ["logits"]
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def test_a_cache_asked_for_explicitly_is_a_capture_error():
    model, ids = _tiny_gpt2(), torch.randint(0, 100, (2, 8))
    message = r"(?s)could not capture GPT2LMHeadModel: it returns a transformers.cache_utils.DynamicCache.*use_cache"
    with pytest.raises(kiln.CaptureError, match=message):
        kiln.build(model, (ids,), kwargs={"use_cache": True}, device="cpu")
