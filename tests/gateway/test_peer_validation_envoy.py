"""Peered trust domains on a real Envoy sidecar: one trust bundle per trust domain (Envoy's SPIFFE validator), and a
foreign caller admitted only where an AuthorizationPolicy names it.

One sidecar (ratings, in west of trust domain ``TD``) whose push context carries a peer trust domain's roots
(``PushContext.peer_bundles``). Callers are TLS clients with certificates from our root or the peer's root. Checked:
our callers as before, the named foreign principal gets through and the app sees its foreign SPIFFE ID, an unnamed
foreign caller fails the handshake, a certificate naming one trust domain but signed by the other's root fails it
(the bundles are never merged), and without the peer's bundle nobody from the peer gets in.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from federation.trust.ca import IntermediateCA, issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from gateway.context import PushContext, WorkloadCert
from tests.gateway.envoy_fixtures import ControlPlane, EnvoyProc, wait_until
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

PEER_TD = "peer.example"

POLICY = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ratings-callers, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  rules:
    - from: [{{source: {{principals: ["{TD}/ns/default/sa/sleep", "{PEER_TD}/ns/default/sa/sleep"]}}}}]
"""


@dataclass
class Bed:
    cp: ControlPlane
    envoy: EnvoyProc
    url: str
    tmp: Path
    own: dict[str, IntermediateCA]
    peer: dict[str, IntermediateCA]
    own_root: str
    peer_root: str
    peered: PushContext

    def client(self, ca: IntermediateCA, td: str, sa: str) -> ssl.SSLContext:
        key, chain = issue_workload(ca, SpiffeId.workload(TrustDomain(td), "default", sa))
        return self._context(f"{td}-{sa}", b"".join(chain), key)

    def forged(self, ca: IntermediateCA, spiffe: str, *, td: str, cluster: str) -> ssl.SSLContext:
        """A leaf with SAN ``spiffe`` signed by ``ca`` whatever trust domain ``ca`` belongs to (an attacker holding
        one trust domain's CA key, claiming an identity of the other); its Subject is the one ``ca``'s name
        constraint permits (``O=td, OU=cluster``), so only the SPIFFE ID's trust domain is wrong."""
        chain, key = hand_made_leaf(ca, spiffe, subject=subject(td, cluster))
        return self._context(f"forged-{td}-{cluster}-{spiffe.rsplit('/', 1)[-1]}", chain, key)

    def _context(self, name: str, chain: bytes, key: bytes) -> ssl.SSLContext:
        cert_file, key_file = self.tmp / f"{name}.pem", self.tmp / f"{name}.key"
        cert_file.write_bytes(chain)
        key_file.write_bytes(key)
        os.chmod(key_file, 0o600)
        tls = ssl.create_default_context(cadata=self.own_root)  # the sidecar serves our trust domain's certificate
        tls.check_hostname = False
        tls.load_cert_chain(cert_file, key_file)
        return tls

    async def call(self, tls: ssl.SSLContext) -> tuple[int, str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
                s.get(self.url, ssl=tls) as resp:
            return resp.status, await resp.text()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bed() -> AsyncIterator[Bed]:
    own, own_root = cluster_cas()
    peer, peer_root = cluster_cas(PEER_TD)
    tmp = Path(tempfile.mkdtemp(prefix="meshfed-peer-tls-"))
    ratings_key, ratings_chain = issue_workload(own["west"], SpiffeId.workload(TrustDomain(TD), "default", "ratings"))
    mesh = Mesh(east_gateway_port=free_port(), west_gateway_port=free_port())
    peered = PushContext(registry=mesh.registry(WEST), trust_domain=TD, trust_bundle_pem=own_root,
                         peer_bundles=((PEER_TD, peer_root),),
                         workload_certs={f"spiffe://{TD}/ns/default/sa/ratings": WorkloadCert(
                             key_pem=ratings_key.decode(), chain_pem=b"".join(ratings_chain).decode())},
                         authz=authorization_policies(POLICY, WEST))

    async def caller(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("x-forwarded-client-cert", ""))

    try:
        async with ratings_sidecar(tmp, mesh, peered, caller) as (cp, envoy, port):
            yield Bed(cp=cp, envoy=envoy, url=f"https://127.0.0.1:{port}/", tmp=tmp, own=own, peer=peer,
                      own_root=own_root, peer_root=peer_root, peered=cp.ctx)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _refused(bed: Bed, tls: ssl.SSLContext) -> bool:
    try:
        await bed.call(tls)
    except aiohttp.ClientError:
        return True
    return False


async def test_a_named_foreign_caller_gets_in_and_is_seen_under_its_own_trust_domain(bed: Bed) -> None:
    ours = bed.client(bed.own["east"], TD, "sleep")

    async def listening() -> bool:
        try:
            return (await bed.call(ours))[0] == 200
        except aiohttp.ClientError:
            return False

    await wait_until(listening, within=30, what="ratings' inbound listener")
    status, xfcc = await bed.call(bed.client(bed.peer["east"], PEER_TD, "sleep"))
    assert status == 200, xfcc
    assert f"URI=spiffe://{PEER_TD}/ns/default/sa/sleep" in xfcc, xfcc  # the callee sees the foreign SPIFFE ID
    # Our own callers are judged by the policy as before: one it does not name is denied by RBAC.
    assert (await bed.call(bed.client(bed.own["east"], TD, "other")))[0] == 403
    assert await bed.envoy.admin.rejected() == {}


async def test_an_unnamed_foreign_caller_is_refused_in_the_handshake(bed: Bed) -> None:
    assert await _refused(bed, bed.client(bed.peer["east"], PEER_TD, "other"))


async def test_each_trust_domain_is_checked_only_against_its_own_roots(bed: Bed) -> None:
    # Control: a hand-made leaf naming the peer's trust domain and signed by the peer's CA is accepted.
    peer_ca, own_ca = bed.peer["west"], bed.own["east"]
    assert (await bed.call(bed.forged(peer_ca, f"spiffe://{PEER_TD}/ns/default/sa/sleep", td=PEER_TD,
                                      cluster="west")))[0] == 200
    # The peer's CA vouching for one of ours, and ours vouching for the peer's: both refused.
    assert await _refused(bed, bed.forged(peer_ca, f"spiffe://{TD}/ns/default/sa/sleep", td=PEER_TD, cluster="west"))
    assert await _refused(bed, bed.forged(own_ca, f"spiffe://{PEER_TD}/ns/default/sa/sleep", td=TD, cluster="east"))


async def test_without_the_peers_bundle_nobody_from_the_peer_gets_in(bed: Bed) -> None:
    peer_sleep = bed.client(bed.peer["east"], PEER_TD, "sleep")
    bed.cp.update(replace(bed.peered, peer_bundles=()), reason="peer bundle expired")
    try:
        async def refused() -> bool:
            return await _refused(bed, peer_sleep)

        await wait_until(refused, within=30, what="the peer's caller refused once its bundle is gone")
        assert (await bed.call(bed.client(bed.own["east"], TD, "sleep")))[0] == 200
    finally:
        bed.cp.update(bed.peered, reason="peer bundle back")


async def test_the_peered_rootca_keeps_our_roots_for_single_domain_readers(bed: Bed) -> None:
    """The rotation check and the proxyless gRPC agent read ``trusted_ca``: it stays our roots, the peer's only in
    the SPIFFE validator's entry of its own trust domain."""
    from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe_pb2

    from gateway.generators import sds

    proxy = bed.envoy.proxy
    secret = sds.generate(proxy, None, bed.peered)[bed.peered.root_secret]
    assert secret.validation_context.trusted_ca.inline_string == bed.own_root
    config = spiffe_pb2.SPIFFECertValidatorConfig()
    secret.validation_context.custom_validator_config.typed_config.Unpack(config)
    assert [(t.name, t.trust_bundle.inline_string) for t in config.trust_domains] == [
        (TD, bed.own_root), (PEER_TD, bed.peer_root)]
    plain = sds.generate(proxy, None, replace(bed.peered, peer_bundles=()))[bed.peered.root_secret]
    assert not plain.validation_context.HasField("custom_validator_config")
