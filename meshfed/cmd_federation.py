"""``meshfed federation serve``: run the federation service (HTTPS, mutual TLS) over a SQLite file or etcd."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import click
from aiohttp import web

from discovery.mcs import DEFAULT_CIDR
from federation.records import FederationError
from federation.service import ServiceConfig, create_app, serve, state_of
from federation.store.factory import open_store
from federation.trust.bundle import TrustBundle
from federation.trust.ca import IntermediateCA, issue_workload
from federation.trust.errors import TrustError
from federation.trust.spiffe import SpiffeId
from federation.trust.store import load_bundle, load_cluster_ca
from federation.trust.tls import load_identity, server_ssl_context
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


class _BundleFile:
    """The trust bundle of the CA directory, re-read when ``root-cert.pem`` changes (root rotation)."""

    def __init__(self, ca_dir: Path) -> None:
        self._dir = ca_dir
        self._mtime = 0.0
        self._bundle = load_bundle(ca_dir)
        self.tls: ssl.SSLContext | None = None  # roots added to the bundle are added to its verify store too

    def __call__(self) -> TrustBundle:
        try:
            mtime = (self._dir / "root-cert.pem").stat().st_mtime
        except OSError:
            return self._bundle
        if mtime != self._mtime:
            try:
                bundle = load_bundle(self._dir)
                self._mtime = mtime
                if bundle != self._bundle:
                    log.info("trust bundle reloaded dir=%s roots=%d", self._dir, len(bundle.roots))
                    if self.tls is not None:
                        self.tls.load_verify_locations(cadata=bundle.to_pem().decode())
                self._bundle = bundle
            except (TrustError, ssl.SSLError) as exc:
                log.warning("bundle reload failed dir=%s error=%s; keeping the previous bundle", self._dir, exc)
        return self._bundle


def _load_leaf(ctx: ssl.SSLContext, ca: IntermediateCA, identity: SpiffeId, ttl: timedelta) -> None:
    key_pem, chain = issue_workload(ca, identity, ttl=ttl)
    load_identity(ctx, b"".join(chain), key_pem)


async def _rotate_leaf(ctx: ssl.SSLContext, ca: IntermediateCA, identity: SpiffeId, ttl: timedelta) -> None:
    """Re-issue the server's leaf at half its lifetime (new connections get the new one)."""
    while True:
        await asyncio.sleep(ttl.total_seconds() / 2)
        try:
            _load_leaf(ctx, ca, identity, ttl)
            log.info("server certificate renewed identity=%s", identity)
        except (TrustError, ssl.SSLError, OSError) as exc:
            log.error("server certificate renewal failed error=%s", exc)


async def _freeze_after_load(app: web.Application) -> None:
    """Once the catalog is loaded, move it out of the cyclic GC's sight: a large catalog is hundreds of thousands
    of long-lived objects, and full collections over them stall the event loop for tens of milliseconds."""
    await state_of(app).started.wait()
    gc.collect()
    gc.freeze()
    log.info("catalog loaded; %d objects frozen out of the cyclic GC", gc.get_freeze_count())


async def _serve(*, store_url: str, host: str, port: int, ca_dir: Path, config: ServiceConfig,
                 leaf_ttl: timedelta) -> None:
    bundle = _BundleFile(ca_dir)
    ca = load_cluster_ca(ca_dir)
    identity = SpiffeId.federation(bundle().trust_domain)
    if ca.authority != identity:
        raise click.ClickException(f"{ca_dir}: holds the CA of {ca.authority}, not of the federation service "
                                   f"({identity}); create it with 'meshfed ca' for the federation authority")
    key_pem, chain = issue_workload(ca, identity, ttl=leaf_ttl)
    ctx = server_ssl_context(b"".join(chain), key_pem, bundle())
    bundle.tls = ctx
    store = open_store(store_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(store=store, bundle=bundle, config=config)
    rotate = loop.create_task(_rotate_leaf(ctx, ca, identity, leaf_ttl))
    frozen = loop.create_task(_freeze_after_load(app))
    try:
        async with serve(app, host=host, port=port, ssl_context=ctx):
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
              help="Lifetime of the server certificate; it is renewed at half.")
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
