"""Nothing acknowledged is lost: kill -9 of a writer process (SQLite, etcd) and kill -9 / restart of etcd."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from discovery.model import ClusterId, ClusterInfo, NetworkId
from federation.records import EventKind, ExportSet, Member, StoreEvent, StoreUnavailable
from federation.store.etcd import EtcdStore
from federation.store.factory import open_store
from federation.store.sqlite import SqliteStore
from tests.federation.conftest import EtcdServer
from tests.support.procs import Proc, wait_for

REPO = Path(__file__).resolve().parents[2]

# The writer: registers "east", then publishes generation 1, 2, 3, ... as fast as the store acknowledges,
# printing "ack N" (flushed) only after put_exports returned. It never stops by itself: the test kill -9s it.
WRITER = r"""
import asyncio, sys
from datetime import UTC, datetime
from discovery.model import ClusterId, ClusterInfo, NetworkId
from federation.records import ExportSet, Member
from federation.store.factory import open_store
from federation.store.sqlite import SqliteStore

async def main(url: str) -> None:
    store = open_store(url)
    now = datetime.now(UTC)
    info = ClusterInfo(id=ClusterId("east"), network=NetworkId("net1"))
    await store.put_member(Member(info=info, registered_at=now, renewed_at=now, lease_ttl_s=3600.0))
    print("registered", flush=True)
    generation = 0
    while True:
        generation += 1
        revision = await store.put_exports(ExportSet(cluster=ClusterId("east"), generation=generation, services=()))
        print(f"ack {generation} {revision}", flush=True)

asyncio.run(main(sys.argv[1]))
"""

ACKS = 30


@pytest.fixture
def writer_factory(tmp_path: Path) -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.stop()


def start_writer(procs: list[Proc], url: str, log: Path) -> Proc:
    proc = Proc([sys.executable, "-c", WRITER, url], log=log, cwd=REPO)
    procs.append(proc)
    return proc


def acks(proc: Proc) -> list[tuple[int, int]]:
    return [(int(g), int(r)) for g, r in re.findall(r"^ack (\d+) (\d+)$", proc.output(), re.M)]


def kill_after_acks(proc: Proc, n: int) -> tuple[int, int]:
    """Let the writer acknowledge at least ``n`` writes, kill -9 it mid-stream, return the last (gen, revision)."""

    def enough() -> bool:
        if not proc.alive():
            raise RuntimeError(f"writer died:\n{proc.output()[-3000:]}")
        return len(acks(proc)) >= n

    wait_for(enough, timeout=60, what=f"{n} acknowledged writes")
    proc.kill9()
    done = acks(proc)  # read after the kill: every line the writer flushed before it died
    assert done, proc.output()
    return done[-1]


async def check_survivors(url: str, last_gen: int, last_rev: int) -> None:
    store = open_store(url)
    try:
        snap = await store.snapshot()
        assert [m.info.id for m in snap.members] == ["east"]
        (exports,) = snap.exports
        # Everything acknowledged is there; at most the one write in flight at the kill got further.
        assert exports.generation >= last_gen
        assert snap.revision >= last_rev
        # The log still replays in order up to the acknowledged revision, generation by generation.
        seen: list[StoreEvent] = []

        async def replay() -> None:
            async for e in store.watch(after=0):
                seen.append(e)
                if e.revision >= last_rev:
                    return

        await asyncio.wait_for(replay(), 20)
        gens = [e.exports.generation for e in seen if e.kind is EventKind.EXPORTS and e.exports]
        assert gens == list(range(1, len(gens) + 1)) and gens[-1] >= last_gen
        # And the store keeps working after the crash.
        await store.put_exports(ExportSet(cluster=ClusterId("east"), generation=exports.generation + 1, services=()))
    finally:
        await store.close()


async def test_sqlite_acknowledged_writes_survive_kill9(tmp_path: Path, writer_factory: list[Proc]) -> None:
    db = tmp_path / "fed.db"
    proc = start_writer(writer_factory, f"sqlite:{db}", tmp_path / "writer.log")
    last_gen, last_rev = kill_after_acks(proc, ACKS)
    assert last_gen >= ACKS
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert oct(db.stat().st_mode & 0o777) == oct(0o600)
    await check_survivors(f"sqlite:{db}", last_gen, last_rev)


async def test_etcd_acknowledged_writes_survive_kill9_of_the_writer(
    etcd: EtcdServer, tmp_path: Path, writer_factory: list[Proc]
) -> None:
    proc = start_writer(writer_factory, etcd.store_url, tmp_path / "writer.log")
    last_gen, last_rev = kill_after_acks(proc, ACKS)
    await check_survivors(etcd.store_url, last_gen, last_rev)


async def test_etcd_acknowledged_writes_survive_kill9_of_etcd(
    etcd: EtcdServer, tmp_path: Path, writer_factory: list[Proc]
) -> None:
    proc = start_writer(writer_factory, etcd.store_url, tmp_path / "writer.log")
    wait_for(lambda: len(acks(proc)) >= ACKS, timeout=60, what="acknowledged writes")
    etcd.kill9()  # etcd dies mid-stream; the writer's next write fails
    proc.kill9()
    last_gen, last_rev = acks(proc)[-1]
    etcd.start()  # same data dir, same ports
    await check_survivors(etcd.store_url, last_gen, last_rev)


def _member(name: str) -> Member:
    now = datetime.now(UTC)
    info = ClusterInfo(id=ClusterId(name), network=NetworkId("net1"))
    return Member(info=info, registered_at=now, renewed_at=now, lease_ttl_s=3600.0)


async def test_etcd_restart_keeps_data_and_the_store_and_its_watch_reconnect(etcd: EtcdServer) -> None:
    store = EtcdStore(endpoints=[etcd.endpoint], timeout_s=2.0)
    try:
        start = await store.put_member(_member("east"))
        for g in range(1, 4):
            await store.put_exports(ExportSet(cluster=ClusterId("east"), generation=g, services=()))
        seen: list[StoreEvent] = []

        async def follow() -> None:
            async for e in store.watch(after=start):
                seen.append(e)
                if e.exports is not None and e.exports.generation == 6:
                    return

        watcher = asyncio.create_task(follow())
        await asyncio.to_thread(etcd.stop)
        # While etcd is down, writes fail with StoreUnavailable wrapping the client's error, and nothing changes.
        with pytest.raises(StoreUnavailable) as info:
            await store.put_exports(ExportSet(cluster=ClusterId("east"), generation=4, services=()))
        assert info.value.__cause__ is not None
        await asyncio.to_thread(etcd.start)
        snap = await store.snapshot()
        assert snap.exports[0].generation == 3
        for g in range(4, 7):
            await store.put_exports(ExportSet(cluster=ClusterId("east"), generation=g, services=()))
        await asyncio.wait_for(watcher, 30)
        gens = [e.exports.generation for e in seen if e.exports]
        assert gens == [1, 2, 3, 4, 5, 6]
        revisions = [e.revision for e in seen]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    finally:
        await store.close()


async def test_sqlite_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "private.db"
    store = open_store(f"sqlite:{db}")
    try:
        await store.put_member(_member("east"))
        modes = await asyncio.to_thread(
            lambda: {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir() if p.name.startswith("private")}
        )
        assert set(modes) >= {"private.db", "private.db-wal"}
        assert modes == {name: oct(0o600) for name in modes}
    finally:
        await store.close()


async def test_sqlite_watch_sees_writes_of_another_process(tmp_path: Path, writer_factory: list[Proc]) -> None:
    db = tmp_path / "shared.db"
    store = SqliteStore(db, poll_interval_s=0.1, reap_interval_s=0)
    try:
        await store.snapshot()  # creates the file and schema
        got: list[StoreEvent] = []

        async def follow() -> None:
            async for e in store.watch(after=0):
                got.append(e)
                if e.exports is not None and e.exports.generation >= 10:
                    return

        watcher = asyncio.create_task(follow())
        proc = start_writer(writer_factory, f"sqlite:{db}", tmp_path / "writer.log")
        await asyncio.wait_for(watcher, 60)
        await asyncio.to_thread(proc.kill9)
        assert got[0].kind is EventKind.MEMBER and got[0].cluster == "east"
        assert [e.exports.generation for e in got if e.exports] == list(range(1, 11))
    finally:
        await store.close()
