"""SDS glue: issuing each authenticated proxy identity its workload certificate, and rotating it before expiry.

The ADS server authenticates every stream (gateway.auth) and records the identity per node in the SnapshotCache.
The control plane calls ``WorkloadCertIssuer.ensure(identity)`` for that authenticated identity (never for one a
node merely claims); the issuer signs a fresh P-256 key for ``spiffe://<td>/ns/<ns>/sa/<sa>`` with this
cluster's intermediate (``federation.trust.issue_workload``) and keeps it. ``certs()`` is what the generators read
(``PushContext.workload_certs``, keyed by SPIFFE ID); the sds generator turns it into the ``default`` secret and
the trust bundle into ``ROOTCA``.

Rotation: a certificate is re-issued once ``rotate_fraction`` (default 0.8) of its lifetime has passed. Run the
issuer as an async context manager and its timer sleeps until the next certificate is due, re-issues every due
one and calls ``on_rotate(identities)``; the control plane then submits a PushRequest for the proxies of those
identities, so each gets its new ``default`` secret over SDS (a snapshot change like any other) well before the
old one expires. ``reissue_all()`` (after the intermediate itself rotated) re-issues everything at once.

Errors: ``SdsError`` (an ``XdsError``) wraps the trust package's errors, naming the identity.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from federation.clock import utcnow
from federation.trust import IntermediateCA, SpiffeId, TrustBundle, TrustError, issue_workload
from gateway.auth import ProxyIdentity
from gateway.background import BackgroundTask
from gateway.context import WorkloadCert
from gateway.snapshot import XdsError

log = logging.getLogger("meshfed.xds.sds")

#: Secret names, as Istio names them: the proxy's own certificate and the validation context (trust bundle).
CERT_SECRET = "default"
ROOT_SECRET = "ROOTCA"

class SdsError(XdsError):
    """A workload certificate could not be issued (the message names the identity and the cause)."""


@dataclass(frozen=True)
class IssuedCert:
    """One identity's current certificate and when to replace it."""

    identity: ProxyIdentity
    spiffe_id: str
    cert: WorkloadCert
    issued_at: datetime
    not_after: datetime
    rotate_at: datetime


def bundle_pem(bundle: TrustBundle) -> str:
    """The trust bundle's roots as concatenated PEM (what the ROOTCA secret's ``trusted_ca`` holds)."""
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in bundle.roots)


class WorkloadCertIssuer(BackgroundTask):
    """Certificates for authenticated proxy identities, re-issued at ``rotate_fraction`` of their lifetime."""

    task_name = "sds-rotation"

    def __init__(self, *, ca: IntermediateCA, ttl: timedelta = timedelta(hours=24), rotate_fraction: float = 0.8,
                 on_rotate: Callable[[frozenset[ProxyIdentity]], None] | None = None,
                 clock: Callable[[], datetime] = utcnow, max_sleep: float = 60.0) -> None:
        if not 0.0 < rotate_fraction < 1.0:
            raise ValueError(f"rotate_fraction must be between 0 and 1, got {rotate_fraction}")
        if ttl <= timedelta(0):
            raise ValueError(f"workload certificate TTL must be positive, got {ttl}")
        self.ca = ca
        self.trust_domain = ca.trust_domain
        self.ttl = ttl
        self.rotate_fraction = rotate_fraction
        self.on_rotate = on_rotate
        self._clock = clock
        self._max_sleep = max_sleep
        self._issued: dict[ProxyIdentity, IssuedCert] = {}
        self._changed = asyncio.Event()
        self.rotations = 0

    def spiffe_id(self, identity: ProxyIdentity) -> str:
        return str(SpiffeId.workload(self.trust_domain, identity.namespace, identity.service_account))

    def _issue(self, identity: ProxyIdentity, now: datetime) -> IssuedCert:
        sid = SpiffeId.workload(self.trust_domain, identity.namespace, identity.service_account)
        try:
            key_pem, chain = issue_workload(self.ca, sid, ttl=self.ttl, now=now)
        except TrustError as exc:
            raise SdsError(f"cannot issue a workload certificate for {sid}: {exc}") from exc
        leaf = x509.load_pem_x509_certificate(chain[0])
        not_after = leaf.not_valid_after_utc
        rotate_at = now + (not_after - now) * self.rotate_fraction
        issued = IssuedCert(identity=identity, spiffe_id=str(sid),
                            cert=WorkloadCert(key_pem=key_pem.decode(), chain_pem=b"".join(chain).decode()),
                            issued_at=now, not_after=not_after, rotate_at=rotate_at)
        self._issued[identity] = issued
        self._changed.set()
        log.info("issued workload cert spiffe_id=%s not_after=%s rotate_at=%s", sid, not_after.isoformat(),
                 rotate_at.isoformat())
        return issued

    def ensure(self, identity: ProxyIdentity) -> WorkloadCert:
        """The identity's current certificate, issued now if it has none or its is due for rotation."""
        now = self._clock()
        current = self._issued.get(identity)
        if current is None or now >= current.rotate_at:
            current = self._issue(identity, now)
        return current.cert

    def forget(self, identity: ProxyIdentity) -> None:
        """Stop keeping (and rotating) a certificate for an identity with no proxy left."""
        self._issued.pop(identity, None)

    def issued(self, identity: ProxyIdentity) -> IssuedCert | None:
        return self._issued.get(identity)

    def certs(self) -> Mapping[str, WorkloadCert]:
        """SPIFFE ID -> certificate, for ``PushContext.workload_certs``."""
        return MappingProxyType({i.spiffe_id: i.cert for i in self._issued.values()})

    def next_due(self) -> datetime | None:
        return min((i.rotate_at for i in self._issued.values()), default=None)

    def rotate_due(self, now: datetime | None = None) -> frozenset[ProxyIdentity]:
        """Re-issue every certificate due at ``now``; returns the identities rotated (pure of timers)."""
        now = now or self._clock()
        due = [i.identity for i in self._issued.values() if now >= i.rotate_at]
        for identity in due:
            self._issue(identity, now)
        return frozenset(due)

    def reissue_all(self, *, ca: IntermediateCA | None = None) -> frozenset[ProxyIdentity]:
        """Re-issue everything now (e.g. with a new intermediate ``ca``); notifies ``on_rotate``."""
        if ca is not None:
            self.ca = ca
            self.trust_domain = ca.trust_domain
        now = self._clock()
        identities = frozenset(self._issued)
        for identity in identities:
            self._issue(identity, now)
        self._notify(identities)
        return identities

    def _notify(self, identities: frozenset[ProxyIdentity]) -> None:
        if identities:
            self.rotations += 1
            if self.on_rotate is not None:
                self.on_rotate(identities)

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            due = self.next_due()
            wait = self._max_sleep if due is None else (due - self._clock()).total_seconds()
            if wait > 0:
                try:  # wake early when a new certificate (possibly due sooner) is issued
                    await asyncio.wait_for(self._changed.wait(), min(wait, self._max_sleep))
                    continue
                except TimeoutError:
                    pass
            try:
                rotated = self.rotate_due()
            except SdsError:
                log.exception("workload certificate rotation failed; retrying")
                await asyncio.sleep(min(5.0, self._max_sleep))
                continue
            if rotated:
                log.info("rotated workload certs count=%d", len(rotated))
            self._notify(rotated)



def identities_of(nodes: Iterable[str], identity_of: Callable[[str], ProxyIdentity | None],
                  wanted: frozenset[ProxyIdentity]) -> frozenset[str]:
    """The node ids (of ``nodes``) whose authenticated identity is in ``wanted`` (to target a push after rotation)."""
    return frozenset(n for n in nodes if identity_of(n) in wanted)
