"""The federation service's aiohttp application: routes, the authentication middleware, and its lifecycle.

``create_app(store=..., bundle=..., config=...)`` builds the app over an open store; ``serve(...)`` (an async
context manager) runs it on an HTTPS listener whose TLS context requires a client certificate. Every route under
``/v1/`` except ``/v1/openapi.json`` needs the caller's cluster identity (401 without one); routes on
``/v1/clusters/{cluster}`` act only for the caller's own cluster (403 otherwise, logged). Errors are JSON:
``{"error": "...", "field": "services[2].ports[0].port" | null}``.

The catalog listing and watch also carry the peer snapshot of ``peers`` (a ``PeerHub`` the peer manager publishes
into, docs/peering.md): a ``peers`` field in ``GET /v1/catalog``, ``peers`` lines on the watch, ``GET /v1/peers``.
The SPIFFE bundle endpoint is not here: it needs a listener without required client certificates
(``federation.peering.service``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from discovery.mcs import DEFAULT_CIDR
from discovery.model import ClusterId, DiscoveryError, NetworkId, cluster_id
from federation import catalog as cat
from federation import offload, wire
from federation.clock import utcnow
from federation.peering.hub import PeerHub
from federation.records import (
    EventKind,
    FederationError,
    Member,
    RevisionCompacted,
    StaleGeneration,
    StoreEvent,
    UnknownCluster,
)
from federation.service.auth import Identify, Unauthenticated, bundle_identify, peer_chain
from federation.service.metrics import Metrics
from federation.service.openapi import document
from federation.service.state import CatalogState
from federation.store.base import Store
from federation.trust.bundle import TrustBundle, fingerprint
from federation.trust.errors import TrustError

log = logging.getLogger("meshfed.federation.service")

PUBLIC = frozenset({"/healthz", "/readyz", "/metrics", "/v1/openapi.json"})
NDJSON = "application/x-ndjson"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    lease_ttl_s: float = 10.0
    cidr: str = DEFAULT_CIDR
    bookmark_interval_s: float = 5.0
    history: int = 4096
    limits: wire.Limits = wire.DEFAULT_LIMITS  # what one member may publish (413/422 beyond)
    reap_interval_s: float = 0.0  # 0: the store expires leases itself; > 0: also call store.expire_leases()


class _Keys:
    state = web.AppKey("state", CatalogState)
    store = web.AppKey("store", object)
    metrics = web.AppKey("metrics", Metrics)
    config = web.AppKey("config", ServiceConfig)
    bundle = web.AppKey("bundle", object)
    identify = web.AppKey("identify", object)
    encoded = web.AppKey("encoded", object)
    decoded = web.AppKey("decoded", wire.DecodeCache)
    peers = web.AppKey("peers", dict)
    serving = web.AppKey("serving", object)
    peer_hub = web.AppKey("peer_hub", PeerHub)
    cluster = web.RequestKey("cluster", str)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(value), status=status, content_type="application/json")


def _error(status: int, message: str, *, field: str | None = None, **extra: Any) -> web.Response:
    return _json({"error": message, "field": field, **extra}, status)


def _store(request: web.Request) -> Store:
    store = request.app[_Keys.store]
    return store  # type: ignore[return-value]


def _state(request: web.Request) -> CatalogState:
    return request.app[_Keys.state]


def _caller(request: web.Request) -> ClusterId:
    return ClusterId(request[_Keys.cluster])


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


def _own_cluster(request: web.Request) -> ClusterId:
    """The path's cluster, which must be the caller's (403 otherwise)."""
    raw = request.match_info["cluster"]
    try:
        target = cluster_id(raw)
    except DiscoveryError as exc:
        raise _Refused(_error(400, str(exc), field="cluster")) from exc
    caller = _caller(request)
    if target != caller:
        request.app[_Keys.metrics].auth_failures.labels(reason="wrong_cluster").inc()
        log.warning("forbidden caller=%s target=%s method=%s path=%s", caller, target, request.method, request.path)
        raise _Refused(_error(403, f"cluster {caller} may not act for cluster {target}", field="cluster"))
    return target


def _too_large(limit: int, size: int | None) -> _Refused:
    got = f" ({size} bytes)" if size is not None else ""
    return _Refused(_error(413, f"request body is larger{got} than the limit of {limit} bytes (maxBodyBytes)",
                           limit="maxBodyBytes", maximum=limit))


async def _body(request: web.Request) -> Any:
    """The request body as JSON (``wire.loads``: hostile JSON is a ``WireError``, answered 400 naming the field),
    parsed off the event loop; a body over ``limits.body_bytes`` is 413 before it is read."""
    limit = request.app[_Keys.config].limits.body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit, request.content_length)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise _too_large(limit, None) from exc
    if len(raw) > limit:
        raise _too_large(limit, len(raw))
    return await offload.run(wire.loads, raw, items=len(raw) // _BYTES_PER_ITEM)


_BYTES_PER_ITEM = 256  # a body's size in bytes over this: about the number of values it holds (for offload.run)


def _route_name(request: web.Request) -> str:
    info = request.match_info
    route = info.route if info is not None else None
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


@dataclass(slots=True)
class _Peer:
    """One open client connection and the certificate it authenticated with (for rotation convergence)."""

    transport: Any
    cluster: str
    leaf_fingerprint: str
    intermediate_fingerprint: str
    root_fingerprint: str | None
    since: datetime
    last_request: datetime


def _track_peer(request: web.Request, chain: list[bytes]) -> None:
    """Remember which certificate each open connection presented (once per connection; closed ones are pruned
    when read), so ``GET /v1/trust/status`` can say whether any member still talks with an old-root chain."""
    transport = request.transport
    if transport is None:
        return
    peers: dict[int, _Peer] = request.app[_Keys.peers]
    now = utcnow()
    have = peers.get(id(transport))
    if have is not None and have.transport is transport:
        have.last_request = now
        return
    certs = [x509.load_der_x509_certificate(der) for der in chain[:2]]
    peers[id(transport)] = _Peer(transport=transport, cluster=request[_Keys.cluster],
                                 leaf_fingerprint=fingerprint(certs[0]),
                                 intermediate_fingerprint=fingerprint(certs[1]) if len(certs) > 1 else "",
                                 root_fingerprint=_bundle(request).issuing_root(certs), since=now, last_request=now)
    if len(peers) > 256:
        _open_peers(request.app)


def _open_peers(app: web.Application) -> list[_Peer]:
    peers: dict[int, _Peer] = app[_Keys.peers]
    for key in [k for k, p in peers.items() if p.transport.is_closing()]:
        del peers[key]
    return sorted(peers.values(), key=lambda p: (p.cluster, p.since))


@web.middleware
async def _middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    metrics = request.app[_Keys.metrics]
    route = _route_name(request)
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        if request.path not in PUBLIC:
            try:
                chain = peer_chain(request.transport.get_extra_info("ssl_object") if request.transport else None)
                identify: Identify = request.app[_Keys.identify]  # type: ignore[assignment]
                request[_Keys.cluster] = identify(chain)
                _track_peer(request, chain)
            except (Unauthenticated, TrustError, ValueError) as exc:
                metrics.auth_failures.labels(reason="unauthenticated").inc()
                log.warning("unauthenticated method=%s path=%s remote=%s error=%s", request.method, request.path,
                            request.remote, exc)
                raise _Refused(_error(401, f"client certificate does not identify a member cluster: {exc}")) from exc
        response = await handler(request)
    except _Refused as refused:
        response = refused.response
    except web.HTTPException as exc:
        response = _error(exc.status, exc.reason)
        for name in ("Allow", "Location", "Retry-After"):  # a 405 lists the route's methods (RFC 9110)
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
    except wire.ForeignCluster as exc:
        metrics.auth_failures.labels(reason="wrong_cluster").inc()
        log.warning("forbidden caller=%s body names another cluster method=%s path=%s field=%s",
                    request.get(_Keys.cluster), request.method, request.path, exc.field)
        response = _error(403, exc.reason, field=exc.field or None)
    except wire.LimitExceeded as exc:
        log.warning("over a publish limit caller=%s method=%s path=%s limit=%s field=%s",
                    request.get(_Keys.cluster), request.method, request.path, exc.limit, exc.field)
        response = _error(422, exc.reason, field=exc.field or None, limit=exc.limit, maximum=exc.maximum)
    except wire.WireError as exc:
        response = _error(400, exc.reason, field=exc.field or None)
    except FederationError as exc:
        log.warning("store error method=%s path=%s error=%s", request.method, request.path, exc)
        response = _error(503, f"store unavailable: {exc}")
    metrics.requests.labels(method=request.method, route=route, code=str(response.status)).inc()
    if not isinstance(response, web.Response) or response.content_type != NDJSON:
        metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)
    return response


# ---- routes -------------------------------------------------------------------------------------------------------


async def put_cluster(request: web.Request) -> web.Response:
    cluster = _own_cluster(request)
    info = wire.registration_from_json(await _body(request), cluster)
    now = utcnow()
    existing = _state(request).members().get(cluster)
    member = Member(info=info, registered_at=existing.registered_at if existing else now, renewed_at=now,
                    lease_ttl_s=request.app[_Keys.config].lease_ttl_s)
    revision = await _store(request).put_member(member)
    log.info("registered cluster=%s network=%s gateway=%s:%d revision=%d", cluster, info.network, info.gateway_host,
             info.gateway_port, revision)
    return _json({"member": wire.member_json(member, now=now), "revision": revision})


async def delete_cluster(request: web.Request) -> web.Response:
    cluster = _own_cluster(request)
    try:
        revision = await _store(request).remove_member(cluster)
    except UnknownCluster as exc:
        return _error(404, str(exc), field="cluster")
    request.app[_Keys.decoded].forget(cluster)
    log.info("deregistered cluster=%s revision=%d", cluster, revision)
    return _json({"cluster": cluster, "revision": revision})


async def heartbeat(request: web.Request) -> web.Response:
    cluster = _own_cluster(request)
    now = utcnow()
    try:
        member = await _store(request).renew(cluster, now=now)
    except UnknownCluster as exc:
        return _error(404, f"{exc}; register again", field="cluster")
    _state(request).renewed(cluster, member.renewed_at)
    return _json({"member": wire.member_json(member, now=now)})


async def put_exports(request: web.Request) -> web.Response:
    cluster = _own_cluster(request)
    metrics = request.app[_Keys.metrics]
    started = time.perf_counter()
    body = await _body(request)
    read = time.perf_counter()
    # Decoding and validating thousands of services is CPU work: done on a worker thread, so heartbeats and
    # watches of other members are served meanwhile.
    listed = body.get("services") if isinstance(body, dict) else None
    exports = await offload.run(wire.export_set_from_json, body, cluster, cache=request.app[_Keys.decoded],
                                limits=request.app[_Keys.config].limits,
                                items=len(listed) if isinstance(listed, list) else 0)
    decoded = time.perf_counter()
    try:
        revision = await _store(request).put_exports(exports)
    except StaleGeneration as exc:
        metrics.publishes.labels(outcome="stale").inc()
        return _error(409, str(exc), field="generation", generation=exc.got, storedGeneration=exc.stored)
    except UnknownCluster as exc:
        metrics.publishes.labels(outcome="unregistered").inc()
        return _error(404, f"{exc}", field="cluster")
    stored = time.perf_counter()
    metrics.publishes.labels(outcome="stored").inc()
    metrics.publish_seconds.observe(stored - started)
    await _state(request).offer(StoreEvent(revision=revision, kind=EventKind.EXPORTS, cluster=cluster,
                                           exports=exports))
    log.info("published cluster=%s generation=%d services=%d revision=%d read_ms=%.1f decode_ms=%.1f "
             "store_ms=%.1f catalog_ms=%.1f", cluster, exports.generation, len(exports.services), revision,
             (read - started) * 1000, (decoded - read) * 1000, (stored - decoded) * 1000,
             (time.perf_counter() - stored) * 1000)
    return _json({"cluster": cluster, "generation": exports.generation, "services": len(exports.services),
                  "revision": revision})


def _viewer_network(request: web.Request) -> NetworkId | None:
    member = _state(request).members().get(_caller(request))
    return member.info.network if member is not None else None


def _bundle(request: web.Request) -> TrustBundle:
    source: Callable[[], TrustBundle] = request.app[_Keys.bundle]  # type: ignore[assignment]
    return source()


async def get_catalog(request: web.Request) -> web.Response:
    state = _state(request)
    if not state.started.is_set():
        return _error(503, "catalog not loaded yet: the store has not answered")
    network = _viewer_network(request)
    catalog = state.view(state.catalog)
    bundle_pem = _bundle(request).to_pem().decode()
    peers = request.app[_Keys.peer_hub].snapshot

    def encode() -> bytes:
        doc = wire.catalog_json(cat.view(catalog, network=network))
        doc["trustBundle"] = bundle_pem
        doc["peers"] = wire.peer_snapshot_json(peers)
        # One service at a time: a single json.dumps of 20,000 services holds the GIL for a quarter second.
        services = doc.pop("services")
        return _dumps(doc)[:-1] + b',"services":[' + b",".join(_dumps(x) for x in services) + b"]}"

    # Shared per revision and viewer network, for at most a second (lease ages in it move with the clock); a big
    # catalog is encoded on a worker thread.
    shared: _Shared = request.app[_Keys.encoded]  # type: ignore[assignment]
    slot = ("catalog", catalog.revision, network, peers.version, bundle_pem, int(time.monotonic()))
    body = await shared.get(slot, encode, items=len(catalog.services))
    return web.Response(body=body, content_type="application/json")


class _Shared:
    """Encoded bodies shared by every request that needs the same one (the same revision for the same network):
    each is computed once, a large one on a worker thread, and the newest ``size`` are kept."""

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._entries: dict[tuple[Any, ...], asyncio.Future[bytes]] = {}

    async def get(self, slot: tuple[Any, ...], encode: Callable[[], bytes], *, items: int) -> bytes:
        entry = self._entries.get(slot)
        if entry is None:
            if items < offload.INLINE:
                return encode()
            entry = asyncio.ensure_future(offload.run(encode, items=items))
            self._entries[slot] = entry
            while len(self._entries) > self._size:
                del self._entries[next(iter(self._entries))]
        try:
            return await asyncio.shield(entry)
        except Exception:
            self._entries.pop(slot, None)
            raise


def _gone(state: CatalogState, revision: int) -> web.Response:
    return _error(410, f"revision {revision} is too old or unknown to this replica (oldest {state.oldest}): relist",
                  field="revision", revision=revision, oldest=state.oldest, current=state.revision)


async def watch_catalog(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    config = request.app[_Keys.config]
    metrics = request.app[_Keys.metrics]
    raw = request.query.get("revision")
    try:
        revision = int(raw) if raw is not None else -1
    except ValueError:
        return _error(400, f"revision {raw!r} is not an integer", field="revision")
    if revision < 0:
        return _error(400, "revision is required (from GET /v1/catalog)", field="revision")
    if not state.started.is_set():
        return _error(503, "catalog not loaded yet: the store has not answered")
    if revision > state.revision and not await state.wait_beyond(revision - 1, wait_s=config.bookmark_interval_s):
        return _gone(state, revision)
    try:
        batches = state.batches_after(revision)
    except RevisionCompacted:
        return _gone(state, revision)
    caller = _caller(request)
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
    await response.prepare(request)
    metrics.watch_streams.inc()
    log.info("watch open cluster=%s revision=%d", caller, revision)
    shared: _Shared = request.app[_Keys.encoded]  # type: ignore[assignment]
    hub = request.app[_Keys.peer_hub]
    # Peers lines only for clients that ask (?peers=1): an older agent would take an unknown line type for a broken
    # stream and never get past it.
    wants_peers = request.query.get("peers") == "1"
    peers_sent = -1 if wants_peers else hub.snapshot.version
    try:
        while True:
            if wants_peers and hub.snapshot.version != peers_sent:
                # The whole peer snapshot (bundles of peer trust domains, services peers exported to us): when the
                # stream opens and whenever it changes; the bookmark after it tells the client it is complete.
                snap = hub.snapshot
                await response.write(_dumps(wire.peers_line_json(revision, snap)) + b"\n")
                await response.write(_dumps(wire.bookmark_json(revision, leases=state.leases())) + b"\n")
                peers_sent = snap.version
            network = _viewer_network(request)
            for rev, changes in batches:
                lines = await shared.get(("watch", rev, network), _batch_encoder(rev, changes, network),
                                         items=len(changes))
                # In slices: TLS-encrypting megabytes in one write would hold the loop for as long.
                for at in range(0, len(lines), _WRITE_SLICE):
                    await response.write(lines[at:at + _WRITE_SLICE])
                await response.write(_dumps(wire.bookmark_json(rev, leases=state.leases())) + b"\n")
                metrics.watch_events.inc(len(changes))
                revision = rev
            if not await _wait_catalog_or_peers(state, revision, hub if wants_peers else None, peers_sent,
                                                wait_s=config.bookmark_interval_s):
                await response.write(_dumps(wire.bookmark_json(revision, leases=state.leases())) + b"\n")
            try:
                batches = state.batches_after(revision)
            except RevisionCompacted:
                log.info("watch fell behind the history cluster=%s revision=%d: closing", caller, revision)
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        metrics.watch_streams.dec()
        log.info("watch closed cluster=%s revision=%d", caller, revision)
    return response


_WRITE_SLICE = 256 * 1024  # bytes of a watch batch written at a time


async def _wait_catalog_or_peers(state: CatalogState, revision: int, hub: PeerHub | None, peers_version: int, *,
                                 wait_s: float) -> bool:
    """Wait until the catalog moves past ``revision`` or (with a ``hub``) the peer snapshot past ``peers_version``
    (True), or ``wait_s`` passes (False)."""
    if hub is None:
        return await state.wait_beyond(revision, wait_s=wait_s)
    if state.revision > revision or hub.snapshot.version != peers_version:
        return True
    waits = [asyncio.ensure_future(state.wait_beyond(revision, wait_s=wait_s)),
             asyncio.ensure_future(hub.wait_changed(peers_version, wait_s=wait_s))]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        for w in waits:
            with contextlib.suppress(asyncio.CancelledError):
                await w
    return state.revision > revision or hub.snapshot.version != peers_version


def _batch_encoder(revision: int, changes: list[cat.Change], network: NetworkId | None) -> Callable[[], bytes]:
    """The NDJSON lines of one batch as ``network`` sees it (without its bookmark)."""
    def encode() -> bytes:
        now = utcnow()
        return b"".join(_dumps(wire.change_json(revision, _view_change(c, network), now=now)) + b"\n"
                        for c in changes)
    return encode


def _view_change(change: cat.Change, network: NetworkId | None) -> cat.Change:
    if isinstance(change, cat.ServiceChange) and change.service is not None:
        return cat.ServiceChange(key=change.key, service=cat.view_service(change.service, network))
    return change


async def get_trust_bundle(request: web.Request) -> web.Response:
    bundle = _bundle(request)
    return _json({"trustDomain": bundle.trust_domain.name, "sequence": bundle.sequence,
                  "pem": bundle.to_pem().decode(), "jwks": bundle.to_jwks()})


async def get_trust_status(request: web.Request) -> web.Response:
    """What the federation itself depends on during a root rotation: the certificate it serves, the bundle it
    verifies clients with, and the chain every open member connection authenticated with."""
    bundle = _bundle(request)
    serving: Callable[[], Any] | None = request.app[_Keys.serving]  # type: ignore[assignment]
    connections = [
        {"cluster": p.cluster, "leaf_fingerprint": p.leaf_fingerprint,
         "intermediate_fingerprint": p.intermediate_fingerprint, "root_fingerprint": p.root_fingerprint,
         "since": p.since.isoformat(), "last_request": p.last_request.isoformat()}
        for p in _open_peers(request.app)
    ]
    return _json({"trustDomain": bundle.trust_domain.name, "bundleSequence": bundle.sequence,
                  "bundleFingerprints": list(bundle.fingerprints),
                  "serving": serving() if serving is not None else None, "connections": connections,
                  "members": sorted(str(c) for c in _state(request).members()),
                  # What each peer clusterset said it holds of our bundle (a new root must reach them first).
                  "peers": request.app[_Keys.peer_hub].status()})


async def get_peers(request: web.Request) -> web.Response:
    """Each peer clusterset: its bundle endpoint, the bundle held for its trust domain (sequence, age, expiry), the
    last refresh and error, and the services exchanged with it (what `meshfed status` shows)."""
    hub = request.app[_Keys.peer_hub]
    return _json({"peers": hub.status(), "version": hub.snapshot.version})


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = _state(request)
    if not state.started.is_set():
        return _json({"status": "unready", "error": state.last_error or "catalog not loaded yet"}, 503)
    if not state.healthy:
        return _json({"status": "unready", "error": f"store unreachable: {state.last_error}"}, 503)
    try:
        await asyncio.wait_for(_probe(_store(request)), 2.0)
    except (FederationError, OSError, TimeoutError) as exc:
        return _json({"status": "unready", "error": f"store unreachable: {exc or type(exc).__name__}"}, 503)
    return _json({"status": "ready", "revision": state.revision})


_PROBE = ClusterId("meshfed-readyz-probe")


async def _probe(store: Store) -> None:
    """One cheap round trip to the store: its revision if it has that call, else a lease renewal of a cluster
    that does not exist (answered with UnknownCluster by a store that is up)."""
    revision = getattr(store, "revision", None)
    if callable(revision):
        await revision()
        return
    try:
        await store.renew(_PROBE, now=utcnow())
    except UnknownCluster:
        pass


async def get_metrics(request: web.Request) -> web.Response:
    _refresh_gauges(request.app)
    body = generate_latest(request.app[_Keys.metrics].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_openapi(request: web.Request) -> web.Response:
    return _json(document())


def _refresh_gauges(app: web.Application) -> None:
    state, metrics = app[_Keys.state], app[_Keys.metrics]
    members = state.members()
    connected = sum(1 for m in members.values() if m.unreachable_since is None)
    metrics.members.labels(state="connected").set(connected)
    metrics.members.labels(state="unreachable").set(len(members) - connected)
    metrics.services.set(len(state.catalog.services))
    metrics.revision.set(state.revision)


ROUTES: tuple[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]], ...] = (
    ("PUT", "/v1/clusters/{cluster}", put_cluster),
    ("DELETE", "/v1/clusters/{cluster}", delete_cluster),
    ("POST", "/v1/clusters/{cluster}/heartbeat", heartbeat),
    ("PUT", "/v1/clusters/{cluster}/exports", put_exports),
    ("GET", "/v1/catalog", get_catalog),
    ("GET", "/v1/catalog/watch", watch_catalog),
    ("GET", "/v1/trust-bundle", get_trust_bundle),
    ("GET", "/v1/trust/status", get_trust_status),
    ("GET", "/v1/peers", get_peers),
    ("GET", "/v1/openapi.json", get_openapi),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", get_metrics),
)


# ---- lifecycle ----------------------------------------------------------------------------------------------------


async def grace_after_outage(store: Store, *, now: datetime | None = None) -> list[ClusterId]:
    """Run when a replica starts, before it serves: renew the lease of every member that was alive when the
    federation went down, so the federation's own outage never withdraws anyone.

    The last heartbeat any member got tells when the service stopped answering (healthy members renew every third
    of their TTL). Members renewed within one TTL of that moment were alive then; if their lease ran out since
    (a store with its own lease clock, like etcd, expires them while no replica runs), that was the federation's
    fault, and they get a fresh lease. Members that had already stopped heartbeating before stay unreachable.
    """
    snap = await store.snapshot()
    if not snap.members:
        return []
    now = now or utcnow()
    last_seen = max(m.renewed_at for m in snap.members)
    renewed: list[ClusterId] = []
    for member in snap.members:
        alive_then = (last_seen - member.renewed_at).total_seconds() <= member.lease_ttl_s
        if member.unreachable_since is None or alive_then:
            try:
                await store.renew(member.info.id, now=now)
            except UnknownCluster:
                continue
            renewed.append(member.info.id)
    if renewed:
        log.info("start: renewed leases of members alive when the federation stopped clusters=%s",
                 ",".join(renewed))
    return renewed


async def _grace(store: Store) -> None:
    await grace_after_outage(store)


async def _reap(store: Store, interval: float) -> None:
    expire = getattr(store, "expire_leases", None)
    if expire is None:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            await expire(now=utcnow())
        except FederationError as exc:
            log.warning("lease reaper: store error=%s", exc)


async def _follow_renewals(state: CatalogState, interval: float) -> None:
    """Heartbeats answered by other replicas reach this one's ``renewedAt`` through the store every ``interval``."""
    while True:
        await asyncio.sleep(max(interval, 0.2))
        try:
            await state.refresh_renewals()
        except FederationError as exc:
            log.debug("renewals refresh: store error=%s", exc)


def create_app(*, store: Store, bundle: Callable[[], TrustBundle], config: ServiceConfig | None = None,
               identify: Identify | None = None,
               serving: Callable[[], dict[str, Any]] | None = None,
               peers: PeerHub | None = None) -> web.Application:
    """The federation API over an open ``store``. ``identify`` maps a verified client chain to its cluster (by
    default ``cluster_of_peer`` against ``bundle()``); ``serving`` describes the certificate the service presents
    (``ServingCredentials.info``, reported by ``GET /v1/trust/status``); ``peers`` is the peer snapshot members get
    in the listing and the watch (none: no peers)."""
    config = config or ServiceConfig()
    metrics = Metrics()
    # aiohttp's own cap sits above ours, so ``_body`` answers first, with the JSON error naming the limit.
    app = web.Application(middlewares=[_middleware], client_max_size=config.limits.body_bytes + 1)
    state = CatalogState(store, cidr=config.cidr, history=config.history)
    app[_Keys.state] = state
    app[_Keys.store] = store
    app[_Keys.metrics] = metrics
    app[_Keys.config] = config
    app[_Keys.bundle] = bundle
    app[_Keys.identify] = identify or bundle_identify(bundle)
    app[_Keys.encoded] = _Shared()
    app[_Keys.decoded] = wire.DecodeCache()
    app[_Keys.peers] = {}
    app[_Keys.serving] = serving
    app[_Keys.peer_hub] = peers or PeerHub()
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await state.start(prepare=lambda: _grace(store))
        tasks: list[asyncio.Task[None]] = []
        if config.reap_interval_s > 0:
            tasks.append(asyncio.get_running_loop().create_task(_reap(store, config.reap_interval_s)))
        tasks.append(asyncio.get_running_loop().create_task(
            _follow_renewals(state, min(config.bookmark_interval_s, config.lease_ttl_s / 3)),
            name="federation-renewals"))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await state.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


def state_of(app: web.Application) -> CatalogState:
    return app[_Keys.state]


def metrics_of(app: web.Application) -> Metrics:
    return app[_Keys.metrics]


@contextlib.asynccontextmanager
async def serve(app: web.Application, *, host: str, port: int, ssl_context: ssl.SSLContext,
                shutdown_timeout: float = 2.0, also: Sequence[tuple[str, int]] = ()) -> AsyncIterator[web.AppRunner]:
    """Run ``app`` on ``host:port`` (and every ``(host, port)`` of ``also``) over TLS until the block exits."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        for h, p in ((host, port), *also):
            site = web.TCPSite(runner, h, p, ssl_context=ssl_context, reuse_address=True)
            await site.start()
            log.info("federation service listening on https://%s:%d", h, p)
        yield runner
    finally:
        await runner.cleanup()
