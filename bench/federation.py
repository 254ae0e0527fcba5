"""Federation propagation: one cluster's publish -> every other agent's registry, at 10 clusters x 1,000 services.

    .venv/bin/python bench/federation.py [--clusters 10] [--services 1000] [--rounds 30] [--store sqlite|etcd]

Starts ``meshfed federation serve`` as a child process (SQLite store in a temporary directory, or a temporary etcd
with ``--store etcd``), then ``--clusters`` agents, each with a real mTLS client, each publishing
``--services`` services (one ready endpoint each); the agents run in ``--agent-procs`` worker processes (a control
plane is a process of its own: 50 agents in one process would measure one GIL's queue). Once every agent holds the
whole catalog, each round picks the
next cluster, adds one service to its export set and publishes the whole set again; the clock runs from just
before the publish call to the moment each other agent's ``Registry`` (``agent.apply``, in the agent's update
callback) contains the new service.

Prints p50/p99 of that propagation (per receiving agent, and to the last agent of a round), the service's RSS
(idle, loaded, and per cluster), and as a baseline measured in the same run, the raw store's write latency for
the same export set (``put_exports`` on a store of the same kind from this process, no HTTP, no catalog) with the
ratio between them.
Goal: p99 propagation under 500 ms.
"""

# ruff: noqa: E402 - the script's own directory must leave sys.path before the federation package is imported

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0], and this file (federation.py) would shadow the federation package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from discovery.model import (
    ClusterId,
    ClusterInfo,
    Endpoint,
    NetworkId,
    Registry,
    Service,
    ServiceExport,
    ServiceKey,
    ServicePort,
)
from federation import catalog as cat
from federation.agent import AgentConfig, FederationAgent, export_set
from federation.client import FederationClient
from federation.records import Member
from federation.store.factory import open_store
from federation.trust.bundle import TrustBundle
from federation.trust.ca import RootCA, create_intermediate, create_root, issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import write_cluster_dir
from federation.trust.tls import client_ssl_context

GOAL_P99_S = 0.5
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (its threads included), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def local_snapshot(cluster: str, n: int, extra: int = 0) -> tuple[list[Service], list[ServiceExport]]:
    cid = ClusterId(cluster)
    services, exports = [], []
    names = [f"{cluster}-s{i}" for i in range(n)] + [f"{cluster}-probe{j}" for j in range(extra)]
    for i, name in enumerate(names):
        key = ServiceKey.parse(f"{name}.default")
        ep = Endpoint(address=f"10.{i // 62500 % 250}.{i // 250 % 250}.{i % 250 + 1}", zone="z1")
        services.append(Service(cluster=cid, key=key, ports=(ServicePort(port=8080, name="http"),), endpoints=(ep,)))
        exports.append(ServiceExport(cluster=cid, key=key, created=T0))
    return services, exports


def cluster_info(cluster: str, index: int) -> ClusterInfo:
    # Two networks, so half the agents get pod addresses and half only summaries.
    return ClusterInfo(id=ClusterId(cluster), network=NetworkId(f"net{index % 2}"), region="r1", zone="z1",
                       gateway_host="127.0.0.1", gateway_port=15443)


async def baseline_store_writes(setup: Setup, services: int, rounds: int) -> list[float]:
    """The raw store of the same kind: put_exports of the same export set, from this process (durable write, no
    HTTP, no validation, no catalog): a separate SQLite file, or a separate key prefix on the same etcd."""
    url = f"{setup.store_url}/bench-baseline" if setup.store_url.startswith("etcd://") else \
        f"sqlite:{setup.tmp / 'baseline.db'}"
    store = open_store(url)
    info = cluster_info("base", 0)
    await store.put_member(Member(info=info, registered_at=T0, renewed_at=datetime.now(UTC), lease_ttl_s=3600))
    times = []
    for r in range(rounds):
        es = export_set(info, *local_snapshot("base", services, extra=r + 1), generation=r + 1)
        started = time.perf_counter()
        await store.put_exports(es)
        times.append(time.perf_counter() - started)
    await store.close()
    return times


@dataclass
class Setup:
    tmp: Path
    root: RootCA
    td: TrustDomain
    bundle: TrustBundle
    url: str
    port: int
    service: subprocess.Popen[bytes]
    etcd: subprocess.Popen[bytes] | None
    store_url: str = ""
    keep_log: bool = False


def start(args: argparse.Namespace) -> Setup:
    """The federation service process (and etcd for --store etcd) on free loopback ports."""
    tmp = Path(tempfile.mkdtemp(prefix="meshfed-bench-federation-"))
    td = TrustDomain("bench.meshfed")
    root = create_root(td)
    bundle = TrustBundle(td, (root.cert,))
    write_cluster_dir(tmp / "fed-ca", create_intermediate(root, SpiffeId.federation(td)), bundle)
    etcd_proc = None
    if args.store == "etcd":
        etcd_port, peer_port = free_port(), free_port()
        etcd_proc = subprocess.Popen(
            [shutil.which("etcd") or "/usr/bin/etcd", "--data-dir", str(tmp / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        store_url = f"etcd://127.0.0.1:{etcd_port}"
        time.sleep(2.0)
    else:
        store_url = f"sqlite:{tmp / 'fed.db'}"
    port = free_port()
    with open(tmp / "service.log", "wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "meshfed"), *(["-vv"] if args.service_log else []),
             "federation", "serve", "--store", store_url,
             "--listen", f"127.0.0.1:{port}", "--ca", str(tmp / "fed-ca"), "--lease-ttl", "60"],
            stdout=log, stderr=subprocess.STDOUT)
    return Setup(tmp, root, td, bundle, f"https://127.0.0.1:{port}", port, proc, etcd_proc, store_url,
                 args.service_log)


def stop(setup: Setup) -> None:
    for p in (setup.service, setup.etcd):
        if p is None:
            continue
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if setup.keep_log:
        print(f"  service log kept: {setup.tmp / 'service.log'}")
    else:
        shutil.rmtree(setup.tmp, ignore_errors=True)


# ---- the agents: each cluster's agent in one of --agent-procs worker processes -------------------------------------
#
# A control plane is a process of its own; 50 agents in one process would serialise their work on one GIL and
# measure that instead. The workers and this process share CLOCK_MONOTONIC (time.monotonic), so a time taken in
# one is comparable with a time taken in another. Protocol: one JSON object per line, commands on the worker's
# stdin, events on its stdout.


def _emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def worker(args: argparse.Namespace) -> None:
    """(A worker process.) Run the agents of ``--names``; publish, report arrivals and acks as told."""
    names = args.names.split(",")
    creds = Path(args.creds)
    bundle_pem = (creds / "bundle.pem").read_bytes()
    td = TrustDomain(args.trust_domain)
    from federation.trust.bundle import load_pem_certs
    bundle = TrustBundle(td, tuple(load_pem_certs(bundle_pem, what="bundle")))
    registries: dict[str, Registry] = {n: Registry(local=ClusterId(n)) for n in names}
    expected: dict[str, ServiceKey] = {}  # probe (as text) -> key, reported once per agent
    seen: set[tuple[str, str]] = set()
    agents: dict[str, FederationAgent] = {}
    clients: list[FederationClient] = []

    def on_update_for(name: str) -> object:
        def on_update(_c: cat.Catalog) -> None:
            registries[name] = agents[name].apply(registries[name])
            now = time.monotonic()
            for text, key in list(expected.items()):
                owner = ClusterId(key.name.split("-")[0])
                if owner != name and (name, text) not in seen and key in registries[name].remote.get(owner, {}):
                    seen.add((name, text))
                    _emit(ev="arrive", cluster=name, probe=text, t=now)
        return on_update

    config = AgentConfig(backoff_initial_s=0.1, backoff_max_s=1.0)
    try:
        for name in names:
            d = creds / name
            client = FederationClient(args.url, ssl_context=client_ssl_context(
                (d / "chain.pem").read_bytes(), (d / "key.pem").read_bytes(), bundle), cluster=ClusterId(name),
                bundle=bundle, request_timeout_s=60, watch_idle_timeout_s=60)
            await client.__aenter__()
            clients.append(client)
            agent = FederationAgent(client, info=cluster_info(name, int(name[1:])), config=config,
                                    on_update=on_update_for(name))  # type: ignore[arg-type]
            agents[name] = agent
            await agent.__aenter__()
        gens = {n: agents[n].publish(*local_snapshot(n, args.services)) for n in names}
        for n, g in gens.items():
            await asyncio.wait_for(agents[n].wait_published(g), 600)
        for a in agents.values():
            await asyncio.wait_for(a.wait_for(lambda c: len(c.services) >= args.total), 600)
        _emit(ev="ready")
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                           sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "expect":
                expected[cmd["probe"]] = ServiceKey.parse(cmd["probe"])
                _emit(ev="expecting", probe=cmd["probe"])
            elif cmd["cmd"] == "publish":
                name = cmd["cluster"]
                snap = local_snapshot(name, args.services, extra=cmd["extra"])
                t0 = time.monotonic()
                gen = agents[name].publish(*snap)
                _emit(ev="start", cluster=name, t=t0)
                await asyncio.wait_for(agents[name].wait_published(gen), 60)
                _emit(ev="acked", cluster=name, t=time.monotonic())
            elif cmd["cmd"] == "quit":
                break
        _emit(ev="rss", mb=rss_mb(os.getpid()), agents=len(names))
    finally:
        for agent in reversed(list(agents.values())):
            await agent.__aexit__(None, None, None)
        for client in clients:
            await client.close()


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    names: list[str]


async def _read_events(w: _Worker, events: asyncio.Queue[dict[str, Any]]) -> None:
    """Every worker's events go to one queue, in the order they arrive here (asyncio pipes: no thread per
    worker, which a default executor of a few threads could not give ten workers)."""
    assert w.proc.stdout is not None
    while True:
        line = (await w.proc.stdout.readline()).decode()
        if not line:
            await events.put({"ev": "exit", "worker": w.names[0], "rc": w.proc.returncode})
            return
        try:
            await events.put(json.loads(line))
        except ValueError:  # not an event (the profiler's report)
            sys.stderr.write(line)


async def _collect(events: asyncio.Queue[dict[str, Any]], kind: str, count: int, within: float,
                   **match: object) -> list[dict[str, Any]]:
    """The next ``count`` events of ``kind`` (with the ``match`` fields); others are dropped."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while len(got) < count:
            event = await events.get()
            if event["ev"] == "exit":
                raise RuntimeError(f"agent worker {event['worker']}.. exited (rc {event['rc']})")
            if event["ev"] == kind and all(event.get(k) == v for k, v in match.items()):
                got.append(event)
    return got


def _send(w: _Worker, **cmd: object) -> None:
    assert w.proc.stdin is not None
    w.proc.stdin.write((json.dumps(cmd) + "\n").encode())  # a line: the pipe takes it at once


async def run(args: argparse.Namespace, setup: Setup) -> None:
    td, bundle, url, port, proc = setup.td, setup.bundle, setup.url, setup.port, setup.service
    root = setup.root
    for _ in range(200):  # bounded: until the service listens
        try:
            _r, conn = await asyncio.open_connection("127.0.0.1", port)
            conn.close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    idle_rss = rss_mb(proc.pid)
    names = [f"c{i}" for i in range(args.clusters)]
    creds = setup.tmp / "agents"
    (creds).mkdir(mode=0o700)
    (creds / "bundle.pem").write_bytes(bundle.to_pem())
    for name in names:
        key_pem, chain = issue_workload(create_intermediate(root, SpiffeId.cluster(td, name)),
                                        SpiffeId.cluster(td, name), ttl=timedelta(hours=2))
        (creds / name).mkdir(mode=0o700)
        (creds / name / "chain.pem").write_bytes(b"".join(chain))
        (creds / name / "key.pem").write_bytes(key_pem)
        (creds / name / "key.pem").chmod(0o600)
    procs_n = max(1, min(args.agent_procs, args.clusters))
    groups = [names[k::procs_n] for k in range(procs_n)]
    total = args.clusters * args.services
    workers: list[_Worker] = []
    readers: list[asyncio.Task[None]] = []
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    try:
        started = time.monotonic()
        for k, group in enumerate(groups):
            cmd = [sys.executable, __file__, "--worker", "--names", ",".join(group), "--url", url, "--creds",
                   str(creds), "--trust-domain", str(td), "--services", str(args.services), "--total", str(total)]
            if args.profile and k == 0:
                cmd = [sys.executable, "-m", "cProfile", "-s", "tottime", *cmd[1:]]
            wp = await asyncio.create_subprocess_exec(*cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                      start_new_session=True, limit=1 << 20)
            workers.append(_Worker(wp, group))
            readers.append(asyncio.create_task(_read_events(workers[-1], events)))
        await _collect(events, "ready", len(workers), 900)
        load_s = time.monotonic() - started
        loaded_rss = rss_mb(proc.pid)
        owner_of = {n: w for w in workers for n in w.names}
        cpu_before = (cpu_s(proc.pid), sum(cpu_s(w.proc.pid) for w in workers))

        publish_acks: list[float] = []
        per_agent: list[float] = []
        after_ack: list[float] = []
        round_max: list[float] = []
        for r in range(args.rounds):
            name = names[r % args.clusters]
            extra = r // args.clusters + 1
            probe = f"{name}-probe{extra - 1}.default"
            for w in workers:
                _send(w, cmd="expect", probe=probe)
            await _collect(events, "expecting", len(workers), 30, probe=probe)
            _send(owner_of[name], cmd="publish", cluster=name, extra=extra)
            arrivals: dict[str, float] = {}
            t0 = acked = None
            deadline = asyncio.get_running_loop().time() + 60
            while len(arrivals) < args.clusters - 1 or acked is None or t0 is None:
                try:
                    event = await asyncio.wait_for(events.get(), deadline - asyncio.get_running_loop().time())
                except TimeoutError:
                    missing = sorted(set(names) - set(arrivals) - {name}, key=lambda n: int(n[1:]))
                    raise RuntimeError(f"round {r}: {probe} not seen within 60 s by {missing} (started: "
                                       f"{t0 is not None}, acknowledged: {acked is not None})") from None
                if event["ev"] == "arrive" and event["probe"] == probe:
                    arrivals[event["cluster"]] = event["t"]
                elif event["ev"] == "start" and event["cluster"] == name:
                    t0 = event["t"]
                elif event["ev"] == "acked" and event["cluster"] == name:
                    acked = event["t"]
                elif event["ev"] == "exit":
                    raise RuntimeError(f"agent worker {event['worker']}.. exited (rc {event['rc']})")
            ack = acked - t0
            publish_acks.append(ack)
            lat = [t - t0 for t in arrivals.values()]
            per_agent.extend(lat)
            after_ack.extend(max(0.0, x - ack) for x in lat)
            round_max.append(max(lat))
            await asyncio.sleep(0.05)
        final_rss = rss_mb(proc.pid)
        # The rounds' pauses (0.05 s each) and the expect handshakes cost a little CPU too; it is counted here.
        service_cpu = (cpu_s(proc.pid) - cpu_before[0]) / args.rounds
        agents_cpu = (sum(cpu_s(w.proc.pid) for w in workers) - cpu_before[1]) / args.rounds
        worker_rss: list[tuple[float, int]] = []
        for w in workers:
            _send(w, cmd="quit")
        for ev in await _collect(events, "rss", len(workers), 60):
            worker_rss.append((ev["mb"], ev["agents"]))
        base = await baseline_store_writes(setup, args.services, max(args.rounds, 10))

        print(f"federation bench: {args.clusters} clusters x {args.services} services, store={args.store}, "
              f"{args.rounds} rounds (each: one cluster republishes {args.services}+ services with one new); "
              f"the agents in {procs_n} processes; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        print(f"  initial load: {total} services published and seen by every agent in {load_s:.2f} s")
        print(f"  propagation publish -> other agent's registry: p50 {pct(per_agent, 50) * 1000:.1f} ms, "
              f"p99 {pct(per_agent, 99) * 1000:.1f} ms  (n={len(per_agent)})")
        print(f"  propagation to the last agent of a round:      p50 {pct(round_max, 50) * 1000:.1f} ms, "
              f"p99 {pct(round_max, 99) * 1000:.1f} ms  (goal p99 < {GOAL_P99_S * 1000:.0f} ms: "
              f"{'met' if pct(round_max, 99) < GOAL_P99_S else 'NOT met'})")
        print(f"  publish acknowledged (HTTP PUT, durable):      p50 {pct(publish_acks, 50) * 1000:.1f} ms, "
              f"p99 {pct(publish_acks, 99) * 1000:.1f} ms")
        print(f"  from acknowledgement to other agent's registry: p50 {pct(after_ack, 50) * 1000:.1f} ms, "
              f"p99 {pct(after_ack, 99) * 1000:.1f} ms")
        print(f"  baseline: raw {args.store} store put_exports of the same set: p50 {pct(base, 50) * 1000:.1f} "
              f"ms, p99 {pct(base, 99) * 1000:.1f} ms")
        print(f"  ratio propagation/raw store write: p50 {pct(per_agent, 50) / pct(base, 50):.1f}x, "
              f"p99 {pct(round_max, 99) / pct(base, 99):.1f}x")
        print(f"  CPU per round: service {service_cpu * 1000:.0f} ms, agents {agents_cpu * 1000:.0f} ms in all "
              f"({agents_cpu * 1000 / args.clusters:.1f} ms per agent); {os.cpu_count()} CPUs")
        print(f"  service RSS: idle {idle_rss:.0f} MB, loaded {loaded_rss:.0f} MB, after rounds {final_rss:.0f} MB; "
              f"per cluster {(final_rss - idle_rss) / args.clusters:.1f} MB "
              f"({(final_rss - idle_rss) * 1024 / total:.1f} KB per exported service)")
        per_agent_mb = sum(mb for mb, _ in worker_rss) / max(1, sum(n for _, n in worker_rss))
        print(f"  agent RSS (the catalog of {total} services in each): {per_agent_mb:.0f} MB per agent on average "
              f"({procs_n} processes, {sum(mb for mb, _ in worker_rss):.0f} MB in all)")
    finally:
        for t in readers:
            t.cancel()
        for w in workers:
            if w.proc.returncode is None:
                w.proc.terminate()
            try:
                await asyncio.wait_for(w.proc.wait(), 20)
            except TimeoutError:
                w.proc.kill()
                await asyncio.wait_for(w.proc.wait(), 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--store", choices=["sqlite", "etcd"], default="sqlite")
    ap.add_argument("--service-log", action="store_true", help="run the service with -vv and keep its log")
    ap.add_argument("--agent-procs", type=int, default=10, help="worker processes the agents run in")
    ap.add_argument("--profile", action="store_true", help="cProfile the first agent worker (printed at its end)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--names", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--creds", help=argparse.SUPPRESS)
    ap.add_argument("--trust-domain", help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        asyncio.run(worker(args))
        return
    setup = start(args)
    try:
        asyncio.run(run(args, setup))
    finally:
        stop(setup)


if __name__ == "__main__":
    main()
