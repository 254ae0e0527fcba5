"""LDS: the listeners a proxy opens.

gateway   ``gateway`` on ip:gateway_port: TLS inspector, one filter chain per exported service port matching the
          SNI ``outbound_.<port>_._.<svc>.<ns>.svc.clusterset.local``, TCP proxy to that service's local pods.
          No default chain: plaintext or an unknown SNI matches nothing and the connection is closed. With nothing
          exported there is no listener at all (Envoy NACKs a listener without filter chains).
sidecar   ``outbound`` on 127.0.0.1:outbound_port: HTTP, routes from RDS ``outbound``; and ``inbound|<port>`` on
          ip:port per inbound port: mTLS required, XFCC set with the caller's URI SAN and Subject, RBAC from the
          AuthorizationPolicies selecting the workload (``inbound_authz``), then the workload.
grpc      one API listener per callable ``<host>:<port>`` (what a proxyless gRPC client asks for), RDS ``outbound``.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from discovery.model import Service, ServiceKey, ServicePort
from gateway import telemetry
from gateway.context import ProxyInfo, ProxyKind, PushContext, inbound_cluster_name, sni_name
from gateway.generators import inbound_authz, proxyless
from gateway.generators.common import TLS_TRANSPORT_SOCKET, ads_source, downstream_tls, pack, socket_address

OUTBOUND_ROUTE = "outbound"
GATEWAY_LISTENER = "gateway"
OUTBOUND_LISTENER = "outbound"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
ROUTER = "envoy.filters.http.router"


def inbound_listener_name(port: int) -> str:
    return f"inbound|{port}"


def _router() -> Any:
    return hcm_pb2.HttpFilter(name=ROUTER, typed_config=pack(router_pb2.Router()))


def gateway_chains_of(service: Service, ctx: PushContext) -> list[Any]:
    """The gateway listener's filter chains of one exported service: one per port, matching its SNI."""
    chains = []
    for port in service.ports:
        sni = sni_name(service.key, port.port)
        chains.append(listener_components_pb2.FilterChain(
            name=sni,
            filter_chain_match=listener_components_pb2.FilterChainMatch(
                server_names=[sni], transport_protocol="tls"
            ),
            filters=[listener_components_pb2.Filter(
                name=TCP_PROXY_FILTER,
                typed_config=pack(tcp_proxy_pb2.TcpProxy(
                    stat_prefix=sni, cluster=sni, access_log=telemetry.gateway_access_logs(
                        cluster=str(ctx.local), service=telemetry.service_label(service.key)))),
            )],
        ))
    return chains


def gateway_listener(proxy: ProxyInfo, ctx: PushContext, chains: list[Any] | None = None) -> Any:
    """The gateway's one listener (``chains``: its filter chains, if already built)."""
    if chains is None:
        chains = [c for service in ctx.exported_services() for c in gateway_chains_of(service, ctx)]
    return listener_pb2.Listener(
        name=GATEWAY_LISTENER,
        address=socket_address(proxy.ip, proxy.gateway_port),
        listener_filters=[listener_components_pb2.ListenerFilter(
            name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector())
        )],
        filter_chains=chains,
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
    )


def _outbound_hcm(stat_prefix: str) -> Any:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=OUTBOUND_ROUTE),
        http_filters=[_router()],
    )


def outbound_listener(proxy: ProxyInfo, ctx: PushContext | None = None) -> Any:
    hcm = _outbound_hcm("outbound")
    if ctx is not None:  # request metrics and JSON access logs (gateway.telemetry)
        telemetry.instrument_outbound(hcm, cluster=str(proxy.cluster), spiffe_id=proxy.spiffe_id(ctx.trust_domain))
    return listener_pb2.Listener(
        name=OUTBOUND_LISTENER,
        address=socket_address("127.0.0.1", proxy.outbound_port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name=HCM_FILTER, typed_config=pack(hcm)
        )])],
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
    )


def inbound_listener(proxy: ProxyInfo, port: int, ctx: PushContext) -> Any:
    name = inbound_listener_name(port)
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
        http_filters=[*inbound_authz.http_filters(proxy, ctx, port), _router()],
    )
    telemetry.instrument_inbound(hcm, cluster=str(proxy.cluster), service=telemetry.inbound_service(proxy, port, ctx),
                                 spiffe_id=proxy.spiffe_id(ctx.trust_domain))
    return listener_pb2.Listener(
        name=name,
        address=socket_address(proxy.ip, port),
        filter_chains=[listener_components_pb2.FilterChain(
            filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(hcm))],
            transport_socket=base_pb2.TransportSocket(
                name=TLS_TRANSPORT_SOCKET, typed_config=pack(downstream_tls(ctx, alpn=("h2", "http/1.1")))
            ),
        )],
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
    )


def api_listeners_of(key: ServiceKey, ports: tuple[ServicePort, ...]) -> dict[str, Any]:
    """Proxyless gRPC's API listeners of one callable service (one per port)."""
    out: dict[str, Any] = {}
    for port in ports:
        name = f"{key.clusterset_host}:{port.port}"
        out[name] = listener_pb2.Listener(
            name=name,
            api_listener=api_listener_pb2.ApiListener(api_listener=pack(_outbound_hcm(name))),
        )
    return out


def api_listeners(ctx: PushContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, ports in ctx.outbound_services():
        out |= api_listeners_of(key, ports)
    return out


def sidecar_listeners(proxy: ProxyInfo, ctx: PushContext) -> dict[str, Any]:
    """A sidecar's own listeners: outbound, and one per inbound port."""
    out = {OUTBOUND_LISTENER: outbound_listener(proxy, ctx)}
    for inbound in proxy.inbound:
        out[inbound_listener_name(inbound.port)] = inbound_listener(proxy, inbound.port, ctx)
    return out


def generate(proxy: ProxyInfo, names: frozenset[str] | None, ctx: PushContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if proxy.kind is ProxyKind.GATEWAY:
        listener = gateway_listener(proxy, ctx)
        if listener.filter_chains:  # Envoy rejects a listener without filter chains ("no filter chains specified")
            out[GATEWAY_LISTENER] = listener
    elif proxy.kind is ProxyKind.SIDECAR:
        out = sidecar_listeners(proxy, ctx)
    else:
        out = dict(ctx.memo("lds-api", lambda: api_listeners(ctx)))
        out |= proxyless.server_listeners(proxy, ctx)  # a gRPC xDS server's own listeners
    return out if names is None else {n: c for n, c in out.items() if n in names}
