"""Debounced pushes: watchers describe what changed, one updater regenerates.

Watchers (the registry, the federation agent, policy files, certificate rotation) never call the ADS server. They
``submit`` a ``PushRequest`` saying what changed (``ConfigKey``s: a service by key, only its endpoints, a cluster's
shard, the catalog, policies, trust; or some proxies; or everything, ``full``). Requests merge; the
``PushDebouncer`` waits until no request has arrived for ``quiet`` seconds, or until ``max_delay``
seconds passed since the first unserved request (so a steady trickle of changes cannot starve pushes), then calls
``regenerate(merged_request)`` once. Requests that arrive while ``regenerate`` runs are merged into the next round.

``regenerate`` (the control plane's: ``gateway.pipeline.PushPipeline``) builds new snapshots of what the merged
request concerns and hands them to the SnapshotCache; the cache wakes only the streams whose
snapshot versions changed, so a push reaches only the proxies whose configuration actually differs.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from gateway.background import BackgroundTask

log = logging.getLogger("meshfed.xds.push")


class Kind(enum.StrEnum):
    """The kinds of configuration a watcher says changed (Istio's ``ConfigsUpdated`` kinds)."""

    SERVICE = "service"  # a service's definition (ports, type, labels, export, import); name: its ServiceKey
    ENDPOINTS = "endpoints"  # only a service's endpoints; name: its ServiceKey
    SHARD = "shard"  # a cluster's part of the registry (local services, or a remote cluster's federated endpoints);
    #                  name: the cluster id. The pipeline compares the shard before and after to find the keys.
    CATALOG = "catalog"  # the federation's merged ServiceImports and member clusters
    POLICY = "policy"  # VirtualServices and DestinationRules
    AUTHZ = "authz"  # AuthorizationPolicies
    TRUST = "trust"  # the trust bundle (and with it every workload certificate)
    CERTS = "certs"  # workload certificates of the request's ``proxies``


@dataclass(frozen=True, slots=True)
class ConfigKey:
    """One changed piece of configuration: a kind and, for per-object kinds, which object (a ServiceKey for
    SERVICE and ENDPOINTS, a cluster id for SHARD; empty for the others)."""

    kind: Kind
    name: Hashable = ""

    @classmethod
    def service(cls, key: Hashable) -> ConfigKey:
        return cls(Kind.SERVICE, key)

    @classmethod
    def endpoints(cls, key: Hashable) -> ConfigKey:
        return cls(Kind.ENDPOINTS, key)

    @classmethod
    def shard(cls, cluster: Hashable) -> ConfigKey:
        return cls(Kind.SHARD, cluster)


@dataclass(frozen=True)
class PushRequest:
    """What changed. ``full`` means regenerate every proxy from scratch; otherwise ``configs`` says which
    configuration changed (the pipeline rebuilds only what depends on it, for every connected proxy),
    ``proxies`` (node ids) names proxies to rebuild whole (a connect, a certificate), and ``services`` (keys, e.g.
    discovery.model.ServiceKey) are services whose definition changed (the same as ``ConfigKey.service``)."""

    full: bool = False
    proxies: frozenset[str] = frozenset()
    services: frozenset[Hashable] = frozenset()
    reasons: frozenset[str] = frozenset()
    configs: frozenset[ConfigKey] = frozenset()
    count: int = 1  # how many submitted requests were merged into this one
    first_at: float = field(default_factory=time.monotonic)  # when the oldest merged request was submitted

    def merge(self, other: PushRequest) -> PushRequest:
        return PushRequest(
            full=self.full or other.full,
            proxies=self.proxies | other.proxies,
            services=self.services | other.services,
            reasons=self.reasons | other.reasons,
            configs=self.configs | other.configs,
            count=self.count + other.count,
            first_at=min(self.first_at, other.first_at),
        )


Regenerate = Callable[[PushRequest], Awaitable[None]]


class PushDebouncer(BackgroundTask):
    """Merge push requests and call ``regenerate`` after a quiet period or a maximum delay::

        async with PushDebouncer(regenerate=regen, quiet=0.1, max_delay=1.0) as pushes:
            pushes.submit(PushRequest(services=frozenset({key}), reasons=frozenset({"endpoints"})))
    """

    task_name = "xds-push-debouncer"

    def __init__(self, *, regenerate: Regenerate, quiet: float = 0.1, max_delay: float = 1.0) -> None:
        if quiet < 0 or max_delay < quiet:
            raise ValueError(f"push debounce needs 0 <= quiet ({quiet}) <= max_delay ({max_delay})")
        self._regenerate = regenerate
        self.quiet = quiet
        self.max_delay = max_delay
        self._pending: PushRequest | None = None
        self._last_at = 0.0
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.pushes = 0  # how many times regenerate ran

    def submit(self, request: PushRequest) -> None:
        """Queue a change (never blocks; call from the event loop)."""
        self._pending = request if self._pending is None else self._pending.merge(request)
        self._last_at = time.monotonic()
        self._idle.clear()
        self._arrived.set()

    async def flush(self) -> None:
        """Wait until every request submitted so far has been regenerated (bound it with asyncio.timeout)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            while True:  # debounce: wait for quiet, bounded by max_delay since the first request
                assert self._pending is not None
                now = time.monotonic()
                wait = min(self._last_at + self.quiet, self._pending.first_at + self.max_delay) - now
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            request, self._pending = self._pending, None
            self._arrived.clear()
            started = time.monotonic()
            try:
                await self._regenerate(request)
            except Exception:
                log.exception("push failed full=%s proxies=%d services=%d", request.full, len(request.proxies),
                              len(request.services))
            self.pushes += 1
            log.info("push done merged=%d full=%s proxies=%d services=%d configs=%d waited=%.3fs took=%.3fs "
                     "reasons=%s", request.count, request.full, len(request.proxies), len(request.services),
                     len(request.configs),
                     started - request.first_at, time.monotonic() - started, ",".join(sorted(request.reasons)))
            if self._pending is None:
                self._idle.set()

