"""LDS for sidecars in capture mode (``MESHFED_CAPTURE=redirect``): the virtual listeners that the pod's iptables
rules (``meshfed proxy capture``, docs/traffic-capture.md) redirect every TCP connection to.

``virtualOutbound`` on ``outbound_port`` (15001) of every ``capture_bind`` address
    The ``original_dst`` listener filter restores the address the workload dialled, and filter chains match it
    (``prefix_ranges`` = the IPs, ``destination_port`` = the port). The destinations are every ClusterSetIP of a
    ServiceImport, every cluster IP of a local Service and every ClusterSetIP of a peer's service
    (docs/peering.md), on each TCP port. The port's protocol
    (``discovery.protocols``: ``appProtocol``, then the port name, else TCP) picks the chain:

    - HTTP (``http``, ``http2``, ``grpc``, ``grpc-web``): one chain per port, ``http:<port>``, holding every HTTP
      destination on it, with the sidecar's outbound HTTP connection manager: routes from RDS ``outbound`` by
      ``Host`` (the same routes, retries, splits and telemetry as the explicit listener);
    - anything else: a chain per destination, ``tcp_proxy`` to the service's outbound cluster
      ``outbound|<port>||<host>`` (the same mTLS, SNI ``outbound_.<port>_._.<svc>.<ns>.svc.clusterset.local``,
      endpoints and failover as HTTP).

    A headless service's destinations are its pods (each address and port its clients may dial, as DNS hands them
    out), each a TCP chain to the port's ORIGINAL_DST cluster ``outbound-pod|<port>||<host>``: mTLS to the very
    pod dialled (``pod_chains_of``).

    Any other destination takes the default filter chain, as the clusterset's ``outboundTrafficPolicy.mode``
    says: ``ALLOW_ANY`` relays it to ``PassthroughCluster`` (ORIGINAL_DST: where the workload wanted to go),
    ``REGISTRY_ONLY`` to ``BlackHoleCluster`` (no endpoints: the connection is closed).
    Chains are built per service and shared by the sidecars of one identity (the pipeline's ``lds-capture``).

``virtualInbound`` on ``inbound_capture_port`` (15006), likewise
    ``original_dst`` again, and one filter chain per workload port (``destination_port``), each requiring mTLS
    (client certificate checked against the trust bundle, SPIFFE ID in the trust domain, from SDS). HTTP ports:
    the inbound connection manager of the explicit listeners (XFCC, RBAC, telemetry); TCP ports: the network RBAC
    filter (``gateway.rbac.network_rbac_filters``) then ``tcp_proxy``; both to ``inbound|<port>``, the app on
    127.0.0.1. No default chain: a connection to a port the sidecar does not serve is closed.

The listener does not set ``use_original_dst``: that would hand a connection to another listener bound to the
dialled address (a workload dialling anything on port 15006 would land on ``virtualInbound``); the filter chains
match the restored address instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, substitution_format_string_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from google.protobuf import wrappers_pb2

from discovery.addresses import join_hostport
from discovery.clusterset import OutboundTrafficMode
from discovery.model import PeerImport, ServiceKey, ServicePort
from discovery.protocols import NOT_TCP, is_http, port_protocol
from gateway import rbac
from gateway.context import (
    InboundPort,
    ProxyInfo,
    PushContext,
    inbound_cluster_name,
    outbound_cluster_name,
    peer_cluster_name,
    pod_cluster_name,
)
from gateway.generators import inbound_authz
from gateway.generators.common import TLS_TRANSPORT_SOCKET, downstream_tls, pack, socket_address
from gateway.generators.hcm import hcm_filter, inbound_hcm, sidecar_outbound_hcm, tcp_proxy_filter

VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"


def _original_dst() -> Any:
    return listener_components_pb2.ListenerFilter(name=ORIGINAL_DST_FILTER,
                                                  typed_config=pack(original_dst_pb2.OriginalDst()))


def _bind(proxy: ProxyInfo, port: int) -> dict[str, Any]:
    """A virtual listener's addresses: the first bind address, the others (``::`` beside ``0.0.0.0``) as additional
    addresses, each its own socket (IPv6 ones v6-only, so ``0.0.0.0`` and ``::`` share the port)."""
    first, *rest = proxy.capture_bind
    return {"address": socket_address(first, port),
            "additional_addresses": [listener_pb2.AdditionalAddress(address=socket_address(a, port)) for a in rest]}


def _u32(value: int) -> Any:
    return wrappers_pb2.UInt32Value(value=value)


def _prefix(ip: str) -> Any:
    return address_pb2.CidrRange(address_prefix=ip, prefix_len=_u32(32 if ipaddress.ip_address(ip).version == 4
                                                                    else 128))


def service_ips(key: ServiceKey, ctx: PushContext) -> list[str]:
    """The addresses a captured workload may dial for ``key``: its ClusterSetIPs (the ServiceImport), then the
    local Service's cluster IP."""
    out: list[str] = []
    imp = ctx.registry.imports.get(key)
    if imp is not None:
        out.extend(imp.ips)
    local = ctx.registry.service(ctx.local, key)
    if local is not None and local.cluster_ip and not local.headless:
        out.append(local.cluster_ip)
    return list(dict.fromkeys(out))


# ---- virtualOutbound ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    """One address and port a captured workload may dial for a service. ``chain``: its own filter chain (TCP
    ports); None for an HTTP port, whose destinations share one chain per port (:func:`virtual_outbound`)."""

    ip: str
    port: int
    chain: Any = None


def outbound_chains_of(key: ServiceKey, ports: tuple[ServicePort, ...], ctx: PushContext) -> list[Destination]:
    """The virtual outbound listener's destinations of one callable service: every address (:func:`service_ips`)
    on every TCP port; a TCP port's destinations carry their ``tcp_proxy`` chain."""
    if ctx.headless(key):
        return pod_chains_of(key, ports, ctx)
    return _destinations(service_ips(key, ctx), ports, key.clusterset_host,
                         lambda port: outbound_cluster_name(key, port))


def pod_chains_of(key: ServiceKey, ports: tuple[ServicePort, ...], ctx: PushContext) -> list[Destination]:
    """A headless service's destinations: each pod address and port its clients may dial
    (``PushContext.pod_destinations``), every protocol as TCP, to the port's ORIGINAL_DST cluster: the connection
    goes to the pod dialled, over mTLS, and that pod's sidecar applies its HTTP handling and policies."""
    out: list[Destination] = []
    for port in sorted(ports):
        if port_protocol(port) == NOT_TCP:
            continue
        for ip, number in ctx.pod_destinations(key, port):
            out.append(Destination(ip, number, listener_components_pb2.FilterChain(
                name=f"{join_hostport(ip, number)}|{key.clusterset_host}|pod",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    prefix_ranges=[_prefix(ip)], destination_port=_u32(number)),
                filters=[tcp_proxy_filter(pod_cluster_name(key, port.port))],
            )))
    return out


def outbound_chain_inputs(key: ServiceKey, ports: tuple[ServicePort, ...], ctx: PushContext) -> Hashable:
    """Everything :func:`outbound_chains_of` reads for ``key``: equal inputs, equal destinations (an endpoint
    change touches only headless services' chains)."""
    if ctx.headless(key):
        return (ports, True, tuple(tuple(ctx.pod_destinations(key, p)) for p in sorted(ports)))
    return (ports, False, tuple(service_ips(key, ctx)))


def peer_chains_of(imp: PeerImport) -> list[Destination]:
    """The virtual outbound listener's destinations of a peer's service: its ClusterSetIP on every TCP port."""
    return _destinations(list(imp.ips), imp.ports, imp.host, lambda port: peer_cluster_name(imp, port))


def _destinations(ips: list[str], ports: tuple[ServicePort, ...], host: str,
                  cluster_of: Callable[[int], str]) -> list[Destination]:
    out: list[Destination] = []
    for port in sorted(ports):
        protocol = port_protocol(port)
        if protocol == NOT_TCP:
            continue
        for ip in ips:
            if is_http(protocol):
                out.append(Destination(ip, port.port))
                continue
            out.append(Destination(ip, port.port, listener_components_pb2.FilterChain(
                name=f"{join_hostport(ip, port.port)}|{host}|{protocol}",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    prefix_ranges=[_prefix(ip)], destination_port=_u32(port.port)),
                filters=[tcp_proxy_filter(cluster_of(port.port))],
            )))
    return out


def default_outbound_chain(ctx: PushContext) -> Any:
    """Where a connection to no known destination goes (the clusterset's outbound traffic policy)."""
    target = PASSTHROUGH_CLUSTER if ctx.outbound_mode is OutboundTrafficMode.ALLOW_ANY else BLACKHOLE_CLUSTER
    return listener_components_pb2.FilterChain(name=target, filters=[tcp_proxy_filter(target)])


def http_chain_name(port: int) -> str:
    return f"http:{port}"


def virtual_outbound(proxy: ProxyInfo, ctx: PushContext, pieces: list[list[Destination]] | None = None) -> Any:
    """The virtual outbound listener (``pieces``: the destinations of each service in service order, if already
    built). HTTP destinations share one chain per port (``http:<port>``, every such address in its prefix ranges:
    the connection manager routes by ``Host``), so the listener holds one connection manager per HTTP port, not
    per service. A destination claimed by two services keeps the first's (Envoy rejects two chains with one
    match)."""
    if pieces is None:
        pieces = [outbound_chains_of(key, ports, ctx) for key, ports in ctx.outbound_services()]
        pieces += [peer_chains_of(imp) for imp in ctx.registry.peers]
    seen: set[tuple[str, int]] = set()
    tcp_chains = []
    http_ips: dict[int, list[str]] = {}
    for piece in pieces:
        for dest in piece:
            if (dest.ip, dest.port) in seen:
                continue
            seen.add((dest.ip, dest.port))
            if dest.chain is None:
                http_ips.setdefault(dest.port, []).append(dest.ip)
            else:
                tcp_chains.append(dest.chain)
    chains = []
    if http_ips:
        hcm = hcm_filter(sidecar_outbound_hcm(proxy, ctx))  # telemetry names the identity: one per scope
        chains = [listener_components_pb2.FilterChain(
            name=http_chain_name(port),
            filter_chain_match=listener_components_pb2.FilterChainMatch(
                prefix_ranges=[_prefix(ip) for ip in ips], destination_port=_u32(port)),
            filters=[hcm],
        ) for port, ips in sorted(http_ips.items())]
    return listener_pb2.Listener(
        name=VIRTUAL_OUTBOUND,
        **_bind(proxy, proxy.outbound_port),
        listener_filters=[_original_dst()],
        filter_chains=[*chains, *tcp_chains],
        default_filter_chain=default_outbound_chain(ctx),
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
    )


def outbound_listeners(proxy: ProxyInfo, ctx: PushContext) -> dict[str, Any]:
    return {VIRTUAL_OUTBOUND: virtual_outbound(proxy, ctx)}


# ---- virtualInbound -----------------------------------------------------------------------------------------------


def inbound_service_port(proxy: ProxyInfo, inbound: InboundPort, ctx: PushContext) -> ServicePort | None:
    """The Service port an inbound port serves: among the proxy's local Services, the port of the same name, else
    the one whose target (or own) port is the inbound port, else a Service's only port."""
    candidates = [sp for key in proxy.services
                  if (service := ctx.registry.service(ctx.local, key)) is not None for sp in service.ports]
    if inbound.name:
        named = [sp for sp in candidates if sp.name == inbound.name]
        if named:
            return named[0]
    for sp in candidates:
        target = sp.target_port if isinstance(sp.target_port, int) and sp.target_port else sp.port
        if target == inbound.port:
            return sp
    return candidates[0] if len(candidates) == 1 else None


def inbound_protocol(proxy: ProxyInfo, inbound: InboundPort, ctx: PushContext) -> str:
    """The protocol of a workload port as its Service declares it (so that callers and callee agree); without a
    Service port, the inbound port's own (``http``, or ``grpc``)."""
    sp = inbound_service_port(proxy, inbound, ctx)
    if sp is None:
        return inbound.protocol
    protocol = port_protocol(sp)
    return "tcp" if protocol == NOT_TCP else protocol


def tcp_access_logs(proxy: ProxyInfo, name: str, ctx: PushContext) -> list[Any]:
    """While AuthorizationPolicies select the workload: one line per connection to a TCP port, naming the policy
    that closed it (``termination=rbac_access_denied_matched_policy[<ns>.<policy>]``; empty when allowed)."""
    deny, allow = inbound_authz.applicable(proxy, ctx)
    if not deny and not allow:
        return []
    allow_ids = ",".join(p.policy_id for p in allow) or "-"
    line = (f"{inbound_authz.LOG_TAG} tcp chain={name} termination=%CONNECTION_TERMINATION_DETAILS% "
            f"allow_policies={allow_ids} source=%DOWNSTREAM_PEER_URI_SAN% "
            "source_subject=\"%DOWNSTREAM_PEER_SUBJECT%\" bytes_received=%BYTES_RECEIVED%\n")
    logger = stream_pb2.StdoutAccessLog(log_format=substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string=line)))
    return [accesslog_pb2.AccessLog(name=inbound_authz.STDOUT_LOGGER, typed_config=pack(logger))]


def inbound_chain(proxy: ProxyInfo, inbound: InboundPort, ctx: PushContext) -> Any:
    port = inbound.port
    name = f"inbound|{port}"
    protocol = inbound_protocol(proxy, inbound, ctx)
    if is_http(protocol):
        filters = [hcm_filter(inbound_hcm(proxy, port, ctx, name=name))]
        alpn: tuple[str, ...] = ("h2", "http/1.1")
    else:
        deny, allow = inbound_authz.applicable(proxy, ctx)
        filters = [*rbac.network_rbac_filters(deny, allow, listener_ports=inbound_authz.listener_ports(proxy, port,
                                                                                                      ctx),
                                              stat_prefix=f"inbound_{port}"),
                   tcp_proxy_filter(inbound_cluster_name(port), access_log=tcp_access_logs(proxy, name, ctx))]
        alpn = ()
    return listener_components_pb2.FilterChain(
        name=f"{name}|{protocol}",
        filter_chain_match=listener_components_pb2.FilterChainMatch(destination_port=_u32(port)),
        filters=filters,
        transport_socket=base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET,
                                                  typed_config=pack(downstream_tls(
                                                      ctx, alpn=alpn,
                                                      foreign=inbound_authz.foreign_callers(proxy, ctx)))),
    )


def virtual_inbound(proxy: ProxyInfo, ctx: PushContext) -> Any | None:
    """The virtual inbound listener; None without inbound ports (Envoy rejects a listener without filter chains)."""
    ports = list({p.port: p for p in proxy.inbound}.values())
    if not ports:
        return None
    return listener_pb2.Listener(
        name=VIRTUAL_INBOUND,
        **_bind(proxy, proxy.inbound_capture_port),
        listener_filters=[_original_dst()],
        filter_chains=[inbound_chain(proxy, p, ctx) for p in ports],
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
    )


def inbound_listeners(proxy: ProxyInfo, ctx: PushContext) -> dict[str, Any]:
    listener = virtual_inbound(proxy, ctx)
    return {} if listener is None else {VIRTUAL_INBOUND: listener}
