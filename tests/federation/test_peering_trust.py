"""The peer manager and the peering listener in-process, against real TLS servers on loopback: refresh at the hint,
hostile bundle bodies refused with the field named (last good kept), an endpoint whose certificate chains to a root
the peer never had refused and logged, https_web with a CA file, and the service exchange's authentication (401 /
403, never 500; a certificate is checked against its own trust domain's bundle only)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from discovery.clusterset import BundleProfile, PeerDecl, peers_file_text
from discovery.model import ClusterId, Endpoint, Service, ServiceExport, ServiceKey, ServicePort
from federation.peering.hub import PeerHub
from federation.peering.service import SERVICES_PATH, PeeringConfig, PeerManager, run_peering
from federation.service import ServiceConfig, create_app, serve, state_of
from federation.service.credentials import ServingCredentials
from federation.store.memory import MemoryStore
from federation.trust.bundle import TrustBundle
from federation.trust.ca import create_root, issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.tls import load_identity
from tests.federation.fedkit import Pki, agent, eventually
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(120)

A, B, C = TrustDomain("a.test"), TrustDomain("b.test"), TrustDomain("c.test")


@dataclass
class Endpoint_:
    """A bundle endpoint server we control: its certificate and its answer can change while it runs."""

    context: ssl.SSLContext
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/bundle.json"


def server_context(chain: bytes, key: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_identity(ctx, chain, key)
    return ctx


def svid_context(pki: Pki, identity: SpiffeId | None = None) -> ssl.SSLContext:
    key, chain = issue_workload(pki.federation, identity or SpiffeId.federation(pki.bundle.trust_domain),
                                ttl=timedelta(hours=1))
    return server_context(b"".join(chain), key)


@contextlib.asynccontextmanager
async def endpoint_server(ep: Endpoint_) -> AsyncIterator[Endpoint_]:
    async def handler(request: web.Request) -> web.Response:
        ep.requests += 1
        return web.Response(body=ep.body, status=ep.status, headers=ep.headers, content_type="application/json")

    app = web.Application()
    app.router.add_get("/bundle.json", handler)
    outer = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_identity(outer, *_any_identity())

    def select(obj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        obj.context = ep.context

    outer.sni_callback = select
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ep.port, ssl_context=outer).start()
    try:
        yield ep
    finally:
        await runner.cleanup()


_ANY: list[tuple[bytes, bytes]] = []


def _any_identity() -> tuple[bytes, bytes]:
    if not _ANY:
        pki = Pki.create(TrustDomain("placeholder.test"))
        key, chain = issue_workload(pki.federation, SpiffeId.federation(pki.bundle.trust_domain))
        _ANY.append((b"".join(chain), key))
    return _ANY[0]


@contextlib.asynccontextmanager
async def manager_for(tmp: Path, own: Pki, peers: list[PeerDecl], *, state: Any = None,
                      max_age: timedelta = timedelta(hours=24), run: bool = True) -> AsyncIterator[PeerManager]:
    """A peer manager of ``own``'s federation with ``peers`` declared; its loop runs unless ``run`` is False (then
    ``run_peering`` runs it, with the listener)."""
    fed_dir = own.write_federation_dir(tmp / "own-ca")
    creds = ServingCredentials(fed_dir)
    peers_file = tmp / "peers.yaml"
    peers_file.write_text(peers_file_text(peers))
    config = PeeringConfig(peers_file=peers_file, refresh_min_s=0.2, backoff_initial_s=0.05, tick_s=0.05,
                           reload_interval_s=0.2, services_interval_s=0.2, max_age=max_age)
    store = MemoryStore()
    from federation.service.state import CatalogState

    manager = PeerManager(config=config, identity=creds, state=state or CatalogState(store), hub=PeerHub())
    if not run:
        yield manager
        return
    task = asyncio.get_running_loop().create_task(manager.run())
    try:
        yield manager
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def write_bundle(path: Path, bundle: TrustBundle) -> Path:
    path.write_bytes(bundle.to_jwks_json())
    return path


def jwks(bundle: TrustBundle, **extra: Any) -> bytes:
    return json.dumps({**bundle.to_jwks(), **extra}).encode()


def second_root(pki: Pki) -> TrustBundle:
    return pki.bundle.with_root(create_root(pki.bundle.trust_domain).cert)


async def test_refresh_at_hint_hostile_bodies_and_an_unknown_root_are_refused(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture
                                                                              ) -> None:
    caplog.set_level(logging.INFO, logger="meshfed.federation.peering")
    own, b = Pki.create(A), Pki.create(B)
    ep = Endpoint_(context=svid_context(b), body=jwks(b.bundle, spiffe_refresh_hint=1))
    decl = PeerDecl(name="b", trust_domain="b.test", bundle_endpoint=ep.url,
                    endpoint_spiffe_id=str(SpiffeId.federation(B)),
                    bootstrap_bundle=write_bundle(tmp_path / "b-bootstrap.json", b.bundle))
    async with endpoint_server(ep), manager_for(tmp_path, own, [decl]) as m:
        await eventually(lambda: "b" in m.peers and m.peers["b"].fetched(), what="first fetch")
        peer = m.peers["b"]
        assert peer.held is not None and peer.held.bundle.sequence == 1
        assert peer.next_bundle - peer.held.fetched_at == timedelta(seconds=1)  # the hint, within the clamps
        await eventually(lambda: m.hub.snapshot.bundles.get("b.test") is not None, what="published")

        # A new bundle (a root added: sequence 2) is taken at the next refresh.
        rotated = second_root(b)
        ep.body = jwks(rotated, spiffe_refresh_hint=1)
        await eventually(lambda: peer.held is not None and peer.held.bundle.sequence == 2, what="refresh")
        assert peer.held.bundle.fingerprints == rotated.fingerprints
        await eventually(lambda: m.hub.snapshot.bundles["b.test"].sequence == 2, what="delivered")

        deep = b'{"keys":' + b"[" * 100 + b"]" * 100 + b"}"
        leaf = x509.load_pem_x509_certificate(issue_workload(b.federation, SpiffeId.workload(B, "d", "x"))[1][0])
        not_ca = {"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": []}]}
        from federation.trust.bundle import _jwk  # the JWK of a leaf: a valid key, but not a CA

        not_ca["keys"][0] = _jwk(leaf)
        hostile: list[tuple[bytes, int, str]] = [
            (b"{not json", 200, "body is not JSON"),
            (b'{"keys": 5}', 200, "keys: is required: a list of JWKs"),
            (b'{"keys": [{"use": "x509-svid", "x5c": ["!!!"]}]}', 200, "keys[0].x5c[0] is not a DER certificate"),
            (jwks(rotated, spiffe_sequence="7"), 200, "spiffe_sequence: must be an integer"),
            (jwks(rotated).replace(b'"spiffe_sequence": 2', b'"spiffe_sequence": 1e999'), 200,
             "spiffe_sequence: 1e999 is out of range"),
            (jwks(rotated, spiffe_refresh_hint=0), 200, "spiffe_refresh_hint: 0 is out of range"),
            (deep, 200, "nested more than 64 levels deep"),
            (json.dumps(not_ca).encode(), 200, "is not a CA"),
            (jwks(b.bundle, spiffe_refresh_hint=1), 200, "spiffe_sequence 1 is older than the trusted bundle's 2"),
            (b" " * (1024 * 1024 + 10), 200, "larger than 1048576 bytes"),
            (b"", 302, "redirects are not followed"),
            (b"", 404, "HTTP 404"),
        ]
        for body, status, message in hostile:
            before = peer.refusals
            ep.body, ep.status = body, status
            ep.headers = {"Location": "https://elsewhere.test/"} if status == 302 else {}
            await eventually(lambda before=before: peer.refusals > before, what=f"refusal: {message}")  # type: ignore[misc]
            assert message in peer.error and peer.error_kind == "refused", (message, peer.error)
            assert peer.held.bundle.sequence == 2 and peer.held.bundle.fingerprints == rotated.fingerprints
            assert m.hub.snapshot.bundles["b.test"].sequence == 2  # members keep the last good bundle
        row = next(r for r in m.status() if r["name"] == "b")
        assert row["error_kind"] == "refused" and row["bundle_sequence"] == 2 and row["refusals"] >= len(hostile)

        # An endpoint whose certificate chains to a root b never had (same SPIFFE ID): refused and logged.
        impostor = Pki.create(B)
        ep.context, ep.status, ep.headers = svid_context(impostor), 200, {}
        ep.body = jwks(impostor.bundle, spiffe_sequence=9, spiffe_refresh_hint=1)
        before = peer.refusals
        await eventually(lambda: peer.refusals > before, what="impostor refused")
        assert "does not verify against the bundle trusted for b.test" in peer.error
        assert peer.held.bundle.fingerprints == rotated.fingerprints
        assert any("event=peer_bundle_refused peer=b" in r.getMessage() and "does not verify" in r.getMessage()
                   for r in caplog.records)
        # The right root but another SPIFFE ID than the configured endpoint's: refused.
        ep.context = svid_context(b, SpiffeId.workload(B, "default", "web"))
        before = peer.refusals
        await eventually(lambda: peer.refusals > before, what="wrong SPIFFE ID refused")
        assert "presented spiffe://b.test/ns/default/sa/web, not the configured" in peer.error
        # The genuine endpoint again: accepted (it is authenticated with the last good bundle, sequence 2).
        ep.context, ep.body = svid_context(b), jwks(rotated, spiffe_sequence=3, spiffe_refresh_hint=1)
        await eventually(lambda: peer.held is not None and peer.held.bundle.sequence == 3, what="recovered")
        assert peer.error == "" and peer.error_kind == ""
    # Unreachable: the server is gone; the bundle is kept and its age reported.
    async with manager_for(tmp_path / "again", own, [decl]) as m2:
        await eventually(lambda: "b" in m2.peers and m2.peers["b"].error_kind == "unreachable", what="unreachable")
        assert m2.peers["b"].held is not None and m2.peers["b"].held.source == "bootstrap"
        assert m2.hub.snapshot.bundles == {}  # a bootstrap bundle is never delivered: only fetched ones


async def test_https_web_profile_uses_web_pki_with_a_ca_file(tmp_path: Path) -> None:
    own, b = Pki.create(A), Pki.create(B)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test web CA")])
    now = datetime.now(UTC)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
          .not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    from cryptography.hazmat.primitives import serialization

    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bundles")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ctx = server_context(leaf.public_bytes(pem), key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                   serialization.NoEncryption()))
    (tmp_path / "web-ca.pem").write_bytes(ca.public_bytes(pem))
    ep = Endpoint_(context=ctx, body=jwks(b.bundle, spiffe_refresh_hint=1))
    good = PeerDecl(name="b", trust_domain="b.test", bundle_endpoint=ep.url, profile=BundleProfile.HTTPS_WEB,
                    ca_file=tmp_path / "web-ca.pem")
    system = PeerDecl(name="c", trust_domain="c.test", bundle_endpoint=ep.url, profile=BundleProfile.HTTPS_WEB)
    async with endpoint_server(ep), manager_for(tmp_path, own, [good, system]) as m:
        await eventually(lambda: "b" in m.peers and m.peers["b"].fetched(), what="https_web fetch")
        assert m.peers["b"].held is not None and m.peers["b"].held.bundle.fingerprints == b.bundle.fingerprints
        await eventually(lambda: "c" in m.peers and m.peers["c"].refusals > 0, what="system store refuses it")
        assert "does not verify" in m.peers["c"].error and not m.peers["c"].fetched()


def _rogue_intermediate(signer: Pki, claimed: SpiffeId) -> tuple[bytes, bytes]:
    """A leaf + intermediate claiming ``claimed`` (another trust domain's federation identity), signed by
    ``signer``'s root: it passes a TLS layer that trusts ``signer``'s root, and must fail per trust domain."""
    now = datetime.now(UTC)
    inter_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    inter_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue intermediate")])
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(claimed))])
    inter = (x509.CertificateBuilder().subject_name(inter_name).issuer_name(signer.root.cert.subject)
             .public_key(inter_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(san, critical=False)
             .sign(signer.root.key, hashes.SHA256()))  # type: ignore[arg-type]
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(inter_name)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=True)
            .sign(inter_key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    pem = serialization.Encoding.PEM
    return (leaf.public_bytes(pem) + inter.public_bytes(pem),
            leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _client(chain_key: tuple[bytes, bytes] | None, server_bundle: TrustBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=server_bundle.to_pem().decode())
    if chain_key is not None:
        load_identity(ctx, *chain_key)
    return ctx


def _fed_identity(pki: Pki, identity: SpiffeId | None = None) -> tuple[bytes, bytes]:
    issuer = pki.federation if identity is None or identity.is_federation else pki.cluster_ca("east")
    key, chain = issue_workload(issuer, identity or SpiffeId.federation(pki.bundle.trust_domain))
    return b"".join(chain), key


async def test_exchange_serves_only_what_was_exported_to_the_calling_peer(tmp_path: Path) -> None:
    own, b, c, d = Pki.create(A), Pki.create(B), Pki.create(C), Pki.create(TrustDomain("d.test"))
    decls = [PeerDecl(name=n, trust_domain=p.bundle.trust_domain.name, bundle_endpoint="https://127.0.0.1:1/",
                      endpoint_spiffe_id=str(SpiffeId.federation(p.bundle.trust_domain)),
                      bootstrap_bundle=write_bundle(tmp_path / f"{n}.json", p.bundle)) for n, p in (("b", b), ("c", c))]
    store = MemoryStore()
    app = create_app(store=store, bundle=lambda: own.bundle, config=ServiceConfig(lease_ttl_s=5,
                                                                                 bookmark_interval_s=0.5))
    port, peering_port = free_port(), free_port()
    async with serve(app, host="127.0.0.1", port=port, ssl_context=own.server_ssl(), shutdown_timeout=0.5), \
            manager_for(tmp_path, own, decls, state=state_of(app), run=False) as m, \
            agent(own, "east", f"https://127.0.0.1:{port}") as east, \
            run_peering(m, listens=[("127.0.0.1", peering_port)]):
        created = datetime(2026, 1, 1, tzinfo=UTC)
        services, exports = [], []
        for name, peers in (("reviews", ("b",)), ("ratings", ("c",)), ("both", ("b", "c")), ("inside", ())):
            key = ServiceKey.parse(f"{name}.default")
            services.append(Service(cluster=ClusterId("east"), key=key, ports=(ServicePort(port=80, name="http"),),
                                    endpoints=(Endpoint(address="10.0.0.1"),)))
            exports.append(ServiceExport(cluster=ClusterId("east"), key=key, created=created, peers=peers))
        await east.wait_published(east.publish(services, exports))
        url = f"https://127.0.0.1:{peering_port}{SERVICES_PATH}"

        async def get(ctx: ssl.SSLContext) -> tuple[int, Any]:
            async with aiohttp.ClientSession() as http, http.get(url, ssl=ctx) as resp:
                return resp.status, await resp.json(content_type=None)

        await eventually(lambda: len(state_of(app).exports()) == 1, what="exports in the catalog state")
        status, body = await get(_client(_fed_identity(b), own.bundle))
        assert status == 200 and body["trustDomain"] == "a.test"
        assert sorted(s["name"] for s in body["services"]) == ["both", "reviews"]
        [shard] = body["services"][0]["endpoints"]
        assert shard["gateway"] == {"host": "127.0.0.1", "port": 15443} and shard["endpoints"] == []
        status, body = await get(_client(_fed_identity(c), own.bundle))
        assert status == 200 and sorted(s["name"] for s in body["services"]) == ["both", "ratings"]
        refusals: list[tuple[str, ssl.SSLContext, int, str]] = [
            ("no certificate", _client(None, own.bundle), 401, "client certificate of a peer's federation"),
            ("a workload of b", _client(_fed_identity(b, SpiffeId.workload(B, "default", "sleep")), own.bundle),
             403, "only peer b's federation service"),
            ("b's identity under c's root", _client(_rogue_intermediate(c, SpiffeId.federation(B)), own.bundle),
             401, "does not verify against the bundle of b.test"),
        ]
        for what, ctx, want, message in refusals:
            status, body = await get(ctx)
            assert status == want and message in body["error"], (what, status, body)
        # A trust domain that is no peer at all: its root is unknown to the listener, the handshake fails.
        with pytest.raises(aiohttp.ClientError):
            await get(_client(_fed_identity(d), own.bundle))
        # The bundle endpoint needs no client certificate.
        async with aiohttp.ClientSession() as http, http.get(f"https://127.0.0.1:{peering_port}/",
                                                             ssl=_client(None, own.bundle)) as resp:
            assert resp.status == 200 and (await resp.json())["spiffe_refresh_hint"] == 300
        # The member watch streams peers lines only to a client that asks for them (an older agent would take an
        # unknown line type for a broken stream).
        for query, want in (("", set()), ("&peers=1", {"peers"})):
            watch = f"https://127.0.0.1:{port}/v1/catalog/watch?revision={state_of(app).revision}{query}"
            async with aiohttp.ClientSession() as http, http.get(watch, ssl=own.client_ssl("east")) as resp:
                first = json.loads(await resp.content.readline())
                second = json.loads(await resp.content.readline()) if first["type"] == "peers" else first
            assert {first["type"]} - {"bookmark"} == want and second["type"] == "bookmark", (query, first)
        exported = next(r for r in m.status() if r["name"] == "b")["services_exported"]
        assert list(exported) == ["both.default", "reviews.default"]





def test_a_hostile_exchange_answer_is_refused_naming_the_field() -> None:
    """What a peer's exchange answers is decoded strictly enough to name what is wrong (the pull keeps the last
    good services, see PeerManager.pull_services); pod addresses are dropped even if a peer sends them."""
    from federation.peering.records import ExchangeRefused
    from federation.peering.service import decode_offers

    decl = PeerDecl(name="b", trust_domain="b.test", bundle_endpoint="https://127.0.0.1:1/",
                    endpoint_spiffe_id="spiffe://b.test/meshfed/federation", bootstrap_bundle=Path("/dev/null"))
    good = {"namespace": "default", "name": "reviews", "ports": [{"port": 9080}],
            "endpoints": [{"cluster": "east", "network": "n", "gateway": {"host": "127.0.0.1", "port": 15443},
                           "localities": [], "endpoints": [{"address": "10.0.0.9"}]}]}
    [svc] = decode_offers({"trustDomain": "b.test", "services": [good]}, decl)
    assert (svc.peer, svc.trust_domain, svc.endpoints[0].endpoints) == ("b", "b.test", ())
    hostile: list[tuple[Any, str]] = [
        ([], "the exchange answer is not a JSON object"),
        ({"trustDomain": "a.test", "services": []}, "trustDomain: the exchange answer is for trust domain 'a.test'"),
        ({"trustDomain": "b.test", "services": {}}, "services: must be a list"),
        ({"trustDomain": "b.test", "services": [dict(good, name="Bad_Name")]}, "services[0].name:"),
        ({"trustDomain": "b.test", "services": [dict(good, ports=[{"port": 70000}])]}, "services[0].ports[0].port"),
        ({"trustDomain": "b.test", "services": [dict(good, endpoints=[{"cluster": 5}])]},
         "services[0].endpoints[0].cluster"),
        ({"trustDomain": "b.test", "services": [good] * 10_001}, "more than 10000"),
    ]
    for body, message in hostile:
        with pytest.raises(ExchangeRefused) as caught:
            decode_offers(body, decl)
        assert message in str(caught.value), (message, str(caught.value))


async def test_the_last_good_bundle_is_delivered_until_it_expires(tmp_path: Path) -> None:
    own, b = Pki.create(A), Pki.create(B)
    ep = Endpoint_(context=svid_context(b), body=jwks(b.bundle, spiffe_refresh_hint=1))
    decl = PeerDecl(name="b", trust_domain="b.test", bundle_endpoint=ep.url,
                    endpoint_spiffe_id=str(SpiffeId.federation(B)),
                    bootstrap_bundle=write_bundle(tmp_path / "b-bootstrap.json", b.bundle))
    async with manager_for(tmp_path, own, [decl], max_age=timedelta(seconds=3)) as m:
        async with endpoint_server(ep):
            await eventually(lambda: "b.test" in m.hub.snapshot.bundles, what="delivered")
            view = m.hub.snapshot.bundles["b.test"]
            assert view.expires_at == view.fetched_at + timedelta(seconds=3)  # max age before the root's notAfter
        # The endpoint is gone: the bundle is kept (and delivered) while unreachable, then expires.
        await eventually(lambda: m.peers["b"].error_kind == "unreachable", what="unreachable")
        await eventually(lambda: "b.test" not in m.hub.snapshot.bundles, what="expired: no longer delivered")
        row = next(r for r in m.status() if r["name"] == "b")
        assert row["expired"] is True and row["bundle_source"] == "fetched" and row["bundle_sequence"] == 1
        held = m.peers["b"].held
        assert held is not None and held.bundle.fingerprints == b.bundle.fingerprints  # still authenticates
        # The peer back: the next fetch (authenticated with the expired-but-kept bundle) delivers it again.
        async with endpoint_server(ep):
            await eventually(lambda: "b.test" in m.hub.snapshot.bundles, what="delivered again")
