"""Test kit for peering: a clusterset's federation side on disk (its own root directory, federation CA, cluster CAs)
and ``meshfed federation serve`` with a peering listener as a child process, restartable on the same ports."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from discovery.clusterset import PeerDecl, peers_file_text
from discovery.model import ClusterId, ClusterInfo, NetworkId
from federation.agent import AgentConfig, FederationAgent
from federation.client import FederationClient, cluster_credentials
from federation.trust.bundle import TrustBundle
from federation.trust.ca import issue_workload
from federation.trust.identity import federation_server_of_peer
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import init_root, issue_intermediate, load_bundle, load_cluster_ca
from federation.trust.tls import client_ssl_context, peer_chain_der
from tests.support.procs import Proc, free_port, port_open, wait_for


@dataclass
class Side:
    """One clusterset's federation: ``name`` is how the other side names it (its trust domain: ``<name>.test``)."""

    name: str
    tmp: Path
    clusters: tuple[str, ...] = ("east",)
    hint: int = 1
    extra: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    peering_port: int = field(default_factory=free_port)
    proc: Proc | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.dir = self.tmp / self.name
        self.td = TrustDomain(f"{self.name}.test")
        init_root(self.root_dir, self.td)
        issue_intermediate(self.root_dir, SpiffeId.federation(self.td), self.fed_dir)
        for c in self.clusters:
            issue_intermediate(self.root_dir, SpiffeId.cluster(self.td, c), self.dir / "ca" / c)

    @property
    def root_dir(self) -> Path:
        return self.dir / "ca" / "root"

    @property
    def fed_dir(self) -> Path:
        return self.dir / "ca" / "federation"

    @property
    def peers_file(self) -> Path:
        return self.dir / "federation" / "peers.yaml"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def bundle_endpoint(self) -> str:
        return f"https://127.0.0.1:{self.peering_port}/"

    def bundle(self) -> TrustBundle:
        return load_bundle(self.root_dir)

    def as_peer(self, *, name: str | None = None) -> PeerDecl:
        """How another clusterset declares this one."""
        return PeerDecl(name=name or self.name, trust_domain=self.td.name, bundle_endpoint=self.bundle_endpoint,
                        endpoint_spiffe_id=str(SpiffeId.federation(self.td)),
                        bootstrap_bundle=self.root_dir / "bundle.json")

    def declare(self, *peers: PeerDecl) -> None:
        self.peers_file.parent.mkdir(parents=True, exist_ok=True)
        self.peers_file.write_text(peers_file_text(peers))

    def argv(self) -> list[str]:
        return [str(Path(sys.executable).parent / "meshfed"), "-vv", "federation", "serve",
                "--store", f"sqlite:{self.dir / 'federation' / 'fed.db'}", "--listen", f"127.0.0.1:{self.port}",
                "--ca", str(self.fed_dir), "--lease-ttl", "3", "--bookmark-interval", "1",
                "--peering-listen", f"127.0.0.1:{self.peering_port}", "--peers", str(self.peers_file),
                "--bundle-refresh-hint", str(self.hint), "--peer-services-interval", "0.5", *self.extra]

    def start(self) -> None:
        (self.dir / "federation").mkdir(parents=True, exist_ok=True)
        self.starts += 1
        proc = self.proc = Proc(self.argv(), log=self.dir / f"federation.{self.starts}.log")

        def up() -> bool:
            if not proc.alive():
                raise RuntimeError(f"federation {self.name} exited:\n{proc.output()[-3000:]}")
            return port_open("127.0.0.1", self.port) and port_open("127.0.0.1", self.peering_port)

        wait_for(up, timeout=30, what=f"federation {self.name}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def output(self) -> str:
        return self.proc.output() if self.proc else ""

    def client(self, cluster: str) -> FederationClient:
        ctx, bundle = cluster_credentials(self.dir / "ca" / cluster, ClusterId(cluster))
        return FederationClient(self.url, ssl_context=ctx, cluster=ClusterId(cluster), bundle=bundle,
                                request_timeout_s=5.0, watch_idle_timeout_s=5.0)

    def agent(self, client: FederationClient, cluster: str, *, gateway_port: int = 15443) -> FederationAgent:
        info = ClusterInfo(id=ClusterId(cluster), network=NetworkId(f"{self.name}-net"), region="r1", zone="z1",
                           gateway_host="127.0.0.1", gateway_port=gateway_port)
        return FederationAgent(client, info=info, config=AgentConfig(backoff_initial_s=0.05, backoff_max_s=0.5))

    def member_get(self, path: str, cluster: str | None = None) -> Any:
        """GET ``path`` on the member API as ``cluster`` (blocking; from a test thread or with to_thread)."""
        c = cluster or self.clusters[0]
        ca = load_cluster_ca(self.dir / "ca" / c)
        bundle = load_bundle(self.dir / "ca" / c)
        key, chain = issue_workload(ca, SpiffeId.cluster(self.td, c))
        ctx = client_ssl_context(b"".join(chain), key, bundle)
        with urllib.request.urlopen(self.url + path, context=ctx, timeout=5) as resp:
            return json.loads(resp.read())

    def peer_status(self, name: str) -> dict[str, Any]:
        rows = self.member_get("/v1/peers")["peers"]
        return next(r for r in rows if r["name"] == name)


def fetch_endpoint(side: Side, *, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET a side's bundle endpoint the way a SPIFFE client does: no client certificate, the server verified as
    the federation's SVID against the side's own bundle (blocking)."""
    bundle = side.bundle()
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=bundle.to_pem().decode())
    with socket.create_connection(("127.0.0.1", side.peering_port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        federation_server_of_peer(peer_chain_der(tls), bundle)  # who served it
        tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n")
        resp = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()
