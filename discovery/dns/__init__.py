"""The ``clusterset.local`` DNS server of the Multi-Cluster Services API (KEP-1645, DNS specification 1.0.0).

``discovery.dns.table`` turns a :class:`discovery.model.Registry` into an immutable table of precomputed wire
answers (pure); ``discovery.dns.server`` serves such a table over UDP and TCP and swaps it whole on update.

No module of this package may be called ``dns.py``: it would shadow dnspython's ``dns`` package.

Exception tree (this package)::

    DiscoveryError                      (discovery.model)
     +-- DnsError
          +-- DnsBindError        the server could not bind its UDP and TCP sockets on one host:port
"""

from __future__ import annotations

from discovery.dns.table import (
    APEX,
    DNS_VERSION,
    NEGATIVE_TTL,
    SERVICE_TTL,
    VERSION_TTL,
    DnsError,
    DnsTable,
    Record,
    build_table,
)

__all__ = [
    "APEX",
    "DNS_VERSION",
    "NEGATIVE_TTL",
    "SERVICE_TTL",
    "VERSION_TTL",
    "DnsError",
    "DnsTable",
    "Record",
    "build_table",
]
