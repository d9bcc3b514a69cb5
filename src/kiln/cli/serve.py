"""`kiln serve`: engines behind the Open Inference Protocol (KServe v2) on Ray Serve."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import typer

from kiln.cli.app import command
from kiln.cli.common import console, fail, trusted_key_option


def _parse_device(text: str | None) -> str | None:
    if text is None or text in ("cpu", "cuda"):
        return text
    raise typer.BadParameter(f"{text!r} is not a device: use cuda or cpu")


def _parse_autoscaling(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON ({exc}); e.g. '{{\"min_replicas\": 1, \"max_replicas\": 4}}'") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("give a JSON object of Ray Serve autoscaling_config fields")
    return value


@command("serve")
def serve_command(
    engines: list[Path] = typer.Argument(..., help="Engine files; each is served as /v2/models/<file stem>.",
                                         metavar="ENGINE..."),
    port: int = typer.Option(8000, metavar="N", help="HTTP port."),
    host: str = typer.Option("127.0.0.1", metavar="ADDRESS",
                             help="HTTP address to listen on (0.0.0.0: every interface)."),
    replicas: int = typer.Option(None, min=1, metavar="N", show_default="one per GPU; one on a CPU",
                                 help="Replicas per engine."),
    max_batch: int = typer.Option(32, min=1, metavar="N", help="Most requests in one dynamic batch."),
    batch_wait_ms: float = typer.Option(2.0, min=0.0, metavar="MS", help="Longest wait for a batch to fill, in ms."),
    device: str = typer.Option(None, parser=_parse_device, metavar="cuda|cpu",
                               show_default="the kind each engine was built for", help="Where replicas run."),
    address: str = typer.Option(None, metavar="ADDRESS", show_default="a new local Ray instance, loopback only",
                                help="Ray cluster to join: its address (head:6379), or auto for the one `ray start` "
                                "started here."),
    autoscaling: str = typer.Option(None, parser=_parse_autoscaling, metavar="JSON",
                                    help="Ray Serve autoscaling_config, e.g. '{\"min_replicas\":1,\"max_replicas\":4}' "
                                    "(instead of --replicas)."),
    cpus_per_replica: float = typer.Option(1.0, min=0.0, metavar="N", help="CPUs Ray reserves for each replica."),
    access_log: bool = typer.Option(False, help="Log every request (Ray Serve's access log)."),
    trusted_key: list[Path] = trusted_key_option(),
    request_timeout_s: float = typer.Option(30.0, min=0.0, metavar="S", help="Answer a request not done in S "
                                            "seconds with an error (HTTP 408) instead of letting it wait; 0: never."),
    replicas_per_gpu: int = typer.Option(1, min=1, metavar="K", help="GPU replicas share each GPU K ways (more "
                                         "processes decoding and batching for one GPU); the default replica "
                                         "count is K per GPU."),
    direct_ingress: bool = typer.Option(False, help="Each replica also serves HTTP on a port of its own (Ray "
                                        "Serve's direct ingress): requests sent there skip the HTTP proxy."),
) -> None:
    """Serve ENGINE(s) over HTTP (Open Inference Protocol / KServe v2) on Ray Serve, with dynamic batching."""
    try:
        from kiln.serve import deploy
    except ImportError as exc:
        raise fail(f"kiln serve needs Ray Serve ({exc}): pip install 'kiln[serve]'") from None
    from kiln.errors import KilnError

    console.print(f"starting Ray Serve for {len(engines)} engine(s)…")
    try:
        served = deploy.run(
            engines, host=host, port=port, address=address, device=device, max_batch=max_batch,
            batch_wait_ms=batch_wait_ms, replicas=replicas, autoscaling=autoscaling,
            cpus_per_replica=cpus_per_replica, access_log=access_log, request_timeout_s=request_timeout_s or None,
            trusted_keys=trusted_key or None, direct_ingress=direct_ingress,
            replicas_per_gpu=replicas_per_gpu,
        )
    except (KilnError, ValueError, OSError) as exc:
        raise fail(exc) from None
    for name, path in served.models.items():
        console.print(f"  [green]✓[/] {name:<12} {served.url}/v2/models/{name}/infer   ({path})", soft_wrap=True)
        for url in served.direct.get(name, []):
            console.print(f"    replica (direct): {url}/v2/models/{name}/infer", soft_wrap=True)
    for url in served.metrics:
        console.print(f"  metrics (Prometheus): {url}", soft_wrap=True)
    console.print(f"  Ray: {served.ray_address}" + ("  (local, loopback only)" if served.started_ray else ""))
    console.print(f"ready: {served.url}/v2/health/ready   (Ctrl-C or SIGTERM stops)", soft_wrap=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.print("stopping…")
        deploy.shutdown(served)
        console.print("stopped")
