"""Root rotation convergence: which certificates in use still depend on the old root.

A root may be retired as soon as nothing in use depends on it; the time bound *T* (last re-issue + the longest
leaf lifetime) is only the fallback when the running system cannot be asked. "In use" is:

- every proxy's ACKed SDS secrets (its leaf and the bundle it validates peers with), as each control plane
  reports them in ``/status`` (``rotation``): a proxy that has not ACKed the secrets it was last sent is counted
  as not moved, whatever it holds;
- each control plane's own leaves: its federation client certificate and its mTLS xDS serving certificate;
- the federation service's serving certificate, and the chain every open member connection authenticated with
  (``GET /v1/trust/status``).

Three parts, kept apart: :func:`controlplane_report` (what one control plane puts in its ``/status``, from its
live objects), :func:`evaluate` (pure: reports + the root directory's rotation state -> convergence), and the
collection at the bottom (HTTP to a local run's control planes and federation, or to given URLs).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from federation.trust.bundle import TrustBundle, fingerprint, load_pem_certs
from federation.trust.errors import TrustError
from gateway.snapshot import SECRET
from meshfed.certfiles import CertFileReport

if TYPE_CHECKING:
    from meshfed.controlplane import ControlPlane

log = logging.getLogger("meshfed.rotation")




# ---- what a control plane reports (from its live objects) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainInfo:
    """A certificate chain in use: its leaf, and the bundle root it depends on (None: none of them)."""

    leaf_fingerprint: str = ""
    root_fingerprint: str | None = None
    not_after: str = ""
    # The federation client's only: connection pools opened with a previous certificate, still closing.
    old_sessions_open: int | None = None

    def json_omitted(self) -> tuple[str, ...]:
        return ("old_sessions_open",) if self.old_sessions_open is None else ()


@dataclass(frozen=True, slots=True)
class IntermediateInfo:
    fingerprint: str = ""
    root_fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class ProxySecrets:
    """What one proxy holds: the secrets of its current snapshot if it ACKed them (``acked``), else ``pending``."""

    node_id: str = ""
    state: str = "pending"
    leaf_fingerprint: str | None = None
    leaf_root: str | None = None
    bundle_roots: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RotationReport:
    """The ``rotation`` section of a control plane's ``/status``."""

    intermediate: IntermediateInfo = IntermediateInfo()
    bundle_fingerprints: tuple[str, ...] = ()
    federation_client: ChainInfo | None = None
    xds_serving: ChainInfo | None = None
    proxies: tuple[ProxySecrets, ...] = ()
    files: tuple[CertFileReport, ...] = ()


@functools.lru_cache(maxsize=1024)
def _parse(pem: str) -> tuple[x509.Certificate, ...]:
    return tuple(load_pem_certs(pem.encode(), what="certificate"))


def chain_info(pem: str | bytes, bundle: TrustBundle) -> ChainInfo | None:
    """Leaf fingerprint, and the fingerprint of the bundle root the chain depends on (None: none of them)."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    if not text.strip():
        return None
    try:
        certs = _parse(text)
    except TrustError:
        return None
    return ChainInfo(leaf_fingerprint=fingerprint(certs[0]), root_fingerprint=bundle.issuing_root(certs),
                     not_after=certs[0].not_valid_after_utc.isoformat())


def _bundle_roots(pem: str) -> tuple[str, ...]:
    try:
        return tuple(fingerprint(c) for c in _parse(pem))
    except TrustError:
        return ()


def proxy_secrets(cp: ControlPlane, node_id: str, acked: str) -> ProxySecrets:
    """What one proxy holds: the secrets of its current snapshot if it ACKed them, else "pending"."""
    snap = cp.cache.get(node_id)
    current = snap.version(SECRET) if snap is not None else ""
    if not acked or acked != current or snap is None:
        return ProxySecrets(node_id=node_id)
    secrets = snap.resources.get(SECRET, {})
    leaf: ChainInfo | None = None
    roots: tuple[str, ...] = ()
    for name in secrets:
        msg: Any = secrets[name]
        if msg.HasField("tls_certificate"):
            leaf = chain_info(msg.tls_certificate.certificate_chain.inline_string, cp.bundle)
        elif msg.HasField("validation_context"):
            roots = _bundle_roots(msg.validation_context.trusted_ca.inline_string)
    return ProxySecrets(node_id=node_id, state="acked", leaf_fingerprint=leaf.leaf_fingerprint if leaf else None,
                        leaf_root=leaf.root_fingerprint if leaf else None, bundle_roots=roots)


def _client_info(cp: ControlPlane) -> ChainInfo | None:
    info = chain_info(cp.trust.fed_client_chain, cp.bundle)
    client = cp.trust.federation_client
    if info is not None and client is not None:
        info = replace(info, old_sessions_open=client.old_sessions())
    return info


def controlplane_report(cp: ControlPlane) -> RotationReport:
    """The ``rotation`` section of a control plane's ``/status``."""
    proxies = tuple(proxy_secrets(cp, row.node_id, row.acked_version) for row in cp.cache.status()
                    if row.type_url == SECRET and row.connected)
    return RotationReport(
        intermediate=IntermediateInfo(fingerprint=cp.ca.fingerprint, root_fingerprint=cp.bundle.issuing_root(
            [cp.ca.cert])),
        bundle_fingerprints=tuple(cp.bundle.fingerprints),
        federation_client=_client_info(cp),
        xds_serving=chain_info(cp.trust.mtls_serving_chain, cp.bundle),
        proxies=proxies,
        files=tuple(cp.trust.cert_files.report(cp.bundle)),
    )


# ---- evaluation (pure) ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Convergence:
    """Whether everything in use has moved off ``old_root`` (``done``), and what has not (``blocking``)."""

    in_rotation: bool
    old_root: str | None
    new_root: str | None
    done: bool
    blocking: tuple[str, ...] = ()
    summary: tuple[str, ...] = ()
    proxies_total: int = 0
    proxies_old: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"in_rotation": self.in_rotation, "old_root": self.old_root, "new_root": self.new_root,
                "done": self.done, "blocking": list(self.blocking), "summary": list(self.summary),
                "proxies_total": self.proxies_total, "proxies_old": self.proxies_old}


@dataclass(frozen=True, slots=True)
class SystemReports:
    """What the running system said: each control plane's ``rotation`` section (None: it did not answer, with why
    in ``errors``) and the federation's ``/v1/trust/status`` (None: not asked or did not answer)."""

    controlplanes: Mapping[str, RotationReport | None]
    federation: Mapping[str, Any] | None
    errors: Mapping[str, str] = field(default_factory=dict)
    federation_error: str = ""


def _short(fp: str | None) -> str:
    return fp[:16] if fp else "none of the trusted roots"


def evaluate(root: Mapping[str, Any], reports: SystemReports) -> Convergence:
    """Convergence from ``inspect_dir`` of the root directory and the system's reports (pure).

    Outside a rotation, or before the new root signs (``root-added``), there is nothing to converge to."""
    phase = str(root.get("phase", ""))
    certs = root.get("certificates", [])
    if phase == "root-added":
        return _evaluate_bundles(root, reports)
    old = next((c["fingerprint"] for c in certs if c.get("role") == "root (old)"), None)
    new = next((c["fingerprint"] for c in certs if c.get("role") == "root (active)"), None)
    if phase == "stable" or old is None or new is None:
        return Convergence(in_rotation=phase != "stable", old_root=old, new_root=new, done=False,
                           summary=(f"phase {phase}: nothing to converge yet",))
    blocking: list[str] = _unasked(reports)
    summary: list[str] = []
    total = moved = 0
    for cluster, rep in sorted(reports.controlplanes.items()):
        if rep is None:
            why = reports.errors.get(cluster, "no answer")
            blocking.append(f"{cluster}: control plane did not report its certificates ({why})")
            continue
        inter = rep.intermediate
        if inter.root_fingerprint != new:
            blocking.append(f"{cluster}: control plane still signs with intermediate "
                            f"{inter.fingerprint[:16]} under root {_short(inter.root_fingerprint)}")
        for what, info in (("federation client certificate", rep.federation_client),
                           ("mTLS xDS serving certificate", rep.xds_serving)):
            if info is not None and info.root_fingerprint != new:
                blocking.append(f"{cluster}: its {what} chains to root {_short(info.root_fingerprint)}")
            elif info is not None and info.old_sessions_open:
                blocking.append(f"{cluster}: {info.old_sessions_open} federation connection pool(s) opened with "
                                "its previous certificate are still closing")
        for p in rep.proxies:
            total += 1
            node = p.node_id
            if p.state != "acked":
                blocking.append(f"{cluster}: proxy {node} has not ACKed its current certificates")
            elif p.leaf_fingerprint is not None and p.leaf_root != new:
                blocking.append(f"{cluster}: proxy {node} holds a leaf from root {_short(p.leaf_root)}")
            elif new not in p.bundle_roots:
                blocking.append(f"{cluster}: proxy {node} does not trust the new root yet")
            else:
                moved += 1
    files = files_moved = 0
    for cluster, rep in sorted(reports.controlplanes.items()):
        for f in rep.files if rep is not None else ():
            files += 1
            where = f"{cluster}: certificate files {f.dir} ({f.spiffe_id})"
            if f.leaf_root != new:
                blocking.append(f"{where} hold a leaf from root {_short(f.leaf_root)}")
            elif not f.settled:
                blocking.append(f"{where} were rewritten {f.written_at}; gRPC re-reads them every "
                                f"{f.refresh_s} s")
            else:
                files_moved += 1
    if total:
        summary.append(f"{total - moved} of {total} proxies still hold leaves from the old root" if moved < total
                       else f"all {total} proxies hold leaves from the new root")
    if files:
        summary.append(f"{files_moved} of {files} proxyless certificate files renewed and re-read")
    fed = reports.federation
    if fed is None:
        why = reports.federation_error or "not asked"
        blocking.append(f"federation: did not report its certificates ({why})")
    else:
        serving = fed.get("serving")
        if serving is None:
            blocking.append("federation: does not report its serving certificate (an older version?)")
        elif serving.get("root_fingerprint") != new:
            blocking.append(f"federation: its serving certificate chains to root "
                            f"{_short(serving.get('root_fingerprint'))}; it reloads its CA directory within two "
                            "seconds of `reissue`")
            summary.append("federation serving cert not renewed yet")
        else:
            summary.append("federation serving cert renewed")
        if new not in fed.get("bundleFingerprints", []):
            blocking.append("federation: does not trust the new root yet")
        stale = [c for c in fed.get("connections", []) if c.get("root_fingerprint") != new]
        for c in stale:
            blocking.append(f"federation: a connection of {c.get('cluster')} authenticated with a certificate "
                            f"from root {_short(c.get('root_fingerprint'))} (since {c.get('since')})")
        conns = fed.get("connections", [])
        summary.append(f"{len(conns) - len(stale)} of {len(conns)} member connections use the new root")
    return Convergence(in_rotation=True, old_root=old, new_root=new, done=not blocking, blocking=tuple(blocking),
                       summary=tuple(summary), proxies_total=total, proxies_old=total - moved)


def _unasked(reports: SystemReports) -> list[str]:
    """Members of the federation whose control plane nobody asked: what they hold is unknown."""
    members = (reports.federation or {}).get("members", [])
    return [f"{m}: a member of the federation whose control plane was not asked (--controlplane {m}=ADMIN_ADDRESS)"
            for m in members if m not in reports.controlplanes]


def _evaluate_bundles(root: Mapping[str, Any], reports: SystemReports) -> Convergence:
    """``root-added``: before the new root may sign (``reissue``), everything must already trust it: each
    control plane's bundle, each proxy's ACKed validation bundle, the federation's client-verification bundle.
    Otherwise a leaf re-issued under the new root would be refused by a peer that still trusts only the old one."""
    certs = root.get("certificates", [])
    old = next((c["fingerprint"] for c in certs if c.get("role") == "root (active)"), None)
    new = next((c["fingerprint"] for c in certs if c.get("role") == "root (next)"), None)
    blocking: list[str] = _unasked(reports)
    total = moved = 0
    for cluster, rep in sorted(reports.controlplanes.items()):
        if rep is None:
            blocking.append(f"{cluster}: control plane did not report its bundle "
                            f"({reports.errors.get(cluster, 'no answer')})")
            continue
        if new not in rep.bundle_fingerprints:
            blocking.append(f"{cluster}: control plane does not trust the new root yet")
        for p in rep.proxies:
            total += 1
            if p.state != "acked":
                blocking.append(f"{cluster}: proxy {p.node_id} has not ACKed its current bundle")
            elif new not in p.bundle_roots:
                blocking.append(f"{cluster}: proxy {p.node_id} does not trust the new root yet")
            else:
                moved += 1
        for f in rep.files:
            if new not in f.bundle_roots or not f.settled:
                blocking.append(f"{cluster}: certificate files {f.dir} do not trust the new root yet (gRPC "
                                f"re-reads them every {f.refresh_s} s)")
    summary = [f"{moved} of {total} proxies trust the new root"]
    fed = reports.federation
    if fed is None:
        blocking.append(f"federation: did not report its bundle ({reports.federation_error or 'not asked'})")
    elif new not in fed.get("bundleFingerprints", []):
        blocking.append("federation: does not trust the new root yet (it re-reads its CA directory every two "
                        "seconds)")
    else:
        summary.append("federation trusts the new root")
        _peers_hold(fed, new, blocking, summary)
    return Convergence(in_rotation=True, old_root=old, new_root=new, done=not blocking, blocking=tuple(blocking),
                       summary=tuple(summary), proxies_total=total, proxies_old=total - moved)


def _peers_hold(fed: Mapping[str, Any], new: str | None, blocking: list[str], summary: list[str]) -> None:
    """Peer clustersets must hold the new root (fetched from our bundle endpoint) before it signs: the federation's
    serving certificate moves under it at ``reissue``, and a peer that authenticates our bundle endpoint with the
    old bundle only would be locked out (docs/peering.md). A peer reports what it holds on its exchange calls; one
    that never called (not a meshfed federation) cannot be asked, only waited for."""
    for row in fed.get("peers", []):
        name, td = row.get("name"), row.get("trust_domain")
        if row.get("peer_holds_reported_at") is None:
            summary.append(f"peer {name} ({td}) never reported which of our roots it holds: wait 3-5 refresh hints "
                           "after add-root before reissue (SPIFFE Federation 4.1)")
        elif new is not None and new[:16] not in row.get("peer_holds_roots", []):
            blocking.append(f"peer {name} ({td}): holds our bundle sequence {row.get('peer_holds_sequence')} "
                            f"without the new root (reported {row.get('peer_holds_reported_at')}); it refreshes at "
                            "our spiffe_refresh_hint")
        else:
            summary.append(f"peer {name} ({td}) holds the new root")


def wait_converged(check: Callable[[], Convergence | None], *, within_s: float,
                   interval_s: float = 1.0) -> Convergence | None:
    """Ask again until converged or ``within_s`` passed (bounded); the last answer."""
    deadline = time.monotonic() + within_s
    conv = check()
    while conv is not None and not conv.done and time.monotonic() < deadline:
        time.sleep(interval_s)
        conv = check()
    return conv


# ---- collection (IO) ------------------------------------------------------------------------------------------------


async def federation_trust_status(url: str, ca_dir: Path, cluster: str) -> dict[str, Any]:
    """``GET /v1/trust/status`` with a throwaway identity of ``cluster`` issued from its CA directory."""
    from discovery.model import ClusterId
    from federation.client import FederationClient, cluster_credentials

    ctx, bundle = cluster_credentials(ca_dir, ClusterId(cluster))
    async with FederationClient(url, ssl_context=ctx, cluster=ClusterId(cluster), bundle=bundle,
                                request_timeout_s=5.0) as client:
        return await client.trust_status()


def ask(*, controlplanes: Mapping[str, str], federation_url: str | None, ca_dir: Path | None,
        cluster: str | None) -> SystemReports:
    """Ask control planes (name -> admin ``HOST:PORT``) for their ``/status`` rotation section and the federation
    for its trust status (with an identity of ``cluster`` from ``ca_dir``)."""
    from federation.client import ClientError
    from meshfed.status import StatusError, fetch_status

    reports: dict[str, RotationReport | None] = {}
    errors: dict[str, str] = {}
    for name, admin in controlplanes.items():
        try:
            reports[name] = fetch_status(admin, what=name).rotation
            if reports[name] is None:
                errors[name] = "its /status has no rotation section (an older version?)"
        except StatusError as exc:
            reports[name], errors[name] = None, str(exc)
    fed: dict[str, Any] | None = None
    fed_error = ""
    if federation_url and ca_dir is not None and cluster:
        try:
            fed = asyncio.run(federation_trust_status(federation_url, ca_dir, cluster))
        except (ClientError, TrustError, OSError) as exc:
            fed_error = str(exc)
    elif federation_url:
        fed_error = "no cluster CA directory to authenticate with"
    return SystemReports(controlplanes=reports, federation=fed, errors=errors, federation_error=fed_error)


def ask_local(run_dir: Path) -> SystemReports:
    """Ask a local run (``meshfed up``): every control plane in its state.json and its federation."""
    from meshfed import local

    state = local.read_state(run_dir)
    first = next(iter(state.clusters.items()), None)
    return ask(controlplanes={n: c.controlplane.admin for n, c in state.clusters.items()},
               federation_url=state.federation.url if state.federation is not None else None,
               ca_dir=Path(first[1].ca) if first else None, cluster=first[0] if first else None)


def describe(conv: Convergence, *, limit: int = 8) -> list[str]:
    """Lines for a person: the summary, then what still depends on the old root (at most ``limit``)."""
    lines = list(conv.summary)
    lines += [f"not moved yet: {b}" for b in conv.blocking[:limit]]
    if len(conv.blocking) > limit:
        lines.append(f"... and {len(conv.blocking) - limit} more")
    return lines


def local_run_dir(given: Path | None, root_dir: Path) -> Path | None:
    """The run to ask: ``given``, else the local run whose CA root is ``root_dir`` (``<run>/ca/root``, or
    ``.meshfed/run``), else None. A run that belongs to another root is never asked."""
    from meshfed import local

    if given is not None:
        return given
    want = root_dir.resolve()
    for run in (want.parent.parent, local.DEFAULT_RUN_DIR):
        try:
            state = local.read_state(run)
        except local.LocalRunError:
            continue
        if state.ca is not None and Path(state.ca.root).resolve() == want:
            return run
    return None
