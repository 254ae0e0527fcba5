"""The store contract, checked on every store: the in-memory fake, SQLite, and a real etcd process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from discovery.model import (
    ClusterId,
    ClusterInfo,
    Endpoint,
    Locality,
    LocalitySummary,
    Namespace,
    NetworkId,
    ServiceKey,
    ServiceName,
    ServicePort,
    ServiceType,
)
from federation.records import (
    EventKind,
    ExportedService,
    ExportSet,
    Member,
    RevisionCompacted,
    StaleGeneration,
    StoreEvent,
    StoreSnapshot,
    UnknownCluster,
)
from federation.store.base import Store
from federation.store.etcd import EtcdStore
from federation.store.memory import MemoryStore
from federation.store.sqlite import SqliteStore
from tests.federation.conftest import EtcdServer

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
EVENT_TIMEOUT = 20.0

Opener = Callable[..., Awaitable[Store]]


def member(name: str, *, ttl: float = 3600.0, at: datetime | None = None, network: str = "net1") -> Member:
    # Leases run on the wall clock in every store: a registration must be recent or the reaper expires it.
    at = at or datetime.now(UTC)
    return Member(
        info=ClusterInfo(id=ClusterId(name), network=NetworkId(network), region="eu", zone="eu-1",
                         gateway_host="127.0.0.1", gateway_port=15443),
        registered_at=at,
        renewed_at=at,
        lease_ttl_s=ttl,
    )


def export_set(cluster: str, generation: int, *services: str, ready: int = 2) -> ExportSet:
    return ExportSet(
        cluster=ClusterId(cluster),
        generation=generation,
        services=tuple(
            ExportedService(
                key=ServiceKey(namespace=Namespace("default"), name=ServiceName(s)),
                type=ServiceType.CLUSTER_SET_IP,
                ports=(ServicePort(port=9080, name="http"),),
                created=T0,
                localities=(LocalitySummary(Locality("eu", "eu-1", cluster, "net1"), ready=ready, weight=ready),),
                endpoints=(Endpoint(address="10.0.0.7", ports=(("http", 9080),), labels=(("app", s),)),),
            )
            for s in services
        ),
    )


@pytest.fixture(params=["memory", "sqlite", "etcd"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """A function opening a store on this parameter's backend; several calls share one backend (not memory)."""
    opened: list[Store] = []
    kind = request.param
    shared_memory: list[MemoryStore] = []
    etcd: EtcdServer | None = request.getfixturevalue("etcd") if kind == "etcd" else None

    async def open_(**kwargs: object) -> Store:
        store: Store
        if kind == "memory":
            if shared_memory:
                return shared_memory[0]
            store = MemoryStore(reap_interval_s=0.1, **kwargs)  # type: ignore[arg-type]
            shared_memory.append(store)
        elif kind == "sqlite":
            store = SqliteStore(tmp_path / "fed.db", reap_interval_s=0.1, poll_interval_s=0.1, **kwargs)  # type: ignore[arg-type]
        else:
            assert etcd is not None
            store = EtcdStore(endpoints=[etcd.endpoint], **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    open_.kind = kind  # type: ignore[attr-defined]
    open_.etcd = etcd  # type: ignore[attr-defined]
    yield open_
    for store in reversed(opened):
        await store.close()


async def collect(store: Store, *, after: int, until: Callable[[list[StoreEvent]], bool]) -> list[StoreEvent]:
    """Watch from ``after`` until ``until(events)`` holds (bounded by EVENT_TIMEOUT)."""
    events: list[StoreEvent] = []

    async def run() -> None:
        async for event in store.watch(after=after):
            events.append(event)
            if until(events):
                return

    await asyncio.wait_for(run(), EVENT_TIMEOUT)
    return events


def up_to(revision: int) -> Callable[[list[StoreEvent]], bool]:
    return lambda events: bool(events) and events[-1].revision >= revision


def fold(events: list[StoreEvent]) -> tuple[dict[str, Member], dict[str, ExportSet]]:
    members: dict[str, Member] = {}
    exports: dict[str, ExportSet] = {}
    for e in events:
        if e.kind is EventKind.MEMBER:
            assert e.member is not None
            members[e.cluster] = e.member
        elif e.kind is EventKind.MEMBER_REMOVED:
            members.pop(e.cluster, None)
            exports.pop(e.cluster, None)
        else:
            assert e.exports is not None
            exports[e.cluster] = e.exports
    return members, exports


def without_renewal(m: Member) -> Member:
    return replace(m, renewed_at=T0)


async def test_revisions_increase_and_snapshot_has_the_writes(opener: Opener) -> None:
    store = await opener()
    r1 = await store.put_member(member("east"))
    r2 = await store.put_member(member("west"))
    r3 = await store.put_exports(export_set("east", 1, "reviews"))
    r4 = await store.put_exports(export_set("west", 1, "ratings"))
    assert 0 < r1 < r2 < r3 < r4
    snap = await store.snapshot()
    assert snap.revision >= r4
    assert [m.info.id for m in snap.members] == ["east", "west"]
    assert {e.cluster: e for e in snap.exports} == {
        "east": export_set("east", 1, "reviews"), "west": export_set("west", 1, "ratings"),
    }


async def test_watch_resumes_from_a_revision_with_nothing_missed(opener: Opener) -> None:
    store = await opener()
    r1 = await store.put_member(member("east"))
    revs = [await store.put_exports(export_set("east", g, f"svc{g}")) for g in range(1, 6)]
    # Resume from the middle: exactly the events after r = revs[1], in order.
    events = await collect(store, after=revs[1], until=up_to(revs[-1]))
    assert [e.revision for e in events] == revs[2:]
    assert [e.exports.generation for e in events if e.exports] == [3, 4, 5]
    # From the start: the registration first.
    events = await collect(store, after=r1 - 1, until=up_to(revs[-1]))
    assert events[0].kind is EventKind.MEMBER and events[0].revision == r1

    # A live watcher sees writes made after it started, in order.
    seen: list[StoreEvent] = []

    async def follow() -> None:
        async for event in store.watch(after=revs[-1]):
            seen.append(event)
            if len(seen) == 3:
                return

    task = asyncio.create_task(follow())
    later = [await store.put_exports(export_set("east", g, f"svc{g}")) for g in (6, 7)]
    later.append(await store.remove_member(ClusterId("east")))
    await asyncio.wait_for(task, EVENT_TIMEOUT)
    assert [e.revision for e in seen] == later
    assert [e.kind for e in seen] == [EventKind.EXPORTS, EventKind.EXPORTS, EventKind.MEMBER_REMOVED]


async def test_compacted_revision_is_refused_and_newer_ones_resume(opener: Opener) -> None:
    store = await opener()
    await store.put_member(member("east"))
    revs = [await store.put_exports(export_set("east", g, "reviews")) for g in range(1, 8)]
    oldest = await store.compact(keep=3)  # type: ignore[attr-defined]
    assert 0 < oldest < revs[-1]
    with pytest.raises(RevisionCompacted) as info:
        await collect(store, after=oldest - 1, until=up_to(revs[-1]))
    assert info.value.requested == oldest - 1
    assert info.value.oldest == oldest
    events = await collect(store, after=oldest, until=up_to(revs[-1]))
    assert events[-1].revision == revs[-1]
    assert all(e.revision > oldest for e in events)


async def test_sqlite_and_memory_retain_only_the_last_n_events(opener: Opener) -> None:
    if opener.kind == "etcd":  # type: ignore[attr-defined]
        pytest.skip("etcd retention counts etcd revisions; covered by the compaction test")
    store = await opener(retain=4)
    await store.put_member(member("east"))
    revs = [await store.put_exports(export_set("east", g, "reviews")) for g in range(1, 10)]
    with pytest.raises(RevisionCompacted):
        await collect(store, after=0, until=up_to(revs[-1]))
    events = await collect(store, after=revs[-5], until=up_to(revs[-1]))
    assert [e.revision for e in events] == revs[-4:]


async def test_generation_rules(opener: Opener) -> None:
    store = await opener()
    await store.put_member(member("east"))
    r2 = await store.put_exports(export_set("east", 2, "reviews"))
    # Same generation, same content: idempotent, the stored revision comes back, no new event.
    assert await store.put_exports(export_set("east", 2, "reviews")) == r2
    # Same generation, different content, and older generations: refused, nothing changes.
    with pytest.raises(StaleGeneration) as info:
        await store.put_exports(export_set("east", 2, "reviews", "ratings"))
    assert (info.value.got, info.value.stored) == (2, 2)
    with pytest.raises(StaleGeneration):
        await store.put_exports(export_set("east", 1, "other"))
    snap = await store.snapshot()
    assert snap.exports == (export_set("east", 2, "reviews"),)
    r3 = await store.put_exports(export_set("east", 3))
    assert r3 > r2
    events = await collect(store, after=r2 - 1, until=up_to(r3))
    assert [e.revision for e in events] == [r2, r3]
    assert (await store.snapshot()).exports == (export_set("east", 3),)


async def test_unknown_cluster_is_refused(opener: Opener) -> None:
    store = await opener()
    with pytest.raises(UnknownCluster):
        await store.put_exports(export_set("ghost", 1, "reviews"))
    with pytest.raises(UnknownCluster):
        await store.renew(ClusterId("ghost"), now=T0)
    with pytest.raises(UnknownCluster):
        await store.remove_member(ClusterId("ghost"))
    assert (await store.snapshot()).members == ()


async def test_heartbeats_show_in_leases_and_snapshot(opener: Opener) -> None:
    # A heartbeat makes no revision, but it is in the store at once: leases() (the service's cheap read for
    # renewedAt and leaseAgeSeconds) and snapshot() both carry it, for every member, until it is removed.
    store = await opener()
    await store.put_member(member("east"))
    await store.put_member(member("west"))
    later = datetime.now(UTC) + timedelta(seconds=30)
    even_later = later + timedelta(seconds=5)
    await store.renew(ClusterId("east"), now=later)
    assert (await store.leases())[ClusterId("east")] == later
    await store.renew(ClusterId("west"), now=even_later)
    assert await store.leases() == {ClusterId("east"): later, ClusterId("west"): even_later}
    assert {m.info.id: m.renewed_at for m in (await store.snapshot()).members} == await store.leases()
    await store.remove_member(ClusterId("west"))
    assert await store.leases() == {ClusterId("east"): later}


async def test_members_put_renew_remove(opener: Opener) -> None:
    store = await opener()
    r1 = await store.put_member(member("east"))
    await store.put_exports(export_set("east", 1, "reviews"))
    later = datetime.now(UTC) + timedelta(seconds=30)
    renewed = await store.renew(ClusterId("east"), now=later)
    assert renewed.renewed_at == later and renewed.unreachable_since is None
    snap = await store.snapshot()
    assert snap.members[0].renewed_at == later
    # Re-registering replaces the member (a new network, say) with a new revision.
    r2 = await store.put_member(member("east", network="net2"))
    assert r2 > r1
    assert (await store.snapshot()).members[0].info.network == "net2"
    # A heartbeat makes no event: the next event after the export is the re-registration.
    events = await collect(store, after=r1, until=up_to(r2))
    assert [e.kind for e in events] == [EventKind.EXPORTS, EventKind.MEMBER]
    r3 = await store.remove_member(ClusterId("east"))
    snap = await store.snapshot()
    assert snap.members == () and snap.exports == () and snap.revision >= r3
    with pytest.raises(UnknownCluster):
        await store.put_exports(export_set("east", 2))
    # Coming back after removal starts over (generation 1 is new again).
    await store.put_member(member("east"))
    await store.put_exports(export_set("east", 1, "reviews"))


async def test_snapshot_is_consistent_with_the_events(opener: Opener) -> None:
    store = await opener()
    for name in ("east", "west", "north"):
        await store.put_member(member(name))
    await store.put_exports(export_set("east", 1, "a", "b"))
    await store.put_exports(export_set("west", 1, "c"))
    await store.put_exports(export_set("east", 2, "a"))
    await store.remove_member(ClusterId("north"))
    snap: StoreSnapshot = await store.snapshot()
    events = await collect(store, after=0, until=up_to(snap.revision))
    members, exports = fold([e for e in events if e.revision <= snap.revision])
    assert {c: without_renewal(m) for c, m in members.items()} == {
        m.info.id: without_renewal(m) for m in snap.members
    }
    assert exports == {e.cluster: e for e in snap.exports}
    # Watching from the snapshot's revision yields what came after it.
    r = await store.put_exports(export_set("west", 2))
    after = await collect(store, after=snap.revision, until=up_to(r))
    assert [(e.kind, e.cluster) for e in after] == [(EventKind.EXPORTS, "west")]


async def test_lease_expiry_marks_unreachable_and_renew_restores(opener: Opener) -> None:
    store = await opener()
    now = datetime.now(UTC)
    start = await store.put_member(member("east", ttl=2.0, at=now))
    await store.put_member(member("west", ttl=3600.0, at=now))
    events = await collect(
        store, after=start, until=lambda es: any(e.member and e.member.unreachable_since for e in es)
    )
    gone = next(e for e in events if e.member and e.member.unreachable_since)
    assert gone.cluster == "east" and gone.kind is EventKind.MEMBER
    assert gone.member is not None and gone.member.unreachable_since == now + timedelta(seconds=2)
    snap = await store.snapshot()
    by_id = {m.info.id: m for m in snap.members}
    assert by_id[ClusterId("east")].unreachable_since == now + timedelta(seconds=2)
    assert by_id[ClusterId("west")].unreachable_since is None
    # The cluster comes back: a MEMBER event clears unreachable_since.
    back_at = datetime.now(UTC)
    back = await store.renew(ClusterId("east"), now=back_at)
    assert back.unreachable_since is None and back.renewed_at == back_at
    events = await collect(
        store, after=gone.revision,
        until=lambda es: any(e.member and e.member.unreachable_since is None and e.cluster == "east" for e in es),
    )
    assert events[-1].member is not None and events[-1].member.renewed_at == back_at
    assert {m.info.id: m.unreachable_since for m in (await store.snapshot()).members}[ClusterId("east")] is None


async def test_two_instances_share_revisions_and_events(opener: Opener) -> None:
    if opener.kind == "memory":  # type: ignore[attr-defined]
        pytest.skip("the in-memory store lives in one instance")
    a = await opener()
    b = await opener()
    assert a is not b
    r1 = await a.put_member(member("east"))
    r2 = await b.put_member(member("west"))
    r3 = await a.put_exports(export_set("west", 1, "ratings"))
    assert r1 < r2 < r3
    # Each instance refuses what the other made stale.
    with pytest.raises(StaleGeneration):
        await b.put_exports(export_set("west", 1, "other"))
    ea = await collect(a, after=0, until=up_to(r3))
    eb = await collect(b, after=0, until=up_to(r3))
    assert [(e.revision, e.kind, e.cluster) for e in ea] == [(e.revision, e.kind, e.cluster) for e in eb]
    sa, sb = await a.snapshot(), await b.snapshot()
    assert (sa.members, sa.exports) == (sb.members, sb.exports)
    # A live watch on one instance sees the other's write (cross-process polling for SQLite).
    seen = asyncio.create_task(collect(b, after=r3, until=lambda es: True))
    r4 = await a.put_exports(export_set("east", 1, "reviews"))
    assert [e.revision for e in await seen] == [r4]


async def test_concurrent_publishers_never_regress_a_generation(opener: Opener) -> None:
    a = await opener()
    b = await opener()
    start = await a.put_member(member("east"))

    async def publish(store: Store, generations: range) -> list[int]:
        accepted = []
        for g in generations:
            try:
                await store.put_exports(export_set("east", g, f"s{g}"))
                accepted.append(g)
            except StaleGeneration:
                pass
        return accepted

    got_a, got_b = await asyncio.gather(publish(a, range(1, 40, 2)), publish(b, range(2, 40, 2)))
    final = (await a.snapshot()).exports[0].generation
    assert final == max(got_a + got_b)
    events = await collect(a, after=start, until=lambda es: bool(es) and es[-1].exports is not None
                           and es[-1].exports.generation == final)
    generations = [e.exports.generation for e in events if e.exports]
    assert generations == sorted(generations) and len(set(generations)) == len(generations)
    assert sorted(generations) == sorted(got_a + got_b)


async def test_one_event_per_mutation(opener: Opener) -> None:
    """Each mutation is exactly one event (etcd writes several keys per mutation; only one becomes an event)."""
    store = await opener()
    now = datetime.now(UTC)
    revs = [
        await store.put_member(member("east", at=now)),
        await store.put_exports(export_set("east", 1, "reviews")),
        await store.put_member(replace(member("east", at=now), unreachable_since=now)),  # marked by the service
        await store.remove_member(ClusterId("east")),
        await store.put_member(member("west", at=now)),
    ]
    events = await collect(store, after=revs[0] - 1, until=up_to(revs[-1]))
    assert [(e.revision, e.kind, e.cluster) for e in events] == list(zip(
        revs,
        [EventKind.MEMBER, EventKind.EXPORTS, EventKind.MEMBER, EventKind.MEMBER_REMOVED, EventKind.MEMBER],
        ["east", "east", "east", "east", "west"], strict=True,
    ))
    assert events[2].member is not None and events[2].member.unreachable_since == now


async def test_service_marked_unreachable_member_returns_by_renew(opener: Opener) -> None:
    store = await opener()
    now = datetime.now(UTC)
    await store.put_member(member("east", at=now))
    marked = await store.put_member(replace(member("east", at=now), unreachable_since=now))
    snap = await store.snapshot()
    assert snap.members[0].unreachable_since == now
    back = await store.renew(ClusterId("east"), now=now + timedelta(seconds=1))
    assert back.unreachable_since is None
    events = await collect(store, after=marked, until=lambda es: True)
    assert events[0].kind is EventKind.MEMBER and events[0].member == back
    assert (await store.snapshot()).members == (back,)


async def test_close_ends_open_watches(opener: Opener) -> None:
    store = await opener()
    r = await store.put_member(member("east"))
    got: list[StoreEvent] = []

    async def follow() -> None:
        async for event in store.watch(after=r - 1):
            got.append(event)

    task = asyncio.create_task(follow())
    await asyncio.wait_for(_until(lambda: bool(got)), EVENT_TIMEOUT)
    await store.close()
    await asyncio.wait_for(task, EVENT_TIMEOUT)  # ends without an error
    assert [e.revision for e in got] == [r]


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def big_export_set(cluster: str, generation: int, services: int = 1000, endpoints: int = 8) -> ExportSet:
    """Larger than etcd's default 1.5 MiB request limit once encoded as JSON."""
    base = export_set(cluster, generation, "x")
    template = base.services[0]
    return replace(base, services=tuple(
        replace(
            template,
            key=ServiceKey(namespace=Namespace("default"), name=ServiceName(f"svc-{i}")),
            endpoints=tuple(Endpoint(address=f"10.{i // 250}.{i % 250}.{j}", ports=(("http", 9080),),
                                     labels=(("app", f"svc-{i}"),), service_account=f"sa-{i}")
                            for j in range(endpoints)),
        )
        for i in range(services)
    ))


async def test_a_thousand_service_export_set_round_trips(opener: Opener) -> None:
    from federation.store import codec

    store = await opener()
    big = big_export_set("east", 1)
    assert len(codec.encode_exports(big)) > 1_600_000
    r0 = await store.put_member(member("east"))
    r1 = await store.put_exports(big)
    assert await store.put_exports(big_export_set("east", 1)) == r1  # idempotent, compared on content
    assert (await store.snapshot()).exports == (big,)
    events = await collect(store, after=r0, until=up_to(r1))
    assert events[-1].exports == big
