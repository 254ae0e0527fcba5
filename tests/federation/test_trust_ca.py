"""The pure CA: SPIFFE ID rules, root and intermediate shape, CSR signing and every rejection, bundles.

Issued chains are checked by independent code: ``openssl verify`` and the PyPI ``spiffe`` package."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe import TrustDomain as PyTrustDomain
from spiffe import X509Bundle, X509Svid

from federation.trust import (
    BadCSR,
    CANotReady,
    ForeignTrustDomain,
    IdentityMismatch,
    IntermediateCA,
    InvalidSpiffeId,
    InvalidTTL,
    RootCA,
    SpiffeId,
    TrustBundle,
    TrustDomain,
    TTLExceeded,
    create_intermediate,
    create_root,
    issue_workload,
    make_csr,
    sign_csr,
)
from federation.trust.ca import private_key_pem
from federation.trust.errors import BundleError

TD = TrustDomain("example.org")
REVIEWS = SpiffeId.workload(TD, "default", "reviews")


@pytest.fixture(scope="module")
def root() -> RootCA:
    return create_root(TD)


@pytest.fixture(scope="module")
def east(root: RootCA) -> IntermediateCA:
    return create_intermediate(root, SpiffeId.cluster(TD, "east"))


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def openssl_verify(tmp: Path, roots_pem: bytes, inter_pem: bytes, leaf_pem: bytes) -> subprocess.CompletedProcess[str]:
    (tmp / "root.pem").write_bytes(roots_pem)
    (tmp / "inter.pem").write_bytes(inter_pem)
    (tmp / "leaf.pem").write_bytes(leaf_pem)
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp / "root.pem"), "-untrusted", str(tmp / "inter.pem"),
         str(tmp / "leaf.pem")],
        capture_output=True, text=True, timeout=30, check=False,
    )


# -- SPIFFE IDs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://example.org/ns/default/sa/reviews",
        "spiffe://example.org",
        "spiffe://a_b.c-d.example/x/Y.z-_",
    ],
)
def test_valid_spiffe_ids_round_trip(text: str) -> None:
    assert str(SpiffeId.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "http://example.org/ns/a/sa/b",
        "SPIFFE://example.org/x",
        "spiffe://Example.org/x",
        "spiffe://example.org:8443/x",
        "spiffe://user@example.org/x",
        "spiffe:///x",
        "spiffe://example.org/",
        "spiffe://example.org//x",
        "spiffe://example.org/x/../y",
        "spiffe://example.org/./y",
        "spiffe://example.org/x?q=1",
        "spiffe://example.org/x#frag",
        "spiffe://example.org/x%20y",
        "spiffe://example.org/x y",
        "spiffe://example.org/" + "a" * 2100,
    ],
)
def test_invalid_spiffe_ids_are_rejected(text: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(text)


def test_constructors_and_views() -> None:
    wl = SpiffeId.workload(TD, "default", "reviews")
    assert str(wl) == "spiffe://example.org/ns/default/sa/reviews"
    assert (wl.namespace, wl.service_account, wl.cluster_name) == ("default", "reviews", None)
    cl = SpiffeId.cluster(TD, "east")
    assert str(cl) == "spiffe://example.org/meshfed/cluster/east"
    assert cl.cluster_name == "east" and cl.namespace is None and cl.is_meshfed
    assert SpiffeId.federation(TD).is_federation
    assert TrustDomain.parse("spiffe://example.org") == TD
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.cluster(TD, "East_1")
    with pytest.raises(InvalidSpiffeId):
        TrustDomain.parse("spiffe://example.org/path")


# -- root and intermediate --------------------------------------------------------------------------------------------


def _ext(cert: x509.Certificate, cls: type) -> object:
    return cert.extensions.get_extension_for_class(cls)


def test_root_and_intermediate_shape(root: RootCA, east: IntermediateCA) -> None:
    rc = root.cert
    assert isinstance(rc.public_key(), ec.EllipticCurvePublicKey)
    assert (rc.not_valid_after_utc - rc.not_valid_before_utc) >= timedelta(days=3650)
    ic = east.cert
    bc = ic.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ic.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    aki = ic.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = rc.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert ic.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    san = ic.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/meshfed/cluster/east"]
    assert timedelta(days=364) < ic.not_valid_after_utc - ic.not_valid_before_utc <= timedelta(days=366)
    ic.verify_directly_issued_by(rc)
    assert east.cluster == "east"


def test_rsa_root_signs_ec_intermediates() -> None:
    rroot = create_root(TD, key_type="rsa", days=30)
    pub = rroot.cert.public_key()
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 4096
    inter = create_intermediate(rroot, SpiffeId.cluster(TD, "west"), days=400)
    inter.cert.verify_directly_issued_by(rroot.cert)
    # never outlives its root
    assert inter.cert.not_valid_after_utc <= rroot.cert.not_valid_after_utc


# -- signing ----------------------------------------------------------------------------------------------------------


def test_signed_leaf_is_an_svid(
    tmp_path: Path, root: RootCA, east: IntermediateCA, key: ec.EllipticCurvePrivateKey
) -> None:
    now = datetime.now(UTC)
    chain = sign_csr(east, make_csr(key, REVIEWS), identity=REVIEWS, now=now)
    assert len(chain) == 2 and chain[1] == east.cert_pem
    leaf = x509.load_pem_x509_certificate(chain[0])
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(REVIEWS)] and len(san) == 1
    inter_ski = east.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == inter_ski
    # default lifetime 24 h (certificate times have whole seconds)
    assert abs((leaf.not_valid_after_utc - now) - timedelta(hours=24)) < timedelta(seconds=1)
    # independent check 1: openssl
    res = openssl_verify(tmp_path, root.cert_pem, chain[1], chain[0])
    assert res.returncode == 0, res.stdout + res.stderr
    # independent check 2: py-spiffe
    svid = X509Svid.parse(b"".join(chain), private_key_pem(key))
    assert str(svid.spiffe_id) == str(REVIEWS)
    assert len(svid.cert_chain) == 2
    # and the bundle as py-spiffe reads it
    bundle = X509Bundle.parse(PyTrustDomain("example.org"), root.cert_pem)
    assert len(bundle.x509_authorities) == 1


def test_issue_workload_for_own_cluster_identity(tmp_path: Path, root: RootCA, east: IntermediateCA) -> None:
    key_pem, chain = issue_workload(east, east.authority, ttl=timedelta(hours=1))
    svid = X509Svid.parse(b"".join(chain), key_pem)
    assert str(svid.spiffe_id) == "spiffe://example.org/meshfed/cluster/east"
    assert openssl_verify(tmp_path, root.cert_pem, chain[1], chain[0]).returncode == 0


def test_leaf_never_outlives_the_intermediate(root: RootCA, key: ec.EllipticCurvePrivateKey) -> None:
    now = datetime.now(UTC)
    older_root = create_root(TD, now=now - timedelta(days=1))
    short = create_intermediate(older_root, SpiffeId.cluster(TD, "short"), days=1, now=now - timedelta(hours=23))
    chain = sign_csr(short, make_csr(key, REVIEWS), identity=REVIEWS, now=now)
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.not_valid_after_utc == short.cert.not_valid_after_utc


def _forge(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def test_forged_csr_signature_is_refused(east: IntermediateCA, key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(BadCSR, match="signature"):
        sign_csr(east, _forge(make_csr(key, REVIEWS)), identity=REVIEWS)


def test_garbage_csr_is_refused(east: IntermediateCA) -> None:
    with pytest.raises(BadCSR, match="PEM"):
        sign_csr(east, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                 identity=REVIEWS)


def test_foreign_trust_domain_is_refused(east: IntermediateCA, key: ec.EllipticCurvePrivateKey) -> None:
    other = SpiffeId.workload(TrustDomain("evil.example"), "default", "reviews")
    with pytest.raises(ForeignTrustDomain):
        sign_csr(east, make_csr(key, other), identity=other)
    # the caller is of our domain, the CSR asks for a foreign one
    with pytest.raises(ForeignTrustDomain):
        sign_csr(east, make_csr(key, other), identity=REVIEWS)


def test_two_uri_sans_are_refused(east: IntermediateCA, key: ec.EllipticCurvePrivateKey) -> None:
    csr = make_csr(key, REVIEWS, extra_uris=["spiffe://example.org/ns/default/sa/admin"])
    with pytest.raises(BadCSR, match="2 URI SANs"):
        sign_csr(east, csr, identity=REVIEWS)


def test_identity_mismatch_is_refused(east: IntermediateCA, key: ec.EllipticCurvePrivateKey) -> None:
    admin = SpiffeId.workload(TD, "kube-system", "admin")
    with pytest.raises(IdentityMismatch, match="authenticated as"):
        sign_csr(east, make_csr(key, admin), identity=REVIEWS)


def test_another_clusters_identity_is_refused(east: IntermediateCA, key: ec.EllipticCurvePrivateKey) -> None:
    west = SpiffeId.cluster(TD, "west")
    with pytest.raises(IdentityMismatch, match="own authority"):
        sign_csr(east, make_csr(key, west), identity=west)
    fed = SpiffeId.federation(TD)
    with pytest.raises(IdentityMismatch):
        sign_csr(east, make_csr(key, fed), identity=fed)


def test_ttl_rules(east: IntermediateCA, key: ec.EllipticCurvePrivateKey) -> None:
    csr = make_csr(key, REVIEWS)
    with pytest.raises(TTLExceeded, match="cap"):
        sign_csr(east, csr, identity=REVIEWS, ttl=timedelta(days=30))
    with pytest.raises(InvalidTTL):
        sign_csr(east, csr, identity=REVIEWS, ttl=timedelta(0))
    tight = IntermediateCA(east.cert, east.key, chain=east.chain, max_ttl=timedelta(hours=1))
    with pytest.raises(TTLExceeded):
        sign_csr(tight, csr, identity=REVIEWS, ttl=timedelta(hours=2))
    # default TTL is cut to the cap, not refused
    leaf = x509.load_pem_x509_certificate(sign_csr(tight, csr, identity=REVIEWS)[0])
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(hours=1, minutes=1)


def test_expired_or_future_intermediate_is_not_ready(root: RootCA, key: ec.EllipticCurvePrivateKey) -> None:
    now = datetime.now(UTC)
    old_root = create_root(TD, now=now - timedelta(days=10))
    old = create_intermediate(old_root, SpiffeId.cluster(TD, "old"), days=1, now=now - timedelta(days=3))
    with pytest.raises(CANotReady, match="expired"):
        sign_csr(old, make_csr(key, REVIEWS), identity=REVIEWS, now=now)
    future = create_intermediate(root, SpiffeId.cluster(TD, "future"), now=now + timedelta(days=3))
    with pytest.raises(CANotReady, match="not valid before"):
        sign_csr(future, make_csr(key, REVIEWS), identity=REVIEWS, now=now)


def test_weak_or_odd_csr_keys_are_refused(east: IntermediateCA) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(BadCSR, match="2048"):
        sign_csr(east, make_csr(weak, REVIEWS), identity=REVIEWS)


def test_intermediate_key_must_match(root: RootCA, east: IntermediateCA) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CANotReady, match="does not match"):
        IntermediateCA(east.cert, other, chain=(root.cert,))
    with pytest.raises(CANotReady, match="not a CA"):
        leaf_key, chain = issue_workload(east, REVIEWS)
        IntermediateCA(x509.load_pem_x509_certificate(chain[0]),
                       serialization.load_pem_private_key(leaf_key, None))  # type: ignore[arg-type]


# -- bundles ----------------------------------------------------------------------------------------------------------


def test_bundle_pem_and_jwks_round_trip(root: RootCA) -> None:
    second = create_root(TD, key_type="rsa", days=30)
    bundle = TrustBundle(TD, (root.cert,)).with_root(second.cert)
    assert bundle.sequence == 2 and len(bundle.roots) == 2
    assert bundle.with_root(second.cert) is bundle  # idempotent
    doc = json.loads(bundle.to_jwks_json())
    assert doc["spiffe_sequence"] == 2 and doc["spiffe_refresh_hint"] > 0
    assert [k["use"] for k in doc["keys"]] == ["x509-svid", "x509-svid"]
    assert [k["kty"] for k in doc["keys"]] == ["EC", "RSA"]
    assert doc["keys"][0]["crv"] == "P-256"
    back = TrustBundle.from_jwks(TD, bundle.to_jwks_json())
    assert back.fingerprints == bundle.fingerprints and back.sequence == 2
    assert TrustBundle.from_pem(TD, bundle.to_pem()).fingerprints == bundle.fingerprints
    # py-spiffe reads the PEM form too
    assert len(X509Bundle.parse(PyTrustDomain("example.org"), bundle.to_pem()).x509_authorities) == 2
    smaller = bundle.without_root(bundle.fingerprints[0])
    assert smaller.fingerprints == bundle.fingerprints[1:] and smaller.sequence == 3


def test_bundle_rejects_tampered_jwks(root: RootCA) -> None:
    doc = TrustBundle(TD, (root.cert,)).to_jwks()
    doc["keys"][0]["x"] = doc["keys"][0]["y"]
    with pytest.raises(BundleError, match="does not match"):
        TrustBundle.from_jwks(TD, doc)
    with pytest.raises(BundleError, match="keys"):
        TrustBundle.from_jwks(TD, b'{"nokeys": 1}')


def test_fast_leaf_equals_the_builders_leaf(east: IntermediateCA) -> None:
    """The template fast path makes the same to-be-signed bytes as cryptography's builder, for EC and RSA keys,
    for dates on both sides of the UTCTime/GeneralizedTime switch and for serials with the high bit set."""
    from cryptography.hazmat.primitives.serialization import PublicFormat

    from federation.trust.ca import _leaf_with_builder

    assert east._fast is not None
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key(), ec.generate_private_key(ec.SECP384R1()).public_key(),
            rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()]
    times = [
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 3, 3, 4, 5, tzinfo=UTC)),
        (datetime(2049, 12, 31, 23, 0, 0, tzinfo=UTC), datetime(2050, 1, 1, 1, 0, 0, tzinfo=UTC)),
    ]
    for pub in keys:
        for serial in (1, 0x7F, 0x80, (1 << 158) | 12345):
            for nb, na in times:
                uri = "spiffe://example.org/ns/" + "n" * 60 + "/sa/reviews"
                ref = _leaf_with_builder(east, pub, uri, serial, nb, na)
                spki = pub.public_bytes(serialization.Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
                assert east._fast.tbs(spki, uri, serial, nb, na) == ref.tbs_certificate_bytes
    # and a real fast-path leaf parses back to what was asked
    leaf = x509.load_pem_x509_certificate(east._fast.leaf_pem(east, keys[0], str(REVIEWS), 77, *times[0]))
    assert leaf.serial_number == 77 and leaf.not_valid_before_utc == times[0][0]
    leaf.verify_directly_issued_by(east.cert)



_TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
_SEG_CHARS = _TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@settings(max_examples=300, deadline=None)
@given(
    st.text(_TD_CHARS, min_size=1, max_size=40),
    st.lists(st.text(_SEG_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", "..")), max_size=6),
)
def test_spiffe_id_round_trip_property(td: str, segs: list[str]) -> None:
    text = "spiffe://" + td + "".join("/" + s for s in segs)
    sid = SpiffeId.parse(text)
    assert str(sid) == text and sid.trust_domain.name == td and sid.segments == tuple(segs)
    assert SpiffeId.parse(str(sid)) == sid
