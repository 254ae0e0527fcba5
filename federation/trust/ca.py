"""The certificate authority, pure: root and per-cluster intermediate CAs and workload certificate signing.

Nothing here touches files; :mod:`federation.trust.store` reads and writes CA directories.

* :func:`create_root` makes a self-signed root (ECDSA P-256 by default, RSA 4096 optional, 10 years) carrying the
  trust domain's own ID ``spiffe://<td>`` as URI SAN.
* :func:`create_intermediate` makes one intermediate per cluster, signed by the root: CA:true, pathlen:0,
  keyCertSign|cRLSign, SKI/AKI, 1 year by default, and a URI SAN naming its *authority*
  (``spiffe://<td>/meshfed/cluster/<name>``, or ``spiffe://<td>/meshfed/federation`` for the federation service).
  Because the root signs that SAN, a chain through the intermediate proves which cluster issued the leaf; see
  :mod:`federation.trust.identity`.
* :func:`sign_csr` turns a PKCS#10 CSR into an X.509-SVID (leaf + intermediate). The caller passes the identity
  it authenticated; the CSR's SAN must match it but is never trusted on its own.
* :func:`issue_workload` makes a key and CSR and signs it, for the control plane (SDS, a cluster's own federation
  client certificate).

Signing is on the hot path of SDS, so :class:`IntermediateCA` parses its certificate and key once and keeps
everything a leaf needs (issuer name, AKI, fixed extensions, the PEM of the chain) ready.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from discovery.model import ClusterId
from federation.clock import utcnow
from federation.trust import _der
from federation.trust.errors import (
    BadCSR,
    CANotReady,
    ForeignTrustDomain,
    IdentityMismatch,
    InvalidSpiffeId,
    InvalidTTL,
    TTLExceeded,
)
from federation.trust.spiffe import SpiffeId, TrustDomain

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_ROOT_DAYS = 3650
DEFAULT_INTERMEDIATE_DAYS = 365
DEFAULT_TTL = timedelta(hours=24)
DEFAULT_MAX_TTL = timedelta(hours=48)
CLOCK_SKEW = timedelta(minutes=1)
MIN_RSA_BITS = 2048

_PEM = serialization.Encoding.PEM
_DER = serialization.Encoding.DER


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now


def generate_key(key_type: KeyType = "ec") -> PrivateKey:
    """ECDSA P-256 (``ec``) or RSA 4096 (``rsa``)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    raise ValueError(f"key type {key_type!r} is not 'ec' or 'rsa'")


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (files holding it are written 0600)."""
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_private_key(data: bytes, *, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CANotReady(f"{what}: not a readable unencrypted PEM private key") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CANotReady(f"{what}: key type {type(key).__name__} is not supported (EC or RSA)")
    return key


def _hash_for(key: PrivateKey) -> hashes.SHA256:
    return hashes.SHA256()


def _same_public_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(_DER, fmt) == cert.public_key().public_bytes(_DER, fmt)


def cert_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(_DER)).hexdigest()


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: x509.Certificate, *, what: str) -> SpiffeId:
    """The single SPIFFE ID URI SAN of a certificate."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise InvalidSpiffeId(f"{what} has {len(uris)} URI SANs; exactly one SPIFFE ID is required")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise InvalidSpiffeId(f"{what}: {exc}") from exc


def _ski(key_pub: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key_pub)


# -- root -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RootCA:
    """A root certificate with its key. The trust domain is read from the root's ``spiffe://<td>`` URI SAN."""

    trust_domain: TrustDomain
    cert: x509.Certificate
    key: PrivateKey
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        if not _same_public_key(self.key, self.cert):
            raise CANotReady("root key does not match the root certificate")
        object.__setattr__(self, "fingerprint", cert_fingerprint(self.cert))

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(_PEM)

    @property
    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, *, what: str = "root") -> RootCA:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise CANotReady(f"{what}: root certificate is not PEM: {exc}") from exc
        sid = spiffe_id_of(cert, what=f"{what} root certificate")
        if sid.path:
            raise CANotReady(f"{what}: root certificate's URI SAN {sid} is not a trust domain ID")
        return cls(sid.trust_domain, cert, load_private_key(key_pem, what=f"{what} root key"))


def create_root(
    trust_domain: TrustDomain,
    *,
    key_type: KeyType = "ec",
    days: int = DEFAULT_ROOT_DAYS,
    now: datetime | None = None,
) -> RootCA:
    """A new self-signed root for ``trust_domain``. Its CN carries the date and a short id, so two roots of one
    trust domain (during rotation) have different subjects."""
    if days <= 0:
        raise InvalidTTL(f"root validity must be positive, got {days} days")
    now = _aware(now)
    key = generate_key(key_type)
    pub = key.public_key()
    ski = _ski(pub)
    short = ski.digest.hex()[:8]
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain.name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshfed root CA {now:%Y-%m-%d} {short}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id()))]), critical=False
        )
        .sign(key, _hash_for(key))
    )
    return RootCA(trust_domain, cert, key)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)
_EMPTY_NAME = x509.Name([])


# -- intermediate -----------------------------------------------------------------------------------------------------


class IntermediateCA:
    """A cluster's signing CA: the intermediate certificate and key, its chain up to the root, and the TTL cap.

    Everything a leaf needs is computed once here; :func:`sign_csr` only builds and signs.
    """

    __slots__ = (
        "_aki",
        "_fast",
        "_hash",
        "_issuer",
        "authority",
        "cert",
        "cert_pem",
        "chain",
        "chain_pem",
        "fingerprint",
        "key",
        "max_ttl",
        "not_after",
        "not_before",
        "trust_domain",
    )

    def __init__(
        self,
        cert: x509.Certificate,
        key: PrivateKey,
        *,
        chain: Sequence[x509.Certificate] = (),
        max_ttl: timedelta = DEFAULT_MAX_TTL,
        what: str = "intermediate",
    ) -> None:
        if max_ttl <= timedelta(0):
            raise InvalidTTL(f"{what}: max TTL must be positive, got {max_ttl}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound as exc:
            raise CANotReady(f"{what}: certificate has no basicConstraints; it is not a CA") from exc
        if not bc.ca:
            raise CANotReady(f"{what}: certificate is not a CA (CA:false)")
        if not _same_public_key(key, cert):
            raise CANotReady(f"{what}: ca-key does not match ca-cert")
        try:
            self.authority = spiffe_id_of(cert, what=f"{what} certificate")
        except InvalidSpiffeId as exc:
            raise CANotReady(str(exc)) from exc
        if not (self.authority.cluster_name is not None or self.authority.is_federation):
            raise CANotReady(f"{what}: URI SAN {self.authority} is not a meshfed cluster or federation authority")
        self.cert = cert
        self.key = key
        self.trust_domain = self.authority.trust_domain
        self.max_ttl = max_ttl
        self.chain = tuple(chain)  # above the intermediate: normally just the root
        self.fingerprint = cert_fingerprint(cert)
        self.cert_pem = cert.public_bytes(_PEM)
        self.chain_pem = self.cert_pem + b"".join(c.public_bytes(_PEM) for c in self.chain)
        self.not_before = max([cert.not_valid_before_utc, *(c.not_valid_before_utc for c in self.chain)])
        self.not_after = min([cert.not_valid_after_utc, *(c.not_valid_after_utc for c in self.chain)])
        self._issuer = cert.subject
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        self._hash = _hash_for(key)
        self._fast: _LeafTemplate | None = None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            self._fast = _LeafTemplate.of(self)

    @property
    def cluster(self) -> ClusterId | None:
        return self.authority.cluster_name

    def check_identity(self, identity: SpiffeId) -> None:
        """Raise unless this CA may sign ``identity``: a workload ID of its trust domain, or its own authority."""
        if identity.trust_domain != self.trust_domain:
            raise ForeignTrustDomain(
                f"identity {identity} is in trust domain {identity.trust_domain}, this CA signs for {self.trust_domain}"
            )
        if identity.is_workload or identity == self.authority:
            return
        if identity.is_meshfed:
            raise IdentityMismatch(
                f"CA of {self.authority} may not sign {identity}: it can only sign its own authority"
            )
        raise IdentityMismatch(f"identity {identity} is not a workload ID (spiffe://<td>/ns/<ns>/sa/<sa>)")

    def check_ready(self, now: datetime) -> None:
        if now < self.not_before:
            raise CANotReady(f"CA {self.authority} is not valid before {self.not_before:%Y-%m-%dT%H:%M:%SZ}")
        if now >= self.not_after:
            raise CANotReady(f"CA {self.authority} (or its root) expired at {self.not_after:%Y-%m-%dT%H:%M:%SZ}")


def create_intermediate(
    root: RootCA,
    authority: SpiffeId,
    *,
    days: int = DEFAULT_INTERMEDIATE_DAYS,
    now: datetime | None = None,
    max_ttl: timedelta = DEFAULT_MAX_TTL,
) -> IntermediateCA:
    """An intermediate for a cluster (``SpiffeId.cluster``) or the federation service (``SpiffeId.federation``)."""
    if days <= 0:
        raise InvalidTTL(f"intermediate validity must be positive, got {days} days")
    if authority.trust_domain != root.trust_domain:
        raise ForeignTrustDomain(f"authority {authority} is not in the root's trust domain {root.trust_domain}")
    if authority.cluster_name is None and not authority.is_federation:
        raise InvalidSpiffeId(f"{authority} is not a cluster or federation authority")
    now = _aware(now)
    if now >= root.not_after:
        raise CANotReady(f"root {root.fingerprint[:16]} expired at {root.not_after:%Y-%m-%dT%H:%M:%SZ}")
    if now < root.cert.not_valid_before_utc - CLOCK_SKEW:
        raise CANotReady(
            f"root {root.fingerprint[:16]} is not valid before {root.cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    key = generate_key("ec")
    pub = key.public_key()
    label = authority.cluster_name or "federation"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, root.trust_domain.name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, label),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshfed intermediate CA {label} {now:%Y-%m-%d}"),
        ]
    )
    root_ski = root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_before = max(now - CLOCK_SKEW, root.cert.not_valid_before_utc)
    not_after = min(now + timedelta(days=days), root.not_after)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(authority))]), critical=False)
    )
    if authority.cluster_name is not None:
        # The leaves under a cluster's intermediate may only name that cluster in their Subject: even a stolen
        # intermediate key cannot mint a leaf that claims another cluster (TLS stacks enforce name constraints).
        subtree = x509.DirectoryName(cluster_subject(root.trust_domain.name, authority.cluster_name))
        builder = builder.add_extension(x509.NameConstraints(permitted_subtrees=[subtree], excluded_subtrees=None),
                                        critical=True)
    return IntermediateCA(builder.sign(root.key, _hash_for(root.key)), key, chain=(root.cert,), max_ttl=max_ttl)


# -- workload certificates --------------------------------------------------------------------------------------------


def make_csr(key: PrivateKey, identity: SpiffeId | str, *, extra_uris: Sequence[str] = ()) -> bytes:
    """A PEM CSR whose only SAN is ``identity`` (``extra_uris`` exist for tests of rejection)."""
    uris = [x509.UniformResourceIdentifier(str(identity)), *(x509.UniformResourceIdentifier(u) for u in extra_uris)]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_EMPTY_NAME)
        .add_extension(x509.SubjectAlternativeName(uris), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(_PEM)


def _check_csr_key(pub: object) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in ("secp256r1", "secp384r1"):
            raise BadCSR(f"CSR key curve {pub.curve.name} is not supported (P-256 or P-384)")
        return pub
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < MIN_RSA_BITS:
            raise BadCSR(f"CSR RSA key has {pub.key_size} bits; at least {MIN_RSA_BITS} are required")
        return pub
    raise BadCSR(f"CSR key type {type(pub).__name__} is not supported (ECDSA P-256/P-384 or RSA)")


def _csr_identity(csr: x509.CertificateSigningRequest, expected_text: str, expected: SpiffeId) -> SpiffeId:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise BadCSR("CSR has no subjectAltName; it must carry exactly one SPIFFE ID URI SAN") from exc
    except ValueError as exc:
        raise BadCSR(f"CSR extensions do not parse: {exc}") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise BadCSR(f"CSR has {len(uris)} URI SANs; exactly one SPIFFE ID is required")
    if len(san) != 1:
        raise BadCSR("CSR has SANs other than its SPIFFE ID (DNS, IP or e-mail names are not signed)")
    if uris[0] == expected_text:
        return expected  # the same text as an ID already validated: no need to parse it again
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise BadCSR(f"CSR URI SAN is not a valid SPIFFE ID: {exc}") from exc


def sign_csr(
    ca: IntermediateCA,
    csr_pem: bytes,
    *,
    identity: SpiffeId,
    ttl: timedelta | None = None,
    now: datetime | None = None,
) -> list[bytes]:
    """Sign a PEM CSR as an X.509-SVID for ``identity`` (the identity the caller was authenticated as).

    Returns ``[leaf PEM, intermediate PEM]``. ``ttl`` defaults to 24 h; above ``ca.max_ttl`` raises
    :class:`TTLExceeded`; the leaf never outlives the intermediate (or its root), it is cut at that date.
    """
    now = _aware(now)
    # Cheap checks on the caller's side first, before any cryptography.
    ca.check_identity(identity)
    if ttl is None:
        ttl = min(DEFAULT_TTL, ca.max_ttl)
    if ttl <= timedelta(0):
        raise InvalidTTL(f"requested TTL {ttl} is not positive")
    if ttl > ca.max_ttl:
        raise TTLExceeded(f"requested TTL {ttl} exceeds this CA's cap of {ca.max_ttl}")
    ca.check_ready(now)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise BadCSR(f"CSR is not a PEM PKCS#10 request: {exc}") from exc
    except x509.InvalidVersion as exc:  # not a ValueError: a version field other than v1 (0)
        raise BadCSR(f"CSR has an invalid version: {exc}") from exc
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        raise BadCSR(f"CSR signature cannot be checked: {exc}") from exc
    if not valid:
        raise BadCSR("CSR signature does not verify with its own public key (forged or corrupted)")
    try:
        pub = _check_csr_key(csr.public_key())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadCSR(f"CSR public key cannot be read: {exc}") from exc
    requested = _csr_identity(csr, str(identity), identity)
    if requested.trust_domain != ca.trust_domain:
        raise ForeignTrustDomain(f"CSR asks for {requested}, outside trust domain {ca.trust_domain}")
    if requested != identity:
        raise IdentityMismatch(f"CSR asks for {requested} but the caller was authenticated as {identity}")
    not_after = now + ttl
    if not_after > ca.not_after:
        not_after = ca.not_after
    not_before = now - CLOCK_SKEW
    if not_before < ca.not_before:
        not_before = ca.not_before
    serial = x509.random_serial_number()
    if ca._fast is not None:
        return [ca._fast.leaf_pem(ca, pub, str(identity), serial, not_before, not_after), ca.cert_pem]
    leaf = _leaf_with_builder(ca, pub, str(identity), serial, not_before, not_after)
    return [leaf.public_bytes(_PEM), ca.cert_pem]


def cluster_subject(trust_domain: str, cluster: str) -> x509.Name:
    """``O=<trust domain>, OU=<cluster>``: the Subject of a cluster's leaves, and its intermediate's name constraint."""
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster),
    ])


def leaf_subject(ca: IntermediateCA) -> x509.Name:
    """The Subject of every leaf ``ca`` signs: ``O=<trust domain>, OU=<cluster>`` for a cluster CA (empty for the
    federation authority's CA).

    The cluster is always the CA's own, taken from its intermediate's root-signed URI SAN, never from the CSR (whose
    subject is ignored). Sidecars authorize the caller's cluster on this OU (see docs/authorization.md)."""
    if ca.cluster is None:
        return _EMPTY_NAME
    return cluster_subject(ca.trust_domain.name, str(ca.cluster))


def _leaf_with_builder(
    ca: IntermediateCA,
    pub: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    uri: str,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """The reference leaf, made by ``cryptography``'s builder (also used for non-EC intermediates)."""
    return (
        x509.CertificateBuilder()
        .subject_name(leaf_subject(ca))
        .issuer_name(ca._issuer)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_LEAF_BC, critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(_LEAF_EKU, critical=False)
        .add_extension(ca._aki, critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(ca.key, ca._hash)
    )


_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class _LeafTemplate:
    """The constant DER pieces of this CA's leaves, cut from one builder-made template certificate.

    A leaf is then: version, serial, algorithm, issuer, validity, the CA's fixed subject (O=<trust domain>,
    OU=<cluster>), the CSR's key, the fixed extensions and the SAN, signed with one ECDSA call. ``tests`` check it
    equals the builder's output byte for byte (to-be-signed part)."""

    version: bytes
    tbs_algorithm: bytes
    issuer: bytes
    subject: bytes
    fixed_extensions: bytes
    outer_algorithm: bytes

    @classmethod
    def of(cls, ca: IntermediateCA) -> _LeafTemplate:
        t = ca.cert.not_valid_before_utc
        tmpl = _leaf_with_builder(ca, ca.key.public_key(), "spiffe://template.invalid/x", 1, t, t + timedelta(hours=1))
        parts = _der.elements(tmpl.tbs_certificate_bytes)
        if len(parts) != 8 or parts[0][0] != 0xA0 or parts[7][0] != 0xA3:
            raise CANotReady("unexpected leaf template layout")
        exts = _der.elements(_der.elements(parts[7])[0])
        if _der.OID_SAN not in exts[-1][:8]:
            raise CANotReady("leaf template does not end with its SAN")
        outer = _der.elements(tmpl.public_bytes(_DER))
        return cls(parts[0], parts[2], parts[3], parts[5], b"".join(exts[:-1]), outer[1])

    def tbs(self, spki: bytes, uri: str, serial: int, not_before: datetime, not_after: datetime) -> bytes:
        exts = _der.tlv(0xA3, _der.tlv(_der.SEQUENCE, self.fixed_extensions + _der.san_uri_extension(uri)))
        validity = _der.tlv(_der.SEQUENCE, _der.time(not_before) + _der.time(not_after))
        return _der.tlv(
            _der.SEQUENCE,
            self.version + _der.integer(serial) + self.tbs_algorithm + self.issuer + validity + self.subject
            + spki + exts,
        )

    def leaf_pem(
        self,
        ca: IntermediateCA,
        pub: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        uri: str,
        serial: int,
        not_before: datetime,
        not_after: datetime,
    ) -> bytes:
        tbs = self.tbs(pub.public_bytes(_DER, _SPKI), uri, serial, not_before, not_after)
        key = ca.key
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        sig = key.sign(tbs, _ECDSA_SHA256)
        der = _der.tlv(_der.SEQUENCE, tbs + self.outer_algorithm + _der.tlv(_der.BIT_STRING, b"\x00" + sig))
        return _der.pem_certificate(der)


def issue_workload(
    ca: IntermediateCA,
    identity: SpiffeId,
    *,
    ttl: timedelta | None = None,
    now: datetime | None = None,
) -> tuple[bytes, list[bytes]]:
    """A fresh P-256 key and its signed chain: ``(key PEM, [leaf PEM, intermediate PEM])``."""
    key = ec.generate_private_key(ec.SECP256R1())
    chain = sign_csr(ca, make_csr(key, identity), identity=identity, ttl=ttl, now=now)
    return private_key_pem(key), chain


@dataclass(frozen=True)
class CertInfo:
    """What ``inspect`` shows about one certificate."""

    role: str
    subject: str
    spiffe_id: str | None
    fingerprint: str
    issuer: str
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(cls, role: str, cert: x509.Certificate) -> CertInfo:
        uris = uri_sans(cert)
        return cls(
            role=role,
            subject=cert.subject.rfc4514_string() or "(empty)",
            spiffe_id=uris[0] if len(uris) == 1 else None,
            fingerprint=cert_fingerprint(cert),
            issuer=cert.issuer.rfc4514_string(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )
