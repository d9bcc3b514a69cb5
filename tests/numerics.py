"""Output comparison with stated tolerances, shared by the engine tests."""

from __future__ import annotations

from typing import Any

import torch

# Relative error ‖y − ref‖ / ‖ref‖ allowed against fp32 eager, per engine precision.
# fp32 engines run the same ATen kernels as eager: only summation order may differ.
REL_TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 4e-2}


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
    return float((y - ref).norm() / ref.norm().clamp_min(1e-12))


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
