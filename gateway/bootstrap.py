"""Envoy bootstrap rendering: what an Envoy (gateway or sidecar) or a proxyless gRPC client starts with.

The bootstrap carries the node (id, metadata from ``ProxyInfo.metadata``, locality), one static cluster pointing
at the control plane's ADS server, and ``dynamic_resources`` taking listeners and clusters (and, through them,
routes, endpoints and secrets) from ADS over gRPC, state of the world (``GRPC``) or delta (``DELTA_GRPC``). The
stream authenticates with a per-workload bearer token sent as gRPC ``initial_metadata``; the rendered file holds
that token, so ``write_bootstrap`` writes it mode 0600. Admin listens on loopback only.

Exception tree (this module)::

    BootstrapError (ValueError)   an argument that cannot make a bootstrap (names it)
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from discovery.model import Locality
from gateway.context import ProxyInfo, ProxyKind

XDS_CLUSTER = "xds-grpc"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
DOWNSTREAM_CONNECTIONS = (
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)


# The listener names a gRPC xDS server asks for (gateway.generators.proxyless.SERVER_TEMPLATE is the same).
GRPC_SERVER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"


class BootstrapError(ValueError):
    """The bootstrap cannot be rendered from the given arguments."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_port(what: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise BootstrapError(f"{what} {port} is out of range 1..65535")


def render_bootstrap(
    proxy: ProxyInfo,
    *,
    xds_host: str,
    xds_port: int,
    admin_port: int,
    token: str | None = None,
    delta: bool = False,
    locality: Locality | None = None,
    xds_tls_ca_file: str | None = None,
    max_connections: int = 50_000,
) -> dict[str, Any]:
    """A v3 Envoy bootstrap (as a JSON-shaped dict) for ``proxy``, fetching everything over ADS."""
    _check_port("xds port", xds_port)
    _check_port("admin port", admin_port)
    if not xds_host:
        raise BootstrapError("xds host is empty")
    if token is not None and (not token or any(c.isspace() for c in token)):
        raise BootstrapError("the bootstrap token is empty or contains white space")
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": XDS_CLUSTER}}
    if token is not None:
        grpc_service["initial_metadata"] = [{"key": "authorization", "value": f"Bearer {token}"}]
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    xds_cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if _is_ip(xds_host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": xds_host, "port_value": xds_port}}}}]}],
        },
        "typed_extension_protocol_options": {HTTP_PROTOCOL_OPTIONS: {
            "@type": f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {
                "connection_keepalive": {"interval": "30s", "timeout": "5s"}}},
        }},
    }
    if xds_tls_ca_file is not None:
        xds_cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"validation_context": {"trusted_ca": {"filename": xds_tls_ca_file}}},
            "sni": xds_host,
        }}
    node: dict[str, Any] = {
        "id": proxy.node_id,
        "cluster": ",".join(str(s) for s in proxy.services) or f"{proxy.kind}.{proxy.namespace}",
        "metadata": proxy.metadata(),
    }
    if locality is not None:
        node["locality"] = {"region": locality.region, "zone": locality.zone, "sub_zone": locality.cluster}
    return {
        "node": node,
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"clusters": [xds_cluster]},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "layered_runtime": {"layers": [
            {"name": "static", "static_layer": {}},
            {"name": "admin", "admin_layer": {}},
        ]},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": DOWNSTREAM_CONNECTIONS, "max_active_downstream_connections": max_connections},
        }]},
    }


def add_health_listener(bootstrap: dict[str, Any], *, port: int, admin_port: int,
                        address: str = "0.0.0.0") -> dict[str, Any]:
    """Add a static listener on ``address:port`` answering ``GET /healthz/ready`` from Envoy's own admin
    ``/ready`` (200 once Envoy has its first listeners and clusters, 503 before and while draining), so that
    kubelet can probe readiness while admin stays on loopback. Returns ``bootstrap``, changed in place."""
    return add_admin_listener(bootstrap, name="health", port=port, admin_port=admin_port, address=address,
                              routes={"/healthz/ready": "/ready"})


def add_admin_listener(bootstrap: dict[str, Any], *, name: str, port: int, admin_port: int,
                       routes: Mapping[str, str], address: str = "0.0.0.0") -> dict[str, Any]:
    """Add a static listener ``name`` on ``address:port`` serving exactly ``routes`` (path -> admin path) from
    Envoy's loopback admin, so that only those paths are reachable from outside (health, Prometheus)."""
    _check_port(f"{name} port", port)
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    static = bootstrap.setdefault("static_resources", {})
    static.setdefault("listeners", []).append({
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [{
                    "name": name, "domains": ["*"],
                    "routes": [{"match": {"path": path}, "route": {"cluster": "envoy-admin", "prefix_rewrite": to}}
                               for path, to in routes.items()],
                }]},
                "http_filters": [router],
            },
        }]}],
    })
    clusters = static.setdefault("clusters", [])
    if not any(c.get("name") == "envoy-admin" for c in clusters):
        clusters.append({
            "name": "envoy-admin",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "envoy-admin", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}}]}]},
        })
    return bootstrap


def render_grpc_bootstrap(proxy: ProxyInfo, *, xds_host: str, xds_port: int, locality: Locality | None = None,
                          cert_file: str | None = None, key_file: str | None = None, ca_file: str | None = None,
                          refresh_s: int = 600, xds_tls: bool = False) -> dict[str, Any]:
    """A bootstrap for gRPC's own xDS client (``GRPC_XDS_BOOTSTRAP``): plaintext to a loopback control plane.

    With ``cert_file``/``key_file``/``ca_file`` it declares the ``default`` certificate provider instance (gRPC's
    ``file_watcher`` plugin) that the generated clusters' mTLS refers to. gRPC's bootstrap has no per-stream
    metadata, so the bearer token of Envoy's bootstrap has no equivalent here. With ``xds_tls`` the control-plane
    channel is mutual TLS with that same certificate (``channel_creds`` type ``tls``, gRFC A65), which the control
    plane's certificate-authenticated ADS listener accepts as the workload's identity (``gateway.peerauth``).
    ``server_listener_resource_name_template`` names the listeners a gRPC xDS server asks for
    (``gateway.generators.proxyless``)."""
    if proxy.kind is not ProxyKind.GRPC:
        raise BootstrapError(f"proxy {proxy.node_id} is a {proxy.kind}, not a proxyless gRPC client")
    _check_port("xds port", xds_port)
    node: dict[str, Any] = {"id": proxy.node_id, "metadata": proxy.metadata()}
    if locality is not None:
        node["locality"] = {"region": locality.region, "zone": locality.zone, "sub_zone": locality.cluster}
    out: dict[str, Any] = {
        "xds_servers": [{
            "server_uri": f"{xds_host}:{xds_port}",
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": node,
        "server_listener_resource_name_template": GRPC_SERVER_TEMPLATE,
    }
    files = (cert_file, key_file, ca_file)
    if xds_tls and not all(files):
        raise BootstrapError("mutual TLS to the control plane (xds_tls) needs cert_file, key_file and ca_file")
    if any(files):
        if not all(files):
            raise BootstrapError("a gRPC certificate provider needs cert_file, key_file and ca_file together")
        if xds_tls:
            out["xds_servers"][0]["channel_creds"] = [{"type": "tls", "config": {
                "certificate_file": cert_file, "private_key_file": key_file, "ca_certificate_file": ca_file,
                "refresh_interval": f"{refresh_s}s"}}]
        out["certificate_providers"] = {"default": {"plugin_name": "file_watcher", "config": {
            "certificate_file": cert_file, "private_key_file": key_file, "ca_certificate_file": ca_file,
            "refresh_interval": f"{refresh_s}s"}}}
    return out


def to_yaml(bootstrap: dict[str, Any]) -> str:
    return yaml.safe_dump(bootstrap, sort_keys=False, default_flow_style=False)


def to_json(bootstrap: dict[str, Any]) -> str:
    return json.dumps(bootstrap, indent=2)


def write_bootstrap(path: Path, bootstrap: dict[str, Any]) -> Path:
    """Write ``bootstrap`` as YAML (``.yaml``/``.yml``) or JSON, mode 0600 (it holds the stream's token)."""
    text = to_yaml(bootstrap) if path.suffix in (".yaml", ".yml") else to_json(bootstrap)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)
    return path
