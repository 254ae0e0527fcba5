"""LDS for proxyless gRPC *servers* (``grpc.aio.server(..., xds=True)`` with xDS server credentials).

A gRPC xDS server asks for one Listener per serving address, named by its bootstrap's
``server_listener_resource_name_template`` (``grpc/server?xds.resource.listening_address=<ip>:<port>``, see
``gateway.bootstrap.GRPC_SERVER_TEMPLATE``). A proxyless node lists those addresses as its inbound ports
(``InboundPort(port, port, name, "grpc")``: no sidecar, so the app listens on the endpoint port itself).

Each listener has one filter chain: mTLS required, certificates from the ``default`` certificate provider
instance of the server's bootstrap (gRPC does not do SDS), the caller checked against the trust domain; an
inline route configuration whose single route is a non-forwarding action (what a gRPC server needs); the same
RBAC filters a sidecar's inbound side gets (``inbound_authz``), then the router. gRPC evaluates RBAC itself
(gRFC A41): principals by SPIFFE ID, namespace, paths, methods and ports work as on sidecars; ``source.cluster``
conditions do not match (gRPC has no x-forwarded-client-cert), so an ALLOW on a cluster denies, never allows.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import wrappers_pb2

from gateway.context import ProxyInfo, PushContext
from gateway.generators import inbound_authz
from gateway.generators.common import TLS_TRANSPORT_SOCKET, pack, provider_tls, socket_address

SERVER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"


def server_listener_name(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return SERVER_TEMPLATE.replace("%s", f"{host}:{port}")


def server_tls(ctx: PushContext, *, instance: str = "default") -> Any:
    """Downstream mTLS for a gRPC xDS server, from its bootstrap's certificate provider ``instance``."""
    return tls_pb2.DownstreamTlsContext(
        common_tls_context=provider_tls(ctx, instance=instance),
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )


def server_listener(proxy: ProxyInfo, port: int, ctx: PushContext) -> Any:
    name = server_listener_name(proxy.ip, port)
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"grpc_server_{port}",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(
            name=f"inbound|{port}",
            virtual_hosts=[route_components_pb2.VirtualHost(
                name=f"inbound|{port}",
                domains=["*"],
                routes=[route_components_pb2.Route(
                    match=route_components_pb2.RouteMatch(prefix="/"),
                    non_forwarding_action=route_components_pb2.NonForwardingAction(),
                )],
            )],
        ),
        http_filters=[*inbound_authz.http_filters(proxy, ctx, port),
                      hcm_pb2.HttpFilter(name=ROUTER, typed_config=pack(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=name,
        address=socket_address(proxy.ip, port),
        filter_chains=[listener_components_pb2.FilterChain(
            name=f"inbound|{port}",
            filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(hcm))],
            transport_socket=base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(server_tls(ctx))),
        )],
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
    )


def server_listeners(proxy: ProxyInfo, ctx: PushContext) -> dict[str, Any]:
    """One listener per inbound port of a proxyless gRPC node (none for a client-only node)."""
    return {server_listener_name(proxy.ip, p.port): server_listener(proxy, p.port, ctx) for p in proxy.inbound}
