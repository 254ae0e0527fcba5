"""Added latency of the captured mesh path: direct vs one sidecar pair vs sidecar -> gateway -> sidecar, in one run.

    sudo .venv/bin/python bench/dataplane.py [--rate 1000] [--seconds 10] [--size 1024] [--connections 8]
                                             [--modes tcp,http] [--rounds 2]

Needs root (network namespaces and iptables inside them; nothing in the root namespace changes). Builds four pods
as namespaces (``tests/support/netns_bed.py``)::

    local (east) 10.254.N.2 ---- 10.254.N.1 client (east) 10.252.N.1 ---- 10.252.N.2 gw (west's gateway)
                                                                             10.253.N.1 ---- 10.253.N.2 remote (west)

with ``meshfed proxy capture`` in the three pods and real Envoys (the two sidecars of east in capture mode, west's
east-west gateway, west's sidecar in capture mode), programmed over ADS by an east and a west control plane in
this process (the generators and snapshot cache of ``gateway``; the control planes are the tests' in-process ones).
The apps in ``local`` and ``remote`` echo ``--size`` bytes (TCP) or answer a GET with ``--size`` bytes (HTTP/1.1).

For each mode, in turn, ``--rounds`` times, the same open-loop load at ``--rate`` requests/s over ``--connections``
kept-alive connections, for ``--seconds`` (after a one-second warm-up), from the client pod:

    direct     to the local app's own port, bypassing both sidecars (the client runs as the proxy uid, the port is
               excluded from inbound capture)
    pair       to the local Service's cluster IP: client sidecar -> local sidecar (one sidecar pair, one cluster)
    gateway    to the west-only Service's ClusterSetIP: client sidecar -> west's gateway -> west's sidecar

Latency is measured from each request's scheduled send time (so a stall counts against us, no coordinated
omission) to the last byte of its answer. The load generator and the apps are Python, in the same run and on the
same machine for every path, so the differences to ``direct`` are the mesh's cost (plus the load generator's
noise, which is also in ``direct``). The machine's two cores are shared with four Envoys, the control planes and
the load generator. Printed beside the numbers: the anchor issue 12 names, Istio's published +0.30 ms p99 per
sidecar pair (1 kB, 1,000 requests/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from discovery.model import (  # noqa: E402
    ClusterId,
    ClusterInfo,
    Endpoint,
    Locality,
    LocalitySummary,
    NetworkId,
    Registry,
    RemoteEndpoints,
    Service,
    ServiceExport,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceType,
    namespace,
)
from gateway.context import CaptureMode, InboundPort, ProxyInfo, ProxyKind, PushContext  # noqa: E402
from tests.gateway.envoy_fixtures import ControlPlane  # noqa: E402
from tests.gateway.mesh_fixtures import T0, TD, cluster_cas, workload_certs  # noqa: E402
from tests.support.netns_bed import PROXY_UID, Bed, Link, bed, capture_rules, run_in, start_envoy, start_script  # noqa: E402

EAST, WEST = ClusterId("east"), ClusterId("west")
LOCAL = ServiceKey.parse("echo-east.default")
REMOTE = ServiceKey.parse("echo-west.default")
LOCAL_CLUSTER_IP = "10.96.0.10"
REMOTE_CLUSTERSET_IP = "241.0.0.20"
DIRECT_TCP, DIRECT_HTTP = 7000, 7080  # the local app's ports outside the mesh (excluded from inbound capture)
ISTIO_P99_MS = 0.30

# TCP echo on 127.0.0.1:5432 (and 0.0.0.0:7000 with argv[2] == "direct"), HTTP/1.1 on 127.0.0.1:9080 (and :7080)
# answering every GET with argv[1] bytes. Ends when stdin closes.
APPS = r"""
import asyncio, sys
size, direct = int(sys.argv[1]), sys.argv[2:] == ["direct"]
body = b"x" * size
head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size
async def echo(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except ConnectionError:
        pass
    w.close()
async def http(r, w):
    try:
        while True:
            request = await r.readuntil(b"\r\n\r\n")
            if not request:
                break
            w.write(head + body)
            await w.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    w.close()
async def main():
    servers = [await asyncio.start_server(echo, "127.0.0.1", 5432),
               await asyncio.start_server(http, "127.0.0.1", 9080)]
    if direct:
        servers += [await asyncio.start_server(echo, "0.0.0.0", 7000),
                    await asyncio.start_server(http, "0.0.0.0", 7080)]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""

# MODE HOST PORT HOSTHEADER SIZE RATE SECONDS CONNECTIONS: an open-loop load; prints JSON latencies summary (ms).
LOAD = r"""
import asyncio, json, sys, time
mode, host, port, hostheader = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
size, rate, seconds, conns = int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]), int(sys.argv[8])
payload = b"x" * size
request = f"GET / HTTP/1.1\r\nhost: {hostheader}\r\n\r\n".encode()
async def one(r, w):
    if mode == "tcp":
        w.write(payload)
        await w.drain()
        await r.readexactly(size)
    else:
        w.write(request)
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
        await r.readexactly(length)
async def run(duration, record):
    pairs = [await asyncio.open_connection(host, port) for _ in range(conns)]
    queues = [asyncio.Queue() for _ in pairs]
    lat, errors = [], 0
    async def worker(i):
        nonlocal errors
        r, w = pairs[i]
        while (t := await queues[i].get()) is not None:
            try:
                await one(r, w)
                lat.append((time.perf_counter() - t) * 1000)
            except Exception:
                errors += 1
                return
    tasks = [asyncio.create_task(worker(i)) for i in range(conns)]
    start = time.perf_counter()
    n = int(duration * rate)
    for k in range(n):
        due = start + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queues[k % conns].put_nowait(due)
    for q in queues:
        q.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    for _, w in pairs:
        w.close()
    if record:
        lat.sort()
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
        print(json.dumps({"n": len(lat), "sent": n, "errors": errors, "p50": pick(0.50), "p90": pick(0.90),
                          "p99": pick(0.99), "max": lat[-1] if lat else float("nan")}))
async def main():
    await run(1.0, False)
    await run(seconds, True)
asyncio.run(main())
"""


def links(n: int) -> list[Link]:
    return [Link("client", (f"10.254.{n}.1/24",), "local", (f"10.254.{n}.2/24",)),
            Link("client", (f"10.252.{n}.1/24",), "gw", (f"10.252.{n}.2/24",)),
            Link("gw", (f"10.253.{n}.1/24",), "remote", (f"10.253.{n}.2/24",))]


def registries(n: int) -> tuple[Registry, Registry]:
    local_ip, gateway_ip, remote_ip = f"10.254.{n}.2", f"10.252.{n}.2", f"10.253.{n}.2"
    ports = (ServicePort(port=5432, name="tcp-echo"), ServicePort(port=9080, name="http"))
    infos = {EAST: ClusterInfo(id=EAST, network=NetworkId("net-east"), region="r", zone="z1"),
             WEST: ClusterInfo(id=WEST, network=NetworkId("net-west"), region="r", zone="z2", gateway_host=gateway_ip)}

    def pod(ip: str, sa: str, zone: str) -> Endpoint:
        return Endpoint(address=ip, zone=zone, ports=tuple((p.name, p.port) for p in ports), service_account=sa)

    local = Service(cluster=EAST, key=LOCAL, ports=ports, cluster_ip=LOCAL_CLUSTER_IP,
                    endpoints=(pod(local_ip, "echo-east", "z1"),))
    remote = Service(cluster=WEST, key=REMOTE, ports=ports, endpoints=(pod(remote_ip, "echo-west", "z2"),))
    imports = {REMOTE: ServiceImport(key=REMOTE, type=ServiceType.CLUSTER_SET_IP, ports=ports, clusters=(WEST,),
                                     ips=(REMOTE_CLUSTERSET_IP,))}
    shard = RemoteEndpoints(cluster=WEST, network=NetworkId("net-west"), gateway_host=gateway_ip, gateway_port=15443,
                            localities=(LocalitySummary(locality=Locality(region="r", zone="z2", cluster=WEST,
                                                                          network=NetworkId("net-west")),
                                                        ready=1, weight=1),))
    east = (Registry(local=EAST).with_shard(EAST, [local]).with_remote(WEST, [(REMOTE, shard)])
            .with_catalog(clusters=infos, imports=imports))
    west = (Registry(local=WEST).with_shard(WEST, [remote], [ServiceExport(cluster=WEST, key=REMOTE, created=T0)])
            .with_catalog(clusters=infos, imports=imports))
    return east, west


def sidecar(cluster: ClusterId, sa: str, ip: str, services: tuple[ServiceKey, ...] = ()) -> ProxyInfo:
    inbound = (InboundPort(5432, 5432, "tcp-echo"), InboundPort(9080, 9080, "http")) if services else ()
    return ProxyInfo(kind=ProxyKind.SIDECAR, cluster=cluster, namespace=namespace("default"), service_account=sa,
                     ip=ip, capture=CaptureMode.REDIRECT, services=services, inbound=inbound,
                     node_id=f"sidecar~{ip}~{sa}-1.default~default.svc.cluster.local")


async def load(b: Bed, mode: str, path: str, n: int, args: argparse.Namespace) -> dict[str, float]:
    port = 5432 if mode == "tcp" else 9080
    if path == "direct":
        host, port, uid, name = f"10.254.{n}.2", DIRECT_TCP if mode == "tcp" else DIRECT_HTTP, PROXY_UID, "direct"
    elif path == "pair":
        host, uid, name = LOCAL_CLUSTER_IP, None, f"{LOCAL.clusterset_host}:{port}"
    else:
        host, uid, name = REMOTE_CLUSTERSET_IP, None, f"{REMOTE.clusterset_host}:{port}"
    out = await run_in(b, "client", LOAD, mode, host, str(port), name, str(args.size), str(args.rate),
                       str(args.seconds), str(args.connections), uid=uid, within=args.seconds + 120)
    return dict(json.loads(out.splitlines()[-1]))


async def bench(args: argparse.Namespace) -> None:
    n = secrets.randbelow(250) + 1
    cas, bundle = cluster_cas()
    east_reg, west_reg = registries(n)
    east_certs = workload_certs(cas, "east", [("default", "client"), ("default", "echo-east")])
    east_ctx = PushContext(registry=east_reg, trust_domain=TD, trust_bundle_pem=bundle, gateway_health_check_s=0.0,
                           workload_certs=east_certs)
    west_ctx = PushContext(registry=west_reg, trust_domain=TD, trust_bundle_pem=bundle,
                           workload_certs=workload_certs(cas, "west", [("default", "echo-west")]))
    gateway = ProxyInfo(kind=ProxyKind.GATEWAY, cluster=WEST, namespace=namespace("meshfed"),
                        service_account="eastwest", ip="0.0.0.0", gateway_port=15443,
                        node_id=f"router~10.252.{n}.2~eastwest-1.meshfed~meshfed.svc.cluster.local")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with bed("dpb", ("client", "local", "gw", "remote"), links(n), default_routes=(("client", "gw"),)) as b:
        async with ControlPlane(ctx=east_ctx) as east_cp, ControlPlane(ctx=west_ctx) as west_cp:
            try:
                start_script(b, "local", APPS, str(args.size), "direct")
                start_script(b, "remote", APPS, str(args.size))
                capture_rules(b, "client")
                capture_rules(b, "local", "--exclude-inbound-ports", f"{DIRECT_TCP},{DIRECT_HTTP}")
                capture_rules(b, "remote")
                admins = [
                    await start_envoy(b, east_cp, sidecar(EAST, "client", f"10.252.{n}.1"), "client",
                                      log_level="warn"),
                    await start_envoy(b, east_cp, sidecar(EAST, "echo-east", f"10.254.{n}.2", (LOCAL,)), "local",
                                      log_level="warn"),
                    await start_envoy(b, west_cp, gateway, "gw", log_level="warn"),
                    await start_envoy(b, west_cp, sidecar(WEST, "echo-west", f"10.253.{n}.2", (REMOTE,)), "remote",
                                      log_level="warn"),
                ]
                for _ in range(args.rounds):
                    for mode in args.modes:
                        for path in ("direct", "pair", "gateway"):
                            got = await load(b, mode, path, n, args)
                            results.setdefault((mode, path), []).append(got)
                            print(f"  {mode:4} {path:8} n={got['n']:.0f}/{got['sent']:.0f} errors={got['errors']:.0f}"
                                  f" p50={got['p50']:.3f} ms p99={got['p99']:.3f} ms", flush=True)
                rejected = {i: await a.rejected() for i, a in enumerate(admins)}
            finally:
                b.stop_processes()
    report(results, args, rejected)


def report(results: dict[tuple[str, str], list[dict[str, float]]], args: argparse.Namespace,
           rejected: dict[int, dict[str, int]]) -> None:
    print(f"\n{args.rate:.0f} requests/s, {args.size} B, {args.connections} connections, {args.seconds:.0f} s per "
          f"path, best of {args.rounds} round(s) by p99; latency in ms")
    print(f"{'mode':5} {'path':8} {'p50':>8} {'p99':>8} {'+p50':>8} {'+p99':>8} {'p99 ratio':>10}")
    for mode in args.modes:
        best = {path: min(results[(mode, path)], key=lambda r: r["p99"]) for path in ("direct", "pair", "gateway")}
        base = best["direct"]
        for path, r in best.items():
            added50, added99 = r["p50"] - base["p50"], r["p99"] - base["p99"]
            extra = "" if path == "direct" else f" {added50:8.3f} {added99:8.3f} {r['p99'] / base['p99']:10.2f}"
            print(f"{mode:5} {path:8} {r['p50']:8.3f} {r['p99']:8.3f}{extra}")
    print(f"anchor: Istio's published +{ISTIO_P99_MS:.2f} ms p99 per sidecar pair (1 kB, 1,000 requests/s); "
          "ours is the 'pair' row's +p99 (the 'gateway' path crosses two sidecars and a gateway)")
    print(f"update_rejected on the four Envoys: {sum(sum(r.values()) for r in rejected.values())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second, open loop")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per path (after 1 s warm-up)")
    ap.add_argument("--size", type=int, default=1024, help="bytes echoed (tcp) or answered (http)")
    ap.add_argument("--connections", type=int, default=8, help="kept-alive connections the load spreads over")
    ap.add_argument("--modes", default="tcp,http", help="comma-separated: tcp, http")
    ap.add_argument("--rounds", type=int, default=2, help="measure every path this many times, keep the best")
    args = ap.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("tcp", "http") for m in args.modes):
        sys.exit(f"--modes: {args.modes} (known: tcp, http)")
    if os.geteuid() != 0:
        sys.exit("bench/dataplane.py needs root: it creates network namespaces and iptables rules inside them")
    for tool in ("ip", "setpriv", "iptables-restore"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
