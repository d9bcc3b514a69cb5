"""The broad zoo (kiln.zoo.ZOO_TABLE) built into fp32 engines on CPU and compared with eager.

Each model is built at a small size where its family allows (a small image; few, narrow layers
through config overrides) so that the graph is the model's own but CI stays fast: these prove the
graph captures, builds and runs right, not how fast. Models the core zoo test already builds at
full size (tests/test_zoo_engines.py) are not built again.

Tolerance: relative error ≤ numerics.REL_TOL["fp32"] (1e-4) against eager fp32, or, for a model
whose own fp32 rounding error is that large (random-weight deep CNNs at a small image: ResNeXt-50
at 64x64 is 9e-5 off float64 eager, Inception-v3 at 75x75 2.2e-4), an engine at most FP32_FACTOR
times as far from float64 eager as eager fp32 is. (Folding batch norms into the convolutions
changes the rounding: Inception-v3 at 75x75 is 3.8e-4 off float64 with fold_batchnorm, 2.2e-4
without, though the pass folds in float64.) Integer outputs must be equal.
"""

import copy
import warnings

import pytest
import torch

import kiln
from kiln import zoo
from numerics import REL_TOL, assert_as_accurate_as_eager, assert_close, leaves, rel_error
from test_zoo_engines import CORE_ZOO

SMALL_IMAGE = (3, 64, 64)
SMALL_TEXT = (16,)
TINY_VOCAB = 1000

# name -> zoo.create arguments: the model's own architecture at a small size.
SMALL: dict[str, dict] = {
    "resnext50_32x4d": dict(input_shape=SMALL_IMAGE),
    "mobilenet_v3_large": dict(input_shape=SMALL_IMAGE),
    "regnet_y_400mf": dict(input_shape=SMALL_IMAGE),
    "convnext_tiny": dict(input_shape=SMALL_IMAGE),
    "inception_v3": dict(input_shape=(3, 75, 75)),  # its smallest input
    "swin_t": dict(input_shape=SMALL_IMAGE),  # windows padded: 16x16 patches, 7x7 windows
    "deit_small_patch16_224": dict(input_shape=SMALL_IMAGE, overrides=dict(img_size=64, depth=2)),
    "roberta-base": dict(
        input_shape=SMALL_TEXT,
        overrides=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                       vocab_size=TINY_VOCAB),
    ),
    "distilbert-base": dict(
        input_shape=SMALL_TEXT, overrides=dict(n_layers=2, dim=64, n_heads=2, hidden_dim=128, vocab_size=TINY_VOCAB)
    ),
    "minilm-l6": dict(input_shape=SMALL_TEXT, overrides=dict(num_hidden_layers=2, vocab_size=TINY_VOCAB)),
    "t5-base-encoder": dict(
        input_shape=SMALL_TEXT,
        overrides=dict(num_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=128, vocab_size=TINY_VOCAB),
    ),
    "gpt2": dict(
        input_shape=SMALL_TEXT, overrides=dict(n_layer=2, n_embd=64, n_head=2, vocab_size=TINY_VOCAB, n_positions=64)
    ),
    "llama-small": dict(
        input_shape=SMALL_TEXT,
        overrides=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=TINY_VOCAB),
    ),
    "wav2vec2-base": dict(
        input_shape=(4000,),
        overrides=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                       conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
    ),
    "whisper-base-encoder": dict(
        input_shape=(80, 200),
        overrides=dict(encoder_layers=2, d_model=64, encoder_attention_heads=2, encoder_ffn_dim=128),
    ),
}
DECODERS = ["gpt2", "llama-small"]


def small(name: str, **extra) -> zoo.ZooModel:
    args = SMALL[name]
    overrides = {**args.get("overrides", {}), **extra.pop("overrides", {})}
    return zoo.create(name, batch=2, input_shape=args["input_shape"], overrides=overrides, **extra)


def eager(zm: zoo.ZooModel, *inputs):
    with torch.no_grad():
        return zm.model(*(inputs or zm.example_inputs))


FP32_FACTOR = 2.0


def assert_fp32_close(got, expected, zm: zoo.ZooModel) -> None:
    """assert_close(fp32), or as accurate as eager fp32 against float64 eager (see the docstring)."""
    try:
        assert_close(got, expected, "fp32")
        return
    except AssertionError:
        pass
    with torch.no_grad():
        inputs = [x.double() if x.is_floating_point() else x for x in zm.example_inputs]
        exact = copy.deepcopy(zm.model).double()(*inputs)
    for i, (y, ref, y64) in enumerate(zip(leaves(got), leaves(expected), leaves(exact))):
        ours, eagers = rel_error(y, y64), rel_error(ref, y64)
        bound = max(REL_TOL["fp32"], FP32_FACTOR * eagers)
        assert ours <= bound, f"output {i}: engine error {ours:.2e} vs float64, eager fp32's {eagers:.2e}"


def test_every_table_model_is_covered_by_a_cpu_build_test():
    assert set(zoo.ZOO_TABLE) <= set(SMALL) | set(CORE_ZOO)


@pytest.mark.parametrize("name", list(SMALL))
def test_small_fp32_engine_matches_eager(name):
    zm = small(name)
    expected = eager(zm)
    engine = kiln.build(zm.model, zm.example_inputs, device="cpu")
    got = engine(*zm.example_inputs)
    assert type(got) is type(expected), "the engine returns the model's output type"
    assert_fp32_close(got, expected, zm)


def settle_batch_norms(model: torch.nn.Module, inputs) -> None:
    """Give a random-weight model's batch norms the statistics of one batch of random inputs, as
    training would: untrained running statistics (mean 0, variance 1) normalize nothing, and the
    activations of a deep random CNN then grow until fp16 rounding alone is 10-20% of the output
    (ResNeXt-50, RegNetY at 64x64), in eager PyTorch too."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches seen: here, one
    model.train()
    with torch.no_grad():
        model(*[torch.randn_like(x) if x.is_floating_point() else x for x in inputs])
    model.eval()


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SMALL))
def test_small_fp16_engine_on_gpu_as_accurate_as_eager_fp16(name):
    zm = small(name)
    model = zm.model.cuda()
    inputs = [x.cuda() for x in zm.example_inputs]
    settle_batch_norms(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
        half = [x.half() if x.is_floating_point() else x for x in inputs]
        eager_fp16 = copy.deepcopy(model).half()(*half)
    if not all(torch.isfinite(t).all() for t in leaves(eager_fp16)):
        pytest.skip(f"{name} with random weights overflows fp16 in eager PyTorch too: no reference to compare with")
    engine = kiln.build(model, inputs, precision="fp16", device="cuda")
    assert engine.build_info["precision"] == "fp16"
    assert_as_accurate_as_eager(engine(*inputs), expected, eager_fp16, "fp16")


# --- decoders (issue 12 item 5): a prefill pass as an engine ------------------------------------


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_with_default_use_cache_builds_and_gives_eager_logits(name, tmp_path):
    """With the config's default use_cache=True the model returns a transformers Cache; kiln
    builds it with use_cache=False (a KilnWarning) and the engine gives eager's logits, also after
    a save and load."""
    zm = small(name, overrides={"use_cache": True})
    expected = eager(zm)
    assert expected.past_key_values is not None, "eager returns the key/value cache"
    with pytest.warns(kiln.KilnWarning, match="use_cache=False"):
        engine = kiln.build(zm.model, zm.example_inputs, device="cpu")
    got = engine(*zm.example_inputs)
    assert type(got) is type(expected)
    assert getattr(got, "past_key_values", None) is None
    assert [k for k, v in got.items() if v is not None] == ["logits"]
    assert_close(got.logits, expected.logits, "fp32")
    engine.save(tmp_path / "decoder.kiln")
    loaded = kiln.load(tmp_path / "decoder.kiln")
    assert torch.equal(loaded(*zm.example_inputs).logits, got.logits)


@pytest.mark.parametrize("name", DECODERS)
def test_zoo_decoder_builds_without_a_warning(name):
    """The zoo builds decoders with use_cache=False (every peer does the same prefill work)."""
    zm = small(name)
    assert zm.model.config.use_cache is False and "use_cache=False" in zm.note
    with warnings.catch_warnings():
        warnings.simplefilter("error", kiln.KilnWarning)
        kiln.build(zm.model, zm.example_inputs, device="cpu")


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_engine_attention_is_causal(name):
    """A later token never changes an earlier position's logits; it does change its own."""
    zm = small(name)
    (ids,) = zm.example_inputs
    engine = kiln.build(zm.model, (ids,), device="cpu")
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % TINY_VOCAB
    before, after = engine(ids).logits, engine(changed).logits
    assert_close(engine(changed), eager(zm, changed), "fp32")
    torch.testing.assert_close(after[:, :-1], before[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(after[:, -1], before[:, -1])


def _attention_steps(engine) -> list[dict]:
    return [s for s in engine.plan["steps"] if "scaled_dot_product_attention" in s["op"]]


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_attention_runs_as_one_sdpa_per_layer(name):
    zm = small(name)
    engine = kiln.build(zm.model, zm.example_inputs, device="cpu")
    steps = _attention_steps(engine)
    assert len(steps) == zm.model.config.num_hidden_layers
    masks = [s["args"][3] if len(s["args"]) > 3 else s["kwargs"].get("attn_mask") for s in steps]
    causal = [s["kwargs"].get("is_causal", False) for s in steps]
    assert all(m is not None or c for m, c in zip(masks, causal)), "every attention is masked or causal"


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_causal_mask_becomes_is_causal(name):
    zm = small(name)
    engine = kiln.build(zm.model, zm.example_inputs, device="cpu")
    for step in _attention_steps(engine):
        assert step["kwargs"].get("is_causal") is True and len(step["args"]) == 3, step


@pytest.mark.slow
def test_gpt2_default_config_prefill_engine():
    """GPT-2 with its default config (12 layers, width 768, vocab 50257, tied embeddings) and its
    default use_cache, at a short prompt: builds on CPU and gives eager's logits."""
    zm = zoo.create("gpt2", input_shape=(8,), overrides={"use_cache": True})
    assert (zm.model.config.n_layer, zm.model.config.n_embd, zm.model.config.vocab_size) == (12, 768, 50257)
    expected = eager(zm)
    with pytest.warns(kiln.KilnWarning, match="use_cache=False"):
        engine = kiln.build(zm.model, zm.example_inputs, device="cpu")
    assert_close(engine(*zm.example_inputs).logits, expected.logits, "fp32")
    assert [t.shape for t in leaves(engine(*zm.example_inputs))] == [(1, 8, 50257)]
