"""SDS glue: workload certificates for authenticated identities (checked by openssl and the spiffe package),
rotation at a fraction of their lifetime, and the rotated secret reaching an xDS client over ADS."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from spiffe import X509Svid

from federation.trust import SpiffeId, TrustBundle, TrustDomain, create_intermediate, create_root
from gateway.ads import AdsServer
from gateway.auth import ProxyIdentity, TokenTableAuthenticator, make_node_id
from gateway.cache import SnapshotCache
from gateway.generators.sds import bundle_secret, certificate_secret
from gateway.push import PushDebouncer, PushRequest
from gateway.sds import CERT_SECRET, ROOT_SECRET, WorkloadCertIssuer, bundle_pem, identities_of
from gateway.snapshot import SECRET, Snapshot
from tests.gateway.xds_client import SotwClient

TD = TrustDomain.parse("meshfed.test")
WEB = ProxyIdentity(namespace="shop", service_account="web", cluster="east")


@pytest.fixture(scope="module")
def pki() -> tuple[object, object]:
    root = create_root(TD)
    return root, create_intermediate(root, SpiffeId.cluster(TD, "east"))


def test_issues_exactly_the_identity_and_verifies(pki, tmp_path: Path) -> None:
    root, ca = pki
    issuer = WorkloadCertIssuer(ca=ca, ttl=timedelta(hours=1))  # type: ignore[arg-type]
    cert = issuer.ensure(WEB)
    assert issuer.ensure(WEB) is cert  # kept, not re-issued
    svid = X509Svid.parse(cert.chain_pem.encode(), cert.key_pem.encode())
    assert str(svid.spiffe_id) == "spiffe://meshfed.test/ns/shop/sa/web"
    assert issuer.spiffe_id(WEB) in issuer.certs()
    pems = cert.chain_pem.split("-----END CERTIFICATE-----")
    (tmp_path / "leaf.pem").write_text(pems[0] + "-----END CERTIFICATE-----\n")
    (tmp_path / "inter.pem").write_text(pems[1].lstrip() + "-----END CERTIFICATE-----\n")
    bundle = TrustBundle(trust_domain=TD, roots=(root.cert,))  # type: ignore[attr-defined]
    (tmp_path / "root.pem").write_text(bundle_pem(bundle))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                           str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rotation_at_fraction_of_lifetime(pki) -> None:
    _, ca = pki
    t0 = datetime.now(UTC)
    clock = [t0]
    issuer = WorkloadCertIssuer(ca=ca, ttl=timedelta(hours=10), rotate_fraction=0.8,  # type: ignore[arg-type]
                                clock=lambda: clock[0])
    first = issuer.ensure(WEB)
    issued = issuer.issued(WEB)
    assert issued is not None  # X.509 times have whole seconds: the 80% point is within a second of 8 h
    assert abs(issued.rotate_at - (t0 + timedelta(hours=8))) < timedelta(seconds=1)
    assert issuer.rotate_due(t0 + timedelta(hours=7, minutes=59)) == frozenset()
    assert issuer.rotate_due(t0 + timedelta(hours=8, seconds=1)) == {WEB}
    second = issuer.certs()[issuer.spiffe_id(WEB)]
    assert second != first
    leaf = x509.load_pem_x509_certificate(second.chain_pem.encode())
    assert leaf.not_valid_after_utc > x509.load_pem_x509_certificate(first.chain_pem.encode()).not_valid_after_utc
    clock[0] = t0 + timedelta(hours=30)  # ensure() past the rotation point re-issues too
    assert issuer.ensure(WEB) != second


async def test_rotated_secret_is_pushed_over_ads(pki) -> None:
    root, ca = pki
    node = make_node_id(kind="sidecar", ip="127.0.0.1", pod="web-1", namespace="shop")
    cache = SnapshotCache()
    auth = TokenTableAuthenticator()
    token = auth.issue(WEB)
    bundle = bundle_pem(TrustBundle(trust_domain=TD, roots=(root.cert,)))  # type: ignore[attr-defined]

    async def regenerate(req: PushRequest) -> None:
        for n in req.proxies:
            identity = cache.identity(n)  # the authenticated identity, never what the node claims
            if identity is not None:
                cert = issuer.ensure(identity)
                cache.set_snapshot(n, Snapshot.build({SECRET: [certificate_secret(CERT_SECRET, cert),
                                                               bundle_secret(ROOT_SECRET, bundle)]}))

    async with PushDebouncer(regenerate=regenerate, quiet=0.01, max_delay=0.1) as pushes:
        def rotated(identities: frozenset[ProxyIdentity]) -> None:
            pushes.submit(PushRequest(proxies=identities_of(cache.connected(), cache.identity, identities),
                                      reasons=frozenset({"cert-rotation"})))

        # 3 s certificates rotated at half their life: the test sees a rotation after about 1.5 s
        issuer = WorkloadCertIssuer(ca=ca, ttl=timedelta(seconds=3), rotate_fraction=0.5,  # type: ignore[arg-type]
                                    on_rotate=rotated)
        cache.on_connect(lambda n: pushes.submit(PushRequest(proxies=frozenset({n}), reasons=frozenset({"connect"}))))
        async with issuer, AdsServer(cache=cache, authenticator=auth) as srv, \
                grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            client = SotwClient(channel, node, token)
            await client.request(SECRET, [CERT_SECRET, ROOT_SECRET])
            r1 = await client.recv()
            got1 = {s.name: s for s in (secret_pb2.Secret.FromString(a.value) for a in r1.resources)}
            assert set(got1) == {CERT_SECRET, ROOT_SECRET}
            await client.ack(r1, [CERT_SECRET, ROOT_SECRET])
            r2 = await client.recv()  # pushed by the rotation timer
            got2 = {s.name: s for s in (secret_pb2.Secret.FromString(a.value) for a in r2.resources)}
            chain1 = got1[CERT_SECRET].tls_certificate.certificate_chain.inline_string
            chain2 = got2[CERT_SECRET].tls_certificate.certificate_chain.inline_string
            assert chain1 != chain2
            key2 = got2[CERT_SECRET].tls_certificate.private_key.inline_string
            assert str(X509Svid.parse(chain2.encode(), key2.encode()).spiffe_id) == "spiffe://meshfed.test/ns/shop/sa/web"
            assert issuer.rotations >= 1
            await client.close()
        await asyncio.sleep(0)
