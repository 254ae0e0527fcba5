"""MCS semantics: export validity, conflict resolution by the oldest export, ServiceImport derivation and
ClusterSetIP allocation; property-tested for independence from input order."""

from __future__ import annotations

import ipaddress
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery import mcs
from discovery.model import (
    ClusterId,
    ConditionStatus,
    Endpoint,
    Protocol,
    Service,
    ServiceExport,
    ServiceKey,
    ServicePort,
    ServiceType,
)

KEY = ServiceKey.parse("reviews.default")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
HTTP = ServicePort(port=9080, name="http", app_protocol="http", target_port=8080)


def svc(cluster: str, *ports: ServicePort, key: ServiceKey = KEY, headless: bool = False, ready: int = 1) -> Service:
    eps = tuple(Endpoint(address=f"127.0.0.{i + 1}") for i in range(ready))
    return Service(cluster=ClusterId(cluster), key=key, ports=ports or (HTTP,), headless=headless, endpoints=eps)


def exp(cluster: str, days: int = 0, key: ServiceKey = KEY) -> ServiceExport:
    return ServiceExport(cluster=ClusterId(cluster), key=key, created=T0 + timedelta(days=days))


def cond(result: mcs.McsResult, cluster: str, type_: str, key: ServiceKey = KEY) -> tuple[str, str, str]:
    c = next(c for c in result.conditions[(ClusterId(cluster), key)] if c.type == type_)
    return c.status, c.reason, c.message


def shards(*services: Service) -> dict[ClusterId, dict[ServiceKey, Service]]:
    out: dict[ClusterId, dict[ServiceKey, Service]] = {}
    for s in services:
        out.setdefault(s.cluster, {})[s.key] = s
    return out


def test_valid_export_builds_an_import() -> None:
    r = mcs.derive(shards(svc("east"), svc("west")), [exp("west", 1), exp("east")], cidr="241.0.0.0/8")
    imp = r.imports[KEY]
    assert imp.type == ServiceType.CLUSTER_SET_IP
    assert imp.clusters == ("east", "west")
    # import ports carry no per-cluster targetPort
    assert imp.ports == (ServicePort(port=9080, name="http", app_protocol="http"),)
    assert len(imp.ips) == 1 and ipaddress.ip_address(imp.ips[0]) in ipaddress.ip_network("241.0.0.0/8")
    assert imp.ips[0] == mcs.allocate_ips([KEY], "241.0.0.0/8")[KEY]
    for cluster in ("east", "west"):
        assert cond(r, cluster, "Valid")[:2] == (ConditionStatus.TRUE, "Valid")
        assert cond(r, cluster, "Ready")[:2] == (ConditionStatus.TRUE, "Exported")
        assert cond(r, cluster, "Conflict")[:2] == (ConditionStatus.FALSE, "NoConflicts")
    assert [c.type for c in r.conditions[(ClusterId("east"), KEY)]] == ["Valid", "Ready", "Conflict"]


def test_export_without_service_is_invalid_and_not_imported() -> None:
    r = mcs.derive(shards(svc("east")), [exp("east"), exp("west")])
    assert r.imports[KEY].clusters == ("east",)
    status, reason, message = cond(r, "west", "Valid")
    assert (status, reason) == (ConditionStatus.FALSE, "NoService")
    assert message == "Service default/reviews does not exist in cluster west"
    assert cond(r, "west", "Ready")[:2] == (ConditionStatus.FALSE, "Failed")


def test_only_invalid_exports_give_no_import() -> None:
    r = mcs.derive({}, [exp("east")])
    assert r.imports == {}
    assert cond(r, "east", "Valid")[1] == "NoService"


def test_external_name_is_invalid_service_type() -> None:
    r = mcs.derive({}, [exp("east")], unsupported={ClusterId("east"): {KEY: "Service default/reviews is ExternalName"}})
    status, reason, message = cond(r, "east", "Valid")
    assert (status, reason) == (ConditionStatus.FALSE, "InvalidServiceType")
    assert "ExternalName" in message


def test_unexported_services_are_not_imported() -> None:
    other = ServiceKey.parse("details.default")
    r = mcs.derive(shards(svc("east"), svc("east", key=other)), [exp("east")])
    assert set(r.imports) == {KEY}


def test_port_conflict_oldest_wins_and_everyone_is_told() -> None:
    grpc = ServicePort(port=9080, name="http", app_protocol="grpc")
    r = mcs.derive(
        shards(svc("east", HTTP), svc("west", grpc), svc("north", HTTP)),
        [exp("west", 1), exp("east", 0), exp("north", 2)],
    )
    imp = r.imports[KEY]
    assert imp.ports == (ServicePort(port=9080, name="http", app_protocol="http"),)
    assert imp.clusters == ("east", "north", "west")
    for cluster in ("east", "west", "north"):
        status, reason, _ = cond(r, cluster, "Conflict")
        assert (status, reason) == (ConditionStatus.TRUE, "PortConflict")
    _, _, west_msg = cond(r, "west", "Conflict")
    assert "conflict on port 9080/TCP (http) with cluster east" in west_msg
    assert "this cluster defines 9080/TCP name 'http' appProtocol 'grpc'" in west_msg
    assert "resolved by the oldest export (east, 2026-01-01T00:00:00Z)" in west_msg
    assert "1 of 3 clusters disagree" in west_msg
    _, _, east_msg = cond(r, "east", "Conflict")
    assert "with cluster west" in east_msg


def test_ports_are_the_union() -> None:
    grpc = ServicePort(port=9090, name="grpc", app_protocol="grpc")
    metrics = ServicePort(port=15020, name="metrics", protocol=Protocol.TCP)
    r = mcs.derive(shards(svc("east", HTTP, grpc), svc("west", HTTP, metrics)), [exp("east"), exp("west", 1)])
    assert [p.port for p in r.imports[KEY].ports] == [9080, 9090, 15020]
    assert cond(r, "east", "Conflict")[1] == "NoConflicts"


def test_same_name_different_number_is_a_port_conflict() -> None:
    moved = ServicePort(port=9081, name="http", app_protocol="http")
    r = mcs.derive(shards(svc("east", HTTP), svc("west", moved)), [exp("east", 3), exp("west", 1)])
    # west is older: its definition wins; the name is not duplicated
    assert r.imports[KEY].ports == (ServicePort(port=9081, name="http", app_protocol="http"),)
    assert cond(r, "east", "Conflict")[1] == "PortConflict"
    assert "resolved by the oldest export (west" in cond(r, "east", "Conflict")[2]


def test_type_conflict_oldest_wins() -> None:
    r = mcs.derive(
        shards(svc("east", headless=True), svc("west"), svc("north")),
        [exp("east", 0), exp("west", 1), exp("north", 2)],
    )
    imp = r.imports[KEY]
    assert imp.type == ServiceType.HEADLESS
    assert imp.ips == ()  # headless imports have no ClusterSetIP
    for cluster in ("east", "west", "north"):
        assert cond(r, cluster, "Conflict")[:2] == (ConditionStatus.TRUE, "TypeConflict")
    msg = cond(r, "west", "Conflict")[2]
    assert "this cluster's service is ClusterSetIP, the oldest export's is Headless" in msg
    assert "2 of 3 clusters disagree" in msg
    assert "type conflict with clusters north, west (ClusterSetIP)" in cond(r, "east", "Conflict")[2]


def test_both_conflicts_are_combined() -> None:
    other = ServicePort(port=9080, name="http", app_protocol="h2c")
    r = mcs.derive(shards(svc("east"), svc("west", other, headless=True)), [exp("east"), exp("west", 1)])
    assert cond(r, "west", "Conflict")[1] == "PortConflict,TypeConflict"
    assert r.imports[KEY].type == ServiceType.CLUSTER_SET_IP


def test_same_timestamp_breaks_ties_by_cluster_name() -> None:
    r = mcs.derive(shards(svc("west", headless=True), svc("east")), [exp("west"), exp("east")])
    assert r.imports[KEY].type == ServiceType.CLUSTER_SET_IP  # east sorts first


def test_naive_and_aware_timestamps_compare() -> None:
    naive = ServiceExport(cluster=ClusterId("west"), key=KEY, created=datetime(2025, 12, 31))
    r = mcs.derive(shards(svc("west", headless=True), svc("east")), [naive, exp("east")])
    assert r.imports[KEY].type == ServiceType.HEADLESS


def test_duplicate_exports_keep_the_oldest() -> None:
    r = mcs.derive(shards(svc("east", headless=True), svc("west")), [exp("east", 5), exp("west", 2), exp("east", 1)])
    assert r.imports[KEY].type == ServiceType.HEADLESS


def test_exports_with_conditions() -> None:
    r = mcs.derive(shards(svc("east")), [exp("east")])
    (filled,) = r.exports_with_conditions([exp("east")])
    assert filled.condition("Valid") is not None and filled.condition("Ready") is not None


# ---------------------------------------------------------------------------------------------------------------
# ClusterSetIP allocation


def test_allocation_is_stable_and_order_free() -> None:
    keys = [ServiceKey.parse(f"svc{i}.ns{i % 7}") for i in range(500)]
    a = mcs.allocate_ips(keys, "241.0.0.0/8")
    shuffled = keys[:]
    random.Random(4).shuffle(shuffled)
    assert mcs.allocate_ips(shuffled, "241.0.0.0/8") == a
    assert len(set(a.values())) == 500


def test_allocation_avoids_network_and_broadcast_and_fills_a_tiny_range() -> None:
    keys = [ServiceKey.parse(f"s{i}.default") for i in range(6)]
    got = mcs.allocate_ips(keys, "10.9.0.0/29")  # 8 addresses, 6 usable
    assert sorted(got.values(), key=ipaddress.ip_address) == [f"10.9.0.{i}" for i in range(1, 7)]
    with pytest.raises(mcs.InvalidCidr):
        mcs.allocate_ips([*keys, ServiceKey.parse("one-more.default")], "10.9.0.0/29")


def test_allocation_in_ipv6_and_loopback() -> None:
    key = ServiceKey.parse("reviews.default")
    v6 = mcs.allocate_ips([key], "fd00:241::/64")[key]
    assert ipaddress.ip_address(v6) in ipaddress.ip_network("fd00:241::/64")
    lo = mcs.allocate_ips([key], "127.241.0.0/16")[key]
    assert ipaddress.ip_address(lo) in ipaddress.ip_network("127.241.0.0/16")


@pytest.mark.parametrize("cidr", ["241.0.0.1/8", "nonsense", "10.0.0.0/31", ""])
def test_bad_cidr(cidr: str) -> None:
    with pytest.raises(mcs.InvalidCidr):
        mcs.allocate_ips([KEY], cidr)


def test_known_allocation_does_not_drift() -> None:
    # A regression guard: the hash is part of the contract (every cluster and every version must agree).
    first = mcs.allocate_ips([KEY], "241.0.0.0/8")[KEY]
    assert first == "241.202.249.170"
    with_more = mcs.allocate_ips([KEY, ServiceKey.parse("ratings.default")], "241.0.0.0/8")[KEY]
    assert first == with_more


# ---------------------------------------------------------------------------------------------------------------
# Properties: any order of exports (and of the services mapping) gives the same result

CLUSTERS = ["east", "west", "north", "south"]
NAMES = ["reviews", "ratings", "db"]

port_st = st.builds(
    ServicePort,
    port=st.sampled_from([80, 9080, 9090]),
    protocol=st.sampled_from([Protocol.TCP, Protocol.UDP]),
    name=st.sampled_from(["", "http", "grpc"]),
    app_protocol=st.sampled_from(["", "http", "grpc"]),
)


@st.composite
def world(draw: st.DrawFn) -> tuple[list[Service], list[ServiceExport]]:
    services: list[Service] = []
    exports: list[ServiceExport] = []
    for cluster in CLUSTERS:
        for name in NAMES:
            key = ServiceKey.parse(f"{name}.default")
            if draw(st.booleans()):
                ports = draw(st.lists(port_st, min_size=0, max_size=3))
                services.append(
                    Service(cluster=ClusterId(cluster), key=key, ports=tuple(ports), headless=draw(st.booleans()))
                )
            if draw(st.booleans()):
                for _ in range(draw(st.integers(1, 2))):
                    day = draw(st.integers(0, 3))  # few days: ties happen and break by cluster name
                    exports.append(exp(cluster, day, key))
    return services, exports


@settings(max_examples=150, deadline=None)
@given(world(), st.randoms(use_true_random=False))
def test_derive_is_independent_of_input_order(w: tuple[list[Service], list[ServiceExport]], rnd: random.Random) -> None:
    services, exports = w
    base = mcs.derive(shards(*services), exports, cidr="127.241.0.0/16")
    shuffled_services = services[:]
    shuffled_exports = exports[:]
    rnd.shuffle(shuffled_services)
    rnd.shuffle(shuffled_exports)
    again = mcs.derive(shards(*shuffled_services), shuffled_exports, cidr="127.241.0.0/16")
    assert again == base
    # every export has its three conditions; every import's clusters have a valid export
    for e in exports:
        assert [c.type for c in base.conditions[(e.cluster, e.key)]] == ["Valid", "Ready", "Conflict"]
    for key, imp in base.imports.items():
        assert imp.clusters == tuple(sorted(imp.clusters))
        for c in imp.clusters:
            assert cond(base, c, "Valid", key)[0] == ConditionStatus.TRUE
        names = [p.name for p in imp.ports]
        pairs = [(p.port, p.protocol) for p in imp.ports]
        assert len(set(names)) == len(names) and len(set(pairs)) == len(pairs)
        assert (len(imp.ips) == 1) == (imp.type == ServiceType.CLUSTER_SET_IP)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([*NAMES, "a", "b", "c"]), st.sampled_from(["default", "prod", "x"])), max_size=20
    )
)
def test_allocation_unique_and_in_range(pairs: list[tuple[str, str]]) -> None:
    keys = [ServiceKey.parse(f"{n}.{ns}") for n, ns in pairs]
    got = mcs.allocate_ips(keys, "127.241.0.0/27")  # tiny range forces collisions
    assert set(got) == set(keys)
    assert len(set(got.values())) == len(got)
    net = ipaddress.ip_network("127.241.0.0/27")
    for ip in got.values():
        addr = ipaddress.ip_address(ip)
        assert addr in net and addr not in (net.network_address, net.broadcast_address)
    assert mcs.allocate_ips(list(reversed(keys)), "127.241.0.0/27") == got
