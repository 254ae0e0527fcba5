"""Multi-Cluster Services semantics (KEP-1645, ``multicluster.x-k8s.io``): export validity, conflict
resolution, ServiceImport derivation and ClusterSetIP allocation. Pure functions of their inputs.

Every control plane runs :func:`derive` on the same inputs and must reach the same answer, so nothing here depends
on the order inputs arrive in: exports are ranked by (creation timestamp, cluster name) and the oldest wins every
conflict; ClusterSetIPs are a hash of the service key, with collisions resolved over the sorted key set.

Conditions follow the mcs-api ``ServiceExport`` condition types and reasons:

* ``Valid``: True/``Valid``; False/``NoService`` (no such Service in the exporting cluster) or
  ``InvalidServiceType`` (ExternalName).
* ``Ready``: True/``Exported`` (the cluster backs the ServiceImport); False/``Failed`` (the export is not valid).
* ``Conflict``: False/``NoConflicts``; True with ``PortConflict``, ``TypeConflict`` or both joined by a comma.
  As the KEP recommends, a conflict is raised on every export of the service, each with a message from its own
  cluster's point of view naming the winner and how many clusters disagree.

Exception tree (this module)::

    DiscoveryError
     +-- InvalidValue
          +-- InvalidCidr      a ClusterSetIP CIDR that is unparsable or too small for the keys
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from discovery.fields import format_timestamp
from discovery.model import (
    ClusterId,
    Condition,
    ConditionStatus,
    InvalidValue,
    Registry,
    Service,
    ServiceExport,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceType,
)

#: Default ClusterSetIP range. 241.0.0.0/8 lies in 240.0.0.0/4, reserved ("Class E") and never routed on the
#: internet, so VIPs cannot shadow a real destination; it is only ever matched by sidecars. Clustersets choose
#: their own range in clusterset.yaml (the demo uses a loopback range so local runs stay on 127.0.0.0/8).
DEFAULT_CIDR = "241.0.0.0/8"

VALID = "Valid"
READY = "Ready"
CONFLICT = "Conflict"

REASON_VALID = "Valid"
REASON_NO_SERVICE = "NoService"
REASON_INVALID_SERVICE_TYPE = "InvalidServiceType"
REASON_EXPORTED = "Exported"
REASON_FAILED = "Failed"
REASON_NO_CONFLICTS = "NoConflicts"
REASON_PORT_CONFLICT = "PortConflict"
REASON_TYPE_CONFLICT = "TypeConflict"


class InvalidCidr(InvalidValue):
    """A ClusterSetIP CIDR that cannot be parsed or holds too few addresses."""


@dataclass(frozen=True, slots=True)
class McsResult:
    """What the clusterset imports, and each export's conditions (keyed by exporting cluster and service)."""

    imports: dict[ServiceKey, ServiceImport]
    conditions: dict[tuple[ClusterId, ServiceKey], tuple[Condition, ...]]

    def exports_with_conditions(self, exports: Iterable[ServiceExport]) -> list[ServiceExport]:
        """``exports`` with their ``conditions`` filled in from this result (sorted by cluster, key)."""
        out = []
        for e in sorted(exports, key=lambda e: (e.cluster, e.key)):
            out.append(
                ServiceExport(
                    cluster=e.cluster,
                    key=e.key,
                    created=e.created,
                    conditions=self.conditions.get((e.cluster, e.key), ()),
                )
            )
        return out


def _utc(stamp: datetime) -> datetime:
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def rank(export: ServiceExport) -> tuple[datetime, str]:
    """The precedence of an export: older first, then cluster name. Lower wins."""
    return (_utc(export.created), export.cluster)


def _port_label(p: ServicePort) -> str:
    text = f"port {p.port}/{p.protocol}"
    if p.name:
        text += f" ({p.name})"
    return text


def _port_def(p: ServicePort) -> str:
    text = f"{p.port}/{p.protocol}"
    if p.name:
        text += f" name {p.name!r}"
    if p.app_protocol:
        text += f" appProtocol {p.app_protocol!r}"
    return text


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


@dataclass(frozen=True, slots=True)
class _PortClash:
    winner_port: ServicePort
    winner: ClusterId
    loser: ClusterId
    loser_port: ServicePort


def _merge_ports(
    ordered: list[tuple[ServiceExport, Service]],
) -> tuple[tuple[ServicePort, ...], list[_PortClash]]:
    """Union of the services' ports, oldest export first. A port collides with an already chosen one when it has
    the same name or the same (port, protocol); colliding ports that are not identical are a clash, and the
    chosen (older) definition stays."""
    chosen: list[tuple[ServicePort, ClusterId]] = []
    clashes: list[_PortClash] = []
    for export, svc in ordered:
        for raw in svc.ports:
            port = ServicePort(port=raw.port, protocol=raw.protocol, name=raw.name, app_protocol=raw.app_protocol)
            hits = [
                (c, owner)
                for c, owner in chosen
                if (c.name == port.name) or (c.port == port.port and c.protocol == port.protocol)
            ]
            if not hits:
                chosen.append((port, export.cluster))
                continue
            for c, owner in hits:
                if c != port:
                    clashes.append(_PortClash(winner_port=c, winner=owner, loser=export.cluster, loser_port=port))
    ports = tuple(sorted((p for p, _ in chosen), key=lambda p: (p.port, p.protocol, p.name)))
    return ports, clashes


def _conflict_condition(
    me: ServiceExport,
    winner: ServiceExport,
    members: list[tuple[ServiceExport, Service]],
    clashes: list[_PortClash],
    import_type: ServiceType,
) -> Condition:
    n = len(members)
    reasons: list[str] = []
    parts: list[str] = []
    resolved = f"resolved by the oldest export ({winner.cluster}, {format_timestamp(winner.created)})"
    if clashes:
        reasons.append(REASON_PORT_CONFLICT)
        disagree = len({c.loser for c in clashes})
        # Group by the winning port definition, from this cluster's point of view.
        by_port: dict[ServicePort, list[_PortClash]] = {}
        for c in clashes:
            by_port.setdefault(c.winner_port, []).append(c)
        for wport, group in sorted(by_port.items(), key=lambda kv: (kv[0].port, kv[0].protocol, kv[0].name)):
            owner = group[0].winner
            losers = sorted({c.loser for c in group})
            if me.cluster == owner:
                others = losers
            elif me.cluster in losers:
                others = [owner]
            else:
                others = [owner, *losers]
            mine = [c.loser_port for c in group if c.loser == me.cluster]
            detail = (
                f"conflict on {_port_label(wport)} with {_plural(len(others), 'cluster', 'clusters')} "
                + ", ".join(others)
            )
            if mine:
                detail += f" (this cluster defines {_port_def(mine[0])}; using {_port_def(wport)} from {owner})"
            else:
                detail += f" (using {_port_def(wport)} from {owner})"
            parts.append(detail)
        parts.append(f"{resolved}; {disagree} of {n} clusters disagree")
    type_losers = sorted(svc.cluster for _, svc in members if svc.type != import_type)
    if type_losers:
        reasons.append(REASON_TYPE_CONFLICT)
        mine_t = next(svc.type for e, svc in members if e.cluster == me.cluster)
        if mine_t == import_type:
            other_type = (
                ServiceType.HEADLESS if import_type == ServiceType.CLUSTER_SET_IP else ServiceType.CLUSTER_SET_IP
            )
            detail = (
                f"type conflict with {_plural(len(type_losers), 'cluster', 'clusters')} {', '.join(type_losers)} "
                f"({other_type})"
            )
        else:
            detail = f"type conflict: this cluster's service is {mine_t}, the oldest export's is {import_type}"
        parts.append(
            f"{detail}; {resolved}: the ServiceImport is {import_type}; {len(type_losers)} of {n} clusters disagree"
        )
    if not reasons:
        if n == 1:
            agree = f"the only exporting cluster ({me.cluster}): nothing to conflict with"
        else:
            agree = f"all {n} exporting clusters agree on type and ports"
        return Condition(CONFLICT, ConditionStatus.FALSE, REASON_NO_CONFLICTS, agree)
    return Condition(CONFLICT, ConditionStatus.TRUE, ",".join(reasons), "; ".join(parts))


def derive(
    services: Mapping[ClusterId, Mapping[ServiceKey, Service]],
    exports: Iterable[ServiceExport],
    *,
    cidr: str = DEFAULT_CIDR,
    unsupported: Mapping[ClusterId, Mapping[ServiceKey, str]] | None = None,
) -> McsResult:
    """Derive the clusterset's ServiceImports and every export's conditions.

    ``services[cluster][key]`` are each cluster's Services; ``exports`` every ServiceExport of every cluster (in
    any order; a duplicate (cluster, key) keeps the oldest). ``unsupported[cluster][key]`` names Services that
    exist but cannot be exported (ExternalName), which makes their exports ``Valid=False, InvalidServiceType``.

    The result depends only on the set of inputs, never on their order.
    """
    unsupported = unsupported or {}
    best: dict[tuple[ClusterId, ServiceKey], ServiceExport] = {}
    for e in exports:
        k = (e.cluster, e.key)
        if k not in best or rank(e) < rank(best[k]):
            best[k] = e
    conditions: dict[tuple[ClusterId, ServiceKey], tuple[Condition, ...]] = {}
    valid: dict[ServiceKey, list[tuple[ServiceExport, Service]]] = {}
    for (cluster, key), e in sorted(best.items()):
        svc = services.get(cluster, {}).get(key)
        if svc is None:
            why = unsupported.get(cluster, {}).get(key)
            if why is not None:
                reason, message = REASON_INVALID_SERVICE_TYPE, f"{why}, which cannot be exported"
            else:
                reason = REASON_NO_SERVICE
                message = f"Service {key.namespace}/{key.name} does not exist in cluster {cluster}"
            conditions[(cluster, key)] = (
                Condition(VALID, ConditionStatus.FALSE, reason, message),
                Condition(READY, ConditionStatus.FALSE, REASON_FAILED, f"not exported: {message}"),
                Condition(
                    CONFLICT, ConditionStatus.FALSE, REASON_NO_CONFLICTS, "not evaluated: the export is not valid"
                ),
            )
            continue
        valid.setdefault(key, []).append((e, svc))

    imports: dict[ServiceKey, ServiceImport] = {}
    for key in sorted(valid):
        members = sorted(valid[key], key=lambda m: rank(m[0]))
        winner, winner_svc = members[0]
        import_type = winner_svc.type
        ports, clashes = _merge_ports(members)
        clusters = tuple(sorted(e.cluster for e, _ in members))
        imports[key] = ServiceImport(key=key, type=import_type, ports=ports, clusters=clusters)
        for e, svc in members:
            n_ready = len(svc.ready_endpoints)
            conditions[(e.cluster, key)] = (
                Condition(
                    VALID,
                    ConditionStatus.TRUE,
                    REASON_VALID,
                    f"Service {key.namespace}/{key.name} exists in cluster {e.cluster} ({svc.type}, "
                    f"{len(svc.ports)} {_plural(len(svc.ports), 'port', 'ports')})",
                ),
                Condition(
                    READY,
                    ConditionStatus.TRUE,
                    REASON_EXPORTED,
                    f"exported as {import_type} {key.clusterset_host} from {len(clusters)} "
                    f"{_plural(len(clusters), 'cluster', 'clusters')} ({', '.join(clusters)}); "
                    f"{n_ready} ready {_plural(n_ready, 'endpoint', 'endpoints')} here",
                ),
                _conflict_condition(e, winner, members, clashes, import_type),
            )

    vip_keys = [k for k, imp in imports.items() if imp.type == ServiceType.CLUSTER_SET_IP]
    ips = allocate_ips(vip_keys, cidr)
    for vk in vip_keys:
        imp = imports[vk]
        imports[vk] = ServiceImport(key=imp.key, type=imp.type, ports=imp.ports, clusters=imp.clusters, ips=(ips[vk],))
    return McsResult(imports=imports, conditions=conditions)


def _hash(key: ServiceKey, attempt: int) -> int:
    text = f"{key.namespace}/{key.name}" if attempt == 0 else f"{key.namespace}/{key.name}#{attempt}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big")


def parse_cidr(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse a ClusterSetIP CIDR (strict: no host bits set); at least 2 usable addresses."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise InvalidCidr(f"ClusterSetIP CIDR {cidr!r} is not a network address like 241.0.0.0/8: {exc}") from None
    if net.num_addresses < 4:
        raise InvalidCidr(f"ClusterSetIP CIDR {cidr!r} is too small (need at least a /30 or /126)")
    return net


def allocate_ips(keys: Iterable[ServiceKey], cidr: str = DEFAULT_CIDR) -> dict[ServiceKey, str]:
    """A ClusterSetIP for every key, from ``cidr``: the same in every cluster and across restarts.

    Each key hashes (SHA-256 of ``namespace/name``) to an address inside the range, skipping the network and
    broadcast (for IPv6: first and last) addresses. Keys are placed in sorted order; a key whose address is
    taken re-hashes with an attempt counter until it finds a free one. So the answer is a function of the key set
    alone; a key's address only moves when a newly added key that sorts before it hashes onto the same address,
    which is rare in a large range (about n/size per key).
    """
    net = parse_cidr(cidr)
    unique = sorted(set(keys))
    usable = net.num_addresses - 2
    if len(unique) > usable:
        raise InvalidCidr(f"ClusterSetIP CIDR {cidr} has {usable} usable addresses, fewer than {len(unique)} services")
    base = int(net.network_address)
    taken: set[int] = set()
    out: dict[ServiceKey, str] = {}
    for key in unique:
        attempt = 0
        while True:  # bounded: there are more free offsets than keys, and the probe ends in a linear sweep
            # After 64 re-hashes (practically unreachable) sweep linearly, which must find a free offset.
            h = _hash(key, attempt) if attempt < 64 else _hash(key, 0) + attempt - 64
            offset = 1 + h % usable
            if offset not in taken:
                break
            attempt += 1
        taken.add(offset)
        out[key] = str(ipaddress.ip_address(base + offset))
    return out


def derive_local(registry: Registry, exports: Iterable[ServiceExport], *, unsupported: Mapping[ServiceKey, str],
                 cidr: str) -> Registry:
    """Without a federation, the clusterset is ``registry``'s local cluster alone: its ``exports`` get their
    conditions, and the registry its imports, from the same rules the federation applies centrally (:func:`derive`
    over this cluster only). ``unsupported`` as in :func:`derive`, for the local cluster."""
    local = registry.local
    exports = tuple(exports)
    result = derive({local: {s.key: s for s in registry.services(local)}}, exports, cidr=cidr,
                    unsupported={local: unsupported})
    registry = registry.with_shard(local, registry.services(local), result.exports_with_conditions(exports))
    return registry.with_catalog(clusters=registry.clusters, imports=result.imports)
