"""The control plane's admin HTTP endpoint, how ``meshfed status``, ``diagnose`` and Prometheus see it:

- ``/healthz``: the process is up (``{"status": "ok"}``);
- ``/readyz``: 200 once the first snapshot is served and, when federated, the first catalog arrived, else 503
  (``{"ready": ..., "federation_synced": ...}``);
- ``/status``: everything status and diagnose need (:mod:`meshfed.controlplane.status`), built from the live
  control plane by :func:`status_of`;
- ``/metrics``: Prometheus text (:mod:`meshfed.telemetry`).

The server knows nothing of the control plane but the callables it is given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiohttp import web
from cryptography import x509

from discovery.addresses import join_hostport
from discovery.model import Condition, ServicePort
from federation.catalog import Catalog
from meshfed import rotation
from meshfed.controlplane.config import Listen
from meshfed.controlplane.status import (
    ConditionRow,
    ControlPlaneStatus,
    FederationStatus,
    ImportRow,
    MemberRow,
    PeerServiceRow,
    PortRow,
    ProxyRow,
    RootRow,
    ServiceRow,
    TrustStatus,
    WorkloadCertRow,
    encode_status,
)

if TYPE_CHECKING:
    from meshfed.controlplane.composition import ControlPlane


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool  # the first local snapshot is taken and every server is up
    federation_synced: bool  # not federated, or the federation's first catalog arrived


@dataclass(frozen=True)
class AdminEndpoints:
    """What the admin endpoint serves, asked at each request."""

    readiness: Callable[[], Readiness]
    status: Callable[[], ControlPlaneStatus]
    metrics: Callable[[], tuple[bytes, str]]  # body, content type


async def serve_admin(stack: AsyncExitStack, listen: Listen, endpoints: AdminEndpoints) -> int:
    """Serve ``endpoints`` on ``listen`` until ``stack`` closes; returns the port bound (``listen.port`` may be 0)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        state = endpoints.readiness()
        ok = state.ready and state.federation_synced
        return web.json_response({"ready": ok, "federation_synced": state.federation_synced},
                                 status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = endpoints.metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def status(request: web.Request) -> web.Response:
        return web.json_response(encode_status(endpoints.status()), dumps=lambda v: json.dumps(v, default=str))

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, listen.host, listen.port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else listen.port


# ---- /status from the live control plane -------------------------------------------------------------------------


def _expiry(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return cert.not_valid_after_utc.isoformat()


def _issued(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return cert.not_valid_before_utc.isoformat()


def _ports(ports: tuple[ServicePort, ...]) -> tuple[PortRow, ...]:
    return tuple(PortRow(name=p.name, port=p.port, protocol=str(p.protocol)) for p in ports)


def _conditions(conditions: tuple[Condition, ...]) -> tuple[ConditionRow, ...]:
    return tuple(ConditionRow(type=c.type, status=str(c.status), reason=c.reason, message=c.message)
                 for c in conditions)


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def status_of(cp: ControlPlane) -> ControlPlaneStatus:
    """What ``/status`` serves, from the control plane's live objects."""
    reg = cp.registry
    local = cp.config.cluster
    exports = reg.exports.get(local, {})
    services = []
    for svc in reg.services(local):
        export = exports.get(svc.key)
        services.append(ServiceRow(
            service=str(svc.key), type=str(svc.type), ports=_ports(svc.ports), endpoints=len(svc.endpoints),
            ready=len(svc.ready_endpoints), exported=export is not None,
            conditions=_conditions(export.conditions if export else ())))
    # An export without a Service here (Valid=False, NoService) still has a row, so status can say why.
    local_keys = {svc.key for svc in reg.services(local)}
    for key, export in sorted(exports.items()):
        if key not in local_keys:
            services.append(ServiceRow(service=str(key), exported=True, conditions=_conditions(export.conditions)))
    imports = []
    for key, imp in sorted(reg.imports.items()):
        ready_by_cluster: dict[str, int] = {str(c): shard[key].ready for c, shard in reg.remote.items() if key in shard}
        local_svc = reg.service(local, key)
        if local_svc is not None:
            ready_by_cluster[str(local)] = len(local_svc.ready_endpoints)
        imports.append(ImportRow(service=str(key), type=str(imp.type), ips=tuple(imp.ips),
                                 clusters=tuple(str(c) for c in imp.clusters), ports=_ports(imp.ports),
                                 ready_by_cluster=ready_by_cluster))
    proxies = tuple(ProxyRow(
        node_id=st.node_id, type_url=st.type_url, state=str(st.state), connected=st.connected,
        current_version=st.current_version, sent_version=st.sent_version, sent_nonce=st.sent_nonce,
        acked_version=st.acked_version, nack_error=st.nack_error, nack_version=st.nack_version,
        nack_time=st.nack_time) for st in cp.cache.status())
    agent = cp.agent
    federation = FederationStatus()
    if agent is not None:
        catalog = agent.catalog
        federation = FederationStatus(
            configured=True, connected=agent.connected, revision=catalog.revision if catalog else None,
            relists=agent.relists, reconnects=agent.reconnects, members=_members(catalog),
            heartbeat_error=agent.heartbeat_error, heartbeat_failing_since=_time(agent.heartbeat_failing_since),
            heartbeat_ok_at=_time(agent.heartbeat_ok_at))
    cfg = cp.config
    return ControlPlaneStatus(
        cluster=str(local),
        network=str(cp.info.network),
        region=cp.info.region,
        zone=cp.info.zone,
        gateway=f"{cfg.gateway_host}:{cfg.gateway_port}",
        xds=f"{cfg.xds.host}:{cp.ads.port if cp.ads else cfg.xds.port}",
        xds_mtls=f"{cfg.xds_mtls.host}:{cp.ads_mtls.port}" if cfg.xds_mtls and cp.ads_mtls else "",
        dns=f"{cfg.dns.host}:{cp.dns.port if cp.dns else cfg.dns.port}",
        admin=f"{cfg.admin.host}:{cp.admin_port}",
        registry_revision=reg.revision,
        uptime_s=round(time.time() - cp.started_at, 1),
        services=tuple(services),
        imports=tuple(imports),
        proxies=proxies,
        proxy_errors=dict(cp.proxy_errors),
        manifest_problems=cp.manifest_problems,
        peer_services=tuple(PeerServiceRow(
            host=p.host, peer=p.peer, trust_domain=p.trust_domain, ips=p.ips, ports=tuple(x.port for x in p.ports),
            ready=p.ready, gateways=tuple(join_hostport(e.gateway_host, e.gateway_port) for e in p.endpoints))
            for p in reg.peers),
        peer_error=cp.peer_error,
        webhook_ca_error=cp.webhook_ca_error,
        federation=federation,
        trust=TrustStatus(
            trust_domain=cp.trust_domain,
            intermediate_not_after=cp.ca.not_after.isoformat(),
            intermediate_not_before=cp.ca.cert.not_valid_before_utc.isoformat(),
            intermediate_fingerprint=cp.ca.fingerprint,
            roots=tuple(RootRow(fingerprint=fp, not_after=root.not_valid_after_utc.isoformat())
                        for fp, root in zip(cp.bundle.fingerprints, cp.bundle.roots, strict=True)),
            workload_certs=tuple(
                WorkloadCertRow(spiffe_id=sid, not_after=_expiry(cert.chain_pem.encode()),
                                not_before=_issued(cert.chain_pem.encode()))
                for sid, cert in sorted(cp.issuer.certs().items())),
        ),
        rotation=rotation.controlplane_report(cp),
        now=datetime.now(UTC).isoformat(),
    )


def _members(catalog: Catalog | None) -> tuple[MemberRow, ...]:
    if catalog is None:
        return ()
    return tuple(MemberRow(
        cluster=str(cid), network=str(member.info.network), unreachable_since=_time(member.unreachable_since),
        renewed_at=member.renewed_at.isoformat(), gateway=f"{member.info.gateway_host}:{member.info.gateway_port}")
        for cid, member in sorted(catalog.members.items()))
