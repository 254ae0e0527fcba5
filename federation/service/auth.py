"""Who is calling: the cluster a request's TLS client certificate proves.

The TLS layer already refused any client without a certificate chaining to the bundle (the server's context
requires one). Here the verified chain (leaf first) goes to an ``Identify`` function, by default
``federation.trust.identity.cluster_of_peer`` against the current bundle, which returns the ``ClusterId`` bound to the
chain's intermediate, or raises. Routes that act for a cluster compare it to the path's cluster (403 on mismatch).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence

from discovery.model import ClusterId
from federation.trust.bundle import TrustBundle
from federation.trust.identity import cluster_of_peer
from federation.trust.tls import peer_chain_der

#: Maps a verified peer chain (DER certificates, leaf first) to the cluster it proves; raises if it proves none.
Identify = Callable[[Sequence[bytes]], ClusterId]


class Unauthenticated(Exception):
    """No usable client certificate on the connection (401)."""


def peer_chain(ssl_object: ssl.SSLObject | None) -> list[bytes]:
    """The peer's certificate chain (DER, leaf first), as the TLS handshake verified it."""
    if ssl_object is None:
        raise Unauthenticated("not a TLS connection")
    if not ssl_object.getpeercert(binary_form=True):
        raise Unauthenticated("no client certificate")
    return peer_chain_der(ssl_object)


def bundle_identify(bundle: Callable[[], TrustBundle]) -> Identify:
    """The production ``Identify``: the chain must verify against the current bundle and bind a cluster."""

    def identify(chain: Sequence[bytes]) -> ClusterId:
        return cluster_of_peer(chain, bundle())

    return identify
