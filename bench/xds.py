"""xDS push at scale: one control plane, 1,000 services, 2,000 simulated ADS streams; SotW against delta.

    .venv/bin/python bench/xds.py [--services 1000] [--streams 2000] [--watch 100] [--changes 15]
                                  [--client-procs 2] [--quiet 0.05] [--max-delay 0.5]

The control plane (this process: SnapshotCache + AdsServer + PushDebouncer, grpc.aio) holds one snapshot per
stream: each simulated sidecar is configured for ``--watch`` services (its clusters over wildcard CDS and their
endpoints over named EDS, as a Sidecar-scoped Istio proxy), chosen from the ``--services`` with a fixed seed.
The streams are grpc.aio clients in ``--client-procs`` separate processes (``bench/xds.py --client ...``), spread
over many connections; each ACKs every response at once, and the control plane records when each ACK arrives.

For each variant, state of the world first and then delta (the same nodes, the same changes, in this one run):

  * all streams connect and ACK their initial configuration (time to sync everybody);
  * ``--changes`` times, one endpoint of one service changes (its port): the change goes through the debouncer
    (``--quiet``/``--max-delay``), the regeneration replaces that endpoint in the snapshots of the proxies that
    watch the service, and the clock stops per proxy when its ACK of the new EDS version arrives;
  * printed: p50/p99 over (change, proxy) of change -> ACK, p50/p99 over changes of change -> last affected ACK,
    response bytes and resources per change, control-plane CPU per change.

Then the ratios (SotW / delta) and the control plane's RSS (current and peak). Goals from Istio's published
figures: RSS <= 1.5 GB, p99 < 1 s, delta >= 10x fewer bytes per endpoint change.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# This file is named xds.py: drop its own folder from the path so ``import xds`` (xds-protos, which the Envoy
# messages import) finds the package, not this script.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import grpc  # noqa: E402
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402
from envoy.config.core.v3 import address_pb2, base_pb2  # noqa: E402
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec  # noqa: E402
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402

from gateway.ads import AdsServer  # noqa: E402
from gateway.cache import SnapshotCache  # noqa: E402
from gateway.push import PushDebouncer, PushRequest  # noqa: E402
from gateway.snapshot import CLUSTER, ENDPOINT, Snapshot  # noqa: E402

SEED = 5
STREAMS_PER_CONNECTION = 20


def node_id(i: int) -> str:
    return f"sidecar~10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}~bench-{i}.bench~bench.svc.cluster.local"


def svc(j: int) -> str:
    return f"outbound|8080||svc-{j}.bench.svc.cluster.local"


def watched(i: int, services: int, watch: int) -> list[str]:
    rnd = random.Random(SEED * 1_000_003 + i)
    return sorted(svc(j) for j in rnd.sample(range(services), min(watch, services)))


def cluster(name: str) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.service_name = name
    c.connect_timeout.FromMilliseconds(1000)
    return c


def load_assignment(name: str, j: int, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    eps = [ec.LbEndpoint(endpoint=ec.Endpoint(address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
        address=f"10.{100 + k}.{j // 256 % 256}.{j % 256}", port_value=port))),
        load_balancing_weight={"value": 1}) for k in range(3)]
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[ec.LocalityLbEndpoints(
        locality=base_pb2.Locality(region="region-1", zone="zone-a", sub_zone="east"), lb_endpoints=eps)])


# -- the simulated proxies (client processes) -----------------------------------------------------------------------


async def _sotw_stream(channel: grpc.aio.Channel, i: int, names: list[str], stop: asyncio.Event) -> None:
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
    node = base_pb2.Node(id=node_id(i), cluster="bench")
    await call.write(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names))
    while not stop.is_set():
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        await call.write(discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce,
            resource_names=names if resp.type_url == ENDPOINT else ()))


async def _delta_stream(channel: grpc.aio.Channel, i: int, names: list[str], stop: asyncio.Event) -> None:
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
    node = base_pb2.Node(id=node_id(i), cluster="bench")
    await call.write(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=CLUSTER))
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=names))
    while not stop.is_set():
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce))


async def _retrying(stream: object, channel: grpc.aio.Channel, i: int, names: list[str],
                    stop: asyncio.Event) -> None:
    """Run one simulated proxy's stream; like Envoy, reconnect (a bounded number of times) if it breaks."""
    for attempt in range(20):
        try:
            await stream(channel, i, names, stop)  # type: ignore[operator]
            return
        except grpc.aio.AioRpcError as exc:
            print(f"{time.strftime('%H:%M:%S')} stream {i} attempt {attempt}: {exc.code()} {exc.details()}",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)


async def run_clients(port: int, first: int, last: int, services: int, watch: int, mode: str) -> None:
    stop = asyncio.Event()
    channels: list[grpc.aio.Channel] = []
    tasks = []
    stream = _sotw_stream if mode == "sotw" else _delta_stream
    for i in range(first, last):
        if (i - first) % STREAMS_PER_CONNECTION == 0:
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]))
        tasks.append(asyncio.create_task(_retrying(stream, channels[-1], i, watched(i, services, watch), stop)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    if errors:
        print(f"client {first}-{last}: {len(errors)} streams failed, first: {errors[0]!r}", file=sys.stderr)


# -- the control plane (this process) -------------------------------------------------------------------------------


class TimedCache(SnapshotCache):
    """The real cache, plus the arrival time of every ACK (for the change -> ACK latency) and an event set when
    every awaited (node, version) has been ACKed, so waiting costs the control plane no polling."""

    def __init__(self) -> None:
        super().__init__()
        self.acks: dict[tuple[str, str], float] = {}
        self._awaited: set[tuple[str, str]] = set()
        self.all_acked = asyncio.Event()

    def expect(self, targets: dict[str, str]) -> None:
        self._awaited = {(n, v) for n, v in targets.items() if self.acked_version(n, ENDPOINT) != v}
        if self._awaited:
            self.all_acked.clear()
        else:
            self.all_acked.set()

    def record_ack(self, node_id: str, type_url: str, *, version: str, nonce: str) -> None:
        super().record_ack(node_id, type_url, version=version, nonce=nonce)
        self.acks[(node_id, version)] = time.monotonic()
        if type_url == ENDPOINT and self._awaited:
            self._awaited.discard((node_id, version))
            if not self._awaited:
                self.all_acked.set()


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement for this process (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_kb() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@dataclass
class Result:
    mode: str
    sync_s: float = 0.0
    per_proxy: list[float] = field(default_factory=list)
    per_change: list[float] = field(default_factory=list)
    bytes_per_change: list[int] = field(default_factory=list)
    resources_per_change: list[int] = field(default_factory=list)
    cpu_per_change: list[float] = field(default_factory=list)
    affected: list[int] = field(default_factory=list)
    initial_bytes: int = 0
    peak_rss_kb: int = 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def wait_all(cache: TimedCache, targets: dict[str, str], *, within: float, what: str) -> None:
    cache.expect(targets)
    try:
        await asyncio.wait_for(cache.all_acked.wait(), within)
    except TimeoutError:
        missing = sum(1 for n, v in targets.items() if cache.acked_version(n, ENDPOINT) != v)
        raise TimeoutError(f"{what}: {missing} streams did not ACK within {within}s") from None


async def run_variant(mode: str, args: argparse.Namespace, full: Snapshot, by_service: dict[str, list[str]],
                      watch_of: dict[str, list[str]], logdir: Path) -> Result:
    res = Result(mode)
    reset_peak_rss()
    cache = TimedCache()
    snaps: dict[str, Snapshot] = {}
    for i in range(args.streams):
        n = node_id(i)
        snaps[n] = full.select({CLUSTER: watch_of[n], ENDPOINT: watch_of[n]})
        cache.set_snapshot(n, snaps[n])
    current = {"full": full}

    async def regenerate(req: PushRequest) -> None:
        for name in req.services:
            new_cla = current["full"].entries(ENDPOINT)[str(name)]  # serialised once, shared by every proxy
            for n in by_service[str(name)]:
                snaps[n] = snaps[n].replace(ENDPOINT, {str(name): new_cla})
                cache.set_snapshot(n, snaps[n])

    async with AdsServer(cache=cache, authenticator=None, inflight_bytes=args.inflight_mb << 20) as srv, \
            PushDebouncer(regenerate=regenerate, quiet=args.quiet, max_delay=args.max_delay) as pushes:
        t0 = time.monotonic()
        procs = []
        per = (args.streams + args.client_procs - 1) // args.client_procs
        for k in range(args.client_procs):
            first, last = k * per, min(args.streams, (k + 1) * per)
            log = open(logdir / f"client-{mode}-{k}.log", "w")  # noqa: SIM115,ASYNC230 - closed below
            procs.append((subprocess.Popen(  # noqa: ASYNC220 - starting a child is quick; it is waited on by pid
                [sys.executable, __file__, "--client", "--port", str(srv.port), "--first", str(first), "--last",
                 str(last), "--services", str(args.services), "--watch", str(args.watch), "--mode", mode],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
        try:
            await wait_all(cache, {n: s.version(ENDPOINT) for n, s in snaps.items()}, within=120,
                           what=f"{mode} initial sync")
            res.sync_s = time.monotonic() - t0
            res.initial_bytes = srv.stats.sotw_bytes + srv.stats.delta_bytes
            rnd = random.Random(SEED)
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            for change in range(args.changes):
                await asyncio.sleep(0.2)
                j = rnd.randrange(args.services)
                name = svc(j)
                current["full"] = current["full"].replace(
                    ENDPOINT, {name: load_assignment(name, j, 20000 + change)})
                affected = by_service[name]
                b0 = srv.stats.sotw_bytes + srv.stats.delta_bytes
                r0 = srv.stats.sotw_resources + srv.stats.delta_resources
                c0 = time.process_time()
                start = time.monotonic()
                pushes.submit(PushRequest(services=frozenset({name}), reasons=frozenset({"endpoints"})))
                await pushes.flush()
                targets = {n: snaps[n].version(ENDPOINT) for n in affected}
                await wait_all(cache, targets, within=60, what=f"{mode} change {change}")
                res.cpu_per_change.append(time.process_time() - c0)
                lat = [cache.acks[(n, v)] - start for n, v in targets.items()]
                res.per_proxy.extend(lat)
                res.per_change.append(max(lat) if lat else 0.0)
                res.bytes_per_change.append(srv.stats.sotw_bytes + srv.stats.delta_bytes - b0)
                res.resources_per_change.append(srv.stats.sotw_resources + srv.stats.delta_resources - r0)
                res.affected.append(len(affected))
            if profiler is not None:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        finally:
            for p, _ in procs:
                p.terminate()
            for p, log in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
                log.close()
    res.peak_rss_kb = rss_kb()[1]
    return res


def report(results: list[Result], args: argparse.Namespace, rss: tuple[int, int], cpu_total: float) -> None:
    print(f"\nxDS bench: {args.services} services, {args.streams} ADS streams in {args.client_procs} client "
          f"processes, {args.watch} services per proxy, {args.changes} endpoint changes per variant, debounce "
          f"quiet {args.quiet}s max {args.max_delay}s\n")
    head = f"{'':34}" + "".join(f"{r.mode:>14}" for r in results)
    print(head)
    rows = [
        ("initial sync of all streams (s)", lambda r: f"{r.sync_s:.2f}"),
        ("initial config bytes (MB)", lambda r: f"{r.initial_bytes / 1e6:.1f}"),
        ("affected streams per change", lambda r: f"{statistics.mean(r.affected):.0f}"),
        ("change -> proxy ACK p50 (ms)", lambda r: f"{pct(r.per_proxy, 0.5) * 1000:.0f}"),
        ("change -> proxy ACK p99 (ms)", lambda r: f"{pct(r.per_proxy, 0.99) * 1000:.0f}"),
        ("change -> all affected p50 (ms)", lambda r: f"{pct(r.per_change, 0.5) * 1000:.0f}"),
        ("change -> all affected p99 (ms)", lambda r: f"{pct(r.per_change, 0.99) * 1000:.0f}"),
        ("bytes sent per change (KB)", lambda r: f"{statistics.mean(r.bytes_per_change) / 1000:.1f}"),
        ("resources sent per change", lambda r: f"{statistics.mean(r.resources_per_change):.0f}"),
        ("control-plane CPU per change (ms)", lambda r: f"{statistics.mean(r.cpu_per_change) * 1000:.1f}"),
        ("control-plane peak RSS (MB)", lambda r: f"{r.peak_rss_kb / 1024:.0f}"),
    ]
    for label, fn in rows:
        print(f"{label:34}" + "".join(f"{fn(r):>14}" for r in results))
    if len(results) != 2:
        return
    sotw, delta = results
    print("\nratios SotW / delta (same changes, same proxies, same run):")
    b = statistics.mean(sotw.bytes_per_change) / max(1.0, statistics.mean(delta.bytes_per_change))
    c = statistics.mean(sotw.cpu_per_change) / max(1e-9, statistics.mean(delta.cpu_per_change))
    p = pct(sotw.per_proxy, 0.99) / max(1e-9, pct(delta.per_proxy, 0.99))
    print(f"  bytes per endpoint change   {b:8.1f}x   (goal: delta >= 10x fewer)  {'OK' if b >= 10 else 'MISSED'}")
    print(f"  control-plane CPU per change{c:8.1f}x")
    print(f"  p99 change -> ACK           {p:8.1f}x")
    worst = max(pct(r.per_proxy, 0.99) for r in results)
    peak = max(r.peak_rss_kb for r in results)
    print(f"\ncontrol plane: RSS now {rss[0] / 1024:.0f} MB, peak {peak / 1024:.0f} MB (goal <= 1536 MB: "
          f"{'OK' if peak <= 1536 * 1024 else 'MISSED'}); CPU {cpu_total:.1f} s over the whole run")
    verdict = "OK" if worst < 1 else "MISSED"
    print(f"p99 change -> ACK, worst variant: {worst * 1000:.0f} ms (goal < 1000 ms: {verdict})")


async def main_async(args: argparse.Namespace) -> None:
    cpu0 = time.process_time()
    t0 = time.monotonic()
    full = Snapshot.build({
        CLUSTER: [cluster(svc(j)) for j in range(args.services)],
        ENDPOINT: [load_assignment(svc(j), j, 8080) for j in range(args.services)],
    })
    watch_of = {node_id(i): watched(i, args.services, args.watch) for i in range(args.streams)}
    by_service: dict[str, list[str]] = {svc(j): [] for j in range(args.services)}
    for n, names in watch_of.items():
        for name in names:
            by_service[name].append(n)
    print(f"built {args.services} services and {args.streams} proxy scopes in {time.monotonic() - t0:.1f}s",
          flush=True)
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-xds-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.variants.split(","):
        t = time.monotonic()
        print(f"{time.strftime('%H:%M:%S')} {mode}: starting", flush=True)
        results.append(await run_variant(mode, args, full, by_service, watch_of, logdir))
        print(f"{mode}: done in {time.monotonic() - t:.1f}s", flush=True)
    report(results, args, rss_kb(), time.process_time() - cpu0)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--watch", type=int, default=100, help="services each proxy is configured for")
    ap.add_argument("--changes", type=int, default=15)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--quiet", type=float, default=0.05)
    ap.add_argument("--max-delay", type=float, default=0.5)
    ap.add_argument("--inflight-mb", type=int, default=64, help="the ADS server's in-flight response budget")
    ap.add_argument("--variants", default="sotw,delta", help="comma-separated: sotw, delta")
    ap.add_argument("--profile", action="store_true", help="cProfile the control plane during the changes")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--last", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["sotw", "delta"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        asyncio.run(run_clients(args.port, args.first, args.last, args.services, args.watch, args.mode))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
