"""The Aggregated Discovery Service: serving the snapshot cache to Envoy and gRPC xDS clients over grpc.aio.

Both ADS variants of ``envoy.service.discovery.v3.AggregatedDiscoveryService`` are served:

- ``StreamAggregatedResources`` (state of the world). Per stream and type URL we keep the subscription (wildcard
  or a set of names) and what was last sent: (type version, subscription) plus its nonce. A response goes out
  when the snapshot's version of that type or the subscription changed since the last response. Wildcard types
  (LDS, CDS with no names, or ``*``) get every resource of the type whenever the type's version changes; named
  types (EDS, RDS, SDS, and LDS/CDS as gRPC's client asks for them) get the requested names the snapshot has,
  whenever one of those resources changes (not for changes to resources the proxy did not ask for) or the
  subscription changes (a client forgets what it unsubscribes from, so names dropped and requested again are
  sent again), and nothing while the snapshot has none of them.
  A request whose ``response_nonce`` is not the last nonce sent for the type is stale and ignored. A request with
  the last nonce is an ACK (``version_info`` is then the version sent) or, with ``error_detail``, a NACK: the proxy
  keeps its last good configuration, the error text is recorded in the cache, and the rejected version is not sent
  again; the next snapshot with a different version of that type is.
- ``DeltaAggregatedResources`` (incremental). Per stream and type we keep the subscribed names (or wildcard) and
  the version of every resource the client holds (seeded from ``initial_resource_versions`` on reconnect); a
  response carries only resources whose version differs and ``removed_resources`` for those that disappeared.
  ``system_version_info`` is the snapshot's type version, recorded for ACK/NACK status per nonce.

Every stream authenticates first (see gateway.auth): no or a bad token ends it with UNAUTHENTICATED; a node id or
node metadata that is not the credential's (another node, pod, namespace, service account, cluster or proxy kind),
or a node already connected as another identity or with other metadata (gateway.cache), with PERMISSION_DENIED
naming what differs; a first request without a node id with INVALID_ARGUMENT. Every refusal is logged. Before a
secret leaves, a certificate whose SPIFFE ID is not the stream's authenticated identity is withheld and logged
(``own_secrets``), so SDS answers only for the identity the stream proved, whatever the snapshot holds.

One ``asyncio.Event`` per stream is set both by the cache (the node's snapshot changed) and by the stream's
reader task (a request arrived); the stream's loop then handles the queued requests and checks every subscribed
type, in the order clusters, endpoints, listeners, routes, secrets.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc
from cryptography import x509
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from gateway.auth import AuthenticationError, Authenticator, NodeMismatch, ProxyIdentity, binding, check_node
from gateway.cache import SnapshotCache
from gateway.peerauth import PEER_CERT_KEY, peer_metadata
from gateway.snapshot import SECRET, TYPE_ORDER, WILDCARD_TYPES, Entry, Snapshot, touched, wire_field

log = logging.getLogger("meshfed.xds.ads")

DiscoveryRequest = discovery_pb2.DiscoveryRequest
DiscoveryResponse = discovery_pb2.DiscoveryResponse
DeltaDiscoveryRequest = discovery_pb2.DeltaDiscoveryRequest
DeltaDiscoveryResponse = discovery_pb2.DeltaDiscoveryResponse
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

_MAX_PENDING_NONCES = 32
_BIG_RESPONSE = 256 << 10  # bytes of resources from which a response is built in the server's build slot
# Bytes of resources per delta response (a bigger change is sent in several). grpc keeps, per stream, buffers about
# as big as the largest message it wrote: with 1 MiB chunks the full mesh's initial sync (2,000 streams, 1.25 MB
# each) left ~350 KB per stream behind (peak RSS 1.15 GB); with 128 KiB, 0.89 GB, at the same sync time.
_DELTA_CHUNK = 128 << 10
_YIELD_EVERY = 2048  # names a stream checks between two yields to the event loop


@dataclass
class XdsStats:
    """Counters of what the server sent, per variant (read by bench/xds.py and exported as metrics)."""

    sotw_responses: int = 0
    sotw_bytes: int = 0
    sotw_resources: int = 0
    delta_responses: int = 0
    delta_bytes: int = 0
    delta_resources: int = 0
    streams_opened: int = 0
    streams_refused: int = 0
    secrets_withheld: int = 0  # certificates not sent because they were not the stream's identity's
    streams_revoked: int = 0  # streams closed because their identity's token was revoked
    wakeups_skipped: int = 0  # snapshot changes a stream was not woken for (nothing it holds or asked for changed)

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


def _version(entry: Entry | None) -> str | None:
    return entry.version if entry is not None else None


def _ordered(types: Mapping[str, Any]) -> list[str]:
    rank = {t: i for i, t in enumerate(TYPE_ORDER)}
    return sorted(types, key=lambda t: (rank.get(t, len(rank)), t))


_SPIFFE_OF: dict[str, str | None] = {}  # entry version (a content hash) -> the certificate's SPIFFE ID


def certificate_spiffe_id(entry: Entry) -> str | None:
    """The URI SAN of the leaf in a ``tls_certificate`` secret (None: the secret holds no certificate, e.g. the
    trust bundle). Remembered per content version, so each distinct certificate is parsed once."""
    if entry.version in _SPIFFE_OF:
        return _SPIFFE_OF[entry.version]
    message: Any = entry.message
    spiffe: str | None = None
    if message.HasField("tls_certificate"):
        chain = message.tls_certificate.certificate_chain
        pem = chain.inline_bytes or chain.inline_string.encode()
        spiffe = "(unreadable)"
        try:
            leaf = x509.load_pem_x509_certificates(pem)[0]
            uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                .get_values_for_type(x509.UniformResourceIdentifier)
            spiffe = uris[0] if len(uris) == 1 else f"({len(uris)} URI SANs)"
        except (ValueError, IndexError, x509.ExtensionNotFound):
            pass
    if len(_SPIFFE_OF) > 100_000:
        _SPIFFE_OF.clear()
    _SPIFFE_OF[entry.version] = spiffe
    return spiffe


def _node_metadata(node: Any) -> dict[str, Any]:
    fields = node.metadata.fields
    return {k: v.string_value for k, v in fields.items() if v.WhichOneof("kind") == "string_value"}


@dataclass
class _SotwType:
    subscribed: bool = False
    wildcard: bool = False
    names: frozenset[str] = frozenset()
    dirty: bool = True  # the subscription changed since the last pass
    sent_key: tuple[object, ...] | None = None
    sent_version: str = ""
    nonce: str = ""
    acked: bool = False
    seen: Mapping[str, Entry] | None = None  # the entries the last pass looked at


@dataclass
class _DeltaType:
    subscribed: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)
    nonces: dict[str, str] = field(default_factory=dict)  # unanswered nonce -> system version sent
    dirty: bool = True
    checked_version: str | None = None
    responded: bool = False
    last_nonce: str = ""
    last_ok: bool = True
    seen: Mapping[str, Entry] | None = None


_TypeState = TypeVar("_TypeState")  # per type URL subscription state of one stream variant


class InflightBudget:
    """Bytes of responses written but not yet answered (ACK or NACK), across all streams.

    grpc queues a written response at once, so without a bound a burst (thousands of proxies connecting after a
    restart, each owed its whole configuration) would sit in memory all at once. A stream reserves a response's
    estimated size before building it and gets it back when the proxy answers that nonce (or a later one of the
    same type), when the stream ends, or after ``answer_timeout`` seconds (a proxy that never answers cannot keep
    it). One response always fits, however large.
    """

    def __init__(self, limit: int, *, answer_timeout: float = 30.0) -> None:
        self.limit = limit
        self.answer_timeout = answer_timeout
        self.used = 0
        self._held: dict[str, tuple[int, float]] = {}  # nonce -> (bytes, deadline)
        self._freed = asyncio.Event()

    def try_reserve(self, nonce: str, size: int) -> bool:
        """Reserve at once if the budget has room (the common case: no coroutine, no wait)."""
        if self.used and self.used + size > self.limit:
            return False
        self.used += size
        self._held[nonce] = (size, time.monotonic() + self.answer_timeout)
        return True

    async def reserve(self, nonce: str, size: int) -> None:
        while self.used and self.used + size > self.limit:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), 1.0)
            except TimeoutError:
                self._expire()
        self.used += size
        self._held[nonce] = (size, time.monotonic() + self.answer_timeout)

    def release(self, nonce: str) -> None:
        held = self._held.pop(nonce, None)
        if held is not None:
            self.used -= held[0]
            self._freed.set()

    def _expire(self) -> None:
        now = time.monotonic()
        for nonce in [n for n, (_, deadline) in self._held.items() if deadline < now]:
            self.release(nonce)


class _Stream(Generic[_TypeState]):
    """Shared plumbing of one ADS stream: authentication, the reader task and the wake-up loop."""

    def __init__(self, server: AdsServer, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.server = server
        self.cache = server.cache
        self.context = context
        self.node_id = ""
        self.identity: ProxyIdentity | None = None
        self.queue: deque[Any] = deque()
        self.closed = False
        self.held: dict[str, list[str]] = {}  # type URL -> nonces sent and not yet answered, oldest first
        self.revoked = False  # the authenticator revoked the identity this stream authenticated as
        self.wake: asyncio.Event | None = None
        self._order: list[str] = []  # self.types' URLs in push order

    async def run(self) -> None:
        server = self.server
        metadata = {m[0]: m[1] for m in self.context.invocation_metadata() or () if isinstance(m[1], str)}
        metadata.pop(PEER_CERT_KEY, None)
        metadata.update(peer_metadata(self.context))  # the verified TLS client certificate, if any (gateway.peerauth)
        if server.authenticator is not None:
            try:
                self.identity = await server.authenticator.authenticate(metadata=metadata)
            except AuthenticationError as exc:
                server.stats.streams_refused += 1
                log.warning("refused xds stream peer=%s reason=%r", self.context.peer(), str(exc))
                await self.context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        first = await self.context.read()
        if first is grpc.aio.EOF:
            return
        self.node_id = first.node.id
        if not self.node_id:
            server.stats.streams_refused += 1
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first xDS request carries no node.id")
        try:
            if self.identity is not None:
                check_node(self.identity, self.node_id, _node_metadata(first.node))
            # gateway.cache.NodeConflict when the node is already connected as another identity or configuration
            wake = self.cache.watch(self.node_id, self.identity, _node_metadata(first.node), interest=self.interested)
        except NodeMismatch as exc:
            server.stats.streams_refused += 1
            log.warning("refused xds stream node=%s reason=%r", self.node_id, str(exc))
            await self.context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        server.stats.streams_opened += 1
        log.info("xds stream opened node=%s variant=%s identity=%s", self.node_id, self.variant, self.identity)
        self.queue.append(first)
        self.wake = wake
        wake.set()
        server.streams.add(self)
        reader = asyncio.create_task(self._read(wake), name=f"xds-read-{self.node_id}")
        try:
            while True:
                await wake.wait()
                wake.clear()
                if self.revoked:
                    server.stats.streams_revoked += 1
                    log.warning("xds stream closed: its token was revoked node=%s identity=%s", self.node_id,
                                self.identity)
                    await self.context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                             f"the token this stream authenticated with ({self.identity}) was revoked")
                while self.queue:
                    request = self.queue.popleft()
                    if request is None:
                        return
                    self.handle(request)
                await self.push()
        except asyncio.CancelledError:
            log.debug("xds stream cancelled node=%s variant=%s", self.node_id, self.variant)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("xds stream failed node=%s variant=%s", self.node_id, self.variant)
            raise
        finally:
            self.closed = True
            server.streams.discard(self)
            for nonces in self.held.values():
                for nonce in nonces:
                    self.server.inflight.release(nonce)
            reader.cancel()
            self.cache.unwatch(self.node_id, wake)
            log.info("xds stream closed node=%s variant=%s", self.node_id, self.variant)

    async def _read(self, wake: asyncio.Event) -> None:
        try:
            while True:
                request = await self.context.read()
                if request is grpc.aio.EOF:
                    break
                if request.response_nonce:
                    # Returned to the in-flight budget here, not when the main loop handles the request: that loop
                    # may itself be waiting for budget, which this answer frees.
                    self.answered(request.type_url, request.response_nonce)
                    if not self.queue and self.plain_ack(request):
                        continue  # recorded here: nothing for the main loop to do
                self.queue.append(request)
                wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: end it
            log.debug("xds stream read ended node=%s error=%r", self.node_id, exc)
        self.queue.append(None)
        wake.set()

    variant = "?"
    label = "xds"  # names the stream kind in log lines
    types: dict[str, _TypeState]

    def _new_type(self) -> _TypeState:
        raise NotImplementedError

    def handle(self, request: Any) -> None:
        type_url = request.type_url
        if not type_url:
            log.warning("%s request without type_url ignored node=%s", self.label, self.node_id)
            return
        self._handle(request, type_url, self.types.setdefault(type_url, self._new_type()))

    def _handle(self, request: Any, type_url: str, st: _TypeState) -> None:
        raise NotImplementedError

    def interested(self, old: Snapshot, new: Snapshot) -> bool:
        """(Called by the cache when the node's snapshot changes.) Whether this stream must wake: True unless every
        subscribed type is unchanged for it, in which case it takes the new version as current at once, as its
        own pass would have (so its status stays synced without a wake-up)."""
        quiet: list[tuple[str, _TypeState]] = []
        for type_url, st in self.types.items():
            concerns = self._concerns(type_url, st, new)
            if concerns:
                return True
            if concerns is False:
                quiet.append((type_url, st))
        for type_url, st in quiet:
            self._quiet(type_url, st, new)
        self.server.stats.wakeups_skipped += 1
        return False

    def _concerns(self, type_url: str, st: _TypeState, new: Snapshot) -> bool | None:
        """True: ``new`` changes something of ``type_url`` the stream holds or asked for (or its state is not
        settled: it must look itself); False: the type changed, but nothing of it for this stream; None: nothing
        to do for the type."""
        return True

    def _quiet(self, type_url: str, st: _TypeState, new: Snapshot) -> None:
        """The type changed but nothing in it for this stream: what its own pass would record."""

    def plain_ack(self, request: Any) -> bool:
        """Handle ``request`` at once if it only acknowledges a response (nothing to push follows from it), saving
        the main loop a wake-up and a pass over every type for each of the thousands of ACKs a change brings.
        Returns False when the main loop must handle it (in order, as everything else)."""
        return False

    async def push(self) -> None:
        snapshot = self.cache.get(self.node_id)
        if snapshot is None:
            return
        if len(self._order) != len(self.types):  # types are only ever added
            self._order = _ordered(self.types)
        for type_url in self._order:
            if self.closed:
                return
            await self._push_type(snapshot, type_url, self.types[type_url])

    async def _push_type(self, snapshot: Snapshot, type_url: str, st: _TypeState) -> None:
        raise NotImplementedError

    def nonce(self) -> str:
        return self.server.next_nonce()

    def own_secrets(self, type_url: str, entries: list[Entry]) -> list[Entry]:
        """The last check before a secret leaves: a certificate whose SPIFFE ID is not the stream's authenticated
        identity is withheld (and logged), whatever produced the snapshot (a regeneration that raced a node's
        reconnection as another identity, a generator bug). SDS thus answers only for the proven identity."""
        if type_url != SECRET or self.identity is None:
            return entries
        want = re.compile(r"spiffe://[^/]+/ns/" + re.escape(self.identity.namespace) + "/sa/"
                          + re.escape(self.identity.service_account))
        kept: list[Entry] = []
        for entry in entries:
            spiffe = certificate_spiffe_id(entry)
            if spiffe is None or want.fullmatch(spiffe):
                kept.append(entry)
                continue
            self.server.stats.secrets_withheld += 1
            log.error("secret withheld node=%s secret=%s certificate=%s identity=%s", self.node_id, entry.name,
                      spiffe, self.identity)
        return kept

    async def send(self, type_url: str, nonce: str, size: int, build: Callable[[], Any]) -> None:
        """Reserve ``size`` bytes of the server's in-flight budget, then build and write one response. grpc queues
        it at once, so a proxy that stops reading holds up only its own stream.

        A big response (a catalog change sends thousands of resources to every wildcard stream) is built while
        holding the server's build slot, one per event-loop iteration: the streams a push woke all at once would
        otherwise build theirs back to back in one iteration and stall the loop for their sum."""
        inflight = self.server.inflight
        if not inflight.try_reserve(nonce, size + 64):
            await inflight.reserve(nonce, size + 64)
        self.held.setdefault(type_url, []).append(nonce)
        if size < _BIG_RESPONSE:
            await self.context.write(build())
            return
        async with self.server.build_slot:
            response = build()
            await asyncio.sleep(0)  # the next big build waits for the next loop iteration
        await self.context.write(response)

    def answered(self, type_url: str, nonce: str) -> None:
        """The proxy answered ``nonce``: it and every earlier response of that type are no longer in flight."""
        nonces = self.held.get(type_url)
        if not nonces or nonce not in nonces:
            return
        while nonces:
            done = nonces.pop(0)
            self.server.inflight.release(done)
            if done == nonce:
                break


class _SotwStream(_Stream[_SotwType]):
    variant = "sotw"

    def __init__(self, server: AdsServer, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        super().__init__(server, context)
        self.types = {}

    def _new_type(self) -> _SotwType:
        return _SotwType()

    def _handle(self, request: Any, type_url: str, st: _SotwType) -> None:
        nonce = request.response_nonce
        if nonce and nonce != st.nonce:
            log.debug("stale nonce ignored node=%s type=%s nonce=%s current=%s", self.node_id, type_url, nonce,
                      st.nonce)
            return
        if request.HasField("error_detail"):
            st.acked = False
            self.cache.record_nack(self.node_id, type_url, version=st.sent_version, nonce=nonce,
                                   error=request.error_detail.message)
        elif nonce:
            st.acked = request.version_info == st.sent_version
            self.cache.record_ack(self.node_id, type_url, version=request.version_info, nonce=nonce)
        names = frozenset(request.resource_names)
        wildcard = "*" in names or (not names and type_url in WILDCARD_TYPES and (not st.subscribed or st.wildcard))
        names = names - {"*"}
        if not st.subscribed or wildcard != st.wildcard or names != st.names:
            st.dirty = True
            # The proxy drops the resources it unsubscribes from, so after any change of subscription the next
            # response is due even if it equals the last one sent (names dropped and requested again).
            st.sent_key = None
        st.subscribed, st.wildcard, st.names = True, wildcard, names

    def _concerns(self, type_url: str, st: _SotwType, new: Snapshot) -> bool | None:
        if not st.subscribed:
            return None
        if st.wildcard:
            return st.sent_key != (True, new.version(type_url))
        entries, seen = new.entries(type_url), st.seen
        if st.dirty or seen is None or st.sent_key is None:
            return True
        if seen is not entries:
            for name in touched(entries, seen).intersection(st.names):
                if _version(seen.get(name)) != _version(entries.get(name)):
                    return True
        return False

    def _quiet(self, type_url: str, st: _SotwType, new: Snapshot) -> None:
        st.seen = new.entries(type_url)
        self._current_at(type_url, st, new.version(type_url))

    def _current_at(self, type_url: str, st: _SotwType, version: str) -> None:
        """Nothing the proxy asked for changed: if it ACKed what it has, it is current at this type version."""
        if st.acked and st.sent_key is not None and version != st.sent_version:
            st.sent_version = version
            self.cache.record_sent(self.node_id, type_url, version=version, nonce=st.nonce)
            self.cache.record_ack(self.node_id, type_url, version=version, nonce=st.nonce)

    async def _push_type(self, snapshot: Snapshot, type_url: str, st: _SotwType) -> None:
        if not st.subscribed:
            return
        version = snapshot.version(type_url)
        entries = snapshot.entries(type_url)
        seen, st.seen = st.seen, entries
        key: tuple[object, ...]
        if st.wildcard:
            key = (True, version)
            if key == st.sent_key:
                return
            names = sorted(entries)
        else:
            if not st.dirty and seen is not None and st.sent_key is not None and (
                    seen is entries or touched(entries, seen).isdisjoint(st.names)):
                self._current_at(type_url, st, version)
                return
            st.dirty = False
            names = sorted(n for n in st.names if n in entries)
            key = (False, st.names, tuple(entries[n].version for n in names))
            if key == st.sent_key or not names:
                # Same content as last sent (or nothing the proxy asked for exists yet: an empty answer would read
                # as "deleted").
                self._current_at(type_url, st, version)
                return
        nonce = self.nonce()
        st.sent_key, st.sent_version, st.nonce, st.acked = key, version, nonce, False
        self.cache.record_sent(self.node_id, type_url, version=version, nonce=nonce)
        selected = self.own_secrets(type_url, [entries[n] for n in names])
        await self.send(type_url, nonce, sum(e.size for e in selected),
                        lambda: self._response(version, type_url, nonce, selected))

    def _response(self, version: str, type_url: str, nonce: str, selected: list[Entry]) -> bytes:
        # A DiscoveryResponse on the wire: its fields in number order, the resources' framed once in their entries.
        response = b"".join((wire_field(1, version.encode()), *(e.sotw_field for e in selected),
                             wire_field(4, type_url.encode()), wire_field(5, nonce.encode())))
        stats = self.server.stats
        stats.sotw_responses += 1
        stats.sotw_resources += len(selected)
        stats.sotw_bytes += len(response)
        return response


class _DeltaStream(_Stream[_DeltaType]):
    variant = "delta"
    label = "delta xds"

    def __init__(self, server: AdsServer, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        super().__init__(server, context)
        self.types = {}

    def _new_type(self) -> _DeltaType:
        return _DeltaType()

    def _concerns(self, type_url: str, st: _DeltaType, new: Snapshot) -> bool | None:
        if not st.subscribed or (not st.dirty and st.checked_version == new.version(type_url)):
            return None
        if st.dirty or st.wildcard or st.seen is None or not st.responded:
            return True
        entries, known = new.entries(type_url), st.known
        for name in touched(entries, st.seen):
            if (name in st.names or name in known) and _version(entries.get(name)) != known.get(name):
                return True  # a resource it asked for appeared, changed or went away
        return False

    def _quiet(self, type_url: str, st: _DeltaType, new: Snapshot) -> None:
        st.seen, st.checked_version = new.entries(type_url), new.version(type_url)
        self._current(type_url, st, st.checked_version)

    def _current(self, type_url: str, st: _DeltaType, version: str) -> None:
        """Nothing of interest changed: with no answer pending and the last one an ACK, the proxy is current at
        ``version``."""
        if not st.nonces and st.last_ok:
            self.cache.record_sent(self.node_id, type_url, version=version, nonce=st.last_nonce)
            self.cache.record_ack(self.node_id, type_url, version=version, nonce=st.last_nonce)

    def plain_ack(self, request: Any) -> bool:
        st = self.types.get(request.type_url)
        if (st is None or not st.subscribed or st.dirty or not st.responded or request.resource_names_subscribe
                or request.resource_names_unsubscribe or request.HasField("error_detail")):
            return False
        self._handle(request, request.type_url, st)  # records the ACK; marks nothing dirty
        return True

    def _handle(self, request: Any, type_url: str, st: _DeltaType) -> None:
        nonce = request.response_nonce
        if nonce:
            version = st.nonces.pop(nonce, None)
            if version is None:
                log.debug("unknown delta nonce node=%s type=%s nonce=%s", self.node_id, type_url, nonce)
            elif request.HasField("error_detail"):
                st.last_ok = False
                self.cache.record_nack(self.node_id, type_url, version=version, nonce=nonce,
                                       error=request.error_detail.message)
            else:
                st.last_ok = True
                self.cache.record_ack(self.node_id, type_url, version=version, nonce=nonce)
        subscribe = list(request.resource_names_subscribe)
        unsubscribe = list(request.resource_names_unsubscribe)
        if not st.subscribed:
            st.subscribed = True
            st.known.update(request.initial_resource_versions)
            if type_url in WILDCARD_TYPES and not subscribe:
                st.wildcard = True
        for name in subscribe:
            if name == "*":
                st.wildcard = True
            else:
                st.names.add(name)
        for name in unsubscribe:
            if name == "*":
                st.wildcard = False
                st.known = {n: v for n, v in st.known.items() if n in st.names}
            else:
                st.names.discard(name)
                if not st.wildcard:
                    st.known.pop(name, None)
        if subscribe or unsubscribe or not st.responded:
            st.dirty = True

    async def _push_type(self, snapshot: Snapshot, type_url: str, st: _DeltaType) -> None:
        if not st.subscribed:
            return
        version = snapshot.version(type_url)
        if not st.dirty and st.checked_version == version:
            return
        entries = snapshot.entries(type_url)
        seen, st.seen = st.seen, entries
        known = st.known
        changed: list[Entry] = []
        removed: list[str] = []
        if not st.dirty and seen is not None:
            # Fast path: after a full pass, everything in scope is known at its version, so only the names that
            # differ between the entries seen last time and now can need sending.
            for i, name in enumerate(touched(entries, seen)):
                if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # a catalog change touches thousands of names: let the loop breathe
                entry = entries.get(name)
                if entry is None:
                    if name in known:
                        removed.append(name)
                elif (st.wildcard or name in st.names) and known.get(name) != entry.version:
                    changed.append(entry)
        elif st.wildcard:
            changed = [e for n, e in entries.items() if known.get(n) != e.version]
            removed = [n for n in known if n not in entries]
        else:
            for name in st.names:
                found = entries.get(name)
                if found is None:
                    if name in known:
                        removed.append(name)
                elif known.get(name) != found.version:
                    changed.append(found)
            removed.extend(n for n in known if n not in st.names and n not in entries)
        st.dirty, st.checked_version = False, version
        changed = self.own_secrets(type_url, changed)
        if not changed and not removed and st.responded:
            self._current(type_url, st, version)
            return
        if not changed and not removed and not st.wildcard and not any(n in entries for n in st.names):
            return  # named subscription to resources that do not exist (yet)
        for entry in changed:
            known[entry.name] = entry.version
        for name in removed:
            known.pop(name, None)
        # A big change goes out in several responses of at most _DELTA_CHUNK bytes of resources (each one its own
        # nonce, ACKed on its own): the event loop builds and serialises one at a time.
        chunks: list[tuple[list[Entry], list[str]]] = []
        current: list[Entry] = []
        size = 0
        for entry in changed:
            if current and size + entry.size > _DELTA_CHUNK:
                chunks.append((current, []))
                current, size = [], 0
            current.append(entry)
            size += entry.size
        chunks.append((current, removed))
        for part, gone in chunks:
            nonce = self.nonce()
            st.responded, st.last_nonce = True, nonce
            st.nonces[nonce] = version
            if len(st.nonces) > _MAX_PENDING_NONCES:
                del st.nonces[next(iter(st.nonces))]
            self.cache.record_sent(self.node_id, type_url, version=version, nonce=nonce)
            await self.send(type_url, nonce, sum(e.size for e in part),
                            functools.partial(self._response, version, type_url, nonce, part, gone))
            if self.closed:
                return

    def _response(self, version: str, type_url: str, nonce: str, changed: list[Entry], removed: list[str]) -> bytes:
        # A DeltaDiscoveryResponse on the wire (fields in number order; see the SotW one).
        response = b"".join((wire_field(1, version.encode()), *(e.delta_field for e in changed),
                             wire_field(4, type_url.encode()), wire_field(5, nonce.encode()),
                             *(wire_field(6, name.encode()) for name in removed)))
        stats = self.server.stats
        stats.delta_responses += 1
        stats.delta_resources += len(changed)
        stats.delta_bytes += len(response)
        return response


class _Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, server: AdsServer) -> None:
        self._server = server

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        await _SotwStream(self._server, context).run()

    async def DeltaAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        await _DeltaStream(self._server, context).run()


def _wire(response: bytes | Any) -> bytes:
    """Responses are written already serialised (``_Stream._response``); a message is serialised as grpc would."""
    return response if isinstance(response, bytes) else bytes(response.SerializeToString())


def _add_servicer(servicer: _Servicer, server: grpc.aio.Server) -> None:
    """The ADS service as the generated ``add_AggregatedDiscoveryServiceServicer_to_server`` registers it, but with
    responses passed through as the bytes the streams built (each resource framed once for every stream)."""
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.StreamAggregatedResources, request_deserializer=DiscoveryRequest.FromString,
            response_serializer=_wire),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.DeltaAggregatedResources, request_deserializer=DeltaDiscoveryRequest.FromString,
            response_serializer=_wire),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))


class AdsServer:
    """The ADS gRPC server, as an async context manager::

        async with AdsServer(cache=cache, authenticator=auth, host="127.0.0.1", port=0) as srv:
            ...  # srv.port is the bound port

    ``authenticator=None`` turns authentication off (tests and benchmarks only; logged as a warning).
    ``server_credentials`` (grpc.ssl_server_credentials) serves TLS instead of plaintext. ``inflight_bytes``
    bounds the responses written but not yet answered by their proxies (see InflightBudget); ``answer_timeout``
    is how long an unanswered response counts against it.
    """

    def __init__(self, *, cache: SnapshotCache, authenticator: Authenticator | None, host: str = "127.0.0.1",
                 port: int = 0, server_credentials: grpc.ServerCredentials | None = None,
                 grace: float = 1.0, inflight_bytes: int = 64 * 1024 * 1024, answer_timeout: float = 30.0) -> None:
        self.cache = cache
        self.authenticator = authenticator
        self.host = host
        self._port = port
        self._credentials = server_credentials
        self._grace = grace
        self._server: grpc.aio.Server | None = None
        self._nonces = itertools.count(1)
        self.inflight = InflightBudget(inflight_bytes, answer_timeout=answer_timeout)
        self.build_slot = asyncio.Lock()  # one big response built per event-loop iteration (see _Stream.send)
        self.stats = XdsStats()
        self.streams: set[_Stream[Any]] = set()  # open, authenticated streams
        revocations = getattr(authenticator, "on_revoke", None)
        if callable(revocations):
            revocations(self.revoke)

    def revoke(self, identities: frozenset[ProxyIdentity]) -> None:
        """Close every open stream authenticated as one of ``identities`` (their tokens were revoked)."""
        revoked = {binding(i) for i in identities}
        for stream in list(self.streams):
            if stream.identity is not None and binding(stream.identity) in revoked and stream.wake is not None:
                stream.revoked = True
                stream.wake.set()

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("AdsServer is not started")
        return self._port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def __aenter__(self) -> Self:
        if self.authenticator is None:
            log.warning("xds authentication is disabled: any client may fetch any node's snapshot")
        server = grpc.aio.server(options=[
            ("grpc.max_concurrent_streams", 100_000),
            # thousands of proxies reconnect at once after a restart: queue their streams, do not shed them
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            # Envoy pings its ADS connection (bootstrap connection_keepalive); never GOAWAY it for "too many pings"
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ])
        _add_servicer(_Servicer(self), server)
        target = f"[{self.host}]:{self._port}" if ":" in self.host else f"{self.host}:{self._port}"
        if self._credentials is not None:
            bound = server.add_secure_port(target, self._credentials)
        else:
            bound = server.add_insecure_port(target)
        if not bound:
            raise OSError(f"ADS server could not bind {target}")
        self._port = bound
        await server.start()
        self._server = server
        log.info("ads server listening address=%s:%d tls=%s", self.host, bound, self._credentials is not None)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._server is not None:
            await self._server.stop(self._grace)
            log.info("ads server stopped address=%s:%d", self.host, self._port)
