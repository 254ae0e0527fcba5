"""What the federation stores and serves: frozen records for members, their exports, and catalog changes.

These are the federation's own values (built from ``discovery.model`` types); the wire (JSON) form lives at the
HTTP edge, the stored form in each store. Exception tree::

    FederationError
     +-- StaleGeneration      a publish whose generation is not newer than the stored one
     +-- RevisionCompacted    a watch asked to resume from a revision the store no longer holds (HTTP 410)
     +-- UnknownCluster       an operation on a cluster that never registered
     +-- StoreUnavailable     the backing store cannot be reached (wraps sqlite3/etcd errors)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from discovery.model import (
    DEFAULT_TRAITS,
    ClusterId,
    ClusterInfo,
    Endpoint,
    LocalitySummary,
    ServiceKey,
    ServicePort,
    ServiceTraits,
    ServiceType,
)


class FederationError(Exception):
    """Root of the federation package's errors."""


class StaleGeneration(FederationError):
    def __init__(self, cluster: ClusterId, got: int, stored: int) -> None:
        super().__init__(f"cluster {cluster}: generation {got} is not newer than stored generation {stored}")
        self.cluster, self.got, self.stored = cluster, got, stored


class RevisionCompacted(FederationError):
    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"revision {requested} is older than the oldest retained revision {oldest}: relist")
        self.requested, self.oldest = requested, oldest


class UnknownCluster(FederationError):
    pass


class StoreUnavailable(FederationError):
    pass


@dataclass(frozen=True, slots=True)
class Member:
    """A registered cluster and its lease."""

    info: ClusterInfo
    registered_at: datetime
    renewed_at: datetime
    lease_ttl_s: float
    # Set when the lease expired and the member's exports were withdrawn; cleared when it comes back.
    unreachable_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class ExportedService:
    """One service a cluster publishes: its definition and the endpoint summary other clusters need."""

    key: ServiceKey
    type: ServiceType
    ports: tuple[ServicePort, ...]
    created: datetime
    localities: tuple[LocalitySummary, ...]
    # Pod addresses: served only to clusters on the same network as the publisher.
    endpoints: tuple[Endpoint, ...] = ()
    # What the MCS conflict rules compare besides type and ports, and what the ServiceImport carries.
    traits: ServiceTraits = DEFAULT_TRAITS
    exported_labels: tuple[tuple[str, str], ...] = ()
    exported_annotations: tuple[tuple[str, str], ...] = ()
    # Peer clustersets (names this clusterset declared) the service is exported to; () keeps it inside.
    peers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExportSet:
    """A cluster's full set of exports at one generation (a publish replaces the previous set whole)."""

    cluster: ClusterId
    generation: int
    services: tuple[ExportedService, ...]


class EventKind(enum.StrEnum):
    MEMBER = "member"  # a member registered, renewed into a new state, or went unreachable
    MEMBER_REMOVED = "member_removed"
    EXPORTS = "exports"  # a cluster's export set replaced (possibly with an empty set: withdrawn)


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """One change, at a store revision; revisions increase monotonically across the whole store."""

    revision: int
    kind: EventKind
    cluster: ClusterId
    member: Member | None = None
    exports: ExportSet | None = None


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    revision: int
    members: tuple[Member, ...]
    exports: tuple[ExportSet, ...]
