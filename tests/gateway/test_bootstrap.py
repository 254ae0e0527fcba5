"""Envoy bootstrap rendering: the fields, the token handling, and real Envoy's ``--mode validate``."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from discovery.model import Locality, namespace
from gateway.bootstrap import BootstrapError, render_bootstrap, render_grpc_bootstrap, to_json, write_bootstrap
from gateway.context import InboundPort, ProxyInfo, ProxyKind
from gateway.envoy import AdminError, EnvoyAdmin, EnvoyConfigInvalid, command, validate
from tests.gateway.mesh_fixtures import EAST, REVIEWS, MeshCA
from tests.support.procs import free_port

TOKEN = "tok-" + "a" * 40
# Registered so that json_format can resolve the typed_config Any values in the bootstrap.
assert downstream_connections_pb2 and http_protocol_options_pb2


def sidecar() -> ProxyInfo:
    return ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, node_id="sidecar~127.0.0.1~reviews-1.default~default.svc.x",
                     namespace=namespace("default"), service_account="reviews", services=(REVIEWS,),
                     inbound=(InboundPort(21001, 8081),))


def gateway() -> ProxyInfo:
    return ProxyInfo(kind=ProxyKind.GATEWAY, cluster=EAST, node_id="router~127.0.0.1~gw.meshfed~meshfed.svc.x",
                     namespace=namespace("meshfed"), gateway_port=15443)


def test_bootstrap_parses_as_envoy_v3_bootstrap_with_ads_and_token() -> None:
    boot = render_bootstrap(sidecar(), xds_host="127.0.0.1", xds_port=18000, admin_port=19000, token=TOKEN,
                            locality=Locality(region="eu", zone="eu-1", cluster="east"))
    msg = json_format.Parse(to_json(boot), bootstrap_pb2.Bootstrap())  # unknown fields raise
    assert msg.node.id == sidecar().node_id
    assert msg.node.metadata.fields["SERVICE_ACCOUNT"].string_value == "reviews"
    assert msg.node.metadata.fields["CLUSTER_ID"].string_value == "east"
    assert msg.node.locality.sub_zone == "east"
    ads = msg.dynamic_resources.ads_config
    assert ads.api_type == ads.GRPC
    assert ads.set_node_on_first_message_only
    md = ads.grpc_services[0].initial_metadata[0]
    assert (md.key, md.value) == ("authorization", f"Bearer {TOKEN}")
    assert ads.grpc_services[0].envoy_grpc.cluster_name == "xds-grpc"
    assert msg.dynamic_resources.cds_config.HasField("ads")
    assert msg.dynamic_resources.lds_config.HasField("ads")
    assert msg.admin.address.socket_address.address == "127.0.0.1"
    assert msg.static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address \
        .socket_address.port_value == 18000
    delta = render_bootstrap(sidecar(), xds_host="127.0.0.1", xds_port=18000, admin_port=19000, delta=True)
    assert delta["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert "initial_metadata" not in delta["dynamic_resources"]["ads_config"]["grpc_services"][0]


def test_bootstrap_file_is_private_and_round_trips(tmp_path: Path) -> None:
    boot = render_bootstrap(gateway(), xds_host="127.0.0.1", xds_port=18000, admin_port=19000, token=TOKEN)
    path = write_bootstrap(tmp_path / "gw.yaml", boot)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert yaml.safe_load(path.read_text()) == boot
    jpath = write_bootstrap(tmp_path / "gw.json", boot)
    assert json.loads(jpath.read_text()) == boot


@pytest.mark.parametrize("proxy", [sidecar(), gateway()], ids=["sidecar", "gateway"])
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_real_envoy_validates_bootstrap(proxy: ProxyInfo, delta: bool, tmp_path: Path) -> None:
    boot = render_bootstrap(proxy, xds_host="127.0.0.1", xds_port=18000, admin_port=19000, token=TOKEN, delta=delta)
    out = validate(write_bootstrap(tmp_path / "b.yaml", boot))
    assert "OK" in out


def test_validate_reports_envoys_reason(tmp_path: Path) -> None:
    boot = render_bootstrap(gateway(), xds_host="127.0.0.1", xds_port=18000, admin_port=19000)
    boot["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    with pytest.raises(EnvoyConfigInvalid, match="NOT_A_TYPE"):
        validate(write_bootstrap(tmp_path / "bad.yaml", boot))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(BootstrapError, match="xds port"):
        render_bootstrap(gateway(), xds_host="127.0.0.1", xds_port=0, admin_port=19000)
    with pytest.raises(BootstrapError, match="token"):
        render_bootstrap(gateway(), xds_host="127.0.0.1", xds_port=1, admin_port=19000, token="a b")
    with pytest.raises(BootstrapError, match="not a proxyless"):
        render_grpc_bootstrap(gateway(), xds_host="127.0.0.1", xds_port=1)


def test_grpc_bootstrap_and_envoy_command_line() -> None:
    proxy = ProxyInfo(kind=ProxyKind.GRPC, cluster=EAST, node_id="proxyless~127.0.0.1~c.default~default.svc.x",
                      namespace=namespace("default"))
    boot = render_grpc_bootstrap(proxy, xds_host="127.0.0.1", xds_port=18000)
    assert boot["xds_servers"][0]["server_features"] == ["xds_v3"]
    assert boot["node"]["id"] == proxy.node_id
    argv = command(Path("/tmp/b.yaml"))
    assert argv[argv.index("--concurrency") + 1] == "1"
    assert "--disable-hot-restart" in argv


def test_bootstrap_with_tls_to_the_control_plane_validates(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(MeshCA().bundle_pem())
    boot = render_bootstrap(sidecar(), xds_host="127.0.0.1", xds_port=18000, admin_port=19000, token=TOKEN,
                            xds_tls_ca_file=str(ca))
    assert boot["static_resources"]["clusters"][0]["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    assert "OK" in validate(write_bootstrap(tmp_path / "tls.yaml", boot))


def test_grpc_bootstrap_certificate_provider_needs_all_three_files() -> None:
    proxy = ProxyInfo(kind=ProxyKind.GRPC, cluster=EAST, node_id="proxyless~127.0.0.1~c.default~default.svc.x",
                      namespace=namespace("default"))
    boot = render_grpc_bootstrap(proxy, xds_host="127.0.0.1", xds_port=18000, cert_file="c", key_file="k",
                                 ca_file="a")
    cfg = boot["certificate_providers"]["default"]
    assert cfg["plugin_name"] == "file_watcher"
    assert (cfg["config"]["certificate_file"], cfg["config"]["ca_certificate_file"]) == ("c", "a")
    with pytest.raises(BootstrapError, match="together"):
        render_grpc_bootstrap(proxy, xds_host="127.0.0.1", xds_port=18000, cert_file="c")


async def test_admin_ready_is_false_when_nothing_listens() -> None:
    assert await EnvoyAdmin("127.0.0.1", free_port()).ready() is False
    with pytest.raises(AdminError, match="config_dump"):
        await EnvoyAdmin("127.0.0.1", free_port()).config_dump()
