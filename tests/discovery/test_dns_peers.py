"""Services a peered clusterset exported to this one: their ClusterSetIPs (hashed like the clusterset's own, never
one an import holds) and their names ``<svc>.<ns>.svc.<peer>.clusterset.local``, asked of a real DnsServer with
``dig`` (docs/peering.md)."""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import AsyncIterator

import pytest

from discovery.dns.server import DnsServer
from discovery.dns.table import build_table
from discovery.mcs import InvalidCidr, allocate_ips, allocate_peer_ips
from discovery.model import (
    Locality,
    LocalitySummary,
    PeerImport,
    Protocol,
    RemoteEndpoints,
    ServiceImport,
    ServicePort,
    ServiceType,
    cluster_id,
    network_id,
)
from tests.discovery.test_dns_server import HOST, dig, dig_short, status
from tests.discovery.test_dns_table import key, sample_registry
from tests.support.procs import free_tcp_udp_port

CIDR = "241.0.0.0/24"
HTTP = ServicePort(9080, Protocol.TCP, "http")


def peer_import(peer: str, name: str, *, type_: ServiceType = ServiceType.CLUSTER_SET_IP) -> PeerImport:
    gateway = RemoteEndpoints(cluster=cluster_id("west"), network=network_id("net-b"), gateway_host="127.0.9.1",
                              gateway_port=15443,
                              localities=(LocalitySummary(Locality(zone="b-1a", cluster="west"), 2, 2),))
    return PeerImport(peer=peer, key=key(name), trust_domain="b.example", type=type_, ports=(HTTP,),
                      endpoints=(gateway,))


def test_peer_ips_are_stable_distinct_and_never_an_imports() -> None:
    cidr = "241.0.0.0/23"
    imports = [ServiceImport(key=k, type=ServiceType.CLUSTER_SET_IP, ports=(HTTP,), clusters=(), ips=(ip,))
               for k, ip in allocate_ips([key(f"s{i}.default") for i in range(100)], cidr).items()]
    peers = [peer_import(p, f"s{i}.default") for p in ("b", "c") for i in range(100)]
    placed = allocate_peer_ips(peers, cidr, imports)
    ips = [p.ips[0] for p in placed]
    assert len(set(ips)) == 200  # the same name under two peers gets two addresses
    assert not set(ips) & {imp.ips[0] for imp in imports}
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(cidr) for ip in ips)
    # A function of the sets alone: any member of the clusterset, in any order, gives the same answer.
    assert allocate_peer_ips(list(reversed(peers)), cidr, list(reversed(imports))) == placed
    headless = allocate_peer_ips([peer_import("b", "db.data", type_=ServiceType.HEADLESS)], cidr, imports)
    assert headless[0].ips == ()
    with pytest.raises(InvalidCidr, match="254 usable addresses, fewer than 255 services and peer services"):
        allocate_peer_ips([peer_import("d", f"t{i}.default") for i in range(255)], CIDR, [])


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    registry = sample_registry()
    peers = allocate_peer_ips([peer_import("b", "ratings.default"), peer_import("b", "db.data",
                                                                              type_=ServiceType.HEADLESS)],
                              CIDR, registry.imports.values())
    table = build_table(registry.with_peers(peers))
    assert table.skipped[-1] == "db.data.svc.b.clusterset.local: a headless service is not served across a peering"
    async with DnsServer(host=HOST, port=free_tcp_udp_port(HOST), table=table) as srv:
        yield srv
    assert srv.stats["errors"] == 0


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) is not installed")
async def test_a_peer_service_has_its_own_name_address_and_srv(server: DnsServer) -> None:
    host = "ratings.default.svc.b.clusterset.local"
    (ip,) = await dig_short(server, host, "A")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(CIDR)
    # Never merged with the clusterset's own ratings (which has its own ClusterSetIP, or none yet).
    assert ip not in await dig_short(server, "ratings.default.svc.clusterset.local", "A")
    assert await dig_short(server, host, "SRV") == {f"0 100 9080 {host}."}
    assert await dig_short(server, f"_http._tcp.{host}", "SRV") == {f"0 100 9080 {host}."}
    assert await dig_short(server, "-x", ip) == {f"{host}."}
    for parent in ("svc.b.clusterset.local", "default.svc.b.clusterset.local"):
        assert status(await dig(server, parent, "A")) == "NOERROR"
    for absent in ("db.data.svc.b.clusterset.local", "reviews.default.svc.b.clusterset.local",
                   "ratings.default.svc.c.clusterset.local"):
        assert status(await dig(server, absent, "A")) == "NXDOMAIN", absent
