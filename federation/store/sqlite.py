"""The embedded default store: one SQLite file in WAL mode.

Schema (``PRAGMA user_version = 1``)::

    events  (revision INTEGER PRIMARY KEY AUTOINCREMENT, kind, cluster, body JSON)   -- the change log
    members (cluster PRIMARY KEY, body JSON, revision)
    exports (cluster PRIMARY KEY, generation, body JSON, revision)
    meta    (key PRIMARY KEY, value)  -- 'compacted': events with revision <= value were dropped

Every mutation runs in one ``BEGIN IMMEDIATE`` transaction that writes the new state and its event row, and trims
the log to the newest ``retain`` events. The revision is the event row's id (AUTOINCREMENT never reuses one, even
after rows are deleted). ``synchronous=FULL``: the WAL is fsynced at every commit, so a write whose coroutine
returned survives kill -9 of the process *and* a power loss (NORMAL would survive the first only).

All SQLite calls run on one dedicated thread (a single-worker executor owning the connection), never on the event
loop. Encoding and decoding export sets (CPU work that grows with a member's size) runs on other worker threads,
never on the store thread: a heartbeat's ``renew`` waits at most for one SQL transaction, not behind the decoding of
another member's 20,000 services. Watchers are woken in-process by an ``asyncio.Condition`` after each commit, and
also re-read the log every ``poll_interval_s`` so that another process writing the same file is seen too.

Errors: ``sqlite3.Error`` is wrapped into ``StoreUnavailable`` (``raise ... from exc``); the rest are the
``federation.records`` tree (``StaleGeneration``, ``UnknownCluster``, ``RevisionCompacted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from discovery.model import ClusterId
from federation import offload
from federation.clock import utcnow
from federation.records import (
    EventKind,
    ExportSet,
    Member,
    RevisionCompacted,
    StaleGeneration,
    StoreEvent,
    StoreSnapshot,
    StoreUnavailable,
    UnknownCluster,
)
from federation.store import codec
from federation.store.memory import DEFAULT_REAP_INTERVAL_S, DEFAULT_RETAIN, expired, lease_deadline

log = logging.getLogger("meshfed.federation.store")

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    cluster TEXT NOT NULL,
    body TEXT
);
CREATE TABLE IF NOT EXISTS members (
    cluster TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS exports (
    cluster TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    body TEXT NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('compacted', 0);
"""

_WATCH_BATCH = 500


class SqliteStore:
    """``Store`` over one SQLite file. Use as ``async with SqliteStore(path) as store`` or call ``close()``."""

    def __init__(
        self,
        path: str | Path,
        *,
        retain: int = DEFAULT_RETAIN,
        poll_interval_s: float = 0.5,
        reap_interval_s: float = DEFAULT_REAP_INTERVAL_S,
        busy_timeout_s: float = 10.0,
    ) -> None:
        if retain < 1:
            raise ValueError(f"retain must be at least 1, got {retain}")
        self.path = Path(path)
        self._retain = retain
        self._poll = poll_interval_s
        self._reap_interval = reap_interval_s
        self._busy_timeout = busy_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshfed-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._changed: asyncio.Condition | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        self._writes = 0  # bumped after each local commit, so a watcher never sleeps through a notify
        self._lock = threading.Lock()

    # ---- lifecycle ----

    async def __aenter__(self) -> SqliteStore:
        await self._run(lambda c: None)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _connect(self) -> sqlite3.Connection:
        """Open the file and create the schema (runs on the store thread)."""
        if self._conn is not None:
            return self._conn
        if not self.path.exists():
            # Create the file 0600 before SQLite does: its WAL and shm files then inherit the same mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"sqlite store {self.path}: could not switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version not in (0, SCHEMA_VERSION):
                raise StoreUnavailable(
                    f"sqlite store {self.path}: schema version {version} is not {SCHEMA_VERSION} (newer meshfed?)"
                )
            conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, what: str = "open") -> T:
        if self._closed:
            raise StoreUnavailable(f"sqlite store {self.path} is closed")
        if self._changed is None:
            self._changed = asyncio.Condition()
        if self._reaper is None and self._reap_interval > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop(), name="sqlite-store-reaper")

        def call() -> T:
            with self._lock:
                conn = self._connect()
                return fn(conn)

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, call)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"sqlite store {self.path}: {what}: {type(exc).__name__}: {exc}") from exc

    async def _notify(self) -> None:
        self._writes += 1
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await self._notify()

        def shut() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=False)  # the worker is idle now and exits on its own

    # ---- the write path (store thread) ----

    def _write(self, conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _append(self, conn: sqlite3.Connection, kind: EventKind, cluster: ClusterId, body: str | None) -> int:
        cur = conn.execute("INSERT INTO events (kind, cluster, body) VALUES (?, ?, ?)", (str(kind), cluster, body))
        revision = cur.lastrowid
        assert revision is not None
        floor = revision - self._retain
        compacted = int(conn.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()[0])
        if floor > compacted:
            conn.execute("DELETE FROM events WHERE revision <= ?", (floor,))
            conn.execute("UPDATE meta SET value=? WHERE key='compacted'", (floor,))
        return revision

    @staticmethod
    def _member(conn: sqlite3.Connection, cluster: ClusterId) -> Member | None:
        row = conn.execute("SELECT body FROM members WHERE cluster=?", (cluster,)).fetchone()
        return None if row is None else codec.decode_member(row[0], what=f"member {cluster}")

    async def put_member(self, member: Member) -> int:
        cid = member.info.id
        text = codec.encode_member(member)

        def body(conn: sqlite3.Connection) -> int:
            revision = self._append(conn, EventKind.MEMBER, cid, text)
            conn.execute(
                "INSERT INTO members (cluster, body, revision) VALUES (?, ?, ?) "
                "ON CONFLICT(cluster) DO UPDATE SET body=excluded.body, revision=excluded.revision",
                (cid, text, revision),
            )
            return revision

        revision = await self._run(lambda c: self._write(c, body), what=f"put_member {cid}")
        await self._notify()
        return revision

    async def renew(self, cluster: ClusterId, *, now: datetime) -> Member:
        def body(conn: sqlite3.Connection) -> tuple[Member, bool]:
            current = self._member(conn, cluster)
            if current is None:
                raise UnknownCluster(f"cluster {cluster} is not registered")
            renewed = replace(current, renewed_at=now, unreachable_since=None)
            text = codec.encode_member(renewed)
            if current.unreachable_since is not None:
                revision = self._append(conn, EventKind.MEMBER, cluster, text)
                conn.execute("UPDATE members SET body=?, revision=? WHERE cluster=?", (text, revision, cluster))
                return renewed, True
            conn.execute("UPDATE members SET body=? WHERE cluster=?", (text, cluster))
            return renewed, False

        renewed, changed = await self._run(lambda c: self._write(c, body), what=f"renew {cluster}")
        if changed:
            log.info("lease restored cluster=%s", cluster)
            await self._notify()
        return renewed

    async def leases(self) -> dict[ClusterId, datetime]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            return [(str(c), str(b)) for c, b in conn.execute("SELECT cluster, body FROM members").fetchall()]

        rows = await self._run(read, what="leases")
        return {ClusterId(c): codec.decode_member(b, what=f"member {c}").renewed_at for c, b in rows}

    async def remove_member(self, cluster: ClusterId) -> int:
        def body(conn: sqlite3.Connection) -> int:
            if conn.execute("SELECT 1 FROM members WHERE cluster=?", (cluster,)).fetchone() is None:
                raise UnknownCluster(f"cluster {cluster} is not registered")
            revision = self._append(conn, EventKind.MEMBER_REMOVED, cluster, None)
            conn.execute("DELETE FROM members WHERE cluster=?", (cluster,))
            conn.execute("DELETE FROM exports WHERE cluster=?", (cluster,))
            return revision

        revision = await self._run(lambda c: self._write(c, body), what=f"remove_member {cluster}")
        await self._notify()
        return revision

    async def put_exports(self, exports: ExportSet) -> int:
        cid = exports.cluster
        text = await offload.run(codec.encode_exports, exports, items=len(exports.services))

        def body(conn: sqlite3.Connection) -> tuple[int, bool]:
            if conn.execute("SELECT 1 FROM members WHERE cluster=?", (cid,)).fetchone() is None:
                raise UnknownCluster(f"cluster {cid} is not registered: register before publishing exports")
            row = conn.execute("SELECT generation, body, revision FROM exports WHERE cluster=?", (cid,)).fetchone()
            if row is not None:
                generation, stored_text, stored_revision = int(row[0]), str(row[1]), int(row[2])
                if exports.generation == generation and text == stored_text:
                    return stored_revision, False
                if exports.generation <= generation:
                    raise StaleGeneration(cid, exports.generation, generation)
            revision = self._append(conn, EventKind.EXPORTS, cid, text)
            conn.execute(
                "INSERT INTO exports (cluster, generation, body, revision) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(cluster) DO UPDATE SET generation=excluded.generation, body=excluded.body, "
                "revision=excluded.revision",
                (cid, exports.generation, text, revision),
            )
            return revision, True

        revision, changed = await self._run(lambda c: self._write(c, body), what=f"put_exports {cid}")
        if changed:
            await self._notify()
        return revision

    async def compact(self, *, keep: int) -> int:
        """Drop all but the newest ``keep`` events now; returns the oldest ``after`` a watch may still resume from."""

        def body(conn: sqlite3.Connection) -> int:
            head = self._head(conn)
            compacted = int(conn.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()[0])
            floor = head - keep
            if floor > compacted:
                conn.execute("DELETE FROM events WHERE revision <= ?", (floor,))
                conn.execute("UPDATE meta SET value=? WHERE key='compacted'", (floor,))
                compacted = floor
            return compacted

        return await self._run(lambda c: self._write(c, body), what="compact")

    async def expire_leases(self, *, now: datetime | None = None) -> list[ClusterId]:
        """Mark every member whose lease ran out as unreachable, in one transaction (the reaper calls this)."""
        at = now or utcnow()

        def body(conn: sqlite3.Connection) -> list[ClusterId]:
            gone: list[ClusterId] = []
            for cid, text in conn.execute("SELECT cluster, body FROM members ORDER BY cluster").fetchall():
                member = codec.decode_member(text, what=f"member {cid}")
                if member.unreachable_since is None and lease_deadline(member) <= at:
                    unreachable = expired(member)
                    new_text = codec.encode_member(unreachable)
                    revision = self._append(conn, EventKind.MEMBER, ClusterId(cid), new_text)
                    conn.execute("UPDATE members SET body=?, revision=? WHERE cluster=?", (new_text, revision, cid))
                    gone.append(ClusterId(cid))
            return gone

        def run(conn: sqlite3.Connection) -> list[ClusterId]:
            # Cheap read first: most reaper passes find nothing and should not take the write lock.
            rows = conn.execute("SELECT body FROM members").fetchall()
            if not any(
                m.unreachable_since is None and lease_deadline(m) <= at
                for m in (codec.decode_member(r[0]) for r in rows)
            ):
                return []
            return self._write(conn, body)

        gone = await self._run(run, what="expire_leases")
        for cid in gone:
            log.info("lease expired cluster=%s", cid)
        if gone:
            await self._notify()
        return gone

    async def _reap_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._reap_interval)
            try:
                await self.expire_leases()
            except StoreUnavailable as exc:
                if self._closed:
                    return
                log.warning("lease reaper failed error=%s", exc)

    # ---- reads ----

    @staticmethod
    def _head(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
        return 0 if row is None else int(row[0])

    async def snapshot(self) -> StoreSnapshot:
        def read(conn: sqlite3.Connection) -> tuple[int, list[Any], list[Any]]:
            conn.execute("BEGIN")
            try:
                members = conn.execute("SELECT cluster, body FROM members ORDER BY cluster").fetchall()
                exports = conn.execute("SELECT cluster, body FROM exports ORDER BY cluster").fetchall()
                head = self._head(conn)
            finally:
                conn.execute("COMMIT")
            return head, members, exports

        def decode(head: int, members: list[Any], exports: list[Any]) -> StoreSnapshot:
            return StoreSnapshot(
                revision=head,
                members=tuple(codec.decode_member(b, what=f"member {c}") for c, b in members),
                exports=tuple(codec.decode_exports(b, what=f"exports of {c}") for c, b in exports),
            )

        head, members, exports = await self._run(read, what="snapshot")
        return await offload.run(decode, head, members, exports, items=sum(len(b) for _, b in exports) // 256)

    async def revision(self) -> int:
        """The newest revision in the file."""
        return await self._run(self._head, what="revision")

    def _rows_after(self, conn: sqlite3.Connection, *, after: int) -> list[Any]:
        conn.execute("BEGIN")
        try:
            compacted = int(conn.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()[0])
            if after < compacted:
                raise RevisionCompacted(after, compacted)
            rows = conn.execute(
                "SELECT revision, kind, cluster, body FROM events WHERE revision > ? ORDER BY revision LIMIT ?",
                (after, _WATCH_BATCH),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        return list(rows)

    @staticmethod
    def _decode_rows(rows: list[Any]) -> list[StoreEvent]:
        return [codec.decode_event(int(r), k, c, b) for r, k, c, b in rows]

    async def watch(self, *, after: int) -> AsyncIterator[StoreEvent]:
        last = after
        while not self._closed:
            seen = self._writes
            try:
                rows = await self._run(functools.partial(self._rows_after, after=last), what=f"watch after {last}")
            except StoreUnavailable:
                if self._closed:
                    return
                raise
            events = await offload.run(self._decode_rows, rows, items=sum(len(r[3] or "") for r in rows) // 256)
            for event in events:
                last = event.revision
                yield event
            if len(events) == _WATCH_BATCH:
                continue
            cond = self._changed
            assert cond is not None
            async with cond:
                if self._writes == seen and not self._closed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(cond.wait(), self._poll)
