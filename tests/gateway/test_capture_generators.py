"""Generators for captured traffic (capture mode sidecars): the port protocol rules, the virtual outbound listener's
chains and default chain, the virtual inbound listener's mTLS chains with HTTP and network RBAC, the outbound
traffic policy from clusterset.yaml, and Envoy's own validation of all of it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from discovery.authz import Action, Operation, Rule, ValueMatch
from discovery.clusterset import ClusterSetError, OutboundTrafficMode, parse_clusterset
from discovery.model import Protocol, ServiceKey, ServicePort, namespace
from discovery.protocols import NOT_TCP, port_protocol
from gateway import generators as g
from gateway import rbac
from gateway.bootstrap import render_bootstrap, write_bootstrap
from gateway.context import CaptureMode, InboundPort, ProxyInfo, ProxyInfoError, ProxyKind, PushContext
from gateway.envoy import validate
from gateway.generators import capture
from tests.gateway.mesh_fixtures import EAST, RATINGS, REVIEWS, WEST, Mesh, MeshCA, authorization_policies

DB = ServiceKey.parse("db.default")
RATINGS_IP = "241.0.0.10"
DB_IP = "241.0.0.11"
REVIEWS_CLUSTER_IP = "10.96.0.20"


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA()


def make_mesh() -> Mesh:
    mesh = Mesh(east_gateway_port=15443, west_gateway_port=16443)
    mesh.pods[(WEST, RATINGS)] = [("10.1.0.2", 9080)]
    mesh.pods[(WEST, DB)] = [("10.1.0.3", 5432)]
    mesh.pods[(EAST, REVIEWS)] = [("10.0.0.4", 9080)]
    mesh.exports[WEST] = {RATINGS, DB}
    mesh.clusterset_ips = {RATINGS: RATINGS_IP, DB: DB_IP}
    mesh.cluster_ips = {(EAST, REVIEWS): REVIEWS_CLUSTER_IP}
    mesh.service_ports = {DB: (ServicePort(port=5432, name="postgres"), ServicePort(port=53, name="dns",
                                                                                    protocol=Protocol.UDP))}
    return mesh


def captured(**kw: Any) -> ProxyInfo:
    base = dict(kind=ProxyKind.SIDECAR, cluster=EAST,
                node_id="sidecar~10.0.0.4~reviews-1.default~default.svc.cluster.local",
                namespace=namespace("default"), service_account="reviews", services=(REVIEWS,),
                inbound=(InboundPort(9080, 9080, "http"),), ip="10.0.0.4", capture=CaptureMode.REDIRECT)
    return ProxyInfo(**(base | kw))  # type: ignore[arg-type]


def context(ca: MeshCA, mesh: Mesh | None = None, **kw: Any) -> PushContext:
    spiffe, cert = ca.issue("east", "default", "reviews")
    return dataclasses.replace((mesh or make_mesh()).context(EAST, ca, {spiffe: cert}), **kw)


def unpack(any_msg: Any, cls: Any) -> Any:
    out = cls()
    assert any_msg.Unpack(out)
    return out


def chains_by_match(listener: Any) -> dict[tuple[str, int], Any]:
    """Each (destination IP, port) a chain matches, with that chain (no two chains match one destination)."""
    out: dict[tuple[str, int], Any] = {}
    for chain in listener.filter_chains:
        m = chain.filter_chain_match
        for prefix in m.prefix_ranges or [None]:
            dest = (prefix.address_prefix if prefix is not None else "", m.destination_port.value)
            assert dest not in out, dest
            out[dest] = chain
    return out


@pytest.mark.parametrize("port,expected", [
    (ServicePort(port=80, name="http"), "http"),
    (ServicePort(port=80, name="http-web"), "http"),
    (ServicePort(port=80, name="grpc-api"), "grpc"),
    (ServicePort(port=80, name="grpc-web"), "grpc-web"),
    (ServicePort(port=80, name="http2"), "http2"),
    (ServicePort(port=80, name="tcp-db"), "tcp"),
    (ServicePort(port=80, name="mongo"), "mongo"),
    (ServicePort(port=80, name="redis-main"), "redis"),
    (ServicePort(port=80, name="tls"), "tls"),
    (ServicePort(port=80, name="postgres"), "tcp"),  # unknown name: TCP
    (ServicePort(port=80), "tcp"),  # no name, no appProtocol: TCP
    (ServicePort(port=80, name="tcp", app_protocol="http"), "http"),  # appProtocol first
    (ServicePort(port=80, name="http", app_protocol="TCP"), "tcp"),  # case-insensitive
    (ServicePort(port=80, name="http", app_protocol="kubernetes.io/h2c"), "http2"),
    (ServicePort(port=80, name="grpc", app_protocol="example.com/custom"), "grpc"),  # unknown: the name decides
    (ServicePort(port=53, name="dns", protocol=Protocol.UDP), NOT_TCP),
])
def test_port_protocol_app_protocol_then_name_prefix_else_tcp(port: ServicePort, expected: str) -> None:
    assert port_protocol(port) == expected


def test_capture_metadata_round_trip_and_errors() -> None:
    proxy = captured(inbound_capture_port=15106, outbound_port=15101, capture_bind=("0.0.0.0", "::"))
    meta = proxy.metadata()
    assert meta["MESHFED_CAPTURE"] == "redirect" and meta["MESHFED_INBOUND_CAPTURE_PORT"] == "15106"
    assert meta["MESHFED_CAPTURE_BIND"] == "0.0.0.0,::"
    assert ProxyInfo.from_node(proxy.node_id, meta) == proxy
    with pytest.raises(ProxyInfoError, match="capture bind address 'eth0' is not an IP"):
        ProxyInfo.from_node(proxy.node_id, meta | {"MESHFED_CAPTURE_BIND": "0.0.0.0,eth0"})
    with pytest.raises(ProxyInfoError, match="distinct"):
        captured(capture_bind=("::", "::"))
    # A loopback sidecar's metadata is what it was: no capture keys at all.
    loopback = dataclasses.replace(proxy, capture=CaptureMode.NONE)
    assert not any(k.startswith("MESHFED_CAPTURE") or k == "MESHFED_INBOUND_CAPTURE_PORT" for k in loopback.metadata())
    with pytest.raises(ProxyInfoError, match="MESHFED_CAPTURE"):
        ProxyInfo.from_node(proxy.node_id, meta | {"MESHFED_CAPTURE": "tproxy"})
    with pytest.raises(ProxyInfoError, match="sidecars only"):
        ProxyInfo.from_node("n", meta | {"MESHFED_KIND": "gateway"})
    with pytest.raises(ProxyInfoError, match="both 15001"):
        captured(inbound_capture_port=15001)


def test_virtual_outbound_one_chain_per_address_and_tcp_port(ca: MeshCA) -> None:
    ctx = context(ca)
    res = g.generate_all(captured(), ctx)
    listeners = res[g.LISTENER_TYPE]
    assert set(listeners) == {capture.VIRTUAL_OUTBOUND, capture.VIRTUAL_INBOUND}  # no explicit listeners
    out = listeners[capture.VIRTUAL_OUTBOUND]
    assert out.address.socket_address.address == "0.0.0.0" and out.address.socket_address.port_value == 15001
    assert not out.additional_addresses
    dual = g.generate_all(captured(capture_bind=("0.0.0.0", "::")), ctx)[g.LISTENER_TYPE]
    for name, port in ((capture.VIRTUAL_OUTBOUND, 15001), (capture.VIRTUAL_INBOUND, 15006)):
        assert [(a.address.socket_address.address, a.address.socket_address.port_value)
                for a in dual[name].additional_addresses] == [("::", port)]
    assert [f.name for f in out.listener_filters] == [capture.ORIGINAL_DST_FILTER]
    assert not out.use_original_dst.value  # the chains match the restored address; no hand-off to other listeners
    chains = chains_by_match(out)
    # ClusterSetIPs of the imports and the local Service's cluster IP; the UDP port of db has no chain.
    assert set(chains) == {(RATINGS_IP, 9080), (DB_IP, 5432), (REVIEWS_CLUSTER_IP, 9080)}
    assert all(p.prefix_len.value == 32 for c in out.filter_chains for p in c.filter_chain_match.prefix_ranges)

    # HTTP destinations share one chain per port (one connection manager, routing by Host); TCP ones have their own.
    http = chains[(RATINGS_IP, 9080)]
    assert http is chains[(REVIEWS_CLUSTER_IP, 9080)] and http.name == "http:9080"
    assert [c.name for c in out.filter_chains] == ["http:9080", f"{DB_IP}:5432|db.default.svc.clusterset.local|tcp"]
    assert [f.name for f in http.filters] == ["envoy.filters.network.http_connection_manager"]
    hcm = unpack(http.filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    assert hcm.rds.route_config_name == "outbound" and hcm.access_log  # the explicit listener's routes, telemetry
    tcp = chains[(DB_IP, 5432)]
    proxy_cfg = unpack(tcp.filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
    assert proxy_cfg.cluster == "outbound|5432||db.default.svc.clusterset.local"
    # The TCP chain's cluster is the same mTLS cluster HTTP uses, with the SNI the remote gateway routes on.
    cluster = res[g.CLUSTER_TYPE][proxy_cfg.cluster]
    tls = unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
    assert tls.sni == "outbound_.5432_._.db.default.svc.clusterset.local"
    assert tls.common_tls_context.tls_certificate_sds_secret_configs[0].name == "default"

    # The route answers the cluster IP too (what a captured workload dials for a local Service).
    vhosts = {v.name: v for v in res[g.ROUTE_TYPE]["outbound"].virtual_hosts}
    assert f"{REVIEWS_CLUSTER_IP}:9080" in vhosts["reviews.default.svc.clusterset.local:9080"].domains


@pytest.mark.parametrize("mode,target", [(OutboundTrafficMode.ALLOW_ANY, capture.PASSTHROUGH_CLUSTER),
                                         (OutboundTrafficMode.REGISTRY_ONLY, capture.BLACKHOLE_CLUSTER)])
def test_unknown_destinations_follow_the_outbound_policy(ca: MeshCA, mode: OutboundTrafficMode,
                                                         target: str) -> None:
    ctx = context(ca, outbound_mode=mode)
    res = g.generate_all(captured(), ctx)
    default = res[g.LISTENER_TYPE][capture.VIRTUAL_OUTBOUND].default_filter_chain
    assert unpack(default.filters[0].typed_config, tcp_proxy_pb2.TcpProxy).cluster == target
    clusters = res[g.CLUSTER_TYPE]
    assert clusters[capture.PASSTHROUGH_CLUSTER].type == cluster_pb2.Cluster.ORIGINAL_DST
    assert clusters[capture.PASSTHROUGH_CLUSTER].lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    assert not clusters[capture.BLACKHOLE_CLUSTER].load_assignment.endpoints


def test_a_destination_claimed_twice_keeps_one_chain(ca: MeshCA) -> None:
    mesh = make_mesh()
    mesh.cluster_ips[(EAST, REVIEWS)] = RATINGS_IP  # a stale cluster IP equal to a ClusterSetIP
    res = g.generate_all(captured(), context(ca, mesh))
    out = res[g.LISTENER_TYPE][capture.VIRTUAL_OUTBOUND]
    assert set(chains_by_match(out)) == {(RATINGS_IP, 9080), (DB_IP, 5432)}  # each once (chains_by_match checks)
    # A TCP port claimed by a second service keeps the first service's chain (service key order: db < echo).
    mesh.clusterset_ips[ServiceKey.parse("echo.default")] = DB_IP
    mesh.service_ports[ServiceKey.parse("echo.default")] = (ServicePort(port=5432, name="tcp"),)
    mesh.pods[(WEST, ServiceKey.parse("echo.default"))] = [("10.1.0.9", 5432)]
    mesh.exports[WEST] = {RATINGS, DB, ServiceKey.parse("echo.default")}
    out = g.generate_all(captured(), context(ca, mesh))[g.LISTENER_TYPE][capture.VIRTUAL_OUTBOUND]
    assert chains_by_match(out)[(DB_IP, 5432)].name == f"{DB_IP}:5432|db.default.svc.clusterset.local|tcp"


def test_loopback_sidecar_is_unchanged_by_capture(ca: MeshCA) -> None:
    ctx = context(ca)
    loopback = captured(capture=CaptureMode.NONE, inbound=(InboundPort(21001, 8081, "http"),))
    res = g.generate_all(loopback, ctx)
    assert set(res[g.LISTENER_TYPE]) == {"outbound", "inbound|21001"}
    assert capture.PASSTHROUGH_CLUSTER not in res[g.CLUSTER_TYPE]


def test_virtual_inbound_requires_mtls_per_port_http_and_tcp(ca: MeshCA) -> None:
    mesh = make_mesh()
    mesh.service_ports[REVIEWS] = (ServicePort(port=9080, name="http"), ServicePort(port=9443, name="tls-api"),
                                   ServicePort(port=7000, name="grpc"))
    proxy = captured(inbound=(InboundPort(9080, 9080, "http"), InboundPort(9443, 9443, "tls-api"),
                              InboundPort(7000, 7000, "grpc")), inbound_capture_port=15006)
    res = g.generate_all(proxy, context(ca, mesh))
    inbound = res[g.LISTENER_TYPE][capture.VIRTUAL_INBOUND]
    assert inbound.address.socket_address.port_value == 15006
    assert [f.name for f in inbound.listener_filters] == [capture.ORIGINAL_DST_FILTER]
    assert not inbound.HasField("default_filter_chain")  # a port the sidecar does not serve is closed
    chains = {c.filter_chain_match.destination_port.value: c for c in inbound.filter_chains}
    assert set(chains) == {9080, 9443, 7000}
    for chain in chains.values():
        tls = unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
        assert tls.require_client_certificate.value
        assert tls.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name == "ROOTCA"
    hcm = unpack(chains[9080].filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    assert hcm.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert hcm.route_config.virtual_hosts[0].routes[0].route.cluster == "inbound|9080"
    assert [f.name for f in chains[9443].filters] == ["envoy.filters.network.tcp_proxy"]
    assert unpack(chains[9443].filters[0].typed_config, tcp_proxy_pb2.TcpProxy).cluster == "inbound|9443"
    # How the sidecar talks to the app: HTTP/1.1, plain TCP, HTTP/2 for gRPC.
    clusters = res[g.CLUSTER_TYPE]
    options = {p: clusters[f"inbound|{p}"].typed_extension_protocol_options for p in (9080, 9443, 7000)}
    assert not options[9443]
    h2 = unpack(next(iter(options[7000].values())), http_protocol_options_pb2.HttpProtocolOptions)
    assert h2.explicit_http_config.HasField("http2_protocol_options")
    assert clusters["inbound|9080"].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address \
        .address == "127.0.0.1"
    # No inbound ports: no virtual inbound listener (Envoy rejects a listener without chains).
    assert capture.VIRTUAL_INBOUND not in g.generate_all(captured(inbound=()), context(ca))[g.LISTENER_TYPE]


POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-allow, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [meshfed.test/ns/default/sa/sleep]}}]
    when: [{key: source.cluster, values: [east]}]
  - to: [{operation: {paths: [/admin]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-deny, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - from: [{source: {namespaces: [other]}}]
    to: [{operation: {methods: [POST], ports: [5432]}}]
"""


def test_tcp_port_enforces_authorization_with_network_rbac(ca: MeshCA) -> None:
    mesh = make_mesh()
    mesh.service_ports[REVIEWS] = (ServicePort(port=5432, name="tcp-db"),)
    authz = authorization_policies(POLICIES, EAST)
    proxy = captured(inbound=(InboundPort(5432, 5432, "tcp-db"),))
    res = g.generate_all(proxy, context(ca, mesh, authz=authz))
    chain = res[g.LISTENER_TYPE][capture.VIRTUAL_INBOUND].filter_chains[0]
    assert [f.name for f in chain.filters] == [rbac.NETWORK_RBAC_FILTER, rbac.NETWORK_RBAC_FILTER,
                                               "envoy.filters.network.tcp_proxy"]
    deny = unpack(chain.filters[0].typed_config, network_rbac_pb2.RBAC)
    allow = unpack(chain.filters[1].typed_config, network_rbac_pb2.RBAC)
    assert deny.rules.action == deny.rules.DENY and allow.rules.action == allow.rules.ALLOW
    allow_json = json.loads(json_format.MessageToJson(allow.rules))
    first = json.dumps(allow_json["policies"]["default.db-allow:rules[0]"])
    assert "spiffe://meshfed.test/ns/default/sa/sleep" in first
    assert "OU=east" in first and "x-forwarded-client-cert" not in first  # the cluster from the certificate
    # rules[1] names a path, which a TCP connection has none of: as an ALLOW rule it matches nothing.
    never = allow_json["policies"]["default.db-allow:rules[1]"]
    assert never["permissions"] == [{"notRule": {"any": True}}]
    # The DENY rule keeps its source and port, loses the method: it denies more, never less.
    deny_json = json.dumps(json.loads(json_format.MessageToJson(deny.rules)))
    assert ":method" not in deny_json and "/ns/" in deny_json
    assert unpack(chain.filters[2].typed_config, tcp_proxy_pb2.TcpProxy).access_log  # the denial is logged


def test_tcp_rule_semantics_and_problems_name_policy_and_field() -> None:
    rule = Rule(operations=(Operation(ports=(5432,), paths=(ValueMatch.parse("/x"),)),))
    assert rbac.tcp_rule(rule, Action.ALLOW) is None
    stripped = rbac.tcp_rule(rule, Action.DENY)
    assert stripped is not None and stripped.operations == (Operation(ports=(5432,)),)
    mesh = make_mesh()
    mesh.service_ports[REVIEWS] = (ServicePort(port=5432, name="tcp-db"), ServicePort(port=9080, name="http"))
    services = mesh.registry(EAST).services(EAST)
    problems = rbac.tcp_port_problems(authorization_policies(POLICIES, EAST), services)
    assert len(problems) == 2
    assert any("default/db-allow" in p and "spec.rules[1].to[0].operation.paths" in p and "reviews.default:5432" in p
               and "matches no connection" in p for p in problems)
    assert any("default/db-deny" in p and "spec.rules[0].to[0].operation.methods" in p and "denies more" in p
               for p in problems)
    mesh.service_ports[REVIEWS] = (ServicePort(port=9080, name="http"),)
    assert rbac.tcp_port_problems(authorization_policies(POLICIES, EAST), mesh.registry(EAST).services(EAST)) == []


def test_clusterset_outbound_traffic_policy() -> None:
    base = {"name": "demo", "trustDomain": "demo.meshfed.local", "clusters": [{"name": "east"}]}
    assert parse_clusterset(base).outbound_traffic_mode is OutboundTrafficMode.ALLOW_ANY
    cs = parse_clusterset(base | {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}})
    assert cs.outbound_traffic_mode is OutboundTrafficMode.REGISTRY_ONLY
    with pytest.raises(ClusterSetError, match=r"outboundTrafficPolicy\.mode: 'DENY' is not an outbound traffic mode "
                                              r"\(known: ALLOW_ANY, REGISTRY_ONLY\)"):
        parse_clusterset(base | {"outboundTrafficPolicy": {"mode": "DENY"}}, file="cs.yaml")
    with pytest.raises(ClusterSetError, match=r"outboundTrafficPolicy\.egress: unknown field"):
        parse_clusterset(base | {"outboundTrafficPolicy": {"egress": "x"}})
    with pytest.raises(ClusterSetError, match="outboundTrafficPolicy: must be a Mapping"):
        parse_clusterset(base | {"outboundTrafficPolicy": "ALLOW_ANY"})


def _as_json(messages: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(json_format.MessageToJson(m, preserving_proto_field_name=True)) for m in messages.values()]


@pytest.mark.parametrize("mode", list(OutboundTrafficMode))
def test_envoy_validates_capture_listeners_and_clusters(ca: MeshCA, tmp_path: Path, mode: OutboundTrafficMode) -> None:
    """Envoy's own validation accepts the virtual listeners (HTTP, TCP, network RBAC) and capture clusters."""
    mesh = make_mesh()
    mesh.service_ports[REVIEWS] = (ServicePort(port=9080, name="http"), ServicePort(port=5432, name="tcp-db"))
    proxy = captured(inbound=(InboundPort(9080, 9080, "http"), InboundPort(5432, 5432, "tcp-db")),
                     capture_bind=("127.0.0.1", "::1"))
    res = g.generate_all(proxy, context(ca, mesh, authz=authorization_policies(POLICIES, EAST), outbound_mode=mode))
    boot = render_bootstrap(proxy, xds_host="127.0.0.1", xds_port=18000, admin_port=19000, token="t" * 24)
    boot["static_resources"]["clusters"] += _as_json(res[g.CLUSTER_TYPE])
    boot["static_resources"]["listeners"] = _as_json(res[g.LISTENER_TYPE])
    boot["static_resources"]["secrets"] = _as_json(res[g.SECRET_TYPE])
    path = write_bootstrap(tmp_path / "capture.yaml", boot)
    assert "OK" in validate(path)


PG = ServiceKey.parse("pg.default")


def headless_context(ca: MeshCA, pods: tuple[str, ...] = ("10.0.0.7", "10.0.0.8")) -> PushContext:
    """East with a headless ``pg`` of its own pods (exported: its ServiceImport is Headless) and west's share of it
    behind west's gateway (another network: no pod address to dial)."""
    from discovery.model import (
        Endpoint,
        Locality,
        LocalitySummary,
        RemoteEndpoints,
        Service,
        ServiceImport,
        ServiceType,
        network_id,
    )

    ctx = context(ca)
    reg = ctx.registry
    port = ServicePort(port=5432, name="postgres")
    pg = Service(cluster=EAST, key=PG, ports=(port,), headless=True,
                 endpoints=tuple(Endpoint(address=a, ports=(("postgres", 5432),), service_account="pg") for a in pods))
    reg = reg.with_shard(EAST, [*reg.services(EAST), pg], reg.exports.get(EAST, {}).values())
    imports = dict(reg.imports)
    imports[PG] = ServiceImport(key=PG, type=ServiceType.HEADLESS, ports=(port,), clusters=(EAST, WEST))
    reg = reg.with_catalog(clusters=reg.clusters, imports=imports).with_remote(WEST, [
        *reg.remote.get(WEST, {}).items(),
        (PG, RemoteEndpoints(cluster=WEST, network=network_id("west-net"), gateway_host="192.0.2.9", gateway_port=16443,
                             localities=(LocalitySummary(Locality(zone="w", cluster="west"), 1, 1),)))])
    return dataclasses.replace(ctx, registry=reg)


def test_a_headless_services_pods_get_chains_to_the_pod_dialled_over_mtls(ca: MeshCA) -> None:
    """(A real Envoy takes these over ADS in tests/e2e/test_capture_dataplane.py; ``--mode validate`` cannot check
    them here: Envoy 1.40 crashes on a static ORIGINAL_DST or STATIC cluster whose TLS secrets come from SDS over
    ADS, which is how these clusters are only ever delivered dynamically.)"""
    ctx = headless_context(ca)
    res = g.generate_all(captured(), ctx)
    chains = chains_by_match(res[g.LISTENER_TYPE][capture.VIRTUAL_OUTBOUND])
    for pod in ("10.0.0.7", "10.0.0.8"):
        chain = chains[(pod, 5432)]
        proxy = unpack(chain.filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
        assert proxy.cluster == "outbound-pod|5432||pg.default.svc.clusterset.local"
    assert not [d for d in chains if d[0] == "192.0.2.9"]  # west's share is behind its gateway: nothing to dial
    cluster = res[g.CLUSTER_TYPE]["outbound-pod|5432||pg.default.svc.clusterset.local"]
    assert cluster.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert cluster.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    tls = unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
    assert tls.sni == "outbound_.5432_._.pg.default.svc.clusterset.local"
    # A pod that goes away loses its chain.
    gone = chains_by_match(g.generate_all(captured(), headless_context(ca, ("10.0.0.7",)))[g.LISTENER_TYPE][
        capture.VIRTUAL_OUTBOUND])
    assert ("10.0.0.7", 5432) in gone and ("10.0.0.8", 5432) not in gone


async def test_pipeline_follows_a_headless_services_pods(ca: MeshCA) -> None:
    from gateway.push import ConfigKey
    from tests.gateway.test_pipeline import Plane

    proxy = captured()
    nodes = {proxy.node_id: proxy}
    plane = Plane(headless_context(ca))
    await plane.push(full=True, nodes=nodes)
    plane.check(nodes)
    # Only an endpoint of pg changes (the local shard): the capture listener follows, as from scratch.
    changed = await plane.push(dataclasses.replace(plane.ctx, registry=headless_context(ca, ("10.0.0.7",)).registry),
                               nodes=nodes, configs=frozenset({ConfigKey.shard(EAST)}))
    assert changed == (proxy.node_id,)
    plane.check(nodes)
