"""The service's view of the store: the merged catalog, kept current from the store's events, and its history.

Nothing here is authoritative: the catalog is rebuilt from ``store.snapshot()`` at start and then follows
``store.watch(after=...)``, so several replicas over one store (etcd) compute the same catalog at the same revision.
Events that arrive together are applied as one batch (one catalog rebuild, only the keys they touch). Each batch
becomes one entry of the history: ``(revision, changes)``; a watcher resumes from any batch boundary still in the
history, anything older (or a revision this replica never stopped at) answers ``RevisionCompacted`` (HTTP 410) and
the client relists.

If the store's watch breaks, the follower retries with backoff from its last revision; if the store compacted past
it, it takes a fresh snapshot and emits the difference as one batch, so watchers see no gap.

Folding a batch into the catalog (the MCS derivation of every touched service, the diff) runs on a worker thread:
a member publishing 20,000 services costs CPU there, not on the event loop that answers everyone's heartbeats.

Heartbeats move a member's ``renewed_at`` without a revision (no catalog event). ``renewals`` keeps the newest
renewal seen per member (from this replica's own heartbeat answers, and from ``store.leases()`` every few seconds
for those renewed through other replicas); ``member_now`` and ``leases()`` present members with it, so
``renewedAt`` and ``leaseAgeSeconds`` follow the heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from discovery.mcs import DEFAULT_CIDR
from discovery.model import ClusterId, ServiceKey
from federation import catalog as cat
from federation import offload
from federation.records import (
    EventKind,
    ExportSet,
    FederationError,
    Member,
    RevisionCompacted,
    StoreEvent,
    StoreSnapshot,
    StoreUnavailable,
)
from federation.store.base import Store

log = logging.getLogger("meshfed.federation.service")

DEFAULT_HISTORY = 4096  # batches kept for watch resume


class CatalogState:
    """The merged catalog following the store, with a bounded history of change batches for watchers."""

    def __init__(self, store: Store, *, cidr: str = DEFAULT_CIDR, history: int = DEFAULT_HISTORY,
                 on_batch: Callable[[cat.Catalog, int], None] | None = None) -> None:
        self._store = store
        self._cidr = cidr
        self._history_limit = history
        self._on_batch = on_batch
        self._members: dict[ClusterId, Member] = {}
        self._exports: dict[ClusterId, ExportSet] = {}
        self.renewals: dict[ClusterId, datetime] = {}
        self.catalog = cat.Catalog(revision=0)
        self.oldest = 0  # every batch after this revision is in the history
        self._history: deque[tuple[int, list[cat.Change]]] = deque()
        self._boundaries: set[int] = set()
        self._changed = asyncio.Condition()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.healthy = False
        self.last_error: str = ""
        self.started = asyncio.Event()

    # ---- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self, *, prepare: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start following the store in the background (``started`` is set once the first snapshot is in).
        ``prepare`` runs first (once the store answers), before anything is served from the catalog."""
        self._task = asyncio.get_running_loop().create_task(self._run(prepare), name="federation-catalog-follow")

    async def _run(self, prepare: Callable[[], Awaitable[None]] | None) -> None:
        if prepare is not None:
            backoff = 0.1
            while True:
                try:
                    await prepare()
                    break
                except (FederationError, OSError) as exc:
                    self.last_error = str(exc)
                    log.warning("store not ready at start error=%s retry_in=%.2fs", exc, backoff)
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 5.0)
        await self._retry_resync(first=True)
        await self._follow()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._changed:
            self._changed.notify_all()

    # ---- reading --------------------------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self.catalog.revision

    def members(self) -> dict[ClusterId, Member]:
        return dict(self._members)

    def exports(self) -> Mapping[ClusterId, ExportSet]:
        """Every member's last export set as the catalog was built from it (read-only; the peer exchange reads
        which services are exported to which peer)."""
        return self._exports

    # ---- lease renewals (no revisions) -------------------------------------------------------------------------------

    def renewed(self, cluster: ClusterId, at: datetime) -> None:
        """A heartbeat of ``cluster`` renewed its lease at ``at`` (kept if newer than what is known)."""
        known = self.renewals.get(cluster)
        if known is None or at > known:
            self.renewals[cluster] = at

    def member_now(self, member: Member) -> Member:
        """``member`` with its newest known renewal (a connected member's ``renewed_at`` moves with heartbeats)."""
        at = self.renewals.get(member.info.id)
        if at is None or member.unreachable_since is not None or at <= member.renewed_at:
            return member
        return replace(member, renewed_at=at)

    def leases(self) -> dict[ClusterId, datetime]:
        """Every connected member's newest renewal (what watch bookmarks carry)."""
        return {c: self.member_now(m).renewed_at for c, m in self._members.items() if m.unreachable_since is None}

    def view(self, catalog: cat.Catalog) -> cat.Catalog:
        """``catalog`` with its members' newest renewals."""
        return replace(catalog, members={c: self.member_now(m) for c, m in catalog.members.items()})

    async def refresh_renewals(self) -> None:
        """Take the store's renewals (heartbeats other replicas answered) into ``renewals``."""
        current: Mapping[ClusterId, datetime] = await self._store.leases()
        for cluster, at in current.items():
            self.renewed(cluster, at)
        for cluster in [c for c in self.renewals if c not in current]:
            del self.renewals[cluster]

    def can_resume(self, revision: int) -> bool:
        return revision == self.oldest or revision in self._boundaries

    def batches_after(self, revision: int) -> list[tuple[int, list[cat.Change]]]:
        """The batches after ``revision`` (a boundary this replica stopped at), or ``RevisionCompacted``."""
        if revision > self.catalog.revision:
            return []
        if not self.can_resume(revision):
            raise RevisionCompacted(revision, self.oldest)
        if revision == self.catalog.revision:
            return []
        out: list[tuple[int, list[cat.Change]]] = []
        for rev, changes in reversed(self._history):
            if rev <= revision:
                break
            out.append((rev, changes))
        out.reverse()
        return out

    async def wait_beyond(self, revision: int, *, wait_s: float) -> bool:
        """Wait until the catalog moves past ``revision`` (True) or ``wait_s`` passes (False)."""
        if self.catalog.revision > revision:
            return True
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self.catalog.revision > revision), wait_s)
        return self.catalog.revision > revision

    # ---- following the store ----------------------------------------------------------------------------------------

    async def _resync(self, *, first: bool = False) -> None:
        snap = await self._store.snapshot()
        async with self._lock:
            await self._resync_locked(snap, first=first)

    async def _resync_locked(self, snap: StoreSnapshot, *, first: bool) -> None:
        members = {m.info.id: m for m in snap.members}
        exports = {e.cluster: e for e in snap.exports}
        size = sum(len(e.services) for e in snap.exports)
        new = await offload.run(cat.build, revision=snap.revision, members=members, exports=exports.values(),
                                cidr=self._cidr, items=size)
        self._members, self._exports = members, exports
        for m in snap.members:
            self.renewed(m.info.id, m.renewed_at)
        if first:
            self.catalog = new
            self.oldest = snap.revision
            self._boundaries = {snap.revision}
        else:
            await self._publish(new, await offload.run(cat.diff, self.catalog, new, items=size))
        self.healthy = True
        self.started.set()
        log.info("catalog snapshot revision=%d members=%d services=%d", snap.revision, len(self._members),
                 len(new.services))

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            queue: asyncio.Queue[StoreEvent | BaseException] = asyncio.Queue()
            reader = asyncio.get_running_loop().create_task(self._read(queue, self.catalog.revision))
            try:
                while True:
                    item = await queue.get()
                    batch: list[StoreEvent] = []
                    while True:
                        if isinstance(item, BaseException):
                            raise item
                        batch.append(item)
                        if queue.empty():
                            break
                        item = queue.get_nowait()
                    await self._apply(batch)
                    self.healthy = True
                    backoff = 0.1
            except RevisionCompacted as exc:
                log.warning("store compacted past the catalog revision=%d oldest=%d: resnapshot", exc.requested,
                            exc.oldest)
                await self._retry_resync()
            except (FederationError, OSError) as exc:
                self.healthy = False
                self.last_error = str(exc)
                log.warning("store watch failed revision=%d error=%s retry_in=%.2fs", self.catalog.revision, exc,
                            backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    async def _retry_resync(self, *, first: bool = False) -> None:
        backoff = 0.1
        while True:
            try:
                await self._resync(first=first)
                return
            except (FederationError, OSError) as exc:
                self.healthy = False
                self.last_error = str(exc)
                log.warning("store snapshot failed error=%s retry_in=%.2fs", exc, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)

    async def _read(self, queue: asyncio.Queue[StoreEvent | BaseException], after: int) -> None:
        try:
            async for event in self._store.watch(after=after):
                queue.put_nowait(event)
            queue.put_nowait(StoreUnavailable("store watch ended"))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the follower, which decides
            queue.put_nowait(exc)

    async def offer(self, event: StoreEvent) -> None:
        """A write this replica just made (its revision from the store): applied now if it is the very next
        revision, instead of waiting for the store's watch to deliver it back (which it still does; the repeat is
        skipped). Any gap means other writes may sit in between, so then it waits for the watch as usual."""
        if self.started.is_set() and event.revision == self.catalog.revision + 1:
            await self._apply([event])

    async def _apply(self, events: list[StoreEvent]) -> None:
        async with self._lock:
            await self._apply_locked(events)

    async def _apply_locked(self, events: list[StoreEvent]) -> None:
        started = time.perf_counter()
        fresh = [ev for ev in events if ev.revision > self.catalog.revision]  # else re-delivered after a reconnect
        if not fresh:
            return
        for ev in fresh:
            if ev.member is not None:
                self.renewed(ev.cluster, ev.member.renewed_at)
        size = sum(len(ev.exports.services) for ev in fresh if ev.exports is not None) + \
            sum(len(self._exports[ev.cluster].services) for ev in fresh if ev.cluster in self._exports)
        folded = await offload.run(_fold, fresh, self._members, self._exports, self.catalog, self._cidr, items=size)
        self._members, self._exports = folded.members, folded.exports
        await self._publish(folded.catalog, folded.changes)
        log.debug("catalog batch revision=%d events=%d dirty=%d took=%.1fms", folded.catalog.revision, len(events),
                  folded.dirty, (time.perf_counter() - started) * 1000)

    async def _publish(self, new: cat.Catalog, changes: list[cat.Change]) -> None:
        self.catalog = new
        self._history.append((new.revision, changes))
        self._boundaries.add(new.revision)
        while len(self._history) > self._history_limit:
            rev, _ = self._history.popleft()
            self._boundaries.discard(self.oldest)
            self.oldest = rev
        if self._on_batch is not None:
            self._on_batch(new, len(changes))
        async with self._changed:
            self._changed.notify_all()


@dataclass(frozen=True, slots=True)
class _Folded:
    members: dict[ClusterId, Member]
    exports: dict[ClusterId, ExportSet]
    catalog: cat.Catalog
    changes: list[cat.Change]
    dirty: int


def _fold(events: list[StoreEvent], members: Mapping[ClusterId, Member], exports: Mapping[ClusterId, ExportSet],
          catalog: cat.Catalog, cidr: str) -> _Folded:
    """``events`` (all newer than ``catalog``) folded into new member and export tables, the catalog built
    incrementally over the services they touch, and its diff. Pure: reads its arguments, returns new values (it
    runs on a worker thread while the loop keeps serving the old ones)."""
    members, exports = dict(members), dict(exports)
    dirty: set[ServiceKey] = set()
    revision = catalog.revision
    for ev in events:
        revision = ev.revision
        old_exports = exports.get(ev.cluster)
        old_keys = {x.key: x for x in old_exports.services} if old_exports is not None else {}
        if ev.kind == EventKind.EXPORTS and ev.exports is not None:
            exports[ev.cluster] = ev.exports
            new_keys = {x.key: x for x in ev.exports.services}
            # Only the services whose export changed need deriving again.
            dirty.update(k for k in old_keys.keys() | new_keys.keys() if old_keys.get(k) != new_keys.get(k))
        elif ev.kind == EventKind.MEMBER and ev.member is not None:
            before = members.get(ev.cluster)
            members[ev.cluster] = ev.member
            if before is None or before.info != ev.member.info or \
                    (before.unreachable_since is None) != (ev.member.unreachable_since is None):
                dirty.update(old_keys)
        elif ev.kind == EventKind.MEMBER_REMOVED:
            members.pop(ev.cluster, None)
            exports.pop(ev.cluster, None)
            dirty.update(old_keys)
    new = cat.build(revision=revision, members=members, exports=exports.values(), cidr=cidr, previous=catalog,
                    dirty=dirty)
    changes = cat.diff(catalog, new, keys=None if new.reallocated else dirty)
    return _Folded(members=members, exports=exports, catalog=new, changes=changes, dirty=len(dirty))
