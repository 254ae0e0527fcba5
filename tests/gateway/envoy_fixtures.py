"""Test plumbing for real-Envoy tests: an in-process control plane (ADS server + snapshot cache + our generators)
and Envoy processes bootstrapped against it. Every Envoy is started here and stopped by pid."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from gateway import generators
from gateway.ads import AdsServer
from gateway.auth import ProxyIdentity, TokenTableAuthenticator
from gateway.bootstrap import render_bootstrap, write_bootstrap
from gateway.cache import SnapshotCache
from gateway.context import ProxyInfo, PushContext
from gateway.envoy import EnvoyAdmin, command
from gateway.push import PushDebouncer, PushRequest
from gateway.snapshot import Snapshot
from tests.support.procs import Proc, free_port


async def wait_until(predicate: Callable[[], Awaitable[bool]], *, within: float = 30.0, what: str = "") -> None:
    """Poll an async predicate every 50 ms until it holds, at most ``within`` seconds (bounded loop)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out after {within}s waiting for {what}")


@dataclass
class ControlPlane:
    """One cluster's control plane for tests: generators fed by a hand-built PushContext, served over ADS."""

    ctx: PushContext
    quiet: float = 0.05
    max_delay: float = 0.5
    proxies: dict[str, ProxyInfo] = field(default_factory=dict)
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    auth: TokenTableAuthenticator = field(default_factory=TokenTableAuthenticator)
    tokens: dict[str, str] = field(default_factory=dict)
    server: AdsServer | None = None
    pushes: PushDebouncer | None = None
    _stack: AsyncExitStack = field(default_factory=AsyncExitStack)

    async def __aenter__(self) -> Self:
        self.server = await self._stack.enter_async_context(
            AdsServer(cache=self.cache, authenticator=self.auth, host="127.0.0.1", port=0))
        self.pushes = await self._stack.enter_async_context(
            PushDebouncer(regenerate=self._regenerate, quiet=self.quiet, max_delay=self.max_delay))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._stack.aclose()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def add_proxy(self, proxy: ProxyInfo) -> str:
        """Register a proxy, issue its bootstrap token and publish its snapshot; returns the token."""
        self.proxies[proxy.node_id] = proxy
        token = self.auth.issue(ProxyIdentity(namespace=str(proxy.namespace), service_account=proxy.service_account,
                                              cluster=str(proxy.cluster)))
        self.tokens[proxy.node_id] = token
        self.publish(proxy.node_id)
        return token

    def snapshot(self, node_id: str) -> Snapshot:
        return Snapshot.build(generators.generate_all(self.proxies[node_id], self.ctx))

    def publish(self, node_id: str) -> None:
        self.cache.set_snapshot(node_id, self.snapshot(node_id))

    async def _regenerate(self, request: PushRequest) -> None:
        for node_id in sorted(self.proxies):
            if request.full or node_id in request.proxies:
                self.publish(node_id)

    def update(self, ctx: PushContext, reason: str) -> None:
        """A watcher's view of a change: swap the context and submit a debounced full push."""
        self.ctx = ctx
        assert self.pushes is not None
        self.pushes.submit(PushRequest(full=True, reasons=frozenset({reason})))

    def set_certs(self, certs: dict[str, Any]) -> None:
        self.ctx = replace(self.ctx, workload_certs=certs)


@dataclass
class EnvoyProc:
    proxy: ProxyInfo
    proc: Proc
    admin: EnvoyAdmin
    admin_port: int

    def stop(self) -> None:
        self.proc.stop()


def start_envoy(tmp: Path, cp: ControlPlane, proxy: ProxyInfo, *, delta: bool = False) -> EnvoyProc:
    admin_port = free_port()
    token = cp.add_proxy(proxy)
    name = proxy.node_id.split("~")[2]
    boot = render_bootstrap(proxy, xds_host="127.0.0.1", xds_port=cp.port, admin_port=admin_port, token=token,
                            delta=delta)
    path = write_bootstrap(tmp / f"{name}.yaml", boot)
    proc = Proc(command(path, log_level="info"), log=tmp / f"{name}.log")
    return EnvoyProc(proxy=proxy, proc=proc, admin=EnvoyAdmin("127.0.0.1", admin_port), admin_port=admin_port)


async def wait_ready(envoy: EnvoyProc, *, within: float = 60.0) -> None:
    async def ready() -> bool:
        if not envoy.proc.alive():
            raise RuntimeError(f"envoy {envoy.proxy.node_id} exited:\n{envoy.proc.output()[-3000:]}")
        return await envoy.admin.ready()

    await wait_until(ready, within=within, what=f"envoy {envoy.proxy.node_id} /ready")


def dumped_names(dump: dict[str, Any]) -> dict[str, set[str]]:
    """Names of the dynamic resources in force in a /config_dump?include_eds output, per kind."""
    out: dict[str, set[str]] = {"clusters": set(), "listeners": set(), "routes": set(), "secrets": set(),
                                "endpoints": set()}
    for cfg in dump.get("configs", []):
        kind = cfg.get("@type", "")
        if kind.endswith("ClustersConfigDump"):
            out["clusters"] |= {c["cluster"]["name"] for c in cfg.get("dynamic_active_clusters", [])}
        elif kind.endswith("ListenersConfigDump"):
            out["listeners"] |= {x["name"] for x in cfg.get("dynamic_listeners", []) if "active_state" in x}
        elif kind.endswith("RoutesConfigDump"):
            out["routes"] |= {r["route_config"]["name"] for r in cfg.get("dynamic_route_configs", [])}
        elif kind.endswith("SecretsConfigDump"):
            out["secrets"] |= {s["name"] for s in cfg.get("dynamic_active_secrets", [])}
        elif kind.endswith("EndpointsConfigDump"):
            out["endpoints"] |= {e["endpoint_config"]["cluster_name"]
                                 for e in cfg.get("dynamic_endpoint_configs", [])}
    return out


@contextmanager
def envoy_workdir(prefix: str) -> Iterator[tuple[Path, list[EnvoyProc]]]:
    """A scratch directory for bootstraps (they hold tokens), logs and test keys, and the list of Envoys a fixture
    starts in it: on exit every Envoy in the list is stopped by pid and the directory removed."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    envoys: list[EnvoyProc] = []
    try:
        yield tmp, envoys
    finally:
        for e in envoys:
            e.stop()
        shutil.rmtree(tmp, ignore_errors=True)
