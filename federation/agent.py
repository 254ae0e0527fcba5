"""The control plane's side of the federation: publish local exports, hold the lease, follow the catalog.

``FederationAgent`` (an async context manager) runs three loops over one ``FederationClient``:

- lease: register, then heartbeat every ``heartbeat_interval_s``, but at least every third of the lease TTL the
  service granted (``heartbeat_interval``); a 404 (the member was removed) registers again and republishes. It runs
  on a thread of its own, with its own event loop and connection (``client.fork()``): nothing the control plane's
  loop does (applying a catalog of 20,000 services, regenerating every proxy's configuration) can delay a heartbeat
  and cost the cluster its lease;
- publish: ``agent.publish(services, exports)`` turns the local discovery snapshot into an ``ExportSet`` with a
  larger generation and hands it to the loop, which retries until the service acknowledges it (the same generation
  on retry, so a retry after a lost answer is idempotent; a 409 moves past the stored generation);
- watch: list the catalog, then follow ``/v1/catalog/watch`` from its revision; a 410 relists.

Decoding and applying a large catalog or watch batch runs on worker threads, so the control plane's loop (DNS, xDS)
stays responsive while another cluster publishes thousands of services. Heartbeats make no catalog revision: the
members' ``renewed_at`` in ``agent.catalog`` follows them (this cluster's from its own heartbeat answers, the others'
from the watch's bookmarks) without an ``on_update`` call, since nothing routable changed.

When the federation is unreachable the agent keeps the last catalog it had: nothing is withdrawn because the
federation is down, only because the federation said so. It reconnects with jittered exponential backoff (bounded
by ``backoff_max_s``) and resumes from its revision; the lease loop retries at least every third of the lease TTL
(as often as it heartbeats), so the lease a restarted federation renews for it is never lost to its own backoff.

The control plane reads the result as ``agent.catalog`` / ``agent.apply(registry)``, or is pushed to through
``on_update`` or ``async for catalog in agent.updates()``.

Peer clustersets (docs/peering.md) arrive on the same listing and watch: ``agent.peers`` (a
``federation.peering.records.PeerSnapshot``), with ``agent.peer_bundles`` (peer trust domain -> its roots, kept
apart) and ``agent.peer_services`` (the services peers exported to this clusterset). A change calls ``on_peers`` and
``on_update`` and wakes ``updates()``; like the catalog, the last peers are kept while the federation is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import immutables

from discovery.model import (
    ClusterId,
    ClusterInfo,
    Endpoint,
    Locality,
    LocalitySummary,
    Registry,
    RemoteEndpoints,
    Service,
    ServiceExport,
    ServiceImport,
    ServiceKey,
)
from federation import catalog as cat
from federation import offload
from federation.client import BadRequest, FederationClient, Gone, NotRegistered, Reconnect, Refused, Unreachable
from federation.peering.records import EMPTY as EMPTY_PEERS
from federation.peering.records import PeerBundleView, PeerService, PeerSnapshot
from federation.records import ExportedService, ExportSet, FederationError, Member, StaleGeneration

log = logging.getLogger("meshfed.federation.agent")

UpdateCallback = Callable[[cat.Catalog], Awaitable[None] | None]
PeersCallback = Callable[[PeerSnapshot], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    heartbeat_interval_s: float | None = None  # at most this; never longer than a third of the granted lease
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    lease_thread: bool = True  # heartbeat from a thread of its own (False: a task on the caller's loop)


def heartbeat_interval(configured_s: float | None, lease_ttl_s: float) -> float:
    """Seconds between heartbeats: the configured interval, but never longer than a third of the lease TTL the
    service granted (it may grant a shorter lease than the clusterset asks for; a longer interval would let the
    lease run out between heartbeats and the member flap). At least 50 ms."""
    third = lease_ttl_s / 3
    interval = third if configured_s is None or configured_s <= 0 else min(configured_s, third)
    return max(interval, 0.05)


def locality_summaries(info: ClusterInfo, endpoints: Iterable[Endpoint]) -> tuple[LocalitySummary, ...]:
    """Ready endpoints counted per zone (the endpoint's zone, else the cluster's); weight = ready count."""
    counts: dict[str, int] = {}
    for e in endpoints:
        zone = e.zone or info.zone
        counts.setdefault(zone, 0)
        if e.ready and not e.terminating:
            counts[zone] += 1
    return tuple(
        LocalitySummary(locality=Locality(region=info.region, zone=zone, cluster=info.id, network=info.network),
                        ready=n, weight=n)
        for zone, n in sorted(counts.items())
    )


def export_set(info: ClusterInfo, services: Iterable[Service], exports: Iterable[ServiceExport], *,
               generation: int) -> ExportSet:
    """The export set of cluster ``info.id`` from its discovery snapshot: every ServiceExport of that cluster whose
    Service exists, with its ports, type, locality summary and ready pod addresses."""
    by_key = {s.key: s for s in services if s.cluster == info.id}
    out: list[ExportedService] = []
    for e in exports:
        if e.cluster != info.id:
            continue
        svc = by_key.get(e.key)
        if svc is None:
            continue
        ready = tuple(ep for ep in svc.endpoints if ep.ready)
        out.append(ExportedService(key=e.key, type=svc.type, ports=svc.ports, created=e.created,
                                   localities=locality_summaries(info, svc.endpoints), endpoints=ready,
                                   traits=svc.traits, exported_labels=e.exported_labels,
                                   exported_annotations=e.exported_annotations, peers=e.peers))
    out.sort(key=lambda s: (s.key.namespace, s.key.name))
    return ExportSet(cluster=info.id, generation=generation, services=tuple(out))


def _build_export_set(info: ClusterInfo, raw: tuple[list[Service], list[ServiceExport], int],
                      acked: ExportSet | None) -> tuple[ExportSet, bool]:
    """(the export set of a queued snapshot, whether its services equal ``acked``'s): on the worker thread."""
    services, exports, generation = raw
    new = export_set(info, services, exports, generation=generation)
    return new, acked is not None and new.services == acked.services


def apply_catalog(registry: Registry, catalog: cat.Catalog) -> Registry:
    """``registry`` with the federated view: each remote cluster's shard of ``RemoteEndpoints`` (``with_remote``;
    pod addresses are present when that cluster is on our network), every member's ``ClusterInfo`` and the merged
    ServiceImports (``with_catalog``). Clusters that left the catalog get an empty shard."""
    local = registry.local
    shards: dict[ClusterId, dict[ServiceKey, RemoteEndpoints]] = {}
    for key, svc in catalog.services.items():
        for r in svc.endpoints:
            if r.cluster != local:
                shards.setdefault(r.cluster, {})[key] = r
    out = registry
    for cluster in sorted(set(registry.remote) | set(shards)):
        if cluster == local:
            continue
        entries = shards.get(cluster, {})
        if dict(registry.remote.get(cluster, {})) != entries:
            out = out.with_remote(cluster, sorted(entries.items(), key=lambda kv: (kv[0].namespace, kv[0].name)))
    clusters = {c: m.info for c, m in catalog.members.items()}
    imports = {k: s.import_ for k, s in catalog.services.items()}
    if dict(out.clusters) != clusters or dict(out.imports) != imports:
        out = out.with_catalog(clusters=clusters, imports=imports)
    return out


class _RemoteIndex:
    """The catalog's remote shards and imports, kept per cluster from change batches, so that applying them to a
    registry touches only the clusters that changed (``with_remote`` per changed cluster)."""

    def __init__(self, local: ClusterId) -> None:
        self.local = local
        self.shards: dict[ClusterId, dict[ServiceKey, RemoteEndpoints]] = {}
        self.versions: dict[ClusterId, int] = {}
        self.catalog_version = 0
        # Persistent: each catalog version's imports share all but the changed entries with the previous one's, and
        # the registry takes the map as it is (``Registry.with_catalog``), so a change costs no copy of the set.
        self.imports: immutables.Map[ServiceKey, ServiceImport] = immutables.Map()
        self.clusters: dict[ClusterId, ClusterInfo] = {}
        self._applied: dict[ClusterId, tuple[int, object]] = {}
        self._applied_catalog: tuple[int, object] | None = None

    def _bump(self, cluster: ClusterId) -> None:
        self.versions[cluster] = self.versions.get(cluster, 0) + 1

    def _add(self, svc: cat.CatalogService, sign: bool) -> None:
        for r in svc.endpoints:
            if r.cluster == self.local:
                continue
            shard = self.shards.setdefault(r.cluster, {})
            if sign:
                shard[svc.key] = r
            else:
                shard.pop(svc.key, None)
            self._bump(r.cluster)

    def reset(self, catalog: cat.Catalog) -> None:
        for cluster in list(self.shards):
            self.shards[cluster] = {}
            self._bump(cluster)
        for svc in catalog.services.values():
            self._add(svc, True)
        self.imports = immutables.Map({k: s.import_ for k, s in catalog.services.items()})
        self.clusters = {c: m.info for c, m in catalog.members.items()}
        self.catalog_version += 1

    def update(self, before: cat.Catalog, changes: Iterable[cat.Change], after: cat.Catalog) -> None:
        touched = False
        imports = self.imports.mutate()
        for change in changes:
            touched = True
            if isinstance(change, cat.MemberChange):
                if change.member is None:
                    self.clusters.pop(change.cluster, None)
                else:
                    self.clusters[change.cluster] = change.member.info
                continue
            old = before.services.get(change.key)
            if old is not None:
                self._add(old, False)
            if change.service is None:
                imports.pop(change.key, None)
            else:
                self._add(change.service, True)
                imports[change.key] = change.service.import_
        self.imports = imports.finish()
        if touched:
            self.catalog_version += 1

    def apply(self, registry: Registry) -> Registry:
        out = registry
        for cluster, version in sorted(self.versions.items()):
            applied = self._applied.get(cluster)
            if applied is not None and applied[0] == version and registry.remote.get(cluster) is applied[1]:
                continue
            if applied is None and not self.shards.get(cluster) and cluster not in registry.remote:
                continue
            out = out.with_remote(cluster, self.shards.get(cluster, {}).items())
            self._applied[cluster] = (version, out.remote[cluster])
        done = self._applied_catalog
        if done is None or done[0] != self.catalog_version or registry.imports is not done[1]:
            out = out.with_catalog(clusters=self.clusters, imports=self.imports)
            self._applied_catalog = (self.catalog_version, out.imports)
        return out


class FederationAgent:
    """Publishes one cluster's exports, holds its lease and follows the merged catalog."""

    def __init__(self, client: FederationClient, *, info: ClusterInfo, config: AgentConfig | None = None,
                 on_update: UpdateCallback | None = None, on_peers: PeersCallback | None = None) -> None:
        if client.cluster != info.id:
            raise ValueError(f"client is for cluster {client.cluster}, agent for {info.id}")
        self.client = client
        self.info = info
        self.config = config or AgentConfig()
        self.on_update = on_update
        self.catalog: cat.Catalog | None = None
        self.trust_bundle_pem = ""
        # Peer clustersets: their trust domains' bundles and the services they exported to us (docs/peering.md).
        self.peers: PeerSnapshot = EMPTY_PEERS
        self.on_peers = on_peers
        self._peers_pending: PeerSnapshot | None = None
        self.connected = False  # the watch is live
        self.registered = asyncio.Event()
        self._lease_ttl = 10.0
        self._generation = 0
        self._pending: ExportSet | None = None
        # A large snapshot queued by publish(), built into ``_pending`` by the publish loop off the event loop.
        self._pending_raw: tuple[list[Service], list[ServiceExport], int] | None = None
        self._acked: ExportSet | None = None
        self._acked_revision = 0
        self._publish_wake = asyncio.Event()
        self._register_wake = asyncio.Event()
        self._acked_cond = asyncio.Condition()
        self._update_cond = asyncio.Condition()
        self._updates = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._index = _RemoteIndex(info.id)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lease: _LeaseThread | None = None
        self.relists = 0
        self.reconnects = 0
        self.heartbeats = 0  # renewals the service acknowledged
        self.heartbeat_failures = 0  # renewals (or registrations) that failed and were retried
        # The lease loop's last failure ("" after a success) and when failures began: what `meshfed status` names.
        self.heartbeat_error = ""
        self.heartbeat_failing_since: datetime | None = None
        self.heartbeat_ok_at: datetime | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------------

    async def __aenter__(self) -> FederationAgent:
        loop = self._loop = asyncio.get_running_loop()
        fork = getattr(self.client, "fork", None)
        if self.config.lease_thread and fork is not None:
            self._lease = _LeaseThread(self, fork())
            await asyncio.to_thread(self._lease.start)
            lease_task: list[asyncio.Task[None]] = []
        else:
            lease_task = [loop.create_task(self._lease_loop(self.client, _LocalSignals(self)),
                                           name=f"federation-lease-{self.info.id}")]
        self._tasks = [
            *lease_task,
            loop.create_task(self._publish_loop(), name=f"federation-publish-{self.info.id}"),
            loop.create_task(self._watch_loop(), name=f"federation-watch-{self.info.id}"),
        ]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for task in reversed(self._tasks):
            task.cancel()
        for task in reversed(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._lease is not None:
            await asyncio.to_thread(self._lease.stop)
            self._lease = None

    def _register_again(self) -> None:
        """The service forgot us (404): the lease loop registers again."""
        self.registered.clear()
        if self._lease is not None:
            self._lease.wake()
        else:
            self._register_wake.set()

    # ---- publishing -----------------------------------------------------------------------------------------------

    def publish(self, services: Iterable[Service], exports: Iterable[ServiceExport]) -> int:
        """Queue the local snapshot for publishing; returns its generation (see ``wait_published``). A snapshot of
        ``offload.LARGE`` services or more is turned into its export set on the worker thread, not here."""
        generation = max(self._generation + 1, time.time_ns() // 1000)
        self._generation = generation
        services, exports = list(services), list(exports)
        if len(services) >= offload.LARGE:
            self._pending_raw = (services, exports, generation)
            self._publish_wake.set()
            return generation
        self._pending_raw = None
        new = export_set(self.info, services, exports, generation=generation)
        if self._acked is not None and self._pending is None and new.services == self._acked.services:
            return self._acked.generation  # nothing changed since the last acknowledged publish
        self._pending = new
        self._publish_wake.set()
        return generation

    def publish_set(self, exports: ExportSet) -> int:
        """Queue an already built export set (its generation is raised if not above the last one)."""
        generation = max(exports.generation, self._generation + 1)
        self._generation = generation
        self._pending_raw = None
        self._pending = replace(exports, generation=generation)
        self._publish_wake.set()
        return generation

    @property
    def acknowledged(self) -> ExportSet | None:
        return self._acked

    async def wait_published(self, generation: int) -> int:
        """Wait until an export set of at least ``generation`` is stored; returns its store revision."""
        async with self._acked_cond:
            await self._acked_cond.wait_for(lambda: self._acked is not None and self._acked.generation >= generation)
        return self._acked_revision

    async def _publish_loop(self) -> None:
        backoff = self.config.backoff_initial_s
        while True:
            await self._publish_wake.wait()
            await self.registered.wait()
            raw = self._pending_raw
            if raw is not None:
                acked = self._acked if self._pending is None else None
                new, same = await offload.run(_build_export_set, self.info, raw, acked, items=len(raw[0]))
                if self._pending_raw is not raw:
                    continue  # a newer snapshot (or set) came meanwhile
                self._pending_raw = None
                if same and acked is not None and self._acked is acked:
                    # Nothing changed since the last acknowledged publish: that acknowledgement covers this one.
                    async with self._acked_cond:
                        self._acked = replace(acked, generation=new.generation)
                        self._acked_cond.notify_all()
                    continue
                self._pending = new
            pending = self._pending
            if pending is None:
                if self._pending_raw is None:
                    self._publish_wake.clear()
                continue
            try:
                revision = await self.client.publish(pending)
            except StaleGeneration as exc:
                log.info("publish stale cluster=%s generation=%d stored=%d: moving past it", self.info.id,
                         exc.got, exc.stored)
                self._generation = max(self._generation, exc.stored)
                if self._pending is pending:
                    self._generation += 1
                    self._pending = replace(pending, generation=self._generation)
                continue
            except NotRegistered:
                self._register_again()
                continue
            except (BadRequest, Refused) as exc:
                log.error("publish rejected cluster=%s generation=%d error=%s field=%s", self.info.id,
                          pending.generation, exc, exc.field)
                if self._pending is pending:
                    self._pending = None
                    if self._pending_raw is None:
                        self._publish_wake.clear()
                continue
            except (Unreachable, FederationError, ValueError, KeyError, TypeError) as exc:
                log.warning("publish failed cluster=%s generation=%d error=%s retry_in=%.2fs", self.info.id,
                            pending.generation, exc, backoff)
                await asyncio.sleep(_jitter(backoff))
                backoff = min(backoff * 2, self.config.backoff_max_s)
                continue
            backoff = self.config.backoff_initial_s
            log.info("published cluster=%s generation=%d services=%d revision=%d", self.info.id, pending.generation,
                     len(pending.services), revision)
            async with self._acked_cond:
                self._acked, self._acked_revision = pending, revision
                self._acked_cond.notify_all()
            if self._pending is pending:
                self._pending = None
                if self._pending_raw is None:
                    self._publish_wake.clear()

    # ---- lease ----------------------------------------------------------------------------------------------------

    def _on_registered(self, member: Member) -> None:
        """(On the agent's loop.) The service registered us."""
        self._lease_ttl = member.lease_ttl_s
        log.info("registered cluster=%s lease_ttl=%.1fs", self.info.id, self._lease_ttl)
        if self._acked is not None and self._pending is None and self._pending_raw is None:
            # A removed member lost its exports: publish what we last had again, under a new generation.
            self.publish_set(self._acked)
        self.registered.set()
        self._on_renewals({member.info.id: member.renewed_at})

    def _on_heartbeat(self, member: Member) -> None:
        """(On the agent's loop.) A heartbeat was acknowledged."""
        self.heartbeats += 1
        self._lease_ttl = member.lease_ttl_s
        self._on_renewals({member.info.id: member.renewed_at})

    def _heartbeat_failed(self) -> None:
        self.heartbeat_failures += 1

    def _on_renewals(self, leases: Mapping[ClusterId, datetime]) -> None:
        """Members' newer renewal times into ``catalog`` (no revision, no ``on_update``: nothing routable moved)."""
        catalog = self.catalog
        if catalog is None:
            return
        moved = {c: replace(m, renewed_at=leases[c]) for c, m in catalog.members.items()
                 if c in leases and m.unreachable_since is None and leases[c] > m.renewed_at}
        if moved:
            self.catalog = replace(catalog, members={**catalog.members, **moved})

    async def _lease_loop(self, client: FederationClient, signals: _Signals) -> None:
        """Register, then heartbeat; runs on the lease thread's loop (or the agent's, see ``lease_thread``) and
        reaches the agent only through ``signals``."""
        backoff = self.config.backoff_initial_s
        registered = False
        ttl = self._lease_ttl
        while True:
            try:
                if not registered or signals.must_register():
                    member = await client.register(self.info)
                    registered = True
                    signals.registered(member)
                else:
                    member = await client.heartbeat()
                    signals.heartbeat(member)
                ttl = member.lease_ttl_s
                # Set from the lease thread: plain attributes, read by /status (what `meshfed status` names).
                self.heartbeat_error, self.heartbeat_failing_since = "", None
                self.heartbeat_ok_at = datetime.now(UTC)
                backoff = self.config.backoff_initial_s
                await signals.sleep(heartbeat_interval(self.config.heartbeat_interval_s, ttl))
            except NotRegistered:
                log.warning("federation forgot cluster=%s: registering again", self.info.id)
                registered = False
                signals.forgotten()
            except (Unreachable, FederationError, ValueError, KeyError, TypeError) as exc:
                self.heartbeat_error = str(exc) or type(exc).__name__
                self.heartbeat_failing_since = self.heartbeat_failing_since or datetime.now(UTC)
                # Retries never wait longer than a heartbeat would: when a federation comes back after an outage
                # it renews the leases of everyone alive when it stopped (its grace), for one TTL; a retry backed
                # off beyond that would lose the lease it was just given (withdraw, then restore, our exports).
                retry = min(_jitter(backoff), heartbeat_interval(None, ttl))
                log.warning("lease renewal failed cluster=%s error=%s retry_in=%.2fs", self.info.id, exc, retry)
                signals.failed()
                await asyncio.sleep(retry)
                backoff = min(backoff * 2, self.config.backoff_max_s)

    # ---- catalog --------------------------------------------------------------------------------------------------

    async def _set_catalog(self, catalog: cat.Catalog, changes: list[cat.Change] | None = None) -> None:
        if changes is None or self.catalog is None:
            await offload.run(self._index.reset, catalog, items=len(catalog.services))
        else:
            await offload.run(self._index.update, self.catalog, changes, catalog, items=len(changes))
        self.catalog = catalog
        await self._call_back(self.on_update, catalog, f"on_update revision={catalog.revision}")
        await self._wake_waiters()

    async def _call_back(self, callback: Callable[[Any], Awaitable[None] | None] | None, arg: object,
                         what: str) -> None:
        if callback is None:
            return
        try:
            result = callback(arg)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the consumer's bug must not stop the agent following the catalog
            log.exception("callback failed cluster=%s %s", self.info.id, what)

    async def _wake_waiters(self) -> None:
        async with self._update_cond:
            self._updates += 1
            self._update_cond.notify_all()

    async def _watch_loop(self) -> None:
        backoff = self.config.backoff_initial_s
        relist = True
        while True:
            reopening = False
            try:
                if relist or self.catalog is None:
                    listing = await self.client.catalog()
                    self.trust_bundle_pem = listing.trust_bundle_pem
                    self.relists += 1
                    await self._set_catalog(listing.catalog)
                    self._peers_pending = listing.peers
                    await self._apply_peers()
                    relist = False
                    log.info("catalog listed cluster=%s revision=%d services=%d members=%d", self.info.id,
                             listing.catalog.revision, len(listing.catalog.services), len(listing.catalog.members))
                assert self.catalog is not None
                async for revision, changes in self.client.watch(revision=self.catalog.revision,
                                                                 on_renewals=self._on_renewals,
                                                                 on_peers=self._on_peers):
                    backoff = self.config.backoff_initial_s
                    await self._apply_peers()
                    if not self.connected:
                        self.connected = True
                        async with self._update_cond:
                            self._update_cond.notify_all()  # wake wait_for() predicates that look at `connected`
                    if changes or revision != self.catalog.revision:
                        # A batch of thousands of services is applied on a worker thread (the index too, in
                        # _set_catalog): the control plane's loop keeps answering DNS and xDS meanwhile.
                        new = await offload.run(cat.apply, self.catalog, revision, changes, items=len(changes))
                        await self._set_catalog(new, changes)
            except Gone as exc:
                log.info("catalog revision gone cluster=%s: relisting (%s)", self.info.id, exc)
                relist = True
            except Reconnect:
                # Not a loss: the stream is reopened at once from the same revision with the new certificate,
                # so `connected` stays as it was.
                self.reconnects += 1
                log.info("catalog watch reopening cluster=%s: new client credentials", self.info.id)
                reopening = True
            except (Unreachable, Refused, FederationError, ValueError, KeyError, TypeError) as exc:
                self.connected = False
                self.reconnects += 1
                log.warning("catalog watch lost cluster=%s revision=%s error=%s retry_in=%.2fs; keeping the last "
                            "known catalog", self.info.id, self.catalog.revision if self.catalog else None, exc,
                            backoff)
                await asyncio.sleep(_jitter(backoff))
                backoff = min(backoff * 2, self.config.backoff_max_s)
            finally:
                if not reopening:
                    self.connected = False

    @property
    def peer_bundles(self) -> Mapping[str, PeerBundleView]:
        """Peer trust domain -> its bundle (each kept apart; only bundles the federation has not let expire)."""
        return self.peers.bundles

    @property
    def peer_services(self) -> tuple[PeerService, ...]:
        """The services peer clustersets exported to this clusterset."""
        return self.peers.services

    def _on_peers(self, snapshot: PeerSnapshot) -> None:
        """(From the watch, synchronously.) A peers line: applied before the next batch is handled."""
        self._peers_pending = snapshot

    async def _apply_peers(self) -> None:
        """Take a pending peer snapshot if its content differs from ours: then ``on_peers``, ``on_update`` and the
        ``updates()`` / ``wait_for()`` waiters hear of it."""
        snapshot, self._peers_pending = self._peers_pending, None
        if snapshot is None or snapshot.same_content(self.peers):
            if snapshot is not None:
                self.peers = snapshot
            return
        self.peers = snapshot
        log.info("peers changed cluster=%s version=%d bundles=%s services=%d", self.info.id, snapshot.version,
                 ",".join(f"{td}@{b.sequence}" for td, b in sorted(snapshot.bundles.items())) or "-",
                 len(snapshot.services))
        await self._call_back(self.on_peers, snapshot, f"on_peers version={snapshot.version}")
        if self.catalog is not None:
            await self._call_back(self.on_update, self.catalog, f"on_update (peers) version={snapshot.version}")
        await self._wake_waiters()

    async def updates(self) -> AsyncIterator[cat.Catalog]:
        """Every new catalog (coalesced: a slow consumer gets the latest, never a stale one)."""
        seen = -1

        def fresh(last: int) -> Callable[[], bool]:
            return lambda: self._updates != last and self.catalog is not None

        while True:
            async with self._update_cond:
                await self._update_cond.wait_for(fresh(seen))
                seen = self._updates
            assert self.catalog is not None
            yield self.catalog

    async def wait_for(self, predicate: Callable[[cat.Catalog], bool]) -> cat.Catalog:
        """Wait until the agent's catalog satisfies ``predicate`` (callers bound it with ``asyncio.timeout``)."""
        async with self._update_cond:
            await self._update_cond.wait_for(lambda: self.catalog is not None and predicate(self.catalog))
        assert self.catalog is not None
        return self.catalog

    def apply(self, registry: Registry) -> Registry:
        """``registry`` with the last known catalog applied (unchanged if none yet); equal to
        ``apply_catalog(registry, agent.catalog)`` but touching only the remote clusters that changed."""
        return registry if self.catalog is None else self._index.apply(registry)


class _Signals:
    """How the lease loop reaches the agent (and is woken by it), wherever the loop runs."""

    def must_register(self) -> bool:
        raise NotImplementedError

    def registered(self, member: Member) -> None:
        raise NotImplementedError

    def heartbeat(self, member: Member) -> None:
        raise NotImplementedError

    def forgotten(self) -> None:
        raise NotImplementedError

    def failed(self) -> None:
        raise NotImplementedError

    async def sleep(self, interval: float) -> None:
        raise NotImplementedError


class _LocalSignals(_Signals):
    """The lease loop as a task on the agent's own loop."""

    def __init__(self, agent: FederationAgent) -> None:
        self._agent = agent

    def must_register(self) -> bool:
        return not self._agent.registered.is_set()

    def registered(self, member: Member) -> None:
        self._agent._on_registered(member)

    def heartbeat(self, member: Member) -> None:
        self._agent._on_heartbeat(member)

    def forgotten(self) -> None:
        self._agent.registered.clear()

    def failed(self) -> None:
        self._agent.heartbeat_failures += 1

    async def sleep(self, interval: float) -> None:
        wake = self._agent._register_wake
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)
        wake.clear()


class _LeaseThread(_Signals):
    """The lease loop on a thread of its own, with its own event loop and its own client (``client.fork()``): a
    busy agent loop cannot delay a heartbeat. Results go back to the agent's loop with ``call_soon_threadsafe``."""

    def __init__(self, agent: FederationAgent, client: FederationClient) -> None:
        self._agent = agent
        self._client = client
        self._main = agent._loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._register = threading.Event()  # set by the agent (a 404 on publish): register again
        self._thread = threading.Thread(target=self._main_thread, name=f"federation-lease-{agent.info.id}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(timeout=30)

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=30)

    def wake(self) -> None:
        self._register.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    def _main_thread(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception:  # the loop must never die silently: the lease would run out without a word
            log.exception("lease thread failed cluster=%s", self._agent.info.id)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake, self._stop = asyncio.Event(), asyncio.Event()
        self._ready.set()
        async with self._client as client:
            task = asyncio.get_running_loop().create_task(self._agent._lease_loop(client, self))
            await self._stop.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _to_agent(self, fn: Callable[..., None], *args: object) -> None:
        if self._main is None:
            return
        with contextlib.suppress(RuntimeError):  # the agent's loop is closed: the agent is gone
            self._main.call_soon_threadsafe(fn, *args)

    def must_register(self) -> bool:
        if self._register.is_set():
            self._register.clear()
            return True
        return False

    def registered(self, member: Member) -> None:
        self._to_agent(self._agent._on_registered, member)

    def heartbeat(self, member: Member) -> None:
        self._to_agent(self._agent._on_heartbeat, member)

    def forgotten(self) -> None:
        self._to_agent(self._agent.registered.clear)

    def failed(self) -> None:
        self._to_agent(self._agent._heartbeat_failed)

    async def sleep(self, interval: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), interval)
        self._wake.clear()


def _jitter(delay: float) -> float:
    return delay * (0.5 + random.random())
