"""xDS clients that authenticate with a client certificate instead of a bearer token (proxyless gRPC).

gRPC's xDS client cannot put a bearer token on its control-plane stream without TLS, and its bootstrap offers no
per-stream metadata for it. What it does offer (gRFC A65) is mutual TLS to the xDS server: ``channel_creds``
``{"type": "tls", "config": {"certificate_file", "private_key_file", "ca_certificate_file"}}``. So the control
plane serves a second ADS listener over TLS that *requires* a client certificate chaining to the trust bundle,
and the stream's identity is the certificate's SPIFFE ID (``spiffe://<td>/ns/<ns>/sa/<sa>``), with the cluster in
its Subject ``OU`` (which the issuing cluster CA writes). A certificate from another cluster's CA is refused: a
control plane only serves its own cluster's workloads, as with tokens.

The ADS server copies the verified peer certificate (from gRPC's auth context, never from a header) into the
stream's metadata under ``PEER_CERT_KEY``, a key no client can send: gRPC metadata keys cannot start with ``:``,
and the server overwrites it anyway.

A certificate names a service account, not a workload, so the identity it proves may open proxyless gRPC nodes
only (``ProxyIdentity.node_kinds``): a sidecar's own SDS certificate presented here cannot open a sidecar's or a
gateway's node, whose bootstrap token binds it to that one node (gateway.auth.check_node).

Errors: ``gateway.auth.AuthenticationError`` (no certificate, not a SPIFFE workload ID, another cluster or trust
domain).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.auth import PROXYLESS_NODE_KINDS, AuthenticationError, Authenticator, NodeMismatch, ProxyIdentity

PEER_CERT_KEY = ":meshfed-peer-cert"


def peer_metadata(context: Any) -> dict[str, str]:
    """``{PEER_CERT_KEY: <PEM>}`` when the stream's TLS peer presented a verified certificate, else ``{}``."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # an insecure or broken context has no peer certificate
        return {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return {}
    pem = pems[0]
    return {PEER_CERT_KEY: pem.decode() if isinstance(pem, bytes) else str(pem)}


def identity_of_certificate(pem: str, *, trust_domain: str, cluster: str) -> ProxyIdentity:
    """The workload identity a verified client certificate proves; raises AuthenticationError."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise AuthenticationError(f"the xDS client certificate cannot be parsed: {exc}") from exc
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise AuthenticationError("the xDS client certificate has no SPIFFE ID (no SAN)") from exc
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise AuthenticationError(f"the xDS client certificate must carry exactly one URI SAN, not {uris}")
    prefix = f"spiffe://{trust_domain}/ns/"
    parts = uris[0].removeprefix(prefix).split("/")
    if not uris[0].startswith(prefix) or len(parts) != 3 or parts[1] != "sa" or not parts[0] or not parts[2]:
        raise AuthenticationError(f"{uris[0]} is not a workload ID spiffe://{trust_domain}/ns/<ns>/sa/<sa>")
    units = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if units != [cluster]:
        raise AuthenticationError(f"{uris[0]} was issued for cluster {units or '(none)'} by its CA; this control "
                                  f"plane serves cluster {cluster!r}")
    return ProxyIdentity(namespace=parts[0], service_account=parts[2], cluster=cluster,
                         node_kinds=PROXYLESS_NODE_KINDS)


class PeerCertificateAuthenticator:
    """Authenticates streams by their verified TLS client certificate (see the module docstring)."""

    def __init__(self, *, trust_domain: str, cluster: str) -> None:
        self._td = trust_domain
        self._cluster = cluster

    async def authenticate(self, *, metadata: Mapping[str, str]) -> ProxyIdentity:
        pem = metadata.get(PEER_CERT_KEY)
        if not pem:
            raise AuthenticationError("no verified client certificate on the xDS stream")
        return identity_of_certificate(pem, trust_domain=self._td, cluster=self._cluster)


class FirstOf:
    """A client certificate or a bearer token, whichever the stream carries. With both, both must authenticate
    and prove the same identity (the token's binding to its node then applies too); otherwise the stream is
    refused, so a certificate can never lend its identity to someone else's token or the reverse."""

    def __init__(self, *, certificate: PeerCertificateAuthenticator, token: Authenticator) -> None:
        self._cert = certificate
        self._token = token

    async def authenticate(self, *, metadata: Mapping[str, str]) -> ProxyIdentity:
        has_cert, has_token = bool(metadata.get(PEER_CERT_KEY)), "authorization" in metadata
        if has_cert and not has_token:
            return await self._cert.authenticate(metadata=metadata)
        by_token = await self._token.authenticate(metadata=metadata)
        if has_cert:
            by_cert = await self._cert.authenticate(metadata=metadata)
            if by_cert != by_token:
                raise NodeMismatch(f"the client certificate is {by_cert} but the bearer token is {by_token}")
        return by_token
