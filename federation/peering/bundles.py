"""Peer bundles: decoding a fetched SPIFFE bundle (hostile input), fetching it from a bundle endpoint, and keeping
the last good one on disk.

Fetching (``fetch_bundle``) follows the SPIFFE Federation profiles:

- ``https_spiffe``: the endpoint must present an X509-SVID for the configured ``endpointSpiffeId``, verified against
  the bundle last trusted for the peer's trust domain (the bootstrap bundle before the first fetch) and nothing
  else: the TLS context holds only those roots, never the system store. A certificate that chains to a root the
  peer never had fails the handshake: :class:`BundleRefused`.
- ``https_web``: ordinary web PKI with host name checking (the system store, or ``caFile``).

Redirects are not followed (the configured URL is used for every refresh). A body over ``max_bytes``, not JSON, or
not a valid bundle is refused with a message naming the field (``keys[0].x5c[0]``, ``spiffe_sequence``).

On disk (``BundleStore``), one directory per peer trust domain, 0700, files 0600, written atomically::

    <state-dir>/<trust-domain>/bundle.json    the last good bundle (SPIFFE JWKS)
    <state-dir>/<trust-domain>/meta.json      peer name, when fetched, which root the endpoint chained to
    <state-dir>/<trust-domain>/services.json  the services the peer last offered (wire JSON)

The crypto and file work here is blocking: callers run it on a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509

from discovery.clusterset import BundleProfile, PeerDecl
from federation import wire
from federation.client import VerifyingConnector
from federation.files import write_atomic
from federation.peering.records import BundleRefused, PeerUnreachable
from federation.trust.bundle import TrustBundle
from federation.trust.ca import spiffe_id_of
from federation.trust.errors import BundleError, InvalidSpiffeId, TrustError
from federation.trust.spiffe import TrustDomain
from federation.trust.tls import peer_chain_der

log = logging.getLogger("meshfed.federation.peering")

MAX_BUNDLE_BYTES = 1024 * 1024
MAX_KEYS = 64


# ---- decoding ---------------------------------------------------------------------------------------------------


def decode_bundle(raw: bytes, trust_domain: TrustDomain, *, peer: str = "") -> TrustBundle:
    """A fetched bundle body as the bundle of ``trust_domain`` (the JWKS itself names no trust domain: it is the one
    the peer was declared with). Every failure is a :class:`BundleRefused` naming the field."""
    try:
        doc = wire.loads(raw)
    except wire.WireError as exc:
        raise BundleRefused(exc.reason, peer=peer, field=exc.field) from exc
    if not isinstance(doc, dict):
        raise BundleRefused("a SPIFFE bundle is a JSON object", peer=peer, field=None)
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise BundleRefused("is required: a list of JWKs", peer=peer, field="keys")
    if len(keys) > MAX_KEYS:
        raise BundleRefused(f"has {len(keys)} keys, more than {MAX_KEYS}", peer=peer, field="keys")
    for name, low in (("spiffe_sequence", 0), ("spiffe_refresh_hint", 1)):
        value = doc.get(name)
        if value is None:
            continue
        if isinstance(value, wire.Unrepresentable):
            raise BundleRefused(f"{value!r} is out of range", peer=peer, field=name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BundleRefused(f"must be an integer, got {json.dumps(value)[:40]}", peer=peer, field=name)
        if not low <= value < 2**63:
            raise BundleRefused(f"{value} is out of range (at least {low})", peer=peer, field=name)
    for i, key in enumerate(keys):
        if isinstance(key, dict) and key.get("use") == "x509-svid":
            for fname in ("kty", "crv", "x", "y", "n", "e"):
                v = key.get(fname)
                if v is not None and not isinstance(v, str):
                    raise BundleRefused("must be a string", peer=peer, field=f"keys[{i}].{fname}")
    try:
        bundle = TrustBundle.from_jwks(trust_domain, doc, what="bundle")
    except (BundleError, ValueError, TypeError) as exc:
        message = str(exc).removeprefix("bundle: ")
        field = message.split(" ", 1)[0] if message.startswith("keys[") else None
        raise BundleRefused(message, peer=peer, field=field) from exc
    return bundle


def read_bootstrap(path: Path, trust_domain: TrustDomain, *, peer: str = "") -> TrustBundle:
    """A bootstrap bundle file: SPIFFE JWKS (``bundle.json``) or PEM roots."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleRefused(f"bootstrap bundle {path}: cannot read: {exc.strerror or exc}", peer=peer) from exc
    if data.lstrip().startswith(b"{"):
        try:
            return decode_bundle(data, trust_domain, peer=peer)
        except BundleRefused as exc:
            raise BundleRefused(f"bootstrap bundle {path}: {exc.field + ': ' if exc.field else ''}{exc.reason}",
                                peer=peer) from exc
    try:
        return TrustBundle.from_pem(trust_domain, data, sequence=0, what=f"bootstrap bundle {path}")
    except BundleError as exc:
        raise BundleRefused(str(exc), peer=peer) from exc


def expiry(bundle: TrustBundle, fetched_at: datetime, max_age: timedelta) -> datetime:
    """When a fetched bundle stops being delivered: ``max_age`` after the fetch, or when its last root expires."""
    return min(fetched_at + max_age, max(r.not_valid_after_utc for r in bundle.roots))


# ---- fetching ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetched:
    bundle: TrustBundle
    endpoint_root: str  # fingerprint of the trusted root the endpoint's certificate chained to ("" for https_web)


def client_context(peer: PeerDecl, trusted: TrustBundle | None) -> ssl.SSLContext:
    """The TLS context to reach ``peer``'s bundle endpoint with (see the module docstring)."""
    if peer.profile is BundleProfile.HTTPS_WEB:
        return ssl.create_default_context(cafile=str(peer.ca_file) if peer.ca_file else None)
    if trusted is None:
        raise BundleRefused("no bundle is trusted for its trust domain yet (bootstrapBundle)", peer=peer.name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the identity is the SVID's URI SAN, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=trusted.to_pem().decode())
    return ctx


def check_endpoint(peer: PeerDecl, trusted: TrustBundle, chain_der: list[bytes]) -> str:
    """The endpoint's certificate (already verified by the handshake against ``trusted``) must be an SVID for the
    configured SPIFFE ID; returns the fingerprint of the trusted root it chains to."""
    certs = [x509.load_der_x509_certificate(der) for der in chain_der]
    try:
        sid = spiffe_id_of(certs[0], what="the bundle endpoint's certificate")
    except InvalidSpiffeId as exc:
        raise BundleRefused(f"the bundle endpoint's certificate is not an X509-SVID: {exc}", peer=peer.name) from exc
    if str(sid) != peer.endpoint_spiffe_id:
        raise BundleRefused(f"the bundle endpoint presented {sid}, not the configured {peer.endpoint_spiffe_id}",
                            peer=peer.name)
    return trusted.issuing_root(certs) or ""


async def fetch_bundle(peer: PeerDecl, trusted: TrustBundle | None, *, timeout_s: float = 10.0,
                       max_bytes: int = MAX_BUNDLE_BYTES) -> Fetched:
    """GET the peer's bundle endpoint and decode the answer (see the module docstring for what is refused)."""
    td = TrustDomain(peer.trust_domain)
    ctx = await asyncio.to_thread(client_context, peer, trusted)
    roots: list[str] = []

    def check(ssl_object: Any) -> None:
        if peer.profile is BundleProfile.HTTPS_SPIFFE:
            assert trusted is not None
            roots.append(check_endpoint(peer, trusted, peer_chain_der(ssl_object)))

    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(5.0, timeout_s))
    connector = VerifyingConnector(check=check, ssl=ctx, limit=1, force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
                session.get(peer.bundle_endpoint, allow_redirects=False,
                            headers={"Accept": "application/json"}) as resp:
            if 300 <= resp.status < 400:
                raise BundleRefused(f"the bundle endpoint answered HTTP {resp.status} (a redirect to "
                                    f"{resp.headers.get('Location', '?')}); redirects are not followed",
                                    peer=peer.name)
            if resp.status >= 500:
                raise PeerUnreachable(f"the bundle endpoint answered HTTP {resp.status}", peer=peer.name)
            if resp.status != 200:
                raise BundleRefused(f"the bundle endpoint answered HTTP {resp.status}", peer=peer.name)
            raw = await read_limited(resp, max_bytes)
            if raw is None:
                raise BundleRefused(f"the bundle is larger than {max_bytes} bytes", peer=peer.name)
    except aiohttp.ClientConnectorCertificateError as exc:
        pinned = ", ".join(f[:16] for f in trusted.fingerprints) if trusted else "system store"
        raise BundleRefused(f"the bundle endpoint's certificate does not verify against the bundle trusted for "
                            f"{peer.trust_domain} (roots {pinned}): {exc.certificate_error}", peer=peer.name) from exc
    except aiohttp.ClientSSLError as exc:
        raise BundleRefused(f"TLS with the bundle endpoint failed: {exc}", peer=peer.name) from exc
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise PeerUnreachable(f"{peer.bundle_endpoint}: {type(exc).__name__}: {exc}", peer=peer.name) from exc
    bundle = await asyncio.to_thread(decode_bundle, raw, td, peer=peer.name)
    return Fetched(bundle=bundle, endpoint_root=roots[0] if roots else "")


async def read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None once it grows past ``limit`` bytes (read no further)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the store on disk ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    """What the federation holds for one peer trust domain."""

    bundle: TrustBundle
    source: str  # "fetched" | "bootstrap"
    fetched_at: datetime | None = None
    endpoint_root: str = ""


class BundleStore:
    """Last good bundles (and offered services) per peer trust domain under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, td: str) -> Path:
        TrustDomain(td)  # validated: the name becomes a directory
        return self.root / td

    def _write(self, path: Path, data: bytes) -> None:
        for d in (self.root, path.parent):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        write_atomic(path, data, mode=0o600, durable=True)

    def save(self, peer: str, held: Held) -> None:
        d = self._dir(held.bundle.trust_domain.name)
        self._write(d / "bundle.json", held.bundle.to_jwks_json())
        meta = {"peer": peer, "trustDomain": held.bundle.trust_domain.name, "source": held.source,
                "fetchedAt": held.fetched_at.isoformat() if held.fetched_at else None,
                "endpointRoot": held.endpoint_root, "sequence": held.bundle.sequence}
        self._write(d / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())

    def load(self, td: str) -> Held | None:
        """The stored bundle of ``td``, or None (none stored, or unreadable: logged, then as if none)."""
        d = self._dir(td)
        if not (d / "bundle.json").exists():
            return None
        try:
            bundle = decode_bundle((d / "bundle.json").read_bytes(), TrustDomain(td))
            meta = json.loads((d / "meta.json").read_text())
            fetched = datetime.fromisoformat(meta["fetchedAt"]) if meta.get("fetchedAt") else None
            return Held(bundle=bundle, source=str(meta.get("source", "fetched")), fetched_at=fetched,
                        endpoint_root=str(meta.get("endpointRoot", "")))
        except (OSError, ValueError, KeyError, TypeError, TrustError) as exc:
            log.warning("event=peer_bundle_unreadable dir=%s error=%s; starting from the bootstrap bundle", d, exc)
            return None

    def save_services(self, td: str, body: Mapping[str, Any]) -> None:
        self._write(self._dir(td) / "services.json", json.dumps(body, separators=(",", ":")).encode())

    def load_services(self, td: str) -> Any:
        path = self._dir(td) / "services.json"
        try:
            return wire.loads(path.read_bytes())
        except (OSError, wire.WireError):
            return None

    def remove(self, td: str) -> None:
        d = self._dir(td)
        for name in ("bundle.json", "meta.json", "services.json"):
            (d / name).unlink(missing_ok=True)
        try:
            d.rmdir()
        except OSError:
            pass
