"""The asyncio UDP and TCP server for ``clusterset.local``: answers from a precomputed :class:`DnsTable`.

Hot path: a well-formed query (one question, no answer/authority records, optionally one EDNS0 OPT record) whose
question is in the table is answered by concatenating the client's ID, the precomputed header (with the client's
RD bit), the client's own question bytes (so the case the client chose comes back, for 0x20 randomisation) and the
precomputed records. Everything else goes through :meth:`DnsServer.respond`'s careful path, which parses by hand
(dnspython validates the rare messages carrying extra records) and answers:

- nothing, for packets too short to carry an ID or that are responses (QR set);
- FORMERR for anything that does not parse, NOTIMP for opcodes other than QUERY, BADVERS for EDNS versions above 0;
- REFUSED for names outside ``clusterset.local`` (and the PTRs of ClusterSetIPs), for classes other than IN and
  for zone transfers;
- NXDOMAIN or NOERROR/NODATA with the zone's SOA in the authority section for names the table does not answer.

Over UDP an answer larger than 512 bytes, or than the EDNS payload size the client advertised, first loses its
additional section, then is replaced by an empty answer with TC set; over TCP the full answer is sent.

The table is replaced whole: :meth:`DnsServer.update` builds a new one in a worker thread and swaps one reference.

Errors: :class:`DnsBindError` (a :class:`discovery.dns.table.DnsError`) when UDP and TCP cannot bind one port.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import dns.message

from discovery.dns.table import (
    ANY,
    APEX_WIRE,
    AXFR,
    IN,
    IXFR,
    OPT_RR,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    UDP_PAYLOAD,
    DnsError,
    DnsTable,
    Entry,
    build_table,
)
from discovery.model import Registry, cluster_id

log = logging.getLogger("meshfed.dns")
T = TypeVar("T")

TCP_IDLE_SECONDS = 10.0
TCP_MAX_BUFFER = 65535 + 2
UDP_SOCKET_BUFFER = 4 * 1024 * 1024


class DnsBindError(DnsError):
    """UDP and TCP could not both bind the requested host:port."""


def _error(data: bytes, rcode: int, *, question_end: int = 0) -> bytes:
    """A header-only (or header plus echoed question) error answer keeping the query's ID, opcode and RD."""
    ident = data[:2]
    flags = data[2] if len(data) > 2 else 0
    qd = 1 if question_end else 0
    head = bytes((0x80 | (flags & 0x79), rcode)) + struct.pack("!HHHH", qd, 0, 0, 0)
    return ident + head + (data[12:question_end] if question_end else b"")


class DnsServer:
    """Serves ``clusterset.local`` on one host:port over UDP and TCP.

    Use as an async context manager; ``port=0`` picks a port free for both protocols (see :attr:`port`).
    ``sockets`` serves on a UDP and a TCP socket bound elsewhere instead (inside another network namespace, say,
    or handed over by a service manager); :attr:`host` and :attr:`port` are then theirs, and closing the server
    closes them.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        table: DnsTable | None = None,
        registry: Registry | None = None,
        sockets: tuple[socket.socket, socket.socket] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        if sockets is not None:
            udp_sock, tcp_sock = sockets
            if udp_sock.type != socket.SOCK_DGRAM or tcp_sock.type != socket.SOCK_STREAM:
                raise DnsBindError(f"sockets must be (UDP, TCP), got ({udp_sock.type!r}, {tcp_sock.type!r})")
            self.host, self.port = udp_sock.getsockname()[:2]
        self._sockets = sockets
        if table is None:
            table = build_table(registry if registry is not None else Registry(local=cluster_id("local")))
        self._table = table
        self._answers = table.answers
        self._generation = 0
        self._installed = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Transport] = set()
        self.stats = {"slow": 0, "dropped": 0, "errors": 0}  # careful-path answers, responses ignored, bugs

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sockets is not None:
            udp_sock, tcp_sock = self._sockets
            self._udp, _proto = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp_sock)
            _grow_buffers(udp_sock)
            self._tcp = await loop.create_server(lambda: _TcpProtocol(self), sock=tcp_sock)
            log.info("dns.listening host=%s port=%d services=%d (given sockets)", self.host, self.port,
                     self._table.services)
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        last: OSError | None = None
        for _ in range(1 if self.port else 20):
            udp: asyncio.DatagramTransport | None = None
            try:
                udp, _proto = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, self.port), family=family
                )
                port = int(udp.get_extra_info("sockname")[1])
                _grow_buffers(udp.get_extra_info("socket"))
                tcp = await loop.create_server(
                    lambda: _TcpProtocol(self), host=self.host, port=port, family=family, reuse_address=True
                )
            except OSError as exc:
                last = exc
                if udp is not None:
                    udp.close()
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            log.info("dns.listening host=%s port=%d services=%d", self.host, port, self._table.services)
            return
        raise DnsBindError(f"cannot bind UDP and TCP on {self.host}:{self.port}: {last}") from last

    async def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            for transport in list(self._connections):  # else wait_closed() waits for idle clients to leave
                transport.close()
            await self._tcp.wait_closed()
            self._tcp = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        log.info("dns.closed host=%s port=%d", self.host, self.port)

    # -- table ----------------------------------------------------------------------------------------------------

    @property
    def table(self) -> DnsTable:
        return self._table

    def set_table(self, table: DnsTable) -> None:
        """Install a prebuilt table (one reference swap)."""
        self._table = table
        self._answers = table.answers
        log.info("dns.table serial=%d services=%d skipped=%d", table.serial, table.services, len(table.skipped))

    async def update(
        self, registry: Registry, *, serial: int | None = None, nameserver_addresses: Sequence[str] = ()
    ) -> DnsTable:
        """Build the table for ``registry`` in a worker thread, then swap it in, unless a later update already
        installed a newer one. ``serial`` is the SOA serial (default: the registry's revision)."""
        self._generation += 1
        generation = self._generation
        table = await asyncio.to_thread(
            build_table, registry, serial=serial, nameserver_addresses=nameserver_addresses
        )
        if generation > self._installed:
            self._installed = generation
            self.set_table(table)
        return table

    # -- answering ------------------------------------------------------------------------------------------------

    def respond(self, data: bytes, *, tcp: bool) -> bytes | None:
        """The answer to one DNS message, or None when nothing must be sent. Never raises."""
        try:
            if len(data) >= 17 and not data[2] & 0xF8 and data[4:10] == b"\x00\x01\x00\x00\x00\x00":
                end = data.find(b"\x00", 12) + 5
                if end > 16:
                    entry = self._answers.get(data[12:end].lower())
                    if entry is not None:
                        ar = data[10:12]
                        if ar == b"\x00\x00":
                            if len(data) == end:
                                v = entry[1] if tcp else entry[0]
                                return b"".join((data[:2], v[0][data[2] & 1], data[12:end], v[1]))
                        elif (
                            ar == b"\x00\x01"
                            and data[end : end + 3] == b"\x00\x00\x29"
                            and len(data) >= end + 11
                            and data[end + 6] == 0
                            and end + 11 + int.from_bytes(data[end + 9 : end + 11]) == len(data)
                        ):
                            return self._edns_answer(data, end, entry, tcp=tcp)
            self.stats["slow"] += 1
            return self._careful(data, tcp=tcp)
        except Exception:  # the server must never die on a packet
            self.stats["errors"] += 1
            log.exception("dns.error size=%d", len(data))
            return _error(data, RCODE_SERVFAIL) if len(data) >= 2 else None

    def _edns_answer(self, data: bytes, end: int, entry: Entry, *, tcp: bool) -> bytes:
        if tcp:
            v = entry[3]
        else:
            limit = max(UDP_PAYLOAD, int.from_bytes(data[end + 3 : end + 5]))
            for v in entry[2]:
                if v[2] <= limit:
                    break
        return b"".join((data[:2], v[0][data[2] & 1], data[12:end], v[1]))

    def _careful(self, data: bytes, *, tcp: bool) -> bytes | None:
        size = len(data)
        if size < 2:
            return None
        if size < 12:
            return _error(data, RCODE_FORMERR)
        if data[2] & 0x80:
            self.stats["dropped"] += 1
            return None  # a response: never answer one (no loops between servers)
        if (data[2] >> 3) & 0x0F != 0:
            return _error(data, RCODE_NOTIMP)
        qd, an, ns, ar = struct.unpack_from("!HHHH", data, 4)
        if qd != 1:
            return _error(data, RCODE_FORMERR)
        # The question name, label by label (no compression allowed in the first name of a message).
        pos, starts = 12, []
        while True:
            if pos >= size:
                return _error(data, RCODE_FORMERR)
            length = data[pos]
            if length == 0:
                pos += 1
                break
            if length > 63 or pos + 1 + length >= size:
                return _error(data, RCODE_FORMERR)
            starts.append(pos)
            pos += 1 + length
            if pos - 12 > 254:
                return _error(data, RCODE_FORMERR)
        if pos + 4 > size:
            return _error(data, RCODE_FORMERR)
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        qend = pos + 4
        # EDNS: (present, version, payload size)
        edns, version, payload = False, 0, UDP_PAYLOAD
        if an == 0 and ns == 0 and ar == 0:
            if size != qend:
                return _error(data, RCODE_FORMERR)
        else:
            try:
                message = dns.message.from_wire(data)
            except Exception:  # dnspython raises many kinds of errors on garbage: all mean FORMERR here
                return _error(data, RCODE_FORMERR)
            if message.edns >= 0:
                edns, version, payload = True, message.edns, max(UDP_PAYLOAD, message.payload)
        if edns and version != 0:
            # BADVERS (16): upper 8 bits of the extended RCODE travel in the OPT record's TTL.
            opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 1 << 24, 0)
            head = bytes((0x84 | (data[2] & 0x01), 0)) + struct.pack("!HHHH", 1, 0, 0, 1)
            return data[:2] + head + data[12:qend] + opt
        if qclass not in (IN, ANY) or qtype in (AXFR, IXFR):
            return _error(data, RCODE_REFUSED, question_end=qend)
        qname = data[12:pos].lower()
        entry = self._answers.get(qname + struct.pack("!HH", qtype, IN))
        if entry is not None:
            if edns:
                v = entry[3] if tcp else next((v for v in entry[2] if v[2] <= payload), entry[2][-1])
            else:
                v = entry[1] if tcp else entry[0]
            return b"".join((data[:2], v[0][data[2] & 1], data[12:qend], v[1]))
        apex_at = pos - len(APEX_WIRE)
        if apex_at not in starts or data[apex_at:pos].lower() != APEX_WIRE:
            return _error(data, RCODE_REFUSED, question_end=qend)
        table = self._table
        rcode = 0 if qname in table.names else RCODE_NXDOMAIN
        head = bytes((0x84 | (data[2] & 0x01), rcode)) + struct.pack("!HHHH", 1, 0, 1, int(edns))
        soa = struct.pack("!H", 0xC000 | apex_at) + table.soa_tail
        return b"".join((data[:2], head, data[12:qend], soa, OPT_RR if edns else b""))


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # not a subclass on every Python version

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        answer = self.server.respond(data, tcp=False)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns.udp_error error=%s", exc)


class _TcpProtocol(asyncio.Protocol):
    """Length-prefixed DNS over TCP (RFC 7766): pipelined queries answered in order; idle connections closed."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server._connections.add(self.transport)
        self._arm()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if self.transport is not None:
            self.idle = asyncio.get_running_loop().call_later(TCP_IDLE_SECONDS, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        self.buffer += data
        if len(self.buffer) > TCP_MAX_BUFFER * 4:
            self.transport.close()
            return
        while len(self.buffer) >= 2:
            length = int.from_bytes(self.buffer[:2])
            if len(self.buffer) < 2 + length:
                break
            message = bytes(self.buffer[2 : 2 + length])
            del self.buffer[: 2 + length]
            answer = self.server.respond(message, tcp=True)
            if answer is None:
                self.transport.close()
                return
            self.transport.write(len(answer).to_bytes(2) + answer)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if self.transport is not None:
            self.server._connections.discard(self.transport)
        self.transport = None


def _grow_buffers(sock: socket.socket | None) -> None:
    """Bigger socket buffers absorb bursts from many clients (the kernel caps them at net.core.*mem_max)."""
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER)
        except OSError as exc:
            log.debug("dns.socket_buffer option=%d error=%s", option, exc)


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` on uvloop when it is installed (more answers per second, see bench/dns.py), else asyncio."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
