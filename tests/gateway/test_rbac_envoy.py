"""The compiled RBAC agrees with Istio's semantics (``gateway.rbac.decide``) on a real Envoy, request by request.

One sidecar (ratings, in west) with a mix of ALLOW and DENY policies over every supported field; callers are TLS
clients presenting certificates issued by east's or west's CA for several identities, sending every combination of
method, path and header. Each answer (200 or 403) must equal what ``decide`` says.
"""

from __future__ import annotations

import itertools
import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from discovery.authz import AuthorizationPolicy
from federation.trust.ca import IntermediateCA, issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from gateway import rbac
from gateway.context import PushContext, WorkloadCert
from tests.gateway.envoy_fixtures import EnvoyProc, wait_until
from tests.gateway.mesh_fixtures import (
    TD,
    WEST,
    Mesh,
    authorization_policies,
    cluster_cas,
    hand_made_leaf,
    ratings_sidecar,
    subject,
)
from tests.support.procs import free_port

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

POLICIES = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: a-east-sleep-api, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  rules:
    - from: [{{source: {{principals: ["*/sa/sleep"]}}}}]
      to: [{{operation: {{paths: ["/api/*"], ports: ["9080"]}}}}]
      when: [{{key: source.cluster, values: [east]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: b-foo-get, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  rules:
    - from: [{{source: {{namespaces: ["fo*"]}}}}]
      to: [{{operation: {{methods: ["GET"], notPaths: ["*.secret"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: c-tenant, namespace: default}}
spec:
  rules:
    - when:
        - {{key: "request.headers[x-tenant]", values: ["acme*"]}}
        - {{key: source.namespace, notValues: [bar]}}
    - to: [{{operation: {{ports: ["9443"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: d-no-delete-outside-default, namespace: default}}
spec:
  action: DENY
  rules:
    - from: [{{source: {{notNamespaces: [default]}}}}]
      to: [{{operation: {{methods: ["DELETE"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: e-west-private, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  action: DENY
  rules:
    - to: [{{operation: {{paths: ["/api/private*"]}}}}]
      when:
        - {{key: source.cluster, values: [west]}}
        - {{key: source.principal, notValues: ["{TD}/ns/default/sa/admin"]}}
"""

CALLERS = [("east", "default", "sleep"), ("west", "default", "sleep"), ("east", "foo", "app"), ("east", "bar", "x"),
           ("west", "foo", "app"), ("west", "default", "admin")]
METHODS = ["GET", "POST", "DELETE"]
PATHS = ["/api/x", "/api/private/1", "/api/f.secret", "/other?q=/api/x"]
HEADERS: list[dict[str, str]] = [{}, {"x-tenant": "acme-1"}]


def policies() -> tuple[AuthorizationPolicy, ...]:
    return authorization_policies(POLICIES, WEST)


@dataclass
class Sidecar:
    envoy: EnvoyProc
    port: int
    contexts: dict[tuple[str, str, str], ssl.SSLContext]
    west_ca: IntermediateCA
    root_pem: str
    tmp: Path


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sidecar() -> AsyncIterator[Sidecar]:
    td = TrustDomain(TD)
    cas, root_pem = cluster_cas()
    tmp = Path(tempfile.mkdtemp(prefix="meshfed-rbac-"))
    contexts: dict[tuple[str, str, str], ssl.SSLContext] = {}
    for cluster, ns, sa in CALLERS:
        key, chain = issue_workload(cas[cluster], SpiffeId.workload(td, ns, sa), ttl=timedelta(hours=1))
        cert_file, key_file = tmp / f"{cluster}-{ns}-{sa}.pem", tmp / f"{cluster}-{ns}-{sa}.key"
        cert_file.write_bytes(b"".join(chain))
        key_file.write_bytes(key)
        os.chmod(key_file, 0o600)
        tls = ssl.create_default_context(cadata=root_pem)
        tls.check_hostname = False  # the sidecar presents a SPIFFE ID (URI SAN), no DNS name
        tls.load_cert_chain(cert_file, key_file)
        contexts[(cluster, ns, sa)] = tls
    ratings_key, ratings_chain = issue_workload(cas["west"], SpiffeId.workload(td, "default", "ratings"))
    mesh = Mesh(east_gateway_port=free_port(), west_gateway_port=free_port())
    ctx = PushContext(registry=mesh.registry(WEST), trust_domain=TD, trust_bundle_pem=root_pem,
                      workload_certs={f"spiffe://{TD}/ns/default/sa/ratings": WorkloadCert(
                          key_pem=ratings_key.decode(), chain_pem=b"".join(ratings_chain).decode())},
                      authz=policies())

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    try:
        async with ratings_sidecar(tmp, mesh, ctx, ok) as (_cp, envoy, port):
            yield Sidecar(envoy=envoy, port=port, contexts=contexts, west_ca=cas["west"], root_pem=root_pem, tmp=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def test_every_request_gets_the_decision_istio_semantics_give(sidecar: Sidecar) -> None:
    deny, allow = rbac.select(policies(), "default", {"app": "ratings"})
    assert [p.name for p in deny] == ["d-no-delete-outside-default", "e-west-private"]
    assert len(allow) == 3
    timeout = aiohttp.ClientTimeout(total=10)
    url = f"https://127.0.0.1:{sidecar.port}"

    async def listening() -> bool:
        try:
            async with aiohttp.ClientSession(timeout=timeout) as s, s.get(
                    url + "/api/x", ssl=sidecar.contexts[("east", "default", "sleep")]) as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(listening, within=30, what="ratings' inbound listener with RBAC")
    mismatches = []
    outcomes = {True: 0, False: 0}
    for caller in CALLERS:
        cluster, ns, sa = caller
        principal = f"spiffe://{TD}/ns/{ns}/sa/{sa}"
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for method, path, headers in itertools.product(METHODS, PATHS, HEADERS):
                expected = rbac.decide(deny, allow, rbac.Request(principal=principal, cluster=cluster, port=9080,
                                                                 method=method, path=path, headers=headers))
                async with session.request(method, url + path, headers=headers,
                                           ssl=sidecar.contexts[caller]) as resp:
                    got = resp.status
                outcomes[expected.allowed] += 1
                if got != (200 if expected.allowed else 403):
                    mismatches.append((caller, method, path, headers, got, expected))
    assert mismatches == []
    assert outcomes[True] >= 10 and outcomes[False] >= 10, outcomes  # both outcomes exercised
    assert await sidecar.envoy.admin.rejected() == {}


async def test_a_leaf_claiming_another_cluster_is_refused_in_the_handshake(sidecar: Sidecar) -> None:
    """Even with west's intermediate key, a leaf whose Subject says OU=east does not pass Envoy's chain check: the
    intermediate's name constraint permits only OU=west (docs/authorization.md)."""
    sleep = str(SpiffeId.workload(TrustDomain(TD), "default", "sleep"))

    def leaf(ou: str) -> ssl.SSLContext:
        chain, key = hand_made_leaf(sidecar.west_ca, sleep, subject=subject(TD, ou))
        cert_file, key_file = sidecar.tmp / f"rogue-{ou}.pem", sidecar.tmp / f"rogue-{ou}.key"
        cert_file.write_bytes(chain)
        key_file.write_bytes(key)
        os.chmod(key_file, 0o600)
        ctx = ssl.create_default_context(cadata=sidecar.root_pem)
        ctx.check_hostname = False
        ctx.load_cert_chain(cert_file, key_file)
        return ctx

    url = f"https://127.0.0.1:{sidecar.port}/api/x"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        # Control: the same hand-made leaf naming its own cluster is accepted (and, from west, denied by RBAC).
        async with session.get(url, ssl=leaf("west")) as resp:
            assert resp.status == 403
        with pytest.raises(aiohttp.ClientError):
            async with session.get(url, ssl=leaf("east")) as resp:
                pytest.fail(f"a leaf claiming east under west's intermediate got HTTP {resp.status}")
