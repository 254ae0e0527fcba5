"""RDS: the ``outbound`` route configuration of sidecars and proxyless gRPC clients.

One virtual host per callable (service, port). Its domains are every name the workload may use for the service,
with ``:<port>``, and without a port on the service's default port (80 if it has one, else the lowest)::

    <svc>.<ns>.svc.clusterset.local   <svc>.<ns>.svc.cluster.local   <svc>.<ns>.svc   <svc>.<ns>
    <svc>                              (only for a proxy in namespace <ns>)
    <ClusterSetIP>                     (when the ServiceImport has one)
    <cluster IP>                       (when the local Service has one)

A service a peer exported to us has its own virtual hosts: ``<svc>.<ns>.svc.<peer>.clusterset.local`` and its
ClusterSetIP, to ``outbound|<port>||<that name>`` (docs/peering.md).

Without a VirtualService a virtual host has one catch-all route to the service's cluster. With one (this
cluster's VirtualService naming the service in ``hosts``), its ``http[]`` entries become the routes, in order:
matches, weighted destinations (subset clusters), retries and timeouts (``gateway.traffic``).
"""

from __future__ import annotations

from typing import Any

from envoy.config.route.v3 import route_components_pb2, route_pb2

from discovery.model import PeerImport, ServiceKey, ServicePort
from gateway.context import ProxyInfo, ProxyKind, PushContext, outbound_cluster_name, peer_cluster_name
from gateway.generators.hcm import OUTBOUND_ROUTE
from gateway.traffic import default_retry_policy, virtual_service_routes


def default_port(ports: tuple[ServicePort, ...]) -> int:
    numbers = sorted(p.port for p in ports)
    return 80 if 80 in numbers else numbers[0]


def service_hosts(proxy: ProxyInfo, key: ServiceKey, ctx: PushContext) -> list[str]:
    hosts = [
        key.clusterset_host,
        f"{key.name}.{key.namespace}.svc.cluster.local",
        f"{key.name}.{key.namespace}.svc",
        f"{key.name}.{key.namespace}",
    ]
    if proxy.namespace == key.namespace:
        hosts.append(str(key.name))
    imp = ctx.registry.imports.get(key)
    if imp is not None:
        hosts.extend(imp.ips)
    local = ctx.registry.service(ctx.local, key)
    if local is not None and local.cluster_ip and not local.headless and local.cluster_ip not in hosts:
        hosts.append(local.cluster_ip)  # what a captured workload dials for a local Service
    return hosts


def _domains(hosts: list[str], port: int, is_default: bool) -> list[str]:
    domains = [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts]
    return domains + hosts if is_default else domains


def _default_routes(cluster: str, retries: bool) -> list[Any]:
    """One catch-all route to ``cluster`` (with the default retry policy for sidecars)."""
    action = route_components_pb2.RouteAction(cluster=cluster)
    if retries:
        action.retry_policy.CopyFrom(default_retry_policy())
    return [route_components_pb2.Route(name="default", match=route_components_pb2.RouteMatch(prefix="/"),
                                       route=action)]


def virtual_host(proxy: ProxyInfo, key: ServiceKey, port: int, is_default: bool, ctx: PushContext) -> Any:
    domains = _domains(service_hosts(proxy, key, ctx), port, is_default)
    vs = ctx.policies.virtual_service(key)
    # Sidecars retry by default (failover within the request); proxyless gRPC keeps its own retry semantics.
    retries = proxy.kind is ProxyKind.SIDECAR
    if vs is not None:
        ports = ctx.memo("service-ports", lambda: dict(ctx.outbound_services()))
        routes = virtual_service_routes(vs, vhost_port=port, ports=ports, default_retries=retries)
    else:
        routes = _default_routes(outbound_cluster_name(key, port), retries)
    return route_components_pb2.VirtualHost(name=f"{key.clusterset_host}:{port}", domains=domains, routes=routes)


def peer_virtual_hosts_of(proxy: ProxyInfo, imp: PeerImport) -> list[Any]:
    """The virtual hosts of a peer's service (sidecars only), one per port: its name
    ``<svc>.<ns>.svc.<peer>.clusterset.local`` and its ClusterSetIP, one catch-all route with the default retries
    (this cluster's VirtualServices name our own hosts, not a peer's)."""
    if not imp.ports or proxy.kind is not ProxyKind.SIDECAR:
        return []
    dflt = default_port(imp.ports)
    hosts = [imp.host, *imp.ips]
    return [route_components_pb2.VirtualHost(name=f"{imp.host}:{port}", domains=_domains(hosts, port, port == dflt),
                                             routes=_default_routes(peer_cluster_name(imp, port), True))
            for port in sorted({p.port for p in imp.ports})]


def virtual_hosts_of(proxy: ProxyInfo, key: ServiceKey, ports: tuple[ServicePort, ...], ctx: PushContext) -> list[Any]:
    """The virtual hosts of one callable service (one per port), as ``proxy``'s namespace and kind see them."""
    if not ports:
        return []
    dflt = default_port(ports)
    return [virtual_host(proxy, key, port, port == dflt, ctx) for port in sorted({p.port for p in ports})]


def outbound_route(proxy: ProxyInfo, ctx: PushContext, vhosts: list[Any] | None = None) -> Any:
    """The ``outbound`` route configuration (``vhosts``: its virtual hosts in service order, if already built)."""
    if vhosts is None:
        vhosts = [v for key, ports in ctx.outbound_services() for v in virtual_hosts_of(proxy, key, ports, ctx)]
        vhosts += [v for imp in ctx.registry.peers for v in peer_virtual_hosts_of(proxy, imp)]
    return route_pb2.RouteConfiguration(name=OUTBOUND_ROUTE, virtual_hosts=vhosts)


def generate(proxy: ProxyInfo, names: frozenset[str] | None, ctx: PushContext) -> dict[str, Any]:
    if proxy.kind is ProxyKind.GATEWAY:
        return {}
    # The route depends on the proxy only through its namespace (the short ``<svc>`` names) and its kind (retries).
    out = {OUTBOUND_ROUTE: ctx.memo(("rds-outbound", proxy.namespace, proxy.kind),
                                    lambda: outbound_route(proxy, ctx))}
    return out if names is None else {n: c for n, c in out.items() if n in names}
