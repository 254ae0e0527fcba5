"""Garbage never crashes the clusterset.local server: hypothesis and seeded random packets over real UDP and TCP.

The server runs in its own thread and event loop (so hypothesis can drive it from plain synchronous tests); after
every batch a valid query must still get its answer, and the server must never have hit its internal-error path.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections.abc import Iterator

import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.dns.server import DnsServer
from discovery.dns.table import APEX, build_table
from tests.discovery.test_dns_table import sample_registry
from tests.support.procs import free_tcp_udp_port

HOST = "127.0.0.1"
REVIEWS = "reviews.default.svc." + APEX


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[DnsServer]:
    loop = asyncio.new_event_loop()
    server = DnsServer(host=HOST, port=free_tcp_udp_port(HOST), table=build_table(sample_registry()))
    started = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            failed.append(exc)
            return
        finally:
            started.set()
        loop.run_forever()
        loop.run_until_complete(server.close())
        loop.close()

    thread = threading.Thread(target=run, name="dns-fuzz-server", daemon=True)
    thread.start()
    assert started.wait(10) and not failed, failed
    yield server
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    assert not thread.is_alive()


def send(port: int, payload: bytes, *, wait: float = 0.3) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(wait)
        sock.sendto(payload, (HOST, port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def still_answers(server: DnsServer) -> None:
    query = dns.message.make_query(REVIEWS, "A")
    reply = send(server.port, query.to_wire(), wait=3)
    assert reply is not None
    message = dns.message.from_wire(reply)
    assert message.id == query.id and message.rcode() == dns.rcode.NOERROR
    assert {rd.to_text() for rrset in message.answer for rd in rrset} == {"10.42.0.10"}
    assert server.stats["errors"] == 0


def check_reply(payload: bytes, reply: bytes | None) -> None:
    if reply is None:
        return
    assert len(payload) >= 2 and reply[:2] == payload[:2]  # the ID always comes back
    assert reply[2] & 0x80  # and it is a response
    dns.message.from_wire(reply, ignore_trailing=False)  # which parses


def header(ident: int, flags: int, counts: tuple[int, int, int, int]) -> bytes:
    return struct.pack("!HH", ident, flags) + struct.pack("!HHHH", *counts)


labels = st.binary(min_size=0, max_size=70).map(lambda b: bytes([min(len(b), 255)]) + b)
dnsish = st.builds(
    lambda h, names, tail: h + b"".join(names) + tail,
    st.builds(header, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
              st.tuples(*[st.sampled_from([0, 1, 2, 0xFFFF])] * 4)),
    st.lists(labels, max_size=6),
    st.binary(max_size=40),
)
mutated = st.builds(
    lambda flips, cut: bytes(
        (b ^ flips.get(i, 0)) for i, b in enumerate(dns.message.make_query(REVIEWS, "SRV").to_wire()[:cut])),
    st.dictionaries(st.integers(0, 80), st.integers(1, 255), max_size=4),
    st.integers(0, 100),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=600), dnsish, mutated))
def test_hypothesis_garbage_over_udp(threaded_server: DnsServer, payload: bytes) -> None:
    # Silence is right only for packets too short to carry an ID and for responses (QR set).
    expected = len(payload) >= 2 and not (len(payload) >= 12 and payload[2] & 0x80)
    reply = send(threaded_server.port, payload, wait=2 if expected else 0.05)
    check_reply(payload, reply)
    assert (reply is not None) == expected


def test_random_bytes_over_udp_then_a_valid_query(threaded_server: DnsServer) -> None:
    rng = random.Random(1645)
    for _ in range(300):
        payload = rng.randbytes(rng.randint(0, 512))
        expected = len(payload) >= 2 and not (len(payload) >= 12 and payload[2] & 0x80)
        reply = send(threaded_server.port, payload, wait=2 if expected else 0.01)
        check_reply(payload, reply)
        assert (reply is not None) == expected
    still_answers(threaded_server)


def test_random_frames_over_tcp_then_a_valid_query(threaded_server: DnsServer) -> None:
    rng = random.Random(2149)
    for _ in range(30):
        with socket.create_connection((HOST, threaded_server.port), timeout=2) as sock:
            body = rng.randbytes(rng.randint(0, 300))
            sock.sendall(struct.pack("!H", len(body)) + body + rng.randbytes(rng.randint(0, 3)))
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65535):
                    pass
            except OSError:
                pass
    still_answers(threaded_server)


def test_garbage_in_the_pure_responder_never_raises() -> None:
    server = DnsServer(table=build_table(sample_registry()))
    rng = random.Random(7)
    base = dns.message.make_query(REVIEWS, "A").to_wire()
    for _ in range(5000):
        if rng.random() < 0.5:
            payload = rng.randbytes(rng.randint(0, 100))
        else:
            payload = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                payload[rng.randrange(len(payload))] = rng.randrange(256)
            payload = bytes(payload[: rng.randint(0, len(payload))])
        for tcp in (False, True):
            check_reply(payload, server.respond(payload, tcp=tcp))
    assert server.stats["errors"] == 0


def _name(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


zone_labels = st.lists(st.sampled_from([b"reviews", b"default", b"svc", b"clusterset", b"local", b"ratings",
                                        b"east", b"*", b"\x00", b"A" * 63, b"xn--"]), max_size=7)
questions = st.builds(
    lambda labels, qtype, qclass, pointer: (_name(labels) if not pointer else b"\xc0\x0c") + struct.pack(
        "!HH", qtype, qclass),
    zone_labels, st.sampled_from([0, 1, 5, 6, 12, 16, 28, 33, 41, 251, 252, 255, 65535]),
    st.sampled_from([0, 1, 3, 254, 255, 65535]), st.booleans())
opt = st.builds(
    lambda size, version, options: b"\x00" + struct.pack("!HHBBHH", 41, size, 0, version, 0, len(options)) + options,
    st.integers(0, 0xFFFF), st.integers(0, 255), st.binary(max_size=24))


@settings(max_examples=400, deadline=None)
@given(ident=st.integers(0, 0xFFFF), flags=st.integers(0, 0x7FFF), qs=st.lists(questions, max_size=3),
       extra=st.lists(opt, max_size=2), qd_lie=st.integers(-1, 2), tcp=st.booleans())
def test_hypothesis_structured_queries_in_the_pure_responder(ident: int, flags: int, qs: list[bytes],
                                                             extra: list[bytes], qd_lie: int, tcp: bool) -> None:
    # Well-formed and subtly wrong queries: zone names, every type and class, self-referencing compression
    # pointers, OPT records with odd sizes and versions, counts that do not match the sections. Only questions
    # (QR clear, flags < 0x8000) so every one must be answered; the answer must parse and echo the ID.
    server = DnsServer(table=build_table(sample_registry()))
    payload = header(ident, flags, (max(0, len(qs) + qd_lie), 0, 0, len(extra))) + b"".join(qs) + b"".join(extra)
    reply = server.respond(payload, tcp=tcp)
    assert reply is not None
    check_reply(payload, reply)
    assert server.stats["errors"] == 0
