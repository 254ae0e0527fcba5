"""Peering as data, pure: what a federation knows about its peer clustersets and hands to its members.

A peer is another clusterset with its own root and trust domain (``discovery.clusterset.PeerDecl`` declares it).
Its bundle (SPIFFE JWKS, fetched from its bundle endpoint) and the services it exported to us reach our members as
one :class:`PeerSnapshot`: each trust domain's roots kept apart (:class:`PeerBundleView`, never merged with ours or
another peer's) and the services (:class:`PeerService`) with the exporting clusters' east-west gateways.

Exception tree (this package)::

    FederationError (federation.records)
     +-- PeeringError              anything about a peer that did not work; the message names the peer
          +-- PeerUnreachable      the peer's endpoint did not answer (connection, timeout, 5xx): keep the last good
          +-- BundleRefused        an answer that must not be trusted: the endpoint's certificate does not chain to
          |                        the last bundle trusted for the peer's trust domain, its SPIFFE ID is not the
          |                        configured one, or the bundle itself is invalid/hostile/older (``field`` names
          |                        where); the last good bundle is kept and the refusal logged
          +-- ExchangeRefused      the peer's service exchange refused us (401/403) or answered something invalid
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from discovery.mcs import allocate_peer_ips
from discovery.model import PeerImport, RemoteEndpoints, ServiceImport, ServiceKey, ServicePort, ServiceType
from federation.records import FederationError


class PeeringError(FederationError):
    def __init__(self, message: str, *, peer: str = "", field: str | None = None) -> None:
        text = f"{field}: {message}" if field else message
        super().__init__(f"peer {peer}: {text}" if peer else text)
        self.peer, self.field, self.reason = peer, field, message


class PeerUnreachable(PeeringError):
    pass


class BundleRefused(PeeringError):
    pass


class ExchangeRefused(PeeringError):
    pass


@dataclass(frozen=True, slots=True)
class PeerBundleView:
    """One peer trust domain's roots, as delivered to members (see docs/peering.md for the expiry rule)."""

    peer: str  # the peer's name as this clusterset declared it
    trust_domain: str
    roots_pem: str  # PEM of that trust domain's roots only
    sequence: int  # spiffe_sequence
    fetched_at: datetime  # last successful fetch and verification (UTC)
    refresh_hint_s: int
    expires_at: datetime  # after it the federation stops delivering the bundle


@dataclass(frozen=True, slots=True)
class PeerService:
    """One service a peer exported to us: reachable through the exporting clusters' east-west gateways."""

    peer: str  # the importing side's name for the peer: <name>.<ns>.svc.<peer>.clusterset.local
    trust_domain: str  # the exporting side's trust domain
    key: ServiceKey  # namespace/name in the exporting clusterset
    type: ServiceType
    ports: tuple[ServicePort, ...]
    # One per exporting cluster: its gateway's public address and locality summaries; never pod addresses. The
    # cluster and network names are the exporter's (they may collide with ours: key them by (peer, cluster)).
    endpoints: tuple[RemoteEndpoints, ...]


def peer_imports(services: Iterable[PeerService], *, cidr: str, imports: Iterable[ServiceImport]) -> list[PeerImport]:
    """What a member serves for the services peers exported to us: each a PeerImport with a ClusterSetIP of our
    ``cidr`` beside the clusterset's own ``imports`` (``discovery.mcs.allocate_peer_ips``)."""
    return allocate_peer_ips([PeerImport(peer=s.peer, key=s.key, trust_domain=s.trust_domain, type=s.type,
                                         ports=s.ports, endpoints=s.endpoints) for s in services], cidr, imports)


@dataclass(frozen=True, slots=True)
class PeerSnapshot:
    """Everything about peers a member needs, replaced whole; ``version`` is opaque (compare for equality)."""

    version: int = 0
    bundles: Mapping[str, PeerBundleView] = field(default_factory=dict)  # trust domain -> its bundle
    services: tuple[PeerService, ...] = ()  # sorted by (peer, namespace, name)

    def same_content(self, other: PeerSnapshot) -> bool:
        return dict(self.bundles) == dict(other.bundles) and self.services == other.services


EMPTY = PeerSnapshot()


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """What the federation reports about one peer (``GET /v1/peers``; `meshfed status` decodes the same type).
    Times are ISO 8601 strings in UTC."""

    name: str
    trust_domain: str
    bundle_endpoint: str
    profile: str
    endpoint_spiffe_id: str
    federation: str
    bundle_source: str  # "fetched" | "bootstrap" | "none"
    bundle_sequence: int | None = None
    bundle_roots: tuple[str, ...] = ()  # fingerprints (first 16 hex digits), oldest first
    fetched_at: str | None = None
    bundle_age_s: float | None = None
    expires_at: str | None = None
    expired: bool = False
    refresh_hint_s: int | None = None
    last_attempt_at: str | None = None
    last_refresh_at: str | None = None  # last successful fetch
    next_refresh_at: str | None = None
    error: str = ""
    error_kind: str = ""  # "" | "unreachable" | "refused"
    failing_since: str | None = None
    refusals: int = 0
    services_imported: tuple[str, ...] = ()  # name.namespace
    services_exported: tuple[str, ...] = ()
    services_pulled_at: str | None = None
    services_error: str = ""
    # What the peer said, on its last exchange call, it holds of OUR bundle (rotation waits for it: docs/peering.md).
    peer_holds_sequence: int | None = None
    peer_holds_roots: tuple[str, ...] = ()
    peer_holds_reported_at: str | None = None
