"""Traffic policy in the generated configuration: priorities, subsets, outlier detection defaults and knobs,
connection pools, health checks, VirtualService routes; and real Envoy accepting all of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from discovery.convert import convert
from discovery.model import ClusterId, Locality, ServiceKey, namespace
from discovery.policy import Failover, LocalityLb, TrafficPolicies
from gateway import generators as g
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext, UpstreamEndpoint
from gateway.traffic import (
    DEFAULT_BASE_EJECTION_S,
    DEFAULT_CONSECUTIVE_5XX,
    DEFAULT_CONSECUTIVE_GATEWAY_ERRORS,
    DEFAULT_RETRY_ATTEMPTS,
    priorities,
)
from tests.discovery.test_policy import FULL_DR, FULL_VS
from tests.gateway.envoy_fixtures import ControlPlane, dumped_names, start_envoy, wait_ready, wait_until
from tests.gateway.mesh_fixtures import EAST, RATINGS, REVIEWS, TD, WEST, Mesh
from tests.support.procs import free_port

HOST = REVIEWS.clusterset_host
OUT = f"outbound|9080||{HOST}"


def mesh_with_reviews_everywhere() -> Mesh:
    mesh = Mesh(east_gateway_port=15443, west_gateway_port=16443)
    mesh.pods[(EAST, REVIEWS)] = [("127.0.0.4", 21001), ("127.0.0.5", 21001)]
    mesh.pods[(WEST, REVIEWS)] = [("127.0.0.6", 20001)]
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.7", 20002)]
    mesh.exports[EAST] = {REVIEWS}
    mesh.exports[WEST] = {REVIEWS, RATINGS}
    return mesh


def context(*manifests: str, labelled: bool = False) -> PushContext:
    """East's context; ``labelled``: east's first reviews pod carries ``version: v2`` (as the Kubernetes source
    would report a pod's labels)."""
    mesh = mesh_with_reviews_everywhere()
    reg = mesh.registry(EAST)
    if labelled:
        svc = reg.service(EAST, REVIEWS)
        assert svc is not None
        eps = (replace(svc.endpoints[0], labels=(("version", "v2"),)), *svc.endpoints[1:])
        reg = reg.with_shard(EAST, [replace(svc, endpoints=eps)], reg.exports[EAST].values())
    objs = [convert(doc, cluster=EAST) for text in manifests for doc in yaml.safe_load_all(text) if doc]
    return PushContext(registry=reg, trust_domain=TD, policies=TrafficPolicies.of(objs))


def sidecar(kind: ProxyKind = ProxyKind.SIDECAR) -> ProxyInfo:
    return ProxyInfo(kind=kind, cluster=EAST, node_id="sidecar~127.0.0.9~pp-1.default~default.svc.cluster.local",
                     namespace=namespace("default"), service_account="productpage")


def by_priority(cla: Any) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for group in cla.endpoints:
        out.setdefault(group.priority, []).extend(
            f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}"
            for e in group.lb_endpoints)
    return out


def test_default_priorities_local_cluster_first_then_remote_gateway() -> None:
    eds = g.generate(g.ENDPOINT_TYPE, sidecar(), None, context())
    assert by_priority(eds[OUT]) == {0: ["127.0.0.4:21001", "127.0.0.5:21001"], 1: ["127.0.0.1:16443"]}
    # Only the remote gateway takes part in the active health check; local pods are Kubernetes' business.
    checks = {e.endpoint.address.socket_address.port_value: e.endpoint.health_check_config.disable_active_health_check
              for grp in eds[OUT].endpoints for e in grp.lb_endpoints}
    assert checks == {21001: True, 16443: False}


def _ep(cluster: str, region: str, zone: str = "z") -> UpstreamEndpoint:
    return UpstreamEndpoint(address="127.0.0.1", port=1, weight=1, cluster=ClusterId(cluster), via_gateway=True,
                            locality=Locality(region=region, zone=zone, cluster=cluster, network=f"net-{cluster}"))


def test_priority_ranks_same_region_failover_region_and_failover_priority() -> None:
    mesh = mesh_with_reviews_everywhere()
    east = mesh.clusters()[EAST]  # region eu, zone eu-1
    eps = [_ep("east", "eu"), _ep("north", "eu"), _ep("west", "us"), _ep("south", "ap")]
    assert priorities(eps, local=east, local_cluster="east", locality=None) == [0, 1, 2, 2]
    failover = LocalityLb(failover=(Failover(from_region="eu", to_region="ap"),))
    assert priorities(eps, local=east, local_cluster="east", locality=failover) == [0, 1, 3, 2]
    assert priorities(eps, local=east, local_cluster="east", locality=LocalityLb(enabled=False)) == [0, 0, 0, 0]
    by_region = LocalityLb(failover_priority=("topology.kubernetes.io/region",))
    assert priorities(eps, local=east, local_cluster="east", locality=by_region) == [0, 0, 1, 1]
    two = LocalityLb(failover_priority=("topology.kubernetes.io/region", "topology.istio.io/cluster"))
    assert priorities(eps, local=east, local_cluster="east", locality=two) == [0, 1, 2, 2]
    # Priorities stay contiguous when a rank is missing (nothing in the caller's region but itself).
    assert priorities([eps[0], eps[2]], local=east, local_cluster="east", locality=None) == [0, 1]
    assert priorities([eps[2]], local=east, local_cluster="east", locality=None) == [0]


def test_outlier_detection_is_on_by_default_with_health_checks_on_remote_clusters() -> None:
    cds = g.generate(g.CLUSTER_TYPE, sidecar(), None, context())
    c = cds[OUT]
    od = c.outlier_detection
    assert od.consecutive_5xx.value == DEFAULT_CONSECUTIVE_5XX
    assert od.consecutive_gateway_failure.value == DEFAULT_CONSECUTIVE_GATEWAY_ERRORS
    assert od.enforcing_consecutive_gateway_failure.value == 100
    assert od.base_ejection_time.seconds == DEFAULT_BASE_EJECTION_S
    assert od.max_ejection_percent.value == 100
    [hc] = c.health_checks
    assert hc.HasField("tcp_health_check") and hc.no_traffic_interval == hc.interval
    assert not hc.reuse_connection.value  # a fresh connect + mTLS handshake every time
    # ratings is only in west: also checked. A service with no remote endpoint has nothing to check.
    assert len(cds[f"outbound|9080||{RATINGS.clusterset_host}"].health_checks) == 1
    ctx = context()
    # The check stays while west's reviews has no ready endpoint (it is still imported from west): the check
    # does not come and go with remote readiness.
    no_west_endpoints = replace(ctx, registry=ctx.registry.with_remote(WEST, []))
    assert g.generate(g.CLUSTER_TYPE, sidecar(), None, no_west_endpoints)[OUT].health_checks == c.health_checks
    # A service only this cluster has (not imported from anywhere) has nothing to check.
    local_only = ServiceKey.parse("details.default")
    mesh = mesh_with_reviews_everywhere()
    mesh.pods[(EAST, local_only)] = [("127.0.0.8", 21003)]
    ctx2 = PushContext(registry=mesh.registry(EAST), trust_domain=TD)
    details = g.generate(g.CLUSTER_TYPE, sidecar(), None, ctx2)[f"outbound|9080||{local_only.clusterset_host}"]
    assert len(details.health_checks) == 0 and details.HasField("outlier_detection")
    # gRPC's xDS client runs no active health checks: none is sent to it.
    grpc = g.generate(g.CLUSTER_TYPE, sidecar(ProxyKind.GRPC), None, context())
    assert len(grpc[OUT].health_checks) == 0 and grpc[OUT].HasField("outlier_detection")


def test_destination_rule_sets_lb_pool_outlier_and_subset_clusters() -> None:
    cds = g.generate(g.CLUSTER_TYPE, sidecar(), None, context(FULL_DR))
    c = cds[OUT]
    assert c.lb_policy == c.LEAST_REQUEST
    assert (c.connect_timeout.seconds, c.connect_timeout.nanos) == (0, 250_000_000)
    [t] = c.circuit_breakers.thresholds
    assert (t.max_connections.value, t.max_pending_requests.value, t.max_requests.value, t.max_retries.value) == (
        100, 10, 1000, 3)
    od = c.outlier_detection
    assert (od.consecutive_5xx.value, od.consecutive_gateway_failure.value, od.interval.nanos,
            od.base_ejection_time.seconds, od.max_ejection_percent.value) == (7, 2, 500_000_000, 90, 50)
    west = cds[f"outbound|9080|west|{HOST}"]
    assert west.lb_policy == west.RANDOM  # the subset's own loadBalancer
    assert west.outlier_detection == od  # the rule's, inherited
    assert f"outbound|9080|v2|{HOST}" in cds
    # The rule is for reviews only.
    assert cds[f"outbound|9080||{RATINGS.clusterset_host}"].lb_policy == c.ROUND_ROBIN


@pytest.mark.parametrize("how", ["annotation", "zero thresholds"])
def test_outlier_detection_can_be_turned_off(how: str) -> None:
    rule = FULL_DR.replace('"on"', '"off"') if how == "annotation" else FULL_DR.replace(
        "consecutive5xxErrors: 7", "consecutive5xxErrors: 0").replace(
        "consecutiveGatewayErrors: 2", "consecutiveGatewayErrors: 0")
    cds = g.generate(g.CLUSTER_TYPE, sidecar(), None, context(rule))
    assert not cds[OUT].HasField("outlier_detection")
    assert not cds[f"outbound|9080|west|{HOST}"].HasField("outlier_detection")


def test_one_zero_threshold_turns_off_only_that_kind_of_ejection() -> None:
    cds = g.generate(g.CLUSTER_TYPE, sidecar(), None, context(FULL_DR.replace("consecutive5xxErrors: 7",
                                                                              "consecutive5xxErrors: 0")))
    od = cds[OUT].outlier_detection
    assert od.enforcing_consecutive_5xx.value == 0 and od.enforcing_consecutive_gateway_failure.value == 100


def test_subset_endpoints_cluster_label_matches_gateways_pod_labels_only_local_pods() -> None:
    eds = g.generate(g.ENDPOINT_TYPE, sidecar(), None, context(FULL_DR, labelled=True))
    # By cluster label: west's subset is west's gateway (its pods stand behind it), with east's pods one priority
    # below as its failover.
    assert by_priority(eds[f"outbound|9080|west|{HOST}"]) == {0: ["127.0.0.1:16443"],
                                                              1: ["127.0.0.4:21001", "127.0.0.5:21001"]}
    # By pod label: only the local pod that carries it; never a remote gateway (pod labels are not federated).
    assert by_priority(eds[f"outbound|9080|v2|{HOST}"]) == {0: ["127.0.0.4:21001"]}
    # The whole service keeps its locality priorities (the rule's failover does not apply: us-east is not ours).
    assert by_priority(eds[OUT]) == {0: ["127.0.0.4:21001", "127.0.0.5:21001"], 1: ["127.0.0.1:16443"]}


SPLIT_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
    - {name: east, labels: {topology.istio.io/cluster: east}}
    - {name: west, labels: {topology.istio.io/cluster: west}}
    - {name: east-v2, labels: {topology.istio.io/cluster: east, version: v2}}
    - {name: west-v2, labels: {topology.istio.io/cluster: west, version: v2}}
"""


def test_a_subset_by_location_fails_over_to_the_services_other_locations() -> None:
    eds = g.generate(g.ENDPOINT_TYPE, sidecar(), None, context(SPLIT_DR, labelled=True))
    # Each cluster's subset: its own endpoints first, the other cluster's below (the caller's locality order).
    assert by_priority(eds[f"outbound|9080|east|{HOST}"]) == {0: ["127.0.0.4:21001", "127.0.0.5:21001"],
                                                              1: ["127.0.0.1:16443"]}
    assert by_priority(eds[f"outbound|9080|west|{HOST}"]) == {0: ["127.0.0.1:16443"],
                                                              1: ["127.0.0.4:21001", "127.0.0.5:21001"]}
    # Pod labels stay a requirement: east's v2 subset has no other v2 pod to fail over to (west's gateway does not
    # federate pod labels), and west's v2 subset (no endpoint of its own) holds east's v2 pod only.
    assert by_priority(eds[f"outbound|9080|east-v2|{HOST}"]) == {0: ["127.0.0.4:21001"]}
    assert by_priority(eds[f"outbound|9080|west-v2|{HOST}"]) == {0: ["127.0.0.4:21001"]}


def test_subset_failover_off_keeps_a_subset_to_its_own_endpoints() -> None:
    rule = SPLIT_DR.replace("metadata: {name: reviews, namespace: default}",
                            "metadata:\n  name: reviews\n  namespace: default\n"
                            "  annotations: {traffic.meshfed.io/subset-failover: \"off\"}")
    eds = g.generate(g.ENDPOINT_TYPE, sidecar(), None, context(rule, labelled=True))
    assert by_priority(eds[f"outbound|9080|west|{HOST}"]) == {0: ["127.0.0.1:16443"]}
    assert by_priority(eds[f"outbound|9080|east|{HOST}"]) == {0: ["127.0.0.4:21001", "127.0.0.5:21001"]}
    assert f"outbound|9080|west-v2|{HOST}" in eds and not eds[f"outbound|9080|west-v2|{HOST}"].endpoints


def _vhost(routes: dict[str, Any], key_host: str = HOST) -> Any:
    return next(v for v in routes["outbound"].virtual_hosts if v.name == f"{key_host}:9080")


def test_default_route_retries_for_sidecars_not_for_proxyless_grpc() -> None:
    [route] = _vhost(g.generate(g.ROUTE_TYPE, sidecar(), None, context())).routes
    rp = route.route.retry_policy
    assert rp.num_retries.value == DEFAULT_RETRY_ATTEMPTS and list(rp.retriable_status_codes) == [503]
    assert rp.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert [p.name for p in rp.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
    [grpc_route] = _vhost(g.generate(g.ROUTE_TYPE, sidecar(ProxyKind.GRPC), None, context())).routes
    assert not grpc_route.route.HasField("retry_policy")


def test_virtual_service_routes_matches_split_retries_timeout() -> None:
    routes = g.generate(g.ROUTE_TYPE, sidecar(), None, context(FULL_DR, FULL_VS))
    vhost = _vhost(routes)
    first, second, catch_all = vhost.routes
    assert first.name == second.name == "canary"
    assert first.match.prefix == "/api"
    headers = {h.name: h.string_match for h in first.match.headers}
    assert headers["x-user"].exact == "jason" and headers["x-tier"].safe_regex.regex == "gold|silver"
    assert headers[":method"].exact == "GET"
    assert second.match.safe_regex.regex == "^/v[0-9]+/.*"
    split = [(c.name, c.weight.value) for c in first.route.weighted_clusters.clusters]
    assert split == [(f"outbound|9080|east|{HOST}", 90), (f"outbound|9080|west|{HOST}", 10)]
    rp = first.route.retry_policy
    assert rp.retry_on == "5xx,connect-failure,retriable-status-codes" and list(rp.retriable_status_codes) == [503]
    assert rp.num_retries.value == 3 and rp.per_try_timeout.seconds == 2
    assert first.route.timeout.seconds == 10
    assert catch_all.match.prefix == "/" and catch_all.route.cluster == OUT
    assert catch_all.route.retry_policy.num_retries.value == DEFAULT_RETRY_ATTEMPTS
    # The same VirtualService also governs ratings (second host); its destinations stay reviews.
    assert _vhost(routes, RATINGS.clusterset_host).routes[0].name == "canary"


def test_destinations_naming_one_cluster_are_merged_and_zero_weights_dropped() -> None:
    vs = FULL_VS.replace("subset: west}\n          weight: 10", "subset: east}\n          weight: 10")
    assert vs != FULL_VS
    first = _vhost(g.generate(g.ROUTE_TYPE, sidecar(), None, context(vs))).routes[0]
    assert first.route.cluster == f"outbound|9080|east|{HOST}"  # 90 + 10 to one cluster: no split at all
    vs0 = FULL_VS.replace("weight: 10", "weight: 0")
    first = _vhost(g.generate(g.ROUTE_TYPE, sidecar(), None, context(vs0))).routes[0]
    assert first.route.cluster == f"outbound|9080|east|{HOST}"


def test_virtual_service_with_zero_attempts_has_no_retry_policy() -> None:
    vs = FULL_VS.replace("retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"5xx,connect-failure,503\"}",
                         "retries: {attempts: 0}")
    first = _vhost(g.generate(g.ROUTE_TYPE, sidecar(), None, context(vs))).routes[0]
    assert not first.route.HasField("retry_policy")


@pytest.fixture
async def plane() -> AsyncIterator[ControlPlane]:
    mesh = Mesh(east_gateway_port=free_port(), west_gateway_port=free_port())
    mesh.pods[(EAST, REVIEWS)] = [("127.0.0.1", free_port())]
    mesh.pods[(WEST, REVIEWS)] = [("127.0.0.1", free_port())]
    mesh.exports[EAST] = {REVIEWS}
    mesh.exports[WEST] = {REVIEWS}
    objs = [convert(doc, cluster=EAST) for text in (FULL_DR, FULL_VS) for doc in yaml.safe_load_all(text)]
    ctx = PushContext(registry=mesh.registry(EAST), trust_domain=TD, policies=TrafficPolicies.of(objs))
    async with ControlPlane(ctx=ctx) as cp:
        yield cp


async def test_envoy_accepts_every_policy_feature(plane: ControlPlane, tmp_path: Path) -> None:
    proxy = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST,
                      node_id="sidecar~127.0.0.1~reviews-1.default~default.svc.cluster.local",
                      namespace=namespace("default"), service_account="reviews", services=(REVIEWS,),
                      inbound=(InboundPort(free_port(), free_port(), "http"),), outbound_port=free_port())
    envoy = start_envoy(tmp_path, plane, proxy)
    try:
        await wait_ready(envoy)
        expected = g.generate_all(proxy, plane.ctx)
        assert f"outbound|9080|west|{HOST}" in expected[g.CLUSTER_TYPE]

        async def all_in_force() -> bool:
            names = dumped_names(await envoy.admin.config_dump(include_eds=True))
            return (names["clusters"] >= set(expected[g.CLUSTER_TYPE])
                    and names["routes"] >= set(expected[g.ROUTE_TYPE])
                    and names["endpoints"] >= set(expected[g.ENDPOINT_TYPE]))

        await wait_until(all_in_force, within=30, what="every generated resource in /config_dump")
        assert await envoy.admin.rejected() == {}
        for row in plane.cache.status():
            assert row.nack_error == "", f"{row.type_url} NACKed: {row.nack_error}"
    finally:
        envoy.stop()


def test_endpoint_labels_reach_upstream_endpoints() -> None:
    ctx = context(labelled=True)
    svc = ctx.registry.service(EAST, REVIEWS)
    assert svc is not None
    ups = ctx.upstream_endpoints(REVIEWS, svc.ports[0])
    assert [u.labels for u in ups if not u.via_gateway] == [(("version", "v2"),), ()]
