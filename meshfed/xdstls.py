"""Mutual TLS between proxyless gRPC workloads and their cluster's control plane (see ``gateway.peerauth``).

The control plane's certificate-authenticated ADS listener presents a serving certificate signed by the cluster's
intermediate: the control plane's SPIFFE ID as URI SAN plus the addresses clients dial (IP and DNS SANs, since
gRPC checks the xDS server's name against ``server_uri``); it requires a client certificate chaining to the trust
bundle. Workloads present their ordinary SVID (the same one their data plane mTLS uses).

Exception tree (this module)::

    XdsTlsError (ValueError)   a host that is neither an IP address nor a DNS name
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.trust.ca import IntermediateCA
from federation.trust.spiffe import SpiffeId


class XdsTlsError(ValueError):
    """A serving certificate cannot be made as asked."""


def serving_certificate(ca: IntermediateCA, identity: SpiffeId, hosts: tuple[str, ...], *,
                        ttl: timedelta = timedelta(hours=24)) -> tuple[bytes, bytes]:
    """``(key PEM, chain PEM)``: a server+client certificate for ``identity`` valid for ``hosts``."""
    if not hosts:
        raise XdsTlsError("a serving certificate needs at least one host")
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError as exc:
            if not host or any(c.isspace() or c == "/" for c in host):
                raise XdsTlsError(f"serving certificate host {host!r} is neither an IP address nor a DNS name"
                                  ) from exc
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    not_after = min(now + ttl, ca.not_after)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.trust_domain.name),
                         *([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(ca.cluster))]
                           if ca.cluster is not None else [])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem


def server_credentials(key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> grpc.ServerCredentials:
    """TLS for the certificate-authenticated ADS listener: client certificates required, chaining to the bundle."""
    return grpc.ssl_server_credentials([(key_pem, chain_pem)], root_certificates=bundle_pem,
                                       require_client_auth=True)


class RotatingServerCredentials:
    """gRPC server credentials whose certificate can be replaced while the server runs: gRPC asks the fetcher on
    each new handshake, which hands over a replacement once (``rotate``) and otherwise keeps the current one."""

    def __init__(self, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> None:
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.rotations = 0
        initial = grpc.ssl_server_certificate_configuration([(key_pem, chain_pem)], root_certificates=bundle_pem)
        self.credentials = grpc.dynamic_ssl_server_credentials(initial, self._fetch,
                                                               require_client_authentication=True)

    def rotate(self, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> None:
        self._pending = grpc.ssl_server_certificate_configuration([(key_pem, chain_pem)],
                                                                  root_certificates=bundle_pem)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.rotations += 1
        return pending
