"""Prometheus metrics of one federation service app (a registry per app, so tests can run several in a process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("meshfed_federation_requests_total", "HTTP requests answered, by route and code",
                                ["method", "route", "code"], registry=r)
        self.request_seconds = Histogram("meshfed_federation_request_seconds", "Time to answer an HTTP request",
                                         ["route"], registry=r)
        self.auth_failures = Counter("meshfed_federation_auth_failures_total",
                                     "Requests refused for authentication (401) or authorization (403)",
                                     ["reason"], registry=r)
        self.watch_streams = Gauge("meshfed_federation_watch_streams", "Open catalog watch streams", registry=r)
        self.watch_events = Counter("meshfed_federation_watch_events_total", "Changes written to watch streams",
                                    registry=r)
        self.members = Gauge("meshfed_federation_members", "Member clusters by lease state", ["state"], registry=r)
        self.services = Gauge("meshfed_federation_catalog_services", "Services in the merged catalog", registry=r)
        self.revision = Gauge("meshfed_federation_catalog_revision", "Revision of the merged catalog", registry=r)
        self.publish_seconds = Histogram(
            "meshfed_federation_publish_seconds", "Time to validate and durably store an export set",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=r)
        self.publishes = Counter("meshfed_federation_publishes_total", "Export-set publishes by outcome",
                                 ["outcome"], registry=r)
