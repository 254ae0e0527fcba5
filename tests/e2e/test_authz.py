"""Acceptance: AuthorizationPolicy enforced by real Envoy sidecars on cross-cluster (and local) calls.

ratings runs in west. Callers: ``sleep`` and ``other`` in east (through west's east-west gateway, TLS passed
through) and a ``sleep`` in west with the same namespace and service account as east's. West holds two policies
on ratings, converted from manifests by the real converter:

- ALLOW ``ratings-from-east-sleep``: principal ``<td>/ns/default/sa/sleep`` when ``source.cluster`` is east;
- DENY ``ratings-no-admin``: paths ``/admin*``.

East's sleep gets 200 (and 403 on /admin, naming the DENY policy); east's other and west's sleep get 403 with no
ALLOW policy matched; a forged ``x-forwarded-client-cert`` claiming east does not help west's sleep. Every denial
leaves a log line on ratings' sidecar naming the policy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio

from discovery.authz import AuthorizationPolicy
from discovery.model import ClusterId
from gateway.context import InboundPort, ProxyInfo, PushContext
from tests.gateway.envoy_fixtures import ControlPlane, EnvoyProc, envoy_workdir, start_envoy, wait_ready, wait_until
from tests.gateway.mesh_fixtures import (
    EAST,
    RATINGS,
    TD,
    WEST,
    Mesh,
    authorization_policies,
    cluster_cas,
    workload_certs,
)
from tests.support.procs import free_port
from tests.support.workloads import echo_app, http_get

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

RATINGS_HOST = "ratings.default.svc.clusterset.local"
POLICIES = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ratings-from-east-sleep, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  action: ALLOW
  rules:
    - from: [{{source: {{principals: ["{TD}/ns/default/sa/sleep"]}}}}]
      when: [{{key: source.cluster, values: [east]}}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: ratings-no-admin, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  action: DENY
  rules:
    - to: [{{operation: {{paths: ["/admin*"]}}}}]
"""


def policies() -> tuple[AuthorizationPolicy, ...]:
    return authorization_policies(POLICIES, WEST)


@dataclass
class Authz:
    ratings: EnvoyProc
    outbound: dict[str, int]  # caller name -> its sidecar's outbound port
    envoys: list[EnvoyProc]

    async def call(self, caller: str, path: str = "/ratings/1", headers: dict[str, str] | None = None
                   ) -> tuple[int, str]:
        return await http_get(self.outbound[caller], path, headers={"Host": RATINGS_HOST, **(headers or {})})


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def authz() -> AsyncIterator[Authz]:
    cas, bundle = cluster_cas()
    ports = {n: free_port() for n in ("east_gw", "west_gw", "ratings_in", "ratings_app")}
    mesh = Mesh(east_gateway_port=ports["east_gw"], west_gateway_port=ports["west_gw"])
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.1", ports["ratings_in"])]
    mesh.exports[WEST] = {RATINGS}

    def context(cluster: ClusterId, sas: list[str]) -> PushContext:
        return PushContext(registry=mesh.registry(cluster), trust_domain=TD, trust_bundle_pem=bundle,
                           workload_certs=workload_certs(cas, str(cluster), [("default", sa) for sa in sas]),
                           authz=policies() if cluster == WEST else ())

    app = await echo_app(ports["ratings_app"], "ratings")

    def sidecar(cluster: ClusterId, sa: str, out_port: int) -> ProxyInfo:
        return mesh.sidecar(cluster, sa, pod=f"{sa}-{cluster}", outbound_port=out_port)

    outbound = {"east-sleep": free_port(), "east-other": free_port(), "west-sleep": free_port()}
    try:
        with envoy_workdir("meshfed-authz-") as (tmp, envoys):
            async with ControlPlane(ctx=context(EAST, ["sleep", "other"])) as east, \
                    ControlPlane(ctx=context(WEST, ["ratings", "sleep"])) as west:
                ratings = mesh.sidecar(WEST, "ratings", pod="ratings-1", services=(RATINGS,),
                                        inbound=(InboundPort(ports["ratings_in"], ports["ratings_app"]),),
                                        outbound_port=free_port())
                gateway = mesh.gateway(WEST)
                envoys.append(ratings_env := start_envoy(tmp, west, ratings))
                envoys.append(start_envoy(tmp, west, gateway))
                envoys.append(start_envoy(tmp, west, sidecar(WEST, "sleep", outbound["west-sleep"])))
                envoys.append(start_envoy(tmp, east, sidecar(EAST, "sleep", outbound["east-sleep"])))
                envoys.append(start_envoy(tmp, east, sidecar(EAST, "other", outbound["east-other"])))
                for e in envoys:
                    await wait_ready(e)
                yield Authz(ratings=ratings_env, outbound=outbound, envoys=envoys)
    finally:
        await app.cleanup()


async def _reachable(authz: Authz) -> bool:
    try:
        status, _ = await authz.call("east-sleep")
    except aiohttp.ClientError:
        return False
    return status == 200


def _denials(authz: Authz) -> list[str]:
    return [line for line in authz.ratings.proc.output().splitlines() if line.startswith("meshfed-authz denied")]


async def _denial(authz: Authz, path: str, *, what: str) -> str:
    """The denial log line on ratings' sidecar for a request to ``path``, once it is written (bounded wait)."""

    def found() -> str | None:
        return next((line for line in _denials(authz) if f"path={path}" in line), None)

    async def logged() -> bool:
        return found() is not None

    await wait_until(logged, within=30, what=what)
    line = found()
    assert line is not None
    return line


async def test_allowed_caller_in_east_gets_200_and_its_cluster_in_the_subject(authz: Authz) -> None:
    await wait_until(lambda: _reachable(authz), within=30, what="ratings reachable from east's sleep")
    status, body = await authz.call("east-sleep")
    assert status == 200, body
    xfcc = json.loads(body)["xfcc"]
    assert f"URI=spiffe://{TD}/ns/default/sa/sleep" in xfcc, xfcc
    assert f'Subject="OU=east,O={TD}"' in xfcc, xfcc


async def test_deny_policy_wins_and_the_log_names_it(authz: Authz) -> None:
    await wait_until(lambda: _reachable(authz), within=30, what="ratings reachable from east's sleep")
    status, body = await authz.call("east-sleep", "/admin/users")
    assert status == 403, body
    assert "RBAC: access denied" in body

    line = await _denial(authz, "/admin/users", what="the denial's log line on ratings' sidecar")
    assert "details=rbac_access_denied_matched_policy[default.ratings-no-admin]" in line, line
    assert f"source=spiffe://{TD}/ns/default/sa/sleep" in line, line
    stats = await authz.ratings.admin.stats(filter=r"rbac\.")
    prefix = f"http.inbound_{authz.ratings.proxy.inbound[0].port}.rbac"
    assert stats.get(f"{prefix}.meshfed_deny.denied", 0) >= 1, stats
    assert stats.get(f"{prefix}.meshfed_deny.policy.default.ratings-no-admin.denied", 0) >= 1, stats


async def test_other_service_account_in_east_is_denied_by_default(authz: Authz) -> None:
    await wait_until(lambda: _reachable(authz), within=30, what="ratings reachable from east's sleep")
    status, body = await authz.call("east-other", "/ratings/other")
    assert status == 403, body

    line = await _denial(authz, "/ratings/other", what="the denial's log line on ratings' sidecar")
    assert "details=rbac_access_denied_matched_policy[none]" in line, line
    assert "allow_policies=default.ratings-from-east-sleep" in line, line
    assert f"source=spiffe://{TD}/ns/default/sa/other" in line, line


async def test_same_identity_in_another_cluster_is_denied_by_source_cluster(authz: Authz) -> None:
    await wait_until(lambda: _reachable(authz), within=30, what="ratings reachable from east's sleep")

    async def west_answers() -> bool:
        try:
            status, _ = await authz.call("west-sleep", "/probe")
        except aiohttp.ClientError:
            return False
        return status in (200, 403)

    await wait_until(west_answers, within=30, what="ratings reachable from west's sleep")
    status, body = await authz.call("west-sleep", "/ratings/from-west")
    assert status == 403, body
    # A forged XFCC (the east Subject, east's principal) is dropped by the callee's sidecar before RBAC.
    forged = f'By=spiffe://{TD}/ns/default/sa/ratings;Subject="OU=east,O={TD}";URI=spiffe://{TD}/ns/default/sa/sleep'
    status, body = await authz.call("west-sleep", "/ratings/forged", headers={"x-forwarded-client-cert": forged})
    assert status == 403, body

    line = await _denial(authz, "/ratings/forged", what="the forged request's log line")
    assert "rbac_access_denied_matched_policy[none]" in line, line
    assert f'source_subject="OU=west,O={TD}"' in line, line
    # Same identity, from east: allowed (the rule is about the cluster, not the principal).
    status, _ = await authz.call("east-sleep", "/ratings/forged")
    assert status == 200
    for envoy in authz.envoys:
        assert await envoy.admin.rejected() == {}, envoy.proxy.node_id


async def _raw_get(port: int, path: str) -> int:
    """GET ``path`` exactly as written (no client-side normalization) through a caller's sidecar."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {RATINGS_HOST}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


async def test_path_spellings_do_not_sidestep_the_deny(authz: Authz) -> None:
    await wait_until(lambda: _reachable(authz), within=30, what="ratings reachable from east's sleep")
    port = authz.outbound["east-sleep"]
    assert await _raw_get(port, "/ratings/ok") == 200
    for path in ("/admin", "/./admin/x", "/ratings/../admin/x", "/admin/?q=1"):
        assert await _raw_get(port, path) == 403, path
