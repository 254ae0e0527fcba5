"""The federation service's own TLS credentials, following its CA directory live (the IO edge).

The service serves a leaf for ``spiffe://<td>/meshfed/federation`` issued by the intermediate in its CA directory,
and verifies clients against the directory's bundle (``root-cert.pem``). Root rotation changes both files while it
runs: ``add-root`` widens the bundle (clients re-issued under the new root must be accepted), ``reissue`` replaces
the intermediate (the served leaf must move under the new root before the old one is retired), ``retire-root``
narrows the bundle. :class:`ServingCredentials` re-reads the directory when any of its files changes (and renews
the leaf at half its lifetime), builds a fresh server context and swaps it in for new connections through
:class:`federation.trust.tls.SwappableServerContext`: no restart, no connection dropped.

:meth:`ServingCredentials.info` is what ``GET /v1/trust/status`` reports about it (fingerprints, by which root).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from federation.trust.bundle import TrustBundle, fingerprint, load_pem_certs
from federation.trust.ca import IntermediateCA, issue_workload
from federation.trust.errors import CAStoreError, TrustError
from federation.trust.spiffe import SpiffeId
from federation.trust.store import BUNDLE_JSON, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, load_bundle, load_cluster_ca
from federation.trust.tls import SwappableServerContext

log = logging.getLogger("meshfed.federation.service")

_WATCHED = (CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, BUNDLE_JSON)


def dir_signature(path: Path, names: tuple[str, ...] = _WATCHED) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime_ns, size) of each watched file: changes when any of them is rewritten."""
    out = []
    for name in names:
        try:
            st = (path / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, 0, 0))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Issued:
    chain_pem: bytes
    leaf_fingerprint: str
    intermediate_fingerprint: str
    root_fingerprint: str | None
    not_after: datetime
    issued_at: datetime


class ServingCredentials:
    """The service's leaf and trust bundle, reloaded from ``ca_dir`` on change (see the module docstring)."""

    def __init__(self, ca_dir: Path, *, leaf_ttl: timedelta = timedelta(hours=24)) -> None:
        self.ca_dir = ca_dir
        self.leaf_ttl = leaf_ttl
        self._sig = dir_signature(ca_dir)
        self._ca, self._bundle = self._load()
        self.identity = SpiffeId.federation(self._bundle.trust_domain)
        if self._ca.authority != self.identity:
            raise CAStoreError(f"{ca_dir}: holds the CA of {self._ca.authority}, not of the federation service "
                               f"({self.identity}); create it with 'meshfed ca' for the federation authority")
        issued, key_pem = self._issue()
        self._issued = issued
        self._key_pem = key_pem
        self.tls = SwappableServerContext(issued.chain_pem, key_pem, self._bundle)
        self.reloads = 0

    @property
    def context(self) -> ssl.SSLContext:
        """The context to listen with (its handshakes move onto the current credentials)."""
        return self.tls.context

    def bundle(self) -> TrustBundle:
        """The bundle clients are verified against now."""
        return self._bundle

    def identity_pem(self) -> tuple[bytes, bytes]:
        """(chain, key) PEM of the certificate served now: the peering listener serves it too, and presents it to
        peer federations (``reloads`` moves when it changes)."""
        return self._issued.chain_pem, self._key_pem

    def _load(self) -> tuple[IntermediateCA, TrustBundle]:
        return load_cluster_ca(self.ca_dir), load_bundle(self.ca_dir)

    def _issue(self) -> tuple[_Issued, bytes]:
        key_pem, chain = issue_workload(self._ca, self.identity, ttl=self.leaf_ttl)
        chain_pem = b"".join(chain)
        leaf = load_pem_certs(chain[0], what="federation serving certificate")[0]
        now = datetime.now(UTC)
        return _Issued(chain_pem=chain_pem, leaf_fingerprint=fingerprint(leaf),
                       intermediate_fingerprint=self._ca.fingerprint,
                       root_fingerprint=self._bundle.issuing_root(load_pem_certs(chain_pem, what="serving chain")),
                       not_after=leaf.not_valid_after_utc, issued_at=now), key_pem

    def poll(self, *, now: datetime | None = None) -> bool:
        """Reload if the directory changed or the leaf is past half its life; True if the credentials changed.
        A directory caught half-written (or broken) keeps the credentials in force and is retried next time."""
        now = now or datetime.now(UTC)
        sig = dir_signature(self.ca_dir)
        due = now >= self._issued.issued_at + (self._issued.not_after - self._issued.issued_at) / 2
        if sig == self._sig and not due:
            return False
        try:
            ca, bundle = self._load()
            if ca.authority != self.identity:
                raise CAStoreError(f"{self.ca_dir}: now holds the CA of {ca.authority}, not {self.identity}")
            old_ca, old_bundle = self._ca, self._bundle
            self._ca, self._bundle = ca, bundle
            try:
                issued, key_pem = self._issue()
                self.tls.replace(issued.chain_pem, key_pem, bundle)
            except BaseException:
                self._ca, self._bundle = old_ca, old_bundle
                raise
        except (TrustError, ssl.SSLError, OSError, ValueError) as exc:
            log.warning("serving credentials reload failed dir=%s error=%s; keeping those in force", self.ca_dir, exc)
            return False
        self._sig = sig
        self._issued = issued
        self._key_pem = key_pem
        self.reloads += 1
        log.info("event=serving_credentials_reloaded dir=%s intermediate=%s root=%s roots_trusted=%s leaf=%s",
                 self.ca_dir, issued.intermediate_fingerprint[:16], (issued.root_fingerprint or "?")[:16],
                 ",".join(f[:16] for f in bundle.fingerprints), issued.leaf_fingerprint[:16])
        return True

    async def run(self, *, interval_s: float = 2.0) -> None:
        """Poll forever (off the event loop: reading and signing touch files and keys)."""
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.poll)

    def info(self) -> dict[str, Any]:
        i = self._issued
        return {
            "spiffe_id": str(self.identity),
            "leaf_fingerprint": i.leaf_fingerprint,
            "intermediate_fingerprint": i.intermediate_fingerprint,
            "root_fingerprint": i.root_fingerprint,
            "not_after": i.not_after.isoformat(),
            "issued_at": i.issued_at.isoformat(),
            "bundle_fingerprints": list(self._bundle.fingerprints),
            "bundle_sequence": self._bundle.sequence,
            "reloads": self.reloads,
        }
