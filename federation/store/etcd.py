"""The scale-out store: etcd (v3 API, through ``aetcd``), shared by several federation service replicas.

Keys, under a prefix (default ``/meshfed/``), values are the canonical JSON of ``federation.store.codec``::

    members/<cluster>   the member as registered (written by put_member, and when a lease comes back)
    renewed/<cluster>   the member with its latest renewed_at (rewritten by every heartbeat; never watched)
    alive/<cluster>     the same value, attached to an etcd lease of the member's TTL; etcd deletes it when the
                        lease runs out, and that deletion is the "lease expired" event every replica sees
    exports/<cluster>   the cluster's ExportSet (zlib-compressed when its JSON exceeds 32 KiB: etcd refuses requests
                        over ~1.5 MiB by default, and a 1,000-service set with pod addresses is bigger than that)

Revisions are etcd's own: a mutation returns the revision of its etcd transaction, ``snapshot()`` reads the whole
prefix at one revision, and ``watch(after=R)`` is an etcd watch from ``R + 1``. Every replica over one etcd thus
sees one order. Heartbeats also advance etcd's revision (they write ``renewed/`` and ``alive/``), so revisions
have gaps; only their order means anything.

Watch mapping (one StoreEvent per etcd event that matters; everything else is skipped):

    PUT members/c                       -> MEMBER (the stored member)
    DELETE members/c                    -> MEMBER_REMOVED
    PUT exports/c                       -> EXPORTS
    DELETE alive/c by lease expiry      -> MEMBER with unreachable_since = renewed_at + lease_ttl_s
    (DELETE alive/c in the same transaction as a members/c write is part of that write, not an expiry)

``put_exports`` checks the generation in an etcd transaction that compares the exports key's mod revision with the
one it read, so two replicas publishing for one cluster at once cannot regress it. A compacted watch start maps
to ``RevisionCompacted``; every aetcd/gRPC error is wrapped into ``StoreUnavailable`` (``raise ... from exc``).
A watch survives an etcd restart: it reconnects with a bounded backoff and resumes from its last revision, and
gives up with ``StoreUnavailable`` after ``reconnect_timeout_s`` without etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import datetime
from types import TracebackType
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc as rpc
import aetcd.utils

from discovery.model import ClusterId
from federation import offload
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
from federation.store.memory import expired

log = logging.getLogger("meshfed.federation.store")

_CAS_ATTEMPTS = 20
_COMPRESS_OVER = 32 * 1024
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    # A snapshot of many large export sets can pass gRPC's default 4 MiB receive limit.
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
}
_ERRORS: tuple[type[BaseException], ...] = (
    aetcd.exceptions.ClientError,
    rpc.AioRpcError,
    OSError,
    asyncio.TimeoutError,
)
_RETRYABLE: tuple[type[BaseException], ...] = (*_ERRORS, StoreUnavailable)


def _put(key: bytes, value: str | bytes, *, lease: int = 0) -> Any:
    data = value.encode() if isinstance(value, str) else value
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=data, lease=lease))


def _delete(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def _get(key: bytes) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def _mod_is(key: bytes, mod_revision: int) -> Any:
    """Compare: the key's mod revision equals ``mod_revision`` (0 means: the key does not exist)."""
    if mod_revision == 0:
        return rpc.Compare(key=key, target=rpc.Compare.VERSION, result=rpc.Compare.EQUAL, version=0)
    return rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=mod_revision)


def _exists(key: bytes) -> Any:
    return rpc.Compare(key=key, target=rpc.Compare.VERSION, result=rpc.Compare.GREATER, version=0)


def _pack(text: str) -> bytes:
    """A stored value: the JSON, zlib-compressed when large (etcd refuses requests over ~1.5 MiB by default)."""
    data = text.encode()
    return zlib.compress(data, 6) if len(data) > _COMPRESS_OVER else data


def _unpack(value: bytes, what: str) -> bytes:
    if value[:1] == b"{":
        return value
    try:
        return zlib.decompress(value)
    except zlib.error as exc:
        raise codec.CorruptRecord(f"{what}: neither JSON nor zlib-compressed JSON: {exc}") from exc


def _encode_exports(exports: ExportSet) -> tuple[bytes, bytes]:
    """(the canonical JSON, the stored value) of an export set."""
    text = codec.encode_exports(exports)
    return text.encode(), _pack(text)


def _stored_generation(value: bytes, cluster: str) -> tuple[bytes, int]:
    """(the JSON, the generation) of a stored export set."""
    text = _unpack(value, f"exports of {cluster}")
    return text, codec.decode_exports(text, what=f"exports of {cluster}").generation


def _decode_exports(value: bytes, what: str) -> ExportSet:
    return codec.decode_exports(_unpack(value, what), what=what)


def _connection_error(exc: BaseException) -> bool:
    if isinstance(exc, aetcd.exceptions.ConnectionFailedError | aetcd.exceptions.ConnectionTimeoutError):
        return True
    if isinstance(exc, rpc.AioRpcError):
        return bool(exc.code() in (rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED))
    return isinstance(exc, OSError | asyncio.TimeoutError)


def _ttl(member: Member) -> int:
    return max(1, math.ceil(member.lease_ttl_s))


class EtcdStore:
    """``Store`` over etcd. ``endpoints`` are tried in turn when one stops answering."""

    def __init__(
        self,
        *,
        endpoints: Sequence[tuple[str, int]],
        prefix: str = "/meshfed/",
        timeout_s: float = 5.0,
        reconnect_timeout_s: float = 60.0,
        retain: int | None = 100_000,
    ) -> None:
        if not endpoints:
            raise ValueError("EtcdStore needs at least one endpoint")
        self._endpoints = list(endpoints)
        self._current = 0
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._timeout = timeout_s
        self._reconnect_timeout = reconnect_timeout_s
        self._retain = retain
        self._compacted_at = 0
        self._client_obj: aetcd.Client | None = None
        self._closed = False

    # ---- keys ----

    def _key(self, kind: str, cluster: str = "") -> bytes:
        return f"{self._prefix}{kind}/{cluster}".encode()

    @property
    def endpoint(self) -> str:
        host, port = self._endpoints[self._current]
        return f"{host}:{port}"

    # ---- connection ----

    async def __aenter__(self) -> EtcdStore:
        await self._read("open", self._key("members", ""))  # fails now, with StoreUnavailable, if etcd is not there
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _client(self) -> aetcd.Client:
        if self._closed:
            raise StoreUnavailable("etcd store is closed")
        if self._client_obj is None:
            host, port = self._endpoints[self._current]
            client = aetcd.Client(host=host, port=port, timeout=self._timeout, options=dict(_CHANNEL_OPTIONS))
            try:
                await client.connect()
            except _ERRORS as exc:
                raise StoreUnavailable(f"etcd {host}:{port}: cannot connect: {exc}") from exc
            self._client_obj = client
        return self._client_obj

    async def _failover(self) -> None:
        """After a connection error: move to the next endpoint (when there is more than one), on a fresh
        connection either way. A channel that failed sits in gRPC's reconnect backoff and fails every call at once
        until its next attempt: kept, it would refuse the first calls after etcd came back."""
        if self._client_obj is None:
            return
        old, self._client_obj = self._client_obj, None
        if len(self._endpoints) > 1:
            self._current = (self._current + 1) % len(self._endpoints)
            log.warning("etcd failover to=%s", self.endpoint)
        with contextlib.suppress(*_ERRORS):
            await old.close()

    async def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        endpoint = self.endpoint
        if _connection_error(exc):
            await self._failover()
        elif "too large" in str(exc):
            what += " (the value exceeds etcd's request size limit, see etcd --max-request-bytes)"
        return StoreUnavailable(f"etcd {endpoint}: {what}: {type(exc).__name__}: {exc}")

    async def close(self) -> None:
        self._closed = True
        client, self._client_obj = self._client_obj, None
        if client is not None:
            with contextlib.suppress(*_ERRORS):
                await client.close()

    async def _txn(self, what: str, compare: Sequence[Any], success: Sequence[Any],
                   failure: Sequence[Any] = ()) -> Any:
        request = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        # With several endpoints, a refused connection moves to the next one and tries again (each once). A
        # retried write is safe: every write here either compares first or re-puts the same value.
        for attempt in range(len(self._endpoints)):
            client = await self._client()
            try:
                return await client.kvstub.Txn(request, timeout=self._timeout, metadata=client.metadata)
            except _ERRORS as exc:
                error = await self._unavailable(what, exc)
                if attempt == len(self._endpoints) - 1 or not _connection_error(exc):
                    raise error from exc
        raise AssertionError("unreachable")

    async def _read(self, what: str, *keys: bytes) -> tuple[int, list[Any]]:
        """Read several keys at one revision: (revision, [KeyValue or None per key])."""
        response = await self._txn(what, [], [_get(k) for k in keys])
        values = [r.response_range.kvs[0] if r.response_range.kvs else None for r in response.responses]
        return int(response.header.revision), values

    # ---- lease helpers ----

    async def _grant(self, member: Member) -> int:
        client = await self._client()
        try:
            lease = await client.lease(_ttl(member))
        except _ERRORS as exc:
            raise await self._unavailable(f"grant lease for {member.info.id}", exc) from exc
        return int(lease.id)

    async def _revoke(self, lease_id: int) -> None:
        if not lease_id:
            return
        with contextlib.suppress(*_ERRORS):
            client = await self._client()
            await client.revoke_lease(lease_id)

    async def _keepalive(self, lease_id: int, cluster: ClusterId) -> bool:
        client = await self._client()
        try:
            reply = await client.refresh_lease(lease_id)
        except _ERRORS as exc:
            raise await self._unavailable(f"keep lease of {cluster} alive", exc) from exc
        return reply is not None and int(reply.TTL) > 0

    # ---- writes ----

    async def put_member(self, member: Member) -> int:
        cid = member.info.id
        text = codec.encode_member(member)
        _, (old_alive,) = await self._read(f"put_member {cid}", self._key("alive", cid))
        ops = [_put(self._key("members", cid), text), _put(self._key("renewed", cid), text)]
        lease_id = 0
        if member.unreachable_since is None:
            lease_id = await self._grant(member)
            ops.append(_put(self._key("alive", cid), text, lease=lease_id))
        else:
            ops.append(_delete(self._key("alive", cid)))
        try:
            response = await self._txn(f"put_member {cid}", [], ops)
        except StoreUnavailable:
            await self._revoke(lease_id)
            raise
        if old_alive is not None and int(old_alive.lease) != lease_id:
            await self._revoke(int(old_alive.lease))  # the key now rides the new lease: revoking deletes nothing
        revision = int(response.header.revision)
        await self._maybe_compact(revision)
        return revision

    async def renew(self, cluster: ClusterId, *, now: datetime) -> Member:
        what = f"renew {cluster}"
        for _ in range(_CAS_ATTEMPTS):
            _, (mkv, rkv, akv) = await self._read(
                what, self._key("members", cluster), self._key("renewed", cluster), self._key("alive", cluster)
            )
            if mkv is None:
                raise UnknownCluster(f"cluster {cluster} is not registered")
            base = codec.decode_member((rkv if rkv is not None else mkv).value, what=f"member {cluster}")
            renewed = replace(base, renewed_at=now, unreachable_since=None)
            text = codec.encode_member(renewed)
            if akv is not None and await self._keepalive(int(akv.lease), cluster):
                response = await self._txn(
                    what,
                    [_mod_is(self._key("alive", cluster), int(akv.mod_revision))],
                    [_put(self._key("alive", cluster), text, lease=int(akv.lease)),
                     _put(self._key("renewed", cluster), text)],
                )
                if response.succeeded:
                    return renewed
                continue
            # The lease ran out (or is about to be reaped): the member comes back with a new lease and an event.
            lease_id = await self._grant(renewed)
            alive_mod = int(akv.mod_revision) if akv is not None else 0
            response = await self._txn(
                what,
                [_mod_is(self._key("members", cluster), int(mkv.mod_revision)),
                 _mod_is(self._key("alive", cluster), alive_mod)],
                [_put(self._key("members", cluster), text),
                 _put(self._key("renewed", cluster), text),
                 _put(self._key("alive", cluster), text, lease=lease_id)],
            )
            if response.succeeded:
                log.info("lease restored cluster=%s revision=%s", cluster, response.header.revision)
                if akv is not None:
                    await self._revoke(int(akv.lease))
                return renewed
            await self._revoke(lease_id)
        raise StoreUnavailable(f"etcd {self.endpoint}: {what}: gave up after {_CAS_ATTEMPTS} conflicting writes")

    async def leases(self) -> dict[ClusterId, datetime]:
        # renewed/<c> is rewritten by every heartbeat; members/<c> only by registration (and a lease coming back).
        ranges = []
        for kind in ("members", "renewed"):
            start = self._key(kind)
            ranges.append(rpc.RequestOp(request_range=rpc.RangeRequest(
                key=start, range_end=aetcd.utils.prefix_range_end(start))))
        result = await self._txn("leases", [], ranges)
        tables: dict[str, dict[str, Any]] = {"members": {}, "renewed": {}}
        for response in result.responses:
            for kv in response.response_range.kvs:
                kind, _, cluster = bytes(kv.key).decode()[len(self._prefix):].partition("/")
                if kind in tables:
                    tables[kind][cluster] = kv
        return {ClusterId(c): codec.decode_member((tables["renewed"].get(c) or kv).value,
                                                  what=f"member {c}").renewed_at
                for c, kv in tables["members"].items()}

    async def remove_member(self, cluster: ClusterId) -> int:
        what = f"remove_member {cluster}"
        _, (mkv, akv) = await self._read(what, self._key("members", cluster), self._key("alive", cluster))
        if mkv is None:
            raise UnknownCluster(f"cluster {cluster} is not registered")
        response = await self._txn(
            what,
            [_exists(self._key("members", cluster))],
            [_delete(self._key("members", cluster)), _delete(self._key("alive", cluster)),
             _delete(self._key("renewed", cluster)), _delete(self._key("exports", cluster))],
        )
        if not response.succeeded:
            raise UnknownCluster(f"cluster {cluster} is not registered")
        if akv is not None:
            await self._revoke(int(akv.lease))
        return int(response.header.revision)

    async def put_exports(self, exports: ExportSet) -> int:
        cid = exports.cluster
        what = f"put_exports {cid}"
        # Encoding, compressing and decoding export sets is CPU work that grows with the member: worker threads.
        text, packed = await offload.run(_encode_exports, exports, items=len(exports.services))
        for _ in range(_CAS_ATTEMPTS):
            _, (mkv, ekv) = await self._read(what, self._key("members", cid), self._key("exports", cid))
            if mkv is None:
                raise UnknownCluster(f"cluster {cid} is not registered: register before publishing exports")
            seen_mod = 0
            if ekv is not None:
                value = bytes(ekv.value)
                stored_text, stored_generation = await offload.run(_stored_generation, value, cid,
                                                                   items=len(value) // 64)
                if exports.generation == stored_generation and stored_text == text:
                    return int(ekv.mod_revision)
                if exports.generation <= stored_generation:
                    raise StaleGeneration(cid, exports.generation, stored_generation)
                seen_mod = int(ekv.mod_revision)
            response = await self._txn(
                what,
                [_mod_is(self._key("exports", cid), seen_mod), _exists(self._key("members", cid))],
                [_put(self._key("exports", cid), packed)],
            )
            if response.succeeded:
                revision = int(response.header.revision)
                await self._maybe_compact(revision)
                return revision
        raise StoreUnavailable(f"etcd {self.endpoint}: {what}: gave up after {_CAS_ATTEMPTS} conflicting writes")

    # ---- compaction ----

    async def compact(self, *, keep: int) -> int:
        """Compact etcd's history to the newest ``keep`` revisions; returns the oldest ``after`` still resumable.

        Revisions count every etcd write (heartbeats included), not only store events.
        """
        head, _ = await self._read("compact", self._key("members", ""))
        target = head - keep
        if target <= 0:
            return max(self._compacted_at - 1, 0)
        client = await self._client()
        try:
            await client.compact(target)
        except aetcd.exceptions.ClientError as exc:
            if "compacted" not in str(exc):
                raise await self._unavailable("compact", exc) from exc
        except _ERRORS as exc:
            raise await self._unavailable("compact", exc) from exc
        self._compacted_at = max(self._compacted_at, target)
        log.info("etcd compacted revision=%s", target)
        return target - 1

    async def _maybe_compact(self, revision: int) -> None:
        if self._retain is None or revision - self._compacted_at <= 2 * self._retain:
            return
        try:
            await self.compact(keep=self._retain)
        except StoreUnavailable as exc:
            log.warning("etcd compaction failed error=%s", exc)

    # ---- reads ----

    def _member_from(self, renewed: Any, member: Any, alive: Any) -> Member:
        cluster = bytes(member.key).decode().rsplit("/", 1)[-1]
        base = codec.decode_member((renewed if renewed is not None else member).value, what=f"member {cluster}")
        if alive is None and base.unreachable_since is None:
            return expired(base)
        return base

    async def snapshot(self) -> StoreSnapshot:
        prefix = self._prefix.encode()
        whole = rpc.RangeRequest(key=prefix, range_end=aetcd.utils.prefix_range_end(prefix))
        result = await self._txn("snapshot", [], [rpc.RequestOp(request_range=whole)])
        tables: dict[str, dict[str, Any]] = {"members": {}, "renewed": {}, "alive": {}, "exports": {}}
        for kv in result.responses[0].response_range.kvs:
            kind, _, cluster = bytes(kv.key).decode()[len(self._prefix):].partition("/")
            if kind in tables:
                tables[kind][cluster] = kv
        members = tuple(
            self._member_from(tables["renewed"].get(c), kv, tables["alive"].get(c))
            for c, kv in sorted(tables["members"].items())
        )
        stored = [(bytes(kv.value), f"exports of {c}") for c, kv in sorted(tables["exports"].items())]
        exports = tuple(await offload.run(lambda: [_decode_exports(v, what) for v, what in stored],
                                          items=sum(len(v) for v, _ in stored) // 64))
        return StoreSnapshot(revision=int(result.header.revision), members=members, exports=exports)

    def _translate(self, event: Any, member_revs: dict[str, int]) -> StoreEvent | None:
        key = bytes(event.kv.key).decode()
        kind, _, cluster = key[len(self._prefix):].partition("/")
        revision = int(event.kv.mod_revision)
        cid = ClusterId(cluster)
        put = event.kind == "PUT"
        if kind == "members":
            member_revs[cluster] = revision
            if put:
                member = codec.decode_member(event.kv.value, what=f"member {cluster} at revision {revision}")
                return StoreEvent(revision, EventKind.MEMBER, cid, member=member)
            return StoreEvent(revision, EventKind.MEMBER_REMOVED, cid)
        if kind == "exports" and put:
            # Decoded by the caller (on a worker thread): an export set can be megabytes.
            return StoreEvent(revision, EventKind.EXPORTS, cid)
        if kind == "alive" and not put and member_revs.get(cluster) != revision:
            prev = event.prev_kv
            if prev is None or not prev.key:
                log.warning("lease expiry without previous value cluster=%s revision=%s", cluster, revision)
                return None
            last = codec.decode_member(prev.value, what=f"alive record of {cluster}")
            log.info("lease expired cluster=%s revision=%s", cluster, revision)
            return StoreEvent(revision, EventKind.MEMBER, cid, member=expired(last))
        return None

    async def watch(self, *, after: int) -> AsyncIterator[StoreEvent]:
        last = after
        member_revs: dict[str, int] = {}
        prefix = self._prefix.encode()
        backoff = 0.2
        down_since: float | None = None
        while not self._closed:
            watch: Any = None
            try:
                client = await self._client()
                watch = await client.watch(
                    prefix, range_end=aetcd.utils.prefix_range_end(prefix), start_revision=last + 1, prev_kv=True
                )
                down_since, backoff = None, 0.2
                async for event in watch:
                    store_event = self._translate(event, member_revs)
                    last = max(last, int(event.kv.mod_revision))
                    if store_event is not None and store_event.kind == EventKind.EXPORTS:
                        what = f"exports of {store_event.cluster} at revision {store_event.revision}"
                        value = bytes(event.kv.value)
                        decoded = await offload.run(_decode_exports, value, what, items=len(value) // 64)
                        store_event = replace(store_event, exports=decoded)
                    if store_event is not None:
                        yield store_event
            except aetcd.exceptions.RevisionCompactedError as exc:
                raise RevisionCompacted(last, int(exc.compacted_revision) - 1) from exc
            except codec.CorruptRecord:
                raise
            except _RETRYABLE as exc:
                if self._closed:
                    return
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self._reconnect_timeout:
                    raise StoreUnavailable(
                        f"etcd {self.endpoint}: watch after {last}: no etcd for {self._reconnect_timeout}s: {exc}"
                    ) from exc
                log.warning("etcd watch interrupted after=%s error=%s retry_in=%.1fs", last, exc, backoff)
                if isinstance(exc, _ERRORS):
                    await self._failover()
            finally:
                if watch is not None:
                    # AttributeError: aetcd's cancel reaches for a watcher that close() already dropped.
                    with contextlib.suppress(*_ERRORS, AttributeError):
                        await watch.cancel()
            if self._closed:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
