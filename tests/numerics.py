"""Output comparison with stated tolerances, shared by the engine tests."""

from __future__ import annotations

from typing import Any

import torch

# Relative error ‖y − ref‖ / ‖ref‖ allowed against fp32 eager, per engine precision.
# fp32 engines differ from eager only by summation order and weights folded at build time.
REL_TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}


def leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in leaves(v)]
    return []


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    assert ref.norm() > 0, "the reference output is all zeros: this comparison could not fail"
    assert torch.isfinite(ref).all(), "the reference output is not finite"
    return float((y - ref).norm() / ref.norm())


def assert_close(result: Any, expected: Any, precision: str = "fp32") -> None:
    got, want = leaves(result), leaves(expected)
    assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
    for i, (y, ref) in enumerate(zip(got, want)):
        assert y.shape == ref.shape, f"output {i}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
        assert y.dtype == ref.dtype, f"output {i}: dtype {y.dtype} != {ref.dtype}"
        if not ref.is_floating_point():
            assert torch.equal(y.cpu(), ref.cpu()), f"output {i} differs"
            continue
        err = rel_error(y, ref)
        assert err <= REL_TOL[precision], f"output {i}: relative error {err:.2e} > {REL_TOL[precision]:.0e}"


# A low-precision engine must be about as accurate as PyTorch's own eager run at that
# precision: relative error vs fp32 eager ≤ LOWP_FACTOR × eager's + LOWP_SLACK, and never
# above LOWP_CAP. (Random-weight networks amplify rounding more than trained ones do.)
LOWP_FACTOR = 1.5
LOWP_SLACK = 2e-3
LOWP_CAP = {"fp16": 0.1, "bf16": 0.3}


def assert_as_accurate_as_eager(result: Any, expected: Any, eager_lowp: Any, precision: str) -> None:
    for i, (y, ref, e) in enumerate(zip(leaves(result), leaves(expected), leaves(eager_lowp))):
        assert y.shape == ref.shape and y.dtype == ref.dtype, f"output {i}: {y.shape} {y.dtype} vs {ref.dtype}"
        if not ref.is_floating_point():
            continue
        ours, theirs = rel_error(y, ref), rel_error(e.to(ref.dtype), ref)
        bound = min(LOWP_FACTOR * theirs + LOWP_SLACK, LOWP_CAP[precision])
        assert ours <= bound, f"output {i}: engine error {ours:.2e}, eager {precision} {theirs:.2e}, bound {bound:.2e}"
