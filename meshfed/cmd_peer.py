"""``meshfed peer``: declare, list and remove the peer clustersets a federation fetches bundles from and exchanges
services with (docs/peering.md).

Where a declaration goes:

- a local run (the default, ``--run-dir``): ``<run-dir>/federation/peers.yaml``, the file its federation service
  was started with (``--peers``) and re-reads within seconds; the bootstrap bundle is copied beside it
  (``<run-dir>/federation/bootstrap/<name>.json``, 0600), so the run does not depend on the file given staying;
- a real install (``--peers-file FILE``): the federation's peers file, the one ``meshfed federation serve --peers``
  reads (for a cluster install: the ``peers.yaml`` key of the federation's ConfigMap); the bootstrap bundle is
  copied beside it in the same way;
- the clusterset definition: edit ``peers:`` in clusterset.yaml by hand; ``meshfed up`` writes those entries into
  the run's peers file when it starts.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from discovery.clusterset import BundleProfile, ClusterSetError, PeerDecl, load_peers_file, parse_peer, peers_file_text
from federation.files import write_atomic
from federation.peering.bundles import read_bootstrap
from federation.peering.records import PeeringError
from federation.trust.errors import InvalidSpiffeId, TrustError
from federation.trust.spiffe import SpiffeId, TrustDomain
from meshfed.output import console, emit, fail, output_option, print_json

PEERS_FILE = Path("federation") / "peers.yaml"
_OPTIONS = {"name": "NAME", "trustDomain": "--trust-domain", "bundleEndpoint": "--bundle-endpoint",
            "bundleEndpointProfile": "--profile", "endpointSpiffeId": "--endpoint-spiffe-id",
            "bootstrapBundle": "--bootstrap-bundle", "federation": "--federation", "caFile": "--ca-file"}


@click.group()
def peer() -> None:
    """Peer clustersets (other roots and trust domains): add, list, remove."""


def _target_options(fn: Any) -> Any:
    fn = click.option("--peers-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="a federation's peers file (a real install) instead of a local run's")(fn)
    fn = click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".meshfed/run"),
                      show_default=True, help="the local run whose federation gets the peer")(fn)
    return fn


def _peers_path(run_dir: Path, peers_file: Path | None) -> tuple[Path, str]:
    """(the peers file, the own trust domain if known)."""
    if peers_file is not None:
        return peers_file, ""
    from meshfed import local

    try:
        state = local.read_state(run_dir)
    except local.LocalRunError as exc:
        raise click.ClickException(f"{exc} (or pass --peers-file for a federation that is not a local run)") from exc
    recorded = state.federation.peers_file if state.federation is not None else ""
    return (Path(recorded) if recorded else run_dir / PEERS_FILE), state.trust_domain


def _load(path: Path, own: str) -> list[PeerDecl]:
    try:
        return list(load_peers_file(path, own_trust_domain=own))
    except ClusterSetError as exc:
        raise click.ClickException(str(exc)) from exc


def _write(path: Path, peers: list[PeerDecl]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, peers_file_text(peers).encode(), mode=0o600)


def _from_run(other: Path) -> dict[str, str]:
    """The peer parameters of another local run (its bundle endpoint, SPIFFE ID, root bundle, trust domain)."""
    from meshfed import local

    try:
        state = local.read_state(other)
    except local.LocalRunError as exc:
        raise click.ClickException(f"--from-run: {exc}") from exc
    fed = state.federation
    if fed is None or state.ca is None:
        raise click.ClickException(f"--from-run: the run in {other} has no federation recorded (it did not start)")
    return {"bundleEndpoint": fed.bundle_endpoint, "endpointSpiffeId": fed.spiffe_id,
            "bootstrapBundle": str(Path(state.ca.root) / "bundle.json"),
            "trustDomain": state.trust_domain, "federation": fed.peering_url}


@peer.command("add")
@click.argument("name")
@click.option("--bundle-endpoint", metavar="URL", help="the peer's SPIFFE bundle endpoint (https)")
@click.option("--endpoint-spiffe-id", metavar="ID", help="https_spiffe: the SPIFFE ID its certificate must carry")
@click.option("--bootstrap-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="https_spiffe: the first bundle to trust for the peer (SPIFFE bundle.json or PEM roots)")
@click.option("--trust-domain", metavar="TD", help="the peer's trust domain (default: the endpoint SPIFFE ID's)")
@click.option("--profile", type=click.Choice([p.value for p in BundleProfile]),
              default=BundleProfile.HTTPS_SPIFFE.value, show_default=True,
              help="how the bundle endpoint is authenticated")
@click.option("--federation", "federation_url", metavar="URL", default="",
              help="the peer federation's peering URL (default: the bundle endpoint's origin)")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="https_web: a CA file instead of the system store")
@click.option("--from-run", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="take the endpoint, SPIFFE ID, bootstrap bundle and trust domain from another local run")
@_target_options
@output_option
def add_cmd(name: str, bundle_endpoint: str | None, endpoint_spiffe_id: str | None, bootstrap_bundle: Path | None,
            trust_domain: str | None, profile: str, federation_url: str, ca_file: Path | None, from_run: Path | None,
            run_dir: Path, peers_file: Path | None, output: str) -> None:
    """Declare peer NAME: its services become NAME.NS.svc.NAME.clusterset.local here, once it exports them to us."""
    raw: dict[str, str] = _from_run(from_run) if from_run is not None else {}
    given = {"bundleEndpoint": bundle_endpoint, "endpointSpiffeId": endpoint_spiffe_id,
             "bootstrapBundle": str(bootstrap_bundle) if bootstrap_bundle else None, "trustDomain": trust_domain,
             "federation": federation_url or None, "caFile": str(ca_file) if ca_file else None}
    raw.update({k: v for k, v in given.items() if v})
    raw.update(name=name, bundleEndpointProfile=profile)
    if "trustDomain" not in raw and raw.get("endpointSpiffeId"):
        try:
            raw["trustDomain"] = SpiffeId.parse(raw["endpointSpiffeId"]).trust_domain.name
        except InvalidSpiffeId as exc:
            raise click.BadParameter(str(exc), param_hint="--endpoint-spiffe-id") from exc
    path, own = _peers_path(run_dir, peers_file)
    try:
        decl = parse_peer(raw, file="meshfed peer add", path="peer")
    except ClusterSetError as exc:
        yaml_field = exc.field.removeprefix("peer.")
        option = _OPTIONS.get(yaml_field, yaml_field)
        raise click.UsageError(f"{option}: {exc.reason}") from exc
    if decl.bootstrap_bundle is not None:
        try:
            bundle = read_bootstrap(decl.bootstrap_bundle, TrustDomain(decl.trust_domain), peer=name)
        except (PeeringError, TrustError) as exc:
            raise click.ClickException(str(exc)) from exc
        copy = path.parent / "bootstrap" / f"{name}.json"
        copy.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(copy.parent, 0o700)
        write_atomic(copy, bundle.to_jwks_json(), mode=0o600)
        decl = replace(decl, bootstrap_bundle=copy.resolve())
    if decl.ca_file is not None:
        decl = replace(decl, ca_file=decl.ca_file.resolve())
    peers = [p for p in _load(path, own) if p.name != name]
    replaced = len(peers) != len(_load(path, own))
    if own and decl.trust_domain == own:
        raise click.ClickException(f"{decl.trust_domain} is this clusterset's own trust domain")
    clash = next((p for p in peers if p.trust_domain == decl.trust_domain), None)
    if clash is not None:
        raise click.ClickException(f"trust domain {decl.trust_domain} is already peer {clash.name} (one peer per "
                                   "trust domain: bundles are never merged); remove it first")
    peers.append(decl)
    _write(path, peers)
    if output == "json":
        print_json({"peer": decl.to_json(), "peers_file": str(path), "replaced": replaced})
    else:
        console().print(f"{'replaced' if replaced else 'added'} peer {name} ({decl.trust_domain}) in {path}; the "
                        "federation re-reads it within seconds ('meshfed peer list' shows the bundle it fetched)")


@peer.command("remove")
@click.argument("name")
@_target_options
@output_option
def remove_cmd(name: str, run_dir: Path, peers_file: Path | None, output: str) -> None:
    """Stop peering with NAME: its bundle is forgotten and its services leave this clusterset."""
    path, own = _peers_path(run_dir, peers_file)
    peers = _load(path, own)
    keep = [p for p in peers if p.name != name]
    if len(keep) == len(peers):
        fail(f"no peer {name!r} in {path} (peers: {', '.join(p.name for p in peers) or 'none'})", code=2)
        return
    _write(path, keep)
    copy = path.parent / "bootstrap" / f"{name}.json"
    copy.unlink(missing_ok=True)
    if output == "json":
        print_json({"removed": name, "peers_file": str(path)})
    else:
        console().print(f"removed peer {name} from {path}")


@peer.command("list")
@_target_options
@output_option
def list_cmd(run_dir: Path, peers_file: Path | None, output: str) -> None:
    """The declared peers, and for a running local run what its federation holds for each (bundle sequence and
    age, last refresh, errors, services exchanged)."""
    from meshfed import peerstatus

    path, own = _peers_path(run_dir, peers_file)
    declared = _load(path, own)
    live: dict[str, Any] = {}
    error = ""
    if peers_file is None:
        from federation.client import ClientError
        from meshfed import local

        state = local.read_state(run_dir)
        url = state.federation.url if state.federation is not None else ""
        first = next(iter(state.clusters.items()), None)
        if url and first is not None and not local.stopped_message(run_dir, state):
            try:
                live = {p.name: p for p in asyncio.run(peerstatus.fetch_peers(url, Path(first[1].ca), first[0]))}
            except (ClientError, TrustError, OSError, ValueError) as exc:
                error = str(exc)
    rows = []
    for d in declared:
        st = live.get(d.name)
        rows.append([d.name, d.trust_domain, d.bundle_endpoint, str(d.profile),
                     f"seq {st.bundle_sequence} ({st.bundle_source})" if st and st.bundle_sequence is not None
                     else "-", f"{st.bundle_age_s:.0f}s" if st and st.bundle_age_s is not None else "-",
                     (st.error_kind or "ok") if st else "-", ", ".join(st.services_imported) if st else "-"])
    doc = {"peers_file": str(path), "peers": [
        {**d.to_json(), "status": peerstatus.report_rows([live[d.name]])[0] if d.name in live else None}
        for d in declared], "error": error}
    emit(output, doc, [(f"Peers ({path})", ["peer", "trust domain", "bundle endpoint", "profile", "bundle", "age",
                                           "state", "imported services"], rows)])
    if error and output != "json":
        console().print(f"[yellow]the federation did not answer: {error}[/yellow]")
