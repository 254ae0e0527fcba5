"""Snapshots (content versions, validation, replace) and the snapshot cache (notifications, status)."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from gateway.cache import SnapshotCache, SyncState
from gateway.snapshot import CLUSTER, ENDPOINT, LISTENER, Snapshot, SnapshotError
from tests.gateway.xds_client import cla, eds_cluster, snapshot


def test_versions_are_content_hashes() -> None:
    a = snapshot({"x": (1,), "y": (2,)})
    b = Snapshot.build({ENDPOINT: [cla("y", 2), cla("x", 1)], CLUSTER: [eds_cluster("y"), eds_cluster("x")]})
    assert a.version(CLUSTER) == b.version(CLUSTER) and a.version(ENDPOINT) == b.version(ENDPOINT)
    assert a == b
    c = snapshot({"x": (1,), "y": (3,)})
    assert c.version(CLUSTER) == a.version(CLUSTER)  # clusters unchanged
    assert c.version(ENDPOINT) != a.version(ENDPOINT)
    assert c.resource_version(ENDPOINT, "x") == a.resource_version(ENDPOINT, "x")
    assert c.resource_version(ENDPOINT, "y") != a.resource_version(ENDPOINT, "y")
    assert a.version(LISTENER) == Snapshot.build({}).version(LISTENER)  # absent type: the empty version


def test_replace_shares_unchanged_resources() -> None:
    a = snapshot({"x": (1,), "y": (2,)})
    b = a.replace(ENDPOINT, {"y": cla("y", 3), "z": cla("z", 4), "x": None})
    assert b.names(ENDPOINT) == {"y", "z"}
    assert b == Snapshot.build({CLUSTER: [eds_cluster("x"), eds_cluster("y")], ENDPOINT: [cla("y", 3), cla("z", 4)]})
    assert a.names(ENDPOINT) == {"x", "y"}  # the original is untouched
    assert b.entries(CLUSTER)["x"] is a.entries(CLUSTER)["x"]


def test_bad_resources_are_named_in_errors() -> None:
    with pytest.raises(SnapshotError, match=r"Listener: resource .c. is a envoy\.config\.cluster\.v3\.Cluster"):
        Snapshot.build({LISTENER: [cluster_pb2.Cluster(name="c")]})
    with pytest.raises(SnapshotError, match="keyed 'a' names itself 'b'"):
        Snapshot.build({CLUSTER: {"a": cluster_pb2.Cluster(name="b")}})
    with pytest.raises(SnapshotError, match="two resources are named 'l'"):
        Snapshot.build({LISTENER: [listener_pb2.Listener(name="l"), listener_pb2.Listener(name="l")]})
    with pytest.raises(SnapshotError, match="not a type URL"):
        Snapshot.build({"Cluster": [cluster_pb2.Cluster(name="c")]})


async def test_set_snapshot_wakes_only_on_change() -> None:
    cache = SnapshotCache()
    connected: list[str] = []
    cache.on_connect(connected.append)
    wake_a = cache.watch("a")
    wake_b = cache.watch("b")
    assert connected == ["a", "b"]
    assert cache.set_snapshot("a", snapshot({"x": (1,)}))
    assert wake_a.is_set() and not wake_b.is_set()
    wake_a.clear()
    assert not cache.set_snapshot("a", snapshot({"x": (1,)}))
    assert not wake_a.is_set()
    assert cache.set_snapshot("a", snapshot({"x": (2,)}))
    assert wake_a.is_set()
    cache.unwatch("a", wake_a)
    assert cache.connected() == ["b"]
    await asyncio.sleep(0)


def test_status_states() -> None:
    cache = SnapshotCache()
    s = snapshot({"x": (1,)})
    cache.set_snapshot("n", s)
    v = s.version(CLUSTER)
    cache.record_sent("n", CLUSTER, version=v, nonce="1")
    assert cache.status()[0].state == SyncState.STALE
    cache.record_ack("n", CLUSTER, version=v, nonce="1")
    row = cache.status()[0]
    assert row.state == SyncState.SYNCED and row.acked_version == v and row.current_version == v
    assert not row.connected
    s2 = snapshot({"x": (1,), "y": (1,)})
    cache.set_snapshot("n", s2)
    assert cache.status()[0].state == SyncState.STALE
    cache.record_sent("n", CLUSTER, version=s2.version(CLUSTER), nonce="2")
    cache.record_nack("n", CLUSTER, version=s2.version(CLUSTER), nonce="2", error="bad y")
    row = cache.status()[0]
    assert row.state == SyncState.NACKED and row.nack_error == "bad y" and row.acked_version == v
    cache.clear("n")
    assert cache.status() == [] and cache.get("n") is None


def test_select_cuts_per_proxy_snapshots_sharing_entries() -> None:
    full = snapshot({"x": (1,), "y": (2,), "z": (3,)})
    part = full.select({CLUSTER: ["x", "nope"], ENDPOINT: None})
    assert part.names(CLUSTER) == {"x"} and part.names(ENDPOINT) == {"x", "y", "z"}
    assert part.entries(CLUSTER)["x"] is full.entries(CLUSTER)["x"]
    assert part == Snapshot.build({CLUSTER: [eds_cluster("x")], ENDPOINT: [cla("x", 1), cla("y", 2), cla("z", 3)]})
    changed = part.replace(ENDPOINT, {"y": cla("y", 9)})
    assert changed.version(CLUSTER) == part.version(CLUSTER) and changed.entries(CLUSTER) is part.entries(CLUSTER)
    assert changed.version(ENDPOINT) == snapshot({"x": (1,), "y": (9,), "z": (3,)}).version(ENDPOINT)


def test_touched_follows_lineage_and_falls_back_to_a_diff() -> None:
    from gateway.snapshot import touched

    base = snapshot({"x": (1,), "y": (2,), "z": (3,)})
    a = base.replace(ENDPOINT, {"x": cla("x", 5)})
    b = a.replace(ENDPOINT, {"y": None, "w": cla("w", 1)})
    assert touched(b.entries(ENDPOINT), a.entries(ENDPOINT)) >= {"y", "w"}
    assert "z" not in touched(b.entries(ENDPOINT), base.entries(ENDPOINT))
    rebuilt = snapshot({"x": (5,), "z": (3,), "w": (1,)})  # same content as b, built from scratch: a new epoch
    assert touched(rebuilt.entries(ENDPOINT), b.entries(ENDPOINT)) == {"x", "z", "w"}  # identities differ
    assert rebuilt.version(ENDPOINT) == b.version(ENDPOINT)
    far = base
    for i in range(70):  # past 64 changed names a map starts a new epoch; diffs stay exact
        far = far.replace(ENDPOINT, {f"n{i}": cla(f"n{i}", i + 1)})
    assert touched(far.entries(ENDPOINT), base.entries(ENDPOINT)) == {f"n{i}" for i in range(70)}


def test_an_empty_type_equals_an_absent_one() -> None:
    a = snapshot({"x": (1,)})
    b = Snapshot.build({CLUSTER: [eds_cluster("x")], ENDPOINT: [cla("x", 1)], LISTENER: []})
    assert a == b and hash(a) == hash(b)
    assert b.version(LISTENER) == a.version(LISTENER)
