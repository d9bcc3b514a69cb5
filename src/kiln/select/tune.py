"""Kernel auto-tuning (seed 000, point 6): time every candidate kernel of a node on dummy
data of the node's real shapes, check it agrees with the reference, keep the fastest.

Engines replay their steps as one CUDA graph, so a candidate is timed the same way: its
calls are captured in a CUDA graph and replayed, which measures GPU time alone and not the
Python and launch overhead that replay removes (a Triton kernel launched from Python would
otherwise lose to an ATen kernel it beats on the GPU). cuDNN picks algorithms by benchmark,
as at run time. Candidates that cannot be captured are timed by plain calls.

Timings persist in a JSON timing cache keyed by GPU, versions, timing method and the op's
signature, so a second build of the same model measures nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

import kiln
from kiln.kernels import get_kernel
from kiln.runtime.engine import cudnn_benchmark

REL_TOL = 2e-2  # a candidate farther than this from the reference kernel is rejected
REFERENCE_PROVIDERS = ("aten", "reference")
TIMING_METHOD = "cuda-graph-replay/1"  # part of every cache key: a new method measures afresh


def default_cache_path() -> Path:
    env = os.environ.get("KILN_TIMING_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kiln" / "timing-cache.json"


@dataclass
class TimingCache:
    path: Path | None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    @classmethod
    def open(cls, path: Path | None) -> TimingCache:
        entries = {}
        if path is not None and path.is_file():
            try:
                entries = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                entries = {}  # a damaged cache is only lost time: start over
        return cls(path, entries)

    def save(self) -> None:
        if self.path is None or not self.misses:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
        os.replace(tmp, self.path)


def signature(node: fx.Node, device: torch.device) -> str:
    """What a timing depends on: GPU, versions, op, tensor shapes/dtypes/strides, other args."""

    def describe(value: Any) -> Any:
        if isinstance(value, fx.Node):
            val = value.meta["val"]
            if isinstance(val, torch.SymInt):
                return hinted(val)
            return [hinted_all(val.shape), str(val.dtype), hinted_all(val.stride())]
        if isinstance(value, (list, tuple)):
            return [describe(v) for v in value]
        return repr(value)

    gpu = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))]
    return json.dumps(
        [gpu, torch.__version__, kiln.__version__, TIMING_METHOD, str(node.target), describe(list(node.args))]
    )


def hinted(size: Any) -> int:
    """A size as an int: a symbolic size (dynamic shapes) at the size it was traced at (opt, or
    2 where opt is 1: docs/dynamic-shapes.md), so kernels are timed at opt."""
    if isinstance(size, torch.SymInt):
        return int(size.node.hint)
    return int(size)


def hinted_all(sizes: Any) -> list[int]:
    return [hinted(d) for d in sizes]


def copy_signature(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> str:
    """The timing-cache key of a plain copy of a tensor of this shape and dtype."""
    gpu = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))]
    return json.dumps([gpu, torch.__version__, kiln.__version__, TIMING_METHOD, "copy", list(shape), str(dtype)])


def time_copy(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> float:
    """Milliseconds to copy a dense tensor of this shape and dtype (what a concatenation spends per input)."""
    src = torch.zeros(shape, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return round(time_kernel(lambda args, kwargs, outs: dst.copy_(src), (), {}), 5)


def materialize(node: fx.Node, module: torch.nn.Module, device: torch.device) -> tuple[tuple, dict]:
    """The node's arguments with real weights and random activations of the right layout."""

    def real(n: fx.Node) -> Any:
        if n.op == "get_attr":
            return getattr(module, n.target)
        val = n.meta["val"]
        if isinstance(val, torch.SymInt):  # a size computed in the graph (dynamic shapes)
            return hinted(val)
        t = torch.empty_strided(tuple(hinted_all(val.shape)), tuple(hinted_all(val.stride())), dtype=val.dtype,
                                device=device)
        return t.normal_() if t.is_floating_point() else t.zero_()

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), real)
    return tuple(args), dict(kwargs)


def _first(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def time_kernel(fn: Any, args: tuple, kwargs: dict, iters: int = 20) -> float:
    """Milliseconds per call on the GPU: the median of three replays of `iters` captured calls."""
    for _ in range(3):
        fn(args, kwargs, [])
    torch.cuda.synchronize()
    graph = _captured(fn, args, kwargs, iters)
    if graph is not None:
        def run() -> None:
            graph.replay()
    else:
        def run() -> None:
            for _ in range(iters):
                fn(args, kwargs, [])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(3):
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return sorted(samples)[1]


def _captured(fn: Any, args: tuple, kwargs: dict, iters: int) -> torch.cuda.CUDAGraph | None:
    """`iters` calls of fn captured in a CUDA graph, or None if fn cannot be captured."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn(args, kwargs, [])
    except RuntimeError:
        torch.cuda.synchronize()
        _end_failed_capture()
        return None
    return graph


def _end_failed_capture() -> None:
    """A capture that failed leaves the CUDA RNG believing it is still capturing (any later
    random op then fails); an empty capture that succeeds puts it back."""
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        pass


def tune_node(
    node: fx.Node, op: str, names: list[str], module: torch.nn.Module, device: torch.device
) -> dict[str, float]:
    """Milliseconds per candidate; a candidate that fails or disagrees gets no entry."""
    args, kwargs = materialize(node, module, device)
    reference = next((n for n in names if get_kernel(n).provider in REFERENCE_PROVIDERS), names[-1])
    fns = {name: get_kernel(name).make(op, None) for name in names}
    with torch.inference_mode(), cudnn_benchmark():
        expected = _first(fns[reference](args, kwargs, [])).float()
        timings = {}
        for name, fn in fns.items():
            try:
                got = _first(fn(args, kwargs, [])).float()
                err = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
                if err > REL_TOL or not torch.isfinite(got).all():
                    continue
                timings[name] = round(time_kernel(fn, args, kwargs), 5)
            except Exception:  # any failure (a Triton kernel out of resources, say) drops the candidate
                if name == reference:
                    raise
                if device.type == "cuda":
                    torch.cuda.synchronize()  # a fault that broke the CUDA context surfaces here, not later
                continue
    return timings
