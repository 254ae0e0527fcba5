"""Trust bundles: the set of root certificates a trust domain trusts, as PEM and as a SPIFFE bundle (JWKS).

A :class:`TrustBundle` is immutable; rotation makes a new one with :meth:`TrustBundle.with_root` /
:meth:`TrustBundle.without_root`, each bumping ``sequence`` (the SPIFFE ``spiffe_sequence``) so consumers can
tell a newer bundle from an older one. The JWKS form follows the SPIFFE trust domain bundle format: one JWK per
root with ``"use": "x509-svid"`` and the DER certificate in ``x5c``, plus ``spiffe_sequence`` and
``spiffe_refresh_hint`` (seconds).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from federation.trust.errors import BundleError
from federation.trust.spiffe import TrustDomain

DEFAULT_REFRESH_HINT = 300  # seconds


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lower-case hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_pem_certs(data: bytes, *, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM blob; a clear :class:`BundleError` naming ``what`` if there is none or it is bad."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BundleError(f"{what}: not a PEM certificate list: {exc}") from exc
    if not certs:
        raise BundleError(f"{what}: no certificate found")
    return certs


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64u(value: int, length: int | None = None) -> str:
    n = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64u(value.to_bytes(n, "big"))


def _jwk(cert: x509.Certificate) -> dict[str, Any]:
    pub = cert.public_key()
    jwk: dict[str, Any] = {"use": "x509-svid"}
    if isinstance(pub, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48), "secp521r1": ("P-521", 66)}
        if pub.curve.name not in curves:
            raise BundleError(f"root {fingerprint(cert)[:16]}: curve {pub.curve.name} has no JWK name")
        crv, size = curves[pub.curve.name]
        nums = pub.public_numbers()
        jwk.update(kty="EC", crv=crv, x=_int_b64u(nums.x, size), y=_int_b64u(nums.y, size))
    elif isinstance(pub, rsa.RSAPublicKey):
        rnums = pub.public_numbers()
        jwk.update(kty="RSA", n=_int_b64u(rnums.n), e=_int_b64u(rnums.e))
    else:
        raise BundleError(f"root {fingerprint(cert)[:16]}: unsupported key type {type(pub).__name__}")
    jwk["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    return jwk


@dataclass(frozen=True)
class TrustBundle:
    """The roots of one trust domain, in a stable order (oldest first), with a sequence number."""

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]
    sequence: int = 1
    refresh_hint: int = DEFAULT_REFRESH_HINT
    _fingerprints: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.roots:
            raise BundleError(f"trust bundle for {self.trust_domain} has no root")
        fps = tuple(fingerprint(c) for c in self.roots)
        if len(set(fps)) != len(fps):
            raise BundleError(f"trust bundle for {self.trust_domain} lists a root twice")
        for cert in self.roots:
            try:
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                bc = None
            if bc is None or not bc.ca:
                raise BundleError(f"trust bundle for {self.trust_domain}: {fingerprint(cert)[:16]} is not a CA")
        if self.sequence < 0:
            raise BundleError("trust bundle sequence must be >= 0")
        object.__setattr__(self, "_fingerprints", fps)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return self._fingerprints

    def contains(self, cert: x509.Certificate) -> bool:
        return fingerprint(cert) in self._fingerprints

    def root_by_fingerprint(self, fp: str) -> x509.Certificate:
        for cert, have in zip(self.roots, self._fingerprints, strict=True):
            if have == fp or (len(fp) >= 8 and have.startswith(fp)):
                return cert
        raise BundleError(f"trust bundle for {self.trust_domain} has no root {fp[:16]}")

    def issuing_root(self, chain: Iterable[x509.Certificate]) -> str | None:
        """Fingerprint of the root of this bundle that signed a CA certificate of ``chain`` (leaf first; the leaf
        itself is skipped when the chain has more), or None: which root a presented chain depends on."""
        certs = list(chain)
        for cert in certs[1:] or certs:
            for root, fp in zip(self.roots, self._fingerprints, strict=True):
                if cert.issuer == root.subject and _signed_by(cert, root):
                    return fp
        return None

    # -- changes (each returns a new bundle with sequence + 1) ------------------------------------------------------
    def with_root(self, cert: x509.Certificate) -> TrustBundle:
        if self.contains(cert):
            return self
        return TrustBundle(self.trust_domain, (*self.roots, cert), self.sequence + 1, self.refresh_hint)

    def without_root(self, fp: str) -> TrustBundle:
        keep = tuple(c for c, f in zip(self.roots, self._fingerprints, strict=True) if f != fp)
        if len(keep) == len(self.roots):
            return self
        return TrustBundle(self.trust_domain, keep, self.sequence + 1, self.refresh_hint)

    # -- PEM ----------------------------------------------------------------------------------------------------------
    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)

    @classmethod
    def from_pem(
        cls, trust_domain: TrustDomain, data: bytes, *, sequence: int = 1, what: str = "bundle"
    ) -> TrustBundle:
        return cls(trust_domain, tuple(load_pem_certs(data, what=what)), sequence)

    # -- SPIFFE bundle (JWKS) -----------------------------------------------------------------------------------------
    def to_jwks(self) -> dict[str, Any]:
        return {
            "keys": [_jwk(c) for c in self.roots],
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint,
        }

    def to_jwks_json(self) -> bytes:
        return (json.dumps(self.to_jwks(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_jwks(
        cls, trust_domain: TrustDomain, doc: Mapping[str, Any] | bytes | str, *, what: str = "bundle"
    ) -> TrustBundle:
        """Read the x509-svid keys of a SPIFFE bundle document (JWT keys, if any, are skipped)."""
        if isinstance(doc, (bytes, str)):
            try:
                parsed = json.loads(doc)
            except ValueError as exc:
                raise BundleError(f"{what}: not JSON: {exc}") from exc
        else:
            parsed = doc
        if not isinstance(parsed, Mapping) or not isinstance(parsed.get("keys"), list):
            raise BundleError(f"{what}: a SPIFFE bundle is a JSON object with a 'keys' list")
        roots: list[x509.Certificate] = []
        for i, key in enumerate(parsed["keys"]):
            if not isinstance(key, Mapping):
                raise BundleError(f"{what}: keys[{i}] is not an object")
            if key.get("use") != "x509-svid":
                continue
            x5c = key.get("x5c")
            if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
                raise BundleError(f"{what}: keys[{i}].x5c must hold exactly one certificate")
            try:
                cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
            except ValueError as exc:
                raise BundleError(f"{what}: keys[{i}].x5c[0] is not a DER certificate: {exc}") from exc
            if not _same_key(_jwk(cert), key):
                raise BundleError(f"{what}: keys[{i}] public key does not match its certificate")
            roots.append(cert)
        seq = parsed.get("spiffe_sequence", 0)
        hint = parsed.get("spiffe_refresh_hint", DEFAULT_REFRESH_HINT)
        if not isinstance(seq, int) or not isinstance(hint, int):
            raise BundleError(f"{what}: spiffe_sequence and spiffe_refresh_hint must be integers")
        return cls(trust_domain, tuple(roots), seq, hint)


def _same_key(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> bool:
    fields = ("kty", "crv", "x", "y", "n", "e")
    return all(ours.get(f) == theirs.get(f) for f in fields)


def merge_roots(*groups: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """Roots from several groups, first occurrence wins, order kept."""
    seen: set[str] = set()
    out: list[x509.Certificate] = []
    for group in groups:
        for cert in group:
            fp = fingerprint(cert)
            if fp not in seen:
                seen.add(fp)
                out.append(cert)
    return tuple(out)
