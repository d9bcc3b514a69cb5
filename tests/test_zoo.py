import textwrap
from pathlib import Path

import pytest
import torch

from kiln import zoo

REQUIRED_NAMES = [
    "alexnet",
    "squeezenet1_0",
    "squeezenet1_1",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    "mobilenet_v2",
    "vit_b_16",
    "efficientnet_b0",
    "bert-base",
    "bert-tiny",
    *zoo.ZOO_TABLE,
]
IMAGE_NAMES = [n for n in zoo.names() if n not in zoo.HF_MODELS]
# torchvision's RegNet computes its block widths with tensor ops: it cannot be made on meta.
NOT_ON_META = {"regnet_y_400mf"}


def run(zm: zoo.ZooModel):
    with torch.no_grad():
        return zm.model(*zm.example_inputs)


def create_on_meta(name: str, **kwargs) -> tuple[zoo.ZooModel, torch.Tensor]:
    """Build without allocating weights and run on meta tensors: checks shapes only."""
    with torch.device("meta"):
        zm = zoo.create(name, **kwargs)
    return zm, zm.model(*(x.to("meta") for x in zm.example_inputs))


def test_names_sorted_and_complete():
    names = zoo.names()
    assert names == sorted(names)
    assert set(REQUIRED_NAMES) <= set(names)


@pytest.mark.parametrize(
    "name, family",
    [
        ("resnet18", "torchvision"),
        ("squeezenet1_1", "torchvision"),
        ("mobilenet_v2", "torchvision"),
        ("efficientnet_b0", "timm"),
    ],
)
def test_create_small_classifiers(name, family):
    zm = zoo.create(name)
    assert (zm.name, zm.family, zm.task) == (name, family, "classification")
    assert not zm.model.training
    assert zm.pretrained is False
    assert "random weights" in zm.note
    (x,) = zm.example_inputs
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert all(p.dtype == torch.float32 for p in zm.model.parameters())
    assert run(zm).shape == (1, 1000)


@pytest.mark.parametrize("name", [n for n in IMAGE_NAMES if n not in NOT_ON_META])
def test_every_image_model_builds_with_default_shape(name):
    zm, out = create_on_meta(name, batch=2)
    size = 299 if name == "inception_v3" else 224
    assert zm.example_inputs[0].shape == (2, 3, size, size)
    assert out.shape == (2, 1000)


# Per-sample input shape and output shapes at the default config (batch 2), on meta.
TRANSFORMERS_DEFAULTS = {
    "bert-base": ((128,), {"last_hidden_state": (2, 128, 768), "pooler_output": (2, 768)}),
    "minilm-l6": ((128,), {"last_hidden_state": (2, 128, 384), "pooler_output": (2, 384)}),
    "roberta-base": ((128,), {"last_hidden_state": (2, 128, 768), "pooler_output": (2, 768)}),
    "distilbert-base": ((128,), {"last_hidden_state": (2, 128, 768)}),
    "t5-base-encoder": ((128,), {"last_hidden_state": (2, 128, 768)}),
    "wav2vec2-base": ((16000,), {"last_hidden_state": (2, 49, 768), "extract_features": (2, 49, 512)}),
    "whisper-base-encoder": ((80, 3000), {"last_hidden_state": (2, 1500, 512)}),
}


@pytest.mark.parametrize("name", list(TRANSFORMERS_DEFAULTS))
def test_transformers_models_default_shapes(name):
    shape, outputs = TRANSFORMERS_DEFAULTS[name]
    zm, out = create_on_meta(name, batch=2)
    assert zm.family == "transformers" and zm.pretrained is False
    assert [tuple(x.shape) for x in zm.example_inputs] == [(2, *shape)]
    assert {k: tuple(v.shape) for k, v in out.items() if v is not None} == outputs


def test_zoo_table_spans_the_families():
    table = zoo.ZOO_TABLE
    assert len(table) >= 20 and len(set(table)) == len(table)
    assert set(table) <= set(zoo.names())
    tasks = {zoo.HF_MODELS[n].task for n in table if n in zoo.HF_MODELS}
    assert tasks == {"encoder", "decoder", "audio"}
    assert sum(n not in zoo.HF_MODELS for n in table) >= 10  # CNNs and vision transformers


def test_architectures_follow_their_named_configs():
    t5 = zoo.HF_MODELS["t5-base-encoder"]
    assert (t5.fields["d_model"], t5.fields["num_layers"], t5.fields["num_heads"]) == (768, 12, 12)
    with torch.device("meta"):
        gpt2 = zoo.create("gpt2").model.config
        llama = zoo.create("llama-small").model.config
        whisper = zoo.create("whisper-base-encoder").model.config
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.vocab_size, gpt2.n_positions) == (12, 768, 12, 50257, 1024)
    assert llama.num_key_value_heads < llama.num_attention_heads  # grouped-query attention
    assert (whisper.d_model, whisper.encoder_layers) == (512, 6)


@pytest.mark.parametrize("name", ["gpt2", "llama-small"])
def test_decoders_are_a_prefill_pass_without_cache(name):
    with torch.device("meta"):
        zm = zoo.create(name, batch=2)
    assert zm.task == "decoder" and zm.model.config.use_cache is False
    assert "use_cache=False" in zm.note and "random weights" in zm.note
    assert zm.example_inputs[0].shape == (2, 128)
    with torch.device("meta"):
        assert zoo.create(name, overrides={"use_cache": True}).model.config.use_cache is True


def test_overrides_change_the_architecture():
    zm = zoo.create("t5-base-encoder", batch=2, input_shape=(8,),
                    overrides=dict(num_layers=1, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=100))
    assert len(zm.model.encoder.block) == 1
    assert zm.example_inputs[0].max() < 100
    assert run(zm).last_hidden_state.shape == (2, 8, 32)
    tm, out = create_on_meta("deit_small_patch16_224", overrides=dict(img_size=64, depth=1))
    assert tm.example_inputs[0].shape == (1, 3, 64, 64) and len(tm.model.blocks) == 1 and out.shape == (1, 1000)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("gpt2", {"n_layers": 2}, r"GPT2Config has no field 'n_layers'; close matches: n_layer"),
        ("resnet18", {"widht": 3}, r"torchvision's resnet18 does not take these overrides"),
        ("efficientnet_b0", {"dpeth": 3}, r"timm's efficientnet_b0 does not take these overrides"),
    ],
)
def test_unknown_overrides_are_errors(name, overrides, message):
    with pytest.raises(zoo.ZooError, match=message):
        create_on_meta(name, overrides=overrides)


def test_regnet_default_shape_on_cpu():
    zm = zoo.create("regnet_y_400mf", batch=2)
    assert zm.example_inputs[0].shape == (2, 3, 224, 224)
    assert zm.model.to("meta")(zm.example_inputs[0].to("meta")).shape == (2, 1000)


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("wav2vec2-base", (399,), r"\(samples,\) with samples >= 400"),
        ("wav2vec2-base", (1, 400), r"\(samples,\)"),
        ("whisper-base-encoder", (80, 301), r"\(mel_bins, frames\) with an even number of frames"),
        ("gpt2", (1025,), r"\(seq,\) with 1 <= seq <= 1024"),
        ("roberta-base", (513,), r"\(seq,\) with 1 <= seq <= 512"),
    ],
)
def test_audio_and_text_input_shape_errors(name, shape, message):
    with pytest.raises(zoo.ZooError, match=message):
        create_on_meta(name, input_shape=shape)


def test_audio_input_shapes_set_the_inputs():
    zm, out = create_on_meta("whisper-base-encoder", input_shape=(80, 200))
    assert zm.example_inputs[0].shape == (1, 80, 200) and zm.model.config.max_source_positions == 100
    assert out.last_hidden_state.shape == (1, 100, 512)
    zm, out = create_on_meta("wav2vec2-base", input_shape=(400,))
    assert out.last_hidden_state.shape == (1, 1, 768)


def test_too_small_image_is_a_zoo_error():
    with pytest.raises(zoo.ZooError, match=r"inception_v3 cannot run on example inputs of shape \(1, 3, 64, 64\)"):
        zoo.create("inception_v3", input_shape=(3, 64, 64))


def test_batch_and_input_shape_override():
    zm = zoo.create("resnet18", batch=2, input_shape=(3, 160, 160))
    assert zm.example_inputs[0].shape == (2, 3, 160, 160)
    assert run(zm).shape == (2, 1000)


def test_seed_makes_weights_and_inputs_deterministic():
    a, b, c = (zoo.create("squeezenet1_1", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.example_inputs[0], b.example_inputs[0])
    assert torch.equal(a.model.features[0].weight, b.model.features[0].weight)
    assert not torch.equal(a.example_inputs[0], c.example_inputs[0])
    assert not torch.equal(a.model.features[0].weight, c.model.features[0].weight)


def test_vit_needs_its_image_size():
    with pytest.raises(zoo.ZooError, match=r"vit_b_16 needs input_shape \(3, 224, 224\)"):
        create_on_meta("vit_b_16", input_shape=(3, 160, 160))


def test_image_input_shape_must_be_chw():
    with pytest.raises(zoo.ZooError, match=r"\(C, H, W\)"):
        create_on_meta("resnet18", input_shape=(224, 224))


def test_batch_must_be_positive():
    with pytest.raises(zoo.ZooError, match="batch"):
        zoo.create("resnet18", batch=0)


def test_other_torchvision_and_timm_names():
    tv, out = create_on_meta("torchvision/efficientnet_b0")
    assert tv.family == "torchvision" and out.shape == (1, 1000)
    inception, out = create_on_meta("torchvision/inception_v3")
    assert inception.example_inputs[0].shape == (1, 3, 299, 299) and out.shape == (1, 1000)
    assert inception.model.AuxLogits is None, "the training-only auxiliary classifier is left out"
    tm = zoo.create("timm/resnet18", input_shape=(3, 64, 64))
    assert (tm.family, tm.task) == ("timm", "classification")
    assert run(tm).shape == (1, 1000)


def test_unknown_names_list_close_matches():
    with pytest.raises(zoo.ZooError, match="unknown zoo model 'resnet5'.*resnet50"):
        zoo.create("resnet5")
    with pytest.raises(zoo.ZooError, match="unknown timm model.*timm/efficientnet_b0"):
        zoo.create("timm/efficientnet_b00")


def test_bert_tiny_inputs_and_outputs():
    zm = zoo.create("bert-tiny", batch=2, input_shape=(16,))
    assert (zm.family, zm.task, zm.pretrained) == ("transformers", "encoder", False)
    assert not zm.model.training
    (input_ids,) = zm.example_inputs
    vocab = zm.model.config.vocab_size
    assert input_ids.shape == (2, 16) and input_ids.dtype == torch.int64
    assert 0 <= input_ids.min() and input_ids.max() < vocab
    out = run(zm)
    assert out.last_hidden_state.shape == (2, 16, 128)
    assert out.pooler_output.shape == (2, 128)


def test_bert_base_config_and_default_sequence_length():
    zm = zoo.create("bert-base")
    config = zm.model.config
    assert (config.num_hidden_layers, config.hidden_size) == (12, 768)
    assert config._attn_implementation in ("sdpa", "eager")
    assert zm.example_inputs[0].shape == (1, 128)


@pytest.mark.parametrize("shape", [(3, 224, 224), (0,), (513,)])
def test_bert_rejects_bad_input_shape(shape):
    with pytest.raises(zoo.ZooError, match=r"input_shape must be \(seq,\)"):
        zoo.create("bert-tiny", input_shape=shape)


def test_bert_tiny_exports_and_matches_eager():
    zm = zoo.create("bert-tiny", batch=2, input_shape=(16,))
    (input_ids,) = zm.example_inputs
    mask = torch.ones_like(input_ids)
    program = torch.export.export(zm.model, (input_ids, mask), strict=False)
    exported = program.run_decompositions().module()
    padded = mask.clone()
    padded[0, 10:] = 0
    for inputs in [(input_ids, mask), (input_ids, padded)]:
        with torch.no_grad():
            want = zm.model(*inputs)
            got = exported(*inputs)
        for key in ("last_hidden_state", "pooler_output"):
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)


def test_imagenet_categories():
    categories = zoo.imagenet_categories()
    assert len(categories) == 1000
    assert categories[0] == "tench"


# --- factory files ----------------------------------------------------------------------

FACTORIES = textwrap.dedent(
    """
    import torch

    def module_only():
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))

    def with_inputs():
        return torch.nn.Linear(4, 3), (torch.ones(5, 4),)

    def with_tensor():
        return torch.nn.Linear(4, 3), torch.ones(5, 4)

    def wrong_type():
        return 42

    def bad_inputs():
        return torch.nn.Linear(4, 3), [1, 2]

    NOT_A_FUNCTION = 3
    """
)


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


def test_factory_module_only_uses_input_shape(factory_file):
    zm = zoo.load_factory(f"{factory_file}:module_only", batch=2, input_shape=(4,))
    assert (zm.family, zm.task, zm.pretrained) == ("file", "other", False)
    assert not zm.model.training
    assert zm.example_inputs[0].shape == (2, 4)
    assert run(zm).shape == (2, 3)


def test_factory_is_seeded(factory_file):
    a, b = (zoo.load_factory(f"{factory_file}:module_only", input_shape=(4,)) for _ in "ab")
    assert torch.equal(a.model[0].weight, b.model[0].weight)
    assert torch.equal(a.example_inputs[0], b.example_inputs[0])


@pytest.mark.parametrize("fn", ["with_inputs", "with_tensor"])
def test_factory_with_inputs(factory_file, fn):
    zm = zoo.load_factory(f"{factory_file}:{fn}")
    assert len(zm.example_inputs) == 1
    assert torch.equal(zm.example_inputs[0], torch.ones(5, 4))
    assert run(zm).shape == (5, 3)


def test_resolve_accepts_names_and_files(factory_file):
    assert zoo.resolve(f"{factory_file}:with_inputs").family == "file"
    assert zoo.resolve("squeezenet1_1", input_shape=(3, 64, 64)).family == "torchvision"


@pytest.mark.parametrize(
    "fn, kwargs, message",
    [
        ("module_only", {}, "returned a module without example inputs: pass input_shape"),
        ("with_inputs", {"batch": 2}, "returned its own example inputs"),
        ("with_inputs", {"input_shape": (4,)}, "returned its own example inputs"),
        ("wrong_type", {}, "returned int; expected an nn.Module or a"),
        ("bad_inputs", {}, "example_inputs of type list"),
        ("missing", {}, "no function 'missing' in"),
        ("module_onyl", {}, "close matches: module_only"),
        ("NOT_A_FUNCTION", {}, "NOT_A_FUNCTION.* is not callable \\(int\\)"),
    ],
)
def test_factory_errors(factory_file, fn, kwargs, message):
    with pytest.raises(zoo.ZooError, match=message):
        zoo.load_factory(f"{factory_file}:{fn}", **kwargs)


def test_factory_spec_errors(tmp_path):
    with pytest.raises(zoo.ZooError, match="factory file not found: .*nowhere.py"):
        zoo.load_factory(f"{tmp_path / 'nowhere.py'}:make")
    with pytest.raises(zoo.ZooError, match="must be 'path/to/file.py:function'"):
        zoo.resolve(str(tmp_path / "model.py"))
