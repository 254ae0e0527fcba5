"""A capture-mode sidecar's configuration, served over ADS (state of the world and delta) to a real Envoy 1.40:
Envoy accepts every resource (``update_rejected`` stays 0, no NACK), /config_dump holds the virtual listeners with
their chains, and a change of the clusterset's outbound policy and of the services is taken as an update."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from discovery.clusterset import OutboundTrafficMode
from discovery.model import ServiceKey, ServicePort, namespace
from gateway import generators as g
from gateway.context import CaptureMode, InboundPort, ProxyInfo, ProxyKind
from gateway.generators import capture
from tests.gateway.envoy_fixtures import ControlPlane, dumped_names, start_envoy, wait_ready, wait_until
from tests.gateway.mesh_fixtures import EAST, RATINGS, REVIEWS, WEST, Mesh, MeshCA, authorization_policies
from tests.support.procs import free_port

DB = ServiceKey.parse("db.default")

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-allow, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: [meshfed.test/ns/default/sa/sleep], namespaces: [default]}}]
    to: [{operation: {ports: [5432]}}]
    when: [{key: source.cluster, values: [east, west]}]
  - to: [{operation: {methods: [GET], paths: [/public*]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-deny, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [default]}}]
    when: [{key: "request.headers[x-evil]", values: ["*"]}]
"""


@pytest.fixture
async def plane() -> AsyncIterator[ControlPlane]:
    ca = MeshCA()
    mesh = Mesh(east_gateway_port=free_port(), west_gateway_port=free_port())
    mesh.pods[(EAST, REVIEWS)] = [("127.0.0.1", free_port())]
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.1", free_port())]
    mesh.pods[(WEST, DB)] = [("127.0.0.1", free_port())]
    mesh.exports[WEST] = {RATINGS, DB}
    mesh.exports[EAST] = {REVIEWS}
    mesh.clusterset_ips = {RATINGS: "241.0.0.1", DB: "241.0.0.2", REVIEWS: "241.0.0.3"}
    mesh.cluster_ips = {(EAST, REVIEWS): "10.96.0.3"}
    mesh.service_ports = {DB: (ServicePort(port=5432, name="tcp-postgres"),),
                          REVIEWS: (ServicePort(port=9080, name="http"), ServicePort(port=5432, name="tcp-db"),
                                    ServicePort(port=7070, name="grpc"))}
    certs = dict([ca.issue("east", "default", "reviews")])
    ctx = dataclasses.replace(mesh.context(EAST, ca, certs), authz=authorization_policies(POLICIES, EAST))
    async with ControlPlane(ctx=ctx) as cp:
        yield cp


def captured_sidecar() -> ProxyInfo:
    return ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, namespace=namespace("default"), service_account="reviews",
                     node_id="sidecar~127.0.0.1~reviews-1.default~default.svc.cluster.local", services=(REVIEWS,),
                     inbound=(InboundPort(9080, 9080, "http"), InboundPort(5432, 5432, "tcp-db"),
                              InboundPort(7070, 7070, "grpc", "grpc")),
                     capture=CaptureMode.REDIRECT, capture_bind=("127.0.0.1",), outbound_port=free_port(),
                     inbound_capture_port=free_port())


def _listener(dump: dict[str, Any], name: str) -> dict[str, Any]:
    for cfg in dump.get("configs", []):
        if cfg.get("@type", "").endswith("ListenersConfigDump"):
            for item in cfg.get("dynamic_listeners", []):
                if item["name"] == name and "active_state" in item:
                    return dict(item["active_state"]["listener"])
    return {}


@pytest.mark.parametrize("delta", [False, True])
async def test_envoy_accepts_the_capture_configuration(plane: ControlPlane, delta: bool, tmp_path: Path) -> None:
    proxy = captured_sidecar()
    envoy = start_envoy(tmp_path, plane, proxy, delta=delta)
    try:
        await wait_ready(envoy)
        expected = g.generate_all(proxy, plane.ctx)
        assert {capture.VIRTUAL_OUTBOUND, capture.VIRTUAL_INBOUND} == set(expected[g.LISTENER_TYPE])

        async def all_in_force() -> bool:
            names = dumped_names(await envoy.admin.config_dump(include_eds=True))
            return all(names[kind] >= set(expected[t]) for kind, t in (
                ("clusters", g.CLUSTER_TYPE), ("listeners", g.LISTENER_TYPE), ("routes", g.ROUTE_TYPE),
                ("secrets", g.SECRET_TYPE), ("endpoints", g.ENDPOINT_TYPE)))

        await wait_until(all_in_force, within=30, what="every capture resource in /config_dump")
        dump = await envoy.admin.config_dump()
        outbound = _listener(dump, capture.VIRTUAL_OUTBOUND)
        chain_names = {c["name"] for c in outbound["filter_chains"]}
        assert "241.0.0.2:5432|db.default.svc.clusterset.local|tcp" in chain_names
        assert "http:9080" in chain_names
        http = next(c for c in outbound["filter_chains"] if c["name"] == "http:9080")
        assert {p["address_prefix"] for p in http["filter_chain_match"]["prefix_ranges"]} == {
            "241.0.0.1", "241.0.0.3", "10.96.0.3"}
        assert outbound["default_filter_chain"]["name"] == capture.PASSTHROUGH_CLUSTER
        inbound = _listener(dump, capture.VIRTUAL_INBOUND)
        assert {c["name"] for c in inbound["filter_chains"]} == {"inbound|9080|http", "inbound|5432|tcp",
                                                                   "inbound|7070|grpc"}

        # REGISTRY_ONLY and a new service: a listener update Envoy takes as well.
        mesh_reg = plane.ctx.registry
        imports = dict(mesh_reg.imports)
        imports[DB] = dataclasses.replace(imports[DB], ips=("241.0.0.2", "241.0.0.9"))
        plane.update(dataclasses.replace(plane.ctx, outbound_mode=OutboundTrafficMode.REGISTRY_ONLY,
                                         registry=mesh_reg.with_catalog(clusters=mesh_reg.clusters,
                                                                        imports=imports)), "policy")

        async def updated() -> bool:
            listener = _listener(await envoy.admin.config_dump(), capture.VIRTUAL_OUTBOUND)
            return (listener.get("default_filter_chain", {}).get("name") == capture.BLACKHOLE_CLUSTER
                    and any(c["name"].startswith("241.0.0.9:5432|") for c in listener["filter_chains"]))

        await wait_until(updated, within=30, what="virtualOutbound updated to REGISTRY_ONLY")
        assert await envoy.admin.rejected() == {}
        for row in plane.cache.status():
            assert row.nack_error == "", f"{row.type_url} NACKed: {row.nack_error}"
    finally:
        envoy.stop()
