"""The dashboard's view (pure): one JSON document built from a ``meshfed status`` report and what Prometheus says.

The page draws exactly this document and tests read it from ``GET /api/view``::

    clusters   [{name, connected, lease: {state, age_s, ttl_s, unreachable_since}, network, locality,
                 gateway: {address, state}, controlplane: {state}, exports: [svc], imports: [svc]}]
    edges      [{source, destination, service, state, requests_per_s, error_ratio, p50_ms, p99_ms}]
    services   [{service, type, exported_by, imported_by, problems}]
    trust      {phase, next_step, trust_domain, roots: [...], rotation}
    peers      what ``meshfed status`` reports (docs/peering.md)
    problems   every problem ``meshfed status`` knows, then the dashboard's own (Prometheus unreachable)
    prometheus {url, error}

An edge is a (calling cluster, exporting cluster, service) the federation makes possible: the caller imports a
service another cluster exports, so every possible cross-cluster call is drawn before any traffic flows; the
numbers come from the recording rules (:mod:`meshfed.prometheus`). Its ``state``: ``failing`` when its error ratio
is over :data:`meshfed.status.TRAFFIC_ERROR_RATE` or the destination's gateway is down, ``ok`` with traffic,
``idle`` without.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshfed.status import TRAFFIC_ERROR_RATE

HOST_SUFFIX = ".svc.clusterset.local"
UP, DOWN, UNKNOWN = "up", "down", "unknown"
OK, FAILING, IDLE = "ok", "failing", "idle"


def short_service(name: str) -> str:
    """``ratings.default`` for the metrics' ``ratings.default.svc.clusterset.local`` (and for itself)."""
    return name.removesuffix(HOST_SUFFIX)


def _process_state(report: Mapping[str, Any], name: str) -> str | None:
    for p in report.get("processes") or ():
        if p["name"] == name:
            return UP if p["alive"] else DOWN
    return None


def _scraped_state(up: Mapping[str, bool] | None, role: str, cluster: str) -> str | None:
    if up is None:
        return None
    key = f"{role}/{cluster}/"
    return None if key not in up else (UP if up[key] else DOWN)


def component_state(report: Mapping[str, Any], up: Mapping[str, bool] | None, *, role: str, cluster: str,
                    process: str) -> str:
    """``down`` if the run's process is dead or Prometheus cannot scrape it, ``up`` if either says so."""
    states = [s for s in (_process_state(report, process), _scraped_state(up, role, cluster)) if s is not None]
    if DOWN in states:
        return DOWN
    return UP if states else UNKNOWN


def _lease(c: Mapping[str, Any]) -> dict[str, Any]:
    if c.get("unreachable_since"):
        state = "expired"
    elif c.get("connected"):
        state = "held"
    else:
        state = "not connected"
    return {"state": state, "age_s": c.get("lease_age_s"), "ttl_s": c.get("lease_ttl_s"),
            "unreachable_since": c.get("unreachable_since")}


def build(report: Mapping[str, Any], *, metrics: Sequence[Mapping[str, Any]] = (),
          up: Mapping[str, bool] | None = None, prometheus_url: str | None = None,
          prometheus_error: str = "", now: str = "") -> dict[str, Any]:
    """The view from a status ``report`` (local or remote), Prometheus's edge ``metrics``
    (:func:`meshfed.prometheus.edges`) and its targets' ``up``."""
    services = list(report.get("services") or ())
    clusters: list[dict[str, Any]] = []
    gateway_state: dict[str, str] = {}
    for c in report.get("clusters") or ():
        name = str(c["cluster"])
        gw = component_state(report, up, role="gateway", cluster=name, process=f"{name}/eastwest-gateway")
        cp = component_state(report, up, role="controlplane", cluster=name, process=f"{name}/controlplane")
        if c.get("controlplane_answers") is False:
            cp = DOWN
        gateway_state[name] = gw
        clusters.append({
            "name": name, "connected": bool(c.get("connected")), "lease": _lease(c),
            "network": c.get("network"), "locality": c.get("locality") or "",
            "gateway": {"address": c.get("gateway"), "state": gw},
            "controlplane": {"state": cp},
            "exports": sorted(s["service"] for s in services if name in s.get("exported_by", ())),
            "imports": sorted(s["service"] for s in services
                              if name in s.get("imported_by", ()) and name not in s.get("exported_by", ())),
            "in_run": bool(c.get("in_run", False)),
        })
    names = {c["name"] for c in clusters}
    by_key = {(m.get("source_cluster", ""), m.get("destination_cluster", ""),
               short_service(str(m.get("destination_service", "")))): m for m in metrics}
    edges: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for s in services:
        for caller in s.get("imported_by", ()):
            for dest in s.get("exported_by", ()):
                if caller != dest and caller in names and dest in names:
                    seen.add((caller, dest, s["service"]))
    for key in by_key:  # traffic to a pair the catalog no longer offers (a withdrawn export) is shown too
        if key[0] in names and key[1] in names and key[0] != key[1]:
            seen.add(key)
    for src, dst, svc in sorted(seen):
        m = by_key.get((src, dst, svc), {})
        rate, ratio = m.get("requests_per_s"), m.get("error_ratio")
        if gateway_state.get(dst) == DOWN or (ratio is not None and ratio > TRAFFIC_ERROR_RATE):
            state = FAILING
        elif rate:
            state = OK
        else:
            state = IDLE
        edges.append({"source": src, "destination": dst, "service": svc, "state": state,
                      "requests_per_s": rate, "error_ratio": ratio, "p50_ms": m.get("p50_ms"),
                      "p99_ms": m.get("p99_ms"), "gateway": gateway_state.get(dst, UNKNOWN)})
    problems = list(report.get("problems") or ())
    if prometheus_error:
        problems.append(f"prometheus: {prometheus_error}")
    trust = report.get("trust") or {}
    return {
        "kind": report.get("kind"),
        "now": now or report.get("now"),
        "healthy": not problems,
        "clusters": clusters,
        "edges": edges,
        "services": [{"service": s["service"], "type": s.get("type"), "exported_by": list(s.get("exported_by", ())),
                      "imported_by": list(s.get("imported_by", ())), "problems": list(s.get("problems", ()))}
                     for s in services],
        "trust": {"phase": trust.get("phase"), "next_step": trust.get("next_step"),
                  "trust_domain": trust.get("trust_domain"),
                  "roots": [{"fingerprint": r.get("fingerprint"), "role": r.get("role"),
                             "not_after": r.get("not_after"), "health": r.get("health")}
                            for r in trust.get("roots") or ()],
                  "rotation": (trust.get("rotation") or {}).get("lines")},
        "peers": list(report.get("peers") or ()),
        "problems": problems,
        "prometheus": {"url": prometheus_url, "error": prometheus_error},
    }


def unavailable(error: str, *, prometheus_url: str | None = None, now: str = "") -> dict[str, Any]:
    """The view when the status could not be gathered at all (no run, federation unreachable)."""
    return {"kind": None, "now": now, "healthy": False, "clusters": [], "edges": [], "services": [],
            "trust": {"phase": None, "next_step": None, "trust_domain": None, "roots": [], "rotation": None},
            "peers": [], "problems": [error], "prometheus": {"url": prometheus_url, "error": ""}, "error": error}
