"""The stored JSON form of federation records, and the ``--store`` URL parser."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.model import (
    ClusterId,
    ClusterInfo,
    Endpoint,
    Locality,
    LocalitySummary,
    Namespace,
    NetworkId,
    Protocol,
    ServiceKey,
    ServiceName,
    ServicePort,
    ServiceTraits,
    ServiceType,
)
from federation.records import EventKind, ExportedService, ExportSet, Member, StoreEvent, StoreUnavailable
from federation.store import codec
from federation.store.etcd import EtcdStore
from federation.store.factory import InvalidStoreUrl, open_store, parse_etcd_endpoints
from federation.store.memory import MemoryStore
from federation.store.sqlite import SqliteStore

labels = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
times = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=2))]),
)
ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@st.composite
def members(draw: st.DrawFn) -> Member:
    return Member(
        info=ClusterInfo(
            id=ClusterId(draw(labels)), network=NetworkId(draw(labels)), region=draw(st.text(max_size=5)),
            zone=draw(st.text(max_size=5)), gateway_host=draw(ips), gateway_port=draw(st.integers(1, 65535)),
        ),
        registered_at=draw(times),
        renewed_at=draw(times),
        lease_ttl_s=draw(st.floats(0.5, 1e6, allow_nan=False)),
        unreachable_since=draw(st.none() | times),
    )


@st.composite
def export_sets(draw: st.DrawFn) -> ExportSet:
    cluster = draw(labels)
    services = []
    for name in draw(st.lists(labels, max_size=3, unique=True)):
        services.append(ExportedService(
            key=ServiceKey(namespace=Namespace(draw(labels)), name=ServiceName(name)),
            type=draw(st.sampled_from(list(ServiceType))),
            ports=tuple(
                ServicePort(port=p, protocol=draw(st.sampled_from(list(Protocol))), name=draw(st.just("") | labels),
                            app_protocol=draw(st.sampled_from(["", "http", "grpc"])),
                            target_port=draw(st.integers(0, 65535) | labels))
                for p in draw(st.lists(st.integers(1, 65535), max_size=3, unique=True))
            ),
            created=draw(times),
            localities=tuple(
                LocalitySummary(Locality(draw(labels), draw(labels), cluster, draw(labels)),
                                ready=draw(st.integers(0, 1000)), weight=draw(st.integers(0, 1000)))
                for _ in range(draw(st.integers(0, 2)))
            ),
            endpoints=tuple(
                Endpoint(address=draw(ips), ready=draw(st.booleans()), serving=draw(st.booleans()),
                         terminating=draw(st.booleans()), hostname=draw(st.just("") | labels), zone=draw(labels),
                         ports=(("http", draw(st.integers(1, 65535))),), labels=(("app", draw(labels)),),
                         service_account=draw(labels))
                for _ in range(draw(st.integers(0, 2)))
            ),
            traits=draw(st.builds(ServiceTraits, session_affinity=st.sampled_from(["None", "ClientIP"]),
                                  affinity_timeout=st.integers(0, 86400),
                                  internal_traffic_policy=st.sampled_from(["Cluster", "Local"]),
                                  traffic_distribution=st.sampled_from(["", "PreferClose"]),
                                  ip_families=st.sampled_from([(), ("IPv6",), ("IPv4", "IPv6")]))),
            exported_labels=draw(st.sampled_from([(), (("tier", "gold"),)])),
            exported_annotations=draw(st.sampled_from([(), (("a", "1"), ("b", "2"))])),
        ))
    return ExportSet(cluster=ClusterId(cluster), generation=draw(st.integers(0, 2**53)), services=tuple(services))


@given(members())
def test_member_round_trips(member: Member) -> None:
    text = codec.encode_member(member)
    assert codec.decode_member(text) == member
    assert codec.encode_member(codec.decode_member(text)) == text  # canonical: re-encoding is byte-identical


@given(export_sets())
def test_export_set_round_trips(exports: ExportSet) -> None:
    text = codec.encode_exports(exports)
    assert codec.decode_exports(text) == exports
    assert codec.encode_exports(codec.decode_exports(text)) == text


@given(export_sets())
def test_export_sets_encode_canonically_one_service_at_a_time(exports: ExportSet) -> None:
    # Encoding and decoding service by service (so a big record never holds the GIL in one json call) gives the
    # very bytes of one canonical dumps, and reads back records written any other way too.
    text = codec.encode_exports(exports)
    assert text == codec.dumps(codec.exports_to_json(exports))
    assert codec.decode_exports(text) == exports
    spaced = json.dumps(codec.exports_to_json(exports), indent=1)
    assert codec.decode_exports(spaced) == exports


def test_event_rows_round_trip() -> None:
    m = Member(info=ClusterInfo(id=ClusterId("east"), network=NetworkId("n")), registered_at=datetime.now(UTC),
               renewed_at=datetime.now(UTC), lease_ttl_s=10)
    for event in (
        StoreEvent(3, EventKind.MEMBER, ClusterId("east"), member=m),
        StoreEvent(4, EventKind.EXPORTS, ClusterId("east"), exports=ExportSet(ClusterId("east"), 1, ())),
        StoreEvent(5, EventKind.MEMBER_REMOVED, ClusterId("east")),
    ):
        assert codec.decode_event(event.revision, str(event.kind), event.cluster, codec.event_body(event)) == event


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"info": {"id": "east"}}', "KeyError"),
        ('{"info": {"id": "East!", "network": "n"}, "registered_at": "2026-01-01T00:00:00+00:00", '
         '"renewed_at": "2026-01-01T00:00:00+00:00", "lease_ttl_s": 1}', "not a valid RFC 1123 label"),
        ('{"info": {"id": "east", "network": "n"}, "registered_at": 5, '
         '"renewed_at": "2026-01-01T00:00:00+00:00", "lease_ttl_s": 1}', "registered_at"),
    ],
)
def test_corrupt_member_records_name_the_record_and_field(text: str, needle: str) -> None:
    with pytest.raises(codec.CorruptRecord) as info:
        codec.decode_member(text, what="member east")
    assert "member east" in str(info.value) and needle in str(info.value)
    assert isinstance(info.value, StoreUnavailable)


def test_corrupt_event_kind_is_named() -> None:
    with pytest.raises(codec.CorruptRecord, match="revision 7: unknown kind 'bogus'"):
        codec.decode_event(7, "bogus", "east", None)


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(f"sqlite:{tmp_path / 'a.db'}"), SqliteStore)
    s = open_store(f"sqlite://{tmp_path / 'b.db'}")
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "b.db"
    assert isinstance(open_store("memory:"), MemoryStore)
    e = open_store("etcd://127.0.0.1:2379,[::1]:2380/tenant-a")
    assert isinstance(e, EtcdStore)
    assert parse_etcd_endpoints("etcd://127.0.0.1:2379,[::1]:2380/tenant-a") == (
        [("127.0.0.1", 2379), ("::1", 2380)], "/tenant-a/"
    )
    assert parse_etcd_endpoints("etcd://localhost:1") == ([("localhost", 1)], "/meshfed/")


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("postgres://db/x", "unknown scheme 'postgres'"),
        ("/var/lib/fed.db", "unknown scheme"),
        ("sqlite:", "no file path"),
        ("etcd://", "no etcd endpoint"),
        ("etcd://host", "must be HOST:PORT"),
        ("etcd://host:abc", "port 'abc'"),
        ("etcd://host:70000", "out of range"),
    ],
)
def test_bad_store_urls_are_named(url: str, needle: str) -> None:
    with pytest.raises(InvalidStoreUrl) as info:
        open_store(url)
    assert repr(url) in str(info.value) and needle in str(info.value)
    assert isinstance(info.value, ValueError)


async def test_sqlite_bad_paths_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "fed.db"
    store = open_store(f"sqlite:{missing}")
    with pytest.raises(StoreUnavailable, match=str(missing)):
        await store.snapshot()
    await store.close()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database file, just text that is long enough to have a header" * 20)
    store = open_store(f"sqlite:{junk}")
    with pytest.raises(StoreUnavailable, match="not a database") as info:
        await store.snapshot()
    assert str(junk) in str(info.value)
    await store.close()
    assert junk.read_bytes().startswith(b"this is not a database")  # nothing overwritten
