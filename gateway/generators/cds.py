"""CDS: the clusters a proxy needs.

gateway   one EDS cluster per exported service port, named by its SNI, plain TCP (the TLS stream passes through)
sidecar   one EDS cluster per callable service port (mTLS, SNI, HTTP/2) and one static cluster per inbound port;
          plus one per DestinationRule subset and port (``outbound|<port>|<subset>|<host>``). Outbound clusters
          serve HTTP and TCP callers alike (a TCP caller's bytes ride the same mTLS). Capture mode: the Service
          port's protocol picks HTTP/1.1, HTTP/2 or plain TCP to the app, and ``PassthroughCluster`` (ORIGINAL_DST)
          and ``BlackHoleCluster`` (no endpoints) join them. Outbound clusters carry the traffic policy
          (``gateway.traffic``): outlier detection on by default, load balancing, circuit breakers, connect
          timeout, and an active health check that only remote gateway endpoints take part in. A headless
          service also gets ``outbound-pod|<port>||<host>`` (ORIGINAL_DST, mTLS) for captured workloads that dial
          one of its pods
grpc      the outbound clusters only (no active health checks: gRPC's xDS client does not run them)
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import wrappers_pb2

from discovery.model import PeerImport, Service, ServiceKey, ServicePort
from discovery.protocols import is_http, upstream_http2
from gateway import telemetry
from gateway.context import (
    ProxyInfo,
    ProxyKind,
    PushContext,
    inbound_cluster_name,
    outbound_cluster_name,
    peer_cluster_name,
    peer_sni_name,
    pod_cluster_name,
    sni_name,
    subset_cluster_name,
)
from gateway.generators import capture
from gateway.generators.common import (
    TLS_TRANSPORT_SOCKET,
    ads_source,
    duration,
    grpc_upstream_tls,
    pack,
    socket_address,
    upstream_tls,
)
from gateway.traffic import ClusterPolicy, apply_cluster_policy

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _eds_cluster(name: str, ctx: PushContext) -> Any:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration(ctx.connect_timeout_s),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                max_connections=wrappers_pb2.UInt32Value(value=4294967295),
                max_pending_requests=wrappers_pb2.UInt32Value(value=4294967295),
                max_requests=wrappers_pb2.UInt32Value(value=4294967295),
                max_retries=wrappers_pb2.UInt32Value(value=4294967295),
            )
        ]),
    )


def _http_options(http2: bool) -> Any:
    explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
        **({"http2_protocol_options": protocol_pb2.Http2ProtocolOptions()} if http2
           else {"http_protocol_options": protocol_pb2.Http1ProtocolOptions()})
    )
    return pack(http_protocol_options_pb2.HttpProtocolOptions(explicit_http_config=explicit))


def expected_peers(ctx: PushContext, key: ServiceKey, port: ServicePort) -> tuple[str, ...]:
    """The SPIFFE IDs the service's endpoints may present, when every endpoint's service account is known (only
    local pods, each naming its account); empty (any ID of the trust domain) as soon as one is not, e.g. behind a
    remote gateway, whose summary does not list accounts."""
    endpoints = ctx.upstream_endpoints(key, port)
    if not endpoints or any(e.via_gateway or not e.service_account for e in endpoints):
        return ()
    return tuple(sorted({f"{ctx.spiffe_prefix}ns/{key.namespace}/sa/{e.service_account}" for e in endpoints}))


def gateway_clusters_of(service: Service, ctx: PushContext) -> dict[str, Any]:
    """The gateway's clusters of one exported service (one per port)."""
    return {sni_name(service.key, p.port): _eds_cluster(sni_name(service.key, p.port), ctx) for p in service.ports}


def gateway_clusters(ctx: PushContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for service in ctx.exported_services():
        out |= gateway_clusters_of(service, ctx)
    return out


def _outbound_cluster(name: str, grpc: bool, ctx: PushContext, key: ServiceKey, port: ServicePort,
                      cp: ClusterPolicy) -> Any:
    cluster = _eds_cluster(name, ctx)
    # One SNI for local pods and remote gateways alike: gateways route on it, sidecars accept any SNI.
    cluster.transport_socket.name = TLS_TRANSPORT_SOCKET
    sni = sni_name(key, port.port)
    peers = expected_peers(ctx, key, port)
    tls = (grpc_upstream_tls(ctx, sni=sni, exact_peers=peers) if grpc
           else upstream_tls(ctx, sni=sni, exact_peers=peers, alpn=("h2",)))
    cluster.transport_socket.typed_config.CopyFrom(pack(tls))
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_http_options(http2=True))
    cluster.metadata.CopyFrom(telemetry.cluster_metadata(key, port.port))  # destination_service label
    # Health-check when the service is imported from another cluster, not only while one has ready endpoints: the
    # check should not come and go (and the cluster be rebuilt) with a remote cluster's readiness.
    imp = ctx.registry.imports.get(key)
    remote = imp is not None and any(c != ctx.local for c in imp.clusters)
    return apply_cluster_policy(cluster, cp, default_connect_timeout_s=ctx.connect_timeout_s,
                                health_check_s=ctx.gateway_health_check_s if remote and not grpc else 0.0)


def outbound_clusters_of(key: ServiceKey, ports: tuple[ServicePort, ...], ctx: PushContext, *,
                         grpc: bool) -> dict[str, Any]:
    """The outbound clusters of one callable service: one per port, and one per DestinationRule subset and port."""
    out: dict[str, Any] = pod_clusters_of(key, ports, ctx) if not grpc and ctx.headless(key) else {}
    rule = ctx.policies.destination_rule(key)
    for port in ports:
        name = outbound_cluster_name(key, port.port)
        out[name] = _outbound_cluster(name, grpc, ctx, key, port, ClusterPolicy.of(rule))
        for subset in rule.subsets if rule is not None else ():
            sub_name = subset_cluster_name(key, port.port, subset.name)
            out[sub_name] = _outbound_cluster(sub_name, grpc, ctx, key, port, ClusterPolicy.of(rule, subset.name))
    return out


def pod_clusters_of(key: ServiceKey, ports: tuple[ServicePort, ...], ctx: PushContext) -> dict[str, Any]:
    """A headless service's ORIGINAL_DST clusters (per port), for captured workloads that dial one of its pods:
    the connection goes to exactly that pod, over mTLS (the service's SNI; any SPIFFE ID of the trust domain, as
    behind a gateway), where its sidecar's inbound side takes it."""
    out: dict[str, Any] = {}
    for port in ports:
        name = pod_cluster_name(key, port.port)
        cluster = cluster_pb2.Cluster(
            name=name, type=cluster_pb2.Cluster.ORIGINAL_DST, lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
            connect_timeout=duration(ctx.connect_timeout_s))
        cluster.transport_socket.name = TLS_TRANSPORT_SOCKET
        cluster.transport_socket.typed_config.CopyFrom(pack(upstream_tls(ctx, sni=sni_name(key, port.port))))
        cluster.metadata.CopyFrom(telemetry.cluster_metadata(key, port.port))
        out[name] = cluster
    return out


def peer_clusters_of(imp: PeerImport, ctx: PushContext, *, grpc: bool) -> dict[str, Any]:
    """The outbound clusters of a service a peer exported to us (docs/peering.md), one per port: mTLS with the
    peer SNI (the exporter's gateway passes it through to its pods' sidecars), the server checked against the
    exporter's trust domain (its roots only, by the SPIFFE validator in ROOTCA) and the service's namespace, an
    active health check (every endpoint is a remote gateway), default traffic policy (a DestinationRule names
    our own hosts). Proxyless gRPC clients get none: their certificate provider holds our roots only."""
    if grpc:
        return {}
    out: dict[str, Any] = {}
    for port in imp.ports:
        name = peer_cluster_name(imp, port.port)
        cluster = _eds_cluster(name, ctx)
        cluster.transport_socket.name = TLS_TRANSPORT_SOCKET
        tls = upstream_tls(ctx, sni=peer_sni_name(imp.key, port.port), alpn=("h2",),
                           only_prefix=f"spiffe://{imp.trust_domain}/ns/{imp.key.namespace}/")
        cluster.transport_socket.typed_config.CopyFrom(pack(tls))
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_http_options(http2=True))
        cluster.metadata.CopyFrom(telemetry.cluster_metadata(imp.key, port.port, service=imp.host))
        out[name] = apply_cluster_policy(cluster, ClusterPolicy.of(None),
                                         default_connect_timeout_s=ctx.connect_timeout_s,
                                         health_check_s=ctx.gateway_health_check_s)
    return out


def outbound_cluster_inputs(key: ServiceKey, ports: tuple[ServicePort, ...], ctx: PushContext) -> Hashable:
    """Everything ``outbound_clusters_of`` reads of the context for ``key`` beyond the context's fixed settings:
    equal inputs, equal clusters (so an endpoint change that keeps the expected peers rebuilds no cluster)."""
    imp = ctx.registry.imports.get(key)
    return (ports, ctx.policies.destination_rule(key), tuple(expected_peers(ctx, key, p) for p in ports),
            imp is not None and any(c != ctx.local for c in imp.clusters), ctx.headless(key))


def outbound_clusters(proxy: ProxyInfo, ctx: PushContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    grpc = proxy.kind is ProxyKind.GRPC
    for key, ports in ctx.outbound_services():
        out |= outbound_clusters_of(key, ports, ctx, grpc=grpc)
    for imp in ctx.registry.peers:
        out |= peer_clusters_of(imp, ctx, grpc=grpc)
    return out


def inbound_clusters(proxy: ProxyInfo, ctx: PushContext) -> dict[str, Any]:
    """One static cluster per inbound port: the app on 127.0.0.1:<app port>, HTTP/2 for gRPC. In capture mode the
    Service port's protocol decides (``capture.inbound_protocol``): HTTP/2 for grpc and http2, no HTTP options
    for TCP ports; plus the outbound policy's clusters (:func:`capture_clusters`)."""
    out: dict[str, Any] = {}
    for inbound in proxy.inbound:
        name = inbound_cluster_name(inbound.port)
        if proxy.captured:
            protocol = capture.inbound_protocol(proxy, inbound, ctx)
            options = ({} if not is_http(protocol)
                       else {HTTP_PROTOCOL_OPTIONS: _http_options(http2=upstream_http2(protocol))})
        else:
            options = {HTTP_PROTOCOL_OPTIONS: _http_options(http2=inbound.protocol == "grpc")}
        out[name] = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.STATIC,
            connect_timeout=duration(ctx.connect_timeout_s),
            load_assignment=endpoint_pb2.ClusterLoadAssignment(
                cluster_name=name,
                endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                        address=socket_address("127.0.0.1", inbound.app_port)
                    ))
                ])],
            ),
            typed_extension_protocol_options=options,
        )
    if proxy.captured:
        out |= capture_clusters(ctx)
    return out


def capture_clusters(ctx: PushContext) -> dict[str, Any]:
    """``PassthroughCluster`` (ORIGINAL_DST: the address the workload dialled, reached from the proxy's uid, which
    is not captured) and ``BlackHoleCluster`` (no endpoints: connections are closed); the virtual outbound
    listener's default chain uses one of them, as the outbound traffic policy says."""
    return {
        capture.PASSTHROUGH_CLUSTER: cluster_pb2.Cluster(
            name=capture.PASSTHROUGH_CLUSTER,
            type=cluster_pb2.Cluster.ORIGINAL_DST,
            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
            connect_timeout=duration(ctx.connect_timeout_s),
        ),
        capture.BLACKHOLE_CLUSTER: cluster_pb2.Cluster(
            name=capture.BLACKHOLE_CLUSTER,
            type=cluster_pb2.Cluster.STATIC,
            connect_timeout=duration(ctx.connect_timeout_s),
        ),
    }


def generate(proxy: ProxyInfo, names: frozenset[str] | None, ctx: PushContext) -> dict[str, Any]:
    if proxy.kind is ProxyKind.GATEWAY:
        out = dict(ctx.memo("cds-gateway", lambda: gateway_clusters(ctx)))
    else:
        grpc = proxy.kind is ProxyKind.GRPC
        out = dict(ctx.memo(("cds-outbound", grpc), lambda: outbound_clusters(proxy, ctx)))
        if not grpc:
            out |= inbound_clusters(proxy, ctx)
    return out if names is None else {n: c for n, c in out.items() if n in names}
