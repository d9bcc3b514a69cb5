"""kiln serve: the Open Inference Protocol codec and the batching (pure, no Ray), then one
`kiln serve` process on 127.0.0.1 shared by the end-to-end tests (skipped without Ray)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kiln
from kiln.errors import InputError
from kiln.serve import protocol
from kiln.serve.batching import (
    Batching,
    DynamicBatcher,
    Staging,
    engine_batching,
    flat_outputs,
    request_rows,
    run_batched,
    signature,
)
from kiln.serve.protocol import Signature, TensorMeta
from kiln.specs import TensorSpec

SIG = Signature(
    inputs=(TensorMeta("x", "FP32", (-1, 3)), TensorMeta("ids", "INT64", (-1, 2))),
    outputs=(TensorMeta("y", "FP32", (-1, 4)), TensorMeta("n", "INT64", (-1,))),
)


def body_of(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def good_doc(**changes) -> dict:
    doc = {
        "id": "r1",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4.5, 5, 6]},
            {"name": "ids", "datatype": "INT64", "shape": [2, 2], "data": [[0, 1], [2, 3]]},
        ],
    }
    doc.update(changes)
    return doc


# -- protocol: decoding ----------------------------------------------------------------------------


def test_decode_json_request_flat_and_nested_data():
    request = protocol.decode_request(body_of(good_doc()), SIG)
    x, ids = request.inputs
    assert torch.equal(x, torch.tensor([[1, 2, 3], [4.5, 5, 6]], dtype=torch.float32))
    assert torch.equal(ids, torch.tensor([[0, 1], [2, 3]]))
    assert request.id == "r1" and request.outputs is None and not request.binary_outputs


def test_inputs_may_come_in_any_order():
    doc = good_doc()
    doc["inputs"].reverse()
    x, ids = protocol.decode_request(body_of(doc), SIG).inputs
    assert x.dtype == torch.float32 and ids.dtype == torch.int64


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d["inputs"][0].update(shape=[2, 4]), "shape [2, 4]; the model takes shape [-1, 3]"),
        (lambda d: d["inputs"][0].update(shape=[6]), "rank 1"),
        (lambda d: d["inputs"][0].update(shape=[0, 3], data=[]), "at least 1"),
        (lambda d: d["inputs"][0].update(datatype="FP64"), "datatype 'FP64'; the model takes FP32"),
        (lambda d: d["inputs"][0].update(data=[1, 2, 3]), "has 3 values; shape [2, 3] needs 6"),
        (lambda d: d["inputs"][0].update(data=[[1, 2], [3, 4], [5, 6]]), "nested as [3, 2]"),
        (lambda d: d["inputs"][0].update(data=["a"] * 6), "holds strings"),
        (lambda d: d["inputs"][0].update(data=[[1, 2, 3], [4, 5]]), "ragged"),
        (lambda d: d["inputs"][0].update(data=7), "must be a list"),
        (lambda d: d["inputs"][0].pop("data"), "neither 'data' nor"),
        (lambda d: d["inputs"][1].update(data=[0.5, 1, 2, 3]), "INT64 takes integers"),
        (lambda d: d["inputs"][1].update(data=[0, 1, 2, 2**70]), "mixed values or numbers too large"),
        (lambda d: d["inputs"][0].update(shape=["2", 3]), "'shape' must be a list of integers"),
        (lambda d: d["inputs"][0].update(name="z"), "named 'z'; this model's inputs are: x, ids"),
        (lambda d: d["inputs"].pop(1), "lacks input(s) 'ids'"),
        (lambda d: d["inputs"].append(dict(d["inputs"][0])), "given twice"),
        (lambda d: d.pop("inputs"), "no 'inputs' list"),
        (lambda d: d.update(id=5), "'id' must be a string"),
        (lambda d: d.update(outputs=[{"name": "nope"}]), "asks for 'nope'; this model's outputs are: y, n"),
        (lambda d: d.update(outputs=[{"name": "y"}, {"name": "y"}]), "asked for twice"),
        (lambda d: d["inputs"][0].update(parameters={"binary_data_size": 24}), "both 'data' and binary_data_size"),
    ],
)
def test_bad_requests_name_the_problem(change, words):
    doc = good_doc()
    change(doc)
    with pytest.raises(InputError, match=re.escape(words)):
        protocol.decode_request(body_of(doc), SIG)


@pytest.mark.parametrize(
    "body, words",
    [(b"{nope", "not valid JSON"), (b"[1, 2]", "must be a JSON object"), (b"\xff\xfe", "not valid JSON")],
)
def test_malformed_bodies_are_input_errors(body, words):
    with pytest.raises(InputError, match=words):
        protocol.decode_request(body, SIG)


def test_uint8_range_is_checked():
    sig = Signature((TensorMeta("p", "UINT8", (2,)),), ())
    doc = {"inputs": [{"name": "p", "datatype": "UINT8", "shape": [2], "data": [0, 256]}]}
    with pytest.raises(InputError, match=r"0\.\.256, outside UINT8's 0\.\.255"):
        protocol.decode_request(body_of(doc), sig)


def test_static_shapes_must_match_exactly():
    sig = Signature((TensorMeta("x", "FP32", (4, 3)),), ())
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6}]}
    with pytest.raises(InputError, match=r"shape \[2, 3\]; the model takes shape \[4, 3\]$"):
        protocol.decode_request(body_of(doc), sig)


# -- protocol: binary extension and round trips ------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000) + 1
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 5),
    tail=st.lists(st.integers(0, 4), max_size=3),
    binary=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_request_round_trip(dtype, rows, tail, binary, seed):
    """Any tensor the protocol can carry, JSON or binary, decodes to exactly what was sent."""
    x = sample(dtype, (rows, *tail), seed)
    name = protocol.datatype_name(dtype)
    sig = Signature((TensorMeta("a", name, (-1, *tail)), TensorMeta("b", "FP32", (-1,))), ())
    b = torch.randn(rows)
    body, headers = protocol.encode_request({"b": b, "a": x}, binary=binary, request_id="q")
    request = protocol.decode_request(body, sig, headers.get(protocol.HEADER_LENGTH))
    assert request.inputs[0].dtype == dtype and torch.equal(request.inputs[0], x)
    assert torch.equal(request.inputs[1], b) and request.id == "q"


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 4), max_size=3), binary=st.booleans(),
       seed=st.integers(0, 2**16))
def test_response_round_trip(dtype, shape, binary, seed):
    y = sample(dtype, tuple(shape), seed)
    request = protocol.InferRequest(inputs=[], id="7", binary_outputs={"y", "z"} if binary else set())
    body, headers = protocol.encode_response("m", request, {"y": y, "z": torch.arange(3)})
    assert (protocol.HEADER_LENGTH in headers) == binary
    out = protocol.decode_response(body, headers.get(protocol.HEADER_LENGTH))
    assert list(out) == ["y", "z"] and out["y"].dtype == dtype and torch.equal(out["y"], y)
    head = body[: int(headers[protocol.HEADER_LENGTH])] if binary else body
    assert json.loads(head)["id"] == "7" and json.loads(head)["model_name"] == "m"


def test_requested_outputs_choose_and_order_the_answer():
    doc = good_doc(outputs=[{"name": "n", "parameters": {"binary_data": True}}, {"name": "y"}])
    request = protocol.decode_request(body_of(doc), SIG)
    assert request.outputs == ["n", "y"] and request.binary_outputs == {"n"}
    body, headers = protocol.encode_response("m", request, {"y": torch.ones(2, 4), "n": torch.arange(2)})
    head = json.loads(body[: int(headers[protocol.HEADER_LENGTH])])
    assert [o["name"] for o in head["outputs"]] == ["n", "y"]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 16} and head["outputs"][1]["data"] == [1.0] * 8


def test_binary_data_output_parameter_makes_every_output_binary():
    request = protocol.decode_request(body_of(good_doc(parameters={"binary_data_output": True})), SIG)
    assert request.binary_outputs == {"y", "n"}


@pytest.mark.parametrize(
    "size, extra, header, words",
    [
        (20, b"", None, "binary_data_size is 20 bytes, but shape [2, 3] of FP32 needs 24"),
        (24, b"", None, "only 0 bytes of binary data are left"),
        (24, b"\0" * 28, None, "carries 28 bytes of binary data after its JSON header, but its inputs' "
                               "binary_data_size add up to 24"),
        (24, b"\0" * 24, "x", "Inference-Header-Content-Length header is not a number"),
        (24, b"\0" * 24, "999999", "Inference-Header-Content-Length is 999999"),
    ],
)
def test_binary_sizes_are_checked(size, extra, header, words):
    doc = good_doc()
    doc["inputs"][0].pop("data")
    doc["inputs"][0]["parameters"] = {"binary_data_size": size}
    head = body_of(doc)
    with pytest.raises(InputError, match=re.escape(words)):
        protocol.decode_request(head + extra, SIG, header if header is not None else len(head))


def test_metadata_documents_batch_axis_and_datatypes():
    inputs = [TensorSpec("x", (4, 3, 8, 8), torch.float32), TensorSpec("ids", (4, 7), torch.int64)]
    outputs = [TensorSpec("output_0", (4, 10), torch.float16), None]
    batched = protocol.model_metadata("m", signature(inputs, outputs, batched=True))
    assert batched == {
        "name": "m", "versions": [], "platform": "kiln",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 8, 8]},
                   {"name": "ids", "datatype": "INT64", "shape": [-1, 7]}],
        "outputs": [{"name": "output_0", "datatype": "FP16", "shape": [-1, 10]}],
    }
    fixed = protocol.model_metadata("m", signature(inputs, outputs, batched=False))
    assert fixed["inputs"][0]["shape"] == [4, 3, 8, 8]


def test_unsupported_dtype_is_named():
    with pytest.raises(kiln.KilnError, match="complex64"):
        protocol.datatype_name(torch.complex64)


def test_match_tensors_for_the_handle_api():
    x, ids = torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.int64)
    assert [t.shape for t in protocol.match_tensors({"ids": ids, "x": x}, SIG)] == [(2, 3), (2, 2)]
    assert protocol.match_tensors([x.numpy(), ids], SIG)[0].dtype == torch.float32
    with pytest.raises(InputError, match="datatype FP64; the model takes FP32"):
        protocol.match_tensors([x.double(), ids], SIG)
    with pytest.raises(InputError, match="unknown input"):
        protocol.match_tensors({"x": x, "ids": ids, "q": x}, SIG)
    with pytest.raises(InputError, match="takes 2 input"):
        protocol.match_tensors([x], SIG)


# -- batching ----------------------------------------------------------------------------------------


def fake_engine(inputs, outputs, **extra):
    return SimpleNamespace(inputs=inputs, outputs=outputs, **extra)


def test_engine_batching_detects_a_shared_leading_axis():
    specs = [TensorSpec("x", (8, 3), torch.float32), TensorSpec("m", (8, 5), torch.bool)]
    assert engine_batching(fake_engine(specs, [TensorSpec("y", (8,), torch.float32), None])) == Batching(8, 8)
    assert engine_batching(fake_engine(specs, [TensorSpec("y", (3,), torch.float32)])) is None
    assert engine_batching(fake_engine([TensorSpec("x", (8, 3), torch.float32), TensorSpec("w", (3, 3), torch.float32)],
                                       [TensorSpec("y", (8, 3), torch.float32)])) is None
    assert engine_batching(fake_engine(specs, [TensorSpec("s", (), torch.float32)])) is None
    # an engine with a batch range (dynamic shapes) is padded only below its minimum
    assert engine_batching(fake_engine(specs, [], batch_range=(1, 64))) == Batching(1, 64)
    with pytest.raises(ValueError, match="batch_range"):
        engine_batching(fake_engine(specs, [], batch_range=(4, 2)))


def test_dynamic_shape_engines_batch_over_their_dim():
    """An engine whose axis 0 is a Dim (docs/dynamic-shapes.md) batches over the Dim's range and
    shows -1 on every dynamic axis; a dim that is not the shared leading one is no batch axis."""
    dims = {"batch": SimpleNamespace(min=1, max=64), "seq": SimpleNamespace(min=8, max=128)}
    inputs = [TensorSpec("ids", ("batch", "seq"), torch.int64), TensorSpec("mask", ("batch", "seq"), torch.int64)]
    outputs = [TensorSpec("y", ("batch", 16), torch.float32)]
    assert engine_batching(fake_engine(inputs, outputs, dims=dims)) == Batching(1, 64)
    meta = signature(inputs, outputs, batched=True)
    assert [m.shape for m in meta.inputs] == [(-1, -1), (-1, -1)] and meta.outputs[0].shape == (-1, 16)
    assert engine_batching(fake_engine(inputs, [TensorSpec("y", ("seq",), torch.float32)], dims=dims)) is None
    assert engine_batching(fake_engine(inputs, outputs, dims={})) is None


def test_requests_of_other_shapes_never_share_a_call():
    """Rows of requests differing past axis 0 (a dynamic seq axis) go to separate engine calls."""
    requests = [[torch.randn(n, seq, 3), torch.randint(0, 9, (n, 2))] for n, seq in [(1, 4), (2, 5), (1, 4), (3, 5)]]
    shapes = []

    def call(chunk):
        shapes.append(tuple(chunk[0].shape))
        return [chunk[0] * 2, chunk[1] + 1]

    results = run_batched(call, requests, Batching(1, 8))
    assert sorted(shapes) == [(2, 4, 3), (5, 5, 3)]
    for request, (y, z) in zip(requests, results):
        assert torch.equal(y, request[0] * 2) and torch.equal(z, request[1] + 1)


def test_calls_cut_rows_into_engine_batches():
    assert Batching(4, 4).calls(9) == [(0, 4, 4), (4, 4, 4), (8, 1, 4)]
    assert Batching(1, 4).calls(9) == [(0, 4, 4), (4, 4, 4), (8, 1, 1)]
    assert Batching(2, 8).calls(1) == [(0, 1, 2)]


def rowwise(chunk):
    """A stand-in engine whose rows are independent: what padding and slicing rely on."""
    x, ids = chunk
    return [x * 2 + ids.sum(1, keepdim=True), ids[:, 0] - 1]


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(1, 9), min_size=1, max_size=12), low=st.integers(1, 4), extra=st.integers(0, 4),
       seed=st.integers(0, 1000))
def test_run_batched_equals_each_request_alone(rows, low, extra, seed):
    batching = Batching(low, low + extra)
    gen = torch.Generator().manual_seed(seed)
    requests = [[torch.randn(n, 3, generator=gen), torch.randint(0, 9, (n, 2), generator=gen)] for n in rows]
    seen = []

    def call(chunk):
        assert batching.min_rows <= chunk[0].shape[0] <= batching.max_rows
        assert chunk[0].shape[0] == chunk[1].shape[0]
        return rowwise(chunk)

    results = run_batched(call, requests, batching, on_call=lambda r, p: seen.append((r, p)))
    assert len(results) == len(requests)
    for request, result in zip(requests, results):
        want = rowwise(request)
        assert all(torch.equal(g, w) for g, w in zip(result, want))
    assert sum(r for r, _ in seen) == sum(rows)
    assert all(p == max(r, low) for r, p in seen)


def test_a_failing_engine_call_fails_only_the_requests_it_held():
    requests = [[torch.full((n, 3), float(k)), torch.zeros(n, 2, dtype=torch.int64)] for k, n in enumerate([3, 2, 4])]

    def call(chunk):  # a call holding any row of the third request (value 2) fails
        if (chunk[0] == 2).any():
            raise InputError("no twos")
        return rowwise(chunk)

    first, second, third = run_batched(call, requests, Batching(4, 4))
    assert torch.equal(first[0], rowwise(requests[0])[0])  # rows 0-2: first call only
    assert isinstance(second, InputError)  # rows 3-4 span the first and the failing second call
    assert isinstance(third, InputError)
    only, = run_batched(call, [requests[2]], None)
    assert isinstance(only, InputError)


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=5), min_size=1, max_size=6),
       low=st.integers(1, 6), extra=st.integers(0, 4), seed=st.integers(0, 1000))
def test_staged_batches_equal_fresh_ones(batches, low, extra, seed):
    """One Staging reused over a run of dynamic batches (big calls, then small ones): every call sees
    the same inputs as with fresh tensors, its padding zero, and the answers are the same."""
    batching = Batching(low, low + extra)
    gen = torch.Generator().manual_seed(seed)
    staging = Staging()
    for rows in batches:
        requests = [[torch.randn(n, 3, generator=gen), torch.randint(1, 9, (n, 2), generator=gen)] for n in rows]
        fresh: list = []
        staged: list = []

        def recorded(into):
            return lambda c: (into.append([x.clone() for x in c]), rowwise(c))[1]

        want = run_batched(recorded(fresh), requests, batching)
        got = run_batched(recorded(staged), requests, batching, staging=staging)
        assert len(fresh) == len(staged)
        assert all(torch.equal(a, b) for f, g in zip(fresh, staged) for a, b in zip(f, g))
        assert all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g))


def test_staging_reuses_its_buffers():
    staging, seen = Staging(), []

    def call(chunk):
        seen.append(chunk[0].data_ptr())
        return [chunk[0] + 1]

    for n in ([1, 2], [3], [1]):
        run_batched(call, [[torch.ones(k, 4)] for k in n], Batching(8, 8), staging=staging)
    assert len(seen) == 3 and len(set(seen)) == 1


def test_an_output_that_is_a_staged_input_is_copied():
    staging = Staging()
    first, _ = run_batched(lambda c: [c[0]], [[torch.ones(1, 2)], [torch.ones(1, 2)]], Batching(4, 4),
                           staging=staging)
    run_batched(lambda c: [c[0]], [[torch.full((3, 2), 7.0)]], Batching(4, 4), staging=staging)
    assert torch.equal(first[0], torch.ones(1, 2))  # not overwritten by the second call's rows


def test_pad_rows_are_zero():
    got = []
    run_batched(lambda c: (got.append(c[0].clone()), [c[0]])[1], [[torch.ones(1, 2)]], Batching(3, 3))
    assert torch.equal(got[0], torch.tensor([[1.0, 1], [0, 0], [0, 0]]))


def test_unbatched_engines_run_each_request_alone():
    requests = [[torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64)] for _ in range(3)]
    results = run_batched(rowwise, requests, None)
    assert all(torch.equal(r[0], rowwise(q)[0]) for r, q in zip(results, requests))


def test_request_rows_must_agree():
    assert request_rows([torch.zeros(3, 1), torch.zeros(3)], ["a", "b"]) == 3
    with pytest.raises(InputError, match="different batch sizes \\('a': 3, 'b': 2\\)"):
        request_rows([torch.zeros(3, 1), torch.zeros(2)], ["a", "b"])


def test_flat_outputs_follow_the_engine_order():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert [t.item() for t in flat_outputs({"p": a, "q": (b, [c])})] == [0.0, 1.0, 2.0]
    assert flat_outputs(a)[0] is a


def run_batcher(max_batch, wait_s, waves, run_s=0.2, fail=None):
    """Batch sizes a DynamicBatcher runs when `waves[k]` requests arrive while batch k runs, and each
    request's answer (its own item, doubled, or the error its batch raised)."""
    sizes: list[int] = []

    async def run(items):
        sizes.append(len(items))
        await asyncio.sleep(run_s)
        if fail is not None and fail in items:
            raise InputError(f"item {fail} fails its batch")
        return [2 * i for i in items]

    async def main():
        batcher = DynamicBatcher(run, max_batch, wait_s)
        tasks, n = [], 0
        start = asyncio.get_running_loop().time()
        for k, wave in enumerate(waves):  # wave k arrives halfway through batch k - 1
            await asyncio.sleep(max(0.0, start + (k - 0.5) * run_s - asyncio.get_running_loop().time()))
            for _ in range(wave):
                tasks.append(asyncio.ensure_future(batcher.submit(n)))
                n += 1
        return await asyncio.gather(*tasks, return_exceptions=True)

    return sizes, asyncio.run(main())


def test_the_next_batch_takes_every_request_queued_while_one_runs():
    # serve.batch (Ray 2.60) cut these into batches of one request each, queued behind the running batch
    sizes, answers = run_batcher(32, 0.001, [1, 20, 5])
    assert sizes == [1, 20, 5]
    assert answers == [2 * i for i in range(26)]


def test_dynamic_batches_hold_at_most_max_batch_requests():
    sizes, answers = run_batcher(8, 0.001, [1, 20])
    assert sizes == [1, 8, 8, 4]
    assert answers == [2 * i for i in range(21)]


def test_a_batch_waits_for_more_requests_only_up_to_its_wait():
    async def main():
        sizes = []

        async def run(items):
            sizes.append(len(items))
            return items

        batcher = DynamicBatcher(run, 4, 0.2)
        first = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit("b"))  # within the wait: same batch
        t0 = time.perf_counter()
        await asyncio.gather(first, second)
        waited = time.perf_counter() - t0
        full = [asyncio.ensure_future(batcher.submit(k)) for k in range(4)]  # a full batch does not wait
        t1 = time.perf_counter()
        await asyncio.gather(*full)
        return sizes, waited, time.perf_counter() - t1

    sizes, waited, full_took = asyncio.run(main())
    assert sizes == [2, 4]
    assert 0.05 < waited < 1.0 and full_took < 0.15


def test_a_failing_batch_fails_its_own_requests_and_the_next_batch_runs():
    sizes, answers = run_batcher(32, 0.001, [1, 3, 2], fail=2)
    assert sizes == [1, 3, 2]
    assert answers[0] == 0 and answers[4:] == [8, 10]
    assert all(isinstance(a, InputError) and "item 2" in str(a) for a in answers[1:4])


def test_a_cancelled_request_leaves_its_batch():
    async def main():
        seen = []

        async def run(items):
            seen.append(list(items))
            await asyncio.sleep(0.05)
            return items

        batcher = DynamicBatcher(run, 32, 0.001)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)
        gone, kept = asyncio.ensure_future(batcher.submit(1)), asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        return seen, await first, await kept

    seen, first, kept = asyncio.run(main())
    assert seen == [[0], [2]] and (first, kept) == (0, 2)


# -- the end-to-end server ----------------------------------------------------------------------------

ray_missing = False
try:  # the local instance listens on loopback only (as `kiln serve` sets it up)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray  # noqa: F401
    from ray import serve  # noqa: F401
except ImportError:
    ray_missing = True
needs_ray = pytest.mark.skipif(ray_missing, reason="Ray Serve is not installed (pip install 'kiln[serve]')")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 8)
        self.embed = torch.nn.Embedding(10, 8)

    def forward(self, x, ids):
        h = torch.relu(self.linear(x)) + self.embed(ids).sum(1)
        return {"logits": h, "extra": (h.sum(-1), ids * 2)}


BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(token: str) -> list[int]:
    """Processes whose environment carries `token` (the server and every Ray process it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


class Server:
    def __init__(self, folder: Path, extra: tuple[str, ...] = ()):
        torch.manual_seed(0)
        self.engine_path = folder / "tiny.kiln"
        kiln.build(Tiny().eval(), (torch.randn(BATCH, 16), torch.randint(0, 10, (BATCH, 3))), device="cpu").save(
            self.engine_path
        )
        self.engine = kiln.load(self.engine_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = f"KILN_SERVE_TEST={uuid.uuid4().hex}"
        self.log = folder / "serve.log"
        # Ray's token authentication, with a token of this test's own (a second driver joins with it)
        self.ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}
        env = {**os.environ, **self.ray_env, "KILN_SERVE_TEST": self.token.split("=")[1],
               "RAY_DISABLE_USAGE_STATS": "1"}
        command = [sys.executable, "-c", "import sys; from kiln.cli import main; sys.argv[0] = 'kiln'; main()",
                   "serve", str(self.engine_path), "--port", str(self.port), "--max-batch", "8",
                   "--batch-wait-ms", "5", "--device", "cpu", *extra]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.stopped = False
        deadline = time.monotonic() + 240
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"kiln serve did not become ready; its output:\n{self.output()}")
            time.sleep(0.5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}

    def ready(self) -> bool:
        try:
            return self.request("GET", "/v2/health/ready")[0] == 200
        except OSError:
            return False

    def reference(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The engine in-process on the request padded to its batch with zeros, sliced back."""
        n = x.shape[0]
        pad = lambda t: torch.cat([t, t.new_zeros((BATCH - n, *t.shape[1:]))])  # noqa: E731
        out = self.engine(pad(x), pad(ids))
        return {"output_0": out["logits"][:n], "output_1": out["extra"][0][:n], "output_2": out["extra"][1][:n]}

    def stop(self) -> tuple[int | None, list[int]]:
        """SIGINT (Ctrl-C) and wait; returns the exit code and the processes left over (then killed)."""
        if self.stopped:
            return self.proc.returncode, []
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 20
        while (left := processes_with(self.token)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # only the processes this test started (they carry its token)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode, left


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if ray_missing:
        pytest.skip("Ray Serve is not installed (pip install 'kiln[serve]')")
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


def random_request(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = 1 + seed % BATCH
    return torch.randn(n, 16, generator=gen), torch.randint(0, 10, (n, 3), generator=gen)


@needs_ray
def test_server_metadata_and_health(server):
    assert server.request("GET", "/v2/health/live")[0] == 200
    assert server.request("GET", "/v2/health/ready")[0] == 200
    assert server.request("GET", "/v2/models/tiny/ready")[0] == 200
    status, body, _ = server.request("GET", "/v2/models/tiny")
    assert status == 200
    meta = json.loads(body)
    assert meta["name"] == "tiny" and meta["platform"] == "kiln"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]},
                              {"name": "ids", "datatype": "INT64", "shape": [-1, 3]}]
    assert [(o["datatype"], o["shape"]) for o in meta["outputs"]] == [("FP32", [-1, 8]), ("FP32", [-1]),
                                                                     ("INT64", [-1, 3])]
    assert json.loads(server.request("GET", "/v2")[1])["extensions"] == ["binary_tensor_data"]


@needs_ray
def test_concurrent_requests_equal_the_engine_in_process(server):
    """200 requests from 16 threads (1-4 rows each, JSON and binary) all get the in-process answer."""
    from kiln.serve.client import Client

    local = threading.local()

    def one(i: int) -> dict[str, torch.Tensor]:
        if not hasattr(local, "client"):
            local.client = Client(server.url)
        x, ids = random_request(i)
        return local.client.infer("tiny", {"x": x, "ids": ids}, binary=i % 2 == 0, request_id=f"req-{i}")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(200)))
    assert len(answers) == 200
    for i, got in enumerate(answers):  # references one at a time: the test's engine is called from one thread
        want = server.reference(*random_request(i))
        assert list(got) == list(want), i
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), (i, name)


@needs_ray
def test_bad_requests_get_400_and_the_server_keeps_serving(server):
    x, ids = random_request(1)
    good, headers = protocol.encode_request({"x": x, "ids": ids})
    wrong_shape, _ = protocol.encode_request({"x": torch.randn(2, 15), "ids": ids[:1].repeat(2, 1)})
    wrong_type, _ = protocol.encode_request({"x": x.double(), "ids": ids})
    cases = [
        ("/v2/models/tiny/infer", wrong_shape, "input 'x' has shape [2, 15]; the model takes shape [-1, 16]"),
        ("/v2/models/tiny/infer", wrong_type, "input 'x' has datatype 'FP64'; the model takes FP32"),
        ("/v2/models/tiny/infer", b'{"inputs": [', "the request body is not valid JSON"),
        ("/v2/models/nope/infer", good, "unknown model 'nope'; this server serves: tiny"),
    ]
    for path, body, words in cases:
        status, answer, _ = server.request("POST", path, body, headers)
        assert status == 400, (path, answer)
        assert words in json.loads(answer)["error"]
    assert server.ready()
    status, answer, _ = server.request("POST", "/v2/models/tiny/infer", good, headers)
    assert status == 200
    got = protocol.decode_response(answer)
    assert torch.equal(got["output_0"], server.reference(x, ids)["output_0"])


HANDLE_CLIENT = """
import json, sys, torch
from ray import serve
from kiln.serve.deploy import connect

assert connect(sys.argv[1]) is False  # joined, not started: the server's process owns the instance
handle = serve.get_deployment_handle("KilnModel", app_name="tiny")
x = torch.tensor(json.loads(sys.argv[2]))
ids = torch.tensor(json.loads(sys.argv[3]))
got = handle.infer.remote({"x": x, "ids": ids}).result(timeout_s=60)
try:
    handle.infer.remote([x, ids.int()]).result(timeout_s=60)
    error = None
except Exception as exc:
    error = str(exc)
print("RESULT " + json.dumps({k: v.tolist() for k, v in got.items()} | {"error": error}))
"""


@needs_ray
def test_handle_api_composes_with_other_deployments(server):
    """Another driver joins the server's Ray instance and calls the model through its handle (as a
    deployment composing kiln.serve.app(...) does), in a process of its own."""
    address = re.search(r"Ray: (\S+)", server.output()).group(1)
    assert address.startswith("127.0.0.1:")
    x, ids = random_request(3)
    run = subprocess.run(
        [sys.executable, "-c", HANDLE_CLIENT, address, json.dumps(x.tolist()), json.dumps(ids.tolist())],
        env={**os.environ, **server.ray_env}, capture_output=True, text=True, timeout=180,
    )
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, run.stdout + run.stderr
    got = json.loads(line[len("RESULT "):])
    want = server.reference(x, ids)
    assert torch.equal(torch.tensor(got["output_0"]), want["output_0"])
    assert torch.equal(torch.tensor(got["output_2"]), want["output_2"])
    assert "input 'ids' has datatype INT32; the model takes INT64" in got["error"]
    assert server.ready()


@needs_ray
def test_metrics_count_requests_and_batches(server):
    url = re.search(r"metrics \(Prometheus\): (\S+)", server.output()).group(1)
    assert url.startswith("http://127.0.0.1:")

    def value(text: str, name: str, **labels: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    deadline = time.monotonic() + 60
    while True:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        ok = value(text, "ray_kiln_requests_total", model="tiny", status="ok")
        if ok >= 200 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert ok >= 200
    assert value(text, "ray_kiln_requests_total", model="tiny", status="bad_request") >= 2
    batches = value(text, "ray_kiln_batch_requests_count", model="tiny")
    single = value(text, "ray_kiln_batch_requests_bucket", model="tiny", le="1.0")
    assert batches > single  # some batches held several requests
    assert value(text, "ray_kiln_engine_latency_ms_count", model="tiny") > 0
    assert value(text, "ray_kiln_queue_latency_ms_count", model="tiny") >= ok


@needs_ray
def test_ctrl_c_stops_everything(server):
    running = processes_with(server.token)
    assert server.proc.pid in running and len(running) >= 4  # the server, Ray's GCS and raylet, replicas …
    code, left = server.stop()
    assert code == 0, server.output()
    assert left == [], f"processes left after shutdown: {left}"
    assert "stopped" in server.output()


@needs_ray
def test_direct_ingress_serves_each_replica_on_a_port_of_its_own(tmp_path):
    """--direct-ingress: the replica answers on its own port (no proxy) as through the proxy: the same
    outputs as the engine in-process, 400 with kiln's message for a bad request; Ctrl-C stops all."""
    from kiln.serve.client import Client

    s = Server(tmp_path, extra=("--direct-ingress",))
    try:
        deadline = time.monotonic() + 30
        while "ready:" not in s.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        urls = re.findall(r"replica \(direct\): (http://\S+)/v2/models/tiny/infer", s.output())
        assert len(urls) == 1 and urls[0] != s.url, s.output()
        with Client(urls[0]) as client:
            for seed in range(4):
                x, ids = random_request(seed)
                got = client.infer("tiny", {"x": x, "ids": ids}, binary=seed % 2 == 0)
                want = s.reference(x, ids)
                assert all(torch.equal(got[k], want[k]) for k in want)
            with pytest.raises(InputError, match="HTTP 400: input 'ids' has datatype 'INT32'; the model takes INT64"):
                client.infer("tiny", {"x": x, "ids": ids.int()})
            assert client.ready("tiny")
        assert s.ready()
    finally:
        code, left = s.stop()
    assert code == 0, s.output()
    assert left == [], f"processes left after shutdown: {left}"


def test_app_is_a_bound_serve_application(tmp_path):
    if ray_missing:
        pytest.skip("Ray Serve is not installed")
    from ray.serve import Application

    import kiln.serve

    path = tmp_path / "m.kiln"
    kiln.build(torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),), device="cpu").save(path)
    application = kiln.serve.app(path)
    assert isinstance(application, Application)
    with pytest.raises(ValueError, match="letters, digits"):
        kiln.serve.app(path, name="a b")


def test_deployment_options():
    from kiln.serve.deploy import deployment_options, model_name

    gpu = deployment_options("cuda", max_batch=32, replicas=2, gpus_per_replica=0.5)
    assert gpu["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5} and gpu["num_replicas"] == 2
    assert gpu["max_ongoing_requests"] >= 64
    shared = deployment_options("cuda", max_batch=32, gpus_per_replica=0.5, replicas_per_gpu=4)
    assert shared["ray_actor_options"]["num_gpus"] == 0.125 and shared["num_replicas"] == 4  # no Ray: one GPU
    assert deployment_options("cpu", max_batch=32, replicas_per_gpu=4)["num_replicas"] == 1
    with pytest.raises(ValueError, match="replicas_per_gpu"):
        deployment_options("cuda", max_batch=32, replicas_per_gpu=0)
    cpu = deployment_options("cpu", max_batch=4, autoscaling={"min_replicas": 1, "max_replicas": 3})
    assert "num_gpus" not in cpu["ray_actor_options"] and cpu["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in cpu
    with pytest.raises(ValueError, match="not both"):
        deployment_options("cpu", max_batch=4, replicas=2, autoscaling={"max_replicas": 3})
    assert model_name("/x/resnet50.kiln") == "resnet50"
    with pytest.raises(ValueError, match="taken by the server"):
        model_name("/x/kiln.kiln")


def test_a_bad_engine_file_fails_before_ray_starts(tmp_path):
    """kiln serve reads and verifies every file first: one error line, no traceback, no Ray."""
    from typer.testing import CliRunner

    from kiln.cli.commands import app
    from kiln.serve.deploy import check_engine

    good = tmp_path / "m.kiln"
    kiln.build(torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),), device="cpu").save(good)
    assert check_engine(good) == "cpu"
    bad = tmp_path / "bad.kiln"
    data = bytearray(good.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(kiln.EngineFileError, match="integrity check"):
        check_engine(bad)
    result = CliRunner().invoke(app, ["serve", str(bad), "--port", str(free_port())])
    assert result.exit_code == 1
    assert "integrity check" in result.output and "Traceback" not in result.output


def test_json_data_of_half_precision_is_plain_numbers():
    assert protocol.json_data(torch.tensor([1.5, 2], dtype=torch.bfloat16)) == [1.5, 2.0]
    assert np.asarray(protocol.json_data(torch.tensor([[True], [False]]))).tolist() == [True, False]


def test_the_load_test_measures_answers_against_the_reference(monkeypatch):
    """benchmarks/serve_load.py: 0 for bitwise equal, the largest difference relative to the
    reference's largest value otherwise, inf where names, shapes or dtypes differ."""
    import importlib.util

    path = Path(__file__).parent.parent / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    serve_load = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_load", serve_load)  # its dataclasses look themselves up there
    spec.loader.exec_module(serve_load)
    want = {"y": torch.tensor([2.0, -4.0])}
    assert serve_load.difference({"y": torch.tensor([2.0, -4.0])}, want) == 0.0
    assert serve_load.difference({"y": torch.tensor([2.0, -3.96])}, want) == pytest.approx(0.01)
    assert serve_load.difference({"z": torch.tensor([2.0, -4.0])}, want) == float("inf")
    assert serve_load.difference({"y": torch.tensor([2.0])}, want) == float("inf")
    assert serve_load.difference({"y": torch.tensor([2, -4])}, want) == float("inf")
