"""Leaves name their issuing cluster in the Subject (``O=<trust domain>, OU=<cluster>``), which sidecars use to
authorize the caller's cluster: the OU is always the signing CA's own cluster, whatever the CSR asks for."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation.trust.ca import (
    _leaf_with_builder,
    create_intermediate,
    create_root,
    issue_workload,
    leaf_subject,
    sign_csr,
)
from federation.trust.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("leaf.test")
SLEEP = SpiffeId.workload(TD, "default", "sleep")


def _ou(pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem)
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]


def test_leaf_subject_names_the_signing_cluster_not_the_csr() -> None:
    root = create_root(TD)
    west = create_intermediate(root, SpiffeId.cluster(TD, "west"))
    key = ec.generate_private_key(ec.SECP256R1())
    # A CSR whose subject claims to come from east: the subject is ignored, west's CA writes west.
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TD.name),
                                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "east")]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(SLEEP))]), critical=True)
           .sign(key, hashes.SHA256()))
    chain = sign_csr(west, csr.public_bytes(serialization.Encoding.PEM), identity=SLEEP, ttl=timedelta(hours=1))
    assert _ou(chain[0]) == ["west"]
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.subject.rfc4514_string() == f"OU=west,O={TD.name}"


def test_fast_and_builder_paths_write_the_same_cluster() -> None:
    root = create_root(TD)
    east = create_intermediate(root, SpiffeId.cluster(TD, "east"))
    assert east._fast is not None  # the DER template path
    _, chain = issue_workload(east, SLEEP, ttl=timedelta(hours=1))
    assert _ou(chain[0]) == ["east"]
    fast = x509.load_pem_x509_certificate(chain[0])
    ref = _leaf_with_builder(east, ec.generate_private_key(ec.SECP256R1()).public_key(), str(SLEEP), 5,
                             fast.not_valid_before_utc, fast.not_valid_after_utc)
    assert ref.subject == fast.subject == leaf_subject(east)


def test_federation_authority_leaves_keep_an_empty_subject() -> None:
    root = create_root(TD)
    fed = create_intermediate(root, SpiffeId.federation(TD))
    assert leaf_subject(fed) == x509.Name([])


def _rogue_leaf(ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, subject: x509.Name) -> x509.Certificate:
    """A leaf signed directly with a cluster intermediate's key (what a stolen key could make), any Subject."""
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(SLEEP))]), critical=True)
            .sign(ca_key, hashes.SHA256()))


def test_a_cluster_intermediate_cannot_vouch_for_another_cluster(tmp_path: Path) -> None:
    """West's intermediate carries a name constraint (permitted O=<td>, OU=west): a leaf it signs claiming east
    fails chain validation (checked by openssl, independently of our code), while its own cluster passes."""
    root = create_root(TD)
    west = create_intermediate(root, SpiffeId.cluster(TD, "west"))
    nc = west.cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and nc.value.permitted_subtrees == [x509.DirectoryName(leaf_subject(west))]
    fed = create_intermediate(root, SpiffeId.federation(TD)).cert.extensions
    assert x509.oid.ExtensionOID.NAME_CONSTRAINTS not in [e.oid for e in fed]  # its leaves have no Subject
    (tmp_path / "root.pem").write_bytes(root.cert_pem)
    (tmp_path / "inter.pem").write_bytes(west.cert_pem)
    key = west.key
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    def verify(subject: x509.Name) -> subprocess.CompletedProcess[str]:
        leaf = _rogue_leaf(key, west.cert.subject, subject)
        (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        return subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                               str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem")],
                              capture_output=True, text=True, check=False)

    assert verify(leaf_subject(west)).returncode == 0
    east_claim = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TD.name),
                            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "east")])
    refused = verify(east_claim)
    assert refused.returncode != 0 and "permitted subtree violation" in refused.stdout + refused.stderr
    # An empty Subject is outside what name constraints can restrict (RFC 5280); it names no cluster at all.
    assert verify(x509.Name([])).returncode == 0
    # And the real issuing path still produces leaves that pass.
    _, chain = issue_workload(west, SLEEP, ttl=timedelta(hours=1))
    (tmp_path / "leaf.pem").write_bytes(chain[0])
    ok = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                         str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True,
                        check=False)
    assert ok.returncode == 0, ok.stderr
