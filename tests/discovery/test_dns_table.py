"""The pure table builder: which names exist, which records they hold, and how the wire answers are shaped.

The registries here are built directly from ``discovery.model`` (ServiceImports constructed by hand) so these tests
do not depend on MCS derivation.
"""

from __future__ import annotations

import ipaddress
import struct

import dns.message
import dns.rcode
import dns.rdatatype
import dns.zone

from discovery.dns.table import (
    APEX,
    DNS_VERSION,
    NEGATIVE_TTL,
    SERVICE_TTL,
    VERSION_TTL,
    DnsTable,
    build_table,
    endpoint_label,
)
from discovery.model import (
    Endpoint,
    Protocol,
    Registry,
    RemoteEndpoints,
    Service,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceType,
    cluster_id,
    namespace,
    network_id,
    service_name,
)

EAST, WEST = cluster_id("east"), cluster_id("west")


def key(text: str) -> ServiceKey:
    name, ns = text.split(".")
    return ServiceKey(namespace=namespace(ns), name=service_name(name))


def sample_registry(*, west_as_remote: bool = False, big: int = 100) -> Registry:
    """east and west; reviews (dual-stack ClusterSetIP), ratings, pending (no IP yet), headless db, big, empty."""
    reviews, ratings, pending = key("reviews.default"), key("ratings.default"), key("pending.default")
    db, bigk, empty = key("db.data"), key("big.data"), key("empty.data")
    http = ServicePort(9080, Protocol.TCP, "http")
    pg = ServicePort(5432, Protocol.TCP, "pg")
    east_services = [
        Service(EAST, reviews, (http, ServicePort(9090)), cluster_ip="10.96.0.10",
                endpoints=(Endpoint("10.1.1.1"),)),
        Service(EAST, db, (pg,), headless=True, endpoints=(
            Endpoint("10.1.0.1", hostname="db-0"),
            Endpoint("10.1.0.2", hostname="db-1", ports=(("pg", 15432),)),
            Endpoint("10.1.0.3", hostname="db-9", ready=False),
        )),
        Service(EAST, bigk, (pg,), headless=True,
                endpoints=tuple(Endpoint(f"10.3.{i // 200}.{i % 200 + 1}", hostname=f"b-{i}") for i in range(big))),
        Service(EAST, empty, (pg,), headless=True, endpoints=(Endpoint("10.1.9.9", ready=False),)),
    ]
    west_db_endpoints = (
        Endpoint("10.2.0.1", hostname="db-0"),
        Endpoint("10.2.0.9"),
        Endpoint("fd00::1:5", hostname="db-2"),
    )
    registry = Registry(local=EAST).with_shard(EAST, east_services)
    if west_as_remote:
        registry = registry.with_remote(WEST, [(db, RemoteEndpoints(
            cluster=WEST, network=network_id("net1"), gateway_host="192.0.2.1", gateway_port=15443,
            localities=(), endpoints=west_db_endpoints))])
    else:
        registry = registry.with_shard(WEST, [Service(WEST, db, (pg,), headless=True, endpoints=west_db_endpoints),
                                              Service(WEST, ratings, (http,))])
    imports = {
        reviews: ServiceImport(reviews, ServiceType.CLUSTER_SET_IP, (http, ServicePort(9090)), (EAST,),
                               ips=("10.42.0.10", "fd00:42::a")),
        ratings: ServiceImport(ratings, ServiceType.CLUSTER_SET_IP, (http,), (WEST,), ips=("10.42.0.11",)),
        pending: ServiceImport(pending, ServiceType.CLUSTER_SET_IP, (http,), (WEST,)),
        db: ServiceImport(db, ServiceType.HEADLESS, (pg,), (EAST, WEST)),
        bigk: ServiceImport(bigk, ServiceType.HEADLESS, (pg,), (EAST,)),
        empty: ServiceImport(empty, ServiceType.HEADLESS, (pg,), (EAST,)),
    }
    return registry.with_catalog(clusters={}, imports=imports)


def rrset(table: DnsTable, name: str, type_: str) -> set[str]:
    return {r.text for r in table.records if r.name == name and r.type_name == type_}


def test_cluster_set_ip_service_records() -> None:
    table = build_table(sample_registry())
    host = "reviews.default.svc." + APEX
    assert rrset(table, host, "A") == {"10.42.0.10"}
    assert rrset(table, host, "AAAA") == {"fd00:42::a"}
    assert rrset(table, "_http._tcp." + host, "SRV") == {f"0 100 9080 {host}"}
    # the unnamed port 9090 has no named-port SRV record, only one on the bare name; the ClusterSetIP has a PTR
    assert not [r for r in table.records if r.type_name == "SRV" and " 9090 " in r.text and r.name != host]
    # the bare name: one SRV per distinct port, named or not, targeting the service name (the conformance suite)
    assert rrset(table, host, "SRV") == {f"0 100 9080 {host}", f"0 100 9090 {host}"}
    assert rrset(table, "10.0.42.10.in-addr.arpa.", "PTR") == {host}
    assert {r.ttl for r in table.records if r.name == host} == {SERVICE_TTL}


def test_headless_service_records_cover_every_exporting_cluster() -> None:
    for west_as_remote in (False, True):
        table = build_table(sample_registry(west_as_remote=west_as_remote))
        host = "db.data.svc." + APEX
        assert rrset(table, host, "A") == {"10.1.0.1", "10.1.0.2", "10.2.0.1", "10.2.0.9"}
        assert rrset(table, host, "AAAA") == {"fd00::1:5"}
        assert rrset(table, "db-0.east." + host, "A") == {"10.1.0.1"}
        assert rrset(table, "db-0.west." + host, "A") == {"10.2.0.1"}
        assert rrset(table, "10-2-0-9.west." + host, "A") == {"10.2.0.9"}
        assert rrset(table, "db-2.west." + host, "AAAA") == {"fd00::1:5"}
        # the not-ready endpoint has no name at all
        assert not table.exists("db-9.east." + host)
        srv = rrset(table, "_pg._tcp." + host, "SRV")
        assert {s.split()[3] for s in srv} == {f"{h}.{host}" for h in
                                             ("db-0.east", "db-1.east", "db-0.west", "10-2-0-9.west", "db-2.west")}
        # the endpoint's own port number (db-1 listens on 15432) is what the SRV record names
        assert f"0 20 15432 db-1.east.{host}" in srv
        # the bare name: one SRV per ready endpoint (and distinct port), targeting its per-endpoint name
        assert rrset(table, host, "SRV") == srv


def test_names_that_must_not_exist_and_empty_non_terminals() -> None:
    table = build_table(sample_registry())
    # the KEP forbids names picking one cluster's backends
    assert not table.exists("east.db.data.svc." + APEX)
    assert not table.exists("east.reviews.default.svc." + APEX)
    # no ready endpoints / no ClusterSetIP yet: the service has no name
    assert not table.exists("empty.data.svc." + APEX)
    assert not table.exists("pending.default.svc." + APEX)
    assert any("pending.default" in s for s in table.skipped)
    for ent in ("svc.", "default.svc.", "data.svc.", "_tcp.reviews.default.svc.", ""):
        assert table.exists(ent + APEX), ent
    assert not table.exists("other.svc." + APEX)


def test_version_and_soa() -> None:
    table = build_table(sample_registry(), serial=77)
    assert rrset(table, "dns-version." + APEX, "TXT") == {f'"{DNS_VERSION}"'}
    assert [r.ttl for r in table.records if r.type_name == "TXT"] == [VERSION_TTL]
    assert table.soa.text.split()[2:] == ["77", "3600", "600", "86400", str(NEGATIVE_TTL)]


def test_precomputed_answers_parse_with_dnspython() -> None:
    """Every precomputed answer, with a question spliced in, is a valid DNS message holding the table's records."""
    table = build_table(sample_registry())
    checked = 0
    for qkey, entry in table.answers.items():
        qname_len = len(qkey) - 4
        qtype = struct.unpack("!H", qkey[-4:-2])[0]
        for variant in (entry[0], entry[1], *entry[2], entry[3]):
            wire = b"\x12\x34" + variant[0][1] + qkey + variant[1]
            assert len(wire) == variant[2]
            message = dns.message.from_wire(wire)
            assert message.id == 0x1234 and message.flags & 0x0100
            assert str(message.question[0].name).encode() and len(message.question) == 1
            assert dns.rcode.from_flags(message.flags, message.ednsflags) == dns.rcode.NOERROR
            if not message.flags & 0x0200 and qtype != 255:  # not truncated
                names = {rr.name.to_text() for rr in message.answer}
                assert len(names) == 1 and len(qkey) == qname_len + 4
            checked += 1
    assert checked > 50


def test_big_headless_answer_truncates_over_udp_only() -> None:
    table = build_table(sample_registry(big=100))
    entry = table.lookup("big.data.svc." + APEX, dns.rdatatype.A)
    assert entry is not None
    udp, tcp, edns, edns_tcp = entry
    assert udp[0][0][0] & 0x02 and udp[2] <= 512  # TC
    assert not tcp[0][0][0] & 0x02 and tcp[2] > 1232
    assert edns[-1][0][0][0] & 0x02 and not edns_tcp[0][0][0] & 0x02


def test_srv_answer_carries_target_addresses_in_additional_section() -> None:
    table = build_table(sample_registry())
    host = "reviews.default.svc." + APEX
    entry = table.lookup("_http._tcp." + host, dns.rdatatype.SRV)
    assert entry is not None
    qkey = dns.message.make_query("_http._tcp." + host, "SRV").question[0].name.to_wire() + b"\x00\x21\x00\x01"
    message = dns.message.from_wire(b"\0\0" + entry[0][0][0] + qkey + entry[0][1])
    additional = {(rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype)) for rr in message.additional}
    assert additional == {(host, "A"), (host, "AAAA")}


def test_bare_name_srv_one_per_distinct_port_and_endpoint() -> None:
    """A port served over TCP and UDP is one bare-name SRV record; a headless service has one per endpoint and
    port, with the endpoint's own port number."""
    dns_tcp, dns_udp = ServicePort(53, Protocol.TCP, "dns-tcp"), ServicePort(53, Protocol.UDP, "dns")
    metrics = ServicePort(9153, name="metrics")
    vip, hl = key("resolver.kube"), key("peers.kube")
    registry = Registry(local=EAST).with_shard(EAST, [
        Service(EAST, vip, (dns_tcp, dns_udp, metrics)),
        Service(EAST, hl, (dns_udp, metrics), headless=True, endpoints=(
            Endpoint("10.1.0.1", hostname="p-0"), Endpoint("10.1.0.2", hostname="p-1", ports=(("dns", 5353),)))),
    ]).with_catalog(clusters={}, imports={
        vip: ServiceImport(vip, ServiceType.CLUSTER_SET_IP, (dns_tcp, dns_udp, metrics), (EAST,), ips=("10.42.0.5",)),
        hl: ServiceImport(hl, ServiceType.HEADLESS, (dns_udp, metrics), (EAST,)),
    })
    table = build_table(registry)
    vhost, hhost = "resolver.kube.svc." + APEX, "peers.kube.svc." + APEX
    assert rrset(table, vhost, "SRV") == {f"0 100 53 {vhost}", f"0 100 9153 {vhost}"}
    assert rrset(table, hhost, "SRV") == {f"0 50 53 p-0.east.{hhost}", f"0 50 5353 p-1.east.{hhost}",
                                          f"0 50 9153 p-0.east.{hhost}", f"0 50 9153 p-1.east.{hhost}"}
    entry = table.lookup(hhost, dns.rdatatype.SRV)
    assert entry is not None
    qkey = dns.message.make_query(hhost, "SRV").question[0].name.to_wire() + b"\x00\x21\x00\x01"
    message = dns.message.from_wire(b"\0\0" + entry[1][0][0] + qkey + entry[1][1])
    assert {(rr.name.to_text(), rd.to_text()) for rr in message.additional for rd in rr} == {
        (f"p-0.east.{hhost}", "10.1.0.1"), (f"p-1.east.{hhost}", "10.1.0.2")}


def test_zone_text_loads_as_a_zone() -> None:
    table = build_table(sample_registry())
    zone = dns.zone.from_text(table.zone_text(), origin=APEX, relativize=False)
    assert zone.find_rdataset("reviews.default.svc." + APEX, "A")[0].to_text() == "10.42.0.10"
    assert zone.get_rdataset("10.0.42.10.in-addr.arpa.", "PTR") is None


def test_endpoint_label_for_addresses_without_hostname() -> None:
    assert endpoint_label(Endpoint("10.3.0.100")) == "10-3-0-100"
    label = endpoint_label(Endpoint("fd00::1"))
    assert label == ipaddress.ip_address("fd00::1").exploded.replace(":", "-")


def test_names_longer_than_dns_allows_are_left_out_not_fatal() -> None:
    long_ns, long_name, long_host = "n" * 63, "s" * 63, "h" * 63
    k = ServiceKey(namespace=namespace(long_ns), name=service_name(long_name))
    cluster = cluster_id("c" * 63)
    registry = Registry(local=cluster).with_shard(cluster, [Service(
        cluster, k, (ServicePort(80, Protocol.TCP, "web"),), headless=True,
        endpoints=(Endpoint("10.0.0.1", hostname=long_host),))])
    registry = registry.with_catalog(clusters={}, imports={
        k: ServiceImport(k, ServiceType.HEADLESS, (ServicePort(80, Protocol.TCP, "web"),), (cluster,))})
    table = build_table(registry)
    host = f"{long_name}.{long_ns}.svc.{APEX}"
    assert rrset(table, host, "A") == {"10.0.0.1"}
    assert not [r for r in table.records if r.name.startswith(long_host)]
