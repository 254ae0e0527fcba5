"""``HOST:PORT``, read and written in one place: ``127.0.0.1:15010``, ``localhost:53``, ``[::1]:5353``.

Every listen flag, every address a local run records in its state, every etcd endpoint and every gateway address
goes through :func:`parse_hostport`; every address meshfed writes goes through :func:`join_hostport`, which puts
an IPv6 host in brackets.

Exception tree (this module)::

    DiscoveryError
     +-- InvalidValue
          +-- InvalidAddress   text that is not HOST:PORT (no port, a port that is not a number or out of range)
"""

from __future__ import annotations

from dataclasses import dataclass

from discovery.model import InvalidValue

MAX_PORT = 65535


class InvalidAddress(InvalidValue):
    """Text that is not ``HOST:PORT``; the message quotes it and says what is wrong."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str  # without brackets
    port: int

    def __str__(self) -> str:
        return join_hostport(self.host, self.port)


def join_hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str, *, default_host: str = "", min_port: int = 0) -> HostPort:
    """``HOST:PORT`` or ``[IPv6]:PORT`` as a :class:`HostPort`. An empty host (``:8443``) is ``default_host``, an
    error when that is empty too; the port must lie in ``min_port..65535``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or default_host
    if not sep or not host or not port:
        raise InvalidAddress(f"{text!r} must be HOST:PORT")
    if not port.isdigit():
        raise InvalidAddress(f"{text!r} must be HOST:PORT: port {port!r} is not a number")
    if not min_port <= int(port) <= MAX_PORT:
        raise InvalidAddress(f"{text!r} must be HOST:PORT: port {int(port)} is out of range {min_port}..{MAX_PORT}")
    return HostPort(host=host, port=int(port))
