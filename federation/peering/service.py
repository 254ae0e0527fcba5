"""Peering in the federation service: the peer manager (fetch, verify, store and refresh peer bundles; pull the
services peers exported to us) and the peering listener (the SPIFFE bundle endpoint and the service exchange).

The peering listener is separate from the member API because a bundle endpoint must not require a client
certificate (SPIFFE Federation 5.2.2.3) while the member API requires one. It serves the federation's own SVID
(``spiffe://<td>/meshfed/federation``, the same certificate as the member API, following root rotation) and asks
for a client certificate without requiring one:

- ``GET /``: this clusterset's trust bundle as a SPIFFE bundle (JWKS with ``spiffe_sequence`` and
  ``spiffe_refresh_hint``); a root added by ``meshfed ca rotate add-root`` appears here at once (before it signs);
- ``GET /peering/v1/services``: the services our members exported to the calling peer, with the exporting clusters'
  east-west gateways. The caller must be a peer federation: no certificate is 401; a certificate whose trust domain
  is not a declared peer is 403; one that does not verify against THAT peer's bundle (only that one) is 401; one
  that is not the peer's federation service is 403. A certificate chaining to no peer's root at all fails the TLS
  handshake (the listener only knows peer roots).

The manager runs one scheduler loop (bounded ticks): it reloads the peers file when it changes, starts a bundle
fetch for each peer when due (at ``spiffe_refresh_hint``, clamped to ``[refresh_min_s, refresh_max_s]``; after a
failure with exponential backoff from ``backoff_initial_s``, never beyond the refresh interval), pulls each peer's
services every ``services_interval_s``, rebuilds the listener's TLS context when its certificate or a peer bundle
changes, and publishes the :class:`PeerSnapshot` members receive. The last good bundle is kept when a peer is
unreachable or serves something refused, and delivered until it expires (``expiry``: ``max_age`` after the last
successful fetch, or when its last root expires). Network IO is async; TLS contexts, certificate parsing and file
writes run on worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from discovery.clusterset import ClusterSetError, PeerDecl, load_peers_file
from discovery.model import RemoteEndpoints, ServiceKey
from federation import wire
from federation.client import VerifyingConnector
from federation.clock import utcnow
from federation.peering.bundles import (
    BundleStore,
    Held,
    expiry,
    fetch_bundle,
    read_bootstrap,
    read_limited,
)
from federation.peering.hub import PeerHub
from federation.peering.records import (
    BundleRefused,
    ExchangeRefused,
    PeerBundleView,
    PeeringError,
    PeerService,
    PeerStatus,
    PeerUnreachable,
)
from federation.service.auth import Unauthenticated, peer_chain
from federation.service.state import CatalogState
from federation.trust.bundle import TrustBundle
from federation.trust.ca import spiffe_id_of
from federation.trust.errors import ChainError, InvalidSpiffeId, TrustError
from federation.trust.identity import federation_server_of_peer, parse_chain
from federation.trust.spiffe import TrustDomain
from federation.trust.tls import client_ssl_context, load_identity, peer_chain_der

log = logging.getLogger("meshfed.federation.peering")

SERVICES_PATH = "/peering/v1/services"
HELD_HEADER = "X-Meshfed-Held-Bundle"  # on exchange calls: "sequence=N; roots=FP16,FP16" of the callee's bundle
MAX_OFFERED = 10_000  # services one peer may offer us
MAX_OFFER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PeeringConfig:
    peers_file: Path | None = None  # the declarations (re-read when it changes); None: no peers
    state_dir: Path | None = None  # last good bundles and services (default: beside the peers file)
    refresh_hint_s: int = 300  # what our own bundle endpoint advertises
    refresh_min_s: float = 1.0
    refresh_max_s: float = 3600.0
    max_age: timedelta = timedelta(hours=24)
    services_interval_s: float = 5.0
    fetch_timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    reload_interval_s: float = 2.0
    tick_s: float = 0.25

    def state_root(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        if self.peers_file is None:
            raise ValueError("peering needs a state directory or a peers file")
        return self.peers_file.parent / "peer-state"


class Identity(Protocol):
    """What the federation's serving credentials offer (``ServingCredentials``)."""

    reloads: int

    def bundle(self) -> TrustBundle: ...

    def identity_pem(self) -> tuple[bytes, bytes]: ...


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


@dataclass
class _Peer:
    """The manager's mutable record of one peer."""

    decl: PeerDecl
    held: Held | None = None
    services: tuple[PeerService, ...] = ()
    services_at: datetime | None = None
    services_error: str = ""
    last_attempt: datetime | None = None
    last_success: datetime | None = None
    next_bundle: datetime = field(default_factory=utcnow)
    next_services: datetime = field(default_factory=utcnow)
    backoff_s: float = 0.0
    services_backoff_s: float = 0.0
    error: str = ""
    error_kind: str = ""
    failing_since: datetime | None = None
    refusals: int = 0
    busy: set[str] = field(default_factory=set)
    # What the peer reports holding of our bundle (header of its exchange calls): sequence, root fingerprints, when.
    holds: tuple[int, tuple[str, ...], datetime] | None = None

    @property
    def trust_domain(self) -> str:
        return self.decl.trust_domain

    def fetched(self) -> bool:
        return self.held is not None and self.held.source == "fetched" and self.held.fetched_at is not None


class PeerManager:
    """Peers of one clusterset's federation (see the module docstring)."""

    def __init__(self, *, config: PeeringConfig, identity: Identity, state: CatalogState, hub: PeerHub) -> None:
        self.config = config
        self.identity = identity
        self.state = state
        self.hub = hub
        self.store = BundleStore(config.state_root()) if config.peers_file is not None else None
        self.peers: dict[str, _Peer] = {}
        self._file_sig: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tls_key: tuple[Any, ...] | None = None
        self._inner: ssl.SSLContext | None = None
        self.outer: ssl.SSLContext | None = None
        self.config_error = ""
        hub.status = self.status

    @property
    def trust_domain(self) -> TrustDomain:
        return self.identity.bundle().trust_domain

    # ---- declarations --------------------------------------------------------------------------------------------

    def _signature(self) -> tuple[int, int] | None:
        path = self.config.peers_file
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    async def reload(self) -> bool:
        """Re-read the peers file if it changed; True if the peers changed. Reading the file and the bundles of new
        peers runs on a worker thread; the peer table is changed here, on the loop (its other readers). A broken
        file keeps the peers in force (the error is logged and reported)."""
        sig = await asyncio.to_thread(self._signature)
        if sig is None or sig == self._file_sig:
            return False
        assert self.config.peers_file is not None
        try:
            decls = await asyncio.to_thread(load_peers_file, self.config.peers_file,
                                            own_trust_domain=self.trust_domain.name)
        except ClusterSetError as exc:
            if self.config_error != str(exc):
                log.warning("event=peers_file_invalid error=%s; keeping the peers in force", exc)
            self.config_error = str(exc)
            return False
        self._file_sig, self.config_error = sig, ""
        wanted = {d.name: d for d in decls}
        changed = False
        for name in [n for n in self.peers if n not in wanted]:
            gone = self.peers.pop(name)
            if self.store is not None and gone.trust_domain not in {d.trust_domain for d in decls}:
                # The relationship ends: its bundle is forgotten.
                await asyncio.to_thread(self.store.remove, gone.trust_domain)
            log.info("event=peer_removed peer=%s trust_domain=%s", name, gone.trust_domain)
            changed = True
        for name, decl in wanted.items():
            have = self.peers.get(name)
            if have is not None and have.decl == decl:
                continue
            rec = _Peer(decl=decl)
            if have is not None and have.trust_domain == decl.trust_domain:
                rec.held, rec.services, rec.services_at = have.held, have.services, have.services_at
            else:
                rec.held = await asyncio.to_thread(self._initial, decl)
                rec.services = await asyncio.to_thread(self._stored_services, decl)
            self.peers[name] = rec
            log.info("event=peer_declared peer=%s trust_domain=%s endpoint=%s profile=%s bundle=%s", name,
                     decl.trust_domain, decl.bundle_endpoint, decl.profile,
                     rec.held.source if rec.held else "none")
            changed = True
        return changed

    def _initial(self, decl: PeerDecl) -> Held | None:
        """The stored last good bundle of the peer's trust domain, else its bootstrap bundle."""
        stored = self.store.load(decl.trust_domain) if self.store is not None else None
        if stored is not None:
            return stored
        if decl.bootstrap_bundle is None:
            return None
        try:
            return Held(bundle=read_bootstrap(decl.bootstrap_bundle, TrustDomain(decl.trust_domain), peer=decl.name),
                        source="bootstrap")
        except PeeringError as exc:
            log.warning("event=peer_bootstrap_invalid peer=%s error=%s", decl.name, exc)
            return None

    def _stored_services(self, decl: PeerDecl) -> tuple[PeerService, ...]:
        if self.store is None:
            return ()
        body = self.store.load_services(decl.trust_domain)
        if body is None:
            return ()
        try:
            return decode_offers(body, decl)
        except PeeringError as exc:
            log.warning("event=peer_services_unreadable peer=%s error=%s", decl.name, exc)
            return ()

    def by_trust_domain(self, td: str) -> _Peer | None:
        return next((p for p in self.peers.values() if p.trust_domain == td), None)

    # ---- the loop ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: reload, schedule fetches and pulls, rebuild TLS, publish (see the module docstring)."""
        reload_at = 0.0
        loop = asyncio.get_running_loop()
        try:
            while True:
                if loop.time() >= reload_at:
                    reload_at = loop.time() + self.config.reload_interval_s
                    await self.reload()
                now = utcnow()
                for peer in list(self.peers.values()):
                    if "bundle" not in peer.busy and now >= peer.next_bundle:
                        self._spawn(peer, "bundle", self.refresh_bundle(peer))
                    if "services" not in peer.busy and peer.fetched() and now >= peer.next_services:
                        self._spawn(peer, "services", self.pull_services(peer))
                await self.refresh_tls()
                await self.publish()
                await asyncio.sleep(self.config.tick_s)
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _spawn(self, peer: _Peer, kind: str, job: Awaitable[None]) -> None:
        peer.busy.add(kind)

        async def run() -> None:
            try:
                await job
            except Exception:  # a bug in one peer's job must not end the manager
                log.exception("peer job failed peer=%s kind=%s", peer.decl.name, kind)
            finally:
                peer.busy.discard(kind)

        task = asyncio.get_running_loop().create_task(run(), name=f"peer-{kind}-{peer.decl.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _interval(self, hint: int) -> float:
        return min(max(float(hint), self.config.refresh_min_s), self.config.refresh_max_s)

    async def refresh_bundle(self, peer: _Peer) -> None:
        """Fetch, verify and store one peer's bundle; on failure keep the last good one and back off."""
        decl = peer.decl
        now = utcnow()
        peer.last_attempt = now
        trusted = peer.held.bundle if peer.held is not None else None
        try:
            got = await fetch_bundle(decl, trusted, timeout_s=self.config.fetch_timeout_s)
            new = got.bundle
            if peer.fetched() and trusted is not None and new.sequence < trusted.sequence:
                raise BundleRefused(f"spiffe_sequence {new.sequence} is older than the trusted bundle's "
                                    f"{trusted.sequence} (a rollback)", peer=decl.name, field="spiffe_sequence")
            if got.endpoint_root and got.endpoint_root not in new.fingerprints:
                raise BundleRefused(f"the bundle does not hold root {got.endpoint_root[:16]} its own endpoint's "
                                    "certificate chains to (trusting it would lock the next refresh out)",
                                    peer=decl.name, field="keys")
            held = Held(bundle=new, source="fetched", fetched_at=utcnow(), endpoint_root=got.endpoint_root)
            if self.store is not None:
                await asyncio.to_thread(self.store.save, decl.name, held)
        except BundleRefused as exc:
            peer.refusals += 1
            self._failed(peer, exc, "refused")
            log.warning("event=peer_bundle_refused peer=%s trust_domain=%s endpoint=%s field=%s error=%s "
                        "kept_sequence=%s retry_in=%.1fs", decl.name, decl.trust_domain, decl.bundle_endpoint,
                        exc.field, exc.reason, trusted.sequence if trusted else None, peer.backoff_s)
            return
        except (PeeringError, TrustError, OSError, ssl.SSLError, ValueError) as exc:
            self._failed(peer, exc, "unreachable")
            age = (utcnow() - peer.held.fetched_at).total_seconds() if peer.held and peer.held.fetched_at else None
            log.warning("event=peer_bundle_unreachable peer=%s endpoint=%s error=%s kept_sequence=%s age_s=%s "
                        "retry_in=%.1fs", decl.name, decl.bundle_endpoint, exc,
                        trusted.sequence if trusted else None, f"{age:.0f}" if age is not None else "-",
                        peer.backoff_s)
            return
        changed = trusted is None or peer.held is None or peer.held.source != "fetched" or \
            trusted.fingerprints != new.fingerprints or trusted.sequence != new.sequence
        peer.held = held
        peer.last_success = held.fetched_at
        peer.error, peer.error_kind, peer.failing_since, peer.backoff_s = "", "", None, 0.0
        assert held.fetched_at is not None
        peer.next_bundle = held.fetched_at + timedelta(seconds=self._interval(new.refresh_hint))
        (log.info if changed else log.debug)(
            "event=peer_bundle_fetched peer=%s trust_domain=%s sequence=%d roots=%s endpoint_root=%s changed=%s "
            "next_in=%.0fs", decl.name, decl.trust_domain, new.sequence, ",".join(f[:16] for f in new.fingerprints),
            got.endpoint_root[:16] or "-", changed, self._interval(new.refresh_hint))
        if changed:
            peer.next_services = utcnow()  # the exchange is authenticated with this bundle: pull again now

    def _failed(self, peer: _Peer, exc: Exception, kind: str) -> None:
        now = utcnow()
        peer.error = str(exc)
        peer.error_kind = kind
        peer.failing_since = peer.failing_since or now
        hint = peer.held.bundle.refresh_hint if peer.held is not None else self.config.refresh_hint_s
        ceiling = self._interval(hint)
        peer.backoff_s = min(max(peer.backoff_s * 2, self.config.backoff_initial_s), ceiling)
        peer.next_bundle = now + timedelta(seconds=peer.backoff_s)

    async def pull_services(self, peer: _Peer) -> None:
        """Pull the services ``peer`` exported to us; on failure keep the last ones."""
        decl = peer.decl
        assert peer.held is not None
        try:
            body = await fetch_offers(decl, peer.held.bundle, self.identity.identity_pem(),
                                      timeout_s=self.config.fetch_timeout_s)
            services = await asyncio.to_thread(decode_offers, body, decl)
            if self.store is not None and services != peer.services:
                await asyncio.to_thread(self.store.save_services, decl.trust_domain, body)
        except (PeeringError, TrustError, OSError, ssl.SSLError, ValueError) as exc:
            if peer.services_error != str(exc):
                log.warning("event=peer_services_failed peer=%s url=%s error=%s kept=%d", decl.name,
                            decl.exchange_url, exc, len(peer.services))
            peer.services_error = str(exc)
            peer.services_backoff_s = min(max(peer.services_backoff_s * 2, self.config.backoff_initial_s),
                                          max(self.config.services_interval_s, 1.0) * 4)
            peer.next_services = utcnow() + timedelta(seconds=peer.services_backoff_s)
            return
        if services != peer.services:
            log.info("event=peer_services peer=%s services=%s", decl.name,
                     ",".join(f"{s.key.name}.{s.key.namespace}" for s in services) or "-")
        peer.services, peer.services_at, peer.services_error, peer.services_backoff_s = \
            services, utcnow(), "", 0.0
        peer.next_services = utcnow() + timedelta(seconds=self.config.services_interval_s)

    # ---- what members get ----------------------------------------------------------------------------------------

    def delivered(self, now: datetime | None = None) -> tuple[dict[str, PeerBundleView], tuple[PeerService, ...]]:
        """The bundles members get (fetched and not expired, by trust domain) and the services of those peers."""
        now = now or utcnow()
        bundles: dict[str, PeerBundleView] = {}
        services: list[PeerService] = []
        for name, peer in sorted(self.peers.items()):
            held = peer.held
            if held is None or held.source != "fetched" or held.fetched_at is None:
                continue
            until = expiry(held.bundle, held.fetched_at, self.config.max_age)
            if now >= until:
                continue
            bundles[peer.trust_domain] = PeerBundleView(
                peer=name, trust_domain=peer.trust_domain, roots_pem=held.bundle.to_pem().decode(),
                sequence=held.bundle.sequence, fetched_at=held.fetched_at, refresh_hint_s=held.bundle.refresh_hint,
                expires_at=until)
            services.extend(peer.services)
        services.sort(key=lambda s: (s.peer, s.key.namespace, s.key.name))
        return bundles, tuple(services)

    async def publish(self) -> bool:
        bundles, services = self.delivered()
        changed = await self.hub.publish(bundles, services)
        if changed:
            log.info("event=peers_published version=%d bundles=%s services=%d", self.hub.snapshot.version,
                     ",".join(f"{td}@{b.sequence}" for td, b in sorted(bundles.items())) or "-", len(services))
        return changed

    def offers(self, peer_name: str) -> tuple[PeerService, ...]:
        """The services our connected members exported to ``peer_name`` (as the peer will see them)."""
        return offers_for(peer_name, self.state, trust_domain=self.trust_domain.name)

    def status(self) -> list[dict[str, Any]]:
        now = utcnow()
        out = []
        for name, peer in sorted(self.peers.items()):
            held = peer.held
            until = expiry(held.bundle, held.fetched_at, self.config.max_age) \
                if held is not None and held.fetched_at is not None else None
            row = PeerStatus(
                name=name, trust_domain=peer.trust_domain, bundle_endpoint=peer.decl.bundle_endpoint,
                profile=str(peer.decl.profile), endpoint_spiffe_id=peer.decl.endpoint_spiffe_id,
                federation=peer.decl.exchange_url, bundle_source=held.source if held is not None else "none",
                bundle_sequence=held.bundle.sequence if held is not None else None,
                bundle_roots=tuple(f[:16] for f in held.bundle.fingerprints) if held is not None else (),
                fetched_at=_iso(held.fetched_at) if held is not None else None,
                bundle_age_s=round((now - held.fetched_at).total_seconds(), 1)
                if held is not None and held.fetched_at is not None else None,
                expires_at=_iso(until), expired=until is not None and now >= until,
                refresh_hint_s=held.bundle.refresh_hint if held is not None else None,
                last_attempt_at=_iso(peer.last_attempt), last_refresh_at=_iso(peer.last_success),
                next_refresh_at=_iso(peer.next_bundle), error=peer.error, error_kind=peer.error_kind,
                failing_since=_iso(peer.failing_since), refusals=peer.refusals,
                services_imported=tuple(f"{s.key.name}.{s.key.namespace}" for s in peer.services),
                services_exported=tuple(f"{s.key.name}.{s.key.namespace}" for s in self.offers(name)),
                services_pulled_at=_iso(peer.services_at), services_error=peer.services_error,
                peer_holds_sequence=peer.holds[0] if peer.holds else None,
                peer_holds_roots=peer.holds[1] if peer.holds else (),
                peer_holds_reported_at=_iso(peer.holds[2]) if peer.holds else None)
            out.append(dataclasses.asdict(row))
        return out

    # ---- the peering listener's TLS ------------------------------------------------------------------------------

    def _tls_inputs(self) -> tuple[Any, ...]:
        roots = tuple(sorted((p.trust_domain, p.held.bundle.fingerprints) for p in self.peers.values()
                             if p.held is not None))
        return (self.identity.reloads, roots)

    def _build_inner(self) -> ssl.SSLContext:
        chain, key = self.identity.identity_pem()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_identity(ctx, chain, key)
        pem = "".join(p.held.bundle.to_pem().decode() for _, p in sorted(self.peers.items()) if p.held is not None)
        if pem:
            # Only to let a peer federation's certificate through the handshake: who it is, and whether it verifies
            # against its own trust domain's bundle alone, is decided per request (peer_identity).
            ctx.load_verify_locations(cadata=pem)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    async def refresh_tls(self) -> None:
        key = self._tls_inputs()
        if key == self._tls_key:
            return
        try:
            inner = await asyncio.to_thread(self._build_inner)
        except (TrustError, ssl.SSLError, OSError) as exc:
            log.warning("peering listener TLS rebuild failed error=%s; keeping the current one", exc)
            return
        self._inner, self._tls_key = inner, key
        if self.outer is None:
            outer = await asyncio.to_thread(self._build_inner)
            outer.sni_callback = self._select
            self.outer = outer
        log.debug("peering listener TLS context rebuilt peers=%d", len(key[1]))

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self._inner is not None:
            ssl_object.context = self._inner

    async def server_context(self) -> ssl.SSLContext:
        """The context to listen with (load the peers file first: ``reload``)."""
        await self.refresh_tls()
        assert self.outer is not None
        return self.outer


# ---- the exchange, pure parts ---------------------------------------------------------------------------------------


def offers_for(peer_name: str, state: CatalogState, *, trust_domain: str) -> tuple[PeerService, ...]:
    """Every service a connected member exported to ``peer_name``: the merged ports and type of the clusterset's
    ServiceImport, and one shard per exporting cluster with its east-west gateway (never pod addresses)."""
    members = state.members()
    catalog = state.catalog
    shards: dict[ServiceKey, list[RemoteEndpoints]] = {}
    first: dict[ServiceKey, Any] = {}
    for cluster, exports in sorted(state.exports().items()):
        member = members.get(cluster)
        if member is None or member.unreachable_since is not None:
            continue
        for svc in exports.services:
            if peer_name not in svc.peers:
                continue
            first.setdefault(svc.key, svc)
            shards.setdefault(svc.key, []).append(RemoteEndpoints(
                cluster=cluster, network=member.info.network, gateway_host=member.info.gateway_host,
                gateway_port=member.info.gateway_port, localities=svc.localities))
    out = []
    for key in sorted(shards, key=lambda k: (k.namespace, k.name)):
        merged = catalog.services.get(key)
        ports = merged.import_.ports if merged is not None else first[key].ports
        stype = merged.import_.type if merged is not None else first[key].type
        out.append(PeerService(peer="", trust_domain=trust_domain, key=key, type=stype, ports=ports,
                               endpoints=tuple(shards[key])))
    return tuple(out)


def decode_offers(body: Any, decl: PeerDecl) -> tuple[PeerService, ...]:
    """A peer's exchange answer as our :class:`PeerService` values (named after our declaration of it)."""
    if not isinstance(body, dict):
        raise ExchangeRefused("the exchange answer is not a JSON object", peer=decl.name)
    if body.get("trustDomain") != decl.trust_domain:
        raise ExchangeRefused(f"the exchange answer is for trust domain {body.get('trustDomain')!r}, not "
                              f"{decl.trust_domain!r}", peer=decl.name, field="trustDomain")
    raw = body.get("services")
    if not isinstance(raw, list):
        raise ExchangeRefused("must be a list", peer=decl.name, field="services")
    if len(raw) > MAX_OFFERED:
        raise ExchangeRefused(f"has {len(raw)} services, more than {MAX_OFFERED}", peer=decl.name, field="services")
    try:
        services = [wire.offered_service_from_json(s, f"services[{i}]", peer=decl.name,
                                                   trust_domain=decl.trust_domain) for i, s in enumerate(raw)]
    except wire.WireError as exc:
        raise ExchangeRefused(exc.reason, peer=decl.name, field=exc.field) from exc
    return tuple(sorted(services, key=lambda s: (s.key.namespace, s.key.name)))


async def fetch_offers(decl: PeerDecl, bundle: TrustBundle, identity: tuple[bytes, bytes], *,
                       timeout_s: float = 10.0) -> Any:
    """GET the peer federation's exchange with our federation certificate; the server must prove the peer's
    federation identity against ``bundle`` (the peer trust domain's bundle) alone."""
    chain, key = identity
    ctx = await asyncio.to_thread(client_ssl_context, chain, key, bundle)

    def check(ssl_object: Any) -> None:
        try:
            federation_server_of_peer(peer_chain_der(ssl_object), bundle)
        except TrustError as exc:
            raise ExchangeRefused(f"{decl.exchange_url} is not the peer's federation service: {exc}",
                                  peer=decl.name) from exc

    url = decl.exchange_url + SERVICES_PATH
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(5.0, timeout_s))
    connector = VerifyingConnector(check=check, ssl=ctx, limit=1, force_close=True)
    held = f"sequence={bundle.sequence}; roots={','.join(f[:16] for f in bundle.fingerprints)}"
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
                session.get(url, allow_redirects=False, headers={HELD_HEADER: held}) as resp:
            raw = await read_limited(resp, MAX_OFFER_BYTES)
            status = resp.status
            if raw is None:
                raise ExchangeRefused(f"{url}: the answer is larger than {MAX_OFFER_BYTES} bytes", peer=decl.name)
    except aiohttp.ClientSSLError as exc:
        raise ExchangeRefused(f"{url}: TLS failed: {exc}", peer=decl.name) from exc
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise PeerUnreachable(f"{url}: {type(exc).__name__}: {exc}", peer=decl.name) from exc
    try:
        body = wire.loads(raw) if raw else None
    except wire.WireError as exc:
        raise ExchangeRefused(f"{url}: HTTP {status}: {exc}", peer=decl.name) from exc
    if status >= 500:
        raise PeerUnreachable(f"{url}: HTTP {status}", peer=decl.name)
    if status != 200:
        message = body.get("error") if isinstance(body, dict) else str(body)[:200]
        raise ExchangeRefused(f"{url}: HTTP {status}: {message}", peer=decl.name)
    return body


# ---- the peering listener's application -----------------------------------------------------------------------------


class _Keys:
    manager = web.AppKey("manager", PeerManager)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(value, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


def peer_identity(request: web.Request, manager: PeerManager) -> _Peer:
    """The peer federation calling (see the module docstring for 401 vs 403)."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    try:
        chain = peer_chain(ssl_object)
    except (Unauthenticated, TrustError) as exc:
        raise _Refused(_error(401, f"a client certificate of a peer's federation service is required: {exc}")) \
            from exc
    try:
        leaf_id = spiffe_id_of(parse_chain(chain)[0], what="client certificate")
    except (InvalidSpiffeId, ChainError, ValueError) as exc:
        raise _Refused(_error(401, f"the client certificate is not an X509-SVID: {exc}")) from exc
    peer = manager.by_trust_domain(leaf_id.trust_domain.name)
    if peer is None or peer.held is None:
        raise _Refused(_error(403, f"trust domain {leaf_id.trust_domain} is not a peer of this clusterset"))
    try:
        federation_server_of_peer(chain, peer.held.bundle)
    except ChainError as exc:
        raise _Refused(_error(401, f"the client certificate does not verify against the bundle of "
                                   f"{peer.trust_domain}: {exc}")) from exc
    except TrustError as exc:
        raise _Refused(_error(403, f"only peer {peer.decl.name}'s federation service may call the exchange: "
                                   f"{exc}")) from exc
    return peer


@web.middleware
async def _middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Refused as refused:
        log.warning("peering refused status=%d path=%s remote=%s body=%s", refused.response.status, request.path,
                    request.remote, refused.response.text)
        return refused.response
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason)


async def get_bundle(request: web.Request) -> web.Response:
    manager = request.app[_Keys.manager]
    doc = manager.identity.bundle().to_jwks()
    doc["spiffe_refresh_hint"] = manager.config.refresh_hint_s
    return _json(doc)


async def get_services(request: web.Request) -> web.Response:
    manager = request.app[_Keys.manager]
    peer = peer_identity(request, manager)
    held = parse_held(request.headers.get(HELD_HEADER, ""))
    if held is not None:
        peer.holds = (*held, utcnow())
    offers = manager.offers(peer.decl.name)
    log.debug("peering exchange peer=%s services=%d", peer.decl.name, len(offers))
    return _json({"trustDomain": manager.trust_domain.name,
                  "services": [wire.offered_service_json(s) for s in offers]})


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


def parse_held(text: str) -> tuple[int, tuple[str, ...]] | None:
    """``sequence=N; roots=FP16,FP16`` (what a peer holds of our bundle), or None if absent or malformed."""
    parts = dict(p.strip().partition("=")[::2] for p in text.split(";") if "=" in p)
    try:
        sequence = int(parts["sequence"])
    except (KeyError, ValueError):
        return None
    roots = tuple(r for r in parts.get("roots", "").split(",") if r)
    if sequence < 0 or len(roots) > 64 or not all(len(r) == 16 and all(c in "0123456789abcdef" for c in r)
                                                  for r in roots):
        return None
    return sequence, roots


def create_peering_app(manager: PeerManager) -> web.Application:
    app = web.Application(middlewares=[_middleware])
    app[_Keys.manager] = manager
    app.router.add_get("/", get_bundle)
    app.router.add_get(SERVICES_PATH, get_services)
    app.router.add_get("/healthz", healthz)
    return app


@contextlib.asynccontextmanager
async def run_peering(manager: PeerManager, *, listens: list[tuple[str, int]]) -> AsyncIterator[None]:
    """The manager's loop and (for each of ``listens``) the peering listener, until the block exits."""
    await manager.reload()
    context = await manager.server_context()
    task = asyncio.get_running_loop().create_task(manager.run(), name="peer-manager")
    runner = web.AppRunner(create_peering_app(manager), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        for host, port in listens:
            await web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True).start()
            log.info("peering listener (SPIFFE bundle endpoint https://%s:%d/, exchange %s) up", host, port,
                     SERVICES_PATH)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
