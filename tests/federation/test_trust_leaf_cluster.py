"""Leaves name their issuing cluster in the Subject (``O=<trust domain>, OU=<cluster>``), which sidecars use to
authorize the caller's cluster: the OU is always the signing CA's own cluster, whatever the CSR asks for."""

from __future__ import annotations

from datetime import timedelta

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
