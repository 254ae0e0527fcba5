"""Telemetry with real Envoy: request metrics labelled with both clusters, and JSON access logs.

East's ``productpage`` sidecar calls west's ``ratings`` through west's east-west gateway: a few successful
requests, one the callee answers 503, one to an unknown host (404, no route), and one raw TLS connection through
the gateway. Then ``/stats/prometheus`` of the caller sidecar, the callee sidecar and the gateway must show the
right ``source_cluster``/``destination_cluster``/``destination_service``/``response_code`` labels and never
``unknown``, and every access log line must parse as JSON with both clusters and both principals.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from discovery.authz import convert_authorization_policy
from discovery.model import ServiceKey
from federation.trust.ca import IntermediateCA
from gateway.context import InboundPort, PushContext, sni_name
from gateway.telemetry import parse_prometheus
from tests.gateway.envoy_fixtures import ControlPlane, EnvoyProc, envoy_workdir, start_envoy, wait_ready, wait_until
from tests.gateway.mesh_fixtures import EAST, TD, WEST, Mesh, cluster_cas, workload_certs
from tests.support.procs import free_port
from tests.support.workloads import http_get, serve_app, tls_handshake

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

RATINGS = ServiceKey.parse("ratings.default")
PRODUCTPAGE = ServiceKey.parse("productpage.default")
RATINGS_HOST = RATINGS.clusterset_host
REQUESTS = "envoy_meshfed_requests_total"
TCP = "envoy_meshfed_tcp_connections_closed_total"


async def status_app(port: int) -> web.AppRunner:
    """A workload answering ``/status/<code>`` with that code and anything else with 200."""

    async def handle(request: web.Request) -> web.Response:
        parts = request.path.strip("/").split("/")
        code = int(parts[1]) if len(parts) == 2 and parts[0] == "status" and parts[1].isdigit() else 200
        return web.json_response({"app": "ratings"}, status=code)

    return await serve_app(port, handle)


@dataclass
class Rig:
    client: EnvoyProc
    ratings: EnvoyProc
    west_gw: EnvoyProc
    outbound: int
    cas: dict[str, IntermediateCA]
    bundle: str
    mesh: Mesh
    tmp: Path

    async def get(self, host: str, path: str = "/") -> int:
        status, _ = await http_get(self.outbound, path, headers={"Host": host})
        return status


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig() -> AsyncIterator[Rig]:
    cas, bundle = cluster_cas()
    ports = {n: free_port() for n in ("east_gw", "west_gw", "r_in", "r_app", "pp_in", "pp_out")}
    mesh = Mesh(east_gateway_port=ports["east_gw"], west_gateway_port=ports["west_gw"])
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.1", ports["r_in"])]
    mesh.pods[(EAST, PRODUCTPAGE)] = [("127.0.0.1", ports["pp_in"])]
    mesh.exports[WEST] = {RATINGS}
    mesh.exports[EAST] = {PRODUCTPAGE}

    # West denies /denied to everyone: a 403 decided by the callee's RBAC, before its router.
    deny = convert_authorization_policy({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                                         "metadata": {"name": "no-denied", "namespace": "default"},
                                         "spec": {"action": "DENY",
                                                  "rules": [{"to": [{"operation": {"paths": ["/denied"]}}]}]}},
                                        WEST)

    def context(cluster: str) -> PushContext:
        certs = workload_certs(cas, cluster, [("default", "productpage"), ("default", "ratings")])
        return PushContext(registry=mesh.registry(EAST if cluster == "east" else WEST), trust_domain=TD,
                           trust_bundle_pem=bundle, workload_certs=certs, authz=(deny,) if cluster == "west" else ())

    app = await status_app(ports["r_app"])
    try:
        with envoy_workdir("meshfed-tel-") as (tmp, envoys):
            async with ControlPlane(ctx=context("east")) as east, ControlPlane(ctx=context("west")) as west:
                client = mesh.sidecar(EAST, "productpage", pod="productpage-1", services=(PRODUCTPAGE,),
                                       inbound=(InboundPort(ports["pp_in"], free_port()),),
                                       outbound_port=ports["pp_out"])
                ratings = mesh.sidecar(WEST, "ratings", pod="ratings-1", services=(RATINGS,),
                                        inbound=(InboundPort(ports["r_in"], ports["r_app"]),),
                                        outbound_port=free_port())
                gw = mesh.gateway(WEST)
                envoys.append(client_env := start_envoy(tmp, east, client))
                envoys.append(gw_env := start_envoy(tmp, west, gw))
                envoys.append(ratings_env := start_envoy(tmp, west, ratings))
                for e in envoys:
                    await wait_ready(e)
                yield Rig(client=client_env, ratings=ratings_env, west_gw=gw_env, outbound=ports["pp_out"], cas=cas,
                          bundle=bundle, mesh=mesh, tmp=tmp)
    finally:
        await app.cleanup()


async def _traffic(rig: Rig) -> None:
    async def reachable() -> bool:
        try:
            return await rig.get(RATINGS_HOST) == 200
        except aiohttp.ClientError:
            return False

    await wait_until(reachable, within=30, what="ratings reachable from east")
    for _ in range(3):
        assert await rig.get(RATINGS_HOST, "/ratings/1") == 200
    assert await rig.get(RATINGS_HOST, "/status/503") == 503
    assert await rig.get(RATINGS_HOST, "/denied") == 403
    assert await rig.get("nope.default.svc.clusterset.local") == 404
    # A raw TCP (TLS) connection through the gateway's SNI chain, closed at once.
    cert = next(iter(workload_certs(rig.cas, "east", [("default", "productpage")]).values()))
    assert await tls_handshake(rig.mesh.west_gateway_port, sni_name(RATINGS, 9080), cert=cert, bundle=rig.bundle,
                                tmp=rig.tmp) is not None


async def _prometheus(envoy: EnvoyProc) -> str:
    _, text = await http_get(envoy.admin_port, "/stats/prometheus")
    return text


def _series(text: str, name: str) -> list[dict[str, str]]:
    return [labels | {"value": str(value)} for labels, value in parse_prometheus(text, name)]


def _one(series: list[dict[str, str]], **want: str) -> dict[str, str]:
    found = [s for s in series if all(s.get(k) == v for k, v in want.items())]
    assert len(found) == 1, (want, series)
    return found[0]


async def test_request_metrics_carry_both_clusters_on_every_proxy(rig: Rig) -> None:
    await _traffic(rig)
    ratings = RATINGS_HOST
    # The caller's series (reporter=source): its own cluster, and the callee's from the endpoint's metadata.
    async def caller_counted() -> bool:
        return any(s.get("response_code") == "503" for s in _series(await _prometheus(rig.client), REQUESTS))

    await wait_until(caller_counted, within=10, what="caller-side series")
    caller = _series(await _prometheus(rig.client), REQUESTS)
    ok = _one(caller, reporter="source", response_code="200")
    assert ok["source_cluster"] == "east" and ok["destination_cluster"] == "west", ok
    assert ok["destination_service"] == ratings and ok["connection_security_policy"] == "mutual_tls", ok
    assert float(ok["value"]) >= 3
    failed = _one(caller, reporter="source", response_code="503")
    assert (failed["source_cluster"], failed["destination_cluster"], failed["destination_service"]) == (
        "east", "west", ratings), failed
    no_route = _one(caller, reporter="source", response_code="404")
    assert no_route["source_cluster"] == "east" and no_route["response_flags"] == "NR", no_route
    # The callee's series (reporter=destination): the caller's cluster from its verified certificate's OU.
    callee = _series(await _prometheus(rig.ratings), REQUESTS)
    for code in ("200", "503", "403"):  # 403: denied by the callee's RBAC, still labelled with both clusters
        s = _one(callee, reporter="destination", response_code=code)
        assert (s["source_cluster"], s["destination_cluster"], s["destination_service"]) == (
            "east", "west", ratings), s
        assert s["connection_security_policy"] == "mutual_tls"
    # The gateway's series (reporter=gateway): destination service and cluster per closed TCP connection.
    async def gateway_counted() -> bool:
        return any(s["response_flags"] == "-" for s in _series(await _prometheus(rig.west_gw), TCP))

    await wait_until(gateway_counted, within=10, what="gateway TCP series")
    gw = _one(_series(await _prometheus(rig.west_gw), TCP), reporter="gateway", response_flags="-")
    assert (gw["destination_cluster"], gw["destination_service"]) == ("west", ratings), gw
    assert gw["connection_security_policy"] == "tls_passthrough"
    # No label anywhere says "unknown"; the only empty destination is the request that matched no route.
    for text in (await _prometheus(rig.client), await _prometheus(rig.ratings), await _prometheus(rig.west_gw)):
        assert "unknown" not in "\n".join(line for line in text.splitlines() if "meshfed" in line)
    for s in caller + callee:
        if s.get("response_flags") != "NR":
            assert all(s.get(k) for k in ("source_cluster", "destination_cluster", "destination_service")), s


def _access_lines(envoy: EnvoyProc) -> list[dict[str, object]]:
    out = []
    for line in envoy.proc.output().splitlines():
        if line.startswith("{") and '"reporter"' in line:
            out.append(json.loads(line))
    return out


async def test_access_logs_are_json_with_both_clusters_and_principals(rig: Rig) -> None:
    await _traffic(rig)

    async def logged() -> bool:  # Envoy flushes access logs about once a second
        return (any(e["response_code"] == 200 for e in _access_lines(rig.client))
                and any(e["response_code"] == 503 for e in _access_lines(rig.ratings))
                and bool(_access_lines(rig.west_gw)))

    await wait_until(logged, within=10, what="access log lines")
    caller_id, callee_id = f"spiffe://{TD}/ns/default/sa/productpage", f"spiffe://{TD}/ns/default/sa/ratings"
    out = [e for e in _access_lines(rig.client) if e["response_code"] == 200]
    assert out, _access_lines(rig.client)
    line = out[0]
    assert (line["source_cluster"], line["destination_cluster"]) == ("east", "west"), line
    assert (line["source_principal"], line["destination_principal"]) == (caller_id, callee_id), line
    assert str(line["upstream_cluster"]).startswith("outbound|9080||ratings"), line
    inbound = [e for e in _access_lines(rig.ratings) if e["response_code"] == 503]
    assert inbound, _access_lines(rig.ratings)
    line = inbound[0]
    assert (line["source_cluster"], line["destination_cluster"]) == ("east", "west"), line
    assert (line["source_principal"], line["destination_principal"]) == (caller_id, callee_id), line
    assert f"URI={caller_id}" in str(line["xfcc"]), line
    gw = _access_lines(rig.west_gw)[0]
    assert gw["destination_cluster"] == "west" and gw["requested_server_name"] == sni_name(RATINGS, 9080), gw
