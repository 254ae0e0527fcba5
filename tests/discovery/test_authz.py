"""AuthorizationPolicy conversion: every supported field, and every unsupported one rejected with its path."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

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
from discovery.convert import ConversionError, convert
from discovery.manifests import ManifestSource, parse_file
from discovery.model import ClusterId

WEST = ClusterId("west")

FULL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings.full
  namespace: shop
spec:
  selector:
    matchLabels: {app: ratings, version: v1}
  action: DENY
  rules:
    - from:
        - source:
            principals: ["td/ns/shop/sa/sleep", "spiffe://td/ns/a/sa/b", "*/sa/admin", "td/ns/x/*", "*"]
            notPrincipals: ["td/ns/shop/sa/bad"]
        - source:
            namespaces: ["shop", "team-*"]
            notNamespaces: ["*-test"]
      to:
        - operation:
            ports: ["9080", 9443]
            notPorts: ["15000"]
            methods: ["GET", "HEAD"]
            notMethods: ["DELETE"]
            paths: ["/ratings", "/api/*", "*.json", "*"]
            notPaths: ["/api/private*"]
      when:
        - {key: source.cluster, values: [east, "*"], notValues: [west]}
        - {key: source.namespace, values: [shop]}
        - {key: source.principal, notValues: ["spiffe://td/ns/shop/sa/x"]}
        - {key: "request.headers[X-Tenant]", values: ["acme", "beta*"]}
    - {}
"""


def _convert(text: str) -> Any:
    return convert(yaml.safe_load(text), cluster=WEST)


def _with(spec: dict[str, Any], api: str = "security.istio.io/v1") -> dict[str, Any]:
    return {"apiVersion": api, "kind": "AuthorizationPolicy", "metadata": {"name": "p", "namespace": "default"},
            "spec": spec}


def test_every_supported_field_converts() -> None:
    p = _convert(FULL)
    assert isinstance(p, AuthorizationPolicy)
    assert (p.cluster, p.namespace, p.name, p.policy_id) == (WEST, "shop", "ratings.full", "shop.ratings.full")
    assert p.action is Action.DENY
    assert p.selector == (("app", "ratings"), ("version", "v1"))
    first, second = p.rules
    assert second == Rule()
    assert first.sources[0] == Source(
        principals=(ValueMatch(ValueMatchKind.EXACT, "td/ns/shop/sa/sleep"),
                    ValueMatch(ValueMatchKind.EXACT, "td/ns/a/sa/b"),
                    ValueMatch(ValueMatchKind.SUFFIX, "/sa/admin"), ValueMatch(ValueMatchKind.PREFIX, "td/ns/x/"),
                    ValueMatch(ValueMatchKind.ANY)),
        not_principals=(ValueMatch(ValueMatchKind.EXACT, "td/ns/shop/sa/bad"),))
    assert first.sources[1] == Source(namespaces=(ValueMatch(ValueMatchKind.EXACT, "shop"),
                                                  ValueMatch(ValueMatchKind.PREFIX, "team-")),
                                      not_namespaces=(ValueMatch(ValueMatchKind.SUFFIX, "-test"),))
    assert first.operations == (Operation(
        ports=(9080, 9443), not_ports=(15000,),
        methods=(ValueMatch(ValueMatchKind.EXACT, "GET"), ValueMatch(ValueMatchKind.EXACT, "HEAD")),
        not_methods=(ValueMatch(ValueMatchKind.EXACT, "DELETE"),),
        paths=(ValueMatch(ValueMatchKind.EXACT, "/ratings"), ValueMatch(ValueMatchKind.PREFIX, "/api/"),
               ValueMatch(ValueMatchKind.SUFFIX, ".json"), ValueMatch(ValueMatchKind.ANY)),
        not_paths=(ValueMatch(ValueMatchKind.PREFIX, "/api/private"),)),)
    cluster, ns, principal, header = first.conditions
    assert cluster == WhenCondition("source.cluster",
                                    (ValueMatch(ValueMatchKind.EXACT, "east"), ValueMatch(ValueMatchKind.ANY)),
                                    (ValueMatch(ValueMatchKind.EXACT, "west"),))
    assert ns.values == (ValueMatch(ValueMatchKind.EXACT, "shop"),)
    assert principal.not_values == (ValueMatch(ValueMatchKind.EXACT, "td/ns/shop/sa/x"),)  # scheme stripped
    assert header.header == "x-tenant" and header.values[1] == ValueMatch(ValueMatchKind.PREFIX, "beta")


def test_defaults_and_v1beta1() -> None:
    p = convert(_with({}, "security.istio.io/v1beta1"), cluster=WEST)
    assert isinstance(p, AuthorizationPolicy)
    assert p.action is Action.ALLOW and p.selector is None and p.rules == ()  # allow-nothing
    no_spec = convert({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                       "metadata": {"name": "deny-all"}}, cluster=WEST)
    assert isinstance(no_spec, AuthorizationPolicy) and no_spec.namespace == "default" and no_spec.rules == ()
    allow_all = convert(_with({"rules": [{}]}), cluster=WEST)
    assert isinstance(allow_all, AuthorizationPolicy) and allow_all.rules == (Rule(),)


def test_selects_by_namespace_labels_and_root_namespace() -> None:
    p = convert(_with({"selector": {"matchLabels": {"app": "ratings"}}}), cluster=WEST)
    assert isinstance(p, AuthorizationPolicy)
    assert p.selects("default", {"app": "ratings", "version": "v1"})
    assert not p.selects("default", {"app": "reviews"})
    assert not p.selects("other", {"app": "ratings"})
    mesh_wide = convert({**_with({}), "metadata": {"name": "m", "namespace": "istio-system"}}, cluster=WEST)
    assert isinstance(mesh_wide, AuthorizationPolicy) and mesh_wide.selects("anything", {})
    ours = convert({**_with({}), "metadata": {"name": "m", "namespace": "meshfed-system"}}, cluster=WEST)
    assert isinstance(ours, AuthorizationPolicy) and ours.selects("anything", {})


@pytest.mark.parametrize(("spec", "field", "text"), [
    ({"action": "AUDIT"}, "spec.action", "AUDIT"),
    ({"action": "CUSTOM", "provider": {"name": "x"}}, "spec.provider", "not supported"),
    ({"action": "CUSTOM"}, "spec.action", "CUSTOM"),
    ({"targetRef": {"kind": "Gateway"}}, "spec.targetRef", "targetRef"),
    ({"targetRefs": []}, "spec.targetRefs", "not supported"),
    ({"selector": {"matchExpressions": []}}, "spec.selector.matchExpressions", "matchLabels"),
    ({"selector": {"matchLabels": {"app": 3}}}, "spec.selector.matchLabels.app", "strings"),
    ({"rules": {}}, "spec.rules", "list"),
    ({"rules": [{"from": [{"source": {"ipBlocks": ["1.2.3.4"]}}]}]}, "spec.rules[0].from[0].source.ipBlocks",
     "source.cluster"),
    ({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]},
     "spec.rules[0].from[0].source.requestPrincipals", "not supported"),
    ({"rules": [{"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]}]},
     "spec.rules[0].from[0].source.remoteIpBlocks", "not supported"),
    ({"rules": [{"from": [{"source": {}}]}]}, "spec.rules[0].from[0].source", "at least one"),
    ({"rules": [{"from": [{}]}]}, "spec.rules[0].from[0].source", "required"),
    ({"rules": [{"to": [{"operation": {"hosts": ["a"]}}]}]}, "spec.rules[0].to[0].operation.hosts", "not supported"),
    ({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}, "spec.rules[0].to[0].operation.ports[0]", "port"),
    ({"rules": [{"to": [{"operation": {"ports": ["70000"]}}]}]}, "spec.rules[0].to[0].operation.ports[0]", "port"),
    ({"rules": [{"to": [{"operation": {"methods": ["get"]}}]}]}, "spec.rules[0].to[0].operation.methods[0]",
     "upper case"),
    ({"rules": [{"to": [{"operation": {"paths": ["ratings"]}}]}]}, "spec.rules[0].to[0].operation.paths[0]", "'/'"),
    ({"rules": [{"to": [{"operation": {"paths": ["/a/*/b"]}}]}]}, "spec.rules[0].to[0].operation.paths[0]",
     "first or last"),
    ({"rules": [{"to": [{"operation": {"paths": ["/a/{*}"]}}]}]}, "spec.rules[0].to[0].operation.paths[0]",
     "templates"),
    ({"rules": [{"to": [{"operation": {}}]}]}, "spec.rules[0].to[0].operation", "at least one"),
    ({"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}, "spec.rules[0].when[0].key",
     "request.auth.claims[iss]"),
    ({"rules": [{"when": [{"key": "source.ip", "values": ["1.2.3.4"]}]}]}, "spec.rules[0].when[0].key",
     "source.cluster"),
    ({"rules": [{"when": [{"key": "source.cluster"}]}]}, "spec.rules[0].when[0]", "values or notValues"),
    ({"rules": [{"when": [{"key": "source.cluster", "values": ["ea*"]}]}]}, "spec.rules[0].when[0].values[0]",
     "whole cluster names"),
    ({"rules": [{"when": [{"key": "source.cluster", "values": ["East_1"]}]}]}, "spec.rules[0].when[0].values[0]",
     "cluster names"),
    ({"rules": [{"when": [{"key": "source.cluster", "values": ["east"], "extra": 1}]}]},
     "spec.rules[0].when[0].extra", "not supported"),
    ({"rules": [{"from": [], "unknown": 1}]}, "spec.rules[0].unknown", "not supported"),
])
def test_unsupported_or_bad_fields_are_errors_naming_the_path(spec: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(ConversionError) as err:
        convert(_with(spec), cluster=WEST)
    assert err.value.field == field, err.value
    assert text in str(err.value)
    assert "AuthorizationPolicy default/p" in str(err.value)


def test_bad_metadata_name() -> None:
    with pytest.raises(ConversionError) as err:
        convert({**_with({}), "metadata": {"name": "Bad_Name"}}, cluster=WEST)
    assert err.value.field == "metadata.name"


def test_manifest_file_keeps_the_good_policy_and_reports_the_bad_one(tmp_path: Any) -> None:
    text = FULL + "---\n" + yaml.safe_dump(_with({"action": "AUDIT"}))
    objects, problems = parse_file(text, file="authz.yaml", cluster=WEST)
    assert [o.name for _, o in objects] == ["ratings.full"]
    assert [(p.document, p.field) for p in problems] == [(2, "spec.action")]
    # A file of good policies lands in the snapshot's extras.
    (tmp_path / "authorizationpolicy-ratings.yaml").write_text(FULL)
    snap = ManifestSource(tmp_path, "west").load().snapshot
    assert [p.policy_id for p in snap.extras if isinstance(p, AuthorizationPolicy)] == ["shop.ratings.full"]
