"""SDS: the secrets a proxy's TLS contexts reference by name.

``default`` is the proxy's own certificate (the SPIFFE ID of its service account) and ``ROOTCA`` the trust bundle;
with peered clustersets (``PushContext.peer_bundles``) ``ROOTCA`` is Envoy's SPIFFE validator with one bundle per
trust domain instead. A gateway passes TLS through and needs none. The certificate comes from
``PushContext.workload_certs`` keyed by SPIFFE ID; a proxy whose identity has no certificate yet gets only the
bundle (its listeners stay warming).
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_spiffe_validator_config_pb2

from gateway.anypb import pack
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


SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"


def spiffe_bundle_secret(name: str, bundles: tuple[tuple[str, str], ...]) -> Any:
    """The trust bundle secret when the mesh is peered: Envoy's SPIFFE certificate validator with one trust bundle
    per trust domain (ours and each peer's), so a certificate is checked only against the roots of the trust
    domain its SPIFFE ID names; the bundles are never merged into one set of CAs. ``trusted_ca`` keeps our own
    trust domain's roots (the first entry), which the SPIFFE validator does not use: it is what readers of the
    secret that know one trust domain take (the rotation check of what a proxy trusts, the proxyless gRPC agent's
    CA file)."""
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(trust_domains=[
        tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
            name=td, trust_bundle=base_pb2.DataSource(inline_string=pem))
        for td, pem in bundles])
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_string=bundles[0][1]),
        custom_validator_config=extension_pb2.TypedExtensionConfig(name=SPIFFE_VALIDATOR, typed_config=pack(config)),
    ))


def generate(proxy: ProxyInfo, names: frozenset[str] | None, ctx: PushContext) -> dict[str, Any]:
    if proxy.kind is ProxyKind.GATEWAY:
        return {}
    out: dict[str, Any] = {}
    cert = ctx.workload_certs.get(proxy.spiffe_id(ctx.trust_domain))
    if cert is not None:
        out[ctx.cert_secret] = certificate_secret(ctx.cert_secret, cert)
    if ctx.trust_bundle_pem and ctx.peer_bundles:
        own = ((ctx.trust_domain, ctx.trust_bundle_pem),)
        out[ctx.root_secret] = spiffe_bundle_secret(ctx.root_secret, own + tuple(
            (td, pem) for td, pem in ctx.peer_bundles if td != ctx.trust_domain))
    elif ctx.trust_bundle_pem:
        out[ctx.root_secret] = bundle_secret(ctx.root_secret, ctx.trust_bundle_pem)
    return out if names is None else {n: c for n, c in out.items() if n in names}
