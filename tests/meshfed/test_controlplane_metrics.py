"""The control plane's own metrics, scraped from its admin ``/metrics`` while a real xDS client is connected.

A proxyless client connects to the certificate-authenticated ADS listener with a workload certificate from the
cluster's CA, takes its clusters and NACKs them; a certificate from another cluster's CA is refused. The scrape
must show the connection (by kind), the accepted and refused streams, the pushes and their latency histogram, the
NACK by type, the certificates issued and their expiry, and the intermediate's expiry.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from discovery.clusterset import load_clusterset
from discovery.model import cluster_id
from federation.trust.ca import issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import init_root, issue_intermediate, load_bundle, load_cluster_ca
from gateway.sds import bundle_pem
from meshfed.controlplane import ControlPlane, ControlPlaneConfig, Listen
from meshfed.local import http_get
from meshfed.telemetry import scrape_value

DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"
TD = TrustDomain.parse("demo.meshfed.local")
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
NODE = "grpc~127.0.0.1~probe-1.default~default.svc.cluster.local"


def _request(**kw: object) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=CDS, **kw)  # type: ignore[arg-type]
    req.node.id = NODE
    req.node.metadata.update({"MESHFED_KIND": "grpc", "CLUSTER_ID": "east", "NAMESPACE": "default",
                              "SERVICE_ACCOUNT": "probe"})
    return req


async def test_control_plane_metrics_cover_connections_pushes_nacks_and_certificates(tmp_path: Path) -> None:
    init_root(tmp_path / "root", TD)
    for c in ("east", "west"):
        issue_intermediate(tmp_path / "root", SpiffeId.cluster(TD, c), tmp_path / c)
    config = ControlPlaneConfig(
        clusterset=load_clusterset(DEMO), cluster=cluster_id("east"), ca_dir=tmp_path / "east", federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, xds_mtls=Listen("127.0.0.1", 0))
    sid = SpiffeId.workload(TD, "default", "probe")
    bundle = bundle_pem(load_bundle(tmp_path / "east")).encode()
    async with ControlPlane(config) as cp:
        assert cp.ads_mtls is not None
        address = f"127.0.0.1:{cp.ads_mtls.port}"
        # A certificate from west's CA: refused.
        key, chain = issue_workload(load_cluster_ca(tmp_path / "west"), sid)
        creds = grpc.ssl_channel_credentials(bundle, key, b"".join(chain))
        async with grpc.aio.secure_channel(address, creds) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await call.write(_request())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # East's own: served; then NACK what it got.
        key, chain = issue_workload(load_cluster_ca(tmp_path / "east"), sid)
        creds = grpc.ssl_channel_credentials(bundle, key, b"".join(chain))
        async with grpc.aio.secure_channel(address, creds) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await call.write(_request())
            first = await asyncio.wait_for(call.read(), timeout=20)
            assert first.type_url == CDS
            await call.write(_request(response_nonce=first.nonce, version_info="",
                                      error_detail=status_pb2.Status(code=3, message="test rejects it")))

            async def scrape() -> str:
                status, text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{cp.admin_port}/metrics")
                assert status == 200
                return text

            for _ in range(100):  # bounded: the NACK is recorded by the stream's task
                text = await scrape()
                if (scrape_value(text, "meshfed_xds_nacks_total", {"type": "cds"}) or 0) >= 1:
                    break
                await asyncio.sleep(0.05)
            assert scrape_value(text, "meshfed_xds_nacks_total", {"type": "cds"}) == 1
            assert scrape_value(text, "meshfed_xds_nacked_proxies", {"type": "cds"}) == 1
            assert scrape_value(text, "meshfed_xds_connected_proxies") == 1
            assert scrape_value(text, "meshfed_xds_connected_proxies_by_kind", {"kind": "grpc"}) == 1
            assert scrape_value(text, "meshfed_xds_streams_total", {"listener": "mtls", "result": "accepted"}) == 1
            assert scrape_value(text, "meshfed_xds_streams_total", {"listener": "mtls", "result": "refused"}) == 1
            assert (scrape_value(text, "meshfed_xds_pushes_total") or 0) >= 1
            assert (scrape_value(text, "meshfed_xds_push_duration_seconds_count") or 0) >= 1
            assert scrape_value(text, "meshfed_workload_certificates") == 1
            assert scrape_value(text, "meshfed_workload_certificates_issued_total") == 1
            assert scrape_value(text, "meshfed_workload_certificates_expiring") == 0
            assert 0 < (scrape_value(text, "meshfed_workload_certificate_expiry_seconds") or 0) <= 24 * 3600
            assert (scrape_value(text, "meshfed_intermediate_expiry_seconds") or 0) > 24 * 3600
            assert scrape_value(text, "meshfed_federation_connected") == 0  # no federation configured
            # A second scrape never moves the derived counters backwards or double-counts.
            again = await scrape()
            assert scrape_value(again, "meshfed_xds_nacks_total", {"type": "cds"}) == 1
            assert scrape_value(again, "meshfed_workload_certificates_issued_total") == 1
            call.cancel()
