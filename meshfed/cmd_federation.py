"""``meshfed federation``: run the federation service (``serve``: HTTPS, mutual TLS, over a SQLite file or etcd) and
inspect or change its membership (``members``, ``remove``)."""

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
from typing import Any

import click
from aiohttp import web

from discovery.addresses import InvalidAddress, parse_hostport
from discovery.mcs import DEFAULT_CIDR
from federation.peering.hub import PeerHub
from federation.peering.service import PeeringConfig, PeerManager, run_peering
from federation.records import FederationError
from federation.service import ServiceConfig, create_app, serve, state_of
from federation.service.credentials import ServingCredentials
from federation.store.factory import open_store
from federation.trust.errors import CAStoreError, TrustError
from federation.wire import DEFAULT_LIMITS
from meshfed.output import console, emit, fail, output_option, print_json
from meshfed.runstate import RunState

log = logging.getLogger("meshfed.federation.service")


@click.group()
def federation() -> None:
    """Run the federation service (serve), list its members (members) and remove one (remove)."""


def _listen(text: str) -> tuple[str, int]:
    try:
        address = parse_hostport(text, default_host="0.0.0.0", min_port=1)
    except InvalidAddress as exc:
        raise click.BadParameter(f"{exc}, e.g. 127.0.0.1:8443", param_hint="--listen") from exc
    return address.host, address.port


async def _freeze_after_load(app: web.Application) -> None:
    """Once the catalog is loaded, move it out of the cyclic GC's sight: a large catalog is hundreds of thousands
    of long-lived objects, and full collections over them stall the event loop for tens of milliseconds."""
    await state_of(app).started.wait()
    gc.collect()
    gc.freeze()
    log.info("catalog loaded; %d objects frozen out of the cyclic GC", gc.get_freeze_count())


METRICS_ONLY = "/metrics"


@web.middleware
async def _plain_metrics_only(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """On a ``--metrics-listen`` address (plain HTTP, no TLS) answer ``GET /metrics`` and nothing else."""
    transport = request.transport
    plain = transport is not None and transport.get_extra_info("sslcontext") is None
    if plain and (request.method != "GET" or request.path != METRICS_ONLY):
        raise web.HTTPNotFound(text="only GET /metrics is served here\n")
    response: web.StreamResponse = await handler(request)
    return response


async def _serve(*, store_url: str, host: str, port: int, ca_dir: Path, config: ServiceConfig,
                 leaf_ttl: timedelta, trust_poll_s: float = 2.0, also: tuple[tuple[str, int], ...] = (),
                 peering: PeeringConfig | None = None, peering_listens: tuple[tuple[str, int], ...] = (),
                 metrics_listens: tuple[tuple[str, int], ...] = ()) -> None:
    try:
        creds = ServingCredentials(ca_dir, leaf_ttl=leaf_ttl)
    except CAStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    store = open_store(store_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hub = PeerHub()
    app = create_app(store=store, bundle=creds.bundle, config=config, serving=creds.info, peers=hub)
    app.middlewares.insert(0, _plain_metrics_only)
    rotate = loop.create_task(creds.run(interval_s=trust_poll_s))
    frozen = loop.create_task(_freeze_after_load(app))
    manager = PeerManager(config=peering or PeeringConfig(), identity=creds, state=state_of(app), hub=hub)
    try:
        async with serve(app, host=host, port=port, ssl_context=creds.context, also=also) as runner, \
                contextlib.AsyncExitStack() as stack:
            for h, p in metrics_listens:  # Prometheus cannot check SPIFFE identities: /metrics alone, plain HTTP
                await web.TCPSite(runner, h, p, reuse_address=True).start()
            if peering_listens:
                await stack.enter_async_context(run_peering(manager, listens=list(peering_listens)))
            where = ", ".join(f"https://{h}:{p}" for h, p in ((host, port), *also))
            peer_where = ", ".join(f"https://{h}:{p}/" for h, p in peering_listens) or "off"
            click.echo(f"federation service listening on {where} store={store_url} bundle-endpoint={peer_where}",
                       err=True)
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
@click.option("--listen", "listens", multiple=True, default=("127.0.0.1:8443",), show_default=True,
              metavar="HOST:PORT", help="where to serve (repeatable: every address is served)")
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
@click.option("--peering-listen", "peering_listens", multiple=True, metavar="HOST:PORT",
              help="Serve the SPIFFE bundle endpoint (GET /, no client certificate) and the service exchange with "
                   "peer federations here (repeatable). Without it there is no bundle endpoint and no peering.")
@click.option("--metrics-listen", "metrics_listens", multiple=True, metavar="HOST:PORT",
              help="Also serve GET /metrics (and nothing else) here over plain HTTP, for a Prometheus on the same "
                   "host or pod (repeatable; loopback or the pod's own address: docs/observability.md).")
@click.option("--peers", "peers_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The peers file (YAML {peers: [...]}, the entries of clusterset.yaml's peers:), re-read when it "
                   "changes; 'meshfed peer add' writes it. Missing file: no peers yet.")
@click.option("--peer-state", "peer_state", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the last good peer bundles are kept (0700; default: peer-state beside the peers file).")
@click.option("--bundle-refresh-hint", type=click.IntRange(min=1), default=300, show_default=True,
              metavar="SECONDS", help="spiffe_refresh_hint of the bundle this federation serves.")
@click.option("--peer-refresh-min", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              metavar="SECONDS", help="A peer's refresh hint is never followed more often than this.")
@click.option("--peer-refresh-max", type=click.FloatRange(min=1.0), default=3600.0, show_default=True,
              metavar="SECONDS", help="... nor less often than this.")
@click.option("--peer-bundle-max-age", type=click.FloatRange(min=0.001), default=24.0, show_default=True,
              metavar="HOURS", help="A peer bundle not refreshed for this long expires (members stop getting it); "
                                    "it also expires when its last root does.")
@click.option("--peer-services-interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              metavar="SECONDS", help="How often each peer's exported services are pulled.")
def serve_cmd(store_url: str, listens: tuple[str, ...], ca_dir: Path, lease_ttl: float, cidr: str,
              bookmark_interval: float, history: int, leaf_ttl: float, max_services: int, max_endpoints: int,
              max_body_bytes: int, peering_listens: tuple[str, ...], peers_file: Path | None,
              peer_state: Path | None, bundle_refresh_hint: int, peer_refresh_min: float, peer_refresh_max: float,
              peer_bundle_max_age: float, peer_services_interval: float,
              metrics_listens: tuple[str, ...]) -> None:
    """Run the federation service until SIGTERM/SIGINT."""
    (host, port), *also = [_listen(listen) for listen in listens]
    metrics_at = tuple(_listen(listen) for listen in metrics_listens)
    peering_at = tuple(_listen(listen) for listen in peering_listens)
    if peers_file is not None and not peering_at:
        raise click.BadParameter("peers need a --peering-listen address (the peer exchange is served there)",
                                 param_hint="--peers")
    peering = PeeringConfig(peers_file=peers_file, state_dir=peer_state, refresh_hint_s=bundle_refresh_hint,
                            refresh_min_s=peer_refresh_min, refresh_max_s=max(peer_refresh_max, peer_refresh_min),
                            max_age=timedelta(hours=peer_bundle_max_age), services_interval_s=peer_services_interval)
    if lease_ttl <= 0:
        raise click.BadParameter("must be positive", param_hint="--lease-ttl")
    limits = replace(DEFAULT_LIMITS, services=max_services, endpoints=max_endpoints, body_bytes=max_body_bytes)
    config = ServiceConfig(lease_ttl_s=lease_ttl, cidr=cidr, bookmark_interval_s=bookmark_interval, history=history,
                           limits=limits)
    run: Callable[[], None] = lambda: asyncio.run(  # noqa: E731
        _serve(store_url=store_url, host=host, port=port, ca_dir=ca_dir, config=config,
               leaf_ttl=timedelta(hours=leaf_ttl), also=tuple(also), peering=peering, peering_listens=peering_at,
               metrics_listens=metrics_at))
    try:
        run()
    except (TrustError, FederationError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


# ---- membership: list and remove members (a local run, or a federation given by URL) ---------------------------


def _run_federation(run_dir: Path) -> tuple[str, RunState]:
    from meshfed import local

    try:
        state = local.read_state(run_dir)
    except local.LocalRunError as exc:
        raise click.ClickException(str(exc)) from exc
    stopped = local.stopped_message(run_dir, state)
    if stopped:
        raise click.ClickException(stopped)
    if state.federation is None:
        raise click.ClickException(f"the run in {run_dir} has no federation service recorded")
    return state.federation.url, state


_TARGET = [
    click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".meshfed/run"),
                 show_default=True, help="a local run: its federation URL and CA directories (without --federation)"),
    click.option("--federation", "federation_url", metavar="URL", default=None,
                 help="a federation service's URL instead of a local run's"),
]


def _target(fn: Callable[..., None]) -> Callable[..., None]:
    for opt in reversed(_TARGET):
        fn = opt(fn)
    return fn


@federation.command("members")
@_target
@click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="with --federation: a cluster's client certificate chain (meshfed ca issue)")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="with --federation: its private key")
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="with --federation: the trust bundle (PEM roots)")
@output_option
def members_cmd(run_dir: Path, federation_url: str | None, cert: Path | None, key: Path | None,
                ca_bundle: Path | None, output: str) -> None:
    """List the federation's members as the service sees them: network, gateway, lease, reachability."""
    from meshfed import status

    if federation_url:
        if cert is None or key is None or ca_bundle is None:
            fail("--federation needs --cert, --key and --ca-bundle", hint="e.g. from 'meshfed ca issue'", code=2)
            return
        try:
            members = list(status.collect_remote(federation_url, cert=cert, key=key, ca_bundle=ca_bundle).members)
        except status.StatusError as exc:
            fail(str(exc), code=2)
            return
        in_run: set[str] = set()
    else:
        url, state = _run_federation(run_dir)
        got = status.local_members(state)
        if got is None:
            fail(f"the federation service at {url} does not answer", hint=f"meshfed status --run-dir {run_dir}",
                 code=2)
            return
        members, in_run = got, set(state.clusters)
    rows = [[m["cluster"], "UNREACHABLE since " + str(m["unreachable_since"]) if m.get("unreachable_since")
             else "connected", m.get("network"), m.get("locality") or "-", m.get("gateway"), m.get("renewed_at"),
             "yes" if m["cluster"] in in_run else ("no" if not federation_url else "-")] for m in members]
    emit(output, {"members": [dict(m) for m in members]},
         [("Members", ["cluster", "lease", "network", "locality", "gateway", "renewed at", "started by this run"],
           rows)])


@federation.command("remove")
@click.argument("cluster")
@_target
@click.option("--ca", "ca_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="the cluster's CA directory (its intermediate): the removal is made as that cluster. Default for "
                   "a local run: <run-dir>/ca/CLUSTER if it exists")
@output_option
def remove_cmd(cluster: str, run_dir: Path, federation_url: str | None, ca_dir: Path | None, output: str) -> None:
    """Remove CLUSTER from the federation: its member record and every export it published.

    Only a cluster can remove itself (the federation checks the caller's certificate), so this needs the cluster's
    CA directory; a fresh client certificate for spiffe://TD/meshfed/cluster/CLUSTER is made from it."""
    from discovery.model import ClusterId, DiscoveryError, cluster_id
    from federation.client import ClientError, FederationClient, NotRegistered, cluster_credentials

    try:
        cid = cluster_id(cluster)
    except DiscoveryError as exc:
        raise click.BadParameter(str(exc), param_hint="CLUSTER") from exc
    url = federation_url or _run_federation(run_dir)[0]
    if ca_dir is None:
        guess = run_dir / "ca" / cluster
        if federation_url or not guess.is_dir():
            fail(f"--ca is needed: the CA directory of cluster {cluster} (only a cluster can remove itself)",
                 hint=f"e.g. meshfed federation remove {cluster} --ca ca/{cluster}")
            return
        ca_dir = guess
    try:
        ctx, bundle = cluster_credentials(ca_dir, ClusterId(cid))
    except (TrustError, OSError) as exc:
        fail(f"{ca_dir}: cannot make {cluster}'s client certificate: {exc}")
        return

    async def remove() -> int:
        async with FederationClient(url, ssl_context=ctx, cluster=ClusterId(cid), bundle=bundle,
                                    request_timeout_s=10.0) as client:
            return await client.deregister()

    try:
        revision = asyncio.run(remove())
    except NotRegistered:
        fail(f"{cluster} is not a member of the federation at {url}",
             hint="'meshfed federation members' lists the members")
        return
    except ClientError as exc:
        fail(f"removing {cluster} from {url} failed: {exc}")
        return
    if output == "json":
        print_json({"removed": cluster, "federation": url, "revision": revision})
    else:
        console().print(f"removed {cluster} from the federation at {url} (its exports are withdrawn; revision "
                        f"{revision}). A control plane of {cluster} still running registers it again: stop it first.")
