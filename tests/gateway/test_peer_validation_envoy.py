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
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.trust.ca import IntermediateCA, issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from gateway.context import InboundPort, PushContext, WorkloadCert
from tests.gateway.envoy_fixtures import ControlPlane, EnvoyProc, start_envoy, wait_ready, wait_until
from tests.gateway.mesh_fixtures import RATINGS, TD, WEST, Mesh, authorization_policies, cluster_cas
from tests.support.procs import free_port
from tests.support.workloads import serve_app

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
        key, chain = issue_workload(ca, SpiffeId.workload(TrustDomain(td), "default", sa), ttl=timedelta(hours=1))
        return self._context(f"{td}-{sa}", b"".join(chain), key)

    def forged(self, ca: IntermediateCA, spiffe: str, *, td: str, cluster: str) -> ssl.SSLContext:
        """A leaf with SAN ``spiffe`` signed by ``ca`` whatever trust domain ``ca`` belongs to (an attacker holding
        one trust domain's CA key, claiming an identity of the other); its Subject is the one ``ca``'s name
        constraint permits (``O=td, OU=cluster``), so only the SPIFFE ID's trust domain is wrong."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        ca_key = ca.key
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, td),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
                .sign(ca_key, hashes.SHA256()))
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return self._context("forged-" + spiffe.rsplit("/", 1)[-1] + str(id(ca)),
                             cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem, pem)

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
    ports = {n: free_port() for n in ("in", "app")}
    mesh = Mesh(east_gateway_port=free_port(), west_gateway_port=free_port())
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.1", ports["in"])]
    peered = PushContext(registry=mesh.registry(WEST), trust_domain=TD, trust_bundle_pem=own_root,
                         peer_bundles=((PEER_TD, peer_root),),
                         workload_certs={f"spiffe://{TD}/ns/default/sa/ratings": WorkloadCert(
                             key_pem=ratings_key.decode(), chain_pem=b"".join(ratings_chain).decode())},
                         authz=authorization_policies(POLICY, WEST))

    async def caller(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("x-forwarded-client-cert", ""))

    runner = await serve_app(ports["app"], caller)
    envoy: EnvoyProc | None = None
    try:
        async with ControlPlane(ctx=peered) as cp:
            proxy = mesh.sidecar(WEST, "ratings", pod="ratings-1", services=(RATINGS,),
                                 inbound=(InboundPort(ports["in"], ports["app"]),), outbound_port=free_port())
            envoy = start_envoy(tmp, cp, proxy)
            await wait_ready(envoy)
            yield Bed(cp=cp, envoy=envoy, url=f"https://127.0.0.1:{ports['in']}/", tmp=tmp, own=own, peer=peer,
                      own_root=own_root, peer_root=peer_root, peered=peered)
    finally:
        if envoy is not None:
            envoy.stop()
        await runner.cleanup()
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
