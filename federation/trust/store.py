"""CA directories on disk (the IO edge of the trust package).

Root directory (kept offline)::

    state.json            trust domain, trusted roots, active root, bundle sequence, issued intermediates
    roots/<fp16>.cert.pem every root ever made here, by SHA-256 fingerprint prefix
    roots/<fp16>.key.pem  its key (0600)
    root-cert.pem         the active (signing) root
    root-key.pem          its key (0600)
    bundle.pem            every trusted root (what peers must trust)
    bundle.json           the same as a SPIFFE trust domain bundle (JWKS)

Cluster directory (Istio's plug-in CA layout)::

    ca-cert.pem      the cluster's intermediate
    ca-key.pem       its key (0600)
    cert-chain.pem   intermediate + the root that signed it
    root-cert.pem    every trusted root (the bundle as PEM)
    bundle.json      the bundle as SPIFFE JWKS

Every file is written atomically (temporary file, fsync, rename); keys are created 0600 and refused on load
when group- or world-readable.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from federation.clock import utcnow
from federation.files import write_atomic
from federation.trust.bundle import TrustBundle, load_pem_certs
from federation.trust.ca import (
    DEFAULT_INTERMEDIATE_DAYS,
    DEFAULT_MAX_TTL,
    DEFAULT_ROOT_DAYS,
    CertInfo,
    IntermediateCA,
    KeyType,
    RootCA,
    create_intermediate,
    create_root,
    load_private_key,
    private_key_pem,
    spiffe_id_of,
)
from federation.trust.errors import BundleError, CAStoreError, InvalidSpiffeId, RotationError
from federation.trust.rotation import NEXT_STEP, IntermediateRecord, Phase, RootState
from federation.trust.spiffe import SpiffeId, TrustDomain

log = logging.getLogger("meshfed.trust")

STATE = "state.json"
ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
BUNDLE_PEM = "bundle.pem"
BUNDLE_JSON = "bundle.json"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"


# -- files ------------------------------------------------------------------------------------------------------------


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` atomically and durably; 0600 when ``private`` (the temporary file is created 0600 from the
    start), and then its directory is made 0700 too (a key lives only where others cannot enter)."""
    try:
        write_atomic(path, data, mode=0o600 if private else 0o644, durable=True)
        if private:
            os.chmod(path.parent, 0o700)
    except OSError as exc:
        raise CAStoreError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def read_file(path: Path, *, private: bool = False) -> bytes:
    try:
        if private:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise CAStoreError(f"{path}: key file is readable by others (mode {mode:04o}); chmod 600 it")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CAStoreError(f"{path}: missing") from exc
    except OSError as exc:
        raise CAStoreError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _cert(path: Path) -> x509.Certificate:
    try:
        return load_pem_certs(read_file(path), what=str(path))[0]
    except BundleError as exc:
        raise CAStoreError(str(exc)) from exc


def _certs(path: Path) -> list[x509.Certificate]:
    try:
        return load_pem_certs(read_file(path), what=str(path))
    except BundleError as exc:
        raise CAStoreError(str(exc)) from exc


# -- root directory ---------------------------------------------------------------------------------------------------


@dataclass
class RootDir:
    """A loaded root directory: its state, every root it holds (with keys) and the current bundle."""

    path: Path
    state: RootState
    roots: dict[str, RootCA] = field(default_factory=dict)

    @property
    def active(self) -> RootCA:
        return self.roots[self.state.active]

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle(
            self.state.trust_domain, tuple(self.roots[fp].cert for fp in self.state.trusted), self.state.sequence
        )

    def root_files(self, fp: str) -> tuple[Path, Path]:
        return self.path / "roots" / f"{fp[:16]}.cert.pem", self.path / "roots" / f"{fp[:16]}.key.pem"


def _save_root(path: Path, root: RootCA) -> None:
    cert_path = path / "roots" / f"{root.fingerprint[:16]}.cert.pem"
    key_path = path / "roots" / f"{root.fingerprint[:16]}.key.pem"
    write_file(key_path, root.key_pem, private=True)
    write_file(cert_path, root.cert_pem)


def _publish_root_dir(rd: RootDir) -> None:
    """Everything derived from the state: active root copies and the bundle files."""
    write_file(rd.path / ROOT_KEY, rd.active.key_pem, private=True)
    write_file(rd.path / ROOT_CERT, rd.active.cert_pem)
    bundle = rd.bundle
    write_file(rd.path / BUNDLE_PEM, bundle.to_pem())
    write_file(rd.path / BUNDLE_JSON, bundle.to_jwks_json())


def init_root(
    out: Path,
    trust_domain: TrustDomain,
    *,
    key_type: KeyType = "ec",
    days: int = DEFAULT_ROOT_DAYS,
    max_leaf_ttl: timedelta = DEFAULT_MAX_TTL,
    now: datetime | None = None,
) -> tuple[RootDir, bool]:
    """Create a root directory; ``(dir, False)`` without touching anything if it already holds this trust domain."""
    if (out / STATE).exists():
        rd = load_root(out)
        if rd.state.trust_domain != trust_domain:
            raise CAStoreError(
                f"{out}: already holds a root for trust domain {rd.state.trust_domain}, not {trust_domain}"
            )
        return rd, False
    if out.exists() and any(out.iterdir()):
        raise CAStoreError(f"{out}: exists and is not empty; choose an empty or new directory")
    root = create_root(trust_domain, key_type=key_type, days=days, now=now)
    state = RootState(trust_domain, root.fingerprint, (root.fingerprint,), 1, max_leaf_ttl)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    _save_root(out, root)
    write_file(out / STATE, state.to_json())
    rd = RootDir(out, state, {root.fingerprint: root})
    _publish_root_dir(rd)
    log.info("event=root_created trust_domain=%s fingerprint=%s dir=%s", trust_domain, root.fingerprint, out)
    return rd, True


def load_root(path: Path) -> RootDir:
    if not (path / STATE).exists():
        raise CAStoreError(f"{path}: not a meshfed root directory ({STATE} missing; create one with `meshfed ca init`)")
    state = RootState.from_json(read_file(path / STATE), what=str(path / STATE))
    rd = RootDir(path, state)
    for fp in {*state.trusted, state.active}:
        cert_path, key_path = rd.root_files(fp)
        cert_pem = read_file(cert_path)
        root = RootCA.from_pem(cert_pem, read_file(key_path, private=True), what=str(cert_path))
        if root.fingerprint != fp:
            raise CAStoreError(f"{cert_path}: fingerprint {root.fingerprint[:16]} does not match the state ({fp[:16]})")
        if root.trust_domain != state.trust_domain:
            raise CAStoreError(f"{cert_path}: root of {root.trust_domain}, state says {state.trust_domain}")
        rd.roots[fp] = root
    return rd


def _save_state(rd: RootDir, state: RootState) -> None:
    write_file(rd.path / STATE, state.to_json())
    rd.state = state


# -- cluster directories ----------------------------------------------------------------------------------------------


def write_cluster_dir(out: Path, ca: IntermediateCA, bundle: TrustBundle) -> None:
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)  # it holds the intermediate's key (0600 too), like the root directory
    write_file(out / CA_KEY, _key_pem(ca), private=True)
    write_file(out / CA_CERT, ca.cert_pem)
    write_file(out / CERT_CHAIN, ca.chain_pem)
    write_cluster_bundle(out, bundle)


def write_cluster_bundle(out: Path, bundle: TrustBundle) -> None:
    write_file(out / ROOT_CERT, bundle.to_pem())
    write_file(out / BUNDLE_JSON, bundle.to_jwks_json())


def _key_pem(ca: IntermediateCA) -> bytes:
    return private_key_pem(ca.key)


def load_cluster_ca(path: Path, *, max_ttl: timedelta = DEFAULT_MAX_TTL) -> IntermediateCA:
    """The signing CA of a cluster directory (parsed once; keep it and sign many times)."""
    cert = _cert(path / CA_CERT)
    key = load_private_key(read_file(path / CA_KEY, private=True), what=str(path / CA_KEY))
    chain = _certs(path / CERT_CHAIN)
    above = [c for c in chain if c != cert]
    return IntermediateCA(cert, key, chain=above, max_ttl=max_ttl, what=str(path))


def load_bundle(path: Path) -> TrustBundle:
    """The trust bundle of a root or cluster directory (sequence from bundle.json when present)."""
    if (path / STATE).exists():
        return load_root(path).bundle
    try:
        authority = spiffe_id_of(_cert(path / CA_CERT), what=str(path / CA_CERT))
    except InvalidSpiffeId as exc:
        raise CAStoreError(str(exc)) from exc
    seq = 1
    if (path / BUNDLE_JSON).exists():
        try:
            seq = TrustBundle.from_jwks(authority.trust_domain, read_file(path / BUNDLE_JSON), what=str(path)).sequence
        except BundleError as exc:
            raise CAStoreError(str(exc)) from exc
    try:
        return TrustBundle.from_pem(authority.trust_domain, read_file(path / ROOT_CERT), sequence=seq, what=str(path))
    except BundleError as exc:
        raise CAStoreError(str(exc)) from exc


def _chains_to(cert: x509.Certificate, roots: Iterable[RootCA]) -> RootCA | None:
    return next((root for root in roots if _issued_by(cert, root.cert)), None)


def _record(ca: IntermediateCA, root: RootCA, out: Path, now: datetime) -> IntermediateRecord:
    return IntermediateRecord(
        authority=str(ca.authority),
        fingerprint=ca.fingerprint,
        root_fingerprint=root.fingerprint,
        issued_at=now,
        not_after=ca.cert.not_valid_after_utc,
        dir=str(out.resolve()),
    )


def issue_intermediate(
    root_dir: Path,
    authority: SpiffeId,
    out: Path,
    *,
    days: int = DEFAULT_INTERMEDIATE_DAYS,
    now: datetime | None = None,
) -> tuple[IntermediateCA | None, bool]:
    """Write a cluster (or federation) CA into ``out``, signed by the active root.

    Re-running is safe: if ``out`` already holds a CA for this authority under the active root, nothing changes
    and ``(None, False)`` is returned. A CA of another authority, or one under an older root, is refused (use
    ``rotate reissue`` for the latter)."""
    now = now or utcnow()
    rd = load_root(root_dir)
    if authority.trust_domain != rd.state.trust_domain:
        raise CAStoreError(f"{authority} is not in the root's trust domain {rd.state.trust_domain}")
    if (out / CA_CERT).exists():
        existing = _cert(out / CA_CERT)
        try:
            have = spiffe_id_of(existing, what=str(out / CA_CERT))
        except InvalidSpiffeId as exc:
            raise CAStoreError(str(exc)) from exc
        if have != authority:
            raise CAStoreError(f"{out}: already holds the CA of {have}, not {authority}")
        under = _chains_to(existing, [rd.active])
        if under is None:
            raise CAStoreError(
                f"{out}: holds a CA for {authority} under another root; use `meshfed ca rotate reissue`"
            )
        write_cluster_bundle(out, rd.bundle)
        return None, False
    ca = create_intermediate(rd.active, authority, days=days, now=now, max_ttl=rd.state.max_leaf_ttl)
    write_cluster_dir(out, ca, rd.bundle)
    _save_state(rd, rd.state.with_intermediate(_record(ca, rd.active, out, now)))
    log.info("event=intermediate_created authority=%s fingerprint=%s dir=%s", authority, ca.fingerprint, out)
    return ca, True


# -- rotation ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    changed: bool
    phase: Phase
    messages: tuple[str, ...]


def _cluster_dirs(rd: RootDir, given: Sequence[Path] | None) -> list[Path]:
    if given:
        return list(given)
    return [Path(r.dir) for r in rd.state.intermediates if (Path(r.dir) / CA_CERT).exists()]


def rotate_add_root(
    root_dir: Path,
    *,
    key_type: KeyType = "ec",
    days: int = DEFAULT_ROOT_DAYS,
    cluster_dirs: Sequence[Path] | None = None,
    now: datetime | None = None,
) -> StepResult:
    """Phase 1: make a new root and trust old+new everywhere (the new root does not sign yet)."""
    now = now or utcnow()
    rd = load_root(root_dir)
    msgs: list[str] = []
    changed = False
    if len(rd.state.trusted) == 1:
        new = create_root(rd.state.trust_domain, key_type=key_type, days=days, now=now)
        _save_root(rd.path, new)
        rd.roots[new.fingerprint] = new
        state = RootState(
            rd.state.trust_domain,
            rd.state.active,
            (*rd.state.trusted, new.fingerprint),
            rd.state.sequence + 1,
            rd.state.max_leaf_ttl,
            rd.state.intermediates,
            rd.state.retired,
        )
        _save_state(rd, state)
        changed = True
        msgs.append(f"added root {new.fingerprint[:16]}; bundle now trusts {len(state.trusted)} roots")
        log.info("event=root_added fingerprint=%s sequence=%d", new.fingerprint, state.sequence)
    elif rd.state.next_root is not None:
        msgs.append(f"root {rd.state.next_root[:16]} already added; bundle files refreshed")
    else:
        raise RotationError(
            f"{root_dir}: a rotation is already past add-root (phase {rd.state.phase(now)}); finish it with "
            "`meshfed ca rotate retire-root` first"
        )
    _publish_root_dir(rd)
    for d in _cluster_dirs(rd, cluster_dirs):
        write_cluster_bundle(d, rd.bundle)
        msgs.append(f"{d}: root-cert.pem now holds the {len(rd.state.trusted)} trusted roots")
    return StepResult(changed, rd.state.phase(now), tuple(msgs))


def rotate_reissue(
    root_dir: Path,
    *,
    cluster_dirs: Sequence[Path] | None = None,
    days: int = DEFAULT_INTERMEDIATE_DAYS,
    now: datetime | None = None,
) -> StepResult:
    """Phase 2: the new root becomes the signer; every given (or known) cluster CA is re-issued under it."""
    now = now or utcnow()
    rd = load_root(root_dir)
    if len(rd.state.trusted) == 1:
        raise RotationError(f"{root_dir}: no rotation in progress; run `meshfed ca rotate add-root` first")
    msgs: list[str] = []
    changed = False
    nxt = rd.state.next_root
    if nxt is not None:
        _save_state(rd, replace_active(rd.state, nxt))
        _publish_root_dir(rd)
        changed = True
        msgs.append(f"root {nxt[:16]} is now the signing root")
    dirs = _cluster_dirs(rd, cluster_dirs)
    for d in dirs:
        cert = _cert(d / CA_CERT)
        try:
            authority = spiffe_id_of(cert, what=str(d / CA_CERT))
        except InvalidSpiffeId as exc:
            raise CAStoreError(str(exc)) from exc
        if _chains_to(cert, [rd.active]) is not None:
            write_cluster_bundle(d, rd.bundle)
            msgs.append(f"{d}: {authority} already under the new root")
            continue
        if _chains_to(cert, rd.roots.values()) is None:
            raise RotationError(f"{d}: its CA does not chain to any root of {root_dir}; refusing to replace it")
        ca = create_intermediate(rd.active, authority, days=days, now=now, max_ttl=rd.state.max_leaf_ttl)
        write_cluster_dir(d, ca, rd.bundle)
        _save_state(rd, rd.state.with_intermediate(_record(ca, rd.active, d, now)))
        changed = True
        msgs.append(f"{d}: re-issued {authority} under root {rd.active.fingerprint[:16]} (its control plane or "
                    "federation service picks it up within seconds; no restart)")
        log.info("event=intermediate_reissued authority=%s fingerprint=%s dir=%s", authority, ca.fingerprint, d)
    return StepResult(changed, rd.state.phase(now), tuple(msgs))


def replace_active(state: RootState, fp: str) -> RootState:
    return replace(state, active=fp)


def rotate_retire_root(
    root_dir: Path,
    *,
    cluster_dirs: Sequence[Path] | None = None,
    force: bool = False,
    converged: str | None = None,
    forget: Sequence[str] = (),
    now: datetime | None = None,
) -> StepResult:
    """Phase 4: drop the old root from the bundle, refused while any known intermediate still chains to it (and,
    unless ``force``, while leaves issued under an old intermediate may still be valid).

    ``converged`` is the running system's word that nothing in use depends on the old root any more (what it
    reported, see ``meshfed.rotation``): it lifts the time bound like ``force``, and is recorded in the messages.

    ``forget`` lists authorities (SPIFFE IDs) of clusters that no longer exist: their records are dropped from the
    state first, so a decommissioned cluster does not block the rotation forever."""
    now = now or utcnow()
    rd = load_root(root_dir)
    if forget:
        known = {r.authority for r in rd.state.intermediates}
        unknown = [a for a in forget if a not in known]
        if unknown:
            raise RotationError(f"cannot forget {', '.join(unknown)}: no such intermediate in {root_dir / STATE}")
        keep = tuple(r for r in rd.state.intermediates if r.authority not in set(forget))
        _save_state(rd, replace(rd.state, intermediates=keep))
    if len(rd.state.trusted) == 1:
        _publish_root_dir(rd)
        return StepResult(False, Phase.STABLE, ("only one root is trusted; nothing to retire",))
    old = rd.state.old_root
    if old is None:
        raise RotationError(f"{root_dir}: the new root does not sign yet; run `meshfed ca rotate reissue` first")
    gone = ", directory gone: --forget it if the cluster is gone"
    blocking = [f"{r.authority} ({r.dir}{'' if Path(r.dir).exists() else gone})" for r in rd.state.under(old)]
    old_root = rd.roots[old]
    for d in _cluster_dirs(rd, cluster_dirs):
        if (d / CA_CERT).exists() and _chains_to(_cert(d / CA_CERT), [old_root]) is not None:
            blocking.append(f"{d}")
    if blocking:
        raise RotationError(
            f"refusing to retire root {old[:16]}: these intermediates still chain to it: "
            f"{', '.join(sorted(set(blocking)))}; run `meshfed ca rotate reissue` for them"
        )
    until = rd.state.old_leaves_valid_until()
    early = until is not None and now < until
    if early and not force and converged is None:
        raise RotationError(
            f"refusing to retire root {old[:16]}: leaves issued under the old intermediates may be valid until "
            f"{until:%Y-%m-%dT%H:%M:%SZ} and the running system could not confirm that nothing uses them; "
            "wait, or pass --force if every workload has a new certificate"
        )
    state = RootState(
        rd.state.trust_domain,
        rd.state.active,
        tuple(fp for fp in rd.state.trusted if fp != old),
        rd.state.sequence + 1,
        rd.state.max_leaf_ttl,
        rd.state.intermediates,
        (*rd.state.retired, old),
    )
    _save_state(rd, state)
    del rd.roots[old]
    _publish_root_dir(rd)
    msgs = [f"retired root {old[:16]}; bundle now trusts only {rd.state.active[:16]}"]
    if early and converged is not None:
        msgs.insert(0, f"before T ({until:%Y-%m-%dT%H:%M:%SZ}): {converged}")
    for d in _cluster_dirs(rd, cluster_dirs):
        write_cluster_bundle(d, rd.bundle)
        msgs.append(f"{d}: root-cert.pem now holds only the new root")
    log.info("event=root_retired fingerprint=%s sequence=%d", old, state.sequence)
    return StepResult(True, rd.state.phase(now), tuple(msgs))


# -- inspect ----------------------------------------------------------------------------------------------------------


def _info_json(info: CertInfo, now: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "role": info.role,
        "subject": info.subject,
        "spiffe_id": info.spiffe_id,
        "fingerprint": info.fingerprint,
        "issuer": info.issuer,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
        "expires_in_days": round((info.not_after - now).total_seconds() / 86400, 1),
        **extra,
    }


def inspect_dir(path: Path, *, now: datetime | None = None) -> dict[str, Any]:
    """What a root or cluster directory holds: kind, phase, next step, and each certificate's expiry."""
    now = now or utcnow()
    if (path / STATE).exists():
        rd = load_root(path)
        phase = rd.state.phase(now)
        certs = []
        for fp in rd.state.trusted:
            status = "active" if fp == rd.state.active else ("next" if fp == rd.state.next_root else "old")
            certs.append(_info_json(CertInfo.of(f"root ({status})", rd.roots[fp].cert), now))
        inters = [
            {
                "authority": r.authority,
                "fingerprint": r.fingerprint,
                "root_fingerprint": r.root_fingerprint,
                "issued_at": r.issued_at.isoformat(),
                "not_after": r.not_after.isoformat(),
                "expires_in_days": round((r.not_after - now).total_seconds() / 86400, 1),
                "dir": r.dir,
            }
            for r in rd.state.intermediates
        ]
        until = rd.state.old_leaves_valid_until()
        return {
            "kind": "root",
            "dir": str(path),
            "trust_domain": rd.state.trust_domain.name,
            "phase": str(phase),
            "next_step": NEXT_STEP[phase],
            "bundle_sequence": rd.state.sequence,
            "max_leaf_ttl_seconds": int(rd.state.max_leaf_ttl.total_seconds()),
            "old_leaves_valid_until": until.isoformat() if until else None,
            "certificates": certs,
            "intermediates": inters,
        }
    if (path / CA_CERT).exists():
        cert = _cert(path / CA_CERT)
        bundle = load_bundle(path)
        try:
            authority = spiffe_id_of(cert, what=str(path / CA_CERT))
        except InvalidSpiffeId as exc:
            raise CAStoreError(str(exc)) from exc
        under = next((i for i, r in enumerate(bundle.roots) if _issued_by(cert, r)), None)
        if len(bundle.roots) == 1:
            cphase = "stable" if under is not None else "broken"
        elif under == 0:
            cphase = "root-added"
        elif under is not None:
            cphase = "reissued"
        else:
            cphase = "broken"
        rows = [_info_json(CertInfo.of("intermediate", cert), now)]
        for i, r in enumerate(bundle.roots):
            role = "root (signs this CA)" if i == under else "root (trusted)"
            rows.append(_info_json(CertInfo.of(role, r), now))
        return {
            "kind": "cluster",
            "dir": str(path),
            "trust_domain": authority.trust_domain.name,
            "authority": str(authority),
            "cluster": authority.cluster_name,
            "phase": cphase,
            "bundle_sequence": bundle.sequence,
            "certificates": rows,
        }
    raise CAStoreError(f"{path}: neither a root directory ({STATE}) nor a cluster CA directory ({CA_CERT})")


def _issued_by(cert: x509.Certificate, root: x509.Certificate) -> bool:
    if cert.issuer != root.subject:
        return False
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True

