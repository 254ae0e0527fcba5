"""Authorization on a sidecar's inbound side: the RBAC filters and the access log line naming a denying policy.

``lds.inbound_listener`` puts :func:`http_filters` ahead of the router and :func:`access_logs` on the connection
manager. The policies come from ``PushContext.authz``; which ones apply to the sidecar's workload is decided by
``gateway.rbac`` from the labels of the Services the sidecar serves (see docs/authorization.md).
"""

from __future__ import annotations

from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2

from discovery.authz import AuthorizationPolicy, ValueMatchKind
from gateway import rbac
from gateway.context import ProxyInfo, ProxyKind, PushContext
from gateway.generators.common import pack

STDOUT_LOGGER = "envoy.access_loggers.stdout"
#: Every denied request's log line starts with this, then ``key=value`` fields.
LOG_TAG = "meshfed-authz"


def foreign_callers(proxy: ProxyInfo, ctx: PushContext) -> tuple[tuple[str, str], ...]:
    """The callers from peered trust domains that ALLOW policies selecting ``proxy``'s workload name in
    ``from.source.principals``: ``("exact", "spiffe://b.example/ns/default/sa/sleep")`` for a principal,
    ``("prefix", "spiffe://b.example/ns/shop/")`` for a ``*``-ended one whose trust domain is written out whole
    (``b.example/*`` names the whole peer trust domain). Suffix, ``*`` and deny rules name nobody here: a foreign
    caller must be named under its own trust domain. Empty without peers."""
    if not ctx.peer_bundles:
        return ()
    peers = {td for td, _ in ctx.peer_bundles if td != ctx.trust_domain}
    _deny, allow = applicable(proxy, ctx)
    out: set[tuple[str, str]] = set()
    for policy in allow:
        for rule in policy.rules:
            for src in rule.sources:
                for m in src.principals:
                    td, sep, _rest = m.value.partition("/")
                    if td not in peers or not sep:
                        continue
                    if m.kind is ValueMatchKind.EXACT:
                        out.add(("exact", f"spiffe://{m.value}"))
                    elif m.kind is ValueMatchKind.PREFIX:
                        out.add(("prefix", f"spiffe://{m.value}"))
    return tuple(sorted(out))


def applicable(proxy: ProxyInfo, ctx: PushContext) -> tuple[tuple[AuthorizationPolicy, ...],
                                                            tuple[AuthorizationPolicy, ...]]:
    """``(deny, allow)`` policies selecting ``proxy``'s workload (memoized per context and workload)."""
    if not ctx.authz:
        return (), ()
    key = ("authz", str(proxy.namespace), proxy.services)

    def build() -> tuple[tuple[AuthorizationPolicy, ...], tuple[AuthorizationPolicy, ...]]:
        selectors = {}
        for service_key in proxy.services:
            service = ctx.registry.service(ctx.local, service_key)
            if service is not None:
                selectors[service_key] = service.selector
        labels = rbac.workload_labels(proxy.services, selectors)
        return rbac.select(ctx.authz, str(proxy.namespace), labels)

    return ctx.memo(key, build)


def listener_ports(proxy: ProxyInfo, port: int, ctx: PushContext) -> frozenset[int]:
    """The port numbers an AuthorizationPolicy may use for the inbound listener on ``port``: the listener's own
    port and the target (workload) port of the Service port it serves (same name, or the Service's only port when
    names cannot tell: one of the two is unnamed), which is what Istio users write. A pod behind several Services
    does not get another Service's only port on every listener."""
    out = {port}
    inbound = next((p for p in proxy.inbound if p.port == port), None)
    for key in proxy.services:
        service = ctx.registry.service(ctx.local, key)
        if service is None or inbound is None:
            continue
        for sp in service.ports:
            if (inbound.name and sp.name == inbound.name) or (
                    len(service.ports) == 1 and not (inbound.name and sp.name)):
                out.add(sp.target_port if isinstance(sp.target_port, int) and sp.target_port else sp.port)
    return frozenset(out)


def http_filters(proxy: ProxyInfo, ctx: PushContext, port: int | None = None) -> list[Any]:
    """The RBAC HTTP filters for ``proxy``'s inbound listener on ``port`` (DENY, then ALLOW; none without
    policies). Without ``port``, ``ports`` conditions are left to Envoy's destination port."""
    deny, allow = applicable(proxy, ctx)
    if not deny and not allow:
        return []
    ports = listener_ports(proxy, port, ctx) if port is not None else None
    # Only an Envoy sidecar's connection manager replaces the caller's x-forwarded-client-cert before RBAC; a
    # proxyless gRPC server passes it through, so there the caller's cluster is not knowable (fail closed).
    known = proxy.kind is ProxyKind.SIDECAR
    # Shared by every replica of the workload (never mutated: the connection manager copies them).
    key = ("authz-filters", str(proxy.namespace), proxy.services, ports, known)
    return list(ctx.memo(key, lambda: tuple(rbac.rbac_filters(deny, allow, listener_ports=ports,
                                                               cluster_known=known))))


def log_format(listener: str, allow: tuple[AuthorizationPolicy, ...]) -> str:
    allow_ids = ",".join(p.policy_id for p in allow) or "-"
    return (f"{LOG_TAG} denied listener={listener} code=%RESPONSE_CODE% details=%RESPONSE_CODE_DETAILS% "
            f"allow_policies={allow_ids} source=%DOWNSTREAM_PEER_URI_SAN% "
            "source_subject=\"%DOWNSTREAM_PEER_SUBJECT%\" method=%REQ(:METHOD)% path=%REQ(:PATH)%\n")


def access_logs(proxy: ProxyInfo, listener: str, ctx: PushContext) -> list[Any]:
    """An access log (Envoy's stdout) of every 403 on this listener while policies apply to the workload.

    An RBAC denial reads ``details=rbac_access_denied_matched_policy[<ns>.<policy>]`` (``[none]``: no ALLOW policy
    matched; ``allow_policies`` lists those in force); a 403 from the application reads ``details=via_upstream``.
    """
    deny, allow = applicable(proxy, ctx)
    if not deny and not allow:
        return []
    logger = stream_pb2.StdoutAccessLog(log_format=substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string=log_format(listener, allow))))
    return [accesslog_pb2.AccessLog(
        name=STDOUT_LOGGER,
        filter=accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(op=accesslog_pb2.ComparisonFilter.EQ,
                                                      value=base_pb2.RuntimeUInt32(default_value=403,
                                                                                   runtime_key="meshfed.authz.log")),
        )),
        typed_config=pack(logger),
    )]
