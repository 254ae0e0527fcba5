"""The Kubernetes source, :class:`KubeSource`: one reflector per kind, the latest converted value per object,
and a whole :class:`discovery.source.ClusterSnapshot` assembled (in a thread) whenever something changed."""


from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client as k8s_client

from discovery import convert
from discovery.kube.client import load_api_client
from discovery.kube.reflector import (
    EXTRA_KINDS,
    KINDS,
    Backoff,
    Message,
    Reflector,
    _Bad,
    _Replace,
    _Upsert,
)
from discovery.model import ClusterId, Service, ServiceExport, ServiceKey, cluster_id
from discovery.source import WARNING, ClusterSnapshot, ClusterSource, LoadResult, ManifestProblem

log = logging.getLogger("meshfed.discovery.kube")

# ------------------------------------------------------------------------------------------------------ source


if TYPE_CHECKING:
    from discovery.manifests import ManifestSource

    def _both_are_sources(manifests: ManifestSource, kube: KubeSource) -> tuple[ClusterSource, ClusterSource]:
        return manifests, kube  # mypy checks that both sources fit the protocol


@dataclass(frozen=True, slots=True)
class _Entry:
    value: Any  # the converted model value in force (None while the object never converted)
    object_rv: str
    problem: ManifestProblem | None = None


class KubeSource:
    """The Kubernetes API as a :class:`discovery.source.ClusterSource`. Use as an async context manager, then
    iterate ``watch()``::

        async with KubeSource(api=load_api_client(context="east"), cluster=cluster_id("east")) as source:
            async for result in source.watch():
                registry = registry.with_shard(source.cluster, result.snapshot.services.values(), ...)
    """

    def __init__(
        self,
        *,
        api: k8s_client.ApiClient,
        cluster: ClusterId | str,
        namespace: str | None = None,
        watch_timeout: int = 300,
        request_timeout: float = 30.0,
        backoff_base: float = 0.2,
        backoff_cap: float = 30.0,
    ) -> None:
        self.cluster = cluster_id(cluster)
        self._api = api
        self._namespace = namespace
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._backoff = (backoff_base, backoff_cap)
        self._state: dict[str, dict[tuple[str, str], _Entry]] = {k.name: {} for k in KINDS}
        self._synced: set[str] = set()
        self._gen = 0  # bumped on every change the reflectors report
        self._wake = asyncio.Event()  # set (and replaced) on every change: wakes every watch() consumer
        self._built: tuple[int, LoadResult] | None = None
        self._build_lock = asyncio.Lock()
        self._core = _Core()
        self._by_key: dict[ServiceKey, set[tuple[str, str, str]]] = {}
        self._dirty: set[ServiceKey] = set()
        self._extras_dirty = False  # a policy kind changed since the last build
        self._extras: tuple[Any, ...] = ()
        self._problems: dict[tuple[str, str, str], ManifestProblem] = {}
        self._version = 0  # XOR of a hash of (kind, namespace, name, resourceVersion) over every object in force
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reflectors: dict[str, Reflector] = {}
        self._last: LoadResult | None = None

    @classmethod
    async def from_kubeconfig(
        cls, *, cluster: ClusterId | str, kubeconfig: Path | str | None = None, context: str | None = None,
        **kwargs: Any,
    ) -> KubeSource:
        api = await asyncio.to_thread(load_api_client, kubeconfig=kubeconfig, context=context)
        return cls(api=api, cluster=cluster, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> KubeSource:
        self._loop = asyncio.get_running_loop()
        for kind in KINDS:
            reflector = Reflector(
                kind=kind,
                api=self._api,
                cluster=self.cluster,
                sink=self._post,
                namespace=self._namespace,
                watch_timeout=self._watch_timeout,
                request_timeout=self._request_timeout,
                backoff=Backoff(base=self._backoff[0], cap=self._backoff[1]),
            )
            self.reflectors[kind.name] = reflector
            reflector.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for reflector in self.reflectors.values():
            reflector.stop()
        for name, reflector in self.reflectors.items():
            if not await asyncio.to_thread(reflector.join, 10.0):
                log.warning("reflector_stuck cluster=%s kind=%s", self.cluster, name)
        self.reflectors = {}

    @property
    def api(self) -> k8s_client.ApiClient:
        """The API client the reflectors use (the status writer writes through it too)."""
        return self._api

    def mcs_version(self) -> str:
        """The MCS API version the ServiceExport reflector reads (v1beta1 where served, else v1alpha1)."""
        reflector = self.reflectors.get("ServiceExport")
        if reflector is None:
            return next(k for k in KINDS if k.name == "ServiceExport").versions[0]
        return reflector.version

    @property
    def last(self) -> LoadResult | None:
        """The last result ``watch()`` yielded."""
        return self._last

    def resource_version(self, kind: str) -> str:
        """The newest resourceVersion the ``kind`` reflector has seen (lists, events and bookmarks)."""
        return self.reflectors[kind].resource_version

    # -- thread -> loop ---------------------------------------------------------------------------------

    def _post(self, message: Message) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: the source is going away
            loop.call_soon_threadsafe(self._apply, message)

    def _apply(self, message: Message) -> None:
        kind = message.kind
        state = self._state[kind]
        if isinstance(message, _Replace):
            for ident in [i for i in state if i not in message.objects]:
                self._set(kind, ident, None)
            for ident, item in message.objects.items():
                self._set(kind, ident, self._entry(state.get(ident), item))
            self._synced.add(kind)
        elif isinstance(message, _Upsert):
            ident = (message.ns, message.name)
            self._set(kind, ident, self._entry(state.get(ident), message.value))
        else:
            self._set(kind, (message.ns, message.name), None)
        self._gen += 1
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    def _set(self, kind: str, ident: tuple[str, str], new: _Entry | None) -> None:
        """Replace one object's entry, keeping the key index, the dirty set, the problems and the version
        accumulator in step."""
        state = self._state[kind]
        old = state.get(ident)
        if old is not None and new is not None and old.object_rv and old.object_rv == new.object_rv \
                and old.problem == new.problem:
            return  # the same version of the object (a relist that found it unchanged)
        full = (kind, ident[0], ident[1])
        if kind in EXTRA_KINDS:
            # Policies are not per service: no key index, just "the extras changed".
            if old is not None and old.value is not None:
                self._version ^= _ident_hash(full, old.object_rv)
            if new is not None and new.value is not None:
                self._version ^= _ident_hash(full, new.object_rv)
            if (old.value if old is not None else None) is not (new.value if new is not None else None):
                self._extras_dirty = True
        elif old is not None and old.value is not None:
            self._version ^= _ident_hash(full, old.object_rv)
            old_key = old.value.key
            members = self._by_key.get(old_key)
            if members is not None:
                members.discard(full)
                if not members:
                    del self._by_key[old_key]
            self._dirty.add(old_key)
        if kind not in EXTRA_KINDS and new is not None and new.value is not None:
            self._version ^= _ident_hash(full, new.object_rv)
            self._by_key.setdefault(new.value.key, set()).add(full)
            self._dirty.add(new.value.key)
        if new is not None and new.problem is not None:
            self._problems[full] = new.problem
        else:
            self._problems.pop(full, None)
        if new is None:
            state.pop(ident, None)
        else:
            state[ident] = new

    @staticmethod
    def _entry(previous: _Entry | None, item: Any) -> _Entry:
        if isinstance(item, _Bad):
            # Keep the last good value of this object in force; report the problem.
            return _Entry(previous.value if previous else None, previous.object_rv if previous else "", item.problem)
        return _Entry(item.value, item.object_rv)

    # -- snapshots ---------------------------------------------------------------------------------------

    def _take_dirty(self) -> dict[ServiceKey, list[Any]]:
        """The current objects of every service key changed since the last build (and forget the changes)."""
        order = {k.name: i for i, k in enumerate(KINDS)}
        subset: dict[ServiceKey, list[Any]] = {}
        for key in self._dirty:
            members = sorted(self._by_key.get(key, ()), key=lambda f: (order[f[0]], f[1], f[2]))
            subset[key] = [self._state[kind][(ns, name)].value for kind, ns, name in members]
        self._dirty = set()
        return subset

    def _take_extras(self) -> tuple[Any, ...]:
        """The policy values in force, sorted by (kind, namespace, name); rebuilt only after a policy changed."""
        if self._extras_dirty:
            self._extras = tuple(
                entry.value
                for kind in sorted(EXTRA_KINDS)
                for _, entry in sorted(self._state[kind].items())
                if entry.value is not None
            )
            self._extras_dirty = False
        return self._extras

    def _result(self, core: _Core, extras: tuple[Any, ...], problems: list[ManifestProblem],
                version: str) -> LoadResult:
        for key in sorted(core.orphans):
            for sl in core.orphans[key]:
                problems.append(ManifestProblem(
                    f"kubernetes:{self.cluster}", 0, "",
                    f"EndpointSlice {sl.key.namespace}/{sl.name} names Service {sl.key.name}, which does not exist",
                    WARNING))
        snapshot = ClusterSnapshot(
            cluster=self.cluster,
            services=core.services,
            exports=core.exports,
            unsupported=core.unsupported,
            extras=extras,
            version=version,
        )
        return LoadResult(snapshot=snapshot, problems=tuple(problems))

    async def watch(self) -> AsyncIterator[LoadResult]:
        """Yield the first whole snapshot once every kind has been listed, then a new one whenever the content
        or the problems change. Changes that arrive while the consumer is busy are coalesced: the consumer
        always gets the newest state, never a backlog. Several consumers may iterate at once; each gets every
        distinct state it did not skip. Runs until the consumer stops iterating."""
        if self._loop is None:
            raise RuntimeError("KubeSource.watch() needs `async with KubeSource(...)` first")
        wanted = {k.name for k in KINDS}
        seen = -1
        yielded: LoadResult | None = None
        while True:
            if self._gen == seen:
                await self._wake.wait()
                continue
            seen = self._gen
            if self._synced != wanted:
                continue
            result = await self._snapshot(seen)
            if yielded is not None and _same(yielded, result):
                continue
            yielded = result
            yield result

    async def _snapshot(self, gen: int) -> LoadResult:
        """The snapshot of state generation ``gen`` or newer, built once for every consumer. Only the service
        keys that changed since the last build are assembled again (in a thread); the rest is reused."""
        async with self._build_lock:
            if self._built is not None and self._built[0] >= gen:
                return self._built[1]
            # Read everything of generation ``gen`` before the first await: changes arriving while the build
            # runs belong to the next generation (their keys stay dirty for the next build).
            gen = self._gen
            subset = self._take_dirty()
            extras = self._take_extras()
            problems = [self._problems[f] for f in sorted(self._problems)]
            version = f"{self._version:016x}"
            core = await asyncio.to_thread(_rebuild, self._core, subset) if subset else self._core
            self._core = core
            result = self._result(core, extras, problems, version)
            self._built = (gen, result)
        if self._last is None or not _same(self._last, result):
            self._last = result
            log.info("kube_snapshot cluster=%s version=%s services=%d exports=%d policies=%d problems=%d",
                     self.cluster, result.snapshot.version, len(result.snapshot.services),
                     len(result.snapshot.exports), len(result.snapshot.extras), len(result.problems))
        return result


@dataclass(frozen=True, slots=True)
class _Core:
    """The assembled state, per service key (immutable; each build makes a new one)."""

    services: Mapping[ServiceKey, Service] = field(default_factory=dict)
    exports: Mapping[ServiceKey, ServiceExport] = field(default_factory=dict)
    unsupported: Mapping[ServiceKey, str] = field(default_factory=dict)
    orphans: Mapping[ServiceKey, tuple[convert.EndpointSlice, ...]] = field(default_factory=dict)


def _rebuild(previous: _Core, subset: Mapping[ServiceKey, list[Any]]) -> _Core:
    """``previous`` with the keys in ``subset`` assembled again from their current objects (pure)."""
    part = convert.assemble(v for key in sorted(subset) for v in subset[key])
    orphans_by_key: dict[ServiceKey, list[convert.EndpointSlice]] = {}
    for sl in part.orphan_slices:
        orphans_by_key.setdefault(sl.key, []).append(sl)
    services, exports = dict(previous.services), dict(previous.exports)
    unsupported, orphans = dict(previous.unsupported), dict(previous.orphans)
    part_orphans = {k: tuple(v) for k, v in orphans_by_key.items()}
    added = False
    targets: tuple[tuple[dict[ServiceKey, Any], Mapping[ServiceKey, Any]], ...] = (
        (services, part.services), (exports, part.exports), (unsupported, part.unsupported), (orphans, part_orphans))
    for key in subset:
        for target, source in targets:
            if key in source:
                added = added or key not in target
                target[key] = source[key]
            else:
                target.pop(key, None)
    if added:  # keep every mapping in key order, as a full assembly would
        services, exports = {k: services[k] for k in sorted(services)}, {k: exports[k] for k in sorted(exports)}
        unsupported = {k: unsupported[k] for k in sorted(unsupported)}
    return _Core(services=services, exports=exports, unsupported=unsupported, orphans=orphans)


def _ident_hash(full: tuple[str, str, str], object_rv: str) -> int:
    data = "\0".join((*full, object_rv)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _same(a: LoadResult, b: LoadResult) -> bool:
    return (a.snapshot.version, a.problems) == (b.snapshot.version, b.problems)
