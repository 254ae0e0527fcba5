"""The merged catalog: a pure function of the store's members and export sets.

The federation applies the MCS rules (``discovery.mcs.derive``) once, here, centrally: every cluster sees the same
ServiceImports, the same conditions and the same ClusterSetIPs. Members whose lease expired (``unreachable_since``
set) or that are not registered contribute nothing: their stored exports stay in the store and come back when the
member does. What one viewer sees is ``view(catalog, network=...)``: pod addresses are kept only for viewers on the
publisher's network; everyone else gets the gateway and the per-locality summary.

``diff(old, new)`` lists what changed between two catalogs, per service and per member; the service streams those
changes to watchers. ``with_export_conditions(registry, catalog)`` is the member's side: its own exports with the
conditions the federation computed for them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import immutables

from discovery.mcs import (
    DEFAULT_CIDR,
    READY,
    REASON_PENDING,
    VALID,
    allocate_ips,
    carry_conditions,
    derive,
    stamp,
)
from discovery.model import (
    ClusterId,
    Condition,
    ConditionStatus,
    NetworkId,
    Registry,
    RemoteEndpoints,
    Service,
    ServiceExport,
    ServiceImport,
    ServiceKey,
    ServiceType,
)
from federation.records import ExportedService, ExportSet, Member


@dataclass(frozen=True, slots=True)
class CatalogService:
    """One merged service: the ServiceImport, each exporter's conditions, and each contributing cluster's shard."""

    import_: ServiceImport
    conditions: tuple[tuple[ClusterId, Condition], ...] = ()
    endpoints: tuple[RemoteEndpoints, ...] = ()

    @property
    def key(self) -> ServiceKey:
        return self.import_.key

    def shard(self, cluster: ClusterId) -> RemoteEndpoints | None:
        return next((r for r in self.endpoints if r.cluster == cluster), None)


@dataclass(frozen=True, slots=True)
class Catalog:
    revision: int
    members: Mapping[ClusterId, Member] = field(default_factory=dict)
    services: Mapping[ServiceKey, CatalogService] = field(default_factory=dict)
    # The ClusterSetIP allocation over ``vip_keys`` (kept so an incremental build can reuse it).
    vips: Mapping[ServiceKey, str] = field(default_factory=dict, compare=False, repr=False)
    vip_keys: frozenset[ServiceKey] = field(default=frozenset(), compare=False, repr=False)
    # Whether building this catalog allocated every ClusterSetIP again (any service's address may have moved), or
    # kept the previous catalog's addresses: then only the keys it was told about can differ (see ``diff``).
    reallocated: bool = field(default=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        # ``services`` is a persistent map (a HAMT): a catalog made from another by a few changes (``apply``, an
        # incremental ``build``) shares the rest with it, so one change costs O(log n), not a copy of 50,000
        # entries; it compares equal to another catalog's by content, as a dict would.
        if not isinstance(self.services, immutables.Map):
            object.__setattr__(self, "services", immutables.Map(self.services))

    def connected(self, cluster: ClusterId) -> bool:
        m = self.members.get(cluster)
        return m is not None and m.unreachable_since is None


@dataclass(frozen=True, slots=True)
class ServiceChange:
    key: ServiceKey
    service: CatalogService | None  # None: the service left the catalog


@dataclass(frozen=True, slots=True)
class MemberChange:
    cluster: ClusterId
    member: Member | None  # None: the member was removed


Change = ServiceChange | MemberChange


def _service_of(cluster: ClusterId, s: ExportedService) -> Service:
    return Service(cluster=cluster, key=s.key, ports=s.ports, headless=s.type == ServiceType.HEADLESS,
                   endpoints=s.endpoints, traits=s.traits)


def build(*, revision: int, members: Mapping[ClusterId, Member], exports: Iterable[ExportSet],
          cidr: str = DEFAULT_CIDR, previous: Catalog | None = None,
          dirty: Collection[ServiceKey] | None = None) -> Catalog:
    """The merged catalog from members and their export sets; only connected members' exports count.

    With ``previous`` and ``dirty`` it is incremental: only the keys in ``dirty`` are derived again (the MCS rules
    are per key), the rest is taken from ``previous``; ClusterSetIPs are re-allocated over the whole key set
    whenever that set changes, so the answer equals a full build (a test checks this).
    """
    if previous is None:
        dirty = None
    live = {c for c, m in members.items() if m.unreachable_since is None}
    services: dict[ClusterId, dict[ServiceKey, Service]] = {}
    service_exports: list[ServiceExport] = []
    published: dict[tuple[ClusterId, ServiceKey], ExportedService] = {}
    wanted = None if dirty is None else set(dirty)
    for export_set in exports:
        if export_set.cluster not in live:
            continue
        shard = services.setdefault(export_set.cluster, {})
        for s in export_set.services:
            if wanted is not None and s.key not in wanted:
                continue
            shard[s.key] = _service_of(export_set.cluster, s)
            service_exports.append(ServiceExport(cluster=export_set.cluster, key=s.key, created=s.created,
                                                 exported_labels=s.exported_labels,
                                                 exported_annotations=s.exported_annotations))
            published[(export_set.cluster, s.key)] = s
    result = derive(services, service_exports, cidr=cidr)
    conditions: dict[ServiceKey, list[tuple[ClusterId, Condition]]] = {}
    for (cluster, key), conds in sorted(result.conditions.items(), key=lambda kv: (kv[0][1].namespace, kv[0][1].name,
                                                                                   kv[0][0])):
        conditions.setdefault(key, []).extend((cluster, c) for c in conds)
    merged: dict[ServiceKey, CatalogService] | Any  # a dict, or a mutation of the previous catalog's map
    if previous is not None and wanted is not None:
        merged = _mutation(previous.services)
        for k in wanted:
            merged.pop(k, None)
    else:
        merged = {}
    for key, imp in result.imports.items():
        shards: list[RemoteEndpoints] = []
        for cluster in imp.clusters:
            pub = published.get((cluster, key))
            if pub is None:
                continue
            info = members[cluster].info
            shards.append(RemoteEndpoints(cluster=cluster, network=info.network, gateway_host=info.gateway_host,
                                          gateway_port=info.gateway_port, localities=pub.localities,
                                          endpoints=pub.endpoints))
        merged[key] = CatalogService(import_=imp, conditions=tuple(conditions.get(key, ())), endpoints=tuple(shards))
    # ClusterSetIPs are a function of the whole set of ClusterSetIP keys.
    check: Iterable[ServiceKey]
    if previous is not None and wanted is not None:
        vip_keys = (previous.vip_keys - wanted) | frozenset(
            k for k in wanted if k in merged and merged[k].import_.type == ServiceType.CLUSTER_SET_IP)
        vips, full = _reallocate(previous, vip_keys, cidr)
        check = vip_keys if full else wanted & vip_keys
    else:
        vip_keys = frozenset(k for k, s in merged.items() if s.import_.type == ServiceType.CLUSTER_SET_IP)
        vips = allocate_ips(vip_keys, cidr)
        check = vip_keys
        full = True
    for key in check:
        svc = merged[key]
        want = (vips[key],)
        if svc.import_.ips != want:
            merged[key] = replace(svc, import_=replace(svc.import_, ips=want))
    return Catalog(revision=revision, members=dict(members), services=_finished(merged), vips=vips,
                   vip_keys=vip_keys, reallocated=full)


def _mutation(services: Mapping[ServiceKey, CatalogService]) -> Any:
    """A mutable draft of a catalog's (persistent) service map; ``_finished`` makes it a map again."""
    base = services if isinstance(services, immutables.Map) else immutables.Map(services)
    return base.mutate()


def _finished(draft: Any) -> Mapping[ServiceKey, CatalogService]:
    return draft if isinstance(draft, dict) else draft.finish()


def _reallocate(previous: Catalog, vip_keys: frozenset[ServiceKey], cidr: str
                ) -> tuple[Mapping[ServiceKey, str], bool]:
    """The ClusterSetIP allocation for ``vip_keys``, reusing ``previous``'s when that gives the same answer.

    ``allocate_ips`` places keys in sorted order, each at the first free address of its probe sequence. A key
    added at its first-choice address, which nobody holds, changes no other key: no key probed that address (it
    would have taken it). So additions that land on a free first choice extend the old map; anything else
    (removals, a first choice already held) allocates again from scratch. Returns ``(vips, from_scratch)``.
    """
    if vip_keys == previous.vip_keys:
        return previous.vips, False
    if not previous.vip_keys <= vip_keys:
        return allocate_ips(vip_keys, cidr), True
    vips = dict(previous.vips)
    held = set(vips.values())
    for key in sorted(vip_keys - previous.vip_keys):
        first = allocate_ips([key], cidr)[key]
        if first in held:
            return allocate_ips(vip_keys, cidr), True
        vips[key] = first
        held.add(first)
    return vips, False


def view_service(service: CatalogService, network: NetworkId | None) -> CatalogService:
    """``service`` as a viewer on ``network`` sees it: pod addresses only from clusters on the same network."""
    if all(not r.endpoints or r.network == network for r in service.endpoints):
        return service
    return replace(service, endpoints=tuple(r if r.network == network else replace(r, endpoints=())
                                            for r in service.endpoints))


def view(catalog: Catalog, *, network: NetworkId | None) -> Catalog:
    return replace(catalog, services={k: view_service(s, network) for k, s in catalog.services.items()})


def diff(old: Catalog, new: Catalog, *, keys: Collection[ServiceKey] | None = None) -> list[Change]:
    """What changed from ``old`` to ``new``: members first (so a viewer knows a cluster before its services).

    ``keys``: the services that may differ, when the caller knows (``new`` was built from ``old`` with those
    keys dirty and kept every ClusterSetIP: ``not new.reallocated``); every other service is then taken as equal,
    so a one-service change costs O(1), not a pass over a catalog of 50,000."""
    changes: list[Change] = []
    for cluster in sorted(old.members.keys() | new.members.keys()):
        before, after = old.members.get(cluster), new.members.get(cluster)
        if before != after:
            changes.append(MemberChange(cluster=cluster, member=after))
    changed: list[ServiceKey] = []
    old_services, new_services = old.services, new.services
    if keys is not None:
        for key in keys:
            before_s, after_s = old_services.get(key), new_services.get(key)
            if before_s is not after_s and before_s != after_s:
                changed.append(key)
        changed.sort(key=lambda k: (k.namespace, k.name))
        changes.extend(ServiceChange(key=key, service=new_services.get(key)) for key in changed)
        return changes
    for key, after_s in new_services.items():
        before_s = old_services.get(key)
        if before_s is not after_s and before_s != after_s:
            changed.append(key)
    changed.extend(key for key in old_services if key not in new_services)
    changed.sort(key=lambda k: (k.namespace, k.name))
    changes.extend(ServiceChange(key=key, service=new_services.get(key)) for key in changed)
    return changes


def apply(catalog: Catalog, revision: int, changes: Iterable[Change]) -> Catalog:
    """``catalog`` with ``changes`` applied, at ``revision`` (the client's side of the watch)."""
    members = dict(catalog.members)
    services = _mutation(catalog.services)
    for change in changes:
        if isinstance(change, MemberChange):
            if change.member is None:
                members.pop(change.cluster, None)
            else:
                members[change.cluster] = change.member
        elif change.service is None:
            services.pop(change.key, None)
        else:
            services[change.key] = change.service
    return Catalog(revision=revision, members=members, services=_finished(services))


def with_export_conditions(registry: Registry, catalog: Catalog, *,
                           unsupported: Mapping[ServiceKey, str] | None = None, now: datetime | None = None,
                           previous: Mapping[ServiceKey, ServiceExport] | None = None) -> Registry:
    """``registry`` with the local exports' MCS conditions (Valid, Ready, Conflict) as the federation computed them
    centrally, so every cluster reports the same conflict resolution. An export the federation has no conditions
    for because it is not valid here (no such Service: ``Valid=False, NoService``; an ExternalName Service, named
    in ``unsupported``: ``InvalidServiceType``) gets them from the same MCS rules applied to this cluster alone:
    such an export is never published, so only this cluster can say why. A valid export the catalog does not hold
    yet is ``Ready=False, Pending``.

    The federation's conditions carry no transition time: they are stamped here with ``now`` against the export's
    previous conditions (its own, else ``previous``'s, default the registry's), and with its generation."""
    local = registry.local
    exports = registry.exports.get(local, {})
    before = previous if previous is not None else exports
    central: dict[ServiceKey, tuple[Condition, ...]] = {}
    missing: list[ServiceExport] = []
    for export in carry_conditions(exports.values(), before):
        entry = catalog.services.get(export.key)
        conditions = tuple(c for cid, c in entry.conditions if cid == local) if entry is not None else ()
        if conditions:
            central[export.key] = stamp(conditions, export.conditions, now=now, generation=export.generation)
        else:
            missing.append(export)
    if missing:
        alone = derive({local: {s.key: s for s in registry.services(local)}}, missing,
                       unsupported={local: dict(unsupported or {})}, now=now)
        for export, mine in zip(sorted(missing, key=lambda e: (e.cluster, e.key)),
                                alone.exports_with_conditions(missing), strict=True):
            valid = mine.condition(VALID)
            if valid is not None and valid.status is ConditionStatus.FALSE:
                central[export.key] = mine.conditions
            elif valid is not None:
                pending = Condition(READY, ConditionStatus.FALSE, REASON_PENDING,
                                    "valid here; waiting for the federation's catalog to include this export")
                central[export.key] = (valid, *stamp((pending,), export.conditions, now=now,
                                                     generation=export.generation))
    updated = []
    changed = False
    for key, export in sorted(exports.items()):
        conditions = central.get(key, ())
        if conditions and conditions != export.conditions:
            export = replace(export, conditions=conditions)
            changed = True
        updated.append(export)
    if not changed:
        return registry
    return registry.with_shard(local, registry.services(local), updated)
