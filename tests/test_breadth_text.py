"""A few cheap Hugging Face architectures outside the zoo (benchmarks/breadth_text.py runs them
all), each guarding a fix the breadth campaign found. Random weights from tiny configs; fp32 on
CPU against eager with numerics.REL_TOL["fp32"] (1e-4 relative).

- ConvBERT, dynamic batch and length: its span convolution (F.unfold) pads the sequence, whose
  fake value a pass's refresh once fixed at the traced sizes (kiln.graph.refresh_meta).
- DeBERTa (v1), dynamic length: it slices its relative embeddings with .item()s of a tensor made
  from the length, which capture once refused as data-dependent (kiln.capture.data_dependent).
- Funnel, saved and loaded: its relative shift leaves slice_scatter a heap slot with gaps, which
  the loader's check once refused (kiln.runtime.validate).
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import kiln
from numerics import assert_close

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import breadth_text as bt  # noqa: E402


def _model_and_inputs(name: str, **sizes: int):
    case = bt.CASES[name]
    model = bt.make_model(case)
    kind = bt.INPUTS[case.inputs]
    return model, kind, kind.make(model, torch.Generator().manual_seed(0), sizes)


@pytest.mark.parametrize("name", ["convbert", "deberta"])
def test_dynamic_batch_and_length(name):
    model, kind, example = _model_and_inputs(name, batch=2, seq=8)
    batch, seq = kiln.Dim("batch", min=1, max=3), kiln.Dim("seq", min=4, max=12)
    shapes = {k: {0: batch, 1: seq} for k in example}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = kiln.build(model, dict(example), device="cpu", dynamic_shapes=shapes,
                            config=kiln.BuildConfig(check_dims=False))
    g = torch.Generator().manual_seed(1)
    for sizes in (dict(batch=1, seq=4), dict(batch=3, seq=12), dict(batch=2, seq=7)):
        inputs = kind.make(model, g, sizes)
        with torch.no_grad():
            assert_close(engine(**inputs), model(**inputs))


def test_funnel_saves_loads_and_matches(tmp_path):
    model, _, example = _model_and_inputs("funnel", batch=2, seq=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = kiln.build(model, dict(example), device="cpu")
    engine.save(tmp_path / "funnel.kiln")
    with torch.no_grad():
        assert_close(kiln.load(tmp_path / "funnel.kiln")(**example), model(**example))
