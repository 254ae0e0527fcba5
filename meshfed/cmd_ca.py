"""``meshfed ca``: the shared-root certificate authority (root, per-cluster intermediates, workload certs).

Thin: every command parses its options, calls :mod:`federation.trust.store` / :mod:`federation.trust.ca`, and
turns :class:`federation.trust.errors.TrustError` into a clear message through :func:`meshfed.output.fail`.
Keys go to files (0600), never to the terminal.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from federation.trust import store
from federation.trust.ca import DEFAULT_INTERMEDIATE_DAYS, DEFAULT_ROOT_DAYS, issue_workload, sign_csr
from federation.trust.errors import TrustError
from federation.trust.spiffe import SpiffeId, TrustDomain
from meshfed import rotation
from meshfed.local import LocalRunError
from meshfed.output import emit, fail, output_option

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> timedelta:
    """``24h``, ``30m``, ``1h30m``, ``7d``, ``90s``."""
    m = _DURATION.match(text.strip())
    if not text.strip() or m is None or not any(m.groups()):
        raise click.BadParameter(f"{text!r} is not a duration like 24h, 30m, 1h30m, 7d or 90s")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return timedelta(days=d, hours=h, minutes=mi, seconds=s)


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    return None if value is None else parse_duration(value)

_DIR = click.Path(file_okay=False, path_type=Path)
_EXISTING_DIR = click.Path(file_okay=False, exists=True, path_type=Path)


@contextmanager
def _trust_errors(hint: str = "") -> Iterator[None]:
    try:
        yield
    except TrustError as exc:
        fail(str(exc), hint=hint)


def _days(default: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--days", type=click.IntRange(min=1), default=default, show_default=True, help="validity in days"
    )


@click.group()
def ca() -> None:
    """Create and operate the clusterset's root and per-cluster intermediate CAs."""


@ca.command("init")
@click.option("--trust-domain", required=True, help="SPIFFE trust domain, e.g. cluster.local or example.org")
@click.option("--out", required=True, type=_DIR, help="root directory to create (keep it offline)")
@click.option("--key-type", type=click.Choice(["ec", "rsa"]), default="ec", show_default=True,
              help="ec = ECDSA P-256, rsa = RSA 4096")
@_days(DEFAULT_ROOT_DAYS)
def init_cmd(trust_domain: str, out: Path, key_type: str, days: int) -> None:
    """Create the root CA of a trust domain in OUT (safe to re-run: an existing root is kept)."""
    with _trust_errors():
        td = TrustDomain.parse(trust_domain)
        rd, created = store.init_root(out, td, key_type="rsa" if key_type == "rsa" else "ec", days=days)
    verb = "created" if created else "already exists:"
    click.echo(f"{verb} root {rd.active.fingerprint[:16]} for trust domain {td} in {out}")
    click.echo(f"  not after {rd.active.not_after:%Y-%m-%d}; key {out / store.ROOT_KEY} (0600)")


@ca.command("intermediate")
@click.option("--root", "root_dir", required=True, type=_EXISTING_DIR, help="root directory (from `ca init`)")
@click.option("--cluster", help="cluster name (an RFC 1123 label)")
@click.option("--federation-service", is_flag=True, help="make the federation service's CA instead of a cluster's")
@click.option("--out", required=True, type=_DIR, help="cluster CA directory (Istio plug-in CA layout)")
@_days(DEFAULT_INTERMEDIATE_DAYS)
def intermediate_cmd(root_dir: Path, cluster: str | None, federation_service: bool, out: Path, days: int) -> None:
    """Issue a cluster's intermediate CA into OUT: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem."""
    if bool(cluster) == federation_service:
        fail("give exactly one of --cluster NAME or --federation-service")
    with _trust_errors():
        rd = store.load_root(root_dir)
        td = rd.state.trust_domain
        authority = SpiffeId.federation(td) if federation_service else SpiffeId.cluster(td, str(cluster))
        ca_, _created = store.issue_intermediate(root_dir, authority, out, days=days)
    if ca_ is None:
        click.echo(f"{out} already holds the CA of {authority} under the active root; bundle refreshed")
        return
    click.echo(f"created intermediate {ca_.fingerprint[:16]} for {authority} in {out}")
    click.echo(f"  not after {ca_.not_after:%Y-%m-%d}; key {out / store.CA_KEY} (0600)")


@ca.command("sign")
@click.option("--ca", "ca_dir", required=True, type=_EXISTING_DIR, help="cluster CA directory")
@click.option("--csr", "csr_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--spiffe-id", required=True, help="the identity to certify; the CSR's SAN must equal it")
@click.option("--ttl", callback=_duration, default=None, help="lifetime like 24h or 30m (default 24h, capped)")
def sign_cmd(ca_dir: Path, csr_file: Path, spiffe_id: str, ttl: timedelta | None) -> None:
    """Sign a PKCS#10 CSR; prints the PEM chain (leaf, intermediate) on stdout."""
    with _trust_errors():
        ca_ = store.load_cluster_ca(ca_dir)
        identity = SpiffeId.parse(spiffe_id)
        try:
            csr = csr_file.read_bytes()
        except OSError as exc:
            fail(f"{csr_file}: cannot read: {exc.strerror}")
        chain = sign_csr(ca_, csr, identity=identity, ttl=ttl)
    click.echo(b"".join(chain).decode(), nl=False)


@ca.command("issue")
@click.option("--ca", "ca_dir", required=True, type=_EXISTING_DIR, help="cluster CA directory")
@click.option("--spiffe-id", help="identity (default: the cluster's own identity toward the federation)")
@click.option("--out", required=True, type=_DIR, help="directory for key.pem (0600), cert-chain.pem, root-cert.pem")
@click.option("--ttl", callback=_duration, default=None, help="lifetime like 24h or 30m (default 24h, capped)")
def issue_cmd(ca_dir: Path, spiffe_id: str | None, out: Path, ttl: timedelta | None) -> None:
    """Make a key and certificate for an identity (by default the cluster's federation client identity)."""
    with _trust_errors():
        ca_ = store.load_cluster_ca(ca_dir)
        identity = SpiffeId.parse(spiffe_id) if spiffe_id else ca_.authority
        key_pem, chain = issue_workload(ca_, identity, ttl=ttl)
        store.write_file(out / "key.pem", key_pem, private=True)
        store.write_file(out / "cert-chain.pem", b"".join(chain))
        store.write_file(out / "root-cert.pem", store.load_bundle(ca_dir).to_pem())
    click.echo(f"issued {identity} into {out} (key.pem 0600, cert-chain.pem, root-cert.pem)")


def _system_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Where the running system is, to ask what still depends on the old root (meshfed.rotation)."""
    fn = click.option("--controlplane", "controlplanes", multiple=True, metavar="NAME=HOST:PORT",
                      help="a control plane's admin address to ask (repeatable; instead of a local run)")(fn)
    fn = click.option("--cluster-ca", type=_EXISTING_DIR, default=None,
                      help="a cluster CA directory to authenticate to --federation with")(fn)
    fn = click.option("--federation", "federation_url", metavar="URL", default=None,
                      help="the federation service to ask (with --cluster-ca; instead of a local run)")(fn)
    fn = click.option("--run-dir", type=_EXISTING_DIR, default=None,
                      help="the local run to ask (default: the run this CA belongs to, else .meshfed/run)")(fn)
    return fn


def _ask_system(root_dir: Path, run_dir: Path | None, federation_url: str | None, cluster_ca: Path | None,
                controlplanes: tuple[str, ...]) -> tuple[rotation.Convergence | None, str]:
    """The running system's convergence, or ``(None, why not)`` when there is nothing to ask."""
    info = store.inspect_dir(root_dir)
    if federation_url or controlplanes:
        cps: dict[str, str] = {}
        for item in controlplanes:
            name, sep, addr = item.partition("=")
            if not sep or not name or ":" not in addr:
                fail(f"--controlplane {item!r}: expected NAME=HOST:PORT (its admin address)")
            cps[name] = addr
        cluster = None
        if cluster_ca is not None:
            cluster = store.load_cluster_ca(cluster_ca).authority.cluster_name
        reports = rotation.ask(controlplanes=cps, federation_url=federation_url, ca_dir=cluster_ca,
                               cluster=str(cluster) if cluster else None)
        return rotation.evaluate(info, reports), ""
    run = rotation.local_run_dir(run_dir, root_dir)
    if run is None:
        return None, "no local run found and no --federation/--controlplane given"
    try:
        reports = rotation.ask_local(run)
    except LocalRunError as exc:
        return None, str(exc)
    return rotation.evaluate(info, reports), ""


@ca.command("inspect")
@click.argument("directory", type=_EXISTING_DIR)
@_system_options
@output_option
def inspect_cmd(directory: Path, run_dir: Path | None, federation_url: str | None, cluster_ca: Path | None,
                controlplanes: tuple[str, ...], output: str) -> None:
    """Show a root or cluster CA directory: rotation phase, fingerprints, and what expires when; during a
    rotation, also how far the running system has moved to the new root."""
    with _trust_errors():
        info = store.inspect_dir(directory)
    summary = [
        ("kind", info["kind"]),
        ("trust domain", info["trust_domain"]),
        ("phase", info["phase"]),
        ("bundle sequence", info["bundle_sequence"]),
    ]
    if info["kind"] == "root":
        summary.append(("next step", info["next_step"]))
        if info["old_leaves_valid_until"]:
            summary.append(("old leaves valid until", info["old_leaves_valid_until"]))
    else:
        summary.append(("authority", info["authority"]))
    cert_rows = [
        (c["role"], c["spiffe_id"] or c["subject"], c["fingerprint"][:16], c["not_after"][:19], c["expires_in_days"])
        for c in info["certificates"]
    ]
    sections: list[tuple[str, list[str], list[tuple[Any, ...]]]] = [
        (f"CA directory {directory}", ["field", "value"], summary),
        ("certificates", ["role", "identity / subject", "sha256", "not after (UTC)", "days left"], cert_rows),
    ]
    if info["kind"] == "root" and info["phase"] != "stable":
        with _trust_errors():
            conv, why = _ask_system(directory, run_dir, federation_url, cluster_ca, controlplanes)
        if conv is None:
            info["convergence"] = {"known": False, "why": why}
            sections.append(("convergence (unknown)", ["#", "state"], [(1, why)]))
        else:
            info["convergence"] = {"known": True, **conv.to_json()}
            step = "reissue" if info["phase"] == "root-added" else "retire-root"
            verdict = f"everything moved: {step} may go ahead" if conv.done else "not converged"
            sections.append((f"convergence ({verdict})", ["#", "state"],
                             [(i + 1, line) for i, line in enumerate(rotation.describe(conv, limit=50))]))
    if info["kind"] == "root":
        sections.append(
            (
                "intermediates issued",
                ["authority", "sha256", "under root", "not after (UTC)", "days left", "dir"],
                [
                    (i["authority"], i["fingerprint"][:16], i["root_fingerprint"][:16], i["not_after"][:19],
                     i["expires_in_days"], i["dir"])
                    for i in info["intermediates"]
                ],
            )
        )
    emit(output, info, sections)


@ca.group("rotate")
def rotate() -> None:
    """Root rotation without downtime: add-root, reissue, (leaves roll over), retire-root."""


def _report(result: store.StepResult) -> None:
    for m in result.messages:
        click.echo(m)
    click.echo(f"phase: {result.phase}{'' if result.changed else ' (nothing changed)'}")


@rotate.command("add-root")
@click.option("--root", "root_dir", required=True, type=_EXISTING_DIR)
@click.option("--key-type", type=click.Choice(["ec", "rsa"]), default="ec", show_default=True)
@_days(DEFAULT_ROOT_DAYS)
@click.argument("cluster_dirs", nargs=-1, type=_EXISTING_DIR)
def add_root_cmd(root_dir: Path, key_type: str, days: int, cluster_dirs: tuple[Path, ...]) -> None:
    """Phase 1: make a new root and trust old+new (in the root dir and in CLUSTER_DIRS, default: all known)."""
    with _trust_errors(hint="see `meshfed ca inspect` for the phase"):
        _report(store.rotate_add_root(root_dir, key_type="rsa" if key_type == "rsa" else "ec", days=days,
                                      cluster_dirs=list(cluster_dirs) or None))


def _wait_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--wait", "wait", callback=_duration, default="60s", show_default=True,
                        help="how long to wait for the running system to converge before refusing")(fn)


def _converge(root_dir: Path, wait: timedelta | None, where: tuple[Any, ...]) -> tuple[rotation.Convergence | None,
                                                                                     str]:
    why: list[str] = [""]

    def check() -> rotation.Convergence | None:
        conv, why[0] = _ask_system(root_dir, *where)
        return conv

    conv = rotation.wait_converged(check, within_s=(wait or timedelta(0)).total_seconds())
    return conv, why[0]


@rotate.command("reissue")
@click.option("--root", "root_dir", required=True, type=_EXISTING_DIR)
@click.option("--force", is_flag=True, help="re-issue without checking that everything trusts the new root")
@_days(DEFAULT_INTERMEDIATE_DAYS)
@_system_options
@_wait_option
@click.argument("cluster_dirs", nargs=-1, type=_EXISTING_DIR)
def reissue_cmd(root_dir: Path, force: bool, days: int, run_dir: Path | None, federation_url: str | None,
                cluster_ca: Path | None, controlplanes: tuple[str, ...], wait: timedelta | None,
                cluster_dirs: tuple[Path, ...]) -> None:
    """Phase 2: sign with the new root and re-issue the intermediates of CLUSTER_DIRS (default: all known).
    Right after add-root, it first waits (--wait) until the running system reports that every control plane,
    proxy and the federation trust the new root: a leaf from the new root reaching a peer that does not trust it
    yet would be refused."""
    with _trust_errors(hint="see `meshfed ca inspect` for the phase"):
        if not force and store.inspect_dir(root_dir)["phase"] == "root-added":
            conv, why = _converge(root_dir, wait, (run_dir, federation_url, cluster_ca, controlplanes))
            if conv is None:
                click.echo(f"note: cannot ask the running system whether it trusts the new root yet ({why}); "
                           "make sure every cluster has the two-root bundle before clusters get new intermediates")
            elif not conv.done:
                fail("refusing to re-issue: not everything trusts the new root yet:\n  "
                     + "\n  ".join(rotation.describe(conv, limit=20)),
                     hint="control planes and the federation re-read their CA directory every two seconds; retry, "
                          "or --force")
                return
            else:
                click.echo("every control plane, proxy and the federation trust the new root ("
                           + "; ".join(conv.summary) + ")")
        _report(store.rotate_reissue(root_dir, days=days, cluster_dirs=list(cluster_dirs) or None))


@rotate.command("retire-root")
@click.option("--root", "root_dir", required=True, type=_EXISTING_DIR)
@click.option("--force", is_flag=True,
              help="retire without asking the running system (before old leaves could have expired)")
@click.option("--forget", multiple=True, metavar="SPIFFE_ID",
              help="drop the record of a decommissioned cluster's intermediate (repeatable)")
@_system_options
@_wait_option
@click.argument("cluster_dirs", nargs=-1, type=_EXISTING_DIR)
def retire_cmd(root_dir: Path, force: bool, forget: tuple[str, ...], run_dir: Path | None,
               federation_url: str | None, cluster_ca: Path | None, controlplanes: tuple[str, ...],
               wait: timedelta | None, cluster_dirs: tuple[Path, ...]) -> None:
    """Phase 4: drop the old root from the bundle. Refused while an intermediate still chains to it, and, before
    the old leaves' lifetime is over, until the running system (a local run, or --federation and
    --controlplane) reports that no proxy, control plane or federation certificate depends on it any more."""
    converged: str | None = None
    with _trust_errors(hint="see `meshfed ca inspect` for the phase"):
        info = store.inspect_dir(root_dir)
        until = info.get("old_leaves_valid_until")
        if not force and info["phase"] == "leaves-rolling" and until:
            conv, why = _converge(root_dir, wait, (run_dir, federation_url, cluster_ca, controlplanes))
            if conv is None:
                fail(f"refusing to retire the old root: leaves issued under the old intermediates may be valid "
                     f"until {until[:19]}Z, and the running system cannot be asked whether anything still uses "
                     f"them ({why})",
                     hint="pass --run-dir, or --federation URL --cluster-ca DIR and --controlplane NAME=ADMIN; "
                          "or --force if you know every certificate has moved")
                return
            if not conv.done:
                lines = rotation.describe(conv, limit=20)
                fail("refusing to retire the old root: still in use:\n  " + "\n  ".join(lines),
                     hint="retry (control planes pick a re-issued CA up within two seconds), or a longer --wait; "
                          "`meshfed ca inspect` shows the same list")
                return
            converged = "the running system reports nothing uses the old root (" + "; ".join(conv.summary) + ")"
        _report(store.rotate_retire_root(root_dir, force=force, converged=converged, forget=forget,
                                         cluster_dirs=list(cluster_dirs) or None))
