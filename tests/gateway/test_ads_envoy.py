"""Smoke test of the ADS server with a real Envoy, state of the world and delta: Envoy connects with its token,
ACKs a listener + cluster + endpoints snapshot (cache status: synced; /config_dump shows it), NACKs an invalid
listener (status: nacked with Envoy's error text, the last good listener stays), and takes the fixed one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2

from gateway.ads import AdsServer
from gateway.auth import ProxyIdentity, TokenTableAuthenticator, make_node_id
from gateway.cache import SnapshotCache, SyncState
from gateway.snapshot import CLUSTER, ENDPOINT, LISTENER, Snapshot
from tests.gateway.envoy_fixtures import wait_until
from tests.gateway.xds_client import cla
from tests.support.procs import Proc, envoy_binary, free_port

NODE = make_node_id(kind="sidecar", ip="127.0.0.1", pod="smoke-1", namespace="default")


def listener(name: str, port: int, cluster: str) -> listener_pb2.Listener:
    proxy = any_pb2.Any()
    proxy.Pack(tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=cluster))
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy", typed_config=proxy)])],
    )


def world(listen_port: int, *, listener_port: int | None = None, extra: str = "") -> Snapshot:
    c = cluster_pb2.Cluster(name="backend", type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.eds_config.resource_api_version = 2  # V3
    c.connect_timeout.FromMilliseconds(500)
    listeners = [listener("smoke", listener_port if listener_port is not None else listen_port, "backend")]
    if extra:
        listeners.append(listener(extra, free_port(), "backend"))
    return Snapshot.build({CLUSTER: [c], ENDPOINT: [cla("backend", 9)], LISTENER: listeners})


def bootstrap(path: Path, *, ads_port: int, admin_port: int, token: str, delta: bool) -> Path:
    config = {
        "node": {"id": NODE, "cluster": "smoke", "metadata": {"SERVICE_ACCOUNT": "web"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"clusters": [{
            "name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": ads_port}}}}]}]},
        }]},
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC" if delta else "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"},
                                              "initial_metadata": [{"key": "authorization",
                                                                    "value": f"Bearer {token}"}]}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


@pytest.fixture
async def plane() -> AsyncIterator[tuple[SnapshotCache, AdsServer, TokenTableAuthenticator]]:
    cache = SnapshotCache()
    auth = TokenTableAuthenticator()
    async with AdsServer(cache=cache, authenticator=auth, host="127.0.0.1", port=0) as srv:
        yield cache, srv, auth


async def config_dump(admin_port: int) -> dict[str, object]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, s.get(
            f"http://127.0.0.1:{admin_port}/config_dump") as resp:
        return dict(json.loads(await resp.text()))


def dynamic_listeners(dump: dict[str, object]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for cfg in dump["configs"]:  # type: ignore[attr-defined]
        if cfg["@type"].endswith("ListenersConfigDump"):
            for item in cfg.get("dynamic_listeners", []):
                out[item["name"]] = item
    return out


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_envoy_acks_then_nacks_and_keeps_last_good(plane, tmp_path: Path, delta: bool) -> None:
    cache, _, auth = plane
    token = auth.issue(ProxyIdentity(namespace="default", service_account="web", cluster="east"))
    listen_port, admin_port = free_port(), free_port()
    good = world(listen_port)
    cache.set_snapshot(NODE, good)
    path = bootstrap(tmp_path / "envoy.json", ads_port=plane[1].port, admin_port=admin_port, token=token, delta=delta)
    envoy = Proc([envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "--log-level",
                  "info", "--drain-time-s", "1"], log=tmp_path / "envoy.log")
    try:
        def synced(type_url: str, version: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                st = cache.status_of(NODE, type_url)
                if not envoy.alive():
                    raise AssertionError(f"envoy exited:\n{envoy.output()[-3000:]}")
                return st is not None and st.state == SyncState.SYNCED and st.acked_version == version
            return check

        for t in (CLUSTER, ENDPOINT, LISTENER):
            await wait_until(synced(t, good.version(t)), what=f"envoy to ACK {t}")
        dump = await config_dump(admin_port)
        listeners = dynamic_listeners(dump)
        assert "smoke" in listeners
        # SotW: the response's version_info; delta: the resource's own version
        expected = good.resource_version(LISTENER, "smoke") if delta else good.version(LISTENER)
        assert listeners["smoke"]["active_state"]["version_info"] == expected  # type: ignore[index]
        assert str(listen_port) in json.dumps(listeners["smoke"])

        # a listener Envoy must reject (port out of range) next to the good one: NACK, error kept, last good stays
        bad = world(listen_port, extra="broken")
        bad = bad.replace(LISTENER, {"broken": listener("broken", 70000, "backend")})
        cache.set_snapshot(NODE, bad)

        async def nacked() -> bool:
            st = cache.status_of(NODE, LISTENER)
            return st is not None and st.state == SyncState.NACKED

        await wait_until(nacked, what="envoy to NACK the invalid listener")
        st = cache.status_of(NODE, LISTENER)
        assert st is not None and st.nack_version == bad.version(LISTENER) and "70000" in st.nack_error
        assert st.acked_version == good.version(LISTENER)
        listeners = dynamic_listeners(await config_dump(admin_port))
        assert "broken" not in listeners and "smoke" in listeners

        fixed = world(listen_port, extra="second")
        cache.set_snapshot(NODE, fixed)
        await wait_until(synced(LISTENER, fixed.version(LISTENER)), what="envoy to ACK the fixed listeners")
        listeners = dynamic_listeners(await config_dump(admin_port))
        assert {"smoke", "second"} <= set(listeners)
    finally:
        envoy.stop()


async def test_delta_reconnect_resends_nothing_envoy_already_has(tmp_path: Path) -> None:
    """Envoy reconnects to a restarted server with initial_resource_versions; only what changed is sent."""
    cache = SnapshotCache()
    auth = TokenTableAuthenticator()
    token = auth.issue(ProxyIdentity(namespace="default", service_account="web", cluster="east"))
    listen_port, admin_port = free_port(), free_port()
    good = world(listen_port)
    cache.set_snapshot(NODE, good)
    async with AdsServer(cache=cache, authenticator=auth) as first:
        port = first.port
        path = bootstrap(tmp_path / "envoy.json", ads_port=port, admin_port=admin_port, token=token, delta=True)
        envoy = Proc([envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
                      "--log-level", "info", "--drain-time-s", "1"], log=tmp_path / "envoy.log")

        async def acked(type_url: str, version: str) -> bool:
            if not envoy.alive():
                raise AssertionError(f"envoy exited:\n{envoy.output()[-3000:]}")
            return cache.acked_version(NODE, type_url) == version

        try:
            for t in (CLUSTER, ENDPOINT, LISTENER):
                await wait_until(lambda t=t: acked(t, good.version(t)), what=f"envoy to ACK {t}")
        except BaseException:
            envoy.stop()
            raise
    try:
        async with AdsServer(cache=cache, authenticator=auth, port=port) as second:
            await wait_until(lambda: _opened(second), what="envoy to reconnect")
            changed = good.replace(ENDPOINT, {"backend": cla("backend", 10)})
            cache.set_snapshot(NODE, changed)
            await wait_until(lambda: acked(ENDPOINT, changed.version(ENDPOINT)), what="envoy to ACK the new endpoints")
            # the one changed assignment is all the new server ever sent: the cluster and the listener Envoy
            # already held (named in initial_resource_versions) were not sent again
            assert second.stats.delta_resources == 1
            assert not [r for r in cache.status() if r.node_id == NODE and r.state != SyncState.SYNCED]
    finally:
        envoy.stop()


async def _opened(server: AdsServer) -> bool:
    return server.stats.streams_opened >= 1
