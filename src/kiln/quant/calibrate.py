"""The calibration runner: run a captured graph on calibration batches and observe, with one
streaming calibrator each, the activations that feed its quantizable ops."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from kiln.graph import CapturedGraph
from kiln.ops.quant import QuantFormat, quant_format
from kiln.quant.calibrators import Calibrator, make_calibrator
from kiln.quant.params import CalibrationTable
from kiln.quant.sites import Site, find_sites


class _Observer(fx.Interpreter):
    """Runs the graph node by node and shows each watched node's value to its calibrator."""

    def __init__(self, module: fx.GraphModule, calibrators: dict[str, Calibrator]) -> None:
        super().__init__(module)
        self.calibrators = calibrators

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        calibrator = self.calibrators.get(n.name)
        if calibrator is not None and isinstance(result, torch.Tensor):
            calibrator.observe(result)
        return result


def as_batch(batch: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(x, torch.Tensor) for x in batch):
        return tuple(batch)
    raise TypeError(
        f"a calibration batch must be a tensor or a tuple of tensors (the model's inputs), got {type(batch).__name__}"
    )


def graph_inputs(graph: CapturedGraph, batch: Any) -> list[torch.Tensor]:
    """A batch of user inputs as the graph's placeholders take them (device, compute dtype)."""
    inputs = as_batch(batch)
    if len(inputs) != len(graph.graph_inputs):
        raise ValueError(f"a batch has {len(inputs)} inputs; the graph takes {len(graph.graph_inputs)}")
    out = []
    for x, spec in zip(inputs, graph.graph_inputs):
        if tuple(x.shape) != tuple(spec.shape):
            raise ValueError(
                f"input {spec.name} has shape {tuple(x.shape)}; the graph was captured for {tuple(spec.shape)} "
                "(calibration batches must have the example inputs' shapes)"
            )
        out.append(x.to(device=graph.device, dtype=spec.dtype))
    return out


def calibrate(
    graph: CapturedGraph,
    batches: Iterable[Any],
    method: str = "entropy",
    fmt: str | QuantFormat = "int8",
    *,
    sites: list[Site] | None = None,
    max_batches: int | None = None,
) -> CalibrationTable:
    """Observe every activation that feeds a quantizable op of `graph` over `batches`
    (tuples of model inputs, shaped like the example inputs) and return their ranges."""
    fmt = quant_format(fmt)
    sites = find_sites(graph) if sites is None else sites
    producers = {p.name for s in sites for p in s.activations.values()}
    calibrators = {name: make_calibrator(method, fmt) for name in producers}
    observer = _Observer(graph.module, calibrators)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            observer.run(*graph_inputs(graph, batch))
            seen += 1
    if not seen:
        raise ValueError("calibration needs at least one batch of inputs; the iterable was empty")
    amax = {name: c.amax() for name, c in calibrators.items()}
    return CalibrationTable(fmt, method, amax, seen)
