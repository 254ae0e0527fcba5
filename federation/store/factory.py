"""``open_store(url)``: the ``--store`` URL of ``meshfed federation serve`` turned into a store.

Accepted forms::

    sqlite:PATH                      one SQLite file (created 0600 if missing); sqlite:///abs/path also works
    etcd://HOST:PORT[,HOST:PORT...]  an etcd cluster; an optional path sets the key prefix: etcd://h:2379/meshfed
    memory:                          the in-process fake (tests, demos; nothing survives the process)

Anything else raises ``InvalidStoreUrl`` (a ``ValueError``) naming the URL and the forms above. Opening is lazy:
the file or the connection is opened by the first call (each concrete store is also an async context manager that
opens eagerly); ``await store.close()`` releases it.

Exception tree (this module)::

    FederationError                (federation.records)
     +-- InvalidStoreUrl           also a ValueError: the URL's scheme, host, port or path is not acceptable
"""

from __future__ import annotations

from discovery.addresses import InvalidAddress, parse_hostport
from federation.records import FederationError
from federation.store.base import Store

FORMS = "sqlite:PATH, etcd://HOST:PORT[,HOST:PORT...][/PREFIX] or memory:"


class InvalidStoreUrl(FederationError, ValueError):
    """A ``--store`` URL whose scheme or address is not one we know."""


def parse_etcd_endpoints(url: str) -> tuple[list[tuple[str, int]], str]:
    """``etcd://h1:p1,h2:p2/prefix`` -> ([(h1, p1), (h2, p2)], "/prefix/")."""
    rest = url[len("etcd://"):]
    hosts, _, prefix = rest.partition("/")
    endpoints: list[tuple[str, int]] = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            address = parse_hostport(part, min_port=1)
        except InvalidAddress as exc:
            raise InvalidStoreUrl(f"store URL {url!r}: endpoint {exc}") from exc
        endpoints.append((address.host, address.port))
    if not endpoints:
        raise InvalidStoreUrl(f"store URL {url!r}: no etcd endpoint given (expected etcd://HOST:PORT)")
    key_prefix = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/meshfed/"
    return endpoints, key_prefix


def open_store(url: str) -> Store:
    """Build the store a ``--store`` URL names (see the module docstring for the forms)."""
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if path.startswith("//"):
            path = path[2:]  # sqlite:///abs/path -> /abs/path ; sqlite://rel -> rel
        if not path:
            raise InvalidStoreUrl(f"store URL {url!r}: no file path given (expected sqlite:PATH)")
        from federation.store.sqlite import SqliteStore

        return SqliteStore(path)
    if url.startswith("etcd://"):
        endpoints, prefix = parse_etcd_endpoints(url)
        from federation.store.etcd import EtcdStore

        return EtcdStore(endpoints=endpoints, prefix=prefix)
    if url in ("memory:", "memory://"):
        from federation.store.memory import MemoryStore

        return MemoryStore()
    scheme = url.partition(":")[0] if ":" in url else url
    raise InvalidStoreUrl(f"store URL {url!r}: unknown scheme {scheme!r}; expected {FORMS}")
