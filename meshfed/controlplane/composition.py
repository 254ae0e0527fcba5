"""The composition: one cluster's control plane, ``ControlPlane``, wiring its parts together and keeping the
registry current (see the package docstring for the picture). Each watcher replaces the registry value and
submits a mergeable push request; the parts themselves live beside this module (configuration, sources, trust
renewal, the admin endpoint and its status, the local run's adapters)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

from discovery.authz import AuthorizationPolicy
from discovery.convert import imported_slices
from discovery.dns.server import DnsServer
from discovery.kube import (
    ExportStatusWriter,
    ImportWriter,
    KubeError,
    KubeSource,
    SliceWriter,
    sync_webhook_ca_bundle_sync,
)
from discovery.manifests import ManifestSource
from discovery.mcs import InvalidCidr, derive_local
from discovery.model import ClusterInfo, Registry
from discovery.policy import TrafficPolicies
from discovery.source import ClusterSnapshot, ClusterSource, LoadResult
from federation.agent import AgentConfig, FederationAgent
from federation.catalog import Catalog, with_export_conditions
from federation.client import FederationClient
from federation.clock import utcnow
from federation.peering.records import peer_imports
from federation.trust.bundle import TrustBundle
from federation.trust.ca import IntermediateCA
from gateway.ads import AdsServer
from gateway.auth import Authenticator, ProxyIdentity
from gateway.cache import SnapshotCache
from gateway.context import ProxyInfo, ProxyInfoError, PushContext
from gateway.peerauth import PeerCertificateAuthenticator
from gateway.pipeline import PushPipeline
from gateway.push import ConfigKey, Kind, PushDebouncer, PushRequest
from gateway.rbac import tcp_port_problems
from gateway.sds import WorkloadCertIssuer, bundle_pem, identities_of
from meshfed import telemetry
from meshfed.certfiles import CertFiles
from meshfed.controlplane.admin import AdminEndpoints, Readiness, serve_admin, status_of
from meshfed.controlplane.config import ControlPlaneConfig, Listen, load_runtime
from meshfed.controlplane.localrun import ReloadingTokens, apply_runtime, file_mtime
from meshfed.controlplane.sources import open_source
from meshfed.controlplane.status import ControlPlaneStatus, ManifestProblemRow
from meshfed.controlplane.trust import TrustRenewal
from meshfed.controlplane.webhook import serve_webhook
from meshfed.inject import InjectConfig

log = logging.getLogger("meshfed.controlplane")


#: How often the webhook configuration's caBundle is checked even when the bundle did not change.
_WEBHOOK_RECHECK_S = 30.0

#: What a push for a change of only this reason concerns (the others: everything).
_REASON_CONFIGS: Mapping[str, frozenset[ConfigKey]] = {"trust": frozenset({ConfigKey(Kind.TRUST)})}


@dataclass
class ControlPlane:
    """One cluster's control plane (an async context manager); see the package docstring."""

    config: ControlPlaneConfig
    registry: Registry = field(init=False)
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    proxies: dict[str, ProxyInfo] = field(default_factory=dict)
    proxy_errors: dict[str, str] = field(default_factory=dict)
    manifest_problems: tuple[ManifestProblemRow, ...] = ()
    started_at: float = field(default_factory=time.time)
    metrics: telemetry.ControlPlaneMetrics = field(default_factory=telemetry.ControlPlaneMetrics)
    _stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    _local: ClusterSnapshot | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _dns_dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _status_dirty: asyncio.Event = field(default_factory=asyncio.Event)
    status_writer: ExportStatusWriter | None = None
    import_writer: ImportWriter | None = None
    slice_writer: SliceWriter | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _generation_failed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        cfg = self.config
        info = self.info
        self.registry = Registry(local=cfg.cluster).with_catalog(clusters={info.id: info}, imports={})
        self.trust = TrustRenewal(ca_dir=cfg.ca_dir, cluster=cfg.cluster, poll_s=cfg.trust_poll_s,
                                  cert_files=CertFiles(cfg.cert_files))
        self.trust_domain = str(self.bundle.trust_domain)
        cfg.check()
        self.auth: Authenticator = ReloadingTokens(path=cfg.tokens_file)
        self.issuer = WorkloadCertIssuer(ca=self.ca, ttl=cfg.workload_cert_ttl, on_rotate=self._rotated)
        self.manifests = ManifestSource.for_cluster(cfg.clusterset, cfg.cluster)
        self._first_local = asyncio.Event()
        self.ads: AdsServer | None = None
        self.ads_mtls: AdsServer | None = None
        self.dns: DnsServer | None = None
        self.pushes: PushDebouncer | None = None
        self.pipeline = PushPipeline(cache=self.cache)
        self.agent: FederationAgent | None = None
        self._peers_version = 0  # agent.peers.version last pushed (peer bundles in ROOTCA)
        # (agent.peers.version, registry.imports) the peer services were last placed for (their ClusterSetIPs
        # avoid the imports' own).
        self._peer_imports_of: tuple[int, object] = (0, None)
        self.peer_error = ""  # why the peers' services could not be taken ("" when they were)
        self.webhook_ca_error = ""  # why the webhook configuration's caBundle could not be written
        self.admin_port = 0
        self.webhook_port = 0

    # The CA and bundle in force (``self.trust`` also holds the control plane's own certificates).

    @property
    def ca(self) -> IntermediateCA:
        return self.trust.ca

    @property
    def bundle(self) -> TrustBundle:
        return self.trust.bundle

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
                client = await stack.enter_async_context(FederationClient(
                    list(cfg.federation_urls), ssl_context=self.trust.federation_context(), cluster=cfg.cluster,
                    bundle=self.bundle))
                self.trust.federation_client = client
                # The clusterset's heartbeat interval; the agent shortens it to a third of the lease the service
                # actually grants, which may be shorter than the clusterset's (``meshfed up --lease-ttl 3``).
                agent_cfg = AgentConfig(heartbeat_interval_s=cfg.clusterset.federation.heartbeat_interval)
                self.agent = await stack.enter_async_context(FederationAgent(
                    client, info=self.info, config=agent_cfg, on_update=self._on_catalog))
                self._publish()
            if cfg.webhook is not None:
                self.webhook_port = await serve_webhook(
                    stack, cfg.webhook, self.trust.webhook_context(cfg.webhook_hosts or (cfg.webhook.host,)),
                    self.inject_config())
            self.admin_port = await serve_admin(stack, cfg.admin, AdminEndpoints(
                readiness=self._readiness, status=self.status, metrics=self._metrics))
            self._tasks.append(asyncio.create_task(self._dns_loop(), name="dns-update"))
            if isinstance(self.auth, ReloadingTokens):
                self._tasks.append(asyncio.create_task(self._tokens_loop(self.auth), name="xds-tokens"))
            self._tasks.append(asyncio.create_task(
                self.trust.run(issuer=self.issuer, on_reload=lambda: self._changed("trust")), name="trust"))
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

    def inject_config(self) -> InjectConfig:
        """What the injection webhook gives pods of this cluster."""
        cfg = self.config
        return InjectConfig(cluster=str(cfg.cluster), image=cfg.inject_image,
                            image_pull_policy=cfg.inject_image_pull_policy, xds_address=cfg.inject_xds_address,
                            audience=cfg.token_audience, xds_mtls_address=cfg.inject_xds_mtls_address)

    def _mtls_ads(self, listen: Listen) -> AdsServer:
        """The certificate-authenticated ADS listener (same cache, same generators) for proxyless gRPC."""
        credentials = self.trust.serving_credentials(self.config.xds_mtls_hosts or (listen.host,))
        auth = PeerCertificateAuthenticator(trust_domain=self.trust_domain, cluster=str(self.config.cluster))
        return AdsServer(cache=self.cache, authenticator=auth, host=listen.host, port=listen.port,
                         server_credentials=credentials)

    # ---- watchers: each replaces the registry and submits a push ---------------------------------------------

    def _take_local(self, result: LoadResult) -> frozenset[ConfigKey]:
        """Take the cluster's own objects; returns what changed for the push pipeline (the local shard always,
        which the pipeline compares key by key; policies and imports when they moved)."""
        before, old_extras = self.registry, self._local.extras if self._local is not None else ()
        problems = [ManifestProblemRow(file=p.file, document=p.document, field=p.field, message=p.message,
                                       severity=p.severity) for p in result.problems]
        for p in result.errors:
            log.error("manifest error file=%s document=%d field=%s message=%s (last good state kept)", p.file,
                      p.document, p.field, p.message)
        snap = result.snapshot
        self._local = snap
        authz_policies = [o for o in snap.extras if isinstance(o, AuthorizationPolicy)]
        # Conflicts, routes to undefined subsets; HTTP-only AuthorizationPolicy fields on TCP ports (gateway.rbac).
        for problem in (*TrafficPolicies.of(snap.extras).problems,
                        *tcp_port_problems(authz_policies, snap.services.values())):
            log.warning("policy problem cluster=%s %s", self.config.cluster, problem)
            problems.append(ManifestProblemRow(message=problem, severity="warning"))
        self.manifest_problems = tuple(problems)
        services = apply_runtime(snap.services, load_runtime(self.config.runtime_file))
        self.registry = self.registry.with_shard(self.config.cluster, services, snap.exports.values())
        # The conditions before this snapshot replaced the exports: their transition times are kept.
        previous = before.exports.get(self.config.cluster, {})
        if self.agent is not None and self.agent.catalog is not None:
            self.registry = with_export_conditions(self.registry, self.agent.catalog,
                                                   unsupported=snap.unsupported, now=utcnow(), previous=previous)
        elif not self.config.federation_urls:
            self.registry = derive_local(self.registry, snap.exports.values(), unsupported=snap.unsupported,
                                         cidr=self.config.clusterset.cidr, now=utcnow(), previous=previous)
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

    async def _open_source(self, stack: AsyncExitStack) -> ClusterSource:
        source, auth = await open_source(self.config, self.manifests, stack)
        if auth is not None:
            self.auth = auth
        if isinstance(source, KubeSource):
            # On a real cluster the control plane writes its exports' conditions back to their status.
            self.status_writer = ExportStatusWriter(api=source.api, version=source.mcs_version, clock=utcnow)
            self.import_writer = ImportWriter(api=source.api, version=source.mcs_version)
            self.slice_writer = SliceWriter(api=source.api, imports=self.import_writer)
            self._tasks.append(asyncio.create_task(
                self._status_loop(self.status_writer, self.import_writer, self.slice_writer), name="export-status"))
            if self.config.webhook_configuration:
                self._tasks.append(asyncio.create_task(
                    self._webhook_ca_loop(source.api, self.config.webhook_configuration), name="webhook-ca"))
        return source

    async def _webhook_ca_loop(self, api: Any, name: str) -> None:
        """Keep the injector's MutatingWebhookConfiguration trusting the clusterset's roots: at once, whenever the
        bundle changes (``meshfed ca rotate add-root`` adds the new root before ``reissue`` moves the webhook's
        certificate to it, so the API server never meets a certificate it cannot verify), and every
        ``_WEBHOOK_RECHECK_S`` (a re-applied install puts back the old caBundle)."""
        synced, last = "", 0.0
        while True:
            pem = bundle_pem(self.bundle)
            if pem != synced or time.monotonic() - last >= _WEBHOOK_RECHECK_S:
                try:
                    await asyncio.to_thread(sync_webhook_ca_bundle_sync, api, name, pem)
                except KubeError as exc:
                    if self.webhook_ca_error != str(exc):
                        log.warning("webhook caBundle not written cluster=%s configuration=%s error=%s "
                                    "(retrying)", self.config.cluster, name, exc)
                    self.webhook_ca_error = str(exc)
                else:
                    synced, last, self.webhook_ca_error = pem, time.monotonic(), ""
            await asyncio.sleep(self.config.trust_poll_s)

    async def _status_loop(self, writer: ExportStatusWriter, imports: ImportWriter, slices: SliceWriter) -> None:
        """Write the local exports' conditions, the clusterset's ServiceImports and then their multicluster
        EndpointSlices (owned by the imports) after changes (latest registry wins; bursts coalesce). Until the
        federation's first catalog, a federated control plane has no imports to write (and none to delete by
        mistake)."""
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            registry = self.registry
            await writer.sync(registry.exports.get(self.config.cluster, {}))
            if not self.config.federation_urls or (self.agent is not None and self.agent.catalog is not None):
                await imports.sync(registry.imports)
                await slices.sync(await asyncio.to_thread(imported_slices, registry.imports, registry.source_endpoints))

    async def _watch_local(self, source: ClusterSource) -> None:
        """Follow the cluster's own objects: each accepted change replaces the local shard and is published."""
        last = ""
        runtime_mtime = -1.0
        stream = (self.manifests.watch(interval=self.config.manifest_poll_s) if source is self.manifests
                  else source.watch())
        async for result in stream:
            mtime = file_mtime(self.config.runtime_file)
            if result.snapshot.version == last and mtime == runtime_mtime and not result.errors:
                continue
            last, runtime_mtime = result.snapshot.version, mtime
            configs = self._take_local(result)
            self._publish()
            self._changed(self.config.source, configs)
            self._first_local.set()

    async def _tokens_loop(self, tokens: ReloadingTokens) -> None:
        """Re-read ``tokens.json`` as often as the manifests: a token the runner removed stops working, and the
        streams it opened are closed (``TokenTableAuthenticator.on_revoke``), without waiting for a new stream."""
        while True:
            await asyncio.sleep(self.config.manifest_poll_s)
            tokens.reload()

    async def _on_catalog(self, catalog: Catalog) -> None:
        """The federation's catalog moved: take the shards that changed (O(1) per shard here: the agent shares
        the unchanged ones) and say which for the pipeline, which compares them key by key off the loop."""
        assert self.agent is not None
        before = self.registry
        self.registry = after = with_export_conditions(
            self.agent.apply(before), catalog, unsupported=self._local.unsupported if self._local else None,
            now=utcnow())
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
        peers = self.agent.peers.version
        if peers != self._peers_version:  # a peer's bundle came, changed or expired: ROOTCA and inbound mTLS move
            self._peers_version = peers
            self._changed("trust")
        if peers != self._peer_imports_of[0] or after.imports is not self._peer_imports_of[1]:
            await self._take_peer_services(after)

    async def _take_peer_services(self, registry: Registry) -> None:
        """The services peers exported to us (docs/peering.md) into the registry, with ClusterSetIPs beside the
        imports' own; a change is a full push (rare: the federation pulls a peer's list every few seconds and
        delivers only what moved). Nothing to do without peer services; with some, placing them reads every
        import's address, so it runs in a worker thread (a catalog of 50,000 imports must not stall the loop)."""
        assert self.agent is not None
        placed_for = self._peer_imports_of = (self.agent.peers.version, registry.imports)
        services = self.agent.peer_services
        if not services and not self.registry.peers:
            return
        try:
            found = tuple(await asyncio.to_thread(peer_imports, services, cidr=self.config.clusterset.cidr,
                                                  imports=registry.imports.values()))
        except InvalidCidr as exc:  # the range is full: keep what was served, say why
            log.error("peer services not taken cluster=%s error=%s (last accepted kept)", self.config.cluster, exc)
            self.peer_error = str(exc)
            return
        if self._peer_imports_of is not placed_for:
            return  # a later catalog started its own placement meanwhile: that one is current
        self.peer_error = ""
        if found != self.registry.peers:
            self.registry = self.registry.with_peers(found)
            log.info("peer services cluster=%s services=%d", self.config.cluster, len(found))
            self._changed("peers")

    def _peer_bundles(self) -> tuple[tuple[str, str], ...]:
        """The peered trust domains' roots the federation delivered (docs/peering.md), for the push context."""
        if self.agent is None:
            return ()
        return tuple(sorted((td, view.roots_pem) for td, view in self.agent.peer_bundles.items()))

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
        self._status_dirty.set()

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
                           trust_bundle_pem=bundle_pem(self.bundle), peer_bundles=self._peer_bundles(),
                           workload_certs=self.issuer.certs(),
                           policies=policies, authz=authz,
                           outbound_mode=self.config.clusterset.outbound_traffic_mode)

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

    def _readiness(self) -> Readiness:
        return Readiness(ready=self._ready.is_set(),
                         federation_synced=self.agent is None or self.agent.catalog is not None)

    def _metrics(self) -> tuple[bytes, str]:
        self.metrics.refresh(self)
        return self.metrics.render()

    def status(self) -> ControlPlaneStatus:
        """Everything ``meshfed status`` and ``diagnose`` need from this control plane (``/status``)."""
        return status_of(self)


async def run(config: ControlPlaneConfig, *, stop: asyncio.Event) -> None:
    async with ControlPlane(config):
        await stop.wait()
