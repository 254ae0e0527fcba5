"""The local multi-cluster runner behind ``meshfed up`` and ``meshfed down``.

From a clusterset directory it starts, on loopback and with free ports, everything a federation needs and records
every process and address in ``<run-dir>/state.json``::

    <run-dir>/
      state.json                 pids and addresses (what `meshfed status` and `meshfed down` read)
      ca/root ca/federation ca/<cluster>     root, the federation service's CA, one intermediate per cluster
      federation/                the federation service's SQLite store and log
      <cluster>/                 control plane log, tokens.json (0600), runtime.json, Envoy bootstraps and logs

The plan (which workloads to run and on which ports) is computed by pure functions from the clusterset and its
manifests; the runner then starts processes in dependency order (federation, control planes, gateways,
workloads), waits for each to be ready with bounded waits, and proves the path with one cross-cluster request.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, overload

from discovery.addresses import parse_hostport
from discovery.clusterset import ClusterSet, PeerDecl, load_clusterset, peers_file_text
from discovery.manifests import load_clusterset_manifests
from discovery.model import ClusterId, ServiceKey
from discovery.source import ClusterSnapshot
from federation.files import write_atomic
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import init_root, issue_intermediate, load_bundle, load_cluster_ca
from gateway.auth import make_node_id, new_token
from gateway.bootstrap import render_bootstrap, render_grpc_bootstrap, write_bootstrap
from gateway.context import CaptureMode, InboundPort, ProxyInfo, ProxyKind
from gateway.envoy import command as envoy_command
from meshfed import certfiles, netns, netplan, procs, runstate
from meshfed import prometheus as prom
from meshfed.agent import sidecar_env
from meshfed.runstate import (
    CaState,
    ClusterState,
    ControlPlaneState,
    FederationState,
    GatewayState,
    GrpcClientState,
    NetworkState,
    PrometheusState,
    ProxylessState,
    RunState,
    WorkloadState,
    private_dir,
)

log = logging.getLogger("meshfed.local")

STATE_FILE = runstate.STATE_FILE  # <run-dir>/state.json (meshfed.runstate)

DEFAULT_RUN_DIR = Path(".meshfed/run")
CLIENT_WORKLOAD = "sleep"
CERT_FILES = "certfiles.json"  # per cluster: the proxyless workloads' certificate directories its control plane renews
GRPC_CERT_REFRESH_S = 5  # how often proxyless gRPC re-reads its certificate files


class LocalRunError(Exception):
    """A local run could not start or be found; the message says what to do next."""


# ---- the plan (pure) ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadPlan:
    """One demo workload: an app (unless it is the client) and its Envoy sidecar."""

    cluster: ClusterId
    name: str
    namespace: str
    service: str  # "" for the client workload
    service_account: str
    address: str  # the endpoint address the manifests list (loopback)
    port_name: str = "http"
    service_port: int = 9080


def plan_workloads(cs: ClusterSet) -> list[WorkloadPlan]:
    """A workload per ready endpoint of every non-headless service in the manifests, plus a client (``sleep``)
    in every cluster that calls others through its sidecar."""
    state = load_clusterset_manifests(cs)
    if state.problems and any(p.severity == "error" for p in state.problems):
        first = next(p for p in state.problems if p.severity == "error")
        raise LocalRunError(f"{first.file} document {first.document} field {first.field}: {first.message}")
    out: list[WorkloadPlan] = []
    for info in cs.clusters:
        out.extend(_endpoint_workloads(info.id, state.snapshots[info.id], proxyless=False))
        out.append(WorkloadPlan(cluster=info.id, name=f"{CLIENT_WORKLOAD}-{info.id}", namespace="default",
                                service="", service_account=CLIENT_WORKLOAD, address="127.0.0.1"))
    return out


PROXYLESS_LABEL = "meshfed.io/proxyless"
GRPC_CLIENT = "grpc-client"


def is_proxyless(labels: Iterable[tuple[str, str]]) -> bool:
    """A Service labelled ``meshfed.io/proxyless: "true"`` runs as a gRPC xDS server, without a sidecar."""
    return dict(labels).get(PROXYLESS_LABEL) == "true"


def plan_proxyless(cs: ClusterSet) -> list[WorkloadPlan]:
    """A proxyless gRPC server per ready endpoint of every Service labelled proxyless (docs/proxyless-grpc.md)."""
    state = load_clusterset_manifests(cs)
    return [w for info in cs.clusters for w in _endpoint_workloads(info.id, state.snapshots[info.id], proxyless=True)]


def _endpoint_workloads(cluster: ClusterId, snap: ClusterSnapshot, *, proxyless: bool) -> list[WorkloadPlan]:
    """A workload per ready endpoint of each non-headless service of ``snap`` that is (or is not) proxyless."""
    out: list[WorkloadPlan] = []
    for key in sorted(snap.services):
        svc = snap.services[key]
        if svc.headless or is_proxyless(svc.labels) != proxyless:
            continue
        port = svc.ports[0]
        for i, ep in enumerate(e for e in svc.endpoints if e.ready):
            out.append(WorkloadPlan(cluster=cluster, name=f"{key.name}-{cluster}-{i}", namespace=key.namespace,
                                    service=key.name, service_account=key.name, address=ep.address,
                                    port_name=port.name, service_port=port.port))
    return out


# ---- ports and files -----------------------------------------------------------------------------------------------


_HANDED_OUT: set[int] = set()  # ports free_port returned in this process (each is planned for one listener)


@functools.cache
def _pick_range() -> tuple[int, int] | None:
    """Ports below the kernel's ephemeral range (``ip_local_port_range``), where neither outgoing connections nor
    listeners bound to port 0 take a port between our pick and its process binding it; None if there is no room."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if low <= 4096:
        return None
    return max(1024, low - 16384), low - 1


def free_port(host: str = "127.0.0.1", *, udp_too: bool = False) -> int:
    """A port free on ``host`` (IPv4 or IPv6) now, for TCP, and UDP too when asked; bounded retries. Tests and
    benchmarks pick their ports with this as well.

    A port is picked at random below the ephemeral range (so a client connection opened before the listener starts
    cannot take it) and never twice in one process (``meshfed up`` plans every port before starting anything)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    span = _pick_range()
    rng = secrets.SystemRandom()
    for attempt in range(200):
        want = rng.randint(*span) if span is not None and attempt < 150 else 0
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, want))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port in _HANDED_OUT:
            continue
        if udp_too:
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
        _HANDED_OUT.add(port)
        return port
    raise LocalRunError(f"no free port on {host} after 200 tries")


def write_private(path: Path, text: str) -> None:
    """Write a secret file with mode 0600 from the start (never world-readable, even briefly), atomically."""
    write_atomic(path, text.encode(), mode=0o600)


def write_json(path: Path, data: Any, *, private: bool = False) -> None:
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    write_atomic(path, text, mode=0o600 if private else 0o644)


def write_state(run_dir: Path, state: RunState) -> None:
    """The run's ``state.json`` (:mod:`meshfed.runstate`): 0600 in a 0700 run directory."""
    runstate.write_state(run_dir, state)


def write_run_peers(path: Path, peers: Sequence[PeerDecl]) -> None:
    """A run's peers file from the clusterset's ``peers:``, each bootstrap bundle copied beside it (0600 in 0700)
    so the run does not depend on the clusterset's files staying where they are."""
    out = []
    for d in peers:
        if d.bootstrap_bundle is not None:
            copy = private_dir(path.parent / "bootstrap") / f"{d.name}.json"
            try:
                write_atomic(copy, d.bootstrap_bundle.read_bytes(), mode=0o600)
            except OSError as exc:
                raise LocalRunError(f"peer {d.name}: bootstrap bundle {d.bootstrap_bundle}: {exc.strerror or exc}"
                                    ) from exc
            d = replace(d, bootstrap_bundle=copy.resolve())
        out.append(d)
    write_atomic(path, peers_file_text(out).encode(), mode=0o600)


# ---- waiting -----------------------------------------------------------------------------------------------------


def http_get(url: str, *, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def wait_until(what: str, check: Callable[[], bool], *, timeout: float, pids: Sequence[int] = (),
               logs: Sequence[str] = ()) -> None:
    """Poll ``check`` (bounded by ``timeout``); fail early, naming the log, if a process it depends on died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        for pid, logfile in zip(pids, logs, strict=False):
            if not procs.alive(pid):
                raise LocalRunError(f"{what}: the process exited early; see {logfile}:\n{_tail(logfile)}")
        time.sleep(0.1)
    hint = f"; see {', '.join(logs)}" if logs else ""
    raise LocalRunError(f"{what}: not ready after {timeout:.0f}s{hint}")


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def envoy_ready(admin: str) -> bool:
    status, body = http_get(f"http://{admin}/ready", timeout=1.0)
    return status == 200 and body.strip() == "LIVE"


# ---- the runner ----------------------------------------------------------------------------------------------------


@dataclass
class LocalRun:
    """Starts a whole federation from a clusterset; every process is recorded before the next one starts."""

    clusterset_dir: Path
    run_dir: Path = DEFAULT_RUN_DIR
    lease_ttl: float | None = None
    progress: Callable[[str], None] = lambda _msg: None
    python: str = sys.executable
    state: RunState | None = None  # set by start(), written at every step
    ready_timeout: float = 60.0
    network: str = "loopback"  # or "netns": a network per cluster, a namespace per workload (meshfed.netplan)
    network_reason: str = ""
    net: netplan.NetPlan | None = None
    bundle_refresh_hint: int | None = None  # the federation's SPIFFE bundle endpoint's hint (None: its default)
    scrape_interval: float = prom.DEFAULT_SCRAPE_INTERVAL  # the run's Prometheus (meshfed.prometheus)

    def meshfed(self, *args: str) -> list[str]:
        return [self.python, "-m", "meshfed", *args]

    def _record(self, rec: procs.ProcRecord) -> procs.ProcRecord:
        self.save(self.run.with_process(rec))
        return rec

    @property
    def run(self) -> RunState:
        assert self.state is not None, "start() first"
        return self.state

    def save(self, state: RunState | None = None) -> None:
        """Write ``state`` (the run's new state; default: as it is) to state.json."""
        if state is not None:
            self.state = state
        write_state(self.run_dir, self.run)

    def _update_cluster(self, cluster: str, change: Callable[[ClusterState], ClusterState]) -> None:
        self.save(self.run.update_cluster(cluster, change))

    def start(self) -> RunState:
        existing = read_state(self.run_dir, missing_ok=True)
        if existing and running(existing):
            raise LocalRunError(f"a local run is already up in {self.run_dir}; stop it with 'meshfed down' first")
        if existing:
            remove_network(self.run_dir, existing)  # what a crashed run left (namespaces, links), if anything
        cs = load_clusterset(self.clusterset_dir)
        plan = plan_workloads(cs)
        private_dir(self.run_dir)
        self.save(RunState(clusterset=str(self.clusterset_dir.resolve()), name=cs.name,
                           run_dir=str(self.run_dir.resolve()), trust_domain=str(cs.trust_domain),
                           started_at=time.time(), cwd=os.getcwd(),
                           network=NetworkState(mode=self.network, reason=self.network_reason)))
        try:
            if self.network == "netns":
                self._network(cs, plan)
            self._ca(cs)
            self._federation(cs)
            for info in cs.clusters:
                self._controlplane(cs, info.id, [w for w in plan if w.cluster == info.id])
            for info in cs.clusters:
                self._gateway(info.id)
            for w in plan:
                self._workload(w)
            for info in cs.clusters:
                self._proxyless(cs, str(info.id))
            self._wait_envoys()
            self._wait_proxyless()
            self._prometheus()
            self.save(replace(self.run, ready_at=time.time()))
        except BaseException:
            self.progress("start failed: stopping what was started")
            stop_run(self.run_dir)
            raise
        return self.run

    # -- steps --

    def _network(self, cs: ClusterSet, plan: list[WorkloadPlan]) -> None:
        """Build the netns bed (meshfed.netns), recording every item in the state before it is created."""
        run_id = netns.new_run_id()

        def record(item: Mapping[str, str]) -> None:
            net = self.run.network
            self.save(replace(self.run, network=replace(net, created=(*net.created, dict(item)))))

        try:
            with netns.slot_lock():  # until our bridges hold the slot's addresses
                slot = netns.pick_slot()
                workloads = [(str(w.cluster), w.name) for w in [*plan, *plan_proxyless(cs)]]
                self.net = netplan.plan_network(run_id, slot, [str(c.id) for c in cs.clusters], workloads)
                self.save(replace(self.run, network=replace(self.run.network, run_id=run_id,
                                                            plan=self.net, created=())))
                described = netns.describe(self.net)
                self.progress(f"network: netns bed {described['slot']} (public {described['public']}, "
                              + ", ".join(f"{c} {cidr}" for c, cidr in described["clusters"].items())
                              + f", ClusterSetIPs {described['vips']})")
                netns.build(self.net, record)
            netns.make_proxy_dir(run_id, record)
        except (netns.NetnsError, netplan.NetPlanError) as exc:
            raise LocalRunError(f"network: {exc}") from exc

    def _pod(self, workload: str) -> netplan.PodNet:
        assert self.net is not None
        return self.net.pod(workload)

    def _ca(self, cs: ClusterSet) -> None:
        self.progress("certificate authority: root, federation CA, one intermediate per cluster")
        ca = private_dir(self.run_dir / "ca")
        td = TrustDomain.parse(str(cs.trust_domain))
        init_root(ca / "root", td)
        issue_intermediate(ca / "root", SpiffeId.federation(td), ca / "federation")
        for info in cs.clusters:
            issue_intermediate(ca / "root", SpiffeId.cluster(td, info.id), ca / str(info.id))
        self.save(replace(self.run, ca=CaState(root=str((ca / "root").resolve()),
                                                federation=str((ca / "federation").resolve()))))

    def _federation(self, cs: ClusterSet) -> None:
        port = free_port()
        fed_dir = self.run_dir / "federation"
        private_dir(fed_dir)
        lease = self.lease_ttl if self.lease_ttl is not None else cs.federation.lease_ttl
        store = f"sqlite:{(fed_dir / 'federation.db').resolve()}"
        # Netns runs: also on the root's address on each cluster's bridge, where that cluster's pods reach it.
        bridges = [c.root_ip for c in self.net.clusters] if self.net is not None else []
        for host in bridges:
            _check_free(host, port)
        also = [arg for host in bridges for arg in ("--listen", f"{host}:{port}")]
        # The peering listener (SPIFFE bundle endpoint, service exchange with peer federations), on loopback: peer
        # federations of other local runs reach it from the root namespace. Its peers file starts as the
        # clusterset's peers: list; 'meshfed peer add' edits it, the federation re-reads it (docs/peering.md).
        peering, metrics = free_port(), free_port()
        peers_file = (fed_dir / "peers.yaml").resolve()
        write_run_peers(peers_file, cs.peers)
        hint = ["--bundle-refresh-hint", str(self.bundle_refresh_hint)] if self.bundle_refresh_hint else []
        argv = self.meshfed("federation", "serve", "--store", store, "--listen", f"127.0.0.1:{port}", *also,
                            "--ca", str(self.run_dir / "ca" / "federation"), "--lease-ttl", str(lease),
                            "--cidr", cs.cidr if self.net is None else self.net.vip_alloc_cidr,
                            "--peering-listen", f"127.0.0.1:{peering}", "--peers", str(peers_file), *hint,
                            "--metrics-listen", f"127.0.0.1:{metrics}")
        self.progress(f"federation service on https://127.0.0.1:{port} (SQLite store), SPIFFE bundle endpoint "
                      f"https://127.0.0.1:{peering}/ ({len(cs.peers)} peers)")
        rec = self._record(procs.start("federation", argv, log_path=fed_dir / "federation.log"))
        url = f"https://127.0.0.1:{port}"
        td = TrustDomain.parse(str(cs.trust_domain))
        pod_urls = {c.cluster: f"https://{c.root_ip}:{port}" for c in self.net.clusters} if self.net else None
        self.save(replace(self.run, federation=FederationState(
            url=url, pid=rec.pid, log=rec.log, store=store, lease_ttl_s=lease,
            bundle_endpoint=f"https://127.0.0.1:{peering}/", peering_url=f"https://127.0.0.1:{peering}",
            spiffe_id=str(SpiffeId.federation(td)), peers_file=str(peers_file), metrics=f"127.0.0.1:{metrics}",
            pod_urls=pod_urls)))
        wait_until("federation service", lambda: _port_open("127.0.0.1", port) and _port_open("127.0.0.1", peering),
                   timeout=self.ready_timeout, pids=[rec.pid], logs=[rec.log])

    def _controlplane(self, cs: ClusterSet, cluster: ClusterId, workloads: list[WorkloadPlan]) -> None:
        cdir = private_dir(self.run_dir / str(cluster))
        cnet = self.net.cluster(str(cluster)) if self.net is not None else None
        # Loopback: everything on 127.0.0.1. Netns: xDS and DNS on the root's address on the cluster's bridge (where
        # the pods reach them; DNS on 53, as resolv.conf cannot name a port), admin on loopback, the gateway on its
        # public address, every Envoy's admin on 15000 in its namespace.
        host = cnet.root_ip if cnet is not None else "127.0.0.1"
        xds, admin, xds_mtls = free_port(host), free_port(), free_port(host)
        dns = netplan.DNS_PORT if cnet is not None else free_port(udp_too=True)
        if cnet is not None:
            gateway_address = f"{cnet.gateway.public_ip}:{netplan.GATEWAY_PORT}"
            gateway_admin = f"{cnet.gateway.cluster_ip}:{netplan.ADMIN_PORT}"
        else:
            gateway_address, gateway_admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        if cnet is not None:
            _check_dns_port(host, dns)
        tokens: dict[str, dict[str, str]] = {}
        runtime: dict[str, Any] = {"endpoints": {}}
        wl_state: list[WorkloadState] = []
        # One 256-bit token per proxy, bound to the node id that proxy's bootstrap carries (gateway.auth).
        gw_token = new_token()
        tokens[gw_token] = {"namespace": "meshfed-system", "service_account": "eastwest-gateway",
                            "cluster": str(cluster), "node_id": self._gateway_node_id(cluster)}
        td = TrustDomain.parse(str(cs.trust_domain))
        for w in workloads:
            token = new_token()
            pod = self._pod(w.name) if cnet is not None else None
            ip = pod.ip if pod is not None else w.address
            tokens[token] = {"namespace": w.namespace, "service_account": w.service_account, "cluster": str(cluster),
                             "node_id": _sidecar_node_id(w, ip)}
            entry = WorkloadState(
                name=w.name, cluster=str(cluster), namespace=w.namespace, service=w.service,
                service_account=w.service_account, address=ip, token=token, port_name=w.port_name,
                service_port=w.service_port, spiffe_id=str(SpiffeId.workload(td, w.namespace, w.service_account)))
            if pod is not None:
                # Captured: the app listens on its service port in the pod, the sidecar takes what iptables
                # redirects (15001 out, 15006 in); the mesh reaches the pod at its IP and service port.
                entry = replace(entry, netns=pod.netns, pod_ip=pod.ip, manifest_address=w.address, outbound="",
                                inbound=f"{pod.ip}:{w.service_port}" if w.service else "",
                                app=f"{pod.ip}:{w.service_port}" if w.service else "",
                                sidecar_admin=f"{pod.ip}:{netplan.ADMIN_PORT}")
                if w.service:
                    runtime["endpoints"][w.address] = {"ports": {w.port_name: w.service_port}, "address": pod.ip,
                                                       "service_account": w.service_account}
            else:
                inbound = free_port(w.address) if w.service else 0
                entry = replace(entry, inbound=f"{w.address}:{inbound}" if inbound else "",
                                app=f"127.0.0.1:{free_port()}" if w.service else "",
                                outbound=f"127.0.0.1:{free_port()}", sidecar_admin=f"127.0.0.1:{free_port()}")
                if inbound:
                    runtime["endpoints"][w.address] = {"ports": {w.port_name: inbound},
                                                       "service_account": w.service_account}
            wl_state.append(entry)
        proxyless: list[ProxylessState] = []
        for w in plan_proxyless(cs):
            if w.cluster != cluster:
                continue
            pod = self._pod(w.name) if cnet is not None else None
            ip = pod.ip if pod is not None else w.address
            port = w.service_port if pod is not None else free_port(w.address)
            runtime["endpoints"][w.address] = {"ports": {w.port_name: port}, "service_account": w.service_account,
                                               **({"address": ip} if pod is not None else {})}
            proxyless.append(ProxylessState(
                name=w.name, cluster=str(cluster), namespace=w.namespace, service=w.service,
                service_account=w.service_account, address=f"{ip}:{port}", port_name=w.port_name,
                service_port=w.service_port, spiffe_id=str(SpiffeId.workload(td, w.namespace, w.service_account)),
                netns=pod.netns if pod is not None else "", pod_ip=pod.ip if pod is not None else "",
                manifest_address=w.address if pod is not None else ""))
        write_private(cdir / "tokens.json", json.dumps(tokens, indent=2))
        write_json(cdir / "runtime.json", runtime)
        argv = self.meshfed(
            "controlplane", "--clusterset", str(self.clusterset_dir), "--cluster", str(cluster),
            "--ca", str(self.run_dir / "ca" / str(cluster)), "--federation", self._federation_url,
            "--xds-listen", f"{host}:{xds}", "--dns-listen", f"{host}:{dns}",
            "--admin-listen", f"127.0.0.1:{admin}", "--gateway-address", gateway_address,
            "--tokens", str(cdir / "tokens.json"), "--runtime", str(cdir / "runtime.json"),
            "--xds-mtls-listen", f"{host}:{xds_mtls}", "--cert-files", str(cdir / CERT_FILES),
        )
        self.progress(f"{cluster}: control plane (xds {host}:{xds}, dns {host}:{dns}, admin 127.0.0.1:{admin})")
        rec = self._record(procs.start(f"{cluster}/controlplane", argv, log_path=cdir / "controlplane.log"))
        self.save(self.run.with_cluster(str(cluster), ClusterState(
            controlplane=ControlPlaneState(pid=rec.pid, log=rec.log, xds=f"{host}:{xds}", dns=f"{host}:{dns}",
                                           admin=f"127.0.0.1:{admin}", xds_mtls=f"{host}:{xds_mtls}"),
            gateway=GatewayState(address=gateway_address, admin=gateway_admin, token=gw_token,
                                 netns=cnet.gateway.netns if cnet is not None else ""),
            workloads=tuple(wl_state), proxyless=tuple(proxyless),
            ca=str((self.run_dir / "ca" / str(cluster)).resolve()))))
        wait_until(f"{cluster} control plane", lambda: http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200,
                   timeout=self.ready_timeout, pids=[rec.pid], logs=[rec.log])

    @property
    def _federation_url(self) -> str:
        assert self.run.federation is not None
        return self.run.federation.url

    def _envoy(self, cluster: str, name: str, proxy: ProxyInfo, *, admin: str, token: str,
               netns_name: str = "") -> procs.ProcRecord:
        """An Envoy for ``proxy``: on loopback, or (``netns_name``) inside that namespace as the proxy uid, its
        bootstrap in the run's proxy directory (readable by that uid only; the run directory stays 0700)."""
        xds = parse_hostport(self.run.clusters[cluster].controlplane.xds)
        boot = render_bootstrap(proxy, xds_host=xds.host, xds_port=xds.port, admin_port=parse_hostport(admin).port,
                                token=token)
        logs = private_dir(self.run_dir / cluster / "envoy")
        if not netns_name:
            path = write_bootstrap(logs / f"{name}.yaml", boot)
            os.chmod(path, 0o600)  # it carries the workload's bootstrap token
            return self._record(procs.start(f"{cluster}/{name}", envoy_command(path, log_level="warning"),
                                            log_path=logs / f"{name}.log"))
        assert self.net is not None
        if proxy.kind is ProxyKind.SIDECAR:
            return self._sidecar_agent(cluster, name, proxy, admin=admin, token=token, netns_name=netns_name)
        boot["admin"]["address"]["socket_address"]["address"] = "0.0.0.0"  # the namespace's rules guard it
        path = write_bootstrap(netns.proxy_dir(self.net.run_id) / f"{cluster}-{name}.yaml", boot)
        os.chmod(path, 0o600)
        os.chown(path, netplan.PROXY_UID, netplan.PROXY_UID)
        argv = netns.in_ns(netns_name, [*netns.as_proxy_uid(), *envoy_command(path, log_level="warning")])
        return self._record(procs.start(f"{cluster}/{name}", argv, log_path=logs / f"{name}.log"))

    def _sidecar_agent(self, cluster: str, name: str, proxy: ProxyInfo, *, admin: str, token: str,
                       netns_name: str) -> procs.ProcRecord:
        """A pod's sidecar as a Kubernetes pod runs it: ``meshfed proxy run`` inside the pod's namespace with the
        environment the injector gives the container (``meshfed.agent.sidecar_env``, put on the command line with
        ``env`` so a restart replays it), which writes the bootstrap and starts Envoy as the proxy uid."""
        assert self.net is not None
        cp = self.run.clusters[cluster].controlplane
        run_dir = netns.proxy_dir(self.net.run_id) / f"{cluster}-{name}"
        run_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(run_dir, netplan.PROXY_UID, netplan.PROXY_UID)
        token_file = run_dir / "xds-token"
        write_private(token_file, token)
        env = sidecar_env(proxy, pod=name, xds=cp.xds, token_file=str(token_file), run_dir=str(run_dir),
                          admin_port=parse_hostport(admin).port, admin_address="0.0.0.0")
        argv = netns.in_ns(netns_name, ["env", *(f"{k}={v}" for k, v in env.items()),
                                        *self.meshfed("proxy", "run", "--proxy-uid", str(netplan.PROXY_UID))])
        logs = private_dir(self.run_dir / cluster / "envoy")
        return self._record(procs.start(f"{cluster}/{name}", argv, log_path=logs / f"{name}.log"))

    def _gateway_node_id(self, cluster: ClusterId) -> str:
        ip = self.net.cluster(str(cluster)).gateway.public_ip if self.net is not None else "127.0.0.1"
        return make_node_id(kind="gateway", ip=ip, pod=f"eastwest-gateway-{cluster}", namespace="meshfed-system")

    def _gateway(self, cluster: ClusterId) -> None:
        gw = self.run.clusters[str(cluster)].gateway
        address = parse_hostport(gw.address)
        proxy = ProxyInfo(kind=ProxyKind.GATEWAY, cluster=cluster,
                          node_id=self._gateway_node_id(cluster),
                          namespace=_ns("meshfed-system"), service_account="eastwest-gateway",
                          gateway_port=address.port, ip=address.host)
        where = f" in {gw.netns}" if gw.netns else ""
        self.progress(f"{cluster}: east-west gateway on {gw.address}{where} (admin {gw.admin})")
        rec = self._envoy(str(cluster), "eastwest-gateway", proxy, admin=gw.admin, token=gw.token,
                          netns_name=gw.netns)
        started = replace(gw, pid=rec.pid, log=rec.log, node_id=proxy.node_id)
        self._update_cluster(str(cluster), lambda c: replace(c, gateway=started))

    def _workload(self, w: WorkloadPlan) -> None:
        entry = self.run.clusters[str(w.cluster)].workload(w.name)
        assert entry is not None
        cdir = self.run_dir / str(w.cluster)
        pod_ns = entry.netns
        if pod_ns:
            self._capture(entry)
        if w.service:
            if pod_ns:
                listen = f"0.0.0.0:{w.service_port}"
                app_port = w.service_port
                inbound_port = w.service_port
            else:
                listen = entry.app
                app_port = parse_hostport(entry.app).port
                inbound_port = parse_hostport(entry.inbound).port
            argv = [self.python, "-m", "meshfed.demoapp", "--listen", listen, "--service", w.service,
                    "--cluster", str(w.cluster), "--workload", w.name]
            if pod_ns:
                argv = netns.in_ns(pod_ns, argv)
            rec = self._record(procs.start(f"{w.cluster}/{w.name}/app", argv, log_path=cdir / f"{w.name}.app.log"))
            app_pid = rec.pid
            self._update_cluster(str(w.cluster), lambda c: c.with_workload(w.name, app_pid=app_pid))
            inbound: tuple[InboundPort, ...] = (InboundPort(port=inbound_port, app_port=app_port, name=w.port_name),)
            services: tuple[ServiceKey, ...] = (ServiceKey.parse(f"{w.service}.{w.namespace}"),)
        else:
            inbound, services = (), ()
        ip = entry.address
        if pod_ns:
            capture: dict[str, Any] = {"capture": CaptureMode.REDIRECT, "outbound_port": netns.CAPTURE_OUTBOUND,
                                       "inbound_capture_port": netns.CAPTURE_INBOUND, "capture_bind": ("0.0.0.0",)}
        else:
            capture = {"outbound_port": parse_hostport(entry.outbound).port}
        proxy = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=w.cluster,
                          node_id=_sidecar_node_id(w, ip),
                          namespace=_ns(w.namespace), service_account=w.service_account, services=services,
                          inbound=inbound, ip=ip, **capture)
        what = f"{w.service} app {entry.app}, " if w.service else "client, "
        where = f"pod {pod_ns} {ip}, traffic captured" if pod_ns else f"sidecar outbound {entry.outbound}"
        self.progress(f"{w.cluster}: workload {w.name} ({what}{where})")
        rec = self._envoy(str(w.cluster), w.name, proxy, admin=entry.sidecar_admin, token=entry.token,
                          netns_name=pod_ns)
        self._update_cluster(str(w.cluster), lambda c: c.with_workload(
            w.name, sidecar_pid=rec.pid, sidecar_log=rec.log, node_id=proxy.node_id))

    def _capture(self, entry: WorkloadState) -> None:
        """``meshfed proxy capture`` inside the workload's pod (its connections to the root's bridge address, the
        control plane and DNS, are left alone)."""
        pod = self._pod(entry.name)
        argv = netns.in_ns(pod.netns, [*self.meshfed("proxy", "capture", "--exclude-outbound-cidrs",
                                                     f"{pod.root_ip}/32")])
        try:
            netns.run(argv)
        except netns.NetnsError as exc:
            raise LocalRunError(f"{entry.name}: traffic capture failed: {exc}") from exc

    def _grpc_files(self, cs: ClusterSet, cluster: str, name: str, namespace: str, service_account: str,
                    proxy: ProxyInfo) -> Path:
        """Certificate, key and bundle for a proxyless workload (0600), and its gRPC xDS bootstrap: mutual TLS to
        the control plane's certificate-authenticated ADS listener with that same certificate."""
        ca_dir = self.run_dir / "ca" / cluster
        gdir = self.run_dir / cluster / "grpc" / name
        private_dir(gdir.parent)
        private_dir(gdir)
        td = TrustDomain.parse(str(cs.trust_domain))
        # Written here, then kept current by the cluster's control plane (registered in its certfiles.json):
        # renewed before expiry and across root rotation; gRPC re-reads them every GRPC_CERT_REFRESH_S.
        spec = certfiles.Spec(dir=gdir.resolve(), spiffe_id=str(SpiffeId.workload(td, namespace, service_account)),
                              refresh_s=GRPC_CERT_REFRESH_S)
        certfiles.write_files(spec, load_cluster_ca(ca_dir), load_bundle(ca_dir))
        certfiles.register(self.run_dir / cluster / CERT_FILES, spec)
        xds = parse_hostport(self.run.clusters[cluster].controlplane.xds_mtls)
        boot = render_grpc_bootstrap(proxy, xds_host=xds.host, xds_port=xds.port, cert_file=str(gdir / "cert.pem"),
                                     key_file=str(gdir / "key.pem"), ca_file=str(gdir / "ca.pem"), xds_tls=True,
                                     refresh_s=GRPC_CERT_REFRESH_S)
        return write_bootstrap(gdir / "bootstrap.json", boot)

    def _proxyless(self, cs: ClusterSet, cluster: str) -> None:
        """Start the cluster's proxyless gRPC servers, and write a proxyless client identity (``grpc-client``)
        whose bootstrap a person or a test uses to call with ``xds:///`` from this cluster."""
        env_base = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
        for entry in self.run.clusters[cluster].proxyless:
            address = parse_hostport(entry.address)
            host, port = address.host, address.port
            proxy = ProxyInfo(
                kind=ProxyKind.GRPC, cluster=ClusterId(cluster),
                node_id=make_node_id(kind="grpc", ip=host, pod=entry.name, namespace=entry.namespace),
                namespace=_ns(entry.namespace), service_account=entry.service_account,
                services=(ServiceKey.parse(f"{entry.service}.{entry.namespace}"),),
                inbound=(InboundPort(port=port, app_port=port, name=entry.port_name, protocol="grpc"),),
                ip=host)
            boot = self._grpc_files(cs, cluster, entry.name, entry.namespace, entry.service_account, proxy)
            argv = [self.python, "-m", "meshfed.demogrpc", "serve", "--listen", entry.address, "--service",
                    entry.service, "--cluster", cluster, "--workload", entry.name]
            if entry.netns:
                argv = netns.in_ns(entry.netns, argv)
            self.progress(f"{cluster}: proxyless gRPC {entry.name} ({entry.service} on {entry.address})")
            extra = {"GRPC_XDS_BOOTSTRAP": str(boot)}  # recorded: 'meshfed restart' replays it
            rec = self._record(replace(procs.start(f"{cluster}/{entry.name}/grpc", argv,
                                                   log_path=self.run_dir / cluster / f"{entry.name}.grpc.log",
                                                   env={**env_base, **extra}), env=extra))
            self._update_cluster(cluster, functools.partial(ClusterState.with_proxyless, name=entry.name,
                                                            pid=rec.pid, log=rec.log, bootstrap=str(boot),
                                                            node_id=proxy.node_id))
        client = ProxyInfo(kind=ProxyKind.GRPC, cluster=ClusterId(cluster),
                           node_id=make_node_id(kind="grpc", ip="127.0.0.1", pod=f"{GRPC_CLIENT}-{cluster}",
                                                namespace="default"),
                           namespace=_ns("default"), service_account=GRPC_CLIENT)
        boot = self._grpc_files(cs, cluster, GRPC_CLIENT, "default", GRPC_CLIENT, client)
        grpc_client = GrpcClientState(bootstrap=str(boot), node_id=client.node_id,
                                      env={"GRPC_XDS_BOOTSTRAP": str(boot), "GRPC_EXPERIMENTAL_XDS_SNI": "true"})
        self._update_cluster(cluster, lambda c: replace(c, grpc_client=grpc_client))

    def _wait_proxyless(self) -> None:
        """A gRPC xDS server starts serving once the control plane sent its listener: wait for its port."""
        for cluster, c in self.run.clusters.items():
            for e in c.proxyless:
                address = parse_hostport(e.address)
                wait_until(f"{cluster} proxyless gRPC {e.name}",
                           functools.partial(_port_open, address.host, address.port), timeout=self.ready_timeout,
                           pids=[e.pid or 0], logs=[e.log])

    def _prometheus(self) -> None:
        """Debian's Prometheus scraping every metrics endpoint of the run (meshfed.prometheus), storage under the
        run directory, API on a loopback port; a run without it says so and carries on."""
        exe = prom.binary()
        if exe is None:
            reason = "prometheus is not installed (Debian package prometheus); the run has no metrics store"
            self.progress(reason)
            self.save(replace(self.run, prometheus=PrometheusState(url=None, reason=reason)))
            return
        pdir = private_dir(self.run_dir / "prometheus")
        config = prom.write_files(pdir, prom.run_targets(self.run), scrape_interval=self.scrape_interval)
        listen = f"127.0.0.1:{free_port()}"
        url = f"http://{listen}"
        rec = self._record(procs.start("prometheus", prom.command(exe, config=config, data=pdir / "data",
                                                                  listen=listen),
                                       log_path=pdir / "prometheus.log"))
        self.save(replace(self.run, prometheus=PrometheusState(
            url=url, address=listen, pid=rec.pid, log=rec.log, config=str(config.resolve()),
            scrape_interval_s=self.scrape_interval)))
        self.progress(f"prometheus on {url} (scrape every {self.scrape_interval:g}s, config {config})")
        wait_until("prometheus", functools.partial(prom.ready, url), timeout=self.ready_timeout, pids=[rec.pid],
                   logs=[rec.log])

    def _wait_envoys(self) -> None:
        self.progress("waiting for every Envoy to be ready")
        for cluster, c in self.run.clusters.items():
            gw = c.gateway
            wait_until(f"{cluster} east-west gateway", functools.partial(envoy_ready, gw.admin),
                       timeout=self.ready_timeout, pids=[gw.pid or 0], logs=[gw.log])
            for e in c.workloads:
                wait_until(f"{cluster} sidecar {e.name}", functools.partial(envoy_ready, e.sidecar_admin),
                           timeout=self.ready_timeout, pids=[e.sidecar_pid or 0], logs=[e.sidecar_log])


def _check_free(host: str, port: int) -> None:
    """Fail clearly when ``host:port`` (TCP) is taken (a port picked free on loopback, wanted on a bridge too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise LocalRunError(f"{host}:{port} is taken ({exc}); run 'meshfed up' again") from exc


def _check_dns_port(host: str, port: int) -> None:
    """Fail clearly when the cluster's DNS cannot have ``host:port`` (UDP and TCP): another DNS server bound to
    0.0.0.0:53 on this machine takes it from every address."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError as exc:
                raise LocalRunError(f"network: the cluster DNS needs {host}:{port} ({exc}; is another DNS server "
                                    "listening on 0.0.0.0:53?); stop it or use --network loopback") from exc


def _sidecar_node_id(w: WorkloadPlan, ip: str) -> str:
    return make_node_id(kind="sidecar", ip=ip, pod=w.name, namespace=w.namespace)


def _ns(value: str) -> Any:
    from discovery.model import namespace

    return namespace(value)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


# ---- reading a run, calling through it, stopping it ---------------------------------------------------------------


@overload
def read_state(run_dir: Path, *, missing_ok: Literal[False] = False) -> RunState: ...
@overload
def read_state(run_dir: Path, *, missing_ok: bool) -> RunState | None: ...


def read_state(run_dir: Path, *, missing_ok: bool = False) -> RunState | None:
    """The run in ``run_dir`` (:mod:`meshfed.runstate`); None with ``missing_ok`` when there is none. A missing,
    corrupt or foreign state.json is a :class:`LocalRunError` naming the file and what is wrong."""
    try:
        return runstate.read_state(run_dir, missing_ok=missing_ok)
    except runstate.RunStateError as exc:
        raise LocalRunError(str(exc)) from exc


def stopped_message(run_dir: Path, state: RunState) -> str:
    """What to tell someone asking about a run that 'meshfed down' stopped (nothing of it is running); "" for a run
    that is up, or whose processes died by themselves (status then names each dead process and its log)."""
    when = state.stopped_at
    if not when or running(state):
        return ""
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    return f"the run in {run_dir} was stopped ('meshfed down' at {at}); nothing is running"


def client_of(state: RunState, cluster: str) -> WorkloadState:
    """The client (``sleep``) workload of ``cluster`` in a run's state."""
    c = state.clusters.get(cluster)
    if c is None:
        raise LocalRunError(f"no cluster {cluster!r} in this run (clusters: {', '.join(state.clusters)})")
    for w in c.workloads:
        if not w.service:
            return w
    raise LocalRunError(f"cluster {cluster} has no client workload")


def pod_of(state: RunState, name: str) -> str:
    """The network namespace of workload ``name`` (a sidecar workload, a proxyless one, or
    ``eastwest-gateway-<cluster>``) in a netns run."""
    if state.network.mode != "netns":
        raise LocalRunError("this run is on loopback (no namespaces); 'meshfed up --network netns' makes one pod per "
                            "workload")
    names: list[str] = []
    for cluster, c in state.clusters.items():
        gw_name = f"eastwest-gateway-{cluster}"
        names.append(gw_name)
        if name == gw_name and c.gateway.netns:
            return c.gateway.netns
        every: tuple[WorkloadState | ProxylessState, ...] = (*c.workloads, *c.proxyless)
        for w in every:
            names.append(w.name)
            if w.name == name and w.netns:
                return w.netns
    raise LocalRunError(f"no workload {name!r} in this run (workloads: {', '.join(names)})")


def call(outbound: str, host: str, path: str = "/", *, timeout: float = 5.0) -> tuple[int, str]:
    """An HTTP request through a sidecar's outbound listener to ``host`` (the Host header picks the service)."""
    return http_get(f"http://{outbound}{path}", timeout=timeout, headers={"Host": host})


#: Run inside a pod by :func:`pod_get`: GET argv[1] (timeout argv[2]), print {"status", "body"} as JSON; a
#: connection that fails prints {"error"}. Standard library only (curl may not be installed).
POD_GET = r"""
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as resp:
        out = {"status": resp.status, "body": resp.read().decode(errors="replace")}
except urllib.error.HTTPError as exc:
    out = {"status": exc.code, "body": exc.read().decode(errors="replace")}
except (OSError, ValueError) as exc:
    out = {"error": f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"}
print(json.dumps(out))
"""


def pod_get(netns_name: str, url: str, *, timeout: float = 5.0, python: str = sys.executable) -> tuple[int, str]:
    """GET ``url`` from inside a pod's namespace, as its application would (DNS from the pod's resolv.conf, the
    connection captured by its sidecar); ``OSError`` if the connection failed."""
    argv = netns.in_ns(netns_name, [python, "-I", "-c", POD_GET, url, str(timeout)])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"GET {url} in {netns_name} did not finish") from exc
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise OSError(f"GET {url} in {netns_name}: exit {done.returncode}: {done.stderr.strip()[-300:]}") from exc
    if "error" in out:
        raise OSError(str(out["error"]))
    return int(out["status"]), str(out["body"])


def service_port(state: RunState, service: str) -> int:
    """The port of ``service`` (``NAME.NS``) as the run's workloads serve it (9080 for the demo's HTTP services)."""
    port = state.services_port(service)
    return 9080 if port is None else port


def request(state: RunState, client: WorkloadState, host: str, path: str = "/", *,
            timeout: float = 5.0) -> tuple[int, str]:
    """An HTTP request from a client workload to ``host`` (``NAME.NS.svc.clusterset.local``): on loopback through
    its sidecar's outbound listener with that Host; in a netns run from inside its pod, by DNS name and the
    service's port, as an application would."""
    if client.netns:
        port = service_port(state, host.split(".svc.")[0])
        return pod_get(client.netns, f"http://{host}:{port}{path}", timeout=timeout)
    return call(client.outbound, host, path, timeout=timeout)


def prove(state: RunState, *, timeout: float = 60.0) -> dict[str, Any]:
    """Send a cross-cluster request from the first cluster's client to a service only another cluster has (or,
    failing that, any imported service); returns what the callee answered. Bounded retries while xDS converges."""
    origin = next(iter(state.clusters))
    target = _remote_only_service(state, origin)
    client = client_of(state, origin)
    host = f"{target}.svc.clusterset.local"
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        try:
            last = request(state, client, host)
            if last[0] == 200:
                answer: dict[str, Any] = json.loads(last[1])
                return {"from": origin, "host": host, "status": 200, "answer": answer}
        except (OSError, ValueError) as exc:
            last = (0, str(exc))
        time.sleep(0.25)
    raise LocalRunError(f"cross-cluster request {origin} -> {host} did not succeed in {timeout:.0f}s "
                        f"(last: {last[0]} {last[1][:200]}); run 'meshfed diagnose {target} --from {origin}'")


def _remote_only_service(state: RunState, origin: str) -> str:
    local = {f"{w.service}.{w.namespace}" for w in state.clusters[origin].workloads if w.service}
    for cluster, c in state.clusters.items():
        if cluster == origin:
            continue
        for w in c.workloads:
            name = f"{w.service}.{w.namespace}"
            if w.service and name not in local:
                return name
    for c in state.clusters.values():
        for w in c.workloads:
            if w.service:
                return f"{w.service}.{w.namespace}"
    raise LocalRunError("the clusterset runs no service to call")


def is_running(rec: procs.ProcRecord) -> bool:
    """A process record of ``state.json`` still names a live process: same pid and same start time."""
    return procs.is_running(rec.pid, rec.start_time)


def _start_of(state: RunState, pid: int) -> int | None:
    rec = next((p for p in state.processes if p.pid == pid), None)
    return rec.start_time if rec else None


def stop_run(run_dir: Path, *, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Stop the run's processes by pid, newest first (all, or those whose name starts with one of ``names``).

    Each entry says ``was_running`` (the pid still belonged to the recorded process: same start time) and
    ``stopped``; a process already gone, or whose pid now belongs to another process, is never signalled."""
    state = read_state(run_dir, missing_ok=True)
    if state is None:
        return []
    wanted = list(names) if names is not None else None
    if wanted is None and running(state):
        state = replace(state, stopping_at=time.time())  # a supervising 'meshfed up' restarts nothing from now on
        write_state(run_dir, state)
    stopped: list[dict[str, Any]] = []
    for rec in reversed(state.processes):
        if wanted is not None and not any(rec.name.startswith(n) for n in wanted):
            continue
        was = is_running(rec)
        gone = procs.stop(rec.pid, start=rec.start_time) if was else True
        stopped.append({"name": rec.name, "pid": rec.pid, "was_running": was, "stopped": gone})
    if wanted is None and (any(s["was_running"] for s in stopped) or state.stopped_at is None):
        state = replace(state, stopped_at=time.time())
        write_state(run_dir, state)
    if wanted is None:
        remove_network(run_dir, read_state(run_dir, missing_ok=True) or state)
    return stopped


def remove_network(run_dir: Path, state: RunState) -> list[str]:
    """Remove what the run's netns bed created (its namespaces, links, resolv.conf and proxy directories; nothing
    else) and note it in the state; returns what could not be removed. Nothing to do for a loopback run, or one
    whose bed is already gone. Processes must be stopped first (a namespace outlives its name while one runs)."""
    net = state.network
    if net.mode != "netns" or not net.created:
        return []
    problems = netns.teardown(net.created, net.run_id)
    if not problems:
        net = replace(net, created=(), removed_at=time.time())
    else:
        net = replace(net, teardown_problems=tuple(problems))
        log.warning("netns bed not fully removed: %s", "; ".join(problems))
    write_state(run_dir, replace(state, network=net))
    return problems


def running(state: RunState) -> list[procs.ProcRecord]:
    """The run's recorded processes that still run (same pid, same start time)."""
    return [p for p in state.processes if is_running(p)]


def restart(run_dir: Path, name: str, *, timeout: float = 60.0) -> dict[str, Any]:
    """Start one recorded process of a running local run again, as it was first started (same argv, log, extra
    environment, working directory): stop it first if it still runs (identity-checked), then record the new pid and
    start time wherever the old pid was recorded, count the restart, and wait (bounded) until it is ready again
    (the federation's port, a control plane's /readyz, an Envoy's /ready)."""
    state = read_state(run_dir)
    stopped = stopped_message(run_dir, state)
    if stopped:
        raise LocalRunError(f"{stopped}; start a new run with 'meshfed up'")
    if state.stopping_at and not state.stopped_at:
        raise LocalRunError(f"the run in {run_dir} is being stopped ('meshfed down')")
    rec = state.process(name)
    if rec is None:
        names = ", ".join(p.name for p in state.processes)
        raise LocalRunError(f"no process {name!r} in the run in {run_dir} (processes: {names})")
    old = rec.pid
    was_running = is_running(rec)
    if was_running and not procs.stop(old, start=rec.start_time):
        raise LocalRunError(f"{name} (pid {old}) did not stop; see {rec.log}")
    env = None
    if rec.env:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")} | dict(rec.env)
    cwd = Path(state.cwd) if state.cwd else None
    new = procs.start(name, rec.argv, log_path=Path(rec.log) if cwd is None else cwd / rec.log, env=env, cwd=cwd)
    restarted = replace(rec, pid=new.pid, start_time=new.start_time, restarts=rec.restarts + 1,
                        restarted_at=time.time(), held=False)
    state = runstate.replace_pid(state.with_processes(lambda p: restarted if p.name == name else p), old, new.pid)
    write_state(run_dir, state)
    ready = _readiness(state, name)
    if ready is not None:
        wait_until(f"{name} after restart", ready, timeout=timeout, pids=[new.pid], logs=[new.log])
    log.info("restarted name=%s old_pid=%d pid=%d", name, old, new.pid)
    return {"name": name, "old_pid": old, "was_running": was_running, "pid": new.pid,
            "restarts": restarted.restarts, "log": rec.log}


SUPERVISOR = "supervisor"  # the recorded process of 'meshfed up --detach --supervise'


def start_supervisor(run_dir: Path, *, python: str = sys.executable) -> procs.ProcRecord:
    """Start ``meshfed supervise`` for a detached run, recorded last (so ``meshfed down`` stops it first)."""
    argv = [python, "-m", "meshfed", "supervise", "--run-dir", str(run_dir.resolve())]
    rec = procs.start(SUPERVISOR, argv, log_path=run_dir / "supervisor.log")
    write_state(run_dir, read_state(run_dir).with_process(rec))
    return rec


@dataclass
class Supervisor:
    """What a foreground ``meshfed up`` does while it waits: a recorded process that died (and was not stopped on
    purpose, by ``meshfed down`` or :func:`stop_workload`) is started again with :func:`restart`, with exponential
    backoff per process (``initial_backoff`` doubling to ``max_backoff``; back to the start once it has stayed up for
    ``max_backoff``). Each restart is counted in the state (``restarts``), which ``meshfed status`` shows."""

    run_dir: Path
    initial_backoff: float = 1.0
    max_backoff: float = 30.0
    ready_timeout: float = 30.0
    _next: dict[str, float] = field(default_factory=dict)
    _backoff: dict[str, float] = field(default_factory=dict)
    _since: dict[str, float] = field(default_factory=dict)

    def tick(self, now: float | None = None) -> list[str]:
        """One pass; returns the names restarted. Nothing happens once the run is stopping or stopped."""
        state = read_state(self.run_dir, missing_ok=True)
        if state is None or state.stopping_at or state.stopped_at:
            return []
        now = time.monotonic() if now is None else now
        done: list[str] = []
        for rec in state.processes:
            name = rec.name
            if rec.held or name == SUPERVISOR:
                continue
            if is_running(rec):
                if now - self._since.get(name, now) >= self.max_backoff:
                    self._backoff.pop(name, None)
                continue
            if now < self._next.get(name, 0.0):
                continue
            wait = self._backoff.get(name, self.initial_backoff)
            self._backoff[name] = min(wait * 2, self.max_backoff)
            self._next[name] = now + wait
            try:
                restart(self.run_dir, name, timeout=self.ready_timeout)
            except LocalRunError as exc:
                log.warning("restart failed name=%s error=%s; next try in %.0fs", name, exc, wait)
                continue
            self._since[name] = now
            done.append(name)
        return done


def _readiness(state: RunState, name: str) -> Callable[[], bool] | None:
    if name == "federation":
        if state.federation is None or not state.federation.url:
            return None
        address = parse_hostport(state.federation.url.removeprefix("https://"))
        return functools.partial(_port_open, address.host, address.port)
    cluster, _, rest = name.partition("/")
    c = state.clusters.get(cluster)
    if c is None:
        return None
    if rest == "controlplane":
        admin = c.controlplane.admin
        return lambda: http_get(f"http://{admin}/readyz")[0] == 200
    if rest == "eastwest-gateway":
        return functools.partial(envoy_ready, c.gateway.admin)
    w = c.workload(rest)
    return functools.partial(envoy_ready, w.sidecar_admin) if w is not None else None


def stop_workload(run_dir: Path, cluster: str, name: str) -> dict[str, Any]:
    """Stop one demo workload (its app and sidecar, by pid) the way Kubernetes sees a deleted pod: its endpoint
    leaves the ready set (``ready: false`` in the cluster's ``runtime.json``, which the control plane re-reads), so
    the cluster withdraws it from EDS and from the federation's ready counts."""
    state = read_state(run_dir)
    c = state.clusters.get(cluster)
    entry = c.workload(name) if c is not None else None
    if entry is None:
        raise LocalRunError(f"no workload {name!r} in cluster {cluster!r} of the run in {run_dir}")
    runtime_path = run_dir / cluster / "runtime.json"
    if entry.service:
        runtime = json.loads(runtime_path.read_text()) if runtime_path.exists() else {"endpoints": {}}
        ep = runtime.setdefault("endpoints", {}).setdefault(entry.manifest_address or entry.address, {})
        ep["ready"] = False
        write_json(runtime_path, runtime)
    stopped = {}
    pids = (("sidecar_pid", entry.sidecar_pid), ("app_pid", entry.app_pid))
    held = {pid for _, pid in pids if pid}
    # Stopped on purpose: a supervising 'meshfed up' leaves it stopped.
    state = state.with_processes(lambda p: replace(p, held=True) if p.pid in held else p)
    write_state(run_dir, state)
    for key, pid in pids:
        if pid:
            stopped[key] = procs.stop(pid, start=_start_of(state, pid))
    log.info("workload stopped cluster=%s name=%s", cluster, name)
    return {"cluster": cluster, "workload": name, **stopped}


# ---- faults: partitions (netns runs) and stopped components --------------------------------------------------------


def network_plan(state: RunState) -> netplan.NetPlan:
    """The recorded plan of a netns run whose bed is up; ``LocalRunError`` for a loopback run or a removed bed."""
    net = state.network
    if net.mode != "netns":
        raise LocalRunError("this run is on loopback: partitions need 'meshfed up --network netns'")
    if not net.created:
        raise LocalRunError("this run's network is gone ('meshfed down' removed it)")
    if net.plan is None:
        raise LocalRunError("state.json: network.plan: missing")
    return net.plan


def partition(run_dir: Path, cluster: str, peers: Sequence[str] = (), *, heal: bool = False) -> bool:
    """Cut ``cluster``'s gateway off the public network (from ``peers`` only, if given), or heal it; records the
    partition in the state (``meshfed status`` shows it). True if something changed."""
    state = read_state(run_dir)
    plan = network_plan(state)
    known = [c.cluster for c in plan.clusters]
    for name in (cluster, *peers):
        if name not in known:
            raise LocalRunError(f"no cluster {name!r} in this run (clusters: {', '.join(known)})")
    try:
        changed = netns.heal(plan, cluster) if heal else netns.partition(plan, cluster, peers)
    except netns.NetnsError as exc:
        raise LocalRunError(str(exc)) from exc
    parts = dict(state.network.partitions or {})
    if heal:
        parts.pop(cluster, None)
    else:
        whole = not peers or parts.get(cluster) == ()  # () means cut off from every other cluster
        parts[cluster] = () if whole else tuple(sorted(set(parts.get(cluster, ())) | set(peers)))
    write_state(run_dir, replace(state, network=replace(state.network, partitions=parts)))
    log.info("%s cluster=%s peers=%s changed=%s", "heal" if heal else "partition", cluster, ",".join(peers), changed)
    return changed


def _component(state: RunState, name: str) -> tuple[str, str]:
    """(kind, canonical name) of a component: ``federation``, ``CLUSTER/controlplane``,
    ``CLUSTER/eastwest-gateway`` (or ``eastwest-gateway-CLUSTER``), or a workload (``NAME`` or ``CLUSTER/NAME``)."""
    procs_by_name = {p.name for p in state.processes}
    if name in procs_by_name and (name == "federation" or name.endswith(("/controlplane", "/eastwest-gateway"))):
        return "process", name
    for cluster, c in state.clusters.items():
        if name == f"eastwest-gateway-{cluster}":
            return "process", f"{cluster}/eastwest-gateway"
        for w in c.workloads:
            if name in (w.name, f"{cluster}/{w.name}"):
                return "workload", f"{cluster}/{w.name}"
    choices = sorted(n for n in procs_by_name if n == "federation" or n.endswith(("/controlplane",
                                                                                  "/eastwest-gateway")))
    workloads = [w.name for c in state.clusters.values() for w in c.workloads]
    raise LocalRunError(f"no component {name!r} (components: {', '.join(choices + workloads)})")


def stop_component(run_dir: Path, name: str) -> dict[str, Any]:
    """Stop one component by pid and keep it stopped (a supervising ``meshfed up`` leaves it): a workload as
    :func:`stop_workload` does (its endpoint leaves the ready set), anything else as its process dying."""
    state = read_state(run_dir)
    kind, full = _component(state, name)
    if kind == "workload":
        cluster, _, workload = full.partition("/")
        return {"component": full, **stop_workload(run_dir, cluster, workload)}
    rec = state.process(full)
    assert rec is not None  # _component found it
    write_state(run_dir, state.with_processes(lambda p: replace(p, held=True) if p.name == full else p))
    was = is_running(rec)
    stopped = procs.stop(rec.pid, start=rec.start_time) if was else True
    log.info("component stopped name=%s pid=%s", full, rec.pid)
    return {"component": full, "pid": rec.pid, "was_running": was, "stopped": stopped}


def start_component(run_dir: Path, name: str, *, timeout: float = 60.0) -> dict[str, Any]:
    """Start a component :func:`stop_component` stopped (or that died) again, as it was first started."""
    state = read_state(run_dir)
    kind, full = _component(state, name)
    if kind == "process":
        return {"component": full, **restart(run_dir, full, timeout=timeout)}
    cluster, _, workload = full.partition("/")
    entry = state.clusters[cluster].workload(workload)
    assert entry is not None  # _component found it
    started = []
    for proc_name in (f"{cluster}/{workload}/app", f"{cluster}/{workload}"):
        if state.process(proc_name) is not None:
            started.append(restart(run_dir, proc_name, timeout=timeout))
    runtime_path = run_dir / cluster / "runtime.json"
    if entry.service and runtime_path.exists():
        runtime = json.loads(runtime_path.read_text())
        ep = runtime.setdefault("endpoints", {}).setdefault(entry.manifest_address or entry.address, {})
        ep.pop("ready", None)
        write_json(runtime_path, runtime)
    log.info("component started name=%s", full)
    return {"component": full, "restarted": [s["name"] for s in started]}
