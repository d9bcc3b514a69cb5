"""Calibrators against known distributions, and the streaming histogram they share."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.ops.quant import FP8_E4M3, INT8
from kiln.quant.calibrators import CALIBRATORS, Histogram, make_calibrator


def _observe(method, fmt, x, chunks=8):
    cal = make_calibrator(method, fmt)
    for part in x.chunk(chunks):
        cal.observe(part)
    return cal


def _mse(fmt, x, amax):
    return float(((fmt.fake_quantize(x, fmt.scale(amax)) - x) ** 2).mean())


@pytest.fixture(scope="module")
def gauss():
    return torch.randn(100_000, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gauss_outliers(gauss):
    x = gauss.clone()
    x[:8] = torch.linspace(25.0, 40.0, 8)  # a handful of outliers far beyond the bulk
    return x


def test_max_is_the_largest_magnitude(gauss):
    cal = _observe("max", "int8", -gauss)
    assert cal.amax() == pytest.approx(float(gauss.abs().max()))


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_histogram_calibrators_clip_outliers(method, fmt, gauss_outliers):
    amax = _observe(method, fmt, gauss_outliers).amax()
    assert amax <= 40.0, "never beyond the largest value"
    if method == "percentile" or (fmt == "int8" and method == "entropy"):
        # int8 has too few levels to afford the outliers' range (mse may keep them: they
        # dominate the squared error, see test_mse_matches_a_brute_force_search)
        assert 2.0 < amax < 30.0, amax


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_int8_clips_a_gaussian_below_its_max(method, gauss):
    amax = _observe(method, "int8", gauss).amax()
    top = float(gauss.abs().max())
    assert 2.5 < amax < top, (amax, top)


def test_percentile_of_uniform_data():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * 10
    amax = _observe("percentile:99", "int8", x).amax()
    assert amax == pytest.approx(9.9, abs=0.02)


@pytest.mark.parametrize("fmt", [INT8, FP8_E4M3])
@pytest.mark.parametrize("data", ["gauss", "gauss_outliers", "laplace"])
def test_mse_matches_a_brute_force_search(fmt, data, request):
    if data == "laplace":
        x = torch.distributions.Laplace(0.0, 1.0).sample((50_000,))
    else:
        x = request.getfixturevalue(data)
    amax = _observe("mse", fmt, x).amax()
    top = float(x.abs().max())
    grid = torch.linspace(0.05 * top, top, 200).tolist()
    best = min(_mse(fmt, x, a) for a in grid)
    assert _mse(fmt, x, amax) <= best * 1.02, (amax, _mse(fmt, x, amax), best)


def test_entropy_ignores_exact_zeros():
    """Post-ReLU activations: half exact zeros must not pull the range down (zero is exact)."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(3)).relu()
    amax = _observe("entropy", "int8", x).amax()
    assert amax > 2.5, amax
    assert _mse(INT8, x, amax) < 2 * _mse(INT8, x, float(x.max()))


@pytest.mark.parametrize("method", list(CALIBRATORS))
def test_all_zero_tensor_gives_unit_scale(method):
    cal = _observe(method, "int8", torch.zeros(1000))
    assert cal.amax() == 0.0
    assert cal.scale() == 1.0


def test_non_finite_values_are_skipped():
    cal = make_calibrator("percentile", "int8")
    cal.observe(torch.tensor([1.0, float("nan"), float("inf"), -2.0]))
    assert 0.0 < cal.amax() <= 2.0


def test_make_calibrator_errors():
    assert make_calibrator("percentile:99.9").percentile == 99.9
    with pytest.raises(ValueError, match="unknown calibration method 'minmax'.*max, percentile"):
        make_calibrator("minmax")
    with pytest.raises(ValueError, match="takes no argument"):
        make_calibrator("entropy:3")
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
        make_calibrator("percentile:120")
    with pytest.raises(ValueError, match="unknown quantization format"):
        make_calibrator("max", "int4")


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=6), st.integers(0, 10_000))
def test_histogram_growth_is_exact(sizes, seed):
    """Batches with growing ranges: the merged histogram equals one taken over the final range."""
    gen = torch.Generator().manual_seed(seed)
    hist = Histogram(64)
    batches = []
    for i, n in enumerate(sizes):
        # values at bin centers of the finest grid, so no value sits on an edge
        b = (torch.randint(0, 64 * 2**i, (n * 10,), generator=gen).double() + 0.5) / 64
        batches.append(b)
        hist.add(b)
    all_values = torch.cat(batches)
    expected = torch.histc(all_values.float(), hist.bins, 0.0, hist.range).double()
    assert hist.range >= float(all_values.max())
    assert torch.equal(hist.counts, expected)
    assert hist.total == all_values.numel()
