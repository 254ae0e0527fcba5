"""gRPC's own xDS client (proxyless) against the ADS server: it asks for LDS, RDS, CDS and EDS by name (state of
the world), ACKs them, and its call through ``xds:///`` reaches the endpoint the snapshot names."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2, wrappers_pb2

from gateway.ads import AdsServer
from gateway.auth import make_node_id
from gateway.cache import SnapshotCache, SyncState
from gateway.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot

TARGET = "echo.default.svc.cluster.local:7070"
NODE = make_node_id(kind="grpc", ip="127.0.0.1", pod="client-1", namespace="default")
CLIENT = """
import sys, grpc
channel = grpc.insecure_channel("xds:///" + sys.argv[1])
say = channel.unary_unary("/meshfed.test.Echo/Say", request_serializer=None, response_deserializer=None)
print(say(b"hello", timeout=30, wait_for_ready=True).decode())
"""


def any_of(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def world(port: int) -> Snapshot:
    router = hcm.HttpFilter(name="envoy.filters.http.router", typed_config=any_of(router_pb2.Router()))
    manager = hcm.HttpConnectionManager(stat_prefix="echo", http_filters=[router])
    manager.rds.route_config_name = "echo-routes"
    manager.rds.config_source.ads.SetInParent()
    manager.rds.config_source.resource_api_version = 2  # V3
    listener = listener_pb2.Listener(name=TARGET, api_listener=api_listener_pb2.ApiListener(
        api_listener=any_of(manager)))
    routes = route_pb2.RouteConfiguration(name="echo-routes", virtual_hosts=[route_components_pb2.VirtualHost(
        name="echo", domains=["*"], routes=[route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix=""),
            route=route_components_pb2.RouteAction(cluster="echo-cluster"))])])
    cluster = cluster_pb2.Cluster(name="echo-cluster", type=cluster_pb2.Cluster.EDS)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    cluster.eds_cluster_config.eds_config.resource_api_version = 2
    endpoints = endpoint_pb2.ClusterLoadAssignment(cluster_name="echo-cluster", endpoints=[
        endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(region="r1", zone="z1"),
            load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            lb_endpoints=[endpoint_components_pb2.LbEndpoint(
                health_status=health_check_pb2.HEALTHY,
                endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port))))])])
    return Snapshot.build({LISTENER: [listener], ROUTE: [routes], CLUSTER: [cluster], ENDPOINT: [endpoints]})


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    async def say(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"echo:" + request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "meshfed.test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


async def test_proxyless_grpc_client_gets_all_four_types(echo_server: int, tmp_path: Path) -> None:
    cache = SnapshotCache()
    snapshot = world(echo_server)
    cache.set_snapshot(NODE, snapshot)
    async with AdsServer(cache=cache, authenticator=None) as srv:
        bootstrap = {
            "xds_servers": [{"server_uri": f"127.0.0.1:{srv.port}", "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": NODE, "metadata": {"SERVICE_ACCOUNT": "default"}},
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS")}
        env["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps(bootstrap)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, TARGET, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(child.communicate(), 60)
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert child.returncode == 0, err.decode()[-3000:]
        assert out.decode().strip() == "echo:hello"
        rows = {r.type_url: r for r in cache.status() if r.node_id == NODE}
        assert set(rows) == {LISTENER, ROUTE, CLUSTER, ENDPOINT}
        for type_url, row in rows.items():
            assert row.state in (SyncState.SYNCED, SyncState.STALE), row
            assert row.sent_version == snapshot.version(type_url) and not row.nack_error
        assert any(r.state == SyncState.SYNCED for r in rows.values())
