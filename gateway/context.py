"""The inputs of the xDS generators: who is asking (``ProxyInfo``) and what the control plane knows (``PushContext``).

Both are frozen values. A ``PushContext`` wraps one immutable ``discovery.model.Registry`` (local shards, remote
shards filled by the federation agent, member clusters and the merged ServiceImports) plus the trust material;
a new registry revision means a new ``PushContext``. Generators are pure functions of (proxy, names, context).

Naming used everywhere in the generated configuration (see ``docs/envoy-config.md``)::

    SNI / gateway cluster   outbound_.<port>_._.<svc>.<ns>.svc.clusterset.local
    sidecar outbound        outbound|<port>||<svc>.<ns>.svc.clusterset.local
    sidecar subset          outbound|<port>|<subset>|<svc>.<ns>.svc.clusterset.local   (DestinationRule subsets)
    sidecar inbound         inbound|<port>
    headless pod (captured) outbound-pod|<port>||<svc>.<ns>.svc.clusterset.local   (ORIGINAL_DST, mTLS)
    peer service (importer) outbound|<port>||<svc>.<ns>.svc.<peer>.clusterset.local
    peer SNI (both sides)   peer_.<port>_._.<svc>.<ns>.svc.clusterset.local   (the exporter's gateway routes it
                            only for services exported to a peer: docs/peering.md)

Exception tree (this module)::

    ProxyInfoError (ValueError)   node metadata that does not describe a proxy (names the field)
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from discovery.authz import AuthorizationPolicy
from discovery.clusterset import OutboundTrafficMode
from discovery.model import (
    ClusterId,
    ClusterInfo,
    Endpoint,
    Locality,
    Namespace,
    NetworkId,
    PeerImport,
    Registry,
    RemoteEndpoints,
    Service,
    ServiceKey,
    ServicePort,
    ServiceType,
    cluster_id,
)
from discovery.model import namespace as _namespace
from discovery.policy import TrafficPolicies

T = TypeVar("T")


class ProxyInfoError(ValueError):
    """Node metadata is missing a field or holds a value that cannot describe a proxy."""


class ProxyKind(enum.StrEnum):
    GATEWAY = "gateway"
    SIDECAR = "sidecar"
    GRPC = "grpc"


class CaptureMode(enum.StrEnum):
    """How a sidecar's traffic reaches it (metadata ``MESHFED_CAPTURE``).

    ``none``: the workload calls the sidecar's explicit outbound HTTP listener on 127.0.0.1 with a ``Host``
    header, and callers reach the sidecar's inbound listeners directly (the loopback mode of ``meshfed up``).
    ``redirect``: the pod's iptables rules (``meshfed proxy capture``) redirect every outbound TCP connection to
    the virtual outbound listener and every inbound one to the virtual inbound listener
    (``gateway.generators.capture``)."""

    NONE = "none"
    REDIRECT = "redirect"


def sni_name(key: ServiceKey, port: int) -> str:
    """The SNI a caller sends to reach ``key``'s ``port`` through an east-west gateway."""
    return f"outbound_.{port}_._.{key.name}.{key.namespace}.svc.clusterset.local"


def outbound_cluster_name(key: ServiceKey, port: int) -> str:
    return f"outbound|{port}||{key.clusterset_host}"


def subset_cluster_name(key: ServiceKey, port: int, subset: str) -> str:
    """The cluster of one DestinationRule subset (Istio's naming: the subset between the port and the host)."""
    return f"outbound|{port}|{subset}|{key.clusterset_host}"


def inbound_cluster_name(port: int) -> str:
    return f"inbound|{port}"


def pod_cluster_name(key: ServiceKey, port: int) -> str:
    """The ORIGINAL_DST cluster a captured workload's connection to one pod of a headless service takes: mTLS to
    the very pod it dialled (a headless service's clients pick their pod; no load balancing)."""
    return f"outbound-pod|{port}||{key.clusterset_host}"


def peer_sni_name(key: ServiceKey, port: int) -> str:
    """The SNI a peer's sidecar sends to reach ``key``'s ``port`` through our gateway (and ours through a peer's):
    a name of its own, which the gateway routes only for the services exported to peers (what refuses a peer's
    caller elsewhere is the callee sidecar's handshake: docs/peering.md)."""
    return f"peer_.{port}_._.{key.name}.{key.namespace}.svc.clusterset.local"


def peer_cluster_name(imp: PeerImport, port: int) -> str:
    return f"outbound|{port}||{imp.host}"


@dataclass(frozen=True, slots=True, order=True)
class PeerKey:
    """A peer's service in the push pipeline's tables, beside the ServiceKeys of the clusterset's own."""

    peer: str
    key: ServiceKey


@dataclass(frozen=True, slots=True)
class InboundPort:
    """One port on which a sidecar accepts mTLS and forwards to the workload on ``app_port``.

    ``port`` is what the registry lists as the endpoint's port (the sidecar's inbound listener); ``app_port`` is
    where the application itself listens on loopback.
    """

    port: int
    app_port: int
    name: str = ""
    protocol: str = "http"  # how the sidecar talks to the app: "http" (HTTP/1.1) or "grpc" (HTTP/2)

    def __post_init__(self) -> None:
        for what, value in (("inbound port", self.port), ("app port", self.app_port)):
            if not 1 <= value <= 65535:
                raise ProxyInfoError(f"{what} {value} is out of range 1..65535")
        if self.protocol not in ("http", "grpc"):
            raise ProxyInfoError(f"inbound port {self.port}: protocol {self.protocol!r} is not 'http' or 'grpc'")


# Node metadata keys written by gateway.bootstrap and read back by ProxyInfo.from_node (CLUSTER_ID, NAMESPACE and
# SERVICE_ACCOUNT as Istio spells them; gateway.auth checks SERVICE_ACCOUNT against the stream's token).
META_KIND = "MESHFED_KIND"
META_CLUSTER = "CLUSTER_ID"
META_NAMESPACE = "NAMESPACE"
META_SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
META_SERVICES = "MESHFED_SERVICES"
META_INBOUND = "MESHFED_INBOUND"
META_OUTBOUND_PORT = "MESHFED_OUTBOUND_PORT"
META_GATEWAY_PORT = "MESHFED_GATEWAY_PORT"
META_IP = "MESHFED_IP"
# Capture mode (docs/traffic-capture.md): written only when it is not "none", so loopback nodes are unchanged.
META_CAPTURE = "MESHFED_CAPTURE"
META_INBOUND_CAPTURE_PORT = "MESHFED_INBOUND_CAPTURE_PORT"
META_CAPTURE_BIND = "MESHFED_CAPTURE_BIND"


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """Who is asking for configuration.

    ``kind`` gateway: an east-west gateway listening on ``ip``:``gateway_port``. ``kind`` sidecar: a workload's
    Envoy with inbound listeners (``inbound``) and one outbound HTTP listener on 127.0.0.1:``outbound_port``.
    ``kind`` grpc: a proxyless gRPC client (API listeners per imported service port).

    ``capture`` redirect (sidecars only): instead of those listeners, a virtual outbound listener on
    ``outbound_port`` and a virtual inbound one on ``inbound_capture_port``, each bound to every address of
    ``capture_bind`` (``0.0.0.0``; add ``::`` for a pod with IPv6, whose ip6tables rules redirect too), fed by the
    pod's iptables rules.
    """

    kind: ProxyKind
    cluster: ClusterId
    node_id: str
    namespace: Namespace
    service_account: str = "default"
    services: tuple[ServiceKey, ...] = ()
    inbound: tuple[InboundPort, ...] = ()
    outbound_port: int = 15001
    gateway_port: int = 15443
    ip: str = "127.0.0.1"
    capture: CaptureMode = CaptureMode.NONE
    inbound_capture_port: int = 15006
    capture_bind: tuple[str, ...] = ("0.0.0.0",)

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ProxyInfoError("node id is empty")
        if not self.capture_bind or len(set(self.capture_bind)) != len(self.capture_bind):
            raise ProxyInfoError(f"proxy {self.node_id}: capture bind addresses {self.capture_bind!r} must be one or "
                                 "more distinct IP addresses")
        for what, address in (("ip", self.ip), *(("capture bind address", a) for a in self.capture_bind)):
            try:
                ipaddress.ip_address(address)
            except ValueError as exc:
                raise ProxyInfoError(f"proxy {self.node_id}: {what} {address!r} is not an IP address") from exc
        for what, value in (("outbound port", self.outbound_port), ("gateway port", self.gateway_port),
                            ("inbound capture port", self.inbound_capture_port)):
            if not 1 <= value <= 65535:
                raise ProxyInfoError(f"proxy {self.node_id}: {what} {value} is out of range 1..65535")
        if self.captured and self.kind is not ProxyKind.SIDECAR:
            raise ProxyInfoError(f"proxy {self.node_id}: capture mode {self.capture} is for sidecars only, "
                                 f"not {self.kind}")
        if self.captured and self.outbound_port == self.inbound_capture_port:
            raise ProxyInfoError(f"proxy {self.node_id}: outbound port and inbound capture port are both "
                                 f"{self.outbound_port}")

    @property
    def captured(self) -> bool:
        """Whether the sidecar's traffic is redirected to it (virtual listeners, not the explicit ones)."""
        return self.capture is not CaptureMode.NONE

    def spiffe_id(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def metadata(self) -> dict[str, str]:
        """Flat string node metadata (what the bootstrap sends; ``from_node`` reads it back)."""
        return {
            META_KIND: str(self.kind),
            META_CLUSTER: str(self.cluster),
            META_NAMESPACE: str(self.namespace),
            META_SERVICE_ACCOUNT: self.service_account,
            META_SERVICES: ",".join(str(k) for k in self.services),
            META_INBOUND: ",".join(f"{p.port}:{p.app_port}:{p.name}:{p.protocol}" for p in self.inbound),
            META_OUTBOUND_PORT: str(self.outbound_port),
            META_GATEWAY_PORT: str(self.gateway_port),
            META_IP: self.ip,
        } | ({META_CAPTURE: str(self.capture), META_INBOUND_CAPTURE_PORT: str(self.inbound_capture_port),
              META_CAPTURE_BIND: ",".join(self.capture_bind)} if self.captured else {})

    @classmethod
    def from_node(cls, node_id: str, metadata: Mapping[str, Any], *, namespace: str | None = None,
                  service_account: str | None = None, cluster: str | None = None) -> ProxyInfo:
        """Rebuild a ProxyInfo from an xDS node's id and metadata (a Struct converted to a dict).

        ``namespace``, ``service_account`` and ``cluster``, when given, are the identity the node's stream
        authenticated as (gateway.auth.ProxyIdentity): they are who the proxy is, and so whose certificate and
        policies it is served, whatever its metadata says; metadata naming another is a ProxyInfoError."""

        def get(key: str, default: str | None = None, *, bound: str | None = None) -> str:
            value = metadata.get(key)
            if bound is not None:
                if value is not None and str(value) != bound:
                    raise ProxyInfoError(f"node {node_id!r}: metadata field {key}={value!r} is not the "
                                         f"authenticated identity's {bound!r}")
                return bound
            if value is None:
                value = default
            if value is None:
                raise ProxyInfoError(f"node {node_id!r}: metadata field {key} is missing")
            return str(value)

        def port(key: str, default: str) -> int:
            text = get(key, default)
            try:
                return int(float(text))
            except ValueError as exc:
                raise ProxyInfoError(f"node {node_id!r}: metadata field {key}={text!r} is not a port") from exc

        try:
            kind = ProxyKind(get(META_KIND))
        except ValueError as exc:
            raise ProxyInfoError(f"node {node_id!r}: metadata field {META_KIND} is not one of "
                                 f"{[k.value for k in ProxyKind]}") from exc
        try:
            services = tuple(ServiceKey.parse(s) for s in get(META_SERVICES, "").split(",") if s)
            cluster_ = cluster_id(get(META_CLUSTER, bound=cluster))
            ns = _namespace(get(META_NAMESPACE, bound=namespace))
        except ValueError as exc:
            raise ProxyInfoError(f"node {node_id!r}: {exc}") from exc
        inbound: list[InboundPort] = []
        for item in get(META_INBOUND, "").split(","):
            if not item:
                continue
            parts = item.split(":")
            try:
                inbound.append(InboundPort(port=int(parts[0]), app_port=int(parts[1]),
                                           name=parts[2] if len(parts) > 2 else "",
                                           protocol=parts[3] if len(parts) > 3 and parts[3] else "http"))
            except (ValueError, IndexError) as exc:
                raise ProxyInfoError(f"node {node_id!r}: metadata field {META_INBOUND} entry {item!r} "
                                     "is not PORT:APP_PORT[:NAME[:PROTOCOL]]") from exc
        try:
            capture = CaptureMode(get(META_CAPTURE, "none").lower())
        except ValueError as exc:
            raise ProxyInfoError(f"node {node_id!r}: metadata field {META_CAPTURE} is not one of "
                                 f"{[m.value for m in CaptureMode]}") from exc
        return cls(
            kind=kind,
            cluster=cluster_,
            node_id=node_id,
            namespace=ns,
            service_account=get(META_SERVICE_ACCOUNT, "default", bound=service_account),
            services=services,
            inbound=tuple(inbound),
            outbound_port=port(META_OUTBOUND_PORT, "15001"),
            gateway_port=port(META_GATEWAY_PORT, "15443"),
            ip=get(META_IP, "127.0.0.1"),
            capture=capture,
            inbound_capture_port=port(META_INBOUND_CAPTURE_PORT, "15006"),
            capture_bind=tuple(a.strip() for a in get(META_CAPTURE_BIND, "0.0.0.0").split(",")),
        )


@dataclass(frozen=True, slots=True)
class UpstreamEndpoint:
    """One weighted address a sidecar's outbound cluster sends to: a local pod or a remote gateway."""

    address: str
    port: int
    locality: Locality
    weight: int
    cluster: ClusterId
    via_gateway: bool
    service_account: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # pod labels (local pods, same-network remote pods); none via gateways


@dataclass(frozen=True, slots=True)
class WorkloadCert:
    """A workload's key and certificate chain (leaf first), PEM, as the CA issued them."""

    key_pem: str
    chain_pem: str


@dataclass(frozen=True, slots=True)
class PushContext:
    """Everything generators read: the registry snapshot, the trust domain and material, the traffic policies."""

    registry: Registry
    trust_domain: str
    connect_timeout_s: float = 5.0
    # Name of the SDS secret holding a proxy's own certificate and of the one holding the trust bundle.
    cert_secret: str = "default"
    root_secret: str = "ROOTCA"
    # The trust bundle (PEM roots every cluster shares) and, per SPIFFE ID, the certificate SDS hands out.
    trust_bundle_pem: str = ""
    # Peered clustersets' trust domains and their roots (PEM), sorted, each kept apart from ours and every other's:
    # (trust domain, PEM). With any, sidecars validate peers with Envoy's SPIFFE validator, one bundle per trust
    # domain (docs/peering.md); a foreign caller gets in only where an AuthorizationPolicy names it.
    peer_bundles: tuple[tuple[str, str], ...] = ()
    workload_certs: Mapping[str, WorkloadCert] = field(default_factory=dict)
    # AuthorizationPolicies of the local cluster (gateway.rbac compiles those selecting a sidecar's workload).
    authz: tuple[AuthorizationPolicy, ...] = ()
    # This cluster's VirtualServices and DestinationRules (each cluster applies its own, like Istio multi-primary).
    policies: TrafficPolicies = field(default_factory=TrafficPolicies)
    # Active TCP (+mTLS handshake) health checks on remote gateway endpoints, every this many seconds; 0: off.
    gateway_health_check_s: float = 2.0
    # What capture-mode sidecars do with connections to destinations the mesh does not know (clusterset.yaml's
    # outboundTrafficPolicy.mode): pass them through (ALLOW_ANY) or refuse them (REGISTRY_ONLY).
    outbound_mode: OutboundTrafficMode = OutboundTrafficMode.ALLOW_ANY
    # Results shared by many proxies (every sidecar's outbound clusters, endpoints, routes per namespace) are
    # computed once per context. A changed input means a new context (``dataclasses.replace``), with an empty memo.
    _memo: dict[Hashable, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def memo(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()`` once per context and ``key``; later calls return the same (never mutated) value."""
        try:
            return self._memo[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self._memo[key] = build()
            return value

    @property
    def local(self) -> ClusterId:
        return self.registry.local

    @property
    def local_info(self) -> ClusterInfo | None:
        return self.registry.clusters.get(self.registry.local)

    @property
    def local_network(self) -> NetworkId | None:
        info = self.local_info
        return info.network if info is not None else None

    @property
    def spiffe_prefix(self) -> str:
        return f"spiffe://{self.trust_domain}/"

    def exported_services(self) -> list[Service]:
        """Local services this cluster exports (and whose export is not marked invalid), sorted by key."""
        exports = self.registry.exports.get(self.local, {})
        out: list[Service] = []
        for key, export in sorted(exports.items()):
            service = self.registry.service(self.local, key)
            if service is None or service.headless:
                continue
            valid = export.condition("Valid")
            if valid is not None and valid.status == "False":
                continue
            out.append(service)
        return out

    def outbound_services(self) -> list[tuple[ServiceKey, tuple[ServicePort, ...]]]:
        """Every service a sidecar can call: the clusterset's imports plus local services not imported."""
        found: dict[ServiceKey, tuple[ServicePort, ...]] = {}
        for key, imp in self.registry.imports.items():
            found[key] = imp.ports
        for service in self.registry.services(self.local):
            if service.key not in found and not service.headless:
                found[service.key] = service.ports
        return sorted(found.items())

    def headless(self, key: ServiceKey) -> bool:
        """Whether ``key`` is a headless service (its ServiceImport, or the local Service when not imported)."""
        imp = self.registry.imports.get(key)
        if imp is not None:
            return imp.type is ServiceType.HEADLESS
        local = self.registry.service(self.local, key)
        return local is not None and local.headless

    def pod_destinations(self, key: ServiceKey, port: ServicePort) -> list[tuple[str, int]]:
        """The (pod address, port) pairs a client of headless ``key`` may dial on ``port``: the ready endpoints this
        cluster can reach directly (its own pods and those of remote clusters on its network), sorted."""
        return sorted({(e.address, e.port) for e in self.upstream_endpoints(key, port) if not e.via_gateway})

    def peer_imports(self) -> Mapping[PeerKey, PeerImport]:
        """The services peers exported to us (docs/peering.md), by pipeline key."""
        return self.memo("peer-imports", lambda: {PeerKey(p.peer, p.key): p for p in self.registry.peers})

    def peer_endpoints(self, imp: PeerImport) -> list[UpstreamEndpoint]:
        """Where a sidecar sends a peer's service: each exporting cluster's east-west gateway, weighted by its
        ready endpoints; the exporter's cluster names are prefixed with the peer's (they may be ours too)."""
        out = []
        for shard in imp.endpoints:
            if shard.ready <= 0 or not shard.gateway_host:
                continue
            regions = sorted({s.locality.region for s in shard.localities if s.ready > 0})
            out.append(_gateway_endpoint(shard, region=regions[0] if len(regions) == 1 else "",
                                         cluster=ClusterId(f"{imp.peer}/{shard.cluster}"),
                                         network=f"{imp.peer}/{shard.network}"))
        return out

    def remote_shards(self, key: ServiceKey) -> Iterator[RemoteEndpoints]:
        for cluster in sorted(self.registry.remote):
            if cluster == self.local:
                continue
            entry = self.registry.remote[cluster].get(key)
            if entry is not None:
                yield entry

    def _local_locality(self, endpoint: Endpoint) -> Locality:
        info = self.local_info
        if info is None:
            return Locality(zone=endpoint.zone, cluster=self.local)
        return Locality(region=info.region, zone=endpoint.zone or info.zone, cluster=self.local,
                        network=info.network)

    def upstream_endpoints(self, key: ServiceKey, port: ServicePort) -> list[UpstreamEndpoint]:
        return self.memo(("upstream", key, port), lambda: self._upstream_endpoints(key, port))

    def _upstream_endpoints(self, key: ServiceKey, port: ServicePort) -> list[UpstreamEndpoint]:
        """Where a sidecar sends ``key``:``port``: ready local pods (weight 1 each), and per remote cluster that
        exports it either its pods (same network) or its gateway weighted by the ready endpoint count."""
        out: list[UpstreamEndpoint] = []
        local = self.registry.service(self.local, key)
        if local is not None:
            local_port = next((p for p in local.ports if p.port == port.port), port)
            for ep in local.ready_endpoints:
                out.append(UpstreamEndpoint(
                    address=ep.address, port=_endpoint_port(ep, local_port), locality=self._local_locality(ep),
                    weight=1, cluster=self.local, via_gateway=False, service_account=ep.service_account,
                    labels=ep.labels,
                ))
        network = self.local_network
        for shard in self.remote_shards(key):
            if shard.ready <= 0:
                continue
            info = self.registry.clusters.get(shard.cluster)
            region = info.region if info is not None else ""
            if network is not None and shard.network == network and shard.endpoints:
                for ep in shard.endpoints:
                    if not ep.ready:
                        continue
                    out.append(UpstreamEndpoint(
                        address=ep.address, port=_endpoint_port(ep, port),
                        locality=Locality(region=region, zone=ep.zone, cluster=shard.cluster, network=shard.network),
                        weight=1, cluster=shard.cluster, via_gateway=False, service_account=ep.service_account,
                        labels=ep.labels,
                    ))
                continue
            if info is not None and not region:
                region = info.region
            out.append(_gateway_endpoint(shard, region=region, cluster=shard.cluster, network=shard.network))
        return out


def _gateway_endpoint(shard: RemoteEndpoints, *, region: str, cluster: ClusterId, network: str) -> UpstreamEndpoint:
    """A remote cluster's share of a service as one endpoint, its east-west gateway, weighted by its ready
    endpoints; its zone when they are all in one."""
    zones = sorted({s.locality.zone for s in shard.localities if s.ready > 0})
    return UpstreamEndpoint(
        address=shard.gateway_host, port=shard.gateway_port,
        locality=Locality(region=region, zone=zones[0] if len(zones) == 1 else "", cluster=cluster, network=network),
        weight=shard.ready, cluster=cluster, via_gateway=True)


def _endpoint_port(endpoint: Endpoint, port: ServicePort) -> int:
    default = port.target_port if isinstance(port.target_port, int) and port.target_port else port.port
    return endpoint.port_for(port.name, default)
