"""What a control plane serves at ``/status``: one typed value, :class:`ControlPlaneStatus`, and its JSON codec
(:func:`encode_status`, :func:`decode_status`; :mod:`meshfed.jsondoc`). The control plane builds it from its live
objects (:func:`meshfed.controlplane.admin.status_of`); ``meshfed status``, ``diagnose`` and the rotation checks
decode what they fetched and read the fields, never string keys.

The JSON is the wire format other tools and the docs rely on (docs/operations.md): its field names and nesting
are exactly the dataclasses' below, fields in this order. Decoding is strict (an unknown field or a value of the
wrong type is an error naming its path); a field left out takes its default, so an older control plane's answer
still decodes. Timestamps are ISO 8601 strings as the control plane wrote them.

Errors: :class:`meshfed.jsondoc.DocumentError` (a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshfed import jsondoc
from meshfed.rotation import RotationReport


@dataclass(frozen=True, slots=True)
class PortRow:
    name: str = ""
    port: int = 0
    protocol: str = ""


@dataclass(frozen=True, slots=True)
class ConditionRow:
    """One MCS condition of an export (``Valid``, ``Ready``, ``Conflict``) as the control plane reports it."""

    type: str = ""
    status: str = ""  # "True", "False", "Unknown"
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class ServiceRow:
    """A Service of this cluster, or an export without one (``type`` empty, ``Valid=False, NoService``)."""

    service: str = ""
    type: str = ""
    ports: tuple[PortRow, ...] = ()
    endpoints: int = 0
    ready: int = 0
    exported: bool = False
    conditions: tuple[ConditionRow, ...] = ()

    def condition(self, ctype: str) -> ConditionRow | None:
        return next((c for c in self.conditions if c.type == ctype), None)


@dataclass(frozen=True, slots=True)
class ImportRow:
    """A ServiceImport this cluster holds (from the federation, or derived alone when unfederated)."""

    service: str = ""
    type: str = ""
    ips: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    ports: tuple[PortRow, ...] = ()
    ready_by_cluster: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProxyRow:
    """What one proxy holds of one xDS type (gateway.cache.ProxyStatus)."""

    node_id: str = ""
    type_url: str = ""
    state: str = ""  # "synced", "stale", "nacked"
    connected: bool = False
    current_version: str = ""
    sent_version: str = ""
    sent_nonce: str = ""
    acked_version: str = ""
    nack_error: str = ""
    nack_version: str = ""
    nack_time: float | None = None


@dataclass(frozen=True, slots=True)
class ManifestProblemRow:
    """A problem with this cluster's manifests (or its traffic policies), naming file, document and field."""

    file: str = ""
    document: int = 0
    field: str = ""
    message: str = ""
    severity: str = "error"  # "error" (the last good state is kept) or "warning"


@dataclass(frozen=True, slots=True)
class MemberRow:
    """A federation member as the federation's catalog says (the agent's last catalog)."""

    cluster: str = ""
    network: str = ""
    unreachable_since: str | None = None
    renewed_at: str = ""
    gateway: str = ""


@dataclass(frozen=True, slots=True)
class FederationStatus:
    """The federation agent's state; when ``configured`` is false (no federation) nothing else is in the JSON."""

    configured: bool = False
    connected: bool = False
    revision: int | None = None
    relists: int = 0
    reconnects: int = 0
    members: tuple[MemberRow, ...] = ()
    heartbeat_error: str | None = None
    heartbeat_failing_since: str | None = None
    heartbeat_ok_at: str | None = None

    def json_omitted(self) -> tuple[str, ...]:
        return () if self.configured else tuple(n for n in self.__slots__ if n != "configured")


@dataclass(frozen=True, slots=True)
class RootRow:
    fingerprint: str = ""
    not_after: str = ""


@dataclass(frozen=True, slots=True)
class WorkloadCertRow:
    spiffe_id: str = ""
    not_after: str = ""
    not_before: str = ""


@dataclass(frozen=True, slots=True)
class TrustStatus:
    trust_domain: str = ""
    intermediate_not_after: str = ""
    intermediate_not_before: str = ""
    intermediate_fingerprint: str = ""
    roots: tuple[RootRow, ...] = ()
    workload_certs: tuple[WorkloadCertRow, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerServiceRow:
    """A service a peer exported to this clusterset, as this control plane serves it (docs/peering.md)."""

    host: str = ""  # <svc>.<ns>.svc.<peer>.clusterset.local
    peer: str = ""
    trust_domain: str = ""
    ips: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    ready: int = 0  # ready endpoints behind the exporter's gateways
    gateways: tuple[str, ...] = ()  # HOST:PORT of each exporting cluster's east-west gateway


@dataclass(frozen=True, slots=True)
class ControlPlaneStatus:
    """Everything ``meshfed status`` and ``diagnose`` need from one control plane (``GET /status``)."""

    cluster: str = ""
    network: str = ""
    region: str = ""
    zone: str = ""
    gateway: str = ""  # HOST:PORT other clusters reach this cluster's east-west gateway at
    xds: str = ""  # HOST:PORT of the token-authenticated ADS listener
    xds_mtls: str = ""  # HOST:PORT of the certificate-authenticated one ("": not served)
    dns: str = ""
    admin: str = ""
    registry_revision: int = 0
    uptime_s: float = 0.0
    services: tuple[ServiceRow, ...] = ()
    imports: tuple[ImportRow, ...] = ()
    proxies: tuple[ProxyRow, ...] = ()
    proxy_errors: Mapping[str, str] = field(default_factory=dict)  # node id -> why its config is not built
    manifest_problems: tuple[ManifestProblemRow, ...] = ()
    peer_services: tuple[PeerServiceRow, ...] = ()
    peer_error: str = ""  # why the peers' services could not be taken ("" when they were)
    webhook_ca_error: str = ""  # why the injector's caBundle could not be kept current ("" when it is)
    federation: FederationStatus = FederationStatus()
    trust: TrustStatus = TrustStatus()
    rotation: RotationReport | None = None
    now: str = ""

    def import_of(self, service: str) -> ImportRow | None:
        return next((i for i in self.imports if i.service == service), None)


def encode_status(status: ControlPlaneStatus) -> dict[str, Any]:
    """``status`` as the JSON ``/status`` serves."""
    data: dict[str, Any] = jsondoc.encode(status)
    return data


def decode_status(data: Any, *, what: str = "control plane status") -> ControlPlaneStatus:
    """Parsed ``/status`` JSON as the typed value; raises ``DocumentError`` naming ``what`` and the field."""
    return jsondoc.decode(ControlPlaneStatus, data, what=what)
