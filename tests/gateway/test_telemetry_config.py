"""Telemetry and proxyless pieces of the generated configuration (pure; the e2e tests run them in real Envoy and
gRPC): stats loggers and JSON access logs on every HTTP connection manager and gateway chain, the cluster
metadata callers' labels read, gRPC xDS server listeners, the certificate-authenticated xDS identity, and the gRPC
bootstrap with mutual TLS to the control plane."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from envoy.extensions.access_loggers.stats.v3 import stats_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format

from discovery.model import ServiceKey, namespace
from federation.trust.ca import create_intermediate, create_root, issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from gateway import generators as g
from gateway import telemetry
from gateway.auth import AuthenticationError, ProxyIdentity
from gateway.bootstrap import BootstrapError, render_grpc_bootstrap
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext
from gateway.generators.proxyless import server_listener_name
from gateway.peerauth import PEER_CERT_KEY, FirstOf, PeerCertificateAuthenticator, identity_of_certificate
from tests.gateway.mesh_fixtures import EAST, RATINGS, REVIEWS, TD, WEST, Mesh, MeshCA

OUT = "outbound|9080||ratings.default.svc.clusterset.local"
ECHO = ServiceKey.parse("echo-grpc.default")


def mesh() -> Mesh:
    m = Mesh(east_gateway_port=15443, west_gateway_port=16443)
    m.pods[(WEST, RATINGS)] = [("127.0.0.2", 20001)]
    m.pods[(EAST, REVIEWS)] = [("127.0.0.4", 21001)]
    m.pods[(WEST, ECHO)] = [("127.0.0.9", 7070)]
    m.exports[WEST] = {RATINGS, ECHO}
    return m


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA()


def ctx_for(cluster: Any, ca: MeshCA) -> PushContext:
    certs = dict([ca.issue(str(cluster), "default", "reviews")])
    return mesh().context(cluster, ca, certs)


SIDECAR = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, namespace=namespace("default"), service_account="reviews",
                    node_id="sidecar~127.0.0.4~reviews-1.default~default.svc.cluster.local", services=(REVIEWS,),
                    inbound=(InboundPort(21001, 8081, "http"),), outbound_port=15001, ip="127.0.0.4")
GATEWAY = ProxyInfo(kind=ProxyKind.GATEWAY, cluster=WEST, namespace=namespace("meshfed"), gateway_port=16443,
                    node_id="router~127.0.0.1~gw.meshfed~meshfed.svc.cluster.local")
GRPC_SERVER = ProxyInfo(kind=ProxyKind.GRPC, cluster=WEST, namespace=namespace("default"),
                        service_account="echo-grpc", services=(ECHO,), ip="127.0.0.9",
                        node_id="grpc~127.0.0.9~echo-1.default~default.svc.cluster.local",
                        inbound=(InboundPort(7070, 7070, "grpc", "grpc"),))


def unpack(any_msg: Any, cls: Any) -> Any:
    out = cls()
    assert any_msg.Unpack(out)
    return out


def hcm_of(listener: Any) -> Any:
    return unpack(listener.filter_chains[0].filters[0].typed_config, hcm_pb2.HttpConnectionManager)


def loggers(access_log: Any) -> tuple[Any, dict[str, Any]]:
    stats = [unpack(a.typed_config, stats_pb2.Config) for a in access_log if a.name == telemetry.STATS_LOGGER]
    json_logs = [json_format.MessageToDict(unpack(a.typed_config, stream_pb2.StdoutAccessLog).log_format.json_format)
                 for a in access_log if a.name == telemetry.STDOUT_LOGGER
                 and unpack(a.typed_config, stream_pb2.StdoutAccessLog).log_format.HasField("json_format")]
    assert len(stats) == 1 and len(json_logs) == 1
    return stats[0], json_logs[0]


def tags(stats: Any, name: str) -> dict[str, str]:
    stat = next(c.stat for c in stats.counters if c.stat.name == name)
    return {t.name: t.value_format for t in stat.tags}


def test_caller_side_labels_name_both_clusters_and_the_service(ca: MeshCA) -> None:
    ctx = ctx_for(EAST, ca)
    out = g.generate_all(SIDECAR, ctx)
    stats, log = loggers(hcm_of(out[g.LISTENER_TYPE]["outbound"]).access_log)
    t = tags(stats, telemetry.REQUESTS)
    assert tuple(t) == telemetry.LABELS
    assert t["reporter"] == "source" and t["source_cluster"] == "east"
    assert t["destination_cluster"] == "%UPSTREAM_METADATA(meshfed:cluster)%"
    assert t["destination_service"] == "%CLUSTER_METADATA(meshfed:service)%"
    assert t["connection_security_policy"] == "mutual_tls"
    assert {h.stat.name for h in stats.histograms} == {telemetry.DURATION}
    assert log["source_principal"] == f"spiffe://{TD}/ns/default/sa/reviews"
    assert log["destination_principal"] == "%UPSTREAM_PEER_URI_SAN%"
    assert log["xfcc"] == "%REQ(X-FORWARDED-CLIENT-CERT)%" and log["route_name"] == "%ROUTE_NAME%"
    # The values those formats read: every outbound cluster names its service; every endpoint its cluster.
    cluster = out[g.CLUSTER_TYPE][OUT]
    assert json_format.MessageToDict(cluster.metadata)["filterMetadata"]["meshfed"] == {
        "service": "ratings.default.svc.clusterset.local", "port": 9080}
    assignment = out[g.ENDPOINT_TYPE][OUT]
    clusters = {lb.metadata.filter_metadata["meshfed"]["cluster"] for loc in assignment.endpoints
                for lb in loc.lb_endpoints}
    assert clusters == {"west"}


def test_callee_side_reads_the_caller_cluster_from_the_certificate_first(ca: MeshCA) -> None:
    ctx = ctx_for(EAST, ca)
    listener = g.generate_all(SIDECAR, ctx)[g.LISTENER_TYPE]["inbound|21001"]
    hcm = hcm_of(listener)
    assert hcm.http_filters[0].name == telemetry.LUA_FILTER and hcm.http_filters[-1].name.endswith("router")
    lua = unpack(hcm.http_filters[0].typed_config, lua_pb2.Lua).default_source_code.inline_string
    assert "subjectPeerCertificate" in lua and "OU=" in lua
    stats, log = loggers(hcm.access_log)
    t = tags(stats, telemetry.REQUESTS)
    assert t["reporter"] == "destination" and t["destination_cluster"] == "east"
    assert t["source_cluster"] == "%DYNAMIC_METADATA(meshfed:source_cluster)%"
    assert t["destination_service"] == "reviews.default.svc.clusterset.local"
    assert log["source_principal"] == "%DOWNSTREAM_PEER_URI_SAN%"


def test_gateway_chain_counts_connections_per_service(ca: MeshCA) -> None:
    listener = g.generate_all(GATEWAY, ctx_for(WEST, ca))[g.LISTENER_TYPE]["gateway"]
    by_service = {}
    for chain in listener.filter_chains:
        tcp = unpack(chain.filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
        stats, log = loggers(tcp.access_log)
        t = tags(stats, telemetry.TCP_CONNECTIONS)
        assert "source_cluster" not in t  # not observable at a passthrough gateway (gateway.telemetry docstring)
        by_service[t["destination_service"]] = t
        assert log["requested_server_name"] == "%REQUESTED_SERVER_NAME%"
    assert set(by_service) == {"ratings.default.svc.clusterset.local", "echo-grpc.default.svc.clusterset.local"}
    assert all(t["destination_cluster"] == "west" and t["connection_security_policy"] == "tls_passthrough"
               for t in by_service.values())


def test_literals_escape_percent_and_prometheus_labels_parse() -> None:
    assert telemetry._literal("a%b") == "a%%b"
    text = ('# TYPE x counter\nx{a="1",b="q\\"uote",c=""} 3\nx{a="2",b="",c="z"} 4.5\ny{a="1"} 9\n')
    assert telemetry.parse_prometheus(text, "x") == [({"a": "1", "b": 'q"uote', "c": ""}, 3.0),
                                                    ({"a": "2", "b": "", "c": "z"}, 4.5)]


def test_grpc_server_node_gets_a_server_listener_with_required_mtls(ca: MeshCA) -> None:
    ctx = ctx_for(WEST, ca)
    listeners = g.generate_all(GRPC_SERVER, ctx)[g.LISTENER_TYPE]
    name = "grpc/server?xds.resource.listening_address=127.0.0.9:7070"
    assert server_listener_name("127.0.0.9", 7070) == name and name in listeners
    assert server_listener_name("::1", 7070).endswith("=[::1]:7070")
    listener = listeners[name]
    assert listener.address.socket_address.port_value == 7070
    hcm = hcm_of(listener)
    route = hcm.route_config.virtual_hosts[0].routes[0]
    assert route.HasField("non_forwarding_action")
    tls = unpack(listener.filter_chains[0].transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
    assert tls.require_client_certificate.value
    common = tls.common_tls_context
    assert common.tls_certificate_provider_instance.instance_name == "default"
    validation = common.combined_validation_context.default_validation_context
    assert validation.ca_certificate_provider_instance.certificate_name == ctx.root_secret
    assert validation.match_typed_subject_alt_names[0].matcher.prefix == f"spiffe://{TD}/"
    # A client-only gRPC node (no inbound ports) has API listeners only; gRPC's clusters carry no health check.
    client = ProxyInfo(kind=ProxyKind.GRPC, cluster=EAST, namespace=namespace("default"), service_account="c",
                       node_id="grpc~127.0.0.1~c-1.default~default.svc.cluster.local")
    names = set(g.generate_all(client, ctx_for(EAST, ca))[g.LISTENER_TYPE])
    assert names and not any(n.startswith("grpc/server") for n in names)


def _real_ca() -> tuple[Any, Any, Any]:
    td = TrustDomain.parse(TD)
    root = create_root(td)
    return td, create_intermediate(root, SpiffeId.cluster(td, "east")), create_intermediate(
        root, SpiffeId.cluster(td, "west"))


async def test_certificate_identity_is_the_spiffe_id_of_this_clusters_ca() -> None:
    td, east, west = _real_ca()
    sid = SpiffeId.workload(td, "default", "echo")
    _, chain = issue_workload(east, sid, ttl=timedelta(hours=1))
    leaf = chain[0].decode()
    assert identity_of_certificate(leaf, trust_domain=TD, cluster="east") == ProxyIdentity("default", "echo", "east")
    with pytest.raises(AuthenticationError, match="issued for cluster"):
        identity_of_certificate(leaf, trust_domain=TD, cluster="west")
    with pytest.raises(AuthenticationError, match="not a workload ID"):
        identity_of_certificate(leaf, trust_domain="other.domain", cluster="east")
    _, foreign = issue_workload(west, sid, ttl=timedelta(hours=1))
    with pytest.raises(AuthenticationError):
        identity_of_certificate(foreign[0].decode(), trust_domain=TD, cluster="east")
    auth = PeerCertificateAuthenticator(trust_domain=TD, cluster="east")
    assert (await auth.authenticate(metadata={PEER_CERT_KEY: leaf})).service_account == "echo"
    with pytest.raises(AuthenticationError, match="no verified client certificate"):
        await auth.authenticate(metadata={})

    class Tokens:
        async def authenticate(self, *, metadata: Any) -> ProxyIdentity:
            return ProxyIdentity("t", "token", "east")

    either = FirstOf(certificate=auth, token=Tokens())
    assert (await either.authenticate(metadata={PEER_CERT_KEY: leaf})).service_account == "echo"
    assert (await either.authenticate(metadata={"authorization": "Bearer x"})).service_account == "token"


def test_grpc_bootstrap_with_mutual_tls_to_the_control_plane() -> None:
    boot = render_grpc_bootstrap(GRPC_SERVER, xds_host="127.0.0.1", xds_port=15012, cert_file="/c", key_file="/k",
                                 ca_file="/ca", xds_tls=True)
    creds = boot["xds_servers"][0]["channel_creds"]
    assert creds == [{"type": "tls", "config": {"certificate_file": "/c", "private_key_file": "/k",
                                                "ca_certificate_file": "/ca", "refresh_interval": "600s"}}]
    assert boot["server_listener_resource_name_template"] == "grpc/server?xds.resource.listening_address=%s"
    assert boot["certificate_providers"]["default"]["plugin_name"] == "file_watcher"
    plain = render_grpc_bootstrap(GRPC_SERVER, xds_host="127.0.0.1", xds_port=15012)
    assert plain["xds_servers"][0]["channel_creds"] == [{"type": "insecure"}]
    with pytest.raises(BootstrapError, match="xds_tls"):
        render_grpc_bootstrap(GRPC_SERVER, xds_host="127.0.0.1", xds_port=15012, xds_tls=True)
