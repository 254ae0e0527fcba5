"""Prometheus for a federation: the scrape configuration and recording rules meshfed renders, and the Prometheus
process of a local run.

Pure half (no IO): :func:`run_targets` lists what a local run serves metrics on (every Envoy's
``/stats/prometheus``, every control plane's ``/metrics``, the federation's ``/metrics``), :func:`render_config`
turns targets into a ``prometheus.yml`` document, :func:`recording_rules` is the rules file. Every target carries
the labels ``cluster`` (absent for a local run's federation, which belongs to no cluster) and ``role``
(``sidecar``, ``gateway``, ``controlplane``, ``federation``); sidecars also ``workload``.

How each is reached: the Envoys' admin ports are plain HTTP on loopback (or on the pod's address behind the run's
own bridge in a netns run); the control planes' admin port is plain HTTP on loopback; the federation's API is
HTTPS with client certificates required (SPIFFE identities that Prometheus cannot verify: Go checks host names, and
the federation's certificate carries only a SPIFFE URI), so a local run's federation also serves ``/metrics`` alone
on a loopback port (``meshfed federation serve --metrics-listen``), which Prometheus scrapes. Nothing is scraped
across clusters: each cluster's Prometheus of an install scrapes its own pods (:func:`kubernetes_config`).

IO half: :func:`start` starts Debian's ``prometheus`` with the rendered files, storage under the run directory,
on a loopback port, and :func:`query` asks its HTTP API (``/api/v1/query``).

The recording rules (one series per (source cluster, destination cluster, destination service), as the *callers'*
sidecars saw each request, ``reporter="source"``)::

    meshfed:edge_requests:rate1m        requests/s
    meshfed:edge_errors:rate1m          errors/s (response code 5xx, or 0: no response)
    meshfed:edge_error_ratio:rate1m     errors / requests
    meshfed:edge_latency_ms:p50_1m      median request duration (ms)
    meshfed:edge_latency_ms:p99_1m      99th percentile (ms)

Errors (this module)::

    PrometheusError        Prometheus could not be started or did not answer; the message names its log or URL
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.telemetry import DURATION, REPORTER_SOURCE, REQUESTS, STAT_PREFIX
from meshfed.runstate import RunState

log = logging.getLogger("meshfed.prometheus")

BINARY = "prometheus"
CONFIG_FILE = "prometheus.yml"
RULES_FILE = "rules.yml"
DEFAULT_SCRAPE_INTERVAL = 5.0

REQUESTS_METRIC = f"envoy_{STAT_PREFIX}_{REQUESTS}"
DURATION_METRIC = f"envoy_{STAT_PREFIX}_{DURATION}"
EDGE_LABELS = ("source_cluster", "destination_cluster", "destination_service")
ERROR_CODES = "5..|0"  # as meshfed.traffic.is_error: 5xx, or no response

RULE_REQUESTS = "meshfed:edge_requests:rate1m"
RULE_ERRORS = "meshfed:edge_errors:rate1m"
RULE_ERROR_RATIO = "meshfed:edge_error_ratio:rate1m"
RULE_P50 = "meshfed:edge_latency_ms:p50_1m"
RULE_P99 = "meshfed:edge_latency_ms:p99_1m"

ROLE_SIDECAR, ROLE_GATEWAY, ROLE_CONTROLPLANE, ROLE_FEDERATION = "sidecar", "gateway", "controlplane", "federation"
ROLES = (ROLE_SIDECAR, ROLE_GATEWAY, ROLE_CONTROLPLANE, ROLE_FEDERATION)
ENVOY_PATH, METRICS_PATH = "/stats/prometheus", "/metrics"


class PrometheusError(Exception):
    """Prometheus could not be started, or its API did not answer; the message says where to look."""


@dataclass(frozen=True, slots=True)
class Target:
    """One scrape target: ``address`` (HOST:PORT) serving ``path`` in Prometheus text format."""

    role: str
    address: str
    path: str
    labels: Mapping[str, str] = field(default_factory=dict)  # cluster (and workload), besides role


# ---- rendering (pure) ----------------------------------------------------------------------------------------------


def run_targets(state: RunState) -> list[Target]:
    """Every metrics endpoint of a local run, from its ``state.json`` (the addresses ``meshfed status`` uses)."""
    out: list[Target] = []
    if state.federation is not None and state.federation.metrics:
        out.append(Target(ROLE_FEDERATION, state.federation.metrics, METRICS_PATH))
    for cluster, c in state.clusters.items():
        out.append(Target(ROLE_CONTROLPLANE, c.controlplane.admin, METRICS_PATH, {"cluster": cluster}))
        out.append(Target(ROLE_GATEWAY, c.gateway.admin, ENVOY_PATH, {"cluster": cluster}))
        for w in c.workloads:
            out.append(Target(ROLE_SIDECAR, w.sidecar_admin, ENVOY_PATH, {"cluster": cluster, "workload": w.name}))
    return out


def _seconds(value: float) -> str:
    """A Prometheus duration (``500ms``, ``5s``) for ``value`` seconds (at least 100 ms)."""
    ms = max(100, round(value * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def render_config(targets: Sequence[Target], *, scrape_interval: float = DEFAULT_SCRAPE_INTERVAL,
                  rules_file: str = RULES_FILE) -> dict[str, Any]:
    """``prometheus.yml`` as a document: one job per role (``meshfed-<role>``), each target a static config with
    its labels, and the recording rules file."""
    interval = _seconds(scrape_interval)
    jobs: list[dict[str, Any]] = []
    for role in ROLES:
        mine = [t for t in targets if t.role == role]
        if not mine:
            continue
        jobs.append({
            "job_name": f"meshfed-{role}",
            "metrics_path": mine[0].path,
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "static_configs": [{"targets": [t.address], "labels": {"role": role, **dict(t.labels)}} for t in mine],
        })
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [rules_file],
        "scrape_configs": jobs,
    }


def recording_rules(*, window: str = "1m") -> dict[str, Any]:
    """The rules file: rate, error rate and ratio, p50 and p99 latency per edge (docs/observability.md)."""
    by = ", ".join(EDGE_LABELS)
    src = f'reporter="{REPORTER_SOURCE}"'
    requests = f"sum by ({by}) (rate({REQUESTS_METRIC}{{{src}}}[{window}]))"
    errors = f'sum by ({by}) (rate({REQUESTS_METRIC}{{{src},response_code=~"{ERROR_CODES}"}}[{window}]))'

    def quantile(q: float) -> str:
        return f"histogram_quantile({q}, sum by (le, {by}) (rate({DURATION_METRIC}_bucket{{{src}}}[{window}])))"

    return {"groups": [{"name": "meshfed-edges", "rules": [
        {"record": RULE_REQUESTS, "expr": requests},
        # 0 errors/s where there were requests but none failed (so the ratio below is 0, not absent)
        {"record": RULE_ERRORS, "expr": f"{errors} or ({RULE_REQUESTS} * 0)"},
        {"record": RULE_ERROR_RATIO, "expr": f"{RULE_ERRORS} / ({RULE_REQUESTS} > 0)"},
        {"record": RULE_P50, "expr": quantile(0.5)},
        {"record": RULE_P99, "expr": quantile(0.99)},
    ]}]}


def dump(doc: Mapping[str, Any]) -> str:
    return str(yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False))


# Kubernetes: each cluster's Prometheus scrapes the pods of its own cluster (no scraping across clusters).
SIDECAR_METRICS_PORT = 15090  # meshfed.inject.METRICS_PORT: the injected container's /stats/prometheus


def kubernetes_config(*, cluster: str, namespace: str, controlplane_port: int, gateway_port: int,
                      federation_port: int | None, scrape_interval: float = 15.0) -> dict[str, Any]:
    """A ServiceMonitor-free ``prometheus.yml`` for one cluster of an install: ``kubernetes_sd_configs`` over
    pods, keeping the sidecars' metrics port, the control plane's and gateway's metrics ports (and the federation's
    in the federation cluster), each target labelled with ``cluster`` and ``role`` (and ``namespace``, ``pod``)."""

    def job(role: str, path: str, keep: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "job_name": f"meshfed-{role}",
            "metrics_path": path,
            "kubernetes_sd_configs": [{"role": "pod"}],
            "relabel_configs": [
                *keep,
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"target_label": "cluster", "replacement": cluster},
                {"target_label": "role", "replacement": role},
            ],
        }

    def component(name: str, port: int) -> list[dict[str, Any]]:
        return [
            {"source_labels": ["__meta_kubernetes_namespace"], "regex": namespace, "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"], "regex": name,
             "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_container_port_number"], "regex": str(port), "action": "keep"},
        ]

    jobs = [
        job(ROLE_SIDECAR, ENVOY_PATH, [
            {"source_labels": ["__meta_kubernetes_pod_container_port_number"], "regex": str(SIDECAR_METRICS_PORT),
             "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "regex": "meshfed-proxy", "action": "keep"},
        ]),
        job(ROLE_GATEWAY, ENVOY_PATH, component("meshfed-eastwest-gateway", gateway_port)),
        job(ROLE_CONTROLPLANE, METRICS_PATH, component("meshfed-controlplane", controlplane_port)),
    ]
    if federation_port is not None:
        jobs.append(job(ROLE_FEDERATION, METRICS_PATH, component("meshfed-federation", federation_port)))
    interval = _seconds(scrape_interval)
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [RULES_FILE], "scrape_configs": jobs}


# ---- the local run's Prometheus (IO) -------------------------------------------------------------------------------


def binary() -> str | None:
    """Debian's ``prometheus`` on PATH, or None when it is not installed."""
    return shutil.which(BINARY)


def write_files(directory: Path, targets: Sequence[Target], *, scrape_interval: float) -> Path:
    """Write ``prometheus.yml`` and ``rules.yml`` into ``directory``; returns the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RULES_FILE).write_text(dump(recording_rules()))
    config = directory / CONFIG_FILE
    config.write_text(dump(render_config(targets, scrape_interval=scrape_interval,
                                         rules_file=str((directory / RULES_FILE).resolve()))))
    return config


def command(exe: str, *, config: Path, data: Path, listen: str) -> list[str]:
    """The argv of a run's Prometheus: its config, storage under the run directory, the API on ``listen``."""
    return [exe, f"--config.file={config.resolve()}", f"--storage.tsdb.path={data.resolve()}",
            f"--web.listen-address={listen}", "--storage.tsdb.retention.time=1d", "--log.level=warn"]


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1.0) as resp:
            return int(resp.status) == 200
    except (OSError, ValueError):
        return False


def query(url: str, promql: str, *, timeout: float = 3.0) -> list[dict[str, Any]]:
    """An instant query against Prometheus's HTTP API: the ``result`` vector (each ``metric`` labels and
    ``value`` [time, "number"])."""
    target = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise PrometheusError(f"{url}: query {promql!r} refused: {exc.code} {exc.read()[:200]!r}") from exc
    except (OSError, ValueError) as exc:
        raise PrometheusError(f"{url}: query {promql!r} failed: {exc}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"{url}: query {promql!r}: {body.get('error', body)}")
    data = body.get("data") or {}
    if data.get("resultType") != "vector":
        raise PrometheusError(f"{url}: query {promql!r}: expected a vector, got {data.get('resultType')}")
    return list(data.get("result") or [])


def edges(url: str, *, timeout: float = 3.0) -> list[dict[str, Any]]:
    """The recorded edge series, one dict per (source, destination, service): ``requests_per_s``,
    ``error_ratio``, ``p50_ms``, ``p99_ms`` (None where there is no sample)."""
    fields = {"requests_per_s": RULE_REQUESTS, "errors_per_s": RULE_ERRORS, "error_ratio": RULE_ERROR_RATIO,
              "p50_ms": RULE_P50, "p99_ms": RULE_P99}
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for name, rule in fields.items():
        for sample in query(url, rule, timeout=timeout):
            labels = sample.get("metric") or {}
            key = tuple(str(labels.get(k, "")) for k in EDGE_LABELS)
            row = out.setdefault(key, {**dict(zip(EDGE_LABELS, key, strict=True)),
                                       **dict.fromkeys(fields)})
            try:
                value = float(sample["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            row[name] = None if value != value else value  # NaN (no sample in the window) -> None
    return [out[k] for k in sorted(out)]


def targets_up(url: str, *, timeout: float = 3.0) -> dict[str, bool]:
    """``up`` of every target, keyed ``role/cluster/workload`` (missing parts empty)."""
    rows = query(url, "up", timeout=timeout)
    out: dict[str, bool] = {}
    for r in rows:
        m = r.get("metric") or {}
        out[f"{m.get('role', '')}/{m.get('cluster', '')}/{m.get('workload', '')}"] = r["value"][1] == "1"
    return out
