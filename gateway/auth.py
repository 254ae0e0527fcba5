"""Who is this xDS client? Authenticating ADS streams and binding them to their node id.

Every ADS stream carries ``authorization: Bearer <token>`` in its gRPC metadata. An ``Authenticator`` turns the
token into a ``ProxyIdentity`` (namespace, service account, cluster), or raises ``AuthenticationError``:

- ``TokenTableAuthenticator``: per-workload bootstrap tokens for local runs (the runner writes one token per proxy
  into its bootstrap file, mode 0600); tokens are compared in constant time.
- ``TokenReviewAuthenticator``: Kubernetes projected service-account tokens, checked by POSTing a TokenReview to
  the API server (``authentication.k8s.io/v1``) with the audience the tokens were minted for.

Then ``check_node`` binds the identity to the node id the proxy claims. Node ids follow Istio's convention::

    <kind>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>
    e.g. sidecar~10.0.0.5~reviews-1.default~default.svc.cluster.local

where kind is ``sidecar`` (Envoy sidecar), ``router`` or ``gateway`` (east-west gateway), ``grpc`` or
``proxyless`` (gRPC's xDS client).
The node's namespace must be the identity's namespace, and the node's metadata must name the identity's service
account as ``SERVICE_ACCOUNT`` (the generators take the proxy's service account, hence its certificate, from it);
metadata that names a namespace (``NAMESPACE``) or cluster (``CLUSTER_ID``) must name the identity's. A token that
was issued to one workload binds the stream to it as well: a local run's bootstrap token names the exact node id
it was written for (``ProxyIdentity.node_id``), and a Kubernetes projected token names its pod (TokenReview's
``authentication.kubernetes.io/pod-name``, ``ProxyIdentity.pod``), so one workload can never open a stream as
another workload of the same service account. A proxy thus only ever receives the snapshot of its own node, and
SDS only issues certificates for the identity the token proved (never one the node claims).

The snapshot cache (gateway.cache) adds the last rule: while a node has an open stream, a second stream for that
node must authenticate as the same identity and carry the same metadata, or it is refused; it can never change
what the first stream is served.

Errors: ``AuthenticationError`` (no/invalid token; the server answers UNAUTHENTICATED) and its subclass
``NodeMismatch`` (valid token, node id of another namespace or service account; PERMISSION_DENIED).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from gateway.context import META_CLUSTER, META_KIND, META_NAMESPACE, META_SERVICE_ACCOUNT
from gateway.snapshot import XdsError

log = logging.getLogger("meshfed.xds.auth")


class AuthenticationError(XdsError):
    """The xDS client could not be authenticated (missing, unknown or rejected token)."""


class NodeMismatch(AuthenticationError):
    """The token is valid, but the node id or metadata claims a different namespace or service account."""


@dataclass(frozen=True)
class ProxyIdentity:
    """The workload identity an xDS client proved: the SPIFFE identity its certificate will carry."""

    namespace: str
    service_account: str
    cluster: str
    # What the credential is bound to besides the SPIFFE identity (not part of equality: two workloads of one
    # service account share an identity and its certificate). ``node_id``: the exact node id a local run's token
    # was issued for; ``pod``: the pod a Kubernetes projected token was minted for. None: not bound.
    node_id: str | None = field(default=None, compare=False)
    pod: str | None = field(default=None, compare=False)
    # The node kinds (a node id's first field) the credential may open; None: any. A workload certificate on the
    # mTLS listener opens proxyless gRPC nodes only (gateway.peerauth): it must not stand in for a sidecar's or a
    # gateway's token, which binds its node.
    node_kinds: frozenset[str] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        bound = f" bound to node {self.node_id}" if self.node_id else f" bound to pod {self.pod}" if self.pod else ""
        return f"{self.cluster}/{self.namespace}/{self.service_account}{bound}"


def binding(identity: ProxyIdentity) -> tuple[ProxyIdentity, str | None, str | None]:
    """An identity with what its credential is bound to (the node or pod), which its equality leaves out: two
    workloads of one service account are one identity but two credentials, and revoking one keeps the other."""
    return identity, identity.node_id, identity.pod


#: The node id kinds and the proxy kind (``MESHFED_KIND`` node metadata, gateway.context.ProxyKind) each names.
KIND_OF_NODE: Mapping[str, str] = {"sidecar": "sidecar", "router": "gateway", "gateway": "gateway",
                                   "proxyless": "grpc", "grpc": "grpc"}
NODE_KINDS = frozenset(KIND_OF_NODE)
PROXYLESS_NODE_KINDS = frozenset({"grpc", "proxyless"})


@dataclass(frozen=True)
class NodeInfo:
    """A parsed node id."""

    kind: str
    ip: str
    pod: str
    namespace: str
    domain: str

    @property
    def node_id(self) -> str:
        return f"{self.kind}~{self.ip}~{self.pod}.{self.namespace}~{self.namespace}.svc.{self.domain}"


def make_node_id(*, kind: str, ip: str, pod: str, namespace: str, domain: str = "cluster.local") -> str:
    """The node id a proxy's bootstrap carries (see the module docstring)."""
    if kind not in NODE_KINDS:
        raise ValueError(f"node kind {kind!r} is not one of {sorted(NODE_KINDS)}")
    return NodeInfo(kind, ip, pod, namespace, domain).node_id


def parse_node_id(node_id: str) -> NodeInfo:
    """Parse ``kind~ip~pod.ns~ns.svc.domain``; raises NodeMismatch naming the node id if it does not fit."""
    parts = node_id.split("~")
    if len(parts) != 4:
        raise NodeMismatch(f"node id {node_id!r} is not <kind>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>")
    kind, ip, pod_ns, dns = parts
    if kind not in NODE_KINDS:
        raise NodeMismatch(f"node id {node_id!r}: kind {kind!r} is not one of {sorted(NODE_KINDS)}")
    pod, _, namespace = pod_ns.rpartition(".")
    dns_ns, sep, domain = dns.partition(".svc.")
    if not pod or not namespace or not ip or not sep or dns_ns != namespace or not domain:
        raise NodeMismatch(f"node id {node_id!r} is not <kind>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>")
    return NodeInfo(kind, ip, pod, namespace, domain)


def check_node(identity: ProxyIdentity, node_id: str, metadata: Mapping[str, Any]) -> NodeInfo:
    """Raise NodeMismatch unless ``node_id`` and the node metadata belong to ``identity`` (module docstring)."""
    info = parse_node_id(node_id)
    who = f"{identity.namespace}/{identity.service_account}"
    if identity.node_id is not None and node_id != identity.node_id:
        raise NodeMismatch(f"node {node_id!r}: the token was issued to node {identity.node_id!r} ({who})")
    if identity.pod is not None and info.pod != identity.pod:
        raise NodeMismatch(f"node {node_id!r} names pod {info.pod!r} but the token was minted for pod "
                           f"{identity.pod!r} ({who})")
    if identity.node_kinds is not None and info.kind not in identity.node_kinds:
        raise NodeMismatch(f"node {node_id!r} is a {info.kind!r} node, but the credential ({who}) may only open "
                           f"{sorted(identity.node_kinds)} nodes")
    kind = metadata.get(META_KIND)
    if kind is not None and kind != KIND_OF_NODE[info.kind]:
        raise NodeMismatch(f"node {node_id!r}: metadata {META_KIND}={kind!r} but the node id names a {info.kind!r} "
                           f"node ({KIND_OF_NODE[info.kind]!r})")
    if info.namespace != identity.namespace:
        raise NodeMismatch(f"node {node_id!r} is in namespace {info.namespace!r} but the credential is for {who}")
    claimed = metadata.get(META_SERVICE_ACCOUNT)
    if not claimed:
        # the generators read the service account from the node metadata: it must be there, and be the token's
        raise NodeMismatch(f"node {node_id!r} carries no {META_SERVICE_ACCOUNT} in its metadata")
    if claimed != identity.service_account:
        raise NodeMismatch(f"node {node_id!r} claims service account {claimed!r} but the credential is for {who}")
    for key, want in ((META_NAMESPACE, identity.namespace), (META_CLUSTER, identity.cluster)):
        value = metadata.get(key)
        if value is not None and value != want:
            raise NodeMismatch(f"node {node_id!r}: metadata {key}={value!r} but the credential is for {want!r} ({who})")
    return info


def bearer_token(metadata: Mapping[str, str]) -> str:
    """The token of an ``authorization: Bearer <token>`` header; raises AuthenticationError without one."""
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("no 'authorization: Bearer <token>' metadata on the xDS stream")
    return token.strip()


class Authenticator(Protocol):
    async def authenticate(self, *, metadata: Mapping[str, str]) -> ProxyIdentity:
        """The identity the stream's bearer token proves; raises AuthenticationError."""
        ...


def new_token() -> str:
    """A fresh bootstrap token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


TOKEN_FIELDS = ("namespace", "service_account", "cluster", "node_id")


def parse_token_table(data: Any, *, source: str) -> dict[str, ProxyIdentity]:
    """A local run's token table (``tokens.json``): ``{TOKEN: {"namespace", "service_account", "cluster",
    "node_id"}}``. Every entry is bound to the node id it was written for: an entry without one (or with a node
    id outside its namespace) is an error, so no token ever opens any node but its own. Raises ValueError naming
    ``source`` and the entry (by position and identity, never by the token itself)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected an object mapping tokens to identities, not {type(data).__name__}")
    out: dict[str, ProxyIdentity] = {}
    for position, (token, entry) in enumerate(data.items()):
        where = f"{source}: entry {position}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with {', '.join(TOKEN_FIELDS)}")
        for name in TOKEN_FIELDS:
            if not isinstance(entry.get(name), str) or not entry[name]:
                raise ValueError(f"{where}: field {name!r} is missing or not a non-empty string (every token is "
                                 "bound to the one node it was issued for)")
        unknown = sorted(set(entry) - set(TOKEN_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
        identity = ProxyIdentity(namespace=entry["namespace"], service_account=entry["service_account"],
                                 cluster=entry["cluster"], node_id=entry["node_id"])
        try:
            node = parse_node_id(identity.node_id or "")
        except NodeMismatch as exc:
            raise ValueError(f"{where} ({identity}): field 'node_id': {exc}") from exc
        if node.namespace != identity.namespace:
            raise ValueError(f"{where} ({identity}): field 'node_id' names namespace {node.namespace!r}")
        if len(token) < 16:
            raise ValueError(f"{where} ({identity}): the token is shorter than 16 characters")
        out[token] = identity
    return out


class TokenTableAuthenticator:
    """Per-workload bootstrap tokens for local runs. Only digests are kept; lookups compare every entry in
    constant time, so neither timing nor an early exit reveals which tokens exist."""

    def __init__(self, tokens: Mapping[str, ProxyIdentity] | None = None) -> None:
        self._table: list[tuple[bytes, ProxyIdentity]] = []
        self._revoked: list[Callable[[frozenset[ProxyIdentity]], None]] = []
        self.reset(tokens or {})

    def on_revoke(self, listener: Callable[[frozenset[ProxyIdentity]], None]) -> None:
        """Call ``listener(identities)`` when a reset leaves ``identities`` without any token: the ADS server
        closes the streams they opened (a revoked workload keeps nothing it was served, and gets nothing new)."""
        self._revoked.append(listener)

    @staticmethod
    def _entry(token: str, identity: ProxyIdentity) -> tuple[bytes, ProxyIdentity]:
        if len(token) < 16:
            raise ValueError(f"bootstrap token for {identity} is shorter than 16 characters")
        return hashlib.sha256(token.encode()).digest(), identity

    def add(self, token: str, identity: ProxyIdentity) -> None:
        self._table.append(self._entry(token, identity))

    def reset(self, tokens: Mapping[str, ProxyIdentity]) -> None:
        """Replace the whole table: a token no longer listed stops working at once (a stream it opened before
        is closed by the ADS server, see ``on_revoke``). Raises ValueError naming the identity of a bad entry, and
        then changes nothing."""
        table = [self._entry(token, identity) for token, identity in tokens.items()]
        kept = {binding(i) for _, i in table}
        gone = frozenset(i for _, i in self._table if binding(i) not in kept)
        self._table = table
        if gone:
            for listener in self._revoked:
                listener(gone)

    def __len__(self) -> int:
        return len(self._table)

    def issue(self, identity: ProxyIdentity) -> str:
        """Make, remember and return a new token for ``identity``."""
        token = new_token()
        self.add(token, identity)
        return token

    async def authenticate(self, *, metadata: Mapping[str, str]) -> ProxyIdentity:
        digest = hashlib.sha256(bearer_token(metadata).encode()).digest()
        found: ProxyIdentity | None = None
        for known, identity in self._table:
            if hmac.compare_digest(known, digest):
                found = identity
        if found is None:
            raise AuthenticationError("unknown bootstrap token")
        return found


class TokenReviewAuthenticator:
    """Kubernetes service-account tokens checked with a TokenReview against the API server.

    ``api_url`` is the API server (``https://...``); ``credential`` is this control plane's own bearer token (its
    service account needs ``create`` on ``tokenreviews``), or a function returning the current one (kubelet
    rotates a pod's projected token, so in a cluster it is re-read for each review); ``audience`` is the audience
    the projected tokens are minted for (e.g. ``meshfed``); ``cluster`` is the cluster name put into identities.
    A successful review is remembered for ``cache_seconds`` (keyed by the token's digest), so a burst of
    reconnecting proxies does not become a burst of TokenReviews; refusals are never cached.
    """

    def __init__(self, *, api_url: str, credential: str | Callable[[], str], audience: str, cluster: str,
                 ssl_context: ssl.SSLContext | bool | None = None, timeout: float = 5.0,
                 cache_seconds: float = 30.0) -> None:
        self._cache: dict[bytes, tuple[ProxyIdentity, float]] = {}
        self._cache_seconds = cache_seconds
        self._url = api_url.rstrip("/") + "/apis/authentication.k8s.io/v1/tokenreviews"
        self._credential = credential
        self._audience = audience
        self._cluster = cluster
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def authenticate(self, *, metadata: Mapping[str, str]) -> ProxyIdentity:
        token = bearer_token(metadata)
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        identity = await self._review(token)
        if self._cache_seconds > 0:
            if len(self._cache) > 10_000:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            self._cache[digest] = (identity, now + self._cache_seconds)
        return identity

    async def _review(self, token: str) -> ProxyIdentity:
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                  "spec": {"token": token, "audiences": [self._audience]}}
        credential = self._credential() if callable(self._credential) else self._credential
        headers = {"Authorization": f"Bearer {credential}", "Content-Type": "application/json",
                   "Accept": "application/json"}
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as session, session.post(
                    self._url, data=json.dumps(review), headers=headers,
                    ssl=self._ssl if self._ssl is not None else True) as resp:
                text = await resp.text()
                if resp.status >= 300:
                    raise AuthenticationError(f"TokenReview POST {self._url} answered {resp.status}: {text[:200]}")
                body = json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AuthenticationError(f"TokenReview POST {self._url} failed: {exc}") from exc
        status = body.get("status") or {}
        if not status.get("authenticated"):
            raise AuthenticationError(f"TokenReview refused the token: {status.get('error') or 'not authenticated'}")
        audiences = status.get("audiences")
        if audiences is not None and self._audience not in audiences:
            raise AuthenticationError(f"token audiences {audiences} do not include {self._audience!r}")
        username = str((status.get("user") or {}).get("username", ""))
        parts = username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not parts[2] or not parts[3]:
            raise AuthenticationError(f"token user {username!r} is not a service account")
        # A projected token bound to a pod names it (kube-apiserver adds it to the review's user.extra): the stream
        # is then bound to that pod as well, so another pod of the same service account cannot use the token.
        extra = (status.get("user") or {}).get("extra") or {}
        pods = extra.get("authentication.kubernetes.io/pod-name") if isinstance(extra, dict) else None
        pod = str(pods[0]) if isinstance(pods, list) and len(pods) == 1 and pods[0] else None
        return ProxyIdentity(namespace=parts[2], service_account=parts[3], cluster=self._cluster, pod=pod)
