"""The Kubernetes source: one cluster's Services, EndpointSlices and ServiceExports, and its Istio traffic and
authorization policies (VirtualService, DestinationRule, AuthorizationPolicy), listed and watched through the
official ``kubernetes`` client, converted at the boundary by ``discovery.convert``.

The client is blocking, so each watched kind runs a *reflector* on its own worker thread: list (which gives a
resourceVersion), then watch from that version with bookmarks, resume from the newest version seen when a watch
ends, relist when the server answers 410 Gone (an ``ERROR`` event or an HTTP 410), and back off with jitter on
any other failure (bounded, and cut short at once when the source stops). Reflectors convert each object on
their thread and hand the converted values to the event loop with ``call_soon_threadsafe``; the loop only keeps
the latest value per object and, when something changed, assembles a whole :class:`ClusterSnapshot` (in a
thread) and yields it. Nothing here blocks the event loop.

The core kinds are indexed by service key, so a change rebuilds only the services it touches. The policy kinds
are not per service: they land in ``ClusterSnapshot.extras``, sorted by (kind, namespace, name), rebuilt only when
one of them changed. Custom kinds (ServiceExport, the Istio kinds) may not be served at all (CRD not installed):
then the reflector reports no objects of that kind, so the snapshot is not held back, and keeps checking until the
kind appears. The Istio kinds are tried at each served version in turn (``v1`` first, then the older betas).

:class:`KubeSource` has the same shape as :class:`discovery.manifests.ManifestSource`: ``watch()`` is an async
iterator of :class:`discovery.manifests.LoadResult` (the snapshot in force plus the problems found), so the
control plane consumes either through the :class:`Source` protocol. An object that fails conversion is reported
as a problem naming the object and field, and the last good version of that object stays in force.

Exception tree (this module; ``DiscoveryError`` lives in ``discovery.model``)::

    DiscoveryError
     +-- KubeError                 anything at the Kubernetes API edge
          +-- KubeConfigError      kubeconfig missing or unreadable, or the context is not in it
          +-- KubeUnavailable      the API server could not be reached (refused, reset, timed out)
          +-- KubeApiError         the API server answered a failure Status (.status, .reason, .message)
               +-- KubeNotFound        404 NotFound
               +-- KubeAlreadyExists   409 AlreadyExists
               +-- KubeGone            410 Gone/Expired (reflectors handle it by relisting)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

from discovery import convert
from discovery.manifests import ERROR, WARNING, ClusterSnapshot, LoadResult, ManifestProblem
from discovery.model import ClusterId, DiscoveryError, Service, ServiceExport, ServiceKey, cluster_id

log = logging.getLogger("meshfed.discovery.kube")
_T = TypeVar("_T")

MCS_GROUP = convert.MCS_GROUP
MCS_VERSION = convert.MCS_VERSION
SERVICE_EXPORTS = "serviceexports"
NETWORKING_ISTIO_GROUP = "networking.istio.io"
SECURITY_ISTIO_GROUP = "security.istio.io"
NETWORKING_ISTIO_VERSIONS = ("v1", "v1beta1")
SECURITY_ISTIO_VERSIONS = ("v1", "v1beta1")


# ------------------------------------------------------------------------------------------------------ errors


class KubeError(DiscoveryError):
    """Root of the errors at the Kubernetes API edge."""


class KubeConfigError(KubeError):
    """The kubeconfig is missing or unreadable, or it has no such context."""


class KubeUnavailable(KubeError):
    """The API server could not be reached."""


class KubeApiError(KubeError):
    """The API server answered with a failure ``Status``."""

    def __init__(self, status: int, reason: str, message: str, *, request: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.request = request
        where = f"{request}: " if request else ""
        super().__init__(f"{where}{status} {reason}: {message}")


class KubeNotFound(KubeApiError):
    """404: the object does not exist."""


class KubeAlreadyExists(KubeApiError):
    """409 AlreadyExists: the object exists already."""


class KubeGone(KubeApiError):
    """410: the resource version asked for is older than the server's history; relist."""


def api_error(exc: k8s_client.ApiException, *, request: str = "") -> KubeApiError:
    """Turn the client's ApiException into our typed error, reading the ``Status`` body when there is one."""
    status = int(exc.status or 0)
    reason = str(exc.reason or "")
    message = ""
    if exc.body:
        try:
            body = json.loads(exc.body)
        except (TypeError, ValueError):
            message = str(exc.body)[:200]
        else:
            if isinstance(body, dict):
                reason = str(body.get("reason") or reason)
                message = str(body.get("message") or "")
    if status == 404:
        return KubeNotFound(status, reason or "NotFound", message, request=request)
    if status == 409 and reason == "AlreadyExists":
        return KubeAlreadyExists(status, reason, message, request=request)
    if status == 410:
        return KubeGone(status, reason or "Gone", message, request=request)
    return KubeApiError(status, reason, message, request=request)


# ------------------------------------------------------------------------------------------------------ config


def load_api_client(
    *, kubeconfig: Path | str | None = None, context: str | None = None, in_cluster: bool = False
) -> k8s_client.ApiClient:
    """An ApiClient for ``context`` in ``kubeconfig`` (the client's defaults, ``$KUBECONFIG`` or
    ``~/.kube/config``, when None), or, with ``in_cluster``, for the pod's service account. Reads files: call it
    from a thread inside async code."""
    if in_cluster:
        try:
            configuration = k8s_client.Configuration()
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (ConfigException, OSError) as exc:
            raise KubeConfigError(f"in-cluster configuration: {exc}") from exc
        return k8s_client.ApiClient(configuration)
    try:
        api: k8s_client.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig) if kubeconfig is not None else None, context=context
        )
        return api
    except (ConfigException, OSError, ValueError) as exc:
        where = str(kubeconfig) if kubeconfig is not None else "the default kubeconfig"
        ctx = f" context {context!r}" if context else ""
        raise KubeConfigError(f"{where}{ctx}: {exc}") from exc


# ------------------------------------------------------------------------------------------------------ kinds


@dataclass(frozen=True, slots=True)
class WatchedKind:
    """One kind a reflector lists and watches: how to call the client for it, at which API versions (tried in
    order while the kind is not served), and whether its values are per service or snapshot ``extras``."""

    name: str  # "Service", "EndpointSlice", "ServiceExport", "VirtualService", ...
    list_call: Callable[[k8s_client.ApiClient, str | None, str], Callable[..., Any]]
    versions: tuple[str, ...] = ("v1",)
    extra: bool = False  # True: not indexed by service key; the values go to ClusterSnapshot.extras
    resource: tuple[str, str] = ("", "")  # (API group, plural): what RBAC must allow to get, list and watch

    def bind(self, api: k8s_client.ApiClient, namespace: str | None, version: str | None = None) -> Callable[..., Any]:
        return self.list_call(api, namespace, version or self.versions[0])


def _services(api: k8s_client.ApiClient, ns: str | None, version: str = "v1") -> Callable[..., Any]:
    core = k8s_client.CoreV1Api(api)
    if ns is None:
        return core.list_service_for_all_namespaces
    return lambda **kw: core.list_namespaced_service(ns, **kw)


def _slices(api: k8s_client.ApiClient, ns: str | None, version: str = "v1") -> Callable[..., Any]:
    disc = k8s_client.DiscoveryV1Api(api)
    if ns is None:
        return disc.list_endpoint_slice_for_all_namespaces
    return lambda **kw: disc.list_namespaced_endpoint_slice(ns, **kw)


def _custom(group: str, plural: str) -> Callable[[k8s_client.ApiClient, str | None, str], Callable[..., Any]]:
    """The list call of a custom resource ``plural.group`` at a given version."""

    def bind(api: k8s_client.ApiClient, ns: str | None, version: str) -> Callable[..., Any]:
        custom = k8s_client.CustomObjectsApi(api)
        if ns is None:
            return lambda **kw: custom.list_cluster_custom_object(group, version, plural, **kw)
        return lambda **kw: custom.list_namespaced_custom_object(group, version, ns, plural, **kw)

    return bind


def _custom_kind(name: str, group: str, plural: str, versions: tuple[str, ...], *, extra: bool) -> WatchedKind:
    return WatchedKind(name, _custom(group, plural), versions=versions, extra=extra, resource=(group, plural))


KINDS: tuple[WatchedKind, ...] = (
    WatchedKind("Service", _services, resource=("", "services")),
    WatchedKind("EndpointSlice", _slices, resource=("discovery.k8s.io", "endpointslices")),
    _custom_kind("ServiceExport", MCS_GROUP, SERVICE_EXPORTS, (MCS_VERSION,), extra=False),
    _custom_kind("AuthorizationPolicy", SECURITY_ISTIO_GROUP, "authorizationpolicies", SECURITY_ISTIO_VERSIONS,
                 extra=True),
    _custom_kind("DestinationRule", NETWORKING_ISTIO_GROUP, "destinationrules", NETWORKING_ISTIO_VERSIONS,
                 extra=True),
    _custom_kind("VirtualService", NETWORKING_ISTIO_GROUP, "virtualservices", NETWORKING_ISTIO_VERSIONS,
                 extra=True),
)
EXTRA_KINDS = frozenset(k.name for k in KINDS if k.extra)
"""The kinds whose values are snapshot ``extras`` (the Istio policy kinds), not per service."""


# ------------------------------------------------------------------------------------------------------ backoff


@dataclass
class Backoff:
    """Exponential backoff with equal jitter: the n-th consecutive failure waits between d/2 and d, where
    d = min(cap, base * 2**n). ``reset()`` after a success."""

    base: float = 0.2
    cap: float = 30.0
    failures: int = 0
    rng: random.Random | None = None

    def next_delay(self) -> float:
        d = min(self.cap, self.base * float(1 << min(self.failures, 30)))
        self.failures += 1
        r = (self.rng or random).random()
        return d / 2 + r * d / 2

    def reset(self) -> None:
        self.failures = 0


# ------------------------------------------------------------------------------------------------------ reflector


@dataclass(frozen=True, slots=True)
class _Replace:
    """A (re)list: the kind's whole state, replacing what the loop held."""

    kind: str
    objects: dict[tuple[str, str], Any]  # (ns, name) -> converted value or _Bad
    resource_version: str


@dataclass(frozen=True, slots=True)
class _Upsert:
    kind: str
    ns: str
    name: str
    value: Any
    resource_version: str


@dataclass(frozen=True, slots=True)
class _Delete:
    kind: str
    ns: str
    name: str
    resource_version: str


@dataclass(frozen=True, slots=True)
class _Bad:
    """An object that failed conversion: the problem to report (the last good value stays in force)."""

    problem: ManifestProblem
    object_rv: str


@dataclass(frozen=True, slots=True)
class _Converted:
    value: Any
    object_rv: str


Message = _Replace | _Upsert | _Delete


@dataclass
class ReflectorStats:
    """Counters a test or ``status`` can read (written by the reflector thread only)."""

    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    gone: int = 0
    errors: int = 0
    last_error: str = ""


class Reflector:
    """List-then-watch one kind on a worker thread; hand converted values to ``sink`` (thread-safe)."""

    def __init__(
        self,
        *,
        kind: WatchedKind,
        api: k8s_client.ApiClient,
        cluster: ClusterId,
        sink: Callable[[Message], None],
        namespace: str | None = None,
        watch_timeout: int = 300,
        request_timeout: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.kind = kind
        self.cluster = cluster
        self._api = api
        self._namespace = namespace
        self._version_at = 0  # index into kind.versions of the version listed and watched
        self._list = kind.bind(api, namespace, kind.versions[0])
        self._sink = sink
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._backoff = backoff or Backoff()
        self._stop = threading.Event()
        self._resp: Any = None
        self._resp_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.resource_version: str = ""
        self.stats = ReflectorStats()
        self.synced = threading.Event()
        self._gone_streak = 0
        self._missing = False

    @property
    def version(self) -> str:
        """The API version this reflector lists and watches now."""
        return self.kind.versions[self._version_at]

    def _use_version(self, index: int) -> None:
        if index != self._version_at:
            self._version_at = index
            self._list = self.kind.bind(self._api, self._namespace, self.kind.versions[index])

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"meshfed-kube-{self.cluster}-{self.kind.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and unblock its read at once (shut the watch socket down)."""
        self._stop.set()
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            _shutdown_socket(resp)

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # -- the loop ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        log.info("reflector_start cluster=%s kind=%s", self.cluster, self.kind.name)
        while not self._stop.is_set():
            try:
                if not self.resource_version:
                    self._relist()
                    self._backoff.reset()
                started = time.monotonic()
                if self._watch_once():
                    self._backoff.reset()
                    self._gone_streak = 0
                elif (time.monotonic() - started < 1.0 and not self._stop.is_set()
                      and self._wait(self._backoff.next_delay())):
                    # The server ended an empty watch at once: do not reconnect in a tight loop.
                    break
            except KubeNotFound as exc:
                if self._stop.is_set():
                    break
                if not self.resource_version and self._version_at + 1 < len(self.kind.versions):
                    # Not served at this version: try the next (older) one at once.
                    log.info("kind_version_not_served cluster=%s kind=%s version=%s; trying %s", self.cluster,
                             self.kind.name, self.version, self.kind.versions[self._version_at + 1])
                    self._use_version(self._version_at + 1)
                    continue
                self._use_version(0)  # the next attempt starts from the newest version again
                self.stats.errors += 1
                self.stats.last_error = str(exc)
                delay = self._backoff.next_delay()
                listing, self.resource_version = not self.resource_version, ""  # a 404 watch: relist next time
                if listing and not self._missing:
                    # The API server does not serve this kind at all (its CRD is not installed): then nothing of
                    # it exists. Say so once, so the snapshot is not held back, and keep checking.
                    self._missing = True
                    self._sink(_Replace(self.kind.name, {}, ""))
                    self.synced.set()
                    log.warning("kind_not_served cluster=%s kind=%s retry_in=%.2fs error=%s (is its CRD installed?)",
                                self.cluster, self.kind.name, delay, _describe(exc))
                if self._wait(delay):
                    break
            except KubeGone as exc:
                self.stats.gone += 1
                log.info("reflector_gone cluster=%s kind=%s rv=%s detail=%r; relisting",
                         self.cluster, self.kind.name, self.resource_version, exc.message)
                self.resource_version = ""
                self._gone_streak += 1
                # A 410 right after a fresh list means something is wrong with the server: back off then.
                if self._gone_streak > 1 and self._wait(self._backoff.next_delay()):
                    break
            except Exception as exc:
                if self._stop.is_set():
                    break
                self.stats.errors += 1
                self.stats.last_error = str(exc)
                delay = self._backoff.next_delay()
                if (self.kind.extra and isinstance(exc, KubeApiError) and exc.status == 403
                        and not self.synced.is_set()):
                    # Policies we may not read (an older ClusterRole): run without them rather than hold every
                    # snapshot back, say so, and keep trying.
                    self.synced.set()
                    self._sink(_Replace(self.kind.name, {}, ""))
                    log.warning("kind_forbidden cluster=%s kind=%s retry_in=%.2fs error=%s (does the ClusterRole "
                                "allow get/list/watch on it?)", self.cluster, self.kind.name, delay, _describe(exc))
                log.warning("reflector_error cluster=%s kind=%s rv=%s retry_in=%.2fs error=%s",
                            self.cluster, self.kind.name, self.resource_version or "-", delay,
                            _describe(exc))
                if self._wait(delay):
                    break
        log.info("reflector_stop cluster=%s kind=%s", self.cluster, self.kind.name)

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopped; True when stopped."""
        return self._stop.wait(seconds)

    def _call(self, **kwargs: Any) -> Any:
        what = f"{'watch' if kwargs.get('watch') else 'list'} {self.kind.name}"
        return _request(what, lambda: self._list(_preload_content=False, **kwargs))

    def _prefer_newest(self) -> None:
        """Before listing at an older version, check once more that no newer one is served: a CRD installed
        between two probes may serve both, and the newest should win."""
        for index in range(self._version_at):
            version = self.kind.versions[index]
            call = self.kind.bind(self._api, self._namespace, version)
            try:
                resp = _request(f"list {self.kind.name}",
                                lambda call=call: call(_preload_content=False, limit=1,  # type: ignore[misc]
                                                       _request_timeout=self._request_timeout))
            except KubeNotFound:
                continue
            resp.release_conn()
            self._use_version(index)
            return

    def _relist(self) -> None:
        if self._version_at > 0:
            self._prefer_newest()
        resp = self._call(_request_timeout=self._request_timeout)
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        items = body.get("items") or []
        rv = str((body.get("metadata") or {}).get("resourceVersion") or "")
        if not rv:
            raise KubeApiError(0, "BadResponse", "list response has no metadata.resourceVersion",
                               request=f"list {self.kind.name}")
        objects = {}
        for item in items:
            if isinstance(item, dict):
                # List items lack apiVersion/kind on the real server; the converters dispatch on them.
                item.setdefault("apiVersion", body.get("apiVersion", ""))
                item.setdefault("kind", self.kind.name)
                ident, value = self._convert(item)
                objects[ident] = value
        self.stats.lists += 1
        self._missing = False
        self.resource_version = rv
        self._sink(_Replace(self.kind.name, objects, rv))
        self.synced.set()
        log.info("reflector_listed cluster=%s kind=%s objects=%d rv=%s",
                 self.cluster, self.kind.name, len(objects), rv)

    def _watch_once(self) -> bool:
        """One watch request from ``resource_version``; True when it delivered at least one event."""
        timeout = random.randint(max(1, self._watch_timeout // 2), max(1, self._watch_timeout))
        resp = self._call(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(self._request_timeout, timeout + self._request_timeout),
        )
        with self._resp_lock:
            self._resp = resp
        self.stats.watches += 1
        delivered = False
        try:
            if self._stop.is_set():
                return False
            for line in _lines(resp):
                if self._stop.is_set():
                    return False
                self._event(line)
                delivered = delivered or bool(line.strip())
            return delivered
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if self._stop.is_set():
                return False
            raise KubeUnavailable(f"watch {self.kind.name}: {_describe(exc)}") from exc
        finally:
            with self._resp_lock:
                self._resp = None
            with contextlib.suppress(Exception):
                resp.release_conn()

    def _event(self, line: str) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
            type_, obj = event["type"], event["object"]
        except (ValueError, KeyError, TypeError) as exc:
            raise KubeApiError(0, "BadResponse", f"watch event is not JSON with type and object: {line[:120]!r}",
                               request=f"watch {self.kind.name}") from exc
        if type_ == "ERROR":
            status = obj if isinstance(obj, dict) else {}
            code = int(status.get("code") or 0)
            reason, message = str(status.get("reason") or ""), str(status.get("message") or "")
            if code == 410:
                raise KubeGone(code, reason or "Expired", message, request=f"watch {self.kind.name}")
            raise KubeApiError(code, reason, message, request=f"watch {self.kind.name}")
        rv = str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")
        if type_ == "BOOKMARK":
            self.stats.bookmarks += 1
            if rv:
                self.resource_version = rv
            return
        self.stats.events += 1
        meta = obj.get("metadata") or {}
        ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        if type_ in ("ADDED", "MODIFIED"):
            (ns, name), value = self._convert(obj)
            self._sink(_Upsert(self.kind.name, ns, name, value, rv))
        elif type_ == "DELETED":
            self._sink(_Delete(self.kind.name, ns, name, rv))
        else:
            log.warning("reflector_unknown_event cluster=%s kind=%s type=%s", self.cluster, self.kind.name, type_)
        if rv:
            self.resource_version = rv

    def _convert(self, obj: dict[str, Any]) -> tuple[tuple[str, str], _Converted | _Bad]:
        meta = obj.get("metadata") or {}
        ident = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        object_rv = str(meta.get("resourceVersion") or "")
        ref = f"{self.kind.name} {ident[0]}/{ident[1]}" if ident[0] else f"{self.kind.name} {ident[1]}"
        try:
            return ident, _Converted(convert.convert(obj, cluster=self.cluster), object_rv)
        except convert.ConversionError as exc:
            problem = ManifestProblem(f"kubernetes:{self.cluster}", 0, exc.field, f"{ref}: {exc.reason}", ERROR)
            log.warning("object_rejected cluster=%s %s", self.cluster, problem)
            return ident, _Bad(problem, object_rv)


def _lines(resp: Any) -> Iterator[str]:
    yield from iter_resp_lines(resp)  # type: ignore[no-untyped-call]


def _shutdown_socket(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (a urllib3 response) by shutting its socket down."""
    conn = getattr(resp, "connection", None) or getattr(resp, "_connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _request(request: str, call: Callable[[], _T]) -> _T:
    """Make one API request; its failures become this module's errors, named by ``request``."""
    try:
        return call()
    except k8s_client.ApiException as exc:
        raise api_error(exc, request=request) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KubeUnavailable(f"{request}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}"


# ------------------------------------------------------------------------------------------------------ source


class Source(Protocol):
    """What a discovery source offers the control plane: one cluster, and an async iterator of whole
    snapshots (with the problems found), the first as soon as the initial state is known."""

    cluster: ClusterId

    def watch(self) -> AsyncIterator[LoadResult]: ...


if TYPE_CHECKING:
    from discovery.manifests import ManifestSource

    def _both_are_sources(manifests: ManifestSource, kube: KubeSource) -> tuple[Source, Source]:
        return manifests, kube  # mypy checks that both sources fit the protocol


@dataclass(frozen=True, slots=True)
class _Entry:
    value: Any  # the converted model value in force (None while the object never converted)
    object_rv: str
    problem: ManifestProblem | None = None


class KubeSource:
    """The Kubernetes API as a :class:`Source`. Use as an async context manager, then iterate ``watch()``::

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


# ------------------------------------------------------------------------------------------------------ exports


def _export_body(key: ServiceKey) -> dict[str, Any]:
    body = convert.service_export_object(key, datetime.now(UTC))
    body["metadata"].pop("creationTimestamp", None)  # the API server sets it
    return body


def create_service_export_sync(api: k8s_client.ApiClient, key: ServiceKey, *, exist_ok: bool = False) -> bool:
    """Create the ServiceExport for ``key``; False when it existed already and ``exist_ok``."""
    custom = k8s_client.CustomObjectsApi(api)
    request = f"create ServiceExport {key.namespace}/{key.name}"
    try:
        _request(request, lambda: custom.create_namespaced_custom_object(MCS_GROUP, MCS_VERSION, key.namespace,
                                                                         SERVICE_EXPORTS, _export_body(key)))
    except KubeAlreadyExists:
        if exist_ok:
            return False
        raise
    log.info("service_export_created namespace=%s name=%s", key.namespace, key.name)
    return True


def delete_service_export_sync(api: k8s_client.ApiClient, key: ServiceKey, *, missing_ok: bool = False) -> bool:
    """Delete the ServiceExport for ``key``; False when there was none and ``missing_ok``."""
    custom = k8s_client.CustomObjectsApi(api)
    request = f"delete ServiceExport {key.namespace}/{key.name}"
    try:
        _request(request, lambda: custom.delete_namespaced_custom_object(MCS_GROUP, MCS_VERSION, key.namespace,
                                                                         SERVICE_EXPORTS, key.name))
    except KubeNotFound:
        if missing_ok:
            return False
        raise
    log.info("service_export_deleted namespace=%s name=%s", key.namespace, key.name)
    return True


def get_service_export_sync(api: k8s_client.ApiClient, key: ServiceKey) -> Mapping[str, Any] | None:
    """The ServiceExport object for ``key`` as the API server holds it, or None."""
    custom = k8s_client.CustomObjectsApi(api)
    request = f"get ServiceExport {key.namespace}/{key.name}"
    try:
        obj = _request(request, lambda: custom.get_namespaced_custom_object(MCS_GROUP, MCS_VERSION, key.namespace,
                                                                            SERVICE_EXPORTS, key.name))
    except KubeNotFound:
        return None
    return obj if isinstance(obj, Mapping) else None


async def create_service_export(api: k8s_client.ApiClient, key: ServiceKey, *, exist_ok: bool = False) -> bool:
    """Async form of :func:`create_service_export_sync` (runs in a thread)."""
    return await asyncio.to_thread(create_service_export_sync, api, key, exist_ok=exist_ok)


async def delete_service_export(api: k8s_client.ApiClient, key: ServiceKey, *, missing_ok: bool = False) -> bool:
    """Async form of :func:`delete_service_export_sync` (runs in a thread)."""
    return await asyncio.to_thread(delete_service_export_sync, api, key, missing_ok=missing_ok)
