"""The control plane's own Prometheus metrics (one registry per control plane, served on its admin ``/metrics``).

Counters move as things happen (pushes, federation updates); gauges that describe state (connections, NACKs,
certificate expiry, federation lag) are refreshed from the live objects on each scrape. A few counters are derived
at scrape time from cumulative state the live objects keep (ADS stream counts, certificates issued and rotated,
NACKs seen per type): each scrape adds what is new since the last one, so they only ever grow.

Every series is listed, with its labels, in docs/observability.md.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from gateway.telemetry import parse_prometheus
from gateway.xdstypes import SHORT_NAMES, short_name

if TYPE_CHECKING:
    from meshfed.controlplane import ControlPlane

#: The ``type`` label of the per-type metrics: the short name in lower case (``lds``, ``cds``, ...).
TYPE_LABELS = {url: name.lower() for url, name in SHORT_NAMES.items()}


def type_label(type_url: str) -> str:
    return TYPE_LABELS.get(type_url, short_name(type_url))


class ControlPlaneMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.xds_connections = Gauge("meshfed_xds_connected_proxies", "Proxies with an open ADS stream", registry=r)
        self.pushes = Counter("meshfed_xds_pushes", "Snapshots changed and pushed to a proxy", registry=r)
        self.push_seconds = Histogram(
            "meshfed_xds_push_duration_seconds", "Time to regenerate and install the snapshots of one push",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=r)
        self.nacks = Gauge("meshfed_xds_nacked_proxies", "Proxies whose last response of a type was NACKed",
                           ["type"], registry=r)
        self.federation_updates = Counter("meshfed_federation_catalog_updates",
                                          "Catalog updates received from the federation", registry=r)
        self.federation_connected = Gauge("meshfed_federation_connected",
                                          "1 while the catalog watch is live", registry=r)
        self.federation_lag = Gauge("meshfed_federation_sync_lag_seconds",
                                    "Seconds since the last catalog update from the federation", registry=r)
        self.certs_issued = Gauge("meshfed_workload_certificates", "Workload certificates currently held",
                                  registry=r)
        self.cert_expiry = Gauge("meshfed_workload_certificate_expiry_seconds",
                                 "Seconds until the soonest workload certificate expires", registry=r)
        self.intermediate_expiry = Gauge("meshfed_intermediate_expiry_seconds",
                                         "Seconds until this cluster's intermediate CA expires", registry=r)
        self.connected_by_kind = Gauge("meshfed_xds_connected_proxies_by_kind",
                                       "Proxies with an open ADS stream, by kind (sidecar, gateway, grpc)", ["kind"],
                                       registry=r)
        self.streams = Counter("meshfed_xds_streams", "ADS streams accepted or refused, per listener",
                               ["listener", "result"], registry=r)
        self.nack_events = Counter("meshfed_xds_nacks", "NACKs received, by xDS type", ["type"], registry=r)
        self.secrets_withheld = Counter("meshfed_xds_secrets_withheld",
                                        "Certificates not sent because they were not the stream's identity's",
                                        ["listener"], registry=r)
        self.certs_issued_total = Counter("meshfed_workload_certificates_issued",
                                          "Workload certificates issued (first issue and rotations)", registry=r)
        self.certs_expiring = Gauge("meshfed_workload_certificates_expiring",
                                    "Workload certificates held that expire within an hour", registry=r)
        self.federation_revision = Gauge("meshfed_federation_catalog_revision",
                                         "Revision of the last catalog applied from the federation", registry=r)
        self._last_update = time.monotonic()
        self._stream_counts: dict[tuple[str, str], int] = {}
        self._nacks_seen: set[tuple[str, str, str, float | None]] = set()
        self._issued_count = 0

    def mark_update(self) -> None:
        self._last_update = time.monotonic()
        self.federation_updates.inc()

    def refresh(self, cp: ControlPlane) -> None:
        connected = cp.cache.connected()
        self.xds_connections.set(len(connected))
        kinds: dict[str, int] = {"sidecar": 0, "gateway": 0, "grpc": 0}
        for node_id in connected:
            proxy = cp.proxies.get(node_id)
            kind = str(proxy.kind) if proxy is not None else "unrecognised"
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, n in kinds.items():
            self.connected_by_kind.labels(kind=kind).set(n)
        for listener, server in (("token", cp.ads), ("mtls", getattr(cp, "ads_mtls", None))):
            if server is None:
                continue
            for result, value in (("accepted", server.stats.streams_opened), ("refused", server.stats.streams_refused)):
                self._grow(self.streams.labels(listener=listener, result=result), (listener, result), value)
            self._grow(self.secrets_withheld.labels(listener=listener), (listener, "withheld"),
                       server.stats.secrets_withheld)
        for st in cp.cache.status():
            if st.nack_error:
                key = (st.node_id, st.type_url, st.nack_version, st.nack_time)
                if key not in self._nacks_seen:
                    self._nacks_seen.add(key)
                    self.nack_events.labels(type=type_label(st.type_url)).inc()
        nacked: dict[str, int] = dict.fromkeys(TYPE_LABELS.values(), 0)
        for st in cp.cache.status():
            if st.nack_error and str(st.state) == "nacked":
                short = type_label(st.type_url)
                nacked[short] = nacked.get(short, 0) + 1
        for short, n in nacked.items():
            self.nacks.labels(type=short).set(n)
        agent = cp.agent
        self.federation_connected.set(1 if agent is not None and agent.connected else 0)
        self.federation_lag.set(time.monotonic() - self._last_update)
        revision = getattr(agent.catalog, "revision", None) if agent is not None else None
        if isinstance(revision, int):
            self.federation_revision.set(revision)
        now = datetime.now(UTC)
        issued = [cp.issuer.issued(i) for i in list(cp.issuer._issued)]
        alive = [i for i in issued if i is not None]
        self.certs_issued.set(len(alive))
        if alive:
            self.cert_expiry.set(min((i.not_after - now).total_seconds() for i in alive))
        self.certs_expiring.set(sum(1 for i in alive if (i.not_after - now).total_seconds() < 3600))
        issued_total = len(alive) + int(getattr(cp.issuer, "rotations", 0))
        if issued_total > self._issued_count:
            self.certs_issued_total.inc(issued_total - self._issued_count)
            self._issued_count = issued_total
        self.intermediate_expiry.set((cp.ca.not_after - now).total_seconds())

    def _grow(self, counter: Any, key: tuple[str, str], value: int) -> None:
        """Advance ``counter`` to the cumulative ``value`` a live object reports (never backwards)."""
        last = self._stream_counts.get(key, 0)
        if value > last:
            counter.inc(value - last)
            self._stream_counts[key] = value

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def scrape_value(text: str, name: str, labels: dict[str, Any] | None = None) -> float | None:
    """The value of the first sample of ``name`` carrying ``labels`` in Prometheus text format (tests and
    ``meshfed status`` read metrics with it); parsed by :func:`gateway.telemetry.parse_prometheus`."""
    wanted = {k: str(v) for k, v in (labels or {}).items()}
    for found, value in parse_prometheus(text, name):
        if all(found.get(k) == v for k, v in wanted.items()):
            return value
    return None
