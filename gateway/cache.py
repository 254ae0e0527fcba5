"""The snapshot cache: the current snapshot of every proxy, the open ADS streams waiting on them, and what each
proxy has acknowledged.

``set_snapshot`` replaces a node's snapshot whole and wakes that node's open streams only if some type's version
changed, so a regeneration that produces the same configuration pushes nothing. The ADS server records, per node
and type URL, the last version and nonce it sent, the last version the proxy ACKed and the last NACK (its error
text and when); ``status()`` turns that into one ``ProxyStatus`` row per (node, type) for ``meshfed status``.

All methods are called from the event loop thread (the ADS server and the push updater run on it).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.auth import NodeMismatch
from gateway.snapshot import TYPE_ORDER, Snapshot

if TYPE_CHECKING:
    from gateway.auth import ProxyIdentity

log = logging.getLogger("meshfed.xds.cache")

#: ``interest(old, new)``: whether a stream must wake for a node's snapshot going from ``old`` to ``new``.
Interest = Callable[[Snapshot, Snapshot], bool]


class NodeConflict(NodeMismatch):
    """A stream for a node that is already connected as another identity or with other node metadata."""


class SyncState(enum.StrEnum):
    SYNCED = "synced"  # the proxy ACKed the version the cache holds now
    STALE = "stale"  # a newer version exists (or was sent) that the proxy has not ACKed yet
    NACKED = "nacked"  # the proxy rejected the last version sent; it runs its last good one


@dataclass(frozen=True)
class ProxyStatus:
    """What one proxy holds of one xDS type, as ``meshfed status`` shows it."""

    node_id: str
    type_url: str
    state: SyncState
    connected: bool
    current_version: str  # the version in the cache now
    sent_version: str  # the last version sent ("" before the first response)
    sent_nonce: str
    acked_version: str  # the last version the proxy ACKed ("" if none)
    nack_error: str  # the last NACK's error text ("" if the proxy never NACKed)
    nack_version: str  # the version that NACK rejected
    nack_time: float | None  # wall clock (time.time()) of the last NACK


@dataclass
class _TypeStatus:
    sent_version: str = ""
    sent_nonce: str = ""
    acked_version: str = ""
    nack_error: str = ""
    nack_version: str = ""
    nack_nonce: str = ""
    nack_time: float | None = None


@dataclass
class _Node:
    snapshot: Snapshot | None = None
    wakers: dict[asyncio.Event, Interest | None] = field(default_factory=dict)
    types: dict[str, _TypeStatus] = field(default_factory=dict)
    identity: ProxyIdentity | None = None
    metadata: dict[str, Any] | None = None


class SnapshotCache:
    """Snapshots keyed by node id, plus the open streams of each node and their ACK/NACK state."""

    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}
        self._listeners: list[Callable[[str], None]] = []

    # -- snapshots ---------------------------------------------------------------------------------------------
    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> bool:
        """Replace ``node_id``'s snapshot; wake its streams if any type's version changed. Returns whether it did."""
        node = self._nodes.setdefault(node_id, _Node())
        old = node.snapshot
        node.snapshot = snapshot
        if old is not None and old.versions() == snapshot.versions():
            return False
        for waker, interest in node.wakers.items():
            # A stream that says nothing it holds or asked for changed is not woken (a Sidecar-scoped proxy among
            # thousands, for a change of one service it does not watch); it records itself current instead.
            if not waker.is_set() and (interest is None or old is None or interest(old, snapshot)):
                waker.set()
        return True

    def get(self, node_id: str) -> Snapshot | None:
        node = self._nodes.get(node_id)
        return node.snapshot if node else None

    def clear(self, node_id: str) -> None:
        """Forget a node's snapshot and status (its open streams stay open and wait for a new snapshot)."""
        node = self._nodes.get(node_id)
        if node is None:
            return
        if node.wakers:
            node.snapshot = None
            node.types.clear()
        else:
            del self._nodes[node_id]

    def node_ids(self) -> list[str]:
        return sorted(self._nodes)

    # -- streams (used by the ADS server) ------------------------------------------------------------------------
    def watch(self, node_id: str, identity: ProxyIdentity | None = None,
              metadata: Mapping[str, Any] | None = None, *, interest: Interest | None = None) -> asyncio.Event:
        """Register an open stream of ``node_id``; the event is set whenever that node's snapshot changes (and, with
        ``interest``, only if ``interest(old, new)`` says the change concerns the stream).
        ``metadata`` is the node metadata of the stream's first request (what the generators need to know).

        The first open stream of a node fixes who the node is: while it is open, another stream for the same node
        id must have authenticated as the same identity and carry the same metadata, or ``NodeConflict`` is raised
        (the ADS server refuses that stream), so a second stream can never change what the first is served. When
        a node reconnects as another identity or with other metadata after all its streams closed, what was
        generated for the old one is forgotten first, so none of it (its certificate above all) reaches the new
        stream."""
        node = self._nodes.setdefault(node_id, _Node())
        meta = dict(metadata) if metadata is not None else None
        if node.wakers:
            if identity != node.identity:
                raise NodeConflict(f"node {node_id!r} is connected as {node.identity}; a second stream "
                                   f"authenticated as {identity} is refused")
            if meta is not None and node.metadata is not None and meta != node.metadata:
                differ = sorted(k for k in meta.keys() | node.metadata.keys() if meta.get(k) != node.metadata.get(k))
                raise NodeConflict(f"node {node_id!r} is connected with other node metadata (differs in "
                                   f"{', '.join(differ)}); a second stream cannot change it")
        else:
            changed = ((node.identity is not None and identity != node.identity)
                       or (node.metadata is not None and meta is not None and meta != node.metadata))
            if changed and (node.snapshot is not None or node.types):
                node.snapshot = None
                node.types.clear()
            node.identity = identity
            if meta is not None:
                node.metadata = meta
        waker = asyncio.Event()
        node.wakers[waker] = interest
        if len(node.wakers) == 1:
            for listener in self._listeners:
                listener(node_id)
        return waker

    def unwatch(self, node_id: str, waker: asyncio.Event) -> None:
        node = self._nodes.get(node_id)
        if node is not None:
            node.wakers.pop(waker, None)

    def on_connect(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(node_id)`` when a node opens its first stream (so its snapshot can be generated)."""
        self._listeners.append(listener)

    def connected(self) -> list[str]:
        return sorted(n for n, node in self._nodes.items() if node.wakers)

    def node_metadata(self, node_id: str) -> dict[str, Any] | None:
        """The node metadata the node's latest stream opened with (None if it never connected)."""
        node = self._nodes.get(node_id)
        return node.metadata if node else None

    def identity(self, node_id: str) -> ProxyIdentity | None:
        """The identity the node last authenticated as (None if it never connected)."""
        node = self._nodes.get(node_id)
        return node.identity if node else None

    def _type(self, node_id: str, type_url: str) -> _TypeStatus:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node()
        st = node.types.get(type_url)
        if st is None:
            st = node.types[type_url] = _TypeStatus()
        return st

    def acked_version(self, node_id: str, type_url: str) -> str:
        """The last version of ``type_url`` that ``node_id`` ACKed ("" if none)."""
        node = self._nodes.get(node_id)
        st = node.types.get(type_url) if node else None
        return st.acked_version if st else ""

    def record_sent(self, node_id: str, type_url: str, *, version: str, nonce: str) -> None:
        st = self._type(node_id, type_url)
        st.sent_version, st.sent_nonce = version, nonce

    def record_ack(self, node_id: str, type_url: str, *, version: str, nonce: str) -> None:
        st = self._type(node_id, type_url)
        st.acked_version = version
        log.debug("ack node=%s type=%s version=%s nonce=%s", node_id, type_url, version, nonce)

    def record_nack(self, node_id: str, type_url: str, *, version: str, nonce: str, error: str) -> None:
        st = self._type(node_id, type_url)
        st.nack_error, st.nack_version, st.nack_nonce, st.nack_time = error, version, nonce, time.time()
        log.warning("nack node=%s type=%s version=%s nonce=%s error=%r", node_id, type_url, version, nonce, error)

    # -- status --------------------------------------------------------------------------------------------------
    def status(self) -> list[ProxyStatus]:
        """One row per (node, type) that a response was sent for, types in apply order."""
        rank = {t: i for i, t in enumerate(TYPE_ORDER)}
        rows: list[ProxyStatus] = []
        for node_id in sorted(self._nodes):
            node = self._nodes[node_id]
            for type_url in sorted(node.types, key=lambda t: (rank.get(t, len(rank)), t)):
                st = node.types[type_url]
                current = node.snapshot.version(type_url) if node.snapshot else ""
                if st.nack_nonce and st.nack_nonce == st.sent_nonce:
                    state = SyncState.NACKED
                elif st.acked_version and st.acked_version == current == st.sent_version:
                    state = SyncState.SYNCED
                else:
                    state = SyncState.STALE
                rows.append(ProxyStatus(
                    node_id=node_id, type_url=type_url, state=state, connected=bool(node.wakers),
                    current_version=current, sent_version=st.sent_version, sent_nonce=st.sent_nonce,
                    acked_version=st.acked_version, nack_error=st.nack_error, nack_version=st.nack_version,
                    nack_time=st.nack_time,
                ))
        return rows

    def status_of(self, node_id: str, type_url: str) -> ProxyStatus | None:
        return next((r for r in self.status() if r.node_id == node_id and r.type_url == type_url), None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.node_ids())
