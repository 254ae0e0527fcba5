"""``meshfed federation serve``: run the federation service (HTTPS, mutual TLS) over a SQLite file or etcd."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import click
from aiohttp import web

from discovery.mcs import DEFAULT_CIDR
from federation.records import FederationError
from federation.service import ServiceConfig, create_app, serve, state_of
from federation.service.credentials import ServingCredentials
from federation.store.factory import open_store
from federation.trust.errors import CAStoreError, TrustError
from federation.wire import DEFAULT_LIMITS

log = logging.getLogger("meshfed.federation.service")


@click.group()
def federation() -> None:
    """Run and inspect the federation service (membership, exports, merged catalog)."""


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:8443", param_hint="--listen")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _freeze_after_load(app: web.Application) -> None:
    """Once the catalog is loaded, move it out of the cyclic GC's sight: a large catalog is hundreds of thousands
    of long-lived objects, and full collections over them stall the event loop for tens of milliseconds."""
    await state_of(app).started.wait()
    gc.collect()
    gc.freeze()
    log.info("catalog loaded; %d objects frozen out of the cyclic GC", gc.get_freeze_count())


async def _serve(*, store_url: str, host: str, port: int, ca_dir: Path, config: ServiceConfig,
                 leaf_ttl: timedelta, trust_poll_s: float = 2.0) -> None:
    try:
        creds = ServingCredentials(ca_dir, leaf_ttl=leaf_ttl)
    except CAStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    store = open_store(store_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(store=store, bundle=creds.bundle, config=config, serving=creds.info)
    rotate = loop.create_task(creds.run(interval_s=trust_poll_s))
    frozen = loop.create_task(_freeze_after_load(app))
    try:
        async with serve(app, host=host, port=port, ssl_context=creds.context):
            click.echo(f"federation service listening on https://{host}:{port} store={store_url}", err=True)
            await stop.wait()
    finally:
        for task in (rotate, frozen):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await store.close()


@federation.command("serve")
@click.option("--store", "store_url", required=True, metavar="URL",
              help="sqlite:PATH (one file, the default kind) or etcd://HOST:PORT[,HOST:PORT...] (several replicas).")
@click.option("--listen", default="127.0.0.1:8443", show_default=True, metavar="HOST:PORT")
@click.option("--ca", "ca_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The federation service's CA directory (its intermediate, for spiffe://TD/meshfed/federation, "
                   "and the bundle's root-cert.pem).")
@click.option("--lease-ttl", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="A member that does not heartbeat for this long is marked unreachable and its exports withdrawn.")
@click.option("--cidr", default=DEFAULT_CIDR, show_default=True, help="ClusterSetIP range for ServiceImports.")
@click.option("--bookmark-interval", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="Idle watch streams get a bookmark this often.")
@click.option("--history", type=int, default=4096, show_default=True,
              help="Catalog change batches kept for watch resume (older revisions answer 410).")
@click.option("--leaf-ttl", type=float, default=24.0, show_default=True, metavar="HOURS",
              help="Lifetime of the server certificate; it is renewed at half, and at once when the CA directory "
                   "changes (root rotation: no restart needed).")
@click.option("--max-services", type=click.IntRange(min=1), default=DEFAULT_LIMITS.services, show_default=True,
              help="Services one member may publish in its export set (more: 422, limit maxServices).")
@click.option("--max-endpoints", type=click.IntRange(min=0), default=DEFAULT_LIMITS.endpoints, show_default=True,
              help="Pod addresses one exported service may carry (more: 422, limit maxEndpoints).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=DEFAULT_LIMITS.body_bytes,
              show_default=True, help="Largest request body (larger: 413, limit maxBodyBytes).")
def serve_cmd(store_url: str, listen: str, ca_dir: Path, lease_ttl: float, cidr: str, bookmark_interval: float,
              history: int, leaf_ttl: float, max_services: int, max_endpoints: int, max_body_bytes: int) -> None:
    """Run the federation service until SIGTERM/SIGINT."""
    host, port = _listen(listen)
    if lease_ttl <= 0:
        raise click.BadParameter("must be positive", param_hint="--lease-ttl")
    limits = replace(DEFAULT_LIMITS, services=max_services, endpoints=max_endpoints, body_bytes=max_body_bytes)
    config = ServiceConfig(lease_ttl_s=lease_ttl, cidr=cidr, bookmark_interval_s=bookmark_interval, history=history,
                           limits=limits)
    run: Callable[[], None] = lambda: asyncio.run(  # noqa: E731
        _serve(store_url=store_url, host=host, port=port, ca_dir=ca_dir, config=config,
               leaf_ttl=timedelta(hours=leaf_ttl)))
    try:
        run()
    except (TrustError, FederationError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
