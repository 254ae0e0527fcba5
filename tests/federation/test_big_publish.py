"""One member's huge publish must not cost another member its lease (issue 10, item 2).

``meshfed federation serve`` runs as its own process (SQLite store, then etcd; 3 s leases); three agents with real mTLS
clients share this process and its event loop, as control planes on a small machine: east and west heartbeat every
0.3 s while north publishes 20,000 services. Asserted: north's publish is acknowledged and reaches east and west;
east and west never go unreachable (a watch on the store's own event log sees no lease expire, no export is
withdrawn) and their heartbeats keep being acknowledged while it happens. Printed (not asserted: timing belongs to
benchmarks): this event loop's longest stall and a fourth member's heartbeat round trip, idle vs during the publish,
measured side by side in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from pathlib import Path

import pytest

from discovery.model import ClusterId
from federation import offload
from federation.agent import AgentConfig, FederationAgent
from federation.records import EventKind
from federation.service import ServiceConfig
from federation.store.etcd import EtcdStore
from federation.store.sqlite import SqliteStore
from tests.federation.conftest import EtcdServer
from tests.federation.fedkit import Pki, ServiceProcess, agent, eventually, in_process, info, snapshot

pytestmark = pytest.mark.timeout(300)

SERVICES = int(os.environ.get("MESHFED_BIG_PUBLISH", "20000"))


class _Stalls:
    """The longest gap between ticks of a task that asks to run every 10 ms."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.01)
            last = now

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


async def _heartbeat_rtts(pki: Pki, url: str, until: asyncio.Event | None, *, count: int = 0) -> list[float]:
    """Heartbeat round trips of a fourth member (its own client, on this loop), until ``until`` or ``count``."""
    out: list[float] = []
    async with pki.client("probe", url) as probe:
        await probe.register(info("probe", "net9"))
        while (until is not None and not until.is_set()) or len(out) < count:
            started = time.perf_counter()
            await probe.heartbeat()
            out.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)
    return out


def _gone(a: FederationAgent, other: str) -> bool:
    m = a.catalog.members.get(ClusterId(other)) if a.catalog is not None else None
    return m is not None and m.unreachable_since is not None


@pytest.mark.parametrize("kind", ["sqlite", "etcd"])
async def test_big_publish_costs_no_other_member_its_lease(tmp_path: Path, kind: str,
                                                           request: pytest.FixtureRequest) -> None:
    pki = Pki.create()
    reader: SqliteStore | EtcdStore
    if kind == "etcd":
        etcd: EtcdServer = request.getfixturevalue("etcd")
        url_of_store, reader = etcd.store_url, EtcdStore(endpoints=[etcd.endpoint])
    else:
        url_of_store, reader = f"sqlite:{tmp_path / 'fed.db'}", SqliteStore(tmp_path / "fed.db", reap_interval_s=0)
    service = ServiceProcess(pki, tmp_path, url_of_store, lease_ttl=3.0)
    service.start()
    url = service.url
    fast = AgentConfig(heartbeat_interval_s=0.3, backoff_initial_s=0.05, backoff_max_s=0.3)
    try:
        await _run(pki, url, fast, reader, kind)
    finally:
        service.stop()


async def _run(pki: Pki, url: str, fast: AgentConfig, reader: SqliteStore | EtcdStore, kind: str) -> None:
    # The test reads the service's store too (SQLite in WAL mode has room for a second reader); it never writes.
    async with reader as store, \
            agent(pki, "east", url, config=fast) as east, agent(pki, "west", url, config=fast) as west, \
            agent(pki, "north", url, config=fast) as north:
        for a in (east, west, north):
            async with asyncio.timeout(30):
                await a.registered.wait()
        east.publish(*snapshot("east", ["ratings"]))
        west.publish(*snapshot("west", ["reviews"], addr_base=2))
        await eventually(lambda: all(a.catalog is not None and len(a.catalog.services) == 2 for a in (east, west)),
                         within=30, what="the small exports everywhere")
        idle = await _heartbeat_rtts(pki, url, None, count=20)

        # Did the store ever record east or west unreachable (its own event log), or did either agent's catalog
        # ever show the other one gone?
        lost: list[str] = []
        start = (await store.snapshot()).revision

        async def watch_leases() -> None:
            async def events() -> None:
                async for ev in store.watch(after=start):
                    if ev.kind == EventKind.MEMBER and ev.member is not None and ev.member.unreachable_since and \
                            ev.cluster in ("east", "west"):
                        lost.append(f"{ev.cluster} expired at revision {ev.revision}")

            follower = asyncio.get_running_loop().create_task(events())
            try:
                while True:
                    lost.extend(f"{c} in {a.info.id}'s catalog" for a in (east, west) for c in ("east", "west")
                                if _gone(a, c))
                    await asyncio.sleep(0.02)
            finally:
                follower.cancel()

        guard = asyncio.get_running_loop().create_task(watch_leases())
        beats = {a.info.id: a.heartbeats for a in (east, west)}
        failures = {a.info.id: a.heartbeat_failures for a in (east, west)}
        stalls = _Stalls()
        stalls.start()
        done = asyncio.Event()
        probing = asyncio.get_running_loop().create_task(_heartbeat_rtts(pki, url, done))
        started = time.perf_counter()
        generation = north.publish(*snapshot("north", [f"bulk{i}" for i in range(SERVICES)], addr_base=3))
        async with asyncio.timeout(240):
            await north.wait_published(generation)
        acked = time.perf_counter() - started
        await eventually(lambda: all(a.catalog is not None and len(a.catalog.services) == SERVICES + 2
                                     for a in (east, west)), within=240, what="north's services at east and west")
        seen = time.perf_counter() - started
        beats_during = {a.info.id: a.heartbeats - beats[a.info.id] for a in (east, west)}
        await asyncio.sleep(3.5)  # one more lease: nothing expires late either
        done.set()
        busy = await probing
        await stalls.stop()
        guard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await guard

        print(f"\n[{kind}] {SERVICES} services from north: acknowledged in {acked:.1f}s, at east and west in "
              f"{seen:.1f}s; "
              f"event loop's longest stall {stalls.longest * 1000:.0f} ms; heartbeat round trip p50/max "
              f"idle {statistics.median(idle) * 1000:.1f}/{max(idle) * 1000:.1f} ms, during the publish "
              f"{statistics.median(busy) * 1000:.1f}/{max(busy) * 1000:.1f} ms "
              f"(x{statistics.median(busy) / statistics.median(idle):.1f} at p50); heartbeats acknowledged "
              f"meanwhile {beats_during}")
        assert lost == [], lost[:5]
        assert all(n >= 2 for n in beats_during.values()), beats_during
        assert {a.info.id: a.heartbeat_failures for a in (east, west)} == failures
        snap = await store.snapshot()
        assert all(m.unreachable_since is None for m in snap.members), snap.members


async def test_a_large_snapshot_is_built_off_the_loop_and_an_unchanged_one_is_not_sent_again(
        tmp_path: Path) -> None:
    pki = Pki.create()
    names = [f"s{i}" for i in range(offload.LARGE)]
    async with SqliteStore(tmp_path / "fed.db") as store, \
            in_process(pki, store, config=ServiceConfig(lease_ttl_s=10.0)) as (url, _app), \
            agent(pki, "east", url) as east:
        async with asyncio.timeout(60):
            await east.registered.wait()
            first = east.publish(*snapshot("east", names))
            await east.wait_published(first)
            (stored,) = (await store.snapshot()).exports
            assert stored.generation == first and len(stored.services) == offload.LARGE
            again = east.publish(*snapshot("east", names))  # the same services: acknowledged, not sent
            await east.wait_published(again)
            assert (await store.snapshot()).exports[0].generation == first
            # Two snapshots in a row: only the newest counts.
            east.publish(*snapshot("east", names[:-1]))
            last = east.publish(*snapshot("east", names[1:]))
            await east.wait_published(last)
            (stored,) = (await store.snapshot()).exports
            assert stored.generation == last and stored.services[0].key.name == names[1]
