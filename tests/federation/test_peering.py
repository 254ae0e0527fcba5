"""Peering between two federations with different roots and trust domains, as real processes on loopback: the SPIFFE
bundle endpoint, fetching and refreshing at the hint, delivery to a member's agent (bundles kept per trust domain,
services exported to the peer only), rotation on one side reaching the other through the endpoint, the peer down
(last good bundle kept, its age shown, survives a restart)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from discovery.model import ClusterId, Endpoint, Service, ServiceExport, ServiceKey, ServicePort
from federation.trust.bundle import fingerprint
from federation.trust.store import rotate_add_root
from tests.federation.fedkit import eventually
from tests.federation.peerkit import Side, fetch_endpoint

pytestmark = pytest.mark.timeout(180)


def _b64u_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def test_bundle_endpoint_serves_the_spiffe_bundle_and_new_roots_ahead_of_use(tmp_path: Path) -> None:
    a = Side("a", tmp_path, hint=7)
    a.start()
    try:
        status, headers, body = fetch_endpoint(a)  # no client certificate: the standard forbids requiring one
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        doc = json.loads(body.decode("utf-8"))
        assert set(doc) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
        assert doc["spiffe_refresh_hint"] == 7 and doc["spiffe_sequence"] == 1
        [key] = doc["keys"]
        assert key["use"] == "x509-svid" and key["kty"] == "EC" and key["crv"] == "P-256"
        cert = x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0]))
        assert fingerprint(cert) == a.bundle().fingerprints[0]
        nums = cert.public_key().public_numbers()
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert (_b64u_int(key["x"]), _b64u_int(key["y"])) == (nums.x, nums.y)  # type: ignore[attr-defined]
        # A root added for rotation is published before it signs anything.
        rotate_add_root(a.root_dir)
        new_root = a.bundle().fingerprints[1]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            doc = json.loads(fetch_endpoint(a)[2])
            if len(doc["keys"]) == 2:
                break
            time.sleep(0.2)
        assert doc["spiffe_sequence"] == 2
        served = [fingerprint(x509.load_der_x509_certificate(base64.b64decode(k["x5c"][0]))) for k in doc["keys"]]
        assert served == list(a.bundle().fingerprints) and new_root in served
    finally:
        a.stop()


def _exports(cluster: str, spec: dict[str, tuple[str, ...]]) -> tuple[list[Service], list[ServiceExport]]:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    services, exports = [], []
    for i, (name, peers) in enumerate(sorted(spec.items())):
        key = ServiceKey.parse(f"{name}.default")
        services.append(Service(cluster=ClusterId(cluster), key=key,
                                ports=(ServicePort(port=9080, name="http"),),
                                endpoints=(Endpoint(address=f"10.9.0.{i + 1}", zone="z1"),)))
        exports.append(ServiceExport(cluster=ClusterId(cluster), key=key, created=created, peers=peers))
    return services, exports


async def test_two_clustersets_peer_exchange_rotate_and_survive_the_peer_down(tmp_path: Path) -> None:
    a, b = Side("a", tmp_path), Side("b", tmp_path)
    a.declare(b.as_peer())
    b.declare(a.as_peer())
    a.start()
    b.start()
    try:
        async with a.client("east") as ac, b.client("east") as bc, \
                a.agent(ac, "east", gateway_port=18443) as a_east, b.agent(bc, "east") as b_east:
            a_east.publish(*_exports("east", {"reviews": ("b",), "internal": (), "other": ("c",)}))

            def b_has_reviews() -> bool:
                return any(s.key.name == "reviews" for s in b_east.peer_services)

            await eventually(lambda: "a.test" in b_east.peer_bundles and b_has_reviews(), within=30,
                             what="b's member gets a's bundle and the service a exported to b")
            view = b_east.peer_bundles["a.test"]
            assert view.peer == "a" and view.sequence == 1
            assert [fingerprint(c) for c in x509.load_pem_x509_certificates(view.roots_pem.encode())] == \
                list(a.bundle().fingerprints)
            assert "b.test" not in b_east.peer_bundles  # our own trust domain is not a peer bundle
            [svc] = b_east.peer_services  # only what a exported to b: not 'internal', not the one for 'c'
            assert (svc.peer, svc.trust_domain, svc.key.name) == ("a", "a.test", "reviews")
            assert [(p.port, str(p.protocol)) for p in svc.ports] == [(9080, "TCP")]
            [shard] = svc.endpoints
            assert (shard.cluster, shard.gateway_host, shard.gateway_port, shard.ready) == ("east", "127.0.0.1",
                                                                                         18443, 1)
            assert shard.endpoints == ()  # no pod address crosses a peering
            await eventually(lambda: "b.test" in a_east.peer_bundles, within=30, what="a gets b's bundle too")
            assert a_east.peer_services == ()  # b exported nothing to a

            row = await asyncio.to_thread(b.peer_status, "a")
            assert row["bundle_source"] == "fetched" and row["bundle_sequence"] == 1 and row["error"] == ""
            assert row["services_imported"] == ["reviews.default"]
            row_a = await asyncio.to_thread(a.peer_status, "b")
            assert row_a["services_exported"] == ["reviews.default"]

            # Rotation on a reaches b's member through the bundle endpoint.
            started = time.monotonic()
            await asyncio.to_thread(rotate_add_root, a.root_dir)
            want = a.bundle().fingerprints
            await eventually(lambda: b_east.peer_bundles["a.test"].sequence == 2, within=30,
                             what="a's new root reaches b's member")
            print(f"rotation: add-root on a -> b's member holds the new bundle in "
                  f"{time.monotonic() - started:.2f}s")
            got = [fingerprint(c) for c in
                   x509.load_pem_x509_certificates(b_east.peer_bundles["a.test"].roots_pem.encode())]
            assert got == list(want)
            # b tells a, on its exchange calls, which of a's roots it holds: `meshfed ca rotate reissue` waits on it.
            await eventually(lambda: _holds(a, "b") == [f[:16] for f in want], within=30,
                             what="a's trust status says b holds a's new root")

            # a down: b keeps the last good bundle and the services; status shows the error and the age.
            a.stop()
            await eventually(lambda: _status_error(b), within=30, what="b notices a is unreachable")
            row = await asyncio.to_thread(b.peer_status, "a")
            assert row["error_kind"] == "unreachable" and row["bundle_sequence"] == 2
            assert row["bundle_age_s"] is not None and row["bundle_age_s"] >= 0
            assert b_east.peer_bundles["a.test"].sequence == 2 and b_has_reviews()
            assert "event=peer_bundle_unreachable peer=a" in b.output()
        # b restarts while a is still down: the bundle it trusted survives (stored), and is still delivered.
        b.stop()
        b.start()
        row = await asyncio.to_thread(b.peer_status, "a")
        assert row["bundle_source"] == "fetched" and row["bundle_sequence"] == 2
        state = b.dir / "federation" / "peer-state" / "a.test"
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        assert oct((state / "bundle.json").stat().st_mode & 0o777) == "0o600"
        async with b.client("east") as bc2, b.agent(bc2, "east") as b_east2:
            await eventually(lambda: "a.test" in b_east2.peer_bundles and bool(b_east2.peer_services), within=30,
                             what="after b's restart its member still gets a's last good bundle and services")
    finally:
        a.stop()
        b.stop()


def _holds(side: Side, peer: str) -> list[str]:
    rows = side.member_get("/v1/trust/status")["peers"]
    return list(next(r for r in rows if r["name"] == peer)["peer_holds_roots"])


def _status_error(side: Side) -> bool:
    try:
        return bool(side.peer_status("a")["error"])
    except OSError:
        return False
