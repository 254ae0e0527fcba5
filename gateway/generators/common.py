"""Shared pieces of generated Envoy configuration: ADS config sources, addresses, TLS contexts, Any packing."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from gateway.anypb import pack as pack
from gateway.anypb import type_url as type_url
from gateway.context import PushContext

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"


# pack and type_url are gateway.anypb's (imported here for the generators).


def duration(seconds: float) -> Any:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def ads_source() -> Any:
    """A ConfigSource that fetches over the bootstrap's ADS stream, v3."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def socket_address(host: str, port: int) -> Any:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def spiffe_san_matchers(ctx: PushContext, exact: tuple[str, ...] = (),
                        foreign: tuple[tuple[str, str], ...] = (), only_prefix: str = "") -> list[Any]:
    """SAN matchers for peers: the listed exact SPIFFE IDs, or any ID in the trust domain; plus ``foreign``
    callers of peered trust domains, as ``("exact" | "prefix", "spiffe://...")`` pairs; or, with ``only_prefix``,
    the IDs under that prefix alone (a peer's service: its trust domain and namespace)."""
    uri = common_pb2.SubjectAltNameMatcher.SanType.URI
    if only_prefix:
        return [common_pb2.SubjectAltNameMatcher(san_type=uri, matcher=string_pb2.StringMatcher(prefix=only_prefix))]
    if exact:
        return [common_pb2.SubjectAltNameMatcher(san_type=uri, matcher=string_pb2.StringMatcher(exact=e))
                for e in exact]
    own = [common_pb2.SubjectAltNameMatcher(san_type=uri, matcher=string_pb2.StringMatcher(prefix=ctx.spiffe_prefix))]
    return own + [common_pb2.SubjectAltNameMatcher(san_type=uri, matcher=string_pb2.StringMatcher(**{kind: value}))
                  for kind, value in foreign]


def common_tls(ctx: PushContext, *, exact_peers: tuple[str, ...] = (), alpn: tuple[str, ...] = (),
               foreign: tuple[tuple[str, str], ...] = (), only_prefix: str = "") -> Any:
    """Our certificate and the trust bundle, both from SDS over ADS, with SPIFFE SAN checks on the peer."""
    return tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2),
        tls_certificate_sds_secret_configs=[secret_pb2.SdsSecretConfig(name=ctx.cert_secret, sds_config=ads_source())],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=spiffe_san_matchers(ctx, exact_peers, foreign, only_prefix),
            ),
            validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                name=ctx.root_secret, sds_config=ads_source()
            ),
        ),
        alpn_protocols=list(alpn),
    )


def upstream_tls(ctx: PushContext, *, sni: str, exact_peers: tuple[str, ...] = (), alpn: tuple[str, ...] = (),
                 only_prefix: str = "") -> Any:
    return tls_pb2.UpstreamTlsContext(
        common_tls_context=common_tls(ctx, exact_peers=exact_peers, alpn=alpn, only_prefix=only_prefix), sni=sni)


def grpc_upstream_tls(ctx: PushContext, *, sni: str, exact_peers: tuple[str, ...] = (),
                      instance: str = "default") -> Any:
    """Upstream mTLS for proxyless gRPC, which takes certificates from the certificate provider instance its
    bootstrap declares (gRPC does not do SDS): identity ``default`` and roots ``ROOTCA`` of ``instance``."""
    return tls_pb2.UpstreamTlsContext(common_tls_context=provider_tls(ctx, instance=instance, exact_peers=exact_peers),
                                      sni=sni)


def provider_tls(ctx: PushContext, *, instance: str, exact_peers: tuple[str, ...] = ()) -> Any:
    """The TLS context of proxyless gRPC (client or server): its own certificate and the roots from the certificate
    provider ``instance``, peers checked against the trust domain's SPIFFE IDs (or exactly ``exact_peers``)."""
    return tls_pb2.CommonTlsContext(
        tls_certificate_provider_instance=common_pb2.CertificateProviderPluginInstance(
            instance_name=instance, certificate_name=ctx.cert_secret),
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                ca_certificate_provider_instance=common_pb2.CertificateProviderPluginInstance(
                    instance_name=instance, certificate_name=ctx.root_secret),
                match_typed_subject_alt_names=spiffe_san_matchers(ctx, exact_peers),
            ),
        ),
    )


def downstream_tls(ctx: PushContext, *, alpn: tuple[str, ...] = (),
                   foreign: tuple[tuple[str, str], ...] = ()) -> Any:
    """A sidecar's inbound mTLS: callers of our trust domain, and the ``foreign`` callers of peered trust domains
    that an AuthorizationPolicy names (``inbound_authz.foreign_callers``); any other foreign certificate fails the
    handshake, so a peer's workload is denied by default."""
    return tls_pb2.DownstreamTlsContext(
        common_tls_context=common_tls(ctx, alpn=alpn, foreign=foreign),
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )
