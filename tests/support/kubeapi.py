"""A test double of the Kubernetes API server's HTTP protocol, for tests only.

No real API server can be installed on the test machines, so tests run the official ``kubernetes`` client (and
anything else that speaks the protocol) against this small server instead. It is a *double*, not a mock: it keeps
objects, assigns resource versions and streams watch events over real HTTP (or HTTPS with ``tls=True``: a
throwaway CA whose certificate the emitted kubeconfig carries) on a free loopback port, and it reproduces these
semantics of the real server:

* **Paths.** ``/api/v1/...`` for the core group and ``/apis/{group}/{version}/...`` for every other group, with
  collection (``.../{resource}``), namespaced collection (``.../namespaces/{ns}/{resource}``), object
  (``.../{resource}/{name}``) and the ``status`` subresource. Any group/version/resource works; the table
  ``BUILTIN_RESOURCES`` only tells the double a resource's kind, whether it is cluster-scoped and whether it
  has a status subresource (``register_resource`` adds more, e.g. Istio kinds or CRDs).
* **Resource versions.** One global, monotonically increasing counter (like etcd's revision) stamped on every
  write as ``metadata.resourceVersion``; lists carry the counter in ``metadata.resourceVersion``. Also
  ``metadata.uid``, ``creationTimestamp`` and ``generation`` (bumped when anything but metadata/status changes).
* **Watch.** ``?watch=1&resourceVersion=N`` streams newline-delimited JSON events (``ADDED``, ``MODIFIED``,
  ``DELETED``, ``BOOKMARK``, ``ERROR``) with chunked transfer encoding. Without ``resourceVersion`` (or with
  ``0``) the stream starts with synthetic ``ADDED`` events for the current state. ``allowWatchBookmarks=true``
  enables ``BOOKMARK`` events (every ``bookmark_interval`` seconds, and whenever a test calls
  ``send_bookmarks()``) carrying the newest resource version, which may belong to another resource.
  ``timeoutSeconds`` ends the stream cleanly. A label selector turns an object that moves out of (into) the
  selection into ``DELETED`` (``ADDED``), as the real watch cache does.
* **410 Gone.** The event history is bounded (``history_size``); a watch from a resource version older than the
  oldest event kept answers HTTP 200 with one ``ERROR`` event whose object is a ``Status`` with code 410 and
  reason ``Expired`` ("too old resource version: N (M)"), exactly as the real server does; an expired ``continue``
  token answers HTTP 410. ``compact()`` drops the whole history to force this; ``close_watches()`` ends every
  open watch stream (as an API server restart would), so clients must reconnect from their resource version.
* **Writes.** POST (create, ``generateName``), GET, PUT (replace; a stale ``metadata.resourceVersion`` is a 409
  ``Conflict``), PATCH with ``application/merge-patch+json`` (RFC 7386), ``application/json-patch+json`` (RFC
  6902), ``application/strategic-merge-patch+json`` (treated as a merge patch: lists are replaced, not merged by
  key) and ``application/apply-patch+yaml`` (server-side apply approximated as create-or-merge, without field
  ownership), DELETE. Errors are ``Status`` bodies with the real reasons: 404 ``NotFound``, 409
  ``AlreadyExists``/``Conflict``, 400 ``BadRequest``, 401 ``Unauthorized``, 422 ``Invalid``.
* **Lists.** ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, exists, ``!``), ``fieldSelector``
  (``metadata.name``, ``metadata.namespace``), ``limit`` and ``continue``.
* **Authentication.** Requests must carry ``Authorization: Bearer <admin token>`` (the token the emitted
  kubeconfig holds), else 401. ``POST /apis/authentication.k8s.io/v1/tokenreviews`` answers from a table of
  service-account tokens the test registers (``register_token``/``issue_token``) or that clients obtain through
  the TokenRequest subresource ``POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token``, with the real
  audience rules (an empty ``spec.audiences`` means the server's own audiences; ``status.audiences`` is the
  intersection).
* **Discovery and health.** ``/api``, ``/api/v1``, ``/apis``, ``/apis/{group}/{version}`` from the resource
  table; ``/version``, ``/healthz``, ``/readyz``, ``/livez``.

**Strict mode** (``strict=True``, off by default): objects can only be created in an existing Namespace
(``default``, ``kube-system``, ``kube-public`` and ``kube-node-lease`` exist from the start), and a custom
resource (any group the API server does not serve itself, e.g. ``multicluster.x-k8s.io``) is served only while a
CustomResourceDefinition defines it, with the CRD's kind, scope, served versions and status subresource — so an
installer that applies things in the wrong order fails here as it would on a real cluster. In both modes a CRD
written through the API registers its resource, deleting a CRD deletes its objects, and deleting a Namespace
deletes everything in it at once.

What it does *not* do (tests must not rely on these): admission, validation against OpenAPI schemas, namespace
existence checks outside strict mode, finalizers and graceful deletion, garbage collection by owner, field
managers, consistent snapshots for paginated lists
(later pages read the current state), ``resourceVersionMatch``/``sendInitialEvents``, protobuf, and authorization
(the admin token may do everything). Deployments get a ready ``status`` on every write when ``ready_deployments``
is true, standing in for the controller manager.

Test-side helpers (thread-safe, callable from any thread or coroutine): ``put_object``, ``get_object``,
``delete_object``, ``objects``, ``compact``, ``close_watches``, ``atomically``, ``send_bookmarks``, ``inject_error``,
``register_token``, ``issue_token``, ``requests`` (a log of ``(method, path?query)``), and
``write_kubeconfig``. Use it as a context manager::

    with KubeApiDouble() as api:
        path = api.write_kubeconfig(tmp_path / "kubeconfig", context="east")
        kubernetes.config.load_kube_config(config_file=str(path), context="east")
"""

from __future__ import annotations

import base64
import contextlib
import copy
import http.server
import json
import re
import secrets
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

JSON = dict[str, Any]

_LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ResourceInfo:
    """What the double knows about one resource type."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """How error messages name the resource: ``services`` or ``serviceexports.multicluster.x-k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


def _r(group: str, version: str, plural: str, kind: str, namespaced: bool = True, status: bool = False) -> ResourceInfo:
    return ResourceInfo(group, version, plural, kind, namespaced, status)


BUILTIN_RESOURCES: tuple[ResourceInfo, ...] = (
    _r("", "v1", "services", "Service", status=True),
    _r("", "v1", "endpoints", "Endpoints"),
    _r("", "v1", "namespaces", "Namespace", namespaced=False, status=True),
    _r("", "v1", "nodes", "Node", namespaced=False, status=True),
    _r("", "v1", "pods", "Pod", status=True),
    _r("", "v1", "secrets", "Secret"),
    _r("", "v1", "configmaps", "ConfigMap"),
    _r("", "v1", "serviceaccounts", "ServiceAccount"),
    _r("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", status=True),
    _r("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    _r("apps", "v1", "deployments", "Deployment", status=True),
    _r("apps", "v1", "statefulsets", "StatefulSet", status=True),
    _r("apps", "v1", "daemonsets", "DaemonSet", status=True),
    _r("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False, True),
    _r("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    _r("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    _r("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration",
       namespaced=False),
    _r("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    _r("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    _r("multicluster.x-k8s.io", "v1alpha1", "serviceexports", "ServiceExport", status=True),
    _r("multicluster.x-k8s.io", "v1alpha1", "serviceimports", "ServiceImport", status=True),
    _r("networking.istio.io", "v1", "destinationrules", "DestinationRule", status=True),
    _r("networking.istio.io", "v1", "virtualservices", "VirtualService", status=True),
    _r("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", status=True),
    _r("security.istio.io", "v1", "peerauthentications", "PeerAuthentication", status=True),
)

_STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _builtin_group(group: str) -> bool:
    """Groups the API server serves itself (strategic merge patch works there, not on custom resources)."""
    return group in ("", "apps", "batch", "policy", "autoscaling") or group.endswith(".k8s.io")


def status_body(code: int, message: str, *, reason: str | None = None, details: JSON | None = None) -> JSON:
    """A ``Status`` object as the API server sends it for failures."""
    body: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _STATUS_REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


class ApiError(Exception):
    """Raised inside the double to answer a request with a ``Status`` failure."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.body = status_body(code, message, reason=reason, details=details)


@dataclass
class _Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    group: str
    plural: str
    namespace: str
    obj: JSON
    old: JSON | None


@dataclass
class _Token:
    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    uid: str
    expires: float | None
    pod: str = ""


@dataclass
class _InjectedError:
    remaining: int
    code: int
    path_prefix: str
    method: str | None


@dataclass
class _Stats:
    watches_open: int = 0
    watches_started: int = 0
    lists: int = 0
    connections_ended: int = 0  # client connections the server saw end (the client closed or reset it)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------- selectors


_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def label_selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy a Kubernetes label selector string (equality- and set-based)."""
    for term in _split_selector(selector):
        m = _SET_RE.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            present = key in labels and labels[key] in values
            if (op == "in" and not present) or (op == "notin" and key in labels and labels[key] in values):
                return False
            continue
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "==" in term or "=" in term:
            key, value = (s.strip() for s in re.split("==?", term, maxsplit=1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_selector_matches(selector: str, obj: JSON) -> bool:
    meta = obj.get("metadata", {})
    for term in _split_selector(selector):
        negate = "!=" in term
        key, value = (s.strip() for s in re.split("!=|==?", term, maxsplit=1))
        if key == "metadata.name":
            actual = meta.get("name", "")
        elif key == "metadata.namespace":
            actual = meta.get("namespace", "")
        else:
            raise ApiError(400, f'"{key}" is not a known field selector: only "metadata.name", "metadata.namespace"')
        if (actual == value) == negate:
            return False
    return True


# --------------------------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, f"json patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    if not isinstance(ops, list):
        raise ApiError(400, "a json patch must be a list of operations")
    doc = copy.deepcopy(doc)

    def parent(path: str) -> tuple[Any, str]:
        parts = _pointer(path)
        if not parts:
            raise ApiError(422, "json patch cannot operate on the whole document")
        node = doc
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        return node, parts[-1]

    def get(path: str) -> Any:
        node = doc
        for p in _pointer(path):
            node = node[int(p)] if isinstance(node, list) else node[p]
        return node

    for op in ops:
        try:
            kind, path = op["op"], op["path"]
            if kind in ("add", "replace"):
                node, key = parent(path)
                value = copy.deepcopy(op["value"])
                if isinstance(node, list):
                    if kind == "add":
                        node.insert(len(node) if key == "-" else int(key), value)
                    else:
                        node[int(key)] = value
                else:
                    if kind == "replace" and key not in node:
                        raise ApiError(422, f"json patch replace: path {path!r} does not exist")
                    node[key] = value
            elif kind == "remove":
                node, key = parent(path)
                if isinstance(node, list):
                    node.pop(int(key))
                else:
                    del node[key]
            elif kind in ("move", "copy"):
                value = copy.deepcopy(get(op["from"]))
                if kind == "move":
                    src, skey = parent(op["from"])
                    if isinstance(src, list):
                        src.pop(int(skey))
                    else:
                        del src[skey]
                node, key = parent(path)
                if isinstance(node, list):
                    node.insert(len(node) if key == "-" else int(key), value)
                else:
                    node[key] = value
            elif kind == "test":
                if get(path) != op.get("value"):
                    raise ApiError(422, f"json patch test failed at {path!r}")
            else:
                raise ApiError(400, f"unknown json patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, f"json patch operation {op!r} failed: {exc!r}") from exc
    return doc


# --------------------------------------------------------------------------------------------- the double


class KubeApiDouble:
    """The API server test double (see the module docstring). Start with ``start()`` or ``with``."""

    def __init__(
        self,
        *,
        history_size: int = 1000,
        bookmark_interval: float = 60.0,
        max_watch_seconds: float = 1800.0,
        api_audiences: Sequence[str] = ("https://kubernetes.default.svc.cluster.local",),
        ready_deployments: bool = True,
        strict: bool = False,
        host: str = _LOOPBACK,
        port: int = 0,
        tls: bool = False,
    ) -> None:
        self.tls = tls
        self.ca_pem = b""
        self.history_size = history_size
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        self.api_audiences = tuple(api_audiences)
        self.ready_deployments = ready_deployments
        self.strict = strict
        self.admin_token = "admin-" + secrets.token_urlsafe(24)
        self._host, self._port = host, port
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._rv = 1
        self._objects: dict[tuple[str, str, str, str], JSON] = {}  # (group, plural, namespace, name)
        self._history: deque[_Event] = deque(maxlen=history_size)
        self._compacted = 0  # a watch from N < _compacted is 410 Gone
        self._watch_epoch = 0  # close_watches() bumps it
        self._bookmark_epoch = 0  # send_bookmarks() bumps it
        self._closing = False
        self._resources: dict[tuple[str, str], ResourceInfo] = {}  # (group, plural)
        for info in BUILTIN_RESOURCES:
            if not strict or _builtin_group(info.group):
                self.register_resource(info)
        self._crd_versions: dict[tuple[str, str], set[str]] = {}  # (group, plural) -> served versions
        self._tokens: dict[str, _Token] = {}
        self._errors: list[_InjectedError] = []
        self.requests: list[tuple[str, str]] = []
        self.stats = _Stats()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        if strict:
            for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
                self.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> KubeApiDouble:
        server = _Server((self._host, self._port), _Handler)
        server.double = self
        if self.tls:
            ca_pem, cert_pem, key_pem = _self_signed(self._host)
            self.ca_pem = ca_pem
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.TemporaryDirectory() as tmp:
                cert_file, key_file = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
                cert_file.write_bytes(cert_pem)
                key_file.touch(0o600)
                key_file.write_bytes(key_pem)
                ctx.load_cert_chain(cert_file, key_file)
            # The handshake happens in the handler thread, on first read, not in the accept loop.
            server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="kubeapi-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> KubeApiDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the double is not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self._host}:{self.port}"

    def write_kubeconfig(
        self,
        path: Path | str,
        *,
        context: str = "double",
        namespace: str = "default",
        token: str | None = None,
        others: Mapping[str, KubeApiDouble] | None = None,
    ) -> Path:
        """Write a kubeconfig (mode 0600) whose ``context`` points at this double; ``others`` adds more
        contexts, each pointing at another double (one file for a multi-cluster test)."""
        doubles = {context: self, **(others or {})}
        config: JSON = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "current-context": context,
            "clusters": [{"name": n, "cluster": d._cluster_entry()} for n, d in doubles.items()],
            "users": [
                {"name": n, "user": {"token": token if (token and n == context) else d.admin_token}}
                for n, d in doubles.items()
            ],
            "contexts": [
                {"name": n, "context": {"cluster": n, "user": n, "namespace": namespace}} for n in doubles
            ],
        }
        target = Path(path)
        target.write_text(yaml.safe_dump(config, sort_keys=False))
        target.chmod(0o600)
        return target

    def _cluster_entry(self) -> JSON:
        entry: JSON = {"server": self.url}
        if self.tls:
            entry["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return entry

    # -- resource table -------------------------------------------------------------------------------------

    def register_resource(self, info: ResourceInfo) -> None:
        with self._lock:
            self._resources[(info.group, info.plural)] = info

    def resource_info(self, group: str, version: str, plural: str, *, namespaced_hint: bool = True) -> ResourceInfo:
        with self._lock:
            info = self._resources.get((group, plural))
        if info is not None:
            return info
        kind = plural[:-1].capitalize() if plural.endswith("s") else plural.capitalize()
        return ResourceInfo(group, version, plural, kind, namespaced_hint)

    def _info_for(self, api_version: str, kind: str) -> ResourceInfo:
        group, _, version = api_version.rpartition("/")
        with self._lock:
            for info in self._resources.values():
                if info.group == group and info.kind == kind:
                    return info
        return ResourceInfo(group, version, kind.lower() + "s", kind)

    # -- test-side helpers ----------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The newest resource version written."""
        with self._lock:
            return self._rv

    def put_object(self, obj: Mapping[str, Any]) -> JSON:
        """Create or replace ``obj`` (found by apiVersion, kind, namespace, name), bypassing authentication and
        the status-subresource rule (``status`` is stored as given). Returns the stored object."""
        body = copy.deepcopy(dict(obj))
        info = self._info_for(body.get("apiVersion", ""), body.get("kind", ""))
        meta = body.setdefault("metadata", {})
        ns = meta.get("namespace", "default") if info.namespaced else ""
        if info.namespaced:
            meta["namespace"] = ns
        with self._cond:
            current = self._objects.get((info.group, info.plural, ns, meta.get("name", "")))
            if current is None:
                return self._create(info, ns, body, keep_status=True)
            meta["resourceVersion"] = ""
            return self._update(info, ns, body, current, keep_status=True)

    def get_object(self, api_version: str, kind: str, name: str, namespace: str = "default") -> JSON | None:
        info = self._info_for(api_version, kind)
        with self._lock:
            obj = self._objects.get((info.group, info.plural, namespace if info.namespaced else "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def delete_object(self, api_version: str, kind: str, name: str, namespace: str = "default") -> bool:
        """Delete an object; False when it did not exist."""
        info = self._info_for(api_version, kind)
        with self._cond:
            key = (info.group, info.plural, namespace if info.namespaced else "", name)
            if key not in self._objects:
                return False
            self._delete(info, key)
            return True

    def objects(self, api_version: str, kind: str, namespace: str | None = None) -> list[JSON]:
        info = self._info_for(api_version, kind)
        with self._lock:
            return [
                copy.deepcopy(o)
                for (g, p, ns, _), o in sorted(self._objects.items())
                if g == info.group and p == info.plural and (namespace is None or ns == namespace)
            ]

    def compact(self) -> int:
        """Forget every event so far (as etcd compaction does): watches from older versions get 410 Gone.
        Returns the compaction revision."""
        with self._cond:
            self._history.clear()
            self._compacted = self._rv
            self._cond.notify_all()
            return self._compacted

    @contextlib.contextmanager
    def atomically(self) -> Iterator[None]:
        """Hold the double's lock: no request is served and no watch event sent until the block ends, so a test
        can make several changes (and ``compact()``/``close_watches()``) that clients observe all at once."""
        with self._cond:
            yield

    def close_watches(self) -> None:
        """End every open watch stream, as an API server restart does; clients must reconnect."""
        with self._cond:
            self._watch_epoch += 1
            self._cond.notify_all()

    def send_bookmarks(self) -> None:
        """Make every watch that allows bookmarks send one now."""
        with self._cond:
            self._bookmark_epoch += 1
            self._cond.notify_all()

    def inject_error(
        self, n: int = 1, *, code: int = 500, path_prefix: str = "/api", method: str | None = None
    ) -> None:
        """Answer the next ``n`` requests whose path starts with ``path_prefix`` (and method, if given) with a
        ``Status`` failure of ``code`` (500 InternalError by default; 429 also sends ``Retry-After: 1``)."""
        with self._lock:
            self._errors.append(_InjectedError(n, code, path_prefix, method.upper() if method else None))

    def register_token(
        self,
        token: str,
        *,
        namespace: str,
        service_account: str,
        audiences: Sequence[str] | None = None,
        uid: str | None = None,
        expires_in: float | None = None,
        pod: str = "",
    ) -> None:
        """Make TokenReview authenticate ``token`` as ``system:serviceaccount:NS:SA`` for ``audiences``
        (the server's own audiences by default)."""
        with self._lock:
            self._tokens[token] = _Token(
                namespace=namespace,
                service_account=service_account,
                audiences=tuple(audiences) if audiences is not None else self.api_audiences,
                uid=uid or str(uuid.uuid4()),
                expires=time.time() + expires_in if expires_in is not None else None,
                pod=pod,
            )

    def issue_token(
        self, namespace: str, service_account: str, *, audiences: Sequence[str] | None = None,
        expires_in: float | None = 3600.0,
    ) -> str:
        """Mint a JWT-shaped service-account token (unsigned: only this double's TokenReview can check it)."""
        aud = list(audiences) if audiences is not None else list(self.api_audiences)
        exp = int(time.time() + (expires_in or 3600))
        claims = {
            "aud": aud,
            "exp": exp,
            "iat": int(time.time()),
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account}},
        }

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        token = ".".join([
            b64(json.dumps({"alg": "none", "typ": "JWT"}).encode()),
            b64(json.dumps(claims).encode()),
            b64(secrets.token_bytes(32)),
        ])
        self.register_token(token, namespace=namespace, service_account=service_account, audiences=aud,
                            expires_in=expires_in)
        return token

    def revoke_token(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    # -- storage core (callers hold the lock) -------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, info: ResourceInfo, ns: str, type_: str, obj: JSON, old: JSON | None, rv: int) -> None:
        if len(self._history) == self._history.maxlen:
            self._compacted = max(self._compacted, self._history[0].rv)
        self._history.append(_Event(rv, type_, info.group, info.plural, ns, copy.deepcopy(obj), old))
        self._cond.notify_all()
        if info.group == "apiextensions.k8s.io" and info.plural == "customresourcedefinitions":
            # After the CRD's own event, so the history stays in resourceVersion order.
            self._crd_changed(obj, deleted=type_ == "DELETED")

    def _auto_status(self, info: ResourceInfo, obj: JSON) -> None:
        if self.ready_deployments and info.group == "apps" and info.plural == "deployments":
            replicas = obj.get("spec", {}).get("replicas", 1)
            obj["status"] = {
                "observedGeneration": obj["metadata"].get("generation", 1),
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                     "message": "Deployment has minimum availability.", "lastUpdateTime": _now_iso(),
                     "lastTransitionTime": _now_iso()},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                     "message": "ReplicaSet has successfully progressed.", "lastUpdateTime": _now_iso(),
                     "lastTransitionTime": _now_iso()},
                ],
            }

    def _create(self, info: ResourceInfo, ns: str, body: JSON, *, keep_status: bool = False) -> JSON:
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "metadata must be an object")
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            else:
                raise ApiError(422, f"{info.kind} \"\" is invalid: metadata.name: Required value: name or "
                               "generateName is required", details={"kind": info.kind})
        name = meta["name"]
        key = (info.group, info.plural, ns, name)
        if key in self._objects:
            raise ApiError(409, f'{info.qualified} "{name}" already exists', reason="AlreadyExists",
                           details={"name": name, "group": info.group, "kind": info.plural})
        if info.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if info.status_subresource and not keep_status:
            body.pop("status", None)
        body.setdefault("apiVersion", info.api_version)
        body.setdefault("kind", info.kind)
        rv = self._next_rv()
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now_iso()
        meta["generation"] = 1
        meta["resourceVersion"] = str(rv)
        if not keep_status:
            self._auto_status(info, body)
        self._objects[key] = body
        self._record(info, ns, "ADDED", body, None, rv)
        return copy.deepcopy(body)

    def _update(
        self, info: ResourceInfo, ns: str, body: JSON, current: JSON, *, keep_status: bool = False,
        status_only: bool = False,
    ) -> JSON:
        meta = body.setdefault("metadata", {})
        name = current["metadata"]["name"]
        if meta.get("name", name) != name:
            raise ApiError(400, f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                           f"({name})")
        want_rv = str(meta.get("resourceVersion") or "")
        if want_rv and want_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(409, f'Operation cannot be fulfilled on {info.qualified} "{name}": the object has been '
                           "modified; please apply your changes to the latest version and try again",
                           reason="Conflict", details={"name": name, "group": info.group, "kind": info.plural})
        if status_only:
            new = copy.deepcopy(current)
            if "status" in body:
                new["status"] = body["status"]
            else:
                new.pop("status", None)
        else:
            new = body
            if info.status_subresource and not keep_status:
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
                else:
                    new.pop("status", None)
        new_meta = new["metadata"]
        for fixed in ("uid", "creationTimestamp", "name"):
            new_meta[fixed] = current["metadata"][fixed]
        if info.namespaced:
            new_meta["namespace"] = ns
        new.setdefault("apiVersion", current.get("apiVersion", info.api_version))
        new.setdefault("kind", current.get("kind", info.kind))

        def spec_of(o: JSON) -> JSON:
            return {k: v for k, v in o.items() if k not in ("metadata", "status")}

        generation = int(current["metadata"].get("generation", 1))
        if spec_of(new) != spec_of(current):
            generation += 1
        new_meta["generation"] = generation
        rv = self._next_rv()
        new_meta["resourceVersion"] = str(rv)
        if not keep_status and not status_only:
            self._auto_status(info, new)
        self._objects[(info.group, info.plural, ns, name)] = new
        self._record(info, ns, "MODIFIED", new, copy.deepcopy(current), rv)
        return copy.deepcopy(new)

    def _delete(self, info: ResourceInfo, key: tuple[str, str, str, str]) -> JSON:
        old = self._objects.pop(key)
        rv = self._next_rv()
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(rv)
        self._record(info, key[2], "DELETED", gone, old, rv)
        if info.group == "" and info.plural == "namespaces":
            # The namespace controller's job, done at once: everything in the namespace goes with it.
            for inner in [k for k in self._objects if k[2] == key[3] and k[2]]:
                self._delete(self._known_info(inner[0], inner[1]), inner)
        return gone

    def _known_info(self, group: str, plural: str) -> ResourceInfo:
        info = self._resources.get((group, plural))
        return info if info is not None else ResourceInfo(group, "v1", plural, plural.capitalize())

    def _crd_changed(self, crd: JSON, *, deleted: bool) -> None:
        """Serve (or stop serving) the resource a CustomResourceDefinition defines."""
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        group, plural, kind = spec.get("group", ""), names.get("plural", ""), names.get("kind", "")
        if not group or not plural or not kind:
            return
        if deleted:
            self._crd_versions.pop((group, plural), None)
            if self.strict:
                self._resources.pop((group, plural), None)
            for key in [k for k in self._objects if k[0] == group and k[1] == plural]:
                self._delete(self._known_info(group, plural), key)
            return
        served = [v for v in spec.get("versions") or [] if v.get("served", True)]
        if not served:
            return
        storage = next((v for v in served if v.get("storage")), served[0])
        self._crd_versions[(group, plural)] = {v.get("name", "") for v in served}
        self._resources[(group, plural)] = ResourceInfo(
            group, storage.get("name", "v1"), plural, kind, namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            status_subresource="status" in (storage.get("subresources") or {}))

    def _serves(self, group: str, version: str, plural: str) -> bool:
        """In strict mode a custom resource is served only while a CRD defines it (with that version)."""
        if not self.strict or _builtin_group(group):
            return True
        with self._lock:
            return version in self._crd_versions.get((group, plural), set())

    def _check_namespace(self, info: ResourceInfo, ns: str) -> None:
        """In strict mode, creating a namespaced object needs its Namespace, as on the real server."""
        if self.strict and info.namespaced and ("", "namespaces", "", ns) not in self._objects:
            raise ApiError(404, f'namespaces "{ns}" not found', details={"name": ns, "kind": "namespaces"})

    # -- request handling (called from handler threads) ----------------------------------------------------

    def _take_injected_error(self, method: str, path: str) -> int | None:
        with self._lock:
            for err in self._errors:
                if err.remaining > 0 and path.startswith(err.path_prefix) and err.method in (None, method):
                    err.remaining -= 1
                    code = err.code
                    self._errors = [e for e in self._errors if e.remaining > 0]
                    return code
        return None

    def _list(self, info: ResourceInfo, ns: str | None, query: Mapping[str, str]) -> JSON:
        label_sel, field_sel = query.get("labelSelector", ""), query.get("fieldSelector", "")
        limit = int(query.get("limit", "0") or 0)
        start_after: tuple[str, str] | None = None
        with self._lock:
            self.stats.lists += 1
            list_rv = self._rv
            if query.get("continue"):
                try:
                    token = json.loads(base64.urlsafe_b64decode(query["continue"].encode()))
                    token_rv, start_after = int(token["rv"]), (token["start"][0], token["start"][1])
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise ApiError(400, "continue key is not valid: " + str(exc)) from exc
                if token_rv < self._compacted:
                    raise ApiError(410, "The provided continue parameter is too old to display a consistent list "
                                   "result. You can start a new list without the continue parameter.",
                                   reason="Expired")
            items = []
            for (g, p, ons, name), obj in sorted(self._objects.items()):
                if g != info.group or p != info.plural or (ns is not None and ons != ns):
                    continue
                if start_after is not None and (ons, name) <= start_after:
                    continue
                if label_sel and not label_selector_matches(label_sel, obj["metadata"].get("labels") or {}):
                    continue
                if field_sel and not _field_selector_matches(field_sel, obj):
                    continue
                item = copy.deepcopy(obj)
                if _builtin_group(info.group):
                    # The real server leaves kind and apiVersion out of the items of built-in lists.
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                items.append(item)
        meta: JSON = {"resourceVersion": str(list_rv)}
        if limit and len(items) > limit:
            items = items[:limit]
            last = items[-1]["metadata"]
            token = {"rv": list_rv, "start": [last.get("namespace", ""), last["name"]]}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            meta["remainingItemCount"] = 0
        return {"kind": info.kind + "List", "apiVersion": info.api_version, "metadata": meta, "items": items}

    def _watch_events(
        self, info: ResourceInfo, ns: str | None, query: Mapping[str, str], write: Any,
    ) -> None:
        """Stream watch events through ``write(bytes)`` until timeout, close_watches() or shutdown."""
        label_sel, field_sel = query.get("labelSelector", ""), query.get("fieldSelector", "")
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("1", "true")
        timeout = float(query.get("timeoutSeconds") or self.max_watch_seconds)
        deadline = time.monotonic() + min(timeout, self.max_watch_seconds)

        def selected(obj: JSON | None) -> bool:
            if obj is None:
                return False
            if label_sel and not label_selector_matches(label_sel, obj["metadata"].get("labels") or {}):
                return False
            return not (field_sel and not _field_selector_matches(field_sel, obj))

        def line(type_: str, obj: JSON) -> bytes:
            return json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"

        rv_text = query.get("resourceVersion", "")
        out: list[bytes] = []
        with self._lock:
            epoch, bm_epoch = self._watch_epoch, self._bookmark_epoch
            if rv_text in ("", "0"):
                cursor = self._rv
                for (g, p, ons, _), obj in sorted(self._objects.items()):
                    if g == info.group and p == info.plural and (ns is None or ons == ns) and selected(obj):
                        out.append(line("ADDED", obj))
            else:
                try:
                    cursor = int(rv_text)
                except ValueError as exc:
                    raise ApiError(400, f"invalid resource version {rv_text!r}") from exc
                if cursor < self._compacted:
                    out.append(line("ERROR", status_body(
                        410, f"too old resource version: {cursor} ({self._compacted})", reason="Expired")))
                    write(b"".join(out))
                    return
            self.stats.watches_open += 1
            self.stats.watches_started += 1
        try:
            # Like the real server, answer 200 with headers at once, before any event.
            write(b"".join(out))
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                out = []
                with self._cond:
                    while True:
                        now = time.monotonic()
                        newest = self._history[-1].rv if self._history else 0
                        if (self._closing or self._watch_epoch != epoch or now >= deadline or newest > cursor
                                or cursor < self._compacted
                                or (bookmarks and (now >= next_bookmark or self._bookmark_epoch != bm_epoch))):
                            break
                        self._cond.wait(timeout=min(deadline, next_bookmark if bookmarks else deadline) - now)
                    if self._closing or self._watch_epoch != epoch:
                        return
                    if cursor < self._compacted:
                        # Events this watcher has not seen were dropped (it fell behind the bounded history, or a
                        # test compacted): end it with 410, as the real server ends a watcher it cannot serve.
                        out.append(line("ERROR", status_body(
                            410, f"too old resource version: {cursor} ({self._compacted})", reason="Expired")))
                        write(b"".join(out))
                        return
                    for ev in self._history:
                        if ev.rv <= cursor:
                            continue
                        cursor = ev.rv
                        if ev.group != info.group or ev.plural != info.plural or (ns is not None and
                                                                                  ev.namespace != ns):
                            continue
                        now_in, was_in = selected(ev.obj), selected(ev.old)
                        if ev.type == "DELETED":
                            if was_in:
                                out.append(line("DELETED", ev.obj))
                        elif ev.type == "ADDED":
                            if now_in:
                                out.append(line("ADDED", ev.obj))
                        elif now_in and was_in:
                            out.append(line("MODIFIED", ev.obj))
                        elif now_in:
                            out.append(line("ADDED", ev.obj))
                        elif was_in:
                            out.append(line("DELETED", ev.obj))
                    cursor = max(cursor, self._rv)
                    send_bookmark = bookmarks and (
                        time.monotonic() >= next_bookmark or self._bookmark_epoch != bm_epoch)
                    if send_bookmark:
                        bm_epoch = self._bookmark_epoch
                        next_bookmark = time.monotonic() + self.bookmark_interval
                        out.append(line("BOOKMARK", {"kind": info.kind, "apiVersion": info.api_version,
                                                     "metadata": {"resourceVersion": str(cursor)}}))
                if out:
                    write(b"".join(out))
                if time.monotonic() >= deadline:
                    return
        finally:
            with self._lock:
                self.stats.watches_open -= 1

    def _token_review(self, body: JSON) -> JSON:
        spec = body.get("spec") or {}
        token = spec.get("token", "")
        wanted = tuple(spec.get("audiences") or ()) or self.api_audiences
        status: JSON
        with self._lock:
            entry = self._tokens.get(token)
        if entry is None:
            status = {"authenticated": False, "user": {}, "error": "[invalid bearer token, token lookup failed]"}
        elif entry.expires is not None and time.time() > entry.expires:
            status = {"authenticated": False, "user": {}, "error": "[invalid bearer token, token has expired]"}
        else:
            common = [a for a in wanted if a in entry.audiences]
            if not common:
                status = {"authenticated": False, "user": {},
                          "error": f"[invalid bearer token, token audiences {list(entry.audiences)} is invalid "
                                   f"for the target audiences {list(wanted)}]"}
            else:
                user: JSON = {
                    "username": f"system:serviceaccount:{entry.namespace}:{entry.service_account}",
                    "uid": entry.uid,
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{entry.namespace}",
                               "system:authenticated"],
                }
                if entry.pod:
                    user["extra"] = {"authentication.kubernetes.io/pod-name": [entry.pod]}
                status = {"authenticated": True, "user": user, "audiences": common}
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    def _token_request(self, ns: str, sa: str, body: JSON) -> JSON:
        spec = body.get("spec") or {}
        seconds = int(spec.get("expirationSeconds") or 3600)
        token = self.issue_token(ns, sa, audiences=spec.get("audiences") or None, expires_in=seconds)
        expires = (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": sa, "namespace": ns, "creationTimestamp": None},
            "spec": {"audiences": spec.get("audiences") or list(self.api_audiences), "expirationSeconds": seconds},
            "status": {"token": token, "expirationTimestamp": expires},
        }

    def _versions_of(self, info: ResourceInfo) -> list[str]:
        """The versions a resource is served at: a CRD's served versions (storage first), else its one version."""
        served = self._crd_versions.get((info.group, info.plural), set())
        return [info.version, *sorted(v for v in served if v != info.version)]

    def _discovery(self, parts: list[str]) -> JSON | None:
        with self._lock:
            infos = list(self._resources.values())
            versions_of = {(i.group, i.plural): self._versions_of(i) for i in infos}
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self._host}"}]}
        if parts == ["apis"]:
            groups: dict[str, list[str]] = {}
            for i in infos:
                if i.group:
                    versions = groups.setdefault(i.group, [])
                    for v in versions_of[(i.group, i.plural)]:
                        if v not in versions:
                            versions.append(v)
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in sorted(groups.items())]}
        if parts == ["api", "v1"] or (len(parts) == 3 and parts[0] == "apis"):
            group, version = ("", "v1") if parts[0] == "api" else (parts[1], parts[2])
            resources = []
            for i in infos:
                if i.group == group and version in versions_of[(i.group, i.plural)]:
                    resources.append({"name": i.plural, "singularName": i.kind.lower(), "namespaced": i.namespaced,
                                      "kind": i.kind, "verbs": ["create", "delete", "get", "list", "patch",
                                                                "update", "watch"]})
                    if i.status_subresource:
                        resources.append({"name": i.plural + "/status", "singularName": "", "namespaced":
                                          i.namespaced, "kind": i.kind, "verbs": ["get", "patch", "update"]})
            if not resources and parts[0] == "apis":
                return None
            return {"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": f"{group}/{version}" if group else version, "resources": resources}
        return None


# --------------------------------------------------------------------------------------------- HTTP plumbing


def _self_signed(host: str) -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a server certificate for ``host`` (an IP) and ``localhost``: (ca, cert, key) PEM."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeapi-double-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    double: KubeApiDouble

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response (a stopped watch) is normal here; anything else is printed.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError | OSError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class _Route:
    info: ResourceInfo | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    special: str = ""  # "tokenreview", "token", "discovery", "health", "version"
    parts: list[str] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.double._lock:
                self.double.stats.connections_ended += 1

    @property
    def double(self) -> KubeApiDouble:
        return self.server.double

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- plumbing ------------------------------------------------------------------------------------------

    def _send_json(self, code: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _body_json(self, raw: bytes, content_type: str) -> Any:
        if not raw:
            return {}
        try:
            if "yaml" in content_type:
                return yaml.safe_load(raw.decode())
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise ApiError(400, f"the request body is not valid {content_type or 'JSON'}: {exc}") from exc

    def _route(self, path: str) -> _Route:
        parts = [p for p in path.split("/") if p]
        if path in ("/healthz", "/readyz", "/livez"):
            return _Route(special="health")
        if path == "/version":
            return _Route(special="version")
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return _Route(special="discovery", parts=parts)
        if not rest:
            return _Route(special="discovery", parts=parts)
        if group == "authentication.k8s.io" and rest == ["tokenreviews"]:
            return _Route(special="tokenreview")
        ns: str | None = None
        if rest[0] == "namespaces" and len(rest) == 3 and rest[2] in ("status", "finalize") and not group:
            info = self.double.resource_info("", version, "namespaces")
            return _Route(info=info, name=rest[1], subresource=rest[2])
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        if ns is not None and len(rest) == 3 and rest[0] == "serviceaccounts" and rest[2] == "token" and not group:
            return _Route(special="token", namespace=ns, name=rest[1])
        if len(rest) > 3:
            raise ApiError(404, f"the server could not find the requested resource ({path})")
        if not self.double._serves(group, version, rest[0]):
            raise ApiError(404, f"the server could not find the requested resource ({path})")
        info = self.double.resource_info(group, version, rest[0], namespaced_hint=ns is not None)
        if ns is not None and not info.namespaced:
            raise ApiError(404, f"the server could not find the requested resource ({path})")
        return _Route(info=info, namespace=ns, name=rest[1] if len(rest) > 1 else None,
                      subresource=rest[2] if len(rest) > 2 else None)

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        double = self.double
        with double._lock:
            double.requests.append((method, self.path))
        raw = self._read_body()
        try:
            route = self._route(path)
            if route.special == "health":
                self._send_text(200, "ok")
                return
            if route.special == "version":
                self._send_json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-meshfed-double",
                                      "gitCommit": "0" * 40, "gitTreeState": "clean",
                                      "buildDate": "2024-08-13T00:00:00Z", "goVersion": "go1.22.5",
                                      "compiler": "gc", "platform": "linux/amd64"})
                return
            auth = self.headers.get("Authorization", "")
            if auth != f"Bearer {double.admin_token}":
                raise ApiError(401, "Unauthorized")
            code = double._take_injected_error(method, path)
            if code is not None:
                headers = {"Retry-After": "1"} if code == 429 else None
                self._send_json(code, status_body(code, f"injected failure {code} for {method} {path}"), headers)
                return
            if route.special == "discovery":
                body = double._discovery(route.parts)
                if body is None:
                    raise ApiError(404, "the server could not find the requested resource")
                self._send_json(200, body)
                return
            if route.special == "tokenreview":
                if method != "POST":
                    raise ApiError(405, f"{method} is not supported on tokenreviews")
                self._send_json(201, double._token_review(self._body_json(raw, "json")))
                return
            if route.special == "token":
                if method != "POST":
                    raise ApiError(405, f"{method} is not supported on serviceaccounts/token")
                assert route.namespace is not None and route.name is not None
                with double._lock:
                    exists = ("", "serviceaccounts", route.namespace, route.name) in double._objects
                if not exists:
                    raise ApiError(404, f'serviceaccounts "{route.name}" not found',
                                   details={"name": route.name, "kind": "serviceaccounts"})
                self._send_json(201, double._token_request(route.namespace, route.name,
                                                           self._body_json(raw, "json")))
                return
            self._resource(method, route, query, raw)
        except ApiError as err:
            self._send_json(err.code, err.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _resource(self, method: str, route: _Route, query: Mapping[str, str], raw: bytes) -> None:
        info = route.info
        assert info is not None
        double = self.double
        ns = route.namespace
        name = route.name
        if info.namespaced and name is not None and ns is None:
            raise ApiError(404, f"the server could not find the requested resource ({info.plural}/{name})")
        store_ns = ns or ""
        if name is None:
            if method == "GET":
                if query.get("watch", "").lower() in ("1", "true"):
                    self._stream_watch(info, ns, query)
                else:
                    self._send_json(200, double._list(info, ns, query))
                return
            if method == "POST":
                if info.namespaced and ns is None:
                    raise ApiError(404, f"{info.plural} must be created in a namespace")
                body = self._body_json(raw, self.headers.get("Content-Type", ""))
                if not isinstance(body, dict):
                    raise ApiError(400, "the request body must be an object")
                body_ns = (body.get("metadata") or {}).get("namespace")
                if info.namespaced and body_ns and body_ns != ns:
                    raise ApiError(400, "the namespace of the provided object does not match the namespace sent "
                                   "on the request")
                with double._cond:
                    double._check_namespace(info, store_ns)
                    created = double._create(info, store_ns, body)
                self._send_json(201, created)
                return
            raise ApiError(405, f"{method} is not supported on a collection")
        key = (info.group, info.plural, store_ns, name)
        not_found = ApiError(404, f'{info.qualified} "{name}" not found',
                             details={"name": name, "group": info.group, "kind": info.plural})
        if route.subresource not in (None, "status"):
            raise ApiError(404, f"the server could not find the requested resource ({route.subresource})")
        status_only = route.subresource == "status"
        if method == "GET":
            with double._lock:
                obj = double._objects.get(key)
                if obj is None:
                    raise not_found
                self._send_json(200, copy.deepcopy(obj))
            return
        if method == "DELETE":
            with double._cond:
                if key not in double._objects:
                    raise not_found
                gone = double._delete(info, key)
            self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                  "details": {"name": name, "group": info.group, "kind": info.plural,
                                              "uid": gone["metadata"].get("uid", "")}})
            return
        content_type = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
        body = self._body_json(raw, content_type)
        if method == "PUT":
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be an object")
            with double._cond:
                current = double._objects.get(key)
                if current is None:
                    raise not_found
                updated = double._update(info, store_ns, body, current, status_only=status_only)
            self._send_json(200, updated)
            return
        if method == "PATCH":
            with double._cond:
                current = double._objects.get(key)
                if content_type == "application/apply-patch+yaml":
                    if not query.get("fieldManager"):
                        raise ApiError(422, "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required "
                                       "value: is required for apply patch")
                    if current is None and not status_only:  # the status subresource never creates
                        if not isinstance(body, dict):
                            raise ApiError(400, "an apply patch must be an object")
                        body.setdefault("metadata", {})["name"] = name
                        double._check_namespace(info, store_ns)
                        created = double._create(info, store_ns, body)
                        self._send_json(201, created)
                        return
                if current is None:
                    raise not_found
                if content_type == "application/json-patch+json":
                    patched = json_patch(current, body)
                elif content_type == "application/strategic-merge-patch+json" and not _builtin_group(info.group):
                    raise ApiError(415, "the body of the request was in an unknown format - accepted media types "
                                   "include: application/json-patch+json, application/merge-patch+json, "
                                   "application/apply-patch+yaml (strategic merge patch is not supported for "
                                   "custom resources)")
                elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json",
                                      "application/apply-patch+yaml"):
                    patched = merge_patch(current, body)
                else:
                    raise ApiError(415, f"the body of the request was in an unknown format - accepted media types "
                                   f"include: application/json-patch+json, application/merge-patch+json, "
                                   f"application/apply-patch+yaml (got {content_type})")
                patched.setdefault("metadata", {})["resourceVersion"] = (
                    (body.get("metadata") or {}).get("resourceVersion", "") if isinstance(body, dict) else "")
                updated = double._update(info, store_ns, patched, current, status_only=status_only)
            self._send_json(200, updated)
            return
        raise ApiError(405, f"{method} is not supported")

    def _stream_watch(self, info: ResourceInfo, ns: str | None, query: Mapping[str, str]) -> None:
        started = False

        def write(data: bytes) -> None:
            nonlocal started
            if not started:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                started = True
            if data:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        # An ApiError raised here (a malformed resourceVersion) comes before anything is written, so the caller
        # can still answer it with a plain Status response.
        self.double._watch_events(info, ns, query, write)
        try:
            write(b"")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True


def iter_watch_lines(data: bytes) -> Iterator[JSON]:
    """Parse a watch body (newline-delimited JSON) into events; for the double's own tests."""
    for raw in data.splitlines():
        if raw.strip():
            yield json.loads(raw)
