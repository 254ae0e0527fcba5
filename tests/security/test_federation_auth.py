"""Only a member cluster's control plane, acting for itself, may call the federation service.

Every route of the real service (``federation.service.app.ROUTES``, so a new route is covered the day it is added)
is called over real mutual TLS with each credential an attacker could hold: no client certificate; a certificate
under a foreign root (same trust domain name, another key); a workload certificate under a member's own
intermediate (what any sidecar holds after SDS); the federation service's own certificate; a cluster identity
minted by another cluster's intermediate; and a member's genuine certificate acting for another member. Each is
refused, with 401 or 403 naming why (or at the TLS handshake), and nothing reaches the store.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation import wire
from federation.agent import export_set
from federation.service.app import PUBLIC, ROUTES
from federation.store.memory import MemoryStore
from federation.trust.ca import cluster_subject, issue_workload, private_key_pem
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.tls import client_ssl_context
from tests.federation.fedkit import TD, Pki, in_process, info, snapshot

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


@pytest.fixture
async def service(pki: Pki) -> AsyncIterator[tuple[str, MemoryStore]]:
    store = MemoryStore(reap_interval_s=0.2)
    try:
        async with in_process(pki, store) as (url, _app):
            async with pki.client("east", url) as east:  # east is a registered member with one export
                await east.register(info("east"))
                services, exports = snapshot("east", ["reviews"])
                await east.publish(export_set(info("east"), services, exports, generation=1))
            yield url, store
    finally:
        await store.close()


def _body(path: str, cluster: str) -> Any:
    if path.endswith("/exports"):
        services, exports = snapshot(cluster, ["ratings"])
        return wire.export_set_json(export_set(info(cluster), services, exports, generation=7))
    if path == "/v1/clusters/{cluster}":
        return wire.registration_json(info(cluster))
    return None


def _calls(cluster: str) -> list[tuple[str, str, Any]]:
    """Every route, the ``{cluster}`` ones acting for ``cluster``."""
    return [(method, path.replace("{cluster}", cluster), _body(path, cluster)) for method, path, _ in ROUTES]


async def _call(url: str, ctx: ssl.SSLContext, method: str, path: str, body: Any) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.request(
            method, url + path, data=None if body is None else json.dumps(body),
            headers={"Content-Type": "application/json"}, ssl=ctx) as resp:
        if resp.content_type == "application/x-ndjson":  # a watch that was let in: read no further
            return resp.status, None
        text = await resp.read()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text.decode(errors="replace")


async def _unchanged(store: MemoryStore) -> None:
    snap = await store.snapshot()
    assert [str(m.info.id) for m in snap.members] == ["east"]
    assert [(str(e.cluster), sorted(str(s.key) for s in e.services)) for e in snap.exports] == \
        [("east", ["reviews.default"])]


def _bare_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pki.bundle.to_pem().decode())
    ctx.check_hostname = False
    return ctx


async def test_no_client_certificate_is_refused_at_the_handshake(pki: Pki, service: tuple[str, MemoryStore]) -> None:
    url, store = service
    for method, path, body in _calls("east"):
        with pytest.raises(aiohttp.ClientError):
            await _call(url, _bare_context(pki), method, path, body)
    await _unchanged(store)


async def test_a_foreign_root_is_refused_at_the_handshake(service: tuple[str, MemoryStore]) -> None:
    url, store = service
    foreign = Pki.create(TrustDomain(TD.name))  # the same trust domain name, another root key
    ctx = foreign.client_ssl("east")
    ctx.load_verify_locations(cadata=Pki.create().bundle.to_pem().decode())
    for method, path, body in _calls("east"):
        with pytest.raises(aiohttp.ClientError):
            await _call(url, ctx, method, path, body)
    await _unchanged(store)


def _not_a_cluster(pki: Pki) -> dict[str, ssl.SSLContext]:
    key, chain = issue_workload(pki.federation, SpiffeId.federation(TD), ttl=timedelta(hours=1))
    return {
        # what every sidecar of east holds after SDS: right root, east's own intermediate
        "workload certificate": pki.client_ssl("east", identity=SpiffeId.workload(TD, "default", "sleep")),
        # the federation service's own identity is not a member
        "federation certificate": client_ssl_context(b"".join(chain), key, pki.bundle),
        # west's intermediate key minting east's cluster identity by hand (west's CA code refuses to)
        "east's identity under west's intermediate": _forged(pki, signer="west", claims="east"),
    }


def _forged(pki: Pki, *, signer: str, claims: str) -> ssl.SSLContext:
    """A leaf for ``claims``' cluster identity signed directly with ``signer``'s intermediate key, as a
    compromised control plane of ``signer`` could make it."""
    ca = pki.cluster_ca(signer)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = (x509.CertificateBuilder()
            .subject_name(cluster_subject(TD.name, signer))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(str(SpiffeId.cluster(TD, claims)))]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    chain = leaf.public_bytes(Encoding.PEM) + ca.cert.public_bytes(Encoding.PEM)
    return client_ssl_context(chain, private_key_pem(key), pki.bundle)


@pytest.mark.parametrize("credential", ["workload certificate", "federation certificate",
                                        "east's identity under west's intermediate"])
async def test_a_certificate_that_is_not_a_member_clusters_gets_401(
        pki: Pki, service: tuple[str, MemoryStore], credential: str) -> None:
    url, store = service
    ctx = _not_a_cluster(pki)[credential]
    for method, path, body in _calls("east"):
        status, payload = await _call(url, ctx, method, path, body)
        if path in PUBLIC:
            assert status == 200, (method, path, status)
            continue
        assert status == 401, (credential, method, path, status, payload)
        assert "does not identify a member cluster" in payload["error"], payload
    await _unchanged(store)


async def test_a_member_cannot_act_for_another_member(pki: Pki, service: tuple[str, MemoryStore]) -> None:
    url, store = service
    ctx = pki.client_ssl("west")  # a genuine member certificate: west's
    acting = [(m, p, b) for m, p, b in _calls("east") if p.startswith("/v1/clusters/")]
    assert {m for m, _, _ in acting} == {"PUT", "DELETE", "POST"}
    for method, path, body in acting:
        status, payload = await _call(url, ctx, method, path, body)
        assert status == 403, (method, path, status, payload)
        assert "west may not act for cluster east" in payload["error"] and payload["field"] == "cluster"
    # nor on its own path, with a body speaking for east
    body = _body("/v1/clusters/{cluster}/exports", "west")
    body["services"][0]["localities"][0]["cluster"] = "east"
    status, payload = await _call(url, ctx, "PUT", "/v1/clusters/west/exports", body)
    assert status == 403 and payload["field"] == "services[0].localities[0].cluster", payload
    await _unchanged(store)
    # the same certificate acting for itself is served (the refusals above are about whom, not what)
    status, payload = await _call(url, ctx, "PUT", "/v1/clusters/west", _body("/v1/clusters/{cluster}", "west"))
    assert status == 200, payload
