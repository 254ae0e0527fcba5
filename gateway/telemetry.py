"""Telemetry pieces of the generated Envoy configuration: request metrics with cluster labels and JSON access logs.

Envoy has no Istio stats filter. We build the labelled series from two native pieces:

- the **stats access logger** (``envoy.access_loggers.stats``): an access logger that, once per request (HTTP) or
  per connection (TCP), increments a counter and records a histogram whose *tags* are access-log format strings.
  Envoy's ``/stats/prometheus`` turns tags into labels, so ``meshfed.requests_total`` becomes
  ``envoy_meshfed_requests_total{reporter=...,source_cluster=...,...}``;
- **values the formatter can read** at the moment the request ends, each of which we put there on purpose:

  ==========================  =====================================================================================
  label                       where it comes from
  ==========================  =====================================================================================
  ``source_cluster``          caller sidecar: its own cluster (a literal the generator writes). Callee sidecar:
                              the ``OU`` of the caller's *verified* client certificate, which the issuing cluster CA
                              sets to its own cluster (never from the CSR), copied into dynamic metadata
                              ``meshfed.source_cluster`` by a tiny Lua filter that reads the TLS connection, not a
                              header. Gateway: not observable (see below).
  ``destination_cluster``     caller sidecar: the ``meshfed.cluster`` metadata EDS puts on every endpoint (a local
                              pod, or the remote cluster's gateway). Callee sidecar and gateway: their own cluster.
  ``destination_service``     caller sidecar: the ``meshfed.service`` metadata CDS puts on every outbound cluster.
                              Callee sidecar: the service its inbound port serves. Gateway: the SNI chain's service.
  ``response_code``           ``%RESPONSE_CODE%`` (``0`` for TCP connections and for requests reset before an answer)
  ``response_flags``          ``%RESPONSE_FLAGS%`` (why a request failed: ``UF`` connect failure, ``UH`` no healthy
                              endpoint, ``NR`` no route, ``-`` none)
  ``connection_security_policy``  ``mutual_tls`` on sidecars (every outbound cluster and inbound listener requires
                              it), ``tls_passthrough`` on gateways (which route on SNI and never see the certificates)
  ``reporter``                ``source`` (caller sidecar), ``destination`` (callee sidecar), ``gateway``
  ==========================  =====================================================================================

Why a gateway's series carry no ``source_cluster``: a gateway passes TLS through untouched (that is what keeps
the caller's identity end to end); the caller's certificate is inside the encrypted handshake (TLS 1.3) and the
SNI names only the destination. Anything in the ClientHello that named the source would be the caller's own
claim, unverifiable at the gateway. So the gateway reports what it knows for certain (destination service and
cluster, bytes, connection outcome) and the two sidecars report the pair of clusters, the caller from its side and
the callee from the verified certificate.

Only a request for which no endpoint was picked (``NR``, ``UH``) has an empty ``destination_cluster`` on the caller
side; its ``response_flags`` label says why.

Access logs are JSON lines on the proxy's stdout (``ACCESS_LOG_FIELDS`` names every field).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.extensions.access_loggers.stats.v3 import stats_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from discovery.model import ServiceKey
from gateway.anypb import pack
from gateway.context import ProxyInfo, PushContext

STATS_LOGGER = "envoy.access_loggers.stats"
STDOUT_LOGGER = "envoy.access_loggers.stdout"
LUA_FILTER = "envoy.filters.http.lua"
META_NAMESPACE = "meshfed"
STAT_PREFIX = "meshfed"
REQUESTS = "requests_total"
DURATION = "request_duration_milliseconds"
TCP_CONNECTIONS = "tcp_connections_closed_total"
TCP_SENT = "tcp_sent_bytes_total"
TCP_RECEIVED = "tcp_received_bytes_total"
MUTUAL_TLS = "mutual_tls"
PASSTHROUGH = "tls_passthrough"

REPORTER_SOURCE = "source"
REPORTER_DESTINATION = "destination"
REPORTER_GATEWAY = "gateway"

# Label names of the request series, in the order they appear.
LABELS = ("reporter", "source_cluster", "destination_cluster", "destination_service", "response_code",
          "response_flags", "connection_security_policy")
GATEWAY_LABELS = ("reporter", "destination_cluster", "destination_service", "response_flags",
                  "connection_security_policy")

# The callee learns the caller's cluster from the verified peer certificate's Subject OU (the issuing CA's cluster).
SOURCE_CLUSTER_LUA = """
function envoy_on_request(handle)
  local ssl = handle:streamInfo():downstreamSslConnection()
  if ssl == nil then return end
  local subject = ssl:subjectPeerCertificate()
  if subject == nil then return end
  local ou = string.match(subject, "OU=([^,+]+)")
  if ou ~= nil then
    handle:streamInfo():dynamicMetadata():set("meshfed", "source_cluster", ou)
  end
end
"""

ACCESS_LOG_FIELDS: Mapping[str, str] = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "duration_ms": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "downstream_peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
    "upstream_peer_uri_san": "%UPSTREAM_PEER_URI_SAN%",
    "xfcc": "%REQ(X-FORWARDED-CLIENT-CERT)%",
    "route_name": "%ROUTE_NAME%",
    "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
    "upstream_host": "%UPSTREAM_HOST%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


def _literal(value: str) -> str:
    """A constant inside an access-log format string (``%`` is the only character the formatter interprets)."""
    return value.replace("%", "%%")


def service_label(key: ServiceKey) -> str:
    """``destination_service`` of a service: its clusterset host, as callers name it."""
    return key.clusterset_host


def inbound_service(proxy: ProxyInfo, port: int, ctx: PushContext) -> str:
    """``destination_service`` of a sidecar's inbound port: the service among the proxy's whose endpoint at the
    proxy's address lists that port (the first of the proxy's services if none does, its listener name if it has
    none)."""
    for key in proxy.services:
        service = ctx.registry.service(ctx.local, key)
        if service is None:
            continue
        for ep in service.endpoints:
            if ep.address == proxy.ip and any(number == port for _, number in ep.ports):
                return service_label(key)
    if proxy.services:
        return service_label(proxy.services[0])
    return f"inbound|{port}"


def cluster_metadata(key: ServiceKey, port: int, *, service: str = "") -> Any:
    """Metadata for an outbound cluster (``%CLUSTER_METADATA(meshfed:service)%`` reads it in the caller's logs);
    ``service`` instead of the key's clusterset host (a peer's service: the name callers use for it)."""
    meta = struct_pb2.Struct()
    meta.update({"service": service or service_label(key), "port": port})
    return base_pb2.Metadata(filter_metadata={META_NAMESPACE: meta})


# Envoy 1.40 marks the stats logger's ``stat_prefix`` deprecated in favour of ``stats_scope``, which the xds-protos
# build we generate with does not have yet; ``stat_prefix`` still works (one deprecation warning in Envoy's log).
def _stats_logger(tags: Iterable[tuple[str, str]], *, duration: bool = True) -> Any:
    tag_list = [stats_pb2.Config.Tag(name=n, value_format=v) for n, v in tags]
    config = stats_pb2.Config(
        stat_prefix=STAT_PREFIX,
        counters=[stats_pb2.Config.Counter(stat=stats_pb2.Config.Stat(name=REQUESTS, tags=tag_list),
                                           value_fixed=wrappers_pb2.UInt64Value(value=1))],
    )
    if duration:
        config.histograms.append(stats_pb2.Config.Histogram(
            stat=stats_pb2.Config.Stat(name=DURATION, tags=tag_list),
            unit=stats_pb2.Config.Histogram.Unit.Milliseconds, value_format="%DURATION%"))
    return accesslog_pb2.AccessLog(name=STATS_LOGGER, typed_config=pack(config))


def _json_logger(extra: Mapping[str, str]) -> Any:
    fields = struct_pb2.Struct()
    fields.update({**extra, **ACCESS_LOG_FIELDS})
    fmt = substitution_format_string_pb2.SubstitutionFormatString(json_format=fields)
    return accesslog_pb2.AccessLog(name=STDOUT_LOGGER,
                                   typed_config=pack(stream_pb2.StdoutAccessLog(log_format=fmt)))


def outbound_access_logs(*, cluster: str, spiffe_id: str) -> list[Any]:
    """Access loggers of a caller sidecar's outbound HTTP connection manager (``reporter="source"``)."""
    values = {
        "reporter": REPORTER_SOURCE,
        "source_cluster": _literal(cluster),
        "destination_cluster": f"%UPSTREAM_METADATA({META_NAMESPACE}:cluster)%",
        "destination_service": f"%CLUSTER_METADATA({META_NAMESPACE}:service)%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "connection_security_policy": MUTUAL_TLS,
    }
    log = {**values, "source_principal": _literal(spiffe_id), "destination_principal": "%UPSTREAM_PEER_URI_SAN%"}
    return [_stats_logger((n, values[n]) for n in LABELS), _json_logger(log)]


def inbound_access_logs(*, cluster: str, service: str, spiffe_id: str) -> list[Any]:
    """Access loggers of a callee sidecar's inbound HTTP connection manager (``reporter="destination"``)."""
    values = {
        "reporter": REPORTER_DESTINATION,
        "source_cluster": f"%DYNAMIC_METADATA({META_NAMESPACE}:source_cluster)%",
        "destination_cluster": _literal(cluster),
        "destination_service": _literal(service),
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "connection_security_policy": MUTUAL_TLS,
    }
    log = {**values, "source_principal": "%DOWNSTREAM_PEER_URI_SAN%", "destination_principal": _literal(spiffe_id)}
    return [_stats_logger((n, values[n]) for n in LABELS), _json_logger(log)]


def gateway_access_logs(*, cluster: str, service: str) -> list[Any]:
    """Access loggers of one gateway SNI chain's TCP proxy (``reporter="gateway"``), written per connection."""
    values = {
        "reporter": REPORTER_GATEWAY,
        "destination_cluster": _literal(cluster),
        "destination_service": _literal(service),
        "response_flags": "%RESPONSE_FLAGS%",
        "connection_security_policy": PASSTHROUGH,
    }
    tags = [stats_pb2.Config.Tag(name=n, value_format=values[n]) for n in GATEWAY_LABELS]
    config = stats_pb2.Config(stat_prefix=STAT_PREFIX, counters=[
        stats_pb2.Config.Counter(stat=stats_pb2.Config.Stat(name=TCP_CONNECTIONS, tags=tags),
                                 value_fixed=wrappers_pb2.UInt64Value(value=1)),
        stats_pb2.Config.Counter(stat=stats_pb2.Config.Stat(name=TCP_SENT, tags=tags), value_format="%BYTES_SENT%"),
        stats_pb2.Config.Counter(stat=stats_pb2.Config.Stat(name=TCP_RECEIVED, tags=tags),
                                 value_format="%BYTES_RECEIVED%"),
    ])
    log = {**values, "upstream_host": "%UPSTREAM_HOST%", "requested_server_name": "%REQUESTED_SERVER_NAME%",
           "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%", "duration_ms": "%DURATION%",
           "bytes_received": "%BYTES_RECEIVED%", "bytes_sent": "%BYTES_SENT%", "start_time": "%START_TIME%",
           "response_flags": "%RESPONSE_FLAGS%", "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%"}
    fields = struct_pb2.Struct()
    fields.update(log)
    fmt = substitution_format_string_pb2.SubstitutionFormatString(json_format=fields)
    return [accesslog_pb2.AccessLog(name=STATS_LOGGER, typed_config=pack(config)),
            accesslog_pb2.AccessLog(name=STDOUT_LOGGER, typed_config=pack(stream_pb2.StdoutAccessLog(log_format=fmt)))]


def source_cluster_filter() -> Any:
    """The inbound HTTP filter (first in the chain) that records the caller's cluster from its certificate."""
    lua = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=SOURCE_CLUSTER_LUA))
    return hcm_pb2.HttpFilter(name=LUA_FILTER, typed_config=pack(lua))


def instrument_inbound(hcm: Any, *, cluster: str, service: str, spiffe_id: str) -> Any:
    """Add the callee-side telemetry to an inbound HttpConnectionManager in place (and return it): the source
    cluster filter first in ``http_filters``, and the access loggers."""
    filters = list(hcm.http_filters)
    del hcm.http_filters[:]
    hcm.http_filters.extend([source_cluster_filter(), *filters])
    hcm.access_log.extend(inbound_access_logs(cluster=cluster, service=service, spiffe_id=spiffe_id))
    return hcm


def instrument_outbound(hcm: Any, *, cluster: str, spiffe_id: str) -> Any:
    hcm.access_log.extend(outbound_access_logs(cluster=cluster, spiffe_id=spiffe_id))
    return hcm


def parse_prometheus(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric ``name`` in Prometheus text format, as (labels, value) (tests and ``meshfed status``)."""
    out: list[tuple[dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, brace, rest = head.partition("{")
        if metric != name:
            continue
        labels: dict[str, str] = {}
        if brace:
            labels = _parse_labels(rest.rstrip("}"))
        try:
            out.append((labels, float(value)))
        except ValueError:
            continue
    return out


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        key = text[i:eq].strip().lstrip(",").strip()
        j = eq + 2  # skip ="
        value = []
        while j < len(text) and text[j] != '"':
            if text[j] == "\\" and j + 1 < len(text):
                value.append({"n": "\n", "\\": "\\", '"': '"'}.get(text[j + 1], text[j + 1]))
                j += 2
                continue
            value.append(text[j])
            j += 1
        labels[key] = "".join(value)
        i = j + 1
        while i < len(text) and text[i] in ", ":
            i += 1
    return labels
