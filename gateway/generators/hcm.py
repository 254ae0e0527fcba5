"""The network filters every sidecar listener is built from: the outbound and inbound HTTP connection managers and
the TCP proxy. ``lds`` (explicit listeners) and ``capture`` (virtual listeners of captured traffic) share them, so
a captured HTTP connection gets exactly what the explicit listener gives it: the same routes (RDS ``outbound``),
retries, splits and telemetry on the way out; the same XFCC handling, RBAC and telemetry on the way in."""

from __future__ import annotations

from typing import Any

from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from gateway import telemetry
from gateway.context import ProxyInfo, PushContext, inbound_cluster_name
from gateway.generators import inbound_authz
from gateway.generators.common import ads_source, pack

OUTBOUND_ROUTE = "outbound"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ROUTER = "envoy.filters.http.router"


def router() -> Any:
    return hcm_pb2.HttpFilter(name=ROUTER, typed_config=pack(router_pb2.Router()))


def outbound_hcm(stat_prefix: str) -> Any:
    """HTTP with the routes of RDS ``outbound`` (no telemetry: proxyless gRPC's API listeners use it as is)."""
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=OUTBOUND_ROUTE),
        http_filters=[router()],
    )


def sidecar_outbound_hcm(proxy: ProxyInfo, ctx: PushContext | None) -> Any:
    """A sidecar's outbound connection manager: RDS ``outbound`` plus request metrics and JSON access logs."""
    hcm = outbound_hcm("outbound")
    if ctx is not None:  # request metrics and JSON access logs (gateway.telemetry)
        telemetry.instrument_outbound(hcm, cluster=str(proxy.cluster), spiffe_id=proxy.spiffe_id(ctx.trust_domain))
    return hcm


def inbound_hcm(proxy: ProxyInfo, port: int, ctx: PushContext, *, name: str) -> Any:
    """A sidecar's inbound connection manager for workload port ``port``: XFCC from the verified client
    certificate, RBAC from the AuthorizationPolicies selecting the workload, telemetry, then ``inbound|<port>``.
    ``name`` names the route, the stats and the access log lines (the listener or filter chain)."""
    cluster = inbound_cluster_name(port)
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name.replace("|", "_"),
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        forward_client_cert_details=hcm_pb2.HttpConnectionManager.SANITIZE_SET,
        # RBAC matches paths after RFC 3986 normalization ("/./admin", "/x/../admin" are "/admin"), as Istio does by
        # default, so a DENY on a path cannot be sidestepped by spelling it differently.
        normalize_path=wrappers_pb2.BoolValue(value=True),
        # The Subject names the caller's cluster (OU, written by that cluster's CA); RBAC matches it here, and only
        # here: SANITIZE_SET drops any x-forwarded-client-cert the caller sent (gateway.rbac, docs/authorization.md).
        set_current_client_cert_details=hcm_pb2.HttpConnectionManager.SetCurrentClientCertDetails(
            uri=True, subject=wrappers_pb2.BoolValue(value=True)),
        access_log=inbound_authz.access_logs(proxy, name, ctx),
        route_config=route_pb2.RouteConfiguration(
            name=name,
            virtual_hosts=[route_components_pb2.VirtualHost(
                name=name,
                domains=["*"],
                routes=[route_components_pb2.Route(
                    match=route_components_pb2.RouteMatch(prefix="/"),
                    route=route_components_pb2.RouteAction(cluster=cluster),
                )],
            )],
        ),
        http_filters=[*inbound_authz.http_filters(proxy, ctx, port), router()],
    )
    telemetry.instrument_inbound(hcm, cluster=str(proxy.cluster), service=telemetry.inbound_service(proxy, port, ctx),
                                 spiffe_id=proxy.spiffe_id(ctx.trust_domain))
    return hcm


def hcm_filter(hcm: Any) -> Any:
    return listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(hcm))


def tcp_proxy_filter(cluster: str, *, stat_prefix: str = "", access_log: list[Any] | None = None) -> Any:
    return listener_components_pb2.Filter(
        name=TCP_PROXY_FILTER,
        typed_config=pack(tcp_proxy_pb2.TcpProxy(stat_prefix=(stat_prefix or cluster).replace("|", "_"),
                                                 cluster=cluster, access_log=access_log or [])),
    )
