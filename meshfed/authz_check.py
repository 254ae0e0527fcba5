"""Hop 8 of ``meshfed diagnose``: would the AuthorizationPolicies of the exporting clusters let the caller in?

:func:`policy_evidence` reads each exporting cluster's manifests (IO, called by ``diagnose.collect``);
:func:`policy_hop` decides with ``gateway.rbac.decide`` for the request diagnose sends (``GET /`` from the caller
cluster's client workload), with no IO.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from discovery.authz import AuthorizationPolicy
from discovery.clusterset import load_clusterset
from discovery.manifests import ManifestSource
from discovery.model import ServiceKey
from gateway import rbac


@dataclass(frozen=True, slots=True)
class ClusterPolicies:
    """The policies selecting ``service``'s workloads in one exporting cluster, and the workload port."""

    deny: tuple[AuthorizationPolicy, ...]
    allow: tuple[AuthorizationPolicy, ...]
    port: int


def policy_evidence(clusterset_dir: str | Path, service: str, clusters: Sequence[str]
                    ) -> tuple[dict[str, ClusterPolicies], str]:
    """Per cluster of ``clusters`` running ``service`` (``name.namespace``): the policies selecting it.

    Returns ``(found, error)``; ``error`` says why the manifests could not be read (the hop is then skipped)."""
    try:
        cs = load_clusterset(Path(clusterset_dir))
        key = ServiceKey.parse(service)
    except (OSError, ValueError) as exc:
        return {}, f"cannot read the clusterset's policies: {exc}"
    out: dict[str, ClusterPolicies] = {}
    for cluster in clusters:
        try:
            snap = ManifestSource.for_cluster(cs, cluster).load().snapshot
        except (OSError, ValueError) as exc:
            return out, f"cannot read {cluster}'s manifests: {exc}"
        svc = snap.services.get(key)
        if svc is None:
            continue
        labels = rbac.workload_labels([key], {key: svc.selector})
        policies = [o for o in snap.extras if isinstance(o, AuthorizationPolicy)]
        deny, allow = rbac.select(policies, str(key.namespace), labels)
        first = svc.ports[0] if svc.ports else None
        port = 0
        if first is not None:
            port = first.target_port if isinstance(first.target_port, int) and first.target_port else first.port
        out[cluster] = ClusterPolicies(deny=deny, allow=allow, port=port)
    return out, ""


def policy_hop(policies: Mapping[str, ClusterPolicies], *, principal: str, caller: str, service: str,
               error: str = "") -> tuple[str, str, str]:
    """``(status, detail, next_step)`` with status ``ok``, ``FAIL`` or ``skipped``."""
    if error:
        return "skipped", error, ""
    applied = {c: p for c, p in sorted(policies.items()) if p.deny or p.allow}
    if not applied:
        return "skipped", f"no AuthorizationPolicy selects {service}: every authenticated caller is allowed", ""
    allowed, denied = [], []
    for cluster, p in applied.items():
        decision = rbac.decide(p.deny, p.allow, rbac.Request(principal=principal, cluster=caller, port=p.port))
        if decision.allowed:
            allowed.append(f"{cluster}: allowed" + (f" by {decision.policy}" if decision.policy else ""))
        elif decision.policy == "none":
            names = ", ".join(x.policy_id for x in p.allow)
            denied.append(f"{cluster}: denied, no ALLOW policy matches {principal} from {caller} ({names})")
        else:
            denied.append(f"{cluster}: denied by DENY policy {decision.policy}")
    if denied:
        return ("FAIL", "; ".join(denied + allowed),
                "the callee's sidecar answers 403 (its log names the policy: grep meshfed-authz); edit the "
                "AuthorizationPolicy in that cluster's manifests (docs/authorization.md)")
    return "ok", f"GET / from {principal} in {caller}: " + "; ".join(allowed), ""
