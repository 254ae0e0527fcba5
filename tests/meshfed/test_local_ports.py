"""free_port: the ports `meshfed up` plans (and tests pick) are never handed out twice in one process, stay out of
the kernel's ephemeral range, and are really free (TCP, and UDP when asked)."""

from __future__ import annotations

import socket
from pathlib import Path

from meshfed.local import free_port


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_no_port_is_handed_out_twice() -> None:
    # `meshfed up` picks every workload's ports before starting any process: two picks must never collide, even
    # though each probe socket is closed (and its port free again) before the next pick.
    ports = [free_port() for _ in range(300)] + [free_port(udp_too=True) for _ in range(50)]
    assert len(set(ports)) == len(ports)


def test_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    low = _ephemeral_low()
    for udp in (False, True):
        port = free_port(udp_too=udp)
        if low > 4096:
            assert port < low  # an outgoing connection opened meanwhile cannot take it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
        if udp:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        return
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return  # no IPv6 loopback on this machine
    port = free_port("::1")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", port))
