"""xDS push at scale through the control plane's own push pipeline: 1,000 services, 2,000 ADS streams, SotW and delta.

    .venv/bin/python bench/xds.py [--services 1000] [--streams 2000] [--watch 100] [--changes 15]
                                  [--client-procs 2] [--quiet 0.05] [--max-delay 0.5]
                                  [--catalog 10000] [--catalog-streams 50]

The control plane here is the one ``meshfed controlplane`` runs, minus its sources: a ``Registry`` of
``--services`` local services (three pods each), a ``PushContext`` over it, the real ``PushPipeline``
(gateway/pipeline.py) with the real generators, ``PushDebouncer``, ``SnapshotCache`` and ``AdsServer`` (grpc.aio).
``--streams`` sidecars (``ProxyInfo`` kind sidecar, one inbound port each) get their configuration from the
pipeline; each subscribes to ``--watch`` services chosen with a fixed seed (named CDS and EDS as a Sidecar-scoped
proxy; with ``--watch`` equal to ``--services`` wildcard CDS: the full mesh). The streams are grpc.aio clients in
``--client-procs`` separate processes (``bench/xds.py --client ...``); each ACKs every response at once, and the
control plane records when each ACK arrives.

For each variant, state of the world first (the baseline) and then delta, in this one run:

  * the pipeline builds every proxy's snapshot; all streams connect and ACK it (time to sync everybody);
  * ``--changes`` times, one endpoint of one service changes (its port): the registry's local shard is replaced and
    the watcher's request (``ConfigKey.shard``) goes through the debouncer (``--quiet``/``--max-delay``) to the
    pipeline, which finds the changed key, rebuilds its endpoints once for every proxy and hands the snapshots to
    the cache; the clock stops per proxy when its ACK of the new EDS version arrives;
  * printed: p50/p99 over (change, proxy) of change -> ACK, p50/p99 over changes of change -> last affected ACK,
    response bytes and resources per change, control-plane CPU and resources serialised per change, the event
    loop's longest stall during the changes, peak RSS.

Then the catalog change (``--catalog``, 0 to skip): ``--catalog-streams`` delta sidecars (wildcard CDS) are synced,
then a federation catalog arrives with that many services imported from a remote cluster (the registry's remote
shard and imports replaced on the loop as ``ControlPlane._on_catalog`` does; decoding is the agent's, off-loop);
printed: the event loop's longest stall from the change until every stream ACKed its new clusters, and how long
that took.

Goals (issue 11): full mesh (``--watch 1000``) p99 change -> ACK < 500 ms and peak RSS < 1 GB; scoped
(``--watch 100``) p99 < 250 ms; the longest loop stall during the 10,000-service catalog change < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import json
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
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402

from discovery.model import (  # noqa: E402
    ClusterId,
    ClusterInfo,
    Endpoint,
    LocalitySummary,
    NetworkId,
    Registry,
    RemoteEndpoints,
    Service,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceType,
    namespace,
)
from gateway.ads import AdsServer  # noqa: E402
from gateway.cache import SnapshotCache  # noqa: E402
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext  # noqa: E402
from gateway.pipeline import PushPipeline, tune_gc  # noqa: E402
from gateway.push import ConfigKey, Kind, PushDebouncer, PushRequest  # noqa: E402
from gateway.snapshot import CLUSTER, ENDPOINT  # noqa: E402

SEED = 5
STREAMS_PER_CONNECTION = 20
LOCAL = ClusterId("bench")
REMOTE = ClusterId("remote")
NS = namespace("bench")


def node_id(i: int) -> str:
    return f"sidecar~10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}~bench-{i}.bench~bench.svc.cluster.local"


def key(j: int) -> ServiceKey:
    return ServiceKey.parse(f"svc-{j}.bench")


def svc(j: int) -> str:
    """The outbound cluster (and EDS) name of service ``j`` as the generators name it."""
    return f"outbound|8080||svc-{j}.bench.svc.clusterset.local"


def watched(i: int, services: int, watch: int) -> list[str]:
    rnd = random.Random(SEED * 1_000_003 + i)
    return sorted(svc(j) for j in rnd.sample(range(services), min(watch, services)))


def service(j: int, port: int = 8080) -> Service:
    eps = tuple(Endpoint(address=f"10.{100 + k}.{j // 256 % 256}.{j % 256}", zone="zone-a",
                         ports=(("http", port if k == 0 else 8080),), service_account=f"svc-{j}")
                for k in range(3))
    return Service(cluster=LOCAL, key=key(j), ports=(ServicePort(port=8080, name="http"),), endpoints=eps)


def bench_registry(services: int) -> Registry:
    info = ClusterInfo(id=LOCAL, network=NetworkId("net-bench"), region="region-1", zone="zone-a",
                       gateway_host="127.0.0.1", gateway_port=15443)
    return Registry(local=LOCAL).with_shard(LOCAL, [service(j) for j in range(services)]).with_catalog(
        clusters={LOCAL: info}, imports={})


def proxy(i: int) -> ProxyInfo:
    return ProxyInfo(kind=ProxyKind.SIDECAR, cluster=LOCAL, node_id=node_id(i), namespace=NS,
                     service_account=f"bench-{i % 50}", inbound=(InboundPort(9000, 9001, "http"),),
                     ip=f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}")


# -- the simulated proxies (client processes) -----------------------------------------------------------------------


async def _sotw_stream(channel: grpc.aio.Channel, i: int, names: list[str], scoped: bool, stop: asyncio.Event) -> None:
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
    node = base_pb2.Node(id=node_id(i), cluster="bench")
    await call.write(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER,
                                                    resource_names=names if scoped else ()))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names))
    while not stop.is_set():
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        await call.write(discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce,
            resource_names=names if resp.type_url == ENDPOINT or scoped else ()))


async def _delta_stream(channel: grpc.aio.Channel, i: int, names: list[str], scoped: bool,
                        stop: asyncio.Event) -> None:
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
    node = base_pb2.Node(id=node_id(i), cluster="bench")
    await call.write(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=CLUSTER,
                                                         resource_names_subscribe=names if scoped else ()))
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=names))
    while not stop.is_set():
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce))


async def _retrying(stream: object, channel: grpc.aio.Channel, i: int, names: list[str], scoped: bool,
                    stop: asyncio.Event) -> None:
    """Run one simulated proxy's stream; like Envoy, reconnect (a bounded number of times) if it breaks."""
    for attempt in range(20):
        try:
            await stream(channel, i, names, scoped, stop)  # type: ignore[operator]
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
    scoped = watch < services
    for i in range(first, last):
        if (i - first) % STREAMS_PER_CONNECTION == 0:
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 256 << 20)]))
        tasks.append(asyncio.create_task(_retrying(stream, channels[-1], i, watched(i, services, watch), scoped,
                                                   stop)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    if errors:
        print(f"client {first}-{last}: {len(errors)} streams failed, first: {errors[0]!r}", file=sys.stderr)


# -- the control plane (this process) -------------------------------------------------------------------------------


class TimedCache(SnapshotCache):
    """The real cache, plus the arrival time of every ACK (for the change -> ACK latency) and an event set when
    every awaited (node, type, version) has been ACKed, so waiting costs the control plane no polling."""

    def __init__(self) -> None:
        super().__init__()
        self.acks: dict[tuple[str, str], float] = {}
        self._awaited: set[tuple[str, str]] = set()
        self._awaited_type = ENDPOINT
        self.all_acked = asyncio.Event()

    def expect(self, targets: dict[str, str], type_url: str = ENDPOINT) -> None:
        self._awaited_type = type_url
        self._awaited = {(n, v) for n, v in targets.items() if self.acked_version(n, type_url) != v}
        if self._awaited:
            self.all_acked.clear()
        else:
            self.all_acked.set()

    def record_ack(self, node_id: str, type_url: str, *, version: str, nonce: str) -> None:
        super().record_ack(node_id, type_url, version=version, nonce=nonce)
        if type_url == self._awaited_type:
            self.acks[(node_id, version)] = time.monotonic()
            if self._awaited:
                self._awaited.discard((node_id, version))
                if not self._awaited:
                    self.all_acked.set()


class LoopWatch:
    """The event loop's longest stall: a task that sleeps ``tick`` seconds and measures how late it wakes."""

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.worst = 0.0
        self.worst_at = 0.0  # when the worst stall ended (time.monotonic())
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            if now - t - self.tick > self.worst:
                self.worst, self.worst_at = now - t - self.tick, now

    def reset(self) -> None:
        self.worst = 0.0

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


class GcWatch:
    """CPython's cyclic collections while it is on: the longest pause and the total, for generation 2 and for all
    (``gc.callbacks``; a collection stops whichever thread allocates, the event loop's included)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.longest_full = 0.0
        self.total = 0.0
        self.full = 0
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        self.total += took
        self.longest = max(self.longest, took)
        if info.get("generation") == 2:
            self.full += 1
            self.longest_full = max(self.longest_full, took)

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


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
    build_s: float = 0.0
    sync_s: float = 0.0
    per_proxy: list[float] = field(default_factory=list)
    per_change: list[float] = field(default_factory=list)
    bytes_per_change: list[int] = field(default_factory=list)
    resources_per_change: list[int] = field(default_factory=list)
    cpu_per_change: list[float] = field(default_factory=list)
    serialized_per_change: list[int] = field(default_factory=list)
    pipeline_per_change: list[float] = field(default_factory=list)
    affected: list[int] = field(default_factory=list)
    initial_bytes: int = 0
    peak_rss_kb: int = 0
    loop_stall_s: float = 0.0
    gc_longest_s: float = 0.0
    peak_build_kb: int = 0  # peak RSS when the build was done
    peak_sync_kb: int = 0  # peak RSS when every stream had ACKed its first configuration
    gc_total_s: float = 0.0
    gc_full: int = 0
    cpu_s: float = 0.0  # the variant's process's CPU, all of it


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def wait_all(cache: TimedCache, targets: dict[str, str], *, within: float, what: str,
                   type_url: str = ENDPOINT) -> None:
    cache.expect(targets, type_url)
    try:
        await asyncio.wait_for(cache.all_acked.wait(), within)
    except TimeoutError:
        missing = sum(1 for n, v in targets.items() if cache.acked_version(n, type_url) != v)
        raise TimeoutError(f"{what}: {missing} streams did not ACK within {within}s") from None


def start_clients(mode: str, port: int, streams: int, services: int, watch: int, procs_n: int,
                  logdir: Path, tag: str) -> list[tuple[subprocess.Popen[bytes], object]]:
    procs = []
    per = (streams + procs_n - 1) // procs_n
    for k in range(procs_n):
        first, last = k * per, min(streams, (k + 1) * per)
        log = open(logdir / f"client-{tag}-{mode}-{k}.log", "w")  # noqa: SIM115 - closed in stop_clients
        procs.append((subprocess.Popen(
            [sys.executable, __file__, "--client", "--port", str(port), "--first", str(first), "--last",
             str(last), "--services", str(services), "--watch", str(watch), "--mode", mode],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    return procs


def stop_clients(procs: list[tuple[subprocess.Popen[bytes], object]]) -> None:
    for p, _ in procs:
        p.terminate()
    for p, log in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
        log.close()  # type: ignore[attr-defined]


async def run_variant(mode: str, args: argparse.Namespace, logdir: Path) -> Result:
    res = Result(mode)
    reset_peak_rss()
    cache = TimedCache()
    pipeline = PushPipeline(cache=cache)
    registry = bench_registry(args.services)
    state = {"ctx": PushContext(registry=registry, trust_domain="bench.local")}
    proxies = {node_id(i): proxy(i) for i in range(args.streams)}
    by_service: dict[str, list[str]] = {svc(j): [] for j in range(args.services)}
    for i in range(args.streams):
        for name in watched(i, args.services, args.watch):
            by_service[name].append(node_id(i))

    async def regenerate(req: PushRequest) -> None:
        await pipeline.push(req, state["ctx"], proxies)

    async with AdsServer(cache=cache, authenticator=None, inflight_bytes=args.inflight_mb << 20) as srv, \
            PushDebouncer(regenerate=regenerate, quiet=args.quiet, max_delay=args.max_delay) as pushes, \
            LoopWatch() as loop:
        t0 = time.monotonic()
        await pipeline.push(PushRequest(full=True), state["ctx"], proxies)
        res.build_s = time.monotonic() - t0
        res.peak_build_kb = rss_kb()[1]
        procs = start_clients(mode, srv.port, args.streams, args.services, args.watch, args.client_procs, logdir,
                              "mesh")
        try:
            targets = {n: s.version(ENDPOINT) for n in proxies if (s := cache.get(n)) is not None}
            await wait_all(cache, targets, within=300, what=f"{mode} initial sync")
            res.sync_s = time.monotonic() - t0
            res.peak_sync_kb = rss_kb()[1]
            res.initial_bytes = srv.stats.sotw_bytes + srv.stats.delta_bytes
            rnd = random.Random(SEED)
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            await asyncio.sleep(0.5)
            loop.reset()
            gcw = GcWatch().__enter__()
            for change in range(args.changes):
                await asyncio.sleep(0.2)
                j = rnd.randrange(args.services)
                name = svc(j)
                affected = by_service[name]
                b0 = srv.stats.sotw_bytes + srv.stats.delta_bytes
                r0 = srv.stats.sotw_resources + srv.stats.delta_resources
                s0 = pipeline.stats.serialized
                p0 = pipeline.stats.thread_seconds
                c0 = time.process_time()
                start = time.monotonic()
                # The watcher: replace the local shard, say which shard changed.
                reg = state["ctx"].registry
                services = dict(reg.shards[LOCAL])
                services[key(j)] = service(j, port=20000 + change)
                state["ctx"] = PushContext(registry=reg.with_shard(LOCAL, services.values()),
                                           trust_domain="bench.local")
                pushes.submit(PushRequest(configs=frozenset({ConfigKey.shard(LOCAL)}),
                                          reasons=frozenset({"endpoints"})))
                await pushes.flush()
                targets = {n: s.version(ENDPOINT) for n in affected if (s := cache.get(n)) is not None}
                await wait_all(cache, targets, within=300, what=f"{mode} change {change}")
                res.cpu_per_change.append(time.process_time() - c0)
                lat = [cache.acks[(n, v)] - start for n, v in targets.items()]
                res.per_proxy.extend(lat)
                res.per_change.append(max(lat) if lat else 0.0)
                res.bytes_per_change.append(srv.stats.sotw_bytes + srv.stats.delta_bytes - b0)
                res.resources_per_change.append(srv.stats.sotw_resources + srv.stats.delta_resources - r0)
                res.serialized_per_change.append(pipeline.stats.serialized - s0)
                res.pipeline_per_change.append(pipeline.stats.thread_seconds - p0)
                res.affected.append(len(affected))
            res.loop_stall_s = loop.worst
            gcw.__exit__()
            res.gc_longest_s, res.gc_total_s, res.gc_full = gcw.longest, gcw.total / max(1, args.changes), gcw.full
            if profiler is not None:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        finally:
            stop_clients(procs)
    res.peak_rss_kb = rss_kb()[1]
    res.cpu_s = time.process_time()
    return res


@dataclass
class CatalogResult:
    services: int
    streams: int
    stall_s: float = 0.0
    loop_ops_s: float = 0.0
    converge_s: float = 0.0
    serialized: int = 0
    stall_at_s: float = 0.0  # when the longest stall ended, from the change
    build_s: tuple[float, float] = (0.0, 0.0)  # when the pipeline's push ran, from the change


async def run_catalog(args: argparse.Namespace, logdir: Path) -> CatalogResult:
    """A federation catalog with ``--catalog`` services arrives while ``--catalog-streams`` delta streams run."""
    res = CatalogResult(services=args.catalog, streams=args.catalog_streams)
    cache = TimedCache()
    pipeline = PushPipeline(cache=cache)
    registry = bench_registry(args.services)
    remote = ClusterInfo(id=REMOTE, network=NetworkId("net-remote"), region="region-2", zone="zone-b",
                         gateway_host="127.0.0.2", gateway_port=15443)
    state = {"ctx": PushContext(registry=registry.with_catalog(
        clusters={**registry.clusters, REMOTE: remote}, imports={}), trust_domain="bench.local")}
    proxies = {node_id(i): proxy(i) for i in range(args.catalog_streams)}
    # What the agent hands over, decoded off the loop: the remote cluster's shard and the merged imports.
    keys = [ServiceKey.parse(f"fed-{j}.remote") for j in range(args.catalog)]
    shard = [(k, RemoteEndpoints(cluster=REMOTE, network=remote.network, gateway_host=remote.gateway_host,
                                 gateway_port=remote.gateway_port,
                                 localities=(LocalitySummary(locality=remote.locality, ready=3, weight=3),)))
             for k in keys]
    imports = {k: ServiceImport(key=k, type=ServiceType.CLUSTER_SET_IP, ports=(ServicePort(port=8080, name="http"),),
                                clusters=(REMOTE,), ips=(f"241.{j // 65536 % 256}.{j // 256 % 256}.{j % 256}",))
               for j, k in enumerate(keys)}

    spans: list[tuple[float, float]] = []

    async def regenerate(req: PushRequest) -> None:
        t = time.monotonic()
        await pipeline.push(req, state["ctx"], proxies)
        spans.append((t, time.monotonic()))

    async with AdsServer(cache=cache, authenticator=None, inflight_bytes=args.inflight_mb << 20) as srv, \
            PushDebouncer(regenerate=regenerate, quiet=args.quiet, max_delay=args.max_delay) as pushes, \
            LoopWatch() as loop:
        await pipeline.push(PushRequest(full=True), state["ctx"], proxies)
        procs = start_clients("delta", srv.port, args.catalog_streams, args.services, args.services,
                              1, logdir, "catalog")
        try:
            targets = {n: s.version(CLUSTER) for n in proxies if (s := cache.get(n)) is not None}
            await wait_all(cache, targets, within=120, what="catalog initial sync", type_url=CLUSTER)
            await asyncio.sleep(0.5)
            loop.reset()
            s0 = pipeline.stats.serialized
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            start = time.monotonic()
            # ControlPlane._on_catalog: the shards that moved replace the registry's, then one request says which.
            reg = state["ctx"].registry.with_remote(REMOTE, shard).with_catalog(clusters=state["ctx"].registry.clusters,
                                                                                imports=imports)
            state["ctx"] = PushContext(registry=reg, trust_domain="bench.local")
            pushes.submit(PushRequest(configs=frozenset({ConfigKey.shard(REMOTE), ConfigKey(Kind.CATALOG)}),
                                      reasons=frozenset({"catalog"})))
            res.loop_ops_s = time.monotonic() - start
            await pushes.flush()
            targets = {n: s.version(CLUSTER) for n in proxies if (s := cache.get(n)) is not None}
            await wait_all(cache, targets, within=300, what="catalog change", type_url=CLUSTER)
            res.converge_s = time.monotonic() - start
            if profiler is not None:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
            res.stall_s = loop.worst
            res.stall_at_s = loop.worst_at - start
            if spans:
                res.build_s = (spans[-1][0] - start, spans[-1][1] - start)
            res.serialized = pipeline.stats.serialized - s0
        finally:
            stop_clients(procs)
    return res


def report(results: list[Result], catalog: CatalogResult | None, args: argparse.Namespace, rss: tuple[int, int],
           cpu_total: float) -> None:
    print(f"\nxDS bench (the control plane's push pipeline): {args.services} services, {args.streams} ADS streams in "
          f"{args.client_procs} client processes, {args.watch} services per proxy"
          f"{' (full mesh)' if args.watch >= args.services else ''}, {args.changes} endpoint changes per variant, "
          f"debounce quiet {args.quiet}s max {args.max_delay}s; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs\n")
    head = f"{'':36}" + "".join(f"{r.mode:>14}" for r in results)
    print(head)
    rows = [
        ("pipeline build of all snapshots (s)", lambda r: f"{r.build_s:.2f}"),
        ("initial sync of all streams (s)", lambda r: f"{r.sync_s:.2f}"),
        ("initial config bytes (MB)", lambda r: f"{r.initial_bytes / 1e6:.1f}"),
        ("affected streams per change", lambda r: f"{statistics.mean(r.affected):.0f}"),
        ("change -> proxy ACK p50 (ms)", lambda r: f"{pct(r.per_proxy, 0.5) * 1000:.0f}"),
        ("change -> proxy ACK p99 (ms)", lambda r: f"{pct(r.per_proxy, 0.99) * 1000:.0f}"),
        ("change -> all affected p50 (ms)", lambda r: f"{pct(r.per_change, 0.5) * 1000:.0f}"),
        ("change -> all affected p99 (ms)", lambda r: f"{pct(r.per_change, 0.99) * 1000:.0f}"),
        ("bytes sent per change (KB)", lambda r: f"{statistics.mean(r.bytes_per_change) / 1000:.1f}"),
        ("resources sent per change", lambda r: f"{statistics.mean(r.resources_per_change):.0f}"),
        ("resources serialised per change", lambda r: f"{statistics.mean(r.serialized_per_change):.1f}"),
        ("control-plane CPU per change (ms)", lambda r: f"{statistics.mean(r.cpu_per_change) * 1000:.1f}"),
        ("  of which pipeline build (ms)", lambda r: f"{statistics.mean(r.pipeline_per_change) * 1000:.1f}"),
        ("longest event-loop stall (ms)", lambda r: f"{r.loop_stall_s * 1000:.0f}"),
        ("longest GC pause (ms)", lambda r: f"{r.gc_longest_s * 1000:.0f}"),
        ("GC time per change (ms)", lambda r: f"{r.gc_total_s * 1000:.0f}"),
        ("full collections", lambda r: f"{r.gc_full}"),
        ("  peak RSS after the build (MB)", lambda r: f"{r.peak_build_kb / 1024:.0f}"),
        ("  peak RSS after the initial sync (MB)", lambda r: f"{r.peak_sync_kb / 1024:.0f}"),
        ("control-plane peak RSS (MB)", lambda r: f"{r.peak_rss_kb / 1024:.0f}"),
    ]
    for label, fn in rows:
        print(f"{label:36}" + "".join(f"{fn(r):>14}" for r in results))
    if len(results) == 2:
        sotw, delta = results
        print("\nratios SotW (baseline) / delta (same changes, same proxies, same run):")
        b = statistics.mean(sotw.bytes_per_change) / max(1.0, statistics.mean(delta.bytes_per_change))
        c = statistics.mean(sotw.cpu_per_change) / max(1e-9, statistics.mean(delta.cpu_per_change))
        p = pct(sotw.per_proxy, 0.99) / max(1e-9, pct(delta.per_proxy, 0.99))
        print(f"  bytes per endpoint change   {b:8.1f}x")
        print(f"  control-plane CPU per change{c:8.1f}x")
        print(f"  p99 change -> ACK           {p:8.1f}x")
    full_mesh = args.watch >= args.services
    goal_ms = 500 if full_mesh else 250
    if results:
        print(f"\ncontrol plane: CPU {cpu_total:.1f} s over the whole run; each variant in a process of its own")
        for r in results:
            what = "baseline" if r.mode == "sotw" and len(results) > 1 else "goal"
            print(f"peak RSS, {r.mode}: {r.peak_rss_kb / 1024:.0f} MB ({what}: < 1024 MB: "
                  f"{'OK' if r.peak_rss_kb < 1024 * 1024 else 'MISSED'})")
        for r in results:
            p99 = pct(r.per_proxy, 0.99) * 1000
            what = "baseline" if r.mode == "sotw" and len(results) > 1 else "goal"
            print(f"p99 change -> ACK, {r.mode}: {p99:.0f} ms ({what}: {'full mesh' if full_mesh else 'scoped'} "
                  f"< {goal_ms} ms: {'OK' if p99 < goal_ms else 'MISSED'})")
    if catalog is not None:
        print(f"catalog change of {catalog.services} services ({catalog.streams} delta streams, wildcard CDS): "
              f"longest event-loop stall {catalog.stall_s * 1000:.0f} ms (goal < 100 ms: "
              f"{'OK' if catalog.stall_s < 0.1 else 'MISSED'}); on-loop registry swap "
              f"{catalog.loop_ops_s * 1000:.1f} ms;"
              f" every stream ACKed its new clusters in {catalog.converge_s:.2f} s; {catalog.serialized} resources "
              f"serialised (the longest stall ended at +{catalog.stall_at_s * 1000:.0f} ms; the pipeline ran "
              f"+{catalog.build_s[0] * 1000:.0f}..+{catalog.build_s[1] * 1000:.0f} ms)")


async def variant_in_child(mode: str, logdir: Path) -> Result:
    """One variant in a fresh process of its own (the same arguments): each starts from the same empty heap, so
    its peak RSS, its GC pauses and its latencies are its own, not what the variant before it left behind."""
    out = logdir / f"result-{mode}.json"
    argv = [a for a in sys.argv[1:]]
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, *argv, "--one-variant", mode,
                                                "--result-file", str(out))
    if await proc.wait() != 0:
        raise RuntimeError(f"the {mode} variant failed (exit {proc.returncode})")
    return Result(**json.loads(out.read_text()))


async def main_async(args: argparse.Namespace) -> None:
    tune_gc()  # as ``meshfed controlplane`` does
    cpu0 = time.process_time()
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-xds-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    if args.one_variant:  # a child of the run below: one variant, its result as JSON
        result = await run_variant(args.one_variant, args, logdir)
        Path(args.result_file).write_text(json.dumps(dataclasses.asdict(result)))  # noqa: ASYNC240 - at the end
        return
    results = []
    for mode in [v for v in args.variants.split(",") if v]:
        t = time.monotonic()
        print(f"{time.strftime('%H:%M:%S')} {mode}: starting", flush=True)
        results.append(await variant_in_child(mode, logdir))
        print(f"{mode}: done in {time.monotonic() - t:.1f}s", flush=True)
        cpu0 -= results[-1].cpu_s  # the child's CPU counts below
    catalog = None
    if args.catalog:
        print(f"{time.strftime('%H:%M:%S')} catalog change of {args.catalog} services: starting", flush=True)
        catalog = await run_catalog(args, logdir)
    report(results, catalog, args, rss_kb(), time.process_time() - cpu0)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--watch", type=int, default=100, help="services each proxy subscribes to")
    ap.add_argument("--changes", type=int, default=15)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--quiet", type=float, default=0.05)
    ap.add_argument("--max-delay", type=float, default=0.5)
    ap.add_argument("--inflight-mb", type=int, default=64, help="the ADS server's in-flight response budget")
    ap.add_argument("--variants", default="sotw,delta", help="comma-separated: sotw, delta (empty: none)")
    ap.add_argument("--catalog", type=int, default=10000, help="services in the catalog change (0: skip it)")
    ap.add_argument("--catalog-streams", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="cProfile the control plane during the changes")
    ap.add_argument("--one-variant", choices=["sotw", "delta"], help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
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
