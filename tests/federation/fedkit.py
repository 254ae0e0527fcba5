"""Test kit for the federation service and agents: a real PKI, the service in-process or as a child process,
and agents with real mTLS clients. Everything listens on 127.0.0.1 on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from discovery.model import (
    ClusterId,
    ClusterInfo,
    Endpoint,
    NetworkId,
    ServiceExport,
    ServiceKey,
    ServicePort,
)
from discovery.model import (
    Service as DService,
)
from federation import catalog as cat
from federation.agent import AgentConfig, FederationAgent
from federation.client import FederationClient
from federation.service import ServiceConfig, create_app, serve
from federation.store.base import Store
from federation.trust.bundle import TrustBundle
from federation.trust.ca import IntermediateCA, RootCA, create_intermediate, create_root, issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import write_cluster_dir
from federation.trust.tls import client_ssl_context, server_ssl_context
from tests.support.procs import Proc, free_port, port_open, wait_for

TD = TrustDomain("meshfed.test")


@dataclass
class Pki:
    root: RootCA
    bundle: TrustBundle
    federation: IntermediateCA
    clusters: dict[str, IntermediateCA] = field(default_factory=dict)

    @classmethod
    def create(cls, td: TrustDomain = TD) -> Pki:
        root = create_root(td)
        bundle = TrustBundle(td, (root.cert,))
        return cls(root=root, bundle=bundle, federation=create_intermediate(root, SpiffeId.federation(td)))

    def cluster_ca(self, cluster: str) -> IntermediateCA:
        if cluster not in self.clusters:
            self.clusters[cluster] = create_intermediate(self.root, SpiffeId.cluster(self.bundle.trust_domain,
                                                                                     cluster))
        return self.clusters[cluster]

    def server_ssl(self) -> Any:
        key, chain = issue_workload(self.federation, SpiffeId.federation(self.bundle.trust_domain),
                                    ttl=timedelta(hours=1))
        return server_ssl_context(b"".join(chain), key, self.bundle)

    def client_ssl(self, cluster: str, *, identity: SpiffeId | None = None) -> Any:
        ca = self.cluster_ca(cluster)
        key, chain = issue_workload(ca, identity or SpiffeId.cluster(self.bundle.trust_domain, cluster),
                                    ttl=timedelta(hours=1))
        return client_ssl_context(b"".join(chain), key, self.bundle)

    def client(self, cluster: str, urls: str | Sequence[str], **kw: Any) -> FederationClient:
        return FederationClient(urls, ssl_context=self.client_ssl(cluster), cluster=ClusterId(cluster),
                                bundle=self.bundle, **kw)

    def write_federation_dir(self, out: Path) -> Path:
        write_cluster_dir(out, self.federation, self.bundle)
        return out


@contextlib.asynccontextmanager
async def in_process(pki: Pki, store: Store, *, config: ServiceConfig | None = None
                     ) -> AsyncIterator[tuple[str, web.Application]]:
    """The service on a free loopback port in this event loop; yields (url, app)."""
    app = create_app(store=store, bundle=lambda: pki.bundle, config=config or ServiceConfig(lease_ttl_s=2.0,
                                                                                           bookmark_interval_s=1.0))
    port = free_port()
    async with serve(app, host="127.0.0.1", port=port, ssl_context=pki.server_ssl(), shutdown_timeout=0.5):
        yield f"https://127.0.0.1:{port}", app


class ServiceProcess:
    """``meshfed federation serve`` as a child process, restartable on the same port and store."""

    def __init__(self, pki: Pki, tmp: Path, store_url: str, *, lease_ttl: float = 2.0, name: str = "fed") -> None:
        self.ca_dir = pki.write_federation_dir(tmp / f"{name}-ca")
        self.tmp = tmp
        self.name = name
        self.store_url = store_url
        self.lease_ttl = lease_ttl
        self.port = free_port()
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [str(Path(sys.executable).parent / "meshfed"), "-vv", "federation", "serve",
                "--store", self.store_url, "--listen", f"127.0.0.1:{self.port}", "--ca", str(self.ca_dir),
                "--lease-ttl", str(self.lease_ttl), "--bookmark-interval", "1"]

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(self.argv(), log=self.tmp / f"{self.name}.{self.starts}.log")
        proc = self.proc

        def up() -> bool:
            if not proc.alive():
                raise RuntimeError(f"federation service exited:\n{proc.output()[-3000:]}")
            return port_open("127.0.0.1", self.port)

        wait_for(up, timeout=30, what=f"federation service on {self.url}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill9()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def output(self) -> str:
        return self.proc.output() if self.proc else ""


def info(cluster: str, network: str = "net1", *, zone: str = "z1", port: int = 15443) -> ClusterInfo:
    return ClusterInfo(id=ClusterId(cluster), network=NetworkId(network), region="r1", zone=zone,
                       gateway_host="127.0.0.1", gateway_port=port)


def key(name: str, ns: str = "default") -> ServiceKey:
    return ServiceKey.parse(f"{name}.{ns}")


def snapshot(cluster: str, names: Sequence[str], *, port: int = 8080, addr_base: int = 1,
             created: datetime | None = None) -> tuple[list[DService], list[ServiceExport]]:
    """A discovery snapshot of ``cluster`` exporting ``names`` with one ready endpoint each."""
    created = created or datetime(2026, 1, 1, tzinfo=UTC)
    services, exports = [], []
    for i, name in enumerate(names):
        k = key(name)
        ep = Endpoint(address=f"10.{addr_base}.{i // 250}.{i % 250 + 1}", zone="z1")
        services.append(DService(cluster=ClusterId(cluster), key=k, ports=(ServicePort(port=port, name="http"),),
                                 endpoints=(ep,)))
        exports.append(ServiceExport(cluster=ClusterId(cluster), key=k, created=created))
    return services, exports


def has(cluster: str, name: str) -> Callable[[cat.Catalog], bool]:
    """The catalog lists ``name`` with a shard from ``cluster``."""
    def check(c: cat.Catalog) -> bool:
        s = c.services.get(key(name))
        return s is not None and s.shard(ClusterId(cluster)) is not None
    return check


def lacks(cluster: str, name: str) -> Callable[[cat.Catalog], bool]:
    def check(c: cat.Catalog) -> bool:
        return not has(cluster, name)(c)
    return check


@contextlib.asynccontextmanager
async def agent(pki: Pki, cluster: str, urls: str | Sequence[str], *, network: str = "net1",
                config: AgentConfig | None = None) -> AsyncIterator[FederationAgent]:
    async with pki.client(cluster, urls, watch_idle_timeout_s=5.0, request_timeout_s=5.0) as client, \
            FederationAgent(client, info=info(cluster, network),
                            config=config or AgentConfig(backoff_initial_s=0.05, backoff_max_s=0.5)) as a:
        yield a


async def eventually(predicate: Callable[[], bool], *, within: float = 15.0, what: str = "") -> None:
    """Bounded wait on an async-side condition (not a timing assertion: the bound only stops a hung test)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling a plain predicate, bounded by the timeout
            await asyncio.sleep(0.02)
    assert predicate(), what


async def publish_growing(east: FederationAgent, cluster: str, *, rounds: int, ack_within: float,
                          acked: list[int]) -> None:
    """Publish ``svc0..svcN`` one more service per round (every 50 ms), appending to ``acked`` each round the
    service acknowledged within ``ack_within`` seconds (a round the outage swallowed is simply not recorded)."""
    names: list[str] = []
    for i in range(rounds):
        names.append(f"svc{i}")
        gen = east.publish(*snapshot(cluster, list(names)))
        try:
            async with asyncio.timeout(ack_within):
                await east.wait_published(gen)
            acked.append(i)
        except TimeoutError:
            pass
        await asyncio.sleep(0.05)
