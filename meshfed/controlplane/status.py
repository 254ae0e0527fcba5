"""What the control plane serves at ``/status``: everything ``meshfed status`` and ``diagnose`` need from it, built
from its live objects (registry, cache, federation agent, trust)."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509

from meshfed import rotation

if TYPE_CHECKING:
    from meshfed.controlplane.composition import ControlPlane


def _expiry(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return cert.not_valid_after_utc.isoformat()


def _issued(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return cert.not_valid_before_utc.isoformat()


def status_of(cp: ControlPlane) -> dict[str, Any]:
    reg = cp.registry
    local = cp.config.cluster
    exports = reg.exports.get(local, {})
    services = []
    for svc in reg.services(local):
        export = exports.get(svc.key)
        services.append({
            "service": str(svc.key),
            "type": str(svc.type),
            "ports": [{"name": p.name, "port": p.port, "protocol": str(p.protocol)} for p in svc.ports],
            "endpoints": len(svc.endpoints),
            "ready": len(svc.ready_endpoints),
            "exported": export is not None,
            "conditions": [{"type": c.type, "status": str(c.status), "reason": c.reason, "message": c.message}
                           for c in (export.conditions if export else ())],
        })
    # An export without a Service here (Valid=False, NoService) still has a row, so status can say why.
    local_keys = {svc.key for svc in reg.services(local)}
    for key, export in sorted(exports.items()):
        if key not in local_keys:
            services.append({
                "service": str(key), "type": "", "ports": [], "endpoints": 0, "ready": 0, "exported": True,
                "conditions": [{"type": c.type, "status": str(c.status), "reason": c.reason, "message": c.message}
                               for c in export.conditions],
            })
    imports = []
    for key, imp in sorted(reg.imports.items()):
        ready_by_cluster: dict[str, int] = {str(c): shard[key].ready for c, shard in reg.remote.items() if key in shard}
        local_svc = reg.service(local, key)
        if local_svc is not None:
            ready_by_cluster[str(local)] = len(local_svc.ready_endpoints)
        imports.append({
            "service": str(key), "type": str(imp.type), "ips": list(imp.ips),
            "clusters": [str(c) for c in imp.clusters],
            "ports": [{"name": p.name, "port": p.port, "protocol": str(p.protocol)} for p in imp.ports],
            "ready_by_cluster": ready_by_cluster,
        })
    proxies = [{**dataclasses.asdict(st), "state": str(st.state)} for st in cp.cache.status()]
    agent = cp.agent
    federation: dict[str, Any] = {"configured": agent is not None}
    if agent is not None:
        catalog = agent.catalog
        federation.update({
            "connected": agent.connected,
            "revision": getattr(catalog, "revision", None),
            "relists": agent.relists,
            "reconnects": agent.reconnects,
            "members": _members(catalog),
            "heartbeat_error": agent.heartbeat_error,
            "heartbeat_failing_since": (agent.heartbeat_failing_since.isoformat()
                                        if agent.heartbeat_failing_since else None),
            "heartbeat_ok_at": agent.heartbeat_ok_at.isoformat() if agent.heartbeat_ok_at else None,
        })
    return {
        "cluster": str(local),
        "network": str(cp.info.network),
        "region": cp.info.region,
        "zone": cp.info.zone,
        "gateway": f"{cp.config.gateway_host}:{cp.config.gateway_port}",
        "xds": f"{cp.config.xds.host}:{cp.ads.port if cp.ads else cp.config.xds.port}",
        "xds_mtls": f"{cp.config.xds_mtls.host}:{cp.ads_mtls.port}" if cp.config.xds_mtls and cp.ads_mtls else "",
        "dns": f"{cp.config.dns.host}:{cp.dns.port if cp.dns else cp.config.dns.port}",
        "admin": f"{cp.config.admin.host}:{cp.admin_port}",
        "registry_revision": reg.revision,
        "uptime_s": round(time.time() - cp.started_at, 1),
        "services": services,
        "imports": imports,
        "proxies": proxies,
        "proxy_errors": dict(cp.proxy_errors),
        "manifest_problems": cp.manifest_problems,
        "federation": federation,
        "trust": {
            "trust_domain": cp.trust_domain,
            "intermediate_not_after": cp.ca.not_after.isoformat(),
            "intermediate_not_before": cp.ca.cert.not_valid_before_utc.isoformat(),
            "intermediate_fingerprint": cp.ca.fingerprint,
            "roots": [{"fingerprint": fp, "not_after": root.not_valid_after_utc.isoformat()}
                      for fp, root in zip(cp.bundle.fingerprints, cp.bundle.roots, strict=True)],
            "workload_certs": [
                {"spiffe_id": sid, "not_after": _expiry(cert.chain_pem.encode()),
                 "not_before": _issued(cert.chain_pem.encode())}
                for sid, cert in sorted(cp.issuer.certs().items())
            ],
        },
        "rotation": rotation.controlplane_report(cp),
        "now": datetime.now(UTC).isoformat(),
    }


def _members(catalog: Any) -> list[dict[str, Any]]:
    if catalog is None:
        return []
    out = []
    for cid, member in sorted(catalog.members.items()):
        out.append({
            "cluster": str(cid),
            "network": str(member.info.network),
            "unreachable_since": member.unreachable_since.isoformat() if member.unreachable_since else None,
            "renewed_at": member.renewed_at.isoformat(),
            "gateway": f"{member.info.gateway_host}:{member.info.gateway_port}",
        })
    return out
