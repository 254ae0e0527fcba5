"""An in-memory store: the fake beside the ``Store`` Protocol, for unit tests of the service and the agent.

It keeps every rule of the Protocol (revisions, generation checks, watch resume, compaction, lease expiry) but
nothing survives the process. The shared lease rules the real stores follow live here too:

- A member whose lease is not renewed within ``lease_ttl_s`` of ``renewed_at`` expires: the store writes a MEMBER
  event whose member has ``unreachable_since = renewed_at + lease_ttl_s`` (deterministic, so every replica and
  every store computes the same value).
- ``renew`` of a reachable member moves ``renewed_at`` without a revision; ``renew`` of an unreachable member brings
  it back (``unreachable_since=None``) with a MEMBER event.
- ``remove_member`` drops the member and its export set with one MEMBER_REMOVED event.

Errors are those of ``federation.records`` (no tree of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from types import TracebackType

from discovery.model import ClusterId
from federation.clock import utcnow
from federation.records import (
    EventKind,
    ExportSet,
    Member,
    RevisionCompacted,
    StaleGeneration,
    StoreEvent,
    StoreSnapshot,
    StoreUnavailable,
    UnknownCluster,
)

log = logging.getLogger("meshfed.federation.store")

DEFAULT_RETAIN = 10_000
DEFAULT_REAP_INTERVAL_S = 1.0


def lease_deadline(member: Member) -> datetime:
    return member.renewed_at + timedelta(seconds=member.lease_ttl_s)


def expired(member: Member) -> Member:
    """The member as it looks once its lease ran out (the same value in every store and replica)."""
    return replace(member, unreachable_since=lease_deadline(member))


class MemoryStore:
    """A ``Store`` in a dict. ``retain`` events are kept for watch resume; older ones are compacted."""

    def __init__(self, *, retain: int = DEFAULT_RETAIN, reap_interval_s: float = DEFAULT_REAP_INTERVAL_S) -> None:
        if retain < 1:
            raise ValueError(f"retain must be at least 1, got {retain}")
        self._retain = retain
        self._reap_interval = reap_interval_s
        self._members: dict[ClusterId, Member] = {}
        self._exports: dict[ClusterId, tuple[ExportSet, int]] = {}
        self._events: list[StoreEvent] = []
        self._revision = 0
        self._compacted = 0  # events with revision <= this are gone
        self._changed: asyncio.Condition | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    # ---- lifecycle ----

    async def __aenter__(self) -> MemoryStore:
        self._start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _start(self) -> asyncio.Condition:
        if self._closed:
            raise StoreUnavailable("memory store is closed")
        if self._changed is None:
            self._changed = asyncio.Condition()
        if self._reaper is None and self._reap_interval > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop(), name="memory-store-reaper")
        return self._changed

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    # ---- writes ----

    def _append(self, kind: EventKind, cluster: ClusterId, *, member: Member | None = None,
                exports: ExportSet | None = None) -> int:
        """Record one event (synchronously, so state and log change together); wake watchers with ``_wake``."""
        self._revision += 1
        self._events.append(StoreEvent(self._revision, kind, cluster, member=member, exports=exports))
        if len(self._events) > self._retain:
            drop = len(self._events) - self._retain
            self._compacted = self._events[drop - 1].revision
            del self._events[:drop]
        return self._revision

    async def _wake(self) -> None:
        cond = self._start()
        async with cond:
            cond.notify_all()

    async def put_member(self, member: Member) -> int:
        self._start()
        cid = member.info.id
        self._members[cid] = member
        revision = self._append(EventKind.MEMBER, cid, member=member)
        await self._wake()
        return revision

    async def renew(self, cluster: ClusterId, *, now: datetime) -> Member:
        self._start()
        current = self._members.get(cluster)
        if current is None:
            raise UnknownCluster(f"cluster {cluster} is not registered")
        renewed = replace(current, renewed_at=now, unreachable_since=None)
        self._members[cluster] = renewed
        if current.unreachable_since is not None:
            self._append(EventKind.MEMBER, cluster, member=renewed)
            await self._wake()
        return renewed

    async def leases(self) -> dict[ClusterId, datetime]:
        self._start()
        return {c: m.renewed_at for c, m in self._members.items()}

    async def remove_member(self, cluster: ClusterId) -> int:
        self._start()
        if cluster not in self._members:
            raise UnknownCluster(f"cluster {cluster} is not registered")
        del self._members[cluster]
        self._exports.pop(cluster, None)
        revision = self._append(EventKind.MEMBER_REMOVED, cluster)
        await self._wake()
        return revision

    async def put_exports(self, exports: ExportSet) -> int:
        self._start()
        cid = exports.cluster
        if cid not in self._members:
            raise UnknownCluster(f"cluster {cid} is not registered: register before publishing exports")
        stored = self._exports.get(cid)
        if stored is not None:
            old, revision = stored
            if exports.generation == old.generation and exports == old:
                return revision
            if exports.generation <= old.generation:
                raise StaleGeneration(cid, exports.generation, old.generation)
        revision = self._append(EventKind.EXPORTS, cid, exports=exports)
        self._exports[cid] = (exports, revision)
        await self._wake()
        return revision

    async def compact(self, *, keep: int) -> int:
        """Drop all but the newest ``keep`` events now; returns the oldest ``after`` a watch may still resume from."""
        self._start()
        if len(self._events) > keep:
            drop = len(self._events) - keep
            self._compacted = self._events[drop - 1].revision
            del self._events[:drop]
        return self._compacted

    async def expire_leases(self, *, now: datetime | None = None) -> list[ClusterId]:
        """Mark every member whose lease ran out as unreachable (the reaper calls this every ``reap_interval_s``)."""
        self._start()
        now = now or utcnow()
        gone: list[ClusterId] = []
        for cid, member in sorted(self._members.items()):
            if member.unreachable_since is None and lease_deadline(member) <= now:
                unreachable = expired(member)
                self._members[cid] = unreachable
                self._append(EventKind.MEMBER, cid, member=unreachable)
                log.info("lease expired cluster=%s unreachable_since=%s", cid, unreachable.unreachable_since)
                gone.append(cid)
        if gone:
            await self._wake()
        return gone

    async def _reap_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._reap_interval)
            await self.expire_leases()

    # ---- reads ----

    async def snapshot(self) -> StoreSnapshot:
        self._start()
        return StoreSnapshot(
            revision=self._revision,
            members=tuple(m for _, m in sorted(self._members.items())),
            exports=tuple(e for _, (e, _r) in sorted(self._exports.items())),
        )

    async def watch(self, *, after: int) -> AsyncIterator[StoreEvent]:
        cond = self._start()
        last = after
        while not self._closed:
            if last < self._compacted:
                raise RevisionCompacted(last, self._compacted)
            pending = [e for e in self._events if e.revision > last]
            for event in pending:
                last = event.revision
                yield event
            if pending:
                continue
            async with cond:
                if self._revision <= last and not self._closed:
                    await cond.wait()
