"""The clusterset.local server on a free loopback port, queried with ``dig`` and with dnspython for every form.

Each test starts a real :class:`DnsServer` (UDP and TCP on one port) inside the test's event loop; ``dig`` runs as
an asyncio subprocess so the server keeps answering while the test waits for it.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from discovery.dns.server import DnsBindError, DnsServer
from discovery.dns.table import APEX, DNS_VERSION, build_table
from discovery.model import Endpoint, Protocol, Service, ServiceImport, ServicePort, ServiceType
from tests.discovery.test_dns_table import EAST, key, sample_registry
from tests.support.procs import free_tcp_udp_port

HOST = "127.0.0.1"
REVIEWS = "reviews.default.svc." + APEX
DB = "db.data.svc." + APEX
BIG = "big.data.svc." + APEX

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) is not installed")


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with DnsServer(host=HOST, port=free_tcp_udp_port(HOST), table=build_table(sample_registry())) as srv:
        yield srv
    assert srv.stats["errors"] == 0


async def dig(server: DnsServer, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "dig", f"@{HOST}", "-p", str(server.port), "+tries=1", "+time=2", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=20)
    return out.decode()


async def dig_short(server: DnsServer, name: str, type_: str) -> set[str]:
    return set((await dig(server, "+short", name, type_)).split("\n")) - {""}


async def ask(server: DnsServer, name: str, type_: str, *, tcp: bool = False, **kw: object) -> dns.message.Message:
    query = dns.message.make_query(name, type_, **kw)  # type: ignore[arg-type]
    if tcp:
        return await dns.asyncquery.tcp(query, HOST, port=server.port, timeout=3)
    return await dns.asyncquery.udp(query, HOST, port=server.port, timeout=3, raise_on_truncation=False)


def answers(message: dns.message.Message) -> set[str]:
    return {rd.to_text() for rrset in message.answer for rd in rrset}


def status(dig_output: str) -> str:
    for line in dig_output.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(f"no status in dig output:\n{dig_output}")


async def test_a_and_aaaa_of_a_cluster_set_ip_service(server: DnsServer) -> None:
    assert await dig_short(server, REVIEWS, "A") == {"10.42.0.10"}
    assert await dig_short(server, REVIEWS, "AAAA") == {"fd00:42::a"}
    out = await dig(server, REVIEWS, "A")
    assert status(out) == "NOERROR" and " aa" in out.split("flags:")[1].split(";")[0]
    reply = await ask(server, REVIEWS, "A")
    assert reply.rcode() == dns.rcode.NOERROR and answers(reply) == {"10.42.0.10"}
    assert reply.answer[0].ttl == 5 and reply.flags & dns.flags.AA
    reply = await ask(server, REVIEWS, "AAAA", tcp=True)
    assert answers(reply) == {"fd00:42::a"}


async def test_srv_for_named_ports_with_address_in_additional(server: DnsServer) -> None:
    assert await dig_short(server, "_http._tcp." + REVIEWS, "SRV") == {f"0 100 9080 {REVIEWS}"}
    reply = await ask(server, "_http._tcp." + REVIEWS, "SRV")
    assert answers(reply) == {f"0 100 9080 {REVIEWS}"}
    assert {rd.to_text() for rrset in reply.additional for rd in rrset} == {"10.42.0.10", "fd00:42::a"}


async def test_srv_on_the_bare_service_name(server: DnsServer) -> None:
    """``dig <svc>.<ns>.svc.clusterset.local SRV``, what the mcs-api conformance suite asks: one record per distinct
    port (named or not) targeting the service for a ClusterSetIP service, one per ready endpoint for a headless one."""
    assert await dig_short(server, REVIEWS, "SRV") == {f"0 100 9080 {REVIEWS}", f"0 100 9090 {REVIEWS}"}
    srv = await dig_short(server, DB, "SRV")
    assert {line.split()[3] for line in srv} == {
        f"db-0.east.{DB}", f"db-1.east.{DB}", f"db-0.west.{DB}", f"10-2-0-9.west.{DB}", f"db-2.west.{DB}"}
    reply = await ask(server, DB, "SRV", tcp=True)
    assert {rr.name.to_text() for rr in reply.additional} >= {f"db-0.east.{DB}", f"db-2.west.{DB}"}


async def test_headless_addresses_hostnames_and_srv(server: DnsServer) -> None:
    assert await dig_short(server, DB, "A") == {"10.1.0.1", "10.1.0.2", "10.2.0.1", "10.2.0.9"}
    assert answers(await ask(server, DB, "AAAA")) == {"fd00::1:5"}
    assert await dig_short(server, "db-0.west." + DB, "A") == {"10.2.0.1"}
    assert answers(await ask(server, "db-1.east." + DB, "A")) == {"10.1.0.2"}
    assert await dig_short(server, "db-2.west." + DB, "AAAA") == {"fd00::1:5"}
    assert await dig_short(server, "10-2-0-9.west." + DB, "A") == {"10.2.0.9"}
    srv = await dig_short(server, "_pg._tcp." + DB, "SRV")
    assert {line.split()[3] for line in srv} == {
        f"db-0.east.{DB}", f"db-1.east.{DB}", f"db-0.west.{DB}", f"10-2-0-9.west.{DB}", f"db-2.west.{DB}"}
    assert f"0 20 15432 db-1.east.{DB}" in srv


async def test_dns_version_txt(server: DnsServer) -> None:
    assert await dig_short(server, "dns-version." + APEX, "TXT") == {f'"{DNS_VERSION}"'}
    reply = await ask(server, "dns-version." + APEX, "TXT")
    assert answers(reply) == {f'"{DNS_VERSION}"'} and reply.answer[0].ttl == 28800


@pytest.mark.parametrize("name", [
    "nosuch.default.svc." + APEX,           # not exported
    "east.db.data.svc." + APEX,             # <clusterid>.<svc>.<ns>: forbidden by the KEP (headless)
    "west.reviews.default.svc." + APEX,     # <clusterid>.<svc>.<ns>: forbidden by the KEP (ClusterSetIP)
    "empty.data.svc." + APEX,               # headless with no ready endpoint
    "pending.default.svc." + APEX,          # no ClusterSetIP allocated yet
    "db-9.east." + DB,                      # endpoint not ready
    "_grpc._tcp." + REVIEWS,                # no such port
    "x.dns-version." + APEX,
])
async def test_nxdomain_with_soa_in_authority(server: DnsServer, name: str) -> None:
    out = await dig(server, name, "A")
    assert status(out) == "NXDOMAIN", out
    assert "AUTHORITY SECTION" in out and "\tSOA\t" in out
    reply = await ask(server, name, "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    assert reply.authority[0].rdtype == dns.rdatatype.SOA and reply.authority[0].name.to_text() == APEX


@pytest.mark.parametrize(("name", "type_"), [
    ("ratings.default.svc." + APEX, "AAAA"),   # IPv4 only
    (REVIEWS, "MX"),
    ("_http._tcp." + REVIEWS, "A"),
    ("db-0.east." + DB, "AAAA"),
    ("default.svc." + APEX, "A"),              # empty non-terminals exist
    ("_tcp." + REVIEWS, "SRV"),
    ("svc." + APEX, "A"),
    ("dns-version." + APEX, "A"),
])
async def test_nodata_is_noerror_with_soa(server: DnsServer, name: str, type_: str) -> None:
    out = await dig(server, name, type_)
    assert status(out) == "NOERROR" and "ANSWER: 0" in out and "\tSOA\t" in out, out
    reply = await ask(server, name, type_)
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
    assert reply.authority[0].rdtype == dns.rdatatype.SOA
    assert reply.authority[0].ttl == 5 and reply.authority[0][0].minimum == 5


@pytest.mark.parametrize("name", ["example.com.", "reviews.default.svc.cluster.local.", "local.", "xclusterset.local."])
async def test_refused_outside_the_zone(server: DnsServer, name: str) -> None:
    assert status(await dig(server, name, "A")) == "REFUSED"
    assert (await ask(server, name, "A")).rcode() == dns.rcode.REFUSED


async def test_zone_apex_soa_ns_and_ptr_of_cluster_set_ip(server: DnsServer) -> None:
    soa = await dig_short(server, APEX, "SOA")
    assert len(soa) == 1 and soa.pop().startswith("ns.dns.clusterset.local. hostmaster.clusterset.local.")
    assert await dig_short(server, APEX, "NS") == {"ns.dns.clusterset.local."}
    assert await dig_short(server, "-x", "10.42.0.10") == {REVIEWS}
    reverse6 = dns.reversename.from_address("fd00:42::a").to_text()
    assert answers(await ask(server, reverse6, "PTR")) == {REVIEWS}
    # reverse names the clusterset does not own are someone else's zone
    assert status(await dig(server, "-x", "10.42.0.99")) == "REFUSED"


async def test_any_returns_every_record_of_the_name(server: DnsServer) -> None:
    reply = await ask(server, REVIEWS, "ANY", tcp=True)
    assert answers(reply) == {"10.42.0.10", "fd00:42::a", f"0 100 9080 {REVIEWS}", f"0 100 9090 {REVIEWS}"}


async def test_case_insensitive_and_the_question_comes_back_as_asked(server: DnsServer) -> None:
    name = "ReViEwS.DeFault.SVC.ClusterSet.LOCAL."
    reply = await ask(server, name, "A")
    assert answers(reply) == {"10.42.0.10"}
    assert reply.question[0].name.to_text() == name  # 0x20 case randomisation survives
    assert await dig_short(server, name, "A") == {"10.42.0.10"}
    reply = await ask(server, "NoSuch.Default.Svc.ClusterSet.Local.", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN and reply.question[0].name.to_text().startswith("NoSuch")


async def test_large_answer_sets_tc_over_udp_and_tcp_has_it_all(server: DnsServer) -> None:
    ignored = await dig(server, "+ignore", "+notcp", BIG, "A")
    flags = ignored.split("flags:")[1].split(";")[0]
    assert " tc" in flags and "ANSWER: 0" in ignored
    retried = await dig(server, BIG, "A")
    assert "Truncated, retrying in TCP mode" in retried
    assert len([line for line in retried.splitlines() if line.startswith(BIG)]) == 100
    udp = await ask(server, BIG, "A")
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = await ask(server, BIG, "A", tcp=True)
    assert not tcp.flags & dns.flags.TC and len(answers(tcp)) == 100
    # a client advertising a big enough EDNS payload gets everything over UDP
    edns = await ask(server, BIG, "A", use_edns=0, payload=4096)
    assert not edns.flags & dns.flags.TC and len(answers(edns)) == 100 and edns.edns == 0
    # without EDNS the 512-byte limit applies even to the SRV answer's additional section first
    plain = await ask(server, "_pg._tcp." + BIG, "SRV", use_edns=False)
    assert plain.flags & dns.flags.TC


async def test_formerr_notimp_badvers_and_silence(server: DnsServer) -> None:
    loop = asyncio.get_running_loop()

    async def raw(payload: bytes, wait: float = 2.0) -> bytes | None:
        received: asyncio.Future[bytes] = loop.create_future()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                if not received.done():
                    received.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=(HOST, server.port))
        try:
            transport.sendto(payload)
            return await asyncio.wait_for(received, wait)
        except TimeoutError:
            return None
        finally:
            transport.close()

    garbage = b"\xab\xcd" + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x05hello\x40"
    reply = await raw(garbage)
    assert reply is not None and reply[:2] == b"\xab\xcd" and reply[2] & 0x80 and reply[3] & 0x0F == 1
    short = await raw(b"\x77\x88\x01")
    assert short is not None and short[:2] == b"\x77\x88" and short[3] & 0x0F == 1
    assert await raw(b"\x01", wait=0.5) is None  # cannot even carry an ID: ignored
    answer_packet = dns.message.make_response(dns.message.make_query(REVIEWS, "A")).to_wire()
    assert await raw(answer_packet, wait=0.5) is None  # a response is never answered
    # trailing junk after the question is a format error
    query = dns.message.make_query(REVIEWS, "A", use_edns=False).to_wire()
    reply = await raw(query + b"\x00\x00")
    assert reply is not None and reply[3] & 0x0F == 1
    # a non-QUERY opcode
    notify = dns.message.make_query(REVIEWS, "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    got = dns.message.from_wire(await raw(notify.to_wire()) or b"")
    assert got.rcode() == dns.rcode.NOTIMP
    assert "status: NOTIMP" in await dig(server, "+opcode=status", REVIEWS)
    # EDNS version 1
    assert "status: BADVERS" in await dig(server, "+edns=1", "+noednsnegotiation", REVIEWS)
    # and dig reports a FORMERR for a multi-question query built by hand
    two = bytearray(dns.message.make_query(REVIEWS, "A", use_edns=False).to_wire())
    two[4:6] = struct.pack("!H", 2)
    reply = await raw(bytes(two))
    assert reply is not None and reply[3] & 0x0F == 1
    # the server still answers
    assert answers(await ask(server, REVIEWS, "A")) == {"10.42.0.10"}


async def test_tcp_pipelined_queries_answered_in_order(server: DnsServer) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        names = [REVIEWS, "nosuch.default.svc." + APEX, DB]
        for i, name in enumerate(names):
            query = dns.message.make_query(name, "A", id=100 + i).to_wire()
            writer.write(struct.pack("!H", len(query)) + query)
        await writer.drain()
        got = []
        for _ in names:
            length = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))[0]
            got.append(dns.message.from_wire(await reader.readexactly(length)))
    finally:
        writer.close()
        await writer.wait_closed()
    assert [m.id for m in got] == [100, 101, 102]
    assert [m.rcode() for m in got] == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.NOERROR]


async def test_update_swaps_the_table_whole(server: DnsServer) -> None:
    fresh = key("fresh.default")
    registry = sample_registry()
    registry = registry.with_shard(EAST, [*registry.services(EAST),
                                          Service(EAST, fresh, (ServicePort(80, Protocol.TCP, "web"),),
                                                  endpoints=(Endpoint("10.1.5.5"),))])
    imports = {k: v for k, v in registry.imports.items() if k != key("reviews.default")}
    imports[fresh] = ServiceImport(fresh, ServiceType.CLUSTER_SET_IP, (ServicePort(80, Protocol.TCP, "web"),),
                                   (EAST,), ips=("10.42.0.77",))
    before = server.table
    table = await server.update(registry.with_catalog(clusters={}, imports=imports))
    assert server.table is table and table is not before
    assert await dig_short(server, "fresh.default.svc." + APEX, "A") == {"10.42.0.77"}
    assert status(await dig(server, REVIEWS, "A")) == "NXDOMAIN"


async def test_udp_and_tcp_share_the_port_chosen_by_the_server() -> None:
    async with DnsServer(host=HOST, port=0, table=build_table(sample_registry())) as srv:
        assert srv.port > 0
        with socket.create_connection((HOST, srv.port), timeout=2):
            pass
        assert answers(await ask(srv, REVIEWS, "A")) == {"10.42.0.10"}


async def test_close_does_not_wait_for_idle_tcp_clients() -> None:
    srv = DnsServer(host=HOST, port=0, table=build_table(sample_registry()))
    await srv.start()
    reader, writer = await asyncio.open_connection(HOST, srv.port)
    query = dns.message.make_query(REVIEWS, "A").to_wire()
    writer.write(struct.pack("!H", len(query)) + query)
    await writer.drain()
    length = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))[0]
    await reader.readexactly(length)
    await asyncio.wait_for(srv.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed the idle connection itself
    writer.close()


async def test_serves_on_sockets_bound_elsewhere() -> None:
    """Given sockets (what a server in another network namespace gets): it answers on both and closes them."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp.bind((HOST, 0))
    tcp.bind((HOST, udp.getsockname()[1]))
    async with DnsServer(sockets=(udp, tcp), table=build_table(sample_registry())) as srv:
        assert (srv.host, srv.port) == (HOST, udp.getsockname()[1])
        assert answers(await ask(srv, REVIEWS, "A")) == {"10.42.0.10"}
        assert answers(await ask(srv, REVIEWS, "A", tcp=True)) == {"10.42.0.10"}
    await asyncio.sleep(0)  # the UDP transport closes its socket on the loop's next turn
    assert udp.fileno() == -1 and tcp.fileno() == -1
    with pytest.raises(DnsBindError, match="UDP, TCP"):
        DnsServer(sockets=(socket.socket(socket.AF_INET, socket.SOCK_STREAM),) * 2)
