"""The push pipeline: after every kind of change its snapshots are exactly what the generators make from scratch,
and it rebuilds (and serialises) only what depends on the change."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Mapping

import pytest
import yaml

from discovery.convert import convert
from discovery.model import (
    ClusterId,
    Endpoint,
    Locality,
    LocalitySummary,
    Registry,
    RemoteEndpoints,
    Service,
    ServiceExport,
    ServiceKey,
    ServicePort,
    namespace,
)
from discovery.policy import TrafficPolicies
from gateway import generators as g
from gateway.cache import SnapshotCache
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext
from gateway.pipeline import PushPipeline
from gateway.push import ConfigKey, Kind, PushRequest
from gateway.snapshot import Snapshot
from tests.gateway.mesh_fixtures import EAST, RATINGS, REVIEWS, T0, WEST, Mesh, MeshCA, authorization_policies

ECHO = ServiceKey.parse("echo.default")
REVIEWS_ALLOW = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-allow, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules: [{from: [{source: {namespaces: [default]}}]}]
"""


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA()


def make_mesh() -> Mesh:
    mesh = Mesh(east_gateway_port=15443, west_gateway_port=16443)
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.2", 20001), ("127.0.0.3", 20001)]
    mesh.pods[(EAST, REVIEWS)] = [("127.0.0.4", 21001)]
    mesh.pods[(EAST, RATINGS)] = [("127.0.0.5", 21002)]
    mesh.exports[WEST] = {RATINGS}
    mesh.exports[EAST] = {RATINGS}
    return mesh


SIDECAR = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, namespace=namespace("default"), service_account="reviews",
                    node_id="sidecar~127.0.0.4~reviews-1.default~default.svc.cluster.local", services=(REVIEWS,),
                    inbound=(InboundPort(21001, 8081, "http"),), outbound_port=15001, ip="127.0.0.4")
OTHER_NS = dataclasses.replace(SIDECAR, node_id="sidecar~127.0.0.6~sleep-1.other~other.svc.cluster.local",
                               namespace=namespace("other"), service_account="sleep", services=(), inbound=(),
                               ip="127.0.0.6")
GRPC = ProxyInfo(kind=ProxyKind.GRPC, cluster=EAST, namespace=namespace("default"), service_account="echo",
                 services=(ECHO,), ip="127.0.0.9", node_id="grpc~127.0.0.9~echo-1.default~default.svc.cluster.local",
                 inbound=(InboundPort(7070, 7070, "grpc", "grpc"),))
GATEWAY = ProxyInfo(kind=ProxyKind.GATEWAY, cluster=EAST, namespace=namespace("meshfed"), gateway_port=15443,
                    node_id="router~127.0.0.1~gw.meshfed~meshfed.svc.cluster.local")
PROXIES = {p.node_id: p for p in (SIDECAR, OTHER_NS, GRPC, GATEWAY)}


class Plane:
    """A pipeline, its cache and the context it was last given (what the control plane holds)."""

    def __init__(self, ctx: PushContext) -> None:
        self.cache = SnapshotCache()
        self.pipeline = PushPipeline(cache=self.cache)
        self.ctx = ctx

    async def push(self, ctx: PushContext | None = None, *, nodes: Mapping[str, ProxyInfo] = PROXIES,
                   **request: object) -> tuple[str, ...]:
        self.ctx = ctx or self.ctx
        result = await self.pipeline.push(PushRequest(**request), self.ctx, nodes)  # type: ignore[arg-type]
        assert not result.errors
        return result.changed

    def check(self, proxies: Mapping[str, ProxyInfo] = PROXIES) -> None:
        """Every proxy's snapshot is the one the generators build from scratch for the same context."""
        for node_id, proxy in proxies.items():
            expected = Snapshot.build(g.generate_all(proxy, dataclasses.replace(self.ctx)))
            got = self.cache.get(node_id)
            assert got is not None, node_id
            for type_url in g.GENERATORS:
                assert got.names(type_url) == expected.names(type_url), (node_id, type_url)
                assert got.version(type_url) == expected.version(type_url), (node_id, type_url)
            assert got == expected


def with_service(ctx: PushContext, service: Service) -> PushContext:
    reg = ctx.registry
    services = {s.key: s for s in reg.services(reg.local)}
    services[service.key] = service
    return dataclasses.replace(ctx, registry=reg.with_shard(reg.local, services.values(),
                                                              reg.exports.get(reg.local, {}).values()))


def add_pod(ctx: PushContext, key: ServiceKey, address: str, port: int) -> PushContext:
    svc = ctx.registry.service(ctx.local, key)
    assert svc is not None
    ep = Endpoint(address=address, zone="eu-1", ports=(("http", port),), service_account=str(key.name))
    return with_service(ctx, dataclasses.replace(svc, endpoints=(*svc.endpoints, ep)))


def built(plane: Plane) -> dict[str, int]:
    return dict(plane.pipeline.stats.built)


async def test_snapshots_equal_the_generators_after_every_kind_of_change(ca: MeshCA) -> None:
    mesh = make_mesh()
    certs = dict([ca.issue("east", "default", "reviews")])
    plane = Plane(mesh.context(EAST, ca, certs))
    assert set(await plane.push(full=True)) == set(PROXIES)
    plane.check()

    # Only endpoints: a pod of east's ratings (local shard), then west's ready count (remote shard).
    assert await plane.push(add_pod(plane.ctx, RATINGS, "127.0.0.7", 21002),
                            configs=frozenset({ConfigKey.shard(EAST)}))
    plane.check()
    reg = plane.ctx.registry
    shard = dict(reg.remote[WEST])
    loc = shard[RATINGS].localities[0]
    shard[RATINGS] = dataclasses.replace(shard[RATINGS], localities=(dataclasses.replace(loc, ready=5, weight=5),))
    assert await plane.push(dataclasses.replace(plane.ctx, registry=reg.with_remote(WEST, shard.items())),
                            configs=frozenset({ConfigKey.shard(WEST)}))
    plane.check()

    # A new local service and its export (definitions: clusters, routes, the gateway's listener).
    echo = Service(cluster=EAST, key=ECHO, ports=(ServicePort(port=7070, name="grpc"),),
                   endpoints=(Endpoint(address="127.0.0.9", zone="eu-1", ports=(("grpc", 7070),),
                                       service_account="echo"),))
    ctx = with_service(plane.ctx, echo)
    reg = ctx.registry
    exports = [*reg.exports[EAST].values(), ServiceExport(cluster=EAST, key=ECHO, created=T0)]
    ctx = dataclasses.replace(ctx, registry=reg.with_shard(EAST, reg.services(EAST), exports))
    assert await plane.push(ctx, configs=frozenset({ConfigKey.shard(EAST)}))
    plane.check()

    # The federation's catalog: ratings no longer imported from west (the remote shard empties too).
    reg = plane.ctx.registry
    imports = dict(reg.imports)
    imports[RATINGS] = dataclasses.replace(imports[RATINGS], clusters=(EAST,))
    reg = reg.with_catalog(clusters=reg.clusters, imports=imports).with_remote(WEST, ())
    assert await plane.push(dataclasses.replace(plane.ctx, registry=reg),
                            configs=frozenset({ConfigKey(Kind.CATALOG), ConfigKey.shard(WEST)}))
    plane.check()

    # Authorization, traffic policy, trust bundle, certificates.
    authz = authorization_policies(REVIEWS_ALLOW, EAST)
    assert await plane.push(dataclasses.replace(plane.ctx, authz=authz), configs=frozenset({ConfigKey(Kind.AUTHZ)}))
    plane.check()
    policies = TrafficPolicies.of(convert(doc, cluster=EAST) for doc in yaml.safe_load_all("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings.default.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings.default.svc.cluster.local]
  http:
  - route:
    - destination: {host: ratings.default.svc.cluster.local, subset: v1}
"""))
    assert policies
    assert await plane.push(dataclasses.replace(plane.ctx, policies=policies),
                            configs=frozenset({ConfigKey(Kind.POLICY)}))
    plane.check()
    other = MeshCA()
    assert await plane.push(dataclasses.replace(plane.ctx, trust_bundle_pem=ca.bundle_pem() + other.bundle_pem()),
                            configs=frozenset({ConfigKey(Kind.TRUST)}))
    plane.check()
    certs = dict([ca.issue("east", "default", "reviews")])
    changed = await plane.push(dataclasses.replace(plane.ctx, workload_certs=certs),
                               proxies=frozenset({SIDECAR.node_id}), configs=frozenset({ConfigKey(Kind.CERTS)}))
    assert changed == (SIDECAR.node_id,)  # the only proxy with that identity
    plane.check()

    # A proxy that leaves is forgotten; when it connects again it is built from the shared tables.
    rest = {n: p for n, p in PROXIES.items() if p is not OTHER_NS}
    assert await plane.push(nodes=rest) == ()
    plane.cache.clear(OTHER_NS.node_id)
    assert await plane.push(proxies=frozenset({OTHER_NS.node_id})) == (OTHER_NS.node_id,)
    plane.check()
    # Its metadata changed on reconnecting: rebuilt whole from the new ProxyInfo.
    moved = {**PROXIES, OTHER_NS.node_id: dataclasses.replace(OTHER_NS, outbound_port=15009)}
    assert await plane.push(nodes=moved, proxies=frozenset({OTHER_NS.node_id})) == (OTHER_NS.node_id,)
    plane.check(moved)


async def test_an_endpoints_only_change_rebuilds_no_listener_route_or_cluster(ca: MeshCA) -> None:
    mesh = make_mesh()
    plane = Plane(mesh.context(EAST, ca, dict([ca.issue("east", "default", "reviews")])))
    await plane.push(full=True)
    before = built(plane)
    changed = await plane.push(add_pod(plane.ctx, RATINGS, "127.0.0.8", 21002),
                               configs=frozenset({ConfigKey.shard(EAST)}))
    assert set(changed) == set(PROXIES)  # every proxy has ratings' endpoints (the gateway its local pods)
    plane.check()
    after = built(plane)
    assert after.get(g.LISTENER_TYPE) == before.get(g.LISTENER_TYPE)
    assert after.get(g.ROUTE_TYPE) == before.get(g.ROUTE_TYPE)
    assert after.get(g.CLUSTER_TYPE) == before.get(g.CLUSTER_TYPE)
    assert after.get(g.SECRET_TYPE) == before.get(g.SECRET_TYPE)
    # ratings' outbound endpoints once (shared by every sidecar and gRPC client), the gateway's once.
    assert after[g.ENDPOINT_TYPE] - before[g.ENDPOINT_TYPE] == 2
    # And what the streams hold of the other types is the very same entries as before.
    for node_id in PROXIES:
        snap = plane.cache.get(node_id)
        assert snap is not None


def big_registry(n: int) -> Registry:
    """East alone with ``n`` local services, each with two pods; every one exported."""
    services = [Service(cluster=EAST, key=ServiceKey.parse(f"svc-{i}.default"),
                        ports=(ServicePort(port=8080, name="http"),),
                        endpoints=tuple(Endpoint(address=f"10.1.{i // 200}.{i % 200 + k}", zone="eu-1",
                                                 ports=(("http", 8080),), service_account=f"svc-{i}")
                                        for k in range(2)))
                for i in range(n)]
    exports = [ServiceExport(cluster=EAST, key=s.key, created=T0) for s in services]
    return Registry(local=EAST).with_shard(EAST, services, exports).with_catalog(
        clusters=make_mesh().clusters(), imports={})


async def test_one_changed_service_reserialises_only_what_depends_on_it(ca: MeshCA) -> None:
    ctx = PushContext(registry=big_registry(200), trust_domain=ca.td, trust_bundle_pem=ca.bundle_pem())
    sidecars = {f"sidecar~10.9.0.{i}~app-{i}.default~default.svc.cluster.local": ProxyInfo(
        kind=ProxyKind.SIDECAR, cluster=EAST, namespace=namespace("default"), service_account="app",
        node_id=f"sidecar~10.9.0.{i}~app-{i}.default~default.svc.cluster.local", ip=f"10.9.0.{i}",
        inbound=(InboundPort(9000, 9001, "http"),)) for i in range(20)}
    proxies = {**sidecars, GATEWAY.node_id: GATEWAY}
    plane = Plane(ctx)
    await plane.push(full=True, nodes=proxies)
    plane.check(proxies)
    stats = plane.pipeline.stats
    first = stats.serialized
    # 200 clusters and 200 endpoint assignments shared by all 20 sidecars, plus each one's own few: far fewer than
    # the 20 x 400 a per-proxy build serialises.
    assert first < 200 * 2 + 200 * 2 + 20 * 10

    key = ServiceKey.parse("svc-7.default")
    n0, b0 = stats.serialized, built(plane)
    changed = await plane.push(add_pod(plane.ctx, key, "10.1.0.99", 8080), nodes=proxies,
                               configs=frozenset({ConfigKey.endpoints(key)}))
    plane.check(proxies)
    assert set(changed) == set(proxies)
    # svc-7's outbound endpoints (shared) and the gateway's: two serialisations for 21 proxies; its cluster's
    # inputs (ports, policy, expected peers) did not change... except the new pod's account, the same as before.
    assert stats.serialized - n0 == 2
    assert {t: c - b0.get(t, 0) for t, c in built(plane).items() if c != b0.get(t, 0)} == {g.ENDPOINT_TYPE: 2}

    # A definition change (a second port) of one service: its clusters, endpoints and vhosts, the sidecars'
    # route (one per namespace and kind) and the gateway's listener and clusters; no sidecar listener.
    svc = plane.ctx.registry.service(EAST, key)
    assert svc is not None
    ctx2 = with_service(plane.ctx, dataclasses.replace(svc, ports=(*svc.ports, ServicePort(port=9090, name="metrics"))))
    n0, b0 = stats.serialized, built(plane)
    await plane.push(ctx2, nodes=proxies, configs=frozenset({ConfigKey.shard(EAST)}))
    plane.check(proxies)
    delta = {t: c - b0.get(t, 0) for t, c in built(plane).items() if c != b0.get(t, 0)}
    assert delta == {g.CLUSTER_TYPE: 2 + 2, g.ENDPOINT_TYPE: 2 + 2, g.ROUTE_TYPE: 1, g.LISTENER_TYPE: 1}
    assert stats.serialized - n0 == sum(delta.values())


async def test_the_work_runs_off_the_event_loop(ca: MeshCA) -> None:
    """The build runs on a worker thread while the loop keeps ticking."""
    ctx = PushContext(registry=big_registry(300), trust_domain=ca.td, trust_bundle_pem=ca.bundle_pem())
    threads: set[int] = set()
    plane = Plane(ctx)
    original = plane.pipeline._build

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        threads.add(threading.get_ident())
        return original(*args, **kwargs)  # type: ignore[arg-type]

    plane.pipeline._build = spy  # type: ignore[method-assign]
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await plane.push(full=True, nodes={GATEWAY.node_id: GATEWAY})
    stop.set()
    await task
    assert threads and threading.get_ident() not in threads
    assert ticks > 1


async def test_a_failing_generator_keeps_the_last_good_resources_and_names_the_proxy(
        ca: MeshCA, monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = make_mesh()
    plane = Plane(mesh.context(EAST, ca, {}))
    await plane.push(full=True)
    good = plane.cache.get(SIDECAR.node_id)
    assert good is not None

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    from gateway.generators import eds
    monkeypatch.setattr(eds, "outbound_assignments_of", broken)
    result = await plane.pipeline.push(PushRequest(configs=frozenset({ConfigKey.endpoints(RATINGS)})), plane.ctx,
                                       PROXIES)
    assert "boom" in result.errors[SIDECAR.node_id]
    assert GATEWAY.node_id not in result.errors  # its endpoints come from another generator
    assert plane.cache.get(SIDECAR.node_id) == good


def test_changes_name_keys_by_what_changed() -> None:
    from discovery.changes import registry_changes, shard_changes

    reg = big_registry(5)
    key = ServiceKey.parse("svc-1.default")
    svc = reg.service(EAST, key)
    assert svc is not None
    more = reg.with_shard(EAST, [*[s for s in reg.services(EAST) if s.key != key],
                                 dataclasses.replace(svc, endpoints=svc.endpoints[:1])],
                          reg.exports[EAST].values())
    assert shard_changes(reg, more, EAST).endpoints == {key}
    assert not shard_changes(reg, more, EAST).services
    ported = more.with_shard(EAST, [dataclasses.replace(s, ports=(ServicePort(port=1, name="x"),)) if s.key == key
                                    else s for s in more.services(EAST)], more.exports[EAST].values())
    assert shard_changes(more, ported, EAST).services == {key}
    remote = ported.with_remote(ClusterId("west"), [(key, RemoteEndpoints(
        cluster=ClusterId("west"), network=make_mesh().clusters()[WEST].network, gateway_host="127.0.0.1",
        gateway_port=1, localities=(LocalitySummary(locality=Locality(cluster=ClusterId("west")), ready=1,
                                                    weight=1),)))])
    assert shard_changes(ported, remote, WEST).endpoints == {key}
    assert registry_changes(reg, remote).services == {key}
    assert registry_changes(reg, reg) == registry_changes(remote, remote)


async def test_capture_sidecars_equal_the_generators_after_changes(ca: MeshCA) -> None:
    """Capture-mode sidecars (virtual listeners shared per identity, own virtual inbound) next to loopback ones."""
    from discovery.clusterset import OutboundTrafficMode
    from gateway.context import CaptureMode

    mesh = make_mesh()
    mesh.clusterset_ips = {RATINGS: "241.0.0.1"}
    mesh.cluster_ips = {(EAST, REVIEWS): "10.96.0.4"}
    certs = dict([ca.issue("east", "default", "reviews")])
    plane = Plane(mesh.context(EAST, ca, certs))
    cap = dataclasses.replace(SIDECAR, node_id="sidecar~10.0.0.4~reviews-2.default~default.svc.cluster.local",
                              capture=CaptureMode.REDIRECT, inbound=(InboundPort(21001, 21001, "http"),))
    cap2 = dataclasses.replace(cap, node_id="sidecar~10.0.0.5~reviews-3.default~default.svc.cluster.local")
    nodes = {**PROXIES, cap.node_id: cap, cap2.node_id: cap2}
    assert set(await plane.push(full=True, nodes=nodes)) == set(nodes)
    plane.check(nodes)
    # A new TCP service with a cluster IP: a chain in both capture sidecars' virtual outbound listener.
    db = Service(cluster=EAST, key=ServiceKey.parse("db.default"), cluster_ip="10.96.0.9",
                 ports=(ServicePort(port=5432, name="tcp"),),
                 endpoints=(Endpoint(address="10.0.0.9", ports=(("tcp", 5432),), service_account="db"),))
    changed = await plane.push(with_service(plane.ctx, db), nodes=nodes, configs=frozenset({ConfigKey.shard(EAST)}))
    assert {cap.node_id, cap2.node_id} <= set(changed)
    plane.check(nodes)
    # The outbound policy: every capture sidecar's default chain changes.
    changed = await plane.push(dataclasses.replace(plane.ctx, outbound_mode=OutboundTrafficMode.REGISTRY_ONLY),
                               nodes=nodes)
    assert {cap.node_id, cap2.node_id} <= set(changed)
    plane.check(nodes)
    # Authorization on the capture sidecars' own inbound listener.
    assert await plane.push(dataclasses.replace(plane.ctx, authz=authorization_policies(REVIEWS_ALLOW, EAST)),
                            nodes=nodes,
                            configs=frozenset({ConfigKey(Kind.AUTHZ)}))
    plane.check(nodes)
