"""The importing side of peering in the generated configuration (docs/peering.md): a service a peer exported to us
gets its own name, ClusterSetIP, clusters, endpoints (the exporter's gateways), routes and capture chains, with
the server checked under the exporter's trust domain; the exporting gateway routes the peer SNI only for services
exported to peers; and the push pipeline's snapshots stay those the generators build from scratch as peers come,
change and go."""

from __future__ import annotations

import dataclasses

from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from discovery.mcs import allocate_peer_ips
from discovery.model import (
    ClusterId,
    Locality,
    LocalitySummary,
    PeerImport,
    RemoteEndpoints,
    ServiceExport,
    ServicePort,
    ServiceType,
    network_id,
)
from gateway import generators as g
from gateway.context import CaptureMode, InboundPort, PushContext, peer_sni_name
from gateway.generators import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from gateway.push import ConfigKey
from tests.gateway.mesh_fixtures import EAST, RATINGS, T0, MeshCA
from tests.gateway.test_pipeline import GATEWAY, GRPC, PROXIES, SIDECAR, Plane, make_mesh

HOST = "ratings.default.svc.b.clusterset.local"
CLUSTER = f"outbound|9080||{HOST}"


def peer_ratings(ready: int = 2, *, gateway: str = "127.0.9.1") -> PeerImport:
    shard = RemoteEndpoints(cluster=ClusterId("east"), network=network_id("net-b"), gateway_host=gateway,
                            gateway_port=15443,
                            localities=(LocalitySummary(Locality(region="b-r", zone="b-1a", cluster="east"),
                                                        ready, ready),))
    return PeerImport(peer="b", key=RATINGS, trust_domain="b.example", type=ServiceType.CLUSTER_SET_IP,
                      ports=(ServicePort(9080, name="http"),), endpoints=(shard,))


def with_peers(ctx: PushContext, *peers: PeerImport) -> PushContext:
    placed = allocate_peer_ips(peers, "241.0.0.0/16", ctx.registry.imports.values())
    return dataclasses.replace(ctx, registry=ctx.registry.with_peers(placed))


def context(ca: MeshCA) -> PushContext:
    return make_mesh().context(EAST, ca, dict([ca.issue("east", "default", "reviews")]))


def test_a_sidecar_reaches_a_peer_service_through_the_exporters_gateway() -> None:
    ca = MeshCA()
    ctx = with_peers(context(ca), peer_ratings())
    (vip,) = ctx.registry.peers[0].ips
    out = g.generate_all(SIDECAR, ctx)
    cluster = out[CLUSTER_TYPE][CLUSTER]
    tls = tls_pb2.UpstreamTlsContext()
    cluster.transport_socket.typed_config.Unpack(tls)
    assert tls.sni == peer_sni_name(RATINGS, 9080) == "peer_.9080_._.ratings.default.svc.clusterset.local"
    sans = [m.matcher.prefix for m in
            tls.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names]
    assert sans == ["spiffe://b.example/ns/default/"]  # the exporter's trust domain only, never ours
    assert cluster.health_checks  # every endpoint is a remote gateway
    # The clusterset's own ratings keeps its own cluster: the two never merge.
    assert "outbound|9080||ratings.default.svc.clusterset.local" in out[CLUSTER_TYPE]
    (locality,) = out[ENDPOINT_TYPE][CLUSTER].endpoints
    (lb,) = locality.lb_endpoints
    assert (lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value) == \
        ("127.0.9.1", 15443)
    assert locality.locality.sub_zone == "b/east"  # the exporter's cluster, named under the peer
    assert lb.load_balancing_weight.value == 2
    vhost = next(v for v in out[ROUTE_TYPE]["outbound"].virtual_hosts if v.name == f"{HOST}:9080")
    assert set(vhost.domains) == {HOST, f"{HOST}:9080", vip, f"{vip}:9080"}
    assert vhost.routes[0].route.cluster == CLUSTER
    # Proxyless gRPC clients do not reach peers (their certificate provider holds our roots only).
    grpc = g.generate_all(GRPC, ctx)
    assert CLUSTER not in grpc[CLUSTER_TYPE] and not any(HOST in n for n in grpc[LISTENER_TYPE])
    # A captured workload dialling the ClusterSetIP lands on the HTTP chain of its port.
    cap = dataclasses.replace(SIDECAR, capture=CaptureMode.REDIRECT, inbound=(InboundPort(21001, 21001, "http"),))
    chains = g.generate_all(cap, ctx)[LISTENER_TYPE]["virtualOutbound"].filter_chains
    http = next(c for c in chains if c.name == "http:9080")
    assert vip in {r.address_prefix for r in http.filter_chain_match.prefix_ranges}
    # No ready endpoint left at the peer: the cluster stays, without endpoints.
    gone = with_peers(context(ca), peer_ratings(ready=0))
    assert not g.generate_all(SIDECAR, gone)[ENDPOINT_TYPE][CLUSTER].endpoints


def test_the_exporting_gateway_routes_the_peer_sni_only_for_services_exported_to_peers() -> None:
    ca = MeshCA()
    ctx = context(ca)
    names = {n for c in g.generate_all(GATEWAY, ctx)[LISTENER_TYPE]["gateway"].filter_chains
             for n in c.filter_chain_match.server_names}
    assert "outbound_.9080_._.ratings.default.svc.clusterset.local" in names
    assert not [n for n in names if n.startswith("peer_.")]  # exported to the clusterset, not to a peer
    reg = ctx.registry
    exports = [ServiceExport(cluster=EAST, key=RATINGS, created=T0, peers=("b",))]
    peered = dataclasses.replace(ctx, registry=reg.with_shard(EAST, reg.services(EAST), exports))
    (chain,) = [c for c in g.generate_all(GATEWAY, peered)[LISTENER_TYPE]["gateway"].filter_chains
                if "outbound_.9080_._.ratings.default.svc.clusterset.local" in c.filter_chain_match.server_names]
    assert list(chain.filter_chain_match.server_names) == [
        "outbound_.9080_._.ratings.default.svc.clusterset.local", "peer_.9080_._.ratings.default.svc.clusterset.local"]


async def test_pipeline_snapshots_equal_the_generators_as_peer_services_come_change_and_go() -> None:
    ca = MeshCA()
    cap = dataclasses.replace(SIDECAR, node_id="sidecar~10.0.0.4~reviews-2.default~default.svc.cluster.local",
                              capture=CaptureMode.REDIRECT, inbound=(InboundPort(21001, 21001, "http"),))
    nodes = {**PROXIES, cap.node_id: cap}
    plane = Plane(context(ca))
    await plane.push(full=True, nodes=nodes)
    plane.check(nodes)
    # Peers' services arrive (the control plane pushes in full on such a change).
    changed = await plane.push(with_peers(plane.ctx, peer_ratings()), full=True, nodes=nodes)
    assert {SIDECAR.node_id, cap.node_id} <= set(changed) and GATEWAY.node_id not in changed
    plane.check(nodes)
    # Only the peer's ready count: endpoints change, the cluster does not.
    before = plane.cache.get(SIDECAR.node_id)
    assert before is not None
    await plane.push(with_peers(plane.ctx, peer_ratings(ready=5)), full=True, nodes=nodes)
    plane.check(nodes)
    after = plane.cache.get(SIDECAR.node_id)
    assert after is not None
    assert after.version(CLUSTER_TYPE) == before.version(CLUSTER_TYPE)
    assert after.version(ENDPOINT_TYPE) != before.version(ENDPOINT_TYPE)
    # A change of the clusterset's own services keeps the peers' resources in the combined route and listener.
    reg = plane.ctx.registry
    await plane.push(dataclasses.replace(plane.ctx, registry=reg.with_shard(EAST, reg.services(EAST), [])),
                     nodes=nodes, configs=frozenset({ConfigKey.shard(EAST)}))
    plane.check(nodes)
    # The peer withdraws it.
    await plane.push(dataclasses.replace(plane.ctx, registry=plane.ctx.registry.with_peers(())), full=True,
                     nodes=nodes)
    plane.check(nodes)
    assert CLUSTER not in plane.cache.get(SIDECAR.node_id).names(CLUSTER_TYPE)  # type: ignore[union-attr]
