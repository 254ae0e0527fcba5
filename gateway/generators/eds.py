"""EDS: the endpoints behind each EDS cluster CDS names.

A gateway's cluster lists this cluster's ready pods of the service (their sidecar inbound ports). A sidecar's
outbound cluster lists the local pods plus, per remote cluster that exports the service, either that cluster's
pods (same network) or its east-west gateway weighted by the ready endpoint count. Every endpoint carries its
locality (region, zone, sub_zone = cluster id) and ``meshfed`` metadata saying where it is.

Outbound endpoints are spread over priorities (``gateway.traffic.priorities``): by default 0 for the caller's own
cluster, 1 for other clusters in its region, 2 for the rest, or as the DestinationRule's ``localityLbSetting``
says; Envoy sends a priority's share to the next one as its endpoints become unhealthy or ejected (with the
default overprovisioning factor 1.4). Subset clusters list the endpoints the subset's labels select, then (lower
priorities) the service's endpoints in other locations that match the subset's pod labels, so that a split's
share fails over when its locations are unreachable (``gateway.traffic.subset_endpoints``). Only remote gateway
endpoints take part in the cluster's active health check.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from discovery.model import Locality, PeerImport, Service, ServiceKey, ServicePort
from gateway.context import (
    ProxyInfo,
    ProxyKind,
    PushContext,
    UpstreamEndpoint,
    outbound_cluster_name,
    peer_cluster_name,
    sni_name,
    subset_cluster_name,
)
from gateway.generators.common import socket_address
from gateway.traffic import ClusterPolicy, priorities, subset_endpoints


def _locality(loc: Locality) -> Any:
    return base_pb2.Locality(region=loc.region, zone=loc.zone, sub_zone=loc.cluster)


def _lb_endpoint(ep: UpstreamEndpoint) -> Any:
    meta = struct_pb2.Struct()
    meta.update({"cluster": str(ep.cluster), "via_gateway": ep.via_gateway})
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=socket_address(ep.address, ep.port),
            # Local (and same-network) pods: Kubernetes readiness already speaks for them.
            health_check_config=endpoint_components_pb2.Endpoint.HealthCheckConfig(
                disable_active_health_check=not ep.via_gateway),
        ),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=max(1, ep.weight)),
        metadata=base_pb2.Metadata(filter_metadata={"meshfed": meta}),
    )


def load_assignment(name: str, endpoints: list[UpstreamEndpoint], prios: list[int] | None = None) -> Any:
    """Group endpoints by (priority, locality), in a stable order, into one ClusterLoadAssignment."""
    groups: dict[tuple[int, Locality], list[UpstreamEndpoint]] = defaultdict(list)
    for i, ep in enumerate(endpoints):
        groups[(prios[i] if prios is not None else 0, ep.locality)].append(ep)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=_locality(loc),
                priority=prio,
                lb_endpoints=[_lb_endpoint(e) for e in sorted(groups[(prio, loc)], key=lambda e: (e.address, e.port))],
                # Envoy ignores locality weights unless locality-weighted LB is on; gRPC's xDS client drops a
                # locality without one. The sum of its endpoints' weights keeps both consistent.
                load_balancing_weight=wrappers_pb2.UInt32Value(
                    value=sum(max(1, e.weight) for e in groups[(prio, loc)])),
            )
            for prio, loc in sorted(groups)
        ],
    )


def gateway_assignments_of(service: Service, ctx: PushContext) -> dict[str, Any]:
    """The gateway's endpoints of one exported service (its local pods, per port)."""
    out: dict[str, Any] = {}
    for port in service.ports:
        name = sni_name(service.key, port.port)
        eps = [e for e in ctx.upstream_endpoints(service.key, port) if e.cluster == ctx.local]
        out[name] = load_assignment(name, eps)
    return out


def gateway_assignments(ctx: PushContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for service in ctx.exported_services():
        out |= gateway_assignments_of(service, ctx)
    return out


def _prioritised(name: str, endpoints: list[UpstreamEndpoint], cp: ClusterPolicy, ctx: PushContext) -> Any:
    prios = priorities(endpoints, local=ctx.local_info, local_cluster=str(ctx.local), locality=cp.locality)
    return load_assignment(name, endpoints, prios)


def outbound_assignments_of(key: ServiceKey, ports: tuple[ServicePort, ...], ctx: PushContext) -> dict[str, Any]:
    """The endpoints of one callable service's outbound clusters (per port, and per subset and port)."""
    out: dict[str, Any] = {}
    rule = ctx.policies.destination_rule(key)
    failover = rule is None or not rule.subset_failover_off
    for port in ports:
        name = outbound_cluster_name(key, port.port)
        endpoints = ctx.upstream_endpoints(key, port)
        out[name] = _prioritised(name, endpoints, ClusterPolicy.of(rule), ctx)
        for subset in rule.subsets if rule is not None else ():
            sub_name = subset_cluster_name(key, port.port, subset.name)
            selected, prios = subset_endpoints(
                subset.labels, endpoints, local=ctx.local_info, local_cluster=str(ctx.local),
                locality=ClusterPolicy.of(rule, subset.name).locality, failover=failover)
            out[sub_name] = load_assignment(sub_name, selected, prios)
    return out


def peer_assignments_of(imp: PeerImport, ctx: PushContext) -> dict[str, Any]:
    """The endpoints of a peer's service (per port): the exporting clusters' gateways, one priority."""
    endpoints = ctx.peer_endpoints(imp)
    return {name: load_assignment(name, endpoints)
            for name in (peer_cluster_name(imp, port.port) for port in imp.ports)}


def outbound_assignments(ctx: PushContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, ports in ctx.outbound_services():
        out |= outbound_assignments_of(key, ports, ctx)
    for imp in ctx.registry.peers:
        out |= peer_assignments_of(imp, ctx)
    return out


def generate(proxy: ProxyInfo, names: frozenset[str] | None, ctx: PushContext) -> dict[str, Any]:
    if proxy.kind is ProxyKind.GATEWAY:
        out = ctx.memo("eds-gateway", lambda: gateway_assignments(ctx))
    else:
        out = ctx.memo("eds-outbound", lambda: outbound_assignments(ctx))
    if names is None:
        return dict(out)
    return out if names is None else {n: c for n, c in out.items() if n in names}
