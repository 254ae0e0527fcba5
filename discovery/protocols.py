"""Which application protocol a service port speaks, as Kubernetes and Istio spell it (pure).

A captured connection reaches the sidecar as bytes to an IP and a port; the port's declared protocol decides
whether the sidecar parses it as HTTP (routes, retries, splits, request telemetry, HTTP authorization) or relays
it as opaque TCP. The rules, in order (Istio's "explicit protocol selection"):

1. ``protocol: UDP`` or ``SCTP`` ports are not TCP at all: nothing is captured for them (:data:`NOT_TCP`).
2. ``appProtocol``, when it names a known protocol (case-insensitive; ``kubernetes.io/h2c`` is ``http2``,
   ``kubernetes.io/ws`` is ``http``, ``kubernetes.io/wss`` is ``https``).
3. The port name: the part before the first ``-`` (``http``, ``http-web``, ``grpc-api``, ``tcp-db``, ...);
   ``grpc-web`` is itself.
4. Anything else is ``tcp``: meshfed does not sniff protocols.

Known protocols: ``http``, ``http2``, ``grpc``, ``grpc-web`` (HTTP: the connection manager), and ``tcp``,
``tls``, ``https``, ``mongo``, ``mysql``, ``redis`` (relayed as TCP; ``tls``/``https`` pass through encrypted
end to end inside the mesh's mTLS).
"""

from __future__ import annotations

from discovery.model import Protocol, ServicePort

HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc", "grpc-web"})
TCP_PROTOCOLS = frozenset({"tcp", "tls", "https", "mongo", "mysql", "redis"})
KNOWN = HTTP_PROTOCOLS | TCP_PROTOCOLS
#: The "protocol" of a UDP or SCTP port: not captured, no listener filter chain.
NOT_TCP = "not-tcp"

_ALIASES = {"kubernetes.io/h2c": "http2", "kubernetes.io/ws": "http", "kubernetes.io/wss": "https"}


def _known(text: str) -> str:
    value = text.strip().lower()
    value = _ALIASES.get(value, value)
    return value if value in KNOWN else ""


def port_protocol(port: ServicePort) -> str:
    """The application protocol of ``port`` (one of :data:`KNOWN`, or :data:`NOT_TCP`), by the rules above."""
    if port.protocol is not Protocol.TCP:
        return NOT_TCP
    if port.app_protocol:
        found = _known(port.app_protocol)
        if found:
            return found
    if port.name:
        found = _known(port.name) if port.name == "grpc-web" else _known(port.name.split("-", 1)[0])
        if found:
            return found
    return "tcp"


def is_http(protocol: str) -> bool:
    """Whether a protocol :func:`port_protocol` returned goes through the HTTP connection manager."""
    return protocol in HTTP_PROTOCOLS


def upstream_http2(protocol: str) -> bool:
    """Whether a sidecar speaks HTTP/2 to the application on a port of this protocol (gRPC and h2c)."""
    return protocol in ("grpc", "http2")
