"""One cluster's control plane: discovery -> registry -> (federation agent, DNS, xDS) in one process.

The composition::

    manifest source (or Kubernetes source) --local shard--> registry <--remote shards-- federation agent
                                                               |
                          +------------------------------------+----------------------+
                          v                                    v                      v
                 DNS (clusterset.local)          push debouncer -> generators -> snapshot cache -> ADS
                                                               ^
                                         SDS: workload certificates signed by this cluster's intermediate

Watchers never call the servers: each change replaces the registry value and submits a mergeable push request;
the debouncer regenerates the snapshots of connected proxies, and the cache sends only what changed. The admin
endpoint (``/healthz``, ``/readyz``, ``/status``, ``/metrics``) is how ``meshfed status`` and ``diagnose`` see it.

Local runs (``meshfed up``) add two files the runner writes: ``tokens.json`` (per-workload bootstrap tokens, 0600)
and ``runtime.json`` (the loopback ports the runner picked for each endpoint address, replacing the manifests'
placeholder ports).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from cryptography import x509

from discovery.authz import AuthorizationPolicy
from discovery.clusterset import ClusterSet
from discovery.dns.server import DnsServer
from discovery.kube import KubeSource, Source, load_api_client
from discovery.manifests import ClusterSnapshot, LoadResult, ManifestSource
from discovery.mcs import VALID, derive
from discovery.model import (
    ClusterId,
    ClusterInfo,
    Condition,
    ConditionStatus,
    Endpoint,
    Registry,
    Service,
    ServiceExport,
    ServiceKey,
)
from discovery.policy import TrafficPolicies
from federation.agent import AgentConfig, FederationAgent
from federation.catalog import Catalog
from federation.client import FederationClient
from federation.trust.ca import issue_workload
from federation.trust.errors import TrustError
from federation.trust.spiffe import SpiffeId
from federation.trust.store import load_bundle, load_cluster_ca
from federation.trust.tls import client_ssl_context
from gateway.ads import AdsServer
from gateway.auth import (
    Authenticator,
    ProxyIdentity,
    TokenReviewAuthenticator,
    TokenTableAuthenticator,
    parse_token_table,
)
from gateway.cache import SnapshotCache
from gateway.context import ProxyInfo, ProxyInfoError, PushContext
from gateway.peerauth import PeerCertificateAuthenticator
from gateway.pipeline import PushPipeline
from gateway.push import ConfigKey, Kind, PushDebouncer, PushRequest
from gateway.sds import WorkloadCertIssuer, bundle_pem, identities_of
from meshfed import rotation, telemetry, xdstls
from meshfed.certfiles import CertFiles

log = logging.getLogger("meshfed.controlplane")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, what: str) -> Listen:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{what} {text!r}: expected HOST:PORT")
        return cls(host=host.strip("[]") or "127.0.0.1", port=int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    clusterset: ClusterSet
    cluster: ClusterId
    ca_dir: Path
    federation_urls: tuple[str, ...]
    xds: Listen
    dns: Listen
    admin: Listen
    gateway_host: str
    gateway_port: int
    tokens_file: Path | None = None
    runtime_file: Path | None = None
    debounce_quiet_s: float = 0.1
    debounce_max_s: float = 1.0
    manifest_poll_s: float = 0.5
    workload_cert_ttl: timedelta = timedelta(hours=24)
    # Where the cluster's objects come from: "manifests" (clusters/<set>/<cluster>/*.yaml) or "kubernetes".
    source: str = "manifests"
    kubeconfig: Path | None = None
    kube_context: str | None = None
    in_cluster: bool = False
    # How xDS clients authenticate: "tokens" (per-workload bootstrap tokens) or "tokenreview" (projected
    # service-account tokens checked with the Kubernetes TokenReview API).
    xds_auth: str = "tokens"
    token_audience: str = "meshfed"
    first_sync_timeout_s: float = 60.0
    # How often the CA directory is checked for a new intermediate or bundle (root rotation).
    trust_poll_s: float = 2.0
    # A second ADS listener over mutual TLS for proxyless gRPC workloads, which authenticate with their workload
    # certificate instead of a token (gateway.peerauth, docs/proxyless-grpc.md). None: not served.
    xds_mtls: Listen | None = None
    # Names (IPs or DNS) the mTLS listener's certificate is valid for; the listen host when empty.
    xds_mtls_hosts: tuple[str, ...] = ()
    # certfiles.json: directories of file-based workload certificates (proxyless gRPC) this control plane keeps
    # current, as a node agent would (meshfed.certfiles). None: none.
    cert_files: Path | None = None


@dataclass(frozen=True, slots=True)
class EndpointOverride:
    """What a local run's ``runtime.json`` says of one endpoint address."""

    ports: tuple[tuple[str, int], ...]
    service_account: str = ""
    # False when the runner stopped the workload: its endpoint leaves the ready set, as a deleted pod leaves its
    # EndpointSlice in Kubernetes. None keeps what the manifests say.
    ready: bool | None = None


def load_runtime(path: Path | None) -> dict[str, EndpointOverride]:
    """``runtime.json``: ``{"endpoints": {"127.0.2.10": {"ports": {"http": 40123}, "service_account": "x"}}}``."""
    if path is None or not path.exists():
        return {}
    data = json.loads(path.read_text())
    out: dict[str, EndpointOverride] = {}
    for address, entry in data.get("endpoints", {}).items():
        ports = tuple(sorted((str(k), int(v)) for k, v in entry.get("ports", {}).items()))
        ready = entry.get("ready")
        out[address] = EndpointOverride(ports=ports, service_account=str(entry.get("service_account", "")),
                                        ready=None if ready is None else bool(ready))
    return out


def apply_runtime(services: Mapping[Any, Service], runtime: Mapping[str, EndpointOverride]) -> list[Service]:
    """The services with each endpoint's ports (and service account) replaced from the local run's overrides."""
    if not runtime:
        return list(services.values())
    out: list[Service] = []
    for svc in services.values():
        endpoints: list[Endpoint] = []
        for ep in svc.endpoints:
            ov = runtime.get(ep.address)
            if ov is not None:
                ep = replace(ep, ports=ov.ports or ep.ports, service_account=ov.service_account or ep.service_account)
                if ov.ready is not None:
                    ep = replace(ep, ready=ov.ready, serving=ov.ready)
            endpoints.append(ep)
        out.append(replace(svc, endpoints=tuple(endpoints)))
    return out


def with_export_conditions(registry: Registry, catalog: Catalog, *,
                           unsupported: Mapping[ServiceKey, str] | None = None) -> Registry:
    """``registry`` with the local exports' MCS conditions (Valid, Ready, Conflict) as the federation computed them
    centrally, so every cluster reports the same conflict resolution. An export the federation has no conditions
    for because it is not valid here (no such Service: ``Valid=False, NoService``; an ExternalName Service, named
    in ``unsupported``: ``InvalidServiceType``) gets them from the same MCS rules applied to this cluster alone:
    such an export is never published, so only this cluster can say why."""
    local = registry.local
    exports = registry.exports.get(local, {})
    central: dict[ServiceKey, tuple[Condition, ...]] = {}
    missing: list[ServiceExport] = []
    for key, export in exports.items():
        entry = catalog.services.get(key)
        conditions = tuple(c for cid, c in entry.conditions if cid == local) if entry is not None else ()
        if conditions:
            central[key] = conditions
        else:
            missing.append(export)
    if missing:
        alone = derive({local: {s.key: s for s in registry.services(local)}}, missing,
                       unsupported={local: dict(unsupported or {})})
        for export in alone.exports_with_conditions(missing):
            if any(c.type == VALID and c.status is ConditionStatus.FALSE for c in export.conditions):
                central[export.key] = export.conditions
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


def derive_local(registry: Registry, snap: ClusterSnapshot, *, cidr: str) -> Registry:
    """Without a federation, the clusterset is this cluster alone: derive imports and export conditions locally
    with the same MCS rules the federation applies centrally."""
    local = registry.local
    result = derive({local: {s.key: s for s in registry.services(local)}}, snap.exports.values(), cidr=cidr,
                    unsupported={local: snap.unsupported})
    exports = result.exports_with_conditions(snap.exports.values())
    registry = registry.with_shard(local, registry.services(local), exports)
    return registry.with_catalog(clusters=registry.clusters, imports=result.imports)


#: What a push for a change of only this reason concerns (the others: everything).
_REASON_CONFIGS: Mapping[str, frozenset[ConfigKey]] = {"trust": frozenset({ConfigKey(Kind.TRUST)})}

LEAF_TTL = timedelta(hours=24)
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def _renew_at(ttl: timedelta) -> datetime:
    """When a leaf issued now with ``ttl`` is renewed: at two thirds of its lifetime."""
    return datetime.now(UTC) + ttl * 2 / 3


def load_tokens(path: Path | None) -> dict[str, ProxyIdentity]:
    """``tokens.json``: ``{TOKEN: {"namespace": ..., "service_account": ..., "cluster": ..., "node_id": ...}}``
    (0600). ``node_id`` binds the token to the one proxy it was written for (gateway.auth.check_node); an entry
    without one is an error (gateway.auth.parse_token_table), as is a file that is not JSON."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from exc
    return parse_token_table(data, source=str(path))


@dataclass
class _ReloadingTokens(TokenTableAuthenticator):
    """The token table, re-read when ``tokens.json`` changes (the runner adds workloads while we run). Each read
    replaces the whole table, so a token removed from the file stops working; a file that cannot be read keeps
    the previous table (and is logged), except at start, where it is an error."""

    path: Path | None = None
    stamp: tuple[int, int, int] = (0, 0, 0)  # (inode, size, mtime ns): the runner replaces the file atomically

    def __post_init__(self) -> None:
        super().__init__({})
        if self.path is not None and self.path.exists():
            self.stamp = self._stamp(self.path)
            self.reset(load_tokens(self.path))

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            stamp = self._stamp(self.path)
        except FileNotFoundError:
            return
        if stamp == self.stamp:
            return
        self.stamp = stamp
        try:
            self.reset(load_tokens(self.path))
        except (OSError, ValueError) as exc:
            log.error("xds token table not reloaded, keeping the previous one: %s", exc)

    async def authenticate(self, *, metadata: Mapping[str, str]) -> ProxyIdentity:
        self.reload()
        return await super().authenticate(metadata=metadata)


@dataclass
class ControlPlane:
    """One cluster's control plane (an async context manager); see the module docstring."""

    config: ControlPlaneConfig
    registry: Registry = field(init=False)
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    proxies: dict[str, ProxyInfo] = field(default_factory=dict)
    proxy_errors: dict[str, str] = field(default_factory=dict)
    manifest_problems: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    metrics: telemetry.ControlPlaneMetrics = field(default_factory=telemetry.ControlPlaneMetrics)
    _stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    _local: ClusterSnapshot | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _dns_dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _generation_failed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        cfg = self.config
        info = self.info
        self.registry = Registry(local=cfg.cluster).with_catalog(clusters={info.id: info}, imports={})
        self.ca = load_cluster_ca(cfg.ca_dir)
        self.bundle = load_bundle(cfg.ca_dir)
        self.trust_domain = str(self.bundle.trust_domain)
        if cfg.source not in ("manifests", "kubernetes"):
            raise ValueError(f"source {cfg.source!r} is not 'manifests' or 'kubernetes'")
        if cfg.xds_auth not in ("tokens", "tokenreview"):
            raise ValueError(f"xds auth {cfg.xds_auth!r} is not 'tokens' or 'tokenreview'")
        self.auth: Authenticator = _ReloadingTokens(path=cfg.tokens_file)
        self.issuer = WorkloadCertIssuer(ca=self.ca, ttl=cfg.workload_cert_ttl, on_rotate=self._rotated)
        self.manifests = ManifestSource.for_cluster(cfg.clusterset, cfg.cluster)
        self._first_local = asyncio.Event()
        self.ads: AdsServer | None = None
        self.ads_mtls: AdsServer | None = None
        self._mtls_creds: xdstls.RotatingServerCredentials | None = None
        self._mtls_renew_at = datetime.max.replace(tzinfo=UTC)
        self._fed_ctx: ssl.SSLContext | None = None
        self._fed_client: FederationClient | None = None
        self._fed_renew_at = datetime.max.replace(tzinfo=UTC)
        self.metrics_ca_reloads = 0
        self.cert_files = CertFiles(cfg.cert_files)
        self.cert_files = CertFiles(cfg.cert_files)
        self.fed_client_chain = b""  # the certificates the control plane itself presents (rotation reports them)
        self.mtls_serving_chain = b""
        self.dns: DnsServer | None = None
        self.pushes: PushDebouncer | None = None
        self.pipeline = PushPipeline(cache=self.cache)
        self.agent: FederationAgent | None = None
        self.admin_port = 0

    @property
    def info(self) -> ClusterInfo:
        base = self.config.clusterset.cluster(self.config.cluster)
        return replace(base, gateway_host=self.config.gateway_host, gateway_port=self.config.gateway_port)

    # ---- lifecycle --------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        cfg = self.config
        stack = self._stack
        await stack.__aenter__()
        try:
            source = await self._open_source(stack)
            self._tasks.append(asyncio.create_task(self._watch_local(source), name="local-source"))
            try:
                await asyncio.wait_for(self._first_local.wait(), cfg.first_sync_timeout_s)
            except TimeoutError as exc:
                raise RuntimeError(f"no first snapshot from the {cfg.source} source in "
                                   f"{cfg.first_sync_timeout_s:.0f}s") from exc
            self.dns = await stack.enter_async_context(DnsServer(host=cfg.dns.host, port=cfg.dns.port,
                                                                  registry=self.registry))
            self.pushes = await stack.enter_async_context(PushDebouncer(
                regenerate=self._regenerate, quiet=cfg.debounce_quiet_s, max_delay=cfg.debounce_max_s))
            self.cache.on_connect(self._on_connect)
            self.ads = await stack.enter_async_context(AdsServer(cache=self.cache, authenticator=self.auth,
                                                                  host=cfg.xds.host, port=cfg.xds.port))
            if cfg.xds_mtls is not None:
                self.ads_mtls = await stack.enter_async_context(self._mtls_ads(cfg.xds_mtls))
            await stack.enter_async_context(self.issuer)
            if cfg.federation_urls:
                chain, key_pem = self._federation_identity()
                self._fed_ctx = client_ssl_context(chain, key_pem, self.bundle)
                client = await stack.enter_async_context(FederationClient(
                    list(cfg.federation_urls), ssl_context=self._fed_ctx, cluster=cfg.cluster, bundle=self.bundle))
                self._fed_client = client
                # The clusterset's heartbeat interval; the agent shortens it to a third of the lease the service
                # actually grants, which may be shorter than the clusterset's (``meshfed up --lease-ttl 3``).
                agent_cfg = AgentConfig(heartbeat_interval_s=cfg.clusterset.federation.heartbeat_interval)
                self.agent = await stack.enter_async_context(FederationAgent(
                    client, info=self.info, config=agent_cfg, on_update=self._on_catalog))
                self._publish()
            await self._start_admin(stack)
            self._tasks.append(asyncio.create_task(self._dns_loop(), name="dns-update"))
            self._tasks.append(asyncio.create_task(self._trust_loop(), name="trust"))
            await self.dns.update(self.registry)
            self._ready.set()
            log.info("control plane ready cluster=%s xds=%s:%d dns=%s:%d admin=%s:%d", cfg.cluster, cfg.xds.host,
                     self.ads.port, cfg.dns.host, self.dns.port, cfg.admin.host, self.admin_port)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._stack.aclose()

    def _mtls_ads(self, listen: Listen) -> AdsServer:
        """The certificate-authenticated ADS listener (same cache, same generators) for proxyless gRPC."""
        sid = SpiffeId.workload(self.bundle.trust_domain, "meshfed-system", "meshfed-controlplane")
        hosts = self.config.xds_mtls_hosts or (listen.host,)
        key_pem, chain_pem = xdstls.serving_certificate(self.ca, sid, hosts, ttl=LEAF_TTL)
        self._mtls_creds = xdstls.RotatingServerCredentials(key_pem, chain_pem, bundle_pem(self.bundle).encode())
        self._mtls_renew_at = _renew_at(LEAF_TTL)
        self.mtls_serving_chain = chain_pem
        auth = PeerCertificateAuthenticator(trust_domain=self.trust_domain, cluster=str(self.config.cluster))
        return AdsServer(cache=self.cache, authenticator=auth, host=listen.host, port=listen.port,
                         server_credentials=self._mtls_creds.credentials)

    def _renew_mtls_serving_cert(self) -> None:
        if self._mtls_creds is None or self.config.xds_mtls is None:
            return
        sid = SpiffeId.workload(self.bundle.trust_domain, "meshfed-system", "meshfed-controlplane")
        hosts = self.config.xds_mtls_hosts or (self.config.xds_mtls.host,)
        key_pem, chain_pem = xdstls.serving_certificate(self.ca, sid, hosts, ttl=LEAF_TTL)
        self._mtls_creds.rotate(key_pem, chain_pem, bundle_pem(self.bundle).encode())
        self._mtls_renew_at = _renew_at(LEAF_TTL)
        self.mtls_serving_chain = chain_pem

    # ---- credentials: the CA directory is re-read on change, leaves renewed before they expire ----------------

    @property
    def federation_client(self) -> FederationClient | None:
        return self._fed_client

    def _federation_identity(self) -> tuple[bytes, bytes]:
        sid = SpiffeId.cluster(self.bundle.trust_domain, self.config.cluster)
        key_pem, chain = issue_workload(self.ca, sid, ttl=LEAF_TTL)
        self._fed_renew_at = _renew_at(LEAF_TTL)
        self.fed_client_chain = b"".join(chain)
        return self.fed_client_chain, key_pem

    def _ca_signature(self) -> tuple[tuple[str, float, int], ...]:
        out = []
        for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"):
            try:
                st = (self.config.ca_dir / name).stat()
                out.append((name, st.st_mtime, st.st_size))
            except OSError:
                out.append((name, 0.0, 0))
        return tuple(out)

    async def _trust_loop(self) -> None:
        """Pick up a new intermediate or trust bundle (``meshfed ca rotate ...``) without a restart, and renew the
        control plane's own leaves (federation client, mTLS xDS serving) at two thirds of their lifetime."""
        last = self._ca_signature()
        while True:
            await asyncio.sleep(self.config.trust_poll_s)
            changed = False
            sig = self._ca_signature()
            if sig != last:
                try:
                    ca = await asyncio.to_thread(load_cluster_ca, self.config.ca_dir)
                    bundle = await asyncio.to_thread(load_bundle, self.config.ca_dir)
                except TrustError as exc:
                    # Caught half-written, or broken: retried on the next tick until it loads.
                    log.error("CA reload failed dir=%s error=%s; keeping the CA in force", self.config.ca_dir, exc)
                else:
                    last = sig
                    changed = ca.fingerprint != self.ca.fingerprint or bundle.fingerprints != self.bundle.fingerprints
                    self.ca, self.bundle = ca, bundle
            now = datetime.now(UTC)
            try:
                if self._fed_ctx is not None and (changed or now >= self._fed_renew_at):
                    # A fresh context (not the old one reloaded): it trusts exactly the new bundle, so a retired
                    # root is gone; the client moves its calls and its watch onto it and closes the pooled
                    # connections that authenticated with the previous certificate.
                    chain, key = self._federation_identity()
                    self._fed_ctx = client_ssl_context(chain, key, self.bundle)
                    if self._fed_client is not None:
                        self._fed_client.set_credentials(self._fed_ctx, self.bundle)
                    log.info("federation client certificate renewed cluster=%s", self.config.cluster)
                if self._mtls_creds is not None and (changed or now >= self._mtls_renew_at):
                    self._renew_mtls_serving_cert()
                    log.info("mTLS xDS serving certificate renewed cluster=%s", self.config.cluster)
                if changed:
                    rotated = self.issuer.reissue_all(ca=self.ca)
                    self.metrics_ca_reloads += 1
                    log.info("CA reloaded cluster=%s intermediate=%s roots=%s workload_certs_reissued=%d",
                             self.config.cluster, self.ca.fingerprint, ",".join(self.bundle.fingerprints),
                             len(rotated))
                    self._changed("trust")
                # File-based workload certificates (proxyless gRPC): rewritten when stale for this CA and bundle.
                await asyncio.to_thread(self.cert_files.refresh, self.ca, self.bundle)
            except TrustError as exc:
                log.error("certificate renewal failed cluster=%s error=%s; retrying", self.config.cluster, exc)

    # ---- watchers: each replaces the registry and submits a push ---------------------------------------------

    def _take_local(self, result: LoadResult) -> frozenset[ConfigKey]:
        """Take the cluster's own objects; returns what changed for the push pipeline (the local shard always,
        which the pipeline compares key by key; policies and imports when they moved)."""
        before, old_extras = self.registry, self._local.extras if self._local is not None else ()
        self.manifest_problems = [
            {"file": p.file, "document": p.document, "field": p.field, "message": p.message, "severity": p.severity}
            for p in result.problems
        ]
        for p in result.errors:
            log.error("manifest error file=%s document=%d field=%s message=%s (last good state kept)", p.file,
                      p.document, p.field, p.message)
        snap = result.snapshot
        self._local = snap
        for problem in TrafficPolicies.of(snap.extras).problems:  # conflicts, routes to undefined subsets
            log.warning("traffic policy problem cluster=%s %s", self.config.cluster, problem)
            self.manifest_problems.append({"file": "", "document": 0, "field": "", "message": problem,
                                           "severity": "warning"})
        services = apply_runtime(snap.services, load_runtime(self.config.runtime_file))
        self.registry = self.registry.with_shard(self.config.cluster, services, snap.exports.values())
        if self.agent is not None and self.agent.catalog is not None:
            self.registry = with_export_conditions(self.registry, self.agent.catalog,
                                                   unsupported=snap.unsupported)
        elif not self.config.federation_urls:
            self.registry = derive_local(self.registry, snap, cidr=self.config.clusterset.cidr)
        configs = {ConfigKey.shard(self.config.cluster)}
        if before.imports is not self.registry.imports or before.clusters is not self.registry.clusters:
            configs.add(ConfigKey(Kind.CATALOG))
        if old_extras != snap.extras:
            def authz(extras: tuple[Any, ...]) -> list[Any]:
                return [o for o in extras if isinstance(o, AuthorizationPolicy)]

            def others(extras: tuple[Any, ...]) -> list[Any]:
                return [o for o in extras if not isinstance(o, AuthorizationPolicy)]

            if authz(old_extras) != authz(snap.extras):
                configs.add(ConfigKey(Kind.AUTHZ))
            if others(old_extras) != others(snap.extras):
                configs.add(ConfigKey(Kind.POLICY))
        return frozenset(configs)

    def _publish(self) -> None:
        if self.agent is None or self._local is None:
            return
        self.agent.publish(self.registry.services(self.config.cluster),
                           self.registry.exports.get(self.config.cluster, {}).values())

    async def _open_source(self, stack: AsyncExitStack) -> Source:
        cfg = self.config
        if cfg.source == "manifests":
            return self.manifests
        api = await asyncio.to_thread(load_api_client, kubeconfig=cfg.kubeconfig, context=cfg.kube_context,
                                      in_cluster=cfg.in_cluster)
        stack.callback(api.close)
        if cfg.xds_auth == "tokenreview":
            conf = api.configuration
            def credential() -> str:
                """The current bearer token: in a pod, the projected token file kubelet keeps rotating."""
                if cfg.in_cluster and SERVICE_ACCOUNT_TOKEN.exists():
                    return SERVICE_ACCOUNT_TOKEN.read_text().strip()
                auth = conf.auth_settings().get("BearerToken", {})
                return str(auth.get("value", "")).removeprefix("Bearer ").strip()

            ssl_ctx: ssl.SSLContext | bool = False
            if conf.verify_ssl and conf.ssl_ca_cert:
                ssl_ctx = ssl.create_default_context(cafile=conf.ssl_ca_cert)
            elif conf.verify_ssl:
                ssl_ctx = True
            self.auth = TokenReviewAuthenticator(api_url=conf.host, credential=credential,
                                                 audience=cfg.token_audience, cluster=str(cfg.cluster),
                                                 ssl_context=ssl_ctx)
        return await stack.enter_async_context(KubeSource(api=api, cluster=cfg.cluster))

    async def _watch_local(self, source: Source) -> None:
        """Follow the cluster's own objects: each accepted change replaces the local shard and is published."""
        last = ""
        runtime_mtime = -1.0
        stream = (self.manifests.watch(interval=self.config.manifest_poll_s) if source is self.manifests
                  else source.watch())
        async for result in stream:
            mtime = self._runtime_mtime()
            if result.snapshot.version == last and mtime == runtime_mtime and not result.errors:
                continue
            last, runtime_mtime = result.snapshot.version, mtime
            configs = self._take_local(result)
            self._publish()
            self._changed(self.config.source, configs)
            self._first_local.set()

    def _runtime_mtime(self) -> float:
        path = self.config.runtime_file
        try:
            return path.stat().st_mtime if path is not None else 0.0
        except OSError:
            return 0.0

    async def _on_catalog(self, catalog: Catalog) -> None:
        """The federation's catalog moved: take the shards that changed (O(1) per shard here: the agent shares
        the unchanged ones) and say which for the pipeline, which compares them key by key off the loop."""
        assert self.agent is not None
        before = self.registry
        self.registry = after = with_export_conditions(
            self.agent.apply(before), catalog, unsupported=self._local.unsupported if self._local else None)
        self.metrics.mark_update()
        configs = {ConfigKey.shard(c) for c in set(before.remote) | set(after.remote)
                   if before.remote.get(c) is not after.remote.get(c)}
        if before.imports is not after.imports or before.clusters is not after.clusters:
            configs.add(ConfigKey(Kind.CATALOG))
        local = self.config.cluster
        if before.exports.get(local) is not after.exports.get(local) or before.shards.get(local) is not \
                after.shards.get(local):
            configs.add(ConfigKey.shard(local))
        self._changed("catalog", frozenset(configs))

    def _changed(self, reason: str, configs: frozenset[ConfigKey] | None = None) -> None:
        """Submit a push for what changed (``configs``; without them, what ``reason`` implies, or everything)."""
        if configs is None:
            configs = _REASON_CONFIGS.get(reason)
        if self.pushes is not None:
            if configs is None:
                self.pushes.submit(PushRequest(full=True, reasons=frozenset({reason})))
            elif configs:
                self.pushes.submit(PushRequest(configs=configs, reasons=frozenset({reason})))
        self._dns_dirty.set()

    async def _dns_loop(self) -> None:
        """Rebuild the DNS table off the hot path after changes (latest registry wins; bursts coalesce)."""
        while True:
            await self._dns_dirty.wait()
            self._dns_dirty.clear()
            if self.dns is not None:
                await self.dns.update(self.registry)

    def _rotated(self, identities: frozenset[ProxyIdentity]) -> None:
        nodes = identities_of(self.cache.connected(), self.cache.identity, identities)
        if self.pushes is not None and nodes:
            self.pushes.submit(PushRequest(proxies=nodes, configs=frozenset({ConfigKey(Kind.CERTS)}),
                                           reasons=frozenset({"cert-rotation"})))

    def _on_connect(self, node_id: str) -> None:
        if self.pushes is not None:
            self.pushes.submit(PushRequest(proxies=frozenset({node_id}), reasons=frozenset({"connect"})))

    # ---- generation --------------------------------------------------------------------------------------------

    def push_context(self) -> PushContext:
        # Traffic policies are this cluster's own (its manifests' VirtualServices and DestinationRules).
        policies = TrafficPolicies.of(self._local.extras if self._local is not None else ())
        # So are AuthorizationPolicies: each cluster's sidecars enforce the policies of their own cluster.
        authz = tuple(o for o in (self._local.extras if self._local is not None else ())
                      if isinstance(o, AuthorizationPolicy))
        return PushContext(registry=self.registry, trust_domain=self.trust_domain,
                           trust_bundle_pem=bundle_pem(self.bundle), workload_certs=self.issuer.certs(),
                           policies=policies, authz=authz)

    def _proxy(self, node_id: str) -> ProxyInfo | None:
        """What a connected node is: its node metadata (fixed by its first stream, gateway.cache), with the
        namespace, service account and cluster of the identity that stream authenticated as, so its certificate
        and policies are always the authenticated identity's (gateway.auth)."""
        metadata = self.cache.node_metadata(node_id)
        if metadata is None:
            return self.proxies.get(node_id)
        identity = self.cache.identity(node_id)
        try:
            proxy = ProxyInfo.from_node(node_id, metadata) if identity is None else ProxyInfo.from_node(
                node_id, metadata, namespace=identity.namespace, service_account=identity.service_account,
                cluster=identity.cluster)
        except ProxyInfoError as exc:
            self.proxy_errors[node_id] = str(exc)
            # What the node was before (another identity, other metadata) must not be built for it again.
            self.proxies.pop(node_id, None)
            log.warning("proxy metadata rejected node=%s error=%s", node_id, exc)
            return None
        self.proxy_errors.pop(node_id, None)
        self.proxies[node_id] = proxy
        return proxy

    async def _regenerate(self, request: PushRequest) -> None:
        """The debouncer's callback: hand the merged request to the push pipeline (gateway.pipeline), which
        rebuilds what it concerns for every connected proxy on a worker thread."""
        started = time.perf_counter()
        connected = self.cache.connected()
        renew = connected if request.full else sorted(request.proxies)
        for node_id in renew:
            identity = self.cache.identity(node_id)
            if identity is not None:
                self.issuer.ensure(identity)
        proxies: dict[str, ProxyInfo] = {}
        for node_id in connected:
            # Node metadata is read when a node (re)connects (its id is then in ``request.proxies``).
            known = self.proxies.get(node_id)
            proxy = known if known is not None and not request.full and node_id not in request.proxies \
                else self._proxy(node_id)
            if proxy is not None:
                proxies[node_id] = proxy
        result = await self.pipeline.push(request, self.push_context(), proxies)
        for node_id in self._generation_failed - set(result.errors):
            if self.proxy_errors.get(node_id, "").startswith("generation failed"):
                del self.proxy_errors[node_id]
        self.proxy_errors.update(result.errors)
        self._generation_failed = set(result.errors)
        self.metrics.pushes.inc(len(result.changed))
        self.metrics.push_seconds.observe(time.perf_counter() - started)
        log.info("push reasons=%s proxies=%d changed=%d took=%.3fs", ",".join(sorted(request.reasons)),
                 len(proxies), len(result.changed), result.seconds)

    # ---- admin: health, status, metrics -------------------------------------------------------------------------

    async def _start_admin(self, stack: AsyncExitStack) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, self.config.admin.host, self.config.admin.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.admin_port = int(sockets[0].getsockname()[1]) if sockets else self.config.admin.port

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self._ready.is_set()
        federated = self.agent is None or self.agent.catalog is not None
        ok = ready and federated
        return web.json_response({"ready": ok, "federation_synced": federated}, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.refresh(self)
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status(), dumps=lambda v: json.dumps(v, default=str))

    def status(self) -> dict[str, Any]:
        """Everything ``meshfed status`` and ``diagnose`` need from this control plane, JSON-shaped."""
        return status_of(self)


def _expiry(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return cert.not_valid_after_utc.isoformat()


def _issued(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return cert.not_valid_before_utc.isoformat()


def status_of(cp: ControlPlane) -> dict[str, Any]:
    reg = cp.registry
    local = cp.config.cluster
    exports = reg.exports.get(local, {})
    services = []
    for svc in reg.services(local):
        export = exports.get(svc.key)
        services.append({
            "service": str(svc.key),
            "type": str(svc.type),
            "ports": [{"name": p.name, "port": p.port, "protocol": str(p.protocol)} for p in svc.ports],
            "endpoints": len(svc.endpoints),
            "ready": len(svc.ready_endpoints),
            "exported": export is not None,
            "conditions": [{"type": c.type, "status": str(c.status), "reason": c.reason, "message": c.message}
                           for c in (export.conditions if export else ())],
        })
    # An export without a Service here (Valid=False, NoService) still has a row, so status can say why.
    local_keys = {svc.key for svc in reg.services(local)}
    for key, export in sorted(exports.items()):
        if key not in local_keys:
            services.append({
                "service": str(key), "type": "", "ports": [], "endpoints": 0, "ready": 0, "exported": True,
                "conditions": [{"type": c.type, "status": str(c.status), "reason": c.reason, "message": c.message}
                               for c in export.conditions],
            })
    imports = []
    for key, imp in sorted(reg.imports.items()):
        ready_by_cluster: dict[str, int] = {str(c): shard[key].ready for c, shard in reg.remote.items() if key in shard}
        local_svc = reg.service(local, key)
        if local_svc is not None:
            ready_by_cluster[str(local)] = len(local_svc.ready_endpoints)
        imports.append({
            "service": str(key), "type": str(imp.type), "ips": list(imp.ips),
            "clusters": [str(c) for c in imp.clusters],
            "ports": [{"name": p.name, "port": p.port, "protocol": str(p.protocol)} for p in imp.ports],
            "ready_by_cluster": ready_by_cluster,
        })
    proxies = [{**dataclasses.asdict(st), "state": str(st.state)} for st in cp.cache.status()]
    agent = cp.agent
    federation: dict[str, Any] = {"configured": agent is not None}
    if agent is not None:
        catalog = agent.catalog
        federation.update({
            "connected": agent.connected,
            "revision": getattr(catalog, "revision", None),
            "relists": agent.relists,
            "reconnects": agent.reconnects,
            "members": _members(catalog),
            "heartbeat_error": agent.heartbeat_error,
            "heartbeat_failing_since": (agent.heartbeat_failing_since.isoformat()
                                        if agent.heartbeat_failing_since else None),
            "heartbeat_ok_at": agent.heartbeat_ok_at.isoformat() if agent.heartbeat_ok_at else None,
        })
    return {
        "cluster": str(local),
        "network": str(cp.info.network),
        "region": cp.info.region,
        "zone": cp.info.zone,
        "gateway": f"{cp.config.gateway_host}:{cp.config.gateway_port}",
        "xds": f"{cp.config.xds.host}:{cp.ads.port if cp.ads else cp.config.xds.port}",
        "xds_mtls": f"{cp.config.xds_mtls.host}:{cp.ads_mtls.port}" if cp.config.xds_mtls and cp.ads_mtls else "",
        "dns": f"{cp.config.dns.host}:{cp.dns.port if cp.dns else cp.config.dns.port}",
        "admin": f"{cp.config.admin.host}:{cp.admin_port}",
        "registry_revision": reg.revision,
        "uptime_s": round(time.time() - cp.started_at, 1),
        "services": services,
        "imports": imports,
        "proxies": proxies,
        "proxy_errors": dict(cp.proxy_errors),
        "manifest_problems": cp.manifest_problems,
        "federation": federation,
        "trust": {
            "trust_domain": cp.trust_domain,
            "intermediate_not_after": cp.ca.not_after.isoformat(),
            "intermediate_not_before": cp.ca.cert.not_valid_before_utc.isoformat(),
            "intermediate_fingerprint": cp.ca.fingerprint,
            "roots": [{"fingerprint": fp, "not_after": root.not_valid_after_utc.isoformat()}
                      for fp, root in zip(cp.bundle.fingerprints, cp.bundle.roots, strict=True)],
            "workload_certs": [
                {"spiffe_id": sid, "not_after": _expiry(cert.chain_pem.encode()),
                 "not_before": _issued(cert.chain_pem.encode())}
                for sid, cert in sorted(cp.issuer.certs().items())
            ],
        },
        "rotation": rotation.controlplane_report(cp),
        "now": datetime.now(UTC).isoformat(),
    }


def _members(catalog: Any) -> list[dict[str, Any]]:
    if catalog is None:
        return []
    out = []
    for cid, member in sorted(catalog.members.items()):
        out.append({
            "cluster": str(cid),
            "network": str(member.info.network),
            "unreachable_since": member.unreachable_since.isoformat() if member.unreachable_since else None,
            "renewed_at": member.renewed_at.isoformat(),
            "gateway": f"{member.info.gateway_host}:{member.info.gateway_port}",
        })
    return out


async def run(config: ControlPlaneConfig, *, stop: asyncio.Event) -> None:
    async with ControlPlane(config):
        await stop.wait()
