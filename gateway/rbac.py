"""Compile Istio AuthorizationPolicy (``discovery.authz``) into Envoy RBAC for a sidecar's inbound side (pure).

Istio's evaluation, which the filters below reproduce for one workload:

1. a request matching any DENY policy that selects the workload is denied;
2. with no ALLOW policy selecting the workload, it is allowed;
3. a request matching any ALLOW policy is allowed; anything else is denied.

So the inbound HTTP connection manager gets up to two ``envoy.filters.http.rbac`` filters ahead of the router: one
with action DENY holding the DENY policies, then one with action ALLOW holding the ALLOW policies (only if there
is at least one; an ALLOW policy without rules matches nothing and so denies everything). Each Envoy policy is
named ``<namespace>.<policy>`` (``<namespace>.<policy>:rules[<i>]`` when the policy has several rules), which
Envoy reports in the response details of a denied request, ``rbac_access_denied_matched_policy[<name>]``
(``[none]`` when no ALLOW policy matched); the inbound access log prints it.

Principals are SPIFFE IDs from the caller's verified certificate (``authenticated.principal_name`` is the URI
SAN). The caller's cluster (``when: source.cluster``) is the ``OU`` of that certificate's Subject, which the
caller's cluster CA writes and nobody else can (docs/authorization.md): the inbound connection manager replaces
any ``x-forwarded-client-cert`` the caller sent with its own, built from the verified certificate (SANITIZE_SET
with the subject), and the RBAC principal matches the Subject inside that header.

TCP ports of a capture-mode sidecar get the same policies as ``envoy.filters.network.rbac`` filters ahead of the
TCP proxy (:func:`network_rbac_filters`): ``source.cluster`` is matched on the verified certificate's Subject itself
(no header there), and HTTP-only fields fail closed as in Istio (:func:`tcp_rule`: an ALLOW rule naming methods,
paths or request headers matches nothing, a DENY rule loses those fields); :func:`tcp_port_problems` says so, per
policy and field, for the control plane's status.

:func:`decide` is the same semantics evaluated in Python (HTTP ports), for ``meshfed diagnose`` and for tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2

from discovery.authz import (
    Action,
    AuthorizationPolicy,
    Operation,
    Rule,
    Source,
    ValueMatch,
    ValueMatchKind,
    WhenCondition,
)
from discovery.model import Service
from discovery.protocols import NOT_TCP, is_http, port_protocol
from gateway.anypb import pack

RBAC_FILTER = "envoy.filters.http.rbac"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
XFCC = "x-forwarded-client-cert"
DENY_STAT_PREFIX = "meshfed_deny."
ALLOW_STAT_PREFIX = "meshfed_allow."
CLUSTER_LABEL = "topology.istio.io/cluster"


# --------------------------------------------------------------------------------------------------------------
# Which policies apply to a workload


def workload_labels(services: Iterable[Any], service_selectors: Mapping[Any, Sequence[tuple[str, str]]]
                    ) -> dict[str, str]:
    """The labels a sidecar's workload is known to carry: the selector labels of each Service it serves (a pod
    a Service selects carries them), or ``app: <service name>`` for a Service without a selector."""
    labels: dict[str, str] = {}
    for key in services:
        selector = service_selectors.get(key)
        if selector:
            labels.update(dict(selector))
        else:
            labels.setdefault("app", str(key.name))
    return labels


def select(policies: Iterable[AuthorizationPolicy], namespace: str, labels: Mapping[str, str]
           ) -> tuple[tuple[AuthorizationPolicy, ...], tuple[AuthorizationPolicy, ...]]:
    """``(deny, allow)``: the policies selecting a workload in ``namespace`` with ``labels``, sorted by id."""
    chosen = sorted((p for p in policies if p.selects(namespace, labels)), key=lambda p: p.policy_id)
    return (tuple(p for p in chosen if p.action is Action.DENY),
            tuple(p for p in chosen if p.action is Action.ALLOW))


def envoy_policy_names(policy: AuthorizationPolicy) -> list[str]:
    """The Envoy RBAC policy name of each rule of ``policy``."""
    if len(policy.rules) == 1:
        return [policy.policy_id]
    return [f"{policy.policy_id}:rules[{i}]" for i in range(len(policy.rules))]


# --------------------------------------------------------------------------------------------------------------
# Envoy RBAC


def _string_matcher(m: ValueMatch) -> Any:
    if m.kind is ValueMatchKind.ANY:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".+"))
    if m.kind is ValueMatchKind.PREFIX:
        return string_pb2.StringMatcher(prefix=m.value)
    if m.kind is ValueMatchKind.SUFFIX:
        return string_pb2.StringMatcher(suffix=m.value)
    return string_pb2.StringMatcher(exact=m.value)


def _pattern(m: ValueMatch) -> str:
    """An RE2 fragment for one path segment (no '/')."""
    if m.kind is ValueMatchKind.ANY:
        return "[^/]+"
    if m.kind is ValueMatchKind.PREFIX:
        return re.escape(m.value) + "[^/]*"
    if m.kind is ValueMatchKind.SUFFIX:
        return "[^/]*" + re.escape(m.value)
    return re.escape(m.value)


def _any_of_principals(items: Sequence[Any]) -> Any:
    return items[0] if len(items) == 1 else rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=list(items)))


def _all_of_principals(items: Sequence[Any]) -> Any:
    if not items:
        return rbac_pb2.Principal(any=True)
    return items[0] if len(items) == 1 else rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=list(items)))


def _any_of_permissions(items: Sequence[Any]) -> Any:
    return items[0] if len(items) == 1 else rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=list(items)))


def _all_of_permissions(items: Sequence[Any]) -> Any:
    if not items:
        return rbac_pb2.Permission(any=True)
    return items[0] if len(items) == 1 else rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=list(items)))


def _principal_id(m: ValueMatch) -> Any:
    spiffe = m.kind in (ValueMatchKind.EXACT, ValueMatchKind.PREFIX)
    prefixed = ValueMatch(m.kind, "spiffe://" + m.value) if spiffe else m
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=_string_matcher(prefixed)))


def _namespace_id(m: ValueMatch) -> Any:
    regex = rf"spiffe://[^/]+/ns/{_pattern(m)}/sa/[^/]+"
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(
        principal_name=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex))))


def cluster_regex(cluster: ValueMatch) -> str:
    """RE2 (full match) for the sidecar-set XFCC header whose Subject names the caller's cluster as its OU."""
    ou = "[^,\"]+" if cluster.kind is ValueMatchKind.ANY else re.escape(cluster.value)
    return rf'(.*;)?Subject="([^"]*,)?OU={ou}(,[^"]*)?"(;.*)?'


def _cluster_id(m: ValueMatch) -> Any:
    return rbac_pb2.Principal(header=route_components_pb2.HeaderMatcher(
        name=XFCC, string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=cluster_regex(m)))))


def subject_cluster_regex(cluster: ValueMatch) -> str:
    """RE2 (full match) for the verified peer certificate's Subject (RFC 2253, as Envoy prints it) naming the
    caller's cluster as its OU. A SPIFFE URI SAN never matches it (no ``OU=`` in an ID of RFC 1123 names)."""
    ou = "[^,]+" if cluster.kind is ValueMatchKind.ANY else re.escape(cluster.value)
    return rf"(.*,)?OU={ou}(,.*)?"


def _subject_cluster_id(m: ValueMatch) -> Any:
    """``source.cluster`` on a TCP port: there is no header, so match the certificate itself. Envoy's
    ``authenticated.principal_name`` tries the URI SANs, then the DNS SANs, then the Subject; only the Subject
    can match this regex."""
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(
        principal_name=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(
            regex=subject_cluster_regex(m)))))


def _header_id(name: str, m: ValueMatch) -> Any:
    if m.kind is ValueMatchKind.ANY:
        return rbac_pb2.Principal(header=route_components_pb2.HeaderMatcher(name=name, present_match=True))
    return rbac_pb2.Principal(header=route_components_pb2.HeaderMatcher(name=name, string_match=_string_matcher(m)))


def _not(p: Any) -> Any:
    return rbac_pb2.Principal(not_id=p)


def _source_principal(src: Source) -> Any:
    parts = []
    if src.principals:
        parts.append(_any_of_principals([_principal_id(m) for m in src.principals]))
    if src.not_principals:
        parts.append(_not(_any_of_principals([_principal_id(m) for m in src.not_principals])))
    if src.namespaces:
        parts.append(_any_of_principals([_namespace_id(m) for m in src.namespaces]))
    if src.not_namespaces:
        parts.append(_not(_any_of_principals([_namespace_id(m) for m in src.not_namespaces])))
    return _all_of_principals(parts)


def _condition_principal(cond: WhenCondition, *, l4: bool = False) -> Any:
    if cond.key == "source.cluster":
        make: Any = _subject_cluster_id if l4 else _cluster_id
    elif cond.key == "source.namespace":
        make = _namespace_id
    elif cond.key == "source.principal":
        make = _principal_id
    else:
        header = cond.header

        def make(m: ValueMatch) -> Any:
            return _header_id(header, m)
    parts = []
    if cond.values:
        parts.append(_any_of_principals([make(m) for m in cond.values]))
    if cond.not_values:
        parts.append(_not(_any_of_principals([make(m) for m in cond.not_values])))
    return _all_of_principals(parts)


def _path_perm(m: ValueMatch) -> Any:
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=_string_matcher(m)))


def _method_perm(m: ValueMatch) -> Any:
    if m.kind is ValueMatchKind.ANY:
        return rbac_pb2.Permission(any=True)
    return rbac_pb2.Permission(header=route_components_pb2.HeaderMatcher(name=":method",
                                                                         string_match=_string_matcher(m)))


def _port_perm(port: int, listener_ports: frozenset[int] | None) -> Any:
    if listener_ports is None:
        return rbac_pb2.Permission(destination_port=port)
    # Resolved per inbound listener: the policy's port names this listener or it does not.
    if port in listener_ports:
        return rbac_pb2.Permission(any=True)
    return rbac_pb2.Permission(not_rule=rbac_pb2.Permission(any=True))


def _not_perm(p: Any) -> Any:
    return rbac_pb2.Permission(not_rule=p)


def _operation_permission(op: Operation, listener_ports: frozenset[int] | None) -> Any:
    groups: list[tuple[list[Any], list[Any]]] = [
        ([_port_perm(p, listener_ports) for p in op.ports], [_port_perm(p, listener_ports) for p in op.not_ports]),
        ([_method_perm(m) for m in op.methods], [_method_perm(m) for m in op.not_methods]),
        ([_path_perm(m) for m in op.paths], [_path_perm(m) for m in op.not_paths]),
    ]
    parts = []
    for values, negated in groups:
        if values:
            parts.append(_any_of_permissions(values))
        if negated:
            parts.append(_not_perm(_any_of_permissions(negated)))
    return _all_of_permissions(parts)


def _cluster_unknowable(action: Action) -> Any:
    """A ``source.cluster`` condition where the caller's cluster cannot be known safely (proxyless gRPC servers:
    no connection manager sanitizes x-forwarded-client-cert, so the caller could write it). Fail closed, as Istio
    does with conditions a proxy cannot check: the condition never holds in an ALLOW rule, always in a DENY rule."""
    if action is Action.DENY:
        return rbac_pb2.Principal(any=True)
    return rbac_pb2.Principal(not_id=rbac_pb2.Principal(any=True))


def rule_policy(rule: Rule, listener_ports: frozenset[int] | None = None, *,
                cluster_known: bool = True, action: Action = Action.ALLOW, l4: bool = False) -> Any:
    """One Istio rule as one Envoy RBAC policy: (any operation) AND (any source AND every condition).

    ``listener_ports``: the port numbers that denote the inbound listener the filter runs on (its own port and
    the workload port the Service names for it); ``ports`` conditions are then decided here, so a policy written
    against the workload's port holds whatever port the sidecar listens on. None: match Envoy's destination port.
    ``cluster_known`` False: see :func:`_cluster_unknowable` (``action`` says which way to fail closed).
    ``l4``: for the network RBAC filter of a TCP port (``source.cluster`` from the certificate's Subject; the rule
    must already be stripped of HTTP-only fields, :func:`tcp_rule`).
    """
    permission = (_any_of_permissions([_operation_permission(o, listener_ports) for o in rule.operations])
                  if rule.operations else rbac_pb2.Permission(any=True))
    principals = []
    if rule.sources:
        principals.append(_any_of_principals([_source_principal(s) for s in rule.sources]))
    principals.extend(_condition_principal(c, l4=l4) if cluster_known or c.key != "source.cluster"
                      else _cluster_unknowable(action) for c in rule.conditions)
    return rbac_pb2.Policy(permissions=[permission], principals=[_all_of_principals(principals)])


def rbac_config(policies: Sequence[AuthorizationPolicy], action: Action,
                listener_ports: frozenset[int] | None = None, *, cluster_known: bool = True,
                l4: bool = False) -> Any:
    """The ``envoy.config.rbac.v3.RBAC`` of one action: every rule of every policy, named per rule (``l4``: as a
    TCP port enforces them, :func:`tcp_rule`)."""
    named: dict[str, Any] = {}
    for policy in policies:
        for name, rule in zip(envoy_policy_names(policy), policy.rules, strict=True):
            if l4:
                tcp = tcp_rule(rule, action)
                named[name] = (_NEVER if tcp is None
                               else rule_policy(tcp, listener_ports, action=action, l4=True))
                continue
            named[name] = rule_policy(rule, listener_ports, cluster_known=cluster_known, action=action)
    envoy_action = rbac_pb2.RBAC.ALLOW if action is Action.ALLOW else rbac_pb2.RBAC.DENY
    return rbac_pb2.RBAC(action=envoy_action, policies=named)


def rbac_filters(deny: Sequence[AuthorizationPolicy], allow: Sequence[AuthorizationPolicy], *,
                 listener_ports: frozenset[int] | None = None, cluster_known: bool = True) -> list[Any]:
    """The HTTP filters (before the router) enforcing ``deny`` then ``allow``; none when no policy applies.

    ``cluster_known`` False for servers whose x-forwarded-client-cert is not set by a sanitizing connection manager
    (proxyless gRPC): ``source.cluster`` conditions then fail closed (:func:`_cluster_unknowable`)."""
    out = []
    if deny:
        out.append(_http_filter(rbac_config(deny, Action.DENY, listener_ports, cluster_known=cluster_known),
                                DENY_STAT_PREFIX))
    if allow:
        out.append(_http_filter(rbac_config(allow, Action.ALLOW, listener_ports, cluster_known=cluster_known),
                                ALLOW_STAT_PREFIX))
    return out


# --------------------------------------------------------------------------------------------------------------
# TCP ports: the network RBAC filter


#: A policy that matches no connection (an ALLOW rule that a TCP port cannot evaluate).
_NEVER = rbac_pb2.Policy(permissions=[rbac_pb2.Permission(not_rule=rbac_pb2.Permission(any=True))],
                         principals=[rbac_pb2.Principal(any=True)])


def http_only_fields(rule: Rule) -> list[str]:
    """The fields of ``rule`` a TCP connection has no value for, as paths inside the rule (``to[0].operation.paths``,
    ``when[1]``): methods, paths and request headers."""
    out = []
    for i, op in enumerate(rule.operations):
        for field_name, values in (("methods", op.methods), ("notMethods", op.not_methods), ("paths", op.paths),
                                   ("notPaths", op.not_paths)):
            if values:
                out.append(f"to[{i}].operation.{field_name}")
    out.extend(f"when[{i}] ({c.key})" for i, c in enumerate(rule.conditions) if c.header)
    return out


def tcp_rule(rule: Rule, action: Action) -> Rule | None:
    """``rule`` as a TCP port enforces it, failing closed as Istio does: an ALLOW rule with an HTTP-only field
    matches nothing (None); a DENY rule loses its HTTP-only fields, so it denies more, never less."""
    if not http_only_fields(rule):
        return rule
    if action is Action.ALLOW:
        return None
    operations = tuple(Operation(ports=o.ports, not_ports=o.not_ports) for o in rule.operations)
    return Rule(sources=rule.sources, operations=operations,
                conditions=tuple(c for c in rule.conditions if not c.header))


def network_rbac_filters(deny: Sequence[AuthorizationPolicy], allow: Sequence[AuthorizationPolicy], *,
                         listener_ports: frozenset[int] | None = None, stat_prefix: str) -> list[Any]:
    """The network filters (before the TCP proxy) enforcing ``deny`` then ``allow`` on a TCP port; none when no
    policy applies. A denied connection is closed; Envoy's connection termination details then read
    ``rbac_access_denied_matched_policy[<name>]``."""
    out = []
    for policies, action, prefix in ((deny, Action.DENY, DENY_STAT_PREFIX), (allow, Action.ALLOW,
                                                                             ALLOW_STAT_PREFIX)):
        if not policies:
            continue
        config = network_rbac_pb2.RBAC(rules=rbac_config(policies, action, listener_ports, l4=True),
                                       stat_prefix=f"{stat_prefix}.{prefix}")
        out.append(listener_components_pb2.Filter(name=NETWORK_RBAC_FILTER, typed_config=pack(config)))
    return out


def tcp_port_problems(policies: Iterable[AuthorizationPolicy], services: Iterable[Service]) -> list[str]:
    """One message per (policy, rule field) that a TCP port cannot evaluate: the policy selects the workload of a
    local Service with a port whose protocol is TCP (``discovery.protocols``) and a rule names methods, paths or
    request headers. Each names the policy, the field and the ports, and says what the port does instead."""
    services = list(services)
    out: list[str] = []
    for policy in sorted(policies, key=lambda p: p.policy_id):
        ports: list[str] = []
        for service in services:
            labels = workload_labels([service.key], {service.key: service.selector})
            if not policy.selects(str(service.key.namespace), labels):
                continue
            for sp in service.ports:
                protocol = port_protocol(sp)
                if protocol != NOT_TCP and not is_http(protocol):
                    ports.append(f"{service.key}:{sp.port} ({protocol})")
        if not ports:
            continue
        effect = ("the rule matches no connection there" if policy.action is Action.ALLOW
                  else "the field is ignored there, so the rule denies more")
        for i, rule in enumerate(policy.rules):
            for where in http_only_fields(rule):
                out.append(f"AuthorizationPolicy {policy.namespace}/{policy.name}: spec.rules[{i}].{where} is "
                           f"HTTP-only, but it selects TCP port(s) {', '.join(ports)}: {effect}")
    return out


def _http_filter(rules: Any, stat_prefix: str) -> Any:
    config = http_rbac_pb2.RBAC(rules=rules, rules_stat_prefix=stat_prefix, track_per_rule_stats=True)
    return hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=pack(config))


# --------------------------------------------------------------------------------------------------------------
# The same semantics in Python


@dataclass(frozen=True, slots=True)
class Request:
    """What the callee's sidecar knows about one request: the caller's verified identity and cluster, and the
    request itself. ``principal`` is the full SPIFFE ID (``spiffe://td/ns/x/sa/y``)."""

    principal: str
    cluster: str
    port: int
    method: str = "GET"
    path: str = "/"
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        parts = self.principal.removeprefix("spiffe://").split("/")
        return parts[2] if len(parts) == 5 and parts[1] == "ns" else ""


@dataclass(frozen=True, slots=True)
class Decision:
    """``allowed``, and the Envoy policy name that decided (``none`` for "no ALLOW policy matched"; empty when no
    policy applies)."""

    allowed: bool
    policy: str = ""

    @property
    def details(self) -> str:
        """What Envoy writes as response code details for this decision (empty when allowed)."""
        return "" if self.allowed else f"rbac_access_denied_matched_policy[{self.policy}]"


def _any(ms: Sequence[ValueMatch], value: str) -> bool:
    return any(m.matches(value) for m in ms)


def _ns_match(m: ValueMatch, req: Request) -> bool:
    return req.namespace != "" and m.matches(req.namespace)


def _source_matches(src: Source, req: Request) -> bool:
    bare = req.principal.removeprefix("spiffe://")
    if src.principals and not _any(src.principals, bare):
        return False
    if src.not_principals and _any(src.not_principals, bare):
        return False
    if src.namespaces and not any(_ns_match(m, req) for m in src.namespaces):
        return False
    return not (src.not_namespaces and any(_ns_match(m, req) for m in src.not_namespaces))


def _condition_matches(cond: WhenCondition, req: Request) -> bool:
    def one(m: ValueMatch) -> bool:
        if cond.key == "source.cluster":
            return m.matches(req.cluster)
        if cond.key == "source.namespace":
            return _ns_match(m, req)
        if cond.key == "source.principal":
            return m.matches(req.principal.removeprefix("spiffe://"))
        value = {k.lower(): v for k, v in req.headers.items()}.get(cond.header)
        if value is None:
            return False
        return True if m.kind is ValueMatchKind.ANY else m.matches(value)

    if cond.values and not any(one(m) for m in cond.values):
        return False
    return not (cond.not_values and any(one(m) for m in cond.not_values))


def normalize_path(path: str) -> str:
    """The path RBAC sees: query dropped, dot segments removed (RFC 3986 section 5.2.4), as the sidecar normalizes."""
    path = path.split("?", 1)[0]
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments[1:], start=1):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _operation_matches(op: Operation, req: Request) -> bool:
    path = normalize_path(req.path)

    def method(m: ValueMatch) -> bool:
        return m.kind is ValueMatchKind.ANY or m.matches(req.method)

    checks = (
        not op.ports or req.port in op.ports,
        not op.not_ports or req.port not in op.not_ports,
        not op.methods or any(method(m) for m in op.methods),
        not op.not_methods or not any(method(m) for m in op.not_methods),
        not op.paths or _any(op.paths, path),
        not op.not_paths or not _any(op.not_paths, path),
    )
    return all(checks)


def rule_matches(rule: Rule, req: Request) -> bool:
    return ((not rule.sources or any(_source_matches(s, req) for s in rule.sources))
            and (not rule.operations or any(_operation_matches(o, req) for o in rule.operations))
            and all(_condition_matches(c, req) for c in rule.conditions))


def decide(deny: Sequence[AuthorizationPolicy], allow: Sequence[AuthorizationPolicy], req: Request) -> Decision:
    """Istio's decision for ``req`` given the DENY and ALLOW policies selecting the workload."""
    for policy in sorted(deny, key=lambda p: p.policy_id):
        for name, rule in zip(envoy_policy_names(policy), policy.rules, strict=True):
            if rule_matches(rule, req):
                return Decision(False, name)
    if not allow:
        return Decision(True)
    for policy in sorted(allow, key=lambda p: p.policy_id):
        for name, rule in zip(envoy_policy_names(policy), policy.rules, strict=True):
            if rule_matches(rule, req):
                return Decision(True, name)
    return Decision(False, "none")
