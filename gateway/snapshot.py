"""Immutable, versioned xDS snapshots: the whole configuration one proxy should have.

A snapshot maps an xDS type URL to the named resources of that type (protobuf messages). It is built once,
never changed, and replaced whole. Every resource gets a content version (a hash of its deterministic
serialisation) and every type gets a version computed from its resources' names and versions, so two snapshots
with the same content have the same versions. Versions are opaque: compare them for equality only.

Each resource is serialised once, when the snapshot is built; the ADS server reuses those bytes (framed once as a
response field) for every stream and every response.

Exceptions (the xDS serving domain)::

    XdsError
     +-- SnapshotError       a resource is of the wrong type, unnamed, or named differently from its key
     +-- AuthenticationError (gateway.auth)  an xDS client could not be authenticated or claims another node
     +-- SdsError            (gateway.sds)   a workload certificate could not be issued
"""

from __future__ import annotations

import hashlib
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

_PREFIX = "type.googleapis.com/"

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

#: The types served, in the order a proxy should apply them (clusters before endpoints, listeners before routes).
TYPE_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

#: Types whose empty subscription means "everything" (wildcard) in the xDS protocol.
WILDCARD_TYPES: frozenset[str] = frozenset({LISTENER, CLUSTER})


class XdsError(Exception):
    """Root of the xDS serving errors."""


class SnapshotError(XdsError, ValueError):
    """A snapshot was given a resource it cannot serve (names the type URL and the resource)."""


def resource_name(message: Message) -> str:
    """The xDS name of a resource: ``cluster_name`` for a ClusterLoadAssignment, ``name`` for the others."""
    desc = message.DESCRIPTOR
    if desc.full_name == "envoy.config.endpoint.v3.ClusterLoadAssignment":
        return str(getattr(message, "cluster_name"))  # noqa: B009 - generated attribute, typed as Any
    if "name" in desc.fields_by_name:
        return str(getattr(message, "name"))  # noqa: B009
    raise SnapshotError(f"{desc.full_name} has no name field; it cannot be served as an xDS resource")


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


_MASK = (1 << 64) - 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wire_field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (a string, bytes or embedded message) as it appears on the wire.
    Serialised messages concatenate: a response is its header's fields followed by its resources' fields."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


#: The ``resources`` field of both DiscoveryResponse and DeltaDiscoveryResponse.
RESOURCES_FIELD = 2


@dataclass(frozen=True, eq=False)
class Entry:
    """One resource as served: its serialised bytes and content version. Entries compare by identity: a snapshot
    derived with ``replace``/``select`` shares the unchanged ones, so the ADS server finds what changed between two
    snapshots with a set difference of their entries.

    An entry keeps the bytes, not the message (2,000 proxies' snapshots hold millions of resources; a parsed
    protobuf message costs several times its bytes): ``message`` parses them again when asked. What a response
    carries (``sotw_field``, ``delta_field``: the resource wrapped in ``Any`` or ``Resource`` and framed as the
    response's field) is built once, off the event loop by the push pipeline, and shared by every stream."""

    name: str
    version: str
    type_url: str
    data: bytes
    size: int
    mix: int  # this (name, version)'s share of its type's version
    kind: type[Message]

    @cached_property
    def message(self) -> Message:
        return self.kind.FromString(self.data)

    @property
    def packed(self) -> any_pb2.Any:
        return any_pb2.Any(type_url=self.type_url, value=self.data)

    def _any(self) -> bytes:
        return wire_field(1, self.type_url.encode()) + wire_field(2, self.data)  # google.protobuf.Any

    @cached_property
    def sotw_field(self) -> bytes:
        """The resource as a state-of-the-world response's ``resources`` entry (an ``Any``)."""
        return wire_field(RESOURCES_FIELD, self._any())

    @cached_property
    def delta_field(self) -> bytes:
        """The resource as a delta response's ``resources`` entry (a ``Resource``: version 1, resource 2, name 3)."""
        return wire_field(RESOURCES_FIELD, wire_field(1, self.version.encode()) + wire_field(2, self._any())
                          + wire_field(3, self.name.encode()))


def make_entry(type_url: str, name: str, message: Message) -> Entry:
    """Serialise ``message`` once into the ``Entry`` every snapshot and stream shares (validates type and name)."""
    if not isinstance(message, Message):
        raise SnapshotError(f"{type_url}: resource {name!r} is a {type(message).__name__}, not a protobuf message")
    full_name = message.DESCRIPTOR.full_name
    if _PREFIX + full_name != type_url:
        raise SnapshotError(f"{type_url}: resource {name!r} is a {full_name}, which belongs under {_PREFIX}{full_name}")
    own = resource_name(message)
    if own != name:
        raise SnapshotError(f"{type_url}: resource keyed {name!r} names itself {own!r}")
    if not name:
        raise SnapshotError(f"{type_url}: a resource has an empty name")
    return entry_of_bytes(type_url, name, message.SerializeToString(deterministic=True), type(message))


def entry_of_bytes(type_url: str, name: str, data: bytes, kind: type[Message]) -> Entry:
    """An ``Entry`` of a resource already serialised (deterministically) as ``data``."""
    version = _hash(data)
    mix = int.from_bytes(hashlib.blake2b(f"{name}\0{version}".encode(), digest_size=8).digest(), "big")
    return Entry(name=name, version=version, type_url=type_url, data=data, size=len(data), mix=mix, kind=kind)


def _sum(entries: Mapping[str, Entry]) -> int:
    return sum(e.mix for e in entries.values()) & _MASK


def _type_version(total: int) -> str:
    # A type's version is the sum (mod 2**64) of a hash of each (name, version): independent of order, and
    # updated in O(changes) when a derived snapshot replaces a few resources.
    return f"{total:016x}"


_EMPTY_VERSION = _type_version(0)


_EPOCH_CHANGES = 64


class EntryMap(Mapping[str, Entry]):
    """The entries of one type in one snapshot (read-only).

    ``epoch`` and ``changed`` describe lineage: a map made by ``Snapshot.replace`` from another keeps that map's
    epoch and adds the replaced names to ``changed``, so any two maps of one epoch differ at most in the union of
    their ``changed`` sets, and a stream finds what changed between the snapshot it last saw and the current one
    in O(changes). A map built from scratch, or whose ``changed`` would grow past 64 names, starts a new epoch.
    """

    __slots__ = ("_d", "_total", "changed", "epoch")

    def __init__(self, d: dict[str, Entry], *, epoch: object | None = None,
                 changed: frozenset[str] = frozenset(), total: int | None = None) -> None:
        self._d = d
        self.epoch = epoch if epoch is not None else object()
        self.changed = changed
        self._total = total

    @property
    def total(self) -> int:
        """The sum of this map's (name, version) mixes (what its type's version is made of)."""
        if self._total is None:
            self._total = _sum(self)
        return self._total

    def derive(self, updates: Mapping[str, Entry | None]) -> EntryMap:
        """A new map with some entries added, replaced or (``None``) removed, in this map's lineage (see the class
        docstring): O(size) to copy, O(changes) for everything else, and ``touched`` between the two is O(changes).
        An update whose entry is the one already held is no change."""
        current = dict(self._d)
        total = self.total
        names: set[str] = set()
        for name, entry in updates.items():
            old = current.get(name)
            if old is entry:
                continue
            names.add(name)
            if old is not None:
                del current[name]
                total -= old.mix
            if entry is not None:
                current[name] = entry
                total += entry.mix
        if not names:
            return self
        total &= _MASK
        if len(self.changed) + len(names) <= _EPOCH_CHANGES:
            return EntryMap(current, epoch=self.epoch, changed=self.changed | frozenset(names), total=total)
        return EntryMap(current, total=total)

    def __getitem__(self, name: str) -> Entry:
        return self._d[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, name: object) -> bool:
        return name in self._d

    def get(self, name: str, default: Any = None) -> Any:
        return self._d.get(name, default)

    def items(self) -> ItemsView[str, Entry]:
        return self._d.items()

    def keys(self) -> KeysView[str]:
        return self._d.keys()

    def values(self) -> ValuesView[Entry]:
        return self._d.values()

    def copy(self) -> dict[str, Entry]:
        return dict(self._d)


def touched(new: Mapping[str, Entry], old: Mapping[str, Entry]) -> set[str]:
    """Names added, changed or removed between two entry maps: from lineage when both share an epoch, else by a
    set difference of their (identity-compared) entries."""
    if isinstance(new, EntryMap) and isinstance(old, EntryMap) and new.epoch is old.epoch:
        return set(new.changed | old.changed)
    names = {name for name, _ in new.items() - old.items()}
    names.update(old.keys() - new.keys())
    return names


_EMPTY_MAP = EntryMap({})


class _Messages(Mapping[str, Message]):
    """The messages of one type, as a read-only view of its entries (made in O(1))."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> Message:
        return self._entries[name].message

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class _Resources(Mapping[str, Mapping[str, Message]]):
    """``type URL -> name -> message`` as a read-only view of a snapshot's entries (made in O(1): the push pipeline
    makes a snapshot per proxy per change, so the per-type views are made only when read)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, Mapping[str, Entry]]) -> None:
        self._entries = entries

    def __getitem__(self, type_url: str) -> Mapping[str, Message]:
        return _Messages(self._entries[type_url])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Snapshot:
    """A proxy's whole configuration: ``resources[type_url][name] -> message``; versions derive from content."""

    resources: Mapping[str, Mapping[str, Message]]
    _entries: Mapping[str, Mapping[str, Entry]] = field(default_factory=dict, compare=False, repr=False)
    _versions: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    _sums: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self._entries:
            return
        entries: dict[str, Mapping[str, Entry]] = {}
        for type_url, by_name in self.resources.items():
            if not type_url.startswith(_PREFIX):
                raise SnapshotError(f"{type_url!r} is not a type URL (expected {_PREFIX}<message name>)")
            entries[type_url] = EntryMap({n: make_entry(type_url, n, m) for n, m in by_name.items()})
        self._freeze(entries, {t: _sum(e) for t, e in entries.items()})

    def _freeze(self, entries: Mapping[str, Mapping[str, Entry]], sums: Mapping[str, int]) -> None:
        object.__setattr__(self, "_entries", MappingProxyType(dict(entries)))
        object.__setattr__(self, "_sums", MappingProxyType(dict(sums)))
        object.__setattr__(self, "_versions", MappingProxyType({t: _type_version(v) for t, v in sums.items()}))
        object.__setattr__(self, "resources", _Resources(self._entries))

    @classmethod
    def build(cls, resources: Mapping[str, Iterable[Message] | Mapping[str, Message]]) -> Snapshot:
        """Build from ``type_url -> messages`` (a list, named by each message's own name) or ``-> {name: msg}``."""
        normalised: dict[str, Mapping[str, Message]] = {}
        for type_url, items in resources.items():
            if isinstance(items, Mapping):
                normalised[type_url] = dict(items)
                continue
            by_name: dict[str, Message] = {}
            for message in items:
                name = resource_name(message)
                if name in by_name:
                    raise SnapshotError(f"{type_url}: two resources are named {name!r}")
                by_name[name] = message
            normalised[type_url] = by_name
        return cls(resources=normalised)

    def replace(self, type_url: str, updates: Mapping[str, Message | Entry | None]) -> Snapshot:
        """A new snapshot with some resources of one type added, replaced, or (``None``) removed.

        Only the changed resources are serialised again (an ``Entry`` taken from another snapshot is shared as it
        is); everything else is shared with this snapshot, and the type's version is updated in O(changes).
        """
        parent = self._entries.get(type_url, _EMPTY_MAP)
        current = parent.copy() if isinstance(parent, EntryMap) else dict(parent)
        total = self._sums.get(type_url, 0)
        for name, message in updates.items():
            if message is None:
                entry = None
            elif isinstance(message, Entry):
                if message.name != name or message.type_url != type_url:
                    raise SnapshotError(f"{type_url}: entry {message.name!r} cannot replace {name!r}")
                entry = message
            else:
                entry = make_entry(type_url, name, message)
            old = current.pop(name, None)
            if old is not None:
                total -= old.mix
            if entry is not None:
                current[name] = entry
                total += entry.mix
        entries = dict(self._entries)
        if isinstance(parent, EntryMap) and len(parent.changed) + len(updates) <= _EPOCH_CHANGES:
            entries[type_url] = EntryMap(current, epoch=parent.epoch, changed=parent.changed | frozenset(updates))
        else:
            entries[type_url] = EntryMap(current)
        sums = dict(self._sums)
        sums[type_url] = total & _MASK
        new = object.__new__(Snapshot)
        new._freeze(entries, sums)
        return new

    def select(self, names: Mapping[str, Iterable[str] | None]) -> Snapshot:
        """A snapshot of some types of this one (``None``: all of that type's resources, else those names that
        exist), sharing the serialised resources: how per-proxy snapshots are cut from one shared, full one."""
        entries: dict[str, Mapping[str, Entry]] = {}
        sums: dict[str, int] = {}
        for type_url, wanted in names.items():
            have = self._entries.get(type_url, _EMPTY_MAP)
            if wanted is None:
                entries[type_url], sums[type_url] = have, self._sums.get(type_url, 0)
            else:
                entries[type_url] = EntryMap({n: have[n] for n in wanted if n in have})
                sums[type_url] = _sum(entries[type_url])
        new = object.__new__(Snapshot)
        new._freeze(entries, sums)
        return new

    @classmethod
    def of(cls, maps: Mapping[str, EntryMap]) -> Snapshot:
        """A snapshot made of entry maps as they are (nothing serialised again; the maps may be shared with other
        snapshots, as the push pipeline shares one map of every sidecar's endpoints)."""
        new = object.__new__(cls)
        new._freeze(maps, {t: m.total for t, m in maps.items()})
        return new

    def version(self, type_url: str) -> str:
        """The version of one type's resources (the same for every snapshot with the same content of that type)."""
        return self._versions.get(type_url, _EMPTY_VERSION)

    def versions(self) -> Mapping[str, str]:
        return self._versions

    def entries(self, type_url: str) -> Mapping[str, Entry]:
        return self._entries.get(type_url, _EMPTY_MAP)

    def names(self, type_url: str) -> frozenset[str]:
        return frozenset(self._entries.get(type_url, ()))

    def resource_version(self, type_url: str, name: str) -> str | None:
        entry = self._entries.get(type_url, {}).get(name)
        return entry.version if entry else None

    def type_urls(self) -> frozenset[str]:
        return frozenset(self._entries)

    def _content(self) -> dict[str, str]:
        """Versions of the types that have resources (a type present but empty is the same as one absent)."""
        return {t: v for t, v in self._versions.items() if self._entries[t]}

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._content().items())))

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        return self._content() == other._content()
