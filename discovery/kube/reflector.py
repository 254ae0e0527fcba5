"""The reflector: list-then-watch one kind on a worker thread (the ``kubernetes`` client blocks), resuming from the
newest resourceVersion seen, relisting on 410 Gone, backing off with jitter on other failures, and converting each
object on its thread before handing it to the event loop. :data:`KINDS` is every kind the Kubernetes source
watches."""


from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes.watch.watch import iter_resp_lines

from discovery import convert
from discovery.kube.client import MCS_GROUP, MCS_VERSIONS, SERVICE_EXPORTS
from discovery.kube.errors import KubeApiError, KubeGone, KubeNotFound, KubeUnavailable, api_request, describe_error
from discovery.model import ClusterId
from discovery.source import ERROR, ManifestProblem

log = logging.getLogger("meshfed.discovery.kube")

NETWORKING_ISTIO_GROUP = "networking.istio.io"
SECURITY_ISTIO_GROUP = "security.istio.io"
NETWORKING_ISTIO_VERSIONS = ("v1", "v1beta1")
SECURITY_ISTIO_VERSIONS = ("v1", "v1beta1")

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


#: The cluster's own EndpointSlices only: the multicluster ones (meshfed's own, or another MCS implementation's)
#: describe imported endpoints, not this cluster's Services.
OWN_SLICES = f"!{convert.MCS_SERVICE_NAME_LABEL}"


def _slices(api: k8s_client.ApiClient, ns: str | None, version: str = "v1") -> Callable[..., Any]:
    disc = k8s_client.DiscoveryV1Api(api)
    if ns is None:
        return lambda **kw: disc.list_endpoint_slice_for_all_namespaces(label_selector=OWN_SLICES, **kw)
    return lambda **kw: disc.list_namespaced_endpoint_slice(ns, label_selector=OWN_SLICES, **kw)


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
    # v1beta1 where served, else v1alpha1 (the reflector moves down the list on 404).
    _custom_kind("ServiceExport", MCS_GROUP, SERVICE_EXPORTS, MCS_VERSIONS, extra=False),
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
                                self.cluster, self.kind.name, delay, describe_error(exc))
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
                                "allow get/list/watch on it?)", self.cluster, self.kind.name, delay,
                                describe_error(exc))
                log.warning("reflector_error cluster=%s kind=%s rv=%s retry_in=%.2fs error=%s",
                            self.cluster, self.kind.name, self.resource_version or "-", delay,
                            describe_error(exc))
                if self._wait(delay):
                    break
        log.info("reflector_stop cluster=%s kind=%s", self.cluster, self.kind.name)

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopped; True when stopped."""
        return self._stop.wait(seconds)

    def _call(self, **kwargs: Any) -> Any:
        what = f"{'watch' if kwargs.get('watch') else 'list'} {self.kind.name}"
        return api_request(what, lambda: self._list(_preload_content=False, **kwargs))

    def _prefer_newest(self) -> None:
        """Before listing at an older version, check once more that no newer one is served: a CRD installed
        between two probes may serve both, and the newest should win."""
        for index in range(self._version_at):
            version = self.kind.versions[index]
            call = self.kind.bind(self._api, self._namespace, version)
            try:
                resp = api_request(f"list {self.kind.name}",
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
        ended = False  # the server ended the stream and every byte of it was read
        try:
            if self._stop.is_set():
                return False
            for line in _lines(resp):
                if self._stop.is_set():
                    return False
                self._event(line)
                delivered = delivered or bool(line.strip())
            ended = True
            return delivered
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if self._stop.is_set():
                return False
            raise KubeUnavailable(f"watch {self.kind.name}: {describe_error(exc)}") from exc
        finally:
            with self._resp_lock:
                self._resp = None
            with contextlib.suppress(Exception):
                if not ended:
                    # A stream left part-way (an ERROR event, a bad line, a stop) still has the server's bytes,
                    # or the server still writing, on its connection: back in the shared pool, the next request
                    # on it would read them as its status line, or wait behind a watch that is still open.
                    resp.close()
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
