"""MCS v1beta1 conditions: every Conflict reason produced by two clusters' exports (the oldest wins and the
ServiceImport takes its value), reasons joined in v1beta1's order, observedGeneration and lastTransitionTime
(kept while status and reason stay), and derive deterministic over traits and previous conditions."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery import mcs
from discovery.model import (
    DEFAULT_TRAITS,
    ClusterId,
    Condition,
    ConditionStatus,
    Registry,
    Service,
    ServiceExport,
    ServiceKey,
    ServicePort,
    ServiceTraits,
)

KEY = ServiceKey.parse("reviews.default")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
HTTP = ServicePort(port=9080, name="http")
EAST, WEST = ClusterId("east"), ClusterId("west")
CLIENT_IP = ServiceTraits(session_affinity="ClientIP", affinity_timeout=10800)


def svc(cluster: ClusterId, *, ports: tuple[ServicePort, ...] = (HTTP,), headless: bool = False,
        traits: ServiceTraits = DEFAULT_TRAITS) -> Service:
    return Service(cluster=cluster, key=KEY, ports=ports, headless=headless, traits=traits)


def exp(cluster: ClusterId, days: int, **kw: object) -> ServiceExport:
    return ServiceExport(cluster=cluster, key=KEY, created=T0 + timedelta(days=days), **kw)  # type: ignore[arg-type]


def conflict(result: mcs.McsResult, cluster: ClusterId) -> Condition:
    return next(c for c in result.conditions[(cluster, KEY)] if c.type == mcs.CONFLICT)


# (reason, east's service and export (older: it wins), west's, what the import must carry, words of the message)
CASES = [
    ("PortConflict", svc(EAST), exp(EAST, 0), svc(WEST, ports=(ServicePort(port=9081, name="http"),)), exp(WEST, 1),
     lambda imp: imp.ports == (HTTP,), "conflict on port 9080/TCP (http)"),
    ("TypeConflict", svc(EAST), exp(EAST, 0), svc(WEST, headless=True), exp(WEST, 1),
     lambda imp: str(imp.type) == "ClusterSetIP", "type conflict"),
    ("SessionAffinityConflict", svc(EAST, traits=CLIENT_IP), exp(EAST, 0), svc(WEST), exp(WEST, 1),
     lambda imp: imp.traits.session_affinity == "ClientIP", "sessionAffinity conflict"),
    ("SessionAffinityConfigConflict", svc(EAST, traits=CLIENT_IP), exp(EAST, 0),
     svc(WEST, traits=replace(CLIENT_IP, affinity_timeout=60)), exp(WEST, 1),
     lambda imp: imp.traits.affinity_timeout == 10800, "sessionAffinityConfig conflict"),
    ("LabelsConflict", svc(EAST), exp(EAST, 0, exported_labels=(("tier", "gold"),)), svc(WEST),
     exp(WEST, 1, exported_labels=(("tier", "silver"),)), lambda imp: imp.labels == (("tier", "gold"),),
     "exportedLabels conflict"),
    ("AnnotationsConflict", svc(EAST), exp(EAST, 0, exported_annotations=(("team", "a"),)), svc(WEST),
     exp(WEST, 1), lambda imp: imp.annotations == (("team", "a"),), "exportedAnnotations conflict"),
    ("InternalTrafficPolicyConflict", svc(EAST), exp(EAST, 0),
     svc(WEST, traits=ServiceTraits(internal_traffic_policy="Local")), exp(WEST, 1),
     lambda imp: imp.traits.internal_traffic_policy == "Cluster", "internalTrafficPolicy conflict"),
    ("TrafficDistributionConflict", svc(EAST, traits=ServiceTraits(traffic_distribution="PreferClose")),
     exp(EAST, 0), svc(WEST), exp(WEST, 1), lambda imp: imp.traits.traffic_distribution == "PreferClose",
     "trafficDistribution conflict"),
    ("IPFamilyConflict", svc(EAST, traits=ServiceTraits(ip_families=("IPv4",))), exp(EAST, 0),
     svc(WEST, traits=ServiceTraits(ip_families=("IPv6",))), exp(WEST, 1),
     lambda imp: imp.traits.ip_families == ("IPv4",), "ipFamilies conflict"),
]


@pytest.mark.parametrize(("reason", "east", "east_export", "west", "west_export", "carried", "words"), CASES,
                         ids=[c[0] for c in CASES])
def test_each_v1beta1_reason(reason: str, east: Service, east_export: ServiceExport, west: Service,
                             west_export: ServiceExport, carried: object, words: str) -> None:
    result = mcs.derive({EAST: {KEY: east}, WEST: {KEY: west}}, [west_export, east_export], cidr="127.241.0.0/16")
    for cluster in (EAST, WEST):  # raised on every export, as the KEP recommends
        c = conflict(result, cluster)
        assert (c.status, c.reason) == (ConditionStatus.TRUE, reason), c
        assert words in c.message and "resolved by the oldest export (east, 2026-01-01T00:00:00Z)" in c.message
        assert "1 of 2 clusters disagree" in c.message
    assert carried(result.imports[KEY])  # type: ignore[operator]
    assert "this cluster" in conflict(result, WEST).message  # the loser is told its own value lost
    ready = next(c for c in result.conditions[(WEST, KEY)] if c.type == mcs.READY)
    assert (ready.status, ready.reason) == (ConditionStatus.TRUE, "Exported")  # a conflict still exports


def test_every_reason_is_in_the_table() -> None:
    assert [c[0] for c in CASES] == list(mcs.CONFLICT_REASONS)


def test_several_reasons_join_in_v1beta1_order() -> None:
    east = svc(EAST, traits=ServiceTraits(ip_families=("IPv4",), traffic_distribution="PreferClose"))
    west = svc(WEST, headless=True, traits=replace(CLIENT_IP, ip_families=("IPv6",)))
    result = mcs.derive({EAST: {KEY: east}, WEST: {KEY: west}},
                        [exp(EAST, 0, exported_labels=(("a", "1"),)), exp(WEST, 1)], cidr="127.241.0.0/16")
    # (no SessionAffinityConfigConflict: east has no ClientIP config to disagree with; that is the affinity's)
    assert conflict(result, EAST).reason == ("TypeConflict,SessionAffinityConflict,LabelsConflict,"
                                             "TrafficDistributionConflict,IPFamilyConflict")
    assert conflict(result, EAST).message.count("resolved by the oldest export") == 5


def test_agreement_is_no_conflicts_and_unknown_families_do_not_conflict() -> None:
    east = svc(EAST, traits=ServiceTraits(ip_families=("IPv4",)))
    result = mcs.derive({EAST: {KEY: east}, WEST: {KEY: svc(WEST)}}, [exp(EAST, 0), exp(WEST, 1)],
                        cidr="127.241.0.0/16")
    c = conflict(result, WEST)
    assert (c.status, c.reason) == (ConditionStatus.FALSE, "NoConflicts")
    assert "all 2 exporting clusters agree" in c.message


def test_transition_time_changes_only_with_status_or_reason() -> None:
    t1, t2, t3 = T0 + timedelta(days=10), T0 + timedelta(days=11), T0 + timedelta(days=12)
    services = {EAST: {KEY: svc(EAST)}, WEST: {KEY: svc(WEST)}}
    first = mcs.derive(services, [exp(EAST, 0, generation=3), exp(WEST, 1)], cidr="127.241.0.0/16", now=t1)
    east_conds = first.conditions[(EAST, KEY)]
    assert {c.last_transition_time for c in east_conds} == {t1}
    assert {c.observed_generation for c in east_conds} == {3}
    # Same state later: every time stays (the previous conditions are the exports' own).
    prev_e, prev_w = exp(EAST, 0, generation=4, conditions=east_conds), exp(WEST, 1,
                                                                           conditions=first.conditions[(WEST, KEY)])
    second = mcs.derive(services, [prev_e, prev_w], cidr="127.241.0.0/16", now=t2)
    assert {c.last_transition_time for c in second.conditions[(EAST, KEY)]} == {t1}
    assert {c.observed_generation for c in second.conditions[(EAST, KEY)]} == {4}  # generation follows the object
    # West's service turns headless: Conflict moves to True (new time); Valid and Ready stay (old time), though
    # Ready's message (the import type) changes.
    services[WEST] = {KEY: svc(WEST, headless=True)}
    third = mcs.derive(services, [replace(prev_e, conditions=second.conditions[(EAST, KEY)]), prev_w],
                       cidr="127.241.0.0/16", now=t3)
    times = {c.type: c.last_transition_time for c in third.conditions[(EAST, KEY)]}
    assert times == {"Valid": t1, "Ready": t1, "Conflict": t3}
    # Unstamped (the federation): no times at all.
    central = mcs.derive(services, [exp(EAST, 0), exp(WEST, 1)], cidr="127.241.0.0/16")
    assert all(c.last_transition_time is None for cs in central.conditions.values() for c in cs)


def test_derive_local_keeps_times_across_a_fresh_snapshot() -> None:
    t1, t2 = T0 + timedelta(days=10), T0 + timedelta(days=11)
    registry = Registry(local=EAST).with_shard(EAST, [svc(EAST)], [exp(EAST, 0)])
    once = mcs.derive_local(registry, [exp(EAST, 0)], unsupported={}, cidr="127.241.0.0/16", now=t1)
    fresh = once.with_shard(EAST, [svc(EAST)], [exp(EAST, 0)])  # a new snapshot: exports without conditions
    twice = mcs.derive_local(fresh, [exp(EAST, 0)], unsupported={}, cidr="127.241.0.0/16", now=t2,
                             previous=once.exports[EAST])
    assert {c.last_transition_time for c in twice.exports[EAST][KEY].conditions} == {t1}


traits_st = st.builds(
    ServiceTraits,
    session_affinity=st.sampled_from(["None", "ClientIP"]),
    affinity_timeout=st.sampled_from([0, 60, 10800]),
    internal_traffic_policy=st.sampled_from(["Cluster", "Local"]),
    traffic_distribution=st.sampled_from(["", "PreferClose"]),
    ip_families=st.sampled_from([(), ("IPv4",), ("IPv6",), ("IPv4", "IPv6")]),
)
labels_st = st.sampled_from([(), (("a", "1"),), (("a", "2"),)])
CLUSTERS = [ClusterId(c) for c in ("east", "west", "north")]


@st.composite
def world(draw: st.DrawFn) -> tuple[list[Service], list[ServiceExport]]:
    services, exports = [], []
    for cluster in CLUSTERS:
        if draw(st.booleans()):
            services.append(svc(cluster, headless=draw(st.booleans()), traits=draw(traits_st)))
        if draw(st.booleans()):
            prev = draw(st.sampled_from([(), (Condition(mcs.CONFLICT, ConditionStatus.FALSE, "NoConflicts", "",
                                                        last_transition_time=T0),)]))
            exports.append(exp(cluster, draw(st.integers(0, 2)), generation=draw(st.integers(0, 3)),
                               exported_labels=draw(labels_st), exported_annotations=draw(labels_st),
                               conditions=prev))
    return services, exports


@settings(max_examples=150, deadline=None)
@given(world(), st.randoms(use_true_random=False))
def test_derive_is_deterministic(w: tuple[list[Service], list[ServiceExport]], rnd: random.Random) -> None:
    services, exports = w
    now = T0 + timedelta(days=30)
    shards = {s.cluster: {KEY: s} for s in services}
    base = mcs.derive(shards, exports, cidr="127.241.0.0/16", now=now)
    shuffled = exports[:]
    rnd.shuffle(shuffled)
    assert mcs.derive(dict(reversed(list(shards.items()))), shuffled, cidr="127.241.0.0/16", now=now) == base
    for e in exports:
        conds = base.conditions[(e.cluster, KEY)]
        assert {c.observed_generation for c in conds} == {e.generation}
        joined = next(c for c in conds if c.type == mcs.CONFLICT).reason.split(",")
        if joined != ["NoConflicts"]:  # reasons are v1beta1's, each once, in its order
            assert joined == [r for r in mcs.CONFLICT_REASONS if r in joined]
