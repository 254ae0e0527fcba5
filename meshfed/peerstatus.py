"""Peers in ``meshfed status`` and ``meshfed peer list``: the federation's ``GET /v1/peers`` rows (typed as
:class:`federation.peering.records.PeerStatus`), the table, and the problems they show (pure, except
:func:`fetch_peers`).

A peer is a problem when its bundle endpoint is unreachable (the age of the bundle kept is named), when it served
something refused (the reason and the count), when the bundle held for it expired (members stop trusting its trust
domain), when no bundle was ever fetched, or when the service exchange with it fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from federation.peering.records import PeerStatus
from meshfed.controlplane.status import ControlPlaneStatus
from meshfed.jsondoc import decode, encode


def decode_peers(rows: Sequence[Any], *, what: str) -> tuple[PeerStatus, ...]:
    """The federation's peer rows as typed values (``DocumentError`` naming the row and field)."""
    return tuple(decode(PeerStatus, row, what=f"{what}: peers[{i}]") for i, row in enumerate(rows))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def peer_problems(peers: Sequence[PeerStatus]) -> list[str]:
    out: list[str] = []
    for p in peers:
        kept = (f"keeping bundle sequence {p.bundle_sequence} fetched {_age(p.bundle_age_s)} ago (expires "
                f"{p.expires_at})" if p.bundle_source == "fetched" else "no bundle fetched yet")
        if p.expired:
            out.append(f"peer {p.name} ({p.trust_domain}): its bundle expired at {p.expires_at}: members no longer "
                       f"trust {p.trust_domain}; last error: {p.error or 'none'}")
        elif p.error_kind == "unreachable":
            out.append(f"peer {p.name} ({p.trust_domain}): bundle endpoint {p.bundle_endpoint} unreachable since "
                       f"{p.failing_since}: {p.error}; {kept}")
        elif p.error_kind == "refused":
            out.append(f"peer {p.name} ({p.trust_domain}): bundle refused ({p.refusals} refusals so far): "
                       f"{p.error}; {kept}")
        elif p.bundle_source != "fetched":
            out.append(f"peer {p.name} ({p.trust_domain}): no bundle fetched yet from {p.bundle_endpoint}")
        if p.services_error:
            out.append(f"peer {p.name} ({p.trust_domain}): service exchange with {p.federation} failing: "
                       f"{p.services_error}")
    return out


def peer_table(peers: Sequence[PeerStatus]) -> tuple[str, list[str], list[list[Any]]]:
    rows = []
    for p in peers:
        bundle = f"seq {p.bundle_sequence} ({p.bundle_source}, {len(p.bundle_roots)} roots)" \
            if p.bundle_sequence is not None else "none"
        state = "EXPIRED" if p.expired else (p.error_kind.upper() if p.error_kind else "ok")
        rows.append([p.name, p.trust_domain, p.bundle_endpoint, bundle, _age(p.bundle_age_s),
                     p.last_refresh_at or "-", state, ", ".join(p.services_imported) or "-",
                     ", ".join(p.services_exported) or "-"])
    return ("Peers", ["peer", "trust domain", "bundle endpoint", "bundle", "age", "last refresh", "state",
                      "imported", "exported to it"], rows)


def report_rows(peers: Sequence[PeerStatus]) -> list[dict[str, Any]]:
    return [encode(p) for p in peers]


async def fetch_peers(url: str, ca_dir: Path, cluster: str) -> tuple[PeerStatus, ...]:
    """The federation's peers, asked with a throwaway identity of one of its clusters (a local run)."""
    from discovery.model import ClusterId
    from federation.client import FederationClient, cluster_credentials

    ctx, bundle = cluster_credentials(ca_dir, ClusterId(cluster))
    async with FederationClient(url, ssl_context=ctx, cluster=ClusterId(cluster), bundle=bundle,
                                request_timeout_s=5.0) as client:
        rows = await client.peers()
    return decode_peers(rows, what=f"GET {url}/v1/peers")


def peer_services(statuses: Mapping[str, ControlPlaneStatus | None], problems: list[str]) -> list[dict[str, Any]]:
    """The services peers exported to us as each control plane serves them (its ``/status`` ``peer_services``),
    one row per (cluster, service); their problems appended to ``problems``: services that could not be taken
    (``peer_error``), and a peer's service with no ready endpoint behind the exporter's gateways."""
    rows: list[dict[str, Any]] = []
    for cluster, st in sorted(statuses.items()):
        if st is None:
            continue
        if st.peer_error:
            problems.append(f"{cluster}: peer services not taken (the last accepted are served): {st.peer_error}")
        for p in st.peer_services:
            rows.append({"cluster": cluster, **encode(p)})
            if p.ready <= 0:
                problems.append(f"{cluster}: {p.host} (exported by peer {p.peer}) has no ready endpoint behind the "
                                f"peer's gateways ({', '.join(p.gateways) or 'none'})")
    return rows


def peer_service_table(rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[str], list[list[Any]]]:
    return ("Peer services (exported to this clusterset by peers)",
            ["cluster", "name", "peer", "trust domain", "ClusterSetIP", "ports", "ready", "via gateways"],
            [[r["cluster"], r["host"], r["peer"], r["trust_domain"], ", ".join(r["ips"]) or "-",
              ", ".join(str(p) for p in r["ports"]), r["ready"], ", ".join(r["gateways"]) or "-"] for r in rows])
