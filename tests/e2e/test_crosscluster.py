"""Acceptance: a request crosses clusters over mTLS through real Envoy east-west gateways.

Two clusters on loopback, east and west, each with its own control plane (ADS server + snapshot cache + our
generators over a hand-built Registry), an Envoy east-west gateway, and an Envoy sidecar per workload. ``ratings``
exists only in west; ``productpage`` in east calls ``ratings.default.svc.clusterset.local`` through its sidecar
(east, state-of-the-world xDS) -> west's gateway (SNI passthrough, delta xDS) -> ratings' sidecar (delta xDS),
which checks the caller's certificate and hands the app the caller's SPIFFE ID in x-forwarded-client-cert.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import duration_pb2

from discovery.model import ClusterId, namespace
from federation.trust.ca import IntermediateCA
from gateway.ads import AdsServer
from gateway.bootstrap import render_grpc_bootstrap, write_bootstrap
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext, sni_name
from gateway.snapshot import CLUSTER, Snapshot
from tests.gateway.envoy_fixtures import ControlPlane, EnvoyProc, envoy_workdir, start_envoy, wait_ready, wait_until
from tests.gateway.mesh_fixtures import EAST, RATINGS, TD, WEST, Mesh, cluster_cas, workload_certs
from tests.support.procs import free_port
from tests.support.workloads import echo_app, http_get, tls_handshake

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

PRODUCTPAGE = RATINGS.__class__.parse("productpage.default")
RATINGS_HOST = "ratings.default.svc.clusterset.local"
DETAILS = RATINGS.__class__.parse("details.default")


@dataclass
class CrossCluster:
    mesh: Mesh
    east: ControlPlane
    west: ControlPlane
    client: EnvoyProc  # productpage's sidecar in east
    ratings: EnvoyProc  # ratings' sidecar in west
    east_gw: EnvoyProc
    west_gw: EnvoyProc
    cas: dict[str, IntermediateCA]
    bundle_pem: str
    client_outbound: int
    tmp: Path

    async def get(self, host: str, path: str = "/") -> tuple[int, dict[str, str] | str]:
        status, body = await http_get(self.client_outbound, path, headers={"Host": host})
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def xc() -> AsyncIterator[CrossCluster]:
    cas, bundle = cluster_cas()
    ports = {n: free_port() for n in ("east_gw", "west_gw", "ratings_in", "ratings_app", "pp_in", "pp_app", "pp_out")}
    mesh = Mesh(east_gateway_port=ports["east_gw"], west_gateway_port=ports["west_gw"])
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.1", ports["ratings_in"])]
    mesh.pods[(EAST, PRODUCTPAGE)] = [("127.0.0.1", ports["pp_in"])]
    mesh.exports[WEST] = {RATINGS}
    mesh.exports[EAST] = {PRODUCTPAGE}

    def context(cluster: ClusterId) -> PushContext:
        certs = workload_certs(cas, str(cluster), [("default", "productpage"), ("default", "ratings")])
        return PushContext(registry=mesh.registry(cluster), trust_domain=TD, trust_bundle_pem=bundle,
                           workload_certs=certs)

    apps = [await echo_app(ports["ratings_app"], "ratings"), await echo_app(ports["pp_app"], "productpage")]
    try:
        with envoy_workdir("meshfed-xc-") as (tmp, envoys):
            async with ControlPlane(ctx=context(EAST)) as east, ControlPlane(ctx=context(WEST)) as west:
                client = mesh.sidecar(EAST, "productpage", pod="productpage-1", services=(PRODUCTPAGE,),
                                       inbound=(InboundPort(ports["pp_in"], ports["pp_app"]),),
                                       outbound_port=ports["pp_out"])
                ratings = mesh.sidecar(WEST, "ratings", pod="ratings-1", services=(RATINGS,),
                                        inbound=(InboundPort(ports["ratings_in"], ports["ratings_app"]),),
                                        outbound_port=free_port())
                envoys.append(client_env := start_envoy(tmp, east, client))
                envoys.append(east_gw := start_envoy(tmp, east, mesh.gateway(EAST)))
                envoys.append(west_gw := start_envoy(tmp, west, mesh.gateway(WEST), delta=True))
                envoys.append(ratings_env := start_envoy(tmp, west, ratings, delta=True))
                for e in envoys:
                    await wait_ready(e)
                yield CrossCluster(mesh=mesh, east=east, west=west, client=client_env, ratings=ratings_env,
                                   east_gw=east_gw, west_gw=west_gw, cas=cas, bundle_pem=bundle,
                                   client_outbound=ports["pp_out"], tmp=tmp)
    finally:
        for runner in apps:
            await runner.cleanup()


async def _route_works(xc: CrossCluster) -> bool:
    try:
        status, _ = await xc.get(RATINGS_HOST)
    except aiohttp.ClientError:
        return False
    return status == 200


async def test_call_crosses_clusters_and_callee_sees_callers_spiffe_id(xc: CrossCluster) -> None:
    await wait_until(lambda: _route_works(xc), within=30, what="ratings reachable from east")
    for host in (RATINGS_HOST, f"{RATINGS_HOST}:9080", "ratings.default", "ratings"):
        status, body = await xc.get(host, "/ratings/1")
        assert status == 200, (host, body)
        assert isinstance(body, dict) and body["app"] == "ratings"
        xfcc = body["xfcc"]
        assert f"URI=spiffe://{TD}/ns/default/sa/productpage" in xfcc, xfcc
        assert f"By=spiffe://{TD}/ns/default/sa/ratings" in xfcc, xfcc
    # The workload may also use its sidecar as an HTTP proxy (absolute URI), as HTTP_PROXY-aware clients do.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, session.get(
            f"http://{RATINGS_HOST}:9080/via-proxy", proxy=f"http://127.0.0.1:{xc.client_outbound}") as resp:
        assert resp.status == 200
        assert (await resp.json())["app"] == "ratings"
    # The request went through west's gateway (TLS passed through on the SNI chain) and nothing was rejected.
    gw_stats = await xc.west_gw.admin.stats(filter=r"tcp\..*downstream_cx_total$")
    assert gw_stats.get(f"tcp.{sni_name(RATINGS, 9080)}.downstream_cx_total", 0) >= 1, gw_stats
    for envoy in (xc.client, xc.ratings, xc.east_gw, xc.west_gw):
        assert await envoy.admin.rejected() == {}, envoy.proxy.node_id
    # West's Envoys were configured over delta xDS only, east's over state of the world only.
    assert xc.west.server is not None and xc.east.server is not None
    assert xc.west.server.stats.delta_responses > 0 and xc.west.server.stats.sotw_responses == 0
    assert xc.east.server.stats.sotw_responses > 0 and xc.east.server.stats.delta_responses == 0
    # Unknown service: no virtual host, so Envoy answers 404 itself.
    status, _ = await xc.get("nope.default.svc.clusterset.local")
    assert status == 404


async def test_gateway_refuses_plaintext_and_wrong_sni_and_passes_tls_through(xc: CrossCluster) -> None:
    port = xc.mesh.west_gateway_port
    # Plaintext HTTP: no TLS, so no filter chain matches; the gateway closes without answering.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET / HTTP/1.1\r\nHost: {RATINGS_HOST}\r\n\r\n".encode())
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(1024), timeout=10)
    except ConnectionError:
        data = b""
    writer.close()
    assert data == b"", data
    # TLS with an SNI the gateway does not serve: the connection is closed during the handshake.
    client_cert = next(iter(workload_certs(xc.cas, "east", [("default", "productpage")]).values()))
    wrong = await tls_handshake(port, sni_name(PRODUCTPAGE, 9080), cert=client_cert, bundle=xc.bundle_pem,
                                 tmp=xc.tmp)
    assert wrong is None
    wrong = await tls_handshake(port, "ratings.default.svc.cluster.local", cert=client_cert,
                                 bundle=xc.bundle_pem, tmp=xc.tmp)
    assert wrong is None
    # The right SNI: the handshake is with ratings' own sidecar (passthrough), which presents ratings' SPIFFE ID.
    ok = await tls_handshake(port, sni_name(RATINGS, 9080), cert=client_cert, bundle=xc.bundle_pem, tmp=xc.tmp)
    assert ok is not None
    der = ok.getpeercert(binary_form=True)
    assert der is not None
    sans = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/ns/default/sa/ratings"]


async def test_bad_resource_is_nacked_recorded_and_traffic_keeps_flowing(xc: CrossCluster) -> None:
    node = xc.client.proxy.node_id
    good = xc.east.snapshot(node)
    clusters = dict(good.resources[CLUSTER])
    bad = cluster_pb2.Cluster(name="bad-cluster", type=cluster_pb2.Cluster.STATIC,
                              connect_timeout=duration_pb2.Duration(seconds=-1))
    clusters["bad-cluster"] = bad
    broken = Snapshot.build({**good.resources, CLUSTER: clusters})
    xc.east.cache.set_snapshot(node, broken)

    async def nacked() -> bool:
        row = xc.east.cache.status_of(node, CLUSTER)
        return row is not None and row.nack_error != ""

    await wait_until(nacked, within=30, what="the CDS NACK recorded in the cache")
    row = xc.east.cache.status_of(node, CLUSTER)
    assert row is not None and row.state == "nacked"
    assert "positive duration" in row.nack_error, row.nack_error  # Envoy's own words, kept for status
    assert row.nack_version == broken.version(CLUSTER)
    assert row.acked_version == good.version(CLUSTER)
    rejected = await xc.client.admin.rejected()
    assert rejected.get("cluster_manager.cds.update_rejected", 0) >= 1, rejected
    status, body = await xc.get(RATINGS_HOST)
    assert status == 200 and isinstance(body, dict) and body["app"] == "ratings"
    # Put the good configuration back: the next version is accepted.
    xc.east.publish(node)

    async def synced() -> bool:
        r = xc.east.cache.status_of(node, CLUSTER)
        return r is not None and r.state == "synced"

    await wait_until(synced, within=30, what="CDS synced again after the fix")


GRPC_CLIENT = """
import json, sys, grpc, grpc.experimental
creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
with grpc.secure_channel(sys.argv[1], creds) as channel:
    call = channel.unary_unary("/meshfed.Echo/Call")
    print(json.dumps({"reply": call(b"hello", timeout=30).decode()}))
"""


async def grpc_echo_server(port: int) -> grpc.aio.Server:
    """A gRPC workload: ``/meshfed.Echo/Call`` answers with the x-forwarded-client-cert metadata it received."""

    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        md = dict(context.invocation_metadata())
        return json.dumps({"app": "details", "xfcc": md.get("x-forwarded-client-cert", "")}).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "meshfed.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def test_proxyless_grpc_client_calls_across_clusters(xc: CrossCluster) -> None:
    """gRPC's own xDS client in east (no Envoy) calls a gRPC service in west through west's gateway with mTLS
    from its certificate provider; the callee's sidecar forwards the caller's SPIFFE ID."""
    mesh = xc.mesh
    details_in, details_app = free_port(), free_port()
    mesh.pods[(WEST, DETAILS)] = [("127.0.0.1", details_in)]
    mesh.exports[WEST] = {*mesh.exports[WEST], DETAILS}
    server = await grpc_echo_server(details_app)
    envoy = None
    try:
        details = mesh.sidecar(WEST, "details", pod="details-1", services=(DETAILS,),
                                inbound=(InboundPort(details_in, details_app, "grpc", "grpc"),),
                                outbound_port=free_port())
        west_certs = workload_certs(xc.cas, "west", [("default", "details")])
        xc.west.ctx = replace(xc.west.ctx, registry=mesh.registry(WEST),
                              workload_certs={**xc.west.ctx.workload_certs, **west_certs})
        for node_id in list(xc.west.proxies):
            xc.west.publish(node_id)
        envoy = start_envoy(xc.tmp, xc.west, details, delta=True)
        await wait_ready(envoy)
        xc.east.ctx = replace(xc.east.ctx, registry=mesh.registry(EAST))
        for node_id in list(xc.east.proxies):
            xc.east.publish(node_id)
        client = ProxyInfo(kind=ProxyKind.GRPC, cluster=EAST, namespace=namespace("default"),
                           service_account="grpc-client",
                           node_id="proxyless~127.0.0.1~grpc-client-1.default~default.svc.cluster.local")
        xc.east.proxies[client.node_id] = client
        xc.east.publish(client.node_id)
        cert = next(iter(workload_certs(xc.cas, "east", [("default", "grpc-client")]).values()))
        files = {"cert": cert.chain_pem, "key": cert.key_pem, "ca": xc.bundle_pem}
        for name, text in files.items():
            (xc.tmp / f"grpc-{name}.pem").write_text(text)
            (xc.tmp / f"grpc-{name}.pem").chmod(0o600)
        # gRPC's bootstrap cannot carry the bearer token over a plaintext channel: proxyless clients use a
        # second, unauthenticated ADS listener on loopback serving the same cache.
        async with AdsServer(cache=xc.east.cache, authenticator=None, host="127.0.0.1", port=0) as open_ads:
            boot = render_grpc_bootstrap(client, xds_host="127.0.0.1", xds_port=open_ads.port,
                                         cert_file=str(xc.tmp / "grpc-cert.pem"),
                                         key_file=str(xc.tmp / "grpc-key.pem"),
                                         ca_file=str(xc.tmp / "grpc-ca.pem"))
            boot_path = write_bootstrap(xc.tmp / "grpc-bootstrap.json", boot)
            env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(boot_path), "GRPC_EXPERIMENTAL_XDS_SNI": "true"}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", GRPC_CLIENT, f"xds:///{DETAILS.clusterset_host}:9080", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        nacks = [r for r in xc.east.cache.status() if r.node_id == client.node_id and r.nack_error]
        assert nacks == [], [(r.type_url, r.nack_error) for r in nacks]
        assert proc.returncode == 0, err.decode()[-3000:]
        reply = json.loads(json.loads(out.decode().strip().splitlines()[-1])["reply"])
        assert reply["app"] == "details"
        assert f"URI=spiffe://{TD}/ns/default/sa/grpc-client" in reply["xfcc"], reply
    finally:
        if envoy is not None:
            envoy.stop()
        await server.stop(None)


async def test_removing_the_export_in_west_withdraws_the_route_in_east(xc: CrossCluster) -> None:
    assert await _route_works(xc)
    rejected_before = await xc.client.admin.rejected()  # the NACK test above left its counter
    mesh = xc.mesh
    mesh.exports[WEST].discard(RATINGS)
    # West stops serving it at its gateway; east's federated view loses it (remote shard and import).
    xc.west.update(replace(xc.west.ctx, registry=mesh.registry(WEST)), "export removed")
    xc.east.update(replace(xc.east.ctx, registry=mesh.registry(EAST)), "remote export removed")
    assert xc.east.pushes is not None
    async with asyncio.timeout(10):
        await xc.east.pushes.flush()

    async def withdrawn() -> bool:
        status, _ = await xc.get(RATINGS_HOST)
        return status == 404

    await wait_until(withdrawn, within=30, what="ratings route withdrawn in east")
    dump = await xc.client.admin.config_dump(resource="dynamic_route_configs")
    assert RATINGS_HOST not in json.dumps(dump)
    assert await xc.client.admin.rejected() == rejected_before
    # West's gateway no longer has a chain for it either (nothing exported: no listener at all).
    async def gateway_closed() -> bool:
        return await tls_handshake(mesh.west_gateway_port, sni_name(RATINGS, 9080), cert=None, bundle=None,
                                    tmp=xc.tmp) is None

    await wait_until(gateway_closed, within=30, what="west's gateway stops serving ratings")
    assert await xc.west_gw.admin.rejected() == {}
