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

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from kiln.errors import InputError
from kiln.serve.protocol import Signature, TensorMeta, datatype_name
from kiln.specs import TensorSpec

Tensors = list[torch.Tensor]
Item = TypeVar("Item")


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
    staging: Staging | None = None,
) -> list[Tensors | Exception]:
    """Run a dynamic batch of requests through `call` (one engine call: inputs → flat outputs).

    Returns each request's outputs, its own rows only, or the exception its engine call raised:
    a failing call fails only the requests whose rows it held. `on_call(rows, padded_rows)` is
    told about every engine call (for metrics). With `staging`, a call's rows are copied from
    the requests straight into reused buffers (see Staging) instead of new tensors.
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
            for i, out in zip(members, run_batched(call, [requests[i] for i in members], batching, on_call,
                                                   staging)):
                answers[i] = out
        return answers
    counts = [int(r[0].shape[0]) for r in requests]
    bounds = [(sum(counts[:k]), sum(counts[: k + 1])) for k in range(len(counts))]  # each request's rows
    calls: list[tuple[int, int, Tensors | Exception]] = []  # (first row, end row, outputs) of each call
    for start, rows, padded in batching.calls(sum(counts)):
        end = start + rows
        held = [(k, max(start, a) - a, min(end, b) - a) for k, (a, b) in enumerate(bounds) if a < end and b > start]
        chunk = []
        for i in range(len(requests[0])):
            parts = [requests[k][i][lo:hi] for k, lo, hi in held]
            if len(parts) == 1 and rows == padded:  # one request's rows, nothing to add: no copy
                chunk.append(parts[0])
            elif staging is not None:
                chunk.append(staging.fill(i, parts, padded))
            else:
                chunk.append(_pad(_concat(parts), padded))
        outputs = _guarded(call, chunk, rows, padded, on_call)
        if not isinstance(outputs, Exception):
            outputs = [o[:rows] for o in outputs]
            if staging is not None:  # an output that is (a view of) a staged input must outlive the buffer
                outputs = [o.clone() if staging.holds(o) else o for o in outputs]
        calls.append((start, end, outputs))
    results: list[Tensors | Exception] = []
    for start, end in bounds:
        held_calls = [(a, b, out) for a, b, out in calls if a < end and b > start]  # the calls holding its rows
        failed = next((out for _, _, out in held_calls if isinstance(out, Exception)), None)
        if failed is not None:
            results.append(failed)
        else:
            n_out = len(held_calls[0][2])  # type: ignore[arg-type]
            results.append([_concat([out[j][max(start, a) - a : min(end, b) - a]  # type: ignore[index]
                                     for a, b, out in held_calls]) for j in range(n_out)])
    return results


class Staging:
    """Reused input buffers for engine calls, one per input (and shape past axis 0).

    A call's rows are copied from the requests straight into the buffer, and only rows that an
    earlier call wrote and this one does not are zeroed: no torch.cat, and no new zeroed tensor
    per call (for an image batch, tens of MB to allocate, fault in and zero each time). The
    buffers are pinned with `pin_memory` (CUDA: faster copies to the device). One thread uses a
    Staging at a time; engines must not write into their inputs (kiln's do not).
    """

    def __init__(self, pin_memory: bool = False, keep: int = 8):
        self.pin_memory = pin_memory
        self.keep = keep  # buffers kept (a dynamic engine may see many shapes past axis 0)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._dirty: dict[tuple, int] = {}  # rows [0, dirty) of a buffer may hold earlier rows

    def fill(self, index: int, parts: Sequence[torch.Tensor], padded: int) -> torch.Tensor:
        """`parts` end to end, then zero rows up to `padded`: a view of the input's buffer."""
        first = parts[0]
        key = (index, tuple(first.shape[1:]), first.dtype)
        buffer = self._buffers.pop(key, None)
        if buffer is None or buffer.shape[0] < padded:
            buffer = torch.zeros((padded, *first.shape[1:]), dtype=first.dtype, pin_memory=self.pin_memory)
            self._dirty[key] = 0
        self._buffers[key] = buffer  # most recently used last
        while len(self._buffers) > self.keep:
            dropped = next(iter(self._buffers))
            del self._buffers[dropped], self._dirty[dropped]
        n = 0
        for part in parts:
            buffer[n : n + part.shape[0]].copy_(part)
            n += part.shape[0]
        dirty = self._dirty[key]
        if dirty > n:
            buffer[n : min(dirty, padded)].zero_()
        self._dirty[key] = max(n, dirty) if dirty > padded else n
        return buffer[:padded]

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` shares memory with one of the buffers."""
        if tensor.device.type != "cpu":
            return False
        ptr = tensor.untyped_storage().data_ptr()
        return any(ptr == b.untyped_storage().data_ptr() for b in self._buffers.values())


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


class DynamicBatcher(Generic[Item]):
    """Dynamic batching on an asyncio loop: requests queue while a batch runs, and the next batch
    is formed when the previous one is done, from every request queued by then (up to
    `max_batch`), waiting at most `wait_s` for more only when fewer are there.

    `run(items)` answers a batch: one result per item, in order (an Exception as a result is
    handed to that item's caller as its answer, not raised). One batch runs at a time.

    Unlike Ray Serve's `serve.batch` (2.60), which cuts a batch out of the queue as soon as its
    wait ends and then queues that batch behind the one running, so under load it runs many
    batches of one request each, the batch here is cut only once the engine is free to run it.
    """

    def __init__(self, run: Callable[[list[Item]], Awaitable[Sequence[Any]]], max_batch: int, wait_s: float):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run = run
        self.max_batch = max_batch
        self.wait_s = max(0.0, wait_s)
        self._queue: collections.deque[tuple[Item, asyncio.Future]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        """Requests queued for a batch (not counting the batch running)."""
        return len(self._queue)

    async def submit(self, item: Item) -> Any:
        """The result for `item` once its batch has run."""
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._batches())
        future = loop.create_future()
        self._queue.append((item, future))
        self._arrived.set()
        return await future

    async def _batches(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if len(self._queue) < self.max_batch and self.wait_s > 0:
                deadline = loop.time() + self.wait_s
                while len(self._queue) < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            taken = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            batch = [(item, future) for item, future in taken if not future.done()]  # callers gone: skipped
            if not batch:
                continue
            try:
                results = await self.run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} requests got {len(results)} results")
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # every request of the batch hears it; the next batch runs
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
