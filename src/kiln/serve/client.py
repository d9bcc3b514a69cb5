"""A small Open Inference Protocol client over one keep-alive HTTP connection (stdlib only, no Ray).

    client = Client("http://127.0.0.1:8000")
    outputs = client.infer("resnet50", {"x": images})    # name → tensor
    client.metadata("resnet50"); client.ready()

One Client per thread: it holds one connection. Any HTTP client speaking KServe v2 works
as well (tritonclient, kserve's InferenceRESTClient, curl).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch

from kiln.errors import InputError, KilnError
from kiln.serve import protocol


class ServerError(KilnError):
    """The server answered a request with an error (status 5xx), or not at all."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r} is not an http://host:port URL")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self._conn: http.client.HTTPConnection | None = None
        self.resent = 0  # requests sent again on a fresh connection after the old one was found closed

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Reply:
        """One HTTP exchange; a broken connection is reopened once (keep-alive may have timed out)."""
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=dict(headers or {}))
                response = self._conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt == 0 and isinstance(exc, http.client.RemoteDisconnected):
                    self.resent += 1  # the server closed the kept-alive connection: send again, counted
                    continue
                raise ServerError(f"{method} {path}: no answer ({type(exc).__name__}: {exc})") from None
            except OSError as exc:
                self.close()
                raise ServerError(f"{method} {path}: no answer ({type(exc).__name__}: {exc})") from None
            if response.will_close:
                self.close()
            return Reply(response.status, data, {k.lower(): v for k, v in response.getheaders()})
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def infer(self, model: str, inputs: Mapping[str, torch.Tensor], binary: bool = True,
              outputs: Sequence[str] | None = None, request_id: str | None = None) -> dict[str, torch.Tensor]:
        """Outputs by name. A 4xx answer raises InputError with the server's message; 5xx, 408 (timed out)
        and 429 (overloaded), ServerError: those may succeed when sent again."""
        body, headers = protocol.encode_request(inputs, binary=binary, request_id=request_id, outputs=outputs,
                                                binary_outputs=binary)
        reply = self.request("POST", f"/v2/models/{model}/infer", body, headers)
        _raise_for(reply)
        if request_id is not None:
            got = json.loads(_header_json(reply)).get("id")
            if got != request_id:
                raise ServerError(f"the answer is for request {got!r}, not {request_id!r}")
        return protocol.decode_response(reply.body, reply.headers.get(protocol.HEADER_LENGTH))

    def metadata(self, model: str | None = None) -> dict[str, Any]:
        reply = self.request("GET", f"/v2/models/{model}" if model else "/v2")
        _raise_for(reply)
        return json.loads(reply.body)

    def ready(self, model: str | None = None) -> bool:
        try:
            reply = self.request("GET", f"/v2/models/{model}/ready" if model else "/v2/health/ready")
        except ServerError:
            return False
        return reply.status == 200

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _header_json(reply: Reply) -> bytes:
    length = reply.headers.get(protocol.HEADER_LENGTH)
    return reply.body[: int(length)] if length is not None else reply.body


def _raise_for(reply: Reply) -> None:
    if reply.status == 200:
        return
    try:
        message = json.loads(reply.body)["error"]
    except (ValueError, KeyError, TypeError):
        message = reply.body[:500].decode(errors="replace")
    if 400 <= reply.status < 500 and reply.status not in (408, 429):  # timeouts and back-pressure: try again
        raise InputError(f"HTTP {reply.status}: {message}")
    raise ServerError(f"HTTP {reply.status}: {message}", reply.status)
