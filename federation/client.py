"""The federation API's client: async, mutual TLS, one cluster's view.

``FederationClient(urls, ssl=..., cluster=...)`` talks to one or several service replicas (it moves to the next
URL when one is unreachable). Every response is checked to come from the federation service's identity
(``spiffe://<td>/meshfed/federation``) when a bundle is given. ``watch(revision=R)`` yields committed batches
``(revision, changes)`` (a batch is committed by its bookmark line, so resuming from the last yielded revision never
skips half a batch); a 410 raises ``Gone`` and the caller relists with ``catalog()``; bookmarks' lease renewals go
to ``on_renewals``. Decoding a large body (a catalog of thousands of services, a big watch batch) and encoding a
large publish run on a worker thread, never on the caller's event loop. ``fork()`` makes a second client with the
same identity and replicas, for a caller that needs its own connection (the agent's lease thread).

Exception tree (this module)::

    FederationError (federation.records)
     +-- ClientError                 a call that did not succeed
          +-- Unreachable            connection refused/reset, timeout, or 5xx: retry later (maybe another replica)
          +-- Refused                401/403: this certificate may not do that
          +-- BadRequest             400: ``field`` names what the service rejected
               +-- OverLimit         413/422: over a publish limit (``limit`` names it, ``maximum`` its value)
          +-- NotRegistered          404 on a cluster route: register (again) first
          +-- Gone                   410 on watch: relist
     +-- StaleGeneration             409 on publish (``stored`` is the service's generation)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from discovery.model import ClusterId, ClusterInfo, ServiceKey
from federation import offload, wire
from federation.catalog import Catalog, Change
from federation.peering.records import EMPTY as EMPTY_PEERS
from federation.peering.records import PeerSnapshot
from federation.records import ExportedService, ExportSet, FederationError, Member, StaleGeneration
from federation.trust.bundle import TrustBundle
from federation.trust.ca import issue_workload
from federation.trust.errors import TrustError
from federation.trust.identity import federation_server_of_peer
from federation.trust.spiffe import SpiffeId
from federation.trust.store import load_bundle, load_cluster_ca
from federation.trust.tls import client_ssl_context, peer_chain_der

log = logging.getLogger("meshfed.federation.client")


class ClientError(FederationError):
    def __init__(self, message: str, *, status: int = 0, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


class Unreachable(ClientError):
    pass


class Refused(ClientError):
    pass


class BadRequest(ClientError):
    pass


class OverLimit(BadRequest):
    def __init__(self, message: str, *, status: int, field: str | None, limit: str, maximum: int) -> None:
        super().__init__(message, status=status, field=field)
        self.limit, self.maximum = limit, maximum


class NotRegistered(ClientError):
    pass


class Reconnect(Unreachable):
    """A stream ended because the client's credentials were replaced (root rotation): open it again at once."""


class Gone(ClientError):
    pass


@dataclass(frozen=True, slots=True)
class Listing:
    """``GET /v1/catalog``: the catalog as this cluster sees it, the trust bundle's PEM, and the peer snapshot (peer
    trust domains' bundles, services peers exported to us)."""

    catalog: Catalog
    trust_bundle_pem: str
    peers: PeerSnapshot = EMPTY_PEERS


def cluster_credentials(ca_dir: Path, cluster: ClusterId, *, ttl: timedelta = timedelta(hours=24)
                        ) -> tuple[ssl.SSLContext, TrustBundle]:
    """A client TLS context for ``cluster`` from its CA directory: a fresh leaf for
    ``spiffe://<td>/meshfed/cluster/<cluster>`` signed by the cluster's intermediate, trusting the bundle."""
    ca = load_cluster_ca(ca_dir)
    bundle = load_bundle(ca_dir)
    key_pem, chain = issue_workload(ca, SpiffeId.cluster(bundle.trust_domain, cluster), ttl=ttl)
    return client_ssl_context(b"".join(chain), key_pem, bundle), bundle


def _error_of(status: int, body: Any, what: str) -> ClientError:
    message = body.get("error", "") if isinstance(body, dict) else str(body)[:200]
    field = body.get("field") if isinstance(body, dict) else None
    text = f"{what}: HTTP {status}: {message}"
    if status in (401, 403):
        return Refused(text, status=status, field=field)
    if status == 400:
        return BadRequest(text, status=status, field=field)
    if status in (413, 422):
        limit = body.get("limit", "") if isinstance(body, dict) else ""
        maximum = body.get("maximum", 0) if isinstance(body, dict) else 0
        return OverLimit(text, status=status, field=field, limit=str(limit),
                         maximum=maximum if isinstance(maximum, int) else 0)
    if status == 404:
        return NotRegistered(text, status=status, field=field)
    if status == 410:
        return Gone(text, status=status, field=field)
    if status >= 500:
        return Unreachable(text, status=status, field=field)
    return ClientError(text, status=status, field=field)


class VerifyingConnector(aiohttp.TCPConnector):
    """A connector that checks each new TLS connection's server identity before any request is sent on it."""

    def __init__(self, *, check: Callable[[Any], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._check = check

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:  # noqa: ASYNC109 - aiohttp
        protocol = await super()._create_connection(req, traces, timeout)
        transport = protocol.transport
        if transport is None or transport.is_closing():
            # The server closed the connection right after the handshake (it is stopping or restarting): that is
            # an unreachable server to retry, not a refusal (a publish loop drops what was refused).
            if transport is not None:
                transport.close()
            raise aiohttp.ServerDisconnectedError("connection closed before the server's identity was checked")
        try:
            self._check(transport.get_extra_info("ssl_object"))
        except BaseException:
            if transport is not None:
                transport.close()
            raise
        return protocol


class FederationClient:
    """One cluster's client of the federation API (an async context manager owning an HTTP session)."""

    def __init__(self, urls: str | Sequence[str], *, ssl_context: ssl.SSLContext, cluster: ClusterId,
                 bundle: TrustBundle | None = None, request_timeout_s: float = 15.0,
                 watch_idle_timeout_s: float = 20.0) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one federation URL is required")
        self.cluster = cluster
        self._ssl = ssl_context
        self._bundle = bundle
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, connect=min(5.0, request_timeout_s))
        self._watch_timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=watch_idle_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._current = 0
        self._encoded: dict[ServiceKey, tuple[ExportedService, bytes]] = {}
        self._request_timeout_s, self._watch_idle_timeout_s = request_timeout_s, watch_idle_timeout_s
        self._parent: FederationClient | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._forks: list[FederationClient] = []
        self.credential_changes = 0
        self._grace_s = 2.0

    def set_bundle(self, bundle: TrustBundle) -> None:
        """Use ``bundle`` to check the federation server's identity from the next connection on (root rotation)."""
        self._bundle = bundle

    def fork(self) -> FederationClient:
        """A new client (not yet entered) for the same cluster, replicas and TLS identity, with its own connections
        (it may be entered on another thread's event loop). It follows this client's ``set_bundle``."""
        other = FederationClient(self.urls, ssl_context=self._ssl, cluster=self.cluster, bundle=self._bundle,
                                 request_timeout_s=self._request_timeout_s,
                                 watch_idle_timeout_s=self._watch_idle_timeout_s)
        other._parent = self
        other._current = self._current
        other.credential_changes = self.credential_changes
        self._forks.append(other)
        return other

    def old_sessions(self) -> int:
        """Sessions (this client's and its forks') still open with credentials older than the current ones:
        until 0, the federation may still see connections authenticated with the previous certificate."""
        n = len(self._closing)
        for fork in self._forks:
            n += len(fork._closing)
            if fork._session is not None and fork.credential_changes != self.credential_changes:
                n += 1  # it moves on its next call
        return n

    @property
    def bundle(self) -> TrustBundle | None:
        return self._parent.bundle if self._parent is not None else self._bundle

    def set_credentials(self, ssl_context: ssl.SSLContext, bundle: TrustBundle, *, grace_s: float = 2.0) -> None:
        """Present the certificate of ``ssl_context`` and check the server with ``bundle`` from now on (renewal,
        root rotation). Pooled keep-alive connections authenticated with the old certificate must not outlive it
        (the server re-checks every request's chain against its bundle, and retiring a root would turn them into
        401s), so later calls go out on a new session and the old one is closed after ``grace_s`` (calls in
        flight finish; a watch on it ends with :class:`Reconnect`). Forks follow on their next call, on their own
        event loop. Call it on the loop this client was entered on."""
        self._ssl = ssl_context
        self._bundle = bundle
        self.credential_changes += 1
        self._grace_s = grace_s
        self._renew_session()

    def _renew_session(self) -> None:
        old = self._session
        if old is None:
            return
        self._session = self._new_session()

        async def close_later() -> None:
            await asyncio.sleep(self._grace_s)
            await old.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _new_session(self) -> aiohttp.ClientSession:
        connector = VerifyingConnector(check=self._check_server, ssl=self._ssl, limit=16,
                                        enable_cleanup_closed=True)
        return aiohttp.ClientSession(connector=connector, json_serialize=lambda v: json.dumps(v))

    async def __aenter__(self) -> FederationClient:
        self._session = self._new_session()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def url(self) -> str:
        return self.urls[self._current % len(self.urls)]

    def _failover(self) -> None:
        if len(self.urls) > 1:
            self._current = (self._current + 1) % len(self.urls)
            log.info("federation unreachable, trying next replica url=%s", self.url)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("FederationClient used outside 'async with'")
        parent = self._parent
        if parent is not None and parent.credential_changes != self.credential_changes:
            # The parent moved to new credentials (root rotation, renewal): so does this fork, on its own loop.
            self.credential_changes = parent.credential_changes
            self._ssl, self._grace_s = parent._ssl, parent._grace_s
            self._renew_session()
        return self._session

    def _check_server(self, ssl_object: Any) -> None:
        """The server must prove ``spiffe://<td>/meshfed/federation`` (checked once per connection)."""
        bundle = self.bundle
        if bundle is None:
            return
        if ssl_object is None:
            raise Refused(f"{self.url}: not a TLS connection")
        try:
            federation_server_of_peer(peer_chain_der(ssl_object), bundle)
        except TrustError as exc:
            raise Refused(f"{self.url} is not the federation service: {exc}") from exc

    async def _call(self, method: str, path: str, *, body: Any = None, raw: bytes | None = None, what: str) -> Any:
        url = self.url + path
        data = raw if raw is not None else None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with self._http().request(method, url, data=data, headers=headers, timeout=self._timeout) as resp:
                raw = await resp.read()
                try:
                    payload = await offload.run(wire.loads, raw, items=len(raw) // _BYTES_PER_ITEM) if raw else None
                except wire.WireError:
                    payload = raw.decode(errors="replace")
                if resp.status >= 400:
                    if resp.status == 409 and isinstance(payload, dict) and "storedGeneration" in payload:
                        raise StaleGeneration(self.cluster, int(payload.get("generation", 0)),
                                              int(payload["storedGeneration"]))
                    err = _error_of(resp.status, payload, what)
                    if isinstance(err, Unreachable):
                        self._failover()
                    raise err
                return payload
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failover()
            raise Unreachable(f"{what}: {url}: {type(exc).__name__}: {exc}") from exc

    # ---- calls ----------------------------------------------------------------------------------------------------

    async def register(self, info: ClusterInfo) -> Member:
        body = await self._call("PUT", f"/v1/clusters/{self.cluster}", body=wire.registration_json(info),
                                what="register")
        return wire.member_from_json(body["member"], "member")

    async def deregister(self) -> int:
        body = await self._call("DELETE", f"/v1/clusters/{self.cluster}", what="deregister")
        return int(body["revision"])

    async def heartbeat(self) -> Member:
        body = await self._call("POST", f"/v1/clusters/{self.cluster}/heartbeat", what="heartbeat")
        return wire.member_from_json(body["member"], "member")

    async def publish(self, exports: ExportSet) -> int:
        """Store ``exports`` durably; returns the store revision. Safe to retry with the same generation."""
        raw = await offload.run(self._export_body, exports, items=len(exports.services))
        body = await self._call("PUT", f"/v1/clusters/{self.cluster}/exports", raw=raw, what="publish")
        return int(body["revision"])

    def _export_body(self, exports: ExportSet) -> bytes:
        """The publish body; each service's JSON is kept and reused while the service is unchanged."""
        parts: list[bytes] = []
        fresh: dict[ServiceKey, tuple[ExportedService, bytes]] = {}
        for s in exports.services:
            hit = self._encoded.get(s.key)
            if hit is not None and hit[0] == s:
                part = hit[1]
            else:
                part = json.dumps(wire.exported_service_json(s), separators=(",", ":")).encode()
            fresh[s.key] = (s, part)
            parts.append(part)
        self._encoded = fresh
        return b'{"generation":%d,"services":[' % exports.generation + b",".join(parts) + b"]}"

    async def catalog(self) -> Listing:
        body = await self._call("GET", "/v1/catalog", what="catalog")
        if not isinstance(body, dict):
            raise Unreachable(f"catalog: {self.url}: the answer is not a JSON object")
        services = body.get("services")
        try:
            catalog = await offload.run(wire.catalog_from_json, body,
                                        items=len(services) if isinstance(services, list) else 0)
            peers = wire.peer_snapshot_from_json(body["peers"]) if body.get("peers") is not None else EMPTY_PEERS
        except wire.WireError as exc:
            raise Unreachable(f"catalog: {self.url}: the answer does not decode: {exc}") from exc
        return Listing(catalog=catalog, trust_bundle_pem=str(body.get("trustBundle", "")), peers=peers)

    async def trust_bundle(self) -> dict[str, Any]:
        body: dict[str, Any] = await self._call("GET", "/v1/trust-bundle", what="trust bundle")
        return body

    async def peers(self) -> list[dict[str, Any]]:
        """``GET /v1/peers``: each peer clusterset as the federation sees it (``federation.peering.PeerStatus``)."""
        body = await self._call("GET", "/v1/peers", what="peers")
        rows = body.get("peers") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            raise Unreachable(f"peers: {self.url}: the answer has no 'peers' list")
        return rows

    async def trust_status(self) -> dict[str, Any]:
        """``GET /v1/trust/status``: the federation's serving certificate and its members' connections."""
        body: dict[str, Any] = await self._call("GET", "/v1/trust/status", what="trust status")
        return body

    async def watch(self, *, revision: int,
                    on_renewals: Callable[[Mapping[ClusterId, datetime]], None] | None = None,
                    on_peers: Callable[[PeerSnapshot], None] | None = None,
                    ) -> AsyncIterator[tuple[int, list[Change]]]:
        """Committed change batches after ``revision``, until the stream ends (then ``Unreachable``). Each
        bookmark's lease renewals (heartbeats make no revision) are handed to ``on_renewals``; each ``peers`` line
        (the whole peer snapshot, sent when the stream opens and whenever it changes) to ``on_peers``, before the
        bookmark that follows it is yielded."""
        url = f"{self.url}/v1/catalog/watch?revision={revision}" + ("&peers=1" if on_peers is not None else "")
        session = self._http()
        try:
            async with session.get(url, timeout=self._watch_timeout) as resp:
                if resp.status >= 400:
                    raw = await resp.read()
                    try:
                        payload = json.loads(raw)
                    except ValueError:
                        payload = raw.decode(errors="replace")
                    err = _error_of(resp.status, payload, "watch")
                    if isinstance(err, Unreachable):
                        self._failover()
                    raise err
                buffer = b""
                pending: list[Change] = []
                waiting: list[bytes] = []
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    waiting.extend(line for line in lines if line.strip())
                    # Decoded a batch at a time (up to its bookmark), or _WATCH_JOB lines at a time: one big job
                    # instead of many chunk-sized ones lets offload.run keep a big batch out of the GC's way.
                    if not waiting or (len(waiting) < _WATCH_JOB and not _looks_like_bookmark(waiting[-1])):
                        continue
                    lines, waiting = waiting, []
                    for rev, change, leases, peers in await offload.run(_decode_lines, lines, items=len(lines)):
                        if peers is not None:
                            if on_peers is not None:
                                on_peers(peers)
                            continue
                        if change is None:
                            if leases and on_renewals is not None:
                                on_renewals(leases)
                            yield rev, pending
                            pending = []
                        else:
                            pending.append(change)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            if session is not self._session:
                raise Reconnect(f"watch: {url}: new client credentials") from exc
            self._failover()
            raise Unreachable(f"watch: {url}: {type(exc).__name__}: {exc}") from exc
        if session is not self._session:
            raise Reconnect(f"watch: {url}: new client credentials")
        self._failover()
        raise Unreachable(f"watch: {url}: stream ended")


_BYTES_PER_ITEM = 256  # a body's size in bytes over this: about the number of values it holds (for offload.run)


_WATCH_JOB = 2_000  # watch lines decoded in one job at most


def _looks_like_bookmark(line: bytes) -> bool:
    """A cheap guess (the service writes compact JSON); a wrong guess only delays decoding to the next chunk."""
    return b'"type":"bookmark"' in line[:64]


_Line = tuple[int, Change | None, dict[ClusterId, datetime], PeerSnapshot | None]


def _decode_lines(lines: list[bytes]) -> list[_Line]:
    """Watch lines as ``(revision, change or None for a bookmark, the bookmark's lease renewals, the peer snapshot
    of a peers line or None)``."""
    out: list[_Line] = []
    for line in lines:
        value = wire.loads(line)
        if isinstance(value, dict) and value.get("type") == "peers":
            out.append((0, None, {}, wire.peer_snapshot_from_json(value.get("peers"))))
            continue
        rev, change = wire.change_from_json(value)
        out.append((rev, change, wire.bookmark_leases_from_json(value) if change is None else {}, None))
    return out
