"""``meshfed status``: what a federation looks like right now, and whether anything is unhealthy.

Two halves, kept apart:

- **Evaluation (pure)**: :func:`evaluate_local` and :func:`evaluate_remote` turn already-gathered inputs (a local
  run's ``state.json``, each control plane's ``/status`` JSON, which pids are alive, ``inspect_dir`` of the run's
  root; or a federation's catalog) into one report dict with the sections ``clusters``, ``services``, ``proxies``,
  ``trust`` (and, for a local run, ``addresses``), plus ``problems`` and ``healthy``. No IO, so tests feed it
  hand-made inputs and a fixed ``now``.
- **Collection (IO)**: :func:`collect_local` (HTTP to each control plane's admin address, pids, CA directories) and
  :func:`collect_remote` (the federation's ``GET /v1/catalog`` with mTLS through :class:`FederationClient`).

Unhealthy means any of: a recorded process that is dead, a control plane that does not answer, a member whose lease
lapsed (``unreachable_since``), a proxy that NACKed an xDS type, an export with ``Conflict=True`` or ``Valid=False``,
a problem a control plane reports with its manifests (a file that does not parse, a field out of range, a policy
conflict), a certificate with less than :data:`EXPIRY_FRACTION` of its lifetime left (or already expired), a pair of
clusters whose calls failed more than :data:`TRAFFIC_ERROR_RATE` of the time in the last window. A federation member
the local run did not start (a cluster added by hand) is listed from the federation's member list and judged by its
lease.

Errors (this module)::

    StatusError            the inputs could not be gathered at all (no run, bad credentials); message says what to do
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation.peering.records import PeerStatus
from federation.trust.errors import TrustError
from gateway.xdstypes import short_name
from meshfed import peerstatus
from meshfed.controlplane.status import (
    ConditionRow,
    ControlPlaneStatus,
    ManifestProblemRow,
    MemberRow,
    ProxyRow,
    decode_status,
)
from meshfed.jsondoc import DocumentError, decode, encode
from meshfed.runstate import RunState

log = logging.getLogger("meshfed.status")

EXPIRY_FRACTION = 0.10  # a certificate with less than this share of its lifetime left is "expiring"
TRAFFIC_ERROR_RATE = 0.05  # a cluster pair whose calls failed more often than this in the last window is unhealthy


class StatusError(Exception):
    """The status could not be gathered at all; the message says what to do next."""


# ---- inputs ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalInputs:
    """Everything gathered from a local run (see :func:`collect_local`)."""

    state: RunState
    alive: Mapping[int, bool]
    controlplanes: Mapping[str, ControlPlaneStatus | None]  # cluster -> /status, None if it did not answer
    errors: Mapping[str, str] = field(default_factory=dict)  # cluster -> why /status failed
    root: Mapping[str, Any] | None = None  # inspect_dir(ca/root)
    root_error: str = ""
    # The federation's own member list (lease renewals as the service saw them), when it answered.
    members: Sequence[Mapping[str, Any]] | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Requests/s and error rate per cluster pair from the sidecars' stats (meshfed.traffic.collect).
    traffic: Sequence[Mapping[str, Any]] = ()
    # During a root rotation: the federation's GET /v1/trust/status (None: not asked or no answer, see the error).
    federation_trust: Mapping[str, Any] | None = None
    federation_trust_error: str = ""
    # The federation's peer clustersets (GET /v1/peers; None: not asked or no answer, see the error).
    peers: tuple[PeerStatus, ...] | None = None
    peers_error: str = ""


@dataclass(frozen=True, slots=True)
class RemoteInputs:
    """A federation's catalog as JSON-shaped data (see :func:`collect_remote`)."""

    url: str
    members: Sequence[Mapping[str, Any]]
    services: Sequence[Mapping[str, Any]]
    roots: Sequence[Mapping[str, Any]]
    revision: int
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    peers: tuple[PeerStatus, ...] | None = None
    peers_error: str = ""


def _peers(report: dict[str, Any], peers: tuple[PeerStatus, ...] | None, error: str, problems: list[str]) -> None:
    """The report's ``peers`` section and their problems (docs/peering.md)."""
    report["peers"] = peerstatus.report_rows(peers or ())
    problems.extend(peerstatus.peer_problems(peers or ()))
    if error:
        problems.append(f"federation peers unavailable: {error}")


# ---- pure helpers ----------------------------------------------------------------------------------------------------


def _ts(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cert_health(not_before: str | None, not_after: str | None, now: datetime) -> tuple[str, float | None]:
    """("ok" | "expiring" | "expired" | "unknown", share of lifetime left)."""
    start, end = _ts(not_before), _ts(not_after)
    if end is None:
        return "unknown", None
    if now >= end:
        return "expired", 0.0
    if start is None or end <= start:
        return "ok", None
    left = (end - now).total_seconds() / (end - start).total_seconds()
    return ("expiring" if left < EXPIRY_FRACTION else "ok"), round(left, 3)


def cluster_of_node(node_id: str) -> str:
    """The pod part of an Envoy node id (``sidecar~IP~POD.NS~...``) for display."""
    parts = node_id.split("~")
    return parts[2] if len(parts) > 2 else node_id


def condition(conds: Sequence[ConditionRow], ctype: str) -> ConditionRow | None:
    return next((c for c in conds if c.type == ctype), None)


def export_problems(cluster: str, service: str, conds: Sequence[ConditionRow]) -> list[str]:
    """The KEP messages of an export that is invalid or in conflict."""
    out = []
    valid = condition(conds, "Valid")
    if valid is not None and valid.status == "False":
        out.append(f"{service} exported from {cluster} is not valid ({valid.reason}): {valid.message}")
    conflict = condition(conds, "Conflict")
    if conflict is not None and conflict.status == "True":
        out.append(f"{service} exported from {cluster} is in conflict ({conflict.reason}): {conflict.message}")
    return out


def manifest_problems(cluster: str, rows: Sequence[ManifestProblemRow]) -> list[str]:
    """A control plane's manifest problems (``/status`` ``manifest_problems``), each naming file, document and
    field as the control plane logged it."""
    out = []
    for p in rows:
        where = ": ".join(x for x in (p.file, f"document {p.document}" if p.document else "", p.field) if x)
        sev = "" if p.severity == "error" else f" ({p.severity})"
        out.append(f"{cluster}: manifest{sev}: {where + ': ' if where else ''}{p.message}")
    return out


def traffic_problems(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A cluster pair whose calls failed more than :data:`TRAFFIC_ERROR_RATE` of the time in the last window (the
    window, not the totals since start: an outage that is over does not keep the run unhealthy)."""
    out = []
    for r in rows:
        rate = r.get("window_error_rate")
        if rate is not None and rate > TRAFFIC_ERROR_RATE:
            out.append(f"traffic {r['source_cluster']} -> {r['destination_cluster']}: {100 * rate:.1f}% of calls "
                       f"failed in the last {r.get('window_s', 0):g}s (5xx or no response; more than "
                       f"{100 * TRAFFIC_ERROR_RATE:g}%); run 'meshfed diagnose SVC.NS --from {r['source_cluster']}'")
    return out


def _member_json(row: MemberRow) -> dict[str, Any]:
    """A member a control plane reports, in the shape of the federation's own member list (which may add
    ``lease_ttl_s`` and ``locality``), so the two merge."""
    data: dict[str, Any] = encode(row)
    return data


def _member_row(m: Mapping[str, Any], now: datetime, lease_ttl: Any) -> dict[str, Any]:
    """A Clusters row for a member only the federation knows (its control plane is not part of this run)."""
    renewed = _ts(m.get("renewed_at"))
    return {
        "cluster": m["cluster"], "connected": not m.get("unreachable_since"),
        "unreachable_since": m.get("unreachable_since"),
        "lease_age_s": round((now - renewed).total_seconds(), 1) if renewed else None,
        "lease_ttl_s": m.get("lease_ttl_s", lease_ttl), "network": m.get("network"),
        "locality": m.get("locality", ""), "exports": None, "imports": None, "gateway": m.get("gateway"),
        "controlplane_up": None, "controlplane_answers": None, "in_run": False,
    }


def proxy_rows(cluster: str, proxies: Sequence[ProxyRow]) -> tuple[list[dict[str, Any]], list[str]]:
    """One entry per proxy (node) with its per-type state; problems for every NACK."""
    by_node: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for row in proxies:
        node = row.node_id
        entry = by_node.setdefault(node, {"cluster": cluster, "node_id": node, "name": cluster_of_node(node),
                                          "connected": row.connected, "types": {}})
        state = row.state
        tname = short_name(row.type_url)
        entry["types"][tname] = {"state": state, "acked_version": row.acked_version,
                                 "current_version": row.current_version, "nack_error": row.nack_error}
        if state == "nacked":
            problems.append(f"{cluster}: proxy {entry['name']} NACKed {tname}: {row.nack_error}")
    for entry in by_node.values():
        states = {t["state"] for t in entry["types"].values()}
        entry["state"] = "nacked" if "nacked" in states else ("stale" if "stale" in states else "synced")
    return list(by_node.values()), problems


# ---- local evaluation ------------------------------------------------------------------------------------------------


def evaluate_local(inp: LocalInputs) -> dict[str, Any]:
    """The report for a local run (pure)."""
    state = inp.state
    now = inp.now
    problems: list[str] = []
    clusters_state = state.clusters
    statuses = inp.controlplanes

    # processes
    processes = []
    for rec in state.processes:
        up = bool(inp.alive.get(rec.pid, False))
        processes.append({"name": rec.name, "pid": rec.pid, "alive": up, "log": rec.log, "restarts": rec.restarts,
                          "held": rec.held})
        if not up:
            problems.append(f"process {rec.name} (pid {rec.pid}) is not running; see {rec.log}")
    for cluster, why in inp.errors.items():
        problems.append(f"{cluster}: control plane status unavailable: {why}")
    for cluster, peers in sorted((state.network.partitions or {}).items()):
        what = f"from {', '.join(peers)}" if peers else "from every other cluster"
        problems.append(f"{cluster}: partitioned {what} on purpose ('meshfed fault heal {cluster}' undoes it)")

    # members as the federation reports them (from any control plane that answers; the newest renewal wins)
    members: dict[str, Mapping[str, Any]] = {m["cluster"]: m for m in inp.members or ()}
    for st in statuses.values() if inp.members is None else ():
        if not st:
            continue
        for row in st.federation.members:
            have = members.get(row.cluster)
            if have is None or (_ts(row.renewed_at) or now) > (_ts(have.get("renewed_at")) or now):
                members[row.cluster] = _member_json(row)
    lease_ttl = state.federation.lease_ttl_s if state.federation is not None else None

    clusters = []
    for name, c in clusters_state.items():
        st = statuses.get(name)
        member = members.get(name)
        cp_up = bool(inp.alive.get(c.controlplane.pid, False))
        renewed = _ts(member.get("renewed_at")) if member else None
        unreachable = member.get("unreachable_since") if member else None
        fed = st.federation if st is not None else None
        connected = bool(member) and not unreachable and (fed is None or not fed.configured or fed.connected)
        clusters.append({
            "cluster": name,
            "connected": connected,
            "unreachable_since": unreachable,
            "lease_age_s": round((now - renewed).total_seconds(), 1) if renewed else None,
            "lease_ttl_s": lease_ttl,
            "network": (st.network if st else None) or (member or {}).get("network"),
            "locality": "/".join(x for x in ((st.region, st.zone) if st else ()) if x),
            "exports": sum(1 for s in st.services if s.exported) if st else None,
            "imports": len(st.imports) if st else None,
            "gateway": c.gateway.address,
            "controlplane_up": cp_up,
            "controlplane_answers": st is not None,
            "in_run": True,
        })
        if member is None:
            problems.append(f"{name}: not a member of the federation (never registered, or removed)")
        elif unreachable:
            problems.append(f"{name}: unreachable since {unreachable} (lease expired; its exports are withdrawn)")
        elif st is not None and not connected:
            problems.append(f"{name}: control plane is not connected to the federation")
        if fed is not None and fed.heartbeat_error:
            problems.append(f"{name}: heartbeats to the federation failing since {fed.heartbeat_failing_since}"
                            f": {fed.heartbeat_error}")

    for name, m in sorted(members.items()):
        if name in clusters_state:
            continue
        clusters.append(_member_row(m, now, lease_ttl))  # joined by hand: known only from the federation
        if m.get("unreachable_since"):
            problems.append(f"{name}: unreachable since {m['unreachable_since']} (lease expired; its exports are "
                            "withdrawn); not started by this run: remove it with 'meshfed federation remove "
                            f"{name}' if it left for good")
    for name, st in statuses.items():
        problems.extend(manifest_problems(name, st.manifest_problems if st else ()))

    services = _services(statuses, problems)
    proxies: list[dict[str, Any]] = []
    for name, st in statuses.items():
        if not st:
            continue
        rows, nacks = proxy_rows(name, st.proxies)
        proxies.extend(rows)
        problems.extend(nacks)
        for node, err in st.proxy_errors.items():
            problems.append(f"{name}: proxy {cluster_of_node(node)}: {err}")

    trust = _trust_local(inp, problems)
    trust["rotation"] = _rotation_local(inp)
    problems.extend(traffic_problems(inp.traffic))
    report: dict[str, Any] = {
        "kind": "local",
        "run_dir": state.run_dir,
        "now": now.isoformat(),
        "clusters": clusters,
        "services": services,
        "proxies": proxies,
        "trust": trust,
        "processes": processes,
        "addresses": addresses(state, statuses),
        "traffic": [dict(t) for t in inp.traffic],
        "prometheus": prometheus_section(state),
    }
    _peers(report, inp.peers, inp.peers_error, problems)
    report["peer_services"] = peerstatus.peer_services(statuses, problems)
    report["problems"] = problems
    report["healthy"] = not problems
    return report


def prometheus_section(state: RunState) -> dict[str, Any]:
    """The run's Prometheus: its address and URL, or why there is none (not installed); its process, if dead,
    is among the problems like any other recorded process."""
    prom = state.prometheus
    if prom is None:
        return {"url": None, "address": None, "config": None, "scrape_interval_s": None,
                "reason": "this run was started without Prometheus"}
    return {"url": prom.url, "address": prom.address or None, "config": prom.config or None,
            "scrape_interval_s": prom.scrape_interval_s, "reason": prom.reason}


def _services(statuses: Mapping[str, ControlPlaneStatus | None], problems: list[str]) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for cluster, st in statuses.items():
        if not st:
            continue
        for s in st.services:
            if not s.exported:
                continue
            entry = out.setdefault(s.service, _service_entry(s.service, s.type))
            entry["exported_by"].append(cluster)
            entry["conditions"][cluster] = encode(s.conditions)
            entry["ready"][cluster] = s.ready
            msgs = export_problems(cluster, s.service, s.conditions)
            entry["problems"].extend(msgs)
            problems.extend(msgs)
            conflict = s.condition("Conflict")
            if conflict is not None and conflict.status == "True":
                entry["conflict"] = conflict.message
    for cluster, st in statuses.items():
        if not st:
            continue
        for imp in st.imports:
            entry = out.setdefault(imp.service, _service_entry(imp.service, imp.type))
            entry["imported_by"].append(cluster)
            if imp.ips and not entry["clusterset_ip"]:
                entry["clusterset_ip"] = ",".join(imp.ips)
            entry["ports"] = [f"{p.name}/{p.port}" for p in imp.ports]
            for c, n in imp.ready_by_cluster.items():
                entry["ready"].setdefault(c, n)
    return [out[k] for k in sorted(out)]


def _service_entry(name: str, stype: str) -> dict[str, Any]:
    return {"service": name, "type": stype, "exported_by": [], "imported_by": [], "clusterset_ip": "",
            "ports": [], "ready": {}, "conditions": {}, "conflict": "", "problems": []}


def _trust_local(inp: LocalInputs, problems: list[str]) -> dict[str, Any]:
    now = inp.now
    trust: dict[str, Any] = {"roots": [], "intermediates": [], "workload_certs": [], "phase": None,
                             "next_step": None}
    if inp.root is not None:
        root = inp.root
        trust["phase"] = root.get("phase")
        trust["next_step"] = root.get("next_step")
        trust["trust_domain"] = root.get("trust_domain")
        for c in root.get("certificates", []):
            health, left = cert_health(c.get("not_before"), c.get("not_after"), now)
            trust["roots"].append({"fingerprint": c.get("fingerprint"), "role": c.get("role"),
                                   "not_after": c.get("not_after"), "health": health, "lifetime_left": left})
            if health != "ok":
                problems.append(f"trust: {c.get('role')} {str(c.get('fingerprint'))[:16]} is {health} "
                                f"(not after {c.get('not_after')})")
    elif inp.root_error:
        problems.append(f"trust: {inp.root_error}")
    for cluster, st in inp.controlplanes.items():
        if not st:
            continue
        t = st.trust
        health, left = cert_health(t.intermediate_not_before, t.intermediate_not_after, now)
        trust["intermediates"].append({"cluster": cluster, "fingerprint": t.intermediate_fingerprint or None,
                                       "not_after": t.intermediate_not_after or None, "health": health,
                                       "lifetime_left": left})
        if health not in ("ok", "unknown"):
            problems.append(f"trust: {cluster} intermediate is {health} (not after {t.intermediate_not_after})")
        for w in t.workload_certs:
            health, left = cert_health(w.not_before, w.not_after, now)
            trust["workload_certs"].append({"cluster": cluster, "spiffe_id": w.spiffe_id,
                                            "not_after": w.not_after or None, "health": health,
                                            "lifetime_left": left})
            if health not in ("ok", "unknown"):
                problems.append(f"trust: {cluster} workload certificate {w.spiffe_id} is {health} "
                                f"(not after {w.not_after})")
    return trust


def _rotation_local(inp: LocalInputs) -> dict[str, Any] | None:
    """During a root rotation: how far the running system has moved to the new root (meshfed.rotation). Progress,
    not a problem: what still depends on the old root is listed, and ``retire-root`` refuses until it is empty."""
    from meshfed.rotation import SystemReports, describe, evaluate

    if inp.root is None or inp.root.get("phase") in (None, "stable"):
        return None
    cps = {name: (st.rotation if st else None) for name, st in inp.controlplanes.items()}
    conv = evaluate(inp.root, SystemReports(controlplanes=cps, federation=inp.federation_trust,
                                            errors=dict(inp.errors), federation_error=inp.federation_trust_error))
    return {**conv.to_json(), "lines": describe(conv)}


def callable_names(st: ControlPlaneStatus | None) -> list[str]:
    """The host names a sidecar in a cluster can call: every import (clusterset.local) and every local service."""
    if not st:
        return []
    names = {f"{imp.service}.svc.clusterset.local" for imp in st.imports}
    for s in st.services:
        if f"{s.service}.svc.clusterset.local" not in names:
            names.add(f"{s.service}.svc.cluster.local")
    return sorted(names)


def addresses(state: RunState, statuses: Mapping[str, ControlPlaneStatus | None]) -> dict[str, Any]:
    """Every address a person or script needs to use a local run."""
    clusters: dict[str, Any] = {}
    workloads: list[dict[str, Any]] = []
    for name, c in state.clusters.items():
        cp, gw = c.controlplane, c.gateway
        clusters[name] = {"xds": cp.xds, "dns": cp.dns, "admin": cp.admin, "status_url": f"http://{cp.admin}/status",
                          "gateway": gw.address, "gateway_admin": gw.admin, "controlplane_log": cp.log}
        can_call = callable_names(statuses.get(name))
        for w in c.workloads:
            workloads.append({
                "cluster": name, "workload": w.name, "service": w.service or None,
                "sidecar_outbound": w.outbound or None, "sidecar_admin": w.sidecar_admin, "app": w.app or None,
                "spiffe_id": w.spiffe_id, "can_call": can_call, "pod_ip": w.pod_ip or None, "netns": w.netns or None,
            })
    net = state.network
    plan = net.plan
    network = {"mode": net.mode, "run_id": net.run_id or None, "public": plan.public_cidr if plan else None,
               "clusterset_ips": (plan.vip_alloc_cidr or plan.vip_cidr) if plan else None,
               "clusters": {c.cluster: c.cidr for c in plan.clusters} if plan else {},
               "partitions": {k: list(v) for k, v in (net.partitions or {}).items()}}
    return {"federation": state.federation.url if state.federation is not None else None, "clusters": clusters,
            "workloads": workloads, "network": network}


# ---- remote evaluation -----------------------------------------------------------------------------------------------


def evaluate_remote(inp: RemoteInputs) -> dict[str, Any]:
    """The report for a federation asked over its API (pure): clusters, services, the trust bundle's roots."""
    now = inp.now
    problems: list[str] = []
    exports_by: dict[str, int] = {}
    services = []
    for s in inp.services:
        entry = _service_entry(s["service"], s.get("type", ""))
        entry["clusterset_ip"] = ",".join(s.get("ips", []))
        entry["ports"] = [f"{p['name']}/{p['port']}" for p in s.get("ports", [])]
        entry["exported_by"] = list(s.get("clusters", []))
        entry["ready"] = dict(s.get("ready_by_cluster", {}))
        for c in entry["exported_by"]:
            exports_by[c] = exports_by.get(c, 0) + 1
        conds: dict[str, list[Mapping[str, Any]]] = {}
        for c, cond in s.get("conditions", []):
            conds.setdefault(c, []).append(cond)
        entry["conditions"] = conds
        for c, cl in conds.items():
            rows = [decode(ConditionRow, x, what=f"the catalog's {s['service']} conditions of {c}") for x in cl]
            msgs = export_problems(c, s["service"], rows)
            entry["problems"].extend(msgs)
            problems.extend(msgs)
            conflict = condition(rows, "Conflict")
            if conflict is not None and conflict.status == "True":
                entry["conflict"] = conflict.message
        services.append(entry)
    clusters = []
    for m in inp.members:
        renewed = _ts(m.get("renewed_at"))
        unreachable = m.get("unreachable_since")
        clusters.append({
            "cluster": m["cluster"], "connected": not unreachable, "unreachable_since": unreachable,
            "lease_age_s": round((now - renewed).total_seconds(), 1) if renewed else None,
            "lease_ttl_s": m.get("lease_ttl_s"), "network": m.get("network"), "locality": m.get("locality", ""),
            "exports": exports_by.get(m["cluster"], 0), "imports": len(inp.services), "gateway": m.get("gateway"),
            "controlplane_up": None, "controlplane_answers": None,
        })
        if unreachable:
            problems.append(f"{m['cluster']}: unreachable since {unreachable} (lease expired; exports withdrawn)")
    roots = []
    for r in inp.roots:
        health, left = cert_health(r.get("not_before"), r.get("not_after"), now)
        roots.append({**r, "health": health, "lifetime_left": left})
        if health != "ok":
            problems.append(f"trust: root {str(r.get('fingerprint'))[:16]} is {health}")
    report: dict[str, Any] = {
        "kind": "federation", "federation": inp.url, "revision": inp.revision, "now": now.isoformat(),
        "clusters": clusters, "services": sorted(services, key=lambda s: s["service"]), "proxies": [],
        "trust": {"roots": roots, "intermediates": [], "workload_certs": [], "phase": None, "next_step": None},
    }
    _peers(report, inp.peers, inp.peers_error, problems)
    report.update(problems=problems, healthy=not problems)
    return report


# ---- tables (pure) ---------------------------------------------------------------------------------------------------


def _yes(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def sections(report: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """The report as (title, columns, rows) tables, in reading order; problems last."""
    out: list[tuple[str, list[str], list[list[Any]]]] = []
    rows = []
    for c in report["clusters"]:
        conn = "connected" if c["connected"] else (f"UNREACHABLE since {c['unreachable_since']}"
                                                   if c["unreachable_since"] else "NOT CONNECTED")
        cp_up = _yes(c["controlplane_up"]) if c.get("in_run", True) else "- (not in this run)"
        rows.append([c["cluster"], conn, "" if c["lease_age_s"] is None else f"{c['lease_age_s']}s",
                     c["network"], c["locality"], _dash(c["exports"]), _dash(c["imports"]), c["gateway"], cp_up])
    out.append(("Clusters", ["cluster", "federation", "last lease change", "network", "locality", "exports", "imports",
                             "gateway", "control plane up"], rows))
    rows = []
    for s in report["services"]:
        ready = ", ".join(f"{c}={n}" for c, n in sorted(s["ready"].items()))
        note = "; ".join(s["problems"]) or (f"conflict: {s['conflict']}" if s["conflict"] else "ok")
        rows.append([s["service"], s["type"], ", ".join(s["exported_by"]) or "-", s["clusterset_ip"] or "-",
                     ready or "-", note])
    out.append(("Services", ["service", "type", "exported by", "ClusterSetIP", "ready endpoints", "status"], rows))
    if report["proxies"]:
        rows = []
        for p in report["proxies"]:
            types = ", ".join(
                f"{t} {v['state']}" + (f" ({v['nack_error']})" if v["state"] == "nacked" else "")
                for t, v in sorted(p["types"].items()))
            rows.append([p["cluster"], p["name"], "yes" if p["connected"] else "NO", p["state"], types])
        out.append(("Proxies", ["cluster", "proxy", "connected", "state", "xDS types"], rows))
    trust = report["trust"]
    rows = [["root", r.get("role", "root"), str(r.get("fingerprint"))[:16], r.get("not_after"), r["health"]]
            for r in trust["roots"]]
    rows += [["intermediate", i["cluster"], str(i.get("fingerprint"))[:16], i["not_after"], i["health"]]
             for i in trust["intermediates"]]
    leaves = trust["workload_certs"]
    if leaves:
        soonest = min(leaves, key=lambda w: str(w["not_after"]))
        bad = [w for w in leaves if w["health"] not in ("ok", "unknown")]
        rows.append(["workload certs", f"{len(leaves)} issued", "", f"soonest {soonest['not_after']}",
                     f"{len(bad)} expiring" if bad else "ok"])
    title = "Trust" + (f" (rotation phase: {trust['phase']}; next: {trust['next_step']})" if trust["phase"] else "")
    out.append((title, ["certificate", "of", "fingerprint", "not after", "health"], rows))
    rot = trust.get("rotation")
    if rot:
        verdict = "everything moved: `retire-root` may go ahead" if rot["done"] else "not converged"
        out.append((f"Rotation convergence ({verdict})", ["#", "state"],
                    [[i + 1, line] for i, line in enumerate(rot["lines"])]))
    if report.get("peers"):
        out.append(peerstatus.peer_table(peerstatus.decode_peers(report["peers"], what="status report")))
    if report.get("peer_services"):
        out.append(peerstatus.peer_service_table(report["peer_services"]))
    if report.get("traffic"):
        from meshfed.traffic import table as traffic_table

        out.append(traffic_table(report["traffic"]))
    addr = report.get("addresses")
    if addr:
        rows = [[name, a["xds"], a["dns"], a["admin"], a["gateway"], a["gateway_admin"]]
                for name, a in addr["clusters"].items()]
        out.append((f"Addresses (federation {addr['federation']})",
                    ["cluster", "xds", "dns", "admin (/status)", "gateway", "gateway admin"], rows))
        rows = [[w["cluster"], w["workload"], w["service"] or "(client)",
                 w["sidecar_outbound"] or f"pod {w.get('pod_ip')} (captured)", w["sidecar_admin"],
                 ", ".join(n.replace(".svc.clusterset.local", "").replace(".svc.cluster.local", " (local)")
                           for n in w["can_call"])] for w in addr["workloads"]]
        out.append(("Workloads", ["cluster", "workload", "service", "sidecar outbound / pod", "sidecar admin",
                                  "can call (NAME.NS: NAME.NS.svc.clusterset.local; (local): "
                                  "NAME.NS.svc.cluster.local only)"], rows))
    prom = report.get("prometheus")
    if prom:
        out.append(("Prometheus", ["url", "config", "scrape interval"],
                    [[prom["url"] or f"- ({prom['reason']})", prom["config"] or "-",
                      f"{prom['scrape_interval_s']:g}s" if prom["scrape_interval_s"] else "-"]]))
    restarted = [p for p in report.get("processes", []) if p.get("restarts")]
    if restarted:
        out.append(("Restarted processes", ["process", "pid", "restarts", "log"],
                    [[p["name"], p["pid"], p["restarts"], p["log"]] for p in restarted]))
    if report["problems"]:
        out.append(("Problems", ["#", "problem"], [[i + 1, p] for i, p in enumerate(report["problems"])]))
    return out


def _dash(value: Any) -> Any:
    return "-" if value is None else value


# ---- collection (IO) -------------------------------------------------------------------------------------------------


def fetch_json(url: str, *, timeout: float = 3.0) -> dict[str, Any]:
    """GET a JSON document over plain HTTP on loopback (a control plane's admin address)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except urllib.error.HTTPError as exc:
        raise StatusError(f"GET {url} answered {exc.code}") from exc
    except (OSError, ValueError) as exc:
        raise StatusError(f"GET {url} failed: {exc}") from exc


def fetch_status(admin: str, *, what: str) -> ControlPlaneStatus:
    """GET a control plane's ``/status`` at its admin ``HOST:PORT`` (``what``: its name, for errors)."""
    url = f"http://{admin}/status"
    data = fetch_json(url)
    try:
        return decode_status(data, what=f"the /status of {what} ({url})")
    except DocumentError as exc:
        raise StatusError(str(exc)) from exc


def collect_local(run_dir: Path) -> LocalInputs:
    """Read a local run: state.json, which pids live, each control plane's /status, the root's rotation state."""
    from federation.trust.store import inspect_dir
    from meshfed import local

    try:
        state = local.read_state(run_dir)
    except local.LocalRunError as exc:
        raise StatusError(str(exc)) from exc
    stopped = local.stopped_message(run_dir, state)
    if stopped:
        raise StatusError(stopped)
    alive = {p.pid: local.is_running(p) for p in state.processes}
    statuses: dict[str, ControlPlaneStatus | None] = {}
    errors: dict[str, str] = {}
    for name, c in state.clusters.items():
        try:
            statuses[name] = fetch_status(c.controlplane.admin, what=name)
        except StatusError as exc:
            statuses[name] = None
            errors[name] = str(exc)
    root, root_error = None, ""
    root_dir = state.ca.root if state.ca is not None else ""
    if root_dir:
        try:
            root = inspect_dir(Path(root_dir))
        except (TrustError, OSError) as exc:
            root_error = f"cannot read the root directory {root_dir}: {exc}"
    fed_up = state.federation is not None and alive.get(state.federation.pid, False)
    members = local_members(state) if fed_up else None
    fed_url = state.federation.url if state.federation is not None else ""
    first = next(iter(state.clusters.items()), None)
    fed_trust, fed_trust_error = None, ""
    if root is not None and root.get("phase") not in (None, "stable") and fed_url and first is not None:
        from federation.client import ClientError
        from meshfed.rotation import federation_trust_status

        try:
            fed_trust = asyncio.run(federation_trust_status(fed_url, Path(first[1].ca), first[0]))
        except (ClientError, TrustError, OSError) as exc:
            fed_trust_error = str(exc)
    from meshfed import traffic

    peers, peers_error = None, ""
    if members is not None and fed_url and first is not None:
        peers, peers_error = _collect_peers(fed_url, Path(first[1].ca), first[0])
    return LocalInputs(state=state, alive=alive, controlplanes=statuses, errors=errors, root=root,
                       root_error=root_error, members=members, traffic=traffic.collect(state),
                       federation_trust=fed_trust, federation_trust_error=fed_trust_error, peers=peers,
                       peers_error=peers_error)


def _collect_peers(url: str, ca_dir: Path, cluster: str) -> tuple[tuple[PeerStatus, ...] | None, str]:
    from federation.client import ClientError

    try:
        return asyncio.run(peerstatus.fetch_peers(url, ca_dir, cluster)), ""
    except (ClientError, TrustError, OSError, DocumentError) as exc:
        return None, str(exc)


def local_members(state: RunState) -> list[Mapping[str, Any]] | None:
    """The federation's member list of a local run (asked with one of the run's cluster identities); None when the
    federation does not answer."""
    first = next(iter(state.clusters.items()), None)
    if state.federation is None or first is None:
        return None
    try:
        return list(asyncio.run(_local_catalog(state.federation.url, Path(first[1].ca), first[0])).members)
    except (StatusError, TrustError, OSError) as exc:
        log.info("federation catalog unavailable, using the control planes' view: %s", exc)
        return None


async def _local_catalog(url: str, ca_dir: Path, cluster: str) -> RemoteInputs:
    """The federation's catalog, asked with a throwaway identity of one of the run's clusters."""
    from discovery.model import ClusterId
    from federation.client import ClientError, FederationClient, cluster_credentials

    ctx, bundle = cluster_credentials(ca_dir, ClusterId(cluster))
    try:
        async with FederationClient(url, ssl_context=ctx, cluster=ClusterId(cluster), bundle=bundle,
                                    request_timeout_s=5.0) as client:
            listing = await client.catalog()
    except ClientError as exc:
        raise StatusError(str(exc)) from exc
    return catalog_inputs(url, listing.catalog, listing.trust_bundle_pem)


def catalog_inputs(url: str, catalog: Any, bundle_pem: str, *, now: datetime | None = None) -> RemoteInputs:
    """A :class:`federation.catalog.Catalog` as JSON-shaped inputs for :func:`evaluate_remote` (pure)."""
    from cryptography import x509

    from federation.trust.bundle import fingerprint, load_pem_certs

    members = []
    for cid, m in sorted(catalog.members.items()):
        members.append({
            "cluster": str(cid), "network": str(m.info.network),
            "locality": "/".join(x for x in (m.info.region, m.info.zone) if x),
            "gateway": f"{m.info.gateway_host}:{m.info.gateway_port}",
            "renewed_at": m.renewed_at.isoformat(), "lease_ttl_s": m.lease_ttl_s,
            "unreachable_since": m.unreachable_since.isoformat() if m.unreachable_since else None,
        })
    services = []
    for key, s in sorted(catalog.services.items(), key=lambda kv: str(kv[0])):
        imp = s.import_
        services.append({
            "service": str(key), "type": str(imp.type), "ips": list(imp.ips),
            "clusters": [str(c) for c in imp.clusters],
            "ports": [{"name": p.name, "port": p.port} for p in imp.ports],
            "ready_by_cluster": {str(sh.cluster): sh.ready for sh in s.endpoints},
            "conditions": [(str(c), {"type": cond.type, "status": str(cond.status), "reason": cond.reason,
                                     "message": cond.message}) for c, cond in s.conditions],
        })
    roots: list[dict[str, Any]] = []
    if bundle_pem:
        certs: list[x509.Certificate] = load_pem_certs(bundle_pem.encode(), what="the federation's trust bundle")
        roots = [{"fingerprint": fingerprint(c), "role": "root", "not_before": c.not_valid_before_utc.isoformat(),
                  "not_after": c.not_valid_after_utc.isoformat()} for c in certs]
    return RemoteInputs(url=url, members=members, services=services, roots=roots, revision=int(catalog.revision),
                        now=now or datetime.now(UTC))


async def _fetch_catalog(url: str, chain: bytes, key_pem: bytes, bundle_bytes: bytes, *, what: str
                         ) -> tuple[Any, str, Any]:
    from discovery.model import ClusterId
    from federation.client import ClientError, FederationClient
    from federation.trust.bundle import TrustBundle, load_pem_certs
    from federation.trust.ca import spiffe_id_of
    from federation.trust.tls import client_ssl_context

    try:
        leaf = load_pem_certs(chain, what="the client certificate")[0]
        sid = spiffe_id_of(leaf, what="the client certificate")
        bundle = TrustBundle.from_pem(sid.trust_domain, bundle_bytes, what="the CA bundle")
        ctx = client_ssl_context(chain, key_pem, bundle)
    except (TrustError, ValueError, IndexError) as exc:
        raise StatusError(f"bad credentials ({what}): {exc}") from exc
    cluster = ClusterId(sid.cluster_name or "status")
    try:
        async with FederationClient(url, ssl_context=ctx, cluster=cluster, bundle=bundle,
                                    request_timeout_s=10.0) as client:
            listing = await client.catalog()
            try:
                peers: Any = await client.peers()
            except ClientError as exc:
                peers = str(exc)
    except ClientError as exc:
        raise StatusError(f"the federation at {url} did not answer the catalog: {exc}") from exc
    return listing.catalog, listing.trust_bundle_pem, peers


def collect_remote(url: str, *, cert: Path, key: Path, ca_bundle: Path) -> RemoteInputs:
    """Ask a real federation for its catalog (mTLS; the certificate must be a cluster's)."""
    try:
        chain, key_pem, bundle_bytes = cert.read_bytes(), key.read_bytes(), ca_bundle.read_bytes()
    except OSError as exc:
        raise StatusError(f"cannot read credentials: {exc}") from exc
    catalog, bundle_pem, peer_rows = asyncio.run(_fetch_catalog(url, chain, key_pem, bundle_bytes,
                                                                what=f"{cert}, {key}, {ca_bundle}"))
    inputs = catalog_inputs(url, catalog, bundle_pem)
    if isinstance(peer_rows, str):
        return replace(inputs, peers_error=peer_rows)
    try:
        return replace(inputs, peers=peerstatus.decode_peers(peer_rows, what=f"GET {url}/v1/peers"))
    except DocumentError as exc:
        return replace(inputs, peers_error=str(exc))
