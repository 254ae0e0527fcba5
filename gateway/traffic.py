"""Traffic policy -> Envoy settings, as pure functions (no IO, no state).

The generators call these to turn a cluster's DestinationRules and VirtualServices (``discovery.policy``) into
cluster settings (load balancing, outlier detection, circuit breakers, connect timeout, active health checks on
remote gateways), endpoint priorities (locality failover) and routes (matches, weighted splits across subsets,
retries, timeouts). Without any policy the defaults apply; they are chosen so that failover across clusters
really happens (``docs/traffic-policy.md``):

- priorities: 0 the caller's own cluster, 1 other clusters in the caller's region, 2 the rest; a subset cluster
  (a split's destination) lists its own endpoints first and the service's other locations below them, so its share
  fails over too (``subset_endpoints``);
- outlier detection on: 3 consecutive gateway errors (502/503/504, connect failures) or 5 consecutive 5xx eject an
  endpoint for 15 s (growing with repeated ejections), checked every 2 s, up to 100 % of a priority's endpoints,
  so a priority whose endpoints all fail hands its traffic to the next one; host changes apply at once
  (``update_merge_window`` 0, not Envoy's 1 s batching, during which an ejected endpoint keeps its traffic);
- routes of sidecars retry twice (connect failures, refused streams, 503), each retry on another host and in the
  next priority first, so a request that hits a failing cluster before outlier detection ejects it is answered
  by the next cluster instead of failing;
- remote gateway endpoints are checked actively (TCP connect plus the mTLS handshake through the gateway to a
  serving sidecar) every ``PushContext.gateway_health_check_s``; local pods are not (their readiness comes from
  Kubernetes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from discovery.model import ClusterInfo, ServiceKey, ServicePort
from discovery.policy import (
    CLUSTER_LABEL,
    NETWORK_LABEL,
    REGION_LABEL,
    TOPOLOGY_LABELS,
    ZONE_LABEL,
    DestinationRule,
    HttpMatch,
    HttpRoute,
    LbAlgorithm,
    LocalityLb,
    MatchKind,
    Retries,
    StringMatch,
    TrafficPolicy,
    VirtualService,
)
from gateway.anypb import pack
from gateway.context import UpstreamEndpoint, outbound_cluster_name, subset_cluster_name

# Defaults (documented in docs/traffic-policy.md; a DestinationRule's outlierDetection overrides field by field).
DEFAULT_CONSECUTIVE_5XX = 5
DEFAULT_CONSECUTIVE_GATEWAY_ERRORS = 3
DEFAULT_OUTLIER_INTERVAL_S = 2.0
DEFAULT_BASE_EJECTION_S = 15.0
DEFAULT_MAX_EJECTION_PERCENT = 100
UNLIMITED = 4294967295
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRY_ATTEMPTS = 2
HEALTH_CHECK_TIMEOUT_S = 2.0
HEALTH_CHECK_UNHEALTHY_THRESHOLD = 3

_LB = {
    LbAlgorithm.ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    LbAlgorithm.LEAST_REQUEST: cluster_pb2.Cluster.LEAST_REQUEST,
    LbAlgorithm.RANDOM: cluster_pb2.Cluster.RANDOM,
}


def _duration(seconds: float) -> Any:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def _u32(value: int) -> Any:
    return wrappers_pb2.UInt32Value(value=value)


# --------------------------------------------------------------------------------------------------------------
# Clusters


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    """The policy in force for one Envoy cluster: the rule's trafficPolicy with the subset's overlaid."""

    policy: TrafficPolicy
    outlier_off: bool = False

    @classmethod
    def of(cls, rule: DestinationRule | None, subset: str = "") -> ClusterPolicy:
        if rule is None:
            return cls(TrafficPolicy())
        policy = rule.traffic_policy
        sub = rule.subset(subset) if subset else None
        if sub is not None:
            policy = policy.overlaid(sub.traffic_policy)
        return cls(policy, outlier_off=rule.outlier_off)

    @property
    def locality(self) -> LocalityLb | None:
        lb = self.policy.load_balancer
        return lb.locality if lb is not None else None


def outlier_detection(cp: ClusterPolicy) -> Any | None:
    """Envoy outlier detection for the cluster: meshfed's defaults, fields from the rule, or ``None`` (off)."""
    if cp.outlier_off:
        return None
    od = cp.policy.outlier_detection
    c5xx = od.consecutive_5xx if od and od.consecutive_5xx is not None else DEFAULT_CONSECUTIVE_5XX
    cgw = od.consecutive_gateway_errors if od and od.consecutive_gateway_errors is not None \
        else DEFAULT_CONSECUTIVE_GATEWAY_ERRORS
    if c5xx == 0 and cgw == 0:
        return None
    interval = od.interval_s if od and od.interval_s is not None else DEFAULT_OUTLIER_INTERVAL_S
    base = od.base_ejection_s if od and od.base_ejection_s is not None else DEFAULT_BASE_EJECTION_S
    pct = od.max_ejection_percent if od and od.max_ejection_percent is not None else DEFAULT_MAX_EJECTION_PERCENT
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=_u32(c5xx or UNLIMITED),
        enforcing_consecutive_5xx=_u32(100 if c5xx else 0),
        consecutive_gateway_failure=_u32(cgw or UNLIMITED),
        enforcing_consecutive_gateway_failure=_u32(100 if cgw else 0),
        enforcing_success_rate=_u32(0),
        interval=_duration(interval),
        base_ejection_time=_duration(base),
        max_ejection_percent=_u32(pct),
    )


def circuit_breakers(cp: ClusterPolicy) -> Any:
    """Thresholds from ``connectionPool`` (unlimited where it says nothing, as Istio does)."""
    pool = cp.policy.connection_pool

    def pick(value: int | None) -> Any:
        return _u32(value if value is not None else UNLIMITED)

    return circuit_breaker_pb2.CircuitBreakers(thresholds=[circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_connections=pick(pool.max_connections if pool else None),
        max_pending_requests=pick(pool.http1_max_pending_requests if pool else None),
        max_requests=pick(pool.http2_max_requests if pool else None),
        max_retries=pick(pool.max_retries if pool else None),
    )])


def connect_timeout_s(cp: ClusterPolicy, default: float) -> float:
    pool = cp.policy.connection_pool
    return pool.connect_timeout_s if pool is not None and pool.connect_timeout_s is not None else default


def lb_policy(cp: ClusterPolicy) -> Any:
    lb = cp.policy.load_balancer
    return _LB[lb.simple] if lb is not None and lb.simple is not None else cluster_pb2.Cluster.ROUND_ROBIN


def gateway_health_check(interval_s: float) -> Any:
    """A connect-only TCP check. It uses the cluster's transport socket, so "connected" means the mTLS handshake
    with the right SNI went through the remote gateway to a serving sidecar; a fresh connection every time."""
    return health_check_pb2.HealthCheck(
        timeout=_duration(HEALTH_CHECK_TIMEOUT_S),
        interval=_duration(interval_s),
        # Same interval with or without traffic: a gateway that died while the cluster was idle (or that was not
        # up yet when the cluster was created) is found within seconds, not at Envoy's 60 s no-traffic default.
        no_traffic_interval=_duration(interval_s),
        unhealthy_interval=_duration(interval_s),
        unhealthy_threshold=_u32(HEALTH_CHECK_UNHEALTHY_THRESHOLD),
        healthy_threshold=_u32(1),
        reuse_connection=wrappers_pb2.BoolValue(value=False),
        tcp_health_check=health_check_pb2.HealthCheck.TcpHealthCheck(),
    )


def apply_cluster_policy(cluster: Any, cp: ClusterPolicy, *, default_connect_timeout_s: float,
                         health_check_s: float = 0.0) -> Any:
    """Set ``cluster``'s load balancing, circuit breakers, connect timeout, outlier detection and (when
    ``health_check_s`` > 0) the gateway health check from ``cp``; returns the same message."""
    cluster.lb_policy = lb_policy(cp)
    cluster.connect_timeout.CopyFrom(_duration(connect_timeout_s(cp, default_connect_timeout_s)))
    cluster.circuit_breakers.CopyFrom(circuit_breakers(cp))
    # Apply host health changes (an ejection, a failed health check) at once: Envoy's default batches them for 1 s,
    # during which an ejected endpoint keeps its whole share of traffic.
    cluster.common_lb_config.update_merge_window.CopyFrom(_duration(0))
    od = outlier_detection(cp)
    if od is not None:
        cluster.outlier_detection.CopyFrom(od)
    else:
        cluster.ClearField("outlier_detection")
    del cluster.health_checks[:]
    if health_check_s > 0:
        cluster.health_checks.append(gateway_health_check(health_check_s))
    return cluster


# --------------------------------------------------------------------------------------------------------------
# Endpoints: subsets and priorities


def topology_labels(ep: UpstreamEndpoint) -> dict[str, str]:
    """The labels an endpoint has by where it runs (every endpoint, remote gateways included)."""
    loc = ep.locality
    out = {CLUSTER_LABEL: str(ep.cluster)}
    if loc.network:
        out[NETWORK_LABEL] = loc.network
    if loc.region:
        out[REGION_LABEL] = loc.region
    if loc.zone:
        out[ZONE_LABEL] = loc.zone
    return out


def subset_matches(labels: Iterable[tuple[str, str]], ep: UpstreamEndpoint) -> bool:
    """Whether ``ep`` belongs to a subset selecting ``labels``: topology labels match every endpoint; pod labels
    only the pods whose labels meshfed knows (a remote gateway stands for pods whose labels are not federated, so
    a subset naming a pod label never includes it)."""
    have = {**dict(ep.labels), **topology_labels(ep)}
    return all(have.get(k) == v for k, v in labels)


def _proxy_topology(local: ClusterInfo | None, local_cluster: str) -> dict[str, str]:
    out = {CLUSTER_LABEL: local_cluster}
    if local is not None:
        out.update({NETWORK_LABEL: str(local.network), REGION_LABEL: local.region, ZONE_LABEL: local.zone})
    return out


def priority_rank(ep: UpstreamEndpoint, *, local: ClusterInfo | None, local_cluster: str,
                  locality: LocalityLb | None) -> int:
    """How far ``ep`` is from the caller (lower is preferred; :func:`priorities` compacts ranks to Envoy's
    contiguous priorities). Default: 0 same cluster, 1 same region, 2 a failover region of the caller's region,
    3 the rest. ``failoverPriority``: the number of labels, from the first, on which ``ep`` differs."""
    if locality is not None and not locality.enabled:
        return 0
    if locality is not None and locality.failover_priority:
        mine = _proxy_topology(local, local_cluster)
        theirs = topology_labels(ep)
        matched = 0
        for label in locality.failover_priority:
            if not mine.get(label) or mine.get(label) != theirs.get(label):
                break
            matched += 1
        return len(locality.failover_priority) - matched
    if str(ep.cluster) == local_cluster:
        return 0
    region = local.region if local is not None else ""
    if region and ep.locality.region == region:
        return 1
    if locality is not None and any(f.from_region == region and f.to_region == ep.locality.region
                                    for f in locality.failover):
        return 2
    return 3


def priorities(endpoints: Sequence[UpstreamEndpoint], *, local: ClusterInfo | None, local_cluster: str,
               locality: LocalityLb | None) -> list[int]:
    """The Envoy priority of each endpoint (contiguous from 0, in the order of ``endpoints``)."""
    ranks = [priority_rank(e, local=local, local_cluster=local_cluster, locality=locality) for e in endpoints]
    compact = {r: i for i, r in enumerate(sorted(set(ranks)))}
    return [compact[r] for r in ranks]


def subset_endpoints(labels: Sequence[tuple[str, str]], endpoints: Sequence[UpstreamEndpoint], *,
                     local: ClusterInfo | None, local_cluster: str, locality: LocalityLb | None,
                     failover: bool = True) -> tuple[list[UpstreamEndpoint], list[int]]:
    """A subset cluster's endpoints and the Envoy priority of each (``docs/traffic-policy.md``, "Splits and
    failover").

    A subset's topology labels (cluster, network, region, zone) say where its traffic should go, its pod labels
    what must answer it. First come the subset's own endpoints (every label matches), by the caller's locality
    priorities; then, unless ``failover`` is off, the service's endpoints in the other locations that still match
    the pod labels, by the same priorities, below every priority of the subset's own. When the subset's locations
    are all unhealthy (a remote gateway failing its health check, endpoints ejected), Envoy hands their share to
    the next priority, so a weighted split keeps locality failover. A subset of pod labels only has no other
    location to fail over to."""
    own = [e for e in endpoints if subset_matches(labels, e)]
    required = [(k, v) for k, v in labels if k not in TOPOLOGY_LABELS]
    spare: list[UpstreamEndpoint] = []
    if failover and len(required) < len(labels):
        spare = [e for e in endpoints if subset_matches(required, e) and not subset_matches(labels, e)]
    own_prios = priorities(own, local=local, local_cluster=local_cluster, locality=locality)
    base = max(own_prios) + 1 if own_prios else 0
    spare_prios = priorities(spare, local=local, local_cluster=local_cluster, locality=locality)
    return own + spare, own_prios + [base + p for p in spare_prios]


# --------------------------------------------------------------------------------------------------------------
# Routes


def _string_matcher(m: StringMatch) -> Any:
    if m.kind is MatchKind.EXACT:
        return string_pb2.StringMatcher(exact=m.value)
    if m.kind is MatchKind.PREFIX:
        return string_pb2.StringMatcher(prefix=m.value)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=m.value))


def route_match(m: HttpMatch | None) -> Any:
    match = route_components_pb2.RouteMatch()
    uri = m.uri if m is not None else None
    if uri is None:
        match.prefix = "/"
    elif uri.kind is MatchKind.EXACT:
        match.path = uri.value
    elif uri.kind is MatchKind.PREFIX:
        match.prefix = uri.value
    else:
        match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=uri.value))
    if m is not None:
        for name, sm in m.headers:
            match.headers.append(route_components_pb2.HeaderMatcher(name=name, string_match=_string_matcher(sm)))
        if m.method is not None:
            match.headers.append(route_components_pb2.HeaderMatcher(name=":method",
                                                                    string_match=_string_matcher(m.method)))
    return match


def retry_policy(retries: Retries) -> Any | None:
    """Envoy's retry policy for ``retries`` (``None`` for ``attempts: 0``, which turns retries off). Each retry
    goes to a host not tried yet, in a priority not tried yet when there is one (failover within the request)."""
    if retries.attempts <= 0:
        return None
    retry_on = retries.retry_on or DEFAULT_RETRY_ON
    policy = route_components_pb2.RetryPolicy(
        retry_on=retry_on,
        num_retries=_u32(retries.attempts),
        retry_host_predicate=[route_components_pb2.RetryPolicy.RetryHostPredicate(
            name="envoy.retry_host_predicates.previous_hosts",
            typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
        )],
        host_selection_retry_max_attempts=5,
        retry_priority=route_components_pb2.RetryPolicy.RetryPriority(
            name="envoy.retry_priorities.previous_priorities",
            typed_config=pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=1)),
        ),
    )
    conditions = [c.strip() for c in retry_on.split(",") if c.strip()]
    codes = [int(c) for c in conditions if c.isdigit()]  # Istio lets retryOn list status codes
    names = [c for c in conditions if not c.isdigit()]
    if codes and "retriable-status-codes" not in names:
        names.append("retriable-status-codes")
    policy.retry_on = ",".join(names)
    if "retriable-status-codes" in names:
        policy.retriable_status_codes.extend(codes or [503])
    if retries.per_try_timeout_s is not None:
        policy.per_try_timeout.CopyFrom(_duration(retries.per_try_timeout_s))
    return policy


def default_retry_policy() -> Any:
    """What a sidecar's route does without a VirtualService saying otherwise."""
    policy = retry_policy(Retries(attempts=DEFAULT_RETRY_ATTEMPTS))
    assert policy is not None
    return policy


def destination_cluster(dest_key: ServiceKey, subset: str, port: int | None, *, vhost_port: int,
                        ports: Mapping[ServiceKey, tuple[ServicePort, ...]]) -> str:
    """The Envoy cluster a route destination names: the port given, else the port the request came in on when the
    destination has it, else the destination's only port."""
    if port is None:
        known = sorted(p.port for p in ports.get(dest_key, ()))
        port = vhost_port if vhost_port in known or len(known) != 1 else known[0]
    return subset_cluster_name(dest_key, port, subset) if subset else outbound_cluster_name(dest_key, port)


def route_action(route: HttpRoute, *, vhost_port: int, ports: Mapping[ServiceKey, tuple[ServicePort, ...]],
                 default_retries: bool = True) -> Any:
    weights: dict[str, int] = {}  # one entry per Envoy cluster (two destinations may name the same one)
    for w in route.route:
        if w.weight > 0:
            name = destination_cluster(w.destination.host, w.destination.subset, w.destination.port,
                                       vhost_port=vhost_port, ports=ports)
            weights[name] = weights.get(name, 0) + w.weight
    targets = list(weights.items())
    action = route_components_pb2.RouteAction()
    if len(targets) == 1:
        action.cluster = targets[0][0]
    else:
        action.weighted_clusters.CopyFrom(route_components_pb2.WeightedCluster(clusters=[
            route_components_pb2.WeightedCluster.ClusterWeight(name=name, weight=_u32(weight))
            for name, weight in targets
        ]))
    if route.timeout_s is not None:
        action.timeout.CopyFrom(_duration(route.timeout_s))
    if route.retries is not None:
        policy = retry_policy(route.retries)
    else:
        policy = default_retry_policy() if default_retries else None
    if policy is not None:
        action.retry_policy.CopyFrom(policy)
    return action


def virtual_service_routes(vs: VirtualService, *, vhost_port: int,
                           ports: Mapping[ServiceKey, tuple[ServicePort, ...]], default_retries: bool = True
                           ) -> list[Any]:
    """The routes of one virtual host from a VirtualService: each ``http[]`` entry in order, one Envoy route per
    ``match[]`` (or one catch-all). Requests no entry matches get Envoy's 404, as in Istio."""
    out = []
    for i, http in enumerate(vs.http):
        action = route_action(http, vhost_port=vhost_port, ports=ports, default_retries=default_retries)
        name = http.name or f"{vs.namespace}/{vs.name}/http[{i}]"
        for m in (http.matches or (None,)):
            out.append(route_components_pb2.Route(name=name, match=route_match(m), route=action))
    return out
