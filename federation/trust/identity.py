"""Binding a peer's certificate chain to an identity of the federation, pure.

Every cluster's intermediate chains to the one root, so "it verifies against the bundle" says only "someone in
the trust domain issued this". What makes a certificate *east's* is the intermediate: the root signs each
intermediate with a URI SAN naming its authority (``spiffe://<td>/meshfed/cluster/east``), and only that
intermediate's key can make certificates that chain through it. :func:`cluster_of_peer` therefore

1. verifies the chain leaf -> intermediate -> a root of the bundle itself (signatures, validity periods, CA flags,
   pathlen 0, keyCertSign), independently of whatever TLS library delivered the chain;
2. reads the cluster from the intermediate's URI SAN (root-signed), never from the leaf alone;
3. requires the leaf's SPIFFE ID to be exactly ``SpiffeId.cluster(td, <that cluster>)``.

A leaf that east's CA made for ``.../meshfed/cluster/west`` passes step 1 but fails step 3 (its intermediate says
east); a leaf claiming east's identity but signed by west's intermediate fails step 3 the other way; and a leaf
whose chain names east's intermediate but was not signed by east's key fails step 1. (The CA also refuses to sign
another cluster's identity, see :meth:`federation.trust.ca.IntermediateCA.check_identity`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from discovery.model import ClusterId
from federation.clock import utcnow
from federation.trust.bundle import TrustBundle, fingerprint
from federation.trust.ca import spiffe_id_of
from federation.trust.errors import ChainError, ForeignTrustDomain, InvalidSpiffeId, NotBound
from federation.trust.spiffe import SpiffeId


@dataclass(frozen=True)
class VerifiedPeer:
    """A chain that verified: the leaf's SPIFFE ID, the intermediate's authority and the root it chains to."""

    spiffe_id: SpiffeId
    authority: SpiffeId
    root_fingerprint: str
    not_after: datetime


def _fmt(t: datetime) -> str:
    return f"{t:%Y-%m-%dT%H:%M:%SZ}"


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise ChainError(f"{what} is not valid before {_fmt(cert.not_valid_before_utc)}")
    if now >= cert.not_valid_after_utc:
        raise ChainError(f"{what} expired at {_fmt(cert.not_valid_after_utc)}")


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def parse_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    out = []
    for i, der in enumerate(chain_der):
        try:
            out.append(x509.load_der_x509_certificate(der))
        except ValueError as exc:
            raise ChainError(f"certificate {i} of the peer's chain is not DER: {exc}") from exc
    return out


def verify_peer(chain: Sequence[x509.Certificate], bundle: TrustBundle, *, now: datetime | None = None) -> VerifiedPeer:
    """Verify ``[leaf, intermediate, (root)]`` against ``bundle`` and return who it is.

    Raises :class:`ChainError` if it does not verify, :class:`ForeignTrustDomain` if an ID is of another domain.
    """
    now = now or utcnow()
    if len(chain) < 2:
        raise ChainError(
            f"peer sent {len(chain)} certificate(s); meshfed peers must send leaf and intermediate (cert-chain)"
        )
    leaf, inter = chain[0], chain[1]
    _check_validity(leaf, now, "leaf certificate")
    bc = _basic_constraints(leaf)
    if bc is None or bc.ca:
        raise ChainError("leaf certificate must carry basicConstraints CA:false")
    _check_validity(inter, now, "intermediate certificate")
    ibc = _basic_constraints(inter)
    if ibc is None or not ibc.ca:
        raise ChainError("the leaf's issuer is not a CA (basicConstraints CA:true missing)")
    if ibc.path_length != 0:
        raise ChainError(f"intermediate must have pathlen 0, has {ibc.path_length}")
    iku = _key_usage(inter)
    if iku is None or not iku.key_cert_sign:
        raise ChainError("intermediate lacks keyUsage keyCertSign")
    if not _issued_by(leaf, inter):
        raise ChainError("leaf certificate is not signed by the intermediate it was presented with")
    root = next((r for r in bundle.roots if r.subject == inter.issuer and _issued_by(inter, r)), None)
    if root is None:
        raise ChainError(
            f"intermediate {inter.subject.rfc4514_string()!r} does not chain to any root of the "
            f"{bundle.trust_domain} bundle ({', '.join(f[:16] for f in bundle.fingerprints)})"
        )
    _check_validity(root, now, "root certificate")
    rku = _key_usage(root)
    if rku is not None and not rku.key_cert_sign:
        raise ChainError("root lacks keyUsage keyCertSign")
    try:
        leaf_id = spiffe_id_of(leaf, what="leaf certificate")
        authority = spiffe_id_of(inter, what="intermediate certificate")
    except InvalidSpiffeId as exc:
        raise ChainError(str(exc)) from exc
    for sid, what in ((leaf_id, "leaf"), (authority, "intermediate")):
        if sid.trust_domain != bundle.trust_domain:
            raise ForeignTrustDomain(f"{what} SPIFFE ID {sid} is not in trust domain {bundle.trust_domain}")
    not_after = min(leaf.not_valid_after_utc, inter.not_valid_after_utc, root.not_valid_after_utc)
    return VerifiedPeer(leaf_id, authority, fingerprint(root), not_after)


def cluster_of_peer(chain_der: Sequence[bytes], bundle: TrustBundle, *, now: datetime | None = None) -> ClusterId:
    """The cluster a peer's chain (DER, leaf first) proves, or :class:`NotBound` / :class:`ChainError`."""
    peer = verify_peer(parse_chain(chain_der), bundle, now=now)
    cluster = peer.authority.cluster_name
    if cluster is None:
        raise NotBound(f"peer's intermediate is {peer.authority}, not a cluster CA; it cannot act as a cluster")
    expected = SpiffeId.cluster(bundle.trust_domain, cluster)
    if peer.spiffe_id != expected:
        raise NotBound(
            f"peer certificate says {peer.spiffe_id} but was issued by {cluster}'s intermediate: "
            f"a certificate under {cluster}'s intermediate can only act as {expected}"
        )
    return cluster


def federation_server_of_peer(chain_der: Sequence[bytes], bundle: TrustBundle, *, now: datetime | None = None) -> None:
    """Check that a server's chain is the federation service's: leaf and intermediate both
    ``spiffe://<td>/meshfed/federation``. Raises :class:`NotBound` / :class:`ChainError`."""
    peer = verify_peer(parse_chain(chain_der), bundle, now=now)
    expected = SpiffeId.federation(bundle.trust_domain)
    if peer.authority != expected or peer.spiffe_id != expected:
        raise NotBound(
            f"server presented {peer.spiffe_id} issued under {peer.authority}; the federation service must be "
            f"{expected} under the federation intermediate"
        )


def workload_of_peer(chain_der: Sequence[bytes], bundle: TrustBundle, *, now: datetime | None = None) -> VerifiedPeer:
    """A verified workload peer (``/ns/<ns>/sa/<sa>``) and the authority (cluster) whose CA issued it."""
    peer = verify_peer(parse_chain(chain_der), bundle, now=now)
    if not peer.spiffe_id.is_workload:
        raise NotBound(f"peer {peer.spiffe_id} is not a workload identity")
    return peer
