"""From single requests to engine calls: the batch axis, padding and slicing. No Ray.

A request holds `n >= 1` rows (samples) along axis 0 of every input. The rows of a
dynamic batch of requests (of the same shapes past axis 0) are laid end to end and cut
into engine calls of at most `max_rows`; a call with fewer than `min_rows` rows is
padded with zeros, and the padding is sliced off the outputs. A static engine (built for
batch B) takes exactly B rows per call (min = max = B); a dynamic-shape engine whose
batch axis is a Dim (`engine.dims`), or one declaring `batch_range`, takes any count in
its range, so it is padded only below its minimum.

Axis 0 is taken to be an independent batch axis when every input and every tensor
output of the engine leads with the same size; otherwise each request must have the
engine's exact shapes, and requests run one engine call each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import InputError
from kiln.serve.protocol import Signature, TensorMeta, datatype_name
from kiln.specs import TensorSpec

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Batching:
    """Rows per engine call: at least `min_rows` (padded up to it), at most `max_rows`."""

    min_rows: int
    max_rows: int

    def calls(self, total: int) -> list[tuple[int, int, int]]:
        """(start, rows, padded rows) of each engine call for `total` rows."""
        plan = []
        for start in range(0, total, self.max_rows):
            rows = min(self.max_rows, total - start)
            plan.append((start, rows, max(rows, self.min_rows)))
        return plan


def engine_batching(engine: Any) -> Batching | None:
    """How an engine's calls batch requests, or None when it has no batch axis.

    A static engine takes exactly the batch its inputs were built for. A dynamic-shape engine
    (docs/dynamic-shapes.md) whose inputs and outputs all lead with one of its `engine.dims`
    takes any batch in that dim's range, as does an engine declaring `batch_range = (min, max)`.
    """
    declared = getattr(engine, "batch_range", None)
    if declared is not None:
        low, high = (int(v) for v in declared)
        if not 1 <= low <= high:
            raise ValueError(f"engine.batch_range must be (min, max) with 1 <= min <= max, got {declared!r}")
        return Batching(low, high)
    shapes = [tuple(s.shape) for s in engine.inputs] + [tuple(s.shape) for s in engine.outputs if s is not None]
    if not engine.inputs or any(len(s) == 0 for s in shapes):
        return None
    leads = {str(s[0]) for s in shapes}
    if len(leads) != 1:
        return None
    lead = shapes[0][0]
    if isinstance(lead, int):
        return Batching(lead, lead) if lead >= 1 else None
    dim = (getattr(engine, "dims", None) or {}).get(str(lead))  # a dynamic axis: its Dim's range
    if dim is None or not hasattr(dim, "min") or not hasattr(dim, "max"):
        return None
    return Batching(int(dim.min), int(dim.max))


def signature(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec | None], batched: bool) -> Signature:
    """The protocol's view of an engine: -1 on the batch axis when requests are batched, and on
    every axis a dynamic-shape engine takes a range of sizes for (the engine checks the range)."""

    def meta(spec: TensorSpec) -> TensorMeta:
        shape = tuple(d if isinstance(d, int) else -1 for d in spec.shape)
        if batched:
            shape = (-1, *shape[1:])
        return TensorMeta(spec.name, datatype_name(spec.dtype), shape)

    return Signature(tuple(meta(s) for s in inputs), tuple(meta(s) for s in outputs if s is not None))


def static_shapes(specs: Sequence[TensorSpec]) -> bool:
    """Whether every dimension is a fixed size (no dynamic-shape dims)."""
    return all(isinstance(d, int) for s in specs for d in s.shape)


def request_rows(inputs: Sequence[torch.Tensor], names: Sequence[str]) -> int:
    """The rows of one request: every input must have the same count along axis 0."""
    rows = {name: int(x.shape[0]) for name, x in zip(names, inputs)}
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"{n!r}: {r}" for n, r in rows.items())
        raise InputError(f"the inputs have different batch sizes ({listed}); give every input the same rows")
    return next(iter(rows.values()), 1)


def run_batched(
    call: Callable[[Tensors], Tensors],
    requests: Sequence[Tensors],
    batching: Batching | None,
    on_call: Callable[[int, int], None] | None = None,
) -> list[Tensors | Exception]:
    """Run a dynamic batch of requests through `call` (one engine call: inputs → flat outputs).

    Returns each request's outputs, its own rows only, or the exception its engine call raised:
    a failing call fails only the requests whose rows it held. `on_call(rows, padded_rows)` is
    told about every engine call (for metrics).
    """
    if not requests:
        return []
    if batching is None:
        return [_guarded(call, list(inputs), 1, 1, on_call) for inputs in requests]
    groups: dict[tuple, list[int]] = {}  # requests whose rows can share a call (same shapes past axis 0)
    for i, inputs in enumerate(requests):
        groups.setdefault(tuple(tuple(x.shape[1:]) for x in inputs), []).append(i)
    if len(groups) > 1:
        answers: list[Tensors | Exception] = [[] for _ in requests]
        for members in groups.values():
            for i, out in zip(members, run_batched(call, [requests[i] for i in members], batching, on_call)):
                answers[i] = out
        return answers
    counts = [int(r[0].shape[0]) for r in requests]
    columns = [_concat([r[i] for r in requests]) for i in range(len(requests[0]))]
    calls: list[tuple[int, int, Tensors | Exception]] = []  # (first row, end row, outputs) of each call
    for start, rows, padded in batching.calls(sum(counts)):
        chunk = [_pad(col[start : start + rows], padded) for col in columns]
        outputs = _guarded(call, chunk, rows, padded, on_call)
        calls.append((start, start + rows, outputs if isinstance(outputs, Exception) else [o[:rows] for o in outputs]))
    results: list[Tensors | Exception] = []
    start = 0
    for n in counts:
        end = start + n
        held = [(a, b, out) for a, b, out in calls if a < end and b > start]  # the calls holding its rows
        failed = next((out for _, _, out in held if isinstance(out, Exception)), None)
        if failed is not None:
            results.append(failed)
        else:
            n_out = len(held[0][2])  # type: ignore[arg-type]
            results.append([_concat([out[j][max(start, a) - a : min(end, b) - a] for a, b, out in held])  # type: ignore[index]
                            for j in range(n_out)])
        start = end
    return results


def _guarded(call: Callable[[Tensors], Tensors], chunk: Tensors, rows: int, padded: int,
             on_call: Callable[[int, int], None] | None) -> Tensors | Exception:
    if on_call is not None:
        on_call(rows, padded)
    try:
        return list(call(chunk))
    except Exception as exc:  # handed to the requests of this call only; the server keeps serving
        return exc


def _concat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def _pad(rows: torch.Tensor, count: int) -> torch.Tensor:
    if rows.shape[0] == count:
        return rows
    padded = rows.new_zeros((count, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    return padded


def flat_outputs(result: Any) -> list[Any]:
    """The leaves of an engine's output structure (tuples, lists, dicts), in engine.outputs' order."""
    if isinstance(result, (tuple, list)):
        return [leaf for item in result for leaf in flat_outputs(item)]
    if isinstance(result, dict):
        return [leaf for item in result.values() for leaf in flat_outputs(item)]
    return [result]
