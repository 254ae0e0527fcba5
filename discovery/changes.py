"""What changed between two registry snapshots, per service key: its definition, or only its endpoints.

The push pipeline (``gateway.pipeline``) rebuilds only the xDS resources that depend on what changed. Watchers say
which part of the registry moved (a cluster's shard, the federated catalog); these pure functions compare that
part of two ``Registry`` values and name the keys. Unchanged parts are skipped by identity (a ``Registry`` shares
the shards it did not replace), so the cost is the size of what was replaced, not of the registry.

A key's *definition* is everything but its endpoints: a local Service's ports, type, ClusterIP, labels and
selector, its ServiceExport, its ServiceImport. A remote cluster's shard (``RemoteEndpoints``: gateway, locality
summary, pod addresses on our network) is endpoints only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from discovery.model import ClusterId, Registry, Service, ServiceKey

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class RegistryChanges:
    """Keys whose definition changed, keys of which only endpoints changed, and whether a member cluster's
    ``ClusterInfo`` (network, locality, gateway) changed, which concerns every key."""

    services: frozenset[ServiceKey] = frozenset()
    endpoints: frozenset[ServiceKey] = frozenset()
    clusters: bool = False

    def __or__(self, other: RegistryChanges) -> RegistryChanges:
        services = self.services | other.services
        return RegistryChanges(services=services, endpoints=(self.endpoints | other.endpoints) - services,
                               clusters=self.clusters or other.clusters)

    def __bool__(self) -> bool:
        return bool(self.services or self.endpoints or self.clusters)


def _differing(old: Mapping[ServiceKey, V] | None, new: Mapping[ServiceKey, V] | None) -> set[ServiceKey]:
    """Keys added, removed or holding a different value (identity first, then equality)."""
    old = old or {}
    new = new or {}
    if old is new:
        return set()
    out = set(old.keys() ^ new.keys())
    for key, value in new.items():
        before = old.get(key)
        if before is not None and before is not value and before != value:
            out.add(key)
    return out


def _same_definition(a: Service, b: Service) -> bool:
    return (a.ports == b.ports and a.headless == b.headless and a.cluster_ip == b.cluster_ip
            and a.labels == b.labels and a.selector == b.selector)


def shard_changes(old: Registry, new: Registry, cluster: ClusterId) -> RegistryChanges:
    """What changed in ``cluster``'s part of the registry: its services and exports (a local shard) and its
    federated endpoint summaries (a remote shard)."""
    services: set[ServiceKey] = set()
    endpoints: set[ServiceKey] = set()
    old_shard, new_shard = old.shards.get(cluster, {}), new.shards.get(cluster, {})
    for key in _differing(old_shard, new_shard):
        a, b = old_shard.get(key), new_shard.get(key)
        if a is not None and b is not None and _same_definition(a, b):
            endpoints.add(key)
        else:
            services.add(key)
    services |= _differing(old.exports.get(cluster), new.exports.get(cluster))
    endpoints |= _differing(old.remote.get(cluster), new.remote.get(cluster))
    return RegistryChanges(services=frozenset(services), endpoints=frozenset(endpoints - services))


def catalog_changes(old: Registry, new: Registry) -> RegistryChanges:
    """What changed in the federated catalog's merged part: ServiceImports (definitions) and members."""
    return RegistryChanges(services=frozenset(_differing(old.imports, new.imports)),
                           clusters=old.clusters is not new.clusters and old.clusters != new.clusters)


def registry_changes(old: Registry, new: Registry) -> RegistryChanges:
    """Everything that changed between two registries (every shard and the catalog)."""
    out = catalog_changes(old, new)
    for cluster in sorted(set(old.shards) | set(new.shards) | set(old.remote) | set(new.remote)
                          | set(old.exports) | set(new.exports)):
        out = out | shard_changes(old, new, cluster)
    return out
