"""Workload certificates kept as files (proxyless gRPC): the node agent's job, done by the cluster's control plane.

Proxyless gRPC reads its identity from files (gRPC's ``file_watcher`` certificate provider re-reads them every
``refresh_interval``): ``cert.pem`` (leaf + intermediate), ``key.pem`` (0600) and ``ca.pem`` (the trust bundle).
In Istio the node agent writes them; in a local run the runner registers each such directory in the cluster's
``certfiles.json`` and the control plane keeps them current: at two thirds of the leaf's lifetime, and at once
when its CA directory changes (root rotation: the bundle gains or loses a root, the intermediate is re-issued).

``certfiles.json``: ``[{"dir": ..., "spiffe_id": ..., "refresh_s": ...}, ...]``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from federation.files import write_atomic
from federation.trust.bundle import TrustBundle, fingerprint, load_pem_certs
from federation.trust.ca import IntermediateCA, issue_workload
from federation.trust.errors import TrustError
from federation.trust.spiffe import SpiffeId
from gateway.sds import bundle_pem

log = logging.getLogger("meshfed.certfiles")

CERT, KEY, CA = "cert.pem", "key.pem", "ca.pem"
DEFAULT_TTL = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class CertFileReport:
    """What one directory holds (a row of a control plane's ``/status`` ``rotation.files``)."""

    dir: str = ""
    spiffe_id: str = ""
    leaf_fingerprint: str | None = None
    leaf_root: str | None = None  # the bundle root the leaf chains to
    bundle_roots: tuple[str, ...] = ()
    written_at: str | None = None  # ISO 8601; None (and left out of the JSON, with refresh_s): never written
    refresh_s: float | None = None
    settled: bool = False  # gRPC has had a refresh interval to read the last write

    def json_omitted(self) -> tuple[str, ...]:
        return ("written_at", "refresh_s") if self.written_at is None else ()


@dataclass(frozen=True, slots=True)
class Spec:
    dir: Path
    spiffe_id: str
    refresh_s: float


def _write(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o600, durable=False)


def write_files(spec: Spec, ca: IntermediateCA, bundle: TrustBundle, *, ttl: timedelta = DEFAULT_TTL) -> None:
    """Issue a leaf for ``spec.spiffe_id`` and write key, chain and bundle (0600 files in a 0700 directory)."""
    spec.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(spec.dir, 0o700)
    key_pem, chain = issue_workload(ca, SpiffeId.parse(spec.spiffe_id), ttl=ttl)
    _write(spec.dir / KEY, key_pem)
    _write(spec.dir / CERT, b"".join(chain))
    _write(spec.dir / CA, bundle_pem(bundle).encode())


def register(registry: Path, spec: Spec) -> None:
    """Add (or replace) ``spec`` in the registry file (what the runner calls)."""
    specs = [s for s in load(registry) if s.dir != spec.dir]
    specs.append(spec)
    doc = [{"dir": str(s.dir), "spiffe_id": s.spiffe_id, "refresh_s": s.refresh_s} for s in specs]
    write_atomic(registry, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600, durable=False)


def load(registry: Path | None) -> list[Spec]:
    if registry is None or not registry.exists():
        return []
    try:
        doc = json.loads(registry.read_text())
        return [Spec(dir=Path(d["dir"]), spiffe_id=str(d["spiffe_id"]), refresh_s=float(d.get("refresh_s", 600)))
                for d in doc]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("certificate file registry unreadable path=%s error=%s; keeping the previous one", registry, exc)
        raise ValueError(str(exc)) from exc


@dataclass(slots=True)
class _State:
    leaf_fingerprint: str
    intermediate_fingerprint: str
    bundle_fingerprints: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    written_at: datetime
    chain: tuple[x509.Certificate, ...]


def _read_state(spec: Spec) -> _State | None:
    try:
        chain = load_pem_certs((spec.dir / CERT).read_bytes(), what=str(spec.dir / CERT))
        roots = load_pem_certs((spec.dir / CA).read_bytes(), what=str(spec.dir / CA))
        written = datetime.fromtimestamp((spec.dir / CERT).stat().st_mtime, UTC)
    except (OSError, TrustError):
        return None
    return _State(fingerprint(chain[0]), fingerprint(chain[1]) if len(chain) > 1 else "",
                  tuple(fingerprint(r) for r in roots), chain[0].not_valid_before_utc, chain[0].not_valid_after_utc,
                  written, tuple(chain))


class CertFiles:
    """The registered directories and what each holds; :meth:`refresh` rewrites what is stale (blocking IO: call
    it from a worker thread)."""

    def __init__(self, registry: Path | None, *, ttl: timedelta = DEFAULT_TTL) -> None:
        self.registry = registry
        self.ttl = ttl
        self._mtime = -1.0
        self._specs: list[Spec] = []
        self._states: dict[Path, _State] = {}

    def _reload(self) -> None:
        if self.registry is None:
            return
        try:
            mtime = self.registry.stat().st_mtime
        except OSError:
            return
        if mtime == self._mtime:
            return
        try:
            self._specs = load(self.registry)
        except ValueError:
            return
        self._mtime = mtime

    def refresh(self, ca: IntermediateCA, bundle: TrustBundle, *, now: datetime | None = None) -> int:
        """Rewrite every directory whose leaf is not from ``ca``, whose bundle is not ``bundle``, or whose leaf is
        past two thirds of its life; returns how many were rewritten."""
        self._reload()
        now = now or datetime.now(UTC)
        rewritten = 0
        for spec in self._specs:
            st = self._states.get(spec.dir) or _read_state(spec)
            due = st is None or now >= st.not_before + (st.not_after - st.not_before) * 2 / 3
            if st is not None and not due and st.intermediate_fingerprint == ca.fingerprint \
                    and st.bundle_fingerprints == bundle.fingerprints:
                self._states[spec.dir] = st
                continue
            try:
                write_files(spec, ca, bundle, ttl=self.ttl)
            except (OSError, TrustError, ValueError) as exc:
                log.error("workload certificate files not renewed dir=%s error=%s; retrying", spec.dir, exc)
                continue
            fresh = _read_state(spec)
            if fresh is not None:
                self._states[spec.dir] = fresh
            rewritten += 1
            log.info("workload certificate files renewed dir=%s spiffe_id=%s intermediate=%s", spec.dir,
                     spec.spiffe_id, ca.fingerprint[:16])
        return rewritten

    def report(self, bundle: TrustBundle, *, now: datetime | None = None) -> list[CertFileReport]:
        """What each directory holds (for rotation convergence): its leaf's root, its bundle, and whether gRPC has
        had a refresh interval to read the last write (``settled``)."""
        now = now or datetime.now(UTC)
        out: list[CertFileReport] = []
        for spec in self._specs:
            st = self._states.get(spec.dir)
            if st is None:
                out.append(CertFileReport(dir=str(spec.dir), spiffe_id=spec.spiffe_id))
                continue
            root = bundle.issuing_root(st.chain)  # from what was last read or written: no file IO here
            out.append(CertFileReport(
                dir=str(spec.dir), spiffe_id=spec.spiffe_id, leaf_fingerprint=st.leaf_fingerprint, leaf_root=root,
                bundle_roots=tuple(st.bundle_fingerprints), written_at=st.written_at.isoformat(),
                refresh_s=spec.refresh_s, settled=(now - st.written_at).total_seconds() > spec.refresh_s + 1.0))
        return out
