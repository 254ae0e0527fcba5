"""SDS: the secrets a proxy's TLS contexts reference by name.

``default`` is the proxy's own certificate (the SPIFFE ID of its service account) and ``ROOTCA`` the trust bundle.
A gateway passes TLS through and needs none. The certificate comes from ``PushContext.workload_certs`` keyed by
SPIFFE ID; a proxy whose identity has no certificate yet gets only the bundle (its listeners stay warming).
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from gateway.context import ProxyInfo, ProxyKind, PushContext, WorkloadCert


def certificate_secret(name: str, cert: WorkloadCert) -> Any:
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_string=cert.chain_pem),
        private_key=base_pb2.DataSource(inline_string=cert.key_pem),
    ))


def bundle_secret(name: str, bundle_pem: str) -> Any:
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_string=bundle_pem),
    ))


def generate(proxy: ProxyInfo, names: frozenset[str] | None, ctx: PushContext) -> dict[str, Any]:
    if proxy.kind is ProxyKind.GATEWAY:
        return {}
    out: dict[str, Any] = {}
    cert = ctx.workload_certs.get(proxy.spiffe_id(ctx.trust_domain))
    if cert is not None:
        out[ctx.cert_secret] = certificate_secret(ctx.cert_secret, cert)
    if ctx.trust_bundle_pem:
        out[ctx.root_secret] = bundle_secret(ctx.root_secret, ctx.trust_bundle_pem)
    return out if names is None else {n: c for n, c in out.items() if n in names}
