"""Multi-Cluster Services semantics (KEP-1645, ``multicluster.x-k8s.io``): export validity, conflict
resolution, ServiceImport derivation and ClusterSetIP allocation. Pure functions of their inputs.

Every control plane runs :func:`derive` on the same inputs and must reach the same answer, so nothing here depends
on the order inputs arrive in: exports are ranked by (creation timestamp, cluster name) and the oldest wins every
conflict; ClusterSetIPs are a hash of the service key, with collisions resolved over the sorted key set.

Conditions follow the mcs-api v1beta1 ``ServiceExport`` condition types and reasons:

* ``Valid``: True/``Valid``; False/``NoService`` (no such Service in the exporting cluster) or
  ``InvalidServiceType`` (ExternalName).
* ``Ready``: True/``Exported`` (the cluster backs the ServiceImport); False/``Failed`` (the export is not valid);
  False/``Pending`` (valid, published, the federation has not answered yet: ``federation.catalog``).
* ``Conflict``: False/``NoConflicts``; True with every reason that holds, joined by commas in this order:
  ``PortConflict``, ``TypeConflict``, ``SessionAffinityConflict``, ``SessionAffinityConfigConflict``,
  ``LabelsConflict``, ``AnnotationsConflict``, ``InternalTrafficPolicyConflict``, ``TrafficDistributionConflict``,
  ``IPFamilyConflict``. The oldest export wins each: the ServiceImport takes its value. As the KEP recommends, a
  conflict is raised on every export of the service, each with a message from its own cluster's point of view
  naming the winner and how many clusters disagree.

Every condition carries ``observedGeneration`` (the export's ``metadata.generation``) and, once stamped with a
``now`` (:func:`stamp`; :func:`derive` with ``now``), ``lastTransitionTime``: kept from the export's previous
condition of the same type while status and reason stay, ``now`` when either changes.

Exception tree (this module)::

    DiscoveryError
     +-- InvalidValue
          +-- InvalidCidr      a ClusterSetIP CIDR that is unparsable or too small for the keys
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from discovery.fields import format_timestamp
from discovery.model import (
    ClusterId,
    Condition,
    ConditionStatus,
    InvalidValue,
    PeerImport,
    Registry,
    Service,
    ServiceExport,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceTraits,
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
REASON_PENDING = "Pending"
REASON_FAILED = "Failed"
REASON_NO_CONFLICTS = "NoConflicts"
REASON_PORT_CONFLICT = "PortConflict"
REASON_TYPE_CONFLICT = "TypeConflict"
REASON_SESSION_AFFINITY_CONFLICT = "SessionAffinityConflict"
REASON_SESSION_AFFINITY_CONFIG_CONFLICT = "SessionAffinityConfigConflict"
REASON_LABELS_CONFLICT = "LabelsConflict"
REASON_ANNOTATIONS_CONFLICT = "AnnotationsConflict"
REASON_INTERNAL_TRAFFIC_POLICY_CONFLICT = "InternalTrafficPolicyConflict"
REASON_TRAFFIC_DISTRIBUTION_CONFLICT = "TrafficDistributionConflict"
REASON_IP_FAMILY_CONFLICT = "IPFamilyConflict"

#: Every Conflict=True reason v1beta1 defines, in the order a joined reason lists them.
CONFLICT_REASONS = (
    REASON_PORT_CONFLICT,
    REASON_TYPE_CONFLICT,
    REASON_SESSION_AFFINITY_CONFLICT,
    REASON_SESSION_AFFINITY_CONFIG_CONFLICT,
    REASON_LABELS_CONFLICT,
    REASON_ANNOTATIONS_CONFLICT,
    REASON_INTERNAL_TRAFFIC_POLICY_CONFLICT,
    REASON_TRAFFIC_DISTRIBUTION_CONFLICT,
    REASON_IP_FAMILY_CONFLICT,
)


class InvalidCidr(InvalidValue):
    """A ClusterSetIP CIDR that cannot be parsed or holds too few addresses."""


@dataclass(frozen=True, slots=True)
class McsResult:
    """What the clusterset imports, and each export's conditions (keyed by exporting cluster and service)."""

    imports: dict[ServiceKey, ServiceImport]
    conditions: dict[tuple[ClusterId, ServiceKey], tuple[Condition, ...]]

    def exports_with_conditions(self, exports: Iterable[ServiceExport]) -> list[ServiceExport]:
        """``exports`` with their ``conditions`` filled in from this result (sorted by cluster, key)."""
        return [replace(e, conditions=self.conditions.get((e.cluster, e.key), ()))
                for e in sorted(exports, key=lambda e: (e.cluster, e.key))]


def stamp(conditions: Iterable[Condition], previous: Iterable[Condition], *, now: datetime | None,
          generation: int) -> tuple[Condition, ...]:
    """``conditions`` with ``observed_generation`` set and ``last_transition_time`` carried over from the
    ``previous`` condition of the same type when its status and reason are unchanged, else ``now`` (None: leave
    unstamped ones unstamped)."""
    before = {c.type: c for c in previous}
    out = []
    for c in conditions:
        p = before.get(c.type)
        kept = p is not None and p.status == c.status and p.reason == c.reason and p.last_transition_time is not None
        when = p.last_transition_time if kept and p is not None else now
        out.append(replace(c, observed_generation=generation, last_transition_time=when))
    return tuple(out)


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


def _pairs(items: tuple[tuple[str, str], ...]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in items) + "}" if items else "none"


def _families(t: ServiceTraits) -> frozenset[str]:
    return frozenset(t.ip_families)


@dataclass(frozen=True, slots=True)
class _Field:
    """One compared property: its v1beta1 reason, its name in messages, and how to read and show it."""

    reason: str
    name: str
    value: Callable[[ServiceExport, Service], object]
    show: Callable[[ServiceExport, Service], str]
    # Compared only when both exports set it (unset: nothing to disagree with).
    only_when_set: bool = False


def _trait(get: Callable[[ServiceTraits], object]) -> Callable[[ServiceExport, Service], object]:
    return lambda _e, svc: get(svc.traits)


def _shown(get: Callable[[ServiceTraits], object]) -> Callable[[ServiceExport, Service], str]:
    return lambda _e, svc: str(get(svc.traits) or "unset")


#: The properties compared besides ports and type, in the order of :data:`CONFLICT_REASONS`. IP families conflict
#: only when both exports name theirs and the sets differ (an object that does not say takes the cluster's); the
#: affinity config (its timeout) only when both use ClientIP affinity (else the difference is the affinity's).
_FIELDS = (
    _Field(REASON_SESSION_AFFINITY_CONFLICT, "sessionAffinity", _trait(lambda t: t.session_affinity),
           _shown(lambda t: t.session_affinity)),
    _Field(REASON_SESSION_AFFINITY_CONFIG_CONFLICT, "sessionAffinityConfig", _trait(lambda t: t.affinity_timeout),
           lambda _e, svc: f"timeoutSeconds {svc.traits.affinity_timeout}" if svc.traits.affinity_timeout
           else "unset", only_when_set=True),
    _Field(REASON_LABELS_CONFLICT, "exportedLabels", lambda e, _s: e.exported_labels,
           lambda e, _s: _pairs(e.exported_labels)),
    _Field(REASON_ANNOTATIONS_CONFLICT, "exportedAnnotations", lambda e, _s: e.exported_annotations,
           lambda e, _s: _pairs(e.exported_annotations)),
    _Field(REASON_INTERNAL_TRAFFIC_POLICY_CONFLICT, "internalTrafficPolicy",
           _trait(lambda t: t.internal_traffic_policy), _shown(lambda t: t.internal_traffic_policy)),
    _Field(REASON_TRAFFIC_DISTRIBUTION_CONFLICT, "trafficDistribution", _trait(lambda t: t.traffic_distribution),
           _shown(lambda t: t.traffic_distribution)),
    _Field(REASON_IP_FAMILY_CONFLICT, "ipFamilies", _trait(_families),
           lambda _e, svc: ",".join(svc.traits.ip_families) or "unset", only_when_set=True),
)


def _differs(f: _Field, a: tuple[ServiceExport, Service], b: tuple[ServiceExport, Service]) -> bool:
    va, vb = f.value(*a), f.value(*b)
    if f.only_when_set and (not va or not vb):
        return False
    return va != vb


def _field_conflict(f: _Field, me: tuple[ServiceExport, Service], winner: tuple[ServiceExport, Service],
                    members: list[tuple[ServiceExport, Service]], resolved: str) -> str | None:
    """The message part of one property's conflict from ``me``'s point of view, None when every member agrees."""
    losers = [m for m in members if _differs(f, m, winner)]
    if not losers:
        return None
    n, k = len(members), len(losers)
    theirs = f.show(*winner)
    if any(m[0].cluster == me[0].cluster for m in losers):
        detail = f"{f.name} conflict: this cluster's is {f.show(*me)}, the oldest export's is {theirs}"
    else:
        named = ", ".join(f"{e.cluster} ({f.show(e, svc)})" for e, svc in losers)
        detail = f"{f.name} conflict with {_plural(k, 'cluster', 'clusters')} {named}"
    return f"{detail}; {resolved}: the ServiceImport uses {theirs}; {k} of {n} clusters disagree"


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
    mine_m = next(m for m in members if m[0].cluster == me.cluster)
    winner_m = next(m for m in members if m[0].cluster == winner.cluster)
    for f in _FIELDS:
        part = _field_conflict(f, mine_m, winner_m, members, resolved)
        if part is not None:
            reasons.append(f.reason)
            parts.append(part)
    if not reasons:
        if n == 1:
            agree = f"the only exporting cluster ({me.cluster}): nothing to conflict with"
        else:
            agree = f"all {n} exporting clusters agree on every compared property"
        return Condition(CONFLICT, ConditionStatus.FALSE, REASON_NO_CONFLICTS, agree)
    return Condition(CONFLICT, ConditionStatus.TRUE, ",".join(reasons), "; ".join(parts))


def derive(
    services: Mapping[ClusterId, Mapping[ServiceKey, Service]],
    exports: Iterable[ServiceExport],
    *,
    cidr: str = DEFAULT_CIDR,
    unsupported: Mapping[ClusterId, Mapping[ServiceKey, str]] | None = None,
    now: datetime | None = None,
) -> McsResult:
    """Derive the clusterset's ServiceImports and every export's conditions.

    ``services[cluster][key]`` are each cluster's Services; ``exports`` every ServiceExport of every cluster (in
    any order; a duplicate (cluster, key) keeps the oldest). ``unsupported[cluster][key]`` names Services that
    exist but cannot be exported (ExternalName), which makes their exports ``Valid=False, InvalidServiceType``.

    Each export's own ``conditions`` are its previous ones: with ``now``, the new conditions are stamped against
    them (:func:`stamp`); without, they carry no transition time (the federation computes them unstamped, each
    control plane stamps its own). ``observed_generation`` is the export's ``generation`` either way.

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
            conditions[(cluster, key)] = stamp((
                Condition(VALID, ConditionStatus.FALSE, reason, message),
                Condition(READY, ConditionStatus.FALSE, REASON_FAILED, f"not exported: {message}"),
                Condition(
                    CONFLICT, ConditionStatus.FALSE, REASON_NO_CONFLICTS, "not evaluated: the export is not valid"
                ),
            ), e.conditions, now=now, generation=e.generation)
            continue
        valid.setdefault(key, []).append((e, svc))

    imports: dict[ServiceKey, ServiceImport] = {}
    for key in sorted(valid):
        members = sorted(valid[key], key=lambda m: rank(m[0]))
        winner, winner_svc = members[0]
        import_type = winner_svc.type
        ports, clashes = _merge_ports(members)
        clusters = tuple(sorted(e.cluster for e, _ in members))
        imports[key] = ServiceImport(key=key, type=import_type, ports=ports, clusters=clusters,
                                     traits=winner_svc.traits, labels=winner.exported_labels,
                                     annotations=winner.exported_annotations)
        for e, svc in members:
            n_ready = len(svc.ready_endpoints)
            conditions[(e.cluster, key)] = stamp((
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
            ), e.conditions, now=now, generation=e.generation)

    vip_keys = [k for k, imp in imports.items() if imp.type == ServiceType.CLUSTER_SET_IP]
    ips = allocate_ips(vip_keys, cidr)
    for vk in vip_keys:
        imports[vk] = replace(imports[vk], ips=(ips[vk],))
    return McsResult(imports=imports, conditions=conditions)


def _hash(text: str, attempt: int) -> int:
    salted = text if attempt == 0 else f"{text}#{attempt}"
    return int.from_bytes(hashlib.sha256(salted.encode()).digest()[:16], "big")


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
    placed = _place([f"{key.namespace}/{key.name}" for key in unique], net, set(), what="services")
    return dict(zip(unique, placed, strict=True))


def _place(texts: list[str], net: ipaddress.IPv4Network | ipaddress.IPv6Network, taken: set[int], *,
           what: str) -> list[str]:
    """An address of ``net`` for each text, in order, by hash, never one of the ``taken`` offsets (which grows)."""
    usable = net.num_addresses - 2
    if len(texts) + len(taken) > usable:
        raise InvalidCidr(f"ClusterSetIP CIDR {net} has {usable} usable addresses, fewer than "
                          f"{len(texts) + len(taken)} {what}")
    base = int(net.network_address)
    out: list[str] = []
    for text in texts:
        attempt = 0
        while True:  # bounded: there are more free offsets than keys, and the probe ends in a linear sweep
            # After 64 re-hashes (practically unreachable) sweep linearly, which must find a free offset.
            h = _hash(text, attempt) if attempt < 64 else _hash(text, 0) + attempt - 64
            offset = 1 + h % usable
            if offset not in taken:
                break
            attempt += 1
        taken.add(offset)
        out.append(str(ipaddress.ip_address(base + offset)))
    return out


def allocate_peer_ips(peers: Iterable[PeerImport], cidr: str, imports: Iterable[ServiceImport]) -> list[PeerImport]:
    """``peers`` (ClusterSetIP services; headless ones as they are), each with a ClusterSetIP of this clusterset's
    ``cidr`` that no import of ``imports`` holds: hashed from ``<peer>:<namespace>/<name>`` as
    :func:`allocate_ips` hashes a key, so every member of the clusterset gives a peer's service the same address."""
    net = parse_cidr(cidr)
    base = int(net.network_address)
    taken: set[int] = set()
    for imp in imports:
        for ip in imp.ips:
            with contextlib.suppress(ValueError):
                address = ipaddress.ip_address(ip)
                if address in net:
                    taken.add(int(address) - base)
    ordered = sorted(peers, key=lambda p: (p.peer, p.key))
    vip = [p for p in ordered if p.type is ServiceType.CLUSTER_SET_IP]
    placed = dict(zip([(p.peer, p.key) for p in vip],
                      _place([f"{p.peer}:{p.key.namespace}/{p.key.name}" for p in vip], net, taken,
                             what="services and peer services"), strict=True))
    return [replace(p, ips=(placed[(p.peer, p.key)],)) if (p.peer, p.key) in placed else p for p in ordered]


def carry_conditions(exports: Iterable[ServiceExport], previous: Mapping[ServiceKey, ServiceExport]
                     ) -> list[ServiceExport]:
    """``exports`` that have no conditions of their own take those of the same key's export in ``previous`` (the
    registry before a fresh snapshot replaced them), so :func:`stamp` can keep their transition times."""
    out = []
    for e in exports:
        before = previous.get(e.key)
        out.append(replace(e, conditions=before.conditions) if not e.conditions and before is not None else e)
    return out


def derive_local(registry: Registry, exports: Iterable[ServiceExport], *, unsupported: Mapping[ServiceKey, str],
                 cidr: str, now: datetime | None = None,
                 previous: Mapping[ServiceKey, ServiceExport] | None = None) -> Registry:
    """Without a federation, the clusterset is ``registry``'s local cluster alone: its ``exports`` get their
    conditions, and the registry its imports, from the same rules the federation applies centrally (:func:`derive`
    over this cluster only). ``unsupported`` as in :func:`derive`, for the local cluster. The previous conditions
    (for the transition times stamped with ``now``) are the exports' own, else ``previous``'s (default: the
    registry's current exports)."""
    local = registry.local
    before = previous if previous is not None else registry.exports.get(local, {})
    exports = tuple(carry_conditions(exports, before))
    result = derive({local: {s.key: s for s in registry.services(local)}}, exports, cidr=cidr,
                    unsupported={local: unsupported}, now=now)
    registry = registry.with_shard(local, registry.services(local), result.exports_with_conditions(exports))
    return registry.with_catalog(clusters=registry.clusters, imports=result.imports)
