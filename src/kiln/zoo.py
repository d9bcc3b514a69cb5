"""Model names → models with example inputs, for the CLI, tests and benchmarks.

Every model is built on CPU in float32 and eval() mode. No weights are downloaded:
models are built with seeded random weights, so ``pretrained`` is False throughout.

A name is one of: a registered zoo name (see ``names()``), ``torchvision/<name>`` or a bare
torchvision classification name, ``timm/<name>``, or ``path/to/file.py:factory``.

``ZOO_TABLE`` is the broad benchmark set (``kiln bench --zoo``, docs/zoo_table.md): at least one
model per architecture family: CNNs, vision transformers, text encoders, decoders (a prefill
pass) and audio encoders. Hugging Face models are built from their configs (the named
checkpoint's architecture, random weights), never downloaded.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "ZOO_TABLE",
    "ZooError",
    "ZooModel",
    "create",
    "imagenet_categories",
    "load_factory",
    "names",
    "resolve",
]

RANDOM_WEIGHTS_NOTE = (
    "no offline weights: built with random weights (batch-norm statistics calibrated on random "
    "inputs); predictions are meaningless"
)
IMAGE_SHAPE = (3, 224, 224)
BERT_SEQ_LEN = 128
SEQ_LEN = BERT_SEQ_LEN  # default sequence length of every text model
DECODER_NOTE = (
    "a prefill pass: logits for every position of the prompt, built with use_cache=False (no "
    "key/value cache returned, so every peer does the same work)"
)


class ZooError(ValueError):
    """A model name or factory spec that cannot be turned into a model."""


@dataclass
class ZooModel:
    name: str
    model: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    pretrained: bool
    note: str
    family: str
    task: str


Shape = tuple[int, ...]
Inputs = tuple[torch.Tensor, ...]
Overrides = Mapping[str, Any]
Builder = Callable[[str, int, Shape | None, torch.Generator, Overrides], tuple[torch.nn.Module, Inputs]]


@dataclass(frozen=True)
class _Entry:
    build: Builder
    family: str
    task: str
    target: str
    note: str = ""


_REGISTRY: dict[str, _Entry] = {}


def register(
    *zoo_names: str, family: str, task: str | Mapping[str, str], note: str | Mapping[str, str] = ""
) -> Callable[[Builder], Builder]:
    """Register ``build(name, batch, input_shape, generator, overrides)`` under each of
    ``zoo_names``; ``task`` and ``note`` are one string or one per name."""

    def decorate(build: Builder) -> Builder:
        for name in zoo_names:
            name_task = task if isinstance(task, str) else task[name]
            name_note = note if isinstance(note, str) else note.get(name, "")
            _REGISTRY[name] = _Entry(build, family, name_task, name, name_note)
        return build

    return decorate


def names() -> list[str]:
    """Every registered zoo name, sorted."""
    return sorted(_REGISTRY)


def create(
    name: str,
    batch: int = 1,
    input_shape: Shape | None = None,
    seed: int = 0,
    overrides: Overrides | None = None,
) -> ZooModel:
    """Build zoo model ``name`` with seeded random weights and seeded example inputs.

    ``input_shape`` is the per-sample shape of the first input, without the batch dimension:
    (C, H, W) for images, (seq,) for text, (samples,) for waveforms, (mel_bins, frames) for
    Whisper's encoder. ``overrides`` change the architecture: config fields of a transformers
    model (e.g. ``{"num_hidden_layers": 2}``), keyword arguments of ``timm.create_model`` or of
    torchvision's ``get_model`` (tests use them to build small versions of big models).
    """
    if batch < 1:
        raise ZooError(f"batch must be >= 1, got {batch}")
    entry = _lookup(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, inputs = entry.build(entry.target, batch, _shape(input_shape), generator, dict(overrides or {}))
        _randomize_zero_layers(model)
        try:
            _calibrate_batchnorm(model, inputs)
        except RuntimeError as e:  # e.g. an image too small for the network's downsampling
            shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ZooError(f"{name} cannot run on example inputs of shape {shapes}: {message}") from e
    return ZooModel(
        name=name,
        model=model.eval(),
        example_inputs=inputs,
        pretrained=False,
        note="; ".join(n for n in (RANDOM_WEIGHTS_NOTE, entry.note) if n),
        family=entry.family,
        task=_task(entry, model),
    )


def _randomize_zero_layers(model: torch.nn.Module) -> None:
    """Zero-initialised layers (torchvision's ViT head) would make every output 0 and every
    comparison vacuous; give them small random weights instead."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.is_meta and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)


def _calibrate_batchnorm(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Give random-weight batch norms the running statistics of real activations.

    With the initial statistics (mean 0, var 1) activations of a random network shrink
    or grow layer by layer (mobilenet_v2's logits come out near 1e-9), which fp16 cannot
    represent. One training-mode pass, as trained networks have, keeps every layer
    near unit scale, so precision comparisons on random weights mean something.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or any(p.is_meta for p in model.parameters()):
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration pass
    model.train()
    try:
        with torch.no_grad():
            model(*inputs)
    except ValueError:  # e.g. batch norm over a single value at batch 1: keep the defaults
        for m in norms:
            m.reset_running_stats()
    finally:
        model.eval()


def resolve(spec: str, batch: int = 1, input_shape: Shape | None = None, seed: int = 0) -> ZooModel:
    """A zoo name, or ``path/to/file.py:factory``."""
    if _is_file_spec(spec):
        return load_factory(spec, batch, input_shape, seed)
    return create(spec, batch, input_shape, seed)


def load_factory(
    spec: str, batch: int = 1, input_shape: Shape | None = None, seed: int = 0
) -> ZooModel:
    """Import ``path/to/file.py`` and call ``factory()`` from it.

    The factory returns an nn.Module (then ``input_shape`` is required and a seeded randn
    input of shape (batch, *input_shape) is made) or a ``(module, example_inputs)`` tuple,
    where example_inputs is a tensor or a tuple of tensors.
    """
    path, fn_name = _split_file_spec(spec)
    factory = _factory_function(_import_file(path), fn_name, path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        returned = factory()
    model, inputs = _factory_result(returned, spec, batch, _shape(input_shape), seed)
    return ZooModel(
        name=spec,
        model=model.eval(),
        example_inputs=inputs,
        pretrained=False,
        note="weights as set by the factory; kiln cannot tell whether they are trained",
        family="file",
        task="other",
    )


@functools.cache
def _imagenet_categories() -> tuple[str, ...]:
    tv = _require("torchvision")
    return tuple(tv.models.get_model_weights("resnet50").DEFAULT.meta["categories"])


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, in model output order (from torchvision metadata)."""
    return list(_imagenet_categories())


# --- lookup ---------------------------------------------------------------------------


def _lookup(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm/"):
        return _timm_entry(name.removeprefix("timm/"))
    bare = name.removeprefix("torchvision/")
    if bare in _torchvision_classifiers():
        return _Entry(_build_torchvision, "torchvision", "classification", bare)
    raise ZooError(_unknown_message(name))


def _timm_entry(timm_name: str) -> _Entry:
    timm = _require("timm")
    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=5)
        hint = f"; close matches: {', '.join('timm/' + c for c in close)}" if close else ""
        raise ZooError(f"unknown timm model {timm_name!r}{hint}")
    return _Entry(_build_timm, "timm", "classification", timm_name)


def _unknown_message(name: str) -> str:
    candidates = names() + [f"torchvision/{n}" for n in _torchvision_classifiers()]
    close = difflib.get_close_matches(name, candidates, n=5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return (
        f"unknown zoo model {name!r}.{hint} `kiln zoo` lists the names (kiln.zoo.names() in Python); "
        "also accepted: "
        "any torchvision classification model, 'timm/<name>', 'path/to/file.py:factory'."
    )


@functools.cache
def _torchvision_classifiers() -> tuple[str, ...]:
    try:
        tv = importlib.import_module("torchvision")
    except ImportError:
        return ()
    return tuple(tv.models.list_models(module=tv.models))


def _task(entry: _Entry, model: torch.nn.Module) -> str:
    if entry.family == "timm":
        return "classification" if getattr(model, "num_classes", None) == 1000 else "other"
    return entry.task


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ZooError(f"{module} is not installed: pip install 'kiln[zoo]'") from e


def _shape(input_shape: Shape | None) -> Shape | None:
    return None if input_shape is None else tuple(int(d) for d in input_shape)


# --- inputs ---------------------------------------------------------------------------


def _images(batch: int, shape: Shape, generator: torch.Generator) -> Inputs:
    if len(shape) != 3:
        raise ZooError(f"image input_shape must be (C, H, W), got {shape}")
    return (torch.randn((batch, *shape), generator=generator, device="cpu"),)


def _token_inputs(batch: int, seq: int, vocab: int, generator: torch.Generator) -> Inputs:
    """Token ids only: unpadded sequences. An all-ones attention_mask changes nothing, and
    eager transformers drops one at run time (a data-dependent check an exported graph
    cannot make), so passing it would compare eager and engines on different kernels.
    Models that need padding masks take them as a second input (see tests/test_zoo.py)."""
    return (torch.randint(0, vocab, (batch, seq), generator=generator, device="cpu"),)


# --- torchvision ----------------------------------------------------------------------

TORCHVISION_CLASSIFIERS = (
    "alexnet",
    "squeezenet1_0",
    "squeezenet1_1",
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
    "resnext50_32x4d",
    *(f"densenet{d}" for d in (121, 161, 169, 201)),
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    "mobilenet_v2",
    "mobilenet_v3_large",
    "regnet_y_400mf",
    "convnext_tiny",
    "inception_v3",
    "swin_t",
    "vit_b_16",
)
# Constructor arguments the zoo sets unless overridden: torchvision warns when inception_v3's
# init_weights is left unset, and its auxiliary classifier is for training only (an eval-mode
# model never runs it, but batch-norm calibration would, and it needs inputs of 299x299).
TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {"inception_v3": {"init_weights": True, "aux_logits": False}}


@register(*TORCHVISION_CLASSIFIERS, family="torchvision", task="classification")
def _build_torchvision(
    name: str, batch: int, input_shape: Shape | None, generator: torch.Generator, overrides: Overrides
) -> tuple[torch.nn.Module, Inputs]:
    tv = _require("torchvision")
    kwargs = {**TORCHVISION_KWARGS.get(name, {}), **overrides}
    model = _construct(f"torchvision's {name}", lambda: tv.models.get_model(name, weights=None, **kwargs))
    fixed_size = getattr(model, "image_size", None)
    shape = input_shape or _torchvision_default_shape(tv, name, fixed_size)
    if isinstance(fixed_size, int) and tuple(shape[1:]) != (fixed_size, fixed_size):
        raise ZooError(f"{name} needs input_shape (3, {fixed_size}, {fixed_size}), got {shape}")
    return model, _images(batch, shape, generator)


def _torchvision_default_shape(tv: ModuleType, name: str, fixed_size: Any) -> Shape:
    if isinstance(fixed_size, int):
        return (3, fixed_size, fixed_size)
    crop = tv.models.get_model_weights(name).DEFAULT.transforms().crop_size
    return (3, crop[0], crop[-1])


def _construct(what: str, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Call a model constructor; an argument it does not take (a bad override) is a ZooError."""
    try:
        return make()
    except TypeError as e:
        raise ZooError(f"{what} does not take these overrides: {e}") from e


# --- timm -----------------------------------------------------------------------------


@register("efficientnet_b0", "deit_small_patch16_224", family="timm", task="classification")
def _build_timm(
    name: str, batch: int, input_shape: Shape | None, generator: torch.Generator, overrides: Overrides
) -> tuple[torch.nn.Module, Inputs]:
    timm = _require("timm")
    model = _construct(f"timm's {name}", lambda: timm.create_model(name, pretrained=False, **overrides))
    shape = input_shape or _timm_default_shape(timm, model, overrides)
    return model, _images(batch, shape, generator)


def _timm_default_shape(timm: ModuleType, model: torch.nn.Module, overrides: Overrides) -> Shape:
    size = overrides.get("img_size")  # the pretrained config's input_size does not follow it
    if isinstance(size, int):
        return (3, size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (3, int(size[0]), int(size[1]))
    return tuple(timm.data.resolve_model_data_config(model)["input_size"])


# --- transformers ---------------------------------------------------------------------


def _max_positions(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def _roberta_max_positions(config: Any) -> int:
    # RoBERTa's position ids start after its padding index.
    return int(config.max_position_embeddings) - int(config.pad_token_id) - 1


@dataclass(frozen=True)
class HFModel:
    """A transformers model built from a config with random weights (no checkpoint download).

    ``model``: its class, an attribute of ``transformers`` or a dotted path inside it;
    ``fields``: the config fields of the architecture it stands for (the rest are the config
    class's defaults); ``inputs``: "tokens", "waveform" or "mel" (see _HF_INPUTS)."""

    model: str
    config: str
    fields: dict[str, Any]
    task: str = "encoder"
    inputs: str = "tokens"
    max_len: Callable[[Any], int | None] = _max_positions
    note: str = ""


HF_MODELS: dict[str, HFModel] = {
    "bert-tiny": HFModel(
        "BertModel", "BertConfig",
        dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    ),
    "bert-base": HFModel("BertModel", "BertConfig", {}),
    "bert-large": HFModel(
        "BertModel", "BertConfig",
        dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
    ),
    # sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT of width 384
    "minilm-l6": HFModel(
        "BertModel", "BertConfig",
        dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    ),
    "roberta-base": HFModel(
        "RobertaModel", "RobertaConfig",
        dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
        max_len=_roberta_max_positions,
    ),
    "distilbert-base": HFModel("DistilBertModel", "DistilBertConfig", {}),
    # t5-base's encoder stack: relative position bias, RMS norm, no-bias linears, ReLU FFN
    "t5-base-encoder": HFModel(
        "T5EncoderModel", "T5Config",
        dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, feed_forward_proj="relu"),
    ),
    "gpt2": HFModel("GPT2LMHeadModel", "GPT2Config", dict(use_cache=False), task="decoder", note=DECODER_NOTE),
    # A small Llama-architecture decoder: RMS norm, rotary embeddings, grouped-query attention, SwiGLU
    "llama-small": HFModel(
        "LlamaForCausalLM", "LlamaConfig",
        dict(
            hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, use_cache=False,
        ),
        task="decoder", note=DECODER_NOTE,
    ),
    # facebook/wav2vec2-base: 7 conv feature layers (group norm), convolutional position embedding
    "wav2vec2-base": HFModel("Wav2Vec2Model", "Wav2Vec2Config", {}, task="audio", inputs="waveform"),
    # openai/whisper-base's encoder: two conv layers over 80 mel bins, then 6 transformer layers
    "whisper-base-encoder": HFModel(
        "models.whisper.modeling_whisper.WhisperEncoder", "WhisperConfig",
        dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
        task="audio", inputs="mel",
    ),
}


@register(
    *HF_MODELS,
    family="transformers",
    task={n: m.task for n, m in HF_MODELS.items()},
    note={n: m.note for n, m in HF_MODELS.items()},
)
def _build_transformers(
    name: str, batch: int, input_shape: Shape | None, generator: torch.Generator, overrides: Overrides
) -> tuple[torch.nn.Module, Inputs]:
    transformers = _require("transformers")
    spec = HF_MODELS[name]
    shape_of, make_inputs = _HF_INPUTS[spec.inputs]
    config_cls = getattr(transformers, spec.config)
    fields = {**spec.fields, **_checked_overrides(name, config_cls(), overrides)}
    probe = config_cls(**fields)
    shape, shape_fields = shape_of(name, spec, probe, input_shape)
    config = config_cls(**{**fields, **shape_fields}) if shape_fields else probe
    model = _hf_model(_hf_class(transformers, spec.model), config)
    return model, make_inputs(batch, shape, config, generator)


def _checked_overrides(name: str, default_config: Any, overrides: Overrides) -> dict[str, Any]:
    """Config fields only: a config class silently keeps any unknown keyword as an attribute."""
    for key in overrides:
        if not hasattr(default_config, key):
            known = [k for k in default_config.to_dict() if not k.startswith("_")]
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ZooError(f"{name}: {type(default_config).__name__} has no field {key!r}{hint}")
    return dict(overrides)


def _hf_class(transformers: ModuleType, path: str) -> type:
    module_path, _, cls_name = path.rpartition(".")
    module = importlib.import_module(f"transformers.{module_path}") if module_path else transformers
    return getattr(module, cls_name)


def _hf_model(cls: type, config: Any) -> torch.nn.Module:
    # SDPA exports cleanly (checked with transformers 4.46 and 5.x): torch.export keeps
    # aten.scaled_dot_product_attention, which kiln can map to flash attention, and
    # run_decompositions() lowers it to softmax/bmm, matching eager. "eager" is only the
    # fallback for a transformers version whose model has no SDPA path.
    try:
        return cls._from_config(config, attn_implementation="sdpa")
    except (ValueError, ImportError):
        return cls._from_config(config, attn_implementation="eager")


# Input kinds: (per-sample shape from input_shape and the config, plus config fields the shape
# sets) and (batch, shape, config, generator) → example inputs.
ShapeOf = Callable[[str, HFModel, Any, Shape | None], tuple[Shape, dict[str, Any]]]
MakeInputs = Callable[[int, Shape, Any, torch.Generator], Inputs]


def _token_shape(name: str, spec: HFModel, config: Any, input_shape: Shape | None) -> tuple[Shape, dict[str, Any]]:
    max_len = spec.max_len(config)
    if input_shape is None:
        return (SEQ_LEN if max_len is None else min(SEQ_LEN, max_len),), {}
    limit = "" if max_len is None else f" <= {max_len}"
    if len(input_shape) != 1 or input_shape[0] < 1 or (max_len is not None and input_shape[0] > max_len):
        raise ZooError(f"{name} input_shape must be (seq,) with 1 <= seq{limit}, got {input_shape}")
    return input_shape, {}


def _tokens(batch: int, shape: Shape, config: Any, generator: torch.Generator) -> Inputs:
    return _token_inputs(batch, shape[0], config.vocab_size, generator)


WAVEFORM_SAMPLES = 16000  # one second at 16 kHz


def _waveform_shape(
    name: str, spec: HFModel, config: Any, input_shape: Shape | None
) -> tuple[Shape, dict[str, Any]]:
    shortest = 1  # the feature extractor's receptive field: one output frame
    for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
        shortest = (shortest - 1) * stride + kernel
    if input_shape is None:
        return (max(WAVEFORM_SAMPLES, shortest),), {}
    if len(input_shape) != 1 or input_shape[0] < shortest:
        raise ZooError(f"{name} input_shape must be (samples,) with samples >= {shortest}, got {input_shape}")
    return input_shape, {}


def _waveform(batch: int, shape: Shape, config: Any, generator: torch.Generator) -> Inputs:
    return (torch.randn((batch, *shape), generator=generator, device="cpu"),)


def _mel_shape(name: str, spec: HFModel, config: Any, input_shape: Shape | None) -> tuple[Shape, dict[str, Any]]:
    # Whisper's encoder takes exactly 2 * max_source_positions frames (its two convolutions
    # halve them once); other lengths set max_source_positions.
    if input_shape is None:
        return (config.num_mel_bins, 2 * config.max_source_positions), {}
    if len(input_shape) != 2 or input_shape[0] < 1 or input_shape[1] < 2 or input_shape[1] % 2:
        raise ZooError(
            f"{name} input_shape must be (mel_bins, frames) with an even number of frames, got {input_shape}"
        )
    mel_bins, frames = input_shape
    return input_shape, {"num_mel_bins": mel_bins, "max_source_positions": frames // 2}


_HF_INPUTS: dict[str, tuple[ShapeOf, MakeInputs]] = {
    "tokens": (_token_shape, _tokens),
    "waveform": (_waveform_shape, _waveform),
    "mel": (_mel_shape, _waveform),
}


# --- the benchmark table --------------------------------------------------------------

# `kiln bench --zoo` and docs/zoo_table.md: one or more models per family, each a registered name.
ZOO_TABLE: tuple[str, ...] = (
    # CNNs
    "resnet50",
    "resnext50_32x4d",
    "efficientnet_b0",
    "mobilenet_v3_large",
    "regnet_y_400mf",
    "convnext_tiny",
    "densenet121",
    "inception_v3",
    # vision transformers
    "swin_t",
    "vit_b_16",
    "deit_small_patch16_224",
    # text encoders
    "bert-base",
    "roberta-base",
    "distilbert-base",
    "minilm-l6",
    "t5-base-encoder",
    # decoders (prefill)
    "gpt2",
    "llama-small",
    # audio encoders
    "wav2vec2-base",
    "whisper-base-encoder",
)


# --- factory files --------------------------------------------------------------------


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or ".py:" in spec


def _split_file_spec(spec: str) -> tuple[Path, str]:
    path, sep, fn_name = spec.rpartition(":")
    if not sep or not path or not fn_name:
        raise ZooError(f"factory spec must be 'path/to/file.py:function', got {spec!r}")
    return Path(path), fn_name


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ZooError(f"factory file not found: {path}")
    module_name = f"kiln_factory_{path.stem}_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ZooError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _factory_function(module: ModuleType, fn_name: str, path: Path) -> Callable[[], Any]:
    fn = getattr(module, fn_name, None)
    if fn is None:
        public = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
        close = difflib.get_close_matches(fn_name, public, n=3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ZooError(f"no function {fn_name!r} in {path}{hint}")
    if not callable(fn):
        raise ZooError(f"{fn_name!r} in {path} is not callable ({type(fn).__name__})")
    return fn


def _factory_result(
    returned: Any, spec: str, batch: int, input_shape: Shape | None, seed: int
) -> tuple[torch.nn.Module, Inputs]:
    if isinstance(returned, torch.nn.Module):
        return returned, _inputs_from_shape(spec, batch, input_shape, seed)
    if (
        isinstance(returned, tuple)
        and len(returned) == 2
        and isinstance(returned[0], torch.nn.Module)
    ):
        if batch != 1 or input_shape is not None:
            raise ZooError(
                f"{spec} returned its own example inputs; batch and input_shape cannot "
                "override them (return only the module to let them apply)"
            )
        return returned[0], _as_inputs(returned[1], spec)
    raise ZooError(
        f"{spec} returned {type(returned).__name__}; expected an nn.Module or a "
        "(module, example_inputs) tuple"
    )


def _inputs_from_shape(spec: str, batch: int, input_shape: Shape | None, seed: int) -> Inputs:
    if input_shape is None:
        raise ZooError(
            f"{spec} returned a module without example inputs: pass input_shape "
            "(per-sample shape, without batch) or return (module, example_inputs)"
        )
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn((batch, *input_shape), generator=generator, device="cpu"),)


def _as_inputs(inputs: Any, spec: str) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise ZooError(
        f"{spec} returned example_inputs of type {type(inputs).__name__}; "
        "expected a tensor or a tuple of tensors"
    )
