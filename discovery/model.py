"""The pure discovery model: what exists in one cluster and what the clusterset shares.

Every value here is a frozen dataclass or a ``NewType`` id, validated on construction, so that code inside the
packages never handles raw Kubernetes dicts (those are converted at the boundary, in ``discovery.convert``).

Exception tree (this module)::

    DiscoveryError
     +-- InvalidName          a cluster id, namespace or service name that is not an RFC 1123 label
     +-- InvalidValue         any other field that breaks the model's rules (port range, protocol, ...)
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import NewType

import immutables

ClusterId = NewType("ClusterId", str)
Namespace = NewType("Namespace", str)
ServiceName = NewType("ServiceName", str)
NetworkId = NewType("NetworkId", str)


class DiscoveryError(Exception):
    """Root of every error the discovery package raises."""


class InvalidName(DiscoveryError, ValueError):
    """A name is not a valid RFC 1123 DNS label (or subdomain, where that is allowed)."""


class InvalidValue(DiscoveryError, ValueError):
    """A field holds a value the model does not accept."""


_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _label(kind: str, value: str, *, max_len: int = 63) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len or not _LABEL.match(value):
        raise InvalidName(
            f"{kind} {value!r} is not a valid RFC 1123 label "
            f"(lower-case letters, digits and '-', starting and ending alphanumeric, at most {max_len} chars)"
        )
    return value


def cluster_id(value: str) -> ClusterId:
    """Validate a cluster id (KEP-2149: an RFC 1123 label, at most 63 characters)."""
    return ClusterId(_label("cluster id", value))


def namespace(value: str) -> Namespace:
    return Namespace(_label("namespace", value))


def service_name(value: str) -> ServiceName:
    return ServiceName(_label("service name", value))


def network_id(value: str) -> NetworkId:
    return NetworkId(_label("network", value))


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class ServiceType(enum.StrEnum):
    """The ServiceImport type of the MCS API."""

    CLUSTER_SET_IP = "ClusterSetIP"
    HEADLESS = "Headless"


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """A service's identity across the clusterset: namespace sameness means (namespace, name) is the key."""

    namespace: Namespace
    name: ServiceName
    # The hash, computed once: keys are hashed millions of times (catalogs, registries, the push pipeline's
    # tables), and a dataclass's own __hash__ builds and hashes a tuple every time.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _label("namespace", self.namespace)
        _label("service name", self.name)
        object.__setattr__(self, "_hash", hash((self.namespace, self.name)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[ServiceKey], tuple[str, str]]:
        return type(self), (self.namespace, self.name)  # the hash is per process: computed again, not copied

    def __str__(self) -> str:
        return f"{self.name}.{self.namespace}"

    @property
    def clusterset_host(self) -> str:
        return f"{self.name}.{self.namespace}.svc.clusterset.local"

    @classmethod
    def parse(cls, text: str) -> ServiceKey:
        """Parse ``name.namespace``."""
        parts = text.split(".")
        if len(parts) != 2:
            raise InvalidValue(f"service {text!r} must be written NAME.NAMESPACE")
        return cls(namespace=namespace(parts[1]), name=service_name(parts[0]))


@dataclass(frozen=True, slots=True, order=True)
class ServicePort:
    port: int
    protocol: Protocol = Protocol.TCP
    name: str = ""
    app_protocol: str = ""
    target_port: int | str = 0

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise InvalidValue(f"port {self.port} is out of range 1..65535")
        if self.name:
            _label("port name", self.name, max_len=15)

    def same_definition(self, other: ServicePort) -> bool:
        """True when two ports with one name/number agree on what the MCS API compares."""
        return (self.port, self.protocol, self.app_protocol) == (other.port, other.protocol, other.app_protocol)


@dataclass(frozen=True, slots=True, order=True)
class Locality:
    region: str = ""
    zone: str = ""
    cluster: str = ""
    network: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.region, self.zone, self.cluster) if p) or "-"


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    hostname: str = ""
    zone: str = ""
    node: str = ""
    # Ports of the endpoint, by service port name ("" for an unnamed port), as EndpointSlices give them.
    ports: tuple[tuple[str, int], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    service_account: str = ""

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.address)
        except ValueError as exc:
            raise InvalidValue(f"endpoint address {self.address!r} is not an IP address") from exc
        if self.hostname:
            _label("endpoint hostname", self.hostname)

    @property
    def ip_version(self) -> int:
        return ipaddress.ip_address(self.address).version

    def port_for(self, name: str, default: int) -> int:
        for port_name, number in self.ports:
            if port_name == name:
                return number
        return default


SESSION_AFFINITY_NONE = "None"
SESSION_AFFINITY_CLIENT_IP = "ClientIP"
#: Kubernetes' default ``sessionAffinityConfig.clientIP.timeoutSeconds`` when ``sessionAffinity`` is ClientIP.
DEFAULT_AFFINITY_TIMEOUT = 10800


@dataclass(frozen=True, slots=True)
class ServiceTraits:
    """The Service fields besides type and ports that the MCS API compares across exporting clusters (each one a
    v1beta1 Conflict reason) and carries to the ServiceImport: ``sessionAffinity`` (``None`` or ``ClientIP``),
    ``sessionAffinityConfig.clientIP.timeoutSeconds`` (0 when there is no config), ``internalTrafficPolicy``,
    ``trafficDistribution`` ("" when unset) and ``ipFamilies`` (empty when the object does not say)."""

    session_affinity: str = SESSION_AFFINITY_NONE
    affinity_timeout: int = 0
    internal_traffic_policy: str = "Cluster"
    traffic_distribution: str = ""
    ip_families: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.session_affinity not in (SESSION_AFFINITY_NONE, SESSION_AFFINITY_CLIENT_IP):
            raise InvalidValue(f"sessionAffinity {self.session_affinity!r} is not one of None, ClientIP")
        if not 0 <= self.affinity_timeout <= 86400:
            raise InvalidValue(f"sessionAffinityConfig timeoutSeconds {self.affinity_timeout} is not in 1..86400")
        if self.internal_traffic_policy not in ("Cluster", "Local"):
            raise InvalidValue(f"internalTrafficPolicy {self.internal_traffic_policy!r} is not one of Cluster, Local")
        if len(self.ip_families) > 2 or any(f not in ("IPv4", "IPv6") for f in self.ip_families) \
                or len(set(self.ip_families)) != len(self.ip_families):
            raise InvalidValue(f"ipFamilies {list(self.ip_families)} must be one or two distinct of IPv4, IPv6")


DEFAULT_TRAITS = ServiceTraits()


@dataclass(frozen=True, slots=True)
class Service:
    """A Kubernetes Service in one cluster, with the endpoints its EndpointSlices list."""

    cluster: ClusterId
    key: ServiceKey
    ports: tuple[ServicePort, ...]
    headless: bool = False
    cluster_ip: str = ""
    endpoints: tuple[Endpoint, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    selector: tuple[tuple[str, str], ...] = ()
    traits: ServiceTraits = DEFAULT_TRAITS

    @property
    def type(self) -> ServiceType:
        return ServiceType.HEADLESS if self.headless else ServiceType.CLUSTER_SET_IP

    @property
    def ready_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.ready)


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


@dataclass(frozen=True, slots=True)
class Condition:
    """A ServiceExport condition (type Valid, Ready or Conflict) with the KEP's reason and a readable message.

    ``observed_generation`` is the ServiceExport's ``metadata.generation`` it was computed for (0: unknown);
    ``last_transition_time`` when status or reason last changed (None until a control plane stamps it:
    ``discovery.mcs.stamp``)."""

    type: str
    status: ConditionStatus
    reason: str
    message: str
    observed_generation: int = 0
    last_transition_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class ServiceExport:
    """A ServiceExport object: marks ``key`` in ``cluster`` as exported to the clusterset."""

    cluster: ClusterId
    key: ServiceKey
    created: datetime
    conditions: tuple[Condition, ...] = ()
    generation: int = 0
    # v1beta1 ``spec.exportedLabels`` / ``spec.exportedAnnotations``: what the ServiceImport carries.
    exported_labels: tuple[tuple[str, str], ...] = ()
    exported_annotations: tuple[tuple[str, str], ...] = ()
    # Peer clustersets this service is exported to (annotation ``meshfed.io/export-to-peers``); () stays inside.
    peers: tuple[str, ...] = ()

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """One entry of ServiceImport ``status.clusters``."""

    cluster: ClusterId


@dataclass(frozen=True, slots=True)
class ServiceImport:
    """What the clusterset imports for one service key, derived by ``discovery.mcs``."""

    key: ServiceKey
    type: ServiceType
    ports: tuple[ServicePort, ...]
    clusters: tuple[ClusterId, ...]
    ips: tuple[str, ...] = ()
    traits: ServiceTraits = DEFAULT_TRAITS
    # The oldest export's ``spec.exportedLabels`` / ``spec.exportedAnnotations``.
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """A member cluster: its id, network and locality, and where its east-west gateway listens."""

    id: ClusterId
    network: NetworkId
    region: str = ""
    zone: str = ""
    gateway_host: str = ""
    gateway_port: int = 15443

    @property
    def locality(self) -> Locality:
        return Locality(region=self.region, zone=self.zone, cluster=self.id, network=self.network)


@dataclass(frozen=True, slots=True)
class LocalitySummary:
    """How many endpoints of an exported service a cluster has in one locality (federated instead of pods)."""

    locality: Locality
    ready: int
    weight: int


@dataclass(frozen=True, slots=True)
class RemoteEndpoints:
    """One cluster's shard of an exported service as seen from elsewhere: gateway plus locality summary,
    and pod addresses when the caller is on the same network."""

    cluster: ClusterId
    network: NetworkId
    gateway_host: str
    gateway_port: int
    localities: tuple[LocalitySummary, ...]
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def ready(self) -> int:
        return sum(s.ready for s in self.localities)


@dataclass(frozen=True, slots=True)
class PeerImport:
    """A service a peered clusterset exported to this one (docs/peering.md), as the importing side serves it:
    under ``<svc>.<ns>.svc.<peer>.clusterset.local`` (never merged with a local or clusterset service of the same
    name), with a ClusterSetIP of this clusterset's range, reached only through the exporting clusters' east-west
    gateways (``endpoints``: one per exporting cluster, gateway address and locality summaries, never pods). The
    cluster names in ``endpoints`` are the exporter's and may collide with ours."""

    peer: str  # the peer's name as this clusterset declared it (a DNS label, never "svc")
    key: ServiceKey  # namespace/name in the exporting clusterset
    trust_domain: str  # the exporter's: its workloads' certificates name it and chain to its roots only
    type: ServiceType
    ports: tuple[ServicePort, ...]
    endpoints: tuple[RemoteEndpoints, ...]
    ips: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return peer_host(self.peer, self.key)

    @property
    def ready(self) -> int:
        return sum(e.ready for e in self.endpoints)


def peer_host(peer: str, key: ServiceKey) -> str:
    """The name a peer's service has on the importing side: ``<svc>.<ns>.svc.<peer>.clusterset.local``."""
    return f"{key.name}.{key.namespace}.svc.{peer}.clusterset.local"


@dataclass(frozen=True, slots=True)
class Registry:
    """An immutable snapshot of what one control plane knows, sharded per cluster.

    ``shards[cluster]`` holds that cluster's services; ``exports[cluster]`` its ServiceExports. For remote
    clusters the federation agent fills ``remote[cluster]`` (the per-locality summary and gateway of each service
    that cluster exports) and ``clusters`` (every member's network, locality and gateway); ``imports`` is the
    merged ServiceImport set the federation computed. A cluster's update replaces only its own shard
    (``with_shard``, ``with_remote``); the snapshot is never mutated in place.
    """

    local: ClusterId
    shards: Mapping[ClusterId, Mapping[ServiceKey, Service]] = field(default_factory=dict)
    exports: Mapping[ClusterId, Mapping[ServiceKey, ServiceExport]] = field(default_factory=dict)
    remote: Mapping[ClusterId, Mapping[ServiceKey, RemoteEndpoints]] = field(default_factory=dict)
    clusters: Mapping[ClusterId, ClusterInfo] = field(default_factory=dict)
    imports: Mapping[ServiceKey, ServiceImport] = field(default_factory=dict)
    # Services peered clustersets exported to this one, sorted (peer, key); see PeerImport.
    peers: tuple[PeerImport, ...] = ()
    revision: int = 0

    def with_shard(
        self,
        cluster: ClusterId,
        services: Iterable[Service],
        exports: Iterable[ServiceExport] = (),
    ) -> Registry:
        shards = dict(self.shards)
        shards[cluster] = {s.key: s for s in services}
        all_exports = dict(self.exports)
        all_exports[cluster] = {e.key: e for e in exports}
        return replace(self, shards=shards, exports=all_exports, revision=self.revision + 1)

    def without_shard(self, cluster: ClusterId) -> Registry:
        shards = {c: s for c, s in self.shards.items() if c != cluster}
        exports = {c: e for c, e in self.exports.items() if c != cluster}
        remote = {c: r for c, r in self.remote.items() if c != cluster}
        return replace(self, shards=shards, exports=exports, remote=remote, revision=self.revision + 1)

    def with_remote(self, cluster: ClusterId, entries: Iterable[tuple[ServiceKey, RemoteEndpoints]]) -> Registry:
        """Replace remote cluster ``cluster``'s shard of federated endpoint summaries."""
        remote = dict(self.remote)
        remote[cluster] = dict(entries)
        return replace(self, remote=remote, revision=self.revision + 1)

    def with_catalog(
        self, *, clusters: Mapping[ClusterId, ClusterInfo], imports: Mapping[ServiceKey, ServiceImport]
    ) -> Registry:
        # A persistent map (``immutables.Map``, what the federation agent hands over) is taken as it is: it cannot
        # change under this snapshot, and copying 50,000 imports on every catalog change is what it saves.
        frozen = imports if isinstance(imports, immutables.Map) else dict(imports)
        return replace(self, clusters=dict(clusters), imports=frozen, revision=self.revision + 1)

    def with_peers(self, peers: Iterable[PeerImport]) -> Registry:
        """Replace the services peers exported to this clusterset."""
        return replace(self, peers=tuple(sorted(peers, key=lambda p: (p.peer, p.key))), revision=self.revision + 1)

    def services(self, cluster: ClusterId | None = None) -> list[Service]:
        clusters = [cluster] if cluster is not None else sorted(self.shards)
        return [s for c in clusters for _, s in sorted(self.shards.get(c, {}).items())]

    def service(self, cluster: ClusterId, key: ServiceKey) -> Service | None:
        return self.shards.get(cluster, {}).get(key)

    def source_endpoints(self, cluster: ClusterId, key: ServiceKey) -> tuple[Endpoint, ...]:
        """The endpoints exporting ``cluster`` has for ``key``: its shard's when this registry holds it, else the
        ones the federation shares (pod addresses of same-network remotes only; none otherwise)."""
        service = self.service(cluster, key)
        if service is not None:
            return service.endpoints
        remote = self.remote.get(cluster, {}).get(key)
        return remote.endpoints if remote is not None else ()

    def all_exports(self) -> list[ServiceExport]:
        return [e for c in sorted(self.exports) for _, e in sorted(self.exports[c].items())]
