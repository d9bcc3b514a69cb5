"""Building and running the Serve applications: `app()` for one engine, `run()` for a whole server.

Layout on the Serve side: each engine is its own application (named after the model,
routed at /v2/models/NAME, deployment "KilnModel"), so the HTTP proxy hands a request
straight to a replica of its model; one small application ("kiln", routed at /v2)
answers server metadata, liveness, readiness and unknown model names.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import EngineFileError, KilnError

MODEL_DEPLOYMENT = "KilnModel"
SERVER_APP = "kiln"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def model_name(engine_path: str | os.PathLike, name: str | None = None) -> str:
    """The model's name on the wire: `name`, or the engine file's stem; URL-safe."""
    chosen = name if name is not None else Path(engine_path).stem
    if not _NAME.match(chosen):
        raise ValueError(
            f"model name {chosen!r} (from {engine_path}) must be letters, digits, '_', '.' or '-', starting with a "
            "letter or digit: rename the file or pass name="
        )
    if chosen == SERVER_APP:
        raise ValueError(f"model name {chosen!r} is taken by the server's own routes: rename the file or pass name=")
    return chosen


def check_engine(engine_path: str | os.PathLike, trusted_keys: Sequence[str] | None = None) -> str:
    """Read and verify an engine file as its replicas will (format, digest, signature with
    `trusted_keys`, plan validation), without a device; returns the device kind it was built for.
    A bad file fails here, with kiln's EngineFileError, before any replica starts."""
    from kiln.runtime import engine_file

    contents = engine_file.read_engine(engine_path, list(trusted_keys) if trusted_keys else None)
    return str(contents.header["build"]["device_type"])


def deployment_options(
    device: str, *, max_batch: int, replicas: int | None = None, autoscaling: Mapping[str, Any] | None = None,
    gpus_per_replica: float = 1.0, cpus_per_replica: float = 1.0, ray_actor_options: Mapping[str, Any] | None = None,
    replicas_per_gpu: int = 1,
) -> dict[str, Any]:
    """Serve deployment options for a model: GPU replicas take `gpus_per_replica` of a GPU each,
    shared by `replicas_per_gpu` replicas (more processes feeding one GPU: each replica decodes,
    batches and answers its requests in one Python process); CPU replicas take `cpus_per_replica`
    CPUs. `autoscaling` (Serve's autoscaling_config) replaces a fixed replica count."""
    if replicas is not None and autoscaling:
        raise ValueError("give replicas or autoscaling, not both (autoscaling sets min/max_replicas)")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if replicas_per_gpu < 1:
        raise ValueError(f"replicas_per_gpu must be at least 1, got {replicas_per_gpu}")
    cuda = device.startswith("cuda")
    actor: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if cuda:
        actor["num_gpus"] = gpus_per_replica / replicas_per_gpu
    actor.update(ray_actor_options or {})
    options: dict[str, Any] = {
        "name": MODEL_DEPLOYMENT,
        "ray_actor_options": actor,
        # a full batch can form while the previous one runs
        "max_ongoing_requests": max(2 * max_batch, 8),
    }
    if autoscaling:
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = (replicas if replicas is not None
                                   else _default_replicas(device, gpus_per_replica) * (replicas_per_gpu if cuda else 1))
    return options


def _default_replicas(device: str, gpus_per_replica: float) -> int:
    """One replica per GPU of the Ray cluster (when connected), else one."""
    if not device.startswith("cuda"):
        return 1
    import ray

    if not ray.is_initialized():
        return 1
    gpus = ray.cluster_resources().get("GPU", 0)
    return max(1, int(math.floor(gpus + 1e-9)))


def app(
    engine_path: str | os.PathLike,
    *,
    name: str | None = None,
    device: str | None = None,
    max_batch: int = 32,
    batch_wait_ms: float = 2.0,
    replicas: int | None = None,
    autoscaling: Mapping[str, Any] | None = None,
    gpus_per_replica: float = 1.0,
    cpus_per_replica: float = 1.0,
    ray_actor_options: Mapping[str, Any] | None = None,
    trusted_keys: Sequence[str | os.PathLike] | None = None,
    replicas_per_gpu: int = 1,
) -> Any:
    """The Ray Serve application serving one engine file (a bound KilnModel deployment).

    Run it alone (`serve.run(kiln.serve.app("m.kiln"), route_prefix="/v2/models/m")`) or pass
    it to your own deployment's `.bind(...)` and call `await handle.infer.remote({"x": tensor})`.
    `device` defaults to the kind the engine was built for; `replicas` to one per GPU of the
    connected Ray cluster (CUDA engines, times `replicas_per_gpu`, which share each GPU) or one
    (CPU engines). With `trusted_keys` (public key
    files), replicas refuse an engine none of them signed. The engine file (and the keys) must be
    readable at the same path on every node that runs a replica.
    """
    from ray import serve

    from kiln.serve.model import KilnModel

    path = Path(engine_path).resolve()
    chosen = model_name(path, name)
    keys = [str(Path(k).resolve()) for k in trusted_keys] if trusted_keys else None
    kind = device or check_engine(path, keys)
    options = deployment_options(
        kind, max_batch=max_batch, replicas=replicas, autoscaling=autoscaling, gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica, ray_actor_options=ray_actor_options, replicas_per_gpu=replicas_per_gpu,
    )
    return serve.deployment(KilnModel).options(**options).bind(str(path), chosen, device, max_batch, batch_wait_ms,
                                                               keys)


def server_app(models: Mapping[str, str]) -> Any:
    """The /v2 routes (server metadata, health, unknown models) for `models` (name → Serve application)."""
    from ray import serve

    import kiln
    from kiln.serve.model import KilnServer

    deployment = serve.deployment(KilnServer).options(name="KilnServer", ray_actor_options={"num_cpus": 0})
    return deployment.bind(dict(models), kiln.__version__)


@dataclass
class Served:
    """What `run` started: the base URL, the models (name → engine file) and who owns Ray."""

    url: str
    models: dict[str, str]
    started_ray: bool
    applications: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)  # each Ray node's Prometheus endpoint
    ray_address: str | None = None  # the Ray cluster's GCS address (ray.init(address=...) joins it)
    # with direct ingress: model name → the base URL of each of its replicas' own HTTP servers
    direct: dict[str, list[str]] = field(default_factory=dict)


def run(
    engine_paths: Sequence[str | os.PathLike],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    device: str | None = None,
    max_batch: int = 32,
    batch_wait_ms: float = 2.0,
    replicas: int | None = None,
    autoscaling: Mapping[str, Any] | None = None,
    cpus_per_replica: float = 1.0,
    access_log: bool = False,
    request_timeout_s: float | None = 30.0,
    trusted_keys: Sequence[str | os.PathLike] | None = None,
    direct_ingress: bool = False,
    replicas_per_gpu: int = 1,
) -> Served:
    """Serve every engine over the Open Inference Protocol; returns once all are ready.

    A local Ray instance (loopback only) is started unless Ray is already initialized in
    this process or `address` names an existing cluster. GPU replicas share each GPU among
    the engines (one replica of each engine per GPU by default). A request not answered
    within `request_timeout_s` is answered by the HTTP proxy with an error (408), so no client
    waits forever on a replica that died; None: no limit. `host`, `port` and the timeout
    apply when this call starts Serve (an existing Serve instance keeps its own).

    `direct_ingress`: every model replica also serves the protocol on an HTTP port of its own
    (Ray Serve's direct ingress), listed in `Served.direct`; a request sent there skips the HTTP
    proxy and the Ray calls between it and the replica. It needs a Ray instance this call starts
    (the switch is read when Ray's processes start); a replica started again gets another port.
    """
    names: dict[str, str] = {}
    for p in engine_paths:
        chosen = model_name(p)
        if chosen in names:
            raise ValueError(f"two engines are named {chosen!r} ({names[chosen]} and {p}): rename one file")
        if not Path(p).is_file():
            raise EngineFileError(f"no engine file at {p}")
        names[chosen] = str(Path(p).resolve())
    keys = [str(Path(k).resolve()) for k in trusted_keys] if trusted_keys else None
    kinds = {n: check_engine(p, keys) for n, p in names.items()}  # a bad file fails here, not in a replica
    if device is not None:
        kinds = dict.fromkeys(kinds, device)
    if direct_ingress:
        import ray

        if address is not None or ray.is_initialized():
            raise ValueError("direct_ingress needs a Ray instance kiln starts (no address, Ray not initialized): "
                             "Ray's processes read the switch when they start")
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        # Ray keeps a stopping replica's port open 30 s for load balancers to notice; nothing here balances
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    started = connect(address)
    import ray
    from ray import serve

    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
        logging_config = {"enable_access_log": access_log, "log_level": "INFO" if access_log else "WARNING"}
        gpu_share = 1.0 / max(1, sum(1 for k in kinds.values() if k.startswith("cuda")))
        targets = [
            (app(p, name=n, device=kinds[n], max_batch=max_batch, batch_wait_ms=batch_wait_ms, replicas=replicas,
                 autoscaling=autoscaling, gpus_per_replica=gpu_share, cpus_per_replica=cpus_per_replica,
                 trusted_keys=keys, replicas_per_gpu=replicas_per_gpu),
             n, f"/v2/models/{n}")
            for n, p in names.items()
        ]
        targets.append((server_app({n: n for n in names}), SERVER_APP, "/v2"))
        try:
            if hasattr(serve, "run_many") and hasattr(serve, "RunTarget"):  # all at once (newer Ray)
                serve.run_many([serve.RunTarget(target=a, name=n, route_prefix=r, logging_config=logging_config)
                                for a, n, r in targets])
            else:
                for a, n, r in targets:
                    serve.run(a, name=n, route_prefix=r, logging_config=logging_config)
        except RuntimeError as exc:  # a replica failed to start: Ray's log above holds its traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KilnError(f"Ray Serve could not start the models ({first}); the replica's error is in the "
                            "log above") from None
    except BaseException:
        if started:
            _stop(started_ray=True, applications=[])
        raise
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    metrics = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
               for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    return Served(url=f"http://{shown}:{port}", models=names, started_ray=started,
                  applications=[*names, SERVER_APP], metrics=metrics,
                  ray_address=ray.get_runtime_context().gcs_address,
                  direct=direct_urls(list(names)) if direct_ingress else {})


def direct_urls(models: Sequence[str]) -> dict[str, list[str]]:
    """Model name → the base URL of each replica's own HTTP server (Ray Serve's direct ingress; its
    controller's target groups). Empty for a model whose requests go through the proxy only."""
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote())
    urls: dict[str, list[str]] = {}
    for group in groups:
        if group.app_name in models and str(getattr(group.protocol, "value", group.protocol)).upper() == "HTTP":
            # a group of proxies (direct ingress off, or no replica running yet) points at the proxy port
            targets = [t for t in group.targets if "proxy" not in t.name.lower()]
            if targets:
                urls[group.app_name] = sorted(f"http://{t.ip}:{t.port}" for t in targets)
    return urls


def connect(address: str | None = None) -> bool:
    """Connect to Ray: the cluster at `address` ("auto": the one `ray start` started here), or a new
    local instance bound to loopback only. Returns whether this call started Ray (and should stop it)."""
    if address is None or is_loopback(address):
        # A local instance serves this machine only: its processes listen on 127.0.0.1, not on the
        # machine's network address (Ray's own switch for single-machine use). Set before Ray reads it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        from ray._private import ray_constants  # read when Ray was imported, maybe before this call

        ray_constants.ENABLE_RAY_CLUSTER = False
    # "local": always a new instance of our own, never one found through RAY_ADDRESS or `ray start`.
    ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING")
    return address is None


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def shutdown(served: Served) -> None:
    """Stop what `run` started: the whole local Ray instance, or only kiln's applications on a cluster."""
    _stop(served.started_ray, served.applications)


def _stop(started_ray: bool, applications: Sequence[str]) -> None:
    import ray
    from ray import serve

    if started_ray:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        return
    for name in applications:
        serve.delete(name)
