"""The pure xDS generators: fields, SNI names, weights and localities, and Envoy accepting what they produce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from discovery.model import (
    Condition,
    ConditionStatus,
    Endpoint,
    Locality,
    LocalitySummary,
    NetworkId,
    RemoteEndpoints,
    ServiceExport,
    namespace,
)
from gateway import generators as g
from gateway.bootstrap import render_bootstrap, write_bootstrap
from gateway.context import InboundPort, ProxyInfo, ProxyInfoError, ProxyKind, PushContext
from gateway.envoy import validate
from tests.gateway.mesh_fixtures import EAST, RATINGS, REVIEWS, T0, WEST, Mesh, MeshCA

SNI = "outbound_.9080_._.ratings.default.svc.clusterset.local"
OUT = "outbound|9080||ratings.default.svc.clusterset.local"


def make_mesh() -> Mesh:
    mesh = Mesh(east_gateway_port=15443, west_gateway_port=16443)
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.2", 20001), ("127.0.0.3", 20001)]
    mesh.pods[(EAST, REVIEWS)] = [("127.0.0.4", 21001)]
    mesh.pods[(EAST, RATINGS)] = [("127.0.0.5", 21002)]
    mesh.exports[WEST] = {RATINGS}
    mesh.exports[EAST] = {RATINGS}
    return mesh


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA()


def sidecar(cluster: str = "east", ns: str = "default") -> ProxyInfo:
    return ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST if cluster == "east" else WEST,
                     node_id=f"sidecar~127.0.0.4~reviews-1.{ns}~{ns}.svc.cluster.local", namespace=namespace(ns),
                     service_account="reviews", services=(REVIEWS,), inbound=(InboundPort(21001, 8081, "http"),),
                     outbound_port=15001)


def gateway(cluster: str = "west") -> ProxyInfo:
    return ProxyInfo(kind=ProxyKind.GATEWAY, cluster=WEST if cluster == "west" else EAST,
                     node_id="router~127.0.0.1~gw.meshfed~meshfed.svc.cluster.local", namespace=namespace("meshfed"),
                     gateway_port=16443)


def unpack(any_msg: Any, cls: Any) -> Any:
    out = cls()
    assert any_msg.Unpack(out)
    return out


def test_gateway_listener_has_one_sni_chain_per_exported_port_and_no_default(ca: MeshCA) -> None:
    mesh = make_mesh()
    mesh.pods[(WEST, REVIEWS)] = [("127.0.0.6", 20002)]  # present in west but not exported
    ctx = mesh.context(WEST, ca, {})
    listeners = g.generate(g.LISTENER_TYPE, gateway(), None, ctx)
    assert list(listeners) == ["gateway"]
    lis = listeners["gateway"]
    assert lis.address.socket_address.port_value == 16443
    assert [f.name for f in lis.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    assert [list(c.filter_chain_match.server_names) for c in lis.filter_chains] == [[SNI]]
    chain = lis.filter_chains[0]
    assert chain.filter_chain_match.transport_protocol == "tls"
    assert not chain.HasField("transport_socket"), "the gateway must pass TLS through, never terminate it"
    assert not lis.HasField("default_filter_chain")
    tcp = unpack(chain.filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
    assert tcp.cluster == SNI


def test_gateway_cluster_and_endpoints_are_the_local_pods_sidecar_ports(ca: MeshCA) -> None:
    ctx = make_mesh().context(WEST, ca, {})
    clusters = g.generate(g.CLUSTER_TYPE, gateway(), None, ctx)
    assert list(clusters) == [SNI]
    assert not clusters[SNI].HasField("transport_socket")
    cla = g.generate(g.ENDPOINT_TYPE, gateway(), None, ctx)[SNI]
    addrs = sorted((e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
                   for loc in cla.endpoints for e in loc.lb_endpoints)
    assert addrs == [("127.0.0.2", 20001), ("127.0.0.3", 20001)]
    assert {loc.locality.sub_zone for loc in cla.endpoints} == {"west"}
    assert g.generate(g.SECRET_TYPE, gateway(), None, ctx) == {}
    assert g.generate(g.ROUTE_TYPE, gateway(), None, ctx) == {}


def test_invalid_export_is_not_served_by_the_gateway(ca: MeshCA) -> None:
    mesh = make_mesh()
    reg = mesh.registry(WEST)
    bad = ServiceExport(cluster=WEST, key=RATINGS, created=T0, conditions=(
        Condition("Valid", ConditionStatus.FALSE, "NoService", "no such service"),))
    reg = reg.with_shard(WEST, reg.services(WEST), [bad])
    ctx = PushContext(registry=reg, trust_domain=ca.td)
    # Envoy NACKs a listener without filter chains, so a gateway with nothing to serve has no listener at all.
    assert g.generate(g.LISTENER_TYPE, gateway(), None, ctx) == {}
    assert g.generate(g.CLUSTER_TYPE, gateway(), None, ctx) == {}


def test_sidecar_outbound_cluster_mtls_sni_spiffe_and_http2(ca: MeshCA) -> None:
    ctx = make_mesh().context(EAST, ca, {})
    clusters = g.generate(g.CLUSTER_TYPE, sidecar(), None, ctx)
    assert set(clusters) == {OUT, "outbound|9080||reviews.default.svc.clusterset.local", "inbound|21001"}
    c = clusters[OUT]
    assert c.transport_socket.name == "envoy.transport_sockets.tls"
    tls = unpack(c.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
    assert tls.sni == SNI
    common = tls.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == ["default"]
    assert common.tls_certificate_sds_secret_configs[0].sds_config.HasField("ads")
    cvc = common.combined_validation_context
    assert cvc.validation_context_sds_secret_config.name == "ROOTCA"
    sans = cvc.default_validation_context.match_typed_subject_alt_names
    assert [(s.san_type, s.matcher.prefix) for s in sans] == [(3, "spiffe://meshfed.test/")]
    opts = unpack(c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"],
                  http_protocol_options_pb2.HttpProtocolOptions)
    assert opts.explicit_http_config.HasField("http2_protocol_options")
    assert c.eds_cluster_config.eds_config.HasField("ads")
    inbound = clusters["inbound|21001"]
    addr = inbound.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (addr.address, addr.port_value) == ("127.0.0.1", 8081)


def test_exact_spiffe_ids_when_every_endpoint_is_a_local_pod_with_known_account(ca: MeshCA) -> None:
    ctx = make_mesh().context(EAST, ca, {})
    clusters = g.generate(g.CLUSTER_TYPE, sidecar(), None, ctx)
    local_only = unpack(clusters["outbound|9080||reviews.default.svc.clusterset.local"].transport_socket.typed_config,
                        tls_pb2.UpstreamTlsContext)
    sans = local_only.common_tls_context.combined_validation_context.default_validation_context
    assert [s.matcher.exact for s in sans.match_typed_subject_alt_names] == ["spiffe://meshfed.test/ns/default/sa/reviews"]
    grpc_proxy = ProxyInfo(kind=ProxyKind.GRPC, cluster=EAST, node_id="proxyless~127.0.0.1~c.default~default.svc.x",
                           namespace=namespace("default"))
    grpc_cluster = g.generate(g.CLUSTER_TYPE, grpc_proxy, frozenset({OUT}), ctx)[OUT]
    gtls = unpack(grpc_cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
    common = gtls.common_tls_context
    assert not common.tls_certificate_sds_secret_configs, "gRPC does not do SDS"
    assert common.tls_certificate_provider_instance.instance_name == "default"
    vc = common.combined_validation_context.default_validation_context
    assert vc.ca_certificate_provider_instance.certificate_name == "ROOTCA"
    assert [s.matcher.prefix for s in vc.match_typed_subject_alt_names] == ["spiffe://meshfed.test/"]  # via gateway
    assert gtls.sni == SNI


def test_sidecar_endpoints_local_pods_plus_remote_gateway_weighted_with_locality(ca: MeshCA) -> None:
    ctx = make_mesh().context(EAST, ca, {})
    cla = g.generate(g.ENDPOINT_TYPE, sidecar(), None, ctx)[OUT]
    got = {(loc.locality.region, loc.locality.zone, loc.locality.sub_zone):
           [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value,
             e.load_balancing_weight.value, e.metadata.filter_metadata["meshfed"]["via_gateway"])
            for e in loc.lb_endpoints]
           for loc in cla.endpoints}
    assert got == {
        ("eu", "eu-1", "east"): [("127.0.0.5", 21002, 1, False)],
        ("us", "us-1", "west"): [("127.0.0.1", 16443, 2, True)],  # west's gateway, weight = 2 ready pods
    }
    assert [loc.load_balancing_weight.value for loc in cla.endpoints] == [1, 2]


def test_remote_with_no_ready_endpoints_is_left_out_and_same_network_uses_pods(ca: MeshCA) -> None:
    mesh = make_mesh()
    reg = mesh.registry(EAST)
    empty = RemoteEndpoints(cluster=WEST, network=NetworkId("net-west"), gateway_host="127.0.0.1",
                            gateway_port=16443, localities=(LocalitySummary(Locality(cluster="west"), 0, 0),))
    ctx = PushContext(registry=reg.with_remote(WEST, [(RATINGS, empty)]), trust_domain=ca.td)
    cla = g.generate(g.ENDPOINT_TYPE, sidecar(), frozenset({OUT}), ctx)[OUT]
    assert [loc.locality.sub_zone for loc in cla.endpoints] == ["east"]
    flat = RemoteEndpoints(cluster=WEST, network=NetworkId("net-east"), gateway_host="127.0.0.1", gateway_port=16443,
                           localities=(LocalitySummary(Locality(cluster="west"), 1, 1),),
                           endpoints=(Endpoint("127.0.0.9", zone="z9", ports=(("http", 20009),)),))
    ctx = PushContext(registry=reg.with_remote(WEST, [(RATINGS, flat)]), trust_domain=ca.td)
    cla = g.generate(g.ENDPOINT_TYPE, sidecar(), frozenset({OUT}), ctx)[OUT]
    west = [loc for loc in cla.endpoints if loc.locality.sub_zone == "west"]
    assert [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
            for e in west[0].lb_endpoints] == [("127.0.0.9", 20009)]


def test_outbound_route_domains(ca: MeshCA) -> None:
    ctx = make_mesh().context(EAST, ca, {})
    route = g.generate(g.ROUTE_TYPE, sidecar(), None, ctx)["outbound"]
    by_cluster = {vh.routes[0].route.cluster: set(vh.domains) for vh in route.virtual_hosts}
    assert by_cluster[OUT] == {
        "ratings.default.svc.clusterset.local", "ratings.default.svc.clusterset.local:9080",
        "ratings.default.svc.cluster.local", "ratings.default.svc.cluster.local:9080",
        "ratings.default.svc", "ratings.default.svc:9080", "ratings.default", "ratings.default:9080",
        "ratings", "ratings:9080",
    }
    other_ns = g.generate(g.ROUTE_TYPE, sidecar(ns="other"), None, ctx)["outbound"]
    domains = {d for vh in other_ns.virtual_hosts for d in vh.domains}
    assert "ratings" not in domains and "ratings.default" in domains
    all_domains = [d for vh in route.virtual_hosts for d in vh.domains]
    assert len(all_domains) == len(set(all_domains)), "Envoy rejects a domain listed twice"


def test_sidecar_listeners_outbound_http_and_inbound_mtls_with_xfcc(ca: MeshCA) -> None:
    ctx = make_mesh().context(EAST, ca, {})
    listeners = g.generate(g.LISTENER_TYPE, sidecar(), None, ctx)
    assert set(listeners) == {"outbound", "inbound|21001"}
    out = listeners["outbound"]
    assert (out.address.socket_address.address, out.address.socket_address.port_value) == ("127.0.0.1", 15001)
    hcm = unpack(out.filter_chains[0].filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    assert hcm.rds.route_config_name == "outbound"
    inbound = listeners["inbound|21001"]
    assert inbound.address.socket_address.port_value == 21001
    chain = inbound.filter_chains[0]
    dtls = unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
    assert dtls.require_client_certificate.value is True
    assert dtls.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name == "ROOTCA"
    ihcm = unpack(chain.filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    assert ihcm.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert ihcm.set_current_client_cert_details.uri is True
    assert ihcm.route_config.virtual_hosts[0].routes[0].route.cluster == "inbound|21001"


def test_secrets_only_for_the_proxys_own_identity(ca: MeshCA) -> None:
    spiffe, cert = ca.issue("east", "default", "reviews")
    other, other_cert = ca.issue("east", "default", "ratings")
    ctx = make_mesh().context(EAST, ca, {spiffe: cert, other: other_cert})
    secrets = g.generate(g.SECRET_TYPE, sidecar(), None, ctx)
    assert set(secrets) == {"default", "ROOTCA"}
    assert secrets["default"].tls_certificate.certificate_chain.inline_string == cert.chain_pem
    assert "BEGIN CERTIFICATE" in secrets["ROOTCA"].validation_context.trusted_ca.inline_string
    ctx_none = make_mesh().context(EAST, ca, {other: other_cert})
    assert set(g.generate(g.SECRET_TYPE, sidecar(), None, ctx_none)) == {"ROOTCA"}


def test_names_filter_and_unknown_type(ca: MeshCA) -> None:
    ctx = make_mesh().context(EAST, ca, {})
    assert set(g.generate(g.CLUSTER_TYPE, sidecar(), frozenset({OUT, "nope"}), ctx)) == {OUT}
    with pytest.raises(g.UnknownTypeError, match="no xDS generator"):
        g.generate("type.googleapis.com/envoy.Nope", sidecar(), None, ctx)


def test_proxyless_grpc_gets_api_listeners_for_each_service_port(ca: MeshCA) -> None:
    ctx = make_mesh().context(EAST, ca, {})
    proxy = ProxyInfo(kind=ProxyKind.GRPC, cluster=EAST, node_id="proxyless~127.0.0.1~c.default~default.svc.x",
                      namespace=namespace("default"))
    listeners = g.generate(g.LISTENER_TYPE, proxy, None, ctx)
    assert set(listeners) == {"ratings.default.svc.clusterset.local:9080", "reviews.default.svc.clusterset.local:9080"}
    hcm = unpack(listeners["ratings.default.svc.clusterset.local:9080"].api_listener.api_listener,
                 hcm_pb2.HttpConnectionManager)
    assert hcm.rds.route_config_name == "outbound"


def test_proxy_metadata_round_trip_and_errors_name_the_field() -> None:
    proxy = sidecar()
    assert ProxyInfo.from_node(proxy.node_id, proxy.metadata()) == proxy
    with pytest.raises(ProxyInfoError, match="MESHFED_KIND"):
        ProxyInfo.from_node("n", {})
    meta = proxy.metadata() | {"MESHFED_INBOUND": "21001"}
    with pytest.raises(ProxyInfoError, match="MESHFED_INBOUND"):
        ProxyInfo.from_node("n", meta)
    with pytest.raises(ProxyInfoError, match="not an IP"):
        ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, node_id="n", namespace=namespace("default"), ip="nope")


def _as_json(messages: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(json_format.MessageToJson(m, preserving_proto_field_name=True)) for m in messages.values()]


@pytest.mark.parametrize("kind", ["gateway", "sidecar"])
def test_envoy_validates_generated_listeners_clusters_and_secrets(kind: str, ca: MeshCA, tmp_path: Path) -> None:
    """Envoy's own config validation accepts every listener, cluster and secret we generate (static form)."""
    spiffe, cert = ca.issue("east", "default", "reviews")
    proxy = gateway("west") if kind == "gateway" else sidecar()
    ctx = make_mesh().context(proxy.cluster, ca, {spiffe: cert})
    res = g.generate_all(proxy, ctx)
    boot = render_bootstrap(proxy, xds_host="127.0.0.1", xds_port=18000, admin_port=19000, token="t" * 24)
    boot["static_resources"]["clusters"] += _as_json(res[g.CLUSTER_TYPE])
    boot["static_resources"]["listeners"] = _as_json(res[g.LISTENER_TYPE])
    boot["static_resources"]["secrets"] = _as_json(res[g.SECRET_TYPE])
    path = write_bootstrap(tmp_path / f"{kind}.yaml", boot)
    assert "OK" in validate(path)


def test_memo_is_per_context_and_a_replaced_context_starts_empty(ca: MeshCA) -> None:
    from dataclasses import replace

    mesh = make_mesh()
    ctx = mesh.context(EAST, ca, {})
    first = g.generate(g.ENDPOINT_TYPE, sidecar(), None, ctx)[OUT]
    assert g.generate(g.ENDPOINT_TYPE, sidecar(), None, ctx)[OUT] is first  # shared, computed once
    mesh.exports[WEST] = set()
    changed = replace(ctx, registry=mesh.registry(EAST))
    after = g.generate(g.ENDPOINT_TYPE, sidecar(), None, changed)[OUT]
    assert [loc.locality.sub_zone for loc in after.endpoints] == ["east"]
    assert [loc.locality.sub_zone for loc in first.endpoints] == ["east", "west"]
