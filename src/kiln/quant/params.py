"""Quantization parameters as data: what calibration found, JSON-safe for an engine header."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.ops.quant import QuantFormat, quant_format


@dataclass(frozen=True)
class TensorQuant:
    """One scale for a whole tensor (activations)."""

    fmt: QuantFormat
    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.fmt.name, "scale": self.scale}


@dataclass(frozen=True)
class ChannelQuant:
    """One scale per channel along `axis` (weights)."""

    fmt: QuantFormat
    scales: torch.Tensor  # fp32, one per channel
    axis: int

    @classmethod
    def from_weight(cls, w: torch.Tensor, axis: int, fmt: str | QuantFormat) -> ChannelQuant:
        """Max calibration per channel: each channel's largest |w| maps to the format's max."""
        fmt = quant_format(fmt)
        axis = axis % w.dim()
        others = [d for d in range(w.dim()) if d != axis]
        amax = w.detach().float().abs().amax(dim=others) if others else w.detach().float().abs()
        scales = torch.tensor([fmt.scale(a) for a in amax.tolist()], dtype=torch.float32)
        return cls(fmt, scales, axis)


@dataclass
class CalibrationTable:
    """Per-tensor activation ranges found by calibration, keyed by the producing node's name."""

    fmt: QuantFormat
    method: str
    amax: dict[str, float] = field(default_factory=dict)
    batches: int = 0

    def quant(self, name: str) -> TensorQuant:
        try:
            return TensorQuant(self.fmt, self.fmt.scale(self.amax[name]))
        except KeyError:
            raise KeyError(
                f"no calibrated range for tensor {name!r}: calibrate the same graph you quantize "
                f"(calibrated: {', '.join(sorted(self.amax)[:8])}{' …' if len(self.amax) > 8 else ''})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.fmt.name, "method": self.method, "batches": self.batches, "amax": dict(self.amax)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationTable:
        try:
            amax = {str(k): float(v) for k, v in data["amax"].items()}
            return cls(quant_format(data["format"]), str(data["method"]), amax, int(data.get("batches", 0)))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a calibration table ({type(exc).__name__}: {exc})") from None
