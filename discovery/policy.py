"""The supported subset of Istio's traffic API (VirtualService, DestinationRule) as a pure model, and its converters.

Objects come in as the dicts Kubernetes (or a manifest file) gives; the converters here (listed in
``discovery.convert.CONVERTERS``) turn them into frozen dataclasses or raise
:class:`discovery.fields.ConversionError` naming the field path. Every field outside
the supported subset is an error (``spec.http[0].mirror: is not supported by meshfed``), never silently dropped:
the manifest source then rejects the whole file and keeps its last good version in force. The subset, field by
field, is in ``docs/istio-api.md``.

Policies are per cluster: each control plane reads its own cluster's objects and applies them to its own proxies
(like Istio multi-primary). :class:`TrafficPolicies` indexes one cluster's objects by the service they govern.

Exception tree: this module raises only ``ConversionError`` (see ``discovery.fields``)::

    DiscoveryError
     +-- ConversionError     a field outside the subset, or a value that breaks its rules; ``.field`` is the path
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from discovery.fields import ConversionError, as_list, as_mapping, as_str
from discovery.model import ClusterId, DiscoveryError, Namespace, ServiceKey, namespace, service_name

NETWORKING_GROUP = "networking.istio.io"
NETWORKING_VERSIONS = ("v1", "v1beta1", "v1alpha3")

#: Annotation on a DestinationRule: ``"off"`` turns meshfed's default outlier detection off for its host.
OUTLIER_ANNOTATION = "traffic.meshfed.io/outlier-detection"
#: Annotation on a DestinationRule: ``"off"`` keeps each subset strictly to the endpoints its labels select (no
#: failover to the service's other locations when they are all unhealthy; ``docs/traffic-policy.md``).
SUBSET_FAILOVER_ANNOTATION = "traffic.meshfed.io/subset-failover"

# Labels an endpoint carries by where it runs (derived from its locality), usable in subsets and failoverPriority.
CLUSTER_LABEL = "topology.istio.io/cluster"
NETWORK_LABEL = "topology.istio.io/network"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
TOPOLOGY_LABELS = (CLUSTER_LABEL, NETWORK_LABEL, REGION_LABEL, ZONE_LABEL)


# --------------------------------------------------------------------------------------------------------------
# The model


class LbAlgorithm(enum.StrEnum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"


@dataclass(frozen=True, slots=True)
class Failover:
    """``localityLbSetting.failover[]``: proxies in region ``from_region`` fail over to ``to_region`` first."""

    from_region: str
    to_region: str


@dataclass(frozen=True, slots=True)
class LocalityLb:
    """``localityLbSetting``. ``enabled=False`` puts every endpoint in one priority (no locality preference)."""

    enabled: bool = True
    failover: tuple[Failover, ...] = ()
    failover_priority: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: LbAlgorithm | None = None
    locality: LocalityLb | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """``outlierDetection``; ``None`` fields take meshfed's defaults (``gateway.traffic``). A threshold of 0 turns
    that kind of ejection off; both at 0 turns outlier detection off."""

    consecutive_5xx: int | None = None
    consecutive_gateway_errors: int | None = None
    interval_s: float | None = None
    base_ejection_s: float | None = None
    max_ejection_percent: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout_s: float | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_retries: int | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancer | None = None
    outlier_detection: OutlierDetection | None = None
    connection_pool: ConnectionPool | None = None

    def overlaid(self, other: TrafficPolicy | None) -> TrafficPolicy:
        """This policy with each part ``other`` sets replacing ours (a subset's policy over the rule's)."""
        if other is None:
            return self
        return TrafficPolicy(
            load_balancer=other.load_balancer or self.load_balancer,
            outlier_detection=other.outlier_detection or self.outlier_detection,
            connection_pool=other.connection_pool or self.connection_pool,
        )


@dataclass(frozen=True, slots=True)
class Subset:
    """A named subset of a service's endpoints, selected by labels (pod labels and topology labels)."""

    name: str
    labels: tuple[tuple[str, str], ...]
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    cluster: ClusterId
    namespace: Namespace
    name: str
    host: ServiceKey
    traffic_policy: TrafficPolicy = field(default_factory=TrafficPolicy)
    subsets: tuple[Subset, ...] = ()
    outlier_off: bool = False  # the OUTLIER_ANNOTATION says "off"
    subset_failover_off: bool = False  # the SUBSET_FAILOVER_ANNOTATION says "off"

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)


class MatchKind(enum.StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """One ``http[].match[]`` entry: every condition given must hold."""

    uri: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    method: StringMatch | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    host: ServiceKey
    subset: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class WeightedDestination:
    destination: Destination
    weight: int = 100


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int
    per_try_timeout_s: float | None = None
    retry_on: str = ""


@dataclass(frozen=True, slots=True)
class HttpRoute:
    name: str = ""
    matches: tuple[HttpMatch, ...] = ()
    route: tuple[WeightedDestination, ...] = ()
    retries: Retries | None = None
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class VirtualService:
    cluster: ClusterId
    namespace: Namespace
    name: str
    hosts: tuple[ServiceKey, ...]
    http: tuple[HttpRoute, ...] = ()


@dataclass(frozen=True, slots=True)
class TrafficPolicies:
    """One cluster's traffic policies, by the service they govern. When two objects claim one service, the first
    by (namespace, name) wins and ``problems`` says which one was ignored; ``problems`` also names routes to
    subsets that no DestinationRule defines."""

    destination_rules: Mapping[ServiceKey, DestinationRule] = field(default_factory=dict)
    virtual_services: Mapping[ServiceKey, VirtualService] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @classmethod
    def of(cls, objects: Iterable[Any]) -> TrafficPolicies:
        """Index the VirtualServices and DestinationRules among ``objects`` (other values are ignored)."""
        objects = list(objects)
        drs = sorted((o for o in objects if isinstance(o, DestinationRule)), key=lambda d: (d.namespace, d.name))
        vss = sorted((o for o in objects if isinstance(o, VirtualService)), key=lambda v: (v.namespace, v.name))
        problems: list[str] = []
        by_dr: dict[ServiceKey, DestinationRule] = {}
        for dr in drs:
            seen = by_dr.get(dr.host)
            if seen is not None:
                problems.append(f"DestinationRule {dr.namespace}/{dr.name}: host {dr.host} already has "
                                f"DestinationRule {seen.namespace}/{seen.name}; ignored")
                continue
            by_dr[dr.host] = dr
        by_vs: dict[ServiceKey, VirtualService] = {}
        for vs in vss:
            for host in vs.hosts:
                seen_vs = by_vs.get(host)
                if seen_vs is not None:
                    problems.append(f"VirtualService {vs.namespace}/{vs.name}: host {host} already has "
                                    f"VirtualService {seen_vs.namespace}/{seen_vs.name}; ignored for that host")
                    continue
                by_vs[host] = vs
        for vs in vss:
            for i, http in enumerate(vs.http):
                for j, dest in enumerate(w.destination for w in http.route):
                    rule = by_dr.get(dest.host)
                    if dest.subset and (rule is None or rule.subset(dest.subset) is None):
                        problems.append(f"VirtualService {vs.namespace}/{vs.name}: spec.http[{i}].route[{j}] names "
                                        f"subset {dest.subset!r} of {dest.host}, which no DestinationRule defines; "
                                        "requests routed there get 503")
        return cls(destination_rules=by_dr, virtual_services=by_vs, problems=tuple(problems))

    def destination_rule(self, key: ServiceKey) -> DestinationRule | None:
        return self.destination_rules.get(key)

    def virtual_service(self, key: ServiceKey) -> VirtualService | None:
        return self.virtual_services.get(key)

    def __bool__(self) -> bool:
        return bool(self.destination_rules or self.virtual_services)


# --------------------------------------------------------------------------------------------------------------
# Field helpers (each takes the path so errors can name it)


def _unsupported(path: str) -> ConversionError:
    return ConversionError(path, "is not supported by meshfed (see docs/istio-api.md for the supported subset)")


def _obj(value: Any, path: str, allowed: Iterable[str], *, required: bool = False) -> Mapping[str, Any]:
    """A mapping (``_mapping``) whose keys are all in ``allowed``; any other is reported as unsupported."""
    obj = as_mapping(value, path, required=required)
    ok = set(allowed)
    for key in obj:
        if key not in ok:
            raise _unsupported(f"{path}.{key}" if path else str(key))
    return obj


def _int(value: Any, path: str, *, minimum: int = 0, maximum: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(path, f"must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        top = f"..{maximum}" if maximum is not None else " or more"
        raise ConversionError(path, f"{value} is out of range ({minimum}{top})")
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: Any, path: str) -> float | None:
    """A protobuf/Go duration string (``5s``, ``250ms``, ``1m30s``) in seconds; ``None`` when absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConversionError(path, f"must be a duration like '5s' or '250ms', got {value!r}")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(value) or pos == 0:
        raise ConversionError(path, f"{value!r} is not a duration like '5s', '250ms' or '1m30s'")
    return total


def _positive_duration(value: Any, path: str) -> float | None:
    seconds = parse_duration(value, path)
    if seconds is not None and seconds <= 0:
        raise ConversionError(path, f"{value!r} must be longer than zero")
    return seconds


def _labels(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ConversionError(path, f"must be a mapping of label to value, got {type(value).__name__}")
    out = []
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise ConversionError(f"{path}.{k}", f"labels map strings to strings, got {v!r}")
        out.append((k, v))
    return tuple(sorted(out))


def _meta(obj: Mapping[str, Any]) -> tuple[Namespace, str, Mapping[str, Any]]:
    _obj(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise ConversionError("metadata", "required")
    name = as_str(meta.get("name"), "metadata.name", required=True)
    ns_text = as_str(meta.get("namespace"), "metadata.namespace") or "default"
    try:
        ns = namespace(ns_text)
    except DiscoveryError as exc:
        raise ConversionError("metadata.namespace", str(exc)) from None
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise ConversionError("metadata.annotations", "must be a mapping")
    return ns, name, annotations


_HOST_SUFFIXES = (".svc.clusterset.local", ".svc.cluster.local", ".svc")


def service_host(text: Any, ns: Namespace, path: str) -> ServiceKey:
    """A service host as Istio users write it: ``reviews`` (in ``ns``), ``reviews.default``,
    ``reviews.default.svc``, ``reviews.default.svc.cluster.local`` or ``reviews.default.svc.clusterset.local``."""
    host = as_str(text, path, required=True)
    if "*" in host:
        raise ConversionError(path, f"wildcard host {host!r} is not supported: name one service")
    base = host
    for suffix in _HOST_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    parts = base.split(".")
    if len(parts) > 2 or (base != host and len(parts) != 2):
        raise ConversionError(path, f"{host!r} is not a service host (NAME, NAME.NAMESPACE or "
                                    "NAME.NAMESPACE.svc.clusterset.local); external hosts are not supported")
    try:
        return ServiceKey(namespace=namespace(parts[1]) if len(parts) == 2 else ns, name=service_name(parts[0]))
    except DiscoveryError as exc:
        raise ConversionError(path, str(exc)) from None


def _export_to(value: Any, path: str) -> None:
    items = as_list(value, path)
    if any(item != "*" for item in items):
        raise ConversionError(path, "only ['*'] is supported: policies apply to every namespace of their cluster")


# --------------------------------------------------------------------------------------------------------------
# DestinationRule


def _locality_lb(raw: Any, path: str) -> LocalityLb:
    spec = _obj(raw, path, ("enabled", "failover", "failoverPriority"))
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConversionError(f"{path}.enabled", f"must be true or false, got {enabled!r}")
    failover = []
    for i, item in enumerate(as_list(spec.get("failover"), f"{path}.failover")):
        p = f"{path}.failover[{i}]"
        f = _obj(item, p, ("from", "to"), required=True)
        src, dst = as_str(f.get("from"), f"{p}.from", required=True), as_str(f.get("to"), f"{p}.to", required=True)
        if "/" in src or "/" in dst:
            raise ConversionError(p, "failover names regions only (no zone/sub-zone paths)")
        if src == dst:
            raise ConversionError(f"{p}.to", f"must differ from 'from' ({src!r})")
        failover.append(Failover(from_region=src, to_region=dst))
    priority = []
    for i, item in enumerate(as_list(spec.get("failoverPriority"), f"{path}.failoverPriority")):
        label = as_str(item, f"{path}.failoverPriority[{i}]", required=True)
        if "=" in label:
            raise ConversionError(f"{path}.failoverPriority[{i}]", "label=value overrides are not supported")
        if label not in TOPOLOGY_LABELS:
            raise ConversionError(f"{path}.failoverPriority[{i}]",
                                  f"{label!r} is not supported: only {', '.join(TOPOLOGY_LABELS)} (proxy labels are "
                                  "not known to meshfed)")
        priority.append(label)
    if failover and priority:
        raise ConversionError(path, "set failover or failoverPriority, not both")
    return LocalityLb(enabled=enabled, failover=tuple(failover), failover_priority=tuple(priority))


def _load_balancer(raw: Any, path: str) -> LoadBalancer:
    spec = _obj(raw, path, ("simple", "localityLbSetting"))
    simple = None
    if spec.get("simple") is not None:
        text = as_str(spec.get("simple"), f"{path}.simple")
        if text == "LEAST_CONN":  # Istio's deprecated spelling
            text = "LEAST_REQUEST"
        try:
            simple = LbAlgorithm(text)
        except ValueError:
            raise ConversionError(f"{path}.simple", f"{text!r} is not one of "
                                                    f"{', '.join(a.value for a in LbAlgorithm)}") from None
    locality = _locality_lb(spec["localityLbSetting"], f"{path}.localityLbSetting") \
        if spec.get("localityLbSetting") is not None else None
    return LoadBalancer(simple=simple, locality=locality)


def _outlier(raw: Any, path: str) -> OutlierDetection:
    spec = _obj(raw, path, ("consecutive5xxErrors", "consecutiveGatewayErrors", "interval", "baseEjectionTime",
                            "maxEjectionPercent"))
    return OutlierDetection(
        consecutive_5xx=_int(spec.get("consecutive5xxErrors"), f"{path}.consecutive5xxErrors"),
        consecutive_gateway_errors=_int(spec.get("consecutiveGatewayErrors"), f"{path}.consecutiveGatewayErrors"),
        interval_s=_positive_duration(spec.get("interval"), f"{path}.interval"),
        base_ejection_s=_positive_duration(spec.get("baseEjectionTime"), f"{path}.baseEjectionTime"),
        max_ejection_percent=_int(spec.get("maxEjectionPercent"), f"{path}.maxEjectionPercent", maximum=100),
    )


def _connection_pool(raw: Any, path: str) -> ConnectionPool:
    spec = _obj(raw, path, ("tcp", "http"))
    tcp = _obj(spec.get("tcp"), f"{path}.tcp", ("maxConnections", "connectTimeout"))
    http = _obj(spec.get("http"), f"{path}.http", ("http1MaxPendingRequests", "http2MaxRequests", "maxRetries"))
    return ConnectionPool(
        max_connections=_int(tcp.get("maxConnections"), f"{path}.tcp.maxConnections", minimum=1),
        connect_timeout_s=_positive_duration(tcp.get("connectTimeout"), f"{path}.tcp.connectTimeout"),
        http1_max_pending_requests=_int(http.get("http1MaxPendingRequests"), f"{path}.http.http1MaxPendingRequests",
                                        minimum=1),
        http2_max_requests=_int(http.get("http2MaxRequests"), f"{path}.http.http2MaxRequests", minimum=1),
        max_retries=_int(http.get("maxRetries"), f"{path}.http.maxRetries"),
    )


def _tls(raw: Any, path: str) -> None:
    spec = _obj(raw, path, ("mode",))
    mode = as_str(spec.get("mode"), f"{path}.mode")
    if mode not in ("", "ISTIO_MUTUAL"):
        raise ConversionError(f"{path}.mode", f"{mode!r} is not supported: meshfed always uses mutual TLS with "
                                              "mesh certificates (ISTIO_MUTUAL)")


def _traffic_policy(raw: Any, path: str) -> TrafficPolicy:
    spec = _obj(raw, path, ("loadBalancer", "outlierDetection", "connectionPool", "tls"))
    _tls(spec.get("tls"), f"{path}.tls")
    return TrafficPolicy(
        load_balancer=_load_balancer(spec["loadBalancer"], f"{path}.loadBalancer")
        if spec.get("loadBalancer") is not None else None,
        outlier_detection=_outlier(spec["outlierDetection"], f"{path}.outlierDetection")
        if spec.get("outlierDetection") is not None else None,
        connection_pool=_connection_pool(spec["connectionPool"], f"{path}.connectionPool")
        if spec.get("connectionPool") is not None else None,
    )


_SUBSET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def convert_destination_rule(obj: Mapping[str, Any], cluster: ClusterId) -> DestinationRule:
    ns, name, annotations = _meta(obj)
    spec = _obj(obj.get("spec"), "spec", ("host", "trafficPolicy", "subsets", "exportTo"), required=True)
    _export_to(spec.get("exportTo"), "spec.exportTo")
    host = service_host(spec.get("host"), ns, "spec.host")
    policy = _traffic_policy(spec.get("trafficPolicy"), "spec.trafficPolicy")
    subsets: list[Subset] = []
    for i, raw in enumerate(as_list(spec.get("subsets"), "spec.subsets")):
        path = f"spec.subsets[{i}]"
        item = _obj(raw, path, ("name", "labels", "trafficPolicy"), required=True)
        sname = as_str(item.get("name"), f"{path}.name", required=True)
        if not _SUBSET_NAME.match(sname) or len(sname) > 63:
            raise ConversionError(f"{path}.name", f"{sname!r} is not an RFC 1123 label (it becomes part of an "
                                                  "Envoy cluster name)")
        if any(s.name == sname for s in subsets):
            raise ConversionError(f"{path}.name", f"duplicate subset {sname!r}")
        sub_policy = _traffic_policy(item["trafficPolicy"], f"{path}.trafficPolicy") \
            if item.get("trafficPolicy") is not None else None
        subsets.append(Subset(name=sname, labels=_labels(item.get("labels"), f"{path}.labels"),
                              traffic_policy=sub_policy))
    return DestinationRule(cluster=cluster, namespace=ns, name=name, host=host, traffic_policy=policy,
                           subsets=tuple(subsets), outlier_off=_switch(annotations, OUTLIER_ANNOTATION) == "off",
                           subset_failover_off=_switch(annotations, SUBSET_FAILOVER_ANNOTATION) == "off")


def _switch(annotations: Mapping[str, Any], name: str) -> str | None:
    """An ``"on"``/``"off"`` annotation's value (``None`` when absent)."""
    flag = annotations.get(name)
    if flag is not None and flag not in ("on", "off"):
        raise ConversionError(f"metadata.annotations.{name}", f"must be 'on' or 'off', got {flag!r}")
    return flag if flag is None else str(flag)


# --------------------------------------------------------------------------------------------------------------
# VirtualService


def _string_match(raw: Any, path: str, kinds: tuple[MatchKind, ...]) -> StringMatch:
    spec = _obj(raw, path, [k.value for k in kinds], required=True)
    given = [(MatchKind(k), v) for k, v in spec.items()]
    if len(given) != 1:
        raise ConversionError(path, f"needs exactly one of {', '.join(k.value for k in kinds)}")
    kind, value = given[0]
    text = as_str(value, f"{path}.{kind.value}")
    if kind is MatchKind.REGEX:
        try:
            re.compile(text)
        except re.error as exc:
            raise ConversionError(f"{path}.regex", f"{text!r} is not a valid regular expression: {exc}") from None
    return StringMatch(kind=kind, value=text)


_ALL_KINDS = (MatchKind.EXACT, MatchKind.PREFIX, MatchKind.REGEX)


def _http_match(raw: Any, path: str) -> HttpMatch:
    spec = _obj(raw, path, ("name", "uri", "headers", "method"), required=True)
    uri = _string_match(spec["uri"], f"{path}.uri", _ALL_KINDS) if spec.get("uri") is not None else None
    method = _string_match(spec["method"], f"{path}.method", (MatchKind.EXACT,)) \
        if spec.get("method") is not None else None
    headers_raw = spec.get("headers")
    headers: list[tuple[str, StringMatch]] = []
    if headers_raw is not None:
        if not isinstance(headers_raw, Mapping):
            raise ConversionError(f"{path}.headers", "must be a mapping of header name to match")
        for hname, hmatch in headers_raw.items():
            if not isinstance(hname, str) or not hname or hname != hname.lower():
                raise ConversionError(f"{path}.headers.{hname}", "header names must be lower-case")
            headers.append((hname, _string_match(hmatch, f"{path}.headers.{hname}", _ALL_KINDS)))
    return HttpMatch(uri=uri, headers=tuple(headers), method=method)


def _destination(raw: Any, path: str, ns: Namespace) -> Destination:
    spec = _obj(raw, path, ("host", "subset", "port"), required=True)
    port = None
    if spec.get("port") is not None:
        port_spec = _obj(spec["port"], f"{path}.port", ("number",))
        port = _int(port_spec.get("number"), f"{path}.port.number", minimum=1, maximum=65535)
    subset = as_str(spec.get("subset"), f"{path}.subset")
    return Destination(host=service_host(spec.get("host"), ns, f"{path}.host"), subset=subset, port=port)


def _retries(raw: Any, path: str) -> Retries:
    spec = _obj(raw, path, ("attempts", "perTryTimeout", "retryOn"), required=True)
    attempts = _int(spec.get("attempts"), f"{path}.attempts")
    retry_on = as_str(spec.get("retryOn"), f"{path}.retryOn")
    for i, cond in enumerate(c.strip() for c in retry_on.split(",") if c.strip()):
        if not re.fullmatch(r"[a-z0-9-]+|\d{3}", cond):
            raise ConversionError(f"{path}.retryOn", f"condition {i} ({cond!r}) is not an Envoy retry condition "
                                                     "or an HTTP status code")
    return Retries(attempts=attempts or 0, per_try_timeout_s=_positive_duration(spec.get("perTryTimeout"),
                                                                                f"{path}.perTryTimeout"),
                   retry_on=retry_on)


def _http_route(raw: Any, path: str, ns: Namespace) -> HttpRoute:
    spec = _obj(raw, path, ("name", "match", "route", "retries", "timeout"), required=True)
    matches = tuple(_http_match(m, f"{path}.match[{i}]") for i, m in enumerate(as_list(spec.get("match"),
                                                                                        f"{path}.match")))
    raw_route = as_list(spec.get("route"), f"{path}.route")
    if not raw_route:
        raise ConversionError(f"{path}.route", "required: at least one destination")
    route = []
    for i, item in enumerate(raw_route):
        p = f"{path}.route[{i}]"
        entry = _obj(item, p, ("destination", "weight"), required=True)
        weight = _int(entry.get("weight"), f"{p}.weight", maximum=100)
        if weight is None:
            weight = 100 if len(raw_route) == 1 else 0
        route.append(WeightedDestination(destination=_destination(entry.get("destination"), f"{p}.destination", ns),
                                         weight=weight))
    if sum(r.weight for r in route) <= 0:
        raise ConversionError(f"{path}.route", "the weights add up to 0: give each destination a weight")
    retries = _retries(spec["retries"], f"{path}.retries") if spec.get("retries") is not None else None
    timeout = parse_duration(spec.get("timeout"), f"{path}.timeout")
    if timeout is not None and timeout < 0:
        raise ConversionError(f"{path}.timeout", "must not be negative")
    return HttpRoute(name=as_str(spec.get("name"), f"{path}.name"), matches=matches, route=tuple(route),
                     retries=retries, timeout_s=timeout)


def convert_virtual_service(obj: Mapping[str, Any], cluster: ClusterId) -> VirtualService:
    ns, name, _annotations = _meta(obj)
    spec = _obj(obj.get("spec"), "spec", ("hosts", "gateways", "http", "exportTo"), required=True)
    _export_to(spec.get("exportTo"), "spec.exportTo")
    gateways = as_list(spec.get("gateways"), "spec.gateways")
    if any(g != "mesh" for g in gateways):
        raise ConversionError("spec.gateways", "only 'mesh' (the sidecars) is supported; ingress gateways are not")
    raw_hosts = as_list(spec.get("hosts"), "spec.hosts")
    if not raw_hosts:
        raise ConversionError("spec.hosts", "required: at least one service host")
    hosts: list[ServiceKey] = []
    for i, h in enumerate(raw_hosts):
        key = service_host(h, ns, f"spec.hosts[{i}]")
        if key in hosts:
            raise ConversionError(f"spec.hosts[{i}]", f"{h!r} names {key} again")
        hosts.append(key)
    raw_http = as_list(spec.get("http"), "spec.http")
    if not raw_http:
        raise ConversionError("spec.http", "required: at least one HTTP route (tcp and tls routes are not supported)")
    http = tuple(_http_route(r, f"spec.http[{i}]", ns) for i, r in enumerate(raw_http))
    return VirtualService(cluster=cluster, namespace=ns, name=name, hosts=tuple(hosts), http=http)
