"""The one store Protocol every federation store implements.

Semantics every implementation keeps (and ``tests/federation/test_store_contract.py`` checks on each):
- Every mutation is durable when its coroutine returns (an acknowledged write survives kill -9 of the service).
- Every mutation that changes state gets the next store-wide revision; ``watch(after=R)`` yields every event with
  revision > R in order, then follows new ones; if R is older than what the store retains it raises
  ``RevisionCompacted`` (the HTTP layer turns that into 410 and the client relists with ``snapshot()``).
- ``put_exports`` is last-writer-wins per cluster with a strictly increasing generation (``StaleGeneration``
  otherwise; re-sending the same generation with identical content is idempotent and returns the stored revision).
- Several service replicas over one shared store (etcd) see one order of revisions.
- ``renew`` moves the member's ``renewed_at`` in the store at once (no revision while it stays reachable), and
  ``snapshot()`` and ``leases()`` read it back: the service shows heartbeats in ``renewedAt``/``leaseAgeSeconds``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Protocol

from discovery.model import ClusterId
from federation.records import ExportSet, Member, StoreEvent, StoreSnapshot


class Store(Protocol):
    async def put_member(self, member: Member) -> int:
        """Create or replace a member (registration, lease renewal that changes state). Returns the revision."""
        ...

    async def renew(self, cluster: ClusterId, *, now: datetime) -> Member:
        """Heartbeat: extend the lease. Cheap; may not create a revision unless the member's state changes."""
        ...

    async def remove_member(self, cluster: ClusterId) -> int: ...

    async def leases(self) -> dict[ClusterId, datetime]:
        """Every registered member's latest ``renewed_at`` (heartbeats included): a cheap read, no export sets."""
        ...

    async def put_exports(self, exports: ExportSet) -> int:
        """Replace a cluster's export set (generation must increase). Returns the revision."""
        ...

    async def snapshot(self) -> StoreSnapshot: ...

    def watch(self, *, after: int) -> AsyncIterator[StoreEvent]:
        """Events with revision > ``after``, in order, then new ones as they happen, until cancelled."""
        ...

    async def close(self) -> None: ...
