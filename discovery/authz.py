"""Istio ``AuthorizationPolicy`` (``security.istio.io/v1`` and ``v1beta1``): a pure model and its conversion.

The converter is in ``discovery.convert``'s table of kinds, so policies read from manifest files (and from the
Kubernetes source) land in ``ClusterSnapshot.extras`` as :class:`AuthorizationPolicy` values. ``gateway.rbac``
compiles the policies that select a workload into Envoy RBAC for its sidecar's inbound side.

Supported subset (``docs/istio-api.md``, ``docs/authorization.md``); anything else is a :class:`ConversionError`
naming the field path, never silently ignored::

    spec.selector.matchLabels
    spec.action                         ALLOW (default) | DENY            (AUDIT, CUSTOM rejected)
    spec.rules[].from[].source          principals, notPrincipals, namespaces, notNamespaces
    spec.rules[].to[].operation         ports, notPorts, methods, notMethods, paths, notPaths
    spec.rules[].when[]                 key, values, notValues; keys: source.cluster (meshfed), source.namespace,
                                        source.principal, request.headers[<name>]

String values match exactly, or by prefix (``abc*``), suffix (``*abc``) or presence (``*``), as in Istio.

Exception tree: conversion errors are ``discovery.fields.ConversionError`` (``.field`` is the path).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from discovery.fields import ConversionError, as_list, as_mapping, as_str
from discovery.model import ClusterId, DiscoveryError, Namespace, namespace

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
KIND = "AuthorizationPolicy"
#: Policies in these namespaces apply to every workload of the cluster (Istio's root namespace, and ours).
ROOT_NAMESPACES = frozenset({"istio-system", "meshfed-system"})

#: ``when`` keys meshfed enforces. ``source.cluster`` is meshfed's extension: the caller's cluster, as written by
#: that cluster's CA into the caller's certificate (see docs/authorization.md).
WHEN_KEYS = ("source.cluster", "source.namespace", "source.principal")
_HEADER_KEY = re.compile(r"^request\.headers\[([A-Za-z0-9!#$%&'*+.^_`|~-]+)\]$")
_METHOD = re.compile(r"^[A-Z]+$|^\*$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_CLUSTER = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Action(enum.StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class ValueMatchKind(enum.StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    ANY = "any"  # "*": present, any value


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """One Istio string value: ``abc`` (exact), ``abc*`` (prefix), ``*abc`` (suffix) or ``*`` (any)."""

    kind: ValueMatchKind
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> ValueMatch:
        if text == "*":
            return cls(ValueMatchKind.ANY)
        if text.endswith("*"):
            return cls(ValueMatchKind.PREFIX, text[:-1])
        if text.startswith("*"):
            return cls(ValueMatchKind.SUFFIX, text[1:])
        return cls(ValueMatchKind.EXACT, text)

    def matches(self, value: str) -> bool:
        if self.kind is ValueMatchKind.ANY:
            return value != ""
        if self.kind is ValueMatchKind.PREFIX:
            return value.startswith(self.value)
        if self.kind is ValueMatchKind.SUFFIX:
            return value.endswith(self.value)
        return value == self.value

    def __str__(self) -> str:
        forms = {ValueMatchKind.ANY: "*", ValueMatchKind.PREFIX: f"{self.value}*",
                 ValueMatchKind.SUFFIX: f"*{self.value}"}
        return forms.get(self.kind, self.value)


@dataclass(frozen=True, slots=True)
class Source:
    """``from[].source``: every non-empty field must match (each list: any of its values)."""

    principals: tuple[ValueMatch, ...] = ()
    not_principals: tuple[ValueMatch, ...] = ()
    namespaces: tuple[ValueMatch, ...] = ()
    not_namespaces: tuple[ValueMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """``to[].operation``: every non-empty field must match (each list: any of its values)."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[ValueMatch, ...] = ()
    not_methods: tuple[ValueMatch, ...] = ()
    paths: tuple[ValueMatch, ...] = ()
    not_paths: tuple[ValueMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class WhenCondition:
    """``when[]``: ``key`` has one of ``values`` (if any) and none of ``not_values``.

    ``header`` is the header name for ``request.headers[<name>]`` keys (lower case), else empty.
    """

    key: str
    values: tuple[ValueMatch, ...] = ()
    not_values: tuple[ValueMatch, ...] = ()

    @property
    def header(self) -> str:
        m = _HEADER_KEY.match(self.key)
        return m.group(1).lower() if m else ""


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule matches when one of ``sources`` (or any, if none), one of ``operations`` (or any, if none) and every
    condition match."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[WhenCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """A converted AuthorizationPolicy.

    ``selector`` None selects every workload in ``namespace`` (every workload of the cluster in a root namespace).
    ``rules`` empty: the policy matches nothing (an ALLOW policy with no rules therefore allows nothing, and by being
    there denies everything else); a rule with no fields matches every request.
    """

    cluster: ClusterId
    namespace: Namespace
    name: str
    action: Action = Action.ALLOW
    selector: tuple[tuple[str, str], ...] | None = None
    rules: tuple[Rule, ...] = ()

    @property
    def policy_id(self) -> str:
        """How logs and Envoy name the policy: ``<namespace>.<name>``."""
        return f"{self.namespace}.{self.name}"

    def selects(self, workload_namespace: str, labels: Mapping[str, str]) -> bool:
        """True when this policy applies to a workload in ``workload_namespace`` with ``labels``."""
        if self.namespace != workload_namespace and self.namespace not in ROOT_NAMESPACES:
            return False
        if self.selector is None:
            return True
        return all(labels.get(k) == v for k, v in self.selector)


# --------------------------------------------------------------------------------------------------------------
# Conversion


def _only(obj: Mapping[str, Any], path: str, allowed: tuple[str, ...], hint: str = "") -> None:
    for key in obj:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            extra = f"; {hint}" if hint else ""
            raise ConversionError(where, f"not supported by meshfed (supported here: {', '.join(allowed)}){extra}")


def _strings(value: Any, path: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(as_list(value, path)):
        out.append(as_str(item, f"{path}[{i}]", required=True))
    return tuple(out)


def _matches(value: Any, path: str) -> tuple[ValueMatch, ...]:
    out = []
    for i, text in enumerate(_strings(value, path)):
        if "{" in text or "}" in text:
            raise ConversionError(f"{path}[{i}]", f"path templates ({text!r}) are not supported")
        if "*" in text[1:-1] or text in ("**",):
            raise ConversionError(f"{path}[{i}]", f"{text!r}: '*' may only be the first or last character")
        out.append(ValueMatch.parse(text))
    return tuple(out)


def _principals(value: Any, path: str) -> tuple[ValueMatch, ...]:
    # Istio writes principals without the scheme ("<trust domain>/ns/<ns>/sa/<sa>"); accept it written with it.
    return tuple(ValueMatch(m.kind, m.value.removeprefix("spiffe://")) for m in _matches(value, path))


def _methods(value: Any, path: str) -> tuple[ValueMatch, ...]:
    out = []
    for i, text in enumerate(_strings(value, path)):
        if not _METHOD.match(text):
            raise ConversionError(f"{path}[{i}]", f"{text!r} is not an HTTP method in upper case (GET, POST, ...)")
        out.append(ValueMatch.parse(text))
    return tuple(out)


def _ports(value: Any, path: str) -> tuple[int, ...]:
    out = []
    for i, item in enumerate(as_list(value, path)):
        text = str(item) if isinstance(item, int | str) and not isinstance(item, bool) else ""
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise ConversionError(f"{path}[{i}]", f"must be a port number 1..65535 (Istio writes it as a string), "
                                                  f"got {item!r}")
        out.append(int(text))
    return tuple(out)


def _paths(value: Any, path: str) -> tuple[ValueMatch, ...]:
    out = _matches(value, path)
    for i, m in enumerate(out):
        if m.kind in (ValueMatchKind.EXACT, ValueMatchKind.PREFIX) and not m.value.startswith("/"):
            raise ConversionError(f"{path}[{i}]", f"{m}: a path must start with '/' (or be '*' or '*<suffix>')")
    return out


def _source(raw: Any, path: str) -> Source:
    item = as_mapping(raw, path, required=True)
    _only(item, path, ("source",))
    src = as_mapping(item.get("source"), f"{path}.source", required=True)
    _only(src, f"{path}.source", ("principals", "notPrincipals", "namespaces", "notNamespaces"),
          "for the caller's cluster use when: [{key: source.cluster, values: [...]}]")
    out = Source(
        principals=_principals(src.get("principals"), f"{path}.source.principals"),
        not_principals=_principals(src.get("notPrincipals"), f"{path}.source.notPrincipals"),
        namespaces=_matches(src.get("namespaces"), f"{path}.source.namespaces"),
        not_namespaces=_matches(src.get("notNamespaces"), f"{path}.source.notNamespaces"),
    )
    if out == Source():
        raise ConversionError(f"{path}.source", "must set at least one field (Istio rejects an empty source)")
    return out


def _operation(raw: Any, path: str) -> Operation:
    item = as_mapping(raw, path, required=True)
    _only(item, path, ("operation",))
    op = as_mapping(item.get("operation"), f"{path}.operation", required=True)
    p = f"{path}.operation"
    _only(op, p, ("ports", "notPorts", "methods", "notMethods", "paths", "notPaths"))
    out = Operation(
        ports=_ports(op.get("ports"), f"{p}.ports"),
        not_ports=_ports(op.get("notPorts"), f"{p}.notPorts"),
        methods=_methods(op.get("methods"), f"{p}.methods"),
        not_methods=_methods(op.get("notMethods"), f"{p}.notMethods"),
        paths=_paths(op.get("paths"), f"{p}.paths"),
        not_paths=_paths(op.get("notPaths"), f"{p}.notPaths"),
    )
    if out == Operation():
        raise ConversionError(p, "must set at least one field (Istio rejects an empty operation)")
    return out


def _condition(raw: Any, path: str) -> WhenCondition:
    item = as_mapping(raw, path, required=True)
    _only(item, path, ("key", "values", "notValues"))
    key = as_str(item.get("key"), f"{path}.key", required=True)
    if key not in WHEN_KEYS and not _HEADER_KEY.match(key):
        raise ConversionError(f"{path}.key", f"{key!r} is not supported by meshfed (supported: "
                                             f"{', '.join(WHEN_KEYS)}, request.headers[<name>])")
    if key == "source.principal":
        values, not_values = (_principals(item.get(k), f"{path}.{k}") for k in ("values", "notValues"))
    else:
        values, not_values = (_matches(item.get(k), f"{path}.{k}") for k in ("values", "notValues"))
    if not values and not not_values:
        raise ConversionError(path, "needs values or notValues")
    if key == "source.cluster":
        for field_name, matches in (("values", values), ("notValues", not_values)):
            for i, m in enumerate(matches):
                if m.kind is not ValueMatchKind.ANY and not _CLUSTER.match(m.value):
                    raise ConversionError(f"{path}.{field_name}[{i}]",
                                          f"{m}: source.cluster values are cluster names (or '*')")
                if m.kind in (ValueMatchKind.PREFIX, ValueMatchKind.SUFFIX):
                    raise ConversionError(f"{path}.{field_name}[{i}]",
                                          f"{m}: source.cluster matches whole cluster names (or '*')")
    return WhenCondition(key=key, values=values, not_values=not_values)


def _rule(raw: Any, path: str) -> Rule:
    rule = as_mapping(raw, path)
    _only(rule, path, ("from", "to", "when"))
    return Rule(
        sources=tuple(_source(s, f"{path}.from[{i}]") for i, s in enumerate(as_list(rule.get("from"), f"{path}.from"))),
        operations=tuple(_operation(o, f"{path}.to[{i}]") for i, o in enumerate(as_list(rule.get("to"), f"{path}.to"))),
        conditions=tuple(_condition(c, f"{path}.when[{i}]")
                         for i, c in enumerate(as_list(rule.get("when"), f"{path}.when"))),
    )


def _selector(raw: Any) -> tuple[tuple[str, str], ...] | None:
    if raw is None:
        return None
    sel = as_mapping(raw, "spec.selector")
    _only(sel, "spec.selector", ("matchLabels",))
    labels = as_mapping(sel.get("matchLabels"), "spec.selector.matchLabels")
    out = []
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise ConversionError(f"spec.selector.matchLabels.{k}", f"labels map strings to strings, got {v!r}")
        out.append((k, v))
    return tuple(sorted(out)) if out else None


def convert_authorization_policy(obj: Mapping[str, Any], cluster: ClusterId) -> AuthorizationPolicy:
    """Convert one AuthorizationPolicy object; :class:`ConversionError` names the offending field path."""
    _only(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = as_mapping(obj.get("metadata"), "metadata", required=True)
    name = as_str(meta.get("name"), "metadata.name", required=True)
    if not _NAME.match(name) or len(name) > 253:
        raise ConversionError("metadata.name", f"{name!r} is not a DNS-1123 subdomain")
    try:
        ns = namespace(as_str(meta.get("namespace"), "metadata.namespace", default="default"))
    except DiscoveryError as exc:
        raise ConversionError("metadata.namespace", str(exc)) from None
    spec = as_mapping(obj.get("spec"), "spec")
    _only(spec, "spec", ("selector", "action", "rules"),
          "targetRef/targetRefs (gateway attachment) and provider (CUSTOM) are outside meshfed's subset")
    action_text = as_str(spec.get("action"), "spec.action", default="ALLOW")
    try:
        action = Action(action_text)
    except ValueError:
        raise ConversionError("spec.action", f"{action_text!r} is not supported by meshfed (supported: ALLOW, DENY;"
                                             " AUDIT and CUSTOM are not)") from None
    rules = tuple(_rule(r, f"spec.rules[{i}]") for i, r in enumerate(as_list(spec.get("rules"), "spec.rules")))
    return AuthorizationPolicy(cluster=cluster, namespace=ns, name=name, action=action,
                               selector=_selector(spec.get("selector")), rules=rules)
