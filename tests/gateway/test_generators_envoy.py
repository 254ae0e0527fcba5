"""Every resource type our generators produce is accepted by real Envoy 1.40 over ADS (no update_rejected, and
/config_dump holds each resource we sent)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from discovery.model import namespace
from federation.trust.ca import create_intermediate, create_root, issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from gateway import generators as g
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext, WorkloadCert
from tests.gateway.envoy_fixtures import ControlPlane, dumped_names, start_envoy, wait_ready, wait_until
from tests.gateway.mesh_fixtures import EAST, RATINGS, REVIEWS, TD, WEST, Mesh
from tests.support.procs import free_port


@pytest.fixture
async def plane() -> AsyncIterator[ControlPlane]:
    mesh = Mesh(east_gateway_port=free_port(), west_gateway_port=free_port())
    mesh.pods[(EAST, REVIEWS)] = [("127.0.0.1", free_port())]
    mesh.pods[(EAST, RATINGS)] = [("127.0.0.1", free_port())]
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
    mesh.exports[EAST] = {RATINGS}
    mesh.exports[WEST] = {RATINGS}
    td = TrustDomain(TD)
    root = create_root(td)
    ca = create_intermediate(root, SpiffeId.cluster(td, "east"))
    spiffe = SpiffeId.workload(td, "default", "reviews")
    key, chain = issue_workload(ca, spiffe, ttl=timedelta(hours=1))
    certs = {str(spiffe): WorkloadCert(key_pem=key.decode(), chain_pem=b"".join(chain).decode())}
    ctx = PushContext(registry=mesh.registry(EAST), trust_domain=TD, trust_bundle_pem=root.cert_pem.decode(),
                      workload_certs=certs)
    async with ControlPlane(ctx=ctx) as cp:
        yield cp


@pytest.mark.parametrize("kind,delta", [("sidecar", False), ("sidecar", True), ("gateway", False)])
async def test_envoy_accepts_every_generated_type(plane: ControlPlane, kind: str, delta: bool,
                                                  tmp_path: Path) -> None:
    if kind == "sidecar":
        proxy = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST,
                          node_id="sidecar~127.0.0.1~reviews-1.default~default.svc.cluster.local",
                          namespace=namespace("default"), service_account="reviews", services=(REVIEWS,),
                          inbound=(InboundPort(free_port(), free_port(), "http"),), outbound_port=free_port())
    else:
        proxy = ProxyInfo(kind=ProxyKind.GATEWAY, cluster=EAST,
                          node_id="router~127.0.0.1~eastwest.meshfed~meshfed.svc.cluster.local",
                          namespace=namespace("meshfed"), service_account="eastwest",
                          gateway_port=free_port())
    envoy = start_envoy(tmp_path, plane, proxy, delta=delta)
    try:
        await wait_ready(envoy)
        expected = g.generate_all(proxy, plane.ctx)

        async def all_in_force() -> bool:
            names = dumped_names(await envoy.admin.config_dump(include_eds=True))
            return (names["clusters"] >= set(expected[g.CLUSTER_TYPE])
                    and names["listeners"] >= set(expected[g.LISTENER_TYPE])
                    and names["routes"] >= set(expected[g.ROUTE_TYPE])
                    and names["secrets"] >= set(expected[g.SECRET_TYPE])
                    and names["endpoints"] >= set(expected[g.ENDPOINT_TYPE]))

        await wait_until(all_in_force, within=30, what="every generated resource in /config_dump")
        assert all(expected[t] for t in (g.CLUSTER_TYPE, g.LISTENER_TYPE, g.ENDPOINT_TYPE))
        if kind == "sidecar":
            assert expected[g.SECRET_TYPE] and expected[g.ROUTE_TYPE]
        assert await envoy.admin.rejected() == {}
        stats = await envoy.admin.stats(filter=r"update_success$")
        assert any(k.startswith("cluster_manager.cds") and v > 0 for k, v in stats.items())
        for row in plane.cache.status():
            assert row.nack_error == "", f"{row.type_url} NACKed: {row.nack_error}"
    finally:
        envoy.stop()
