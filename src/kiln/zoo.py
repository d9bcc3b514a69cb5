"""Model names → models with example inputs, for the CLI, tests and benchmarks.

Every model is built on CPU in float32 and eval() mode. No weights are downloaded:
models are built with seeded random weights, so ``pretrained`` is False throughout.

A name is one of: a registered zoo name (see ``names()``), ``torchvision/<name>`` or a bare
torchvision classification name, ``timm/<name>``, or ``path/to/file.py:factory``.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = [
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
Builder = Callable[[str, int, Shape | None, torch.Generator], tuple[torch.nn.Module, Inputs]]


@dataclass(frozen=True)
class _Entry:
    build: Builder
    family: str
    task: str
    target: str


_REGISTRY: dict[str, _Entry] = {}


def register(*zoo_names: str, family: str, task: str) -> Callable[[Builder], Builder]:
    """Register ``build(name, batch, input_shape, generator)`` under each of ``zoo_names``."""

    def decorate(build: Builder) -> Builder:
        for name in zoo_names:
            _REGISTRY[name] = _Entry(build, family, task, name)
        return build

    return decorate


def names() -> list[str]:
    """Every registered zoo name, sorted."""
    return sorted(_REGISTRY)


def create(name: str, batch: int = 1, input_shape: Shape | None = None, seed: int = 0) -> ZooModel:
    """Build zoo model ``name`` with seeded random weights and seeded example inputs.

    ``input_shape`` is the per-sample shape without the batch dimension: (C, H, W) for
    images, (seq,) for BERT.
    """
    if batch < 1:
        raise ZooError(f"batch must be >= 1, got {batch}")
    entry = _lookup(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, inputs = entry.build(entry.target, batch, _shape(input_shape), generator)
        _randomize_zero_layers(model)
        _calibrate_batchnorm(model, inputs)
    return ZooModel(
        name=name,
        model=model.eval(),
        example_inputs=inputs,
        pretrained=False,
        note=RANDOM_WEIGHTS_NOTE,
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
    *(f"densenet{d}" for d in (121, 161, 169, 201)),
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    "mobilenet_v2",
    "vit_b_16",
)


@register(*TORCHVISION_CLASSIFIERS, family="torchvision", task="classification")
def _build_torchvision(
    name: str, batch: int, input_shape: Shape | None, generator: torch.Generator
) -> tuple[torch.nn.Module, Inputs]:
    tv = _require("torchvision")
    model = tv.models.get_model(name, weights=None)
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


# --- timm -----------------------------------------------------------------------------


@register("efficientnet_b0", family="timm", task="classification")
def _build_timm(
    name: str, batch: int, input_shape: Shape | None, generator: torch.Generator
) -> tuple[torch.nn.Module, Inputs]:
    timm = _require("timm")
    model = timm.create_model(name, pretrained=False)
    shape = input_shape or tuple(timm.data.resolve_model_data_config(model)["input_size"])
    return model, _images(batch, shape, generator)


# --- transformers ---------------------------------------------------------------------

BERT_CONFIGS: dict[str, dict[str, Any]] = {
    "bert-tiny": dict(
        num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512
    ),
    "bert-base": {},
    "bert-large": dict(
        num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096
    ),
}


@register(*BERT_CONFIGS, family="transformers", task="encoder")
def _build_bert(
    name: str, batch: int, input_shape: Shape | None, generator: torch.Generator
) -> tuple[torch.nn.Module, Inputs]:
    transformers = _require("transformers")
    config = transformers.BertConfig(**BERT_CONFIGS[name])
    seq = _bert_seq_len(name, input_shape, config.max_position_embeddings)
    model = _bert_model(transformers, config)
    return model, _token_inputs(batch, seq, config.vocab_size, generator)


def _bert_model(transformers: ModuleType, config: Any) -> torch.nn.Module:
    # SDPA exports cleanly (checked with transformers 4.46 and 5.x): torch.export keeps
    # aten.scaled_dot_product_attention, which kiln can map to flash attention, and
    # run_decompositions() lowers it to softmax/bmm, matching eager. "eager" is only the
    # fallback for a transformers version whose BERT has no SDPA path.
    try:
        return transformers.AutoModel.from_config(config, attn_implementation="sdpa")
    except (ValueError, ImportError):
        return transformers.AutoModel.from_config(config, attn_implementation="eager")


def _bert_seq_len(name: str, input_shape: Shape | None, max_len: int) -> int:
    if input_shape is None:
        return BERT_SEQ_LEN
    if len(input_shape) != 1 or not 1 <= input_shape[0] <= max_len:
        raise ZooError(
            f"{name} input_shape must be (seq,) with 1 <= seq <= {max_len}, got {input_shape}"
        )
    return input_shape[0]


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
