"""The Ray Serve deployments: one engine per replica (KilnModel) and the /v2 server routes (KilnServer).

KilnModel answers `GET /v2/models/NAME`, `GET /v2/models/NAME/ready` and
`POST /v2/models/NAME/infer` over HTTP, and `infer(...)` / `metadata()` through a
DeploymentHandle (composition). Requests are decoded and checked on arrival (a bad one
is answered 400 at once and never joins a batch), then batched by kiln's DynamicBatcher;
the engine runs on one worker thread per replica, so the event loop keeps accepting
requests while a batch runs, and the next batch takes every request queued by then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

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
    static_shapes,
)

log = logging.getLogger("ray.serve")

LATENCY_MS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def json_response(doc: Any, status: int = 200) -> Response:
    import json

    return Response(json.dumps(doc, separators=(",", ":")).encode(), status_code=status, media_type=protocol.JSON_TYPE)


def error_response(message: str, status: int = 400) -> Response:
    return Response(protocol.error_body(message), status_code=status, media_type=protocol.JSON_TYPE)


def relative_path(request: Request, prefix: str) -> str:
    """The request's path below the application's route prefix and below `prefix` (e.g. /v2/models/NAME)."""
    path = request.url.path
    root = request.scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root) :]
    if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
        path = path[len(prefix) :]
    return "/" + path.strip("/")


class Metrics:
    """kiln's serving metrics (Ray's Prometheus metrics; Serve adds deployment/replica/application tags)."""

    def __init__(self, model: str):
        from ray.serve import metrics

        def histogram(name: str, description: str, boundaries: list[float]) -> Any:
            h = metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=("model",))
            h.set_default_tags({"model": model})
            return h

        self.requests = metrics.Counter(
            "kiln_requests", description="Inference requests answered, by status (ok, bad_request, error).",
            tag_keys=("model", "status"),
        )
        self.requests.set_default_tags({"model": model})
        self.batch_requests = histogram("kiln_batch_requests", "Requests in each dynamic batch.", BATCH_SIZES)
        self.call_rows = histogram("kiln_engine_call_rows", "Rows (samples) of requests in each engine call.",
                                   BATCH_SIZES)
        self.padded_rows = metrics.Counter("kiln_padded_rows", description="Zero rows added to fill engine batches.",
                                           tag_keys=("model",))
        self.padded_rows.set_default_tags({"model": model})
        self.queue_ms = histogram("kiln_queue_latency_ms", "Time a request waited for its batch to start (ms).",
                                  LATENCY_MS)
        self.engine_ms = histogram("kiln_engine_latency_ms", "Time of one engine call, inputs to outputs (ms).",
                                   LATENCY_MS)
        self.request_ms = histogram("kiln_request_latency_ms",
                                    "Time from a decoded request to its outputs, in the replica (ms).", LATENCY_MS)

    def answered(self, status: str) -> None:
        self.requests.inc(1, tags={"status": status})


@dataclass
class _Pending:
    inputs: list[torch.Tensor]
    arrived: float


class KilnModel:
    """One engine behind the Open Inference Protocol, with dynamic batching."""

    def __init__(self, engine_path: str, name: str, device: str | None = None, max_batch: int = 32,
                 batch_wait_ms: float = 2.0, trusted_keys: list[str] | None = None):
        self.name = name
        if trusted_keys:
            self.engine = kiln.load(engine_path, device=device, trusted_keys=trusted_keys)
        else:
            self.engine = kiln.load(engine_path, device=device)
        self.device = self.engine.device
        self.batching: Batching | None = engine_batching(self.engine)
        self.signature = signature(self.engine.inputs, self.engine.outputs, batched=self.batching is not None)
        self.tensor_outputs = [i for i, s in enumerate(self.engine.outputs) if s is not None]
        self.input_names = [m.name for m in self.signature.inputs]
        self.output_names = [m.name for m in self.signature.outputs]
        self.metrics = Metrics(name)
        # the engine calls' input buffers, reused (pinned for a CUDA engine: faster copies to it)
        self._staging = Staging(pin_memory=torch.device(self.device).type == "cuda")
        self._batcher: DynamicBatcher[_Pending] = DynamicBatcher(self._run, max_batch, batch_wait_ms / 1000)
        # One thread runs every engine call (and the warm-up: CUDA graph capture) of this replica.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kiln-{name}")
        self._executor.submit(self._warm_up).result()

    # -- HTTP -------------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        path = relative_path(request, f"/v2/models/{self.name}")
        if path.startswith("/versions/"):  # /v2/models/NAME/versions/V/...: an engine file is one version
            path = "/" + "/".join(path.split("/")[3:])
        method = request.method
        if method == "GET" and path == "/":
            return json_response(self.metadata())
        if method == "GET" and path == "/ready":
            return Response(status_code=200)
        if path != "/infer":
            return error_response(f"no route {method} {request.url.path}; see GET /v2/models/{self.name}", 404)
        if method != "POST":
            return error_response(f"{request.url.path} takes POST, not {method}", 405)
        try:
            body = await request.body()
            decoded = protocol.decode_request(body, self.signature, request.headers.get(protocol.HEADER_LENGTH))
            outputs = await self._infer(decoded.inputs)
            payload, headers = protocol.encode_response(self.name, decoded, outputs)
        except InputError as exc:
            self.metrics.answered("bad_request")
            return error_response(str(exc), 400)
        except Exception as exc:  # the server keeps serving; the client hears what failed
            self.metrics.answered("error")
            log.exception("kiln %s: inference failed", self.name)
            return error_response(f"inference failed: {type(exc).__name__}: {exc}", 500)
        self.metrics.answered("ok")
        return Response(payload, headers=headers)

    # -- handle API (composition with other deployments) ---------------------------------------------

    async def infer(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, torch.Tensor]:
        """Outputs (name → CPU tensor) for inputs given by name or in order (tensors or arrays)."""
        try:
            tensors = protocol.match_tensors(inputs, self.signature)
            outputs = await self._infer(tensors)
        except InputError:
            self.metrics.answered("bad_request")
            raise
        except Exception:
            self.metrics.answered("error")
            raise
        self.metrics.answered("ok")
        return {k: v.clone() for k, v in outputs.items()}

    def metadata(self) -> dict[str, Any]:
        return protocol.model_metadata(self.name, self.signature)

    def ready(self) -> bool:
        return True

    # -- batching ------------------------------------------------------------------------------------

    async def _infer(self, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.batching is not None:
            request_rows(inputs, self.input_names)
        arrived = time.perf_counter()
        outputs = await self._batcher.submit(_Pending(inputs, arrived))
        self.metrics.request_ms.observe((time.perf_counter() - arrived) * 1e3)
        if isinstance(outputs, Exception):  # the engine call holding this request's rows failed
            raise outputs
        return dict(zip(self.output_names, outputs))

    async def _run(self, batch: list[_Pending]) -> list[list[torch.Tensor] | Exception]:
        start = time.perf_counter()
        for item in batch:
            self.metrics.queue_ms.observe((start - item.arrived) * 1e3)
        self.metrics.batch_requests.observe(len(batch))
        calls: list[tuple[int, int, float]] = []
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._run_batch, [b.inputs for b in batch], calls)
        for rows, padded, ms in calls:
            self.metrics.call_rows.observe(rows)
            self.metrics.engine_ms.observe(ms)
            if padded > rows:
                self.metrics.padded_rows.inc(padded - rows)
        return results

    def _run_batch(self, requests: list[list[torch.Tensor]], calls: list[tuple[int, int, float]]) -> list:
        sizes: list[tuple[int, int]] = []

        def call(chunk: list[torch.Tensor]) -> list[torch.Tensor]:
            t0 = time.perf_counter()
            out = self._call(chunk)
            rows, padded = sizes[-1]
            calls.append((rows, padded, (time.perf_counter() - t0) * 1e3))
            return out

        with torch.inference_mode():
            return run_batched(call, requests, self.batching, on_call=lambda r, p: sizes.append((r, p)),
                               staging=self._staging)

    def _call(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One engine call: CPU inputs in, the tensor outputs back on the CPU."""
        result = self.engine(*[x.to(self.device) for x in inputs])
        flat = flat_outputs(result)
        return [flat[i].cpu() for i in self.tensor_outputs]

    def _warm_up(self) -> None:
        if not static_shapes(self.engine.inputs):  # a dynamic-shape engine captures each size on first use
            return
        with torch.inference_mode():
            self.engine(*[torch.zeros(s.shape, dtype=s.dtype, device=self.device) for s in self.engine.inputs])


class KilnServer:
    """The server-wide routes under /v2: server metadata, liveness, readiness, and unknown models."""

    def __init__(self, models: Mapping[str, str], version: str, ready_timeout_s: float = 5.0):
        self.models = dict(models)  # model name → its Serve application name
        self.version = version
        self.ready_timeout_s = ready_timeout_s
        self._handles: dict[str, Any] = {}

    async def __call__(self, request: Request) -> Response:
        path = relative_path(request, "/v2")
        method = request.method
        if method == "GET" and path == "/":
            return json_response(protocol.server_metadata(self.version))
        if method == "GET" and path == "/health/live":
            return Response(status_code=200)
        if method == "GET" and path == "/health/ready":
            waiting = await self.not_ready()
            if waiting:
                return error_response(f"not ready: {'; '.join(waiting)}", 503)
            return Response(status_code=200)
        parts = path.strip("/").split("/")
        if parts[0] == "models" and len(parts) >= 2:
            served = ", ".join(sorted(self.models)) or "none"
            return error_response(f"unknown model {parts[1]!r}; this server serves: {served}", 400)
        return error_response(f"no route {method} {request.url.path} (the Open Inference Protocol's are under /v2)",
                              404)

    async def not_ready(self) -> list[str]:
        """Why models are not ready (empty: all are)."""

        async def check(name: str, app_name: str) -> str | None:
            try:
                if name not in self._handles:
                    self._handles[name] = serve.get_deployment_handle("KilnModel", app_name=app_name)
                await asyncio.wait_for(self._handles[name].ready.remote(), self.ready_timeout_s)
            except Exception as exc:  # any failure to answer is "not ready", said with its reason
                self._handles.pop(name, None)
                return f"model {name!r}: {type(exc).__name__}: {exc}".strip().rstrip(":")
            return None

        results = await asyncio.gather(*(check(n, a) for n, a in self.models.items()))
        return [r for r in results if r]
