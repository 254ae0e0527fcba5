"""LDS: the listeners a proxy opens.

gateway   ``gateway`` on ip:gateway_port: TLS inspector, one filter chain per exported service port matching the
          SNI ``outbound_.<port>_._.<svc>.<ns>.svc.clusterset.local`` (and, for a service exported to peers, the
          peer SNI ``peer_.<port>_._...``), TCP proxy to that service's local pods.
          No default chain: plaintext or an unknown SNI matches nothing and the connection is closed. With nothing
          exported there is no listener at all (Envoy NACKs a listener without filter chains).
sidecar   ``outbound`` on 127.0.0.1:outbound_port: HTTP, routes from RDS ``outbound``; and ``inbound|<port>`` on
          ip:port per inbound port: mTLS required, XFCC set with the caller's URI SAN and Subject, RBAC from the
          AuthorizationPolicies selecting the workload (``inbound_authz``), then the workload.
          Capture mode (``MESHFED_CAPTURE=redirect``): ``virtualOutbound`` and ``virtualInbound`` instead (``capture``).
grpc      one API listener per callable ``<host>:<port>`` (what a proxyless gRPC client asks for), RDS ``outbound``.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from discovery.model import Service, ServiceKey, ServicePort
from gateway import telemetry
from gateway.context import ProxyInfo, ProxyKind, PushContext, peer_sni_name, sni_name
from gateway.generators import capture, inbound_authz, proxyless
from gateway.generators.common import TLS_TRANSPORT_SOCKET, downstream_tls, pack, socket_address
from gateway.generators.hcm import (
    OUTBOUND_ROUTE,
    TCP_PROXY_FILTER,
    hcm_filter,
    inbound_hcm,
    outbound_hcm,
    sidecar_outbound_hcm,
)

GATEWAY_LISTENER = "gateway"
OUTBOUND_LISTENER = "outbound"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"


__all__ = ["GATEWAY_LISTENER", "OUTBOUND_LISTENER", "OUTBOUND_ROUTE", "TLS_INSPECTOR", "api_listeners",
           "api_listeners_of", "gateway_chains_of", "gateway_listener", "generate", "inbound_listener",
           "inbound_listener_name", "outbound_listener", "sidecar_listeners"]


def inbound_listener_name(port: int) -> str:
    return f"inbound|{port}"


def gateway_chains_of(service: Service, ctx: PushContext) -> list[Any]:
    """The gateway listener's filter chains of one exported service: one per port, matching its SNI, and its peer
    SNI too when the service is exported to peers (docs/peering.md)."""
    chains = []
    export = ctx.registry.exports.get(ctx.local, {}).get(service.key)
    to_peers = export is not None and bool(export.peers)
    for port in service.ports:
        sni = sni_name(service.key, port.port)
        names = [sni, peer_sni_name(service.key, port.port)] if to_peers else [sni]
        chains.append(listener_components_pb2.FilterChain(
            name=sni,
            filter_chain_match=listener_components_pb2.FilterChainMatch(
                server_names=names, transport_protocol="tls"
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


def outbound_listener(proxy: ProxyInfo, ctx: PushContext | None = None) -> Any:
    return listener_pb2.Listener(
        name=OUTBOUND_LISTENER,
        address=socket_address("127.0.0.1", proxy.outbound_port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[hcm_filter(sidecar_outbound_hcm(proxy, ctx))])],
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
    )


def inbound_listener(proxy: ProxyInfo, port: int, ctx: PushContext) -> Any:
    name = inbound_listener_name(port)
    return listener_pb2.Listener(
        name=name,
        address=socket_address(proxy.ip, port),
        filter_chains=[listener_components_pb2.FilterChain(
            filters=[hcm_filter(inbound_hcm(proxy, port, ctx, name=name))],
            transport_socket=base_pb2.TransportSocket(
                name=TLS_TRANSPORT_SOCKET, typed_config=pack(downstream_tls(
                    ctx, alpn=("h2", "http/1.1"), foreign=inbound_authz.foreign_callers(proxy, ctx)))
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
            api_listener=api_listener_pb2.ApiListener(api_listener=pack(outbound_hcm(name))),
        )
    return out


def api_listeners(ctx: PushContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, ports in ctx.outbound_services():
        out |= api_listeners_of(key, ports)
    return out


def sidecar_listeners(proxy: ProxyInfo, ctx: PushContext) -> dict[str, Any]:
    """A sidecar's own listeners: outbound, and one per inbound port (capture mode: the virtual inbound one; its
    virtual outbound listener is shared by the sidecars of one identity, see ``capture``)."""
    if proxy.captured:
        return capture.inbound_listeners(proxy, ctx)
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
        if proxy.captured:
            out |= capture.outbound_listeners(proxy, ctx)
    else:
        out = dict(ctx.memo("lds-api", lambda: api_listeners(ctx)))
        out |= proxyless.server_listeners(proxy, ctx)  # a gRPC xDS server's own listeners
    return out if names is None else {n: c for n, c in out.items() if n in names}
