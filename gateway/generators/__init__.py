"""Pure xDS generators: one module per xDS type, registered here by type URL (the single registration point).

A generator is ``(proxy, names, ctx) -> {resource name: message}``: ``names`` is the set the proxy subscribed to
(``None`` for a wildcard subscription, everything the proxy needs); messages are ``xds-protos`` Envoy v3 messages.
``generate_all`` builds one proxy's whole configuration in the shape ``Snapshot.build`` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from gateway.context import ProxyInfo, PushContext
from gateway.generators import cds, eds, lds, rds, sds
from gateway.generators.common import type_url

Generator = Callable[[ProxyInfo, frozenset[str] | None, PushContext], dict[str, Any]]

CLUSTER_TYPE = type_url(cluster_pb2.Cluster)
ENDPOINT_TYPE = type_url(endpoint_pb2.ClusterLoadAssignment)
LISTENER_TYPE = type_url(listener_pb2.Listener)
ROUTE_TYPE = type_url(route_pb2.RouteConfiguration)
SECRET_TYPE = type_url(secret_pb2.Secret)

GENERATORS: Mapping[str, Generator] = MappingProxyType({
    CLUSTER_TYPE: cds.generate,
    ENDPOINT_TYPE: eds.generate,
    LISTENER_TYPE: lds.generate,
    ROUTE_TYPE: rds.generate,
    SECRET_TYPE: sds.generate,
})


class UnknownTypeError(KeyError):
    """No generator is registered for the requested type URL."""


def generate(type_url_: str, proxy: ProxyInfo, names: frozenset[str] | None, ctx: PushContext) -> dict[str, Any]:
    try:
        generator = GENERATORS[type_url_]
    except KeyError as exc:
        raise UnknownTypeError(f"no xDS generator for type {type_url_!r} (known: {sorted(GENERATORS)})") from exc
    return generator(proxy, names, ctx)


def generate_all(
    proxy: ProxyInfo, ctx: PushContext, *, types: tuple[str, ...] | None = None
) -> dict[str, dict[str, Any]]:
    """Every resource ``proxy`` needs, by type URL (``types`` restricts which types)."""
    return {t: GENERATORS[t](proxy, None, ctx) for t in (types or tuple(GENERATORS))}


__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "GENERATORS",
    "LISTENER_TYPE",
    "ROUTE_TYPE",
    "SECRET_TYPE",
    "Generator",
    "UnknownTypeError",
    "generate",
    "generate_all",
]
