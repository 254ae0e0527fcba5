"""The pure parts of the service: the merged catalog (MCS rules applied once, incremental build equal to a full
build, unreachable members withdrawn, per-network views, diff/apply) and the wire codec's round trips."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.model import ClusterId, NetworkId, ServicePort, ServiceType
from federation import catalog as cat
from federation import wire
from federation.agent import export_set
from federation.records import ExportSet, Member
from tests.federation.fedkit import info, key, snapshot

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SMALL = "10.0.0.0/27"


def _member(cluster: str, network: str = "net1", *, down: bool = False) -> Member:
    return Member(info=info(cluster, network), registered_at=T0, renewed_at=T0, lease_ttl_s=2.0,
                  unreachable_since=T0 + timedelta(seconds=2) if down else None)


def _exports(cluster: str, names: list[str], generation: int = 1, *, port: int = 8080,
             created: datetime | None = None) -> ExportSet:
    services, exports = snapshot(cluster, names, port=port, created=created)
    return export_set(info(cluster), services, exports, generation=generation)


def test_conflict_resolved_once_with_conditions() -> None:
    members = {ClusterId(c): _member(c) for c in ("east", "west")}
    east = _exports("east", ["reviews"], created=T0)
    west = _exports("west", ["reviews"], port=9090, created=T0 + timedelta(hours=1))
    c = cat.build(revision=7, members=members, exports=[east, west])
    svc = c.services[key("reviews")]
    assert svc.import_.clusters == ("east", "west")
    assert 8080 in [p.port for p in svc.import_.ports]  # the oldest export's port wins the clash
    conflicts = {cl: cond for cl, cond in svc.conditions if cond.type == "Conflict"}
    assert conflicts[ClusterId("west")].status == "True" and conflicts[ClusterId("east")].status == "True"
    assert [r.cluster for r in svc.endpoints] == ["east", "west"]


def test_unreachable_member_is_withdrawn_but_listed() -> None:
    members = {ClusterId("east"): _member("east"), ClusterId("west"): _member("west", down=True)}
    c = cat.build(revision=3, members=members, exports=[_exports("east", ["a"]), _exports("west", ["b"])])
    assert set(c.services) == {key("a")}
    assert c.members[ClusterId("west")].unreachable_since is not None and not c.connected(ClusterId("west"))


def test_view_keeps_pod_addresses_only_on_the_same_network() -> None:
    members = {ClusterId("east"): _member("east", "net1")}
    c = cat.build(revision=1, members=members, exports=[_exports("east", ["a"])])
    assert c.services[key("a")].endpoints[0].endpoints
    other = cat.view(c, network=NetworkId("net2")).services[key("a")].endpoints[0]
    assert other.endpoints == () and other.localities
    same = cat.view(c, network=NetworkId("net1")).services[key("a")].endpoints[0]
    assert same.endpoints and cat.view(c, network=None).services[key("a")].endpoints[0].endpoints == ()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["east", "west", "north"]),
                          st.lists(st.sampled_from([f"s{i}" for i in range(12)]), unique=True, max_size=8),
                          st.booleans()), min_size=1, max_size=12))
def test_incremental_build_equals_full_build(steps: list[tuple[str, list[str], bool]]) -> None:
    members: dict[ClusterId, Member] = {ClusterId(c): _member(c) for c in ("east", "west", "north")}
    exports: dict[ClusterId, ExportSet] = {}
    current = cat.build(revision=0, members=members, exports=[], cidr=SMALL)
    for rev, (cluster, names, down) in enumerate(steps, start=1):
        cid = ClusterId(cluster)
        dirty = {s.key for s in exports[cid].services} if cid in exports else set()
        exports[cid] = _exports(cluster, names, generation=rev)
        members[cid] = _member(cluster, down=down)
        dirty |= {s.key for s in exports[cid].services}
        # A small ClusterSetIP range, so that first-choice addresses collide and re-allocation is exercised.
        incremental = cat.build(revision=rev, members=members, exports=exports.values(), previous=current,
                                dirty=dirty, cidr=SMALL)
        full = cat.build(revision=rev, members=members, exports=exports.values(), cidr=SMALL)
        assert incremental == full
        # The diff, applied on the client's side, reproduces the new catalog.
        assert cat.apply(current, rev, cat.diff(current, full)) == full
        # The federation's diff over the dirty keys alone (when no ClusterSetIP moved) is the whole diff.
        assert cat.diff(current, incremental, keys=None if incremental.reallocated else dirty) == \
            cat.diff(current, full)
        current = incremental


def test_wire_round_trips() -> None:
    es = _exports("east", ["a", "b"], generation=9)
    es = replace(es, services=(replace(es.services[0], type=ServiceType.HEADLESS,
                                       ports=(ServicePort(port=53, name="dns", target_port="dns"),)),
                               es.services[1]))
    assert wire.export_set_from_json(wire.export_set_json(es), ClusterId("east")) == es
    m = _member("east")
    assert wire.member_from_json(wire.member_json(m)) == m
    c = cat.build(revision=4, members={ClusterId("east"): m}, exports=[es])
    assert wire.catalog_from_json(wire.catalog_json(c)) == c
    for change in cat.diff(cat.Catalog(revision=0), c):
        assert wire.change_from_json(wire.change_json(4, change)) == (4, change)
    assert wire.change_from_json(wire.bookmark_json(4)) == (4, None)


def test_wire_errors_name_the_field() -> None:
    body = wire.export_set_json(_exports("east", ["a", "b"]))
    cases = {
        "services[1].ports[0].protocol": lambda b: b["services"][1]["ports"][0].update(protocol="HTTP"),
        "services[0].created": lambda b: b["services"][0].update(created="yesterday"),
        "services[1].localities[0].cluster": lambda b: b["services"][1]["localities"][0].update(cluster="west"),
        "services[1].name": lambda b: b["services"].__setitem__(1, dict(b["services"][0])),
        "services[0].endpoints[0].ports[0].port": lambda b: b["services"][0]["endpoints"][0].update(
            ports=[{"name": "http", "port": 0}]),
        "services": lambda b: b.update(services={}),
    }
    for field, mutate in cases.items():
        bad = wire.export_set_json(_exports("east", ["a", "b"]))
        mutate(bad)
        try:
            wire.export_set_from_json(bad, ClusterId("east"))
        except wire.WireError as exc:
            assert exc.field == field, (field, exc)
        else:
            raise AssertionError(f"{field}: accepted")
    assert wire.export_set_from_json(body, ClusterId("east")).generation == 1


def test_random_catalog_diff_is_minimal() -> None:
    rng = random.Random(7)
    members = {ClusterId("east"): _member("east")}
    names = [f"s{i}" for i in range(50)]
    full = _exports("east", names)
    before = cat.build(revision=1, members=members, exports=[full])
    changed = rng.sample(names, 5)
    kept = tuple(s for s in full.services if s.key.name not in changed)
    after = cat.build(revision=2, members=members, exports=[replace(full, generation=2, services=kept)])
    changes = cat.diff(before, after)
    assert sorted(str(c.key) for c in changes if isinstance(c, cat.ServiceChange)) == sorted(
        f"{n}.default" for n in changed)
    assert all(c.service is None for c in changes if isinstance(c, cat.ServiceChange))


def test_decode_cache_reuses_unchanged_services_and_still_validates_changed_ones() -> None:
    cache = wire.DecodeCache()
    east = ClusterId("east")
    body = wire.export_set_json(_exports("east", ["a", "b", "c"]))
    first = wire.export_set_from_json(body, east, cache=cache)
    again = wire.export_set_from_json(wire.export_set_json(_exports("east", ["a", "b", "c"])), east, cache=cache)
    assert all(x is y for x, y in zip(first.services, again.services, strict=True))
    bad = wire.export_set_json(_exports("east", ["a", "b", "c"]))
    bad["services"][1]["ports"][0]["port"] = 0
    try:
        wire.export_set_from_json(bad, east, cache=cache)
    except wire.WireError as exc:
        assert exc.field == "services[1].ports[0].port"
    else:
        raise AssertionError("a changed, invalid service was accepted from the cache")
    # Another cluster's identical JSON is decoded for that cluster, not taken from east's entries.
    west = wire.export_set_from_json(wire.export_set_json(_exports("west", ["a"])), ClusterId("west"), cache=cache)
    assert west.cluster == "west"
    odd = wire.export_set_json(_exports("east", ["a"]))
    odd["services"][0]["namespace"] = ["not", "a", "string"]
    try:
        wire.export_set_from_json(odd, east, cache=cache)
    except wire.WireError as exc:
        assert exc.field == "services[0].namespace"
    else:
        raise AssertionError("a list namespace was accepted")
