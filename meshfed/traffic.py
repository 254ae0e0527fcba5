"""The traffic section of ``meshfed status``: requests/s and error rate between each pair of clusters.

Read from the Envoys' own stats (``gateway.telemetry``): every sidecar's ``envoy_meshfed_requests_total`` series
with ``reporter="source"``, i.e. as the *caller* saw each request (so a request that never reached the callee, a
connect failure or no healthy endpoint, still counts). Summed per (``source_cluster``, ``destination_cluster``).

Two scrapes ``interval_s`` apart give the current rate; the first scrape's cumulative counts give the totals since
each Envoy started. An *error* is a response code of 500 or more, or 0 (reset or no response at all); 4xx answers
are the application's business (and 403 is authorization working) and are not errors here. A request that matched
no route has no destination cluster: it is reported under ``(no route)``. Proxyless gRPC clients have no Envoy and
are not counted on the caller side (their calls show on the callee's gateway).

Pure: :func:`pair_totals` and :func:`traffic_rows`; IO: :func:`collect` (HTTP GETs to loopback admin ports).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.telemetry import REPORTER_SOURCE, parse_prometheus
from meshfed.runstate import RunState

METRIC = "envoy_meshfed_requests_total"
NO_ROUTE = "(no route)"


@dataclass(frozen=True, slots=True)
class Totals:
    requests: float = 0.0
    errors: float = 0.0

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.requests + other.requests, self.errors + other.errors)


def is_error(code: str) -> bool:
    try:
        value = int(code)
    except ValueError:
        return True
    return value == 0 or value >= 500


def pair_totals(texts: Iterable[str]) -> dict[tuple[str, str], Totals]:
    """Cumulative (requests, errors) per (source cluster, destination cluster) over Prometheus texts."""
    out: dict[tuple[str, str], Totals] = {}
    for text in texts:
        for labels, value in parse_prometheus(text, METRIC):
            if labels.get("reporter") != REPORTER_SOURCE:
                continue
            key = (labels.get("source_cluster", ""), labels.get("destination_cluster") or NO_ROUTE)
            out[key] = out.get(key, Totals()) + Totals(value, value if is_error(labels.get("response_code", "")) else 0)
    return out


def traffic_rows(before: Mapping[tuple[str, str], Totals], after: Mapping[tuple[str, str], Totals],
                 interval_s: float) -> list[dict[str, Any]]:
    """One row per cluster pair: totals (from ``after``) and the rate over the interval between the scrapes."""
    rows = []
    for key in sorted(set(before) | set(after)):
        a, b = after.get(key, Totals()), before.get(key, Totals())
        window = Totals(max(0.0, a.requests - b.requests), max(0.0, a.errors - b.errors))
        rows.append({
            "source_cluster": key[0],
            "destination_cluster": key[1],
            "requests": int(a.requests),
            "errors": int(a.errors),
            "error_rate": round(a.errors / a.requests, 4) if a.requests else 0.0,
            "rps": round(window.requests / interval_s, 2) if interval_s > 0 else 0.0,
            "window_error_rate": round(window.errors / window.requests, 4) if window.requests else None,
            "window_s": round(interval_s, 2),
        })
    return rows


def table(rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[str], list[list[Any]]]:
    """The rows as a ``meshfed.output`` table."""
    body = []
    for r in rows:
        window = "-" if r["window_error_rate"] is None else f"{100 * r['window_error_rate']:.1f}%"
        body.append([r["source_cluster"], r["destination_cluster"], f"{r['rps']:.2f}", window, r["requests"],
                     r["errors"], f"{100 * r['error_rate']:.1f}%"])
    window_s = rows[0]["window_s"] if rows else 0
    return (f"Traffic (as callers' sidecars saw it; rate over the last {window_s:g}s)",
            ["from", "to", "req/s", "errors (window)", "requests", "errors", "error rate"], body)


def _scrape(admin: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(f"http://{admin}/stats/prometheus", timeout=timeout) as resp:
            return str(resp.read().decode(errors="replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return ""  # a sidecar that does not answer is reported by the processes check, not here


def sidecar_admins(state: RunState) -> list[str]:
    return [w.sidecar_admin for c in state.clusters.values() for w in c.workloads if w.sidecar_admin]


def collect(state: RunState, *, interval_s: float = 1.0, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Scrape every sidecar of a local run twice, ``interval_s`` apart, and return the traffic rows."""
    admins = sidecar_admins(state)
    if not admins:
        return []
    before = pair_totals(_scrape(a, timeout) for a in admins)
    started = time.monotonic()
    time.sleep(interval_s)
    after = pair_totals(_scrape(a, timeout) for a in admins)
    return traffic_rows(before, after, time.monotonic() - started)
