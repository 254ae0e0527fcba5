"""The push pipeline: from what changed to the snapshots of the proxies it concerns, off the event loop.

::

    watchers --PushRequest(configs)--> PushDebouncer --merged request--> PushPipeline.push(request, ctx, proxies)
                                                                            |
      worker thread (one push at a time)                                    v
        1. changes    ConfigKeys -> service keys whose definition changed / whose endpoints changed
                      (a SHARD or CATALOG key is resolved by comparing that part of the registry: discovery.changes)
        2. shared     per xDS type and scope, one table of the resources every proxy of that scope shares
                      (SHARED_PARTS: sidecars' outbound clusters, their endpoints, routes per namespace, ...),
                      built per service key: only dirty keys are generated and serialised, only for the types
                      that depend on the change (an endpoints-only change touches EDS, and CDS only when the
                      clusters' own inputs moved); an entry whose bytes did not change is kept as it was
        3. per proxy  its own resources (inbound listeners and clusters, secrets) rebuilt only when their inputs
                      changed; its entry map of a type *is* the shared table's map when it has nothing of its own,
                      else derived from its previous map in O(changes) (gateway.snapshot lineage)
      event loop
        4. cache      set_snapshot per changed proxy, in slices that yield; the cache wakes only those streams

Everything in steps 1-3 reads only the frozen ``PushContext`` and ``ProxyInfo`` values it was given, so it runs on
a worker thread; the event loop keeps serving xDS, DNS and heartbeats meanwhile (a slice of Python in the thread
holds the GIL for at most the interpreter's switch interval).

The resources are the generators' (``gateway.generators``): their per-service functions build the shared tables,
their per-proxy functions the rest; ``generate_all`` remains the reference, and tests check the pipeline's
snapshots against it after every kind of change.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from discovery.changes import RegistryChanges, catalog_changes, shard_changes
from discovery.model import ClusterId, Registry, ServiceKey
from federation import offload
from gateway.cache import SnapshotCache
from gateway.context import PeerKey, ProxyInfo, ProxyKind, PushContext
from gateway.generators import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    capture,
    cds,
    eds,
    lds,
    proxyless,
    rds,
    sds,
)
from gateway.generators.lds import GATEWAY_LISTENER
from gateway.push import Kind, PushRequest
from gateway.snapshot import EntryMap, Snapshot, make_entry

log = logging.getLogger("meshfed.xds.pipeline")

TYPES: tuple[str, ...] = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE)
_EMPTY = EntryMap({})
_YIELD_S = 0.001


#: CPython's collector settings for a process that serves a push pipeline (see ``tune_gc``).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc(*, freeze: bool = True) -> None:
    """Set the garbage collector for a long-lived control plane: with the default thresholds (700, 10, 10) its full
    collections walk every live object (hundreds of thousands with 2,000 proxies) every few pushes and stop
    whichever thread allocates, the event loop's included, for 0.1-0.5 s; these thresholds make young collections
    rarer and full ones much rarer (cyclic garbage lives longer: a few percent more RSS in bench/xds.py).
    ``freeze`` moves everything alive now (the startup heap) out of the collector's reach for good."""
    gc.set_threshold(*GC_THRESHOLDS)
    if freeze:
        gc.freeze()


# ---- what each type of each proxy kind is made of -------------------------------------------------------------------


#: A key of a shared part's table: a service of the clusterset, or a service a peer exported to us.
PartKey = ServiceKey | PeerKey


def _order(key: PartKey) -> tuple[int, str, ServiceKey]:
    """The order of a table's keys (its pieces are combined in it): the clusterset's services, then the peers'."""
    return (0, "", key) if isinstance(key, ServiceKey) else (1, key.peer, key.key)


def _outbound_keys(ctx: PushContext) -> Mapping[PartKey, Any]:
    """Every callable service: the clusterset's (value: its ports) and the peers' (value: the PeerImport)."""
    def build() -> dict[PartKey, Any]:
        out: dict[PartKey, Any] = dict(ctx.outbound_services())
        for key, imp in ctx.peer_imports().items():
            out[key] = imp
        return out

    return ctx.memo("pipeline-outbound", build)


def _outbound_clusters(p: ProxyInfo, k: PartKey, value: Any, ctx: PushContext) -> dict[str, Any]:
    grpc = p.kind is ProxyKind.GRPC
    if isinstance(k, PeerKey):
        return cds.peer_clusters_of(value, ctx, grpc=grpc)
    return cds.outbound_clusters_of(k, value, ctx, grpc=grpc)


def _outbound_cluster_inputs(k: PartKey, value: Any, ctx: PushContext) -> Hashable:
    if isinstance(k, PeerKey):
        return (value.trust_domain, value.ports)  # the clusters read nothing else of a peer's service
    return cds.outbound_cluster_inputs(k, value, ctx)


def _outbound_assignments(p: ProxyInfo, k: PartKey, value: Any, ctx: PushContext) -> dict[str, Any]:
    if isinstance(k, PeerKey):
        return eds.peer_assignments_of(value, ctx)
    return eds.outbound_assignments_of(k, value, ctx)


def _virtual_hosts(p: ProxyInfo, k: PartKey, value: Any, ctx: PushContext) -> list[Any]:
    if isinstance(k, PeerKey):
        return rds.peer_virtual_hosts_of(p, value)
    return rds.virtual_hosts_of(p, k, value, ctx)


def _capture_chains(p: ProxyInfo, k: PartKey, value: Any, ctx: PushContext) -> list[Any]:
    if isinstance(k, PeerKey):
        return capture.peer_chains_of(value)
    return capture.outbound_chains_of(k, value, ctx)


def _capture_inputs(k: PartKey, value: Any, ctx: PushContext) -> Hashable:
    if isinstance(k, PeerKey):
        return (value.ports, value.ips)
    return capture.outbound_chain_inputs(k, value, ctx)


def _api_listeners(p: ProxyInfo, k: PartKey, value: Any, ctx: PushContext) -> dict[str, Any]:
    # Proxyless gRPC clients do not reach peers (cds.peer_clusters_of).
    return {} if isinstance(k, PeerKey) else lds.api_listeners_of(k, value)


def _exported_keys(ctx: PushContext) -> Mapping[PartKey, Any]:
    def build() -> dict[PartKey, Any]:
        return {s.key: s for s in ctx.exported_services()}

    return ctx.memo("pipeline-exported", build)


def _gateway_listener(proxy: ProxyInfo, parts: list[Any], ctx: PushContext) -> dict[str, Message]:
    listener = lds.gateway_listener(proxy, ctx, chains=[c for chains in parts for c in chains])
    return {GATEWAY_LISTENER: listener} if listener.filter_chains else {}


def _outbound_route(proxy: ProxyInfo, parts: list[Any], ctx: PushContext) -> dict[str, Message]:
    return {lds.OUTBOUND_ROUTE: rds.outbound_route(proxy, ctx, vhosts=[v for vhosts in parts for v in vhosts])}


def _virtual_outbound(proxy: ProxyInfo, parts: list[Any], ctx: PushContext) -> dict[str, Message]:
    return {capture.VIRTUAL_OUTBOUND: capture.virtual_outbound(proxy, ctx, pieces=parts)}


def _capture_scope(proxy: ProxyInfo) -> Hashable:
    """Everything the virtual outbound listener reads of a proxy: its identity (telemetry) and where it listens."""
    return (proxy.cluster, proxy.namespace, proxy.service_account, proxy.capture_bind, proxy.outbound_port)


def _virtual_service_keys(ctx: PushContext) -> Iterable[ServiceKey]:
    return ctx.policies.virtual_services.keys()


@dataclass(frozen=True)
class SharedPart:
    """Resources of one type that every proxy of one scope shares, built per service key.

    ``scope(proxy)`` names the table a proxy takes them from; ``keys(ctx)`` maps every key the part covers to what
    ``build(proxy, key, value, ctx)`` needs (``proxy`` is any proxy of the scope). With ``combine``, ``build``
    returns a piece (virtual hosts, filter chains) and ``combine(proxy, pieces in key order, ctx)`` the resources.
    ``inputs(key, value, ctx)``, when given, is everything ``build`` reads for the key: equal inputs, no rebuild.
    ``endpoints``: whether an endpoints-only change of a key concerns the part; ``also`` names keys that depend on
    other keys' definitions (routes of a VirtualService name other services' ports)."""

    name: str
    type_url: str
    scope: Callable[[ProxyInfo], Hashable]
    keys: Callable[[PushContext], Mapping[PartKey, Any]]
    build: Callable[[ProxyInfo, PartKey, Any, PushContext], Any]
    endpoints: bool
    inputs: Callable[[PartKey, Any, PushContext], Hashable] | None = None
    combine: Callable[[ProxyInfo, list[Any], PushContext], dict[str, Message]] | None = None
    also: Callable[[PushContext], Iterable[ServiceKey]] | None = None


@dataclass(frozen=True)
class OwnPart:
    """Resources of one type that are one proxy's own; rebuilt when ``inputs(proxy, ctx)`` changes. The inputs
    are looked at only when a change of a kind in ``on`` arrived, or (``services``) one of the proxy's own
    services changed."""

    build: Callable[[ProxyInfo, PushContext], dict[str, Message]]
    inputs: Callable[[ProxyInfo, PushContext], Hashable]
    on: frozenset[Kind] = frozenset()
    services: bool = False


@dataclass(frozen=True)
class Recipe:
    shared: SharedPart | None = None
    own: OwnPart | None = None


def _own_services(proxy: ProxyInfo, ctx: PushContext) -> tuple[Any, ...]:
    return tuple(ctx.registry.service(ctx.local, k) for k in proxy.services)


CDS_GATEWAY = SharedPart("cds-gateway", CLUSTER_TYPE, lambda p: (), _exported_keys,
                         lambda p, k, svc, ctx: cds.gateway_clusters_of(svc, ctx), endpoints=False,
                         inputs=lambda k, svc, ctx: svc.ports)
EDS_GATEWAY = SharedPart("eds-gateway", ENDPOINT_TYPE, lambda p: (), _exported_keys,
                         lambda p, k, svc, ctx: eds.gateway_assignments_of(svc, ctx), endpoints=True)
LDS_GATEWAY = SharedPart("lds-gateway", LISTENER_TYPE, lambda p: (p.ip, p.gateway_port), _exported_keys,
                         lambda p, k, svc, ctx: lds.gateway_chains_of(svc, ctx), endpoints=False,
                         combine=_gateway_listener)
CDS_OUTBOUND = SharedPart("cds-outbound", CLUSTER_TYPE, lambda p: p.kind is ProxyKind.GRPC, _outbound_keys,
                          _outbound_clusters, endpoints=True, inputs=_outbound_cluster_inputs)
EDS_OUTBOUND = SharedPart("eds-outbound", ENDPOINT_TYPE, lambda p: (), _outbound_keys,
                          _outbound_assignments, endpoints=True)
RDS_OUTBOUND = SharedPart("rds-outbound", ROUTE_TYPE, lambda p: (p.namespace, p.kind), _outbound_keys,
                          _virtual_hosts, endpoints=False,
                          combine=_outbound_route, also=_virtual_service_keys)
LDS_CAPTURE = SharedPart("lds-capture", LISTENER_TYPE, _capture_scope, _outbound_keys,
                         _capture_chains, endpoints=True, inputs=_capture_inputs,
                         combine=_virtual_outbound)
LDS_API = SharedPart("lds-api", LISTENER_TYPE, lambda p: (), _outbound_keys,
                     _api_listeners, endpoints=False)

SDS_OWN = OwnPart(lambda p, ctx: sds.generate(p, None, ctx),
                  lambda p, ctx: (ctx.workload_certs.get(p.spiffe_id(ctx.trust_domain)), ctx.trust_bundle_pem,
                                  ctx.peer_bundles, ctx.cert_secret, ctx.root_secret),
                  on=frozenset({Kind.TRUST, Kind.CERTS}))
INBOUND_CLUSTERS = OwnPart(cds.inbound_clusters, lambda p, ctx: ctx.connect_timeout_s)
# In capture mode the Service ports' protocols decide how the sidecar talks to the app.
CAPTURE_CLUSTERS = OwnPart(cds.inbound_clusters, lambda p, ctx: (ctx.connect_timeout_s, _own_services(p, ctx)),
                           services=True)
# Inbound mTLS admits the peered trust domains' callers that the policies name (inbound_authz.foreign_callers).
SIDECAR_LISTENERS = OwnPart(lds.sidecar_listeners,
                            lambda p, ctx: (_own_services(p, ctx), ctx.authz, tuple(td for td, _ in ctx.peer_bundles)),
                            on=frozenset({Kind.AUTHZ, Kind.TRUST}), services=True)
GRPC_SERVER_LISTENERS = OwnPart(proxyless.server_listeners, lambda p, ctx: (_own_services(p, ctx), ctx.authz),
                                on=frozenset({Kind.AUTHZ}), services=True)

#: What every type of every proxy kind is made of (the same resources ``generators.generate_all`` returns).
RECIPES: Mapping[ProxyKind, Mapping[str, Recipe]] = {
    ProxyKind.GATEWAY: {CLUSTER_TYPE: Recipe(CDS_GATEWAY), ENDPOINT_TYPE: Recipe(EDS_GATEWAY),
                        LISTENER_TYPE: Recipe(LDS_GATEWAY), ROUTE_TYPE: Recipe(), SECRET_TYPE: Recipe()},
    ProxyKind.SIDECAR: {CLUSTER_TYPE: Recipe(CDS_OUTBOUND, INBOUND_CLUSTERS), ENDPOINT_TYPE: Recipe(EDS_OUTBOUND),
                        LISTENER_TYPE: Recipe(own=SIDECAR_LISTENERS), ROUTE_TYPE: Recipe(RDS_OUTBOUND),
                        SECRET_TYPE: Recipe(own=SDS_OWN)},
    ProxyKind.GRPC: {CLUSTER_TYPE: Recipe(CDS_OUTBOUND), ENDPOINT_TYPE: Recipe(EDS_OUTBOUND),
                     LISTENER_TYPE: Recipe(LDS_API, GRPC_SERVER_LISTENERS), ROUTE_TYPE: Recipe(RDS_OUTBOUND),
                     SECRET_TYPE: Recipe(own=SDS_OWN)},
}
#: A sidecar in capture mode: the virtual outbound listener shared per identity, its own virtual inbound one.
CAPTURE_RECIPE: Mapping[str, Recipe] = {
    CLUSTER_TYPE: Recipe(CDS_OUTBOUND, CAPTURE_CLUSTERS), ENDPOINT_TYPE: Recipe(EDS_OUTBOUND),
    LISTENER_TYPE: Recipe(LDS_CAPTURE, SIDECAR_LISTENERS), ROUTE_TYPE: Recipe(RDS_OUTBOUND),
    SECRET_TYPE: Recipe(own=SDS_OWN)}


def recipes_of(proxy: ProxyInfo) -> Mapping[str, Recipe]:
    return CAPTURE_RECIPE if proxy.captured else RECIPES[proxy.kind]


# ---- state ----------------------------------------------------------------------------------------------------------


@dataclass
class PipelineStats:
    """Work done, cumulative (tests count it; the benchmark prints it)."""

    pushes: int = 0
    serialized: int = 0  # resources serialised (each one an Entry made)
    built: dict[str, int] = field(default_factory=dict)  # per type URL: resources generated
    keys_built: int = 0  # (table, service key) pairs generated
    proxies_built: int = 0  # (proxy, own part) rebuilds
    snapshots_set: int = 0
    thread_seconds: float = 0.0


@dataclass(frozen=True)
class PushResult:
    """What one push did: the proxies whose snapshot changed, and the proxies whose generation failed."""

    changed: tuple[str, ...]
    errors: Mapping[str, str]
    seconds: float


@dataclass
class _Dirty:
    all: bool = False
    services: set[ServiceKey] = field(default_factory=set)
    endpoints: set[ServiceKey] = field(default_factory=set)
    kinds: frozenset[Kind] = frozenset()

    def add(self, changes: RegistryChanges) -> None:
        self.all = self.all or changes.clusters
        self.services |= changes.services
        self.endpoints |= changes.endpoints

    def any(self) -> bool:
        return self.all or bool(self.services or self.endpoints)


class _Table:
    """One shared part's resources for one scope."""

    def __init__(self, part: SharedPart, scope: Hashable, proxy: ProxyInfo) -> None:
        self.part = part
        self.scope = scope
        self.proxy = proxy  # a proxy of the scope (the builders read only what the scope has in common)
        self.names: dict[PartKey, tuple[str, ...]] = {}
        self.pieces: dict[PartKey, Any] = {}
        self.inputs: dict[PartKey, Hashable] = {}
        self.entries = _EMPTY
        self.changed: frozenset[str] = frozenset()  # names changed by the current push
        self.error = ""  # the last generation error of a key of this table ("" when the last push had none)
        self.users = 0


class _Proxy:
    def __init__(self, proxy: ProxyInfo) -> None:
        self.proxy = proxy
        self.maps: dict[str, EntryMap] = {}
        self.own: dict[str, dict[str, Any]] = {}  # type URL -> own entries
        self.own_inputs: dict[str, Hashable] = {}
        self.snapshot: Snapshot | None = None
        self.tables: list[_Table] = []  # the shared tables it takes resources from


def _settings(ctx: PushContext) -> Hashable:
    """The context's fixed settings: when one changes, everything is rebuilt."""
    return (ctx.trust_domain, ctx.connect_timeout_s, ctx.cert_secret, ctx.root_secret, ctx.gateway_health_check_s,
            ctx.registry.local, ctx.outbound_mode)


class PushPipeline:
    """The control plane's regeneration (see the module docstring)::

        pipeline = PushPipeline(cache=cache)
        result = await pipeline.push(request, ctx, proxies)   # proxies: node id -> ProxyInfo of every connected one
    """

    def __init__(self, *, cache: SnapshotCache, slice_names: int = 4096, slice_streams: int = 64,
                 threaded: bool = True) -> None:
        self.cache = cache
        self.slice_names = slice_names
        self.slice_streams = slice_streams
        self.threaded = threaded
        self.stats = PipelineStats()
        self._tables: dict[tuple[str, Hashable], _Table] = {}
        self._proxies: dict[str, _Proxy] = {}
        self._registry: Registry | None = None
        self._settings: Hashable = None
        self._lock = asyncio.Lock()
        self._changed_names = 0  # resource names the last build changed in the shared tables
        self._last_yield = 0.0

    async def push(self, request: PushRequest, ctx: PushContext, proxies: Mapping[str, ProxyInfo]) -> PushResult:
        """Rebuild what ``request`` concerns for ``proxies`` (every connected proxy: those absent are forgotten)
        and hand the changed snapshots to the cache. The building runs on a worker thread."""
        started = time.perf_counter()
        proxies = dict(proxies)
        async with self._lock:  # one build at a time: the tables are the thread's alone while it runs
            if self.threaded:
                snapshots, errors = await asyncio.to_thread(self._build_or_reset, request, ctx, proxies)
            else:
                snapshots, errors = self._build_or_reset(request, ctx, proxies)
        changed: list[str] = []
        # Wake the streams in slices: each woken stream works through the names that changed (a catalog change:
        # thousands) in the next loop iteration, so a slice holds about ``slice_names`` names of work in all, and
        # at most ``slice_streams`` streams (each costs its fixed share of building, writing and reading the ACK
        # even for one name): whatever else the loop serves (DNS, other xDS, the admin server) runs between slices
        # instead of waiting for every stream of the mesh.
        per_slice = max(1, min(self.slice_streams, self.slice_names // max(1, self._changed_names)))
        woken = 0
        for node_id, snapshot in snapshots:
            if self.cache.set_snapshot(node_id, snapshot):
                changed.append(node_id)
                woken += 1
                if woken % per_slice == 0:
                    await asyncio.sleep(0)  # let the streams woken so far run
        self.stats.snapshots_set += len(snapshots)
        self.stats.pushes += 1
        return PushResult(changed=tuple(changed), errors=errors, seconds=time.perf_counter() - started)

    # ---- the worker thread's part ----------------------------------------------------------------------------

    def _build_or_reset(self, request: PushRequest, ctx: PushContext,
                        proxies: dict[str, ProxyInfo]) -> tuple[list[tuple[str, Snapshot]], dict[str, str]]:
        try:
            return self._build(request, ctx, proxies)
        except BaseException:
            # What the tables hold is no longer known to match a registry: the next push rebuilds everything.
            self._registry = None
            raise

    def _build(self, request: PushRequest, ctx: PushContext,
               proxies: dict[str, ProxyInfo]) -> tuple[list[tuple[str, Snapshot]], dict[str, str]]:
        t0 = time.perf_counter()
        dirty = self._dirty(request, ctx)
        # A big rebuild (everything, or a catalog of thousands of services) runs with the cyclic GC paused and the
        # heap frozen after it, and gives the GIL back often: the event loop keeps serving meanwhile.
        items = offload.LARGE if dirty.all else len(dirty.services) + len(dirty.endpoints)
        with offload.worker_section(items if self.threaded else 0):
            out, errors = self._build_dirty(request, ctx, proxies, dirty)
        self.stats.thread_seconds += time.perf_counter() - t0
        return out, errors

    def _build_dirty(self, request: PushRequest, ctx: PushContext, proxies: dict[str, ProxyInfo],
                     dirty: _Dirty) -> tuple[list[tuple[str, Snapshot]], dict[str, str]]:
        self._registry, self._settings = ctx.registry, _settings(ctx)
        for table in self._tables.values():
            table.changed = frozenset()
            table.users = 0
            table.error = ""
        fresh_tables: set[tuple[str, Hashable]] = set()
        rebuilt: set[tuple[str, Hashable]] = set()
        out: list[tuple[str, Snapshot]] = []
        errors: dict[str, str] = {}
        for node_id in list(self._proxies):
            if node_id not in proxies:
                del self._proxies[node_id]
        for node_id, proxy in sorted(proxies.items()):
            self._yield()
            state = self._proxies.get(node_id)
            if state is None or state.proxy != proxy or request.full or node_id in request.proxies:
                state = self._proxies[node_id] = _Proxy(proxy)
            try:
                snapshot = self._proxy_snapshot(state, ctx, dirty, fresh_tables, rebuilt)
            except Exception as exc:  # a generator bug must not stop pushes to every other proxy
                log.exception("snapshot generation failed node=%s", node_id)
                errors[node_id] = f"generation failed: {exc}"
                del self._proxies[node_id]
                continue
            if snapshot is not None:
                out.append((node_id, snapshot))
            failed = [t.error for t in state.tables if t.error]
            if failed:
                errors[node_id] = "; ".join(failed)
        for key in [k for k, t in self._tables.items() if t.users == 0]:
            del self._tables[key]  # no proxy of that scope is connected any more
        self._changed_names = sum(len(t.changed) for t in self._tables.values())
        return out, errors

    def _dirty(self, request: PushRequest, ctx: PushContext) -> _Dirty:
        dirty = _Dirty(kinds=frozenset(c.kind for c in request.configs))
        old = self._registry
        if request.full or old is None or self._settings != _settings(ctx):
            dirty.all = True
            return dirty
        dirty.services.update(k for k in request.services if isinstance(k, ServiceKey))
        new = ctx.registry
        for config in request.configs:
            if config.kind is Kind.SERVICE and isinstance(config.name, ServiceKey):
                dirty.services.add(config.name)
            elif config.kind is Kind.ENDPOINTS and isinstance(config.name, ServiceKey):
                dirty.endpoints.add(config.name)
            elif config.kind is Kind.SHARD:
                dirty.add(shard_changes(old, new, ClusterId(str(config.name))))
            elif config.kind is Kind.CATALOG:
                dirty.add(catalog_changes(old, new))
            elif config.kind is Kind.POLICY:
                dirty.all = True
            # AUTHZ, TRUST, CERTS: only proxies' own parts depend on them, and those compare their inputs.
        dirty.endpoints -= dirty.services
        return dirty

    def _table(self, part: SharedPart, proxy: ProxyInfo, ctx: PushContext, dirty: _Dirty,
               fresh: set[tuple[str, Hashable]], rebuilt: set[tuple[str, Hashable]]) -> _Table:
        scope = part.scope(proxy)
        key = (part.name, scope)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = _Table(part, scope, proxy)
            fresh.add(key)
            self._update_table(table, ctx, None)
            rebuilt.add(key)
        elif key not in rebuilt:
            rebuilt.add(key)
            if dirty.all:
                self._update_table(table, ctx, None)
            else:
                keys: set[PartKey] = set(dirty.services)
                if part.endpoints:
                    keys |= dirty.endpoints
                if part.also is not None and dirty.services:
                    keys.update(part.also(ctx))
                if keys:
                    self._update_table(table, ctx, keys)
        table.users += 1
        return table

    def _yield(self) -> None:
        """Hand the GIL to the event loop's thread every ``_YIELD_S`` of work. The interpreter's switch interval
        alone is not enough: a loop thread coming back from ``epoll`` with I/O to do waits up to that interval for
        every GIL hand-over, and a loop iteration needs several."""
        now = time.perf_counter()
        if now - self._last_yield >= _YIELD_S:
            time.sleep(0)
            self._last_yield = time.perf_counter()

    def _entry(self, type_url: str, name: str, message: Message, old: Any) -> Any:
        entry = make_entry(type_url, name, message)
        self.stats.serialized += 1
        self.stats.built[type_url] = self.stats.built.get(type_url, 0) + 1
        # The same bytes: keep the entry every snapshot already holds, so nothing downstream sees a change.
        if old is not None and old.version == entry.version:
            return old
        entry.delta_field  # noqa: B018 - built here, off the loop, once for every delta stream that sends it
        return entry

    def _update_table(self, table: _Table, ctx: PushContext, keys: set[PartKey] | None) -> None:
        part = table.part
        values = part.keys(ctx)
        todo: Iterable[PartKey] = values.keys() if keys is None else keys
        gone = set(table.names) - set(values) if keys is None else set()
        updates: dict[str, Any] = {}
        pieces_changed = bool(gone)
        for key in gone:
            for name in table.names.pop(key, ()):
                updates[name] = None
            table.pieces.pop(key, None)
            table.inputs.pop(key, None)
        for key in todo:
            value = values.get(key)
            if value is None:
                if key in table.names:
                    for name in table.names.pop(key):
                        updates[name] = None
                    table.pieces.pop(key, None)
                    table.inputs.pop(key, None)
                    pieces_changed = True
                continue
            if part.inputs is not None:
                inputs = part.inputs(key, value, ctx)
                if key in table.names and table.inputs.get(key) == inputs:
                    continue
                table.inputs[key] = inputs
            self.stats.keys_built += 1
            self._yield()
            try:
                built = part.build(table.proxy, key, value, ctx)
            except Exception as exc:  # keep the key's last good resources; the proxies of the scope report it
                log.exception("generation failed part=%s scope=%s service=%s", part.name, table.scope, key)
                table.inputs.pop(key, None)
                table.error = f"generation failed: {part.name} {key}: {exc}"
                continue
            if part.combine is not None:
                table.pieces[key] = built
                table.names[key] = ()
                pieces_changed = True
                continue
            old_names = table.names.get(key, ())
            for name in old_names:
                if name not in built:
                    updates[name] = None
            for name, message in built.items():
                updates[name] = self._entry(part.type_url, name, message, table.entries.get(name))
            table.names[key] = tuple(built)
        if part.combine is not None and (pieces_changed or keys is None):
            combined = part.combine(table.proxy, [table.pieces[k] for k in sorted(table.pieces, key=_order)], ctx)
            for name in table.entries:
                if name not in combined:
                    updates[name] = None
            for name, message in combined.items():
                updates[name] = self._entry(part.type_url, name, message, table.entries.get(name))
        before = table.entries
        table.entries = before.derive(updates)
        table.changed = table.changed | frozenset(n for n, e in updates.items() if before.get(n) is not e)

    def _proxy_snapshot(self, state: _Proxy, ctx: PushContext, dirty: _Dirty, fresh: set[tuple[str, Hashable]],
                        rebuilt: set[tuple[str, Hashable]]) -> Snapshot | None:
        proxy = state.proxy
        recipes = recipes_of(proxy)
        changed = state.snapshot is None
        state.tables = []
        for type_url in TYPES:
            recipe = recipes[type_url]
            table = (self._table(recipe.shared, proxy, ctx, dirty, fresh, rebuilt)
                     if recipe.shared is not None else None)
            if table is not None:
                state.tables.append(table)
            own_updates: dict[str, Any] | None = None
            own = recipe.own
            if own is not None and (type_url not in state.own or dirty.all or not own.on.isdisjoint(dirty.kinds)
                                    or (own.services and not dirty.services.isdisjoint(proxy.services))
                                    or (own.services and not dirty.endpoints.isdisjoint(proxy.services))):
                inputs = own.inputs(proxy, ctx)
                if type_url not in state.own or state.own_inputs.get(type_url) != inputs:
                    old_own = state.own.get(type_url, {})
                    built = own.build(proxy, ctx)
                    self.stats.proxies_built += 1
                    new_own = {n: self._entry(type_url, n, m, old_own.get(n)) for n, m in built.items()}
                    own_updates = {n: None for n in old_own if n not in new_own}
                    own_updates.update({n: e for n, e in new_own.items() if old_own.get(n) is not e})
                    state.own[type_url], state.own_inputs[type_url] = new_own, inputs
            previous = state.maps.get(type_url)
            if recipe.own is None:
                current = table.entries if table is not None else _EMPTY
            elif previous is None:
                merged = dict(table.entries.items()) if table is not None else {}
                merged.update(state.own[type_url])
                current = EntryMap(merged)
            else:
                updates: dict[str, Any] = {}
                if table is not None:
                    updates.update({n: table.entries.get(n) for n in table.changed})
                if own_updates:
                    updates.update(own_updates)
                current = previous.derive(updates) if updates else previous
            if current is not previous:
                state.maps[type_url] = current
                changed = True
        if not changed:
            return None
        state.snapshot = Snapshot.of({t: state.maps[t] for t in TYPES})
        return state.snapshot
