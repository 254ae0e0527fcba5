"""clusterset.local DNS throughput: our server against Debian's nsd serving the same records, in one run.

    .venv/bin/python bench/dns.py [--services 10000] [--duration 10] [--rounds 2] [--clients 4] [--skip-asyncio]

Builds a registry of ``--services`` exported services (nine in ten ClusterSetIP with a named port, one in ten
headless with three ready endpoints in two clusters), then for each server in turn:

  * our server on uvloop, in a subprocess (``bench/dns.py --serve``), one process = one core at most;
  * our server on asyncio's default loop, likewise (skip with ``--skip-asyncio``);
  * Debian's nsd (``server-count: 1``, one process), with a zone file written from the same table
    (``DnsTable.zone_text()``), on a free loopback port, own config in a temporary folder, stopped by pid;

checks that a sample of names gets the same answers from ours and nsd, drives each with ``dnsperf`` for
``--duration`` seconds over UDP (A and SRV questions for every service, shuffled), ``--rounds`` times in turn
(all servers stay up; only the one driven is busy), and prints the best queries/s of each, lost queries and the
ratios. The machine's cores are shared with dnsperf itself (and with whatever else runs), so
absolute numbers are a floor; the ratio is measured side by side.

Goal: at least 10,000 queries/s per core for our server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# This file is named dns.py: drop its own folder from the path so ``import dns`` finds dnspython, not this script.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402

from discovery.dns.server import DnsServer, run  # noqa: E402
from discovery.dns.table import APEX, DnsTable, build_table  # noqa: E402
from discovery.model import (  # noqa: E402
    Endpoint,
    Protocol,
    Registry,
    Service,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceType,
    cluster_id,
    namespace,
    service_name,
)
from meshfed.local import free_port  # noqa: E402

GOAL = 10_000
UVLOOP, ASYNCIO, NSD = "meshfed (uvloop)", "meshfed (asyncio)", "nsd 4 (1 process)"
HOST = "127.0.0.1"


def bench_registry(services: int) -> Registry:
    east, west = cluster_id("east"), cluster_id("west")
    http = ServicePort(8080, Protocol.TCP, "http")
    shards: dict[str, list[Service]] = {east: [], west: []}
    imports: dict[ServiceKey, ServiceImport] = {}
    for i in range(services):
        key = ServiceKey(namespace=namespace(f"ns-{i % 100}"), name=service_name(f"svc-{i}"))
        if i % 10 == 9:
            for c, cluster in enumerate((east, west)):
                eps = tuple(
                    Endpoint(f"10.{100 + c}.{(i >> 8) & 255}.{(i & 255)}", hostname=f"pod-{j}") if j == 0 else
                    Endpoint(f"10.{110 + c + 2 * j}.{(i >> 8) & 255}.{(i & 255)}", hostname=f"pod-{j}")
                    for j in range(2 if c == 0 else 1)
                )
                shards[cluster].append(Service(cluster, key, (http,), headless=True, endpoints=eps))
            imports[key] = ServiceImport(key, ServiceType.HEADLESS, (http,), (east, west))
        else:
            shards[east].append(Service(east, key, (http,), cluster_ip=f"10.96.{i >> 8 & 255}.{i & 255}"))
            imports[key] = ServiceImport(
                key, ServiceType.CLUSTER_SET_IP, (http,), (east,), ips=(f"241.{i >> 16}.{(i >> 8) & 255}.{i & 255}",)
            )
    registry = Registry(local=east).with_shard(east, shards[east]).with_shard(west, shards[west])
    return registry.with_catalog(clusters={}, imports=imports)


def query_lines(services: int) -> list[str]:
    lines = []
    for i in range(services):
        host = f"svc-{i}.ns-{i % 100}.svc.clusterset.local"
        lines.append(f"{host} A")
        if i % 3 == 0:
            lines.append(f"_http._tcp.{host} SRV")
    random.Random(1645).shuffle(lines)
    return lines


def free_udp_tcp_port() -> int:
    return free_port(HOST, udp_too=True)


def wait_answering(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    query = dns.message.make_query("dns-version." + APEX, "TXT")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            dns.query.udp(query, HOST, port=port, timeout=0.5)
            return
        except (dns.exception.Timeout, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not answer within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def dnsperf(port: int, queries: Path, *, duration: int, clients: int) -> dict[str, float]:
    out = subprocess.run(
        ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(queries), "-l", str(duration), "-c", str(clients),
         "-T", "1", "-q", "200", "-t", "2"],
        capture_output=True, text=True, timeout=duration + 60, check=False,
    )
    text = out.stdout + out.stderr

    def number(pattern: str) -> float:
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(f"dnsperf output without {pattern!r}:\n{text}")
        return float(m.group(1))

    return {
        "qps": number(r"Queries per second:\s+([\d.]+)"),
        "sent": number(r"Queries sent:\s+(\d+)"),
        "lost": number(r"Queries lost:\s+(\d+)"),
        "latency_ms": number(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
    }


def answers(port: int, name: str, type_: str, *, tcp: bool = False) -> tuple[int, frozenset[str]]:
    query = dns.message.make_query(name, type_, use_edns=False)
    reply = dns.query.tcp(query, HOST, port=port, timeout=3) if tcp else dns.query.udp(
        query, HOST, port=port, timeout=3)
    return reply.rcode(), frozenset(f"{rr.name} {rr.ttl} {rd}" for rr in reply.answer for rd in rr)


def same_answers(ours: int, nsd: int, lines: Sequence[str]) -> int:
    sample = [
        *lines[:150],
        f"svc-9.ns-9.svc.{APEX} A", f"pod-0.east.svc-9.ns-9.svc.{APEX} A", f"_http._tcp.svc-9.ns-9.svc.{APEX} SRV",
        f"dns-version.{APEX} TXT", f"nosuch.ns-1.svc.{APEX} A", f"svc-0.ns-0.svc.{APEX} AAAA",
    ]
    for line in sample:
        name, type_ = line.split()
        a, b = answers(ours, name, type_, tcp=True), answers(nsd, name, type_, tcp=True)
        if a != b:
            raise RuntimeError(f"answers differ for {name} {type_}:\n ours {sorted(a[1])} {a[0]}\n nsd  {sorted(b[1])} "
                               f"{b[0]}")
    return len(sample)


def nsd_config(directory: Path, port: int) -> Path:
    conf = directory / "nsd.conf"
    conf.write_text(
        "server:\n"
        f"    ip-address: {HOST}@{port}\n"
        f"    port: {port}\n"
        "    server-count: 1\n"
        '    username: ""\n'
        '    chroot: ""\n'
        f'    zonesdir: "{directory}"\n'
        '    database: ""\n'
        f'    pidfile: "{directory}/nsd.pid"\n'
        f'    xfrdfile: "{directory}/xfrd.state"\n'
        f'    zonelistfile: "{directory}/zone.list"\n'
        f'    xfrdir: "{directory}"\n'
        f'    logfile: "{directory}/nsd.log"\n'
        "    do-ip6: no\n"
        "    verbosity: 1\n"
        "remote-control:\n"
        "    control-enable: no\n"
        "zone:\n"
        "    name: clusterset.local\n"
        f'    zonefile: "{directory}/clusterset.local.zone"\n'
    )
    return conf


def serve(port: int, services: int, use_uvloop: bool) -> None:
    """Child process: build the table, serve it until SIGTERM."""

    async def main() -> None:
        table = build_table(bench_registry(services))
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        async with DnsServer(host=HOST, port=port, table=table):
            await stopped.wait()

    run(main(), use_uvloop=use_uvloop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--duration", type=int, default=10, help="seconds dnsperf drives each server")
    ap.add_argument("--clients", type=int, default=4, help="dnsperf -c")
    ap.add_argument("--rounds", type=int, default=2, help="drive every server this many times, keep the best")
    ap.add_argument("--skip-asyncio", action="store_true", help="do not measure the default asyncio loop")
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--no-uvloop", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.services, not args.no_uvloop)
        return
    for tool in ("dnsperf", "nsd"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is not installed (apt-get install dnsperf nsd)")

    t = time.perf_counter()
    table: DnsTable = build_table(bench_registry(args.services))
    build_s = time.perf_counter() - t
    lines = query_lines(args.services)
    print(f"registry: {args.services} exported services; table: {len(table.records)} records, "
          f"{len(table.answers)} precomputed answers, built in {build_s:.2f}s")

    results: dict[str, dict[str, float]] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="meshfed-dns-bench-") as tmp:
        work = Path(tmp)
        queries = work / "queries.txt"
        queries.write_text("\n".join(lines) + "\n")
        (work / "clusterset.local.zone").write_text(table.zone_text())
        try:
            # All servers run side by side (idle when not driven); each round drives each in turn.
            ports[NSD] = free_udp_tcp_port()
            nsd_bin = shutil.which("nsd") or "/usr/sbin/nsd"
            procs[NSD] = subprocess.Popen([nsd_bin, "-d", "-c", str(nsd_config(work, ports[NSD]))],
                                          stdout=subprocess.DEVNULL, stderr=(work / "nsd.stderr").open("wb"))
            variants = [(UVLOOP, [])] + ([] if args.skip_asyncio else [(ASYNCIO, ["--no-uvloop"])])
            for name, extra in variants:
                ports[name] = free_udp_tcp_port()
                procs[name] = subprocess.Popen([sys.executable, __file__, "--serve", str(ports[name]), "--services",
                                                str(args.services), *extra])
            for name, proc in procs.items():
                wait_answering(ports[name], proc)
            checked = same_answers(ports[UVLOOP], ports[NSD], lines)
            print(f"same answers from both servers for {checked} sampled questions (answer records, TTLs, rcodes)")
            for round_ in range(args.rounds):
                for name in procs:
                    got = dnsperf(ports[name], queries, duration=args.duration, clients=args.clients)
                    print(f"  round {round_ + 1} {name:<20} {got['qps']:>10,.0f} queries/s")
                    if name not in results or got["qps"] > results[name]["qps"]:
                        results[name] = got
        finally:
            for proc in procs.values():
                stop(proc)

    print(f"\nbest of {args.rounds} rounds of dnsperf -l {args.duration} -c {args.clients} -T 1 over UDP on loopback, "
          f"{len(lines)} distinct questions (A and SRV), {os.cpu_count()} cores shared with dnsperf")
    print(f"{'server':<20} {'queries/s':>12} {'sent':>10} {'lost':>7} {'avg latency':>12}")
    for name, r in results.items():
        print(f"{name:<20} {r['qps']:>12,.0f} {r['sent']:>10,.0f} {r['lost']:>7,.0f} {r['latency_ms']:>9.2f} ms")
    baseline = results[NSD]["qps"]
    print()
    for name, r in results.items():
        if not name.startswith("nsd"):
            print(f"ratio {name} / nsd: {r['qps'] / baseline:.2f}")
    best = results[UVLOOP]["qps"]
    verdict = "meets" if best >= GOAL else "misses"
    print(f"goal: {GOAL:,} queries/s per core; meshfed on uvloop {verdict} it at {best:,.0f}/s "
          "(one server process, so at most one core)")


if __name__ == "__main__":
    main()
