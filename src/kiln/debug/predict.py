"""`kiln predict`: top-k ImageNet labels from eager and from the engine, side by side.

Images go through the model's own preprocessing (timm's data config, torchvision weights'
transforms); the engine's and eager's probabilities are compared per image. Real photographs
ship offline with scikit-image: ``skimage:chelsea`` (a cat), ``skimage:coffee``, …
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError, KilnWarning

SAMPLES = ("chelsea", "coffee", "astronaut", "rocket", "camera", "hubble_deep_field")
SKIMAGE_PREFIX = "skimage:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Transform = Callable[[Any], torch.Tensor]


class PredictError(KilnError, ValueError):
    """The model, engine or image cannot be used for ImageNet prediction."""


@dataclass
class Prediction:
    indices: list[int]
    labels: list[str]
    probs: list[float]


@dataclass
class Agreement:
    same_top1: bool
    topk_overlap: int  # labels shared by the two top-k lists
    k: int
    max_prob_diff: float  # over all classes

    @property
    def verdict(self) -> str:
        if self.same_top1 and self.topk_overlap == self.k:
            return "agree"
        if self.same_top1:
            return f"same top-1, top-{self.k} differs ({self.topk_overlap}/{self.k} shared)"
        return "DISAGREE: different top-1"


@dataclass
class ImageResult:
    image: str
    engine: Prediction
    eager: Prediction | None = None
    agreement: Agreement | None = None


@dataclass
class PredictReport:
    model: str
    pretrained: bool | None
    device: str
    precision: str
    preprocessing: str
    images: list[ImageResult]
    notes: list[str] = field(default_factory=list)

    @property
    def weights_warning(self) -> str:
        if self.pretrained is False:
            return (
                "weights are RANDOM (no offline weights): the labels below are meaningless; "
                "only the eager-vs-engine agreement means something"
            )
        if self.pretrained is None:
            return "kiln cannot tell whether these weights are trained"
        return ""


# --- images ---------------------------------------------------------------------------------


def load_image(spec: str) -> Any:
    """A PIL RGB image from a file path or ``skimage:NAME`` (a photograph shipped offline)."""
    from PIL import Image

    if spec.startswith(SKIMAGE_PREFIX):
        return Image.fromarray(_skimage_array(spec.removeprefix(SKIMAGE_PREFIX))).convert("RGB")
    path = Path(spec)
    if not path.is_file():
        raise PredictError(
            f"image {spec!r} is not a file; pass an image path, or a sample as skimage:NAME ({', '.join(SAMPLES)})"
        )
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise PredictError(f"cannot read {spec} as an image: {exc}") from None


def _skimage_array(name: str) -> Any:
    import numpy as np

    try:
        data = __import__("skimage.data", fromlist=["data"])
    except ImportError:
        raise PredictError("scikit-image is not installed: pip install 'kiln[bench]'") from None
    loader = getattr(data, name, None)
    if not callable(loader) or name.startswith("_"):
        close = difflib.get_close_matches(name, SAMPLES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise PredictError(f"no scikit-image sample {name!r}.{hint} Samples: {', '.join(SAMPLES)}")
    array = np.asarray(loader())
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise PredictError(f"skimage:{name} is not an 8-bit image (dtype {array.dtype})")
    return array


# --- preprocessing --------------------------------------------------------------------------


def model_transform(name: str, family: str, model: torch.nn.Module | None) -> tuple[Transform, str]:
    """The model's own preprocessing: timm data config, or torchvision weights' transforms."""
    if family == "timm" and model is not None:
        from timm.data import create_transform, resolve_data_config

        config = resolve_data_config({}, model=model)
        return create_transform(**config), f"timm data config {config}"
    if family == "torchvision":
        import torchvision

        bare = name.removeprefix("torchvision/")
        weights = torchvision.models.get_model_weights(bare).DEFAULT
        return weights.transforms(), f"torchvision {weights} transforms"
    raise PredictError(f"kiln does not know the preprocessing of {name!r} ({family})")


def default_transform(size: tuple[int, int]) -> tuple[Transform, str]:
    """ImageNet's usual preprocessing at `size`: resize to size/0.875, center crop, normalize."""
    from torchvision.transforms import v2

    resize = int(round(size[0] / 0.875))
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(list(size)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return transform, f"ImageNet default (resize {resize}, crop {size[0]}x{size[1]})"


# --- predictions ----------------------------------------------------------------------------


def top_k(probs: torch.Tensor, k: int, categories: Sequence[str]) -> Prediction:
    values, indices = probs.topk(k)
    idx = [int(i) for i in indices]
    return Prediction(idx, [categories[i] for i in idx], [float(v) for v in values])


def agreement(engine: torch.Tensor, eager: torch.Tensor, k: int) -> Agreement:
    e_top, r_top = engine.topk(k).indices.tolist(), eager.topk(k).indices.tolist()
    return Agreement(
        same_top1=e_top[0] == r_top[0],
        topk_overlap=len(set(e_top) & set(r_top)),
        k=k,
        max_prob_diff=float((engine - eager).abs().max()),
    )


def logits_of(output: Any, classes: int) -> torch.Tensor:
    """The (batch, classes) logits in a model's output (a tensor, or its first tensor)."""
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        output = next((t for t in output if isinstance(t, torch.Tensor)), None)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[-1] != classes:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise PredictError(f"expected (batch, {classes}) ImageNet logits, the model returned {shape}")
    return output.float()


def run_in_batches(fn: Callable[[torch.Tensor], Any], images: torch.Tensor, batch: int) -> list[Any]:
    """Call `fn` on chunks of exactly `batch` images (engines have fixed shapes): pad the last."""
    outs = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
        outs.append((fn(chunk), len(chunk) - pad))
    return outs


def _probabilities(fn: Callable[[torch.Tensor], Any], images: torch.Tensor, batch: int, classes: int) -> torch.Tensor:
    with torch.inference_mode():
        parts = [logits_of(out, classes)[:n] for out, n in run_in_batches(fn, images, batch)]
    return torch.cat(parts).softmax(-1).cpu()


# --- what predicts: a zoo model (built here) or an engine file ------------------------------


@dataclass
class _Source:
    name: str
    engine: Any
    eager: torch.nn.Module | None
    family: str
    pretrained: bool | None
    notes: list[str]


def _from_zoo(name: str, batch: int, precision: str, device: str | None, seed: int) -> _Source:
    from kiln import zoo
    from kiln.builder import BuildConfig, build

    zm = zoo.resolve(name, batch=batch, seed=seed)
    _require_classifier(zm.name, zm.task)
    config = BuildConfig(
        precision=precision, device=device, model_name=zm.name, extra_info={"pretrained": zm.pretrained, "seed": seed}
    )
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KilnWarning)
        engine = build(copy.deepcopy(zm.model), zm.example_inputs, config=config)
    notes += [str(w.message) for w in caught if issubclass(w.category, KilnWarning)]
    eager = zm.model.to(engine.device)
    return _Source(zm.name, engine, eager, zm.family, zm.pretrained, notes)


def _from_engine(path: Path, device: str | None, seed: int) -> _Source:
    from kiln import zoo
    from kiln.runtime.engine import load

    engine = load(path, device=device)
    info = engine.build_info
    name = str(info.get("model", path.stem))
    seed = int(info.get("seed", seed))
    spec = engine.inputs[0]
    try:
        zm = zoo.resolve(name, batch=spec.shape[0], input_shape=spec.shape[1:], seed=seed)
    except Exception as exc:  # not a zoo name: the engine runs alone
        note = f"no eager model: {name!r} is not a zoo model kiln can rebuild ({exc})"
        return _Source(name, engine, None, "file", info.get("pretrained"), [note])
    _require_classifier(name, zm.task)
    note = (
        f"eager rebuilt from the zoo with seed {seed}; it matches the engine's weights only if "
        "the engine was built from the zoo with that seed (kiln build does: seed 0)"
    )
    pretrained = info.get("pretrained", zm.pretrained)
    return _Source(name, engine, zm.model.to(engine.device), zm.family, pretrained, [note])


def _require_classifier(name: str, task: str) -> None:
    if task != "classification":
        raise PredictError(f"kiln predict needs an ImageNet classifier; {name} is a {task} model")


def _transform_for(source: _Source, size: tuple[int, int]) -> tuple[Transform, str, list[str]]:
    try:
        transform, how = model_transform(source.name, source.family, source.eager)
    except (PredictError, ImportError, ValueError) as exc:
        transform, how = default_transform(size)
        return transform, how, [f"{exc}; using the ImageNet default"]
    return transform, how, []


def predict(
    target: str,
    images: Sequence[str],
    *,
    topk: int = 5,
    precision: str = "fp16",
    device: str | None = None,
    seed: int = 0,
) -> PredictReport:
    """Top-k ImageNet predictions of eager and engine for each image, with their agreement."""
    from kiln import zoo

    if not images:
        samples = ", ".join(SKIMAGE_PREFIX + s for s in SAMPLES)
        raise PredictError(f"no images given: pass image files or samples ({samples})")
    pictures = [load_image(spec) for spec in images]
    is_engine = ".py" not in target and Path(target).is_file()
    source = (
        _from_engine(Path(target), device, seed)
        if is_engine
        else _from_zoo(target, 1, precision, device, seed)  # batch 1, as kiln build: images one by one
    )
    engine = source.engine
    spec = engine.inputs[0]
    transform, how, notes = _transform_for(source, (spec.shape[-2], spec.shape[-1]))
    batch = torch.stack([transform(p) for p in pictures]).to(engine.device)
    if tuple(batch.shape[1:]) != tuple(spec.shape[1:]):
        got = tuple(batch.shape[1:])
        raise PredictError(
            f"preprocessing ({how}) gives images of shape {got}; the engine takes "
            f"{tuple(spec.shape[1:])}. Rebuild it with --input-shape {','.join(map(str, got))}"
        )
    categories = zoo.imagenet_categories()
    k = max(1, min(topk, len(categories)))
    engine_probs = _probabilities(engine, batch, spec.shape[0], len(categories))
    eager_probs = None
    if source.eager is not None:
        eager_probs = _probabilities(source.eager, batch, spec.shape[0], len(categories))
    results = [_image_result(name, i, engine_probs, eager_probs, k, categories) for i, name in enumerate(images)]
    return PredictReport(
        model=source.name,
        pretrained=source.pretrained,
        device=str(engine.device),
        precision=engine.build_info["precision"],
        preprocessing=how,
        images=results,
        notes=[*source.notes, *notes],
    )


def _image_result(
    name: str, i: int, engine: torch.Tensor, eager: torch.Tensor | None, k: int, categories: Sequence[str]
) -> ImageResult:
    result = ImageResult(name, top_k(engine[i], k, categories))
    if eager is not None:
        result.eager = top_k(eager[i], k, categories)
        result.agreement = agreement(engine[i], eager[i], k)
    return result
