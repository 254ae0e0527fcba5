"""The xDS types served, by the short names logs, metrics (lower case) and ``meshfed status`` use: one table.
The type URLs themselves are :mod:`gateway.snapshot`'s."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from gateway.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

SHORT_NAMES: Mapping[str, str] = MappingProxyType({CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS",
                                                   SECRET: "SDS"})


def short_name(type_url: str) -> str:
    """``CDS`` for the Cluster type URL and so on; a type not served here: the last part of its message name."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])
