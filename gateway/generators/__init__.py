"""Pure xDS generators: one module per xDS type, registered here by type URL (the single registration point).

A generator is ``(proxy, names, ctx) -> {resource name: message}``: ``names`` is the set the proxy subscribed to
(``None`` for a wildcard subscription, everything the proxy needs); messages are ``xds-protos`` Envoy v3 messages.
``generate_all`` builds one proxy's whole configuration in the shape ``Snapshot.build`` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from gateway.context import ProxyInfo, PushContext
from gateway.generators import cds, eds, lds, rds, sds
from gateway.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

Generator = Callable[[ProxyInfo, frozenset[str] | None, PushContext], dict[str, Any]]

# The type URLs are defined once, in gateway.snapshot (the names here are the generators' own spelling).
CLUSTER_TYPE = CLUSTER
ENDPOINT_TYPE = ENDPOINT
LISTENER_TYPE = LISTENER
ROUTE_TYPE = ROUTE
SECRET_TYPE = SECRET

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
