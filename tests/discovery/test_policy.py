"""Pure conversion of Istio VirtualService and DestinationRule objects: every supported field, and every field
outside the subset reported with its path (never silently dropped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from discovery.convert import ConversionError, convert
from discovery.manifests import ManifestSource
from discovery.model import ClusterId, ServiceKey
from discovery.policy import (
    Destination,
    DestinationRule,
    Failover,
    LbAlgorithm,
    MatchKind,
    StringMatch,
    TrafficPolicies,
    VirtualService,
    parse_duration,
)

EAST = ClusterId("east")
REVIEWS = ServiceKey.parse("reviews.default")

FULL_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: default
  annotations: {traffic.meshfed.io/outlier-detection: "on"}
spec:
  host: reviews.default.svc.clusterset.local
  exportTo: ["*"]
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    loadBalancer:
      simple: LEAST_REQUEST
      localityLbSetting:
        enabled: true
        failover:
          - {from: us-east, to: eu-west}
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 2
      interval: 500ms
      baseEjectionTime: 1m30s
      maxEjectionPercent: 50
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRetries: 3}
  subsets:
    - name: west
      labels: {topology.istio.io/cluster: west}
      trafficPolicy:
        loadBalancer: {simple: RANDOM}
    - name: v2
      labels: {version: v2}
"""

FULL_VS = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews, ratings.default.svc.cluster.local]
  gateways: [mesh]
  http:
    - name: canary
      match:
        - uri: {prefix: /api}
          headers:
            x-user: {exact: jason}
            x-tier: {regex: "gold|silver"}
          method: {exact: GET}
        - uri: {regex: "^/v[0-9]+/.*"}
      route:
        - destination: {host: reviews, subset: east, port: {number: 9080}}
          weight: 90
        - destination: {host: reviews.default, subset: west}
          weight: 10
      retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx,connect-failure,503"}
      timeout: 10s
    - route:
        - destination: {host: reviews}
"""


def load(text: str) -> Any:
    return convert(yaml.safe_load(text), cluster=EAST)


def test_destination_rule_every_supported_field() -> None:
    dr = load(FULL_DR)
    assert isinstance(dr, DestinationRule)
    assert (dr.cluster, dr.namespace, dr.name, dr.host) == (EAST, "default", "reviews", REVIEWS)
    assert dr.outlier_off is False and dr.subset_failover_off is False
    lb = dr.traffic_policy.load_balancer
    assert lb is not None and lb.simple is LbAlgorithm.LEAST_REQUEST
    assert lb.locality is not None and lb.locality.enabled
    assert lb.locality.failover == (Failover(from_region="us-east", to_region="eu-west"),)
    od = dr.traffic_policy.outlier_detection
    assert od is not None
    assert (od.consecutive_5xx, od.consecutive_gateway_errors, od.interval_s, od.base_ejection_s,
            od.max_ejection_percent) == (7, 2, 0.5, 90.0, 50)
    pool = dr.traffic_policy.connection_pool
    assert pool is not None
    assert (pool.max_connections, pool.connect_timeout_s, pool.http1_max_pending_requests, pool.http2_max_requests,
            pool.max_retries) == (100, 0.25, 10, 1000, 3)
    assert [s.name for s in dr.subsets] == ["west", "v2"]
    west = dr.subset("west")
    assert west is not None and west.labels == (("topology.istio.io/cluster", "west"),)
    merged = dr.traffic_policy.overlaid(west.traffic_policy)
    assert merged.load_balancer is not None and merged.load_balancer.simple is LbAlgorithm.RANDOM
    assert merged.outlier_detection == od  # the subset did not set it: the rule's stays
    assert dr.subset("nope") is None


def test_destination_rule_failover_priority_and_annotation_off() -> None:
    dr = load("""
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: r
  namespace: shop
  annotations: {traffic.meshfed.io/outlier-detection: "off", traffic.meshfed.io/subset-failover: "off"}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        failoverPriority: [topology.kubernetes.io/region, topology.istio.io/cluster]
""")
    assert dr.host == ServiceKey.parse("reviews.shop")  # short name: the rule's namespace
    assert dr.outlier_off and dr.subset_failover_off
    loc = dr.traffic_policy.load_balancer.locality
    assert loc.failover_priority == ("topology.kubernetes.io/region", "topology.istio.io/cluster")


def test_virtual_service_every_supported_field() -> None:
    vs = load(FULL_VS)
    assert isinstance(vs, VirtualService)
    assert vs.hosts == (REVIEWS, ServiceKey.parse("ratings.default"))
    first, second = vs.http
    assert first.name == "canary"
    m0, m1 = first.matches
    assert m0.uri == StringMatch(MatchKind.PREFIX, "/api")
    assert m0.headers == (("x-user", StringMatch(MatchKind.EXACT, "jason")),
                          ("x-tier", StringMatch(MatchKind.REGEX, "gold|silver")))
    assert m0.method == StringMatch(MatchKind.EXACT, "GET")
    assert m1.uri == StringMatch(MatchKind.REGEX, "^/v[0-9]+/.*")
    assert [(r.destination, r.weight) for r in first.route] == [
        (Destination(host=REVIEWS, subset="east", port=9080), 90),
        (Destination(host=REVIEWS, subset="west"), 10),
    ]
    assert first.retries is not None
    assert (first.retries.attempts, first.retries.per_try_timeout_s, first.retries.retry_on) == (
        3, 2.0, "5xx,connect-failure,503")
    assert first.timeout_s == 10.0
    assert second.matches == () and second.route[0].weight == 100 and second.retries is None


@pytest.mark.parametrize("text, seconds", [("5s", 5.0), ("250ms", 0.25), ("1m30s", 90.0), ("1h", 3600.0),
                                           ("1.5s", 1.5), ("100us", 1e-4)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "s", "5 s", "-1s", "5d", "1s5", ""])
def test_bad_durations_name_the_field(text: str) -> None:
    with pytest.raises(ConversionError) as err:
        parse_duration(text, "spec.http[0].timeout")
    assert err.value.field == "spec.http[0].timeout"


def _mutate(text: str, path: list[Any], value: Any) -> dict[str, Any]:
    obj = yaml.safe_load(text)
    node = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return obj  # type: ignore[no-any-return]


UNSUPPORTED = [
    (FULL_VS, ["spec", "http", 0, "mirror"], {"host": "x"}, "spec.http[0].mirror"),
    (FULL_VS, ["spec", "http", 0, "fault"], {}, "spec.http[0].fault"),
    (FULL_VS, ["spec", "http", 0, "rewrite"], {"uri": "/"}, "spec.http[0].rewrite"),
    (FULL_VS, ["spec", "tcp"], [], "spec.tcp"),
    (FULL_VS, ["spec", "http", 0, "match", 0, "queryParams"], {}, "spec.http[0].match[0].queryParams"),
    (FULL_VS, ["spec", "http", 0, "route", 0, "headers"], {}, "spec.http[0].route[0].headers"),
    (FULL_VS, ["spec", "http", 0, "retries", "retryRemoteLocalities"], True,
     "spec.http[0].retries.retryRemoteLocalities"),
    (FULL_VS, ["spec", "http", 0, "match", 0, "uri", "suffix"], "x", "spec.http[0].match[0].uri.suffix"),
    (FULL_DR, ["spec", "trafficPolicy", "portLevelSettings"], [], "spec.trafficPolicy.portLevelSettings"),
    (FULL_DR, ["spec", "trafficPolicy", "loadBalancer", "consistentHash"], {},
     "spec.trafficPolicy.loadBalancer.consistentHash"),
    (FULL_DR, ["spec", "trafficPolicy", "outlierDetection", "splitExternalLocalOriginErrors"], True,
     "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors"),
    (FULL_DR, ["spec", "trafficPolicy", "connectionPool", "http", "idleTimeout"], "1s",
     "spec.trafficPolicy.connectionPool.http.idleTimeout"),
    (FULL_DR, ["spec", "trafficPolicy", "connectionPool", "tcp", "tcpKeepalive"], {},
     "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive"),
    (FULL_DR, ["spec", "workloadSelector"], {}, "spec.workloadSelector"),
    (FULL_DR, ["spec", "subsets", 0, "trafficPolicy", "tls"], {"mode": "SIMPLE"},
     "spec.subsets[0].trafficPolicy.tls.mode"),
]


@pytest.mark.parametrize("text, path, value, field", UNSUPPORTED, ids=[u[3] for u in UNSUPPORTED])
def test_fields_outside_the_subset_are_errors_naming_the_path(text: str, path: list[Any], value: Any,
                                                               field: str) -> None:
    with pytest.raises(ConversionError) as err:
        convert(_mutate(text, path, value), cluster=EAST)
    assert err.value.field == field
    assert field in str(err.value)


BAD_VALUES = [
    (FULL_VS, ["spec", "hosts"], ["*.example.com"], "spec.hosts[0]", "wildcard"),
    (FULL_VS, ["spec", "hosts"], ["www.example.com"], "spec.hosts[0]", "external hosts"),
    (FULL_VS, ["spec", "hosts"], [], "spec.hosts", "required"),
    (FULL_VS, ["spec", "gateways"], ["istio-system/ingress"], "spec.gateways", "mesh"),
    (FULL_VS, ["spec", "exportTo"], ["."], "spec.exportTo", "'*'"),
    (FULL_VS, ["spec", "http", 0, "route", 0, "weight"], 101, "spec.http[0].route[0].weight", "out of range"),
    (FULL_VS, ["spec", "http", 0, "route", 0, "weight"], "90", "spec.http[0].route[0].weight", "integer"),
    (FULL_VS, ["spec", "http", 0, "route"], [], "spec.http[0].route", "required"),
    (FULL_VS, ["spec", "http", 0, "timeout"], "ten", "spec.http[0].timeout", "duration"),
    (FULL_VS, ["spec", "http", 0, "match", 0, "uri"], {"regex": "("}, "spec.http[0].match[0].uri.regex", "regular"),
    (FULL_VS, ["spec", "http", 0, "match", 0, "uri"], {"exact": "/", "prefix": "/"}, "spec.http[0].match[0].uri",
     "exactly one"),
    (FULL_VS, ["spec", "http", 0, "match", 0, "headers"], {"X-User": {"exact": "a"}},
     "spec.http[0].match[0].headers.X-User", "lower-case"),
    (FULL_VS, ["spec", "http", 0, "match", 0, "method"], {"prefix": "G"}, "spec.http[0].match[0].method.prefix",
     "not supported"),
    (FULL_VS, ["spec", "http", 0, "route", 0, "destination", "port"], {"number": 0},
     "spec.http[0].route[0].destination.port.number", "out of range"),
    (FULL_VS, ["spec", "http", 0, "retries", "retryOn"], "5xx;reset", "spec.http[0].retries.retryOn", "retry"),
    (FULL_DR, ["spec", "host"], None, "spec.host", "required"),
    (FULL_DR, ["spec", "trafficPolicy", "loadBalancer", "simple"], "PASSTHROUGH",
     "spec.trafficPolicy.loadBalancer.simple", "ROUND_ROBIN"),
    (FULL_DR, ["spec", "trafficPolicy", "outlierDetection", "maxEjectionPercent"], 101,
     "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "out of range"),
    (FULL_DR, ["spec", "trafficPolicy", "outlierDetection", "interval"], "0s",
     "spec.trafficPolicy.outlierDetection.interval", "longer than zero"),
    (FULL_DR, ["spec", "trafficPolicy", "loadBalancer", "localityLbSetting", "failoverPriority"], ["app"],
     "spec.trafficPolicy.loadBalancer.localityLbSetting.failoverPriority[0]", "only"),
    (FULL_DR, ["spec", "trafficPolicy", "loadBalancer", "localityLbSetting", "failover"], [{"from": "a", "to": "a"}],
     "spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0].to", "differ"),
    (FULL_DR, ["spec", "trafficPolicy", "loadBalancer", "localityLbSetting", "enabled"], "yes",
     "spec.trafficPolicy.loadBalancer.localityLbSetting.enabled", "true or false"),
    (FULL_DR, ["spec", "subsets", 1, "name"], "west", "spec.subsets[1].name", "duplicate"),
    (FULL_DR, ["spec", "subsets", 1, "name"], "V2", "spec.subsets[1].name", "RFC 1123"),
    (FULL_DR, ["spec", "subsets", 1, "labels"], {"version": 2}, "spec.subsets[1].labels.version", "strings"),
    (FULL_DR, ["metadata", "annotations"], {"traffic.meshfed.io/outlier-detection": "no"},
     "metadata.annotations.traffic.meshfed.io/outlier-detection", "'on' or 'off'"),
    (FULL_DR, ["metadata", "annotations"], {"traffic.meshfed.io/subset-failover": "false"},
     "metadata.annotations.traffic.meshfed.io/subset-failover", "'on' or 'off'"),
]


@pytest.mark.parametrize("text, path, value, field, words", BAD_VALUES, ids=[f"{b[3]}-{b[4]}" for b in BAD_VALUES])
def test_bad_values_are_errors_naming_the_path(text: str, path: list[Any], value: Any, field: str,
                                              words: str) -> None:
    with pytest.raises(ConversionError) as err:
        convert(_mutate(text, path, value), cluster=EAST)
    assert err.value.field == field
    assert words in err.value.reason
    assert "reviews" in str(err.value)  # the object is named: "VirtualService default/reviews: ..."


def test_index_by_service_first_wins_and_reports_the_shadowed_one() -> None:
    dr = load(FULL_DR)
    other = load(FULL_DR.replace("name: reviews\n  namespace: default\n", "name: zz-reviews\n  namespace: default\n"))
    vs = load(FULL_VS)
    index = TrafficPolicies.of(iter([other, vs, dr, "not a policy"]))  # any iterable, any order
    assert index.destination_rule(REVIEWS) is dr
    assert index.virtual_service(ServiceKey.parse("ratings.default")) is vs
    assert index.virtual_service(ServiceKey.parse("details.default")) is None
    shadowed, missing = index.problems
    assert "zz-reviews" in shadowed and "ignored" in shadowed
    # FULL_VS routes to subset "east", which FULL_DR (subsets west, v2) does not define: reported with the path.
    assert "spec.http[0].route[0] names subset 'east' of reviews.default" in missing and "503" in missing
    assert not TrafficPolicies() and index
    with_east = load(FULL_DR.replace("name: v2", "name: east"))
    assert TrafficPolicies.of([vs, with_east]).problems == ()


def test_manifest_file_with_an_unsupported_field_is_rejected_whole_and_last_good_stays(tmp_path: Path) -> None:
    folder = tmp_path / "east"
    folder.mkdir()
    (folder / "reviews-policy.yaml").write_text(FULL_DR + "---\n" + FULL_VS)
    src = ManifestSource(folder, "east")
    first = src.load()
    assert first.errors == ()
    good = TrafficPolicies.of(first.snapshot.extras)
    assert good.destination_rule(REVIEWS) is not None and good.virtual_service(REVIEWS) is not None
    bad_vs = yaml.safe_dump(_mutate(FULL_VS, ["spec", "http", 0, "mirror"], {"host": "reviews"}))
    (folder / "reviews-policy.yaml").write_text(FULL_DR.replace("consecutive5xxErrors: 7", "consecutive5xxErrors: 1")
                                                + "---\n" + bad_vs)
    second = src.load()
    [err] = second.errors
    assert err.document == 2 and err.field == "spec.http[0].mirror" and "not supported" in err.message
    assert str(folder / "reviews-policy.yaml") in str(err)
    kept = TrafficPolicies.of(second.snapshot.extras)
    assert kept == good  # the whole file is rejected: the DR change in document 1 is not applied either
    assert second.snapshot.version == first.snapshot.version
