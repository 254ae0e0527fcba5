"""EDS: the endpoints behind each EDS cluster CDS names.

A gateway's cluster lists this cluster's ready pods of the service (their sidecar inbound ports). A sidecar's
outbound cluster lists the local pods plus, per remote cluster that exports the service, either that cluster's
pods (same network) or its east-west gateway weighted by the ready endpoint count. Every endpoint carries its
locality (region, zone, sub_zone = cluster id) and ``meshfed`` metadata saying where it is.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from discovery.model import Locality
from gateway.context import ProxyInfo, ProxyKind, PushContext, UpstreamEndpoint, outbound_cluster_name, sni_name
from gateway.generators.common import socket_address


def _locality(loc: Locality) -> Any:
    return base_pb2.Locality(region=loc.region, zone=loc.zone, sub_zone=loc.cluster)


def _lb_endpoint(ep: UpstreamEndpoint) -> Any:
    meta = struct_pb2.Struct()
    meta.update({"cluster": str(ep.cluster), "via_gateway": ep.via_gateway})
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(ep.address, ep.port)),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=max(1, ep.weight)),
        metadata=base_pb2.Metadata(filter_metadata={"meshfed": meta}),
    )


def load_assignment(name: str, endpoints: list[UpstreamEndpoint]) -> Any:
    """Group endpoints by locality, in a stable order, into one ClusterLoadAssignment."""
    groups: dict[Locality, list[UpstreamEndpoint]] = defaultdict(list)
    for ep in endpoints:
        groups[ep.locality].append(ep)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=_locality(loc),
                lb_endpoints=[_lb_endpoint(e) for e in sorted(groups[loc], key=lambda e: (e.address, e.port))],
                # Envoy ignores locality weights unless locality-weighted LB is on; gRPC's xDS client drops a
                # locality without one. The sum of its endpoints' weights keeps both consistent.
                load_balancing_weight=wrappers_pb2.UInt32Value(value=sum(max(1, e.weight) for e in groups[loc])),
            )
            for loc in sorted(groups)
        ],
    )


def gateway_assignments(ctx: PushContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for service in ctx.exported_services():
        for port in service.ports:
            name = sni_name(service.key, port.port)
            eps = [e for e in ctx.upstream_endpoints(service.key, port) if e.cluster == ctx.local]
            out[name] = load_assignment(name, eps)
    return out


def outbound_assignments(ctx: PushContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, ports in ctx.outbound_services():
        for port in ports:
            name = outbound_cluster_name(key, port.port)
            out[name] = load_assignment(name, ctx.upstream_endpoints(key, port))
    return out


def generate(proxy: ProxyInfo, names: frozenset[str] | None, ctx: PushContext) -> dict[str, Any]:
    if proxy.kind is ProxyKind.GATEWAY:
        out = ctx.memo("eds-gateway", lambda: gateway_assignments(ctx))
    else:
        out = ctx.memo("eds-outbound", lambda: outbound_assignments(ctx))
    if names is None:
        return dict(out)
    return out if names is None else {n: c for n, c in out.items() if n in names}
